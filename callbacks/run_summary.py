"""The run's validation history and summary: before / best / last in the log, and one JSON with what a
sweep table needs (domain and general scores before and at the best checkpoint, the run's options)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from callbacks.contracts import ContributesScores
from talr.allocator import current_allocator
from talr.results import write_atomic


class RunSummary(Callback):
    """The run's validation history, its before / best / last summary in the log, and `path` at fit end.

    Every validation's `val/*` metrics (the initial model's too, from validate-before-fit) go into the
    history. At fit end the log gets the target NLL and, where the task scores generations, the
    domain accuracy before fine-tuning, at the best step and at the last validation, and `path` gets
    one JSON with what a sweep table needs: `domain_initial` / `domain_best` (the checkpoint the paper
    selects) with its `best_step` / `domain_last` on `monitor`, the options that define the run, and
    the numbers of every callback that provides `summary_scores(best_step)` (`ContributesScores`:
    GeneralBenchmarks' general score, ForgettingMonitor's drift at the best step, WiSEFT's one row per
    alpha under `wiseft`, ...). `talr fit` adds one to every run that has none.

    Args:
        path: the JSON file; default `<log_dir>/summary.json`, written when a fit finishes.
        monitor: the domain metric, as logged (`val/accuracy`, `val/balanced_accuracy`, ...); None:
            the ModelCheckpoint's monitor, else `val/loss`.
        mode: `max` or `min` (for a loss); None: the ModelCheckpoint's mode, else `min`.
        record: the validation metrics to report before training, at the best step and at the
            last validation, as `<metric>_initial|_best|_last` with `/` written `_`
            (`val/loss` -> `val_loss_best`); each must be logged. None: every `val/*` metric logged
            (the loss beside the numbers a temperature cannot move: calibrated_loss, token_accuracy, ...).
    """

    def __init__(self, path: str | None = None, monitor: str | None = None, mode: Literal["max", "min"] | None = None,
                 record: list[str] | None = None) -> None:
        if mode not in ("max", "min", None):
            raise ValueError(f"RunSummary.mode must be 'max' or 'min', got {mode!r}")
        self.path = path
        self.explicit = monitor is not None  # a run that never validates has no summary unless one was asked for
        self.monitor = monitor
        self.mode = mode
        self.record = None if record is None else list(record)
        self.history: list[dict[str, float]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        checkpoint = trainer.checkpoint_callback
        followed = getattr(checkpoint, "monitor", None)
        if self.monitor is None:
            self.monitor = followed or "val/loss"
        if self.mode is None:
            self.mode = checkpoint.mode if followed == self.monitor else ("min" if "loss" in self.monitor else "max")
        if self.record is not None:
            self.record = [name for name in self.record if name != self.monitor]
        validates_every_step = isinstance(trainer.val_check_interval, int) and trainer.val_check_interval == 1
        for callback in trainer.checkpoint_callbacks:
            if validates_every_step and callback.monitor and getattr(callback, "_save_on_train_epoch_end", False) is None:
                # Lightning reads an int 1 (validate every step) as 1.0 (once an epoch) and would then keep
                # only the epoch end's checkpoint: the best checkpoint that HFExport and WiSE-FT read would
                # not be this summary's best step. Save at each validation, as for any other interval.
                callback._save_on_train_epoch_end = False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("val/")}
        if not metrics:
            return
        entry = {"step": trainer.global_step, **metrics}
        self.history = [e for e in self.history if e["step"] != entry["step"]] + [entry]  # a resumed step replaces

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # After every callback's on_fit_end: the fit-end numbers (benchmarks of the best checkpoint,
        # WiSE-FT) exist by now, whatever the order of the callbacks.
        if stage == "fit" and not trainer.interrupted:
            self.write(trainer, pl_module)

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the before / best / last lines and write the summary JSON (rank zero)."""
        log_dir = trainer.log_dir  # a broadcast from rank 0: every rank must ask for it
        if not trainer.is_global_zero:
            return
        if not any(self.monitor in entry for entry in self.history):
            if not self.explicit:
                return
            raise ValueError(f"RunSummary: {self.monitor!r} was never logged; is the monitor name right "
                             f"(logged: {sorted(trainer.callback_metrics)})?")
        never = [name for name in self.record or [] if not any(name in entry for entry in self.history)]
        if never:
            raise ValueError(f"RunSummary: record metric(s) {never} were never logged at a validation "
                             f"(logged: {sorted(trainer.callback_metrics)})")
        rank_zero_info(self.describe())
        path = Path(self.path) if self.path else Path(log_dir or trainer.default_root_dir) / "summary.json"
        write_atomic(path, json.dumps(self.summary(trainer, pl_module, log_dir), indent=2))
        rank_zero_info(f"[talr] run summary: {path}")

    def _initial_best_last(self) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        """The entries before training (empty if not measured), at the best step, and last."""
        scored = [e for e in self.history if self.monitor in e]
        initial = next((e for e in scored if e["step"] == 0), {})
        trained = [e for e in scored if e["step"] > 0] or scored
        pick = max if self.mode == "max" else min
        best = pick(trained, key=lambda e: e[self.monitor])  # the earliest best, as ModelCheckpoint keeps it
        return initial, best, trained[-1]

    def describe(self) -> str:
        """The fit's before / best / last lines for the log."""
        initial, best, last = self._initial_best_last()
        nll = lambda e: f"{e['val/loss']:.4f}" if "val/loss" in e else "-"  # noqa: E731
        lines = [f"[talr] validation target NLL before fine-tuning {nll(initial)}, at the best step {nll(best)}, "
                 f"last {nll(last)}; best step {int(best['step'])} on {self.monitor}"]
        if "val/accuracy" in last:
            accuracy = lambda e: (f"{e['val/accuracy']:.3f} (unparsed {int(e['val/unparsed'])}/{int(e['val/count'])})"  # noqa: E731
                                  if "val/accuracy" in e else "-")
            lines.append(f"[talr] domain accuracy before fine-tuning {accuracy(initial)}; at the best step "
                         f"{accuracy(best)}; last {accuracy(last)}")
        return "\n".join(lines)

    def summary(self, trainer: L.Trainer, pl_module: L.LightningModule, log_dir: str | None) -> dict[str, Any]:
        initial, best, last = self._initial_best_last()
        hparams = pl_module.hparams
        out: dict[str, Any] = {
            "monitor": self.monitor,
            "domain_initial": initial.get(self.monitor, math.nan),
            "domain_best": best[self.monitor],
            "best_step": best["step"],
            "domain_last": last[self.monitor],
            "general_initial": math.nan,
            "general_best": math.nan,
            "learning_rate": hparams.get("learning_rate"),
            "loss": strategy_name(pl_module.loss_fn, hparams.get("lora")),  # the short name, not its options
            "model": hparams.get("model"),
            "seed": _seed(),
            "steps": trainer.global_step,
            "allocator": current_allocator(),  # what the step times were measured under (talr/allocator.py)
            "log_dir": str(log_dir) if log_dir else None,
            "config_file": str(Path(log_dir) / "config.yaml") if log_dir and (Path(log_dir) / "config.yaml").is_file() else None,
            "history": self.history,
        }
        logged = sorted({name for entry in self.history for name in entry} - {"step", self.monitor})
        for name in logged if self.record is None else self.record:
            column = name.replace("/", "_")
            for when, entry in (("initial", initial), ("best", best), ("last", last)):
                out[f"{column}_{when}"] = entry.get(name, math.nan)
        for callback in trainer.callbacks:  # general score, forgetting, ... from the callbacks that measure them
            if isinstance(callback, ContributesScores):
                out.update(callback.summary_scores(best["step"]))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


def strategy_name(loss: Any, lora: dict[str, Any] | None) -> str:
    """A run's strategy as sweep tables and reports group it: the loss's short name (ce, talr, kl, ...;
    `loss` a talr.losses strategy or its name); a regulariser around another base than ce adds it
    (`kl+dft`, ASFT), so it is never averaged with the ce-based one as a seed of the same cell; with
    LoRA adapters `lora` (trained with ce, the paper's baseline) or `<loss>+lora`, likewise."""
    name = loss if isinstance(loss, str) else loss.name
    base = getattr(loss, "base", None)
    if base is not None and base.name != "ce":
        name = f"{name}+{base.name}"
    if not lora:
        return name
    return "lora" if name == "ce" else f"{name}+lora"


def _seed() -> int | None:
    value = os.environ.get("PL_GLOBAL_SEED")  # set by seed_everything
    return int(value) if value is not None else None
