"""One JSON per run with what a sweep table needs: the domain score and the general score, before
and at the best checkpoint, the run's options and where its config and logs are."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from talr.results import write_atomic


class RunSummary(Callback):
    """Record `monitor` at every validation (the initial model's too) and write `path` at fit end.

    The summary holds `domain_initial` (before training, from validate-before-fit), `domain_best`
    and its `best_step` (the checkpoint the paper selects), `domain_last`, the general score of
    the initial model and of the best checkpoint when a `GeneralBenchmarks` callback ran, the
    learning rate, loss and seed, and the run's history. Every callback with a
    `summary_scores(best_step)` method adds its numbers (GeneralBenchmarks: the general score;
    ForgettingMonitor: the drift on general prompts at the best step). `talr sweep` adds this
    callback to every run.

    Args:
        path: the JSON file; default `<log_dir>/summary.json`.
        monitor: the domain metric, as logged (`val/accuracy`, `val/balanced_accuracy`, ...).
        mode: `max` or `min` (for a loss).
        record: more validation metrics to report before training, at the best step and at the
            last validation, as `<metric>_initial|_best|_last` with `/` written `_`
            (`val/loss` -> `val_loss_best`).
    """

    def __init__(self, path: str | None = None, monitor: str = "val/accuracy", mode: Literal["max", "min"] = "max",
                 record: list[str] | None = None) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"RunSummary.mode must be 'max' or 'min', got {mode!r}")
        self.path = path
        self.monitor = monitor
        self.mode = mode
        self.record = [name for name in (record or []) if name != monitor]
        self.history: list[dict[str, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        metrics = trainer.callback_metrics
        entry = {"step": trainer.global_step, **{name: float(metrics[name]) for name in [self.monitor, *self.record]
                                                 if name in metrics}}
        self.history = [e for e in self.history if e["step"] != entry["step"]] + [entry]  # a resumed step replaces

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # a broadcast from rank 0: every rank must ask for it
        if not trainer.is_global_zero:
            return
        if not self.history:
            raise ValueError(f"RunSummary: {self.monitor!r} was never logged; is the monitor name right "
                             f"(logged: {sorted(trainer.callback_metrics)})?")
        never = [name for name in self.record if not any(name in entry for entry in self.history)]
        if never:
            raise ValueError(f"RunSummary: record metric(s) {never} were never logged at a validation "
                             f"(logged: {sorted(trainer.callback_metrics)})")
        path = Path(self.path) if self.path else Path(log_dir or trainer.default_root_dir) / "summary.json"
        write_atomic(path, json.dumps(self.summary(trainer, pl_module, log_dir), indent=2))
        rank_zero_info(f"[talr] run summary: {path}")

    def summary(self, trainer: L.Trainer, pl_module: L.LightningModule, log_dir: str | None) -> dict[str, Any]:
        initial = [e for e in self.history if e["step"] == 0]
        trained = [e for e in self.history if e["step"] > 0] or self.history
        pick = max if self.mode == "max" else min
        best = pick(trained, key=lambda e: e[self.monitor])  # the earliest best, as ModelCheckpoint keeps it
        hparams = pl_module.hparams
        out: dict[str, Any] = {
            "monitor": self.monitor,
            "domain_initial": initial[0][self.monitor] if initial else math.nan,
            "domain_best": best[self.monitor],
            "best_step": best["step"],
            "domain_last": trained[-1][self.monitor],
            "general_initial": math.nan,
            "general_best": math.nan,
            "learning_rate": hparams.get("learning_rate"),
            "loss": pl_module.loss_fn.name,  # the short name (ce, talr, kl, ...), not its options
            "model": hparams.get("model"),
            "seed": _seed(),
            "steps": trainer.global_step,
            "log_dir": str(log_dir) if log_dir else None,
            "config_file": str(Path(log_dir) / "config.yaml") if log_dir and (Path(log_dir) / "config.yaml").is_file() else None,
            "history": self.history,
        }
        for name in self.record:
            column = name.replace("/", "_")
            for when, entry in (("initial", initial[0] if initial else {}), ("best", best), ("last", trained[-1])):
                out[f"{column}_{when}"] = entry.get(name, math.nan)
        for callback in trainer.callbacks:  # general score, forgetting, ... from the callbacks that measure them
            scores = getattr(callback, "summary_scores", None)
            if callable(scores):
                out.update(scores(best["step"]))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


def _seed() -> int | None:
    value = os.environ.get("PL_GLOBAL_SEED")  # set by seed_everything
    return int(value) if value is not None else None
