"""FLOW's pre-pass: the initial model's mean target loss of every training sequence, cached on disk.

FLOW (`talr.losses.FLOW`) weights each sequence by exp(-loss / tau) with the losses of the initial
model, fixed for the whole run. They take one forward pass over the training set, so they are kept
under the talr cache keyed by the model and the exact token ids: a rerun, or another strategy's run
on the same data, skips the pass.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from talr.data import Example
from talr.losses import flow_weights
from talr.models import cache_dir
from talr.scoring import score_examples


def initial_sequence_losses(
    net: nn.Module, examples: Sequence[Example], num_rows: int, pad_id: int, batch_size: int,
    device: torch.device | str, model_key: str, write_cache: bool,
) -> torch.Tensor:
    """Mean target NLL of each training row under `net` ([num_rows], NaN for a row left out of the data).

    Every rank scores a share and gets all results; `write_cache` on one rank only. `model_key` names
    the weights (model, dtype, adapters) for the cache key.
    """
    digest = hashlib.sha256(model_key.encode())
    for e in examples:
        digest.update(repr((e.input_ids, e.prompt_len)).encode())
    path = cache_dir() / "flow" / f"{digest.hexdigest()[:24]}.pt"
    if path.is_file():
        rank_zero_info(f"[flow] sequence losses of the initial model loaded from {path}")
        return torch.load(path, map_location="cpu", weights_only=True)
    scored = score_examples(net, examples, pad_id, batch_size, device, shard=True, desc="flow: initial-model losses")
    losses = torch.full((num_rows,), float("nan"))  # weights are looked up by row, not position
    for example, scores in zip(examples, scored):
        losses[example.row_index] = scores.nll.double().mean().float() if scores.nll.numel() else float("nan")
    if write_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(losses, tmp)
        os.replace(tmp, path)
    return losses


def flow_sequence_weights(net: nn.Module, datamodule: Any, pad_id: int, device: torch.device | str, model_key: str,
                          write_cache: bool, tau: float | None) -> torch.Tensor:
    """FLOW's static weight of every training row of `datamodule`: the initial model's losses (cached),
    then `talr.losses.flow_weights` (tau: fixed, or None for the training set's median)."""
    examples = datamodule.datasets["train"].examples
    losses = initial_sequence_losses(net, examples, len(datamodule.rows("train")), pad_id, datamodule.eval_batch_size,
                                     device, model_key, write_cache)
    weights, tau_used = flow_weights(losses, tau)
    rank_zero_info(f"[flow] tau = {float(tau_used):.4f}, mean weight {float(weights.mean()):.4f} over {len(weights)} sequences")
    return weights
