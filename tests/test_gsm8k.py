"""MetaMathQA -> GSM8K: reading both schemas, the prompt and target, final-number scoring on real
GSM8K answers and on model-style text, and the two configs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cli import build_cli
from conftest import SHARED
from talr.tasks import GSM8K, DataError, MetaMathQA
from talr.tasks.math import answer_line, canonical_number, score_answer, to_metamath_response

REPO = Path(__file__).resolve().parents[1]
GSM8K_TEST = SHARED / "data" / "gsm8k" / "test.jsonl"
GSM8K_TRAIN = SHARED / "data" / "gsm8k" / "train.jsonl"


def raw_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def gold_value(answer: str) -> int:
    """Independent parse of GSM8K's gold: the text after the only '####', commas dropped."""
    head, final = answer.split("####")
    return int(final.strip().replace(",", ""))


@pytest.fixture(scope="module")
def test_rows() -> list[dict]:
    return GSM8K(source=str(GSM8K_TEST)).read()


def test_every_real_gold_answer_parses_to_its_number(test_rows):
    raw = raw_rows(GSM8K_TEST)
    assert len(test_rows) == len(raw) == 1319
    for row, original in zip(test_rows, raw):
        expected = str(gold_value(original["answer"]))
        assert canonical_number(row["answer"]) == expected
        # the original "#### N" text and its MetaMathQA-style rewrite both score as correct
        assert score_answer(original["answer"], row["answer"]).correct
        verdict = score_answer(row["response"], row["answer"])
        assert verdict.correct and verdict.answer == expected and not verdict.fallback
    assert any("," in original["answer"].split("####")[1] for original in raw)  # thousands commas occur


@pytest.mark.parametrize(
    "generation, gold, correct, parsed, fallback",
    [
        ("So she pays 1234 dollars. The answer is: 1,234.00", "1234", True, True, False),
        ("The answer is $5.", "5", True, True, False),
        ("The answer is: 5.0\n", "5", True, True, False),
        ("The answer is: -3", "-3", True, True, False),
        ("The answer is 0.50", "0.5", True, True, False),
        ("#### 72", "72", True, True, False),
        ("We get 18 eggs.\nThe answer is: 18 eggs", "18", True, True, False),
        ("The answer is: 7, not 8", "7", True, True, False),
        ("The answer is: 17. Wait, I mean 18.", "18", False, True, False),  # the answer line decides
        ("First 3, then 4, so the answer is 12.\nThe answer is: 12", "12", True, True, False),
        ("I think the total is 42 apples", "42", True, True, True),  # last-number fallback
        ("I think the total is 42 apples, or 43", "42", False, True, True),
        ("I cannot solve this.", "42", False, False, False),
        ("", "42", False, False, False),
    ],
)
def test_model_style_answers(generation, gold, correct, parsed, fallback):
    verdict = score_answer(generation, gold)
    assert (verdict.correct, verdict.parsed, verdict.fallback) == (correct, parsed, fallback)


def test_strict_scoring_has_no_fallback():
    verdict = score_answer("I think the total is 42 apples", "42", fallback=False)
    assert not verdict.parsed and not verdict.correct


def test_text_answers_compare_as_text():
    assert score_answer("The answer is: \\frac{1}{2}.", "\\frac{1}{2}").correct
    assert not score_answer("The answer is: \\frac{1}{3}", "\\frac{1}{2}").correct
    assert not score_answer("no marker", "\\frac{1}{2}").parsed


def test_summary_counts_fallback_and_unparsed(test_rows):
    task = GSM8K()
    rows = test_rows[:4]
    generations = [f"The answer is: {rows[0]['answer']}", f"so {rows[1]['answer']}", "nothing", "The answer is: -1"]
    metrics = task.summarize([task.score(g, r) for g, r in zip(generations, rows)], rows)
    assert metrics["accuracy"] == 0.5 and metrics["unparsed"] == 1 and metrics["fallback"] == 1 and metrics["count"] == 4


def test_gsm8k_answers_become_metamath_responses():
    original = raw_rows(GSM8K_TRAIN)[0]["answer"]
    response = to_metamath_response(original)
    assert response.endswith("\nThe answer is: 72") and "<<" not in response and "####" not in response
    assert response.startswith("Natalia sold 48/2 = 24 clips in May.")


def test_metamath_task_reads_a_gsm8k_file_through_column_options():
    task = MetaMathQA(source=str(GSM8K_TRAIN), question_column="question", response_column="answer", limit=5)
    rows = task.read()
    raw = raw_rows(GSM8K_TRAIN)[:5]
    assert [r["question"] for r in rows] == [r["question"] for r in raw]
    assert [r["answer"] for r in rows] == [str(gold_value(r["answer"])) for r in raw]
    assert all(task.target(r).endswith(f"The answer is: {r['answer']}") for r in rows)
    user = task.prompt_messages(rows[0])[-1]["content"]
    assert user.startswith(raw[0]["question"]) and '"The answer is: N"' in user
    assert task.assistant_prefix(rows[0]) == ""
    # the default columns are MetaMathQA's: a GSM8K file without the mapping names what is missing
    with pytest.raises(DataError, match=r"train.jsonl row 1: missing column 'query'"):
        MetaMathQA(source=str(GSM8K_TRAIN), limit=1).read()


def test_metamath_schema_types_and_sampling(tmp_path):
    path = tmp_path / "metamath.json"
    records = [
        {"query": f"What is {i} + {i}?", "response": f"{i} + {i} = {2 * i}. The answer is: {2 * i}",
         "type": "GSM_AnsAug" if i % 2 else "MATH_AnsAug"}
        for i in range(20)
    ]
    path.write_text(json.dumps(records))
    rows = MetaMathQA(source=str(path)).read()
    assert len(rows) == 20 and rows[3]["answer"] == "6" and rows[3]["response"] == records[3]["response"]
    gsm_only = MetaMathQA(source=str(path), types=["GSM_AnsAug"]).read()
    assert len(gsm_only) == 10 and {r["type"] for r in gsm_only} == {"GSM_AnsAug"}
    a, b = (MetaMathQA(source=str(path), num_rows=5, seed=3).read() for _ in range(2))
    assert a == b and len(a) == 5 and a != MetaMathQA(source=str(path), num_rows=5, seed=4).read()
    assert MetaMathQA().group_keys(rows[0]) == {"type": "MATH_AnsAug"}


def test_bad_rows_name_file_row_and_column(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"query": "q", "response": "no final answer here"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl row 1, column 'response': no final answer"):
        MetaMathQA(source=str(path)).read()
    path.write_text(json.dumps({"query": "", "response": "The answer is: 1"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl row 1, column 'query': expected non-empty text"):
        MetaMathQA(source=str(path)).read()
    path.write_text("{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl line 1: invalid JSON"):
        MetaMathQA(source=str(path)).read()
    with pytest.raises(DataError, match="file not found"):
        GSM8K(source=str(tmp_path / "missing.jsonl")).read()


def test_hub_sources_pass_config_and_split(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if name == "openai/gsm8k":
            return datasets.Dataset.from_list(raw_rows(GSM8K_TEST)[:3])
        return datasets.Dataset.from_list([
            {"query": "1+1?", "response": "1+1=2. The answer is: 2", "type": "GSM_SV", "original_question": "x"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert [r["answer"] for r in GSM8K().read()] == [str(gold_value(r["answer"])) for r in raw_rows(GSM8K_TEST)[:3]]
    assert MetaMathQA().read() == [{"question": "1+1?", "response": "1+1=2. The answer is: 2", "answer": "2", "type": "GSM_SV"}]
    assert calls == [("openai/gsm8k", "main", "test"), ("meta-math/MetaMathQA", None, "train")]


def test_answer_line_prefers_the_last_marker():
    assert answer_line("The answer is: 3\nThe answer is: 4") == "4"
    assert answer_line("#### 5\nThe answer is: 6") == "6"
    assert answer_line("The answer is:") is None


# ------------------------------------------------------------------------ configs, CLI

METAMATH_CONFIGS = sorted((REPO / "configs" / "metamath").glob("*.yaml"))


def test_every_metamath_config_exists():
    assert {p.stem for p in METAMATH_CONFIGS} == {"ce", "talr"}


@pytest.mark.parametrize("config", METAMATH_CONFIGS, ids=lambda p: p.stem)
def test_metamath_configs_run_on_gsm8k_files(config, tiny_model_dir, tmp_path):
    """Train on GSM8K train rows standing in for MetaMathQA, validate on held-out rows, test on GSM8K test."""
    settings = yaml.safe_load(config.read_text())
    cli = build_cli([
        "fit", "--config", str(config),
        "--model.model", str(tiny_model_dir), "--model.max_new_tokens", "4",
        "--data.task.init_args.source", str(GSM8K_TRAIN), "--data.task.init_args.limit", "12",
        "--data.task.init_args.question_column", "question", "--data.task.init_args.response_column", "answer",
        "--data.test_task.init_args.source", str(GSM8K_TEST), "--data.test_task.init_args.limit", "4",
        "--data.max_length", "512", "--data.val_size", "4",
        "--data.batch_size", "4", "--data.micro_batch_size", "2", "--data.eval_batch_size", "4",
        "--trainer.max_steps", "2", "--trainer.max_epochs", "1", "--trainer.val_check_interval", "2",
        "--trainer.num_sanity_val_steps", "0", "--validate_before_fit", "false",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
    ])
    assert cli.trainer.global_step == 2
    assert cli.model.hparams.loss["class_path"] == settings["model"]["loss"]["class_path"] and cli.model.hparams.learning_rate == 1e-6
    assert settings["data"]["batch_size"] == 128 and settings["trainer"]["max_epochs"] == 2  # the paper's setup
    checkpoint = cli.trainer.checkpoint_callback
    assert checkpoint.monitor == "val/accuracy" and Path(checkpoint.best_model_path).is_file()
    assert {"val/accuracy", "val/unparsed", "val/fallback", "val/count"} <= set(cli.trainer.callback_metrics)

    cli.trainer.test(cli.model, datamodule=cli.datamodule)  # data.test_task: GSM8K test
    assert isinstance(cli.datamodule.test_task, GSM8K)
    assert cli.trainer.callback_metrics["test/count"].item() == 4
