"""Checkpoints: written atomically, read without unpickling code, and the one place that reads them.

A crash during a write leaves the previous file usable; a checkpoint that carries pickled objects
(anything beyond tensors and plain containers) is refused instead of executed. Callbacks read a
model's weights from a checkpoint here, given the prefix under which the module keeps its causal
LM (`SFTModule.lm_prefix`), so no callback knows the module's attribute layout.
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


def lm_state_from_checkpoint(path: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """The causal LM's weights (keys without `prefix`) from a Lightning checkpoint, tensors only.

    A directory is a distributed checkpoint (ModelParallelStrategy's default): its shards are
    consolidated in this process, reading the model's tensors only (not the optimizer's).
    """
    if Path(path).is_dir():
        return _lm_state_from_distributed_checkpoint(Path(path), prefix)
    # mapped, not read: only the model's tensors are paged in, not the optimizer's state (twice the
    # weights), which would otherwise sit in memory beside the live model and optimizer at fit end
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{path}: no '{prefix}*' weights; is this a talr SFTModule checkpoint?")
    return state


def _lm_state_from_distributed_checkpoint(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(path)
    flat = "state_dict." + prefix  # Lightning saves {"state_dict": ..., "optimizer_0": ...}, flattened
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in reader.read_metadata().state_dict_metadata.items()
        if key.startswith(flat) and isinstance(meta, dcp.TensorStorageMetadata)
    }
    if not state:
        raise ValueError(f"{path}: no '{prefix}*' weights; is this a talr SFTModule checkpoint?")
    dcp.load(state, storage_reader=reader, no_dist=True)  # one process reads every shard
    return {key[len(flat):]: value for key, value in state.items()}


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A (possibly sharded) model's full weights on CPU on rank 0 (empty elsewhere); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def check_checkpoint_fits(mine: dict[str, torch.Tensor], checkpoint: dict[str, Any], model_name: str) -> None:
    """Refuse a checkpoint of another model before any weight is touched, naming both models."""
    theirs = checkpoint.get("state_dict", {})
    source = checkpoint.get("hyper_parameters", {}).get("model", "an unknown model")
    missing = sorted(set(mine) - set(theirs))
    shapes = [k for k in mine if k in theirs and tuple(theirs[k].shape) != tuple(mine[k].shape)]
    if missing or shapes:
        detail = (f"tensor {shapes[0]} has shape {tuple(theirs[shapes[0]].shape)} there, "
                  f"{tuple(mine[shapes[0]].shape)} here" if shapes else f"it lacks {missing[0]}")
        raise ValueError(
            f"the checkpoint was trained from {source!r} and does not fit model.model={model_name!r}: "
            f"{detail} ({len(missing)} missing, {len(shapes)} of another shape)"
        )
