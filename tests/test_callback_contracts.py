"""Callbacks use only the module's declared surface, contribute scores through one Protocol, and write
the same files and scalars whatever their order."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pandas as pd
import pytest

from callbacks.contracts import ContributesScores, TrainedModule
from callbacks.forgetting_monitor import ForgettingMonitor
from callbacks.general_benchmarks import GeneralBenchmarks
from callbacks.throughput import SPEED_METRICS
from cli import build_cli
from conftest import SHARED, tiny_fit_config

REPO = Path(__file__).resolve().parents[1]
# LightningModule's own public surface that callbacks may use beside the Protocol
LIGHTNING_SURFACE = {"device", "hparams", "to", "global_step", "current_epoch", "global_rank", "trainer"}


def protocol_members(protocol: type) -> set[str]:
    return {name for name in vars(protocol) if not name.startswith("_")} | set(protocol.__annotations__)


def test_callbacks_use_only_the_declared_module_surface():
    allowed = protocol_members(TrainedModule) | LIGHTNING_SURFACE
    used: dict[str, set[str]] = {}
    for path in sorted((REPO / "callbacks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "pl_module":
                used.setdefault(node.attr, set()).add(path.name)
    assert used, "the scan found no use of pl_module at all"
    outside = {attr: sorted(files) for attr, files in used.items() if attr not in allowed}
    assert outside == {}, f"callbacks reach past callbacks/contracts.py's TrainedModule: {outside}"


def test_the_module_provides_the_surface_and_callbacks_the_scores(tiny_model_dir):
    from talr.losses import CrossEntropy
    from talr.module import SFTModule

    module = SFTModule(model=str(tiny_model_dir), loss=CrossEntropy())
    module.configure_model()
    assert isinstance(module, TrainedModule)
    assert module.lm_prefix + "model.embed_tokens.weight" in module.state_dict()
    initial = module.load_initial_lm().state_dict()
    assert all((initial[k] == v).all() for k, v in module.lm.state_dict().items())  # untrained: theta_0
    assert isinstance(ForgettingMonitor(), ContributesScores)
    assert issubclass(GeneralBenchmarks, ContributesScores)


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir)).Reload()
    return {tag: [(e.step, round(e.value, 5)) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def result_files(log_dir: Path) -> dict[str, object]:
    """Every result file's content, without what names the run's own directory."""
    out: dict[str, object] = {}
    for path in sorted(p for p in log_dir.rglob("*") if p.is_file()):
        name = path.relative_to(log_dir).as_posix()
        if name.startswith(("checkpoints/", "events.out", "config")) or name == "hparams.yaml":
            continue
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            if name == "summary.json":
                data = {k: v for k, v in data.items() if k not in ("log_dir", "config_file")}
            elif name.startswith("general/"):
                data = {"primary": data["primary"], "general": data["general"], "step": data["step"]}
            out[name] = data
        elif path.suffix == ".parquet":
            out[name] = pd.read_parquet(path).round(5).to_dict("list")
        elif path.suffix in (".jsonl", ".md", ".safetensors"):
            out[name] = path.read_bytes()
        else:
            out[name] = path.stat().st_size > 0
    return out


@pytest.mark.slow
def test_result_writing_callbacks_write_the_same_in_either_order(tiny_model_dir, tmp_path, monkeypatch):
    callbacks = [
        {"class_path": "callbacks.forgetting_monitor.ForgettingMonitor", "init_args": {"max_new_tokens": 8}},
        {"class_path": "callbacks.token_probabilities.TokenProbabilityLogger",
         "init_args": {"num_examples": 4, "every_n_steps": 2}},
        {"class_path": "callbacks.general_benchmarks.GeneralBenchmarks",
         "init_args": {"tasks": ["talr_arc_easy"], "data_dir": str(SHARED / "data"), "limit": 4, "batch_size": 4,
                       "threshold": 0.0}},
        # every alpha scored by the GeneralBenchmarks and ForgettingMonitor above (or below: the order must not matter)
        {"class_path": "callbacks.model_averaging.WiSEFT", "init_args": {"alphas": [0.0, 0.5, 1.0], "select": "loss"}},
        {"class_path": "callbacks.hf_export.HFExport"},
        {"class_path": "callbacks.run_summary.RunSummary", "init_args": {"monitor": "val/loss", "mode": "min"}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"monitor": "val/loss", "mode": "min", "save_last": True}},
    ]
    monkeypatch.chdir(tmp_path)  # lm-eval records `git describe` of the working directory
    logs = {}
    for version, order in (("forward", callbacks), ("reversed", callbacks[::-1])):
        config = tiny_fit_config(tiny_model_dir, tmp_path, version, order, validate_before_fit=True,
                                 trainer={"max_steps": 4, "val_check_interval": 2},
                                 model={"loss": "CrossEntropy", "learning_rate": 1e-3})
        cli = build_cli(["fit", "--config", str(config)])
        logs[version] = Path(cli.trainer.log_dir)
    forward, backward = (result_files(logs[v]) for v in ("forward", "reversed"))
    assert {"summary.json", "wiseft.json", "export/model.safetensors", "export/README.md", "general/fit_end.json",
            "forgetting/curve.json", "general/wiseft_alpha0.50.json"} <= set(forward)
    assert {r["alpha"] for r in forward["summary.json"]["wiseft"]} == {0.0, 0.5, 1.0}
    assert all(r["general"] and r["forgetting"] for r in forward["wiseft.json"]["results"])
    assert forward.keys() == backward.keys()
    for name in forward:
        assert forward[name] == backward[name], name
    first, second = scalars(logs["forward"]), scalars(logs["reversed"])
    assert {"general/score", "forgetting/kl", "wiseft/loss", "wiseft/general/score", "wiseft/forgetting/kl", "val/loss",
            "token_probs/mean", *SPEED_METRICS} <= set(first)
    # wall-clock rates, and the process's peak memory (both runs share this test's process), differ
    # from run to run whatever the order
    for name in (*SPEED_METRICS, "train/peak_memory_gib"):
        del first[name], second[name]
    assert first == second
