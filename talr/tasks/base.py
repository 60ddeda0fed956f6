"""The Task protocol: what a domain must provide for SFT and for scoring generations."""

from __future__ import annotations

from abc import ABC, abstractmethod
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # only for the figures() annotation; matplotlib loads where a task draws
    from matplotlib.figure import Figure

Row = dict[str, Any]
Message = dict[str, str]


class DataError(ValueError):
    """Bad input data: the message names the source, the row and the column."""


def require_positive(**options: int | None) -> None:
    """Row-count options (`limit`, `num_rows`, ...) must be None or at least 1."""
    for option, value in options.items():
        if value is not None and value < 1:
            raise ValueError(f"{option} must be positive or None, got {value}")


@dataclass(frozen=True)
class Verdict:
    """The score of one generated answer against its row."""

    correct: bool
    parsed: bool  # False when no answer could be extracted (counted, scored wrong)
    answer: str | None = None  # the extracted answer text, for logs


class Task(ABC):
    """A domain: rows in, chat prompts and targets out, generations scored back.

    `prompt_messages(row)` gives the system and user turns; the assistant turn starts with
    `assistant_prefix(row)` (part of the prompt, never trained on) and continues with
    `target(row)` (the supervised tokens).
    """

    name: str = "task"

    @abstractmethod
    def read(self) -> list[Row]:
        """Load and validate all rows; raise DataError naming row and column on bad input."""

    @abstractmethod
    def prompt_messages(self, row: Row) -> list[Message]:
        """System and user messages for this row."""

    def assistant_prefix(self, row: Row) -> str:
        """Text the assistant turn starts with; part of the prompt, not of the target."""
        return ""

    @abstractmethod
    def target(self, row: Row) -> str:
        """The supervised assistant text that follows the prefix."""

    @abstractmethod
    def score(self, generation: str, row: Row) -> Verdict:
        """Score one generated continuation (the text after the assistant prefix)."""

    @property
    def choices(self) -> tuple[str, ...] | None:
        """For a classification whose target starts with its class: the text each class's target
        starts with, in class order (their first tokens must differ). Validation then also scores each
        held-out row's first target position over the classes (`val/label_auc`). None: not a classification."""
        return None

    def choice_index(self, row: Row) -> int:
        """The class of `row`, an index into `choices`."""
        raise NotImplementedError(f"{type(self).__name__} declares no choices")

    def group_keys(self, row: Row) -> dict[str, str]:
        """Named groupings for per-group accuracy (for example category, calculator)."""
        return {}

    def figures(self, verdicts: Sequence[Verdict], rows: Sequence[Row]) -> dict[str, Figure]:
        """Optional plots of an evaluation (for example a confusion matrix), by name.

        The module logs each one to TensorBoard as `<val|test>/<name>`; none by default.
        """
        return {}

    def summarize(self, verdicts: Sequence[Verdict], rows: Sequence[Row]) -> dict[str, float]:
        """Overall accuracy, the count of unparseable answers, and accuracy per group."""
        if len(verdicts) != len(rows):
            raise ValueError(f"{len(verdicts)} verdicts for {len(rows)} rows")
        n = len(verdicts)
        out: dict[str, float] = {
            "accuracy": sum(v.correct for v in verdicts) / n if n else 0.0,
            "unparsed": float(sum(not v.parsed for v in verdicts)),
            "count": float(n),
        }
        groups: dict[str, list[bool]] = defaultdict(list)
        for verdict, row in zip(verdicts, rows):
            for kind, value in self.group_keys(row).items():
                groups[f"accuracy/{kind}/{value}"].append(verdict.correct)
        for key, hits in sorted(groups.items()):
            out[key] = sum(hits) / len(hits)
        return out


# Added for the ESCI and math tasks (any task whose files are plain tables may use it).
def read_records(path: str | Path) -> list[Row]:
    """Rows of a UTF-8 CSV, JSONL, JSON (a list of objects) or Parquet file, values as loaded.

    CSV cells stay strings (empty cells are ""); JSON values keep their JSON types.
    Raises DataError naming the file, and the line for JSONL.
    """
    import pandas as pd  # lazy: only tasks that read files pay for it

    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path).to_dict("records")
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 at byte offset {err.start} ({err.reason})") from err
    except (OSError, ValueError) as err:  # missing, a directory, a broken parquet file
        raise DataError(f"{path}: cannot read: {err}") from err
    if suffix == ".csv":
        try:
            frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            raise DataError(f"{path}: malformed CSV: {err}") from err
        return frame.fillna("").to_dict("records")  # short rows leave NaN even without default NAs
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {number}: invalid JSON: {err.msg}") from err
            if not isinstance(row, dict):
                raise DataError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
        return rows
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from err
        if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
            raise DataError(f"{path}: expected a JSON list of objects")
        return data
    raise DataError(f"{path}: unknown file type {suffix!r} (expected .csv, .jsonl, .json or .parquet)")
