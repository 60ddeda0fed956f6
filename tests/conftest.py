"""Shared fixtures: the embedded model (converted once into the talr cache), a tiny random
Llama that uses its real tokenizer, and the read-only data in ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Under pytest-xdist (`make test`: one test file per worker at a time), each worker and the
# processes its tests start get their share of the cores instead of all of them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ["OMP_NUM_THREADS"] = _threads
    torch.set_num_threads(int(_threads))

SHARED = Path(__file__).resolve().parents[2] / "shared"
MEDCALC_CSV = SHARED / "data" / "medcalc" / "medcalc_bench_test.csv"


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from talr.models import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from talr.models import load_tokenizer

    return load_tokenizer(str(embedded_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_dir, tokenizer) -> Path:
    """A 2-layer random-init Llama with SmolLM2's vocabulary, tokenizer and chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def one_cpu_thread():
    """The tiny model's operations are so small that a second thread only adds waiting (badly so on a
    shared, busy CPU); the previous setting comes back after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_fit_config(tiny_model_dir: Path, out: Path, version: str, callbacks: list, *, trainer: dict,
                    model: dict, validate_before_fit: bool) -> Path:
    """A standalone `talr fit` config for callback tests (list keys such as callbacks merge item by
    item across several --config files): the tiny model on 12 generated training rows, 4 a step,
    rows cut to 384 tokens (enough target tokens at half the time), TensorBoard in out/tb/<version>."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    config = out / f"config-{version}.yaml"
    config.write_text(yaml.safe_dump({
        "seed_everything": 0,
        "validate_before_fit": validate_before_fit,
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_epochs": 1,
                    "num_sanity_val_steps": 0, "log_every_n_steps": 1, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(out),
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(out), "name": "tb", "version": version}},
                    "callbacks": callbacks, **trainer},
        "model": {"model": str(tiny_model_dir), "warmup_ratio": 0.0, "generate": False, **model},
        "data": {"task": {"class_path": "talr.tasks.MedCalc",
                          "init_args": {"source": "synthetic", "num_synthetic": 16, "seed": 0,
                                        "calculators": ["anion_gap", "map", "bmi", "due_date"]}},
                 "max_length": 384, "val_size": 4, "batch_size": 4, "micro_batch_size": 4, "eval_batch_size": 4},
    }))
    return config


def validation_history(trainer) -> list[dict[str, float]]:
    """The run's validations as RunSummary recorded them, keys without the `val/` prefix
    (step, loss, accuracy, ...)."""
    from callbacks.run_summary import RunSummary

    summary = next(c for c in trainer.callbacks if isinstance(c, RunSummary))
    return [{k.removeprefix("val/"): v for k, v in entry.items()} for entry in summary.history]
