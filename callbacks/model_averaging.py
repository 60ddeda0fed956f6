"""WiSE-FT: weight-space ensembling of the initial and the fine-tuned model (Wortsman et al., 2022).

theta(alpha) = (1 - alpha) * theta_0 + alpha * theta, per parameter tensor, where theta_0 are the
pre-fine-tuning weights and theta the fine-tuned ones. A baseline of "SFT Doesn't Always Hurt
General Capabilities": interpolating back towards theta_0 trades domain accuracy for less
forgetting. At fit end every alpha is scored on the validation split, the curve is logged, and the
chosen alpha's model is exported as a Hugging Face directory.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from talr.checkpoint_io import lm_state_from_checkpoint
from talr.model_card import CardScore, describe_run, write_model_card
from talr.models import export_pretrained
from talr.results import GuardsResults, write_atomic

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def interpolate_state(
    theta0: dict[str, torch.Tensor], theta: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """(1 - alpha) * theta0 + alpha * theta for every tensor, in theta's dtype.

    The arithmetic runs in at least float32 (bfloat16 would round the mix twice). alpha 0 and 1
    copy the endpoint instead, so they reproduce theta0 / theta bit for bit. Tensors that are not
    floating point (integer buffers) cannot be mixed: they come from the nearer endpoint.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if theta0.keys() != theta.keys():
        only0, only1 = sorted(theta0.keys() - theta.keys()), sorted(theta.keys() - theta0.keys())
        raise ValueError(f"state dicts differ in keys: only in theta_0 {only0[:5]}, only in theta {only1[:5]}")
    out = {}
    for key, t in theta.items():
        t0 = theta0[key]
        if t0.shape != t.shape:
            raise ValueError(f"{key}: shape {tuple(t0.shape)} in theta_0 but {tuple(t.shape)} in theta")
        if alpha == 0.0 or (alpha < 0.5 and not t.is_floating_point()):
            out[key] = t0.to(dtype=t.dtype, copy=True)
        elif alpha == 1.0 or not t.is_floating_point():
            out[key] = t.clone()
        else:
            work = torch.promote_types(t.dtype, torch.float32)
            mixed = (1.0 - alpha) * t0.to(work) + alpha * t.to(device=t0.device, dtype=work)
            out[key] = mixed.to(t.dtype)
    return out


class WiSEFT(GuardsResults):
    """At fit end, score theta(alpha) for each alpha on the validation split and export the best.

    Writes `wiseft.json` (alpha and metrics per point), `wiseft.png` (accuracy and target NLL vs
    alpha) and `wiseft_export/` (the chosen alpha's model, with a model card at teardown) under
    `dirpath`, and logs the curve to
    TensorBoard as `wiseft/<metric>` with alpha in percent on the step axis. The live module gets
    its fine-tuned weights back afterwards, so later callbacks see the trained model.

    Args:
        alphas: mixing coefficients in [0, 1]; 0 is the initial model, 1 the fine-tuned one.
        source: fine-tuned weights to mix: `best` (ModelCheckpoint's best; the paper's selection)
            or `last` (the weights at the end of training).
        select: how to choose alpha: max `accuracy` or min target-NLL `loss`. Ties go to the
            smaller alpha, which stays closer to the initial model and so forgets less.
        export: write the chosen alpha's model with `save_pretrained`.
        dirpath: output directory; default the trainer's log directory.
        overwrite: replace the files of an earlier run in `dirpath` (otherwise the run stops at start).
    """

    def __init__(
        self,
        alphas: list[float] = list(DEFAULT_ALPHAS),
        source: Literal["best", "last"] = "best",
        select: Literal["accuracy", "loss"] = "accuracy",
        export: bool = True,
        dirpath: str | None = None,
        overwrite: bool = False,
    ) -> None:
        if not alphas:
            raise ValueError("WiSEFT.alphas needs at least one value")
        for alpha in alphas:
            if not 0.0 <= alpha <= 1.0:  # also rejects NaN
                raise ValueError(f"WiSEFT.alphas must lie in [0, 1], got {alpha}")
        if source not in ("best", "last"):
            raise ValueError(f"WiSEFT.source must be 'best' or 'last', got {source!r}")
        if select not in ("accuracy", "loss"):
            raise ValueError(f"WiSEFT.select must be 'accuracy' or 'loss', got {select!r}")
        self.alphas = sorted({float(a) for a in alphas})  # the curve reads left to right
        self.source = source
        self.select = select
        self.export = export
        self.dirpath = dirpath
        self.overwrite = overwrite
        self.results: list[dict[str, Any]] = []
        self.chosen_alpha: float | None = None
        self.exported_to: Path | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(alphas=self.alphas, source=self.source, select=self.select)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _require_full_weights(pl_module)  # fail before training, not after it
        if self.select == "accuracy" and not pl_module.hparams.generate:
            raise ValueError("WiSEFT(select='accuracy') needs model.generate: true; or use select: loss")
        super().on_fit_start(trainer, pl_module)

    def result_paths(self, trainer: L.Trainer) -> list[Path]:
        out = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)
        return [out / "wiseft.json", out / "wiseft.png", out / "wiseft_export"]

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _require_full_weights(pl_module)
        lm = pl_module.lm
        live = {k: v.detach().to("cpu", copy=True) for k, v in lm.state_dict().items()}
        theta, origin = live, "the weights at the end of training"
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if self.source == "best":
            if best:
                theta, origin = lm_state_from_checkpoint(best, pl_module.lm_prefix), f"best checkpoint {best}"
            else:
                origin += " (source=best, but no best checkpoint was saved)"
        theta0 = self._initial_state(pl_module)

        out = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)
        home = pl_module.device
        try:
            # Lightning moved the module to the CPU on teardown; score on the training device instead.
            pl_module.to(trainer.strategy.root_device)
            self.results = []
            for alpha in self.alphas:
                lm.load_state_dict(interpolate_state(theta0, theta, alpha))
                metrics = pl_module.evaluate("val", tag=f"wiseft_alpha{alpha:.2f}")
                self.results.append({"alpha": alpha, "metrics": {k: float(v) for k, v in metrics.items()}})
            self.chosen_alpha = self._choose()["alpha"]
            if trainer.is_global_zero:  # evaluate() gathered the metrics: every rank has them
                out.mkdir(parents=True, exist_ok=True)
                write_atomic(out / "wiseft.json", json.dumps(self.results, indent=2).encode())
                write_atomic(out / "wiseft.png", self._plot())
                self._log_tensorboard(trainer)
                if self.export:
                    lm.load_state_dict(interpolate_state(theta0, theta, self.chosen_alpha))
                    self.exported_to = export_pretrained(lm, pl_module.tokenizer, out / "wiseft_export")
        finally:
            lm.load_state_dict(live)
            pl_module.to(home)
        trainer.strategy.barrier("wiseft")
        rank_zero_info(self._table(origin, out))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # The card at teardown, as HFExport's: after every callback's fit-end numbers.
        if stage != "fit" or self.exported_to is None or trainer.interrupted:
            return
        chosen = next(r for r in self.results if r["alpha"] == self.chosen_alpha)["metrics"]
        initial = next((r["metrics"] for r in self.results if r["alpha"] == 0.0), {})  # alpha 0 is theta_0
        scores = [CardScore(f"val_{name}", f"val/{name} of the mix", initial.get(name, math.nan), value)
                  for name, value in chosen.items()]
        note = (f"WiSE-FT: (1 - alpha) theta_0 + alpha theta with alpha {self.chosen_alpha:g}, selected on "
                f"`{self.select}` over alphas {self.alphas}; theta: the `{self.source}` weights of the fine-tuning. "
                "Before fine-tuning is alpha 0 (the initial model). The run's general and drift numbers were "
                "measured on theta, not on this mix.")
        write_model_card(self.exported_to, describe_run(trainer, pl_module), scores, [note], tags=["wise-ft"])

    @staticmethod
    def _initial_state(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        """Reload theta_0 rather than keep a copy through training: no memory held, resume-safe."""
        return {k: v.detach().cpu() for k, v in pl_module.load_initial_lm().state_dict().items()}

    def _choose(self) -> dict[str, Any]:
        """The best result on `select`; a NaN metric ranks last."""
        def badness(result: dict[str, Any]) -> tuple[float, float]:
            metrics = result["metrics"]
            value = -metrics.get("accuracy", math.nan) if self.select == "accuracy" else metrics["loss"]
            return (math.inf if math.isnan(value) else value, result["alpha"])  # ties: smaller alpha

        return min(self.results, key=badness)

    def _log_tensorboard(self, trainer: L.Trainer) -> None:
        logger = trainer.logger
        if not isinstance(logger, TensorBoardLogger):
            return
        writer = logger.experiment
        for result in self.results:
            step = int(round(result["alpha"] * 100))
            for name, value in result["metrics"].items():
                writer.add_scalar(f"wiseft/{name}", value, global_step=step)
        writer.add_text("wiseft/alphas", f"alphas (x axis in percent): {self.alphas}; chosen: {self.chosen_alpha}")

    def _plot(self) -> bytes:
        # The object API renders with Agg without touching pyplot's global backend.
        from matplotlib.figure import Figure

        alphas = [r["alpha"] for r in self.results]
        panels = [("loss", "target NLL")]
        if all("accuracy" in r["metrics"] for r in self.results):
            panels.insert(0, ("accuracy", "validation accuracy"))
        fig = Figure(figsize=(5 * len(panels), 3.6), layout="constrained")
        for ax, (key, label) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
            ax.plot(alphas, [r["metrics"][key] for r in self.results], marker="o")
            ax.axvline(self.chosen_alpha, color="tab:red", linestyle="--", label=f"chosen alpha {self.chosen_alpha:g}")
            ax.set(xlabel="alpha (0: initial model, 1: fine-tuned)", ylabel=label)
            ax.legend()
        fig.suptitle("WiSE-FT: (1 - alpha) theta_0 + alpha theta")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        return buffer.getvalue()

    def _table(self, origin: str, out: Path) -> str:
        lines = [f"[wiseft] theta = {origin}; selected on {self.select}", "  alpha  accuracy  target NLL"]
        for r in self.results:
            acc = r["metrics"].get("accuracy")
            mark = "  <- chosen" if r["alpha"] == self.chosen_alpha else ""
            lines.append(f"  {r['alpha']:5.2f}  {'-' if acc is None else f'{acc:.3f}':>8}  {r['metrics']['loss']:10.4f}{mark}")
        if self.exported_to:
            lines.append(f"  exported alpha {self.chosen_alpha:g} to {self.exported_to}")
        lines.append(f"  curve: {out / 'wiseft.json'}, {out / 'wiseft.png'}; the live module keeps the fine-tuned weights")
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        return {"results": self.results, "chosen_alpha": self.chosen_alpha}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = list(state_dict.get("results", []))
        self.chosen_alpha = state_dict.get("chosen_alpha")


def _require_full_weights(pl_module: L.LightningModule) -> None:
    if hasattr(pl_module.lm, "peft_config"):
        raise ValueError("WiSE-FT needs full fine-tuning weights to interpolate; this run trains a peft (LoRA) adapter")
