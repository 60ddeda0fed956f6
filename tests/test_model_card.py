"""The model card beside every export: Hugging Face's own parser reads it, and its numbers are the run
summary's (HFExport) and WiSE-FT's (its export)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from cli import build_cli
from conftest import SHARED, tiny_fit_config


def table(card_text: str, header: str) -> list[list[str]]:
    """The cells of the markdown table whose header row starts with `header`."""
    lines = card_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def number(cell: str) -> float:
    return math.nan if cell == "-" else float(cell)


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory, one_cpu_thread):
    out = tmp_path_factory.mktemp("card")
    config = tiny_fit_config(
        tiny_model_dir, out, "card", [
            {"class_path": "callbacks.forgetting_monitor.ForgettingMonitor", "init_args": {"max_new_tokens": 4}},
            {"class_path": "callbacks.general_benchmarks.GeneralBenchmarks",
             "init_args": {"tasks": ["talr_arc_easy"], "data_dir": str(SHARED / "data"), "limit": 4, "batch_size": 4,
                           "threshold": 0.0}},
            {"class_path": "callbacks.hf_export.HFExport"},  # before RunSummary: the card must not depend on order
            {"class_path": "callbacks.model_averaging.WiSEFT", "init_args": {"alphas": [0.0, 1.0], "select": "loss"}},
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"monitor": "val/loss", "mode": "min", "save_last": True}},
        ], validate_before_fit=True, trainer={"max_steps": 3, "val_check_interval": 2},
        model={"loss": "TALR", "learning_rate": 1e-3})
    cli = build_cli(["fit", "--config", str(config)])
    return Path(cli.trainer.log_dir)


def test_the_export_card_carries_the_run_summarys_numbers(run):
    summary = json.loads((run / "summary.json").read_text())
    card = ModelCard.load(run / "export" / "README.md")  # the hub's own parser
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and "talr" in data["tags"]
    assert "base_model" not in data and "datasets" not in data  # a local model directory and synthetic rows
    # model-index (the hub's evaluation results): this model's numbers, at full precision
    results = {result.metric_type: result.metric_value for result in card.data.eval_results}
    core = {"domain", "general", "forgetting_kl", "forgetting_nll_increase"}  # and whatever else the callbacks report
    assert core <= set(results)
    assert results == {key: summary[f"{key}_best"] for key in results}
    measured = [summary[f"{key}_{when}"] for key in core for when in ("initial", "best")]
    assert summary["monitor"] == "val/loss" and not any(map(math.isnan, measured))  # every column was measured
    # the table a reader sees: before fine-tuning and this model, 6 significant digits
    rows = {cells[0]: cells for cells in table(card.text, "metric")}
    assert set(rows) == set(results)
    for key, cells in rows.items():
        assert number(cells[2]) == pytest.approx(summary[f"{key}_initial"], rel=1e-5, abs=1e-12)
        assert number(cells[3]) == pytest.approx(summary[f"{key}_best"], rel=1e-5)
    settings = {cells[0]: cells[1] for cells in table(card.text, "setting")}
    assert float(settings["learning rate"]) == summary["learning_rate"]
    assert int(settings["optimizer steps"]) == summary["steps"] == 3
    assert settings["strategy"] == f"`{summary['loss']}`"
    assert "`w_min=0.01`" in settings["strategy options"]  # the strategy's own options, read from the object
    assert f"best step {summary['best_step']} of 3 on `val/loss`" in card.text
    assert re.search(r"rows: 12 train, 4 val", card.text)


def test_the_wiseft_card_carries_the_chosen_mixs_numbers(run):
    report = json.loads((run / "wiseft.json").read_text())
    curve = report["results"]
    by_alpha = {point["alpha"]: point["metrics"] for point in curve}
    card = ModelCard.load(run / "wiseft_export" / "README.md")
    assert "wise-ft" in card.data.to_dict()["tags"]
    results = {result.metric_type: result.metric_value for result in card.data.eval_results}
    chosen = min(curve, key=lambda point: (point["metrics"]["loss"], point["alpha"]))  # select: loss, ties to smaller
    assert report["chosen_alpha"] == chosen["alpha"]
    assert results["val_loss"] == chosen["metrics"]["loss"]
    rows = {cells[0]: cells for cells in table(card.text, "metric")}
    assert number(rows["val_loss"][2]) == pytest.approx(by_alpha[0.0]["loss"], rel=1e-5)  # alpha 0: the initial model
    assert f"alpha {chosen['alpha']:g}" in card.text
