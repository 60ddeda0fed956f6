"""Disk caches of what the initial model computes the same way in every run of a setup: its first
validation (validate-before-fit: target-token sums and generations) and the forgetting monitor's
answers to the general prompts with their initial scores.

An entry's key is a digest of everything that determines it: the weights' values (`weights_fingerprint`,
so a changed checkpoint or a fine-tuned model never hits an entry of another), the device type, the
torch and transformers versions, talr's own source (any change to the code that computes an entry
starts a new one), and the inputs (token ids, batch sizes, generation settings) that the caller names. What a cheap step derives from an entry (verdicts of a task's scorer, summaries) is
computed again on every load, so a fixed scorer applies to cached generations at once.
Entries live under `$TALR_CACHE/initial/<kind>/<digest>.pt` (talr.models.cache_dir), written
atomically and read with `weights_only=True`. Remove the directory to start cold.
"""

from __future__ import annotations

import hashlib
import io
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from talr.models import cache_dir, is_peft
from talr.results import write_atomic


def weights_fingerprint(model: nn.Module) -> str:
    """A digest of every parameter's and buffer's name, shape, dtype and bytes (CRC-32 per tensor:
    about half a second for a 135M float32 model on one CPU core), over `computing_tensors`."""
    digest = hashlib.sha256()
    for name, tensor in computing_tensors(model):
        data = tensor.detach()
        data = getattr(data, "full_tensor", lambda: data)()  # an FSDP2 shard: its whole tensor
        data = data.cpu().contiguous().reshape(-1)
        crc = zlib.crc32(memoryview(data.view(torch.uint8).numpy())) if data.numel() else 0
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{crc:08x};".encode())
    return digest.hexdigest()


def computing_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The named parameters and buffers that determine the model's outputs. A peft LoRA model whose
    adapters are all inert (every B matrix zero, as peft initializes them, and no DoRA magnitude, whose
    renormalisation is not exact) adds exact zeros to its base layers' outputs, so it computes what its
    base model computes, bit for bit: it is named by the base model's tensors under the base model's
    names, and a LoRA run shares the initial numbers of plain runs of the same weights."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    if not is_peft(model):
        return tensors
    adapters = [(name, tensor) for name, tensor in tensors if ".lora_" in name]
    inert = not any("lora_magnitude_vector" in name for name, _ in adapters) and not any(
        bool(tensor.detach().any()) for name, tensor in adapters if ".lora_B." in name or ".lora_embedding_B." in name)
    if not inert:
        return tensors
    return [(name.removeprefix("base_model.model.").replace(".base_layer.", "."), tensor)
            for name, tensor in tensors if ".lora_" not in name]


@lru_cache(maxsize=None)
def source_digest(*paths: str) -> str:
    """A digest of source files, and of every .py file under a directory among them."""
    digest = hashlib.sha256()
    for path in map(Path, paths):
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def cache_key(model: nn.Module, device: torch.device, *inputs: Any) -> str:
    """The entry's name: the weights, where and with which libraries and which talr they compute, and
    `inputs` (anything with a stable repr: token id lists, settings; a caller outside talr adds
    `source_digest(__file__)`)."""
    import transformers

    digest = hashlib.sha256(weights_fingerprint(model).encode())
    environment = (torch.device(device).type, torch.__version__, transformers.__version__,
                   source_digest(str(Path(__file__).parent)))
    digest.update(repr((environment, inputs)).encode())
    return digest.hexdigest()[:32]


def is_fresh_single_process_run(trainer: Any) -> bool:
    """Training starts now from the initial weights, in one process: where callbacks may use the cache
    (a resumed run keeps its own numbers in its checkpoint; several ranks would race for the files)."""
    return trainer.global_step == 0 and trainer.ckpt_path is None and trainer.world_size == 1


def cache_path(kind: str, key: str) -> Path:
    return cache_dir() / "initial" / kind / f"{key}.pt"


def load_cached(kind: str, key: str) -> Any | None:
    """The stored entry, or None when there is none (or it cannot be read: it is then computed again)."""
    path = cache_path(kind, key)
    if not path.is_file():
        return None
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: a cache miss, said once
        rank_zero_info(f"[cache] ignoring unreadable {path}: {error}")
        return None
    rank_zero_info(f"[cache] {kind} of the initial model loaded from {path}")
    return value


def store_cached(kind: str, key: str, value: Any) -> Path:
    """Write an entry (tensors, lists, dicts, numbers, strings) atomically."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return write_atomic(cache_path(kind, key), buffer.getvalue())
