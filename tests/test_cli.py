"""`talr fit|validate|test` end to end with a tiny random Llama (real SmolLM2 tokenizer)."""

import configparser
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from cli import build_cli
from conftest import MEDCALC_CSV, validation_history
from talr.schedule import schedule_length

REPO = Path(__file__).resolve().parents[1]


def cli_args(tiny_model_dir, out, *extra):
    return [
        "--config", str(REPO / "configs" / "quickstart.yaml"),
        "--model.model", str(tiny_model_dir),
        "--model.max_new_tokens", "8",
        "--data.task.init_args.num_synthetic", "20",
        "--data.val_size", "4",
        "--data.batch_size", "4",
        "--data.micro_batch_size", "2",
        "--trainer.val_check_interval", "2",
        "--trainer.default_root_dir", str(out),
        "--trainer.logger.init_args.save_dir", str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def fitted(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    cli = build_cli(["fit", *cli_args(tiny_model_dir, out)])
    return cli, out


def test_fit_writes_tensorboard_checkpoints_export_and_generations(fitted):
    cli, out = fitted
    log_dir = Path(cli.trainer.log_dir)
    assert list(log_dir.glob("events.out.tfevents.*")), "no TensorBoard events"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/nll", "train/lr", "train/talr/tau", "train/talr/weight_mean",
            "train/talr/cutoff_share", "val/accuracy", "val/loss"} <= tags
    assert len(events.Scalars("train/loss")) == 4  # 16 training rows, 4 per optimizer step
    # the schedule's length, computed from the data, is what Lightning estimates
    assert schedule_length(cli.trainer) == cli.trainer.estimated_stepping_batches == 4
    # validation before fine-tuning (step 0), after step 2, and at the end of the epoch
    assert [int(e["step"]) for e in validation_history(cli.trainer)] == [0, 2, 4]

    checkpoint = cli.trainer.checkpoint_callback
    assert Path(checkpoint.best_model_path).is_file() and (log_dir / "checkpoints" / "last.ckpt").is_file()
    best = max(validation_history(cli.trainer)[1:], key=lambda e: e["accuracy"])  # first best after training wins ties
    assert checkpoint.best_model_score.item() == pytest.approx(best["accuracy"])

    export = log_dir / "export"
    model = AutoModelForCausalLM.from_pretrained(export)
    state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[f"net.lm.{name}"]), name

    generations = sorted((log_dir / "generations").glob("val_step*.jsonl"))
    assert len(generations) == 3
    records = [json.loads(line) for line in generations[-1].read_text().splitlines()]
    assert len(records) == 4 and {"correct", "parsed", "generation", "row_index"} <= set(records[0])
    # each validation's rows' token sums beside them: the logged val/loss is their NLL over their tokens
    row_scores = sorted((log_dir / "row_scores").glob("val_step*.jsonl"))
    assert [p.name for p in row_scores] == [p.name for p in generations]
    rows = [json.loads(line) for line in row_scores[-1].read_text().splitlines()]
    assert sorted(r["row_index"] for r in rows) == sorted(r["row_index"] for r in records)
    assert sum(r["nll"] for r in rows) / sum(r["tokens"] for r in rows) == pytest.approx(validation_history(cli.trainer)[-1]["loss"], rel=1e-5)
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert saved["model"]["loss"]["class_path"] == "talr.losses.TALR" and saved["data"]["task"]["init_args"]["num_synthetic"] == 20


def test_validate_and_test_from_a_checkpoint(fitted, tiny_model_dir, tmp_path):
    cli, _ = fitted
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    out = tmp_path / "eval"
    validated = build_cli(["validate", *cli_args(tiny_model_dir, out), "--ckpt_path", ckpt])
    assert validated.trainer.callback_metrics["val/count"].item() == 4
    tested = build_cli([
        "test", *cli_args(tiny_model_dir, out), "--ckpt_path", ckpt,
        "--data.test_task", "talr.tasks.MedCalc",
        "--data.test_task.source", str(MEDCALC_CSV), "--data.test_task.limit", "6",
        "--data.max_length", "2048",
    ])
    metrics = tested.trainer.callback_metrics
    assert metrics["test/count"].item() + tested.datamodule.stats["test/dropped"] == 6
    assert "test/accuracy/category/lab" in metrics or "test/accuracy/category/risk" in metrics


def test_console_script_rejects_bad_options_before_training(tiny_model_dir, tmp_path):
    talr = Path(sys.executable).with_name("talr")
    bad_loss = subprocess.run([str(talr), "fit", *cli_args(tiny_model_dir, tmp_path), "--model.loss", "tarl"],
                              capture_output=True, text=True)
    assert bad_loss.returncode != 0 and "unknown loss 'tarl'" in bad_loss.stderr
    bad_lr = subprocess.run([str(talr), "fit", *cli_args(tiny_model_dir, tmp_path), "--model.learning_rate=-1e-4"],
                            capture_output=True, text=True)
    assert bad_lr.returncode != 0 and "learning_rate must be positive" in bad_lr.stderr
    assert not list(tmp_path.rglob("*.ckpt"))


# cpu.yaml is the CPU-scale experiment behind docs/results.md (configs/sweeps/medcalc_cpu.yaml), not a strategy
STRATEGY_CONFIGS = sorted(p for p in (REPO / "configs" / "medcalc").glob("*.yaml") if not p.stem.startswith("lr-") and p.stem != "cpu")


def test_every_strategy_has_a_config():
    assert {p.stem for p in STRATEGY_CONFIGS} >= {"ce", "talr", "l2", "kl", "flow", "dft", "lora", "wise-ft", "gate", "eaft", "asft", "stm", "rho1", "ties"}


def assert_written_in(written: dict, stored: dict) -> None:
    """Every option a config writes for the strategy (nested `base` too) is what the checkpoint stores."""
    assert stored["class_path"] == written["class_path"]
    for key, value in (written.get("init_args") or {}).items():
        if isinstance(value, dict):
            assert_written_in(value, stored["init_args"][key])
        else:
            assert stored["init_args"][key] == value, key


@pytest.mark.parametrize("config", STRATEGY_CONFIGS, ids=lambda p: p.stem)
def test_medcalc_configs_run_on_a_local_csv(config, tiny_model_dir, tmp_path):
    """The paper-setup configs (hub source by default) run end to end on a local MedCalc-Bench CSV."""
    cli = build_cli([
        "fit", "--config", str(config),
        "--model.model", str(tiny_model_dir), "--model.max_new_tokens", "4",
        "--data.task.init_args.source", str(MEDCALC_CSV), "--data.task.init_args.limit", "30",
        "--data.test_task", "null", "--data.max_length", "1024", "--data.val_size", "4",
        "--data.batch_size", "4", "--data.micro_batch_size", "2",
        "--trainer.max_steps", "2", "--trainer.max_epochs", "1",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        # the tiny random model never stops: short replay answers keep the generation pass to seconds
        *(["--data.replay.max_new_tokens", "8"] if "replay" in yaml.safe_load(config.read_text())["data"] else []),
    ])
    assert cli.trainer.global_step == 2
    assert_written_in(yaml.safe_load(config.read_text())["model"]["loss"], cli.model.hparams.loss)
    assert cli.model.hparams.learning_rate == 1e-6  # the paper's small learning rate
    assert (Path(cli.trainer.log_dir) / "export" / "model.safetensors").is_file()


def test_training_curves_notebook_executes_on_a_run(fitted, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    cli, _ = fitted
    monkeypatch.setenv("TALR_RUN_DIR", str(cli.trainer.log_dir))
    notebook = nbformat.read(REPO / "notebooks" / "training_curves.ipynb", as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the curves were not drawn"
    summary = notebook.cells[3].outputs[0]["data"]["text/plain"]
    assert "val_step000000" in summary


def test_large_learning_rate_config_stacks_on_any_strategy(tmp_path):
    out = subprocess.run(
        [str(Path(sys.executable).with_name("talr")), "fit", "--config", str(REPO / "configs/medcalc/kl.yaml"),
         "--config", str(REPO / "configs/medcalc/lr-large.yaml"), "--print_config"],
        capture_output=True, text=True, check=True,
    )
    printed = yaml.safe_load(out.stdout)
    assert printed["model"]["learning_rate"] == 5e-6 and printed["model"]["loss"]["class_path"] == "talr.losses.KLToInitial"


# ------------------------------------------------------------------ the first session: help, version


def talr_startup(*args: str) -> tuple[subprocess.CompletedProcess, float, set[str]]:
    """Run `python -X importtime -m cli ARGS`; the result, its wall time and the top-level modules it imported."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    seconds = time.perf_counter() - start
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    return done, seconds, imported


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["--version"]])
def test_help_and_version_answer_without_torch(args):
    done, seconds, imported = talr_startup(*args)
    assert done.returncode == 0
    assert "talr" in imported and not imported & {"torch", "lightning", "transformers", "jsonargparse"}
    assert seconds < 5, f"talr {args[0]} took {seconds:.1f} s"  # it took 13-15 s with Lightning imported


@pytest.mark.parametrize("command", ["report", "curriculum", "verdicts"])
def test_the_result_commands_help_loads_no_torch(command):
    done, _, imported = talr_startup(command, "--help")
    assert done.returncode == 0 and f"talr {command}" in done.stdout
    assert not imported & {"torch", "lightning", "transformers", "jsonargparse"}


def test_version_is_the_package_version():
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    done, _, _ = talr_startup("--version")
    assert done.stdout == f"talr {config['metadata']['version']}\n"


def test_help_lists_every_command_on_one_line_and_no_predict():
    import cli
    from talr.lightning_cli import TalrCLI

    done, _, _ = talr_startup("--help")
    listed = {}
    for line in done.stdout.split("commands", 1)[1].split("\noptions:")[0].splitlines()[1:]:
        if line.strip():
            name, summary = line.split(maxsplit=1)
            listed[name] = summary
    assert list(listed) == ["fit", "validate", "test", "cot", "sweep", "report", "curriculum", "verdicts"]
    assert all(len(summary) > 20 for summary in listed.values())
    assert "grid of `talr fit` runs" in listed["sweep"]  # the first line of talr/sweep.py's docstring
    assert set(TalrCLI.subcommands()) == set(cli.LIGHTNING_COMMANDS) == {"fit", "validate", "test"}
    assert "predict" not in done.stdout


def test_predict_is_not_a_command():
    done, _, imported = talr_startup("predict")
    assert done.returncode == 2 and "torch" not in imported
    assert done.stderr.strip().splitlines()[-1].startswith("talr: error: 'predict' is not a talr command")
    with pytest.raises(SystemExit) as info:  # nor does the Lightning parser offer it
        build_cli(["predict"])
    assert info.value.code == 2


def test_fit_help_shows_model_and_data_before_the_trainer(capsys):
    with pytest.raises(SystemExit) as info:
        build_cli(["fit", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.index("--model.model") < out.index("--data.task") < out.index("--trainer.accelerator")
