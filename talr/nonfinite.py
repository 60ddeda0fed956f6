"""Optimizer steps whose loss or gradients are not finite: skipped, counted, and a stop after too many."""

from __future__ import annotations

from typing import Iterable

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.distributed.tensor import DTensor


def gradient_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor | None:
    """The total 2-norm of the gradients (None without any), the same on every rank: the backends have
    averaged the gradients already, and a sharded (FSDP2) norm is reduced to the norm of the whole."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


class NonFiniteSteps:
    """Counts skipped steps; `max_in_row` skipped steps in a row stop the run naming the last batch."""

    def __init__(self, max_in_row: int) -> None:
        self.max_in_row = max_in_row
        self.skipped = 0  # over the whole run (kept in the checkpoint)
        self.in_row = 0

    def passed(self) -> None:
        self.in_row = 0

    def skip(self, where: str, loss_sum: float) -> None:
        """Record a skipped step at `where` (epoch, batch, step); raise once too many came in a row."""
        self.skipped += 1
        self.in_row += 1
        if self.in_row >= self.max_in_row:
            raise FloatingPointError(
                f"{self.in_row} optimizer steps in a row had a non-finite loss or gradient, the last at {where}; "
                f"stopping (model.max_bad_steps={self.max_in_row}). Lower the learning rate or check that batch."
            )
        rank_zero_warn(f"non-finite loss or gradient at {where}: loss sum {loss_sum}; step skipped")
