"""A callback for the distributed tests, importable by `talr fit` in a subprocess: it records what
one optimizer step computed, so that runs over different process/micro-batch layouts compare."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.distributed.tensor import DTensor


class _RecordingLoss:
    """The module's loss strategy, unchanged, that also keeps each micro-batch's input and output."""

    def __init__(self, inner: Any, calls: list) -> None:
        self.inner = inner
        self.calls = calls

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, batch: Any) -> Any:
        out = self.inner(batch)
        self.calls.append((batch, out))
        return out


class RecordStep(L.Callback):
    """Writes, for the first optimizer step, `rank{r}.json` (rows, TALR's tau and per-token weights
    keyed by row) on every rank and `grads.pt` (full gradients as the optimizer sees them, after
    clipping) on rank 0, into `out_dir`. `mlp_calls` counts the first layer's MLP forwards in the
    step: activation checkpointing runs it once more in backward."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.calls: list = []
        self.micro_rows: list[list[int]] = []
        self.mlp_calls = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(pl_module.loss_fn, _RecordingLoss):
            pl_module.loss_fn = _RecordingLoss(pl_module.loss_fn, self.calls)

    def on_train_start(self, trainer, pl_module) -> None:  # the net exists (configure_model ran)
        mlp = next(m for name, m in pl_module.net.named_modules() if name.endswith("layers.0.mlp"))
        # a pre-hook: the checkpointed recompute stops early, before the MLP returns
        mlp.register_forward_pre_hook(lambda *_: setattr(self, "mlp_calls", self.mlp_calls + 1))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.calls.clear()
        self.mlp_calls = 0
        self.micro_rows = [m["row_index"].tolist() for m in batch["micro_batches"]]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step != 0:
            return
        grads = {}
        for name, p in pl_module.net.named_parameters():
            if p.grad is not None:  # full_tensor is a collective: every rank runs it
                grads[name] = (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().cpu().clone()
        if trainer.is_global_zero:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            torch.save(grads, self.out_dir / "grads.pt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != 1:  # the first optimizer step just ran
            return
        taus, weights = [], {}
        strategy = pl_module.loss_fn.inner
        for (tokens, out), rows in zip(self.calls, self.micro_rows):
            tau = out.metrics.get("tau")
            if tau is None:
                continue
            taus.append(float(tau))
            w = strategy.weights(tokens.nll, tau).tolist()
            for i, seq in enumerate(tokens.seq_index.tolist()):
                weights.setdefault(str(rows[seq]), []).append(w[i])
        record = {"rows": sorted(r for rows in self.micro_rows for r in rows), "tau": taus, "weights": weights,
                  "mlp_calls": self.mlp_calls}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
