"""WiSE-FT: weight-space ensembling of the initial and the fine-tuned model (Wortsman et al., 2022).

theta(alpha) = (1 - alpha) * theta_0 + alpha * theta, per parameter tensor, where theta_0 are the
pre-fine-tuning weights and theta the fine-tuned ones. A baseline of "SFT Doesn't Always Hurt
General Capabilities": interpolating back towards theta_0 trades domain accuracy for less
forgetting. At fit end every alpha is scored on the validation split and, where the run has them,
by GeneralBenchmarks (lm-eval, paired with the initial model) and ForgettingMonitor (drift on the
general prompts); one alpha is chosen by a rule that weighs both sides and its model is exported
as a Hugging Face directory. Every alpha is a row of the run summary and of the sweep table.
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

from callbacks.forgetting_monitor import PER_CATEGORY, ForgettingMonitor
from callbacks.forgetting_monitor import summary_columns as forgetting_columns
from callbacks.general_benchmarks import GeneralBenchmarks
from talr.checkpoint_io import lm_state_from_checkpoint
from talr.model_card import CardScore, describe_run, write_model_card
from talr.models import export_pretrained
from talr.results import GuardsResults, write_atomic

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
SELECT_RULES = ("general_within_margin", "accuracy", "loss")
MARGIN_TOLERANCE = 1e-9  # accuracies are counts over n rows: 0.334 - 0.324 is 0.010000000000000009 in floats


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


def alpha_tag(alpha: float) -> str:
    """The label of one alpha's files: `wiseft_alpha0.50` (generations, general benchmark records)."""
    return f"wiseft_alpha{alpha:.2f}"


def general_score_of(result: dict[str, Any]) -> float:
    """An alpha's general score: the first GeneralBenchmarks callback's (NaN where none was measured)."""
    entries = result.get("general") or [{}]
    value = entries[0].get("general_best", math.nan)
    return math.nan if value is None else float(value)


def choose_alpha(results: list[dict[str, Any]], select: str, margin: float = 0.01) -> tuple[dict[str, Any], str]:
    """The chosen result among `results` (each {"alpha", "metrics", "general"?}) and why, in one line.

    - `accuracy`: the highest domain accuracy; `loss`: the lowest target NLL.
    - `general_within_margin`: among the alphas whose domain accuracy is within `margin` of the
      best one, the highest general score; where none of them has a general score, `accuracy`.

    Ties go to the smaller alpha (closer to the initial model, so it forgets less); a NaN ranks last.
    """
    if select not in SELECT_RULES:
        raise ValueError(f"WiSEFT.select must be one of {', '.join(SELECT_RULES)}, got {select!r}")
    key = "loss" if select == "loss" else "accuracy"

    def domain_badness(result: dict[str, Any]) -> tuple[float, float]:
        value = result["metrics"].get(key, math.nan)
        value = value if key == "loss" else -value
        return (math.inf if math.isnan(value) else value, result["alpha"])

    best = min(results, key=domain_badness)
    top = best["metrics"].get(key, math.nan)
    if select == "loss":
        return best, f"chose alpha {best['alpha']:.2f}: lowest target NLL {top:.4f} (ties: the smaller alpha)"
    if select == "accuracy":
        return best, f"chose alpha {best['alpha']:.2f}: best domain accuracy {top:.3f} (ties: the smaller alpha)"
    within = [r for r in results if top - r["metrics"].get("accuracy", math.nan) <= margin + MARGIN_TOLERANCE]
    scored = [r for r in within if not math.isnan(general_score_of(r))]
    if not scored:
        why = ("no alpha has a general score (no GeneralBenchmarks callback, or every task left out)"
               if all(math.isnan(general_score_of(r)) for r in results)
               else f"no alpha within {margin:g} of it has a general score (WiSEFT.general_alphas)")
        return best, f"chose alpha {best['alpha']:.2f}: best domain accuracy {top:.3f}; {why}, so domain accuracy decides"
    chosen = max(scored, key=lambda r: (general_score_of(r), -r["alpha"]))
    return chosen, (f"chose alpha {chosen['alpha']:.2f}: best general score {general_score_of(chosen):.3f} among alphas "
                    f"within {margin:g} of the best domain accuracy {top:.3f} (alpha {best['alpha']:.2f})")


class WiSEFT(GuardsResults):
    """At fit end, score theta(alpha) for each alpha on the domain and the general side; export the chosen one.

    Each alpha gets `pl_module.evaluate("val")` (the domain metrics, generations in
    `generations/wiseft_alpha<alpha>.jsonl`), every ForgettingMonitor's drift on its general
    prompts (`measure`: nll_increase, kl, kl_calibrated, agreement, entropy) and, for the alphas in
    `general_alphas`, every GeneralBenchmarks' lm-eval record (`score_weights`: primary metrics,
    general score, per-document scores and the paired change from the initial model, in
    `<general dir>/wiseft_alpha<alpha>.json`). Those callbacks' own events, curves and logs are not
    touched: WiSE-FT uses only what they hold from train start (the initial model's record and
    answers) and hands the weights and the device back as it found them, so the order of the
    callbacks cannot change any result (tests/test_callback_contracts.py runs both orders).

    Writes `wiseft.json` (the rule, the choice and why, every alpha's numbers), `wiseft.png`
    (each measure against alpha) and `wiseft_export/` (the chosen alpha's model, with a model card at teardown) under `dirpath`,
    and logs the curve to TensorBoard as `wiseft/<metric>`, `wiseft/general/*` and
    `wiseft/forgetting/*` with alpha in percent on the step axis. `summary_scores` gives RunSummary
    one row per alpha (`wiseft`), in the sweep table's columns. The live module gets its
    fine-tuned weights back afterwards, so later callbacks see the trained model.

    Args:
        alphas: mixing coefficients in [0, 1]; 0 is the initial model, 1 the fine-tuned one.
        source: fine-tuned weights to mix: `best` (ModelCheckpoint's best; the paper's selection)
            or `last` (the weights at the end of training).
        select: how to choose alpha. `general_within_margin`: the best general score among the
            alphas whose domain accuracy is within `margin` of the best one (domain accuracy
            decides where none of them has a general score); `accuracy`: max domain accuracy;
            `loss`: min target NLL. Ties go to the smaller alpha, which forgets less.
        margin: the domain accuracy `general_within_margin` may give up (absolute, e.g. 0.01).
        general_alphas: the alphas GeneralBenchmarks scores (each costs one benchmark event, as
            long as the fit-start one); None: all. The others get domain and forgetting numbers only.
        export: write the chosen alpha's model with `save_pretrained`.
        dirpath: output directory; default the trainer's log directory.
        overwrite: replace the files of an earlier run in `dirpath` (otherwise the run stops at start).
    """

    def __init__(
        self,
        alphas: list[float] = list(DEFAULT_ALPHAS),
        source: Literal["best", "last"] = "best",
        select: Literal["general_within_margin", "accuracy", "loss"] = "general_within_margin",
        margin: float = 0.01,
        general_alphas: list[float] | None = None,
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
        if select not in SELECT_RULES:
            raise ValueError(f"WiSEFT.select must be one of {', '.join(SELECT_RULES)}, got {select!r}")
        if not margin >= 0.0 or math.isinf(margin):  # also rejects NaN
            raise ValueError(f"WiSEFT.margin must be a finite number >= 0, got {margin}")
        self.alphas = sorted({float(a) for a in alphas})  # the curve reads left to right
        if general_alphas is not None:
            outside = sorted({float(a) for a in general_alphas} - set(self.alphas))
            if outside:
                raise ValueError(f"WiSEFT.general_alphas {outside} are not in WiSEFT.alphas {self.alphas}")
        self.general_alphas = self.alphas if general_alphas is None else sorted({float(a) for a in general_alphas})
        self.source = source
        self.select = select
        self.margin = float(margin)
        self.export = export
        self.dirpath = dirpath
        self.overwrite = overwrite
        self.results: list[dict[str, Any]] = []
        self.chosen_alpha: float | None = None
        self.choice: str | None = None  # why that alpha, in one line
        self.exported_to: Path | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(alphas=self.alphas, source=self.source, select=self.select)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _require_full_weights(pl_module)  # fail before training, not after it
        if self.select != "loss" and not pl_module.hparams.generate:
            raise ValueError(f"WiSEFT(select={self.select!r}) needs the domain accuracy, so model.generate: true; "
                             "or use select: loss")
        super().on_fit_start(trainer, pl_module)

    def output_dir(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)

    def result_paths(self, trainer: L.Trainer) -> list[Path]:
        out = self.output_dir(trainer)
        general = [c.output_dir(trainer) / f"{alpha_tag(a)}.json"
                   for c in trainer.callbacks if isinstance(c, GeneralBenchmarks) for a in self.general_alphas]
        return [out / "wiseft.json", out / "wiseft.png", out / "wiseft_export", *general]

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _require_full_weights(pl_module)
        lm = pl_module.lm
        live = {k: v.detach().to("cpu", copy=True) for k, v in lm.state_dict().items()}
        theta, origin = live, "the weights at the end of training"
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if self.source == "best":
            if best:
                # the file's name only: the results name no machine-specific directory
                theta, origin = lm_state_from_checkpoint(best, pl_module.lm_prefix), f"best checkpoint {Path(best).name}"
            else:
                origin += " (source=best, but no best checkpoint was saved)"
        theta0 = self._initial_state(pl_module)
        benchmarks = [c for c in trainer.callbacks if isinstance(c, GeneralBenchmarks)]
        monitors = [c for c in trainer.callbacks if isinstance(c, ForgettingMonitor) and c.responses]

        out = self.output_dir(trainer)
        home = pl_module.device
        try:
            # Lightning moved the module to the CPU on teardown; score on the training device instead.
            pl_module.to(trainer.strategy.root_device)
            self.results = []
            for alpha in self.alphas:
                lm.load_state_dict(interpolate_state(theta0, theta, alpha))
                self.results.append(self._score(trainer, pl_module, alpha, origin, benchmarks, monitors))
            chosen, self.choice = choose_alpha(self.results, self.select, self.margin)
            self.chosen_alpha = chosen["alpha"]
            if trainer.is_global_zero:  # every rank has the numbers (evaluate gathers, the others broadcast)
                out.mkdir(parents=True, exist_ok=True)
                report = {"theta": origin, "select": self.select, "margin": self.margin,
                          "general_alphas": self.general_alphas, "chosen_alpha": self.chosen_alpha,
                          "choice": self.choice, "chosen": chosen, "results": self.results}
                write_atomic(out / "wiseft.json", json.dumps(report, indent=2))
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

    def _score(self, trainer: L.Trainer, pl_module: L.LightningModule, alpha: float, origin: str,
               benchmarks: list[GeneralBenchmarks], monitors: list[ForgettingMonitor]) -> dict[str, Any]:
        """One alpha's numbers, the module holding its weights: domain, forgetting, general benchmarks."""
        tag = alpha_tag(alpha)
        metrics = pl_module.evaluate("val", tag=tag)
        result: dict[str, Any] = {"alpha": alpha, "metrics": {k: float(v) for k, v in metrics.items()},
                                  "generations": f"generations/{tag}.jsonl",  # relative to the log directory
                                  "forgetting": [monitor.measure(trainer, pl_module) for monitor in monitors]}
        if benchmarks and alpha in self.general_alphas:
            weights = f"WiSE-FT alpha {alpha:.2f}: {1 - alpha:g} x initial model + {alpha:g} x {origin}"
            result["general"] = []
            for benchmark in benchmarks:
                record = benchmark.score_weights(trainer, pl_module, tag, weights)
                result["general"].append({"primary": record["primary"], "general": record["general"],
                                          **benchmark.summary_columns(record)})
        return result

    def summary_scores(self, best_step: int) -> dict[str, Any]:
        """One row per alpha for the run summary (`wiseft`), in the columns of a run's best checkpoint:
        `val_<metric>_best` (the domain metrics), `general_best` with its paired change from the initial
        model (`general_delta`, ...), `forgetting_<metric>_best`; with `alpha`, `wiseft_chosen` and the
        alpha's generations (`domain_generations_file`, relative to the log directory). Beside them,
        the chosen alpha (`wiseft_alpha`) and the rule (`wiseft_select`). Empty before fit end."""
        if not self.results:
            return {}
        benchmarked = any("general" in r for r in self.results)
        rows = []
        for result in self.results:
            row: dict[str, Any] = {"alpha": result["alpha"], "wiseft_chosen": result["alpha"] == self.chosen_alpha}
            row.update({f"val_{name}_best": value for name, value in result["metrics"].items()})
            row["domain_generations_file"] = result["generations"]
            if benchmarked and "general" not in result:
                row.update(general_best=math.nan, general_test="none: not benchmarked (WiSEFT.general_alphas)")
            for entry in result.get("general", []):
                row.update({k: v for k, v in entry.items() if k.startswith("general_")})
            for entry in result["forgetting"]:
                row.update(forgetting_columns(entry, "best"))
            rows.append(row)
        return {"wiseft": rows, "wiseft_alpha": self.chosen_alpha, "wiseft_select": self.select}

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
                "Before fine-tuning is alpha 0 (the initial model). This mix's general and drift numbers, "
                "every alpha's, are in wiseft.json beside this folder.")
        write_model_card(self.exported_to, describe_run(trainer, pl_module), scores, [note], tags=["wise-ft"])

    @staticmethod
    def _initial_state(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        """Reload theta_0 rather than keep a copy through training: no memory held, resume-safe."""
        return {k: v.detach().cpu() for k, v in pl_module.load_initial_lm().state_dict().items()}

    def _curves(self) -> dict[str, list[float]]:
        """Every measure against alpha, NaN where an alpha lacks it: the TensorBoard tags' names."""
        nan = math.nan
        curves: dict[str, list[float]] = {}
        names = dict.fromkeys(name for r in self.results for name in r["metrics"])
        for name in names:
            curves[f"wiseft/{name}"] = [r["metrics"].get(name, nan) for r in self.results]
        if any("general" in r for r in self.results):
            for tag, column in (("score", "general_best"), ("score_delta", "general_delta"),
                                ("score_delta_low", "general_delta_low"), ("score_delta_high", "general_delta_high")):
                curves[f"wiseft/general/{tag}"] = [(r.get("general") or [{}])[0].get(column, nan) for r in self.results]
            tasks = dict.fromkeys(t for r in self.results for e in r.get("general", []) for t in e["primary"])
            for task in tasks:
                curves[f"wiseft/general/{task}"] = [
                    next((e["primary"][task] for e in r.get("general", []) if task in e["primary"]), nan) for r in self.results]
        if any(r["forgetting"] for r in self.results):
            for key in PER_CATEGORY:
                curves[f"wiseft/forgetting/{key}"] = [r["forgetting"][0][key] if r["forgetting"] else nan for r in self.results]
        return {tag: [nan if v is None else float(v) for v in values] for tag, values in curves.items()}

    def _log_tensorboard(self, trainer: L.Trainer) -> None:
        logger = trainer.logger
        if not isinstance(logger, TensorBoardLogger):
            return
        writer = logger.experiment
        for tag, values in self._curves().items():
            for result, value in zip(self.results, values):
                if not math.isnan(value):
                    writer.add_scalar(tag, value, global_step=int(round(result["alpha"] * 100)))
        writer.add_text("wiseft/alphas", f"alphas (x axis in percent): {self.alphas}; {self.choice}")

    def _plot(self) -> bytes:
        # The object API renders with Agg without touching pyplot's global backend.
        from matplotlib.figure import Figure

        alphas = [r["alpha"] for r in self.results]
        curves = self._curves()
        wanted = [("wiseft/accuracy", "validation accuracy"), ("wiseft/loss", "target NLL"),
                  ("wiseft/general/score", "general score (lm-eval)"), ("wiseft/forgetting/kl", "KL drift on general prompts")]
        panels = [(tag, label) for tag, label in wanted if tag in curves and not all(math.isnan(v) for v in curves[tag])]
        fig = Figure(figsize=(5 * len(panels), 3.6), layout="constrained")
        for ax, (tag, label) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
            shown = [(a, v) for a, v in zip(alphas, curves[tag]) if not math.isnan(v)]
            ax.plot([a for a, _ in shown], [v for _, v in shown], marker="o")
            ax.axvline(self.chosen_alpha, color="tab:red", linestyle="--", label=f"chosen alpha {self.chosen_alpha:g}")
            ax.set(xlabel="alpha (0: initial model, 1: fine-tuned)", ylabel=label)
            ax.legend()
        fig.suptitle(f"WiSE-FT: (1 - alpha) theta_0 + alpha theta; select: {self.select}")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        return buffer.getvalue()

    def _table(self, origin: str, out: Path) -> str:
        curves = self._curves()
        columns = [("wiseft/accuracy", "accuracy", "{:.3f}"), ("wiseft/loss", "target NLL", "{:.4f}"),
                   ("wiseft/general/score", "general", "{:.4f}"), ("wiseft/general/score_delta", "change", "{:+.4f}"),
                   ("wiseft/forgetting/kl", "KL drift", "{:.4f}")]
        columns = [c for c in columns if c[0] in curves]
        lines = [f"[wiseft] theta = {origin}; select: {self.select}" + (f" (margin {self.margin:g})" if self.select == "general_within_margin" else ""),
                 "  alpha" + "".join(f"  {name:>10}" for _, name, _ in columns)]
        for i, r in enumerate(self.results):
            cells = ["-" if math.isnan(curves[tag][i]) else form.format(curves[tag][i]) for tag, _, form in columns]
            mark = "  <- chosen" if r["alpha"] == self.chosen_alpha else ""
            lines.append(f"  {r['alpha']:5.2f}" + "".join(f"  {cell:>10}" for cell in cells) + mark)
        lines.append(f"  {self.choice}")
        if self.exported_to:
            lines.append(f"  exported alpha {self.chosen_alpha:g} to {self.exported_to}")
        lines.append(f"  curve: {out / 'wiseft.json'}, {out / 'wiseft.png'}; the live module keeps the fine-tuned weights")
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        return {"results": self.results, "chosen_alpha": self.chosen_alpha, "choice": self.choice}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = list(state_dict.get("results", []))
        self.chosen_alpha = state_dict.get("chosen_alpha")
        self.choice = state_dict.get("choice")


def _require_full_weights(pl_module: L.LightningModule) -> None:
    if hasattr(pl_module.lm, "peft_config"):
        raise ValueError("WiSE-FT needs full fine-tuning weights to interpolate; this run trains a peft (LoRA) adapter")
