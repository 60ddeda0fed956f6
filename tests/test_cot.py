"""`talr cot`: rejection sampling of ESCI rationales, its report and its output file."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import cli
import talr.experiments.cot as cot
from conftest import SHARED
from talr.tasks import ESCI
from talr.tasks.esci import LABELS

RAG_CSV = SHARED / "data" / "esci" / "amazon-esci-rag" / "query_esci_lookup.csv"


def run_cot(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["cot", *args])
    return exit_info.value.code


def test_help_lists_the_options(capsys):
    assert run_cot("--help") == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: talr cot")
    for option in ("--teacher", "--source", "--output", "--tries", "--overwrite", "--keep-rejected", "--seed"):
        assert option in text


def test_tiny_teacher_end_to_end(tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "cot.jsonl"
    common = ["--teacher", str(tiny_model_dir), "--source", str(RAG_CSV), "--limit", "6",
              "--tries", "2", "--batch-size", "4", "--max-new-tokens", "12", "--output", str(output)]
    assert run_cot(*common, "--keep-rejected") == 0
    printed = capsys.readouterr().out
    written = pd.read_json(output, lines=True, dtype=False)
    rows = ESCI(source=str(RAG_CSV), limit=6).read()

    # every row is written (kept or not), in order, with the prompt's product text and the gold label
    assert list(written.columns) == ["product_id", "query", "product_text", "esci_label", "rationale", "cot_try"]
    assert list(written["product_id"]) == [r["product_id"] for r in rows]
    assert list(written["esci_label"]) == [LABELS[r["label"]] for r in rows]
    assert list(written["product_text"]) == [r["product_info"] for r in rows]
    accepted = written[written["rationale"] != ""]
    assert f"{len(accepted):>6} / 6" in printed and f"wrote 6 rows to {output}" in printed
    if accepted.empty:  # what a random 2-layer model does
        assert "NOTHING WAS ACCEPTED" in printed
        assert set(written["cot_try"]) == {0}
    for _, record in accepted.iterrows():  # if any were kept, each really ends in the gold label
        task = ESCI(cot=True)
        row = {"rationale": record["rationale"], "label": LABELS.index(record["esci_label"])}
        assert task.score(task.target(row), row).correct and record["cot_try"] in (1, 2)

    # an existing output is refused unless --overwrite
    before = output.read_bytes()
    assert run_cot(*common) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and output.read_bytes() == before
    assert run_cot(*common, "--overwrite") == 0
    assert len(output.read_text().splitlines()) == len(accepted)  # only accepted rows by default


def test_first_accepted_sample_is_kept_and_only_pending_rows_are_resampled(monkeypatch):
    rows = [
        {"query": "a", "product_info": "A", "label": 0},
        {"query": "b", "product_info": "B", "label": 1},
        {"query": "c", "product_info": "C", "label": 3},
    ]
    # what the "teacher" says for each query, try after try
    script = {
        "a": ["<think>a1</think><answer>0</answer>", "<think>never asked</think><answer>0</answer>"],
        "b": ["<think>b1</think><answer>2</answer>", "<think>b2</think><answer>1</answer>"],
        "c": ["no tags at all", "<think>c2</think><answer>0</answer>"],
    }
    asked: list[str] = []

    def scripted(model, tokenizer, prompts, device, max_new_tokens, temperature, top_p):
        texts = []
        for prompt in prompts:
            query = next(r["query"] for r in rows if f"query:\n{r['query']}\n" in prompt)
            texts.append(script[query][asked.count(query)])
            asked.append(query)
        return texts

    class Tokenizer:
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "\n".join(m["content"] for m in messages)

    monkeypatch.setattr(cot, "_sample", scripted)
    rationales, tries = cot.sample_rationales(torch.nn.Linear(1, 1), Tokenizer(), ESCI(cot=True, rationale_column=None),
                                              rows, tries=2, batch_size=2, max_new_tokens=8, temperature=1.0, top_p=1.0)
    assert rationales == ["a1", "b2", None] and tries == [1, 2, 0]
    assert sorted(asked) == ["a", "b", "b", "c", "c"]  # "a" was accepted at once and not asked again

    report = cot.acceptance_report(rows, rationales)
    assert report["per_class"] == {"Exact": (1, 1), "Substitute": (1, 1), "Irrelevant": (0, 1)}
    assert report["overall"] == (2, 3) and "NOTHING" not in report["text"]
    assert "NOTHING WAS ACCEPTED" in cot.acceptance_report(rows, [None, None, None])["text"]

    records = cot.output_records(rows, rationales, tries, "why", keep_rejected=False)
    assert [(r["query"], r["esci_label"], r["why"], r["cot_try"]) for r in records] == [
        ("a", "Exact", "a1", 1), ("b", "Substitute", "b2", 2)]


def test_written_file_reads_back_as_cot_training_rows(tmp_path):
    rows = ESCI(source=str(RAG_CSV), limit=3).read()
    records = cot.output_records(rows, ["r1", None, "r3"], [1, 0, 2], "rationale", keep_rejected=False)
    path = tmp_path / "out.csv"
    cot.write_records(records, path, ["product_id", "query", "product_text", "esci_label", "rationale", "cot_try"])
    back = ESCI(source=str(path), cot=True).read()
    assert [(r["query"], r["product_info"], r["label"], r["rationale"]) for r in back] == [
        (rows[0]["query"], rows[0]["product_info"], rows[0]["label"], "r1"),
        (rows[2]["query"], rows[2]["product_info"], rows[2]["label"], "r3"),
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]  # the temporary file was renamed into place
