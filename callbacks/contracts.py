"""What a callback may use from the module, and what it may give `RunSummary`.

Callbacks depend on these two Protocols, not on SFTModule's internals: a module that provides
`TrainedModule` runs every callback of this package, and a callback that provides `ContributesScores`
adds its numbers to the run summary and the sweep table without RunSummary knowing its class.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import nn


@runtime_checkable
class TrainedModule(Protocol):
    """The module's surface for callbacks (beside LightningModule's own: device, hparams, to, ...)."""

    net: nn.Module  # talr.models.TokenNLLModel: forward gives target-token NLL; generate
    tokenizer: Any
    loss_fn: Any  # the loss strategy (talr.losses.LossStrategy)

    @property
    def lm(self) -> nn.Module:
        """The causal LM being fine-tuned (a peft model under LoRA)."""

    @property
    def lm_prefix(self) -> str:
        """The LM's key prefix in the module's state dict, for `talr.checkpoint_io.lm_state_from_checkpoint`."""

    def load_initial_lm(self) -> nn.Module:
        """The initial model, freshly loaded (theta_0)."""

    def evaluate(self, split: str = "val", tag: str | None = None) -> dict[str, float]:
        """The domain metrics of the current weights on a split, as validation computes them."""


@runtime_checkable
class ContributesScores(Protocol):
    """A callback whose numbers belong in the run summary (general score, forgetting drift, ...)."""

    def summary_scores(self, best_step: int) -> dict[str, Any]:
        """Columns for the summary: values before training, at `best_step` and last, as the callback measured.

        A callback that can pair its measurements adds `<name>_delta`, `_delta_low`, `_delta_high`
        (a 95% interval of `<name>_best` minus `<name>_initial`), `_p`, `_n` and `_test` beside
        `<name>_best`: `talr report` draws them as that column's error bars."""
