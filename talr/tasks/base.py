"""The Task protocol: what a domain must provide for SFT and for scoring generations."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

Row = dict[str, Any]
Message = dict[str, str]


class DataError(ValueError):
    """Bad input data: the message names the source, the row and the column."""


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

    def group_keys(self, row: Row) -> dict[str, str]:
        """Named groupings for per-group accuracy (for example category, calculator)."""
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
