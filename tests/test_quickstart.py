"""`make quickstart` twice in one clone: configs/quickstart.yaml (its memory budget and every callback)
through `talr fit` twice from the same directory, with the tiny model and a few rows. The second run
writes a new logger version without refusing, loads the initial model's numbers from the cache, leaves
the first run's files alone, and its last lines name its own directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = ("summary.json", "export/model.safetensors", "checkpoints/last.ckpt", "forgetting/responses.jsonl",
           "forgetting/curve.json", "generations/val_step000000.jsonl", "token_probs/step_000000.parquet")


def quickstart(tiny_model_dir: Path, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "cli", "fit", "--config", str(REPO / "configs" / "quickstart.yaml"),
            "--model.model", str(tiny_model_dir), "--model.max_new_tokens", "4",
            "--data.task.init_args.num_synthetic", "16", "--data.val_size", "4", "--data.batch_size", "4",
            "--data.max_length", "384", "--trainer.enable_progress_bar", "false"]
    env = {**os.environ, "TALR_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def talr_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("[")]


def test_the_quickstart_twice_in_one_directory(tiny_model_dir, tmp_path):
    runs = tmp_path / "runs" / "quickstart" / "tensorboard"
    first = quickstart(tiny_model_dir, tmp_path, tmp_path / "cache")
    kept = {p: p.read_bytes() for p in (runs / "version_0").rglob("*") if p.is_file()}
    assert all((runs / "version_0" / name).is_file() for name in RESULTS)

    second = quickstart(tiny_model_dir, tmp_path, tmp_path / "cache")
    assert all((runs / "version_1" / name).is_file() for name in RESULTS)
    assert {p: p.read_bytes() for p in (runs / "version_0").rglob("*") if p.is_file()} == kept  # untouched

    lines = talr_lines(second)
    assert any(line.startswith("[talr] memory budget 3.5 GiB: micro-batch") for line in talr_lines(first))
    assert any(line.startswith("[cache] validation of the initial model loaded") for line in lines)
    assert any(line.startswith("[cache] forgetting of the initial model loaded") for line in lines)
    assert not any(line.startswith("[cache]") for line in talr_lines(first))  # the first run computed them
    # the run's last lines: its peak memory and its own, new directory
    assert lines[-3].startswith("[talr] peak memory ") and "GiB (the process's peak resident set)" in lines[-3]
    assert lines[-2] == "[talr] this run's logs, checkpoints, generations and export: runs/quickstart/tensorboard/version_1"
    assert lines[-1] == "[talr] plots: tensorboard --logdir runs/quickstart/tensorboard/version_1"
    # the cached first validation wrote what the computed one did
    same = ("generations/val_step000000.jsonl", "forgetting/responses.jsonl")
    assert all((runs / "version_1" / name).read_bytes() == kept[runs / "version_0" / name] for name in same)
