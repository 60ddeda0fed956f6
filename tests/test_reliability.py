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


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    import talr.checkpoint_io as checkpoint_io

    io = checkpoint_io.AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "step": 1}, path)

    def crash_mid_write(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_io.torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "step": 2}, path)
    previous = torch.load(path, weights_only=True)  # the earlier checkpoint is intact
    assert previous["step"] == 1 and torch.equal(previous["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_fit_uses_atomic_checkpoints_and_rejects_a_checkpoint_of_another_model(tiny_model_dir, tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from talr.checkpoint_io import AtomicCheckpointIO

    cli = fit(tiny_model_dir, tmp_path / "run", "--model.loss", "ce", "--trainer.max_steps", "1",
              "--model.generate", "true", "--model.max_new_tokens", "2",
              "--trainer.val_check_interval", "1")
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()

    other = tmp_path / "other-model"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(other)
    tokenizer.save_pretrained(other)
    # (talr's CLI re-reads the model from the checkpoint's own hyperparameters; in Python the module decides)
    from talr.data import SFTDataModule
    from talr.module import SFTModule
    from talr.tasks import MedCalc

    module = SFTModule(model=str(other), generate=False)
    data = SFTDataModule(MedCalc(num_synthetic=8), tokenizer=str(other), val_size=4)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"trained from '.*tiny-llama.*' and does not fit model.model='.*other-model'.*shape"):
        trainer.validate(module, datamodule=data, ckpt_path=str(ckpt))
