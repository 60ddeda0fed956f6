"""Which differences in a sweep are real: paired comparisons from the runs' per-item records.

Two comparisons, each on the domain side and the general side:

- **each run against the initial model**: the domain accuracy of the held-out rows before
  fine-tuning (the step-0 validation) against the best step, row by row (`run_columns`, for the
  sweep table); the general score from GeneralBenchmarks' paired records of the fit-end event
  (`general_delta`, ... in the run summary).
- **strategies against each other at the same learning rate** (`between_strategies`), and the same
  strategy's learning rates against each other (`between_learning_rates`, the paper's Finding 1): paired
  over the held-out rows both runs scored (only when their data split is the same: same
  `data.task`, `data.val_size` and `data.seed`) and over the benchmark documents both scored.
  On the held-out rows also teacher-forced, from each validation's row scores
  (`teacher_forced_pair`): top-1 token accuracy and NLL at each run's best temperature, which a
  temperature cannot move, beside plain NLL, which it can; these need no generation, so they
  compare runs whose domain metric is a loss. On the general side also the forgetting monitor's
  drift, prompt by prompt (`drift_pair`): agreement and calibrated KL beside KL and entropy.

A classification task (its row scores carry each row's class and class log-probabilities, `choice` /
`choice_logprobs`; or the run's monitor is one of these two metrics) also gets, against the initial
model and between strategies, the paired change of balanced accuracy of the greedy answers
(`balanced_accuracy_pair`, talr.stats.compare_balanced_accuracy) and of the label AUC
(`label_auc_pair`, talr.stats.compare_auc), macro and weighted by class support:
`balanced_accuracy_*`, `label_auc_*` and `label_auc_weighted_*` columns. None
is a mean over rows, so both are recomputed on each resample of the rows, which must be the same rows
in both scorings.

Seeds: runs of one cell (loss, learning rate) that differ only in a seed column are replicates.
A cell with one run reports the paired test of that run (exact McNemar and Tango's interval for
accuracy). A cell with several seeds reports the mean of the per-seed paired differences with a
t-interval and t-test across seeds, widened to at least the seeds' own intervals
(`talr.stats.combine_replicates`): the seed-to-seed spread holds the training randomness, which
pooling the documents of all seeds would hide, and the seeds' own intervals hold the noise of the
documents and prompts they all share, which their spread does not show. Between two cells,
seeds are matched by their seed values and each matched pair gives one paired difference.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache, partial
from itertools import combinations
from pathlib import Path
from typing import Any, Callable, Iterable, Union

import numpy as np
import pandas as pd
import yaml

from talr.general_prompts import prompt_scores_file
from talr.stats import (RESAMPLES, AucAverage, PairedComparison, PairedItems, compare_auc, compare_balanced_accuracy, compare_paired,
                        combine_replicates, pair_by_id)

SIDES = ("domain", "general")
Outcome = Union[PairedComparison, str]  # a comparison, or why there is none


def generations_file(log_dir: str | Path, step: int) -> Path:
    """A validation's scored generations, as SFTModule names them (`val_step<step:06d>.jsonl`)."""
    return Path(log_dir) / "generations" / f"val_step{int(step):06d}.jsonl"


@lru_cache(maxsize=256)
def read_generations(path: Path) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Row indices and 0/1 correctness of a generations file."""
    rows, correct = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            record = json.loads(line)
            if "row_index" not in record or "correct" not in record:
                raise ValueError(f"{path} line {number}: no row_index / correct; is it a talr generations file?")
            rows.append(int(record["row_index"]))
            correct.append(int(bool(record["correct"])))
    return tuple(rows), tuple(correct)


@lru_cache(maxsize=256)
def _general_record(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def row_scores_file(log_dir: str | Path, step: int) -> Path:
    """A validation's per-row token sums, as SFTModule names them (`row_scores/val_step<step:06d>.jsonl`)."""
    return Path(log_dir) / "row_scores" / f"val_step{int(step):06d}.jsonl"


def _read_sums(path: Path, key: str, required: set[str], what: str) -> dict[int, dict[str, Any]]:
    """Item (`key`) -> its record, from a JSONL file of per-item sums."""
    items = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            record = json.loads(line)
            if not {key, "tokens", *required} <= set(record):
                raise ValueError(f"{path} line {number}: not a {what} record")
            items[int(record[key])] = record
    return items


def _compare_sums(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]], keys: dict[str, str],
                  differ: str) -> dict[str, Outcome]:
    """Per name, the paired change (b minus a) of sum(`key`) / sum(tokens) over the items both hold. A
    key holding a grid over the calibration temperatures is read at each scoring's own best one (the
    lowest total), as the logged calibrated numbers are."""
    shared = sorted(set(a) & set(b))
    if not shared:
        return dict.fromkeys(keys, "no item in common")
    if any(a[i]["tokens"] != b[i]["tokens"] for i in shared):
        return dict.fromkeys(keys, differ)
    counts = np.array([a[i]["tokens"] for i in shared], dtype=float)
    return {name: compare_paired([PairedItems(_sums_of(a, shared, key), _sums_of(b, shared, key), counts)])
            for name, key in keys.items()}


def _sums_of(scored: dict[int, dict[str, Any]], items: list[int], key: str) -> np.ndarray:
    """Each item's sum of `key`; a grid over the calibration temperatures is read at the scoring's own
    best temperature (the lowest total over `items`)."""
    values = np.array([scored[i][key] for i in items], dtype=float)
    return values[:, int(values.sum(0).argmin())] if values.ndim == 2 else values


# the row-scores comparisons (table order) and the talr.evaluation.RowScores field each reads
TEACHER_FORCED = {"token_accuracy": "top1_hits", "calibrated_nll": "nll_at_temperature", "nll": "nll"}


@lru_cache(maxsize=256)
def read_row_scores(path: Path) -> dict[int, dict[str, Any]]:
    """Row index -> its token sums (talr.evaluation.RowScores' fields) of a row-scores file."""
    return _read_sums(path, "row_index", set(TEACHER_FORCED.values()), "talr row-scores")


def teacher_forced_pair(path_a: Path, path_b: Path) -> dict[str, Outcome]:
    """Two scorings of the same held-out rows compared row by row (b minus a), each as a mean over all
    target tokens: top-1 token accuracy, NLL at each scoring's own best temperature (fitted once over
    its rows, as val/calibrated_loss is), and plain NLL. A temperature can move only the last."""
    return _compare_sums(read_row_scores(Path(path_a)), read_row_scores(Path(path_b)), TEACHER_FORCED,
                         "the rows' target tokens differ (another tokenizer or max_length)")


# the prompt-scores comparisons (table order) and the callbacks.forgetting_monitor.prompt_sums field each reads
DRIFT = {"agreement": "agreement", "kl_calibrated": "kl_at_temperature", "kl": "kl", "entropy": "entropy"}


@lru_cache(maxsize=256)
def read_prompt_scores(path: Path) -> dict[int, dict[str, Any]]:
    """Prompt index -> its drift sums (callbacks.forgetting_monitor.prompt_sums) of a prompt-scores file."""
    return _read_sums(path, "prompt_index", set(DRIFT.values()), "ForgettingMonitor prompt-scores")


def drift_pair(path_a: Path, path_b: Path) -> dict[str, Outcome]:
    """Two runs' drift from the initial model on the same answers to the general prompts, prompt by
    prompt (b minus a), each a mean over all answer tokens: top-1 agreement with the initial model and
    the KL left at each run's best temperature, which a temperature cannot move, beside the KL at
    temperature 1 and the entropy, which it can (sharpening lowers the entropy)."""
    return _compare_sums(read_prompt_scores(Path(path_a)), read_prompt_scores(Path(path_b)), DRIFT,
                         "the runs' initial answers differ (another prompt set, seed or max_new_tokens)")


# the classification comparisons (table order); each is also a validation metric, `val/<name>`
CLASSIFICATION = ("balanced_accuracy", "label_auc", "label_auc_weighted")


@lru_cache(maxsize=256)
def read_choices(path: Path) -> dict[int, tuple[int, tuple[float, ...]]]:
    """Row index -> (its class, the log-probability of each class's answer token) of a row-scores file
    (RowScores' `choice`, `choice_logprobs`); empty when no row carries them (not a classification task)."""
    rows = read_row_scores(Path(path))
    carried = {i: r for i, r in rows.items() if "choice" in r and "choice_logprobs" in r}
    if carried and len(carried) != len(rows):  # every row of a classification task has a class
        raise ValueError(f"{path}: {len(rows) - len(carried)} of {len(rows)} rows carry no choice / choice_logprobs")
    return {i: (int(r["choice"]), tuple(float(v) for v in r["choice_logprobs"])) for i, r in carried.items()}


def generations_beside(row_scores: Path) -> Path:
    """The generations of the validation that wrote `row_scores` (publish_records names both by one tag)."""
    return Path(row_scores).parent.parent / "generations" / Path(row_scores).name


def _same_classified_rows(path_a: Path, path_b: Path) -> tuple[list[int], np.ndarray] | str:
    """The rows of two row-scores files and their classes, or why they cannot be paired: label AUC and
    balanced accuracy are not means over rows, so a change on part of the rows is another metric."""
    a, b = read_choices(Path(path_a)), read_choices(Path(path_b))
    for path, choices in ((path_a, a), (path_b, b)):
        if not choices:
            return f"no class log-probabilities (choice / choice_logprobs) in {path}"
    if set(a) != set(b):
        return (f"the scorings hold different rows ({len(set(a) - set(b))} only in {path_a}, "
                f"{len(set(b) - set(a))} only in {path_b})")
    rows = sorted(a)
    if any(a[i][0] != b[i][0] for i in rows):
        return "the rows' classes differ between the scorings (another task or split)"
    if len({len(x[1]) for x in (*a.values(), *b.values())}) != 1:
        return "the scorings have different numbers of classes"
    return rows, np.array([a[i][0] for i in rows])


@lru_cache(maxsize=256)  # a classification run's domain pair is also one of its class tables' pairs: bootstrapped once
def label_auc_pair(path_a: Path, path_b: Path, resamples: int = RESAMPLES, average: AucAverage = "macro") -> Outcome:
    """Two scorings of the same held-out rows (row-scores files): the change (b minus a) of the label
    AUC, the one-vs-rest ROC AUC of the row-centred class log-probabilities, averaged over the classes
    as `average` says (talr.stats.compare_auc)."""
    paired = _same_classified_rows(path_a, path_b)
    if isinstance(paired, str):
        return paired
    rows, classes = paired
    if len(set(classes.tolist())) < 2:
        return "the rows hold one class: there is no ranking to compare"
    scores = [np.array([read_choices(Path(path))[i][1] for i in rows]) for path in (path_a, path_b)]
    return compare_auc(scores[0], scores[1], classes, resamples=resamples, average=average)


@lru_cache(maxsize=256)
def balanced_accuracy_pair(path_a: Path, path_b: Path, resamples: int = RESAMPLES) -> Outcome:
    """Two scorings of the same held-out rows (row-scores files, each read with the generations beside
    it): the change (b minus a) of the balanced accuracy of the greedy answers, the mean over the
    classes of each class's recall (talr.stats.compare_balanced_accuracy)."""
    paired = _same_classified_rows(path_a, path_b)
    if isinstance(paired, str):
        return paired
    rows, classes = paired
    correct = []
    for path in (path_a, path_b):
        generations = generations_beside(Path(path))
        if not generations.is_file():
            return f"not found: {generations} (a validation without generation has no greedy answers)"
        by_row = dict(zip(*read_generations(generations)))
        if set(by_row) != set(rows):
            return f"{generations} holds other rows than its row scores"
        correct.append([by_row[i] for i in rows])
    return compare_balanced_accuracy(correct[0], correct[1], classes, resamples=resamples)


def classification_pair(path_a: Path, path_b: Path, resamples: int = RESAMPLES) -> dict[str, Outcome]:
    """`balanced_accuracy_pair` and `label_auc_pair` (macro and weighted) of two row-scores files, by name
    (CLASSIFICATION)."""
    return {name: CLASSIFICATION_PAIRS[name](path_a, path_b, resamples) for name in CLASSIFICATION}


CLASSIFICATION_PAIRS: dict[str, Callable[..., Outcome]] = {
    "balanced_accuracy": balanced_accuracy_pair, "label_auc": label_auc_pair,
    "label_auc_weighted": partial(label_auc_pair, average="weighted")}


def heldout_split(config_file: str | Path | None) -> str | None:
    """What decides a run's held-out rows (data.task, data.val_size, data.seed of its config), as one
    string: runs with the same string scored the same rows under the same row indices."""
    if not isinstance(config_file, (str, Path)) or not Path(config_file).is_file():
        return None
    data = (yaml.safe_load(Path(config_file).read_text(encoding="utf-8")) or {}).get("data") or {}
    return json.dumps({key: data.get(key) for key in ("task", "val_size", "seed")}, sort_keys=True)


def comparison_columns(side: str, outcome: Outcome) -> dict[str, Any]:
    """`<side>_delta`, `_delta_low`, `_delta_high`, `_p`, `_n` and `_test` (the test, or `none: <why>`)."""
    if isinstance(outcome, str):
        return {**{f"{side}_{k}": math.nan for k in ("delta", "delta_low", "delta_high", "p", "n")},
                f"{side}_test": f"none: {outcome}"}
    return {f"{side}_delta": outcome.delta, f"{side}_delta_low": outcome.low, f"{side}_delta_high": outcome.high,
            f"{side}_p": outcome.p, f"{side}_n": outcome.n, f"{side}_test": outcome.test}


def run_columns(summary: dict[str, Any]) -> dict[str, Any]:
    """A finished run's sweep-table columns beside its summary: its domain accuracy at the best step
    against the initial model on the same held-out rows (`comparison_columns("domain", ...)`), the
    files the report pairs runs with (absolute paths) and the run's held-out split; a classification
    run also its balanced accuracy and label AUC against the initial model (`classification_columns`).
    A summary that names `domain_generations_file` is compared on those generations instead of the best step's.
    A run monitored on a classification metric gets that metric's comparison as its `domain_*` columns."""
    log_dir = Path(summary["log_dir"]).resolve() if summary.get("log_dir") else None
    out: dict[str, Any] = {"heldout_split": heldout_split(summary.get("config_file"))}
    for when in ("initial", "best"):  # GeneralBenchmarks names them relative to the log directory
        name = summary.get(f"general_file_{when}")
        if name and log_dir is not None:
            out[f"general_file_{when}"] = str(log_dir / name)
    if log_dir is not None and summary.get("best_step") is not None:
        named = summary.get("domain_generations_file")  # a WiSE-FT alpha's or a merge point's, named by its tag
        scores = log_dir / "row_scores" / Path(named).name if named else row_scores_file(log_dir, summary["best_step"])
        if scores.is_file():  # written by talr since the row scores were kept
            out["row_scores_best"] = str(scores)
        # ForgettingMonitor's default dirpath; a point's scores since the points' drift was kept per prompt
        drift = prompt_scores_file(log_dir / "forgetting", Path(named).stem if named else summary["best_step"])
        if drift.is_file():
            out["prompt_scores_best"] = str(drift)
    classification = classification_columns(summary, log_dir)
    monitored = str(summary.get("monitor", "")).removeprefix("val/")
    if monitored in CLASSIFICATION:  # the domain axis is the monitored metric: its paired change gives the plots' bars
        out.update({f"domain_{k}": classification[f"{monitored}_{k}"] for k in ("delta", "delta_low", "delta_high", "p", "n", "test")})
        return {**out, **classification}
    outcome: Outcome
    if summary.get("monitor") != "val/accuracy":
        outcome = f"the domain metric is {summary.get('monitor')}, not val/accuracy"
    elif log_dir is None:
        outcome = "the run names no log directory"
    else:
        initial = generations_file(log_dir, 0)
        named = summary.get("domain_generations_file")  # other weights' (a WiSE-FT alpha's), relative to log_dir
        best = log_dir / named if named else generations_file(log_dir, summary["best_step"])
        out["domain_generations_best"] = str(best)
        missing = [str(p) for p in (initial, best) if not p.is_file()]
        if missing:
            outcome = f"not found: {', '.join(missing)}"
        else:
            (rows_before, before), (rows_after, after) = read_generations(initial), read_generations(best)
            if not math.isclose(sum(after) / max(len(after), 1), summary["domain_best"], abs_tol=1e-6):
                outcome = f"{best.name} does not give the summary's domain_best {summary['domain_best']}"
            else:
                outcome = compare_paired([pair_by_id(rows_before, before, rows_after, after)])
    out.update(comparison_columns("domain", outcome))
    out.update(classification)
    return out


def classification_columns(summary: dict[str, Any], log_dir: Path | None) -> dict[str, Any]:
    """A classification run's `balanced_accuracy_*` and `label_auc_*` columns: `comparison_columns` of
    the best step against the initial model (step 0) on the same held-out rows, with the values before
    and after (`_initial`, `_best`). Only for a run whose monitor is one of the two metrics or whose
    best step's row scores carry classes: other runs get no such columns. A summary that names
    `domain_generations_file` (a WiSE-FT alpha, a merge point) is read from the row scores beside it."""
    monitor = summary.get("monitor")
    best: Path | None = None
    if log_dir is not None and summary.get("best_step") is not None:
        named = summary.get("domain_generations_file")
        best = log_dir / "row_scores" / Path(named).name if named else row_scores_file(log_dir, summary["best_step"])
    try:
        carried, malformed = best is not None and best.is_file() and bool(read_choices(best)), None
    except ValueError as error:  # a broken file: said in the columns of a run monitored on these metrics
        carried, malformed = False, str(error)
    if monitor not in {f"val/{name}" for name in CLASSIFICATION} and not carried:
        return {}
    outcomes: dict[str, Outcome]
    if best is None:
        outcomes = dict.fromkeys(CLASSIFICATION, "the run names no log directory or best step")
    elif malformed:
        outcomes = dict.fromkeys(CLASSIFICATION, malformed)
    else:
        initial = row_scores_file(log_dir, 0)
        missing = [str(p) for p in (initial, best) if not p.is_file()]
        outcomes = (dict.fromkeys(CLASSIFICATION, f"not found: {', '.join(missing)}") if missing
                    else classification_pair(initial, best))
    out: dict[str, Any] = {}
    for name, outcome in outcomes.items():
        if isinstance(outcome, PairedComparison) and monitor == f"val/{name}":
            # the files must be the validations the summary logged (to float32 rounding: Lightning logs float32)
            for when, value in (("initial", outcome.before), ("best", outcome.after)):
                logged = summary.get(f"domain_{when}")
                if (isinstance(logged, (int, float)) and not math.isnan(logged)
                        and not math.isclose(value, logged, abs_tol=1e-5)):
                    outcome = f"the row scores give {monitor} {value:.6f}, not the summary's domain_{when} {logged}"
                    break
        out.update(comparison_columns(name, outcome))
        out[f"{name}_initial"] = outcome.before if isinstance(outcome, PairedComparison) else math.nan
        out[f"{name}_best"] = outcome.after if isinstance(outcome, PairedComparison) else math.nan
    return out


def replicate_columns(results: pd.DataFrame) -> list[str]:
    """The seed columns: `seed` (the run's global seed) and grid keys such as `data.seed` or `seed_everything`."""
    return [c for c in results.columns if c == "seed" or c.endswith((".seed", "seed_everything"))]


def seed_values(row: pd.Series, keys: list[str]) -> tuple[str, ...]:
    """A run's seed values, written alike in every table (a seed column with a pending run's NaN reads 0 as 0.0)."""
    return tuple(str(int(row[k])) if isinstance(row[k], float) and row[k].is_integer() else str(row[k]) for k in keys)


def outcome_from_row(row: pd.Series, side: str) -> Outcome:
    """A sweep-table row's paired change from the initial model on `side` (`<side>_delta`, ... columns)."""
    if not isinstance(row.get(f"{side}_delta"), float) or math.isnan(row[f"{side}_delta"]):
        test = row.get(f"{side}_test")
        return test.removeprefix("none: ") if isinstance(test, str) else "no paired records in the table (a sweep from before they were kept)"
    return PairedComparison(n=int(row[f"{side}_n"]), before=float(row.get(f"{side}_initial", math.nan)),
                            after=float(row.get(f"{side}_best", math.nan)), delta=float(row[f"{side}_delta"]),
                            low=float(row[f"{side}_delta_low"]), high=float(row[f"{side}_delta_high"]),
                            p=float(row[f"{side}_p"]), test=str(row.get(f"{side}_test", "paired")))


def combine_seeds(outcomes: list[Outcome], before: float = math.nan) -> Outcome:
    """One outcome for a cell or a pair of cells: the paired comparison of a single seed, or several
    seeds' paired differences combined (`talr.stats.combine_replicates`; seeds without a comparison
    are left out)."""
    found = [o for o in outcomes if isinstance(o, PairedComparison)]
    if not found:
        return outcomes[0] if outcomes else "no run"
    if len(found) == 1:
        return found[0]
    return combine_replicates(found, before=before)


def against_initial(results: pd.DataFrame) -> pd.DataFrame:
    """Per cell (loss, learning rate): the change from the initial model on each side (an Outcome)."""
    done = results[results["status"] == "done"]
    sides = (*SIDES, *classified(results))
    cells = []
    for (loss, rate), rows in done.groupby(["loss", "learning_rate"], sort=True):
        cell: dict[str, Any] = {"loss": loss, "learning_rate": rate, "runs": len(rows)}
        for side in sides:
            before = float(rows[f"{side}_initial"].mean()) if f"{side}_initial" in rows else math.nan
            cell[side] = combine_seeds([outcome_from_row(row, side) for _, row in rows.iterrows()], before)
        cells.append(cell)
    return pd.DataFrame(cells, columns=["loss", "learning_rate", "runs", *sides])


def classified(results: pd.DataFrame) -> tuple[str, ...]:
    """The classification comparisons of a sweep table (CLASSIFICATION, where `run_columns` wrote them)."""
    return tuple(name for name in CLASSIFICATION if f"{name}_test" in results.columns)


def _domain_pair(a: pd.Series, b: pd.Series) -> Outcome:
    monitored = str(a.get("monitor", "")).removeprefix("val/")
    if monitored in CLASSIFICATION and b.get("monitor") == a.get("monitor"):  # as in run_columns: the monitored metric
        return _row_scores_pair(a, b, [monitored], lambda x, y: {monitored: CLASSIFICATION_PAIRS[monitored](x, y, RESAMPLES)})[monitored]
    files = [row.get("domain_generations_best") for row in (a, b)]
    if not all(isinstance(f, str) and Path(f).is_file() for f in files):
        return "no scored generations of the best step (the domain metric is not accuracy, or files moved)"
    if not isinstance(a.get("heldout_split"), str) or a.get("heldout_split") != b.get("heldout_split"):
        return "the runs held out different rows (data.task / val_size / seed differ, or a config is missing)"
    (rows_a, correct_a), (rows_b, correct_b) = (read_generations(Path(f)) for f in files)
    return compare_paired([pair_by_id(rows_a, correct_a, rows_b, correct_b)])


def _general_documents(row: pd.Series) -> dict[str, dict[Any, Any]] | str:
    """Task -> (document id -> its score) of a run's fit-end benchmark record, for the tasks its general
    score includes; or why there is none."""
    file = row.get("general_file_best")
    if not (isinstance(file, str) and Path(file).is_file()):
        unscored = row.get("general_test")  # a WiSE-FT alpha or merge point says which option left it out
        if isinstance(unscored, str) and unscored.startswith("none: "):
            return unscored.removeprefix("none: ")
        return "no GeneralBenchmarks fit-end record"
    record = _general_record(Path(file))
    per_document = record.get("per_document", {})
    tasks = record["general"]["included"]
    if not tasks or not all("doc_ids" in per_document.get(t, {}) for t in tasks):
        return "no per-document scores of the general score's tasks"
    return {t: dict(zip(per_document[t]["doc_ids"], per_document[t]["values"])) for t in tasks}


def _general_pair(a: pd.Series, b: pd.Series) -> Outcome:
    first, second = _general_documents(a), _general_documents(b)
    if isinstance(first, str) or isinstance(second, str):
        return first if isinstance(first, str) else second
    tasks = [t for t in first if t in second]
    if not tasks:
        return "the runs' general scores share no task"
    return compare_paired([pair_by_id(list(first[t]), list(first[t].values()), list(second[t]), list(second[t].values()))
                           for t in tasks])


PAIRS: dict[str, Callable[[pd.Series, pd.Series], Outcome]] = {"domain": _domain_pair, "general": _general_pair}


def between_strategies(results: pd.DataFrame) -> pd.DataFrame:
    """Every two strategies at the same learning rate: the change from `a` to `b` on each side,
    paired over the rows / documents both scored, seeds matched by their values; teacher-forced and
    drift comparisons beside them, and in a table with classification columns (`classified`) the
    balanced accuracy and label AUC on the same rows."""
    return paired_cells(results, within="learning_rate", across="loss")


def between_learning_rates(results: pd.DataFrame) -> pd.DataFrame:
    """Every two learning rates of the same strategy (the paper's Finding 1: does the smaller rate keep
    more for the same domain gain?), compared as `between_strategies` compares strategies; `a` is the
    smaller rate."""
    return paired_cells(results, within="loss", across="learning_rate")


def paired_cells(results: pd.DataFrame, within: str, across: str) -> pd.DataFrame:
    """Within each value of `within`, every two values `a` < `b` of `across`: one row with `within`, `a`,
    `b`, the number of seeds both ran, and an Outcome (or why none) per side and per paired metric."""
    done = results[results["status"] == "done"]
    keys = replicate_columns(done)
    class_metrics = classified(results)
    pairs = []
    for fixed, group in done.groupby(within, sort=True):
        by_value = {value: {seed_values(r, keys): r for _, r in rows.iterrows()} for value, rows in group.groupby(across)}
        for a, b in combinations(sorted(by_value), 2):
            shared = sorted(set(by_value[a]) & set(by_value[b]))
            entry: dict[str, Any] = {within: fixed, "a": a, "b": b, "seeds": len(shared)}
            for side in SIDES:
                outcomes = [PAIRS[side](by_value[a][k], by_value[b][k]) for k in shared]
                entry[side] = combine_seeds(outcomes) if shared else "no seed in common"
            per_seed = [{**_teacher_forced(by_value[a][k], by_value[b][k]), **_drift(by_value[a][k], by_value[b][k]),
                         **(_classification(by_value[a][k], by_value[b][k]) if class_metrics else {})} for k in shared]
            for name in (*TEACHER_FORCED, *DRIFT, *class_metrics):
                entry[name] = combine_seeds([o[name] for o in per_seed]) if shared else "no seed in common"
            pairs.append(entry)
    return pd.DataFrame(pairs, columns=[within, "a", "b", "seeds", *SIDES, *TEACHER_FORCED, *DRIFT, *class_metrics])


# the column in which a point's row names its run (talr.experiments.sweep.WEIGHT_SPACE_ROWS)
POINT_RUN_COLUMNS = ("wiseft_of", "merge_of")


def points_against_runs(results: pd.DataFrame, runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """Each WiSE-FT alpha and task-vector merge point against its own run's fine-tuned model: `a` is the
    run at its best step, `b` the point (`<run>@alpha=0.50` -> `alpha=0.50`), compared as
    `between_strategies` compares two runs, on the same held-out rows, benchmark documents (where the
    point was benchmarked) and general prompts. The point shares the run's training, so the intervals
    are over rows, documents and prompts only. `runs`: where to find the points' runs (default:
    `results`; a combined report passes every table's rows, since `read_tables` may leave out a
    point's run as a repeat of an earlier table's)."""
    runs = results if runs is None else runs
    by_name = {row["run"]: row for _, row in runs[runs["status"] == "done"].iterrows()}
    class_metrics = classified(results)
    names = (*SIDES, *TEACHER_FORCED, *DRIFT, *class_metrics)
    entries = []
    for column in POINT_RUN_COLUMNS:
        if column not in results:
            continue
        for _, point in results[results[column].notna() & (results["status"] == "done")].iterrows():
            run = by_name.get(point[column])
            entry: dict[str, Any] = {"run": point[column], "a": "fine-tuned", "b": str(point["run"]).partition("@")[2]}
            if run is None:
                entries.append({**entry, **dict.fromkeys(names, f"{point[column]}: the run's own row is not in the table")})
                continue
            entry["a"] = f"fine-tuned (step {int(run['best_step'])})" if pd.notna(run.get("best_step")) else "fine-tuned"
            entry.update({side: PAIRS[side](run, point) for side in SIDES})
            entry.update({**_teacher_forced(run, point), **_drift(run, point),
                          **(_classification(run, point) if class_metrics else {})})
            entries.append(entry)
    return pd.DataFrame(entries, columns=["run", "a", "b", *names])


def between_tables(first: pd.DataFrame, second: pd.DataFrame) -> pd.DataFrame:
    """The paper's Finding 2 asks whether a larger learning rate costs less general capability after one
    kind of target (ESCI's labels) than after another (MedCalc's explanations): for each strategy and
    each two learning rates a < b that both sweep tables ran, the change from a to b in `second` minus
    the change from a to b in `first`, on the general score (document by document, where both tables
    scored the same benchmark documents) and on the drift (prompt by prompt, where both hold the same
    initial answers). Each table's own change (`general_first`, `general_second`) comes beside it. A
    table's seeds are matched with the other's by value: the two tables' runs are trained apart, so
    the match only counts seeds, and with several a t-interval across them holds both tables' spread.
    Give each table's fine-tuned runs (talr.experiments.report.fine_tuned_runs: no WiSE-FT alpha rows)."""
    keys = [column for column in replicate_columns(first) if column in replicate_columns(second)]
    runs = [_runs_by_cell(table, keys) for table in (first, second)]
    pairs = []
    for loss in sorted({loss for loss, _ in runs[0]}):
        rates = sorted(rate for cell, rate in runs[0] if cell == loss and (loss, rate) in runs[1])
        for a, b in combinations(rates, 2):
            entry: dict[str, Any] = {"loss": loss, "a": a, "b": b}
            for side, cells in zip(("general_first", "general_second"), runs):
                own = sorted(set(cells[loss, a]) & set(cells[loss, b]))
                entry[side] = combine_seeds([_general_pair(cells[loss, a][k], cells[loss, b][k]) for k in own])
            seeds = sorted(set.intersection(*(set(cells[loss, rate]) for cells in runs for rate in (a, b))))
            entry["seeds"] = len(seeds)
            quads = [[cells[loss, rate][k] for cells in runs for rate in (a, b)] for k in seeds]
            entry["general"] = combine_seeds([_general_change_of_changes(*q) for q in quads]) if seeds else "no seed in common"
            per_seed = [_drift_change_of_changes(*q) for q in quads]
            for name in DRIFT:
                entry[name] = combine_seeds([o[name] for o in per_seed]) if seeds else "no seed in common"
            pairs.append(entry)
    return pd.DataFrame(pairs, columns=["loss", "a", "b", "seeds", "general_first", "general_second", "general", *DRIFT])


def _runs_by_cell(results: pd.DataFrame, keys: list[str]) -> dict[tuple[Any, Any], dict[tuple[str, ...], pd.Series]]:
    """(loss, learning rate) -> the values of the seed columns `keys` -> the finished run."""
    done = results[results["status"] == "done"]
    cells: dict[tuple[Any, Any], dict[tuple[str, ...], pd.Series]] = {}
    for _, row in done.iterrows():
        cells.setdefault((row["loss"], row["learning_rate"]), {})[seed_values(row, keys)] = row
    return cells


def _general_change_of_changes(first_a: pd.Series, first_b: pd.Series, second_a: pd.Series, second_b: pd.Series) -> Outcome:
    """(second_b - second_a) - (first_b - first_a) of the general score, document by document."""
    scored = [_general_documents(row) for row in (first_a, first_b, second_a, second_b)]
    reasons = [s for s in scored if isinstance(s, str)]
    if reasons:
        return reasons[0]
    tasks = [t for t in scored[0] if all(t in s for s in scored)]
    items = []
    for task in tasks:
        documents = [d for d in scored[0][task] if all(d in s[task] for s in scored)]
        first = PairedItems.from_values(*([scored[i][task][d] for d in documents] for i in (0, 1)))
        second = PairedItems.from_values(*([scored[i][task][d] for d in documents] for i in (2, 3)))
        if not np.array_equal(first.counts, second.counts):
            return f"{task}: the tables' documents hold different numbers of scores"
        items.append(PairedItems(first.after - first.before, second.after - second.before, first.counts, scores=False))
    if not any(len(t.counts) for t in items):
        return "the tables' runs scored no benchmark document in common"
    return compare_paired(items)


def _drift_change_of_changes(first_a: pd.Series, first_b: pd.Series, second_a: pd.Series,
                             second_b: pd.Series) -> dict[str, Outcome]:
    """(second_b - second_a) - (first_b - first_a) of each drift metric, prompt by prompt."""
    files = [row.get("prompt_scores_best") for row in (first_a, first_b, second_a, second_b)]
    if not all(isinstance(f, str) and Path(f).is_file() for f in files):
        return dict.fromkeys(DRIFT, "no ForgettingMonitor prompt scores of the best step in all four runs")
    scored = [read_prompt_scores(Path(f)) for f in files]
    prompts = sorted(set.intersection(*(set(s) for s in scored)))
    if not prompts:
        return dict.fromkeys(DRIFT, "the tables' runs share no general prompt")
    if any(len({s[i]["tokens"] for s in scored}) > 1 for i in prompts):
        return dict.fromkeys(DRIFT, "the tables' initial answers differ (another prompt set, seed or max_new_tokens)")
    counts = np.array([scored[0][i]["tokens"] for i in prompts], dtype=float)
    outcomes: dict[str, Outcome] = {}
    for name, key in DRIFT.items():
        first_a_, first_b_, second_a_, second_b_ = (_sums_of(s, prompts, key) for s in scored)
        outcomes[name] = compare_paired([PairedItems(first_b_ - first_a_, second_b_ - second_a_, counts, scores=False)])
    return outcomes


def _drift(a: pd.Series, b: pd.Series) -> dict[str, Outcome]:
    files = [row.get("prompt_scores_best") for row in (a, b)]
    if not all(isinstance(f, str) and Path(f).is_file() for f in files):
        return dict.fromkeys(DRIFT, "no ForgettingMonitor prompt scores of the best step (no monitor, or a sweep from before they were kept)")
    return drift_pair(Path(files[0]), Path(files[1]))


def _row_scores_pair(a: pd.Series, b: pd.Series, names: Iterable[str],
                     compare: Callable[[Path, Path], dict[str, Outcome]]) -> dict[str, Outcome]:
    """`compare` of two runs' best-step row scores, or why not, for each of `names`."""
    files = [row.get("row_scores_best") for row in (a, b)]
    if not all(isinstance(f, str) and Path(f).is_file() for f in files):
        return dict.fromkeys(names, "no row scores of the best step (a sweep from before they were kept)")
    if not isinstance(a.get("heldout_split"), str) or a.get("heldout_split") != b.get("heldout_split"):
        return dict.fromkeys(names, "the runs held out different rows (data.task / val_size / seed differ, or a config is missing)")
    return compare(Path(files[0]), Path(files[1]))


def _teacher_forced(a: pd.Series, b: pd.Series) -> dict[str, Outcome]:
    return _row_scores_pair(a, b, TEACHER_FORCED, teacher_forced_pair)


def _classification(a: pd.Series, b: pd.Series) -> dict[str, Outcome]:
    return _row_scores_pair(a, b, CLASSIFICATION, classification_pair)
