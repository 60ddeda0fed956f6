"""Loss strategies as config objects: `--model.loss.help`, the short command-line form, a nested
regulariser in YAML trained through `talr fit` and read back from its checkpoint, sweep grids over
`model.loss`, and the one error an old-form loss config gets."""

import importlib.util
import inspect
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.cli import instantiate_module

from cli import build_cli
from conftest import tiny_fit_config
from talr.config_migration import strategy_classes
from talr.losses import TALR, CrossEntropy, KLToInitial
from talr.module import SFTModule

REPO = Path(__file__).resolve().parents[1]
TALR_COMMAND = str(Path(sys.executable).with_name("talr"))
STRATEGIES = [cls.__name__ for cls in strategy_classes()]  # every concrete class in talr.losses

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def help_text(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as info:
        build_cli(["fit", *args])
    assert info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # the help wraps lines


def option_entry(text: str, option: str) -> str:
    """What the help says about `--model.loss.<option>` (after the usage lines), up to the next option."""
    found = re.search(rf"--model\.loss\.{option} \S+ (.*?)(?= --model\.loss\.|$)", text[text.index("Help for"):])
    assert found, f"--model.loss.{option} is not in the help"
    return found.group(1)


def print_config(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as info:
        build_cli(["fit", *args, "--print_config"])
    assert info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_help_lists_every_talr_option_with_its_default_and_docstring(capsys):
    text = help_text(capsys, "--model.loss.help", "TALR")
    # written out here from the class's documented defaults and docstring
    expected = {
        "w_min": ("default: 0.01", "floor of every token's weight, in (0, 1]"),
        "tau": ("default: null", "a fixed temperature (the paper's ablation). None: the median over the batch's sequences"),
        "tau_scope": ("default: global", "where that median is taken: `global` over the whole optimizer step"),
        "tau_floor": ("default: 1e-06", "smallest tau used, so that a zero median"),
    }
    assert set(expected) == set(inspect.signature(TALR.__init__).parameters) - {"self"}
    for option, (default, doc) in expected.items():
        entry = option_entry(text, option)
        assert entry.startswith(doc) and default in entry, entry


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_option_of_every_strategy_is_documented(name, capsys):
    text = help_text(capsys, "--model.loss.help", name)
    import talr.losses

    options = set(inspect.signature(getattr(talr.losses, name).__init__).parameters) - {"self", "args", "kwargs"}
    for option in options:
        entry = option_entry(text, option)
        assert len(entry[:entry.index("(type:")].strip()) > 10, f"{name}.{option} has no description: {entry!r}"


def test_the_short_command_line_form_builds_nested_strategies(capsys):
    config = print_config(capsys, "--config", str(REPO / "configs" / "quickstart.yaml"),
                          "--model.loss", "KLToInitial", "--model.loss.beta", "0.3",
                          "--model.loss.base", "TALR", "--model.loss.base.w_min", "0.02")
    loss = config["model"]["loss"]
    assert loss["class_path"] == "talr.losses.KLToInitial" and loss["init_args"]["beta"] == 0.3
    assert loss["init_args"]["base"]["class_path"] == "talr.losses.TALR"
    assert loss["init_args"]["base"]["init_args"]["w_min"] == 0.02
    # another class replaces the config's strategy: TALR's w_min does not carry over to CrossEntropy
    config = print_config(capsys, "--config", str(REPO / "configs" / "quickstart.yaml"), "--model.loss", "CrossEntropy")
    assert config["model"]["loss"] == {"class_path": "talr.losses.CrossEntropy", "init_args": {}}


NESTED = {"class_path": "talr.losses.KLToInitial",
          "init_args": {"beta": 0.25, "base": {"class_path": "talr.losses.TALR", "init_args": {"w_min": 0.3}}}}


def test_a_nested_regulariser_in_yaml_trains_and_its_checkpoint_holds_plain_data(tiny_model_dir, tmp_path):
    config = tiny_fit_config(tiny_model_dir, tmp_path, "nested", [], trainer={"max_steps": 1, "limit_val_batches": 0},
                             model={"loss": NESTED, "learning_rate": 1e-3}, validate_before_fit=False)
    cli = build_cli(["fit", "--config", str(config)])
    strategy = cli.model.loss_fn
    assert type(strategy) is KLToInitial and strategy.beta == 0.25 and strategy.estimator == "k3"
    assert type(strategy.base) is TALR and strategy.base.w_min == 0.3 and strategy.token_strategy is strategy.base
    assert cli.trainer.global_step == 1
    metrics = cli.trainer.callback_metrics
    # the logged keys keep the outer strategy's short name; TALR's weights never go below w_min
    assert metrics["train/kl/kl"].item() >= 0.0 and metrics["train/kl/tau"].item() > 0.0
    assert 0.3 <= metrics["train/kl/weight_mean"].item() <= 1.0

    ckpt = Path(cli.trainer.checkpoint_callback.best_model_path)
    stored = torch.load(ckpt, weights_only=True, map_location="cpu")["hyper_parameters"]["loss"]
    assert stored == {"class_path": "talr.losses.KLToInitial", "init_args": {
        "beta": 0.25, "estimator": "k3", "direction": "model_initial",
        "base": {"class_path": "talr.losses.TALR", "init_args": {"w_min": 0.3, "tau": None, "tau_scope": "global", "tau_floor": 1e-6}}}}

    # validate from the checkpoint: its strategy wins over the config's, with a warning naming the key
    with pytest.warns(UserWarning, match="model.loss: using the checkpoint's"):
        validated = build_cli(["validate", "--config", str(config), "--model.loss", "CrossEntropy", "--ckpt_path", str(ckpt)])
    again = validated.model.loss_fn
    assert type(again) is KLToInitial and type(again.base) is TALR and again.base.w_min == 0.3
    # what SFTModule.load_from_checkpoint does with these hyperparameters: LightningCLI's instantiator
    hparams = torch.load(ckpt, weights_only=True, map_location="cpu")["hyper_parameters"]
    assert hparams.pop("_instantiator") == "lightning.pytorch.cli.instantiate_module"
    assert instantiate_module(SFTModule, hparams).loss_fn.config() == stored


def test_a_module_built_in_python_stores_its_strategy_as_plain_data():
    module = SFTModule(model="org/never-loaded", loss=KLToInitial(base=CrossEntropy()))
    assert module.hparams["loss"] == {"class_path": "talr.losses.KLToInitial", "init_args": {
        "beta": 0.1, "estimator": "k3", "direction": "model_initial", "base": {"class_path": "talr.losses.CrossEntropy", "init_args": {}}}}


OLD_FORMS = [
    ({"loss": "talr", "loss_options": {"w_min": 0.02}}, [],
     "loss: {class_path: talr.losses.TALR, init_args: {w_min: 0.02}}", "--model.loss TALR --model.loss.w_min 0.02"),
    ({"loss": "kl", "loss_options": {"beta": 0.2, "base": "talr", "base_options": {"w_min": 0.05}}}, [],
     "loss: {class_path: talr.losses.KLToInitial, init_args: {beta: 0.2, base: {class_path: talr.losses.TALR, init_args: {w_min: 0.05}}}}",
     "--model.loss KLToInitial --model.loss.beta 0.2 --model.loss.base TALR --model.loss.base.w_min 0.05"),
    ({"loss": {"class_path": "talr.losses.L2Anchor", "init_args": {"base": "talr", "base_options": {"tau": 0.5}}}}, [],
     "loss: {class_path: talr.losses.L2Anchor, init_args: {base: {class_path: talr.losses.TALR, init_args: {tau: 0.5}}}}",
     "--model.loss L2Anchor --model.loss.base TALR --model.loss.base.tau 0.5"),
    ({"loss": {"class_path": "talr.losses.TALR"}}, ["--model.loss", "dft"],
     "loss: {class_path: talr.losses.DFT}", "--model.loss DFT"),
]


@pytest.mark.parametrize("model, extra, yaml_form, command_form", OLD_FORMS, ids=["talr", "kl-base", "base_options", "command-line"])
def test_an_old_form_loss_stops_with_the_new_form(model, extra, yaml_form, command_form, tiny_model_dir, tmp_path):
    config = tiny_fit_config(tiny_model_dir, tmp_path, "old", [], trainer={"max_steps": 1}, model=model,
                             validate_before_fit=False)
    with pytest.raises(ValueError) as info:
        build_cli(["fit", "--config", str(config), *extra])
    message = str(info.value)
    assert "is the old form" in message or "are the old form" in message
    assert f"  {yaml_form}" in message.splitlines() and f"  {command_form}" in message.splitlines()
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("events.out.tfevents.*"))


def test_the_console_script_shows_the_new_form_once(tiny_model_dir, tmp_path):
    config = tiny_fit_config(tiny_model_dir, tmp_path, "old", [], trainer={"max_steps": 1},
                             model={"loss": "talr", "loss_options": {"w_min": 0.01}}, validate_before_fit=False)
    done = subprocess.run([TALR_COMMAND, "fit", "--config", str(config)], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.count("is the old form") + done.stderr.count("are the old form") == 1
    assert "write loss: {class_path: talr.losses.TALR, init_args: {w_min: 0.01}}" in done.stderr
    assert "command line --model.loss TALR --model.loss.w_min 0.01" in done.stderr


@pytest.mark.parametrize("sweep", ["quickstart", "medcalc_cpu", "medcalc_cpu_seeds"])
def test_sweep_grids_over_model_loss_print_commands_talr_fit_accepts(sweep, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the sweep files name configs relative to the repository
    spec = yaml.safe_load((REPO / "configs" / "sweeps" / f"{sweep}.yaml").read_text())
    done = subprocess.run([TALR_COMMAND, "sweep", "--config", f"configs/sweeps/{sweep}.yaml", "--print-commands",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    commands = [shlex.split(line) for line in done.stdout.splitlines()]
    assert len(commands) == len(spec["grid"]["model.loss"]) * len(spec["grid"]["model.learning_rate"]) * len(spec["grid"].get("data.seed", [0]))
    base = yaml.safe_load((REPO / spec["base"][0]).read_text())["model"]["loss"]
    for command in commands:
        assert command[:2] == ["talr", "fit"]
        (grid_value,) = [word.split("=", 1)[1] for word in command if word.startswith("--model.loss=")]
        # parsed in this process (print_config reads the configs, builds nothing)
        parsed = print_config(capsys, *command[2:])["model"]["loss"]
        assert parsed["class_path"] == f"talr.losses.{grid_value}"
        if parsed["class_path"] == base["class_path"]:  # the base config's options stay with its own class
            assert base.get("init_args", {}).items() <= parsed["init_args"].items()


def test_the_readme_strategies_table_lists_every_option_of_each_class():
    import talr.losses

    rows = [line.split(" | ") for line in (REPO / "README.md").read_text().splitlines()
            if re.match(r"\| `(\w+)` \(`\w+`\) \|", line)]
    assert sorted(re.match(r"\| `(\w+)`", row[0]).group(1) for row in rows) == sorted(STRATEGIES)
    for row in rows:
        cls = getattr(talr.losses, re.match(r"\| `(\w+)`", row[0]).group(1))
        short = re.search(r"\(`(\w+)`\)", row[0]).group(1)
        listed = set() if row[3] == "none" else {re.match(r"`(\w+)`", item).group(1) for item in row[3].split(", ")}
        assert listed == set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}, cls.__name__
        assert short == cls.name  # the name in logged keys and in the sweep table


def test_the_token_probability_logger_reports_the_runs_own_talr_also_when_wrapped():
    from types import SimpleNamespace

    from callbacks.token_probabilities import talr_strategy

    own = TALR(w_min=0.2, tau=0.5)
    assert talr_strategy(SimpleNamespace(loss_fn=own), None) is own
    assert talr_strategy(SimpleNamespace(loss_fn=KLToInitial(base=own)), None) is own
    named = TALR(w_min=0.05)
    assert talr_strategy(SimpleNamespace(loss_fn=KLToInitial(base=own)), named) is named  # an explicit one wins
    default = talr_strategy(SimpleNamespace(loss_fn=KLToInitial(base=CrossEntropy())), None)
    assert (default.w_min, default.tau, default.tau_scope) == (0.01, None, "global")  # TALR's documented defaults


def test_the_readmes_new_strategy_example_applies_and_trains_by_its_formula(tmp_path, monkeypatch):
    """The README's focal-loss diff is what a contributor copies: it must apply to today's files, and
    the class it adds must give sum((1 - p)^gamma * nll) over the tokens."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    patch = re.search(r"```diff\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "talr").mkdir()
    (tmp_path / "talr" / "losses.py").write_bytes((REPO / "talr" / "losses.py").read_bytes())
    (tmp_path / "example.diff").write_text(patch, encoding="utf-8")
    subprocess.run(["git", "apply", "example.diff"], cwd=tmp_path, check=True, capture_output=True)
    spec = importlib.util.spec_from_file_location("readme_example_losses", tmp_path / "talr" / "losses.py")
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)  # dataclasses look their module up while the file runs
    spec.loader.exec_module(example)
    nll = torch.tensor([0.05, 0.7, 3.0])
    out = example.Focal(gamma=2.0)(example.TokenBatch(nll=nll, seq_index=torch.tensor([0, 0, 1]), num_seqs=2))
    by_hand = sum((1 - math.exp(-x)) ** 2 * x for x in nll.tolist())
    assert out.total.item() == pytest.approx(by_hand, rel=1e-6)
    config = yaml.safe_load((tmp_path / "configs" / "medcalc" / "focal.yaml").read_text(encoding="utf-8"))
    assert config["model"]["loss"] == {"class_path": "talr.losses.Focal", "init_args": {"gamma": 2.0}}
