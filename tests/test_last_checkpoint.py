"""`last.ckpt` is the latest training state, not a copy of the best one.

Lightning 2.6's `ModelCheckpoint(save_last=True)` writes `last.ckpt` only at a step where it also
saved a top-k checkpoint, so with `save_top_k: 1` it held the best step and `--ckpt_path last`
(and `talr sweep`'s restart) went back to it. The configs now keep the best checkpoint with one
ModelCheckpoint and write `last.ckpt` at every validation with a second, unmonitored one.
"""

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from cli import build_cli
from talr.experiments.sweep import has_last_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml")
                 if any(c.get("class_path", "").endswith("ModelCheckpoint")
                        for c in ((yaml.safe_load(p.read_text()) or {}).get("trainer") or {}).get("callbacks") or []))


class RecordTrainStart(L.Callback):
    """The global step training starts from (after any checkpoint was restored)."""

    started_at: list[int] = []

    def on_train_start(self, trainer, pl_module):
        type(self).started_at.append(trainer.global_step)


def checkpoint_callbacks(config: Path) -> list[dict]:
    callbacks = yaml.safe_load(config.read_text())["trainer"]["callbacks"]
    return [c.get("init_args") or {} for c in callbacks if c["class_path"] == "lightning.pytorch.callbacks.ModelCheckpoint"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_keeps_the_best_first_and_writes_last_ckpt_from_an_unmonitored_second_checkpoint(config):
    best, *others = checkpoint_callbacks(config)
    # trainer.checkpoint_callback (HFExport, WiSE-FT, GeneralBenchmarks, RunSummary read its best) is the first one
    assert best.get("monitor") and best.get("save_top_k") == 1 and not best.get("save_last")
    assert others == [{"monitor": None, "filename": "last", "enable_version_counter": False}]


def test_last_ckpt_holds_the_final_step_while_the_best_checkpoint_stays_at_the_earlier_one(tiny_model_dir, tmp_path):
    # quickstart.yaml's two checkpoint callbacks, the best one following a metric that is guaranteed to get
    # worse: the global step, minimised, is best at the first validation and worse at every later one
    spec = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    spec["trainer"]["callbacks"] = [c for c in spec["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    spec["trainer"]["callbacks"][0]["init_args"].update(monitor="step", mode="min")
    spec["trainer"]["callbacks"].append({"class_path": "test_last_checkpoint.RecordTrainStart"})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(spec))
    RecordTrainStart.started_at = []

    def fit(*extra):
        # 20 generated rows, 4 held out: 16 training rows, 4 steps of 4 an epoch; a validation every 2 steps
        return build_cli([
            "fit", "--config", str(config), "--model.model", str(tiny_model_dir), "--model.loss", "CrossEntropy",
            "--model.generate", "false", "--validate_before_fit", "false", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--data.task.init_args.num_synthetic", "20",
            "--data.val_size", "4", "--data.batch_size", "4", "--data.micro_batch_size", "4",
            "--trainer.val_check_interval", "2", "--trainer.max_epochs", "2",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path), *extra])

    first = fit("--trainer.max_steps", "4")  # validations after steps 2 and 4
    ckpt_dir = Path(first.trainer.log_dir) / "checkpoints"
    assert first.trainer.checkpoint_callback.monitor == "step"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best-step2-acc0.000.ckpt", "last.ckpt"]  # nothing per validation
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == 4
    assert torch.load(ckpt_dir / "best-step2-acc0.000.ckpt", weights_only=True)["global_step"] == 2
    assert has_last_checkpoint(tmp_path)

    # each callback's state under its own key: the best one's is not overwritten by the last one's
    states = torch.load(ckpt_dir / "last.ckpt", weights_only=True)["callbacks"]
    kept = sorted(Path(s["best_model_path"]).name for k, s in states.items() if k.startswith("ModelCheckpoint"))
    assert kept == ["best-step2-acc0.000.ckpt", "last.ckpt"]

    resumed = fit("--trainer.max_steps", "6", "--ckpt_path", "last")  # epoch 2's second step validates at step 6
    assert Path(resumed.trainer.ckpt_path) == ckpt_dir / "last.ckpt" and Path(resumed.trainer.log_dir) / "checkpoints" == ckpt_dir
    assert RecordTrainStart.started_at == [0, 4]
    assert resumed.trainer.global_step == 6
    best = resumed.trainer.checkpoint_callback
    assert Path(best.best_model_path).name == "best-step2-acc0.000.ckpt" and best.best_model_score.item() == 2
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best-step2-acc0.000.ckpt", "last.ckpt"]
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == 6
