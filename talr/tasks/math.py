"""Math word problems: MetaMathQA for training, GSM8K for evaluation (reader, prompt, scorer).

Both tasks share one row format and one scorer; they differ in their defaults (hub dataset, split,
column names). Rows become {question, response, answer}:

- MetaMathQA responses end with "The answer is: N" and are trained on as they are.
- GSM8K answers end with a "#### N" line. They are accepted by both tasks and rewritten into
  MetaMathQA's style (calculator notes such as "<<48/2=24>>" removed, "#### N" becomes
  "The answer is: N"), so a GSM8K file can stand in for MetaMathQA rows and every target ends
  the same way.

Scoring is exact match of the final number. The answer is read after the last "The answer is"
(optionally with a colon), else after the last "####"; with `fallback` (default on, like
lm-evaluation-harness's flexible-extract that the paper reports for GSM8K) the last number of the
text is taken when neither marker is there. Such answers are counted as `fallback`; a generation
without any answer is `unparsed` and wrong. Numbers are compared after removing thousands commas
and a currency sign, and trailing zeros after the decimal point ("1,234.00" equals "1234").
Non-numeric gold answers (MetaMathQA's MATH rows, for example "\\frac{1}{2}") are compared as text
after removing spaces, "$" and a final period. Model text is only matched with regular
expressions, never evaluated.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Sequence

from talr.tasks.base import DataError, Message, Row, Task, Verdict, read_records, require_positive

USER_TEMPLATE = (
    "{question}\n"
    'Solve the problem step by step. End your response with "The answer is: N", '
    "where N is the final answer."
)

_ANSWER_IS = re.compile(r"the\s+answer\s+is\s*:?", re.IGNORECASE)
_HASHES = re.compile(r"####")
_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")  # GSM8K's "<<48/2=24>>" annotations
# A number: optional sign (not glued to a word), optional "$", digits with optional thousands
# commas, optional decimals. "1,2" is not one number (a comma needs three digits after it).
_NUMBER = re.compile(r"(?<![\w.])[-\u2212]?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def canonical_number(text: str) -> str | None:
    """A number as canonical text: no "$" or commas, no trailing zeros ("1,234.00" -> "1234")."""
    cleaned = text.strip().replace("\u2212", "-").replace("$", "").replace(",", "")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def first_number(text: str) -> str | None:
    match = _NUMBER.search(text)
    return canonical_number(match.group()) if match else None


def last_number(text: str) -> str | None:
    matches = _NUMBER.findall(text)
    return canonical_number(matches[-1]) if matches else None


def _normalize_text(text: str) -> str:
    return re.sub(r"\s+", "", text).replace("$", "").rstrip(".")


def answer_line(text: str) -> str | None:
    """The text after the last "The answer is" (else the last "####") up to the end of that line.

    None when neither marker is followed by an answer.
    """
    for marker in (_ANSWER_IS, _HASHES):
        matches = list(marker.finditer(text))
        if matches:
            tail = text[matches[-1].end() :].strip()
            line = tail.splitlines()[0].strip() if tail else ""
            if line.strip(" .$"):
                return line.rstrip(".").strip()
    return None


@dataclass(frozen=True)
class MathVerdict(Verdict):
    fallback: bool = False  # the answer came from the last number, not from an answer marker


def score_answer(generation: str, gold: str, fallback: bool = True) -> MathVerdict:
    """Score a generated solution against the gold final answer (a number or a text answer)."""
    gold_number = canonical_number(gold)
    line = answer_line(generation)
    if gold_number is None:  # a text answer (MATH rows): compare the whole answer line
        if line is None:
            return MathVerdict(correct=False, parsed=False)
        return MathVerdict(_normalize_text(line) == _normalize_text(gold), True, line)
    number = first_number(line) if line is not None else None
    used_fallback = False
    if number is None and fallback:
        number, used_fallback = last_number(generation), True
    if number is None:
        return MathVerdict(correct=False, parsed=False, answer=line)
    return MathVerdict(number == gold_number, True, number, fallback=used_fallback)


def to_metamath_response(gsm8k_answer: str) -> str:
    """A GSM8K answer ("... #### 18") in MetaMathQA's style ("... The answer is: 18")."""
    body, _, final = gsm8k_answer.rpartition("####")
    body = _CALCULATOR_NOTE.sub("", body).rstrip()
    return f"{body}\nThe answer is: {final.strip()}".lstrip()


class MathWordProblems(Task):
    """Question -> worked solution ending in "The answer is: N"; scored on the final number.

    Args:
        source: a hub dataset id, or a local .json/.jsonl/.csv/.parquet file (one split already).
        split: the hub split (ignored for local files).
        config: the hub dataset's configuration (GSM8K: "main").
        question_column, response_column: where the question and the worked solution are.
        types: keep only rows whose `type` column is one of these (MetaMathQA: GSM_Rephrased,
            GSM_AnsAug, GSM_SV, GSM_FOBAR, MATH_AnsAug, ...); None keeps all.
        num_rows: a random subset of this many rows, drawn with `seed` (None: all).
        limit: then keep only the first `limit` rows (quick runs).
        fallback: take the last number when a generation has no "The answer is"/"####".
    """

    name = "math"

    def __init__(
        self,
        source: str,
        split: str = "train",
        config: str | None = None,
        question_column: str = "query",
        response_column: str = "response",
        types: list[str] | None = None,
        num_rows: int | None = None,
        limit: int | None = None,
        seed: int = 0,
        fallback: bool = True,
    ) -> None:
        require_positive(num_rows=num_rows, limit=limit)
        self.source = source
        self.split = split
        self.config = config
        self.question_column = question_column
        self.response_column = response_column
        self.types = types
        self.num_rows = num_rows
        self.limit = limit
        self.seed = seed
        self.fallback = fallback

    # ----------------------------------------------------------------------------- reading

    def read(self) -> list[Row]:
        source = str(self.source)
        if Path(source).exists():
            label, records = source, read_records(source)
        elif Path(source).suffix or not _HUB_ID.fullmatch(source):
            raise DataError(f"{source}: file not found")
        else:
            label, records = f"{source} ({self.split})", self._read_hub(source)
        numbered = list(enumerate(records, start=1))  # file positions, so errors name the file's row
        if self.types is not None:
            if records and "type" not in records[0]:
                raise DataError(f"{label}: `types` was given but the rows have no 'type' column")
            numbered = [(n, r) for n, r in numbered if r.get("type") in set(self.types)]
        rows = [self._row(record, number, label) for number, record in numbered]
        if not rows:
            raise DataError(f"{label}: no rows" + (f" of types {self.types}" if self.types else ""))
        if self.num_rows is not None and self.num_rows < len(rows):
            keep = sorted(random.Random(self.seed).sample(range(len(rows)), self.num_rows))
            rows = [rows[i] for i in keep]
        return rows[: self.limit] if self.limit is not None else rows

    def _read_hub(self, dataset_id: str) -> list[dict[str, Any]]:
        import datasets  # lazy: only hub sources need it

        data = datasets.load_dataset(dataset_id, self.config, split=self.split)
        wanted = [c for c in (self.question_column, self.response_column, "type") if c in data.column_names]
        return data.select_columns(wanted).to_list()

    def _row(self, record: dict[str, Any], number: int, label: str) -> Row:
        where = f"{label} row {number}"
        values = {}
        for column in (self.question_column, self.response_column):
            if column not in record:
                raise DataError(f"{where}: missing column {column!r} (have: {', '.join(map(str, record))})")
            value = record[column]
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}, column {column!r}: expected non-empty text, got {value!r}")
            values[column] = value.strip()
        response = values[self.response_column]
        if "####" in response and not _ANSWER_IS.search(response):
            response = to_metamath_response(response)
        answer = answer_line(response)
        if answer is None:
            raise DataError(
                f"{where}, column {self.response_column!r}: no final answer "
                '(expected "The answer is: N" or a "#### N" line)'
            )
        row: Row = {"question": values[self.question_column], "response": response, "answer": answer}
        if "type" in record:
            row["type"] = str(record["type"])
        return row

    # ------------------------------------------------------------------------ prompt, target

    def prompt_messages(self, row: Row) -> list[Message]:
        return [{"role": "user", "content": USER_TEMPLATE.format(question=row["question"])}]

    def target(self, row: Row) -> str:
        return row["response"]

    def group_keys(self, row: Row) -> dict[str, str]:
        return {"type": row["type"]} if "type" in row else {}

    # ------------------------------------------------------------------------------ scoring

    def score(self, generation: str, row: Row) -> Verdict:
        return score_answer(generation, row["answer"], self.fallback)

    def summarize(self, verdicts: Sequence[Verdict], rows: Sequence[Row]) -> dict[str, float]:
        out = super().summarize(verdicts, rows)
        # Answers found only by the last-number fallback: the model did not write the answer line.
        out["fallback"] = float(sum(getattr(v, "fallback", False) for v in verdicts))
        return out


class MetaMathQA(MathWordProblems):
    """MetaMathQA (`query`, `response`, `type`) for training; hub `meta-math/MetaMathQA`."""

    name = "metamath"

    def __init__(
        self,
        source: str = "meta-math/MetaMathQA",
        split: str = "train",
        config: str | None = None,
        question_column: str = "query",
        response_column: str = "response",
        types: list[str] | None = None,
        num_rows: int | None = None,
        limit: int | None = None,
        seed: int = 0,
        fallback: bool = True,
    ) -> None:
        super().__init__(source, split, config, question_column, response_column, types, num_rows, limit, seed, fallback)


class GSM8K(MathWordProblems):
    """GSM8K (`question`, `answer` ending "#### N"); hub `openai/gsm8k`, config `main`, test split."""

    name = "gsm8k"

    def __init__(
        self,
        source: str = "openai/gsm8k",
        split: str = "test",
        config: str | None = "main",
        question_column: str = "question",
        response_column: str = "answer",
        types: list[str] | None = None,
        num_rows: int | None = None,
        limit: int | None = None,
        seed: int = 0,
        fallback: bool = True,
    ) -> None:
        super().__init__(source, split, config, question_column, response_column, types, num_rows, limit, seed, fallback)
