"""`talr cot`: ESCI chain-of-thought rationales by rejection sampling from a teacher model.

For each row the teacher is prompted with the paper's CoT prompt (Table 6) and sampled up to
`--tries` times; the first sample whose final label equals the gold label is kept, and its
<think> block becomes the row's rationale (the paper did this with Qwen2.5-72B-Instruct and kept
34,176 of 49k rows). Rows are sampled in batches; each try only re-samples the rows still without
a rationale. The output is a CSV or JSONL file that `talr.tasks.ESCI` reads with `cot: true`.

    talr cot --teacher Qwen/Qwen2.5-72B-Instruct --source path/to/esci_dir --num-rows 50000 \\
        --output data/esci/train_cot.jsonl --tries 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from talr.tasks.base import DataError, Row
from talr.tasks.esci import ESCI, LABELS, accept_rationale

if TYPE_CHECKING:
    import torch

# torch, lightning and transformers (through talr.data, talr.generation, talr.models) are imported
# inside the functions that run the teacher, so that `talr cot --help` answers at once.

OUTPUT_TYPES = (".csv", ".jsonl")


def sample_rationales(
    model: Any,
    tokenizer: Any,
    task: ESCI,
    rows: list[Row],
    tries: int,
    batch_size: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
) -> tuple[list[str | None], list[int]]:
    """Each row's accepted rationale (None when every try failed) and the try that gave it (0: none).

    Sampling uses torch's global generator: seed it before calling for a repeatable run.
    """
    from talr.data import prompt_text

    prompts = [prompt_text(tokenizer, task, row) for row in rows]
    rationales: list[str | None] = [None] * len(rows)
    accepted_at = [0] * len(rows)
    device = next(model.parameters()).device
    for attempt in range(1, tries + 1):
        pending = [i for i, rationale in enumerate(rationales) if rationale is None]
        if not pending:
            break
        pending.sort(key=lambda i: len(prompts[i]))  # similar lengths share a batch: less padding
        with tqdm(total=len(pending), desc=f"cot: try {attempt}/{tries}", unit="row") as bar:
            for start in range(0, len(pending), batch_size):
                chunk = pending[start : start + batch_size]
                texts = _sample(model, tokenizer, [prompts[i] for i in chunk], device, max_new_tokens, temperature, top_p)
                for i, text in zip(chunk, texts):
                    rationales[i] = accept_rationale(text, rows[i]["label"])
                    accepted_at[i] = attempt if rationales[i] is not None else 0
                bar.update(len(chunk))
                bar.set_postfix(accepted=sum(r is not None for r in rationales))
    return rationales, accepted_at


def _sample(
    model: Any, tokenizer: Any, prompts: list[str], device: torch.device, max_new_tokens: int, temperature: float, top_p: float
) -> list[str]:
    """One sampled continuation per prompt (a left-padded batch)."""
    from talr.generation import generate_texts

    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(device)
    return generate_texts(model, tokenizer, batch["input_ids"], batch["attention_mask"], max_new_tokens,
                          temperature=temperature, top_p=top_p)


def acceptance_report(rows: list[Row], rationales: list[str | None]) -> dict[str, Any]:
    """Accepted / total per class and overall, and the report's text."""
    totals = Counter(LABELS[row["label"]] for row in rows)
    accepted = Counter(LABELS[row["label"]] for row, r in zip(rows, rationales) if r is not None)
    per_class = {name: (accepted[name], totals[name]) for name in LABELS if totals[name]}
    overall = (sum(accepted.values()), len(rows))
    lines = [f"  {name:<11} {a:>6} / {t:<6} ({100 * a / t:5.1f}%)" for name, (a, t) in per_class.items()]
    lines.append(f"  {'overall':<11} {overall[0]:>6} / {overall[1]:<6} ({100 * overall[0] / max(overall[1], 1):5.1f}%)")
    text = "[cot] accepted rationales per class:\n" + "\n".join(lines)
    if overall[0] == 0:
        text += (
            "\n[cot] NOTHING WAS ACCEPTED: no sample of the teacher ended in the gold label with a "
            "<think> block. Use a stronger teacher, more --tries or a larger --max-new-tokens."
        )
    return {"per_class": per_class, "overall": overall, "text": text}


def output_records(
    rows: list[Row], rationales: list[str | None], accepted_at: list[int], column: str, keep_rejected: bool
) -> list[dict[str, Any]]:
    """Rows in the plain ESCI schema that the task reads back, with the rationale column."""
    records = []
    for row, rationale, attempt in zip(rows, rationales, accepted_at):
        if rationale is None and not keep_rejected:
            continue
        record = {key: row[key] for key in ("query_id", "product_id") if key in row}
        record.update(
            query=row["query"],
            product_text=row["product_info"],  # the prompt's product information, as composed
            esci_label=LABELS[row["label"]],
            **{column: rationale or "", "cot_try": attempt},
        )
        records.append(record)
    return records


def write_records(records: list[dict[str, Any]], output: Path, columns: list[str]) -> None:
    """CSV or JSONL, written to a temporary file and renamed into place (no half-written output)."""
    import pandas as pd

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    if output.suffix.lower() == ".csv":
        pd.DataFrame(records, columns=columns).to_csv(tmp, index=False)
    else:  # by hand: pandas writes a stray newline for zero rows
        lines = (json.dumps({c: r[c] for c in columns if c in r}, ensure_ascii=False) + "\n" for r in records)
        tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, output)


def generate_rationales(
    teacher: str,
    source: str,
    output: Path,
    split: str = "train",
    locale: str | None = "us",
    small_version: int | None = 1,
    num_rows: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    tries: int = 4,
    batch_size: int = 8,
    max_new_tokens: int = 1024,
    temperature: float = 0.7,
    top_p: float = 0.95,
    rationale_column: str = "rationale",
    keep_rejected: bool = False,
    overwrite: bool = False,
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Build an ESCI rationale column by rejection sampling from a teacher model.

    The options are those of `talr cot --help` (dashes become underscores); rows come from
    `talr.tasks.ESCI` with the same source options. Returns the acceptance report with
    `output` and the number of rows `written`.
    """
    output = Path(output)
    if output.suffix.lower() not in OUTPUT_TYPES:
        raise ValueError(f"--output must end in {' or '.join(OUTPUT_TYPES)}, got {output.name}")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
    if tries < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError("--tries, --batch_size and --max_new_tokens must be at least 1")
    import torch

    from talr.models import load_model, load_tokenizer

    task = ESCI(source=source, split=split, locale=locale, small_version=small_version, num_rows=num_rows,
                limit=limit, seed=seed, cot=True, rationale_column=None)  # the CoT prompt, no rationale needed
    rows = task.read()
    tokenizer = load_tokenizer(teacher, trust_remote_code)
    model = load_model(teacher, dtype, trust_remote_code=trust_remote_code)
    if torch.cuda.is_available():
        model = model.to("cuda")
    torch.manual_seed(seed)
    rationales, accepted_at = sample_rationales(
        model, tokenizer, task, rows, tries, batch_size, max_new_tokens, temperature, top_p
    )

    records = output_records(rows, rationales, accepted_at, rationale_column, keep_rejected)
    columns = [c for c in ("query_id", "product_id") if any(c in row for row in rows)]
    write_records(records, output, [*columns, "query", "product_text", "esci_label", rationale_column, "cot_try"])
    report = acceptance_report(rows, rationales)
    print(report["text"])
    print(f"[cot] wrote {len(records)} rows to {output}")
    return {**report, "output": str(output), "written": len(records)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="talr cot",
        description="Build the ESCI rationale column by rejection sampling from a teacher model: each row "
        "keeps the first of up to --tries samples whose final label is the gold one.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--teacher", required=True, help="teacher model: hub id, local directory, or the embedded alias")
    add("--source", required=True, help="ESCI source: parquet directory, hub id, or CSV/JSONL/JSON file")
    add("--output", required=True, type=Path, help="new data file (.csv or .jsonl)")
    add("--split", default="train", help="ESCI split")
    add("--locale", default="us", help="product_locale filter ('none': all)")
    add("--small-version", default="1", help="small_version filter ('none': all)")
    add("--num-rows", type=int, default=None, help="seeded random subset of this many rows")
    add("--limit", type=int, default=None, help="then only the first LIMIT rows")
    add("--seed", type=int, default=0, help="row subset and sampling seed")
    add("--tries", type=int, default=4, help="samples per row at most")
    add("--batch-size", type=int, default=8, help="prompts per generate call")
    add("--max-new-tokens", type=int, default=1024, help="length budget of one sample")
    add("--temperature", type=float, default=0.7, help="sampling temperature")
    add("--top-p", type=float, default=0.95, help="nucleus sampling threshold")
    add("--rationale-column", default="rationale", help="output column holding the rationale")
    add("--keep-rejected", action="store_true", help="also write rows without a rationale (empty cell)")
    add("--overwrite", action="store_true", help="replace an existing output file")
    add("--dtype", default="auto", help="teacher dtype: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16")
    add("--trust-remote-code", action="store_true", help="allow the teacher's own modelling code")
    return parser


def _optional(value: str) -> str | None:
    return None if value.lower() in ("none", "null", "") else value


def main(argv: list[str] | None = None) -> int:
    """`talr cot ...`: parse `argv` (the arguments after `cot`), run, and return the exit status."""
    args = vars(build_parser().parse_args(argv))
    args["locale"] = _optional(args["locale"])
    small_version = _optional(args["small_version"])
    try:
        args["small_version"] = None if small_version is None else int(small_version)
        generate_rationales(**args)
    except (DataError, FileExistsError, ValueError) as err:
        print(f"talr cot: error: {err}", file=sys.stderr)
        return 2
    return 0
