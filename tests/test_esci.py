"""ESCI task: every source format, label normalisation, the paper's prompts, the scorer, balanced
accuracy against scikit-learn, the confusion-matrix figure, and the four configs end to end."""

from __future__ import annotations

import csv
import json
import warnings
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml
from sklearn.metrics import balanced_accuracy_score, recall_score

from cli import build_cli
from conftest import SHARED
from talr.data import encode_example, prompt_text, turn_end_text
from talr.tasks import ESCI, DataError
from talr.tasks.esci import LABELS, accept_rationale, normalize_label, parse_label

REPO = Path(__file__).resolve().parents[1]
ESCI_DIR = SHARED / "data" / "esci"
UNDERSPEC_CSV = ESCI_DIR / "underspec-analysis" / "esci.csv"
NESTED_JSON = ESCI_DIR / "second-life" / "esci_subset.json"
RAG_CSV = ESCI_DIR / "amazon-esci-rag" / "query_esci_lookup.csv"

WORD_TO_INDEX = {"Exact": 0, "Substitute": 1, "Complement": 2, "Irrelevant": 3}


def toy_rows(labels: list[int]) -> list[dict]:
    return [{"query": f"q{i}", "product_info": f"p{i}", "label": label} for i, label in enumerate(labels)]


# ------------------------------------------------------------------------------- metrics


def score_all(task: ESCI, generations: list[str], rows: list[dict]):
    return [task.score(text, row) for text, row in zip(generations, rows)]


def test_balanced_accuracy_matches_sklearn_with_unparsed_answers():
    # Imbalanced: 6 Exact, 2 Substitute, 1 Complement, 3 Irrelevant.
    truth = [0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 3, 3]
    predicted = [0, 0, 0, 0, 0, None, 0, 1, None, 3, 0, 3]  # None: the model wrote no label
    task = ESCI()
    rows = toy_rows(truth)
    generations = [f"{p}</answer>" if p is not None else "I am not sure" for p in predicted]
    metrics = task.summarize(score_all(task, generations, rows), rows)

    y_pred = [p if p is not None else -1 for p in predicted]  # -1: a wrong class of its own
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that -1 never occurs in y_true
        expected = balanced_accuracy_score(truth, y_pred)
    assert metrics["balanced_accuracy"] == pytest.approx(expected)
    assert metrics["accuracy"] == pytest.approx(8 / 12)
    assert metrics["balanced_accuracy"] != pytest.approx(metrics["accuracy"])
    assert metrics["unparsed"] == 2 and metrics["count"] == 12

    # recall per class by hand: Exact 5/6, Substitute 1/2, Complement 0/1, Irrelevant 2/3
    assert metrics["recall/Exact"] == pytest.approx(5 / 6)
    assert metrics["recall/Substitute"] == pytest.approx(1 / 2)
    assert metrics["recall/Complement"] == 0.0
    assert metrics["recall/Irrelevant"] == pytest.approx(2 / 3)
    assert metrics["balanced_accuracy"] == pytest.approx((5 / 6 + 1 / 2 + 0 + 2 / 3) / 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        per_class = recall_score(truth, y_pred, labels=[0, 1, 2, 3], average=None)
    assert [metrics[f"recall/{name}"] for name in LABELS] == pytest.approx(list(per_class))


def test_absent_classes_are_left_out_of_balanced_accuracy_like_sklearn():
    truth = [0, 0, 0, 1]
    predicted = [0, 1, 0, 2]
    task = ESCI()
    rows = toy_rows(truth)
    metrics = task.summarize(score_all(task, [f"{p}</answer>" for p in predicted], rows), rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, predicted))
    assert "recall/Complement" not in metrics and "recall/Irrelevant" not in metrics


def test_confusion_matrix_figure_has_an_unparsed_column():
    from matplotlib.figure import Figure

    task = ESCI()
    rows = toy_rows([0, 1, 2, 3])
    verdicts = score_all(task, ["0</answer>", "junk", "2</answer>", "1</answer>"], rows)
    matrix = task.confusion_matrix(verdicts, rows)
    assert matrix.tolist() == [
        [1, 0, 0, 0, 0],
        [0, 0, 0, 0, 1],  # the unparsed answer
        [0, 0, 1, 0, 0],
        [0, 1, 0, 0, 0],
        [0, 0, 0, 0, 0],
    ]
    figures = task.figures(verdicts, rows)
    assert set(figures) == {"confusion_matrix"} and isinstance(figures["confusion_matrix"], Figure)
    labels = [t.get_text() for t in figures["confusion_matrix"].axes[0].get_xticklabels()]
    assert labels == [*LABELS, "unparsed"]


# ------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize(
    "generation, expected",
    [
        ("0</answer>", 0),
        (" 3 </answer>", 3),
        ("2", 2),  # no closing tag: the block runs to the end
        ("1.</answer>", 1),
        ("Substitute</answer>", 1),
        ("4</answer>", None),
        ("2.5</answer>", None),
        ("23</answer>", None),
        ("</answer>", None),
        ("maybe exact?", None),
    ],
)
def test_no_cot_scorer_parses_the_digit_after_the_prefix(generation, expected):
    task = ESCI()
    verdict = task.score(generation, {"label": 1})
    assert verdict.parsed == (expected is not None)
    assert verdict.correct == (expected == 1)
    assert parse_label("<answer>" + generation) == expected


def test_cot_scorer_reads_the_last_answer_block():
    task = ESCI(cot=True)
    text = "<think>\nIt says <answer>0</answer> in the title.\n</think>\n<answer>3</answer>"
    assert task.score(text, {"label": 3}).correct
    assert not task.score("<think>no answer</think>", {"label": 3}).parsed


def test_acceptance_needs_one_think_block_and_the_gold_label():
    good = "<think>\nThe product is a case, the query a phone.\n</think>\n<answer>2</answer>"
    assert accept_rationale(good, 2) == "The product is a case, the query a phone."
    assert accept_rationale(good, 0) is None  # wrong label
    assert accept_rationale("<answer>2</answer>", 2) is None  # no rationale
    assert accept_rationale("<think> </think><answer>2</answer>", 2) is None  # empty rationale
    assert accept_rationale("<think>a</think><think>b</think><answer>2</answer>", 2) is None  # two blocks
    assert accept_rationale("<think>a</think>", 2) is None  # no answer
    assert accept_rationale("<answer>2</answer><think>a</think>", 2) is None  # answer before thinking
    assert accept_rationale("<think>a <answer>1</answer></think>\n<answer>2</answer>", 2) == "a <answer>1</answer>"


# ------------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    "value, column, expected",
    [("E", "esci_label", 0), ("s", "esci_label", 1), ("Complement", "esci_label", 2), ("IRRELEVANT", "esci_label", 3),
     (3, "relevance", 0), ("2", "relevance", 1), (1, "relevance", 2), (0, "relevance", 3)],
)
def test_labels_as_letters_words_or_grades(value, column, expected):
    assert normalize_label(value, column, "f row 1") == expected


@pytest.mark.parametrize("value, column, message", [
    ("2", "esci_label", "ambiguous"),
    ("Exactly", "esci_label", "not an ESCI label"),
    ("", "esci_label", "not an ESCI label"),
    (4, "relevance", "not a grade"),
    ("E", "relevance", "not a grade"),
])
def test_bad_labels_name_row_and_column(value, column, message):
    with pytest.raises(DataError, match=rf"f row 7, column '{column}': .*{message}"):
        normalize_label(value, column, "f row 7")


def test_underspec_csv_labels_match_an_independent_count():
    with UNDERSPEC_CSV.open(newline="", encoding="utf-8") as f:
        raw = list(csv.DictReader(f))
    expected = Counter(WORD_TO_INDEX[r["esci_label"]] for r in raw)
    rows = ESCI(source=str(UNDERSPEC_CSV), small_version=None).read()
    assert Counter(r["label"] for r in rows) == expected == Counter({0: 138, 1: 49, 3: 12, 2: 1})
    # the small_version filter applies where the column exists
    small = ESCI(source=str(UNDERSPEC_CSV)).read()
    assert len(small) == sum(r["small_version"] == "1" for r in raw)
    first = rows[0]
    assert first["query"] == raw[0]["query"] and first["product_id"] == raw[0]["product_id"]
    assert first["product_info"].startswith("Title: " + raw[0]["product_title"])
    assert "<br" not in first["product_info"] and "<b>" not in first["product_info"]


def test_nested_json_grades_match_an_independent_count():
    queries = json.loads(NESTED_JSON.read_text(encoding="utf-8"))
    grade_to_index = {3: 0, 2: 1, 1: 2, 0: 3}
    expected = Counter(grade_to_index[p["relevance"]] for q in queries for p in q["products"])
    rows = ESCI(source=str(NESTED_JSON)).read()
    assert len(rows) == sum(len(q["products"]) for q in queries) == 1332
    assert Counter(r["label"] for r in rows) == expected
    assert rows[0]["query"] == queries[0]["query"]
    assert rows[0]["product_info"] == queries[0]["products"][0]["product_text"]


def test_letter_labels_match_an_independent_count():
    with RAG_CSV.open(newline="", encoding="utf-8") as f:
        raw = list(csv.DictReader(f))
    expected = Counter("ESCI".index(r["esci_label"]) for r in raw)
    rows = ESCI(source=str(RAG_CSV)).read()
    assert Counter(r["label"] for r in rows) == expected and len(rows) == 99


def test_class_distribution_is_printed(caplog):
    import logging

    with caplog.at_level(logging.INFO):
        ESCI(source=str(RAG_CSV)).read()
    assert "99 rows: Exact 76 (76.77%), Substitute 5 (5.05%), Complement 1 (1.01%), Irrelevant 17 (17.17%)" in caplog.text


def test_num_rows_draws_a_seeded_subset_then_limit_cuts():
    full = ESCI(source=str(NESTED_JSON)).read()
    a = ESCI(source=str(NESTED_JSON), num_rows=50, seed=1).read()
    b = ESCI(source=str(NESTED_JSON), num_rows=50, seed=1).read()
    c = ESCI(source=str(NESTED_JSON), num_rows=50, seed=2).read()
    assert a == b and a != c and len(a) == 50
    assert all(row in full for row in a)
    assert ESCI(source=str(NESTED_JSON), num_rows=50, seed=1, limit=5).read() == a[:5]


def test_bad_files_raise_data_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"query": ["a", "b"], "product_text": ["x", "y"], "esci_label": ["E", "3"]}).to_csv(bad, index=False)
    with pytest.raises(DataError, match=r"bad.csv row 2, column 'esci_label': '3'.*ambiguous"):
        ESCI(source=str(bad)).read()
    # rows are named by their place in the file, also after filters dropped earlier rows
    filtered = tmp_path / "filtered.csv"
    pd.DataFrame({"query": ["a", "b", "c"], "product_text": ["x", "y", "z"], "esci_label": ["E", "S", "maybe"],
                  "small_version": [0, 1, 1]}).to_csv(filtered, index=False)
    with pytest.raises(DataError, match=r"filtered.csv row 3, column 'esci_label': 'maybe'"):
        ESCI(source=str(filtered)).read()
    no_query = tmp_path / "no_query.jsonl"
    no_query.write_text(json.dumps({"product_text": "x", "esci_label": "E"}) + "\n")
    with pytest.raises(DataError, match=r"no_query.jsonl row 1, column 'query'"):
        ESCI(source=str(no_query)).read()
    with pytest.raises(DataError, match="no such file"):
        ESCI(source=str(tmp_path / "missing.csv")).read()


def test_cot_needs_a_rationale_column(tmp_path):
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"query": "q", "product_text": "p", "esci_label": "E"}) + "\n")
    with pytest.raises(DataError, match=r"plain.jsonl row 1: missing rationale column 'why'.*talr cot"):
        ESCI(source=str(plain), cot=True, rationale_column="why").read()
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"query": "q", "product_text": "p", "esci_label": "E", "why": " "}) + "\n")
    with pytest.raises(DataError, match=r"empty.jsonl row 1, column 'why': empty rationale"):
        ESCI(source=str(empty), cot=True, rationale_column="why").read()
    # evaluation-only CoT rows (rationale_column=None) need none
    rows = ESCI(source=str(plain), cot=True, rationale_column=None).read()
    assert ESCI(cot=True, rationale_column=None).target(rows[0]) == "<answer>0</answer>"


def test_hub_source_filters_and_samples_like_a_local_file(monkeypatch, tmp_path):
    import datasets

    records = [
        {"example_id": i, "query": f"query {i}", "product_id": f"P{i}", "product_locale": "us" if i % 3 else "es",
         "esci_label": LABELS[i % 4], "small_version": int(i % 5 != 0), "product_title": f"Product {i}",
         "product_brand": "", "product_color": "", "product_bullet_point": "", "product_description": ""}
        for i in range(40)
    ]
    calls = []

    def fake_load_dataset(name, split=None, **kwargs):
        calls.append((name, split))
        return datasets.Dataset.from_list(records)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    from_hub = ESCI(source="someone/esci", split="test", num_rows=8, seed=5).read()
    assert calls == [("someone/esci", "test")]
    kept = [r for r in records if r["product_locale"] == "us" and r["small_version"] == 1]
    assert len(from_hub) == 8 and {r["product_id"] for r in from_hub} <= {r["product_id"] for r in kept}
    local = tmp_path / "same.jsonl"
    local.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert from_hub == ESCI(source=str(local), num_rows=8, seed=5).read()  # the same sample either way


# ------------------------------------------------------------------------- parquet pair

def test_official_parquet_pair_is_joined_on_locale_and_product_id(tmp_path):
    examples = pd.DataFrame({
        "example_id": [1, 2, 3, 4, 5, 6],
        "query": ["red shoe", "red shoe", "zapato", "usb cable", "usb cable", "lamp"],
        "query_id": [10, 10, 11, 12, 12, 13],
        "product_id": ["A1", "A2", "A1", "B1", "B2", "C1"],
        "product_locale": ["us", "us", "es", "us", "us", "us"],
        "esci_label": ["E", "S", "E", "C", "I", "E"],
        "small_version": [1, 1, 1, 1, 0, 1],
        "large_version": [1, 1, 1, 1, 1, 1],
        "split": ["train", "train", "train", "train", "train", "test"],
    })
    products = pd.DataFrame({
        "product_id": ["A1", "A1", "A2", "B1", "B2", "C1"],
        "product_title": ["Red Shoe US", "Zapato Rojo ES", "Blue Shoe", "USB-C cable", "Phone", "Desk lamp"],
        "product_description": ["<b>Nice</b> shoe", "", "", "", "", ""],
        "product_bullet_point": ["", "", "", "1 m", "", ""],
        "product_brand": ["Acme", "Acme", "", "Cabl", "", ""],
        "product_color": ["red", "rojo", "", "", "", ""],
        # A2 exists only in the es locale: its us example must not join
        "product_locale": ["us", "es", "es", "us", "us", "us"],
    })
    examples.to_parquet(tmp_path / "shopping_queries_dataset_examples.parquet")
    products.to_parquet(tmp_path / "shopping_queries_dataset_products.parquet")

    rows = ESCI(source=str(tmp_path), split="train").read()  # us, small_version 1
    assert [(r["query"], r["product_id"], r["label"]) for r in rows] == [("red shoe", "A1", 0), ("usb cable", "B1", 2)]
    assert rows[0]["product_info"] == "Title: Red Shoe US\nBrand: Acme\nColor: red\nDescription: Nice shoe"
    assert rows[1]["product_info"] == "Title: USB-C cable\nBrand: Cabl\nBullet points: 1 m"

    spanish = ESCI(source=str(tmp_path), split="train", locale="es").read()
    assert [(r["query"], r["product_info"].splitlines()[0]) for r in spanish] == [("zapato", "Title: Zapato Rojo ES")]
    everything = ESCI(source=str(tmp_path), split="train", small_version=None).read()
    assert [r["product_id"] for r in everything] == ["A1", "B1", "B2"]
    assert [r["query"] for r in ESCI(source=str(tmp_path), split="test").read()] == ["lamp"]

    (tmp_path / "shopping_queries_dataset_products.parquet").unlink()
    with pytest.raises(DataError, match="missing .*shopping_queries_dataset_products.parquet"):
        ESCI(source=str(tmp_path)).read()


# ------------------------------------------------------------------------------ prompts

def test_prompts_use_the_papers_wording():
    row = {"query": "usb c cable", "product_info": "Title: Cable", "label": 2, "rationale": "It charges the phone."}
    plain, cot = ESCI(), ESCI(cot=True)
    system, user = plain.prompt_messages(row)
    assert system == {"role": "system", "content": "You are a helpful assistant. You provide the user with the answer."}
    assert user["content"].startswith(
        "Your task is to classify each product as being an Exact, Substitute, Complement, or Irrelevant match "
        "for the query.\nHere is the user\u2019s query:\nusb c cable\nHere is the product information:\nTitle: Cable\n"
        "--------------\nYour final response must be within <answer> </answer> tags.\n"
        "Label the relation type as a number: 0 = Exact, 1 = Substitute, 2 = Complement and 3 = Irrelevant. "
        "For example,\n<answer>one_of_[0, 1, 2, 3]</answer>."
    )
    assert plain.assistant_prefix(row) == "<answer>" and plain.target(row) == "2</answer>"

    system, user = cot.prompt_messages(row)
    assert system["content"].startswith("You are a helpful assistant. You first think about the reasoning process")
    assert "Please show your entire reasoning process in **a single** <think> </think> block " \
           "(do not open or close the tag more than once)." in user["content"]
    assert user["content"].endswith("<think>\n[entire reasoning process here]\n</think>\n<answer>one_of_[0, 1, 2, 3]</answer>")
    assert cot.assistant_prefix(row) == ""
    assert cot.target(row) == "<think>\nIt charges the phone.\n</think>\n<answer>2</answer>"


def test_no_cot_target_tokens_are_the_digit_the_close_tag_and_the_turn_end(tokenizer):
    task = ESCI()
    row = {"query": "usb c cable", "product_info": "Title: Cable", "label": 3}
    end = turn_end_text(tokenizer)
    example = encode_example(tokenizer, task, row, 0, 1024, "truncate", end)
    target_ids = [t for t in example.labels if t != -100]
    assert tokenizer.decode(target_ids) == "3</answer>" + end
    assert target_ids == tokenizer("3</answer>" + end, add_special_tokens=False)["input_ids"]
    prompt = prompt_text(tokenizer, task, row)
    assert prompt.endswith("<|im_start|>assistant\n<answer>")
    assert tokenizer.decode(example.input_ids[: example.prompt_len]) == prompt


# ------------------------------------------------------------------------ configs, CLI

# cpu.yaml is the CPU-scale study setup (real second-life rows, split by query), not a paper-setup config
ESCI_CONFIGS = sorted(p for p in (REPO / "configs" / "esci").glob("*.yaml") if p.stem != "cpu")


def test_the_cpu_study_config_splits_the_shared_pairs_by_query(tmp_path, capsys):
    """configs/esci/cpu.yaml reads the 1,332 shared pairs label-only and holds out whole queries."""
    from talr.data import SFTDataModule

    settings = yaml.safe_load((REPO / "configs" / "esci" / "cpu.yaml").read_text())
    task = ESCI(**{k: v.replace("../shared", str(SHARED)) if isinstance(v, str) else v
                   for k, v in settings["data"]["task"]["init_args"].items()})
    rows = task.read()
    assert len(rows) == 1332 and not task.cot
    data = settings["data"]
    module = SFTDataModule(task, val_size=data["val_size"], split_by=data["split_by"], seed=0)
    train, val = module.split_rows(rows)
    assert {r["query"] for r in train}.isdisjoint({r["query"] for r in val}) and len(val) >= data["val_size"]
    assert len(train) + len(val) == 1332


def test_every_esci_config_exists():
    assert {p.stem for p in ESCI_CONFIGS} == {"ce_nocot", "talr_nocot", "ce_cot", "talr_cot"}


@pytest.fixture(scope="module")
def cot_file(tmp_path_factory) -> Path:
    """Shared rows with a made-up rationale column, as `talr cot` would write them."""
    rows = [ESCI(source=str(NESTED_JSON), limit=24).read()][0]
    frame = pd.DataFrame({
        "query": [r["query"] for r in rows],
        "product_text": [r["product_info"] for r in rows],
        "esci_label": [LABELS[r["label"]] for r in rows],
        "rationale": [f"The product is {LABELS[r['label']].lower()} for the query." for r in rows],
    })
    path = tmp_path_factory.mktemp("esci") / "train_cot.jsonl"
    frame.to_json(path, orient="records", lines=True)
    return path


@pytest.mark.parametrize("config", ESCI_CONFIGS, ids=lambda p: p.stem)
def test_esci_configs_run_on_shared_files(config, cot_file, tiny_model_dir, tmp_path):
    """Each config trains 2 steps on a shared ESCI file, validates, and scores a test task."""
    settings = yaml.safe_load(config.read_text())
    cot = settings["data"]["task"]["init_args"].get("cot", False)
    source = cot_file if cot else NESTED_JSON
    cli = build_cli([
        "fit", "--config", str(config),
        "--model.model", str(tiny_model_dir), "--model.max_new_tokens", "4",
        "--data.task.init_args.source", str(source), "--data.task.init_args.limit", "12",
        "--data.test_task.init_args.source", str(RAG_CSV), "--data.test_task.init_args.limit", "4",
        "--data.max_length", "1024", "--data.val_size", "4",
        "--data.batch_size", "4", "--data.micro_batch_size", "2", "--data.eval_batch_size", "4",
        "--trainer.max_steps", "2", "--trainer.max_epochs", "1", "--trainer.val_check_interval", "2",
        "--trainer.num_sanity_val_steps", "0", "--validate_before_fit", "false",  # one validation is enough here
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
    ])
    assert cli.trainer.global_step == 2
    assert cli.model.hparams.loss["class_path"] == settings["model"]["loss"]["class_path"] and cli.model.hparams.learning_rate == 1e-6
    assert cli.datamodule.task.cot == cot and cli.datamodule.test_task.cot == cot
    metrics = cli.trainer.callback_metrics
    assert {"val/balanced_accuracy", "val/accuracy", "val/unparsed", "val/count"} <= set(metrics)
    checkpoint = cli.trainer.checkpoint_callback
    assert checkpoint.monitor == "val/balanced_accuracy" and Path(checkpoint.best_model_path).is_file()
    assert "bacc" in Path(checkpoint.best_model_path).name

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(cli.trainer.log_dir).Reload()
    assert "val/confusion_matrix" in events.Tags()["images"]

    cli.trainer.test(cli.model, datamodule=cli.datamodule)  # data.test_task: ESCI's test split stand-in
    assert cli.trainer.callback_metrics["test/count"].item() == 4
    assert "test/balanced_accuracy" in cli.trainer.callback_metrics
