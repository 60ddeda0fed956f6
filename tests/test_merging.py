"""Task-vector merging (callbacks.model_averaging.TaskVectorMerge): TIES and DARE of tau = theta - theta_0
checked against the papers' definitions written here in float64, and `talr fit` on a tiny random Llama
with the callback: every grid point scored, a row of the run summary and of the sweep table, the
chosen point exported as a model that `from_pretrained` loads and scores as it was scored."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from callbacks.contracts import ContributesScores
from callbacks.model_averaging import TaskVectorMerge, merge_task_vector
from cli import build_cli
from conftest import tiny_fit_config, validation_history
from talr.experiments.report import fine_tuned_runs, merge_markdown, merge_table
from talr.experiments.sweep import Sweep, collect, run_name


def random_state(seed: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {key: torch.randn(*shape, generator=g) for key, shape in shapes.items()}


# element counts divisible by 4, so that every density below keeps a whole number of entries
SMALL = {"w": (4, 6), "b": (8,)}


def top_share_by_magnitude(values: list[float], density: float) -> list[float]:
    """TIES's trim, from the paper: keep the density x n entries largest in magnitude, zero the rest."""
    keep = round(density * len(values))
    kept = set(sorted(range(len(values)), key=lambda i: abs(values[i]), reverse=True)[:keep])
    return [v if i in kept else 0.0 for i, v in enumerate(values)]


@pytest.mark.parametrize("density", [0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("weight", [0.5, 1.0, 1.7])
def test_ties_of_one_task_vector_is_theta0_plus_weight_times_its_top_entries(density, weight):
    theta0, theta = random_state(0, SMALL), random_state(1, SMALL)
    merged = merge_task_vector(theta0, theta, "ties", density, weight)
    assert merged.keys() == theta.keys()
    for key in theta:
        start = theta0[key].double().flatten().tolist()
        tau = [b - a for a, b in zip(start, theta[key].double().flatten().tolist())]
        expected = [a + weight * t for a, t in zip(start, top_share_by_magnitude(tau, density))]
        assert merged[key].dtype == torch.float32
        torch.testing.assert_close(merged[key].double().flatten(), torch.tensor(expected, dtype=torch.float64),
                                   rtol=0, atol=2e-6)


def test_dare_keeps_a_density_share_of_tau_rescaled_by_one_over_density():
    density, weight = 0.3, 0.8
    shapes = {"w": (200, 250)}  # 50,000 entries: the kept share's standard deviation is 0.0020
    theta0, theta = random_state(0, shapes), random_state(1, shapes)
    merged = merge_task_vector(theta0, theta, "dare_linear", density, weight, seed=7)["w"]
    start, end, out = (t.double().flatten().tolist() for t in (theta0["w"], theta["w"], merged))
    kept = dropped = 0
    for a, b, m in zip(start, end, out):
        if m == a:  # dropped: theta_0's entry, unchanged
            dropped += 1
        else:  # kept: theta_0 + weight x tau / density
            kept += 1
            assert m == pytest.approx(a + weight * (b - a) / density, rel=1e-5, abs=1e-6)
    share = kept / (kept + dropped)
    assert abs(share - density) < 4 * math.sqrt(density * (1 - density) / len(start)), share


def test_dare_is_seeded_shares_its_mask_across_weights_and_leaves_the_global_generator_alone():
    theta0, theta = random_state(0, SMALL), random_state(1, SMALL)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = merge_task_vector(theta0, theta, "dare_linear", 0.5, 1.0, seed=3)
    assert torch.equal(torch.rand(3), expected_next)  # training's random stream is not consumed
    again = merge_task_vector(theta0, theta, "dare_linear", 0.5, 1.0, seed=3)
    other = merge_task_vector(theta0, theta, "dare_linear", 0.5, 1.0, seed=4)
    assert all(torch.equal(first[k], again[k]) for k in theta)
    assert any(not torch.equal(first[k], other[k]) for k in theta)
    # another weight scales the same survivors: the entries that moved are the same
    scaled = merge_task_vector(theta0, theta, "dare_linear", 0.5, 2.5, seed=3)
    assert all(torch.equal(first[k] != theta0[k], scaled[k] != theta0[k]) for k in theta)
    # with one task vector, DARE followed by TIES's sign election and mean is DARE alone
    ties_after = merge_task_vector(theta0, theta, "dare_ties", 0.5, 1.0, seed=3)
    assert all(torch.equal(first[k], ties_after[k]) for k in theta)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_the_ends_of_the_grid_are_theta_and_theta0_exactly(method):
    theta0, theta = random_state(0, SMALL), random_state(1, SMALL)
    theta0["steps"], theta["steps"] = torch.tensor([1, 2]), torch.tensor([3, 4])  # integer buffers: theta's
    whole = merge_task_vector(theta0, theta, method, 1.0, 1.0)
    initial = merge_task_vector(theta0, theta, method, 0.5, 0.0)
    for key in theta:
        assert torch.equal(whole[key], theta[key]) and torch.equal(initial[key], theta0[key])
    whole["w"].zero_()  # copies, not views
    assert theta["w"].abs().sum() > 0
    # density 1 keeps tau whole: WiSE-FT's (1 - alpha) theta_0 + alpha theta with alpha = weight
    mixed = merge_task_vector(theta0, theta, method, 1.0, 0.4)
    expected = 0.6 * theta0["w"].double() + 0.4 * theta["w"].double()
    torch.testing.assert_close(mixed["w"].double(), expected, rtol=0, atol=1e-6)


def test_bad_merge_input_is_refused_with_the_option_named():
    theta0, theta = random_state(0, SMALL), random_state(1, SMALL)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\], got 0.0"):
        merge_task_vector(theta0, theta, "dare_linear", 0.0, 1.0)
    with pytest.raises(ValueError, match="merge method must be one of ties, dare_linear, dare_ties, got 'magnitude'"):
        merge_task_vector(theta0, theta, "magnitude", 0.5, 1.0)
    with pytest.raises(ValueError, match=r"only in theta_0 \['b'\]"):
        merge_task_vector(theta0, {"w": theta["w"]}, "ties", 0.5, 1.0)
    with pytest.raises(ValueError, match=r"densities must lie in \(0, 1\], got 1.5"):
        TaskVectorMerge(densities=[0.5, 1.5])
    with pytest.raises(ValueError, match="weights must be finite and > 0, got 0.0 .weight 0 is the initial model"):
        TaskVectorMerge(weights=[0.0, 1.0])
    with pytest.raises(ValueError, match=r"methods \['task_arithmetic'\] are not among ties, dare_linear, dare_ties"):
        TaskVectorMerge(methods=["ties", "task_arithmetic"])
    with pytest.raises(ValueError, match=r"general_weights \[2.0\] are not in TaskVectorMerge.weights \[0.5, 1.0\]"):
        TaskVectorMerge(general_weights=[2.0])
    with pytest.raises(ValueError, match="TaskVectorMerge.select must be one of"):
        TaskVectorMerge(select="general")
    assert isinstance(TaskVectorMerge(), ContributesScores)  # RunSummary takes its rows
    grid = TaskVectorMerge(methods=["dare_linear", "ties"], densities=[0.5, 0.2], weights=[1.0]).grid()
    assert [(p["merge_method"], p["merge_density"]) for p in grid] == [
        ("dare_linear", 0.2), ("dare_linear", 0.5), ("ties", 0.2), ("ties", 0.5)]


# -- end to end ------------------------------------------------------------------------------------
GRID = {"methods": ["ties", "dare_linear"], "densities": [0.5], "weights": [0.5, 1.0]}


@pytest.fixture(scope="module")
def fitted(tiny_model_dir, tmp_path_factory, one_cpu_thread):
    """2 optimizer steps of cross-entropy, validation before and after each; the merge grid at fit end,
    chosen on the target NLL (the tiny model's generations score nothing)."""
    out = tmp_path_factory.mktemp("merge")
    config = tiny_fit_config(tiny_model_dir, out, "merge", [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"monitor": "val/loss", "mode": "min", "save_last": True}},
        {"class_path": "callbacks.model_averaging.TaskVectorMerge", "init_args": {**GRID, "select": "loss"}},
    ], validate_before_fit=True, trainer={"max_steps": 2, "val_check_interval": 1},
        model={"loss": "CrossEntropy", "learning_rate": 3e-2})
    cli = build_cli(["fit", "--config", str(config)])
    log_dir = Path(cli.trainer.log_dir)
    return cli, log_dir, json.loads((log_dir / "merge.json").read_text())


def label(point: dict) -> str:
    return f"{point['merge_method']} density {point['merge_density']:.2f} weight {point['merge_weight']:.2f}"


def test_every_grid_point_is_scored_and_the_choice_follows_the_rule(fitted):
    cli, log_dir, report = fitted
    results = report["results"]
    points = [(r["merge_method"], r["merge_density"], r["merge_weight"]) for r in results]
    assert points == [("ties", 0.5, 0.5), ("ties", 0.5, 1.0), ("dare_linear", 0.5, 0.5), ("dare_linear", 0.5, 1.0)]
    for result in results:
        assert {"loss", "token_accuracy"} <= set(result["metrics"])
    # select: loss, by hand: the lowest target NLL; ties to the smaller weight, then density
    chosen = min(results, key=lambda r: (r["metrics"]["loss"], r["merge_weight"], r["merge_density"]))
    assert report["chosen"] == chosen and report["choice"].startswith(f"chose {label(chosen)}: lowest target NLL")
    # the points differ from the initial model (validation at step 0) and from each other
    before = validation_history(cli.trainer)[0]["loss"]
    losses = [r["metrics"]["loss"] for r in results]
    assert all(abs(loss - before) > 1e-6 for loss in losses) and len(set(losses)) == len(losses)
    # the curves in TensorBoard: one per method and density, the weight in percent on the step axis
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir)).Reload()
    for method in ("ties", "dare_linear"):
        logged = {e.step: e.value for e in events.Scalars(f"merge/{method}_d0.50/loss")}
        mine = {round(r["merge_weight"] * 100): r["metrics"]["loss"] for r in results if r["merge_method"] == method}
        assert logged == pytest.approx(mine)
    assert (log_dir / "merge.png").read_bytes().startswith(b"\x89PNG")


def test_every_grid_point_is_a_row_of_the_summary_and_of_the_sweep_table(fitted, tmp_path):
    cli, log_dir, report = fitted
    summary = json.loads((log_dir / "summary.json").read_text())
    rows = {(r["merge_method"], r["merge_weight"]): r for r in summary["merge"]}
    assert len(rows) == 4 and summary["merge_select"] == "loss" and summary["merge_point"] == label(report["chosen"])
    for result in report["results"]:
        row = rows[(result["merge_method"], result["merge_weight"])]
        assert row["val_loss_best"] == result["metrics"]["loss"] and row["merge_density"] == 0.5
        assert row["merge_chosen"] == (result == report["chosen"])
        assert row["domain_generations_file"] == result["generations"]

    # `talr sweep --collect` over this run: the run's own row, then one per grid point, named after it
    values = {"model.learning_rate": 3e-2}
    (tmp_path / run_name(values)).mkdir()
    (tmp_path / run_name(values) / "summary.json").write_text(json.dumps(summary))
    table = pd.DataFrame(collect(Sweep(base=[], grid={k: [v] for k, v in values.items()}), tmp_path))
    run = run_name(values)
    points = table[table["merge_of"] == run]
    assert list(table["run"]) == [run, *(f"{run}@{m},density=0.50,weight={w:.2f}"
                                         for m in ("ties", "dare_linear") for w in (0.5, 1.0))]
    for (_, row), result in zip(points.iterrows(), report["results"]):
        assert row["domain_best"] == row["val_loss_best"] == result["metrics"]["loss"]  # monitor val/loss
        assert row["domain_initial"] == summary["domain_initial"] and row["loss"] == "ce"
    # the report keeps the points out of the run's cell and lists them in their own table
    assert list(fine_tuned_runs(table)["run"]) == [run]
    merges = merge_table(table)
    assert len(merges) == 4 and int(merges["chosen"].sum()) == 1
    text = merge_markdown(merges)
    for result in report["results"]:
        assert (f"| ce | 0.03 | {result['merge_method']} | 0.50 | {result['merge_weight']:.2f} | "
                f"{result['metrics']['loss']:.4f} |") in text


def test_the_chosen_point_is_exported_loads_and_scores_as_it_was_scored(fitted):
    cli, log_dir, report = fitted
    export = log_dir / "merge_export"
    loaded = AutoModelForCausalLM.from_pretrained(export)
    model = cli.model
    live = {k: v.clone() for k, v in model.lm.state_dict().items()}
    model.lm.load_state_dict(loaded.state_dict())
    try:
        metrics = model.evaluate("val", tag="check_merge_export")
    finally:
        model.lm.load_state_dict(live)
    assert metrics["loss"] == pytest.approx(report["chosen"]["metrics"]["loss"], abs=1e-6)
    assert any(not torch.equal(loaded.state_dict()[k], live[k]) for k in live)  # not the fine-tuned weights
    card = ModelCard.load(export / "README.md")
    assert {"merge", report["chosen"]["merge_method"]} <= set(card.data.to_dict()["tags"])
    results = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert results["val_loss"] == report["chosen"]["metrics"]["loss"]
    before = validation_history(cli.trainer)[0]["loss"]  # the card's "before fine-tuning": step 0's validation
    line = next(line for line in card.text.splitlines() if line.startswith("| val_loss |"))
    assert float(line.strip("|").split("|")[2]) == pytest.approx(before, rel=1e-5)
    assert f"density {report['chosen']['merge_density']:g}" in card.text
