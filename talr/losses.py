"""Loss strategies: per-target-token NLL in, a weighted sum out (pure torch).

Every strategy returns a SUM over target tokens. The module divides it by the number of target
tokens of the whole optimizer step (all micro-batches, all ranks), so gradient accumulation and
data parallelism give the gradient of one large batch for every strategy.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from talr.token_loss import sequence_mean_losses


@dataclass
class LossOutput:
    total: torch.Tensor  # weighted sum over the micro-batch's target tokens
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached, for logging


class LossStrategy(ABC):
    """Turns per-token NLL into a weighted sum. Subclasses register under `name`."""

    name: ClassVar[str]

    @property
    def uses_step_losses(self) -> bool:
        """True when the strategy needs every sequence's mean loss of the whole optimizer step
        (all micro-batches, all ranks) before weighting any token; the module then provides them."""
        return False

    @abstractmethod
    def __call__(
        self, nll: torch.Tensor, seq_index: torch.Tensor, num_seqs: int, step_seq_losses: torch.Tensor | None = None
    ) -> LossOutput:
        """nll: [N] target-token NLL; seq_index: [N] batch row of each token; num_seqs: rows;
        step_seq_losses: mean token loss of every sequence of the step, when `uses_step_losses`."""


LOSSES: dict[str, type[LossStrategy]] = {}


def register(cls: type[LossStrategy]) -> type[LossStrategy]:
    LOSSES[cls.name] = cls
    return cls


def build_loss(name: str, options: dict[str, Any] | None = None) -> LossStrategy:
    """The strategy registered as `name`, with its options checked against its signature."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of: {', '.join(sorted(LOSSES))}")
    cls = LOSSES[name]
    options = dict(options or {})
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"loss {name!r} has no option(s) {', '.join(unknown)}; its options are: {', '.join(sorted(accepted)) or 'none'}"
        )
    return cls(**options)


@register
class CrossEntropy(LossStrategy):
    """Plain SFT: every target token weighs 1."""

    name = "ce"

    def __call__(
        self, nll: torch.Tensor, seq_index: torch.Tensor, num_seqs: int, step_seq_losses: torch.Tensor | None = None
    ) -> LossOutput:
        return LossOutput(nll.sum())


@register
class TALR(LossStrategy):
    """Token-Adaptive Loss Reweighting.

    w_i = max(exp(-l_i / tau), w_min), detached, so confident tokens (high p_i) keep their full
    gradient and hard tokens, which pull the model furthest from its prior, are damped. tau is the
    median over the batch's sequences of each sequence's mean token loss, recomputed every step;
    a fixed `tau` reproduces the paper's ablation. w_min keeps hard tokens learning.

    tau_scope `global` takes the median over the whole optimizer step (all micro-batches and
    ranks), so tau does not depend on how the batch is split; `local` over each micro-batch.
    """

    name = "talr"

    def __init__(
        self,
        w_min: float = 0.01,
        tau: float | None = None,
        tau_scope: str = "global",
        tau_floor: float = 1e-6,
    ) -> None:
        if tau_scope not in ("global", "local"):
            raise ValueError(f"talr: tau_scope must be 'global' or 'local', got {tau_scope!r}")
        if not 0.0 < w_min <= 1.0:
            raise ValueError(f"talr: w_min must be in (0, 1], got {w_min} (0 would ignore hard tokens)")
        if tau is not None and tau <= 0:
            raise ValueError(f"talr: a fixed tau must be positive, got {tau}")
        if tau_floor <= 0:
            raise ValueError(f"talr: tau_floor must be positive, got {tau_floor}")
        self.w_min = w_min
        self.tau = tau
        self.tau_scope = tau_scope
        self.tau_floor = tau_floor

    @property
    def uses_step_losses(self) -> bool:
        return self.tau is None and self.tau_scope == "global"

    @staticmethod
    def median(seq_losses: torch.Tensor) -> torch.Tensor:
        """Median of per-sequence mean losses; NaN marks a sequence without target tokens."""
        seq_losses = seq_losses[~torch.isnan(seq_losses)]
        if seq_losses.numel() == 0:
            return torch.ones((), dtype=seq_losses.dtype, device=seq_losses.device)
        # quantile(0.5) averages the two middle values for an even count, like numpy's median.
        return torch.quantile(seq_losses, 0.5)

    def weights(self, nll: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        # The floor keeps a zero tau (every sequence already perfect) from dividing by zero.
        return torch.exp(-nll.detach() / tau.clamp_min(self.tau_floor)).clamp_min(self.w_min)

    def __call__(
        self, nll: torch.Tensor, seq_index: torch.Tensor, num_seqs: int, step_seq_losses: torch.Tensor | None = None
    ) -> LossOutput:
        if self.tau is not None:
            tau = nll.new_tensor(self.tau)
        elif step_seq_losses is not None and self.uses_step_losses:
            tau = self.median(step_seq_losses)
        else:
            tau = self.median(sequence_mean_losses(nll, seq_index, num_seqs))
        w = self.weights(nll, tau)
        metrics = {"tau": tau.detach()}
        if nll.numel():
            metrics["weight_mean"] = w.mean()
            metrics["cutoff_share"] = (w <= self.w_min).float().mean()
        return LossOutput((w * nll).sum(), metrics)
