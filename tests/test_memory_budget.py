"""talr.memory_budget: reading a budget, measuring peak memory, choosing the micro-batch size and
checkpointing (against hand-computed needs), and `data.micro_batch_size: auto` on a real `talr fit`:
the choice is measured on the tiny model, and training ends with the same weights as one big micro-batch."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import talr.memory_budget as memory_budget
from cli import build_cli
from conftest import tiny_fit_config
from talr.data import SFTDataModule
from talr.memory_budget import (GIB, MemoryBudgetError, PeakMemory, budget_bytes, choose_memory_settings,
                                largest_fitting, loss_chunk_for, parse_budget)
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


# -- choosing (needs by hand: a fixed cost plus a cost per row: half of it selective, a quarter full) ---------
SHARE_PER_ROW = {"off": 1.0, "selective": 0.5, "full": 0.25}


def hand_need(base: float, per_row: float, log: list):
    def need(rows: int, level: str) -> int:
        log.append((rows, level))
        return int(base + rows * per_row * SHARE_PER_ROW[level])
    return need


def test_the_largest_micro_batch_that_fits_without_checkpointing_is_chosen():
    tried: list = []
    # 1 GiB fixed + 0.5 GiB per row: 4 rows need 3.0 GiB, 5 rows 3.5 GiB, so a 3.2 GiB budget fits 4 of 8
    choice = choose_memory_settings(8, int(3.2 * GIB), hand_need(GIB, 0.5 * GIB, tried))
    assert (choice.micro_batch_size, choice.checkpointing) == (4, "off")
    assert choice.need_bytes == 3 * GIB and choice.trials == len(tried)
    assert all(level == "off" for _, level in tried)  # it fits without: checkpointing never tried
    assert len(tried) <= 4 and max(rows for rows, _ in tried) <= 5  # 1, 2, then the line's prediction, verified
    assert "micro-batch 4 of 8 rows, gradient checkpointing off; trial step peak 3.0 GiB" in choice.describe()

    everything = choose_memory_settings(8, 10 * GIB, hand_need(GIB, 0.5 * GIB, []))
    assert everything.micro_batch_size == 8  # the whole step fits: no accumulation


def test_a_budget_too_small_for_one_row_without_checkpointing_turns_checkpointing_on():
    tried: list = []
    # off: 1 GiB + 2 GiB per row (1 row: 3 GiB); selective: 1 GiB per row, so 2.6 GiB fits 1 row (2.0 GiB)
    choice = choose_memory_settings(8, int(2.6 * GIB), hand_need(GIB, 2 * GIB, tried))
    assert (choice.micro_batch_size, choice.checkpointing) == (1, "selective")
    assert tried[0] == (1, "off") and (1, "full") not in tried
    # under 1.8 GiB one row fits only fully checkpointed (off 3.0, selective 2.0, full 1.5 GiB)
    tried = []
    choice = choose_memory_settings(8, int(1.8 * GIB), hand_need(GIB, 2 * GIB, tried))
    assert (choice.micro_batch_size, choice.checkpointing) == (1, "full")
    assert [level for _, level in tried][:2] == ["off", "selective"]
    # a level set in the config is the cheapest allowed
    tried = []
    choice = choose_memory_settings(8, int(2.6 * GIB), hand_need(GIB, 2 * GIB, tried), ("full",))
    assert (choice.micro_batch_size, choice.checkpointing) == (3, "full") and {level for _, level in tried} == {"full"}


def test_a_strategy_that_needs_the_steps_losses_checkpoints_one_whole_step_rather_than_split_it():
    """TALR splits a step at the price of a forward of every row (its tau pass); checkpointing the whole
    step costs at most that forward once, so the whole step checkpointed wins where it fits, at the
    cheapest level that fits."""
    # off: 1 GiB + 0.5 GiB per row (4 of 8 fit 3.2 GiB); selective: 0.25 GiB per row (8 rows: 3 GiB)
    tried: list = []
    choice = choose_memory_settings(8, int(3.2 * GIB), hand_need(GIB, 0.5 * GIB, tried), split_costs_a_forward=True)
    assert (choice.micro_batch_size, choice.checkpointing) == (8, "selective")
    assert choice.need_bytes == 3 * GIB and tried[-1] == (8, "selective") and choice.trials == len(tried)
    # under 2.6 GiB selective does not hold the whole step (3 GiB), full does (1 GiB + 8 x 0.125 = 2 GiB)
    tried = []
    full = choose_memory_settings(8, int(2.6 * GIB), hand_need(GIB, 0.5 * GIB, tried), split_costs_a_forward=True)
    assert (full.micro_batch_size, full.checkpointing) == (8, "full") and tried[-2:] == [(8, "selective"), (8, "full")]
    # the whole step does not fit at any level (1 GiB + 8 x 0.375 GiB = 4 GiB): the split step stays
    tried = []
    kept = choose_memory_settings(8, int(3.2 * GIB), lambda rows, level: (tried.append((rows, level)), int(
        GIB + rows * (0.5 if level == "off" else 0.375) * GIB))[1], split_costs_a_forward=True)
    assert (kept.micro_batch_size, kept.checkpointing) == (4, "off") and tried[-1] == (8, "full")
    # told what does not grow with the rows (1 GiB), one row's trial (1.5 GiB) predicts 5 GiB for the whole
    # step without checkpointing: the split steps' trials are skipped for the whole step checkpointed
    tried = []
    direct = choose_memory_settings(8, int(3.2 * GIB), hand_need(GIB, 0.5 * GIB, tried), split_costs_a_forward=True,
                                    fixed_bytes=GIB)
    assert (direct.micro_batch_size, direct.checkpointing, direct.trials) == (8, "selective", 3)
    assert tried == [(1, "off"), (1, "selective"), (8, "selective")]  # selective's one row predicts 3 GiB
    # under 2.6 GiB selective's one row (1.25 GiB) predicts 3 GiB for the whole step: only full is measured
    tried = []
    direct = choose_memory_settings(8, int(2.6 * GIB), hand_need(GIB, 0.5 * GIB, tried), split_costs_a_forward=True,
                                    fixed_bytes=GIB)
    assert (direct.micro_batch_size, direct.checkpointing) == (8, "full")
    assert tried == [(1, "off"), (1, "selective"), (8, "full")]
    # the same prediction under a budget that might hold it (10 GiB): the whole step is measured without
    tried = []
    roomy = choose_memory_settings(8, 10 * GIB, hand_need(GIB, 0.5 * GIB, tried), split_costs_a_forward=True,
                                   fixed_bytes=GIB)
    assert (roomy.micro_batch_size, roomy.checkpointing) == (8, "off") and (8, "selective") not in tried
    assert len(tried) == len(set(tried)) == roomy.trials  # no setting measured twice
    # a strategy without the pass (ce): never tried
    plain: list = []
    assert choose_memory_settings(8, int(3.2 * GIB), hand_need(GIB, 0.5 * GIB, plain)).micro_batch_size == 4
    assert all(level == "off" for _, level in plain)


def test_a_budget_too_small_for_anything_names_the_budget_and_the_measured_need():
    with pytest.raises(MemoryBudgetError) as error:
        choose_memory_settings(8, int(0.5 * GIB), hand_need(GIB, 2 * GIB, []))
    message = str(error.value)
    # 1 row: 3.0 GiB off, 2.0 GiB selective, 1.5 GiB full
    assert "data.memory_budget 0.5 GiB is too small" in message
    assert "gradient checkpointing off 3.0 GiB; gradient checkpointing selective 2.0 GiB; gradient checkpointing full 1.5 GiB" in message
    assert "Raise data.memory_budget" in message


def test_the_search_never_runs_far_above_the_budget_when_memory_is_not_linear():
    # a need that jumps at 6 rows: the prediction from 1 and 2 overshoots, the search steps back
    need = lambda rows: GIB * (1 + 0.25 * rows + (4 if rows >= 6 else 0))  # noqa: E731
    size, measured = largest_fitting(8, int(2.6 * GIB), need)
    assert size == 5
    assert all(need(m) <= 2.6 * GIB for m in measured if m <= 5) and len(measured) <= memory_budget.MAX_TRIALS


# -- checkpointing levels on the tiny model (hidden 64, MLP 128: its up and gate projections widen 64 -> 128)
def matmul_counts(tiny_model_dir: Path, level: str) -> tuple[Counter, list[torch.Tensor]]:
    """Forward and backward of one batch at `level`: the matmuls run, split into the MLP's widening ones
    (right operand 64 x 128) and all others, and the gradients."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from talr.models import TokenNLLModel, load_model, set_gradient_checkpointing

    counts: Counter = Counter()

    class CountMatmuls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.mm.default:
                counts["widening" if tuple(args[1].shape) == (64, 128) else "other"] += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    net = TokenNLLModel(load_model(str(tiny_model_dir), "float32")).train()
    set_gradient_checkpointing(net.lm, level)
    ids = torch.randint(0, 1000, (2, 24))
    labels = ids.clone()
    labels[:, :12] = -100
    with CountMatmuls():
        net(ids, torch.ones_like(ids), labels)[0].sum().backward()
    return counts, [p.grad.clone() for p in net.parameters()]


def test_selective_checkpointing_recomputes_all_but_the_widening_matmuls_and_keeps_the_gradients(tiny_model_dir):
    """Per layer, a 64 x 128 right operand comes in 3 matmuls without checkpointing: the up and gate
    projections, and the down projection's input gradient (grad [48, 64] x its weight [64, 128]). `full`
    runs up and gate again in its recompute (5 per layer); `selective` keeps their outputs (3), and
    recomputes the other matmuls as `full` does."""
    off, off_grads = matmul_counts(tiny_model_dir, "off")
    selective, selective_grads = matmul_counts(tiny_model_dir, "selective")
    full, full_grads = matmul_counts(tiny_model_dir, "full")
    assert off["widening"] == selective["widening"] == 2 * 3 and full["widening"] == 2 * 5
    assert off["other"] < selective["other"] == full["other"]
    for grads in (selective_grads, full_grads):
        for got, want in zip(grads, off_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="model.gradient_checkpointing must be true, false or one of off, selective"):
        matmul_counts(tiny_model_dir, "some")


# -- on a real fit ------------------------------------------------------------------------------------------
def fit(tiny_model_dir: Path, out: Path, version: str, data: dict, *options: str):
    config = tiny_fit_config(tiny_model_dir, out, version, [], validate_before_fit=False,
                             trainer={"max_steps": 2, "limit_val_batches": 0},
                             model={"loss": "TALR", "learning_rate": 1e-3})
    return build_cli(["fit", "--config", str(config), *[f"--data.{k}={v}" for k, v in data.items()], *options])


def test_a_checkpointed_setting_chunks_the_loss_unless_the_config_or_the_loss_says_otherwise():
    def module(chosen: int | None, needs_logits: bool) -> SimpleNamespace:
        return SimpleNamespace(hparams=SimpleNamespace(loss_chunk_size=chosen),
                               loss_fn=SimpleNamespace(needs=SimpleNamespace(logits=needs_logits)))

    assert loss_chunk_for(module(None, False), "full") == loss_chunk_for(module(None, False), "selective") == 256
    assert loss_chunk_for(module(None, False), "off") is None
    assert loss_chunk_for(module(512, False), "full") == 512  # model.loss_chunk_size is the user's
    assert loss_chunk_for(module(None, True), "full") is None  # KL to the initial model needs every logit


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
    assert cli.model.net.chunk_size is None  # no checkpointing, so the loss is not chunked either
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
    assert small.model.net.chunk_size == memory_budget.BUDGET_LOSS_CHUNK  # checkpointed: the loss chunked too
    monkeypatch.undo()

    # the same loss chunks (the chunked loss against the plain one: tests/test_chunked_loss.py)
    whole = fit(tiny_model_dir, tmp_path, "whole", {"micro_batch_size": 4}, f"--model.loss_chunk_size={memory_budget.BUDGET_LOSS_CHUNK}")
    assert whole.trainer.global_step == small.trainer.global_step == 2
    for (name, a), (_, b) in zip(small.model.net.named_parameters(), whole.model.net.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda detail: f"{name}: {detail}")
    assert not math.isclose(float(next(whole.model.net.parameters()).abs().sum()), 0.0)
