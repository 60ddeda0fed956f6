"""General benchmarks: the offline lm-eval tasks, the sandbox, the general score, and the callback
in a real fit, compared with lm-eval's own CLI on the exported checkpoint."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
import yaml

from callbacks.general_benchmarks import GeneralBenchmarks, general_score, run_lm_eval
from cli import build_cli
from conftest import SHARED
from talr import lm_eval_tasks
from talr.code_sandbox import estimate_pass_at_k, run_program
from talr.lm_eval_tasks import humaneval, readers

REPO = Path(__file__).resolve().parents[1]
DATA = SHARED / "data"
LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"  # the standard task definitions
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# Three toy problems in HumanEval's format, written for these tests.
TOY_HUMANEVAL = [
    {"task_id": "Toy/0", "prompt": 'def add(a: int, b: int) -> int:\n    """Sum of a and b."""\n',
     "canonical_solution": "    return a + b\n", "entry_point": "add",
     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-4, 4) == 0\n"},
    {"task_id": "Toy/1", "prompt": 'def shout(text: str) -> str:\n    """text in capitals, with an exclamation mark."""\n',
     "canonical_solution": "    return text.upper() + '!'\n", "entry_point": "shout",
     "test": "def check(candidate):\n    assert candidate('hi') == 'HI!'\n"},
    {"task_id": "Toy/2", "prompt": 'def evens(n: int) -> list:\n    """The even numbers below n."""\n',
     "canonical_solution": "    return [i for i in range(n) if i % 2 == 0]\n", "entry_point": "evens",
     "test": "def check(candidate):\n    assert candidate(5) == [0, 2, 4]\n    assert candidate(0) == []\n"},
]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory) -> Path:
    """The shared benchmark files (linked, not copied) plus the toy HumanEval file."""
    root = tmp_path_factory.mktemp("bench")
    for name in ("arc", "piqa", "hellaswag", "mmlu", "gsm8k", "ifeval"):
        (root / name).symlink_to(DATA / name)
    (root / "humaneval").mkdir()
    (root / "humaneval" / "HumanEval.jsonl").write_text("".join(json.dumps(p) + "\n" for p in TOY_HUMANEVAL))
    return root


@pytest.fixture(scope="module")
def task_manager(bench_dir, tmp_path_factory):
    from lm_eval.tasks import TaskManager

    include = lm_eval_tasks.write_task_dir(bench_dir, tmp_path_factory.mktemp("tasks"))
    return TaskManager(include_path=str(include), include_defaults=False)


@pytest.fixture
def punkt_dir_present(tmp_path, monkeypatch):
    """A punkt_tab folder, so that importing lm-eval's ifeval module does not try to download it.

    Only the folder lm-eval's import checks for: loading IFEval's docs needs no sentence model.
    """
    import nltk

    (tmp_path / "tokenizers" / "punkt_tab" / "english").mkdir(parents=True)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path), *nltk.data.path])


def load_task(task_manager, name):
    return task_manager.load([name])["tasks"][name]


def gold_choice(task, doc) -> str:
    return task.doc_to_choice(doc)[task.doc_to_target(doc)]


# -- the offline tasks read the original files ---------------------------------------------------
@pytest.mark.parametrize("name, subset", [("talr_arc_easy", "ARC-Easy"), ("talr_arc_challenge", "ARC-Challenge")])
def test_arc_docs_and_gold_answers(task_manager, name, subset):
    raw = jsonl(DATA / "arc" / f"{subset}-test.jsonl")
    task = load_task(task_manager, name)
    docs = list(task.eval_docs)
    assert len(docs) == len(raw)
    numeric = next(i for i, r in enumerate(raw) if r["answerKey"].isdigit())  # the "1"-"4" labelled rows
    for i in (0, 1, numeric, len(raw) - 1):
        row = raw[i]
        assert task.doc_to_text(docs[i]) == f"Question: {row['question']}\nAnswer:"
        assert gold_choice(task, docs[i]) == row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])]
    assert len(list(task.validation_docs())) == len(jsonl(DATA / "arc" / f"{subset}-validation.jsonl"))


def test_piqa_docs_take_labels_from_the_label_file(task_manager):
    raw = jsonl(DATA / "piqa" / "valid.jsonl")
    labels = [int(x) for x in (DATA / "piqa" / "valid-labels.lst").read_text().split()]
    task = load_task(task_manager, "talr_piqa")
    docs = list(task.eval_docs)
    assert len(docs) == len(raw) == 1838
    for i in (0, 7, 1837):
        assert gold_choice(task, docs[i]) == (raw[i]["sol1"], raw[i]["sol2"])[labels[i]]
        assert task.doc_to_text(docs[i]) == f"Question: {raw[i]['goal']}\nAnswer:"


def test_hellaswag_docs_use_lm_evals_preprocessing(task_manager):
    from lm_eval.tasks.hellaswag.utils import preprocess

    raw = jsonl(DATA / "hellaswag" / "hellaswag_val_subset1000.jsonl")
    task = load_task(task_manager, "talr_hellaswag")
    docs = list(task.eval_docs)
    assert len(docs) == 1000
    for i in (0, 500, 999):
        row = raw[i]
        assert gold_choice(task, docs[i]) == preprocess(row["endings"][int(row["label"])])
        context = row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize()
        assert task.doc_to_text(docs[i]) == preprocess(context)


def test_mmlu_group_covers_every_subject_csv(task_manager):
    loaded = task_manager.load(["talr_mmlu"])
    subjects = sorted(p.name.removesuffix("_test.csv") for p in (DATA / "mmlu" / "test").glob("*_test.csv"))
    assert sorted(loaded["tasks"]) == [f"talr_mmlu_{s}" for s in subjects] and len(subjects) == 57
    total = 0
    for subject in subjects:
        with (DATA / "mmlu" / "test" / f"{subject}_test.csv").open(newline="") as f:
            total += sum(1 for row in csv.reader(f) if row)
    assert sum(len(list(t.eval_docs)) for t in loaded["tasks"].values()) == total == 14042
    task = loaded["tasks"]["talr_mmlu_anatomy"]
    with (DATA / "mmlu" / "test" / "anatomy_test.csv").open(newline="") as f:
        raw = list(csv.reader(f))
    docs = list(task.eval_docs)
    for i in (0, 1, len(raw) - 1):
        question, a, b, c, d, answer = raw[i]
        assert gold_choice(task, docs[i]) == answer
        assert task.doc_to_text(docs[i]) == f"{question.strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"
    assert "about anatomy" in task.config.description and task.config.fewshot_split == "dev"


def test_gsm8k_docs_and_five_shot_source(task_manager):
    raw = jsonl(DATA / "gsm8k" / "test.jsonl")
    task = load_task(task_manager, "talr_gsm8k")
    docs = list(task.eval_docs)
    assert len(docs) == 1319 and task.config.num_fewshot == 5
    for i in (0, 1318):
        assert task.doc_to_target(docs[i]) == raw[i]["answer"]
        assert task.doc_to_text(docs[i]) == f"Question: {raw[i]['question']}\nAnswer:"
    assert len(list(task.fewshot_docs())) == len(jsonl(DATA / "gsm8k" / "train.jsonl"))


def test_ifeval_docs_keep_instructions_and_kwargs(task_manager, punkt_dir_present):
    raw = jsonl(DATA / "ifeval" / "input_data.jsonl")
    task = load_task(task_manager, "talr_ifeval")
    docs = list(task.eval_docs)
    assert len(docs) == 541
    for i in (0, 100, 540):
        assert docs[i]["prompt"] == raw[i]["prompt"] and docs[i]["instruction_id_list"] == raw[i]["instruction_id_list"]
        # arrow unions the kwargs' keys across rows (None where absent), as in the hub copy
        assert [{k: v for k, v in kw.items() if v is not None} for kw in docs[i]["kwargs"]] == raw[i]["kwargs"]


def test_humaneval_docs(task_manager):
    task = load_task(task_manager, "talr_humaneval")
    docs = list(task.eval_docs)
    assert len(docs) == 3
    for doc, problem in zip(docs, TOY_HUMANEVAL):
        assert task.doc_to_text(doc) == problem["prompt"]
        assert task.doc_to_target(doc) == f"{problem['test']}\ncheck({problem['entry_point']})"


class _KeepFunctionNames(yaml.SafeLoader):
    pass


_KeepFunctionNames.add_constructor("!function", lambda loader, node: "fn:" + loader.construct_scalar(node).split(".")[-1])


@pytest.mark.parametrize("ours, standard", [
    ("talr_arc_easy.yaml", "arc/arc_easy.yaml"), ("talr_piqa.yaml", "piqa/piqa.yaml"),
    ("talr_hellaswag.yaml", "hellaswag/hellaswag.yaml"), ("talr_gsm8k.yaml", "gsm8k/gsm8k.yaml"),
    ("talr_ifeval.yaml", "ifeval/ifeval.yaml"), ("talr_humaneval.yaml", "humaneval/humaneval.yaml"),
    ("_talr_mmlu_template_yaml", "mmlu/default/_default_template_yaml"),
])
def test_task_definitions_mirror_lm_evals_standard_tasks(ours, standard):
    """Same prompts, choices, few-shot setup, generation settings, filters and metrics as lm-eval's."""
    mine = yaml.load((lm_eval_tasks.PACKAGE_DIR / ours).read_text(), Loader=_KeepFunctionNames)
    theirs = yaml.load((LM_EVAL_TASKS / standard).read_text(), Loader=_KeepFunctionNames)
    fields = ["output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "process_docs", "process_results",
              "generation_kwargs", "num_fewshot", "fewshot_config", "repeats", "unsafe_code", "metadata"]
    if ours != "talr_humaneval.yaml":  # its scorer is talr's offline sandbox, not HF evaluate's code_eval
        fields += ["metric_list", "filter_list"]
    else:
        assert [m["k"] for m in mine["metric_list"]] == [m["k"] for m in theirs["metric_list"]]
        assert [f["name"] for f in mine["filter_list"]] == [f["name"] for f in theirs["filter_list"]]
    for field in fields:
        assert mine.get(field) == theirs.get(field), field


# -- missing resources fail clearly ----------------------------------------------------------------
def test_unknown_task_names_are_refused_with_the_available_ones(bench_dir):
    with pytest.raises(ValueError, match="unknown task.*talr_arc_easyy.*talr_arc_easy, talr_arc_challenge"):
        GeneralBenchmarks(tasks=["talr_arc_easyy"], data_dir=str(bench_dir))
    # (a misspelt hub name, e.g. arc_eazy, is refused the same way with close matches, after lm-eval
    # indexes its built-in tasks: about 10 s, left out here to keep this file fast)


def test_missing_data_files_are_named(tmp_path, monkeypatch):
    (tmp_path / "arc").mkdir()
    (tmp_path / "arc" / "ARC-Easy-test.jsonl").symlink_to(DATA / "arc" / "ARC-Easy-test.jsonl")
    with pytest.raises(FileNotFoundError, match=r"missing under data_dir=.*talr_arc_easy: .*ARC-Easy-validation\.jsonl"):
        GeneralBenchmarks(tasks=["talr_arc_easy"], data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/arc/ARC-Easy-validation\.jsonl not found; data_dir="):
        readers.load_arc_easy(str(tmp_path))  # what lm-eval's CLI meets with an incomplete folder
    monkeypatch.delenv("TALR_BENCH_DIR", raising=False)
    with pytest.raises(ValueError, match="set data_dir"):
        GeneralBenchmarks(tasks=["talr_gsm8k"])


def test_ifeval_without_its_resources_says_what_to_install(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # as NLTK_DATA=<empty dir> with nothing installed
    with pytest.raises(LookupError, match=r"punkt_tab.*python -m nltk\.downloader punkt_tab"):
        GeneralBenchmarks(tasks=["talr_ifeval"], data_dir=str(DATA))
    monkeypatch.setitem(sys.modules, "langdetect", None)  # an import of it now fails
    with pytest.raises(ModuleNotFoundError, match=r"langdetect.*pip install 'lm-eval\[ifeval\]'"):
        GeneralBenchmarks(tasks=["talr_ifeval"], data_dir=str(DATA))


def test_code_tasks_need_allow_code_execution(bench_dir):
    with pytest.raises(ValueError, match="run model-written code; set allow_code_execution: true"):
        GeneralBenchmarks(tasks=["talr_humaneval"], data_dir=str(bench_dir))


# -- the sandbox and pass@k ------------------------------------------------------------------------
def test_sandbox_runs_programs_apart_and_without_network():
    assert run_program("assert sum([1, 2]) == 3").status == "passed"
    failed = run_program("assert sum([1, 2]) == 4")
    assert failed.status == "failed" and "AssertionError" in failed.detail
    assert run_program("while True:\n    pass\n", timeout_s=1.0).status == "timeout"
    for attempt in ("import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)",
                    "import socket\nsocket.create_connection(('127.0.0.1', 9))",
                    "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)"):
        result = run_program(attempt, timeout_s=5.0)
        assert result.status == "failed" and ("network" in result.detail or "unreachable" in result.detail), result


def test_pass_at_k_estimator_matches_its_definition():
    from itertools import combinations

    n, c = 5, 2  # pass@k = share of k-subsets of the n samples that hold at least one correct one
    outcomes = [True] * c + [False] * (n - c)
    for k in (1, 2, 3):
        subsets = list(combinations(outcomes, k))
        assert estimate_pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_humaneval_end_to_end_pass_at_1(bench_dir, tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)  # lm-eval records `git describe` of the working directory; keep it out of the repo

    # the scorer itself: canonical solutions pass, a wrong one does not
    for problem in TOY_HUMANEVAL:
        test = f"{problem['test']}\ncheck({problem['entry_point']})"
        assert humaneval.pass_at_k([test], [[problem["prompt"] + problem["canonical_solution"]]], k=[1]) == {"pass@1": 1.0}
        assert humaneval.pass_at_k([test], [[problem["prompt"] + "    return None\n"]], k=[1]) == {"pass@1": 0.0}

    callback = GeneralBenchmarks(tasks=["talr_humaneval"], data_dir=str(bench_dir), allow_code_execution=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    evaluation = run_lm_eval(model, tokenizer, ["talr_humaneval"], callback.task_manager, batch_size=3,
                             gen_kwargs={"max_gen_toks": 24}, allow_code_execution=True, log_samples=True)
    samples = evaluation["samples"]["talr_humaneval"]
    assert len(samples) == 3
    executed = []
    for sample in samples:  # recompute from what the model wrote
        program = sample["doc"]["prompt"] + sample["resps"][0][0]
        executed.append(run_program(program + "\n" + sample["target"]).passed)
    reported = evaluation["results"]["talr_humaneval"]["pass@1,create_test"]
    assert reported == pytest.approx(sum(executed) / len(executed))


# -- the general score -----------------------------------------------------------------------------
def test_general_score_leaves_out_tasks_the_initial_model_fails():
    initial = {"ifeval": 0.62, "gsm8k": 0.41, "humaneval": 0.50, "piqa": float("nan")}
    current = {"ifeval": 0.58, "gsm8k": 0.45, "humaneval": 0.44, "piqa": 0.7}
    score = general_score(initial, current, threshold=0.5)
    assert score["excluded"] == ["gsm8k", "piqa"] and score["included"] == ["ifeval", "humaneval"]
    assert score["score"] == pytest.approx((0.58 + 0.44) / 2)
    assert general_score(initial, current, threshold=0.9)["score"] is None
    with pytest.raises(KeyError, match="no initial score"):
        general_score({"ifeval": 0.6}, current, threshold=0.5)


# -- a real fit, and lm-eval's CLI on the exported checkpoint --------------------------------------
LIMIT, MAX_GEN_TOKS, BATCH = 8, 8, 4  # 0-shot GSM8K below: short prompts keep the CPU test fast


def fit_args(tiny_model_dir, out, bench_dir, *extra):
    return [
        "fit", "--config", str(REPO / "configs" / "quickstart.yaml"),
        "--model.model", str(tiny_model_dir), "--model.max_new_tokens", "8",
        "--data.task.init_args.num_synthetic", "20", "--data.val_size", "4",
        "--data.batch_size", "4", "--data.micro_batch_size", "2", "--trainer.val_check_interval", "2",
        "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
        "--trainer.callbacks+=callbacks.general_benchmarks.GeneralBenchmarks",
        "--trainer.callbacks.init_args.tasks=[talr_arc_easy, talr_gsm8k]",
        f"--trainer.callbacks.init_args.data_dir={bench_dir}",
        f"--trainer.callbacks.init_args.limit={LIMIT}", f"--trainer.callbacks.init_args.batch_size={BATCH}",
        f"--trainer.callbacks.init_args.gen_kwargs={{max_gen_toks: {MAX_GEN_TOKS}}}",
        "--trainer.callbacks.init_args.num_fewshot={talr_gsm8k: 0}",
        "--trainer.callbacks.init_args.every_n_validations=2", "--trainer.callbacks.init_args.threshold=0.0",
        *extra,
    ]


@pytest.fixture(scope="module")
def fitted(tiny_model_dir, bench_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(out)  # lm-eval records `git describe` of the working directory; keep it out of the repo
        cli = build_cli(fit_args(tiny_model_dir, out, bench_dir))
    return cli, out


def test_fit_logs_general_benchmarks_and_the_score(fitted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli, _ = fitted
    log_dir = Path(cli.trainer.log_dir)
    general = log_dir / "general"
    assert sorted(p.name for p in general.glob("*.json")) == ["fit_end.json", "fit_start.json", "validation2_step4.json"]
    records = {p.stem: json.loads(p.read_text()) for p in general.glob("*.json")}
    assert [r["step"] for r in (records["fit_start"], records["validation2_step4"], records["fit_end"])] == [0, 4, 4]
    assert records["fit_end"]["weights"] == f"best checkpoint {cli.trainer.checkpoint_callback.best_model_path}"
    for record in records.values():
        primary = record["primary"]
        assert primary == {"talr_arc_easy": record["results"]["talr_arc_easy"]["acc,none"],
                           "talr_gsm8k": record["results"]["talr_gsm8k"]["exact_match,flexible-extract"]}
        assert record["general"]["score"] == pytest.approx(sum(primary.values()) / 2)  # threshold 0: none left out
        assert record["general"]["excluded"] == [] and record["n_samples"]["talr_arc_easy"]["effective"] == LIMIT
        assert record["n_shot"] == {"talr_arc_easy": 0, "talr_gsm8k": 0}  # the num_fewshot override

    events = EventAccumulator(str(log_dir)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"general/talr_arc_easy/acc", "general/talr_arc_easy/acc_norm", "general/talr_gsm8k/exact_match/flexible-extract",
            "general/talr_gsm8k/exact_match/strict-match", "general/score"} <= tags
    scores = events.Scalars("general/score")
    assert [s.step for s in scores] == [0, 4, 4]
    assert [s.value for s in scores] == pytest.approx([records[e]["general"]["score"] for e in ("fit_start", "validation2_step4", "fit_end")])
    assert cli.model.lm.training  # training mode came back after each evaluation


def discordant_counts(before: dict, after: dict) -> tuple[int, int]:
    """b: documents right before and wrong after; c: wrong before and right after (counted here)."""
    shared = [doc for doc in after if doc in before]
    return (sum(before[d] == 1 and after[d] == 0 for d in shared), sum(before[d] == 0 and after[d] == 1 for d in shared))


def test_events_keep_per_document_scores_and_compare_them_with_the_initial_model(fitted):
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli, _ = fitted
    log_dir = Path(cli.trainer.log_dir)
    records = {p.stem: json.loads(p.read_text()) for p in (log_dir / "general").glob("*.json")}
    for record in records.values():
        for task, key in record["primary_metrics"].items():
            documents = record["per_document"][task]
            assert documents["metric"] == key and documents["doc_ids"] == list(range(LIMIT))
            assert set(documents["values"]) <= {0, 1}
            # the vector reproduces lm-eval's own aggregate
            assert sum(documents["values"]) / LIMIT == pytest.approx(record["results"][task][key], abs=1e-12)
    start = records["fit_start"]
    for task, comparison in start["paired"].items():  # the baseline against itself
        assert (comparison["n"], comparison["b"], comparison["c"], comparison["delta"], comparison["p"]) == (LIMIT, 0, 0, 0.0, 1.0)
    later_events = ("validation2_step4", "fit_end")
    for name in later_events:
        record = records[name]
        for task, comparison in record["paired"].items():
            before = dict(zip(start["per_document"][task]["doc_ids"], start["per_document"][task]["values"]))
            after = dict(zip(record["per_document"][task]["doc_ids"], record["per_document"][task]["values"]))
            b, c = discordant_counts(before, after)
            assert (comparison["n"], comparison["b"], comparison["c"]) == (LIMIT, b, c)
            assert comparison["delta"] == pytest.approx((c - b) / LIMIT)
            assert comparison["delta"] == pytest.approx(record["primary"][task] - start["primary"][task])
            tail = sum(math.comb(b + c, k) for k in range(min(b, c) + 1)) / 2 ** (b + c)
            assert comparison["p"] == pytest.approx(min(1.0, 2 * tail))
            assert comparison["low"] <= comparison["delta"] <= comparison["high"]
        # the general score's change: the mean of the tasks' changes (threshold 0: both tasks count)
        tasks = record["general"]["included"]
        assert sorted(tasks) == ["talr_arc_easy", "talr_gsm8k"]
        assert record["general_paired"]["delta"] == pytest.approx(
            sum(record["paired"][t]["delta"] for t in tasks) / len(tasks))
        assert record["general_paired"]["delta"] == pytest.approx(record["general"]["score"] - start["general"]["score"])

    events = EventAccumulator(str(log_dir)).Reload()
    for tag in ("delta", "delta_low", "delta_high"):
        logged = {e.step: e.value for e in events.Scalars(f"general/talr_arc_easy/{tag}")}
        field = {"delta": "delta", "delta_low": "low", "delta_high": "high"}[tag]
        assert logged[0] == pytest.approx(start["paired"]["talr_arc_easy"][field])
        assert logged[4] == pytest.approx(records["fit_end"]["paired"]["talr_arc_easy"][field])  # the last at step 4
    assert "general/score_delta" in events.Tags()["scalars"]

    # the summary's columns, and the baseline in the checkpoint's callback state (a resumed run keeps it)
    summary = json.loads((log_dir / "summary.json").read_text())
    fit_end = records["fit_end"]["general_paired"]
    assert (summary["general_delta"], summary["general_delta_low"], summary["general_delta_high"], summary["general_p"]) == \
        pytest.approx((fit_end["delta"], fit_end["low"], fit_end["high"], fit_end["p"]))
    assert summary["general_file_best"] == "general/fit_end.json" and summary["general_file_initial"] == "general/fit_start.json"
    checkpoint = torch.load(cli.trainer.checkpoint_callback.best_model_path, map_location="cpu", weights_only=True)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("GeneralBenchmarks")]
    assert state["events"][0]["event"] == "fit_start"
    assert state["events"][0]["per_document"] == start["per_document"]


def test_a_group_is_scored_per_document_over_its_subtasks(bench_dir, tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    """MMLU, one document a subject: documents named by subject, their mean is lm-eval's group accuracy."""
    from transformers import AutoModelForCausalLM

    from callbacks.general_benchmarks import per_document_scores

    monkeypatch.chdir(tmp_path)
    callback = GeneralBenchmarks(tasks=["talr_mmlu"], data_dir=str(bench_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    evaluation = run_lm_eval(model, tokenizer, ["talr_mmlu"], callback.task_manager, limit=1, batch_size=8, log_samples=True)
    documents = per_document_scores(evaluation, "talr_mmlu", "acc,none")
    subjects = [t for t in evaluation["results"] if t.startswith("talr_mmlu_") and "sample_len" in evaluation["results"][t]]
    assert len(subjects) == 57 and sorted(documents["doc_ids"]) == sorted(f"{s}/0" for s in subjects)
    by_subject = {doc.split("/")[0]: value for doc, value in zip(documents["doc_ids"], documents["values"])}
    assert by_subject == {s: evaluation["results"][s]["acc,none"] for s in subjects}
    assert sum(documents["values"]) / 57 == pytest.approx(evaluation["results"]["talr_mmlu"]["acc,none"], abs=1e-12)


def test_instruction_level_scores_and_a_metric_that_is_not_a_mean():
    """IFEval's instruction-level accuracy: a list of 0/1 per prompt, averaged over all instructions
    (lm-eval's own aggregation function recomputes it); a metric that is not the mean of its
    per-document values is kept out of the paired comparison, with the reason."""
    from lm_eval.tasks.ifeval.utils import agg_inst_level_acc

    from callbacks.general_benchmarks import per_document_scores

    follows = [[True, False], [True, True, True], [False]]
    samples = [{"doc_id": i, "filter": "none", "inst_level_strict_acc": f} for i, f in enumerate(follows)]
    evaluation = {"results": {"talr_ifeval": {"inst_level_strict_acc,none": agg_inst_level_acc(follows)}},
                  "samples": {"talr_ifeval": samples}, "sample_tasks": {"talr_ifeval": ["talr_ifeval"]}}
    documents = per_document_scores(evaluation, "talr_ifeval", "inst_level_strict_acc,none")
    assert documents["values"] == [[1, 0], [1, 1, 1], [0]] and documents["doc_ids"] == [0, 1, 2]
    evaluation["results"]["talr_ifeval"]["inst_level_strict_acc,none"] = 0.5  # e.g. a mean of prompt means
    unavailable = per_document_scores(evaluation, "talr_ifeval", "inst_level_strict_acc,none")
    assert "doc_ids" not in unavailable and "lm-eval reports 0.5" in unavailable["unavailable"]


def test_lm_eval_cli_on_the_exported_checkpoint_gives_the_same_numbers(fitted, bench_dir, tmp_path):
    cli, _ = fitted
    log_dir = Path(cli.trainer.log_dir)
    include = lm_eval_tasks.write_task_dir(bench_dir, tmp_path / "tasks")  # as `python -m talr.lm_eval_tasks` does
    command = [
        sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={log_dir / 'export'}",
        "--tasks", "talr_arc_easy,talr_gsm8k", "--include_path", str(include), "--device", "cpu",
        "--batch_size", str(BATCH), "--limit", str(LIMIT), "--num_fewshot", "0", "--gen_kwargs", f"max_gen_toks={MAX_GEN_TOKS}",
        "--output_path", str(tmp_path / "out"),
    ]
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(REPO)}
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    theirs = json.loads(results_file.read_text())["results"]
    ours = json.loads((log_dir / "general" / "fit_end.json").read_text())["results"]
    for task, keys in {"talr_arc_easy": ["acc,none", "acc_norm,none"],
                       "talr_gsm8k": ["exact_match,strict-match", "exact_match,flexible-extract"]}.items():
        for key in keys:
            assert ours[task][key] == pytest.approx(theirs[task][key], abs=1e-9), (task, key)


def test_a_new_run_refuses_to_overwrite_earlier_results(fitted, tiny_model_dir, bench_dir, tmp_path):
    cli, _ = fitted
    general = Path(cli.trainer.log_dir) / "general"
    before = (general / "fit_start.json").read_bytes()
    with pytest.raises(FileExistsError, match=r"general/fit_end\.json, .*fit_start\.json, .*results of an earlier run; set GeneralBenchmarks\.overwrite: true"):
        build_cli(fit_args(tiny_model_dir, tmp_path, bench_dir, f"--trainer.callbacks.init_args.dirpath={general}",
                           "--validate_before_fit=false"))
    assert (general / "fit_start.json").read_bytes() == before
    assert not list(tmp_path.rglob("*.ckpt"))


def test_unknown_task_stops_the_cli_before_training(tiny_model_dir, bench_dir, tmp_path):
    with pytest.raises(Exception, match="unknown task"):
        build_cli(fit_args(tiny_model_dir, tmp_path, bench_dir, "--trainer.callbacks.init_args.tasks=[talr_gsm8kk]"))
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("events.out.tfevents.*"))


def test_limit_is_a_count_or_a_share(bench_dir):
    made = lambda limit: GeneralBenchmarks(tasks=["talr_piqa"], data_dir=str(bench_dir), limit=limit).limit  # noqa: E731
    assert made(8.0) == 8 and isinstance(made(8.0), int)  # a whole float above 1 is a count
    assert made(0.5) == 0.5 and made(12) == 12  # a share, a count
    for bad in (0, 1.5, -2):
        with pytest.raises(ValueError, match="GeneralBenchmarks.limit must be an int >= 1 or a float in"):
            made(bad)
