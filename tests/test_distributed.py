"""Two CPU processes (DDP and FSDP2 over gloo): results that must not depend on the process count.

Layouts compared for one optimizer step over the same 4 rows:
  one   - 1 process, batch 4 in one micro-batch
  accum - 1 process, batch 4 as 2 micro-batches of 2 (gradient accumulation inside the step)
  two   - 2 processes, batch 2 each
Same rows: the training split has exactly 4 rows, so the first step takes all of them in every
layout, whatever the order. (A longer split would not do: `data.group_by_length` groups by
`batch_size`, which differs between layouts, and with `group_by_length: false` Lightning swaps the
seeded RandomSampler for a DistributedSampler with another permutation.) The callback
tests/distributed_helpers.py:RecordStep checks the rows and records tau, weights and gradients.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TALR = str(Path(sys.executable).with_name("talr"))
STRATEGIES = {"ddp": REPO / "configs" / "distributed" / "ddp.yaml", "fsdp2": REPO / "configs" / "distributed" / "fsdp2.yaml"}
CLIP = {"ce": None, "talr": 0.05}  # ce: unclipped, so the gradients' scale is compared; talr: clipping runs sharded
# the strategies' command-line forms; ASFT is DFT plus KL(initial || model) over the vocabulary (configs/medcalc/asft.yaml)
LOSSES = {"ce": ["CrossEntropy"], "talr": ["TALR"], "eaft": ["EAFT"], "stm": ["SelectiveTokenMasking"],
          "asft": ["KLToInitial", "--model.loss.estimator", "exact", "--model.loss.direction", "initial_model",
                   "--model.loss.base", "DFT"]}


def talr_fit(model_dir, out, cache, *extra):
    command = [
        TALR, "fit", "--config", str(REPO / "configs" / "quickstart.yaml"),
        "--model.model", str(model_dir), "--model.loss", "FLOW",
        "--model.generate", "false", "--validate_before_fit", "false",
        "--data.task.init_args.num_synthetic", "20", "--data.val_size", "4",
        "--data.batch_size", "2", "--data.micro_batch_size", "2", "--data.eval_batch_size", "3",
        "--trainer.max_steps", "1", "--trainer.accelerator", "cpu",
        "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out), *extra,
    ]
    env = {**os.environ, "TALR_CACHE": str(cache)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    files = list((cache / "flow").glob("*.pt"))
    assert len(files) == 1
    return torch.load(files[0], weights_only=True)


def test_flow_prepass_under_ddp_scores_each_row_once_and_matches_one_process(tiny_model_dir, tmp_path):
    single = talr_fit(tiny_model_dir, tmp_path / "one", tmp_path / "cache1")
    sharded = talr_fit(tiny_model_dir, tmp_path / "two", tmp_path / "cache2",
                       "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert not torch.isnan(single).any() and single.shape == (16,)
    # each rank scored its own shard (rank r: rows r, r+2, ...), in other batches: equal to float tolerance
    torch.testing.assert_close(sharded, single, rtol=1e-5, atol=1e-6)


def one_step(model_dir: Path, out: Path, loss: str, layout: str, strategy: str | None = None, *loss_options: str) -> dict:
    """`talr fit` for one optimizer step at lr 1e-3; returns what RecordStep wrote plus the export."""
    callbacks = out / "callbacks.yaml"
    out.mkdir(parents=True, exist_ok=True)
    # Generation on (4 tokens) so that validation also generates under each strategy; the sharded
    # checkpoint (FSDP2's default) is what HFExport `which: best` must consolidate.
    callbacks.write_text(json.dumps({"trainer": {"callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"monitor": "val/loss", "mode": "min", "save_top_k": 1, "filename": "best"}},
        {"class_path": "callbacks.hf_export.HFExport", "init_args": {"which": "best" if loss == "ce" else "last"}},
        {"class_path": "tests.distributed_helpers.RecordStep", "init_args": {"out_dir": str(out / "record")}},
    ]}}))
    devices, batch, micro = {"one": (1, 4, 4), "accum": (1, 4, 2), "two": (2, 2, 2)}[layout]
    configs = ["--config", str(REPO / "configs" / "quickstart.yaml")]
    if strategy:
        configs += ["--config", str(STRATEGIES[strategy])]
    if strategy == "fsdp2":  # per-layer activation checkpointing inside FSDP2's units: same gradients
        configs += ["--model.gradient_checkpointing", "true"]
    args = [
        "fit", *configs, "--config", str(callbacks),
        "--model.model", str(model_dir), "--model.loss", *LOSSES[loss], *loss_options,
        "--model.learning_rate", "1e-3", "--model.warmup_ratio", "0", "--model.gradient_clip_val", json.dumps(CLIP.get(loss)),
        "--model.generate", "true", "--model.max_new_tokens", "4", "--validate_before_fit", "false",
        "--data.task.init_args.num_synthetic", "6", "--data.val_size", "2",
        "--data.batch_size", str(batch), "--data.micro_batch_size", str(micro), "--data.eval_batch_size", "2",
        "--trainer.devices", str(devices), "--trainer.max_steps", "1", "--trainer.accelerator", "cpu",
        "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
    ]
    if devices == 1:  # in this process: saves the ~10 s of imports a subprocess pays
        from cli import build_cli

        build_cli(args)
    else:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        done = subprocess.run([TALR, *args], capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
        assert done.returncode == 0, done.stderr[-4000:]
    from transformers import AutoModelForCausalLM

    (version,) = out.glob("tensorboard/version_*")
    lines = (version / "generations" / "val_step000001.jsonl").read_text().splitlines()
    generations = {json.loads(line)["row_index"]: json.loads(line)["generation"] for line in lines}
    row_scores = {(r := json.loads(line))["row_index"]: (r["tokens"], r["top1_hits"], r["nll"])
                  for line in (version / "row_scores" / "val_step000001.jsonl").read_text().splitlines()}
    ranks = [json.loads((out / "record" / f"rank{r}.json").read_text()) for r in range(devices)]
    weights: dict[str, list[float]] = {}
    for rank in ranks:
        weights.update(rank["weights"])
    return {
        "rows": sorted(r for rank in ranks for r in rank["rows"]),
        "tau": [t for rank in ranks for t in rank["tau"]],
        "mlp_calls": ranks[0]["mlp_calls"],
        "weights": weights,
        "grads": torch.load(out / "record" / "grads.pt", weights_only=True),
        "params": AutoModelForCausalLM.from_pretrained(version / "export").state_dict(),
        "generations": generations,
        "row_scores": row_scores,
        "best": next(version.glob("checkpoints/best*")),
    }


def assert_same_row_scores(two: dict, one: dict) -> None:
    """Each held-out row once, whichever rank scored it, with the same token sums."""
    assert sorted(two) == sorted(one) and len(one) == 2
    for row, (tokens, hits, nll) in one.items():
        assert two[row][:2] == (tokens, hits) and two[row][2] == pytest.approx(nll, abs=1e-4)


@pytest.fixture(scope="module")
def single_process_runs(tiny_model_dir, tmp_path_factory):
    """The 1-process layouts, run once per loss and shared by both strategies' tests."""
    runs: dict[tuple[str, str], dict] = {}

    def get(loss: str, layout: str) -> dict:
        if (loss, layout) not in runs:
            runs[loss, layout] = one_step(tiny_model_dir, tmp_path_factory.mktemp(f"{loss}-{layout}"), loss, layout)
        return runs[loss, layout]

    return get


def assert_same_step(got: dict, want: dict) -> None:
    assert got["rows"] == want["rows"] and len(want["rows"]) == 4
    assert got["grads"].keys() == want["grads"].keys()
    for name, grad in want["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"grad {name}: {m}")
    assert got["params"].keys() == want["params"].keys()
    for name, param in want["params"].items():
        # atol 1% of lr: Adam's first step is lr * g / (|g| + eps), which float noise moves where |g| ~ eps
        torch.testing.assert_close(got["params"][name], param, rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert got["weights"].keys() == want["weights"].keys()
    for row, w in want["weights"].items():
        torch.testing.assert_close(torch.tensor(got["weights"][row]), torch.tensor(w), rtol=1e-4, atol=1e-6)
    assert bool(got["tau"]) == bool(want["tau"])
    if want["tau"]:  # one tau for the step, on every rank and micro-batch
        torch.testing.assert_close(torch.tensor(got["tau"]), torch.full((len(got["tau"]),), want["tau"][0]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.parametrize("loss", ["ce", "talr"])
def test_one_step_is_the_same_for_one_two_processes_and_accumulation(tiny_model_dir, tmp_path, single_process_runs,
                                                                     strategy, loss):
    one = single_process_runs(loss, "one")
    two = one_step(tiny_model_dir, tmp_path / "two", loss, "two", strategy)
    assert_same_step(two, one)
    # validation generated under the strategy (FSDP2: the root's weights gathered for generate), the same text
    assert two["generations"] == one["generations"] and len(one["generations"]) == 2
    assert_same_row_scores(two["row_scores"], one["row_scores"])
    assert two["best"].is_dir() == (strategy == "fsdp2")  # FSDP2's checkpoint is sharded; ce exports it as best
    # forwards of layer 0 in the step: TALR's no-grad pre-pass, the real one, FSDP2's checkpointed recompute
    assert two["mlp_calls"] == 1 + (loss == "talr") + (strategy == "fsdp2")
    if strategy == "ddp" and loss == "talr":  # one accumulation run: it needs neither a strategy nor ce's normaliser again
        assert_same_step(single_process_runs(loss, "accum"), one)
    if loss == "talr":
        assert len(one["tau"]) == 1 and len(two["tau"]) == 2  # one micro-batch per rank
        assert len(one["weights"]) == 4 and min(min(w) for w in one["weights"].values()) < 1.0
        # clipping bit (global norm 0.05; about 0.48 unclipped), so the sharded run computed the norm over all shards
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in two["grads"].values()]))
        torch.testing.assert_close(norm, torch.tensor(0.05), rtol=1e-4, atol=0)
    else:
        assert one["tau"] == [] and one["weights"] == {}
    # the export of the 2-process run (FSDP2: gathered from shards, or consolidated from the sharded
    # best checkpoint for ce) loads with from_pretrained and holds the same weights: checked above


@pytest.mark.parametrize("loss", ["eaft", "stm", "asft"])
def test_newer_strategies_step_the_same_on_two_ddp_processes(tiny_model_dir, tmp_path, single_process_runs, loss):
    """EAFT's entropy weights, STM's reference mask and ASFT's exact KL to the initial model are per token:
    split over two processes, the step's gradients and weights equal one process's. (Rho-1 is left out:
    it ranks tokens within each micro-batch, so its selection follows the micro-batch layout by design.)"""
    one = single_process_runs(loss, "one")
    two = one_step(tiny_model_dir, tmp_path / "two", loss, "two", "ddp")
    assert_same_step(two, one)
    assert two["generations"] == one["generations"] and len(one["generations"]) == 2
    assert_same_row_scores(two["row_scores"], one["row_scores"])


def test_local_tau_scope_uses_each_process_median(tiny_model_dir, tmp_path, single_process_runs):
    glob = single_process_runs("talr", "one")
    local = one_step(tiny_model_dir, tmp_path / "local", "talr", "two", "ddp", "--model.loss.tau_scope", "local")
    assert local["rows"] == glob["rows"]
    rank0, rank1 = local["tau"]
    assert abs(rank0 - rank1) > 1e-3, "the rows' losses should give each process another median"
    assert all(abs(t - glob["tau"][0]) > 1e-4 for t in local["tau"])
    assert any(not torch.allclose(torch.tensor(local["weights"][r]), torch.tensor(w)) for r, w in glob["weights"].items())
