"""General-capability benchmarks with lm-eval on the in-memory model, before, during and after SFT.

The paper measures forgetting with lm-evaluation-harness defaults on the checkpoint that is best
on the domain, and summarises it as a general score. This callback runs the same harness on the
model being trained, without exporting it: lm-eval's `HFLM` wraps the live module, and
`lm_eval.simple_evaluate` runs each configured task exactly as `lm_eval --model hf` would on an
exported copy (tests/test_general_benchmarks.py checks that the numbers agree).

Tasks are lm-eval task names: the offline `talr_*` tasks (talr/lm_eval_tasks, reading the
benchmarks' original files from `data_dir`) or any task lm-eval registers (read from the hub).
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from talr import lm_eval_tasks
from talr.checkpoint_io import lm_state_from_checkpoint
from talr.initial_cache import cache_key, is_fresh_single_process_run, load_cached, source_digest, store_cached
from talr.models import eval_mode, is_peft
from talr.progress import format_duration
from talr.results import GuardsResults, write_atomic
from talr.stats import PairedComparison, compare_paired, mean_score, pair_by_id

# The number each benchmark reports in the paper (lm-eval's key: "<metric>,<filter>").
PRIMARY_METRICS: dict[str, str] = {
    "ifeval": "inst_level_strict_acc,none",
    "gsm8k": "exact_match,flexible-extract",
    "humaneval": "pass@1,create_test",
    "arc_easy": "acc,none",
    "arc_challenge": "acc,none",
    "piqa": "acc,none",
    "hellaswag": "acc,none",
    "mmlu": "acc,none",
}
PRIMARY_METRICS.update({f"talr_{name}": metric for name, metric in list(PRIMARY_METRICS.items())})
RESULT_FILE = re.compile(r"^(fit_start|fit_end|validation\d+_step\d+)\.json$")


def general_score(initial: Mapping[str, float], current: Mapping[str, float], threshold: float) -> dict[str, Any]:
    """The paper's general score: the mean of `current` over the tasks whose `initial` score is at
    least `threshold`; tasks the initial model scores below it (or NaN) are left out.

    Both mappings go from task name to its primary metric. `score` is None when every task is left out.
    """
    missing = sorted(set(current) - set(initial))
    if missing:
        raise KeyError(f"no initial score for {missing}; the general score needs the fit-start results of every task")
    included = [task for task in current if initial[task] >= threshold]
    excluded = [task for task in current if task not in included]
    score = sum(current[task] for task in included) / len(included) if included else None
    return {"score": score, "threshold": threshold, "included": included, "excluded": excluded}


def run_lm_eval(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: list[str],
    task_manager: Any,
    limit: int | float | None = None,
    batch_size: int | str = 8,
    num_fewshot: Mapping[str, int] | None = None,
    gen_kwargs: Mapping[str, Any] | None = None,
    allow_code_execution: bool = False,
    log_samples: bool = False,
    log: Callable[[str], None] = print,
    shared_context: bool = False,
) -> dict[str, Any]:
    """lm-eval on an in-memory Hugging Face causal LM: {"results": {task: {metric: value}}, "n_samples", "n_shot"}.

    One `simple_evaluate` per task (so each can have its own few-shot count, as `--num_fewshot`
    would give it on the CLI); `results` holds every task and group lm-eval reports, e.g. the
    MMLU subjects beside the talr_mmlu group. `log_samples` adds lm-eval's per-document records
    under "samples" (by lm-eval task: a group's are under its subtasks) and, under "sample_tasks",
    which of them belong to each of `tasks`. The caller chooses eval mode and the device.
    `shared_context`: score the answer options of a context from one pass over it
    (talr.shared_context_lm; the same numbers up to float rounding).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    target = model.get_base_model() if is_peft(model) else model  # LoRA layers stay active inside
    # A copy: lm-eval may set the pad token on the tokenizer it gets, the training one stays as is.
    model_class = HFLM
    if shared_context:
        from talr.shared_context_lm import SharedContextHFLM as model_class
    lm = model_class(pretrained=target, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
    results: dict[str, dict[str, float]] = {}
    n_samples: dict[str, Any] = {}
    n_shot: dict[str, int] = {}
    samples: dict[str, list[dict[str, Any]]] = {}
    sample_tasks: dict[str, list[str]] = {}
    for name in tasks:
        start = time.monotonic()
        with torch.no_grad():
            out = simple_evaluate(
                model=lm, tasks=[name], task_manager=task_manager, limit=limit,
                num_fewshot=(num_fewshot or {}).get(name), gen_kwargs=dict(gen_kwargs) if gen_kwargs else None,
                log_samples=log_samples, confirm_run_unsafe_code=allow_code_execution,
            )
        for task, values in out["results"].items():
            results[task] = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        n_samples.update(out.get("n-samples", {}))
        n_shot.update(out.get("n-shot", {}))
        samples.update(out.get("samples", {}))
        sample_tasks[name] = sorted(out.get("samples", {}))  # a group's subtasks (MMLU subjects), or the task
        shown = ", ".join(f"{k} {v:.4f}" for k, v in results.get(name, {}).items() if _is_score(k))
        log(f"[general] {name}: {shown} ({time.monotonic() - start:.1f} s)")
    evaluation = {"results": results, "n_samples": n_samples, "n_shot": n_shot}
    if log_samples:
        evaluation["samples"] = samples
        evaluation["sample_tasks"] = sample_tasks
    return evaluation


def per_document_scores(evaluation: Mapping[str, Any], task: str, key: str) -> dict[str, Any]:
    """One task's metric `key` ("metric,filter") per document, from lm-eval's logged samples.

    Returns {"metric": key, "doc_ids": [...], "values": [...]}: a value is 0/1 for accuracy and exact
    match, a list of 0/1 for IFEval's instruction-level accuracy (one per instruction of the prompt),
    a number otherwise. A group's documents are named "<subtask>/<doc_id>". The values must average
    to lm-eval's aggregate (instruction-level: over all instructions) or the record says why not,
    under "unavailable" (a corpus-level metric such as BLEU has no per-document form).
    """
    metric, _, filter_name = key.partition(",")
    leaves = evaluation.get("sample_tasks", {}).get(task, [task])
    samples = evaluation.get("samples", {})
    doc_ids: list[Any] = []
    values: list[Any] = []
    for leaf in leaves:
        logged = sorted((s for s in samples.get(leaf, []) if s.get("filter") == (filter_name or "none")),
                        key=lambda s: s["doc_id"])
        for sample in logged:
            value = _plain_score(sample.get(metric))
            if value is None:
                return {"metric": key, "unavailable": f"lm-eval logged no numeric per-document {metric!r} for {leaf}"}
            doc_ids.append(sample["doc_id"] if leaf == task else f"{leaf}/{sample['doc_id']}")
            values.append(value)
    if not values:
        return {"metric": key, "unavailable": f"lm-eval logged no documents of {task} for filter {filter_name!r}"}
    mean, reported = mean_score(values), evaluation["results"][task][key]
    if not math.isclose(mean, reported, rel_tol=1e-9, abs_tol=1e-12):
        return {"metric": key, "unavailable": f"the per-document values average to {mean}, lm-eval reports {reported} "
                                              "(an aggregation other than the mean)"}
    return {"metric": key, "doc_ids": doc_ids, "values": values}


def _plain_score(value: Any) -> Any:
    """A per-document score for JSON: 0/1 as int, other numbers as float, lists element-wise; None if not numeric."""
    if isinstance(value, (list, tuple)):
        scores = [_plain_score(v) for v in value]
        return None if not scores or any(s is None or isinstance(s, list) for s in scores) else scores
    try:
        number = float(value)  # bool, int, float and numpy scalars
    except (TypeError, ValueError):
        return None
    return int(number) if number in (0.0, 1.0) else number


def _compare_documents(tasks: list[str], initial: Mapping[str, Any] | None, current: Mapping[str, Any]) -> dict[str, Any]:
    """`current` against `initial` on the documents both scored: one task (its primary metric) or
    the mean over several (the general score's tasks); a PairedComparison's fields, or why not."""
    if not tasks:
        return {"unavailable": "no task"}
    if initial is None:
        return {"unavailable": "the fit-start record keeps no per-document scores (a run from before they were kept)"}
    missing = [t for t in tasks if "doc_ids" not in initial.get(t, {}) or "doc_ids" not in current.get(t, {})]
    if missing:
        reasons = {(initial.get(t) or current.get(t) or {}).get("unavailable", "no per-document scores") for t in missing}
        return {"unavailable": f"{', '.join(missing)}: {'; '.join(sorted(reasons))}"}
    pairs = [pair_by_id(initial[t]["doc_ids"], initial[t]["values"], current[t]["doc_ids"], current[t]["values"]) for t in tasks]
    return compare_paired(pairs).as_dict()


def _score_or_nan(general: Mapping[str, Any]) -> float:
    """A `general_score` result's score; NaN where not measured or every task was left out."""
    return general["score"] if general.get("score") is not None else math.nan


def _is_score(key: str) -> bool:
    """A metric, not its standard error or lm-eval's document count."""
    return "_stderr" not in key and key != "sample_len"


class GeneralBenchmarks(GuardsResults):
    """lm-eval general benchmarks on the model being fine-tuned, and the paper's general score.

    When (each an "event"): before training (the initial model: the baseline), every
    `every_n_validations` validation runs during fit (0: never), and at fit end on the checkpoint
    ModelCheckpoint kept as best on the domain metric (the paper's selection; the final weights
    when there is no checkpoint callback or it saved nothing, which the log says).

    Per event: every metric of every configured task is logged as `general/<task>/<metric>`
    (`acc`, `exact_match/flexible-extract`, ...) at the global step, plus `general/score`; and
    `<dirpath>/<event>.json` holds all results (MMLU subjects included), each task's primary metric,
    and the general score with the tasks it left out. A fresh run refuses to write over an earlier
    run's result files unless `overwrite`; a run resumed from its checkpoint keeps its baseline.

    Paired comparison with the initial model: each event keeps every document's primary score
    (`per_document`: doc ids and 0/1 values, a list of 0/1 per IFEval prompt; kept in the state
    dict too, so a resumed run keeps its baseline) and compares them with the fit-start event's on
    the same documents (`paired`: per task n, b = right before / wrong now, c = wrong before / right
    now, the difference with its 95% interval and p-value, from `talr.stats`: exact McNemar and
    Tango's score interval for 0/1 scores, a bootstrap interval and sign-flip test otherwise;
    `general_paired`: the same for the general score). Logged as `general/<task>/delta`,
    `.../delta_low`, `.../delta_high` and `general/score_delta*`, with one verdict line per task.

    General score (paper, Appendix C): the mean of the `score_tasks`' primary metrics, leaving out
    every task the initial model scores below `threshold`. The paper uses IFEval
    (inst_level_strict_acc), GSM8K (exact_match, flexible-extract) and HumanEval (pass@1).

    Other weights than training's (WiSE-FT's mixes) are scored through `score_weights`: the same
    record and paired comparison, in its own file, kept out of this callback's events and logs.

    Distributed: rank zero evaluates and writes; the other ranks wait at a broadcast of its results
    (raise the process-group timeout if an event takes longer than its default 30 minutes). The
    weights must be whole on rank zero: sharded strategies (FSDP, DeepSpeed, model parallel) are
    refused.

    Args:
        tasks: lm-eval task or group names, e.g. `talr_gsm8k` (offline) or `gsm8k` (hub).
        data_dir: the benchmark files for `talr_*` tasks (layout: talr/lm_eval_tasks/readers.py);
            default $TALR_BENCH_DIR.
        limit: documents per task (an int), or a share of them (a float below 1); lm-eval applies
            it to each task of a group, e.g. to each MMLU subject. None: all.
        batch_size: lm-eval's batch size (an int, or `auto`); use the same on the CLI to compare.
        num_fewshot: per-task few-shot counts overriding the task's default (lm-eval ignores it for
            tasks whose default is 0, such as IFEval and HumanEval).
        gen_kwargs: generation overrides for generative tasks, as lm-eval's `--gen_kwargs`
            (e.g. `{max_gen_toks: 256}` for a cheap in-loop check).
        every_n_validations: also evaluate after every n-th validation run during fit; 0 = off.
        threshold: tasks whose initial primary metric is below it stay out of the general score.
        score_tasks: the tasks averaged into the general score; default all of `tasks`.
        primary_metrics: `{task: "metric,filter"}` for tasks without a built-in primary metric.
        dirpath: where the JSON files go; default `<log_dir>/general`.
        overwrite: let a fresh run replace an earlier run's result files in `dirpath`.
        allow_code_execution: run model-written code (HumanEval) in talr.code_sandbox; off by default.
        shared_context: score all answer options of a context from one pass over it
            (talr.shared_context_lm): the same numbers up to float rounding, in less time on
            multiple-choice tasks; off by default (lm-eval's own HFLM).
    """

    def __init__(
        self,
        tasks: list[str],
        data_dir: str | None = None,
        limit: int | float | None = None,
        batch_size: int | str = 8,
        num_fewshot: dict[str, int] | None = None,
        gen_kwargs: dict[str, Any] | None = None,
        every_n_validations: int = 0,
        threshold: float = 0.5,
        score_tasks: list[str] | None = None,
        primary_metrics: dict[str, str] | None = None,
        dirpath: str | None = None,
        overwrite: bool = False,
        allow_code_execution: bool = False,
        shared_context: bool = False,
    ) -> None:
        if not tasks:
            raise ValueError("GeneralBenchmarks.tasks needs at least one lm-eval task name")
        unknown_local = [task for task in tasks if task.startswith("talr_") and task not in lm_eval_tasks.LOCAL_TASKS]
        if unknown_local:
            raise ValueError(
                f"GeneralBenchmarks: unknown task(s) {unknown_local}; the offline talr tasks are "
                f"{', '.join(lm_eval_tasks.LOCAL_TASKS)}"
            )
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"GeneralBenchmarks.tasks lists a task twice: {tasks}")
        if isinstance(limit, float) and limit > 1 and limit.is_integer():
            limit = int(limit)  # 1000.0 documents (a YAML float, or jsonargparse's int | float union) is a count
        if limit is not None and not (isinstance(limit, int) and limit >= 1 or isinstance(limit, float) and 0 < limit <= 1):
            raise ValueError(f"GeneralBenchmarks.limit must be an int >= 1 or a float in (0, 1], got {limit!r}")
        if every_n_validations < 0:
            raise ValueError(f"GeneralBenchmarks.every_n_validations must be >= 0 (0 = off), got {every_n_validations}")
        if not math.isfinite(threshold):
            raise ValueError(f"GeneralBenchmarks.threshold must be a number, got {threshold}")
        for option, names in (("num_fewshot", num_fewshot or {}), ("score_tasks", score_tasks or [])):
            unknown = sorted(set(names) - set(tasks))
            if unknown:
                raise ValueError(f"GeneralBenchmarks.{option} names {unknown}, which are not in tasks {tasks}")
        if any(shots < 0 for shots in (num_fewshot or {}).values()):
            raise ValueError(f"GeneralBenchmarks.num_fewshot values must be >= 0, got {num_fewshot}")
        self.tasks = list(tasks)
        self.score_tasks = list(score_tasks) if score_tasks is not None else list(tasks)
        self.primary_metrics = {**PRIMARY_METRICS, **(primary_metrics or {})}
        self.data_dir = data_dir or os.environ.get("TALR_BENCH_DIR") or None
        self.limit = limit
        self.batch_size = batch_size
        self.num_fewshot = dict(num_fewshot or {})
        self.gen_kwargs = dict(gen_kwargs or {})
        self.every_n_validations = every_n_validations
        self.threshold = threshold
        self.dirpath = dirpath
        self.overwrite = overwrite
        self.allow_code_execution = allow_code_execution
        self.shared_context = shared_context
        self.events: list[dict[str, Any]] = []
        self.validations = 0  # validation runs during fit, counted for every_n_validations
        self._task_dir: tempfile.TemporaryDirectory | None = None
        self._run_dir: str | None = None  # the log directory, for result paths in the summary
        self.task_manager = self._build_task_manager()  # every name and file checked before training
        unknown_primary = [task for task in self.score_tasks if task not in self.primary_metrics]
        if unknown_primary:
            raise ValueError(
                f"GeneralBenchmarks: no primary metric known for {unknown_primary}; give one per task as "
                "primary_metrics: {task: 'metric,filter'} (lm-eval's result key, e.g. 'acc,none')"
            )

    def _build_task_manager(self) -> Any:
        from lm_eval.tasks import TaskManager

        local = [task for task in self.tasks if task in lm_eval_tasks.LOCAL_TASKS]
        code_tasks = [task for task in self.tasks if task in lm_eval_tasks.CODE_TASKS]
        if code_tasks and not self.allow_code_execution:
            raise ValueError(
                f"GeneralBenchmarks: {code_tasks} run model-written code; set allow_code_execution: true to run it "
                "in talr.code_sandbox (a subprocess without network, with a time limit; see docs/general_benchmarks.md)"
            )
        if any(task in lm_eval_tasks.IFEVAL_TASKS for task in self.tasks):
            lm_eval_tasks.check_ifeval_requirements()
        include_path = None
        if local:
            if self.data_dir is None:
                raise ValueError(
                    f"GeneralBenchmarks: the offline tasks {local} read local files: set data_dir (or $TALR_BENCH_DIR) "
                    "to the benchmark directory, or use lm-eval's hub task names instead"
                )
            lm_eval_tasks.check_data_files(local, self.data_dir)
            self._task_dir = tempfile.TemporaryDirectory(prefix="talr-lm-eval-tasks-")
            include_path = str(lm_eval_tasks.write_task_dir(self.data_dir, self._task_dir.name))
        hub = [task for task in self.tasks if task not in local]
        # Indexing lm-eval's thousands of built-in tasks takes seconds: only when a hub task needs it.
        manager = TaskManager(include_path=include_path, include_defaults=bool(hub))
        unknown = [task for task in hub if task not in manager.all_tasks]
        if unknown:
            close = sorted({m for task in unknown for m in difflib.get_close_matches(task, manager.all_tasks, n=3)})
            raise ValueError(
                f"GeneralBenchmarks: lm-eval knows no task {unknown}" + (f" (close: {', '.join(close)})" if close else "")
                + f"; the offline talr tasks are {', '.join(lm_eval_tasks.LOCAL_TASKS)}, and `lm_eval ls tasks` lists "
                "lm-eval's own"
            )
        return manager

    @property
    def state_key(self) -> str:
        return self._generate_state_key(tasks=self.tasks)

    def summary_scores(self, best_step: int) -> dict[str, Any]:
        """The general score before training and at fit end (NaN where not measured or every task
        was left out), and the tasks left out: what `RunSummary` puts in a sweep table. The fit-end
        score is already the best checkpoint's (the callback reloads it), so `best_step` is unused.

        With them, the paired change from the initial model at fit end (`summary_columns`), and
        where the fit-start record is (`general_file_initial`, relative to the log directory)."""
        by_event = {e["event"]: e for e in self.events}
        start = by_event.get("fit_start", {}).get("general", {})
        out: dict[str, Any] = {"general_initial": _score_or_nan(start),
                               "general_excluded": " ".join(start.get("excluded", []))}
        out.update(self.summary_columns(by_event.get("fit_end")))
        out["general_file_initial"] = self._relative(by_event["fit_start"]["file"]) if "fit_start" in by_event else None
        return out

    def summary_columns(self, record: Mapping[str, Any] | None) -> dict[str, Any]:
        """One record's sweep-table columns, named as for the best checkpoint: `general_best` (the
        general score; NaN where every task was left out or there is no record), the paired change
        from the initial model `general_delta` with its 95% interval `general_delta_low` / `_high`,
        `general_p`, `general_n` (documents paired) and `general_test` (the test, or `none: <why>`);
        per task under `general_paired`; and the record's file (`general_file_best`, relative to
        the log directory), for comparing runs document by document."""
        record = record or {}
        paired = record.get("general_paired", {})
        out: dict[str, Any] = {"general_best": _score_or_nan(record.get("general", {}))}
        out.update({f"general_{key}": paired.get(field, math.nan) for key, field in
                    (("delta", "delta"), ("delta_low", "low"), ("delta_high", "high"), ("p", "p"), ("n", "n"))})
        out["general_test"] = paired.get("test") or f"none: {paired.get('unavailable', 'no fit-end event')}"
        out["general_paired"] = record.get("paired", {})  # per task: the summary JSON's, not the table's
        out["general_file_best"] = self._relative(record["file"]) if record else None
        return out

    def _relative(self, path: str) -> str:
        """A result file's path relative to the run's log directory when inside it (the summary then
        names no machine-specific directory), else as written."""
        run_dir = self._run_dir
        if run_dir is not None and Path(path).resolve().is_relative_to(Path(run_dir).resolve()):
            return Path(path).resolve().relative_to(Path(run_dir).resolve()).as_posix()
        return path

    def state_dict(self) -> dict[str, Any]:
        return {"events": self.events, "validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.events = list(state_dict["events"])
        self.validations = int(state_dict["validations"])

    def output_dir(self, trainer: L.Trainer) -> Path:
        # trainer.log_dir broadcasts from rank 0: every rank must ask for it
        return Path(self.dirpath) if self.dirpath else Path(trainer.log_dir or trainer.default_root_dir) / "general"

    # -- hooks, in lifecycle order -------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != TrainerFn.FITTING:
            return
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
            raise ValueError(
                f"GeneralBenchmarks evaluates on rank zero and needs the whole model there; "
                f"{type(trainer.strategy).__name__} shards it. Use DDP, or evaluate the exported model with lm_eval"
            )

    def result_paths(self, trainer: L.Trainer) -> list[Path]:
        out = self.output_dir(trainer)
        existing = sorted(str(p) for p in out.glob("*.json") if RESULT_FILE.match(p.name)) if trainer.is_global_zero else []
        return [Path(p) for p in trainer.strategy.broadcast(existing, src=0)]  # every rank stops together

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_train_start rather than on_fit_start: some strategies restore callback state after
        # on_fit_start, and a resumed run must find its baseline before deciding to measure one.
        if any(event["event"] == "fit_start" for event in self.events):
            return
        if trainer.global_step == 0:
            self._event(trainer, pl_module, "fit_start", pl_module.lm, "initial model",
                        cache=is_fresh_single_process_run(trainer))
            return
        # Resumed without this callback's state: the live weights are trained, so reload the initial model.
        name = pl_module.hparams.model
        rank_zero_warn(f"GeneralBenchmarks: no baseline in the checkpoint; reloading the initial model {name!r}")
        initial = pl_module.load_initial_lm().to(pl_module.device) if trainer.is_global_zero else None
        self._event(trainer, pl_module, "fit_start", initial, f"initial model (reloaded from {name})")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or not self.every_n_validations:
            return
        self.validations += 1
        if self.validations % self.every_n_validations == 0:
            self._event(trainer, pl_module, f"validation{self.validations}_step{trainer.global_step}",
                        pl_module.lm, f"weights at validation {self.validations}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        model, source = pl_module.lm, "final weights"
        if best:
            source = f"best checkpoint {best}"
        else:
            reason = "no ModelCheckpoint callback" if trainer.checkpoint_callback is None else "no best checkpoint was saved"
            source += f" ({reason})"
            rank_zero_warn(f"GeneralBenchmarks: {reason}; evaluating the final weights at fit end")
        home = next(pl_module.lm.parameters()).device
        device = trainer.strategy.root_device  # teardown may have moved the module to the CPU
        try:
            if trainer.is_global_zero:
                if best:
                    model = copy.deepcopy(pl_module.lm)  # the live module keeps the weights training ended with
                    model.load_state_dict(lm_state_from_checkpoint(best, pl_module.lm_prefix))
                model.to(device)
            self._event(trainer, pl_module, "fit_end", model, source)
        finally:
            pl_module.lm.to(home)

    # -- one evaluation ------------------------------------------------------------------------------
    def score_weights(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str, source: str) -> dict[str, Any]:
        """Benchmark the module's live weights now, as an event's record labelled `name` (with the
        paired comparison against the initial model), written to `<dirpath>/<name>.json`.

        For callbacks that score other weights than training's (WiSE-FT's mixes): the record is
        neither one of this callback's events (its summary, state and `general/*` logs stay as
        they are) nor logged. Call it on every rank, with the weights whole on rank zero."""
        if RESULT_FILE.match(f"{name}.json"):
            raise ValueError(f"GeneralBenchmarks.score_weights: {name!r} is one of this callback's own event names; "
                             "choose another label")
        if not any(event["event"] == "fit_start" for event in self.events):
            raise ValueError("GeneralBenchmarks.score_weights needs the initial model's record (the fit-start event, "
                             "measured at train start); call it after training started")
        return self._evaluate(trainer, pl_module, name, pl_module.lm, source, log=False)

    def _event(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str, model: torch.nn.Module | None,
               source: str, cache: bool = False) -> None:
        self.events.append(self._evaluate(trainer, pl_module, name, model, source, log=True, cache=cache))

    def initial_cache_key(self, pl_module: L.LightningModule, model: torch.nn.Module) -> str | None:
        """The disk-cache key of the initial model's evaluation (talr.initial_cache): the weights, the
        tasks and their settings, the benchmark files' bytes, lm-eval's version and this file. None
        when a task reads the hub, whose data talr cannot fingerprint: those are measured every run."""
        if any(task not in lm_eval_tasks.LOCAL_TASKS for task in self.tasks):
            return None
        import lm_eval

        files = sorted(str(Path(self.data_dir) / rel) for task in self.tasks for rel in lm_eval_tasks.required_files(task))
        tokenizer = pl_module.tokenizer
        return cache_key(model, pl_module.device, "general", self.tasks, self.limit, self.batch_size, self.num_fewshot,
                         self.gen_kwargs, self.shared_context, tokenizer.chat_template, len(tokenizer), lm_eval.__version__,
                         source_digest(*files), source_digest(__file__, str(Path(lm_eval_tasks.__file__).parent)))

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str, model: torch.nn.Module | None,
                  source: str, log: bool, cache: bool = False) -> dict[str, Any]:
        """lm-eval on `model` (rank zero), its record written to `<name>.json`, logged if `log`; every rank gets the record.

        With `cache` (the initial model in a fresh one-process run), the evaluation is read from and
        written to the initial-model cache: every run of a sweep shares one baseline measurement."""
        out = self.output_dir(trainer)
        self._run_dir = trainer.log_dir or trainer.default_root_dir  # a broadcast: every rank asks
        record, failure = None, None
        if trainer.is_global_zero:
            started = time.monotonic()
            try:
                rank_zero_info(f"[general] {name} (step {trainer.global_step}, {source}): {', '.join(self.tasks)}")
                key = self.initial_cache_key(pl_module, model) if cache else None
                cached = load_cached("general", key) if key else None
                if cached is not None:
                    evaluation = json.loads(cached)
                else:
                    with eval_mode(model):
                        evaluation = run_lm_eval(
                            model, pl_module.tokenizer, self.tasks, self.task_manager, limit=self.limit,
                            batch_size=self.batch_size, num_fewshot=self.num_fewshot, gen_kwargs=self.gen_kwargs,
                            allow_code_execution=self.allow_code_execution, log_samples=True, log=rank_zero_info,
                            shared_context=self.shared_context,
                        )
                    evaluation = self._scores_only(evaluation)
                    if key:
                        store_cached("general", key, json.dumps(evaluation))
                record = self._record(name, trainer.global_step, source, evaluation, out / f"{name}.json")
                write_atomic(out / f"{name}.json", json.dumps(record, indent=1))
                if log:
                    self._log(trainer, record)
                documents = sum(int(n.get("effective", 0)) for n in record["n_samples"].values() if isinstance(n, dict))
                rank_zero_info(f"[general] {name} done: {len(self.tasks)} task(s), {documents} documents "
                               f"in {format_duration(time.monotonic() - started)}")
            except Exception as error:
                failure = error
        # The other ranks wait here; they learn of a failure too, instead of waiting for a timeout.
        record, message = trainer.strategy.broadcast((record, None if failure is None else repr(failure)), src=0)
        if failure is not None:
            raise failure
        if message is not None:
            raise RuntimeError(f"GeneralBenchmarks: the {name} evaluation failed on rank zero: {message}")
        return record

    def _scores_only(self, evaluation: Mapping[str, Any]) -> dict[str, Any]:
        """lm-eval's aggregates with each task's per-document primary scores, without the logged
        samples (prompts, outputs): what a record needs, and what the cache keeps."""
        per_document = {task: per_document_scores(evaluation, task, self.primary_metrics[task])
                        for task in self.tasks if task in self.primary_metrics}
        return {"results": evaluation["results"], "n_samples": evaluation["n_samples"], "n_shot": evaluation["n_shot"],
                "per_document": per_document}

    def _record(self, name: str, step: int, source: str, evaluation: dict[str, Any], path: Path) -> dict[str, Any]:
        results = evaluation["results"]
        primary = {}
        for task in self.tasks:
            key = self.primary_metrics.get(task)
            if key is not None:
                if key not in results.get(task, {}):
                    raise KeyError(f"{task}: lm-eval reported {sorted(results.get(task, {}))}, not the primary metric {key!r}")
                primary[task] = results[task][key]
        current = {task: primary[task] for task in self.score_tasks}
        baseline = next((e for e in self.events if e["event"] == "fit_start"), None)
        initial = current if name == "fit_start" else {task: baseline["primary"][task] for task in self.score_tasks}
        per_document = {task: evaluation["per_document"][task] for task in primary}
        # The initial model's documents are the baseline of every later event (fit start: itself, a zero change).
        initial_documents = per_document if name == "fit_start" else baseline.get("per_document")
        general = general_score(initial, current, self.threshold)
        import lm_eval

        return {
            "event": name, "step": step, "weights": source, "file": str(path),
            "primary_metrics": {task: self.primary_metrics[task] for task in primary},
            "primary": primary,
            "general": general,
            "paired": {task: _compare_documents([task], initial_documents, per_document) for task in primary},
            "general_paired": _compare_documents(general["included"], initial_documents, per_document),
            "results": results, "n_samples": evaluation["n_samples"], "n_shot": evaluation["n_shot"],
            "settings": {"tasks": self.tasks, "data_dir": self.data_dir, "limit": self.limit, "batch_size": self.batch_size,
                         "num_fewshot": self.num_fewshot, "gen_kwargs": self.gen_kwargs, "lm_eval": lm_eval.__version__,
                         "shared_context": self.shared_context},
            "per_document": per_document,
        }

    def _log(self, trainer: L.Trainer, record: dict[str, Any]) -> None:
        metrics = {}
        for task in self.tasks:
            for key, value in record["results"].get(task, {}).items():
                if _is_score(key):
                    metric, _, filter_name = key.partition(",")
                    tag = metric if filter_name in ("", "none") else f"{metric}/{filter_name}"
                    metrics[f"general/{task}/{tag}"] = value
        general = record["general"]
        if general["score"] is not None:
            metrics["general/score"] = general["score"]
        for prefix, comparison in [*((f"general/{t}/delta", c) for t, c in record["paired"].items()),
                                   ("general/score_delta", record["general_paired"])]:
            if "delta" in comparison:
                metrics.update({prefix: comparison["delta"], f"{prefix}_low": comparison["low"],
                                f"{prefix}_high": comparison["high"]})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if record["event"] != "fit_start":  # fit start is the baseline itself
            for task, comparison in [*record["paired"].items(), ("general score", record["general_paired"])]:
                line = (PairedComparison(**comparison).describe(task) if "delta" in comparison
                        else f"{task}: no paired comparison ({comparison['unavailable']})")
                rank_zero_info(f"[general] {record['event']} vs the initial model: {line}")
        score = "none (every task left out)" if general["score"] is None else f"{general['score']:.4f}"
        rank_zero_info(
            f"[general] {record['event']}: general score {score} over {general['included']}; left out (initial "
            f"below {self.threshold}): {general['excluded'] or 'none'}; results in {record['file']}"
        )
