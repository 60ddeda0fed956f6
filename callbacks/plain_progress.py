"""Plain progress lines for logs without a terminal (SLURM, CI, nohup): a Lightning progress bar that
prints one line at a time instead of redrawing one."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar

from callbacks.throughput import Throughput
from talr.progress import PLAIN_INTERVAL_S, counted, format_duration, peak_memory, plain_line


class PlainProgress(ProgressBar):
    """One plain line on stdout every `interval_s` seconds of training (or every `every_n_steps`
    optimizer steps), plus start / periodic / end lines for validation and test passes.

    A training line, for example (configs/quickstart.yaml on a busy, shared 2-core CPU)::

        [train] step 1/4 (25%) | loss 0.1464 | tau 0.9262, weight_mean 0.6359, cutoff_share 0.05137 | 21 tokens/s (7 target) | mfu 0.344 | 3m16s elapsed, ~9m48s left | peak mem 8.37 GiB (RSS)

    - loss: `train/loss` of the step; then the strategy's own metrics (`train/<loss>/<name>`, for
      TALR its tau, mean weight and share of tokens at the floor);
    - tokens/s (all non-padding tokens, and the target tokens in brackets) and mfu: averages over
      the steps since the previous line, from the `Throughput` callback (`talr fit` adds one);
      left out without it;
    - elapsed: wall time since training started in this process (validations included), and the
      time left at that pace; peak mem: the process's peak RSS on a CPU, peak allocated memory on
      a GPU.

    The first and the last step always get a line. Validation and test passes print when they
    start (batches), every `interval_s` seconds while they run, and when they end (duration).

    `talr fit` uses it instead of Lightning's live bar when stdout is not a terminal; select it in
    a config (`trainer.callbacks`) to have it on a terminal too, or to change its pace.

    Args:
        every_n_steps: a line every this many optimizer steps instead of every `interval_s` seconds.
        interval_s: seconds between training lines (when `every_n_steps` is unset) and between the
            periodic lines of a validation or test pass.
    """

    def __init__(self, every_n_steps: int | None = None, interval_s: float = PLAIN_INTERVAL_S) -> None:
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"PlainProgress.every_n_steps must be at least 1 (or unset for every interval_s), "
                             f"got {every_n_steps}")
        if not interval_s >= 0:
            raise ValueError(f"PlainProgress.interval_s must be zero or more seconds, got {interval_s}")
        self.every_n_steps = every_n_steps
        self.interval_s = interval_s
        self._enabled = True
        self._throughput: Throughput | None = None
        self._train_started = 0.0
        self._first_step = 0  # the global step this process started training at (a resumed run starts later)
        self._total_steps: int | float = math.inf
        self._last_line = -math.inf
        self._since_line = {"tokens": 0, "target_tokens": 0, "seconds": 0.0, "flops": 0.0}
        self._eval_started = self._eval_line_at = 0.0
        self._eval_batches = 0

    # -- ProgressBar's interface ---------------------------------------------------------------------
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args: Any, **kwargs: Any) -> None:
        print(*args, **kwargs, flush=True)

    # -- training ------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._throughput = next((c for c in trainer.callbacks if isinstance(c, Throughput)), None)
        self._train_started = time.monotonic()
        self._first_step = trainer.global_step
        self._total_steps = trainer.estimated_stepping_batches
        self._last_line = -math.inf
        self._snapshot()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._enabled:
            return
        step, total = trainer.global_step, self._total_steps
        now = time.monotonic()
        if self.every_n_steps:
            due = step % self.every_n_steps == 0
        else:
            due = now - self._last_line >= self.interval_s
        if due or step >= total or step == self._first_step + 1:
            self._last_line = now
            plain_line(self.train_line(trainer, step, total, now))

    def train_line(self, trainer: L.Trainer, step: int, total: int | float, now: float) -> str:
        metrics = trainer.callback_metrics
        done = f"{step}/{total} ({100 * step / total:.0f}%)" if math.isfinite(total) else f"{step}"
        parts = [f"[train] step {done}"]
        if "train/loss" in metrics:
            parts.append(f"loss {float(metrics['train/loss']):.4f}")
        own = [f"{name.rsplit('/', 1)[1]} {float(value):.4g}" for name, value in metrics.items()
               if name.startswith("train/") and name.count("/") == 2]  # train/<strategy>/<metric>
        if own:
            parts.append(", ".join(own))
        parts.extend(self._speed())
        elapsed = now - self._train_started
        steps_here = step - self._first_step
        left = f", ~{format_duration(elapsed / steps_here * (total - step))} left" if steps_here > 0 and math.isfinite(total) else ""
        parts.append(f"{format_duration(elapsed)} elapsed{left}")
        parts.append(peak_memory(trainer.strategy.root_device))
        return " | ".join(parts)

    def _speed(self) -> list[str]:
        """Tokens/s and mfu over the steps since the previous line."""
        if self._throughput is None:
            return []
        totals, previous = self._throughput.totals, self._since_line
        counts = {key: totals[key] - previous[key] for key in previous}
        self._snapshot()
        if counts["seconds"] <= 0:
            return []
        rates = self._throughput.rates(counts, self.trainer.world_size)
        parts = [f"{rates['train/tokens_per_s']:,.0f} tokens/s ({rates['train/target_tokens_per_s']:,.0f} target)"]
        if "train/mfu" in rates:
            parts.append(f"mfu {rates['train/mfu']:.3g}")
        return parts

    def _snapshot(self) -> None:
        if self._throughput is not None:
            self._since_line = {k: self._throughput.totals[k] for k in self._since_line}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled:
            plain_line(f"[train] done: {counted(trainer.global_step - self._first_step, 'step')} in "
                       f"{format_duration(time.monotonic() - self._train_started)} | "
                       f"{peak_memory(trainer.strategy.root_device)}")

    # -- validation and test: start, every interval_s, end -------------------------------------------
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._eval_start("validation", trainer, _total(trainer.num_val_batches))

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._eval_batch("validation", _total(trainer.num_val_batches))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._eval_end("validation", trainer)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start("test", trainer, _total(trainer.num_test_batches))

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch("test", _total(trainer.num_test_batches))

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_end("test", trainer)

    def _eval_start(self, name: str, trainer: L.Trainer, total: int | float) -> None:
        self._eval_started = self._eval_line_at = time.monotonic()
        self._eval_batches = 0
        if self._enabled:
            plain_line(f"[{name}] step {trainer.global_step}: started, {counted(total, 'batch')}")

    def _eval_batch(self, name: str, total: int | float) -> None:
        self._eval_batches += 1
        now = time.monotonic()
        if not self._enabled or now - self._eval_line_at < self.interval_s or self._eval_batches >= total:
            return
        self._eval_line_at = now
        elapsed = now - self._eval_started
        left = f", ~{format_duration(elapsed / self._eval_batches * (total - self._eval_batches))} left" \
            if math.isfinite(total) else ""
        plain_line(f"[{name}] {self._eval_batches}/{counted(total, 'batch')}, {format_duration(elapsed)} elapsed{left}")

    def _eval_end(self, name: str, trainer: L.Trainer) -> None:
        if self._enabled:
            plain_line(f"[{name}] step {trainer.global_step}: done, {counted(self._eval_batches, 'batch')} in "
                       f"{format_duration(time.monotonic() - self._eval_started)}")


def _total(batches: int | float | list[int | float]) -> int | float:
    """Batches of a pass over every dataloader (Lightning keeps one count per dataloader)."""
    return sum(batches) if isinstance(batches, list) else batches

