"""Weight-space baselines between the initial and the fine-tuned model, scored at fit end.

- WiSE-FT (Wortsman et al., 2022, arXiv 2109.01903): theta(alpha) = (1 - alpha) * theta_0 + alpha * theta,
  per parameter tensor, where theta_0 are the pre-fine-tuning weights and theta the fine-tuned ones. A
  baseline of "SFT Doesn't Always Hurt General Capabilities": interpolating back towards theta_0 trades
  domain accuracy for less forgetting.
- Task-vector merging, TIES (Yadav et al., 2023, arXiv 2306.01708) and DARE (Yu et al., 2023, arXiv
  2311.03099): theta_0 + lambda * merge([theta - theta_0], density), through peft's merge utilities.

Both are a grid of candidate weight sets built from theta_0 and theta (`WeightSpaceSearch`): at fit end
every candidate is scored on the validation split and, where the run has them, by GeneralBenchmarks
(lm-eval, paired with the initial model) and ForgettingMonitor (drift on the general prompts); one is
chosen by a rule that weighs both sides and its model is exported as a Hugging Face directory with a
model card. Every candidate is a row of the run summary and of the sweep table.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from peft.utils import merge_utils

from callbacks.forgetting_monitor import PER_CATEGORY, ForgettingMonitor
from callbacks.forgetting_monitor import summary_columns as forgetting_columns
from callbacks.general_benchmarks import GeneralBenchmarks
from callbacks.run_summary import RunSummary
from talr.checkpoint_io import lm_state_from_checkpoint
from talr.evaluation import describe_metrics
from talr.model_card import CardScore, describe_run, write_model_card
from talr.models import export_pretrained
from talr.progress import track
from talr.results import GuardsResults, write_atomic

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
SELECT_RULES = ("general_within_margin", "accuracy", "loss")
MARGIN_TOLERANCE = 1e-9  # accuracies are counts over n rows: 0.334 - 0.324 is 0.010000000000000009 in floats
# peft's single-adapter merges by name; each takes ([task tensors], weights, density)
MERGE_METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "ties": merge_utils.ties, "dare_linear": merge_utils.dare_linear, "dare_ties": merge_utils.dare_ties}


def _check_same_layout(theta0: dict[str, torch.Tensor], theta: dict[str, torch.Tensor]) -> None:
    if theta0.keys() != theta.keys():
        only0, only1 = sorted(theta0.keys() - theta.keys()), sorted(theta.keys() - theta0.keys())
        raise ValueError(f"state dicts differ in keys: only in theta_0 {only0[:5]}, only in theta {only1[:5]}")
    for key, t in theta.items():
        if theta0[key].shape != t.shape:
            raise ValueError(f"{key}: shape {tuple(theta0[key].shape)} in theta_0 but {tuple(t.shape)} in theta")


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
    _check_same_layout(theta0, theta)
    out = {}
    for key, t in theta.items():
        t0 = theta0[key]
        if alpha == 0.0 or (alpha < 0.5 and not t.is_floating_point()):
            out[key] = t0.to(dtype=t.dtype, copy=True)
        elif alpha == 1.0 or not t.is_floating_point():
            out[key] = t.clone()
        else:
            work = torch.promote_types(t.dtype, torch.float32)
            mixed = (1.0 - alpha) * t0.to(work) + alpha * t.to(device=t0.device, dtype=work)
            out[key] = mixed.to(t.dtype)
    return out


def merge_task_vector(theta0: dict[str, torch.Tensor], theta: dict[str, torch.Tensor], method: str,
                      density: float, weight: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """theta_0 + weight * merge([tau], density) for every tensor, tau = theta - theta_0, in theta's dtype.

    `merge` is peft's `peft.utils.merge_utils.<method>` applied per tensor to the one task vector:

    - `ties` (TIES-Merging): keep the top `density` share of tau's entries by magnitude
      (floor(density x numel) per tensor), elect each entry's sign across the task vectors, average the
      entries that agree. With one task vector every kept entry agrees with its own sign and the mean
      of one is itself: TIES is magnitude pruning, theta_0 + weight * top_density(|tau|).
    - `dare_linear` (DARE): drop each entry with probability 1 - density, divide the survivors by
      density (tau's expectation is kept), add them up: random pruning with rescaling.
    - `dare_ties`: DARE's drop and rescale, then TIES's sign election and mean; with one task vector
      it is `dare_linear` (the same drops under the same seed).

    DARE's drops are drawn from torch's CPU generator seeded with `seed` once per call, tensors in
    theta's order, inside `torch.random.fork_rng` (training's random stream is not touched): every rank
    and every weight of a (method, density) gets the same mask. The arithmetic runs in at least
    float32. Weight 0 copies theta_0, and density 1 with weight 1 copies theta, bit for bit; tensors
    that are not floating point (integer buffers) come from theta.
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"merge method must be one of {', '.join(MERGE_METHODS)}, got {method!r}")
    if not 0.0 < density <= 1.0:  # also rejects NaN; density 0 would divide DARE's survivors by 0
        raise ValueError(f"density must be in (0, 1], got {density}")
    if not math.isfinite(weight):
        raise ValueError(f"weight must be a finite number, got {weight}")
    _check_same_layout(theta0, theta)
    merge = MERGE_METHODS[method]
    out = {}
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        # density 1 is a valid point of the grid (WiSE-FT's alpha = weight), not the mistake peft warns of
        warnings.filterwarnings("ignore", message=r"The density .* no pruning will be performed")
        for key, t in theta.items():
            t0 = theta0[key]
            if weight == 0.0:
                out[key] = t0.to(dtype=t.dtype, copy=True)
            elif not t.is_floating_point() or (density == 1.0 and weight == 1.0):
                out[key] = t.clone()
            else:
                work = torch.promote_types(t.dtype, torch.float32)
                start = t0.to(work)
                merged = merge([t.to(device=t0.device, dtype=work) - start], torch.tensor([weight], dtype=work), density)
                out[key] = (start + merged).to(t.dtype)
    return out


def general_score_of(result: dict[str, Any]) -> float:
    """A candidate's general score: the first GeneralBenchmarks callback's (NaN where none was measured)."""
    entries = result.get("general") or [{}]
    value = entries[0].get("general_best", math.nan)
    return math.nan if value is None else float(value)


@dataclass(frozen=True)
class GridTerms:
    """How a grid's points read in the choice's one-line reason, and which of two equal points wins.

    `closeness` orders the points from the nearest to theta_0 outwards; ties go to the nearer one,
    which forgets less."""

    point: str  # one point: "alpha"
    points: str  # several: "alphas"
    label: Callable[[dict[str, Any]], str]  # "alpha 0.50"
    closeness: Callable[[dict[str, Any]], tuple]
    tie: str  # who wins a tie, in words: "the smaller alpha"
    general_option: str  # the option that leaves points out of the general benchmarks


WISEFT_TERMS = GridTerms("alpha", "alphas", lambda r: f"alpha {r['alpha']:.2f}", lambda r: (r["alpha"],),
                         "the smaller alpha", "WiSEFT.general_alphas")
MERGE_TERMS = GridTerms(
    "grid point", "grid points",
    lambda r: f"{r['merge_method']} density {r['merge_density']:.2f} weight {r['merge_weight']:.2f}",
    lambda r: (r["merge_weight"], r["merge_density"], list(MERGE_METHODS).index(r["merge_method"])),
    "the smaller weight, then the smaller density", "TaskVectorMerge.general_weights")


def choose_candidate(results: list[dict[str, Any]], select: str, margin: float,
                     terms: GridTerms, domain_metric: str = "accuracy") -> tuple[dict[str, Any], str]:
    """The chosen result among `results` (each {<coordinates>, "metrics", "general"?}) and why, in one line.

    - `accuracy`: the highest domain score; `loss`: the lowest target NLL.
    - `general_within_margin`: among the points whose domain score is within `margin` of the
      best one, the highest general score; where none of them has a general score, `accuracy`.

    The domain score is the validation metric `domain_metric` (higher is better): the greedy answers'
    accuracy by default; on a task with unbalanced classes whose greedy answers stay near one class
    (ESCI at 135M), a ranking metric such as `label_auc`, which raw accuracy would not reward.
    Ties go to the point nearest theta_0 (`terms.closeness`); a NaN ranks last.
    """
    if select not in SELECT_RULES:
        raise ValueError(f"select must be one of {', '.join(SELECT_RULES)}, got {select!r}")
    key = "loss" if select == "loss" else domain_metric
    name = terms.label

    def domain_badness(result: dict[str, Any]) -> tuple[float, tuple]:
        value = result["metrics"].get(key, math.nan)
        value = value if key == "loss" else -value
        return (math.inf if math.isnan(value) else value, terms.closeness(result))

    best = min(results, key=domain_badness)
    top = best["metrics"].get(key, math.nan)
    if select == "loss":
        return best, f"chose {name(best)}: lowest target NLL {top:.4f} (ties: {terms.tie})"
    if select == "accuracy":
        return best, f"chose {name(best)}: best domain {domain_metric} {top:.3f} (ties: {terms.tie})"
    within = [r for r in results if top - r["metrics"].get(key, math.nan) <= margin + MARGIN_TOLERANCE]
    scored = [r for r in within if not math.isnan(general_score_of(r))]
    if not scored:
        why = (f"no {terms.point} has a general score (no GeneralBenchmarks callback, or every task left out)"
               if all(math.isnan(general_score_of(r)) for r in results)
               else f"no {terms.point} within {margin:g} of it has a general score ({terms.general_option})")
        return best, f"chose {name(best)}: best domain {domain_metric} {top:.3f}; {why}, so domain {domain_metric} decides"
    chosen = min(scored, key=lambda r: (-general_score_of(r), terms.closeness(r)))
    return chosen, (f"chose {name(chosen)}: best general score {general_score_of(chosen):.3f} among {terms.points} "
                    f"within {margin:g} of the best domain {domain_metric} {top:.3f} ({name(best)})")


def choose_alpha(results: list[dict[str, Any]], select: str, margin: float = 0.01,
                 domain_metric: str = "accuracy") -> tuple[dict[str, Any], str]:
    """WiSE-FT's choice among `results` (each {"alpha", "metrics", "general"?}): `choose_candidate`,
    ties to the smaller alpha."""
    return choose_candidate(results, select, margin, WISEFT_TERMS, domain_metric)


class WeightSpaceSearch(GuardsResults):
    """At fit end, score candidate weight sets built from theta_0 and theta on the domain and the general
    side, choose one, export it: the machinery WiSEFT and TaskVectorMerge share.

    A subclass names its grid (`grid`: each point's coordinates, in the order they are scored and
    drawn; `build`: the point's state dict from theta_0 and theta) and how its files, curves and card
    read. Each point gets `pl_module.evaluate("val")` (the domain metrics, generations in
    `generations/<tag>.jsonl`), every ForgettingMonitor's drift on its general prompts (`measure`) and,
    where `benchmarked` says so, every GeneralBenchmarks' lm-eval record (`score_weights`, in
    `<general dir>/<tag>.json`). Those callbacks' own events, curves and logs are not touched: the
    search uses only what they hold from train start (the initial model's record and answers) and
    hands the weights and the device back as it found them, so the order of the callbacks cannot
    change any result (tests/test_callback_contracts.py runs both orders).

    Writes `<name>.json` (the rule, the choice and why, every point's numbers), `<name>.png` (each
    measure against the x coordinate) and `<name>_export/` (the chosen point's model, with a model
    card at teardown) under `dirpath`, logs the curves to TensorBoard as `<name>/[<series>/]<metric>`
    with x in percent on the step axis, and gives RunSummary one row per point under `<name>`
    (`summary_scores`). The live module gets its fine-tuned weights back afterwards. theta_0, theta
    and each candidate are whole state dicts on the CPU of every rank, built the same way on each (DDP:
    every rank scores the same candidate, `evaluate` gathers). Sharded weights (FSDP2) are not handled:
    the live state dict would be shards.
    """

    name: str  # files, TensorBoard tags and the summary's key
    coordinates: tuple[str, ...]  # a point's keys, in its results and summary rows
    terms: GridTerms
    x_label: str  # the plot's x axis
    title: str  # the plot's title
    card_tags: tuple[str, ...] = ()

    def __init__(self, source: str, select: str, margin: float, export: bool, dirpath: str | None,
                 overwrite: bool, domain_metric: str = "accuracy") -> None:
        owner = type(self).__name__
        if source not in ("best", "last"):
            raise ValueError(f"{owner}.source must be 'best' or 'last', got {source!r}")
        if select not in SELECT_RULES:
            raise ValueError(f"{owner}.select must be one of {', '.join(SELECT_RULES)}, got {select!r}")
        if not margin >= 0.0 or math.isinf(margin):  # also rejects NaN
            raise ValueError(f"{owner}.margin must be a finite number >= 0, got {margin}")
        if not domain_metric or domain_metric.startswith("val/") or domain_metric == "loss":
            raise ValueError(f"{owner}.domain_metric: a validation metric that grows with the domain score, named "
                             f"without val/ (accuracy, balanced_accuracy, label_auc, ...), got {domain_metric!r}; "
                             "for the target NLL use select: loss")
        self.source = source
        self.select = select
        self.margin = float(margin)
        self.domain_metric = domain_metric
        self.export = export
        self.dirpath = dirpath
        self.overwrite = overwrite
        self.results: list[dict[str, Any]] = []
        self.chosen: dict[str, Any] | None = None  # the chosen point's coordinates
        self.choice: str | None = None  # why that point, in one line
        self.exported_to: Path | None = None

    # -- what a subclass defines ----------------------------------------------------------------------
    def grid(self) -> list[dict[str, Any]]:
        """Every point's coordinates (`coordinates` keys), in the order they are scored and drawn."""
        raise NotImplementedError

    def build(self, theta0: dict[str, torch.Tensor], theta: dict[str, torch.Tensor],
              point: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The point's weights."""
        raise NotImplementedError

    def tag(self, point: dict[str, Any]) -> str:
        """The point's file label: generations and general benchmark records."""
        raise NotImplementedError

    def weights_text(self, point: dict[str, Any], origin: str) -> str:
        """What the point's weights are, in words, for its general benchmark record."""
        raise NotImplementedError

    def benchmarked(self, point: dict[str, Any]) -> bool:
        """Whether GeneralBenchmarks scores the point."""
        raise NotImplementedError

    def curve(self, point: dict[str, Any]) -> tuple[str, float]:
        """The point's curve (`""`: the only one) and its x on it."""
        raise NotImplementedError

    def is_initial(self, point: dict[str, Any]) -> bool:
        """Whether the point's weights are theta_0 (its numbers are the card's 'before fine-tuning')."""
        return False

    def report_fields(self) -> dict[str, Any]:
        """The grid's options for `<name>.json`."""
        return {}

    def summary_fields(self) -> dict[str, Any]:
        """The run summary's columns of the choice, beside the rows."""
        return {}

    def card_note(self) -> str:
        """The card's paragraph on how the exported weights were made and chosen."""
        raise NotImplementedError

    # -- the shared machinery -------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(grid=self.grid(), source=self.source, select=self.select)

    def point_of(self, result: dict[str, Any]) -> dict[str, Any]:
        return {key: result[key] for key in self.coordinates}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _require_full_weights(pl_module, type(self).__name__)  # fail before training, not after it
        if self.select != "loss" and self.domain_metric == "accuracy" and not pl_module.hparams.generate:
            raise ValueError(f"{type(self).__name__}(select={self.select!r}) needs the domain accuracy, so "
                             "model.generate: true; or use select: loss")
        super().on_fit_start(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the first validation names the task's metrics: a domain_metric it lacks stops the run here, not at fit end
        if self.select == "loss" or trainer.sanity_checking:
            return
        logged = sorted(k.removeprefix("val/") for k in trainer.callback_metrics if k.startswith("val/"))
        if logged and self.domain_metric not in logged:
            raise ValueError(f"{type(self).__name__}.domain_metric {self.domain_metric!r} is not a metric of this "
                             f"task's validation; it logs {', '.join(logged)}")

    def output_dir(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)

    def result_paths(self, trainer: L.Trainer) -> list[Path]:
        out = self.output_dir(trainer)
        general = [c.output_dir(trainer) / f"{self.tag(p)}.json" for c in trainer.callbacks
                   if isinstance(c, GeneralBenchmarks) for p in self.grid() if self.benchmarked(p)]
        return [out / f"{self.name}.json", out / f"{self.name}.png", out / f"{self.name}_export", *general]

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _require_full_weights(pl_module, type(self).__name__)
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
            # each mix is a validation, a forgetting pass and maybe a benchmark pass (minutes each on a CPU):
            # a line per mix, so a log file shows the curve as it is computed
            for point in track(self.grid(), desc=self.name, unit="mix", enabled=trainer.is_global_zero):
                lm.load_state_dict(self.build(theta0, theta, point))
                self.results.append(self._score(trainer, pl_module, point, origin, benchmarks, monitors))
                rank_zero_info(f"[{self.name}] {self.tag(point)}: {describe_metrics(self.results[-1]['metrics'])}")
            chosen, self.choice = choose_candidate(self.results, self.select, self.margin, self.terms,
                                                   self.domain_metric)
            self.chosen = self.point_of(chosen)
            if trainer.is_global_zero:  # every rank has the numbers (evaluate gathers, the others broadcast)
                out.mkdir(parents=True, exist_ok=True)
                report = {"theta": origin, "select": self.select, "margin": self.margin,
                          "domain_metric": self.domain_metric, **self.report_fields(),
                          "choice": self.choice, "chosen": chosen, "results": self.results}
                write_atomic(out / f"{self.name}.json", json.dumps(report, indent=2))
                write_atomic(out / f"{self.name}.png", self._plot())
                self._log_tensorboard(trainer)
                if self.export:
                    lm.load_state_dict(self.build(theta0, theta, self.chosen))
                    self.exported_to = export_pretrained(lm, pl_module.tokenizer, out / f"{self.name}_export")
        finally:
            lm.load_state_dict(live)
            pl_module.to(home)
        trainer.strategy.barrier(self.name)
        rank_zero_info(self._table(origin, out))

    def _score(self, trainer: L.Trainer, pl_module: L.LightningModule, point: dict[str, Any], origin: str,
               benchmarks: list[GeneralBenchmarks], monitors: list[ForgettingMonitor]) -> dict[str, Any]:
        """One point's numbers, the module holding its weights: domain, forgetting, general benchmarks."""
        tag = self.tag(point)
        metrics = pl_module.evaluate("val", tag=tag)
        result: dict[str, Any] = {**point, "metrics": {k: float(v) for k, v in metrics.items()},
                                  "generations": f"generations/{tag}.jsonl",  # relative to the log directory
                                  "forgetting": [monitor.measure(trainer, pl_module, tag) for monitor in monitors]}
        if benchmarks and self.benchmarked(point):
            result["general"] = []
            for benchmark in benchmarks:
                record = benchmark.score_weights(trainer, pl_module, tag, self.weights_text(point, origin))
                result["general"].append({"primary": record["primary"], "general": record["general"],
                                          **benchmark.summary_columns(record)})
        return result

    def summary_scores(self, best_step: int) -> dict[str, Any]:
        """One row per point for the run summary (under `name`), in the columns of a run's best checkpoint:
        `val_<metric>_best` (the domain metrics), `general_best` with its paired change from the initial
        model (`general_delta`, ...), `forgetting_<metric>_best`; with the point's coordinates,
        `<name>_chosen` and its generations (`domain_generations_file`, relative to the log directory).
        Beside them, the choice (`summary_fields`). Empty before fit end."""
        if not self.results:
            return {}
        benchmarked = any("general" in r for r in self.results)
        rows = []
        for result in self.results:
            point = self.point_of(result)
            row: dict[str, Any] = {**point, f"{self.name}_chosen": point == self.chosen}
            row.update({f"val_{name}_best": value for name, value in result["metrics"].items()})
            row["domain_generations_file"] = result["generations"]
            if benchmarked and "general" not in result:
                row.update(general_best=math.nan, general_test=f"none: not benchmarked ({self.terms.general_option})")
            for entry in result.get("general", []):
                row.update({k: v for k, v in entry.items() if k.startswith("general_")})
            for entry in result["forgetting"]:
                row.update(forgetting_columns(entry, "best"))
            rows.append(row)
        return {self.name: rows, **self.summary_fields()}

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # The card at teardown, as HFExport's: after every callback's fit-end numbers.
        if stage != "fit" or self.exported_to is None or trainer.interrupted:
            return
        chosen = next(r for r in self.results if self.point_of(r) == self.chosen)["metrics"]
        initial = self._initial_metrics(trainer)
        scores = [CardScore(f"val_{name}", f"val/{name} of these weights", initial.get(name, math.nan), value)
                  for name, value in chosen.items()]
        write_model_card(self.exported_to, describe_run(trainer, pl_module), scores, [self.card_note()],
                         tags=list(self.card_tags))

    def _initial_metrics(self, trainer: L.Trainer) -> dict[str, float]:
        """theta_0's domain metrics: a point that is theta_0, else the run's validation before fine-tuning
        (RunSummary's step 0; empty without validate-before-fit)."""
        for result in self.results:
            if self.is_initial(self.point_of(result)):
                return result["metrics"]
        summary = next((c for c in trainer.callbacks if isinstance(c, RunSummary)), None)
        first = next((e for e in summary.history if e["step"] == 0), {}) if summary else {}
        return {k.removeprefix("val/"): v for k, v in first.items() if k.startswith("val/")}

    @staticmethod
    def _initial_state(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        """Reload theta_0 rather than keep a copy through training: no memory held, resume-safe."""
        return {k: v.detach().cpu() for k, v in pl_module.load_initial_lm().state_dict().items()}

    def _curves_by_series(self) -> dict[str, tuple[list[float], dict[str, list[float]]]]:
        """Per curve: its x values and every measure on it (`accuracy`, `general/score`, `forgetting/kl`, ...)."""
        series: dict[str, list[dict[str, Any]]] = {}
        for result in self.results:
            series.setdefault(self.curve(self.point_of(result))[0], []).append(result)
        return {name: ([self.curve(self.point_of(r))[1] for r in results], _curves(results))
                for name, results in series.items()}

    def _log_tensorboard(self, trainer: L.Trainer) -> None:
        logger = trainer.logger
        if not isinstance(logger, TensorBoardLogger):
            return
        writer = logger.experiment
        for series, (xs, curves) in self._curves_by_series().items():
            for measure, values in curves.items():
                tag = "/".join(part for part in (self.name, series, measure) if part)
                for x, value in zip(xs, values):
                    if not math.isnan(value):
                        writer.add_scalar(tag, value, global_step=int(round(x * 100)))
        writer.add_text(f"{self.name}/grid", f"{self.terms.points}: {len(self.results)} (x axis: {self.x_label}, "
                                             f"in percent); {self.choice}")

    def _plot(self) -> bytes:
        # The object API renders with Agg without touching pyplot's global backend.
        from matplotlib.figure import Figure

        by_series = self._curves_by_series()
        wanted = [("accuracy", "validation accuracy"), ("loss", "target NLL"),
                  ("general/score", "general score (lm-eval)"), ("forgetting/kl", "KL drift on general prompts")]
        panels = [(measure, label) for measure, label in wanted
                  if any(not all(math.isnan(v) for v in curves.get(measure, [math.nan])) for _, curves in by_series.values())]
        chosen_x = self.curve(self.chosen)[1]
        fig = Figure(figsize=(5 * len(panels), 3.6), layout="constrained")
        for ax, (measure, label) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
            for series, (xs, curves) in by_series.items():
                shown = [(x, v) for x, v in zip(xs, curves.get(measure, [])) if not math.isnan(v)]
                ax.plot([x for x, _ in shown], [v for _, v in shown], marker="o", label=series or None)
            ax.axvline(chosen_x, color="tab:red", linestyle="--", label=f"chosen: {self.terms.label(self.chosen)}")
            ax.set(xlabel=self.x_label, ylabel=label)
            ax.legend(fontsize=7)
        fig.suptitle(f"{self.title}; select: {self.select}")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        return buffer.getvalue()

    def _table(self, origin: str, out: Path) -> str:
        curves = _curves(self.results)
        columns = [("accuracy", "accuracy", "{:.3f}"), ("loss", "target NLL", "{:.4f}"),
                   ("general/score", "general", "{:.4f}"), ("general/score_delta", "change", "{:+.4f}"),
                   ("forgetting/kl", "KL drift", "{:.4f}")]
        columns = [c for c in columns if c[0] in curves]
        labels = [self.terms.label(self.point_of(r)) for r in self.results]
        width = max(map(len, labels))
        lines = [f"[{self.name}] theta = {origin}; select: {self.select}"
                 + (f" (margin {self.margin:g})" if self.select == "general_within_margin" else ""),
                 f"  {self.terms.point:<{width}}" + "".join(f"  {name:>10}" for _, name, _ in columns)]
        for i, (result, label) in enumerate(zip(self.results, labels)):
            cells = ["-" if math.isnan(curves[m][i]) else form.format(curves[m][i]) for m, _, form in columns]
            mark = "  <- chosen" if self.point_of(result) == self.chosen else ""
            lines.append(f"  {label:<{width}}" + "".join(f"  {cell:>10}" for cell in cells) + mark)
        lines.append(f"  {self.choice}")
        if self.exported_to:
            lines.append(f"  exported {self.terms.label(self.chosen)} to {self.exported_to}")
        lines.append(f"  curves: {out / f'{self.name}.json'}, {out / f'{self.name}.png'}; "
                     "the live module keeps the fine-tuned weights")
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        return {"results": self.results, "chosen": self.chosen, "choice": self.choice}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = list(state_dict.get("results", []))
        self.chosen = state_dict.get("chosen")
        self.choice = state_dict.get("choice")


def _curves(results: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Every measure across `results`, NaN where a point lacks it: `accuracy`, `general/score`, `forgetting/kl`, ..."""
    nan = math.nan
    curves: dict[str, list[float]] = {}
    for name in dict.fromkeys(name for r in results for name in r["metrics"]):
        curves[name] = [r["metrics"].get(name, nan) for r in results]
    if any("general" in r for r in results):
        for tag, column in (("score", "general_best"), ("score_delta", "general_delta"),
                            ("score_delta_low", "general_delta_low"), ("score_delta_high", "general_delta_high")):
            curves[f"general/{tag}"] = [(r.get("general") or [{}])[0].get(column, nan) for r in results]
        tasks = dict.fromkeys(t for r in results for e in r.get("general", []) for t in e["primary"])
        for task in tasks:
            curves[f"general/{task}"] = [
                next((e["primary"][task] for e in r.get("general", []) if task in e["primary"]), nan) for r in results]
    if any(r["forgetting"] for r in results):
        for key in PER_CATEGORY:
            curves[f"forgetting/{key}"] = [r["forgetting"][0][key] if r["forgetting"] else nan for r in results]
    return {tag: [nan if v is None else float(v) for v in values] for tag, values in curves.items()}


def alpha_tag(alpha: float) -> str:
    """The label of one alpha's files: `wiseft_alpha0.50` (generations, general benchmark records)."""
    return f"wiseft_alpha{alpha:.2f}"


class WiSEFT(WeightSpaceSearch):
    """At fit end, score theta(alpha) = (1 - alpha) theta_0 + alpha theta for each alpha on the domain and
    the general side; export the chosen one (`WeightSpaceSearch`).

    Each alpha gets the domain metrics (generations in `generations/wiseft_alpha<alpha>.jsonl`), every
    ForgettingMonitor's drift (nll_increase, kl, kl_calibrated, agreement, entropy) and, for the alphas
    in `general_alphas`, every GeneralBenchmarks' lm-eval record (primary metrics, general score,
    per-document scores and the paired change from the initial model, in
    `<general dir>/wiseft_alpha<alpha>.json`).

    Writes `wiseft.json`, `wiseft.png` and `wiseft_export/` under `dirpath`, and logs the curve to
    TensorBoard as `wiseft/<metric>`, `wiseft/general/*` and `wiseft/forgetting/*` with alpha in
    percent on the step axis. `summary_scores` gives RunSummary one row per alpha (`wiseft`), in the
    sweep table's columns, with `wiseft_alpha` (the chosen one) and `wiseft_select` beside them.

    Args:
        alphas: mixing coefficients in [0, 1]; 0 is the initial model, 1 the fine-tuned one.
        source: fine-tuned weights to mix: `best` (ModelCheckpoint's best; the paper's selection)
            or `last` (the weights at the end of training).
        select: how to choose alpha. `general_within_margin`: the best general score among the
            alphas whose domain score (`domain_metric`) is within `margin` of the best one (the
            domain score decides where none of them has a general score); `accuracy`: max domain
            score; `loss`: min target NLL. Ties go to the smaller alpha, which forgets less.
        margin: the domain score `general_within_margin` may give up (absolute, e.g. 0.01).
        domain_metric: the validation metric that is the domain score (higher is better), named without
            `val/`: `accuracy` (the greedy answers'), or e.g. `label_auc` where the classes are
            unbalanced and greedy answers stay near one class (`choose_candidate`).
        general_alphas: the alphas GeneralBenchmarks scores (each costs one benchmark event, as
            long as the fit-start one); None: all. The others get domain and forgetting numbers only.
        export: write the chosen alpha's model with `save_pretrained`.
        dirpath: output directory; default the trainer's log directory.
        overwrite: replace the files of an earlier run in `dirpath` (otherwise the run stops at start).
    """

    name = "wiseft"
    coordinates = ("alpha",)
    terms = WISEFT_TERMS
    x_label = "alpha (0: initial model, 1: fine-tuned)"
    title = "WiSE-FT: (1 - alpha) theta_0 + alpha theta"
    card_tags = ("wise-ft",)

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
        domain_metric: str = "accuracy",
    ) -> None:
        if not alphas:
            raise ValueError("WiSEFT.alphas needs at least one value")
        for alpha in alphas:
            if not 0.0 <= alpha <= 1.0:  # also rejects NaN
                raise ValueError(f"WiSEFT.alphas must lie in [0, 1], got {alpha}")
        super().__init__(source, select, margin, export, dirpath, overwrite, domain_metric)
        self.alphas = sorted({float(a) for a in alphas})  # the curve reads left to right
        if general_alphas is not None:
            outside = sorted({float(a) for a in general_alphas} - set(self.alphas))
            if outside:
                raise ValueError(f"WiSEFT.general_alphas {outside} are not in WiSEFT.alphas {self.alphas}")
        self.general_alphas = self.alphas if general_alphas is None else sorted({float(a) for a in general_alphas})

    @property
    def chosen_alpha(self) -> float | None:
        return None if self.chosen is None else self.chosen["alpha"]

    @chosen_alpha.setter
    def chosen_alpha(self, alpha: float | None) -> None:
        self.chosen = None if alpha is None else {"alpha": alpha}

    @property
    def state_key(self) -> str:  # as before the shared base: earlier checkpoints' callback state still matches
        return self._generate_state_key(alphas=self.alphas, source=self.source, select=self.select)

    def grid(self) -> list[dict[str, Any]]:
        return [{"alpha": alpha} for alpha in self.alphas]

    def build(self, theta0: dict[str, torch.Tensor], theta: dict[str, torch.Tensor],
              point: dict[str, Any]) -> dict[str, torch.Tensor]:
        return interpolate_state(theta0, theta, point["alpha"])

    def tag(self, point: dict[str, Any]) -> str:
        return alpha_tag(point["alpha"])

    def weights_text(self, point: dict[str, Any], origin: str) -> str:
        alpha = point["alpha"]
        return f"WiSE-FT alpha {alpha:.2f}: {1 - alpha:g} x initial model + {alpha:g} x {origin}"

    def benchmarked(self, point: dict[str, Any]) -> bool:
        return point["alpha"] in self.general_alphas

    def curve(self, point: dict[str, Any]) -> tuple[str, float]:
        return "", point["alpha"]

    def is_initial(self, point: dict[str, Any]) -> bool:
        return point["alpha"] == 0.0

    def report_fields(self) -> dict[str, Any]:
        return {"general_alphas": self.general_alphas, "chosen_alpha": self.chosen_alpha}

    def summary_fields(self) -> dict[str, Any]:
        return {"wiseft_alpha": self.chosen_alpha, "wiseft_select": self.select}

    def card_note(self) -> str:
        return (f"WiSE-FT: (1 - alpha) theta_0 + alpha theta with alpha {self.chosen_alpha:g}, selected on "
                f"`{self.select}` over alphas {self.alphas}; theta: the `{self.source}` weights of the fine-tuning. "
                "Before fine-tuning is alpha 0 (the initial model). This mix's general and drift numbers, "
                "every alpha's, are in wiseft.json beside this folder.")



class TaskVectorMerge(WeightSpaceSearch):
    """At fit end, score TIES and DARE merges of the task vector tau = theta - theta_0 over a grid of
    method, density and weight, like WiSE-FT's alphas; export the chosen one (`WeightSpaceSearch`).

    A grid point (method, density, weight lambda) is theta_0 + lambda * merge([tau], density), per
    tensor through peft's merge utilities (`merge_task_vector`, where the methods are spelled out).
    With the one task vector a fine-tuning run has, `ties` (TIES-Merging, Yadav et al. 2023, arXiv
    2306.01708) is magnitude pruning: the top `density` share of tau's entries by magnitude, times
    lambda (sign election and the disjoint mean change nothing for one vector); `dare_linear` (DARE,
    Yu et al. 2023, arXiv 2311.03099) is random pruning with rescaling: each entry kept with
    probability `density` and divided by it, drawn from `seed`; `dare_ties` is then the same as
    `dare_linear`. Density 1 is WiSE-FT's alpha = lambda. The peer is TRL's experimental merge
    callback (mergekit), which merges checkpoints with the base model but scores nothing.

    Each point gets what a WiSE-FT alpha gets: the domain metrics (generations in
    `generations/merge_<method>_d<density>_w<weight>.jsonl`), every ForgettingMonitor's drift, and
    for the weights in `general_weights` every GeneralBenchmarks' record (`general/merge_....json`).
    Writes `merge.json`, `merge.png` (each measure against the weight, a curve per method and density)
    and `merge_export/` under `dirpath`, logs `merge/<method>_d<density>/<metric>` to TensorBoard with
    the weight in percent on the step axis, and gives RunSummary one row per point (`merge`, with
    `merge_method`, `merge_density`, `merge_weight`, `merge_chosen`; beside them the chosen point,
    `merge_point`, and `merge_select`).

    Args:
        methods: `ties`, `dare_linear`, `dare_ties` (peft.utils.merge_utils).
        densities: the share of tau's entries each point keeps, in (0, 1].
        weights: lambda, the scale of the merged task vector, > 0 (0 is the initial model for
            every method: the run's validation before fine-tuning has its numbers).
        seed: DARE's random drops (the same mask for every weight of a method and density).
        source: the fine-tuned weights: `best` (ModelCheckpoint's best) or `last`.
        select: how to choose the point, as WiSEFT's; ties go to the smaller weight, then the
            smaller density (nearer theta_0).
        margin: the domain score `general_within_margin` may give up (absolute).
        domain_metric: the validation metric that is the domain score, as WiSEFT's.
        general_weights: the weights whose points GeneralBenchmarks scores (each point costs one
            benchmark event); None: all.
        export: write the chosen point's model with `save_pretrained`.
        dirpath: output directory; default the trainer's log directory.
        overwrite: replace the files of an earlier run in `dirpath` (otherwise the run stops at start).
    """

    name = "merge"
    coordinates = ("merge_method", "merge_density", "merge_weight")
    terms = MERGE_TERMS
    x_label = "weight lambda (0: initial model)"
    title = "Task-vector merging: theta_0 + lambda merge(theta - theta_0, density)"

    def __init__(
        self,
        methods: list[Literal["ties", "dare_linear", "dare_ties"]] = ["ties", "dare_linear"],
        densities: list[float] = [0.2, 0.5],
        weights: list[float] = [0.5, 1.0],
        seed: int = 0,
        source: Literal["best", "last"] = "best",
        select: Literal["general_within_margin", "accuracy", "loss"] = "general_within_margin",
        margin: float = 0.01,
        general_weights: list[float] | None = None,
        export: bool = True,
        dirpath: str | None = None,
        overwrite: bool = False,
        domain_metric: str = "accuracy",
    ) -> None:
        if not methods or not densities or not weights:
            raise ValueError("TaskVectorMerge.methods, densities and weights each need at least one value")
        unknown = [m for m in methods if m not in MERGE_METHODS]
        if unknown:
            raise ValueError(f"TaskVectorMerge.methods {unknown} are not among {', '.join(MERGE_METHODS)}")
        for density in densities:
            if not 0.0 < density <= 1.0:  # also rejects NaN
                raise ValueError(f"TaskVectorMerge.densities must lie in (0, 1], got {density}")
        for weight in weights:
            if not 0.0 < weight < math.inf:
                raise ValueError(f"TaskVectorMerge.weights must be finite and > 0, got {weight} (weight 0 is "
                                 "the initial model for every method: the validation before fine-tuning scores it)")
        super().__init__(source, select, margin, export, dirpath, overwrite, domain_metric)
        self.methods = list(dict.fromkeys(methods))
        self.densities = sorted({float(d) for d in densities})
        self.weights = sorted({float(w) for w in weights})
        if general_weights is not None:
            outside = sorted({float(w) for w in general_weights} - set(self.weights))
            if outside:
                raise ValueError(f"TaskVectorMerge.general_weights {outside} are not in TaskVectorMerge.weights "
                                 f"{self.weights}")
        self.general_weights = self.weights if general_weights is None else sorted({float(w) for w in general_weights})
        self.seed = int(seed)

    def grid(self) -> list[dict[str, Any]]:
        return [{"merge_method": method, "merge_density": density, "merge_weight": weight}
                for method in self.methods for density in self.densities for weight in self.weights]

    def build(self, theta0: dict[str, torch.Tensor], theta: dict[str, torch.Tensor],
              point: dict[str, Any]) -> dict[str, torch.Tensor]:
        return merge_task_vector(theta0, theta, point["merge_method"], point["merge_density"],
                                 point["merge_weight"], self.seed)

    def tag(self, point: dict[str, Any]) -> str:
        return f"merge_{point['merge_method']}_d{point['merge_density']:.2f}_w{point['merge_weight']:.2f}"

    def weights_text(self, point: dict[str, Any], origin: str) -> str:
        return (f"{point['merge_method']} merge: initial model + {point['merge_weight']:g} x "
                f"{point['merge_method']}(theta - theta_0, density {point['merge_density']:g}), theta the {origin}")

    def benchmarked(self, point: dict[str, Any]) -> bool:
        return point["merge_weight"] in self.general_weights

    def curve(self, point: dict[str, Any]) -> tuple[str, float]:
        return f"{point['merge_method']}_d{point['merge_density']:.2f}", point["merge_weight"]

    def report_fields(self) -> dict[str, Any]:
        return {"methods": self.methods, "densities": self.densities, "weights": self.weights, "seed": self.seed,
                "general_weights": self.general_weights}

    def summary_fields(self) -> dict[str, Any]:
        return {"merge_point": self.terms.label(self.chosen) if self.chosen else None, "merge_select": self.select}

    @property
    def card_tags(self) -> tuple[str, ...]:
        return ("merge", self.chosen["merge_method"]) if self.chosen else ("merge",)

    def card_note(self) -> str:
        method, density, weight = (self.chosen[k] for k in self.coordinates)
        return (f"Task-vector merging: theta_0 + {weight:g} x {method}(theta - theta_0, density {density:g}) "
                f"(peft.utils.merge_utils.{method}; DARE's drops seeded with {self.seed}), selected on `{self.select}` "
                f"over methods {self.methods}, densities {self.densities} and weights {self.weights}; theta: the "
                f"`{self.source}` weights of the fine-tuning. Before fine-tuning is the run's validation at step 0. "
                "Every grid point's domain, general and drift numbers are in merge.json beside this folder.")


def _require_full_weights(pl_module: L.LightningModule, owner: str) -> None:
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in pl_module.lm.parameters()):
        raise ValueError(f"{owner} builds each candidate from whole weight tensors, which FSDP2 shards across "
                         "processes; run it with one device or DDP (trainer.strategy: ddp)")
    if hasattr(pl_module.lm, "peft_config"):
        raise ValueError(f"{owner} needs full fine-tuning weights to build its candidates from; this run trains a "
                         "peft (LoRA) adapter")
