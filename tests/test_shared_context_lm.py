"""talr.shared_context_lm: every loglikelihood request scored from one pass over its context equals
lm-eval's HFLM (context + continuation in one pass) to float rounding, with the same greedy flags; and
benchmarks scored both ways agree document by document."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lm_eval.models.huggingface import HFLM
from transformers import AutoModelForCausalLM

from callbacks.general_benchmarks import GeneralBenchmarks, per_document_scores, run_lm_eval
from talr.shared_context_lm import SharedContextHFLM

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def requests(tokenizer):
    """Two contexts with options of 1 to 6 tokens, and a context used once."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    pairs = [("The cat sat on the", " mat"), ("The cat sat on the", " hat and the coat"),
             ("The cat sat on the", " roof of the old red house"), ("Water boils at", " 100 degrees"),
             ("Water boils at", " sea level"), ("A single context", " with one option"),
             ("Once upon a time, in a land far away, there lived", " a king"),
             ("Once upon a time, in a land far away, there lived", " a queen and her dog"),
             ("Once upon a time, in a land far away, there lived", " nobody")]
    return [((context, option), encode(context), encode(option)) for context, option in pairs]


def test_each_request_equals_hflms(tiny_model_dir, tokenizer, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = requests(tokenizer)
    theirs = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)._loglikelihood_tokens(batch, disable_tqdm=True)
    shared: list = []
    score = SharedContextHFLM._score_continuations
    monkeypatch.setattr(SharedContextHFLM, "_score_continuations",
                        lambda self, contexts, options: (shared.extend(contexts), score(self, contexts, options))[1])
    ours = SharedContextHFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)._loglikelihood_tokens(batch, disable_tqdm=True)
    # run once for its options: only "Once upon a time..." (13 tokens, options of 2 to 5); the others have an
    # option longer than their context (" 100 degrees": a token per digit) or a single option
    assert [len(c) for c in shared] == [len(batch[6][1])] == [13]
    assert all(len(batch[i][2]) > len(batch[i][1]) for i in (2, 3))
    assert [greedy for _, greedy in ours] == [greedy for _, greedy in theirs]
    assert [logprob for logprob, _ in ours] == pytest.approx([logprob for logprob, _ in theirs], abs=1e-4)
    # the first option's log-probability, written out from one full forward of context + option
    (_, context, option) = batch[0]
    with torch.no_grad():
        logits = model(torch.tensor([context + option])).logits[0, len(context) - 1: -1].double()
    expected = float(torch.log_softmax(logits, -1).gather(1, torch.tensor(option).unsqueeze(1)).sum())
    assert ours[0][0] == pytest.approx(expected, abs=1e-4)


def test_requests_over_the_window_take_hflms_truncating_path(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = requests(tokenizer)
    theirs = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=6)._loglikelihood_tokens(batch, disable_tqdm=True)
    ours = SharedContextHFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=6)._loglikelihood_tokens(
        batch, disable_tqdm=True)
    assert [g for _, g in ours] == [g for _, g in theirs]
    assert [lp for lp, _ in ours] == pytest.approx([lp for lp, _ in theirs], abs=1e-4)


def test_benchmarks_agree_document_by_document(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # lm-eval records `git describe` of the working directory
    tasks = ["talr_arc_easy", "talr_piqa", "talr_hellaswag"]
    callback = GeneralBenchmarks(tasks=tasks, data_dir=str(DATA))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    runs = [run_lm_eval(model, tokenizer, tasks, callback.task_manager, limit=6, batch_size=8, log_samples=True,
                        log=lambda _: None, shared_context=shared) for shared in (False, True)]
    for task in tasks:
        full, shared = (per_document_scores(run, task, callback.primary_metrics[task]) for run in runs)
        assert shared == full and len(full["doc_ids"]) == 6
        for metric in ("acc,none", "acc_norm,none"):
            assert runs[1]["results"][task][metric] == runs[0]["results"][task][metric]
