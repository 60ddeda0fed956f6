"""callbacks.forgetting_monitor.ForgettingMonitor and the built-in prompt set, on `talr fit` with a
tiny random Llama (real SmolLM2 tokenizer): a large learning rate drifts further than a tiny one,
the logged numbers equal a plain Hugging Face recomputation, resume, the no-overwrite rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from callbacks.forgetting_monitor import ForgettingMonitor
from cli import build_cli
from conftest import tiny_fit_config
from talr.general_prompts import CATEGORIES, GENERAL_PROMPTS, load_prompts
from talr.models import TokenNLLModel, load_tokenizer
from talr.token_loss import CALIBRATION_TEMPERATURES

MAX_NEW_TOKENS = 16
CALLBACK = "callbacks.forgetting_monitor.ForgettingMonitor"


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def fit(tiny_model_dir, out: Path, learning_rate: float, *extra: str, monitor: dict | None = None,
        version: str = "run", checkpoints: bool = False):
    """`talr fit` from a standalone config: 12 training rows, 4 per step (3 optimizer steps),
    validation (target NLL only, no generation) after every step."""
    # Sampled answers: a random model's greedy answer is one token repeated, which any training makes likelier.
    options = {"max_new_tokens": MAX_NEW_TOKENS, "samples_per_prompt": 2, **(monitor or {})}
    callbacks = [{"class_path": CALLBACK, "init_args": options}]
    if checkpoints:
        # saved at the end of each validation, after the monitor added that validation's point
        # (explicitly: Lightning reads val_check_interval 1 as 1.0, "once an epoch", and would wait)
        callbacks.insert(0, {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                             "init_args": {"dirpath": str(out / "checkpoints"), "monitor": "val/loss",
                                           "save_top_k": -1, "save_on_train_epoch_end": False}})
    config = tiny_fit_config(
        tiny_model_dir, out, version, callbacks,
        validate_before_fit=True,  # runs before the answers exist: the monitor must skip it
        trainer={"val_check_interval": 1, "limit_val_batches": 1},
        model={"loss": "CrossEntropy", "learning_rate": learning_rate},
    )
    return build_cli(["fit", "--config", str(config), *extra])


def monitor_of(cli) -> ForgettingMonitor:
    return next(c for c in cli.trainer.callbacks if isinstance(c, ForgettingMonitor))


@pytest.fixture(scope="module")
def large_lr(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("forgetting-large")
    return fit(tiny_model_dir, out, 1e-2, checkpoints=True), out


@pytest.fixture(scope="module")
def small_lr(tiny_model_dir, tmp_path_factory):
    return fit(tiny_model_dir, tmp_path_factory.mktemp("forgetting-small"), 1e-7)


# -- the prompt set ------------------------------------------------------------------------------
def test_the_built_in_prompts_are_many_varied_and_distinct():
    assert len(GENERAL_PROMPTS) >= 50
    counts = {c: sum(p.category == c for p in GENERAL_PROMPTS) for c in CATEGORIES}
    assert set(CATEGORIES) == {"math", "code", "instructions", "facts", "writing"}
    assert all(n >= 8 for n in counts.values()), counts
    assert {p.category for p in GENERAL_PROMPTS} == set(CATEGORIES)
    texts = [p.text for p in GENERAL_PROMPTS]
    assert len(set(texts)) == len(texts) and all(t.strip() == t and len(t) < 200 for t in texts)


def test_a_user_prompt_file(tmp_path):
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text('{"category": "math", "prompt": "2 + 2?"}\n\n{"prompt": "Name a color."}\n')
    assert [(p.category, p.text) for p in load_prompts(jsonl)] == [("math", "2 + 2?"), ("custom", "Name a color.")]
    text = tmp_path / "mine.txt"
    text.write_text("First prompt\nSecond prompt\n")
    assert [p.text for p in ForgettingMonitor(prompts_file=str(text)).prompts] == ["First prompt", "Second prompt"]
    jsonl.write_text('{"category": "math"}\n')
    with pytest.raises(ValueError, match=r"mine.jsonl:1: each line needs a non-empty 'prompt'"):
        load_prompts(jsonl)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ForgettingMonitor(prompts_file=str(tmp_path / "missing.txt"))


def test_bad_options_fail_at_construction():
    with pytest.raises(ValueError, match="samples_per_prompt must be at least 1"):
        ForgettingMonitor(samples_per_prompt=0)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        ForgettingMonitor(max_new_tokens=0)


# -- the monitored numbers -------------------------------------------------------------------------
def test_a_larger_learning_rate_forgets_more(large_lr, small_lr):
    large, small = monitor_of(large_lr[0]).curve, monitor_of(small_lr).curve
    assert [e["step"] for e in large] == [e["step"] for e in small] == [0, 1, 2, 3]
    assert large[0]["nll_increase"] == 0.0 and large[0]["kl"] == 0.0  # step 0 is the initial model itself
    assert abs(small[-1]["nll_increase"]) < 1e-4 and small[-1]["kl"] < 1e-6
    assert large[-1]["nll_increase"] > 0.01 and large[-1]["kl"] > 0.01  # measured: 0.024 and 0.025
    assert set(large[-1]["categories"]) == set(CATEGORIES)


def plain_nll(lm, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """Per-token NLL of a response after its prompt: a plain forward with full logits + cross-entropy."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = lm(input_ids=ids).logits[0].double()
    return F.cross_entropy(logits[len(prompt_ids) - 1:-1], torch.tensor(response_ids), reduction="none")


def test_the_numbers_equal_an_independent_computation(large_lr, tiny_model_dir):
    cli, _ = large_lr
    monitor = monitor_of(cli)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    final = cli.model.lm.eval()  # the weights the last validation (step 3) scored
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert len(monitor.responses) == 2 * len(GENERAL_PROMPTS)
    first = monitor.responses[0]  # the prompt as the chat template renders it
    text = tokenizer.apply_chat_template([{"role": "user", "content": GENERAL_PROMPTS[0].text}], tokenize=False,
                                         add_generation_prompt=True)
    assert first["prompt_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]

    increases, k3, by_category, by_prompt = [], [], {}, {}
    for response in monitor.responses:
        before = plain_nll(initial, response["prompt_ids"], response["response_ids"])
        after = plain_nll(final, response["prompt_ids"], response["response_ids"])
        torch.testing.assert_close(torch.tensor(response["initial_nll"], dtype=torch.float64), before, rtol=1e-4, atol=1e-4)
        log_ratio = before - after  # log p - log p0
        increases.append(after - before)
        k3.append(torch.exp(log_ratio) - 1 - log_ratio)
        by_category.setdefault(response["category"], []).append(after - before)
        prompt = by_prompt.setdefault(response["prompt_index"], [0, 0.0])  # tokens, k3 sum over both answers
        prompt[0] += len(response["response_ids"])
        prompt[1] += float(k3[-1].sum())
    last = monitor.curve[-1]
    assert last["step"] == 3 and last["tokens"] == sum(len(r["response_ids"]) for r in monitor.responses)
    assert last["nll_increase"] == pytest.approx(torch.cat(increases).mean().item(), abs=1e-4)
    assert last["kl"] == pytest.approx(torch.cat(k3).mean().item(), abs=1e-4)
    for category, values in by_category.items():
        assert last["categories"][category]["nll_increase"] == pytest.approx(torch.cat(values).mean().item(), abs=1e-4)
    # each prompt's sums, which talr report pairs runs by: the same k3 sums, and together the curve's numbers
    lines = (Path(cli.trainer.log_dir) / "forgetting" / "prompt_scores" / "step000003.jsonl").read_text().splitlines()
    sums = {(r := json.loads(line))["prompt_index"]: r for line in lines}
    assert sorted(sums) == sorted(by_prompt) == list(range(len(GENERAL_PROMPTS)))
    for index, (tokens, kl) in by_prompt.items():
        assert sums[index]["tokens"] == tokens and sums[index]["kl"] == pytest.approx(kl, abs=1e-4)
    total = sum(r["tokens"] for r in sums.values())
    assert sum(r["agreement"] for r in sums.values()) / total == pytest.approx(last["agreement"])
    assert sum(r["entropy"] for r in sums.values()) / total == pytest.approx(last["entropy"])
    grid = torch.tensor([r["kl_at_temperature"] for r in sums.values()], dtype=torch.float64).sum(0) / total
    assert float(grid.min()) == pytest.approx(last["kl_calibrated"]) and len(grid) == len(CALIBRATION_TEMPERATURES)


def test_files_and_tensorboard(large_lr):
    cli, _ = large_lr
    monitor = monitor_of(cli)
    log_dir = Path(cli.trainer.log_dir)
    lines = (log_dir / "forgetting" / "responses.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == monitor.responses
    assert {"prompt", "category", "response", "response_ids", "initial_nll"} <= set(monitor.responses[0])
    assert json.loads((log_dir / "forgetting" / "curve.json").read_text()) == monitor.curve
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"forgetting/nll_increase", "forgetting/kl", "forgetting/nll"} <= tags
    assert {f"forgetting/nll_increase/{c}" for c in CATEGORIES} <= tags
    logged = {e.step: e.value for e in events.Scalars("forgetting/nll_increase")}
    assert logged == pytest.approx({e["step"]: e["nll_increase"] for e in monitor.curve})


def test_sampling_is_seeded_and_leaves_the_training_rng_alone(tiny_model_dir, tmp_path):
    class Module(torch.nn.Module):  # what the monitor uses of SFTModule
        def __init__(self):
            super().__init__()
            self.net = TokenNLLModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
            self.tokenizer = load_tokenizer(str(tiny_model_dir))
            self.device = torch.device("cpu")

        @property
        def lm(self):
            return self.net.lm

    prompts = tmp_path / "two.txt"
    prompts.write_text("Say hi.\nCount to three.\n")
    module = Module()
    monitor = ForgettingMonitor(samples_per_prompt=3, max_new_tokens=6, seed=5, prompts_file=str(prompts))
    rng = torch.get_rng_state()
    first = monitor.sample_initial_responses(module)
    assert torch.equal(torch.get_rng_state(), rng)
    assert first == monitor.sample_initial_responses(module)
    assert [(r["prompt_index"], r["sample"]) for r in first] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert len({tuple(r["response_ids"]) for r in first}) > 2  # sampled, not greedy
    other_seed = ForgettingMonitor(samples_per_prompt=3, max_new_tokens=6, seed=6, prompts_file=str(prompts))
    assert other_seed.sample_initial_responses(module) != first

    greedy = ForgettingMonitor(max_new_tokens=6, prompts_file=str(prompts)).sample_initial_responses(module)
    tokenizer = module.tokenizer
    for response in greedy:  # one prompt at a time, no padding: plain Hugging Face greedy decoding
        expected = module.lm.generate(torch.tensor([response["prompt_ids"]]), max_new_tokens=6, do_sample=False,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        assert expected[0, len(response["prompt_ids"]):].tolist() == response["response_ids"]


# -- resume and the no-overwrite rule --------------------------------------------------------------
def test_resume_keeps_the_initial_answers_and_continues_the_curve(large_lr, tiny_model_dir):
    cli, out = large_lr
    original = monitor_of(cli)
    resumed = fit(tiny_model_dir, out, 1e-2, "--ckpt_path", str(out / "checkpoints" / "epoch=0-step=1.ckpt"),
                  version="resumed")
    monitor = monitor_of(resumed)
    # sampling again from the step-1 weights would give other answers and other initial NLLs
    assert monitor.restored and monitor.responses == original.responses
    assert [e["step"] for e in monitor.curve] == [0, 1, 2, 3]
    for mine, theirs in zip(monitor.curve, original.curve):
        assert mine["nll_increase"] == pytest.approx(theirs["nll_increase"], abs=1e-5)
    forgetting = Path(resumed.trainer.log_dir) / "forgetting"
    assert json.loads((forgetting / "curve.json").read_text()) == monitor.curve
    assert len((forgetting / "responses.jsonl").read_text().splitlines()) == len(original.responses)


def test_a_fresh_run_refuses_to_overwrite_an_earlier_runs_files(large_lr, tiny_model_dir):
    """Last in this file: it replaces the large-lr run's files (the other tests read them first)."""
    cli, out = large_lr
    forgetting = Path(cli.trainer.log_dir) / "forgetting"
    with pytest.raises(FileExistsError, match=r"responses\.jsonl, .*curve\.json already hold\(s\) results of an "
                                              r"earlier run; set ForgettingMonitor.overwrite: true"):
        fit(tiny_model_dir, out, 1e-2, "--trainer.max_steps", "1")
    again = fit(tiny_model_dir, out, 1e-2, "--trainer.max_steps", "1", monitor={"overwrite": True})
    assert Path(again.trainer.log_dir) / "forgetting" == forgetting
    assert [e["step"] for e in json.loads((forgetting / "curve.json").read_text())] == [0, 1]


def test_prompts_per_category_keeps_the_first_prompts_of_each_category():
    kept = ForgettingMonitor(prompts_per_category=2).prompts
    by_category = {c: [p for p in GENERAL_PROMPTS if p.category == c] for c in CATEGORIES}
    assert len(kept) == 2 * len(CATEGORIES)
    assert {c: [p for p in kept if p.category == c] for c in CATEGORIES} == {c: ps[:2] for c, ps in by_category.items()}
    assert [GENERAL_PROMPTS.index(p) for p in kept] == sorted(GENERAL_PROMPTS.index(p) for p in kept)  # built-in order
    assert len(ForgettingMonitor().prompts) == len(GENERAL_PROMPTS)
    with pytest.raises(ValueError, match="prompts_per_category"):
        ForgettingMonitor(prompts_per_category=0)
