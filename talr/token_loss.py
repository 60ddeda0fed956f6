"""Per-target-token negative log-likelihood from hidden states (pure torch).

Only positions whose next-token label is a target are projected onto the vocabulary: on MedCalc
most tokens are prompt, so this skips most of the largest matmul and the full logits tensor.
With `chunk_size`, even the target positions' logits exist one chunk at a time (see
`ChunkedLinearNLL`), for long targets and large vocabularies.
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
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NLL of every target token, in float32, and the batch row each token belongs to.

    hidden: [B, T, H] final hidden states; head_weight: [V, H]; labels: [B, T] with IGNORE_INDEX
    outside targets (labels are the input ids, unshifted). Returns (nll [N], seq_index [N]), plus
    the float32 logits at target positions [N, V] when `return_logits`. `chunk_size` bounds the
    logits held at once to [chunk_size, V] (forward and backward); it cannot return logits.
    """
    mask, targets = shift_targets(labels)
    seq_index = mask.nonzero(as_tuple=True)[0]
    if chunk_size:
        if return_logits:
            raise ValueError("the chunked loss never holds all logits; this strategy needs them (set no chunk size)")
        return ChunkedLinearNLL.apply(hidden[mask], head_weight, bias, targets, chunk_size, logit_softcap), seq_index
    logits = _at_least_float32(F.linear(hidden[mask], head_weight, bias))
    if logit_softcap:  # Gemma-style final logit soft-capping, as the model's own forward does
        logits = torch.tanh(logits / logit_softcap) * logit_softcap
    nll = F.cross_entropy(logits, targets, reduction="none")
    return (nll, seq_index, logits) if return_logits else (nll, seq_index)


class ChunkedLinearNLL(torch.autograd.Function):
    """Per-token NLL of `hidden @ weight.T + bias` without the [N, V] logits tensor.

    Forward keeps only each token's log-sum-exp; backward recomputes one chunk of logits at a time.
    The output is the per-token NLL vector, so any weighting computed from it (TALR's exp(-l/tau),
    DFT's p, FLOW's sequence weights: all detached) reaches backward as the incoming gradient: the
    weights need every loss first, and the forward pass has them all before backward starts.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, softcap):  # noqa: D102 (autograd API)
        nll = torch.empty(hidden.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        lse = torch.empty_like(nll)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = _chunk_logits(hidden[rows], weight, bias, softcap)[0]
            lse[rows] = torch.logsumexp(logits, dim=-1)
            nll[rows] = lse[rows] - logits.gather(1, targets[rows, None]).squeeze(1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size, ctx.softcap = chunk_size, softcap
        return nll

    @staticmethod
    def backward(ctx, grad_nll):  # noqa: D102
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # float32 accumulators: summing chunk products in bfloat16 would round at every chunk
        work = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros(weight.shape, dtype=work, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=work, device=bias.device) if need_bias else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            logits, capped = _chunk_logits(hidden[rows], weight, bias, ctx.softcap)
            # d nll / d logits = softmax - onehot(target), times the incoming per-token gradient
            grad = torch.exp(logits - lse[rows, None])
            grad[torch.arange(grad.shape[0], device=grad.device), targets[rows]] -= 1.0
            grad *= grad_nll[rows, None].to(grad.dtype)
            if capped is not None:  # through cap * tanh(x / cap)
                grad *= 1.0 - capped * capped
            grad = grad.to(hidden.dtype)
            if need_hidden:
                grad_hidden[rows] = grad @ weight
            if need_weight:
                grad_weight.addmm_(grad.t().to(work), hidden[rows].to(work))
            if need_bias:
                grad_bias += grad.to(work).sum(0)
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if need_weight else None,
            grad_bias.to(bias.dtype) if need_bias else None,
            None, None, None,
        )


# Temperatures on which held-out NLL is calibrated: 2^(k/8) for k = -16..16 (0.25 to 4). A model that
# only sharpens or flattens by a power of 2^(1/8) keeps its calibrated NLL exactly on this grid; in
# between, the grid's NLL is within a fraction of a percent of the continuous optimum (convex in 1/T).
CALIBRATION_TEMPERATURES = tuple(2.0 ** (k / 8) for k in range(-16, 17))


@torch.no_grad()
def target_token_statistics(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    logit_softcap: float | None = None,
    temperatures: tuple[float, ...] = CALIBRATION_TEMPERATURES,
    chunk_size: int = 1024,
    choices: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per target token, in float32 and without grad, one chunk of [chunk_size, V] logits at a time:

    `nll`, `targets`, `argmax` (the model's top-1 token), `entropy` (nats, at temperature 1),
    `nll_at_temperature` [N, K] (the NLL under softmax(logits / T) for each T of `temperatures`),
    and `seq_index`; with `choices` (C token ids), also `choice_logprobs` [N, C]: each choice token's
    log-probability at temperature 1. Inputs as `target_token_nll`.
    """
    mask, targets = shift_targets(labels)
    picked = hidden[mask]
    inverse = [1.0 / t for t in temperatures]
    scales = torch.tensor(inverse, dtype=torch.float32, device=hidden.device)
    parts: dict[str, list[torch.Tensor]] = {"nll": [], "argmax": [], "entropy": [], "nll_at_temperature": []}
    if choices is not None:
        parts["choice_logprobs"] = []
    for start in range(0, picked.shape[0], chunk_size):
        logits, _ = _chunk_logits(picked[start:start + chunk_size], head_weight, bias, logit_softcap)
        target = targets[start:start + chunk_size]
        parts["argmax"].append(logits.argmax(dim=-1))
        # everything below from d = logits - max (<= 0): logsumexp(s z) - s z_t = log sum exp(s d) - s d_t
        logits -= logits.max(dim=-1, keepdim=True).values
        target_d = logits.gather(1, target[:, None])[:, 0]
        sums, tilted = _exp_sums(logits, (1.0, *inverse))
        log_z = sums[:, 0].log()
        parts["nll"].append(log_z - target_d)
        parts["entropy"].append(log_z - tilted / sums[:, 0])  # H = log Z - E_p[d]
        parts["nll_at_temperature"].append(sums[:, 1:].log() - target_d[:, None] * scales.to(sums.dtype))
        if choices is not None:
            parts["choice_logprobs"].append(logits[:, choices.to(logits.device)] - log_z[:, None])
    out = {k: torch.cat(v) if v else torch.empty(0) for k, v in parts.items()}
    if not parts["nll"]:
        out["nll_at_temperature"] = torch.empty(0, len(temperatures))
        if choices is not None:
            out["choice_logprobs"] = torch.empty(0, len(choices))
    out.update(targets=targets, seq_index=mask.nonzero(as_tuple=True)[0])
    return out


def _exp_sums(shifted: torch.Tensor, scales: tuple[float, ...], rows: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_v exp(s * d_v) for each scale s (columns), and sum_v exp(d_v) * d_v, of `shifted` logits d.
    A few rows at a time into one reused buffer: the block stays in cache across the scales, about 6x
    faster on a CPU than a logsumexp per temperature over the whole chunk."""
    sums = shifted.new_empty(shifted.shape[0], len(scales))
    tilted = shifted.new_empty(shifted.shape[0])
    buffer = shifted.new_empty(min(rows, shifted.shape[0]), shifted.shape[1])
    for start in range(0, shifted.shape[0], rows):
        block = shifted[start:start + rows]
        work = buffer[: block.shape[0]]
        for k, scale in enumerate(scales):
            torch.mul(block, scale, out=work).exp_()
            sums[start:start + rows, k] = work.sum(-1)
            if k == 0:  # scale 1: also the entropy's sum exp(d) * d
                tilted[start:start + rows] = work.mul_(block).sum(-1)
    return sums, tilted


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits of a chunk in at least float32 (as the unchunked path computes them), and tanh(x / cap)."""
    logits = _at_least_float32(F.linear(hidden, weight, bias))
    if not softcap:
        return logits, None
    capped = torch.tanh(logits / softcap)
    return capped * softcap, capped


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def sequence_mean_losses(nll: torch.Tensor, seq_index: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """Detached mean token NLL of each of `num_seqs` rows; NaN for a row without target tokens."""
    nll = nll.detach().to(torch.promote_types(nll.dtype, torch.float32))
    counts = torch.zeros(num_seqs, dtype=nll.dtype, device=nll.device).index_add_(0, seq_index, torch.ones_like(nll))
    sums = torch.zeros(num_seqs, dtype=nll.dtype, device=nll.device).index_add_(0, seq_index, nll)
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, float("nan")))
