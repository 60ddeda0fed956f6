"""Readers for the benchmarks' original file formats, used as lm-eval `custom_dataset` functions.

Each reader takes `data_dir` (the benchmark root, rendered into the task YAML) and returns a
`datasets.DatasetDict` whose rows have the fields of the Hugging Face dataset that lm-eval's
standard task reads, so the task YAMLs can keep the standard prompts unchanged. lm-eval also
passes the task's metadata (and `--metadata`) as keyword arguments; readers ignore those.

The file layout under `data_dir` is `FILES` below; a missing file raises FileNotFoundError
naming the file and the setting that points at the directory.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Any

import datasets

# Relative paths under data_dir, per reader. MMLU's are per subject (see mmlu_files).
FILES: dict[str, dict[str, str]] = {
    "arc_easy": {"test": "arc/ARC-Easy-test.jsonl", "validation": "arc/ARC-Easy-validation.jsonl"},
    "arc_challenge": {"test": "arc/ARC-Challenge-test.jsonl", "validation": "arc/ARC-Challenge-validation.jsonl"},
    "piqa": {"validation": "piqa/valid.jsonl", "labels": "piqa/valid-labels.lst"},
    "hellaswag": {"validation": "hellaswag/hellaswag_val_subset1000.jsonl"},
    "gsm8k": {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
    "ifeval": {"train": "ifeval/input_data.jsonl"},
    # openai/human-eval ships data/HumanEval.jsonl.gz; an unpacked .jsonl works too
    "humaneval": {"test": "humaneval/HumanEval.jsonl.gz|humaneval/HumanEval.jsonl"},
}
MMLU_SPLITS = {"test": "test", "dev": "dev", "validation": "val"}  # split -> folder (hendrycks layout)
MMLU_COLUMNS = ("question", "A", "B", "C", "D", "answer")
DATA_DIR_HINT = "the GeneralBenchmarks `data_dir` option, $TALR_BENCH_DIR, or write_task_dir(data_dir=...)"


def mmlu_files(subject: str) -> dict[str, str]:
    return {split: f"mmlu/{folder}/{subject}_{folder}.csv" for split, folder in MMLU_SPLITS.items()}


def resolve(data_dir: str | Path, relative: str) -> Path:
    """The file for `relative` (alternatives separated by `|`), or an error naming what is missing."""
    candidates = [Path(data_dir) / option for option in relative.split("|")]
    for path in candidates:
        if path.is_file():
            return path
    names = " or ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"benchmark file {names} not found; data_dir={str(data_dir)!r} comes from {DATA_DIR_HINT}")


def _jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _splits(rows: dict[str, list[dict[str, Any]]]) -> datasets.DatasetDict:
    return datasets.DatasetDict({split: datasets.Dataset.from_list(items) for split, items in rows.items()})


def _jsonl_splits(data_dir: str, name: str) -> datasets.DatasetDict:
    return _splits({split: _jsonl(resolve(data_dir, rel)) for split, rel in FILES[name].items()})


def load_arc_easy(data_dir: str, **_: Any) -> datasets.DatasetDict:
    """ARC-Easy jsonl in the ai2_arc layout: id, question, choices{text, label}, answerKey."""
    return _jsonl_splits(data_dir, "arc_easy")


def load_arc_challenge(data_dir: str, **_: Any) -> datasets.DatasetDict:
    return _jsonl_splits(data_dir, "arc_challenge")


def load_gsm8k(data_dir: str, **_: Any) -> datasets.DatasetDict:
    """grade-school-math jsonl: question, answer (ending in '#### N')."""
    return _jsonl_splits(data_dir, "gsm8k")


def load_ifeval(data_dir: str, **_: Any) -> datasets.DatasetDict:
    """IFEval input_data.jsonl: key, prompt, instruction_id_list, kwargs (lm-eval's split is 'train')."""
    return _jsonl_splits(data_dir, "ifeval")


def load_hellaswag(data_dir: str, **_: Any) -> datasets.DatasetDict:
    """rowanz/hellaswag jsonl: ctx_a, ctx_b, ctx, activity_label, endings, label (an int there)."""
    rows = _jsonl(resolve(data_dir, FILES["hellaswag"]["validation"]))
    for row in rows:
        row["label"] = str(row["label"])  # the hub copy lm-eval reads stores it as a string
    return _splits({"validation": rows})


def load_piqa(data_dir: str, **_: Any) -> datasets.DatasetDict:
    """PIQA valid.jsonl (goal, sol1, sol2) with its labels from valid-labels.lst, one per line."""
    rows = _jsonl(resolve(data_dir, FILES["piqa"]["validation"]))
    labels_path = resolve(data_dir, FILES["piqa"]["labels"])
    labels = [int(line) for line in labels_path.read_text().split()]
    if len(labels) != len(rows):
        raise ValueError(f"{labels_path}: {len(labels)} labels for {len(rows)} questions")
    return _splits({"validation": [{**row, "label": label} for row, label in zip(rows, labels)]})


def load_mmlu(data_dir: str, subject: str, **_: Any) -> datasets.DatasetDict:
    """One MMLU subject from the original headerless CSVs (question, A, B, C, D, answer letter).

    Rows become the cais/mmlu fields lm-eval's template reads: question, subject, choices
    (four strings) and answer (the index of the right choice).
    """
    splits = {}
    for split, rel in mmlu_files(subject).items():
        with resolve(data_dir, rel).open(newline="", encoding="utf-8") as f:
            records = [dict(zip(MMLU_COLUMNS, row)) for row in csv.reader(f) if row]
        splits[split] = [
            {"question": r["question"], "subject": subject, "choices": [r["A"], r["B"], r["C"], r["D"]],
             "answer": "ABCD".index(r["answer"].strip())}
            for r in records
        ]
    return _splits(splits)


def load_humaneval(data_dir: str, **_: Any) -> datasets.DatasetDict:
    """HumanEval jsonl(.gz): task_id, prompt, canonical_solution, test, entry_point."""
    return _jsonl_splits(data_dir, "humaneval")
