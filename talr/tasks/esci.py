"""ESCI (Shopping Queries): classify a query-product pair as Exact, Substitute, Complement or
Irrelevant (reader, the paper's Table 5/6 prompts, scorer, balanced accuracy).

Sources, all normalised to rows {query, product_info, label (0-3)} plus the rationale in CoT mode:

- a directory with the official pair `shopping_queries_dataset_examples.parquet` and
  `shopping_queries_dataset_products.parquet`, joined on (product_locale, product_id);
- a hub dataset with the official columns (`tasksource/esci`: the join done, labels as words);
- a CSV, JSONL, JSON or Parquet file with `query`, product fields (the official `product_title`,
  `product_brand`, ... or one `product_text`) and `esci_label`;
- a JSON list of queries with nested products graded by `relevance` 3/2/1/0 (= E/S/C/I).

Labels may be letters (E/S/C/I), words (Exact, ...) or relevance grades in a `relevance`
column; a number in `esci_label` is refused as ambiguous (class index or grade?). Rows are
filtered by `split`, `product_locale` and `small_version` wherever those columns exist, then a
seeded random subset of `num_rows` is drawn, like the paper's 49k + 1k / 10k samples, and the
class distribution is printed (the paper's Table 1).

Without CoT the assistant turn starts with `<answer>` and the target is the class digit and
`</answer>`; with CoT the target is `<think>` rationale `</think>` and the answer tag. Model
text is only matched with regular expressions.
"""

from __future__ import annotations

import html
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from talr.tasks.base import DataError, Message, Row, Task, Verdict, read_records, require_positive

LABELS = ("Exact", "Substitute", "Complement", "Irrelevant")  # class index = position
UNPARSED = len(LABELS)  # the confusion matrix's extra "prediction" column for unparsed answers
_LETTERS = {name[0]: index for index, name in enumerate(LABELS)}
_WORDS = {name.lower(): index for index, name in enumerate(LABELS)}
_GRADES = {3: 0, 2: 1, 1: 2, 0: 3}  # the official relevance grades: 3 = Exact ... 0 = Irrelevant

EXAMPLES_FILE = "shopping_queries_dataset_examples.parquet"
PRODUCTS_FILE = "shopping_queries_dataset_products.parquet"
# The official product columns, in the order the prompt lists them.
PRODUCT_FIELDS = (
    ("Title", "product_title"),
    ("Brand", "product_brand"),
    ("Color", "product_color"),
    ("Bullet points", "product_bullet_point"),
    ("Description", "product_description"),
)

# The paper's Tables 5 (w/o CoT) and 6 (w/ CoT), word for word (the apostrophe is U+2019).
SYSTEM_NO_COT = "You are a helpful assistant. You provide the user with the answer."
SYSTEM_COT = (
    "You are a helpful assistant. You first think about the reasoning process in the mind "
    "and then provide the user with the answer."
)
_TASK_LINES = [
    "Your task is to classify each product as being an Exact, Substitute, Complement, or "
    "Irrelevant match for the query.",
    "Here is the user\u2019s query:",
    "{query}",
    "Here is the product information:",
    "{product_info}",
    "--------------",
]
_LABEL_LINE = (
    "Label the relation type as a number: 0 = Exact, 1 = Substitute, 2 = Complement and "
    "3 = Irrelevant. For example,"
)
USER_NO_COT = "\n".join(
    _TASK_LINES
    + [
        "Your final response must be within <answer> </answer> tags.",
        _LABEL_LINE,
        "<answer>one_of_[0, 1, 2, 3]</answer>.",
    ]
)
USER_COT = "\n".join(
    _TASK_LINES
    + [
        "Please show your entire reasoning process in **a single** <think> </think> block "
        "(do not open or close the tag more than once).",
        "Your final response must be within <answer> </answer> tags.",
        _LABEL_LINE,
        "<think>",
        "[entire reasoning process here]",
        "</think>",
        "<answer>one_of_[0, 1, 2, 3]</answer>",
    ]
)
NO_COT_PREFIX = "<answer>"  # Table 5's assistant turn starts with the open tag

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.IGNORECASE | re.DOTALL)
_THINK_BLOCK = re.compile(r"<think>(.*?)</think>", re.IGNORECASE | re.DOTALL)
_LABEL_DIGIT = re.compile(r"^\W*([0-3])(?!\d|\.\d)")  # "2", " 2 ", "2." but not "2.5" or "23"
_HTML_BREAK = re.compile(r"<\s*br\s*/?\s*>", re.IGNORECASE)
_HTML_TAG = re.compile(r"<[^<>]{1,200}>")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


# ------------------------------------------------------------------------------ labels


def normalize_label(value: Any, column: str, where: str) -> int:
    """The class index (0-3) of a label cell; grades only in a `relevance` column."""
    if column == "relevance":
        try:
            grade = int(str(value).strip())
        except ValueError:
            grade = None
        if grade not in _GRADES:
            raise DataError(f"{where}, column 'relevance': {value!r} is not a grade 3/2/1/0 (E/S/C/I)")
        return _GRADES[grade]
    text = str(value).strip()
    if text.upper() in _LETTERS and len(text) == 1:
        return _LETTERS[text.upper()]
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    hint = (
        " (a number is ambiguous: give letters or words, or grades in a 'relevance' column)"
        if text.lstrip("-").isdigit()
        else ""
    )
    raise DataError(
        f"{where}, column {column!r}: {value!r} is not an ESCI label; expected one of "
        f"E/S/C/I or {'/'.join(LABELS)}{hint}"
    )


def parse_label(text: str) -> int | None:
    """The class digit of the last <answer> block (a missing close tag runs to the end)."""
    blocks = _ANSWER_BLOCK.findall(text)
    if not blocks:
        return None
    block = blocks[-1].strip()
    digit = _LABEL_DIGIT.match(block)
    if digit:
        return int(digit.group(1))
    return _WORDS.get(block.strip(" .").lower())  # a class name instead of its digit


def accept_rationale(text: str, gold: int) -> str | None:
    """Rejection sampling's test: the rationale of `text` when its final label is `gold`.

    The text must hold one <think> block with something in it, followed by an answer block
    whose label is the gold one; otherwise None.
    """
    thinks = list(_THINK_BLOCK.finditer(text))
    if len(thinks) != 1 or not thinks[0].group(1).strip():
        return None
    if parse_label(text[thinks[0].end() :]) != gold:
        return None
    return thinks[0].group(1).strip()


def class_distribution(labels: Sequence[int]) -> dict[str, int]:
    counts = Counter(labels)
    return {name: counts.get(index, 0) for index, name in enumerate(LABELS)}


def format_distribution(labels: Sequence[int], title: str) -> str:
    """The paper's Table 1 row: count and share of every class."""
    total = len(labels)
    parts = [f"{name} {count} ({100 * count / total:.2f}%)" for name, count in class_distribution(labels).items()]
    return f"{title}: {total} rows: " + ", ".join(parts)


# ---------------------------------------------------------------------------- products


def _clean(value: Any) -> str:
    """A product cell as plain text: HTML breaks to newlines, tags dropped, entities decoded."""
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        return ""
    text = _HTML_TAG.sub(" ", _HTML_BREAK.sub("\n", str(value)))
    text = html.unescape(text)
    return "\n".join(" ".join(line.split()) for line in text.splitlines() if line.strip())


def product_info(record: dict[str, Any]) -> str:
    """The prompt's product information: the official fields by name, else `product_text`."""
    if any(column in record for _, column in PRODUCT_FIELDS):
        lines = [f"{name}: {_clean(record.get(column))}" for name, column in PRODUCT_FIELDS]
        return "\n".join(line for line in lines if not line.endswith(": "))
    return _clean(record.get("product_text"))


# ------------------------------------------------------------------------------- reading


def read_parquet_pair(directory: Path, filters: dict[str, Any]) -> list[dict[str, Any]]:
    """The official examples joined with the products on (product_locale, product_id).

    `filters` (column -> value) are applied to the examples before the join, so only the
    products of the kept examples are ever matched.
    """
    import pandas as pd

    paths = {name: directory / name for name in (EXAMPLES_FILE, PRODUCTS_FILE)}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise DataError(f"{directory}: missing {', '.join(missing)} (the official ESCI parquet pair)")
    try:
        examples = pd.read_parquet(paths[EXAMPLES_FILE])
        products = pd.read_parquet(paths[PRODUCTS_FILE])
    except (OSError, ValueError) as err:
        raise DataError(f"{directory}: cannot read the parquet pair: {err}") from err
    for name, frame, needed in (
        (EXAMPLES_FILE, examples, ("query", "product_id", "product_locale", "esci_label")),
        (PRODUCTS_FILE, products, ("product_id", "product_locale")),
    ):
        absent = [c for c in needed if c not in frame.columns]
        if absent:
            raise DataError(f"{directory / name}: missing column(s) {', '.join(absent)}")
    for column, value in filters.items():
        if column in examples.columns:
            examples = examples[examples[column] == value]
    keys = ["product_locale", "product_id"]
    joined = examples.merge(products, on=keys, how="inner", validate="many_to_one")
    if len(joined) < len(examples):
        rank_zero_info(f"[esci] {len(examples) - len(joined)} example(s) have no product with their locale and id; skipped")
    return joined.to_dict("records")


class ESCI(Task):
    """ESCI query-product classification, with or without a chain of thought.

    Args:
        source: a directory with the official parquet pair, a hub dataset id, or a local
            .csv/.jsonl/.json/.parquet file.
        split: the hub split, and a filter on a `split` column where one exists ("train"/"test").
        locale: keep rows whose `product_locale` is this ("us", "es", "jp"); None keeps all.
        small_version: keep rows whose `small_version` is this (the official reduced task); None
            keeps all. Locale and version filters apply only where the column exists.
        num_rows: a random subset of this many rows after filtering, drawn with `seed` (the
            paper: 50000 from train, of which the data module holds out 1000; 10000 from test).
        limit: then keep only the first `limit` rows (quick runs).
        cot: train and prompt with a chain of thought (Table 6) instead of the label only (Table 5).
        rationale_column: the column holding the CoT rationale (`talr cot` writes it). None: no
            rationales (evaluation only: the target, and so the loss, is the answer tag alone).
        label_column: the column holding E/S/C/I labels (a `relevance` column with 3/2/1/0
            grades is used when this one is absent).
    """

    name = "esci"

    def __init__(
        self,
        source: str = "tasksource/esci",
        split: str = "train",
        locale: str | None = "us",
        small_version: int | None = 1,
        num_rows: int | None = None,
        limit: int | None = None,
        seed: int = 0,
        cot: bool = False,
        rationale_column: str | None = "rationale",
        label_column: str = "esci_label",
    ) -> None:
        require_positive(num_rows=num_rows, limit=limit)
        self.source = source
        self.split = split
        self.locale = locale
        self.small_version = small_version
        self.num_rows = num_rows
        self.limit = limit
        self.seed = seed
        self.cot = cot
        self.rationale_column = rationale_column
        self.label_column = label_column

    @property
    def filters(self) -> dict[str, Any]:
        """Column -> required value, applied wherever the column exists."""
        wanted = {"split": self.split, "product_locale": self.locale, "small_version": self.small_version}
        return {column: value for column, value in wanted.items() if value is not None}

    # ----------------------------------------------------------------------------- reading

    def read(self) -> list[Row]:
        source = str(self.source)
        path = Path(source)
        if path.is_dir():
            label, records = source, read_parquet_pair(path, self.filters)
        elif path.exists():
            label, records = source, _flatten_nested(read_records(path), source)
        elif path.suffix or not _HUB_ID.fullmatch(source):
            raise DataError(f"{source}: no such file or directory")
        else:
            label, records = f"{source} ({self.split})", self._read_hub(source)
        # Each record keeps its 1-based position in what was read, so errors name the file's row.
        numbered = self._filter(list(enumerate(records, start=1)), label)
        if self.num_rows is not None and self.num_rows < len(numbered):
            keep = sorted(random.Random(self.seed).sample(range(len(numbered)), self.num_rows))
            numbered = [numbered[i] for i in keep]
        elif self.num_rows is not None and self.num_rows > len(numbered):
            rank_zero_info(f"[esci] {label}: num_rows={self.num_rows} but only {len(numbered)} rows; using all")
        if self.limit is not None:
            numbered = numbered[: self.limit]
        rows = [self._row(record, number, label) for number, record in numbered]
        rank_zero_info("[esci] " + format_distribution([row["label"] for row in rows], f"{label} after filters and sampling"))
        return rows

    def _read_hub(self, dataset_id: str) -> list[dict[str, Any]]:
        """Filter and sample inside `datasets` (millions of rows) before turning rows into dicts."""
        import datasets  # lazy: only hub sources need it

        data = datasets.load_dataset(dataset_id, split=self.split)
        active = {c: v for c, v in self.filters.items() if c in data.column_names}
        if active:
            def matches(batch: dict[str, list[Any]]) -> list[bool]:
                columns = [(batch[column], value) for column, value in active.items()]
                return [all(cells[i] == value for cells, value in columns) for i in range(len(columns[0][0]))]

            data = data.filter(matches, batched=True, desc="esci: filtering")
        if self.num_rows is not None and self.num_rows < len(data):
            data = data.select(sorted(random.Random(self.seed).sample(range(len(data)), self.num_rows)))
        return data.to_list()

    def _filter(self, records: list[tuple[int, dict[str, Any]]], label: str) -> list[tuple[int, dict[str, Any]]]:
        if not records:
            raise DataError(f"{label}: no rows")
        kept = records
        for column, value in self.filters.items():
            kept = [(n, r) for n, r in kept if column not in r or str(r[column]).strip() == str(value)]
        if not kept:
            raise DataError(f"{label}: none of {len(records)} rows match {self.filters}")
        if len(kept) < len(records):
            rank_zero_info(f"[esci] {label}: {len(kept)} of {len(records)} rows match {self.filters}")
        return kept

    def _row(self, record: dict[str, Any], number: int, label: str) -> Row:
        where = f"{label} row {number}"
        if record.get("example_id") not in (None, ""):
            where += f" (example_id {record['example_id']})"
        query = _clean(record.get("query"))
        if not query:
            raise DataError(f"{where}, column 'query': missing or empty")
        info = product_info(record)
        if not info:
            raise DataError(f"{where}: no product information (product_title, ... or product_text)")
        column = self.label_column if self.label_column in record else "relevance"
        if column not in record:
            raise DataError(f"{where}: missing label column {self.label_column!r} (or 'relevance')")
        row: Row = {"query": query, "product_info": info, "label": normalize_label(record[column], column, where)}
        for key in ("query_id", "product_id"):
            if record.get(key) not in (None, ""):
                row[key] = str(record[key])
        if self.cot and self.rationale_column is not None:
            rationale = record.get(self.rationale_column)
            if self.rationale_column not in record:
                raise DataError(
                    f"{where}: missing rationale column {self.rationale_column!r} needed with cot=true "
                    "(build it with `talr cot`, or set rationale_column to the right name)"
                )
            if not isinstance(rationale, str) or not rationale.strip():
                raise DataError(f"{where}, column {self.rationale_column!r}: empty rationale")
            row["rationale"] = rationale.strip()
        return row

    # ------------------------------------------------------------------------ prompt, target

    def prompt_messages(self, row: Row) -> list[Message]:
        system, user = (SYSTEM_COT, USER_COT) if self.cot else (SYSTEM_NO_COT, USER_NO_COT)
        content = user.format(query=row["query"], product_info=row["product_info"])
        return [{"role": "system", "content": system}, {"role": "user", "content": content}]

    def assistant_prefix(self, row: Row) -> str:
        return "" if self.cot else NO_COT_PREFIX

    def target(self, row: Row) -> str:
        answer = f"{row['label']}</answer>"
        if not self.cot:
            return answer
        if "rationale" not in row:  # rationale_column=None: evaluation-only rows
            return f"<answer>{answer}"
        return f"<think>\n{row['rationale']}\n</think>\n<answer>{answer}"

    @property
    def choices(self) -> tuple[str, ...] | None:
        # label only: the target is the class digit, so its first token decides the class; a chain of
        # thought puts the label after a rationale, where no single position holds the decision
        return None if self.cot else tuple(str(index) for index in range(len(LABELS)))

    def choice_index(self, row: Row) -> int:
        return int(row["label"])

    # ------------------------------------------------------------------------------ scoring

    def score(self, generation: str, row: Row) -> Verdict:
        label = parse_label(self.assistant_prefix(row) + generation)
        if label is None:
            return Verdict(correct=False, parsed=False)
        return Verdict(correct=label == row["label"], parsed=True, answer=str(label))

    def confusion_matrix(self, verdicts: Sequence[Verdict], rows: Sequence[Row]) -> Any:
        """Counts [true class, predicted class] with a 5th prediction column for unparsed answers."""
        import torch
        from torchmetrics.functional.classification import multiclass_confusion_matrix

        preds = torch.tensor([int(v.answer) if v.parsed else UNPARSED for v in verdicts], dtype=torch.long)
        target = torch.tensor([row["label"] for row in rows], dtype=torch.long)
        return multiclass_confusion_matrix(preds, target, num_classes=len(LABELS) + 1)

    def summarize(self, verdicts: Sequence[Verdict], rows: Sequence[Row]) -> dict[str, float]:
        """Balanced accuracy (mean recall over the classes present), accuracy and recall per class.

        An unparsed answer is a wrong prediction for its true class, so it lowers that recall.
        """
        out = super().summarize(verdicts, rows)  # accuracy, unparsed, count
        if not verdicts:
            return {**out, "balanced_accuracy": 0.0}
        matrix = self.confusion_matrix(verdicts, rows)
        recalls = []
        for index, name in enumerate(LABELS):
            support = int(matrix[index].sum())
            if support:  # a class absent from these rows has no recall (sklearn leaves it out too)
                recalls.append(float(matrix[index, index]) / support)
                out[f"recall/{name}"] = recalls[-1]
        out["balanced_accuracy"] = sum(recalls) / len(recalls)
        return out

    def figures(self, verdicts: Sequence[Verdict], rows: Sequence[Row]) -> dict[str, Any]:
        """The confusion matrix (true class x prediction, with an "unparsed" column) as a figure."""
        if not verdicts:
            return {}
        from torchmetrics.classification import MulticlassConfusionMatrix

        metric = MulticlassConfusionMatrix(num_classes=len(LABELS) + 1)
        figure, _ = metric.plot(self.confusion_matrix(verdicts, rows), labels=[*LABELS, "unparsed"])
        return {"confusion_matrix": figure}


def rank_zero_info(message: str) -> None:
    # imported on use: reading a task's rows must not import torch (tasks load in light processes)
    from lightning.pytorch.utilities import rank_zero_info as info

    info(message)


def _flatten_nested(records: list[dict[str, Any]], label: str) -> list[dict[str, Any]]:
    """Queries with nested `products` lists (one row per query-product pair); flat rows as they are."""
    if not records or "products" not in records[0]:
        return records
    flat = []
    for number, query in enumerate(records, start=1):
        products = query.get("products")
        if not isinstance(products, list):
            raise DataError(f"{label} query {number} (query_id {query.get('query_id')}), column 'products': not a list")
        shared = {k: v for k, v in query.items() if k != "products"}
        flat += [{**shared, **product} for product in products]
    return flat
