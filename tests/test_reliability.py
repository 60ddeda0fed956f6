"""Numerical faults: a non-finite step is skipped and counted; too many in a row stop the run."""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

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


def run_talr(args):
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    return subprocess.run([str(Path(sys.executable).with_name("talr")), *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_resuming_from_a_mid_epoch_checkpoint_gives_bitwise_the_same_weights(tiny_model_dir, tmp_path):
    """Resume from a checkpoint written 2 batches into the second epoch; the run must see the same
    batches in the same order, and end with the same weights, optimizer and schedule."""

    def config(name):
        # a standalone config: list-valued keys such as callbacks merge item by item across --config files
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "seed_everything": 0,
            "validate_before_fit": False,
            "trainer": {"max_epochs": 2, "limit_val_batches": 0, "logger": False, "accelerator": "cpu",
                        "default_root_dir": str(tmp_path / name), "enable_progress_bar": False,
                        "callbacks": [
                            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                             "init_args": {"dirpath": str(tmp_path / name), "every_n_train_steps": 2,
                                           "save_top_k": -1, "save_last": True}},
                            {"class_path": "resume_helpers.PrintRows"}]},
            "model": {"model": str(tiny_model_dir), "loss": "talr", "learning_rate": 1e-3, "generate": False},
            "data": {"task": {"class_path": "talr.tasks.MedCalc",
                              "init_args": {"source": "synthetic", "num_synthetic": 28}},
                     "val_size": 4, "batch_size": 4, "micro_batch_size": 2},  # 6 steps an epoch, 12 in all
        }))
        return ["fit", "--config", str(path)]

    clean = run_talr(config("clean"))
    assert clean.returncode == 0, clean.stderr[-3000:]
    mid_epoch = tmp_path / "clean" / "epoch=1-step=8.ckpt"
    resumed = run_talr([*config("resumed"), "--ckpt_path", str(mid_epoch)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stdout + resumed.stderr

    clean_rows = [line for line in clean.stdout.splitlines() if line.startswith("ROWS")]
    resumed_rows = [line for line in resumed.stdout.splitlines() if line.startswith("ROWS")]
    assert len(clean_rows) == 12 and resumed_rows == clean_rows[8:]
    a = torch.load(tmp_path / "clean" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 12
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for state_a, state_b in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert torch.equal(state_a["exp_avg"], state_b["exp_avg"])
    assert a["lr_schedulers"] == b["lr_schedulers"]
