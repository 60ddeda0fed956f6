"""`talr curriculum`: the share of easy target tokens (p > 0.2) at each validation, counted by hand from
row-scores files, the gate's passed share from TensorBoard, and a real run with HardGate read back."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from cli import build_cli
from conftest import tiny_fit_config
from talr.experiments.curriculum import held_out_shares, main, training_shares

LOG = math.log


def write_rows(log_dir: Path, step: int, rows: list[dict]) -> None:
    folder = log_dir / "row_scores"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"val_step{step:06d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def row(index: int, tokens: int, easy: int, choice: int, class_p: list[float]) -> dict:
    # the fields read_row_scores requires, with what the curriculum reads (tokens, easy, choice, choice_logprobs)
    return {"row_index": index, "tokens": tokens, "nll": 1.0, "top1_hits": 0, "easy": easy,
            "nll_at_temperature": [1.0, 1.0], "choice": choice, "choice_logprobs": [LOG(p) for p in class_p]}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """Three held-out rows of 5, 4 and 6 target tokens scored at steps 0, 10 and 20; the gate's passed
    share logged at steps 5, 10, 15 and 20."""
    log_dir = tmp_path / "run" / "tb" / "version_0"
    write_rows(log_dir, 0, [row(0, 5, 4, 0, [0.1, 0.3, 0.3, 0.3]), row(1, 4, 3, 1, [0.25, 0.15, 0.3, 0.3]),
                            row(2, 6, 5, 2, [0.3, 0.3, 0.19, 0.21])])
    write_rows(log_dir, 10, [row(0, 5, 5, 0, [0.5, 0.2, 0.2, 0.1]), row(1, 4, 3, 1, [0.25, 0.15, 0.3, 0.3]),
                             row(2, 6, 6, 2, [0.1, 0.1, 0.7, 0.1])])
    write_rows(log_dir, 20, [row(0, 5, 5, 0, [0.9, 0.0333, 0.0333, 0.0334]), row(1, 4, 4, 1, [0.1, 0.6, 0.2, 0.1]),
                             row(2, 6, 6, 2, [0.1, 0.1, 0.7, 0.1])])
    (tmp_path / "run" / "summary.json").write_text("{}")
    with SummaryWriter(str(log_dir)) as writer:
        for step, share in ((5, 0.5), (10, 0.7), (15, 0.8), (20, 1.0)):
            writer.add_scalar("train/gate/passed_share", share, step)
            writer.add_scalar("train/loss", 9.0, step)  # another tag: not read
    return log_dir


def test_easy_shares_are_counted_over_the_same_rows_and_tokens(run_dir):
    shares = held_out_shares(run_dir)
    assert shares["step"].tolist() == [0, 10, 20]
    # all tokens: sum(easy) / sum(tokens) over 15 tokens
    assert shares["easy_share"].tolist() == pytest.approx([12 / 15, 14 / 15, 15 / 15])
    # the true class's token above 0.2: step 0 none (0.1, 0.15, 0.19), step 10 rows 0 and 2, step 20 all three
    assert shares["class_easy_share"].tolist() == pytest.approx([0, 2 / 3, 1])
    # a resample of the three rows holds 0 to 3 copies of the two easy rows: the share's bounds are hand counts
    low, high = shares["class_easy_share_interval"][1]
    assert {low, high} <= {0, 1 / 3, 2 / 3, 1} and low < 2 / 3 < high
    change = shares["easy_share_change"][2]
    assert change.delta == pytest.approx(3 / 15) and change.low <= change.delta <= change.high
    class_change = shares["class_easy_share_change"][1]
    assert class_change.delta == pytest.approx(2 / 3) and (class_change.b, class_change.c) == (0, 2)


def test_the_gates_passed_share_is_read_and_averaged_between_validations(run_dir, tmp_path):
    training = training_shares(run_dir)
    assert training["step"].tolist() == [5, 10, 15, 20]
    assert main([str(run_dir), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "curriculum.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    # steps 5 and 10 follow validation 0 (mean 0.6); 15 and 20 follow validation 10 (mean 0.9); none after 20
    assert [c[-1] for c in cells] == ["0.600", "0.900", ""]
    assert [c[2].split(" [")[0] for c in cells] == ["0.800", "0.933", "1.000"]
    assert cells[2][2] == "1.000 [1.000, 1.000]"  # every row's tokens all easy: every resample gives 1
    assert "## run" in text  # the run's folder (it holds summary.json) names it
    assert (tmp_path / "out" / "curriculum.png").stat().st_size > 0


def test_two_runs_with_one_label_are_refused(run_dir, tmp_path):
    with pytest.raises(ValueError, match="same label"):
        main([str(run_dir), str(run_dir), "--out", str(tmp_path)])


def test_the_threshold_is_the_one_the_row_files_count_easy_tokens_at():
    import talr.evaluation
    import talr.experiments.curriculum

    assert talr.experiments.curriculum.EASY_PROBABILITY == talr.evaluation.EASY_PROBABILITY == 0.2


def test_a_folder_without_row_scores_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="row_scores"):
        held_out_shares(tmp_path)


def test_a_hard_gate_run_is_read_back(tiny_model_dir, tmp_path, one_cpu_thread):
    """A real `talr fit` with HardGate: the curriculum's recount from the row files equals the share the
    run logged itself (val/share_above_0.2), and every training step's passed share is read."""
    config = tiny_fit_config(tiny_model_dir, tmp_path, "gate", [], validate_before_fit=True,
                             trainer={"max_steps": 3, "val_check_interval": 3},
                             model={"loss": {"class_path": "talr.losses.HardGate", "init_args": {"threshold": 1e-4}},
                                    "learning_rate": 1e-3})
    log_dir = Path(build_cli(["fit", "--config", str(config)]).trainer.log_dir)
    logged = EventAccumulator(str(log_dir)).Reload().Scalars("val/share_above_0.2")
    shares = held_out_shares(log_dir)
    assert shares["step"].tolist() == [e.step for e in logged] == [0, 3]
    assert shares["easy_share"].tolist() == pytest.approx([e.value for e in logged], abs=1e-6)
    training = training_shares(log_dir)
    assert training["step"].tolist() == [0, 1, 2] and training["passed_share"].between(0, 1).all()
