"""Training speed in TensorBoard (`train/tokens_per_s`, `train/target_tokens_per_s`, `train/mfu`) against
the test's own token counts, step times and FLOP count; plain progress lines selected in a config."""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
from pathlib import Path

import lightning as L
import pytest

from callbacks.throughput import Throughput
from cli import build_cli
from conftest import tiny_fit_config

STEPS = 3


class StepTimer(L.Callback):
    """The test's own clock and token count of every optimizer step (placed after Throughput, which
    `talr fit` puts first: this interval starts a little later and ends a little later)."""

    steps: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        seconds = time.perf_counter() - self.started
        micro = batch["micro_batches"]
        type(self).steps.append({
            "seconds": seconds,
            "tokens": sum(int(m["attention_mask"].sum()) for m in micro),  # every non-padding token
            "target": sum(int((m["labels"] != -100).sum()) for m in micro),  # the supervised tokens
        })


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory, one_cpu_thread):
    out = tmp_path_factory.mktemp("throughput")
    StepTimer.steps = []
    config = tiny_fit_config(
        tiny_model_dir, out, "speed", [
            {"class_path": "test_throughput.StepTimer"},
            {"class_path": "callbacks.plain_progress.PlainProgress", "init_args": {"every_n_steps": 1}},
        ], validate_before_fit=False, trainer={"max_steps": STEPS, "enable_progress_bar": True},
        model={"loss": "TALR", "learning_rate": 1e-3})
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        cli = build_cli(["fit", "--config", str(config)])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(cli.trainer.log_dir).Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    return cli, scalars, stdout.getvalue(), json.loads((Path(tiny_model_dir) / "config.json").read_text())


def test_tokens_per_second_are_the_steps_tokens_over_the_steps_time(run):
    cli, scalars, _, _ = run
    steps = StepTimer.steps
    assert len(steps) == STEPS
    assert sorted(scalars["train/tokens_per_s"]) == sorted(scalars["train/loss"]) == list(range(STEPS))
    for step, mine in enumerate(steps):
        assert mine["target"] == scalars["train/target_tokens"][step]  # the module's own count agrees
        tokens_per_s = scalars["train/tokens_per_s"][step]
        target_per_s = scalars["train/target_tokens_per_s"][step]
        # one clock for both: their ratio is the ratio of the counts, whatever the step's time
        assert target_per_s / tokens_per_s == pytest.approx(mine["target"] / mine["tokens"], rel=1e-5)
        # the time behind the rate is the step's, as the test's own clock measured it
        # (the two intervals differ by the hooks between them, and by whatever preempts a busy machine)
        assert mine["tokens"] / tokens_per_s == pytest.approx(mine["seconds"], rel=0.1, abs=0.05)


def test_mfu_is_six_flops_per_parameter_and_token_over_the_peak(run):
    cli, scalars, _, config = run
    d, inter, layers, vocab = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], config["vocab_size"]
    kv = d // config["num_attention_heads"] * config["num_key_value_heads"]
    # per layer: q, o (d x d), k, v (d x kv), gate/up/down (3 d x inter), two RMSNorms; then the final norm
    body = layers * (2 * d * d + 2 * d * kv + 3 * d * inter + 2 * d) + d
    head = vocab * d  # tied to the embeddings: counted once, as the head; the lookup itself is free
    peak = next(c for c in cli.trainer.callbacks if isinstance(c, Throughput)).peak_flops
    assert 1e8 < peak < 1e14  # a CPU's float32 matmul rate, measured at train start
    for step, mine in enumerate(StepTimer.steps):
        mfu = scalars["train/mfu"][step]
        assert 0 < mfu <= 1
        flops = 6 * (body * mine["tokens"] + head * mine["target"])
        seconds = mine["tokens"] / scalars["train/tokens_per_s"][step]  # the callback's step time
        assert mfu == pytest.approx(flops / seconds / peak, rel=1e-5)


def test_under_lora_a_frozen_weight_counts_four_flops_per_token(tiny_model_dir, tmp_path, one_cpu_thread):
    """LoRA trains only its adapters: the frozen base costs forward (2) and input-gradient (2) FLOPs per
    parameter and token, each adapter 6. The parameters are counted here from the peft model's own
    trainable flags, by name, apart from the callback's walk over the modules."""
    config = tiny_fit_config(tiny_model_dir, tmp_path, "lora", [], validate_before_fit=False, trainer={"max_steps": 1},
                             model={"loss": "CrossEntropy", "learning_rate": 1e-3,
                                    "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "up_proj"]}})
    cli = build_cli(["fit", "--config", str(config)])
    lm = cli.model.lm
    throughput = next(c for c in cli.trainer.callbacks if isinstance(c, Throughput))
    named = dict(lm.named_parameters())  # a tied head is listed once, under the embeddings' name
    embedding = next(n for n in named if n.endswith("embed_tokens.weight"))
    body = {n: p for n, p in named.items() if n != embedding}
    trained = sum(p.numel() for p in body.values() if p.requires_grad)
    assert trained == sum(p.numel() for n, p in body.items() if ".lora_" in n) > 0
    assert throughput.flops_per_token == 4 * sum(p.numel() for p in body.values()) + 2 * trained
    assert throughput.flops_per_target_token == 4 * named[embedding].numel()  # the tied head: frozen


def test_plain_progress_chosen_in_a_config_prints_every_step_with_its_speed(run):
    _, scalars, stdout, _ = run
    lines = [line for line in stdout.splitlines() if line.startswith("[train] step")]
    assert [int(re.match(r"\[train\] step (\d+)/3", line)[1]) for line in lines] == [1, 2, 3]
    for step, line in enumerate(lines):  # each line covers exactly its step
        shown = float(re.search(r"\| ([\d,]+) tokens/s", line)[1].replace(",", ""))
        assert shown == pytest.approx(scalars["train/tokens_per_s"][step], abs=0.5)
        # printed to 3 significant digits; TensorBoard keeps float32
        assert re.search(r"\| mfu ([\d.e-]+)", line)[1] == f"{scalars['train/mfu'][step]:.3g}"
