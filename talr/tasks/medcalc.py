"""MedCalc-Bench: medical calculations from patient notes (reader, prompt, target, scorer).

Rows follow the MedCalc-Bench column schema. The prompt is the paper's Table 4 template; the
target is the ground-truth explanation inside the think block followed by a JSON answer block.
Scoring follows MedCalc-Bench: decimal answers must fall within [Lower Limit, Upper Limit],
integer answers must round to the ground truth, dates must match exactly, and gestational ages
must match as a (weeks, days) pair.

Model text is untrusted: it is parsed with `json.loads` and regular expressions only, never
evaluated.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import re
from datetime import date
from pathlib import Path
from typing import Any

from talr.tasks.base import DataError, Message, Row, Task, Verdict, read_records, require_positive

SYSTEM_PROMPT = (
    "You are a helpful assistant. You first think about the reasoning process in the mind "
    "and then provide the user with the answer."
)
USER_TEMPLATE = "\n".join(
    [
        "You are a helpful assistant for calculating a score for a given patient note. "
        "Please think step-by-step to solve the question and then generate the required score.",
        "Here is the patient note:",
        "{note}",
        "Here is the task:",
        "{question}",
        "Please show your entire reasoning process in a single <think> </think> block "
        "(do not open or close the tag more than once).",
        "Your final response must be in JSON format within <answer> </answer> tags. For example,",
        "<think>",
        "[entire reasoning process here]",
        "</think>",
        "<answer>",
        '{{"answer": str(short_and_direct_answer_of_the_question)}}',
        "</answer>",
    ]
)
ASSISTANT_PREFIX = "Let me solve this step by step.\n<think>\n"

REQUIRED_COLUMNS = (
    "Patient Note",
    "Question",
    "Ground Truth Explanation",
    "Ground Truth Answer",
    "Lower Limit",
    "Upper Limit",
    "Output Type",
    "Calculator Name",
    "Category",
)
OUTPUT_TYPES = ("decimal", "integer", "date")

# The answer block: the last opening tag, then text up to the closing tag or the end.
_ANSWER_OPEN = re.compile(r"<answer>", re.IGNORECASE)
_ANSWER_CLOSE = re.compile(r"</answer>", re.IGNORECASE)
# `answer: value` in JSON-ish text that json.loads rejects (unquoted key, single quotes).
_ANSWER_KEY = re.compile(r"""["']?answer["']?\s*:\s*""", re.IGNORECASE)
# A number: optional sign (not when glued to a word, as in "CURB-65"), digits with optional
# thousands commas, optional fraction and exponent.
_NUMBER = re.compile(
    r"(?:(?<![\w.])[-\u2212])?"
    r"(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:[eE][-+]?\d+)?"
)
_DATE = re.compile(
    r"(?<!\d)(?:(\d{4})([/-])(\d{1,2})\2(\d{1,2})|(\d{1,2})([/-])(\d{1,2})\6(\d{4}))(?!\d)"
)
_WEEKS = re.compile(r"(\d+)\s*(?:weeks?|wks?|w)\b", re.IGNORECASE)
_DAYS = re.compile(r"(\d+)\s*(?:days?|d)\b", re.IGNORECASE)
# Two bare numbers, bracketed ("(34, 6)", "['34', '6']") or alone ("34, 6").
_PAIR = re.compile(
    r"""[(\[]\s*['"]?(\d+)['"]?\s*,\s*['"]?(\d+)['"]?\s*[)\]]"""
    r"|^\s*(\d+)\s*,\s*(\d+)\s*$"
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def extract_answer(text: str) -> str | None:
    """The answer value from the last `<answer>` block, as a string; None when there is none.

    Accepts `{"answer": ...}` JSON, JSON-ish variants (unquoted key, single quotes, trailing
    text) and a bare value; a missing closing tag means the block runs to the end.
    """
    opens = list(_ANSWER_OPEN.finditer(text))
    if not opens:
        return None
    block = text[opens[-1].end() :]
    close = _ANSWER_CLOSE.search(block)
    if close:
        block = block[: close.start()]
    block = block.strip().removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    if not block:
        return None

    # Strict JSON first, on the outermost braces so surrounding text does not matter.
    start, end = block.find("{"), block.rfind("}")
    if 0 <= start < end:
        try:
            obj = json.loads(block[start : end + 1])
        except (ValueError, RecursionError):  # includes JSONDecodeError and huge-int errors
            obj = None
        if isinstance(obj, dict):
            for key, value in obj.items():
                if isinstance(key, str) and key.strip().lower() == "answer":
                    return _value_text(value)

    # JSON-ish: take what follows `answer:` up to the closing brace, minus matching quotes.
    key = _ANSWER_KEY.search(block)
    if key:
        value = block[key.end() :]
        brace = value.rfind("}")
        value = (value[:brace] if brace >= 0 else value).strip().rstrip(",").strip()
        if value and value[0] in "\"'":
            quote = value[0]
            if len(value) > 1 and value.endswith(quote):
                value = value[1:-1]
            else:  # unterminated or followed by text: stop at the next quote
                value = value[1:].split(quote, 1)[0]
        return value.strip() or None

    # A bare value, possibly wrapped in braces.
    return block.strip("{} \n\t") or None


def _value_text(value: Any) -> str | None:
    """A parsed JSON value as answer text (lists and objects keep their JSON form)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip() or None
    return json.dumps(value)


def parse_number(text: str) -> float | None:
    """The first finite number in `text` (thousands commas allowed), or None."""
    match = _NUMBER.search(text)
    if not match:
        return None
    value = float(match.group().replace(",", "").replace("\u2212", "-"))
    return value if math.isfinite(value) else None


def parse_date(text: str) -> date | None:
    """The first date in `text`: M/D/Y, M-D-Y or YYYY-MM-DD; None if absent or invalid."""
    match = _DATE.search(text)
    if not match:
        return None
    if match.group(1):
        year, month, day = match.group(1), match.group(3), match.group(4)
    else:
        month, day, year = match.group(5), match.group(7), match.group(8)
    try:
        return date(int(year), int(month), int(day))
    except ValueError:
        return None


def parse_weeks_days(text: str) -> tuple[int, int] | None:
    """A gestational age as (weeks, days).

    Accepts `('34 weeks', '6 days')`, `34 weeks and 6 days`, `(34, 6)` and `[34, 6]`; a missing
    weeks or days part counts as zero when the other is given with its unit.
    """
    weeks, days = _WEEKS.search(text), _DAYS.search(text)
    if weeks or days:
        return (int(weeks.group(1)) if weeks else 0, int(days.group(1)) if days else 0)
    pair = _PAIR.search(text)
    if pair:
        w, d = (g for g in pair.groups() if g is not None)
        return int(w), int(d)
    return None


def is_weeks_days(answer: str) -> bool:
    """Whether a ground-truth answer is a gestational age such as `('34 weeks', '6 days')`."""
    return bool(_WEEKS.search(answer) and _DAYS.search(answer))


def _read_number(value: str) -> float | None:
    """A strict, finite float from a data cell (unlike parse_number, no text around it)."""
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


class MedCalc(Task):
    """MedCalc-Bench rows from synthetic data, a CSV/JSON(L) file, or a hub dataset.

    `split` only applies to hub datasets; a local file is one split already. `calculators`
    restricts the synthetic source to some of its calculators (keys of medcalc_synth.CALCULATORS).
    """

    name = "medcalc"

    def __init__(
        self,
        source: str = "synthetic",
        split: str = "train",
        num_synthetic: int = 256,
        seed: int = 0,
        limit: int | None = None,
        calculators: list[str] | None = None,
    ) -> None:
        require_positive(limit=limit)
        self.source = source
        self.split = split
        self.num_synthetic = num_synthetic
        self.seed = seed
        self.limit = limit
        self.calculators = calculators  # synthetic only: keys of medcalc_synth.CALCULATORS

    # ----------------------------------------------------------------------------- reading

    def read(self) -> list[Row]:
        source = str(self.source)
        path = Path(source)
        if source == "synthetic":
            from talr.tasks.medcalc_synth import generate_rows  # written alongside; lazy

            label, rows = "synthetic", generate_rows(self.num_synthetic, self.seed, self.calculators)
        elif path.exists():
            label, rows = str(path), _read_file(path)
        elif path.suffix.lower() in {".csv", ".json", ".jsonl"} or not _HUB_ID.fullmatch(source):
            raise DataError(f"{source}: file not found")
        else:
            label, rows = source, _read_hub(source, self.split)
        rows = [{str(k): _cell(v) for k, v in row.items()} for row in rows]
        _validate(rows, label)
        return rows[: self.limit] if self.limit is not None else rows

    # ------------------------------------------------------------------------ prompt, target

    def prompt_messages(self, row: Row) -> list[Message]:
        user = USER_TEMPLATE.format(note=row["Patient Note"], question=row["Question"])
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]

    def assistant_prefix(self, row: Row) -> str:
        return ASSISTANT_PREFIX

    def target(self, row: Row) -> str:
        answer = json.dumps({"answer": row["Ground Truth Answer"]})
        return f"{row['Ground Truth Explanation'].strip()}\n</think>\n<answer>\n{answer}\n</answer>"

    def group_keys(self, row: Row) -> dict[str, str]:
        return {"category": row["Category"], "calculator": row["Calculator Name"]}

    # ------------------------------------------------------------------------------ scoring

    def score(self, generation: str, row: Row) -> Verdict:
        answer = extract_answer(generation)
        if answer is None:
            return Verdict(correct=False, parsed=False)
        truth = row["Ground Truth Answer"].strip()
        output_type = row["Output Type"].strip().lower()

        if is_weeks_days(truth):
            got = parse_weeks_days(answer)
            return Verdict(got == parse_weeks_days(truth), got is not None, answer)
        if output_type == "date":
            got_date = parse_date(answer)
            parsed = got_date is not None
            return Verdict(parsed and got_date == parse_date(truth), parsed, answer)

        number = parse_number(answer)
        if number is None:
            return Verdict(correct=False, parsed=False, answer=answer)
        if output_type == "decimal":
            lower, upper = float(row["Lower Limit"]), float(row["Upper Limit"])
            return Verdict(lower <= number <= upper, True, answer)
        return Verdict(round(number) == round(float(truth)), True, answer)


# ------------------------------------------------------------------------------ file loading


def _cell(value: Any) -> str:
    """A loaded value as the string the CSV would hold (None means empty)."""
    return "" if value is None else str(value)


def _read_file(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV file, decoded strictly as UTF-8; other formats through `read_records`.

    CSV stays here: its checks (ragged rows, a header only) are stricter than the shared reader's.
    """
    if path.suffix.lower() != ".csv":
        return read_records(path)  # JSONL, JSON (a list of objects), Parquet
    name = str(path)
    try:
        data = path.read_bytes()
    except OSError as err:  # a directory, no permission, ...
        raise DataError(f"{name}: cannot read: {err}") from err
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{name}: not valid UTF-8 at byte offset {err.start + skip} ({err.reason})"
        ) from err
    return _read_csv(text, name)


def _read_csv(text: str, label: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        rows = list(reader)
    except csv.Error as err:
        raise DataError(f"{label}: malformed CSV at line {reader.line_num}: {err}") from err
    if reader.fieldnames is None:
        raise DataError(f"{label}: empty file (no header, no rows)")
    _check_columns(reader.fieldnames, label)
    for number, row in enumerate(rows, start=1):
        # DictReader files surplus cells under None and fills missing cells with None.
        if None in row or any(value is None for value in row.values()):
            raise DataError(f"{label} row {number}: wrong number of cells for the header")
    return rows


def _read_hub(dataset_id: str, split: str) -> list[dict[str, Any]]:
    """Rows of a Hugging Face hub dataset; `datasets` is imported only here."""
    import datasets

    return [dict(row) for row in datasets.load_dataset(dataset_id, split=split)]


# -------------------------------------------------------------------------------- validation


def _check_columns(columns: Any, label: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in set(columns)]
    if missing:
        raise DataError(f"{label}: missing required column(s): {', '.join(missing)}")


def _validate(rows: list[Row], label: str) -> None:
    """Check every row; raise DataError naming the source, the row and the column."""
    if not rows:
        raise DataError(f"{label}: no rows")
    for number, row in enumerate(rows, start=1):
        _check_columns(row.keys(), f"{label} row {number}")
        where = f"{label} row {number}"
        if row.get("Row Number", "").strip():
            where += f" (Row Number {row['Row Number'].strip()})"
        for column in ("Ground Truth Explanation", "Ground Truth Answer"):
            if not row[column].strip():
                raise DataError(f"{where}, column {column!r}: empty")
        output_type = row["Output Type"].strip().lower()
        truth = row["Ground Truth Answer"]
        if output_type not in OUTPUT_TYPES:
            raise DataError(
                f"{where}, column 'Output Type': {row['Output Type']!r} is not one of "
                f"{', '.join(OUTPUT_TYPES)}"
            )
        if output_type == "decimal":
            # The answer is trained on (the target's JSON block), the limits score: all three are numbers.
            numbers = {}
            for column in ("Ground Truth Answer", "Lower Limit", "Upper Limit"):
                numbers[column] = _read_number(row[column])
                if numbers[column] is None:
                    raise DataError(f"{where}, column {column!r}: {row[column]!r} is not a number")
            if numbers["Lower Limit"] > numbers["Upper Limit"]:
                raise DataError(f"{where}, column 'Lower Limit': greater than 'Upper Limit'")
        elif output_type == "integer":
            if _read_number(truth) is None and not is_weeks_days(truth):
                raise DataError(
                    f"{where}, column 'Ground Truth Answer': {truth!r} is not a number "
                    "or a (weeks, days) pair"
                )
        elif parse_date(truth) is None:
            raise DataError(f"{where}, column 'Ground Truth Answer': {truth!r} is not a date")
