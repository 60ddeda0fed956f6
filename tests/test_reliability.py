"""Numerical faults: a non-finite step is skipped and counted; too many in a row stop the run."""

from pathlib import Path

import lightning as L
import pytest
import torch

from cli import build_cli
from talr.losses import LOSSES, CrossEntropy, LossOutput, TokenBatch

REPO = Path(__file__).resolve().parents[1]


class NaNOnSecondCall(CrossEntropy):
    """Plain CE, except that the second micro-batch it sees gets a NaN loss."""

    name = "nan_once"
    calls = 0

    def __call__(self, batch: TokenBatch) -> LossOutput:
        type(self).calls += 1
        out = super().__call__(batch)
        return LossOutput(out.total * float("nan")) if type(self).calls == 2 else out


class PoisonWeights(L.Callback):
    """Makes every forward pass non-finite from the first step on; keeps the weights around the failure."""

    captured: dict = {}

    def on_train_start(self, trainer, pl_module):
        type(self).captured["initial"] = {k: v.clone() for k, v in pl_module.lm.state_dict().items()}
        with torch.no_grad():
            pl_module.lm.model.norm.weight.fill_(float("inf"))

    def on_exception(self, trainer, pl_module, exception):
        type(self).captured["final"] = {k: v.clone() for k, v in pl_module.lm.state_dict().items()}


def fit(tiny_model_dir, out, *extra, callbacks=()):
    trainer_callbacks = [f"--trainer.callbacks+={c}" for c in callbacks]
    return build_cli([
        "fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--model.model", str(tiny_model_dir),
        "--model.generate", "false", "--validate_before_fit", "false", "--model.loss_options", "{}",
        "--data.task.init_args.num_synthetic", "24", "--data.val_size", "4",
        "--data.batch_size", "4", "--data.micro_batch_size", "4", "--trainer.max_steps", "3",
        "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
        *trainer_callbacks, *extra,
    ])


def test_a_non_finite_step_is_skipped_counted_and_training_goes_on(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(LOSSES, "nan_once", NaNOnSecondCall)
    NaNOnSecondCall.calls = 0
    with pytest.warns(UserWarning, match="non-finite loss or gradient at epoch 0, batch 1"):
        cli = fit(tiny_model_dir, tmp_path, "--model.loss", "nan_once")
    assert cli.model.bad_steps == 1
    assert cli.trainer.global_step == 3  # three real optimizer steps; the bad batch did not count
    assert NaNOnSecondCall.calls == 4
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())
    assert cli.trainer.callback_metrics["train/skipped_steps"].item() == 1


def test_too_many_bad_steps_in_a_row_stop_with_the_batch_named_and_weights_untouched(tiny_model_dir, tmp_path):
    PoisonWeights.captured = {}
    with pytest.raises(FloatingPointError, match=r"2 optimizer steps in a row .* batch 1 .*max_bad_steps=2"):
        fit(tiny_model_dir, tmp_path, "--model.loss", "ce", "--model.max_bad_steps", "2",
            callbacks=["test_reliability.PoisonWeights"])
    # the bad steps never reached AdamW, which would have spread the non-finite values everywhere
    initial, final = PoisonWeights.captured["initial"], PoisonWeights.captured["final"]
    for key, value in initial.items():
        if key != "model.norm.weight":
            assert torch.equal(value, final[key]), key
