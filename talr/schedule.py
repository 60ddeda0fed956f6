"""The optimizer: AdamW with linear warmup, then cosine decay to zero, over the run's optimizer steps."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import lightning as L
import torch


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warmup that starts above zero (the first step learns), then cosine to 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def schedule_length(trainer: "L.Trainer") -> int:
    """Optimizer steps of the whole run, for the schedule.

    Computed from the data rather than with `trainer.estimated_stepping_batches`, which builds
    the training iterator before a checkpoint's loop state is restored and so defeats the
    mid-epoch resume of the training loader.
    """
    per_epoch = trainer.datamodule.steps_per_epoch(trainer.world_size)
    limit = trainer.limit_train_batches
    if isinstance(limit, float):
        per_epoch = int(per_epoch * limit) if limit < 1.0 else per_epoch
    elif limit is not None:
        per_epoch = min(per_epoch, int(limit))
    total = per_epoch * trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else math.inf
    if trainer.max_steps and trainer.max_steps > 0:
        total = min(total, trainer.max_steps)
    if total == math.inf:
        raise ValueError("set trainer.max_epochs or trainer.max_steps: the learning-rate schedule needs a length")
    return max(1, int(total))


def adamw_foreach(device: torch.device) -> bool | None:
    """AdamW's multi-tensor (foreach) path on accelerators; on a CPU the per-tensor loop, which is about as
    fast there and needs one tensor's temporaries instead of a whole weight-sized set at the step's peak."""
    return False if device.type == "cpu" else None


def adamw_warmup_cosine(params: list[torch.nn.Parameter], learning_rate: float, betas: tuple[float, float],
                        weight_decay: float, warmup_ratio: float, total_steps: int) -> dict[str, Any]:
    """AdamW and its per-step schedule, as `configure_optimizers` returns them."""
    # Decay matrices only: decaying norms and biases hurts and is not what the paper's AdamW runs do.
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    device = params[0].device if params else torch.device("cpu")
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, foreach=adamw_foreach(device))
    warmup = math.ceil(warmup_ratio * total_steps)
    schedule = partial(warmup_cosine, warmup=warmup, total=total_steps)
    return {"optimizer": optimizer,
            "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), "interval": "step"}}
