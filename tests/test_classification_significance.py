"""The sweep table's and the report's classification comparisons (talr.experiments.significance:
`balanced_accuracy_*`, `label_auc_*`) on row-scores and generations files written here by hand, checked
against the metrics computed here from their definitions: the label AUC as sklearn's one-vs-rest ROC AUC
of each class on the row-centred log-probabilities, averaged over the classes; balanced accuracy as the
mean of the classes' recalls, counted row by row."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from talr.experiments.report import significance_markdown
from talr.experiments.significance import (against_initial, balanced_accuracy_pair, between_strategies,
                                           label_auc_pair, read_choices, read_generations, read_row_scores,
                                           run_columns)
from talr.stats import PairedComparison
from talr.token_loss import CALIBRATION_TEMPERATURES

# 10 held-out rows of 4 classes; the initial model answers every row with class 0 (a collapse), the
# fine-tuned one gets some of the other classes right
CLASSES = [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
PREDICTED_INITIAL = [0] * 10
PREDICTED_BEST = [0, 0, 1, 1, 1, 2, 0, 2, 3, 1]
BEST_STEP = 6
COLUMNS = ("delta", "delta_low", "delta_high", "p", "n", "test", "initial", "best")


@pytest.fixture(autouse=True)
def fresh_reads():
    """The readers cache by path: a file written by one test must not be answered from another's."""
    for reader in (read_row_scores, read_choices, read_generations):
        reader.cache_clear()


def log_probabilities(signal: float, seed: int) -> np.ndarray:
    """Each row's log-probabilities of the 4 classes' tokens: a bump of `signal` on its own class, plus
    noise, and some mass left to the rest of the vocabulary (which the centring removes)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(CLASSES), 4)) + signal * np.eye(4)[CLASSES]
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True) + rng.exponential(2.0, size=(len(CLASSES), 1)))


def write_validation(log_dir: Path, tag: str, logprobs: np.ndarray | None, predicted: list[int],
                     rows: list[int] | None = None) -> Path:
    """A validation as publish_records leaves it: `row_scores/<tag>.jsonl` (RowScores' fields, with the
    class fields where `logprobs` is given) and `generations/<tag>.jsonl` (greedy answers' correctness)."""
    rows = list(range(len(CLASSES))) if rows is None else rows
    scores, generations = log_dir / "row_scores" / f"{tag}.jsonl", log_dir / "generations" / f"{tag}.jsonl"
    scores.parent.mkdir(parents=True, exist_ok=True)
    generations.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in rows:
        record = {"row_index": i, "tokens": 2, "nll": 1.5, "top1_hits": 1, "easy": 1,
                  "nll_at_temperature": [1.5] * len(CALIBRATION_TEMPERATURES)}
        if logprobs is not None:
            record.update(choice=CLASSES[i], choice_logprobs=logprobs[i].tolist())
        lines.append(json.dumps(record) + "\n")
    scores.write_text("".join(lines))
    generations.write_text("".join(json.dumps({"row_index": i, "correct": predicted[i] == CLASSES[i], "parsed": True,
                                               "answer": str(predicted[i]), "generation": f"{predicted[i]}</answer>"}) + "\n"
                                   for i in rows))
    return scores


def label_auc_by_definition(logprobs: np.ndarray, classes: list[int]) -> float:
    """sklearn's ROC AUC of each class against the rest on the row-centred log-probabilities, averaged
    over the classes that have rows of their own and of another class."""
    from sklearn.metrics import roc_auc_score

    labels = np.array(classes)
    centred = logprobs - logprobs.mean(axis=1, keepdims=True)
    return float(np.mean([roc_auc_score(labels == c, centred[:, c]) for c in range(logprobs.shape[1])
                          if 0 < np.sum(labels == c) < len(labels)]))


def weighted_label_auc_by_definition(logprobs: np.ndarray, classes: list[int]) -> float:
    """sklearn's one-vs-rest ROC AUC weighted by each class's number of rows, on the centred log-probabilities."""
    from sklearn.metrics import roc_auc_score

    labels = np.array(classes)
    centred = logprobs - logprobs.mean(axis=1, keepdims=True)
    present = sorted(set(classes))
    return float(roc_auc_score(np.eye(logprobs.shape[1])[labels][:, present], centred[:, present], average="weighted"))


def balanced_accuracy_by_hand(classes: list[int], predicted: list[int]) -> float:
    """The mean over the classes present of each class's recall: its rows answered with it, over its rows."""
    recalls = []
    for c in sorted(set(classes)):
        mine = [i for i, gold in enumerate(classes) if gold == c]
        recalls.append(sum(predicted[i] == c for i in mine) / len(mine))
    return sum(recalls) / len(recalls)


def classification_run(root: Path, name: str, monitor: str = "val/label_auc", signal: float = 2.0,
                       predicted: list[int] = PREDICTED_BEST, seed: int = 1) -> dict:
    """A finished ESCI-like run: step-0 and best-step validations, its config and its summary."""
    log_dir = root / name / "tb" / "version_0"
    initial, best = log_probabilities(0.0, seed=0), log_probabilities(signal, seed=seed)  # one initial model
    write_validation(log_dir, "val_step000000", initial, PREDICTED_INITIAL)
    write_validation(log_dir, f"val_step{BEST_STEP:06d}", best, predicted)
    (log_dir / "config.yaml").write_text(yaml.safe_dump({"data": {"task": {"class_path": "talr.tasks.ESCI"},
                                                                   "val_size": len(CLASSES), "seed": 0}}))
    values = {"val/label_auc": (label_auc_by_definition(initial, CLASSES), label_auc_by_definition(best, CLASSES)),
              "val/balanced_accuracy": (balanced_accuracy_by_hand(CLASSES, PREDICTED_INITIAL),
                                        balanced_accuracy_by_hand(CLASSES, predicted))}
    return {"monitor": monitor, "domain_initial": values.get(monitor, (math.nan,))[0],
            "domain_best": values.get(monitor, (math.nan, math.nan))[1], "best_step": BEST_STEP,
            "log_dir": str(log_dir), "config_file": str(log_dir / "config.yaml")}


def test_read_choices_gives_each_rows_class_and_log_probabilities(tmp_path):
    logprobs = log_probabilities(1.0, seed=3)
    path = write_validation(tmp_path, "val_step000000", logprobs, PREDICTED_INITIAL)
    choices = read_choices(path)
    assert sorted(choices) == list(range(len(CLASSES)))
    for i, (gold, scores) in choices.items():
        assert gold == CLASSES[i] and scores == pytest.approx(logprobs[i].tolist(), abs=0)
    assert read_choices(write_validation(tmp_path / "plain", "val_step000000", None, PREDICTED_INITIAL)) == {}


def test_pairs_match_the_metrics_computed_from_their_definitions(tmp_path):
    before, after = log_probabilities(0.0, seed=0), log_probabilities(2.0, seed=1)
    a = write_validation(tmp_path, "val_step000000", before, PREDICTED_INITIAL)
    b = write_validation(tmp_path, "val_step000006", after, PREDICTED_BEST)
    auc = label_auc_pair(a, b, resamples=400)
    assert isinstance(auc, PairedComparison) and auc.n == len(CLASSES)
    assert auc.before == pytest.approx(label_auc_by_definition(before, CLASSES), abs=1e-12)
    assert auc.after == pytest.approx(label_auc_by_definition(after, CLASSES), abs=1e-12)
    assert auc.delta == pytest.approx(auc.after - auc.before)
    assert auc.low <= auc.delta <= auc.high and 0 <= auc.p <= 1
    balanced = balanced_accuracy_pair(a, b, resamples=400)
    assert isinstance(balanced, PairedComparison) and balanced.n == len(CLASSES)
    assert balanced.before == pytest.approx(0.25)  # all answered class 0: recall 1 for class 0, 0 for the rest
    # by hand: class 0 2/3 (row 2 answered 1), class 1 2/2, class 2 2/3 (row 6 answered 0), class 3 1/2
    assert balanced.after == pytest.approx((2 / 3 + 1 + 2 / 3 + 1 / 2) / 4)
    assert balanced.after == pytest.approx(balanced_accuracy_by_hand(CLASSES, PREDICTED_BEST))
    from sklearn.metrics import balanced_accuracy_score

    assert balanced.after == pytest.approx(balanced_accuracy_score(CLASSES, PREDICTED_BEST))
    assert balanced.low <= balanced.delta <= balanced.high and 0 <= balanced.p <= 1


def test_identical_scorings_change_nothing(tmp_path):
    logprobs = log_probabilities(1.5, seed=4)
    a = write_validation(tmp_path / "a", "val_step000006", logprobs, PREDICTED_BEST)
    b = write_validation(tmp_path / "b", "val_step000006", logprobs, PREDICTED_BEST)
    for outcome in (label_auc_pair(a, b, resamples=200), balanced_accuracy_pair(a, b, resamples=200)):
        assert outcome.delta == 0 and outcome.low == 0 and outcome.high == 0 and outcome.p == 1


def test_different_rows_are_refused(tmp_path):
    logprobs = log_probabilities(1.5, seed=4)
    a = write_validation(tmp_path / "a", "val_step000006", logprobs, PREDICTED_BEST)
    b = write_validation(tmp_path / "b", "val_step000006", logprobs, PREDICTED_BEST, rows=list(range(9)))
    for pair in (label_auc_pair, balanced_accuracy_pair):
        outcome = pair(a, b)
        assert isinstance(outcome, str) and "different rows" in outcome and "1 only in" in outcome
    # the same row indices holding other classes: another task or split
    other = tmp_path / "c" / "row_scores" / "val_step000006.jsonl"
    write_validation(tmp_path / "c", "val_step000006", logprobs, PREDICTED_BEST)
    lines = [json.loads(line) for line in other.read_text().splitlines()]
    lines[0]["choice"] = 3
    other.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert "classes differ" in label_auc_pair(a, other)
    # a file without classes, or without the generations beside it
    plain = write_validation(tmp_path / "d", "val_step000006", None, PREDICTED_BEST)
    assert "no class log-probabilities" in label_auc_pair(a, plain)
    b = write_validation(tmp_path / "e", "val_step000006", logprobs, PREDICTED_BEST)
    (tmp_path / "e" / "generations" / "val_step000006.jsonl").unlink()
    assert "not found" in balanced_accuracy_pair(a, b)


def test_run_columns_compare_the_best_step_with_the_initial_model(tmp_path):
    summary = classification_run(tmp_path, "talr")
    columns = run_columns(summary)
    before, after = log_probabilities(0.0, seed=0), log_probabilities(2.0, seed=1)
    assert columns["label_auc_initial"] == pytest.approx(label_auc_by_definition(before, CLASSES), abs=1e-12)
    assert columns["label_auc_best"] == pytest.approx(label_auc_by_definition(after, CLASSES), abs=1e-12)
    assert columns["balanced_accuracy_initial"] == pytest.approx(0.25)
    assert columns["balanced_accuracy_best"] == pytest.approx(balanced_accuracy_by_hand(CLASSES, PREDICTED_BEST))
    for name in ("label_auc", "balanced_accuracy"):
        assert columns[f"{name}_delta"] == pytest.approx(columns[f"{name}_best"] - columns[f"{name}_initial"])
        assert columns[f"{name}_delta_low"] <= columns[f"{name}_delta"] <= columns[f"{name}_delta_high"]
        assert 0 <= columns[f"{name}_p"] <= 1 and columns[f"{name}_n"] == len(CLASSES)
    assert columns["label_auc_test"] == "paired bootstrap / swap"
    assert columns["label_auc_weighted_initial"] == pytest.approx(weighted_label_auc_by_definition(before, CLASSES), abs=1e-12)
    assert columns["label_auc_weighted_best"] == pytest.approx(weighted_label_auc_by_definition(after, CLASSES), abs=1e-12)
    assert columns["label_auc_weighted_delta_low"] <= columns["label_auc_weighted_delta"] <= columns["label_auc_weighted_delta_high"]
    assert columns["balanced_accuracy_test"] == "paired bootstrap / sign-flip"
    # the monitored metric's comparison is the run's domain comparison (the Pareto plot's bars)
    for key in ("delta", "delta_low", "delta_high", "p", "n", "test"):
        assert columns[f"domain_{key}"] == columns[f"label_auc_{key}"]
    # balanced accuracy as the monitor: the same columns, and it is the domain comparison
    by_balanced_accuracy = run_columns(classification_run(tmp_path, "ba", monitor="val/balanced_accuracy"))
    assert by_balanced_accuracy["balanced_accuracy_n"] == 10
    assert by_balanced_accuracy["domain_delta"] == pytest.approx(balanced_accuracy_by_hand(CLASSES, PREDICTED_BEST) - 0.25)
    # the row scores carry classes while the monitor is another metric: the columns all the same
    loss_monitored = run_columns(classification_run(tmp_path, "loss", monitor="val/loss"))
    assert loss_monitored["label_auc_delta"] == pytest.approx(columns["label_auc_delta"])


def test_run_columns_say_why_a_classification_run_has_no_comparison(tmp_path):
    summary = classification_run(tmp_path, "run")
    # the files do not give the summary's number: the wrong step, or another run's files
    assert run_columns({**summary, "domain_best": 0.123})["label_auc_test"].startswith("none: the row scores give")
    # a classification monitor without the files: NaN columns that say what is missing
    Path(summary["log_dir"], "row_scores", "val_step000000.jsonl").unlink()
    missing = run_columns(summary)
    for name in ("label_auc", "balanced_accuracy"):
        assert missing[f"{name}_test"].startswith("none: not found") and math.isnan(missing[f"{name}_delta"])
        assert math.isnan(missing[f"{name}_best"])


def test_a_run_without_classes_gets_no_classification_columns(tmp_path):
    log_dir = tmp_path / "medcalc" / "tb" / "version_0"
    write_validation(log_dir, "val_step000000", None, PREDICTED_INITIAL)
    write_validation(log_dir, f"val_step{BEST_STEP:06d}", None, PREDICTED_BEST)
    summary = {"monitor": "val/accuracy", "domain_initial": 0.3, "domain_best": 0.7, "best_step": BEST_STEP,
               "log_dir": str(log_dir), "config_file": None}
    columns = run_columns(summary)
    assert not [c for c in columns if c.startswith(("label_auc", "balanced_accuracy"))]
    assert columns["domain_test"] == "McNemar" and "row_scores_best" in columns  # as before
    results = pd.DataFrame([{"status": "done", "loss": loss, "learning_rate": 1e-4, "seed": 0, **columns}
                            for loss in ("ce", "talr")])
    assert list(against_initial(results).columns) == ["loss", "learning_rate", "runs", "domain", "general"]
    assert not {"label_auc", "balanced_accuracy"} & set(between_strategies(results).columns)
    report = significance_markdown(results)
    assert "label AUC" not in report and "balanced accuracy" not in report


def sweep_table(tmp_path: Path, runs: dict[str, dict]) -> pd.DataFrame:
    """A sweep table as `talr sweep` writes it (one CSV row per run: summary, run_columns) and reads back."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    rows = [{"run": name, "status": "done", "loss": name.split("-")[0], "learning_rate": 1e-4, "seed": 0,
             **summary, **run_columns(summary)} for name, summary in runs.items()]
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    return pd.read_csv(tmp_path / "results.csv")


def test_strategies_are_compared_on_the_same_rows_and_reported(tmp_path):
    ce = classification_run(tmp_path, "ce", signal=1.0, predicted=PREDICTED_INITIAL, seed=5)
    talr = classification_run(tmp_path, "talr", signal=2.0, predicted=PREDICTED_BEST, seed=1)
    results = sweep_table(tmp_path, {"ce": ce, "talr": talr})
    (pair,) = between_strategies(results).to_dict("records")
    assert (pair["a"], pair["b"]) == ("ce", "talr")
    ce_scores, talr_scores = log_probabilities(1.0, seed=5), log_probabilities(2.0, seed=1)
    auc = pair["label_auc"]
    assert auc.before == pytest.approx(label_auc_by_definition(ce_scores, CLASSES), abs=1e-12)
    assert auc.delta == pytest.approx(label_auc_by_definition(talr_scores, CLASSES)
                                      - label_auc_by_definition(ce_scores, CLASSES), abs=1e-12)
    assert auc.low <= auc.delta <= auc.high and 0 <= auc.p <= 1
    assert pair["domain"].delta == auc.delta and pair["domain"].low == auc.low  # the monitor, val/label_auc
    weighted = pair["label_auc_weighted"]
    assert weighted.delta == pytest.approx(weighted_label_auc_by_definition(talr_scores, CLASSES)
                                           - weighted_label_auc_by_definition(ce_scores, CLASSES), abs=1e-12)
    balanced = pair["balanced_accuracy"]
    assert balanced.delta == pytest.approx(balanced_accuracy_by_hand(CLASSES, PREDICTED_BEST) - 0.25)
    assert balanced.low <= balanced.delta <= balanced.high and 0 <= balanced.p <= 1
    # the report: both tables, each through the one table helper, with the numbers above
    lines = significance_markdown(results).splitlines()

    def cells(intro: str, prefix: str) -> list[str]:
        start = next(i for i, line in enumerate(lines) if line.startswith(intro))
        line = next(line for line in lines[start:] if line.startswith(prefix))
        return [cell.strip().strip("*") for cell in line.strip("|").split("|")]

    row = cells("Classification: change from the initial model", "| talr | 0.0001 | 1 |")
    columns = results.set_index("run").loc["talr"]
    assert row[3].startswith(f"{columns['balanced_accuracy_delta']:+.4f}") and row[5] == "paired bootstrap / sign-flip"
    assert row[6].startswith(f"{columns['label_auc_delta']:+.4f}") and row[8] == "paired bootstrap / swap"
    row = cells("The same pairs on the classes", "| 0.0001 | ce | talr | 1 |")
    assert row[4].startswith(f"{balanced.delta:+.4f}") and row[5] == f"{balanced.p:.3g}"
    assert row[7].startswith(f"{auc.delta:+.4f}") and row[8] == f"{auc.p:.3g}"
    # the same run twice (another strategy name): no change
    twin = sweep_table(tmp_path / "twin", {"ce": talr, "talr": talr})
    (pair,) = between_strategies(twin).to_dict("records")
    assert pair["label_auc"].delta == 0 and pair["balanced_accuracy"].delta == 0


def test_strategies_with_different_rows_are_not_compared(tmp_path):
    ce = classification_run(tmp_path, "ce")
    talr = classification_run(tmp_path, "talr")
    scores = Path(talr["log_dir"]) / "row_scores" / f"val_step{BEST_STEP:06d}.jsonl"
    scores.write_text("".join(scores.read_text().splitlines(keepends=True)[:-1]))  # one row fewer
    (pair,) = between_strategies(sweep_table(tmp_path, {"ce": ce, "talr": talr})).to_dict("records")
    for name in ("label_auc", "balanced_accuracy"):
        assert isinstance(pair[name], str) and "different rows" in pair[name]
