"""configs/sweeps/esci_cpu_strategies.yaml and esci_cpu_newer.yaml (docs/study_plan.md, stages 3 and 3b):
one overlay per strategy on configs/esci/cpu.yaml, each on two data seeds; and medcalc_cpu_finding2.yaml, the MedCalc half of the
paper's Finding 2. Only the commands are printed and parsed (print_config builds nothing): no run."""

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
    # stage 3b, the newer strategies, with configs/medcalc/'s coefficients
    "eaft": {"class_path": "talr.losses.EAFT", "init_args": {"alpha": 1.0, "k": 20}},
    "stm": {"class_path": "talr.losses.SelectiveTokenMasking", "init_args": {"threshold": 2.5}},
    "rho1": {"class_path": "talr.losses.Rho1", "init_args": {"ratio": 0.6}},
    "asft": {"class_path": "talr.losses.KLToInitial",
             "init_args": {"beta": 0.1, "estimator": "exact", "direction": "initial_model",
                           "base": {"class_path": "talr.losses.DFT"}}},
}
SWEEPS = ["configs/sweeps/esci_cpu_strategies.yaml", "configs/sweeps/esci_cpu_newer.yaml"]
LORA = {"r": 64, "alpha": 128, "dropout": 0.0, "target_modules": "all-linear"}
WISEFT = {"alphas": [0.0, 0.25, 0.5, 0.75, 1.0], "general_alphas": [0.5], "source": "best"}
# configs/esci/cpu.yaml's callbacks, which no overlay may drop
BASE_CALLBACKS = ["lightning.pytorch.callbacks.ModelCheckpoint", "lightning.pytorch.callbacks.ModelCheckpoint",
                  "callbacks.forgetting_monitor.ForgettingMonitor", "callbacks.general_benchmarks.GeneralBenchmarks"]

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def all_commands(tmp_path_factory):
    """Both sweeps' `talr fit` commands by strategy and data seed, printed in-process with a scratch --out."""
    return {(Path(argv[5]).stem, seed_of(argv)): argv
            for sweep in SWEEPS for argv in printed_commands(sweep, tmp_path_factory.mktemp("out"))}


@pytest.fixture(scope="module")
def commands(all_commands):
    """Each strategy's seed-0 command."""
    return {name: argv for (name, seed), argv in all_commands.items() if seed == 0}


def seed_of(argv: list[str]) -> int:
    (seed,) = [int(a.split("=", 1)[1]) for a in argv if a.startswith("--data.seed=")]
    return seed


def printed_commands(sweep: str, out: Path) -> list[list[str]]:
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.chdir(REPO)  # the sweep file names configs relative to the repository
        assert sweep_main(["--config", sweep, "--print-commands", "--out", str(out)]) == 0
    return [shlex.split(line) for line in printed.getvalue().splitlines() if line.startswith("talr fit ")]


def test_the_sweep_prints_one_command_per_strategy_and_seed_on_the_study_config(all_commands, commands):
    assert sorted(commands) == sorted(EXPECTED_LOSS)
    # every strategy on data seeds 0 and 1: the two seeds for all but CE and TALR (stage 2 runs three)
    assert sorted(all_commands) == sorted((name, seed) for name in EXPECTED_LOSS for seed in (0, 1))
    for (name, seed), argv in all_commands.items():
        if seed == 1:  # the same command on another data seed, written to its own run folder
            same = [a for a in commands[name] if "--data.seed" not in a and "_seed=0" not in a]
            assert [a for a in argv if "--data.seed" not in a and "_seed=1" not in a] == same
            assert "--data.seed=1" in argv
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


def test_the_medcalc_half_of_finding_2_scores_the_esci_runs_benchmark_documents(tmp_path, capsys, monkeypatch):
    """CE at 1e-5 and 1e-4 on MedCalc at ESCI's data seeds 0-2, with GeneralBenchmarks on configs/esci/cpu.yaml's
    1,000 documents a task (the base MedCalc config scores 100), so the two domains' learning-rate costs pair
    per document and per seed."""
    argvs = printed_commands("configs/sweeps/medcalc_cpu_finding2.yaml", tmp_path)
    value = lambda argv, option: next(a.split("=", 1)[1] for a in argv if a.startswith(f"--{option}="))  # noqa: E731
    assert [(value(argv, "data.seed"), value(argv, "model.learning_rate")) for argv in argvs] == [
        (seed, rate) for seed in ("0", "1", "2") for rate in ("1e-05", "0.0001")]
    esci_callbacks = {c["class_path"]: c.get("init_args", {})
                      for c in yaml.safe_load((REPO / "configs/esci/cpu.yaml").read_text())["trainer"]["callbacks"]}
    esci = esci_callbacks["callbacks.general_benchmarks.GeneralBenchmarks"]
    esci_monitor = esci_callbacks["callbacks.forgetting_monitor.ForgettingMonitor"]
    monkeypatch.chdir(REPO)
    monkeypatch.setattr("sys.argv", ["talr"])
    for argv in argvs:
        with pytest.raises(SystemExit):
            build_cli(argv[1:] + ["--print_config"])
        config = yaml.safe_load(capsys.readouterr().out)
        assert config["model"]["loss"]["class_path"] == "talr.losses.CrossEntropy"
        assert config["data"]["seed"] == int(value(argv, "data.seed"))
        (benchmarks,) = [c["init_args"] for c in config["trainer"]["callbacks"]
                         if c["class_path"] == "callbacks.general_benchmarks.GeneralBenchmarks"]
        assert benchmarks["limit"] == esci["limit"] == 1000 and benchmarks["tasks"] == esci["tasks"]
        assert benchmarks["shared_context"] is True
        (monitor,) = [c["init_args"] for c in config["trainer"]["callbacks"]
                      if c["class_path"] == "callbacks.forgetting_monitor.ForgettingMonitor"]
        assert esci_monitor.items() <= monitor.items()  # the same prompts and sampling: the same initial answers
