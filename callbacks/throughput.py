"""Training speed: tokens per second and model FLOPs utilization (MFU) of every optimizer step."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from talr.progress import counted

SPEED_METRICS = ("train/tokens_per_s", "train/target_tokens_per_s", "train/mfu")  # what the callback logs
CPU_PEAK_MATMUL_SIZE = 2048
CPU_PEAK_REPEATS = 3


def measure_cpu_peak_flops(size: int = CPU_PEAK_MATMUL_SIZE, repeats: int = CPU_PEAK_REPEATS) -> float:
    """FLOP/s of the best of `repeats` float32 `size` x `size` matmuls on this CPU (its usable peak, with
    torch's current thread count): 2 size^3 FLOPs each, after one untimed warm-up."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up: thread pool, allocator
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def lm_flop_weights(lm: torch.nn.Module) -> tuple[tuple[int, int], tuple[int, int]]:
    """((decoder-body parameters, of them trained), (lm-head parameters, of them trained)): the body
    without the input embeddings (a lookup, no matmul); a head tied to the embeddings counts once, as
    the head. A trained weight costs 6 FLOPs per token (forward 2, input gradient 2, weight gradient
    2), a frozen one 4: no weight gradient (LoRA's base model)."""
    head = lm.get_output_embeddings()
    embeddings = lm.get_input_embeddings()
    head_params = list(head.parameters()) if head is not None else []
    skip = {id(p) for p in head_params} | {id(p) for p in embeddings.parameters()}
    seen: set[int] = set()
    body = trained = 0
    for p in lm.parameters():
        if id(p) not in skip and id(p) not in seen:
            seen.add(id(p))
            body += p.numel()
            trained += p.numel() if p.requires_grad else 0
    return (body, trained), (sum(p.numel() for p in head_params), sum(p.numel() for p in head_params if p.requires_grad))


def compute_dtype(trainer: L.Trainer, lm: torch.nn.Module) -> torch.dtype:
    """The dtype the matmuls run in: the autocast dtype of a mixed precision, else the weights' dtype."""
    precision = str(trainer.precision)
    if "bf16" in precision:
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return next(p.dtype for p in lm.parameters() if p.is_floating_point())


class Throughput(Callback):
    """Logs each optimizer step's speed to every logger, at the step the module logs `train/loss` at.

    - `train/tokens_per_s`: the step's non-padding tokens (prompt and target, every micro-batch, every
      rank) over the step's wall time, from `on_train_batch_start` to `on_train_batch_end` (CUDA
      synchronized at both ends): the forward and backward passes, the optimizer step and any extra
      pass a strategy makes (TALR's tau pre-pass, KL's reference), but not data loading, validation
      or other callbacks' batch-end work.
    - `train/target_tokens_per_s`: the same for the supervised (target) tokens only.
    - `train/mfu`: model FLOPs per second over the devices' peak. Model FLOPs of a step:
      (6 x trained + 4 x frozen decoder-body parameters) x (all tokens) + (the same for the lm head) x
      (target tokens): forward (2), input-gradient (2) and, for a trained weight only, weight-gradient
      (2) FLOPs per parameter and token (LoRA's frozen base costs 4: `lm_flop_weights`); the input
      embeddings are a lookup and count nothing, and only target tokens reach the vocabulary
      projection in talr (`talr.token_loss`). Input gradients are counted through every layer, as
      when something trains in every layer (full fine-tuning, LoRA on all layers). Attention's
      sequence-length term is left out, as is every pass beyond the one forward and backward (TALR's
      no-grad tau pass with several micro-batches, KL's reference forward, activation recomputation
      under gradient checkpointing): they show as a lower mfu.

    The peak is `peak_flops` if given, per device; else on a GPU the dense figure for the compute
    dtype from Lightning's table (`get_available_flops`; no mfu for a GPU it does not know), and on
    a CPU measured once at train start with `measure_cpu_peak_flops` (float32 matmuls). It is printed
    with the parameter counts. `train/mfu` is not logged without a peak.

    `talr fit` adds one to every run that has none; the plain progress lines (`PlainProgress`) show
    its numbers.

    Args:
        peak_flops: the per-device peak in FLOP/s to divide by (for a GPU missing from Lightning's
            table, or to compare runs on different CPUs against one figure).
    """

    def __init__(self, peak_flops: float | None = None) -> None:
        if peak_flops is not None and not peak_flops > 0:
            raise ValueError(f"Throughput.peak_flops must be positive FLOP/s, got {peak_flops}")
        self.peak_flops = peak_flops
        self.peak_source = "given" if peak_flops else None
        self.body_params = self.head_params = 0
        self.flops_per_token = self.flops_per_target_token = 0.0
        self.totals = {"tokens": 0, "target_tokens": 0, "seconds": 0.0, "flops": 0.0}  # this process's steps, summed
        self._started = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        (self.body_params, body_trained), (self.head_params, head_trained) = lm_flop_weights(pl_module.lm)
        self.flops_per_token = 4.0 * self.body_params + 2.0 * body_trained
        self.flops_per_target_token = 4.0 * self.head_params + 2.0 * head_trained
        device = trainer.strategy.root_device
        if self.peak_source != "given":
            dtype = compute_dtype(trainer, pl_module.lm)
            if device.type == "cpu":
                self.peak_flops = measure_cpu_peak_flops()
                self.peak_source = (f"measured: best of {CPU_PEAK_REPEATS} float32 {CPU_PEAK_MATMUL_SIZE}^2 matmuls, "
                                    f"{counted(torch.get_num_threads(), 'thread')}")
            else:
                self.peak_flops = get_available_flops(device, dtype)
                self.peak_source = f"Lightning's table for {dtype}" if self.peak_flops else None
        peak = f"{self.peak_flops / 1e9:,.1f} GFLOP/s per device ({self.peak_source})" if self.peak_flops else \
            "unknown (no train/mfu; set Throughput.peak_flops)"
        frozen = "" if self.flops_per_token == 6.0 * self.body_params else \
            f" ({self.flops_per_token / self.body_params:.3g} FLOPs per body parameter: frozen weights cost 4, trained 6)"
        rank_zero_info(f"[throughput] peak {peak}; model FLOPs per step = {self.flops_per_token:,.0f} x tokens + "
                       f"{self.flops_per_target_token:,.0f} x target tokens ({self.body_params:,} body and "
                       f"{self.head_params:,} lm-head parameters){frozen}")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        _synchronize(trainer.strategy.root_device)
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        device = trainer.strategy.root_device
        _synchronize(device)
        seconds = time.perf_counter() - self._started
        tokens = sum(int(micro["attention_mask"].sum()) for micro in batch["micro_batches"])
        counts = torch.tensor([tokens, int(batch["num_target_tokens"])], dtype=torch.float64, device=device)
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        tokens, target = (int(c) for c in counts.tolist())
        step_counts = {"tokens": tokens, "target_tokens": target, "seconds": seconds,
                       "flops": self.flops_per_token * tokens + self.flops_per_target_token * target}
        for key, value in step_counts.items():
            self.totals[key] += value
        metrics = self.rates(step_counts, trainer.world_size)
        # Lightning logs the step's train/* metrics when the step count it logs at, plus one, is a
        # multiple of log_every_n_steps; these lines go to the same step of the same plots.
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        every = trainer.log_every_n_steps
        if every and ((step + 1) % every == 0 or trainer.should_stop):
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def rates(self, counts: dict[str, float], world_size: int) -> dict[str, float]:
        """`train/tokens_per_s`, `train/target_tokens_per_s` and, with a peak, `train/mfu` of `counts`
        (tokens, target_tokens, seconds, flops: one step's, or the difference of two `totals`)."""
        seconds = counts["seconds"]
        rates = {"train/tokens_per_s": counts["tokens"] / seconds,
                 "train/target_tokens_per_s": counts["target_tokens"] / seconds}
        if self.peak_flops:
            rates["train/mfu"] = counts["flops"] / seconds / (self.peak_flops * world_size)
        return rates


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CUDA runs ahead of the host: time the work, not its launch
