"""`talr sweep` and `talr report` end to end with the tiny model: 2 learning rates x 2 strategies,
the results table checked against each run's own TensorBoard and lm-eval files, the Pareto plot
and notebook, and a restart that runs nothing new; and a run with WiSE-FT over 3 alphas, whose
alphas become rows of the table (checked against its WiSE-FT files) and a curve of the plot."""

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import SHARED, tiny_fit_config
from talr.experiments.report import initial_point, pareto_front, plot, rate_label, trade_off_table, wiseft_table
from talr.experiments.report import main as report_main
from talr.experiments.significance import between_learning_rates, between_strategies, points_against_runs
from talr.experiments.sweep import Sweep, collect, run_name
from talr.experiments.verdicts import main as verdicts_main

REPO = Path(__file__).resolve().parents[1]
TALR = str(Path(sys.executable).with_name("talr"))


def talr(*args, cwd=REPO):
    env = {**os.environ, "TALR_BENCH_DIR": str(SHARED / "data"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([TALR, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=1200)


@pytest.fixture(scope="module")
def sweep(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    spec = {
        "base": [str(REPO / "configs" / "quickstart.yaml")],
        "grid": {"model.loss": ["CrossEntropy", "TALR"], "model.learning_rate": [1.0e-4, 3.0e-2]},
        "args": [
            f"--model.model={tiny_model_dir}", "--model.max_new_tokens=4",
            "--data.task.init_args.num_synthetic=12", "--data.val_size=4", "--data.batch_size=4",
            "--data.micro_batch_size=4", "--trainer.max_steps=2", "--trainer.val_check_interval=1",
            "--trainer.callbacks+=callbacks.general_benchmarks.GeneralBenchmarks",
            "--trainer.callbacks.tasks=[talr_arc_easy]", "--trainer.callbacks.limit=8",
            "--trainer.callbacks.threshold=0.0",
        ],
        "out": str(root / "out"),
        "record": ["val/loss"],
    }
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    done = talr("sweep", "--config", str(path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return path, Path(spec["out"]), done


def test_sweep_table_matches_each_runs_own_logs(sweep):
    path, out, _ = sweep
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 4 and set(table["status"]) == {"done"}
    assert sorted(zip(table["loss"], table["learning_rate"])) == [("ce", 1e-4), ("ce", 3e-2), ("talr", 1e-4), ("talr", 3e-2)]
    for _, row in table.iterrows():
        run_dir = out / row["run"]
        (log_dir,) = {p.parent for p in run_dir.rglob("events.out.tfevents.*")}
        scalars = EventAccumulator(str(log_dir)).Reload()
        # each validation at the step it followed (the module logs its own x-axis step), one per step
        by_step = lambda tag: {e.step: e.value for e in scalars.Scalars(tag)}  # noqa: E731
        assert [e.step for e in scalars.Scalars("val/loss")] == [0, 1, 2]
        accuracy, loss = by_step("val/accuracy"), by_step("val/loss")
        assert row["domain_initial"] == pytest.approx(accuracy[0])
        assert row["domain_best"] == pytest.approx(max(accuracy[1], accuracy[2]))
        best = 1 if accuracy[1] >= accuracy[2] else 2  # the earliest best
        assert row["best_step"] == best
        # a recorded metric and the forgetting drift, read at the same validations
        assert (row["val_loss_initial"], row["val_loss_best"], row["val_loss_last"]) == pytest.approx((loss[0], loss[best], loss[2]))
        curve = {e["step"]: e for e in json.loads(next(run_dir.rglob("forgetting/curve.json")).read_text())}
        assert sorted(curve) == [0, 1, 2]
        assert row["forgetting_kl_best"] == pytest.approx(curve[best]["kl"])
        assert row["forgetting_nll_increase_last"] == pytest.approx(curve[2]["nll_increase"])
        assert row["forgetting_kl_initial"] == pytest.approx(curve[0]["kl"])
        general = json.loads(next(run_dir.rglob("general/fit_end.json")).read_text())
        start = json.loads(next(run_dir.rglob("general/fit_start.json")).read_text())
        assert row["general_best"] == pytest.approx(general["primary"]["talr_arc_easy"])
        assert row["general_initial"] == pytest.approx(start["primary"]["talr_arc_easy"])
        # the paired changes from the initial model: domain over the held-out rows, general over the documents
        def correct(step):
            lines = next(run_dir.rglob(f"generations/val_step{step:06d}.jsonl")).read_text().splitlines()
            return {r["row_index"]: int(r["correct"]) for r in map(json.loads, lines)}
        before, after = correct(0), correct(best)
        b, c, p = mcnemar_by_hand([before[i] for i in sorted(after)], [after[i] for i in sorted(after)])
        assert (row["domain_n"], row["domain_delta"], row["domain_p"]) == pytest.approx((len(after), (c - b) / len(after), p))
        assert row["general_delta"] == pytest.approx(row["general_best"] - row["general_initial"])
        assert row["general_delta_low"] <= row["general_delta"] <= row["general_delta_high"] and row["general_n"] == 8
        assert row["general_file_best"] == str(next(run_dir.rglob("general/fit_end.json")).resolve())
        config = yaml.safe_load(Path(row["config"]).read_text())  # the run's full config is in the table
        assert config["model"]["loss"]["class_path"] == {"ce": "talr.losses.CrossEntropy", "talr": "talr.losses.TALR"}[row["loss"]]
        assert config["model"]["learning_rate"] == row["learning_rate"]
        # all three measurement callbacks ran in every run (quickstart.yaml has two, the sweep adds lm-eval)
        assert "general/score" in scalars.Tags()["scalars"] and "forgetting/nll_increase" in scalars.Tags()["scalars"]
        assert any(tag.startswith("token_probs/") for tag in scalars.Tags()["histograms"])
        assert list(run_dir.rglob("token_probs/step_*.parquet")) and list(run_dir.rglob("forgetting/curve.json"))
    full = json.loads((out / "results.json").read_text())
    assert all(r["summary"]["history"] for r in full)


def test_restarting_a_finished_sweep_runs_nothing(sweep):
    path, out, _ = sweep
    logs = {p: p.stat().st_size for p in out.rglob("fit.log")}
    again = talr("sweep", "--config", str(path))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "4 runs, 4 already finished" in again.stdout
    assert {p: p.stat().st_size for p in out.rglob("fit.log")} == logs
    printed = talr("sweep", "--config", str(path), "--print-commands")
    assert printed.stdout.strip() == ""  # nothing left to schedule


def test_report_draws_the_pareto_plot_and_table(sweep):
    _, out, _ = sweep
    done = talr("report", str(out / "results.csv"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pd.read_csv(out / "results.csv")
    markdown = (out / "pareto.md").read_text()
    # the frontier marks, recomputed here by brute force over the four points
    points = {(r["loss"], r["learning_rate"]): (r["domain_best"], r["general_best"]) for _, r in table.iterrows()}
    for (loss, lr), (x, y) in points.items():
        dominated = any(xo >= x and yo >= y and (xo > x or yo > y) for key, (xo, yo) in points.items() if key != (loss, lr))
        line = next(line for line in markdown.splitlines() if line.startswith(f"| {loss} | {lr:g} |"))
        assert line.endswith("| yes |") == (not dominated)
    assert "| initial model |" in markdown
    assert "## Significance" in markdown and "| 0.03 | ce | talr | 1 |" in markdown  # strategies at one learning rate


def test_report_with_a_loss_on_each_axis(sweep, tmp_path):
    _, out, _ = sweep
    done = talr("report", str(out / "results.csv"), "--x", "val_loss_best", "--x-lower-better",
                "--y", "forgetting_kl_best", "--y-lower-better", "--y-log", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "pareto.png").is_file()
    table = pd.read_csv(out / "results.csv")
    points = {(r["loss"], r["learning_rate"]): (r["val_loss_best"], r["forgetting_kl_best"]) for _, r in table.iterrows()}
    markdown = (tmp_path / "pareto.md").read_text()
    for key, (x, y) in points.items():  # lower is better on both axes
        dominated = any(xo <= x and yo <= y and (xo < x or yo < y) for other, (xo, yo) in points.items() if other != key)
        line = next(line for line in markdown.splitlines() if line.startswith(f"| {key[0]} | {key[1]:g} |"))
        assert line.endswith("| yes |") == (not dominated)
    initial = next(line for line in markdown.splitlines() if line.startswith("| initial model |"))
    assert f"{table['val_loss_initial'].mean():.4f}" in initial
    # the drift axis: symmetric log, linear below the smallest nonzero drift, reversed; the initial zero is inside
    drift = trade_off_table(table, "val_loss_best", "forgetting_kl_best", True, True)
    axes = plot(drift, (1.0, 0.0), "x", "y", True, True, y_log=True).axes[0]
    low, high = sorted(axes.get_ylim())
    assert axes.get_yscale() == "symlog" and axes.yaxis_inverted() and axes.xaxis_inverted()
    assert low <= 0.0 <= high and low <= drift["general"].min() and drift["general"].max() <= high


def test_pareto_notebook_executes_on_the_sweep(sweep, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    _, out, _ = sweep
    monkeypatch.setenv("TALR_RESULTS", str(out / "results.csv"))
    notebook = nbformat.read(REPO / "notebooks" / "pareto.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    code = [c for c in notebook.cells if c.cell_type == "code"]
    drew = {i for i, c in enumerate(code) if any("image/png" in o.get("data", {}) for o in c.get("outputs", []))}
    pareto = next(i for i, c in enumerate(code) if "trade_off_table(results, x, y" in c.source)
    drift = next(i for i, c in enumerate(code) if "drift = trade_off_table" in c.source)
    assert {pareto, drift} <= drew, "the notebook drew no Pareto or no drift figure"


# -- WiSE-FT: every alpha a row of the table and a point of a curve --------------------------------
ALPHAS = (0.0, 0.5, 1.0)


@pytest.fixture(scope="module")
def wiseft_sweep(tiny_model_dir, tmp_path_factory):
    """One run (ce, 2 steps) with ForgettingMonitor, GeneralBenchmarks and WiSE-FT over 3 alphas."""
    root = tmp_path_factory.mktemp("wiseft-sweep")
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"monitor": "val/accuracy", "mode": "max", "save_last": True}},
        {"class_path": "callbacks.forgetting_monitor.ForgettingMonitor", "init_args": {"max_new_tokens": 8}},
        {"class_path": "callbacks.general_benchmarks.GeneralBenchmarks",
         "init_args": {"tasks": ["talr_arc_easy"], "limit": 8, "batch_size": 4, "threshold": 0.0}},
        {"class_path": "callbacks.model_averaging.WiSEFT", "init_args": {"alphas": list(ALPHAS)}},
    ]
    base = tiny_fit_config(tiny_model_dir, root, "v0", callbacks, validate_before_fit=True,
                           trainer={"max_steps": 2, "val_check_interval": 1},
                           model={"loss": "CrossEntropy", "generate": True, "max_new_tokens": 4})
    spec = {"base": [str(base)], "grid": {"model.learning_rate": [3.0e-2]}, "out": str(root / "out")}
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    done = talr("sweep", "--config", str(path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return Path(spec["out"])


def test_every_wiseft_alpha_is_a_row_of_the_table(wiseft_sweep):
    out = wiseft_sweep
    table = pd.read_csv(out / "results.csv")
    (run,) = [row for _, row in table[table["alpha"].isna()].iterrows()]
    alphas = table[table["wiseft_of"] == run["run"]].set_index("alpha")
    assert len(table) == 1 + len(ALPHAS) and list(alphas.index) == list(ALPHAS)
    assert list(alphas["run"]) == [f"{run['run']}@alpha={a:.2f}" for a in ALPHAS]
    run_dir = out / run["run"]
    report = json.loads(next(run_dir.rglob("wiseft.json")).read_text())
    assert run["wiseft_alpha"] == report["chosen_alpha"]
    assert [a for a in ALPHAS if alphas.loc[a, "wiseft_chosen"] in (True, "True")] == [report["chosen_alpha"]]
    for result in report["results"]:
        row = alphas.loc[result["alpha"]]
        tag = f"wiseft_alpha{result['alpha']:.2f}"
        # the run's options and its initial model's numbers ...
        assert (row["loss"], row["learning_rate"], row["status"]) == (run["loss"], run["learning_rate"], "done")
        assert row["domain_initial"] == run["domain_initial"] and row["general_initial"] == run["general_initial"]
        # ... and the alpha's own in the columns of a run's best checkpoint, read here from WiSE-FT's files
        assert row["domain_best"] == pytest.approx(result["metrics"]["accuracy"])
        assert row["val_loss_best"] == pytest.approx(result["metrics"]["loss"])
        general = next(run_dir.rglob(f"general/{tag}.json"))
        assert row["general_best"] == pytest.approx(json.loads(general.read_text())["primary"]["talr_arc_easy"])
        assert row["general_file_best"] == str(general.resolve())
        assert row["general_delta"] == pytest.approx(row["general_best"] - row["general_initial"])
        assert row["forgetting_kl_best"] == pytest.approx(result["forgetting"][0]["kl"])
        # the paired domain change, counted here from the alpha's generations and the step-0 ones
        def correct(name):
            lines = next(run_dir.rglob(f"generations/{name}.jsonl")).read_text().splitlines()
            return {r["row_index"]: int(r["correct"]) for r in map(json.loads, lines)}
        before, after = correct("val_step000000"), correct(tag)
        b, c, p = mcnemar_by_hand([before[i] for i in sorted(after)], [after[i] for i in sorted(after)])
        assert (row["domain_n"], row["domain_delta"], row["domain_p"]) == pytest.approx((len(after), (c - b) / len(after), p))
    # alpha 0 is the initial model, alpha 1 the run's best checkpoint
    assert (alphas.loc[0.0, "domain_best"], alphas.loc[0.0, "general_best"]) == (run["domain_initial"], run["general_initial"])
    assert alphas.loc[0.0, "forgetting_kl_best"] == pytest.approx(0.0, abs=1e-6)
    assert (alphas.loc[1.0, "domain_best"], alphas.loc[1.0, "general_best"]) == (run["domain_best"], run["general_best"])


def test_report_draws_the_wiseft_alphas_as_a_curve(wiseft_sweep):
    out = wiseft_sweep
    done = talr("report", str(out / "results.csv"))
    assert done.returncode == 0, done.stderr[-2000:]
    table = pd.read_csv(out / "results.csv")
    run = table[table["alpha"].isna()].iloc[0]
    alphas = table[table["alpha"].notna()].sort_values("alpha")
    markdown = (out / "pareto.md").read_text()
    assert "## WiSE-FT" in markdown
    for _, row in alphas.iterrows():  # the WiSE-FT table: one line per alpha
        assert f"| ce | 0.03 | {row['alpha']:.2f} | {row['domain_best']:.4f} |" in markdown
    # the runs' table and the significance table count the run once, not its alphas as seeds
    assert sum(line.startswith("| ce | 0.03 |") and line.endswith("| 1 | yes |") for line in markdown.splitlines()) == 1
    assert "| ce | 0.03 | 1 |" in markdown
    axes = plot(trade_off_table(table), initial_point(table), "x", "y", curves=wiseft_table(table)).axes[0]
    (curve,) = [line for line in axes.get_lines() if line.get_label() == "WiSE-FT ce 0.03"]
    # one connected line through every alpha, from the initial model (alpha 0) to the fine-tuned one (alpha 1)
    assert curve.get_linestyle() == "-"
    assert list(curve.get_xdata()) == pytest.approx(list(alphas["domain_best"]))
    assert list(curve.get_ydata()) == pytest.approx(list(alphas["general_best"]))
    assert (curve.get_xdata()[0], curve.get_ydata()[0]) == pytest.approx((run["domain_initial"], run["general_initial"]))
    assert (curve.get_xdata()[-1], curve.get_ydata()[-1]) == pytest.approx((run["domain_best"], run["general_best"]))


def test_report_pairs_each_alpha_with_its_runs_fine_tuned_model(wiseft_sweep):
    out = wiseft_sweep
    table = pd.read_csv(out / "results.csv")
    run = table[table["alpha"].isna()].iloc[0]
    points = points_against_runs(table).set_index("b")
    assert list(points.index) == [f"alpha={a:.2f}" for a in ALPHAS] and set(points["run"]) == {run["run"]}
    run_dir = out / run["run"]

    def correct(name):  # row -> 0/1, from the generations files
        lines = next(run_dir.rglob(f"generations/{name}.jsonl")).read_text().splitlines()
        return {r["row_index"]: int(r["correct"]) for r in map(json.loads, lines)}

    def documents(path):  # (task, document) -> score, from a GeneralBenchmarks record
        record = json.loads(Path(path).read_text())
        return {(t, d): v for t, per in record["per_document"].items() for d, v in zip(per["doc_ids"], per["values"])}

    def prompts(name):
        lines = next(run_dir.rglob(f"forgetting/prompt_scores/{name}.jsonl")).read_text().splitlines()
        return {p["prompt_index"]: p for p in map(json.loads, lines)}

    best = f"{int(run['best_step']):06d}"
    fine_tuned_rows, fine_tuned_docs, fine_tuned_prompts = (correct(f"val_step{best}"), documents(run["general_file_best"]),
                                                            prompts(f"step{best}"))
    for alpha in ALPHAS:
        tag, pair = f"wiseft_alpha{alpha:.2f}", points.loc[f"alpha={alpha:.2f}"]
        rows = correct(tag)  # the domain (accuracy here): McNemar by hand on the same rows
        b, c, p = mcnemar_by_hand([fine_tuned_rows[i] for i in sorted(rows)], [rows[i] for i in sorted(rows)])
        assert (pair["domain"].delta, pair["domain"].p) == pytest.approx(((c - b) / len(rows), p))
        docs = documents(next(run_dir.rglob(f"general/{tag}.json")))  # the general score, document by document
        assert pair["general"].delta == pytest.approx(np.mean([docs[k] - fine_tuned_docs[k] for k in docs]))
        drift = prompts(tag)  # the drift, prompt by prompt over the same initial answers
        tokens = sum(p["tokens"] for p in drift.values())
        for name, key in (("agreement", "agreement"), ("kl", "kl")):
            change = sum(drift[i][key] - fine_tuned_prompts[i][key] for i in drift) / tokens
            assert pair[name].delta == pytest.approx(change, abs=1e-9), (alpha, name)
    # alpha 1 is the best checkpoint, the run's best step even when validating every step (val_check_interval 1,
    # which Lightning alone would checkpoint at the epoch's end only): no change anywhere
    theta = json.loads(next(run_dir.rglob("wiseft.json")).read_text())["theta"]
    assert f"step={int(run['best_step'])}.ckpt" in theta
    same = points.loc["alpha=1.00"]
    for name in ("domain", "general", "agreement", "kl", "token_accuracy", "nll"):
        assert same[name].delta == pytest.approx(0.0, abs=1e-6), name
    assert report_main([str(out / "results.csv")]) == 0
    markdown = (out / "pareto.md").read_text()
    assert "## WiSE-FT alphas and merge points against their run's fine-tuned model" in markdown
    (line,) = [line for line in markdown.splitlines() if line.startswith(f"| {run['run']} | fine-tuned (step")
               and "| alpha=0.00 |" in line and "McNemar" in line]
    assert f"{points.loc['alpha=0.00', 'domain'].delta:+.4f}" in line


def test_sweep_file_errors_and_run_names(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": ["x.yaml"], "grid": {"model.learning_rate": 1e-5}}))
    with pytest.raises(ValueError, match="grid.model.learning_rate must be a non-empty list"):
        Sweep.load(bad)
    bad.write_text(yaml.safe_dump({"base": ["x.yaml"], "grdi": {}}))
    with pytest.raises(ValueError, match="unknown sweep key"):
        Sweep.load(bad)
    with pytest.raises(FileNotFoundError, match="sweep file not found"):
        Sweep.load(tmp_path / "absent.yaml")
    sweep = Sweep(base=[], grid={"config": ["configs/medcalc/ce.yaml", "configs/medcalc/talr.yaml"], "seed_everything": [0, 1]})
    names = [run_name(v) for v in sweep.runs()]
    assert names == ["config=ce_seed_everything=0", "config=ce_seed_everything=1",
                     "config=talr_seed_everything=0", "config=talr_seed_everything=1"]


def test_pareto_front_by_brute_force():
    xs, ys = [0.1, 0.2, 0.3, 0.2, 0.05], [0.9, 0.8, 0.1, 0.8, 0.95]
    # (0.2, 0.8) appears twice: neither beats the other, both stay
    assert pareto_front(xs, ys) == [True, True, True, True, True]
    assert pareto_front([0.1, 0.2], [0.5, 0.6]) == [False, True]


def test_learning_rates_are_labelled_short():
    assert [rate_label(r) for r in (1e-4, 3e-05, 2.5e-5, 1e-06, 0.03, 0.5, 0.0)] == \
        ["1e-4", "3e-5", "2.5e-5", "1e-6", "0.03", "0.5", "0"]


def _cell_table(points: dict[tuple[str, float], tuple[float, float]]) -> pd.DataFrame:
    rows = [{"loss": loss, "learning_rate": rate, "domain": x, "general": y, "runs": 1, "pareto": False,
             "domain_low": math.nan, "domain_high": math.nan, "general_low": math.nan, "general_high": math.nan}
            for (loss, rate), (x, y) in points.items()]
    return pd.DataFrame(rows)


def test_pareto_plot_keeps_each_strategys_colour_and_writes_rate_labels_apart():
    from matplotlib.colors import to_hex

    # a crowded study: ce and talr at three rates packed together, three strategies at one rate among them
    crowded = _cell_table({("ce", 1e-5): (0.583, 0.967), ("ce", 3e-5): (0.556, 0.932), ("ce", 1e-4): (0.566, 0.823),
                           ("talr", 1e-5): (0.542, 0.948), ("talr", 3e-5): (0.519, 0.890), ("talr", 1e-4): (0.505, 0.768),
                           ("flow", 3e-5): (0.548, 0.934), ("l2", 3e-5): (0.567, 0.931), ("kl", 3e-5): (0.552, 0.930)})
    alone = _cell_table({("talr", 1e-5): (0.5, 0.9), ("talr", 1e-4): (0.6, 0.8), ("dft", 1e-5): (0.55, 0.85)})
    figures = [plot(table, (0.489, 1.0), "x", "y") for table in (crowded, alone)]
    colours = [{c.get_label(): to_hex(c.lines[0].get_color()) for c in f.axes[0].containers} for f in figures]
    assert len(set(colours[0].values())) == len(colours[0])  # every strategy its own colour
    assert colours[1]["talr"] == colours[0]["talr"]  # and the same one in another study's figure
    assert to_hex("black") not in colours[0].values()  # black is the initial model's

    axes = figures[0].axes[0]
    renderer = figures[0].canvas.get_renderer()
    texts = [t for t in axes.texts]
    assert sorted(t.get_text() for t in texts) == sorted(["1e-5", "3e-5", "1e-4"] * 2)  # one-rate strategies unlabelled
    boxes = [t.get_window_extent(renderer) for t in texts]
    frame = axes.get_window_extent(renderer)
    # every marker as drawn: its centre in pixels and half its size (markersize is in points)
    radius = max(c.lines[0].get_markersize() for c in axes.containers) / 2 * figures[0].dpi / 72
    markers = [(*axes.transData.transform((x, y)), radius) for x, y in zip(crowded["domain"], crowded["general"])]
    star = axes.collections[-1]  # the initial model: its size is an area in points squared
    markers.append((*axes.transData.transform((0.489, 1.0)), math.sqrt(star.get_sizes()[0]) / 2 * figures[0].dpi / 72))
    for i, box in enumerate(boxes):
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
        for other in boxes[i + 1:]:
            assert box.x1 <= other.x0 or other.x1 <= box.x0 or box.y1 <= other.y0 or other.y1 <= box.y0
        # nearer its own point than any other marker; without a leader line, at least 1.5 times nearer
        middle = ((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2)
        point = axes.transData.transform(texts[i].xy)
        own = math.dist(middle, point)
        margin = 1.0 if texts[i].arrow_patch is not None else 1.5
        others = [(cx, cy) for cx, cy, _ in markers if math.dist((cx, cy), point) > 1e-6]
        assert all(margin * own <= math.dist(middle, other) + 1e-6 for other in others)
        for cx, cy, radius in markers:  # no label covers a marker
            assert box.x1 <= cx - radius or cx + radius <= box.x0 or box.y1 <= cy - radius or cy + radius <= box.y0


def test_run_summary_names_a_recorded_metric_that_was_never_logged(tiny_model_dir, tmp_path):
    from conftest import tiny_fit_config

    summary = {"class_path": "callbacks.run_summary.RunSummary",
               "init_args": {"path": str(tmp_path / "summary.json"), "monitor": "val/loss", "mode": "min",
                             "record": ["val/accuracy"]}}  # accuracy needs model.generate, which is off
    config = tiny_fit_config(tiny_model_dir, tmp_path, "v0", [summary], trainer={"max_steps": 1},
                             model={"loss": "CrossEntropy"}, validate_before_fit=True)
    done = talr("fit", "--config", str(config))
    assert done.returncode != 0
    assert "record metric(s) ['val/accuracy'] were never logged" in done.stderr
    assert not (tmp_path / "summary.json").exists()


# -- intervals and significance on a synthetic sweep ------------------------------------------------
ROWS, DOCS = 40, 50


def bh_threshold_by_hand(p_values: list[float], alpha: float = 0.05) -> float:
    """Benjamini-Hochberg's step-up rule: the largest sorted p_(k) with p_(k) <= k / m x alpha (-1 when none)."""
    ps, m = sorted(p_values), len(p_values)
    passing = [k for k in range(1, m + 1) if ps[k - 1] <= k / m * alpha]
    return ps[max(passing) - 1] if passing else -1.0


def mcnemar_by_hand(before: list[int], after: list[int]) -> tuple[int, int, float]:
    """b, c and the exact two-sided McNemar p-value, summed with math.comb."""
    b = sum(x == 1 and y == 0 for x, y in zip(before, after))
    c = sum(x == 0 and y == 1 for x, y in zip(before, after))
    tail = sum(math.comb(b + c, k) for k in range(min(b, c) + 1)) / 2 ** (b + c)
    return b, c, min(1.0, 2 * tail)


def flipped(vector: list[int], rng: np.random.Generator, share: float, towards: int) -> list[int]:
    return [towards if rng.random() < share else v for v in vector]


@pytest.fixture
def synthetic_sweep(tmp_path):
    """Finished runs as `talr fit` leaves them: summary.json, config.yaml, the step-0 and best-step
    generations, GeneralBenchmarks' fit-start / fit-end records. ce and talr at two learning rates,
    two seeds at 1e-5 and one at 1e-4 (the second is pending); each seed has its own held-out split."""
    from talr.stats import compare_binary  # only to fill the summaries' general columns, as the callback would

    sweep = Sweep(base=["x.yaml"], grid={"model.loss": ["ce", "talr"], "model.learning_rate": [1e-5, 1e-4],
                                         "seed_everything": [0, 1]})
    out = tmp_path / "sweep"
    vectors: dict[tuple, dict] = {}
    for values in sweep.runs():
        loss, rate, seed = values["model.loss"], values["model.learning_rate"], values["seed_everything"]
        if rate == 1e-4 and seed == 1:
            continue  # pending
        rng = np.random.default_rng(seed)
        domain_initial = [int(v) for v in rng.random(ROWS) < 0.3]  # the initial model: the same for every strategy
        general_initial = [int(v) for v in rng.random(DOCS) < 0.6]
        run = np.random.default_rng([seed, int(rate * 1e6), loss == "talr"])
        domain_best = flipped(flipped(domain_initial, run, 0.35, 1), run, 0.05, 0)  # gains a lot
        general_best = flipped(general_initial, run, 0.25 if loss == "ce" else 0.08, 0)  # ce forgets more
        log_dir = out / run_name(values) / "tb" / "version_0"
        (log_dir / "generations").mkdir(parents=True)
        for step, vector in ((0, domain_initial), (6, domain_best)):
            (log_dir / "generations" / f"val_step{step:06d}.jsonl").write_text("".join(
                json.dumps({"row_index": i, "correct": bool(v), "parsed": True, "answer": "1", "generation": "x"}) + "\n"
                for i, v in enumerate(vector)))
        (log_dir / "config.yaml").write_text(yaml.safe_dump({"data": {"task": {"class_path": "talr.tasks.MedCalc"},
                                                                       "val_size": ROWS, "seed": seed, "batch_size": 4}}))
        (log_dir / "general").mkdir()
        for event, vector in (("fit_start", general_initial), ("fit_end", general_best)):
            record = {"event": event, "general": {"score": sum(vector) / DOCS, "included": ["talr_arc_easy"], "excluded": []},
                      "per_document": {"talr_arc_easy": {"metric": "acc,none", "doc_ids": list(range(DOCS)), "values": vector}}}
            (log_dir / "general" / f"{event}.json").write_text(json.dumps(record))
        general = compare_binary(general_initial, general_best)
        summary = {"monitor": "val/accuracy", "domain_initial": sum(domain_initial) / ROWS, "domain_best": sum(domain_best) / ROWS,
                   "best_step": 6, "general_initial": general.before, "general_best": general.after,
                   "general_delta": general.delta, "general_delta_low": general.low, "general_delta_high": general.high,
                   "general_p": general.p, "general_n": general.n, "general_test": general.test,
                   "general_file_initial": "general/fit_start.json", "general_file_best": "general/fit_end.json",
                   "learning_rate": rate, "loss": loss, "seed": seed, "log_dir": str(log_dir),
                   "config_file": str(log_dir / "config.yaml")}
        (out / run_name(values) / "summary.json").write_text(json.dumps(summary))
        vectors[(loss, rate, seed)] = {"domain": (domain_initial, domain_best), "general": (general_initial, general_best)}
    collect(sweep, out)
    return out, vectors, sweep


def test_sweep_table_carries_the_paired_domain_change(synthetic_sweep):
    out, vectors, _ = synthetic_sweep
    table = pd.read_csv(out / "results.csv")
    assert (table["status"] == "done").sum() == 6
    for _, row in table[table["status"] == "done"].iterrows():
        before, after = vectors[(row["loss"], row["learning_rate"], row["seed"])]["domain"]
        b, c, p = mcnemar_by_hand(before, after)
        assert row["domain_n"] == ROWS and row["domain_test"] == "McNemar"
        assert row["domain_delta"] == pytest.approx((c - b) / ROWS) and row["domain_p"] == pytest.approx(p)
        assert row["domain_delta_low"] < row["domain_delta"] < row["domain_delta_high"]
        assert row["domain_delta"] == pytest.approx(row["domain_best"] - row["domain_initial"])
    pending = table[table["status"] == "pending"]
    assert len(pending) == 2 and pending["domain_delta"].isna().all()


def test_a_sweep_folder_copied_elsewhere_collects_to_the_same_pairs(synthetic_sweep, tmp_path):
    """A sweep kept in a repository or copied off a cluster's scratch: its summaries name the folder it
    ran in, which is gone; the copy still pairs every run with the initial model and between runs."""
    out, vectors, sweep = synthetic_sweep
    copy = tmp_path / "kept" / "study"
    shutil.copytree(out, copy)
    shutil.rmtree(out)
    table = pd.DataFrame(collect(sweep, copy))
    done = table[table["status"] == "done"]
    assert len(done) == 6 and (done["domain_test"] == "McNemar").all()
    for _, row in done.iterrows():
        before, after = vectors[(row["loss"], row["learning_rate"], row["seed"])]["domain"]
        b, c, _ = mcnemar_by_hand(before, after)
        assert row["domain_delta"] == pytest.approx((c - b) / ROWS)
        assert Path(row["domain_generations_best"]).is_relative_to(copy) and Path(row["general_file_best"]).is_file()
        assert isinstance(row["heldout_split"], str)  # the config beside the copied logs
    pairs = between_strategies(table)
    assert (pairs["seeds"] > 0).all() and not any(isinstance(v, str) for v in pairs["domain"])


def test_pareto_plot_draws_the_paired_intervals_as_error_bars(synthetic_sweep):
    out, vectors, _ = synthetic_sweep
    results = pd.read_csv(out / "results.csv")
    table = trade_off_table(results)
    axes = plot(table, initial_point(results), "x", "y").axes[0]
    containers = {c.get_label(): c for c in axes.containers}
    assert set(containers) == {"ce", "talr"}
    from scipy import stats as scipy_stats

    for loss, container in containers.items():
        x_bars, y_bars = container.lines[2]  # matplotlib's ErrorbarContainer: (line, caps, (x bars, y bars))
        cells = table[table["loss"] == loss].reset_index(drop=True)
        for (_, cell), x_bar, y_bar in zip(cells.iterrows(), x_bars.get_segments(), y_bars.get_segments()):
            runs = results[(results["loss"] == loss) & (results["learning_rate"] == cell["learning_rate"])
                           & (results["status"] == "done")]
            if len(runs) == 1:  # the paired interval of the change, placed at the initial model's level
                run = runs.iloc[0]
                expected_x = (run["domain_initial"] + run["domain_delta_low"], run["domain_initial"] + run["domain_delta_high"])
                expected_y = (run["general_initial"] + run["general_delta_low"], run["general_initial"] + run["general_delta_high"])
            else:  # two seeds: the t-interval of the seeds' changes, around the mean level
                def t_bar(side):
                    deltas = runs[f"{side}_delta"].tolist()
                    sd = abs(deltas[0] - deltas[1]) / math.sqrt(2)  # two seeds
                    half = scipy_stats.t.ppf(0.975, 1) * sd / math.sqrt(2)
                    level = runs[f"{side}_best"].mean()
                    return level - half, level + half
                expected_x, expected_y = t_bar("domain"), t_bar("general")
            assert sorted(x_bar[:, 0]) == pytest.approx(expected_x) and sorted(y_bar[:, 1]) == pytest.approx(expected_y)


GRID = 33  # talr.token_loss.CALIBRATION_TEMPERATURES


def write_row_scores(path: Path, tokens: list[int], hits: list[int], nll: list[float], best_temperature: int) -> None:
    """Row scores whose NLL over the temperature grid is lowest at index `best_temperature` (the NLL there
    is half the plain NLL; elsewhere more)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (n, h, l) in enumerate(zip(tokens, hits, nll)):
        grid = [l * (0.5 + 0.01 * abs(k - best_temperature)) for k in range(GRID)]
        lines.append(json.dumps({"row_index": i, "tokens": n, "nll": l, "top1_hits": h, "easy": h,
                                 "nll_at_temperature": grid}) + "\n")
    path.write_text("".join(lines))


def test_teacher_forced_comparison_by_hand(tmp_path):
    from talr.experiments.significance import read_row_scores, teacher_forced_pair

    tokens = [10, 20, 30]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_row_scores(a, tokens, hits=[5, 10, 15], nll=[10.0, 30.0, 60.0], best_temperature=3)
    write_row_scores(b, tokens, hits=[6, 12, 21], nll=[9.0, 27.0, 45.0], best_temperature=10)
    outcome = teacher_forced_pair(a, b)
    accuracy, calibrated, nll = outcome["token_accuracy"], outcome["calibrated_nll"], outcome["nll"]
    # means over all 60 target tokens: 30/60 -> 39/60; b's changes 1, 2, 6 hits (rates 0.1, 0.1, 0.2)
    assert accuracy.n == 3 and accuracy.delta == pytest.approx(9 / 60)
    assert accuracy.before == pytest.approx(0.5) and accuracy.after == pytest.approx(39 / 60)
    assert 0.1 - 1e-9 <= accuracy.low <= accuracy.delta <= accuracy.high <= 0.2 + 1e-9  # a resample's change lies between the rows' rates
    # every row improved, by distinct amounts: of the 2^3 sign flips only all-plus and all-minus reach the total
    assert accuracy.p == pytest.approx(0.25)
    # NLL at each scoring's own best temperature: half its plain NLL here
    assert calibrated.delta == pytest.approx((0.5 * 81 - 0.5 * 100) / 60)
    assert nll.delta == pytest.approx((81 - 100) / 60) and nll.test == "sign-flip"
    # rows matched by index; rows whose targets differ are refused
    write_row_scores(b, tokens[:2], hits=[6, 12], nll=[9.0, 27.0], best_temperature=10)
    read_row_scores.cache_clear()
    assert teacher_forced_pair(a, b)["token_accuracy"].delta == pytest.approx(3 / 30)
    write_row_scores(b, [11, 20], hits=[6, 12], nll=[9.0, 27.0], best_temperature=10)
    read_row_scores.cache_clear()
    assert "target tokens differ" in teacher_forced_pair(a, b)["nll"]


def test_learning_rates_of_one_strategy_are_compared_on_the_same_rows(synthetic_sweep):
    """The paper's Finding 1 asks how one strategy's smaller and larger rate differ: each pair of rates
    of a loss, seeds matched, paired over the held-out rows and documents both runs scored."""
    out, vectors, _ = synthetic_sweep
    table = pd.read_csv(out / "results.csv")
    pairs = between_learning_rates(table)
    assert sorted(pairs["loss"]) == ["ce", "talr"]
    for _, pair in pairs.iterrows():
        assert (pair["a"], pair["b"]) == (1e-5, 1e-4) and pair["seeds"] == 1  # seed 1 at 1e-4 is pending
        small, large = (vectors[(pair["loss"], rate, 0)] for rate in (1e-5, 1e-4))
        b, c, p = mcnemar_by_hand(small["domain"][1], large["domain"][1])
        assert pair["domain"].delta == pytest.approx((c - b) / ROWS) and pair["domain"].p == pytest.approx(p)
        gained = sum(large["general"][1]) - sum(small["general"][1])
        assert pair["general"].delta == pytest.approx(gained / DOCS)
    assert report_main([str(out / "results.csv")]) == 0
    lines = (out / "pareto.md").read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith("Between learning rates of the same strategy")))
    (row,) = [line for line in lines[start:] if line.startswith("| ce | 1e-05 | 0.0001 | 1 |")]
    domain = pairs.set_index("loss").loc["ce", "domain"]
    assert f"{domain.delta:+.4f}" in row and "McNemar" in row


def test_report_compares_strategies_on_row_scores(synthetic_sweep):
    out, _, sweep = synthetic_sweep
    tokens = [10, 20, 30]
    for loss, hits in (("ce", [5, 10, 15]), ("talr", [6, 12, 21])):
        values = {"model.loss": loss, "model.learning_rate": 1e-4, "seed_everything": 0}
        log_dir = out / run_name(values) / "tb" / "version_0"
        write_row_scores(log_dir / "row_scores" / "val_step000006.jsonl", tokens, hits, [10.0, 30.0, 60.0], 5)
    collect(sweep, out)
    table = pd.read_csv(out / "results.csv")
    assert table["row_scores_best"].notna().sum() == 2
    assert report_main([str(out / "results.csv")]) == 0
    lines = (out / "pareto.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("The same pairs on the held-out rows"))
    (line,) = [line for line in lines[start:] if line.startswith("| 0.0001 | ce | talr | 1 |")]
    cells = [cell.strip().strip("*") for cell in line.strip("|").split("|")]
    assert cells[4].startswith(f"{9 / 60:+.4f}") and cells[5] == "0.25" and cells[6] == "sign-flip"
    assert cells[7].startswith("+0.0000") and cells[10].startswith("+0.0000")  # the same NLL
    (pending,) = [line for line in lines[start:] if line.startswith("| 1e-05 | ce | talr |")]
    assert "no row scores of the best step" in "\n".join(lines) and "- (" in pending


def write_prompt_scores(path: Path, tokens: list[int], agreement: list[int], kl: list[float], entropy: list[float],
                        best_temperature: int) -> None:
    """ForgettingMonitor prompt scores whose KL over the temperature grid is lowest at `best_temperature`
    (a quarter of the KL at temperature 1 there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({
        "prompt_index": i, "category": "math", "tokens": n, "nll_increase": k, "kl": k, "agreement": a, "entropy": e,
        "kl_at_temperature": [k * (0.25 + 0.01 * abs(t - best_temperature)) for t in range(GRID)]}) + "\n"
        for i, (n, a, k, e) in enumerate(zip(tokens, agreement, kl, entropy))))


def test_drift_comparison_by_hand(tmp_path):
    from talr.experiments.significance import drift_pair, read_prompt_scores

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_prompt_scores(a, [10, 20, 30, 40], agreement=[9, 18, 27, 36], kl=[1.0, 2.0, 3.0, 4.0],
                        entropy=[20.0, 40.0, 60.0, 80.0], best_temperature=8)
    write_prompt_scores(b, [10, 20, 30, 40], agreement=[8, 17, 24, 30], kl=[2.0, 2.5, 6.0, 9.0],
                        entropy=[10.0, 30.0, 30.0, 40.0], best_temperature=12)
    outcome = drift_pair(a, b)
    # means over 100 answer tokens: agreement 90 -> 79 tokens, KL 10 -> 19.5, entropy 200 -> 110 nats
    assert outcome["agreement"].delta == pytest.approx(-11 / 100) and outcome["agreement"].n == 4
    assert outcome["kl"].delta == pytest.approx(9.5 / 100)
    assert outcome["kl_calibrated"].delta == pytest.approx(0.25 * 9.5 / 100)  # each at its own best temperature
    assert outcome["entropy"].delta == pytest.approx(-90 / 100)
    # every prompt lost agreement by a distinct amount: of 2^4 sign flips only all-plus and all-minus reach it
    assert outcome["agreement"].p == pytest.approx(2 / 16)
    write_prompt_scores(b, [10, 20, 30, 41], agreement=[8, 17, 24, 30], kl=[2.0, 2.5, 6.0, 9.0],
                        entropy=[10.0, 30.0, 30.0, 40.0], best_temperature=12)
    read_prompt_scores.cache_clear()
    assert "initial answers differ" in drift_pair(a, b)["agreement"]


def test_report_compares_strategies_on_prompt_scores(synthetic_sweep):
    out, _, sweep = synthetic_sweep
    for loss, agreement in (("ce", [9, 18, 27, 36]), ("talr", [8, 17, 24, 30])):
        values = {"model.loss": loss, "model.learning_rate": 1e-4, "seed_everything": 0}
        log_dir = out / run_name(values) / "tb" / "version_0"
        write_prompt_scores(log_dir / "forgetting" / "prompt_scores" / "step000006.jsonl", [10, 20, 30, 40], agreement,
                            [1.0, 2.0, 3.0, 4.0], [20.0, 40.0, 60.0, 80.0], 8)
    collect(sweep, out)
    assert report_main([str(out / "results.csv")]) == 0
    lines = (out / "pareto.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("The same pairs on the general prompts"))
    (line,) = [line for line in lines[start:] if line.startswith("| 0.0001 | ce | talr | 1 |")]
    cells = [cell.strip().strip("*") for cell in line.strip("|").split("|")]
    assert cells[4].startswith(f"{-11 / 100:+.4f}") and cells[5] == f"{2 / 16:.3g}" and cells[6] == "sign-flip"
    assert cells[7].startswith("+0.0000") and cells[10].startswith("+0.0000") and cells[13].startswith("+0.0000")


def test_report_says_which_differences_are_significant(synthetic_sweep):
    out, vectors, _ = synthetic_sweep
    assert report_main([str(out / "results.csv")]) == 0
    text = (out / "pareto.md").read_text()
    assert "95% CI" in text and "## Significance" in text
    lines = text.splitlines()

    def row(prefix: str) -> list[str]:  # the cells, without bold and the false-discovery dagger
        (line,) = [line for line in lines if line.startswith(prefix)]
        return [cell.strip().strip("*").removesuffix("†") for cell in line.strip("|").split("|")]

    # one seed at 1e-4: the exact McNemar test of that run, against the initial model ...
    cells = row("| talr | 0.0001 | 1 |")  # the significance table's line (the Pareto table's has no run count there)
    before, after = vectors[("talr", 1e-4, 0)]["domain"]
    b, c, p = mcnemar_by_hand(before, after)
    assert cells[3].startswith(f"{(c - b) / ROWS:+.4f}") and cells[4] == f"{p:.3g}" and cells[5] == "McNemar"
    # ... and talr against ce at that learning rate, paired on the same held-out rows and documents
    cells = row("| 0.0001 | ce | talr | 1 |")
    for side, (delta_cell, p_cell) in (("domain", (4, 5)), ("general", (7, 8))):
        ce, talr = vectors[("ce", 1e-4, 0)][side][1], vectors[("talr", 1e-4, 0)][side][1]
        b, c, p = mcnemar_by_hand(ce, talr)
        assert cells[delta_cell].startswith(f"{(c - b) / len(ce):+.4f}") and cells[p_cell] == f"{p:.3g}"
    # two seeds at 1e-5: the t-test across the seeds' paired differences, at least as wide as the seeds'
    # own intervals (Tango's, each seed's McNemar pair): p the larger of the t-test's and the normal test
    # of the mean against the standard error of the seeds' mean interval
    cells = row("| 1e-05 | ce | talr | 2 |")
    from scipy import stats as scipy_stats

    from talr.stats import tango_interval

    deltas, lows, highs = [], [], []
    for seed in (0, 1):
        ce, talr = vectors[("ce", 1e-5, seed)]["general"][1], vectors[("talr", 1e-5, seed)]["general"][1]
        b, c, _ = mcnemar_by_hand(ce, talr)
        deltas.append((c - b) / DOCS)
        low, high = tango_interval(b, c, DOCS)
        lows.append(low - deltas[-1])
        highs.append(high - deltas[-1])
    mean, sd = sum(deltas) / 2, abs(deltas[0] - deltas[1]) / math.sqrt(2)
    p_seeds = 2 * scipy_stats.t.sf(abs(mean) / (sd / math.sqrt(2)), 1)
    se_items = (sum(highs) / 2 - sum(lows) / 2) / (2 * scipy_stats.norm.ppf(0.975))
    p = max(p_seeds, math.erfc(abs(mean) / se_items / math.sqrt(2)))
    assert cells[7].startswith(f"{mean:+.4f}") and cells[8] == f"{p:.3g}"
    assert cells[9] == "t-test across 2 seeds, at least their own intervals"
    # the large domain gains are significant (bold)
    assert any(line.startswith("| ce | 0.0001 | 1 | **+") for line in lines)

    # the daggers: Benjamini-Hochberg by hand over every p the section prints (the cell after each interval)
    section = text[text.index("## Significance"):]
    section = section[:section.index("\n## ", 1)] if "\n## " in section[1:] else section
    printed = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else []
        printed += [(after.removesuffix("†"), after.endswith("†")) for before, after in zip(cells, cells[1:])
                    if re.match(r"^\**[+-]\d.* \[.*\]$", before) and after not in ("", "-")]  # a row's interval
    ps = sorted(float(p) for p, _ in printed)
    m = len(ps)
    assert f"over the section's {m} tests" in section
    threshold = bh_threshold_by_hand(ps)
    assert threshold > 0, "the synthetic sweep's large domain gains survive"
    assert [marked for _, marked in printed] == [float(p) <= threshold for p, _ in printed]


def test_verdicts_compute_the_named_tests_and_control_the_false_discovery_rate(synthetic_sweep, tmp_path):
    out, vectors, _ = synthetic_sweep
    table = str(out / "results.csv")
    family = {"alpha": 0.05, "families": [{"name": "claims", "tests": [
        {"claim": "rates", "results": [table], "between": "learning_rates", "loss": "ce", "a": 1e-5, "b": 1e-4,
         "metric": "general"},
        {"claim": "strategies", "results": [table], "between": "strategies", "learning_rate": 1e-4, "a": "ce", "b": "talr",
         "metric": "domain"},
        {"claim": "reversed", "results": [table], "between": "strategies", "learning_rate": 1e-4, "a": "talr", "b": "ce",
         "metric": "general"},
        {"claim": "pending", "results": [table], "between": "strategies", "learning_rate": 3e-4, "a": "ce", "b": "talr",
         "metric": "general"},
    ]}]}
    path = tmp_path / "family.yaml"
    path.write_text(yaml.safe_dump(family))
    assert verdicts_main([str(path), "--out", str(tmp_path)]) == 0
    lines = (tmp_path / "verdicts.md").read_text().splitlines()

    def row(claim: str) -> list[str]:
        (line,) = [line for line in lines if line.startswith(f"| {claim} |")]
        return [cell.strip().replace("**", "") for cell in line.strip("|").split("|")]

    # each named test by hand: the one seed both rates ran (seed 0), an exact McNemar test on the same items
    expected = {
        "rates": mcnemar_by_hand(vectors[("ce", 1e-5, 0)]["general"][1], vectors[("ce", 1e-4, 0)]["general"][1]) + (DOCS,),
        "strategies": mcnemar_by_hand(vectors[("ce", 1e-4, 0)]["domain"][1], vectors[("talr", 1e-4, 0)]["domain"][1]) + (ROWS,),
        "reversed": mcnemar_by_hand(vectors[("talr", 1e-4, 0)]["general"][1], vectors[("ce", 1e-4, 0)]["general"][1]) + (DOCS,),
    }
    for claim, (b, c, p, n) in expected.items():
        cells = row(claim)
        assert cells[3] == "1" and cells[4].startswith(f"{(c - b) / n:+.4f} [") and cells[5] == f"{p:.3g}"
    # Benjamini-Hochberg by hand over the family as named: the three p's and the pending test as p = 1 (m = 4)
    ps = sorted(p for _, _, p, _ in expected.values())
    threshold = bh_threshold_by_hand(ps + [1.0])
    for claim, (_, _, p, _) in expected.items():
        assert row(claim)[6] == ("yes" if p <= threshold else "no")
    (summary,) = [line for line in lines if "tests are discoveries" in line]
    assert summary.startswith(f"{sum(p <= threshold for p in ps)} of 3 tests are discoveries")
    assert summary.endswith("; 1 of the family's 4 not tested, each counted as p = 1.")
    assert row("pending")[4].startswith("- (1)") and any("not in the tables" in line for line in lines)


def test_verdicts_say_how_close_two_seeds_must_be_to_decide(synthetic_sweep, tmp_path):
    out, _, _ = synthetic_sweep
    table = str(out / "results.csv")
    tests = [{"claim": f"two seeds {metric}", "results": [table], "between": "strategies", "learning_rate": 1e-5,
              "a": "ce", "b": "talr", "metric": metric} for metric in ("domain", "general", "general", "domain")]
    path = tmp_path / "family.yaml"
    path.write_text(yaml.safe_dump({"alpha": 0.05, "families": [{"name": "claims", "tests": tests}]}))
    assert verdicts_main([str(path), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "verdicts.md").read_text()
    assert "| two seeds domain | ce -> talr at 1e-5 | domain | 2 |" in text
    # t(1) is Cauchy: the two-sided p of t is 1 - 2 atan(t) / pi, so t(p) = 1 / tan(pi p / 2); and with seeds
    # d1, d2, t = |d1 + d2| / |d1 - d2| = 2 |mean| / |d1 - d2|, so they may lie apart by 2 / t(p) of the mean
    apart = {p: 2 * math.tan(math.pi * p / 2) for p in (0.05, 0.05 / 4)}
    assert (f"its p reaches 0.05 only where the two seeds' differences lie apart by at most {apart[0.05]:.1%} of their "
            f"mean, and 0.0125 (this family's threshold for a single discovery) only by at most {apart[0.0125]:.1%}.") in text
    assert f"{apart[0.05]:.1%}" == "15.7%"


def test_verdicts_name_the_wrong_test_in_a_family_file(tmp_path):
    path = tmp_path / "family.yaml"
    path.write_text(yaml.safe_dump({"families": [{"name": "claims", "tests": [
        {"claim": "x", "results": ["r.csv"], "between": "strategies", "learning_rate": 1e-5, "a": "ce", "b": "talr",
         "metric": "accuracy"}]}]}))
    with pytest.raises(ValueError, match="claims, test 1: `metric` must be one of domain, general, .*got 'accuracy'"):
        verdicts_main([str(path)])
    path.write_text(yaml.safe_dump({"families": [{"name": "claims", "tests": [
        {"claim": "x", "results": ["r.csv"], "between": "learning_rates", "a": 1e-5, "b": 1e-4, "metric": "general"}]}]}))
    with pytest.raises(ValueError, match="claims, test 1: missing loss"):
        verdicts_main([str(path)])


def test_a_report_keeps_the_seeds_every_stage_ran():
    """Stage 2 ran data seeds 0-2, stage 3 seed 0: `--seeds 0` keeps the runs whose seed is 0 (a pending
    run's seed read as 0.0 is 0), so every point averages the same held-out rows."""
    from talr.experiments.report import keep_seeds

    results = pd.DataFrame({"run": ["ce-0", "ce-1", "ce-2", "dft-0", "flow-0"], "loss": ["ce", "ce", "ce", "dft", "flow"],
                            "data.seed": [0.0, 1.0, 2.0, 0.0, 0.0], "status": ["done"] * 4 + ["pending"]})
    assert keep_seeds(results, ["0"])["run"].tolist() == ["ce-0", "dft-0", "flow-0"]
    assert keep_seeds(results, ["0", "2"])["run"].tolist() == ["ce-0", "ce-2", "dft-0", "flow-0"]
    with pytest.raises(ValueError, match="--seeds 5: no run has these seeds; the results have 0, 1, 2"):
        keep_seeds(results, ["5"])
    with pytest.raises(ValueError, match="no seed column"):
        keep_seeds(results.drop(columns="data.seed"), ["0"])


def test_runs_with_different_held_out_rows_are_not_paired(synthetic_sweep):
    out, _, sweep = synthetic_sweep
    config = next(out.glob("loss=talr_learning_rate=0.0001_seed_everything=0/tb/version_0/config.yaml"))
    config.write_text(config.read_text().replace("seed: 0", "seed: 7"))  # another split of the same rows
    collect(sweep, out)
    assert report_main([str(out / "results.csv"), "--out", str(out / "again")]) == 0
    lines = (out / "again" / "pareto.md").read_text().splitlines()
    (pair,) = [line for line in lines if line.startswith("| 0.0001 | ce | talr | 1 |")]
    assert "| - (1) |" in pair and "McNemar" in pair  # the general side is still paired
    assert "(1) the runs held out different rows (data.task / val_size / seed differ, or a config is missing)" in lines


def test_the_gpu_sweep_prints_a_slurm_array_of_valid_fit_commands(tmp_path, monkeypatch, capsys):
    """configs/sweeps/paper_gpu.yaml: the paper's setting as a SLURM array; its commands only (no run)."""
    from cli import build_cli
    from talr.experiments.sweep import main as sweep_main

    monkeypatch.chdir(REPO)  # the sweep file's config paths are relative to the repository
    assert sweep_main(["--config", "configs/sweeps/paper_gpu.yaml", "--print-commands", "--out", str(tmp_path)]) == 0
    script = capsys.readouterr().out
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # bash accepts it
    spec = yaml.safe_load((REPO / "configs" / "sweeps" / "paper_gpu.yaml").read_text())
    expected = math.prod(len(values) for values in spec["grid"].values())
    assert expected == 6 * 2 * 3  # six strategies, the paper's two learning rates, three seeds
    assert f"#SBATCH --array=0-{expected - 1}" in script.splitlines()
    assert "#SBATCH --gres=gpu:1" in script.splitlines()
    cases = re.findall(r"^  (\d+)\) (talr fit .*) \$\{RESUME\[@\]\+\"\$\{RESUME\[@\]\}\"\} >> \"\$RUN/fit.log\" 2>&1 ;;$",
                       script, re.M)
    assert [int(i) for i, _ in cases] == list(range(expected))
    runs = re.search(r"^RUNS=\(\n(.*?)\n\)", script, re.M | re.S)[1].split()
    commands = [shlex.split(command) for _, command in cases]
    for run, argv in zip(runs, commands, strict=True):  # task i writes into the i-th run's directory
        assert f"--trainer.default_root_dir={run}" in argv and Path(run).parent == tmp_path
    seen = {(argv[3], next(a for a in argv if a.startswith("--model.learning_rate="))) for argv in commands}
    assert len(seen) == 12 and {lr for _, lr in seen} == {"--model.learning_rate=1e-06", "--model.learning_rate=5e-06"}
    for argv in {argv[3]: argv for argv in commands}.values():  # one command per strategy: the real parser accepts it
        with pytest.raises(SystemExit) as parsed:
            build_cli(argv[1:] + ["--print_config"])
        assert parsed.value.code in (0, None)
        config = yaml.safe_load(capsys.readouterr().out)
        assert config["model"]["model"] == "Qwen/Qwen2.5-3B-Instruct" and config["trainer"]["precision"] == "bf16-mixed"
        assert any(c["class_path"] == "callbacks.run_summary.RunSummary" for c in config["trainer"]["callbacks"])


def test_the_esci_pilot_sweeps_ce_over_four_learning_rates_on_the_study_config(tmp_path, monkeypatch, capsys):
    """configs/sweeps/esci_cpu_pilot.yaml (docs/study_plan.md, stage 1): its commands only (no run)."""
    from talr.experiments.sweep import main as sweep_main

    monkeypatch.chdir(REPO)
    assert sweep_main(["--config", "configs/sweeps/esci_cpu_pilot.yaml", "--print-commands", "--out", str(tmp_path)]) == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if line.startswith("talr fit ")]
    assert len(commands) == 4 and all(argv[2:4] == ["--config", "configs/esci/cpu.yaml"] for argv in commands)
    rates = sorted(float(a.split("=")[1]) for argv in commands for a in argv if a.startswith("--model.learning_rate="))
    assert rates == [3e-6, 1e-5, 3e-5, 1e-4]
    assert not any(a.startswith("--model.loss") for argv in commands for a in argv)  # ce: the study config's own


def test_a_lora_run_is_its_own_strategy_in_the_table():
    """LoRA trains with the ce loss: named by its loss alone it would be averaged with full fine-tuning."""
    from callbacks.run_summary import strategy_name

    assert strategy_name("ce", None) == "ce" and strategy_name("talr", {}) == "talr"
    assert strategy_name("ce", {"r": 64, "alpha": 128}) == "lora"
    assert strategy_name("talr", {"r": 8}) == "talr+lora"


def test_a_regulariser_around_another_base_than_ce_is_its_own_strategy():
    """ASFT (the KL to the initial model around DFT) is not a seed of the kl cell (the KL around ce)."""
    from callbacks.run_summary import strategy_name
    from talr.losses import DFT, TALR, CrossEntropy, KLToInitial, L2Anchor

    assert strategy_name(KLToInitial(base=CrossEntropy()), None) == "kl"
    assert strategy_name(KLToInitial(estimator="exact", base=DFT()), None) == "kl+dft"
    assert strategy_name(L2Anchor(base=TALR()), {"r": 8}) == "l2+talr+lora"
    assert strategy_name(CrossEntropy(), {"r": 8}) == "lora" and strategy_name(TALR(), None) == "talr"


def test_finding_2_compares_two_tables_learning_rate_costs_per_document_and_prompt(tmp_path):
    """`talr report A --versus B`: per strategy, B's change from the smaller to the larger learning rate
    minus A's, on the general score (per document, mean over tasks) and the drift (per prompt), checked
    against the same differences counted by hand."""
    from talr.experiments.report import versus_markdown
    from talr.experiments.significance import _general_record, between_tables

    docs = 6
    general = {  # table -> rate -> task -> per-document 0/1 scores on the same documents
        "esci": {1e-5: {"arc": [1, 1, 0, 0, 1, 0], "piqa": [1, 0, 1, 1, 0, 1]},
                 1e-4: {"arc": [1, 1, 0, 1, 1, 0], "piqa": [1, 0, 1, 1, 0, 1]}},
        "medcalc": {1e-5: {"arc": [1, 1, 0, 0, 1, 0], "piqa": [1, 1, 1, 1, 0, 1]},
                    1e-4: {"arc": [0, 0, 0, 0, 1, 0], "piqa": [1, 0, 0, 1, 0, 1]}},
    }
    agreement = {("esci", 1e-5): [9, 18, 27, 36], ("esci", 1e-4): [8, 17, 25, 33],
                 ("medcalc", 1e-5): [9, 19, 27, 35], ("medcalc", 1e-4): [5, 12, 20, 24]}
    kl = {("esci", 1e-5): [1.0, 2.0, 3.0, 4.0], ("esci", 1e-4): [2.0, 2.0, 4.0, 5.0],
          ("medcalc", 1e-5): [1.0, 1.0, 3.0, 3.0], ("medcalc", 1e-4): [4.0, 5.0, 9.0, 9.0]}
    best_temperature = {("esci", 1e-5): 8, ("esci", 1e-4): 10, ("medcalc", 1e-5): 16, ("medcalc", 1e-4): 20}
    tables = {}
    for table, by_rate in general.items():
        rows = []
        for rate, tasks in by_rate.items():
            run = tmp_path / table / str(rate)
            run.mkdir(parents=True)
            record = {"general": {"included": list(tasks)}, "per_document": {
                task: {"doc_ids": list(range(docs)), "values": values} for task, values in tasks.items()}}
            (run / "fit_end.json").write_text(json.dumps(record))
            write_prompt_scores(run / "prompts.jsonl", [10, 20, 30, 40], agreement[table, rate], kl[table, rate],
                                [1.0] * 4, best_temperature[table, rate])
            rows.append({"status": "done", "loss": "ce", "learning_rate": rate, "data.seed": 0.0 if table == "esci" else 0,
                         "general_file_best": str(run / "fit_end.json"), "prompt_scores_best": str(run / "prompts.jsonl")})
        tables[table] = pd.DataFrame(rows)

    (pair,) = between_tables(tables["esci"], tables["medcalc"]).to_dict("records")
    assert (pair["a"], pair["b"], pair["seeds"]) == (1e-5, 1e-4, 1)  # seed 0.0 (a column with NaN) matches seed 0

    def change(table: str) -> float:  # the general score is the mean of the tasks' accuracies
        return sum(sum(general[table][1e-4][t]) - sum(general[table][1e-5][t]) for t in ("arc", "piqa")) / (2 * docs)

    assert change("esci") == pytest.approx(1 / 12) and change("medcalc") == pytest.approx(-4 / 12)
    assert pair["general_first"].delta == pytest.approx(change("esci"))
    assert pair["general_second"].delta == pytest.approx(change("medcalc"))
    assert pair["general"].delta == pytest.approx(change("medcalc") - change("esci"))
    assert pair["general"].low <= pair["general"].delta <= pair["general"].high

    # agreement: medcalc lost 4 + 7 + 7 + 11 = 29 of 100 tokens, esci 1 + 1 + 2 + 3 = 7
    assert pair["agreement"].delta == pytest.approx(-29 / 100 - -7 / 100)
    # each prompt's change of changes differs (-3, -6, -5, -8): only all-plus and all-minus of 2^4 sign flips reach it
    assert pair["agreement"].p == pytest.approx(2 / 16)
    # calibrated KL: each run read at its own best temperature, where write_prompt_scores puts 0.25 x the KL
    assert pair["kl_calibrated"].delta == pytest.approx(0.25 * ((27 - 8) - (13 - 10)) / 100)
    assert pair["kl"].delta == pytest.approx(((27 - 8) - (13 - 10)) / 100)

    text = versus_markdown(tables["esci"], tables["medcalc"], "esci", "medcalc")
    (row,) = [line for line in text.splitlines() if line.startswith("| ce | 1e-05 | 0.0001 | 1 |")][:1]
    assert f"{change('esci'):+.4f}" in row and f"{change('medcalc'):+.4f}" in row
    assert f"{change('medcalc') - change('esci'):+.4f}" in row

    # one task whose documents' changes are all 0 or 1 in both tables: changes are no 0/1 scores, so the
    # comparison is the paired bootstrap and sign-flip test, not McNemar's on 0/1 scores
    for table, rate, values in (("esci", 1e-5, [0, 0, 0, 0, 0, 0]), ("esci", 1e-4, [0, 0, 0, 1, 0, 0]),
                                ("medcalc", 1e-5, [0, 0, 0, 0, 0, 0]), ("medcalc", 1e-4, [1, 1, 0, 0, 0, 0])):
        (tmp_path / table / str(rate) / "fit_end.json").write_text(json.dumps({
            "general": {"included": ["arc"]}, "per_document": {"arc": {"doc_ids": list(range(docs)), "values": values}}}))
    _general_record.cache_clear()
    (pair,) = between_tables(tables["esci"], tables["medcalc"]).to_dict("records")
    assert pair["general"].delta == pytest.approx(2 / 6 - 1 / 6) and pair["general"].test == "sign-flip"
    assert pair["general_first"].test == "McNemar"  # a table's own change is one of 0/1 scores

    # a table whose runs scored other documents, or whose initial answers differ, says so instead
    write_prompt_scores(tmp_path / "medcalc" / "0.0001" / "prompts.jsonl", [10, 20, 30, 41], agreement["medcalc", 1e-4],
                        kl["medcalc", 1e-4], [1.0] * 4, 20)
    from talr.experiments.significance import read_prompt_scores
    read_prompt_scores.cache_clear()
    (pair,) = between_tables(tables["esci"], tables["medcalc"]).to_dict("records")
    assert "initial answers differ" in pair["agreement"]


def test_report_versus_another_table_adds_the_finding_2_section(synthetic_sweep, tmp_path):
    out, vectors, _ = synthetic_sweep
    other = tmp_path / "other" / "results.csv"
    other.parent.mkdir()
    shutil.copy(out / "results.csv", other)
    assert report_main([str(out / "results.csv"), "--versus", str(other)]) == 0
    text = (out / "pareto.md").read_text()
    assert "## The learning rates' cost, other against sweep (the paper's Finding 2)" in text
    rows = [line for line in text.split("## The learning rates' cost")[1].splitlines() if line.startswith("| ce | 1e-05 | 0.0001 | 1 |")]
    small, large = vectors[("ce", 1e-5, 0)]["general"][1], vectors[("ce", 1e-4, 0)]["general"][1]
    change = (sum(large) - sum(small)) / DOCS
    # the same table twice: each side's change is the run pair's own, and their difference is zero
    assert rows[0].count(f"{change:+.4f}") == 2 and "+0.0000 [+0.0000, +0.0000]" in rows[0]
    with pytest.raises(FileNotFoundError, match="--versus"):
        report_main([str(out / "results.csv"), "--versus", str(tmp_path / "missing.csv")])


def test_report_reads_the_stages_of_a_study_as_one_table_without_counting_a_seed_twice(synthetic_sweep, tmp_path, capsys):
    """Stage 2 (ce, talr) and stage 3 (other strategies, plus a WiSE-FT run whose own row repeats a ce
    cell's seed) reported together: the new strategy's cells join, the repeated ce runs are left out
    and named, so no cell counts a seed twice."""
    out, _, _ = synthetic_sweep
    stage2 = pd.read_csv(out / "results.csv")
    stage3 = stage2.copy()
    stage3["run"] = "stage3_" + stage3["run"]
    stage3.loc[stage3["loss"] == "talr", "loss"] = "dft"
    (tmp_path / "stage3").mkdir()
    stage3.to_csv(tmp_path / "stage3" / "results.csv", index=False)
    with pytest.raises(ValueError, match="--out"):
        report_main([str(out / "results.csv"), str(tmp_path / "stage3" / "results.csv")])
    assert report_main([str(out / "results.csv"), str(tmp_path / "stage3" / "results.csv"), "--out", str(tmp_path / "all")]) == 0
    printed = capsys.readouterr().out
    repeated = stage2[(stage2["loss"] == "ce") & (stage2["status"] == "done")]
    assert len(repeated) == 3  # ce: two seeds at 1e-5, one at 1e-4
    for run in repeated["run"]:
        assert f"stage3_{run} left out: the same strategy, learning rate and seeds as {run} of an earlier table" in printed
    text = (tmp_path / "all" / "pareto.md").read_text()
    significance = text[text.index("## Significance"):]
    cells = {tuple(line.split(" | ")[:3]): line for line in significance.splitlines() if line.startswith("| ")}
    assert ("| ce", "1e-05", "2") in cells and ("| dft", "1e-05", "2") in cells and ("| talr", "1e-05", "2") in cells
    assert ("| dft", "0.0001", "1") in cells
