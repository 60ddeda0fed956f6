"""talr.memory_budget: reading a budget, measuring peak memory, choosing the micro-batch size and
checkpointing (against hand-computed needs), and `data.micro_batch_size: auto` on a real `talr fit`:
the choice is measured on the tiny model, and training ends with the same weights as one big micro-batch."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import talr.memory_budget as memory_budget
from cli import build_cli
from conftest import tiny_fit_config
from talr.data import SFTDataModule
from talr.memory_budget import (GIB, MemoryBudgetError, PeakMemory, budget_bytes, choose_memory_settings,
                                largest_fitting, parse_budget)
from talr.module import SFTModule
from talr.tasks import MedCalc

MIB = 2**20
pytestmark = pytest.mark.usefixtures("one_cpu_thread")


# -- reading a budget ---------------------------------------------------------------------------------
def test_budgets_are_read_in_binary_and_decimal_units_or_as_a_share():
    assert parse_budget("4GiB") == (4 * 1024**3, False)
    assert parse_budget("3.5 GB") == (3.5e9, False)
    assert parse_budget("2048mib") == (2048 * 1024**2, False)
    assert parse_budget("50%") == (0.5, True)
    assert budget_bytes("1KiB", torch.device("cpu")) == 1024
    import psutil

    share = budget_bytes("10%", torch.device("cpu"))
    free = psutil.virtual_memory().available + psutil.Process().memory_info().rss
    assert share == pytest.approx(0.1 * free, rel=0.05)  # memory moves a little between the two readings
    for bad, why in [("4 apples", "cannot read '4 apples'"), ("0GiB", "must be positive"), ("150%", r"share must be in")]:
        with pytest.raises(MemoryBudgetError, match=f"data.memory_budget.*{why}"):
            parse_budget(bad)


def test_auto_needs_a_budget_and_a_bad_budget_fails_at_construction():
    with pytest.raises(ValueError, match="micro_batch_size: auto needs data.memory_budget"):
        SFTDataModule(MedCalc(), micro_batch_size="auto")
    with pytest.raises(MemoryBudgetError, match="cannot read '4 gigs'"):
        SFTDataModule(MedCalc(), micro_batch_size="auto", memory_budget="4 gigs")
    data = SFTDataModule(MedCalc(), batch_size=6, micro_batch_size="auto", memory_budget="4GiB")  # any batch size
    assert data.micro_batch_size == "auto"
    with pytest.raises(RuntimeError, match="still 'auto'"):
        data.train_dataloader()


# -- measuring --------------------------------------------------------------------------------------------
def test_the_peak_meter_sees_an_allocation_and_forgets_it_after_a_reset():
    meter = PeakMemory("cpu")
    meter.reset()
    before = meter.current()
    block = torch.ones(256 * MIB // 4)  # 256 MiB, every page written
    del block
    assert meter.peak() - before >= 250 * MIB
    meter.reset()
    small = torch.ones(8 * MIB // 4)
    assert meter.peak() - meter.current() < 64 * MIB  # the 256 MiB are no longer the peak since the reset
    del small
    assert meter.process_peak() - before >= 250 * MIB  # the process's peak remembers it


# -- choosing (needs by hand: a fixed cost plus a cost per row, a quarter of it with checkpointing) -------
def hand_need(base: float, per_row: float, log: list):
    def need(rows: int, checkpointing: bool) -> int:
        log.append((rows, checkpointing))
        return int(base + rows * (per_row / 4 if checkpointing else per_row))
    return need


def test_the_largest_micro_batch_that_fits_without_checkpointing_is_chosen():
    tried: list = []
    # 1 GiB fixed + 0.5 GiB per row: 4 rows need 3.0 GiB, 5 rows 3.5 GiB, so a 3.2 GiB budget fits 4 of 8
    choice = choose_memory_settings(8, int(3.2 * GIB), hand_need(GIB, 0.5 * GIB, tried))
    assert (choice.micro_batch_size, choice.gradient_checkpointing) == (4, False)
    assert choice.need_bytes == 3 * GIB and choice.trials == len(tried)
    assert all(not checkpointing for _, checkpointing in tried)  # it fits without: checkpointing never tried
    assert len(tried) <= 4 and max(rows for rows, _ in tried) <= 5  # 1, 2, then the line's prediction, verified
    assert "micro-batch 4 of 8 rows, gradient checkpointing off; trial step peak 3.0 GiB" in choice.describe()

    everything = choose_memory_settings(8, 10 * GIB, hand_need(GIB, 0.5 * GIB, []))
    assert everything.micro_batch_size == 8  # the whole step fits: no accumulation


def test_a_budget_too_small_for_one_row_without_checkpointing_turns_checkpointing_on():
    tried: list = []
    # without: 1 GiB + 2 GiB per row (1 row: 3 GiB); with: 0.5 GiB per row, so 2.2 GiB fits 2 rows (2.0 GiB)
    choice = choose_memory_settings(8, int(2.2 * GIB), hand_need(GIB, 2 * GIB, tried))
    assert (choice.micro_batch_size, choice.gradient_checkpointing) == (2, True)
    assert tried[0] == (1, False) and (1, True) in tried


def test_a_strategy_that_needs_the_steps_losses_checkpoints_one_whole_step_rather_than_split_it():
    """TALR splits a step at the price of a forward of every row (its tau pass); checkpointing the whole
    step costs the same forward once, so the whole step with checkpointing wins where it fits."""
    # without: 1 GiB + 0.5 GiB per row (4 of 8 fit 3.2 GiB); with: 1 GiB + 0.125 GiB per row (8 rows: 2 GiB)
    tried: list = []
    choice = choose_memory_settings(8, int(3.2 * GIB), hand_need(GIB, 0.5 * GIB, tried), split_costs_a_forward=True)
    assert (choice.micro_batch_size, choice.gradient_checkpointing) == (8, True)
    assert choice.need_bytes == 2 * GIB and tried[-1] == (8, True) and choice.trials == len(tried)
    # the whole step does not fit even with checkpointing (1 GiB + 8 x 0.375 GiB = 4 GiB): the split step stays
    tried = []
    kept = choose_memory_settings(8, int(3.2 * GIB), lambda rows, ckpt: (tried.append((rows, ckpt)), int(
        GIB + rows * (0.375 if ckpt else 0.5) * GIB))[1], split_costs_a_forward=True)
    assert (kept.micro_batch_size, kept.gradient_checkpointing) == (4, False) and tried[-1] == (8, True)
    # told what does not grow with the rows (1 GiB), one row's trial (1.5 GiB) predicts 5 GiB for the whole
    # step without checkpointing: the split steps' trials are skipped for the whole step with checkpointing
    tried = []
    direct = choose_memory_settings(8, int(3.2 * GIB), hand_need(GIB, 0.5 * GIB, tried), split_costs_a_forward=True,
                                    fixed_bytes=GIB)
    assert (direct.micro_batch_size, direct.gradient_checkpointing, direct.trials) == (8, True, 2)
    assert tried == [(1, False), (8, True)]
    # the same prediction under a budget that might hold it (10 GiB): the whole step is measured without
    tried = []
    roomy = choose_memory_settings(8, 10 * GIB, hand_need(GIB, 0.5 * GIB, tried), split_costs_a_forward=True,
                                   fixed_bytes=GIB)
    assert (roomy.micro_batch_size, roomy.gradient_checkpointing) == (8, False) and (8, True) not in tried
    assert len(tried) == len(set(tried)) == roomy.trials  # no setting measured twice
    # a strategy without the pass (ce): never tried
    plain: list = []
    assert choose_memory_settings(8, int(3.2 * GIB), hand_need(GIB, 0.5 * GIB, plain)).micro_batch_size == 4
    assert all(not ckpt for _, ckpt in plain)


def test_a_budget_too_small_for_anything_names_the_budget_and_the_measured_need():
    with pytest.raises(MemoryBudgetError) as error:
        choose_memory_settings(8, int(0.5 * GIB), hand_need(GIB, 2 * GIB, []))
    message = str(error.value)
    # 1 row: 3.0 GiB without, 1.5 GiB with checkpointing
    assert "data.memory_budget 0.5 GiB is too small" in message
    assert "without gradient checkpointing 3.0 GiB; with gradient checkpointing 1.5 GiB" in message
    assert "Raise data.memory_budget" in message


def test_the_search_never_runs_far_above_the_budget_when_memory_is_not_linear():
    # a need that jumps at 6 rows: the prediction from 1 and 2 overshoots, the search steps back
    need = lambda rows: GIB * (1 + 0.25 * rows + (4 if rows >= 6 else 0))  # noqa: E731
    size, measured = largest_fitting(8, int(2.6 * GIB), need)
    assert size == 5
    assert all(need(m) <= 2.6 * GIB for m in measured if m <= 5) and len(measured) <= memory_budget.MAX_TRIALS


# -- on a real fit ------------------------------------------------------------------------------------------
def fit(tiny_model_dir: Path, out: Path, version: str, data: dict):
    config = tiny_fit_config(tiny_model_dir, out, version, [], validate_before_fit=False,
                             trainer={"max_steps": 2, "limit_val_batches": 0},
                             model={"loss": "TALR", "learning_rate": 1e-3})
    return build_cli(["fit", "--config", str(config), *[f"--data.{k}={v}" for k, v in data.items()]])


def test_auto_measures_trials_on_the_real_model(tiny_model_dir, tmp_path, monkeypatch):
    """Trials of 1 and 2 rows, then the whole step; a trial's need grows by at least the full logits of
    the extra rows' targets (the naive loss projects every target token onto the vocabulary: tokens x
    vocabulary x 4 bytes, kept for backward)."""
    needs: dict[int, int] = {}
    real = memory_budget.choose_memory_settings

    def record(batch_size, budget, need, options, **kwargs):
        return real(batch_size, budget, lambda rows, checkpointing: needs.setdefault(rows, need(rows, checkpointing)),
                    options, **kwargs)

    monkeypatch.setattr(memory_budget, "choose_memory_settings", record)
    cli = fit(tiny_model_dir, tmp_path, "auto", {"micro_batch_size": "auto", "memory_budget": "90%"})
    data = cli.datamodule
    assert cli.trainer.global_step == 2 and 1 <= data.micro_batch_size <= 4
    longest = sorted(data.datasets["train"].examples, key=lambda e: len(e.input_ids), reverse=True)
    vocabulary = cli.model.lm.config.vocab_size
    assert set(needs) == {1, 2, 4} and data.micro_batch_size == 4  # 90% of the free memory holds the whole step
    # (the first trial also pays one-time costs, so the comparison starts at 2 rows)
    extra_targets = sum(e.num_targets for e in longest[2:4])
    assert needs[4] - needs[2] >= extra_targets * vocabulary * 4


def test_auto_under_a_small_budget_trains_to_the_same_weights_as_one_micro_batch(tiny_model_dir, tmp_path, monkeypatch):
    """The budget's choice (here micro-batch 1 of 4 with checkpointing: the measured peaks are replaced by
    a hand-made need, as the tiny model needs too little to force it) changes nothing the run learns."""
    trials: list[tuple[int, bool]] = []
    real_trial = SFTModule.trial_step

    def trial_step(module, micro, in_a_larger_step):
        checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in module.lm.modules())
        trials.append((micro["input_ids"].shape[0], checkpointing))
        return real_trial(module, micro, in_a_larger_step)

    # the need of the last trial: 1 GiB + 2 GiB per row without checkpointing, 0.5 GiB per row with it
    monkeypatch.setattr(SFTModule, "trial_step", trial_step)
    monkeypatch.setattr(PeakMemory, "peak", lambda self: int(GIB + trials[-1][0] * (0.5 if trials[-1][1] else 2) * GIB))
    monkeypatch.setattr(PeakMemory, "current", lambda self: 0)
    small = fit(tiny_model_dir, tmp_path, "small", {"micro_batch_size": "auto", "memory_budget": "1.6GiB"})
    # with checkpointing 1 row needs 1.5 GiB + AdamW's moments (2 x 13 MiB of weights), 2 rows 2.0 GiB
    assert small.datamodule.micro_batch_size == 1
    assert any(getattr(m, "gradient_checkpointing", False) for m in small.model.lm.modules())
    assert trials[0] == (1, False) and trials[-1][1]
    monkeypatch.undo()

    whole = fit(tiny_model_dir, tmp_path, "whole", {"micro_batch_size": 4})
    assert whole.trainer.global_step == small.trainer.global_step == 2
    for (name, a), (_, b) in zip(small.model.net.named_parameters(), whole.model.net.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not math.isclose(float(next(whole.model.net.parameters()).abs().sum()), 0.0)
