"""Two CPU processes (DDP over gloo): results that must not depend on the process count."""

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def talr_fit(model_dir, out, cache, *extra):
    command = [
        str(Path(sys.executable).with_name("talr")), "fit", "--config", str(REPO / "configs" / "quickstart.yaml"),
        "--model.model", str(model_dir), "--model.loss", "flow", "--model.loss_options", "{}",
        "--model.generate", "false", "--validate_before_fit", "false",
        "--data.task.init_args.num_synthetic", "20", "--data.val_size", "4",
        "--data.batch_size", "2", "--data.micro_batch_size", "2", "--data.eval_batch_size", "3",
        "--trainer.max_steps", "1", "--trainer.accelerator", "cpu",
        "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out), *extra,
    ]
    env = {**os.environ, "TALR_CACHE": str(cache)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    files = list((cache / "flow").glob("*.pt"))
    assert len(files) == 1
    return torch.load(files[0], weights_only=True)


def test_flow_prepass_under_ddp_scores_each_row_once_and_matches_one_process(tiny_model_dir, tmp_path):
    single = talr_fit(tiny_model_dir, tmp_path / "one", tmp_path / "cache1")
    sharded = talr_fit(tiny_model_dir, tmp_path / "two", tmp_path / "cache2",
                       "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert not torch.isnan(single).any() and single.shape == (16,)
    # each rank scored its own shard (rank r: rows r, r+2, ...), in other batches: equal to float tolerance
    torch.testing.assert_close(sharded, single, rtol=1e-5, atol=1e-6)
