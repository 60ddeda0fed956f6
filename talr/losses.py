"""Loss strategies: per-target-token NLL in, a weighted sum out (pure torch).

Every strategy returns a SUM over target tokens. The module divides it by the number of target
tokens of the whole optimizer step (all micro-batches, all ranks), so gradient accumulation and
data parallelism give the gradient of one large batch for every strategy.

Token strategies (CrossEntropy, TALR, DFT, FLOW, EAFT, SelectiveTokenMasking, Rho1) weight token losses. Regularisers (L2Anchor,
KLToInitial) wrap a token strategy (`base`) and add a term, so "TALR + KL" is a config, not a class.
Configs name a strategy as a typed object, `loss: {class_path: talr.losses.TALR, init_args: {w_min: 0.01}}`
or `--model.loss TALR --model.loss.w_min 0.01`; the options are the `__init__` arguments, documented
in each class's `Args:` (`talr fit --model.loss.help TALR`).
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from dataclasses import astuple, dataclass, field
from typing import Any, ClassVar, Literal, Sequence

import torch
import torch.nn.functional as F

from talr.token_loss import sequence_mean_losses


@dataclass
class TokenBatch:
    """What a strategy may use about one micro-batch's target tokens; the module fills the
    optional fields only for strategies that ask for them."""

    nll: torch.Tensor  # [N] target-token NLL (with grad)
    seq_index: torch.Tensor  # [N] batch row of each token
    num_seqs: int
    step_seq_losses: torch.Tensor | None = None  # mean loss of every sequence of the optimizer step
    seq_weights: torch.Tensor | None = None  # [num_seqs] static per-sequence weights (FLOW)
    ref_nll: torch.Tensor | None = None  # [N] the reference model's NLL of the same tokens (KL, STM, Rho-1)
    logits: torch.Tensor | None = None  # [N, V] model logits at target positions (exact KL)
    ref_logits: torch.Tensor | None = None  # [N, V] the initial model's logits there


@dataclass
class LossOutput:
    total: torch.Tensor  # weighted sum over the micro-batch's target tokens
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached, for logging
    # [N] each target token's detached share of `total` (they sum to it): lets the module report the
    # loss of a subset of tokens (replay vs domain rows) without the strategy knowing of subsets
    token_losses: torch.Tensor | None = None

    @classmethod
    def of_tokens(cls, token_losses: torch.Tensor, metrics: dict[str, torch.Tensor] | None = None) -> LossOutput:
        """The output of a strategy whose total is the sum of its per-token losses."""
        return cls(token_losses.sum(), metrics or {}, token_losses.detach())


@dataclass(frozen=True)
class Needs:
    """What a strategy asks the module for beyond the token NLL; the module computes only these."""

    reference: bool = False  # TokenBatch.ref_nll from the reference model (`model.reference`, default the initial model)
    logits: bool = False  # TokenBatch.logits (and ref_logits with `reference`)
    sequence_weights: bool = False  # TokenBatch.seq_weights from a pre-pass over the training set
    step_losses: bool = False  # TokenBatch.step_seq_losses: every sequence of the optimizer step, all ranks
    anchor: bool = False  # theta_0 kept, and `add_anchor_gradients` called once per step after backward

    def __or__(self, other: Needs) -> Needs:
        return Needs(*(mine or theirs for mine, theirs in zip(astuple(self), astuple(other))))


class LossStrategy(ABC):
    """Turns per-token NLL into a weighted sum.

    A subclass takes its options as `__init__` arguments, documented under `Args:` in its
    docstring (what `--model.loss.help` prints), and keeps each as an attribute of the same name,
    which is how `config()` writes it back as plain data.
    """

    name: ClassVar[str]  # short name in logged keys (train/<name>/tau) and the run summary's `loss`

    @property
    def needs(self) -> Needs:
        """Everything the module must provide to this strategy (for a regulariser: its base's too)."""
        return Needs()

    @property
    def token_strategy(self) -> LossStrategy:
        """The strategy that weights the tokens: itself; a regulariser's base."""
        return self

    @abstractmethod
    def __call__(self, batch: TokenBatch) -> LossOutput:
        """The weighted sum of the batch's token losses, and metrics to log."""

    def config(self) -> dict[str, Any]:
        """The strategy as plain data in the config form, `{class_path, init_args}` (what a
        checkpoint's hyperparameters hold; nested strategies nest)."""
        init_args = {}
        for option in inspect.signature(type(self).__init__).parameters.values():
            if option.name == "self" or option.kind in (option.VAR_POSITIONAL, option.VAR_KEYWORD):
                continue
            value = getattr(self, option.name)
            init_args[option.name] = value.config() if isinstance(value, LossStrategy) else value
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": init_args}

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.config()["init_args"])
        return f"{type(self).__name__}({options})"


class CrossEntropy(LossStrategy):
    """Plain SFT: every target token weighs 1 (no options)."""

    name = "ce"

    def __call__(self, batch: TokenBatch) -> LossOutput:
        return LossOutput.of_tokens(batch.nll)


class TALR(LossStrategy):
    """Token-Adaptive Loss Reweighting.

    w_i = max(exp(-l_i / tau), w_min), detached, so confident tokens (high p_i) keep their full
    gradient and hard tokens, which pull the model furthest from its prior, are damped.

    Args:
        w_min: floor of every token's weight, in (0, 1]: keeps the hardest tokens learning (0 would
            ignore them). The paper does not state its value; 0.01 is a re-implementation's.
        tau: a fixed temperature (the paper's ablation). None: the median over the batch's
            sequences of each sequence's mean token loss, recomputed every step.
        tau_scope: where that median is taken: `global` over the whole optimizer step (all
            micro-batches and ranks, so tau does not depend on how the batch is split; one extra
            no-grad forward per step with several micro-batches), `local` over each micro-batch.
        tau_floor: smallest tau used, so that a zero median (every sequence already perfect)
            does not divide by zero.
    """

    name = "talr"

    def __init__(
        self,
        w_min: float = 0.01,
        tau: float | None = None,
        tau_scope: Literal["global", "local"] = "global",
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
    def needs(self) -> Needs:
        return Needs(step_losses=self.tau is None and self.tau_scope == "global")

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

    def __call__(self, batch: TokenBatch) -> LossOutput:
        nll = batch.nll
        if self.tau is not None:
            tau = nll.new_tensor(self.tau)
        elif batch.step_seq_losses is not None and self.needs.step_losses:
            tau = self.median(batch.step_seq_losses)
        else:
            tau = self.median(sequence_mean_losses(nll, batch.seq_index, batch.num_seqs))
        w = self.weights(nll, tau)
        metrics = {"tau": tau.detach()}
        if nll.numel():
            metrics["weight_mean"] = w.mean()
            metrics["cutoff_share"] = (w <= self.w_min).float().mean()
        return LossOutput.of_tokens(w * nll, metrics)


class HardGate(LossStrategy):
    """The paper's Section 4.3 experiment: only confident tokens train.

    w_i = 1 where the token's detached probability p_i = exp(-l_i) exceeds `threshold`, else 0: the
    gradients of tokens below it are clipped, so training starts from the "easy" tokens and takes
    in more of them as they become likely (the curriculum of its Figure 3c; TokenProbabilityLogger's
    `token_probs/share_above_0.2` draws that curve). Gated tokens still count in the step's token
    normaliser, as in the experiment: the gate removes their gradient, not their share of the average.

    Args:
        threshold: the probability a token must exceed to train, in [0, 1); the paper's 0.2.
    """

    name = "gate"

    def __init__(self, threshold: float = 0.2) -> None:
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"gate: threshold must be in [0, 1), got {threshold}")
        self.threshold = threshold

    def __call__(self, batch: TokenBatch) -> LossOutput:
        passed = torch.exp(-batch.nll.detach()) > self.threshold
        metrics = {"passed_share": passed.float().mean()} if batch.nll.numel() else {}
        return LossOutput.of_tokens(passed.to(batch.nll.dtype) * batch.nll, metrics)


class DFT(LossStrategy):
    """Dynamic Fine-Tuning: each token's loss scaled by its own detached probability p_i.

    TALR with tau = 1 and no floor; offered so TALR can be compared against it (no options).
    """

    name = "dft"

    def __call__(self, batch: TokenBatch) -> LossOutput:
        weights = torch.exp(-batch.nll.detach())
        metrics = {"weight_mean": weights.mean()} if batch.nll.numel() else {}
        return LossOutput.of_tokens(weights * batch.nll, metrics)


def flow_weights(seq_losses: torch.Tensor, tau: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FLOW's static sequence weights exp(-loss / tau) from the initial model's sequence losses.

    tau defaults to the median over the training set (FLOW's dataset temperature). Sequences
    without a loss (NaN) get weight 0, as in FLOW's code. Returns (weights, tau).
    """
    finite = seq_losses[~torch.isnan(seq_losses)]
    tau_t = seq_losses.new_tensor(tau) if tau is not None else (
        torch.quantile(finite, 0.5) if finite.numel() else seq_losses.new_tensor(1.0)
    )
    weights = torch.exp(-seq_losses / tau_t.clamp_min(1e-6))
    return torch.nan_to_num(weights, nan=0.0), tau_t


class FLOW(LossStrategy):
    """FLOW (Sanyal et al. 2025): static per-sequence weights from the initial model's losses.

    The module computes the weights once before training (a pre-pass over the training set,
    cached on disk) with `flow_weights`; here each token's loss takes its sequence's weight. The
    weights are not renormalised; the sum is divided by the step's target-token count.

    Args:
        tau: a fixed temperature of the weights exp(-l_s / tau). None: the median of the initial
            model's sequence losses over the training set (FLOW's dataset temperature).
    """

    name = "flow"

    def __init__(self, tau: float | None = None) -> None:
        if tau is not None and tau <= 0:
            raise ValueError(f"flow: a fixed tau must be positive, got {tau}")
        self.tau = tau

    @property
    def needs(self) -> Needs:
        return Needs(sequence_weights=True)

    def __call__(self, batch: TokenBatch) -> LossOutput:
        if batch.seq_weights is None:
            raise RuntimeError("flow: sequence weights are missing (the pre-pass did not run)")
        weights = batch.seq_weights.to(batch.nll.dtype)[batch.seq_index]
        metrics = {"weight_mean": weights.mean()} if batch.nll.numel() else {}
        return LossOutput.of_tokens(weights * batch.nll, metrics)


class EAFT(LossStrategy):
    """Entropy-Adaptive Fine-Tuning (Diao et al. 2026, arXiv 2601.02151).

    w_i = (H_k(i) / ln k) ^ alpha, detached, where H_k(i) is the entropy of the softmax over the
    k largest logits at target position i: confident predictions (low entropy, "confident
    conflicts" when the target disagrees) are damped, uncertain ones keep their gradient. Dividing
    by ln k (the largest entropy of k outcomes) keeps w in [0, 1]; LLaMA-Factory divides by 3.0
    (about ln 20), axolotl's port not at all. Needs the logits at the target positions, so it does
    not combine with `model.loss_chunk_size`.

    Args:
        alpha: exponent of the normalised entropy (> 0; 1 in the paper's code).
        k: how many of the largest logits the entropy is taken over (>= 2; 20 in the paper's code;
            capped at the vocabulary size).
    """

    name = "eaft"

    def __init__(self, alpha: float = 1.0, k: int = 20) -> None:
        if not alpha > 0:
            raise ValueError(f"eaft: alpha must be positive, got {alpha}")
        if k < 2:
            raise ValueError(f"eaft: k must be at least 2 (the entropy of one outcome is always 0), got {k}")
        self.alpha = alpha
        self.k = k

    @property
    def needs(self) -> Needs:
        return Needs(logits=True)

    @torch.no_grad()
    def weights(self, logits: torch.Tensor) -> torch.Tensor:
        """(normalised top-k entropy) ^ alpha of each row of [N, V] logits, never below float32."""
        k = min(self.k, logits.shape[-1])
        top = logits.detach().to(torch.promote_types(logits.dtype, torch.float32)).topk(k, dim=-1).values
        logp = F.log_softmax(top, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        return (entropy / math.log(k)).clamp(0.0, 1.0).pow(self.alpha)

    def __call__(self, batch: TokenBatch) -> LossOutput:
        if batch.logits is None:
            raise RuntimeError("eaft: the logits at the target positions are missing")
        weights = self.weights(batch.logits).to(batch.nll.dtype)
        metrics = {"weight_mean": weights.mean()} if batch.nll.numel() else {}
        return LossOutput.of_tokens(weights * batch.nll, metrics)


class SelectiveTokenMasking(LossStrategy):
    """STM (Wu et al. 2025, arXiv 2501.14315): target tokens whose perplexity under the reference
    model, exp(l_ref), is above `threshold` get weight 0; the rest train as in plain SFT.

    The reference is `model.reference` (default: the initial model, as in the paper, which scores
    the ground-truth tokens with the model about to be fine-tuned). Masked tokens still count in
    the step's denominator (the module divides every strategy's sum by the step's target-token
    count before any backward pass, which keeps gradient accumulation exact); the paper's collator
    drops them from a mean instead, so talr's step is the paper's scaled by the kept share
    (`kept_share` is logged).

    Args:
        threshold: largest per-token perplexity under the reference that still trains (> 1;
            2.5 is the default of the paper's code).
    """

    name = "stm"

    def __init__(self, threshold: float = 2.5) -> None:
        if not threshold > 1.0:
            raise ValueError(f"stm: threshold is a perplexity and must be above 1 (1 masks every token), got {threshold}")
        self.threshold = threshold

    @property
    def needs(self) -> Needs:
        return Needs(reference=True)

    def __call__(self, batch: TokenBatch) -> LossOutput:
        if batch.ref_nll is None:
            raise RuntimeError("stm: the reference model's NLL is missing")
        keep = (batch.ref_nll.detach() <= math.log(self.threshold)).to(batch.nll.dtype)
        metrics = {"kept_share": keep.mean()} if batch.nll.numel() else {}
        return LossOutput.of_tokens(keep * batch.nll, metrics)


class Rho1(LossStrategy):
    """Selective language modelling of Rho-1 (Lin et al. 2024, arXiv 2404.07965): only the
    ceil(ratio * N) target tokens of the batch with the largest excess loss l - l_ref train.

    Rho-1 ranks the tokens of the whole batch (not of each sequence). Here the batch is the
    micro-batch on each rank: with several micro-batches or ranks per optimizer step each selects
    its own top share, so the step is not the same as one big batch's selection (set
    data.micro_batch_size = data.batch_size on one device for that). The reference is
    `model.reference`: Rho-1 uses a model trained on clean target-domain data; the default
    (the initial model) makes the excess loss start at 0 for every token, so the first steps
    select arbitrarily among ties. Unselected tokens still count in the step's denominator
    (the module's count of target tokens, fixed before the loss), where the paper divides by
    the selected count: talr's step is the paper's scaled by `ratio`.

    Args:
        ratio: share of the batch's target tokens that train, in (0, 1] (the paper's math
            runs keep 60%).
    """

    name = "rho1"

    def __init__(self, ratio: float = 0.6) -> None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"rho1: ratio must be in (0, 1] (the share of tokens that train), got {ratio}")
        self.ratio = ratio

    @property
    def needs(self) -> Needs:
        return Needs(reference=True)

    def __call__(self, batch: TokenBatch) -> LossOutput:
        if batch.ref_nll is None:
            raise RuntimeError("rho1: the reference model's NLL is missing")
        nll = batch.nll
        if not nll.numel():
            return LossOutput.of_tokens(nll)
        excess = nll.detach() - batch.ref_nll.detach()
        chosen = excess.topk(math.ceil(self.ratio * nll.numel())).indices
        keep = torch.zeros_like(nll).index_fill_(0, chosen, 1.0)
        return LossOutput.of_tokens(keep * nll, {"excess_loss_mean": excess.mean(), "kept_share": keep.mean()})


class Regularized(LossStrategy):
    """A regulariser around a token strategy `base`: the base's weighted token losses plus a term."""

    def __init__(self, base: LossStrategy) -> None:
        if not isinstance(base, LossStrategy):
            raise TypeError(f"{self.name}: base must be a loss strategy such as talr.losses.TALR(), got {base!r}")
        if base.token_strategy is not base:
            raise ValueError(f"{self.name}: base must be a token strategy (CrossEntropy, TALR, DFT, FLOW, EAFT, ...), got {base!r}")
        self.base = base

    @property
    @abstractmethod
    def own_needs(self) -> Needs:
        """What the regulariser's own term needs."""

    @property
    def needs(self) -> Needs:
        return self.base.needs | self.own_needs

    @property
    def token_strategy(self) -> LossStrategy:
        return self.base

    def __call__(self, batch: TokenBatch) -> LossOutput:
        return self.base(batch)


def anchor_copies(params: Sequence[torch.Tensor], device: str | None = None, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """theta_0 for L2Anchor: a detached copy of each parameter, on `device` and in `dtype` if given (a
    sharded parameter's copy is sharded alike)."""
    return [p.detach().to(device=device or p.device, dtype=dtype or p.dtype, copy=True) for p in params]


class L2Anchor(Regularized):
    """base loss + (lam / 2) * ||theta - theta_0||^2 over trainable parameters.

    The penalty's gradient, lam * (theta - theta_0), is added to the gradients once per optimizer
    step (`add_anchor_gradients`), so it needs no autograd graph and is not divided by the token
    count. Where and in which dtype theta_0 is kept: the module's `anchor_device`, `anchor_dtype`.

    Args:
        lam: strength of the pull toward the initial weights (>= 0).
        reduction: `sum` over the parameters, or `mean`: divided by their number, as FLOW's code does.
        base: the token strategy whose loss the penalty is added to.
    """

    name = "l2"

    def __init__(self, lam: float = 1e-3, reduction: Literal["sum", "mean"] = "sum", base: LossStrategy = CrossEntropy()) -> None:
        super().__init__(base)
        if lam < 0:
            raise ValueError(f"l2: lam must be non-negative, got {lam}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"l2: reduction must be 'sum' or 'mean', got {reduction!r}")
        self.lam = lam
        self.reduction = reduction

    @property
    def own_needs(self) -> Needs:
        return Needs(anchor=True)

    @torch.no_grad()
    def add_anchor_gradients(self, params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """grad += c * (theta - theta_0) for every parameter; returns the distance and penalty."""
        count = sum(p.numel() for p in params)
        coef = self.lam / count if self.reduction == "mean" else self.lam
        squared = torch.zeros((), dtype=torch.float64)
        for p, anchor in zip(params, anchors):
            diff = p.detach() - anchor.to(device=p.device, dtype=p.dtype)
            part = diff.double().pow(2).sum()
            # a sharded (FSDP2) parameter's sum is a partial DTensor: reduce it over the ranks
            squared += (part.full_tensor() if hasattr(part, "full_tensor") else part).cpu()
            if p.grad is None:
                p.grad = coef * diff
            else:
                p.grad.add_(diff, alpha=coef)
        return {"distance": squared.sqrt().float(), "penalty": (0.5 * coef * squared).float()}


class KLToInitial(Regularized):
    """base loss + beta * KL(model || initial model) on the target tokens (or the other direction).

    The initial model is a frozen copy, or with LoRA the same model with its adapters off
    (`model.reference` replaces it by another model). ASFT (arXiv 2509.23753) is
    `KLToInitial(beta=0.1, estimator=exact, direction=initial_model, base=DFT())`: its code adds
    0.1 * KL(initial || model), summed over the vocabulary, to DFT's token loss.

    Args:
        beta: weight of the KL term (>= 0); the paper does not state its coefficient.
        estimator: `k3` (DeepSeek-R1's estimator) uses only the target token's log-ratio
            r = log q - log p: exp(r) - r - 1, unbiased for the KL when tokens are sampled from the
            model and always >= 0. `exact` sums over the vocabulary (needs both models' full
            logits at the target positions, so no `loss_chunk_size`).
        direction: `model_initial`: KL(model || initial), mode-seeking; `initial_model`:
            KL(initial || model), which ASFT uses, mass-covering (the model keeps every token the
            initial model gave probability). `initial_model` needs the `exact` estimator: k3 is
            an estimate for tokens sampled from the model, which only fits KL(model || initial).
        base: the token strategy whose loss the KL term is added to.
    """

    name = "kl"

    def __init__(
        self,
        beta: float = 0.1,
        estimator: Literal["k3", "exact"] = "k3",
        direction: Literal["model_initial", "initial_model"] = "model_initial",
        base: LossStrategy = CrossEntropy(),
    ) -> None:
        super().__init__(base)
        if estimator not in ("k3", "exact"):
            raise ValueError(f"kl: estimator must be 'k3' or 'exact', got {estimator!r}")
        if direction not in ("model_initial", "initial_model"):
            raise ValueError(f"kl: direction must be 'model_initial' or 'initial_model', got {direction!r}")
        if direction == "initial_model" and estimator != "exact":
            raise ValueError("kl: direction 'initial_model' needs estimator 'exact' (k3 estimates KL(model || initial) "
                             "from tokens sampled from the model, not KL(initial || model))")
        if beta < 0:
            raise ValueError(f"kl: beta must be non-negative, got {beta}")
        self.beta = beta
        self.estimator = estimator
        self.direction = direction

    @property
    def own_needs(self) -> Needs:
        return Needs(reference=True, logits=self.estimator == "exact")

    def token_kl(self, batch: TokenBatch) -> torch.Tensor:
        if self.estimator == "k3":
            if batch.ref_nll is None:
                raise RuntimeError("kl: the reference model's NLL is missing")
            log_ratio = batch.nll - batch.ref_nll.detach()  # log q(y) - log p(y)
            return torch.exp(log_ratio) - log_ratio - 1.0
        if batch.logits is None or batch.ref_logits is None:
            raise RuntimeError("kl: exact KL needs the logits of both models")
        dtype = torch.promote_types(batch.logits.dtype, torch.float32)  # never below float32
        logp = F.log_softmax(batch.logits.to(dtype), dim=-1)
        logq = F.log_softmax(batch.ref_logits.detach().to(dtype), dim=-1)
        if self.direction == "initial_model":
            return (logq.exp() * (logq - logp)).sum(-1)
        return (logp.exp() * (logp - logq)).sum(-1)

    def __call__(self, batch: TokenBatch) -> LossOutput:
        out = self.base(batch)
        kl = self.token_kl(batch)
        metrics = dict(out.metrics)
        if kl.numel():
            metrics["kl"] = kl.detach().mean()
        token_losses = None if out.token_losses is None else out.token_losses + self.beta * kl.detach()
        return LossOutput(out.total + self.beta * kl.sum(), metrics, token_losses)
