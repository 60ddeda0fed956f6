"""Numerical faults: a non-finite step is skipped and counted; too many in a row stop the run."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from cli import build_cli
from talr.losses import CrossEntropy, LossOutput, TokenBatch

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


def fit(tiny_model_dir, out, *extra, callbacks=(), config=REPO / "configs" / "quickstart.yaml"):
    trainer_callbacks = [f"--trainer.callbacks+={c}" for c in callbacks]
    return build_cli([
        "fit", "--config", str(config), "--model.model", str(tiny_model_dir),
        "--model.generate", "false", "--validate_before_fit", "false",
        "--data.task.init_args.num_synthetic", "24", "--data.val_size", "4",
        "--data.batch_size", "4", "--data.micro_batch_size", "4", "--trainer.max_steps", "3",
        "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
        *trainer_callbacks, *extra,
    ])


def test_a_non_finite_step_is_skipped_counted_and_training_goes_on(tiny_model_dir, tmp_path):
    NaNOnSecondCall.calls = 0
    with pytest.warns(UserWarning, match="non-finite loss or gradient at epoch 0, batch 1"):
        cli = fit(tiny_model_dir, tmp_path, "--model.loss", "test_reliability.NaNOnSecondCall")
    assert cli.model.bad_steps == 1
    assert cli.trainer.global_step == 3  # three real optimizer steps; the bad batch did not count
    assert NaNOnSecondCall.calls == 4
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())
    assert cli.trainer.callback_metrics["train/skipped_steps"].item() == 1


def test_too_many_bad_steps_in_a_row_stop_with_the_batch_named_and_weights_untouched(tiny_model_dir, tmp_path):
    PoisonWeights.captured = {}
    with pytest.raises(FloatingPointError, match=r"2 optimizer steps in a row .* batch 1 .*max_bad_steps=2"):
        fit(tiny_model_dir, tmp_path, "--model.loss", "CrossEntropy", "--model.max_bad_steps", "2",
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

    cli = fit(tiny_model_dir, tmp_path / "run", "--model.loss", "CrossEntropy", "--trainer.max_steps", "1",
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


def run_talr(args, **env):
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), **env}
    return subprocess.run([str(Path(sys.executable).with_name("talr")), *args], capture_output=True, text=True,
                          env=env, timeout=600)


def resume_config(root: Path, name: str) -> list[str]:
    """`talr fit` on 24 training rows, 6 steps an epoch, 2 epochs; a checkpoint every 2 steps.

    A standalone config: list-valued keys such as callbacks merge item by item across --config files.
    """
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "seed_everything": 0,
        "validate_before_fit": False,
        "trainer": {"max_epochs": 2, "limit_val_batches": 0, "accelerator": "cpu", "enable_progress_bar": False,
                    "default_root_dir": str(root / name),
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(root / name), "name": "tb"}},
                    "callbacks": [
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"every_n_train_steps": 2, "save_top_k": -1, "save_last": True}},
                        {"class_path": "resume_helpers.PrintRows"},
                        {"class_path": "resume_helpers.KillSwitch"}]},
        "model": {"model": str(root.parent / "tiny"), "loss": "TALR", "learning_rate": 1e-3, "generate": False},
        "data": {"task": {"class_path": "talr.tasks.MedCalc", "init_args": {"source": "synthetic", "num_synthetic": 28}},
                 "val_size": 4, "batch_size": 4, "micro_batch_size": 2},
    }))
    return ["fit", "--config", str(path)]


def rows_trained(result) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("ROWS")]


def checkpoints(run: Path) -> Path:
    (directory,) = run.glob("tb/version_*/checkpoints")
    return directory


def assert_same_final_state(a_path: Path, b_path: Path) -> None:
    a, b = torch.load(a_path, weights_only=True), torch.load(b_path, weights_only=True)
    assert a["global_step"] == b["global_step"] == 12
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for state_a, state_b in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert torch.equal(state_a["exp_avg"], state_b["exp_avg"]) and torch.equal(state_a["exp_avg_sq"], state_b["exp_avg_sq"])
    assert a["lr_schedulers"] == b["lr_schedulers"]


@pytest.fixture(scope="module")
def resume_root(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume") / "runs"
    root.mkdir()
    (root.parent / "tiny").symlink_to(tiny_model_dir)
    return root


@pytest.fixture(scope="module")
def clean_run(resume_root):
    result = run_talr(resume_config(resume_root, "clean"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(rows_trained(result)) == 12
    return result, checkpoints(resume_root / "clean")


def test_resuming_from_a_mid_epoch_checkpoint_gives_bitwise_the_same_weights(resume_root, clean_run):
    """Resume from a checkpoint written 2 batches into the second epoch; the run must see the same
    batches in the same order, and end with the same weights, optimizer and schedule."""
    clean, clean_dir = clean_run
    resumed = run_talr([*resume_config(resume_root, "mid-epoch"), "--ckpt_path", str(clean_dir / "epoch=1-step=8.ckpt")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stdout + resumed.stderr
    assert rows_trained(resumed) == rows_trained(clean)[8:]
    assert_same_final_state(clean_dir / "last.ckpt", checkpoints(resume_root / "mid-epoch") / "last.ckpt")


@pytest.mark.parametrize("kill, resumes_at", [
    ({"TALR_TEST_KILL_AT_STEP": "5"}, 4),  # between steps: the step-4 checkpoint is the newest
    # the 4th write is step 4's last.ckpt (after epoch=0-step=4.ckpt): step 2's last.ckpt must survive
    ({"TALR_TEST_KILL_IN_WRITE": "4"}, 2),
], ids=["between-steps", "during-checkpoint-write"])
def test_a_killed_run_resumes_with_ckpt_path_last_to_the_same_weights(resume_root, clean_run, kill, resumes_at):
    clean, clean_dir = clean_run
    name = "killed-" + next(iter(kill)).lower()
    killed = run_talr(resume_config(resume_root, name), **kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run_dir = checkpoints(resume_root / name)
    if "TALR_TEST_KILL_IN_WRITE" in kill:
        assert [p.name for p in run_dir.glob(".last.ckpt.tmp*")], "the interrupted write should have left its temporary file"
    assert torch.load(run_dir / "last.ckpt", weights_only=True)["global_step"] == resumes_at

    # the same command again, with --ckpt_path last: Lightning alone would look in a new logger version
    resumed = run_talr([*resume_config(resume_root, name), "--ckpt_path", "last"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming the run in {resume_root / name}/tb/version_0" in resumed.stdout + resumed.stderr
    assert rows_trained(resumed) == rows_trained(clean)[resumes_at:]
    assert sorted(p.name for p in (resume_root / name / "tb").iterdir()) == ["version_0"]  # logs continue in place
    assert_same_final_state(clean_dir / "last.ckpt", run_dir / "last.ckpt")


def test_a_checkpoint_carrying_pickled_code_is_refused(resume_root, tmp_path):
    """Checkpoints are loaded with weights_only=True: a pickle that would run code on load is rejected."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": RunsCodeOnUnpickle(str(marker))}, evil)
    result = run_talr([*resume_config(resume_root, "evil"), "--ckpt_path", str(evil)])
    assert result.returncode != 0
    assert "Weights only load failed" in result.stderr
    assert not marker.exists()


class RunsCodeOnUnpickle:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_results_of_an_earlier_run_are_never_overwritten_without_the_flag(tiny_model_dir, tmp_path):
    pinned = ["--trainer.logger.init_args.version", "0", "--model.loss", "CrossEntropy", "--trainer.max_steps", "1",
              "--model.generate", "true", "--model.max_new_tokens", "2", "--validate_before_fit", "true"]
    first = fit(tiny_model_dir, tmp_path, *pinned)  # quickstart.yaml: every result-writing callback
    log_dir = Path(first.trainer.log_dir)
    results = sorted(p for p in log_dir.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".json", ".parquet", ".safetensors"))
    assert {p.parent.name for p in results} >= {"generations", "forgetting", "token_probs", "export"}
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in results}

    with pytest.raises(FileExistsError, match=r"forgetting/responses.jsonl.* already hold.*ForgettingMonitor.overwrite: true"):
        fit(tiny_model_dir, tmp_path, *pinned)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in results} == before  # refused before any write

    # the same run resumed from its own checkpoint may rewrite its files, with no flag
    # (the first run ended its epoch at max_steps, so the resumed one goes into a second epoch)
    resumed = fit(tiny_model_dir, tmp_path, *pinned, "--trainer.max_steps", "2", "--trainer.max_epochs", "2",
                  "--ckpt_path", "last")
    export = log_dir / "export" / "model.safetensors"
    assert resumed.trainer.global_step == 2 and export.read_bytes() != before[export][0]
    assert not [p for p in export.parent.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]  # safetensors only

    # each guard has its own flag: the module's for generations, HFExport's for the export
    spec = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    spec["trainer"]["callbacks"] = [c for c in spec["trainer"]["callbacks"]
                                    if c["class_path"].split(".")[-1] in ("ModelCheckpoint", "HFExport")]
    lean = tmp_path / "lean.yaml"
    lean.write_text(yaml.safe_dump(spec))
    out = tmp_path / "lean-runs"
    fit(tiny_model_dir, out, *pinned, config=lean)
    with pytest.raises(FileExistsError, match=r"export already hold.*HFExport.overwrite: true"):
        fit(tiny_model_dir, out, *pinned, config=lean)
    with pytest.raises(FileExistsError, match=r"generations already hold.*model.overwrite_results: true"):
        fit(tiny_model_dir, out, *pinned, "--trainer.callbacks.init_args.overwrite", "true", config=lean)
    fit(tiny_model_dir, out, *pinned, "--model.overwrite_results", "true", "--trainer.callbacks.init_args.overwrite", "true",
        config=lean)


def test_no_eval_or_exec_anywhere_and_remote_code_is_off_by_default():
    """Model text is parsed, never evaluated; only the opt-in sandbox subprocess runs model code."""
    import ast
    import inspect

    from talr.models import load_model, load_tokenizer
    from talr.module import SFTModule

    sources = [*REPO.glob("talr/**/*.py"), *REPO.glob("callbacks/**/*.py"), REPO / "cli.py"]
    calls = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
                calls.append(f"{path.relative_to(REPO)}:{node.lineno} {node.func.id}()")
    assert len(sources) > 10 and calls == []
    for function in (SFTModule.__init__, load_model, load_tokenizer):
        assert inspect.signature(function).parameters["trust_remote_code"].default is False
