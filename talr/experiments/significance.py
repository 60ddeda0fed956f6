"""Which differences in a sweep are real: paired comparisons from the runs' per-item records.

Two comparisons, each on the domain side and the general side:

- **each run against the initial model**: the domain accuracy of the held-out rows before
  fine-tuning (the step-0 validation) against the best step, row by row (`run_columns`, for the
  sweep table); the general score from GeneralBenchmarks' paired records of the fit-end event
  (`general_delta`, ... in the run summary).
- **strategies against each other at the same learning rate** (`between_strategies`): paired
  over the held-out rows both runs scored (only when their data split is the same: same
  `data.task`, `data.val_size` and `data.seed`) and over the benchmark documents both scored.
  On the held-out rows also teacher-forced, from each validation's row scores
  (`teacher_forced_pair`): top-1 token accuracy and NLL at each run's best temperature, which a
  temperature cannot move, beside plain NLL, which it can; these need no generation, so they
  compare runs whose domain metric is a loss. On the general side also the forgetting monitor's
  drift, prompt by prompt (`drift_pair`): agreement and calibrated KL beside KL and entropy.

Seeds: runs of one cell (loss, learning rate) that differ only in a seed column are replicates.
A cell with one run reports the paired test of that run (exact McNemar and Tango's interval for
accuracy). A cell with several seeds reports the mean of the per-seed paired differences with a
t-interval and t-test across seeds (`talr.stats.compare_replicates`): the seed-to-seed spread holds
the training randomness, which pooling the documents of all seeds would hide. Between two cells,
seeds are matched by their seed values and each matched pair gives one paired difference.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from itertools import combinations
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np
import pandas as pd
import yaml

from talr.general_prompts import prompt_scores_file
from talr.stats import PairedComparison, PairedItems, compare_paired, compare_replicates, pair_by_id

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

    def column(scored: dict[int, dict[str, Any]], key: str) -> np.ndarray:
        values = np.array([scored[i][key] for i in shared], dtype=float)
        return values[:, int(values.sum(0).argmin())] if values.ndim == 2 else values

    return {name: compare_paired([PairedItems(column(a, key), column(b, key), counts)]) for name, key in keys.items()}


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
    files the report pairs runs with (absolute paths) and the run's held-out split. A summary that
    names `domain_generations_file` is compared on those generations instead of the best step's."""
    log_dir = Path(summary["log_dir"]).resolve() if summary.get("log_dir") else None
    out: dict[str, Any] = {"heldout_split": heldout_split(summary.get("config_file"))}
    for when in ("initial", "best"):  # GeneralBenchmarks names them relative to the log directory
        name = summary.get(f"general_file_{when}")
        if name and log_dir is not None:
            out[f"general_file_{when}"] = str(log_dir / name)
    if log_dir is not None and summary.get("best_step") is not None and not summary.get("domain_generations_file"):
        scores = row_scores_file(log_dir, summary["best_step"])
        if scores.is_file():  # written by talr since the row scores were kept
            out["row_scores_best"] = str(scores)
        drift = prompt_scores_file(log_dir / "forgetting", summary["best_step"])  # ForgettingMonitor's default dirpath
        if drift.is_file():
            out["prompt_scores_best"] = str(drift)
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
    return out


def replicate_columns(results: pd.DataFrame) -> list[str]:
    """The seed columns: `seed` (the run's global seed) and grid keys such as `data.seed` or `seed_everything`."""
    return [c for c in results.columns if c == "seed" or c.endswith((".seed", "seed_everything"))]


def _replicate(row: pd.Series, keys: list[str]) -> tuple[str, ...]:
    return tuple(str(row[k]) for k in keys)


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
    """One outcome for a cell or a pair of cells: the paired comparison of a single seed, or the
    t-interval across several seeds' paired differences (seeds without a comparison are left out)."""
    found = [o for o in outcomes if isinstance(o, PairedComparison)]
    if not found:
        return outcomes[0] if outcomes else "no run"
    if len(found) == 1:
        return found[0]
    return compare_replicates([o.delta for o in found], before=before, items=round(sum(o.n for o in found) / len(found)))


def against_initial(results: pd.DataFrame) -> pd.DataFrame:
    """Per cell (loss, learning rate): the change from the initial model on each side (an Outcome)."""
    done = results[results["status"] == "done"]
    cells = []
    for (loss, rate), rows in done.groupby(["loss", "learning_rate"], sort=True):
        cell: dict[str, Any] = {"loss": loss, "learning_rate": rate, "runs": len(rows)}
        for side in SIDES:
            before = float(rows[f"{side}_initial"].mean()) if f"{side}_initial" in rows else math.nan
            cell[side] = combine_seeds([outcome_from_row(row, side) for _, row in rows.iterrows()], before)
        cells.append(cell)
    return pd.DataFrame(cells, columns=["loss", "learning_rate", "runs", *SIDES])


def _domain_pair(a: pd.Series, b: pd.Series) -> Outcome:
    files = [row.get("domain_generations_best") for row in (a, b)]
    if not all(isinstance(f, str) and Path(f).is_file() for f in files):
        return "no scored generations of the best step (the domain metric is not accuracy, or files moved)"
    if not isinstance(a.get("heldout_split"), str) or a.get("heldout_split") != b.get("heldout_split"):
        return "the runs held out different rows (data.task / val_size / seed differ, or a config is missing)"
    (rows_a, correct_a), (rows_b, correct_b) = (read_generations(Path(f)) for f in files)
    return compare_paired([pair_by_id(rows_a, correct_a, rows_b, correct_b)])


def _general_pair(a: pd.Series, b: pd.Series) -> Outcome:
    files = [row.get("general_file_best") for row in (a, b)]
    if not all(isinstance(f, str) and Path(f).is_file() for f in files):
        return "no GeneralBenchmarks fit-end record"
    first, second = (_general_record(Path(f)) for f in files)
    tasks = [t for t in first["general"]["included"] if t in second["general"]["included"]]
    documents = [(first.get("per_document", {}).get(t, {}), second.get("per_document", {}).get(t, {})) for t in tasks]
    if not tasks or not all("doc_ids" in x and "doc_ids" in y for x, y in documents):
        return "no per-document scores of the general score's tasks in both runs"
    return compare_paired([pair_by_id(x["doc_ids"], x["values"], y["doc_ids"], y["values"]) for x, y in documents])


PAIRS: dict[str, Callable[[pd.Series, pd.Series], Outcome]] = {"domain": _domain_pair, "general": _general_pair}


def between_strategies(results: pd.DataFrame) -> pd.DataFrame:
    """Every two strategies at the same learning rate: the change from `a` to `b` on each side,
    paired over the rows / documents both scored, seeds matched by their values."""
    done = results[results["status"] == "done"]
    keys = replicate_columns(done)
    pairs = []
    for rate, at_rate in done.groupby("learning_rate", sort=True):
        by_loss = {loss: {_replicate(r, keys): r for _, r in rows.iterrows()} for loss, rows in at_rate.groupby("loss")}
        for a, b in combinations(sorted(by_loss), 2):
            shared = sorted(set(by_loss[a]) & set(by_loss[b]))
            entry: dict[str, Any] = {"learning_rate": rate, "a": a, "b": b, "seeds": len(shared)}
            for side in SIDES:
                outcomes = [PAIRS[side](by_loss[a][k], by_loss[b][k]) for k in shared]
                entry[side] = combine_seeds(outcomes) if shared else "no seed in common"
            per_seed = [{**_teacher_forced(by_loss[a][k], by_loss[b][k]), **_drift(by_loss[a][k], by_loss[b][k])}
                        for k in shared]
            for name in (*TEACHER_FORCED, *DRIFT):
                entry[name] = combine_seeds([o[name] for o in per_seed]) if shared else "no seed in common"
            pairs.append(entry)
    return pd.DataFrame(pairs, columns=["learning_rate", "a", "b", "seeds", *SIDES, *TEACHER_FORCED, *DRIFT])


def _drift(a: pd.Series, b: pd.Series) -> dict[str, Outcome]:
    files = [row.get("prompt_scores_best") for row in (a, b)]
    if not all(isinstance(f, str) and Path(f).is_file() for f in files):
        return dict.fromkeys(DRIFT, "no ForgettingMonitor prompt scores of the best step (no monitor, or a sweep from before they were kept)")
    return drift_pair(Path(files[0]), Path(files[1]))


def _teacher_forced(a: pd.Series, b: pd.Series) -> dict[str, Outcome]:
    files = [row.get("row_scores_best") for row in (a, b)]
    if not all(isinstance(f, str) and Path(f).is_file() for f in files):
        return dict.fromkeys(TEACHER_FORCED, "no row scores of the best step (a sweep from before they were kept)")
    if not isinstance(a.get("heldout_split"), str) or a.get("heldout_split") != b.get("heldout_split"):
        return dict.fromkeys(TEACHER_FORCED, "the runs held out different rows (data.task / val_size / seed differ, or a config is missing)")
    return teacher_forced_pair(Path(files[0]), Path(files[1]))
