"""Per-target-token negative log-likelihood from hidden states (pure torch).

Only positions whose next-token label is a target are projected onto the vocabulary: on MedCalc
most tokens are prompt, so this skips most of the largest matmul and the full logits tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions that predict a target token, and those tokens.

    Position t predicts labels[t + 1]. Returns (mask over hidden positions [B, T], targets [N]).
    """
    next_labels = torch.full_like(labels, IGNORE_INDEX)
    next_labels[:, :-1] = labels[:, 1:]
    mask = next_labels != IGNORE_INDEX
    return mask, next_labels[mask]


def target_token_nll(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    logit_softcap: float | None = None,
    return_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NLL of every target token, in float32, and the batch row each token belongs to.

    hidden: [B, T, H] final hidden states; head_weight: [V, H]; labels: [B, T] with IGNORE_INDEX
    outside targets (labels are the input ids, unshifted). Returns (nll [N], seq_index [N]), plus
    the float32 logits at target positions [N, V] when `return_logits`.
    """
    mask, targets = shift_targets(labels)
    seq_index = mask.nonzero(as_tuple=True)[0]
    logits = F.linear(hidden[mask], head_weight, bias).float()
    if logit_softcap:  # Gemma-style final logit soft-capping, as the model's own forward does
        logits = torch.tanh(logits / logit_softcap) * logit_softcap
    nll = F.cross_entropy(logits, targets, reduction="none")
    return (nll, seq_index, logits) if return_logits else (nll, seq_index)


def sequence_mean_losses(nll: torch.Tensor, seq_index: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """Detached mean token NLL of each of `num_seqs` rows; NaN for a row without target tokens."""
    nll = nll.detach().to(torch.promote_types(nll.dtype, torch.float32))
    counts = torch.zeros(num_seqs, dtype=nll.dtype, device=nll.device).index_add_(0, seq_index, torch.ones_like(nll))
    sums = torch.zeros(num_seqs, dtype=nll.dtype, device=nll.device).index_add_(0, seq_index, nll)
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, float("nan")))
