"""`talr sweep` and `talr report` end to end with the tiny model: 2 learning rates x 2 strategies,
the results table checked against each run's own TensorBoard and lm-eval files, the Pareto plot
and notebook, and a restart that runs nothing new."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import SHARED
from talr.report import pareto_front, plot, trade_off_table
from talr.sweep import Sweep, run_name

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
