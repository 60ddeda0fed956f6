"""talr.initial_cache on real runs with the tiny model: a second run loads the initial model's first
validation and the forgetting monitor's initial answers from disk (the functions that compute them
fail if called) and ends with the same numbers and files; other weights or settings are other entries."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import callbacks.forgetting_monitor as forgetting_monitor
import talr.evaluation
from callbacks.forgetting_monitor import ForgettingMonitor
from cli import build_cli
from conftest import tiny_fit_config
from talr.initial_cache import weights_fingerprint
from talr.models import TokenNLLModel, add_lora, load_model

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def fail(*args, **kwargs):
    raise AssertionError("computed again instead of loaded from the cache")


def entries(cache: Path, kind: str) -> list[Path]:
    return sorted((cache / "initial" / kind).glob("*.pt"))


def test_the_fingerprint_sees_one_changed_bit_of_the_weights(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), "float32")
    fingerprint = weights_fingerprint(lm)
    assert weights_fingerprint(load_model(str(tiny_model_dir), "float32")) == fingerprint  # loaded again: the same
    with torch.no_grad():
        weight = lm.model.layers[1].mlp.up_proj.weight.view(-1)
        weight[5] = torch.nextafter(weight[5], torch.tensor(float("inf")))  # the next float up
    assert weights_fingerprint(lm) != fingerprint


def test_fresh_lora_adapters_compute_and_fingerprint_as_the_base_model(tiny_model_dir):
    """peft's B matrices start at zero: the wrapped model's logits equal the plain model's bit for bit,
    so both get one fingerprint (one cache entry); a nonzero B, or DoRA, makes another."""
    plain = load_model(str(tiny_model_dir), "float32")
    ids = torch.randint(0, plain.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
    lora = add_lora(load_model(str(tiny_model_dir), "float32"), {"r": 4, "target_modules": ["q_proj", "v_proj", "up_proj"]})
    lora.eval()
    with torch.no_grad():
        assert torch.equal(lora(input_ids=ids).logits, expected)
    assert weights_fingerprint(lora) == weights_fingerprint(plain)
    with torch.no_grad():
        lora.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight[0, 0] = 1e-3
    assert weights_fingerprint(lora) != weights_fingerprint(plain)

    from peft import LoraConfig, get_peft_model

    dora = get_peft_model(load_model(str(tiny_model_dir), "float32"),
                          LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, task_type="CAUSAL_LM"))
    assert weights_fingerprint(dora) != weights_fingerprint(plain)


def validate(tiny_model_dir: Path, out: Path, *extra: str):
    config = tiny_fit_config(tiny_model_dir, out, "run", [], validate_before_fit=False, trainer={},
                             model={"loss": "CrossEntropy", "generate": True, "max_new_tokens": 6})
    return build_cli(["validate", "--config", str(config), *extra])


def generations(cli) -> dict[str, str]:
    return {p.name: p.read_text() for p in (Path(cli.trainer.log_dir) / "generations").glob("*.jsonl")}


def test_a_second_validation_of_the_initial_model_is_loaded(tiny_model_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("TALR_CACHE", str(cache))
    first = validate(tiny_model_dir, tmp_path / "first")
    metrics = {k: float(v) for k, v in first.trainer.callback_metrics.items()}
    assert len(entries(cache, "validation")) == 1 and metrics["val/count"] == 4 and generations(first)

    with monkeypatch.context() as patched:  # neither generation nor scoring may run
        patched.setattr(TokenNLLModel, "generate", fail)
        patched.setattr(talr.evaluation, "score_batch", fail)
        patched.setattr(talr.evaluation, "score_batch_with_cache", fail)
        second = validate(tiny_model_dir, tmp_path / "second")
    assert {k: float(v) for k, v in second.trainer.callback_metrics.items()} == metrics
    assert generations(second) == generations(first)

    # another generation budget is another entry, computed (no patch now)
    validate(tiny_model_dir, tmp_path / "third", "--model.max_new_tokens", "3")
    assert len(entries(cache, "validation")) == 2


def fit_with_monitor(tiny_model_dir: Path, out: Path, max_new_tokens: int = 8):
    monitor = {"class_path": "callbacks.forgetting_monitor.ForgettingMonitor",
               "init_args": {"max_new_tokens": max_new_tokens, "batch_size": 32}}
    config = tiny_fit_config(tiny_model_dir, out, "run", [monitor], validate_before_fit=False,
                             trainer={"max_steps": 1, "limit_val_batches": 0}, model={"loss": "CrossEntropy"})
    cli = build_cli(["fit", "--config", str(config)])
    return cli, next(c for c in cli.trainer.callbacks if isinstance(c, ForgettingMonitor))


def test_a_second_fit_loads_the_forgetting_monitors_initial_answers(tiny_model_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("TALR_CACHE", str(cache))
    first, monitor = fit_with_monitor(tiny_model_dir, tmp_path / "first")
    assert len(entries(cache, "forgetting")) == 1 and len(monitor.responses) == 55
    assert monitor.curve[0]["step"] == 0 and monitor.curve[0]["kl"] == 0.0  # the initial model against itself

    with monkeypatch.context() as patched:  # neither generating nor scoring the initial answers may run
        patched.setattr(ForgettingMonitor, "sample_initial_responses", fail)
        patched.setattr(forgetting_monitor, "score_examples", fail)
        second, again = fit_with_monitor(tiny_model_dir, tmp_path / "second")
    assert again.responses == monitor.responses and again.curve == monitor.curve
    written = lambda cli: (Path(cli.trainer.log_dir) / "forgetting" / "responses.jsonl").read_text()  # noqa: E731
    assert written(second) == written(first)

    fit_with_monitor(tiny_model_dir, tmp_path / "third", max_new_tokens=4)  # other settings: computed anew
    assert len(entries(cache, "forgetting")) == 2


def fit_with_benchmarks(tiny_model_dir: Path, out: Path, limit: int = 4):
    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    benchmarks = {"class_path": "callbacks.general_benchmarks.GeneralBenchmarks",
                  "init_args": {"tasks": ["talr_arc_easy"], "data_dir": str(data), "limit": limit, "batch_size": 4,
                                "threshold": 0.0}}
    config = tiny_fit_config(tiny_model_dir, out, "run", [benchmarks], validate_before_fit=False,
                             trainer={"max_steps": 1, "limit_val_batches": 0}, model={"loss": "CrossEntropy"})
    return build_cli(["fit", "--config", str(config)])


def test_a_second_fit_loads_the_initial_models_benchmark_record(tiny_model_dir, tmp_path, monkeypatch):
    """The fit-start benchmark of the same weights, tasks, settings and files is lm-eval's work once per
    setup: a second run evaluates only its fit end, and its fit-start record equals the first's."""
    import json

    import callbacks.general_benchmarks as general_benchmarks

    cache = tmp_path / "cache"
    monkeypatch.setenv("TALR_CACHE", str(cache))
    evaluated = []
    real = general_benchmarks.run_lm_eval

    def counted(*args, **kwargs):
        evaluated.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(general_benchmarks, "run_lm_eval", counted)
    record = lambda cli: json.loads((Path(cli.trainer.log_dir) / "general" / "fit_start.json").read_text())  # noqa: E731
    first = fit_with_benchmarks(tiny_model_dir, tmp_path / "first")
    assert len(evaluated) == 2 and len(entries(cache, "general")) == 1  # fit start and fit end

    second = fit_with_benchmarks(tiny_model_dir, tmp_path / "second")
    assert len(evaluated) == 3  # its fit end only
    cold, loaded = record(first), record(second)
    assert cold.pop("file") != loaded.pop("file") and loaded == cold
    assert loaded["per_document"]["talr_arc_easy"]["doc_ids"] == [0, 1, 2, 3]

    fit_with_benchmarks(tiny_model_dir, tmp_path / "third", limit=3)  # another limit: evaluated anew
    assert len(evaluated) == 5 and len(entries(cache, "general")) == 2
