"""WiSE-FT (callbacks.model_averaging): the interpolation, and `talr fit` with the callback on a tiny
random Llama (real SmolLM2 tokenizer)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from transformers import AutoModelForCausalLM

from callbacks.model_averaging import WiSEFT, interpolate_state
from cli import build_cli
from conftest import validation_history
from talr.checkpoint_io import lm_state_from_checkpoint

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def random_state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g).to(dtype), "b": torch.randn(4, generator=g).to(dtype)}


def mix(t0: torch.Tensor, t: torch.Tensor, alpha: float) -> torch.Tensor:
    """The reference: (1 - alpha) * t0 + alpha * t, element by element in float64."""
    flat0, flat = t0.double().flatten().tolist(), t.double().flatten().tolist()
    return torch.tensor([(1 - alpha) * a + alpha * b for a, b in zip(flat0, flat)], dtype=torch.float64).view(t.shape)


def test_interpolate_state_is_the_weighted_average():
    theta0, theta = random_state(0), random_state(1)
    mixed = interpolate_state(theta0, theta, 0.3)
    assert mixed.keys() == theta.keys()
    for key in theta:
        assert mixed[key].dtype == torch.float32
        torch.testing.assert_close(mixed[key].double(), mix(theta0[key], theta[key], 0.3), rtol=0, atol=1e-6)


def test_interpolate_state_mixes_bfloat16_in_float32():
    theta0, theta = random_state(0, torch.bfloat16), random_state(1, torch.bfloat16)
    mixed = interpolate_state(theta0, theta, 0.3)
    for key in theta:
        assert mixed[key].dtype == torch.bfloat16
        assert torch.equal(mixed[key], mix(theta0[key], theta[key], 0.3).float().bfloat16())


def test_interpolate_state_endpoints_are_exact_copies():
    theta0, theta = random_state(0), random_state(1)
    theta0["steps"] = torch.tensor([1, 2])  # integer buffers come from the nearer endpoint
    theta["steps"] = torch.tensor([3, 4])
    at0, at1 = interpolate_state(theta0, theta, 0.0), interpolate_state(theta0, theta, 1.0)
    for key in theta:
        assert torch.equal(at0[key], theta0[key]) and torch.equal(at1[key], theta[key])
    at0["w"].zero_()  # copies, not views of the inputs
    assert theta0["w"].abs().sum() > 0


def test_interpolate_state_rejects_mismatches():
    theta0, theta = random_state(0), random_state(1)
    with pytest.raises(ValueError, match="only in theta_0 \\['b'\\]"):
        interpolate_state(theta0, {"w": theta["w"]}, 0.5)
    with pytest.raises(ValueError, match="b: shape \\(4,\\) in theta_0 but \\(5,\\)"):
        interpolate_state(theta0, {**theta, "b": torch.zeros(5)}, 0.5)
    with pytest.raises(ValueError, match="alpha must be in \\[0, 1\\], got 1.2"):
        interpolate_state(theta0, theta, 1.2)


def test_constructor_validates_alphas():
    with pytest.raises(ValueError, match="got 1.5"):
        WiSEFT(alphas=[0.0, 1.5])
    with pytest.raises(ValueError, match="got -0.1"):
        WiSEFT(alphas=[-0.1])
    with pytest.raises(ValueError, match="at least one"):
        WiSEFT(alphas=[])
    assert WiSEFT(alphas=[1.0, 0.5, 0.5]).alphas == [0.5, 1.0]


def test_state_dict_round_trip():
    callback = WiSEFT(alphas=[0.0, 1.0])
    callback.results = [{"alpha": 0.0, "metrics": {"loss": 2.0}}, {"alpha": 1.0, "metrics": {"loss": 1.0}}]
    callback.chosen_alpha = 1.0
    resumed = WiSEFT(alphas=[0.0, 1.0])
    resumed.load_state_dict(callback.state_dict())
    assert resumed.results == callback.results and resumed.chosen_alpha == 1.0


def test_lora_runs_fail_clearly(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    lm = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    module = SimpleNamespace(lm=lm, hparams=SimpleNamespace(generate=True))
    with pytest.raises(ValueError, match="full fine-tuning weights"):
        WiSEFT().on_fit_start(None, module)


# -- end to end ------------------------------------------------------------------------------------
class FinalWeights(Callback):
    """Records the weights as training ends, before any on_fit_end hook (last.ckpt may be older:
    ModelCheckpoint only refreshes it when it saves a new best)."""

    def on_train_end(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.lm.state_dict().items()}


@pytest.fixture(scope="module")
def fitted(tiny_model_dir, tmp_path_factory):
    """8 training rows, 2 optimizer steps, validation after each: the best checkpoint (step 1 on
    ties) differs from the final weights (step 2)."""
    out = tmp_path_factory.mktemp("wiseft")
    cli = build_cli([
        "fit", "--config", str(REPO / "configs" / "quickstart.yaml"),
        "--model.model", str(tiny_model_dir),
        "--model.max_new_tokens", "4",
        "--model.learning_rate", "1e-3",
        "--model.dtype", "float32",  # the mixes below are checked in float32, also where a GPU is
        "--data.task.init_args.num_synthetic", "12",
        "--data.val_size", "4",
        "--data.batch_size", "4",
        "--data.micro_batch_size", "2",
        "--trainer.val_check_interval", "0.5",  # an int 1 would checkpoint only at epoch end
        "--trainer.default_root_dir", str(out),
        "--trainer.logger.init_args.save_dir", str(out),
        "--trainer.callbacks+=callbacks.model_averaging.WiSEFT",
        "--trainer.callbacks.alphas=[0.0,0.5,1.0]",
        "--trainer.callbacks+=test_model_averaging.FinalWeights",
    ])
    log_dir = Path(cli.trainer.log_dir)
    return cli, log_dir, json.loads((log_dir / "wiseft.json").read_text())


def by_alpha(results: list[dict]) -> dict[float, dict[str, float]]:
    return {r["alpha"]: r["metrics"] for r in results}


def test_fit_sweeps_alphas_and_keeps_the_fine_tuned_weights(fitted):
    cli, log_dir, results = fitted
    assert [r["alpha"] for r in results] == [0.0, 0.5, 1.0]
    assert all({"loss", "accuracy", "unparsed", "count"} <= set(r["metrics"]) for r in results)
    assert [int(e["step"]) for e in validation_history(cli.trainer)] == [0, 1, 2]
    final = next(c for c in cli.trainer.callbacks if isinstance(c, FinalWeights)).state
    best = lm_state_from_checkpoint(cli.trainer.checkpoint_callback.best_model_path, "net.lm.")
    assert any(not torch.equal(best[k], final[k]) for k in final), "best == last: the test cannot tell them apart"
    live = cli.model.lm.state_dict()
    assert live.keys() == final.keys() and all(torch.equal(live[k], final[k]) for k in final)
    for alpha in ("0.00", "0.50", "1.00"):
        assert (log_dir / "generations" / f"wiseft_alpha{alpha}.jsonl").is_file()


def test_endpoints_score_like_the_initial_and_the_best_model(fitted):
    cli, _, results = fitted
    metrics = by_alpha(results)
    before = validation_history(cli.trainer)[0]
    assert metrics[0.0]["loss"] == pytest.approx(before["loss"], abs=1e-5)
    assert metrics[0.0]["accuracy"] == before["accuracy"] and metrics[0.0]["unparsed"] == before["unparsed"]

    model = cli.model
    live = {k: v.clone() for k, v in model.lm.state_dict().items()}
    model.lm.load_state_dict(lm_state_from_checkpoint(cli.trainer.checkpoint_callback.best_model_path, "net.lm."))
    try:
        fine_tuned = model.evaluate("val", tag="check_best")
    finally:
        model.lm.load_state_dict(live)
    assert metrics[1.0]["loss"] == pytest.approx(fine_tuned["loss"], abs=1e-6)
    assert metrics[1.0]["accuracy"] == fine_tuned["accuracy"] and metrics[1.0]["count"] == fine_tuned["count"] == 4
    assert metrics[1.0]["loss"] < metrics[0.0]["loss"]  # fine-tuning happened


def assert_export_is_the_mix(export: Path, tiny_model_dir: Path, best_path: str, alpha: float) -> None:
    theta0 = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    theta = lm_state_from_checkpoint(best_path, "net.lm.")
    exported = AutoModelForCausalLM.from_pretrained(export).state_dict()
    assert exported.keys() == theta0.keys()
    for key, tensor in exported.items():
        expected = (1 - alpha) * theta0[key] + alpha * theta[key]
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6, msg=key)


def test_chosen_alpha_is_exported_plotted_and_logged(fitted, tiny_model_dir):
    cli, log_dir, results = fitted
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, WiSEFT))
    top = max(r["metrics"]["accuracy"] for r in results)
    assert callback.chosen_alpha == min(r["alpha"] for r in results if r["metrics"]["accuracy"] == top)
    assert_export_is_the_mix(log_dir / "wiseft_export", tiny_model_dir,
                             cli.trainer.checkpoint_callback.best_model_path, callback.chosen_alpha)

    png = (log_dir / "wiseft.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000
    assert not list(log_dir.glob(".wiseft*"))  # no temp files left behind

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir)).Reload()
    logged = {e.step: e.value for e in events.Scalars("wiseft/accuracy")}  # x axis: alpha in percent
    assert {0, 50, 100} <= set(logged)
    assert [logged[s] for s in (0, 50, 100)] == pytest.approx([r["metrics"]["accuracy"] for r in results])
    assert {e.step for e in events.Scalars("wiseft/loss")} >= {0, 50, 100}


def test_a_middle_alpha_selected_on_loss_is_exported_as_the_mix(fitted, tiny_model_dir, tmp_path):
    """Rerun the sweep on the fitted trainer with one alpha strictly inside (0, 1)."""
    cli, log_dir, _ = fitted
    live = {k: v.clone() for k, v in cli.model.lm.state_dict().items()}
    callback = WiSEFT(alphas=[0.3], select="loss", dirpath=str(tmp_path))
    callback.on_fit_end(cli.trainer, cli.model)
    assert callback.chosen_alpha == 0.3 and json.loads((tmp_path / "wiseft.json").read_text())[0]["alpha"] == 0.3
    assert_export_is_the_mix(tmp_path / "wiseft_export", tiny_model_dir,
                             cli.trainer.checkpoint_callback.best_model_path, 0.3)
    assert all(torch.equal(v, live[k]) for k, v in cli.model.lm.state_dict().items())
