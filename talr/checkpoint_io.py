"""Checkpoints written atomically and read without unpickling code.

A crash during a write leaves the previous file usable; a checkpoint that carries pickled objects
(anything beyond tensors and plain containers) is refused instead of executed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file beside the target, fsync, then one rename.

    Lightning's default writes the target in place, so a crash mid-write (a killed job, a full
    disk) leaves a truncated `last.ckpt` that the resume then fails on. Remote paths (fsspec URLs)
    fall back to the default writer.
    """

    def load_checkpoint(self, path: str | Path, *args: Any, weights_only: bool | None = None, **kwargs: Any) -> dict[str, Any]:
        # Lightning passes None, which torch resolves per version and Lightning turns into False
        # for remote files: be explicit, a checkpoint is data and must not run code.
        return super().load_checkpoint(path, *args, weights_only=True if weights_only is None else weights_only, **kwargs)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        get_filesystem(target).makedirs(str(target.parent), exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def latest_logger_version(save_dir: str | Path, name: str | None) -> str | None:
    """The logger version directory holding the newest `last*.ckpt` under `save_dir/name`.

    `--ckpt_path last` only searches the checkpoint directory of the run being started, which a
    versioned logger (TensorBoard, CSV) makes a fresh `version_N`: without this, a resumed job
    would silently start over in a new directory.
    """
    root = Path(save_dir) / (name or "")
    newest: tuple[float, str] | None = None
    for candidate in root.glob("*/checkpoints/last*.ckpt"):
        if candidate.stem == "last" or candidate.stem.startswith("last-"):
            stamp = (candidate.stat().st_mtime, candidate.parent.parent.name)
            newest = max(newest, stamp) if newest else stamp
    return newest[1] if newest else None
