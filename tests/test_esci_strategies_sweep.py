"""configs/sweeps/esci_cpu_strategies.yaml (docs/study_plan.md, stage 3): one overlay per strategy on
configs/esci/cpu.yaml. Only the commands are printed and parsed (print_config builds nothing): no run."""

import contextlib
import io
import shlex
from pathlib import Path

import pytest
import yaml

from cli import build_cli
from talr.experiments.sweep import main as sweep_main

REPO = Path(__file__).resolve().parents[1]
CE = {"class_path": "talr.losses.CrossEntropy"}
# each overlay's intent, written out here (not read back from its YAML): the loss and the model options it sets
EXPECTED_LOSS = {
    "dft": {"class_path": "talr.losses.DFT"},
    "flow": {"class_path": "talr.losses.FLOW", "init_args": {"tau": None}},
    "l2": {"class_path": "talr.losses.L2Anchor", "init_args": {"lam": 1e-3, "reduction": "mean", "base": CE}},
    "kl": {"class_path": "talr.losses.KLToInitial",
           "init_args": {"beta": 0.1, "estimator": "k3", "direction": "model_initial", "base": CE}},
    "lora": CE,  # the study config's own loss
    "gate": {"class_path": "talr.losses.HardGate", "init_args": {"threshold": 0.2}},
    "wise-ft": CE,  # WiSE-FT mixes a CE run back toward theta_0
}
LORA = {"r": 64, "alpha": 128, "dropout": 0.0, "target_modules": "all-linear"}
WISEFT = {"alphas": [0.0, 0.25, 0.5, 0.75, 1.0], "general_alphas": [0.5], "source": "best"}
# configs/esci/cpu.yaml's callbacks, which no overlay may drop
BASE_CALLBACKS = ["lightning.pytorch.callbacks.ModelCheckpoint", "lightning.pytorch.callbacks.ModelCheckpoint",
                  "callbacks.forgetting_monitor.ForgettingMonitor", "callbacks.general_benchmarks.GeneralBenchmarks"]

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def commands(tmp_path_factory):
    """The sweep's `talr fit` commands by strategy, printed in-process with a scratch --out."""
    out = tmp_path_factory.mktemp("esci_strategies")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.chdir(REPO)  # the sweep file names configs relative to the repository
        assert sweep_main(["--config", "configs/sweeps/esci_cpu_strategies.yaml", "--print-commands",
                           "--out", str(out)]) == 0
    argvs = [shlex.split(line) for line in printed.getvalue().splitlines() if line.startswith("talr fit ")]
    return {Path(argv[5]).stem: argv for argv in argvs}


def test_the_sweep_prints_one_command_per_strategy_on_the_study_config(commands):
    assert sorted(commands) == sorted(EXPECTED_LOSS)
    for name, argv in commands.items():
        assert argv[:6] == ["talr", "fit", "--config", "configs/esci/cpu.yaml",
                            "--config", f"configs/esci/strategies/{name}.yaml"]
        assert "--model.learning_rate=3e-05" in argv and "--data.seed=0" in argv  # stage 2's middle rate, seed 0
        assert "--trainer.callbacks.monitor=val/label_auc" in argv and "--trainer.callbacks.mode=max" in argv


@pytest.mark.parametrize("name", list(EXPECTED_LOSS))
def test_each_command_parses_to_its_strategy_and_keeps_the_base_callbacks(name, commands, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr("sys.argv", ["talr"])  # LightningCLI warns when pytest's own arguments sit beside args
    with pytest.raises(SystemExit) as parsed:  # print_config reads the configs, builds nothing
        build_cli(commands[name][1:] + ["--print_config"])  # from `fit` on
    assert parsed.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    model = config["model"]
    assert model["model"] == "smollm2-135m-instruct" and model["learning_rate"] == 3e-5 and config["data"]["seed"] == 0
    loss = model["loss"]
    expected = EXPECTED_LOSS[name]
    assert loss["class_path"] == expected["class_path"]
    for key, value in expected.get("init_args", {}).items():
        assert loss["init_args"][key] == value, key
    assert model["lora"] == (LORA if name == "lora" else None)

    callbacks = config["trainer"]["callbacks"]
    paths = [c["class_path"] for c in callbacks]
    wiseft = ["callbacks.model_averaging.WiSEFT"] if name == "wise-ft" else []
    assert paths == [*BASE_CALLBACKS, *wiseft, "callbacks.run_summary.RunSummary"]  # appended, none replaced
    assert callbacks[0]["init_args"]["monitor"] == "val/label_auc"  # the base's best-checkpoint rule is intact
    assert callbacks[-1]["init_args"]["monitor"] == "val/label_auc"  # the sweep's options reach its RunSummary
    if wiseft:
        assert WISEFT.items() <= callbacks[-2]["init_args"].items()
        from callbacks.model_averaging import WiSEFT

        WiSEFT(**callbacks[-2]["init_args"])  # the callback accepts them (general_alphas within alphas); no model
