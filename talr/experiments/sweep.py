"""`talr sweep --config configs/sweeps/<x>.yaml`: a grid of `talr fit` runs and one results table.

A sweep file names the base config(s), a grid over any `talr fit` option (a special key `config`
stacks extra config files, for example one per strategy), fixed extra arguments, and where runs
go; `monitor`/`mode` name the domain metric that picks each run's best checkpoint, and `record`
lists more validation metrics to put in the table (before training, at the best step, last). Every combination is one run in `<out>/<name>/`, started as its own `talr fit` process (its
output in `<name>/fit.log`). A finished run leaves `<name>/summary.json` (written by the
`RunSummary` callback the sweep adds); the table `<out>/results.csv` and `.json` is rebuilt from
those files after every run, so an interrupted sweep loses nothing. Restarting skips finished runs
and resumes an interrupted one from its `last.ckpt`.

    talr sweep --config configs/sweeps/medcalc_lr.yaml              # run everything, one after another
    talr sweep --config configs/sweeps/medcalc_lr.yaml --print-commands   # for a cluster scheduler

A sweep file with a `slurm:` section (sbatch options, e.g. `{gres: "gpu:1", time: "08:00:00"}`) makes
`--print-commands` print a SLURM array script instead of bare commands: one array task per unfinished
run, each resuming its run from `last.ckpt` when one exists at the time the task starts
(`talr sweep --print-commands > sweep.sbatch && sbatch sweep.sbatch`, then `--collect`).
    talr sweep --config configs/sweeps/medcalc_lr.yaml --collect          # only rebuild the table
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

SUMMARY = "summary.json"
# a run's numbers of its fine-tuned weights (best / last checkpoint and their paired changes), which a
# WiSE-FT alpha's or a merge point's row replaces by its own
PER_WEIGHTS = re.compile(r"_(best|last|delta|delta_low|delta_high|p|n|test)$")


@dataclass
class Sweep:
    """A parsed sweep file."""

    base: list[str]
    grid: dict[str, list[Any]]
    args: list[str] = field(default_factory=list)
    out: str = "runs/sweep"
    monitor: str = "val/accuracy"
    mode: str = "max"
    record: list[str] = field(default_factory=list)
    slurm: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> "Sweep":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sweep file not found: {path}")
        spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        keys = ("base", "grid", "args", "out", "monitor", "mode", "record", "slurm")
        unknown = set(spec) - set(keys)
        if unknown:
            raise ValueError(f"{path}: unknown sweep key(s) {sorted(unknown)}; expected {', '.join(keys)}")
        if not isinstance(spec.get("slurm") or {}, dict):
            raise ValueError(f"{path}: slurm must map sbatch options to values (for example gres: gpu:1), got {spec['slurm']!r}")
        base = spec.get("base") or []
        base = [base] if isinstance(base, str) else list(base)
        grid = spec.get("grid") or {}
        if not base and "config" not in grid:
            raise ValueError(f"{path}: give `base` (config files for talr fit) or a `config` key in `grid`")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"{path}: grid.{key} must be a non-empty list, got {values!r}")
        if spec.get("mode", "max") not in ("max", "min"):
            raise ValueError(f"{path}: mode must be 'max' or 'min', got {spec['mode']!r}")
        # relative config paths are relative to the working directory, like `talr fit --config`
        return cls(base=base, grid=grid, args=[str(a) for a in spec.get("args") or []],
                   out=str(spec.get("out", cls.out)), monitor=spec.get("monitor", cls.monitor),
                   mode=spec.get("mode", cls.mode), record=list(spec.get("record") or []),
                   slurm=dict(spec.get("slurm") or {}))

    def runs(self) -> list[dict[str, Any]]:
        """Every combination of the grid, in the grid's order (the last key varies fastest)."""
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]


def run_name(values: dict[str, Any]) -> str:
    """A readable, file-system-safe directory name: `loss=talr_learning_rate=1e-05_seed_everything=0`."""
    parts = []
    for key, value in values.items():
        short = Path(str(value)).stem if key == "config" else value
        parts.append(f"{key.split('.')[-1]}={short}")
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", "_".join(parts)) or "run"


def fit_command(sweep: Sweep, values: dict[str, Any], run_dir: Path) -> list[str]:
    """The `talr fit` command of one run (without `--ckpt_path`)."""
    configs = [*sweep.base, *([values["config"]] if "config" in values else [])]
    command = ["talr", "fit"]
    for config in configs:
        command += ["--config", str(config)]
    for key, value in values.items():
        if key != "config":
            command.append(f"--{key}={json.dumps(value) if isinstance(value, (list, dict)) else value}")
    command += [
        *sweep.args,
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.logger.init_args.save_dir={run_dir}",
        "--trainer.callbacks+=callbacks.run_summary.RunSummary",
        f"--trainer.callbacks.path={run_dir / SUMMARY}",
        f"--trainer.callbacks.monitor={sweep.monitor}",
        f"--trainer.callbacks.mode={sweep.mode}",
    ]
    if sweep.record:
        command.append(f"--trainer.callbacks.record=[{', '.join(sweep.record)}]")
    return command


def slurm_array(sweep: Sweep, todo: list[dict[str, Any]], out: Path, sweep_file: str) -> str:
    """A SLURM array script: task i runs the i-th unfinished run of `todo`, its output in the run's fit.log,
    resuming from the run's last checkpoint if one exists when the task starts (a requeued or rerun task)."""
    options = {"job-name": Path(sweep.out).name or "talr-sweep", **sweep.slurm,
               "array": f"0-{len(todo) - 1}", "output": str(out / "slurm-%A_%a.out")}
    lines = ["#!/bin/bash", *(f"#SBATCH --{key}={value}" for key, value in options.items()),
             f"# {len(todo)} unfinished runs of {sweep_file}; submit from the directory the sweep paths are relative to:",
             "#   sbatch <this file>",
             f"# then the table: talr sweep --config {sweep_file} --collect", "set -euo pipefail", "RUNS=("]
    lines += [f"  {_quote(str(out / run_name(values)))}" for values in todo]
    lines += [")", 'RUN="${RUNS[$SLURM_ARRAY_TASK_ID]}"', 'mkdir -p "$RUN"', "RESUME=()",
              'if [ -n "$(find "$RUN" -name \'last*.ckpt\' -print -quit)" ]; then RESUME=(--ckpt_path last); fi',
              'case "$SLURM_ARRAY_TASK_ID" in']
    for i, values in enumerate(todo):
        command = " ".join(_quote(c) for c in fit_command(sweep, values, out / run_name(values)))
        lines.append(f'  {i}) {command} ${{RESUME[@]+"${{RESUME[@]}}"}} >> "$RUN/fit.log" 2>&1 ;;')
    lines.append("esac")
    return "\n".join(lines) + "\n"


def has_last_checkpoint(run_dir: Path) -> bool:
    return any(run_dir.rglob("last*.ckpt"))


def collect(sweep: Sweep, out: Path) -> list[dict[str, Any]]:
    """One row per run of the grid: its grid values, status, scores and config; written as CSV and JSON.
    A run with WiSE-FT or task-vector merging adds one row per alpha or merge point after its own
    (`weight_space_rows`).

    A finished run's row also holds its paired changes from the initial model with 95% intervals
    (`domain_delta`, `_delta_low`, `_delta_high`, `_p`, `_n`, `_test`; `general_*` the same, from
    GeneralBenchmarks) and the per-item files `talr report` pairs runs with (run it from the
    directory the sweep ran in, so that the runs' relative log directories resolve)."""
    from talr.experiments.significance import run_columns  # scipy: here, like write_atomic below
    from talr.results import write_atomic  # here, not at the top: talr.results imports lightning, `--help` need not wait

    rows = []
    for values in sweep.runs():
        name = run_name(values)
        row: dict[str, Any] = {"run": name, **{k: v for k, v in values.items()}}
        summary_path = out / name / SUMMARY
        if summary_path.is_file():
            summary = relocated(json.loads(summary_path.read_text(encoding="utf-8")), out / name)
            row.update(status="done", **{k: v for k, v in summary.items() if not isinstance(v, (dict, list))})
            row["config"] = summary.get("config_file", values.get("config"))
            row.update(run_columns(summary))  # domain change from the initial model; the files to pair runs with
            rows.append(row)
            rows.extend(weight_space_rows(row, summary, list(values)))
        else:
            row["status"] = "interrupted" if (out / name).exists() else "pending"
            rows.append(row)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out / "results.csv", buffer.getvalue())
    full = []
    for row in rows:  # the JSON also carries each run's full summary, history and config
        summary_path = out / row["run"] / SUMMARY
        full.append({**row, "summary": relocated(json.loads(summary_path.read_text(encoding="utf-8")), out / row["run"])}
                    if summary_path.is_file() else row)
    write_atomic(out / "results.json", json.dumps(full, indent=2))
    return rows


def relocated(summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The summary with its paths (`log_dir`, `config_file`) under `run_dir` where the run was written
    elsewhere: a sweep folder copied from a cluster's scratch, or kept in a repository, still pairs its
    runs. The recorded path's part below the run's own folder name is looked up below `run_dir`."""
    recorded = summary.get("log_dir")
    if not recorded or Path(recorded).is_dir():
        return summary
    parts = Path(recorded).parts
    if run_dir.name not in parts:
        return summary
    below = parts[len(parts) - parts[::-1].index(run_dir.name):]  # after the last occurrence of the run's name
    log_dir = run_dir.joinpath(*below)
    if not log_dir.is_dir():
        return summary
    moved = {**summary, "log_dir": str(log_dir)}
    if summary.get("config_file"):
        moved["config_file"] = str(log_dir / Path(summary["config_file"]).name)
    return moved


# a weight-space search's rows in a run summary (callbacks.model_averaging): the summary's key, the
# column naming the run, and each row's name after `<run>@`
WEIGHT_SPACE_ROWS = (
    ("wiseft", "wiseft_of", lambda e: f"alpha={e['alpha']:.2f}"),
    ("merge", "merge_of", lambda e: f"{e['merge_method']},density={e['merge_density']:.2f},weight={e['merge_weight']:.2f}"),
)


def weight_space_rows(run_row: dict[str, Any], summary: dict[str, Any], grid_keys: list[str]) -> list[dict[str, Any]]:
    """One row per WiSE-FT alpha (the summary's `wiseft` list), named `<run>@alpha=0.50` with `alpha` and
    `wiseft_of` (the run), and one per task-vector merge point (`merge`), named
    `<run>@ties,density=0.50,weight=1.00` with `merge_method`, `merge_density`, `merge_weight` and
    `merge_of`. Each keeps the run's grid values and what describes the run or its initial model
    (`*_initial`, options, files); the point's numbers go into the columns of the run's best checkpoint
    (`domain_best` on the run's monitor, `general_best`, `forgetting_*_best`, `val_*_best`) with their
    paired changes from the initial model, so the report reads them as it reads a run's."""
    from talr.experiments.significance import run_columns

    kept = {k: v for k, v in run_row.items() if k in grid_keys or not PER_WEIGHTS.search(k)}
    monitor = str(summary.get("monitor", "")).replace("/", "_")
    rows = []
    for key, of, name in WEIGHT_SPACE_ROWS:
        for entry in summary.get(key) or []:
            numbers = {k: v for k, v in entry.items() if not isinstance(v, (dict, list))}
            domain = numbers.get(f"{monitor}_best", math.nan)
            row = {**kept, "run": f"{run_row['run']}@{name(entry)}", of: run_row["run"], **numbers, "domain_best": domain}
            row.update(run_columns({**summary, "domain_best": domain, "general_file_best": entry.get("general_file_best"),
                                    "domain_generations_file": entry.get("domain_generations_file")}))
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="talr sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the sweep file (YAML)")
    parser.add_argument("--print-commands", action="store_true", help="print one `talr fit` command per unfinished run (a SLURM array script if the sweep file has `slurm:`) and exit")
    parser.add_argument("--collect", action="store_true", help="only rebuild results.csv/json from the finished runs")
    parser.add_argument("--out", help="output directory (default: the sweep file's `out`)")
    args = parser.parse_args(argv)

    sweep = Sweep.load(args.config)
    out = Path(args.out or sweep.out)
    runs = sweep.runs()
    todo = [v for v in runs if not (out / run_name(v) / SUMMARY).is_file()]
    if args.print_commands and sweep.slurm:
        if todo:
            out.mkdir(parents=True, exist_ok=True)  # SLURM writes each task's output file there from the start
            print(slurm_array(sweep, todo, out, args.config), end="")
        print(f"# {len(todo)} unfinished runs; then: talr sweep --config {args.config} --collect", file=sys.stderr)
        return 0
    if args.print_commands:
        for values in todo:
            run_dir = out / run_name(values)
            command = fit_command(sweep, values, run_dir) + (["--ckpt_path", "last"] if has_last_checkpoint(run_dir) else [])
            print(" ".join(_quote(c) for c in command))
        print(f"# then: talr sweep --config {args.config} --collect", file=sys.stderr)
        return 0
    if args.collect:
        rows = collect(sweep, out)
        print(f"[sweep] {sum(r['status'] == 'done' for r in rows)}/{len(rows)} runs done; table: {out / 'results.csv'}")
        return 0

    out.mkdir(parents=True, exist_ok=True)
    print(f"[sweep] {len(runs)} runs, {len(runs) - len(todo)} already finished; results in {out}")
    failed = []
    for values in tqdm(todo, desc="sweep", unit="run"):
        name = run_name(values)
        run_dir = out / name
        run_dir.mkdir(parents=True, exist_ok=True)
        command = fit_command(sweep, values, run_dir)
        if has_last_checkpoint(run_dir):
            command += ["--ckpt_path", "last"]  # an interrupted run goes on where it stopped
        command[0] = str(Path(sys.executable).with_name("talr"))
        started = time.time()
        with (run_dir / "fit.log").open("a", encoding="utf-8") as log:
            log.write(f"\n$ {' '.join(_quote(c) for c in command)}\n")
            log.flush()
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0 or not (run_dir / SUMMARY).is_file():
            failed.append(name)
            tqdm.write(f"[sweep] {name}: failed (exit {done.returncode}); see {run_dir / 'fit.log'}")
        else:
            tqdm.write(f"[sweep] {name}: done in {time.time() - started:.0f} s")
        collect(sweep, out)
    rows = collect(sweep, out)
    print(f"[sweep] {sum(r['status'] == 'done' for r in rows)}/{len(rows)} runs done; table: {out / 'results.csv'}; "
          f"plot it with: talr report {out / 'results.csv'}")
    if failed:
        print(f"[sweep] failed: {', '.join(failed)} (rerun the same command to retry them)", file=sys.stderr)
    return 1 if failed else 0


def _quote(text: str) -> str:
    return text if re.fullmatch(r"[\w@%+=:,./\-\[\]]+", text) else "'" + text.replace("'", "'\\''") + "'"
