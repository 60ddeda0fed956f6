"""WiSE-FT (callbacks.model_averaging): the interpolation, the selection rule, and `talr fit` with the
callback on a tiny random Llama (real SmolLM2 tokenizer), each alpha scored on the domain, by
GeneralBenchmarks (lm-eval, offline ARC-Easy) and by ForgettingMonitor."""

import contextlib
import io
import json
import logging
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from transformers import AutoModelForCausalLM

from callbacks.forgetting_monitor import ForgettingMonitor
from callbacks.general_benchmarks import GeneralBenchmarks
from callbacks.model_averaging import WiSEFT, choose_alpha, interpolate_state
from cli import build_cli
from conftest import SHARED, validation_history
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


def test_constructor_validates_the_selection_options():
    with pytest.raises(ValueError, match="select must be one of general_within_margin, accuracy, loss, got 'general'"):
        WiSEFT(select="general")
    with pytest.raises(ValueError, match="margin must be a finite number >= 0, got -0.1"):
        WiSEFT(margin=-0.1)
    with pytest.raises(ValueError, match="margin must be a finite number >= 0, got nan"):
        WiSEFT(margin=math.nan)
    with pytest.raises(ValueError, match=r"general_alphas \[0.3\] are not in WiSEFT.alphas \[0.0, 0.5, 1.0\]"):
        WiSEFT(alphas=[0.0, 0.5, 1.0], general_alphas=[0.5, 0.3])
    assert WiSEFT(alphas=[0.0, 0.5, 1.0]).general_alphas == [0.0, 0.5, 1.0]  # default: every alpha
    assert WiSEFT(alphas=[0.0, 1.0], general_alphas=[1.0, 1.0]).general_alphas == [1.0]
    assert WiSEFT().select == "general_within_margin" and WiSEFT().margin == 0.01
    for wrong in ("val/label_auc", "loss", ""):
        with pytest.raises(ValueError, match="domain_metric: a validation metric that grows with the domain score"):
            WiSEFT(domain_metric=wrong)
    assert WiSEFT().domain_metric == "accuracy" and WiSEFT(domain_metric="label_auc").domain_metric == "label_auc"


# -- the selection rule on synthetic per-alpha results ---------------------------------------------
def synthetic(rows: list[tuple[float, float, float, float | None]]) -> list[dict]:
    """(alpha, accuracy, loss, general score or None: not benchmarked), as WiSEFT keeps its results."""
    out = []
    for alpha, accuracy, loss, general in rows:
        result = {"alpha": alpha, "metrics": {"accuracy": accuracy, "loss": loss}}
        if general is not None:
            result["general"] = [{"general_best": general}]
        out.append(result)
    return out


# accuracy is counted over 500 rows (k / 500); the general score falls as alpha grows
CURVE = [(0.0, 0.200, 2.0, 0.560), (0.25, 0.300, 1.7, 0.540), (0.5, 0.326, 1.5, 0.512),
         (0.75, 0.334, 1.4, 0.490), (1.0, 0.334, 1.45, 0.470)]


def test_general_within_margin_picks_the_best_general_score_near_the_best_accuracy():
    # By hand: the best accuracy is 0.334 (alpha 0.75 and 1.0; the tie goes to 0.75). Within 0.01 of it:
    # 0.326 (alpha 0.5; 0.008 below), 0.334, 0.334; 0.300 is 0.034 below. Their general scores:
    # 0.512, 0.490, 0.470: alpha 0.5.
    chosen, why = choose_alpha(synthetic(CURVE), "general_within_margin", 0.01)
    assert chosen["alpha"] == 0.5
    assert why == ("chose alpha 0.50: best general score 0.512 among alphas within 0.01 of the best domain "
                   "accuracy 0.334 (alpha 0.75)")
    # a margin of exactly the gap counts as within (0.334 - 0.324 is not 0.01 in floats)
    edge = [(0.5, 0.324, 1.5, 0.6), (1.0, 0.334, 1.4, 0.5)]
    assert choose_alpha(synthetic(edge), "general_within_margin", 0.01)[0]["alpha"] == 0.5
    # margin 0: only the most accurate alphas, the better general score of the two (0.490 at 0.75)
    assert choose_alpha(synthetic(CURVE), "general_within_margin", 0.0)[0]["alpha"] == 0.75
    # a wide margin reaches alpha 0.25 (0.034 below) but not alpha 0 (0.134 below): 0.540
    assert choose_alpha(synthetic(CURVE), "general_within_margin", 0.05)[0]["alpha"] == 0.25
    # equal general scores: the smaller alpha
    tie = [(0.5, 0.33, 1.5, 0.5), (0.75, 0.334, 1.4, 0.5), (1.0, 0.334, 1.4, 0.4)]
    assert choose_alpha(synthetic(tie), "general_within_margin", 0.01)[0]["alpha"] == 0.5


def test_general_within_margin_falls_back_to_domain_accuracy():
    # no general score at all: the most accurate alpha (ties: the smaller)
    chosen, why = choose_alpha(synthetic([(a, acc, loss, None) for a, acc, loss, _ in CURVE]), "general_within_margin")
    assert chosen["alpha"] == 0.75
    assert why == ("chose alpha 0.75: best domain accuracy 0.334; no alpha has a general score (no GeneralBenchmarks "
                   "callback, or every task left out), so domain accuracy decides")
    # general scores only where the domain is far from its best (general_alphas: [0, 0.25])
    partial = [(a, acc, loss, g if a <= 0.25 else None) for a, acc, loss, g in CURVE]
    chosen, why = choose_alpha(synthetic(partial), "general_within_margin")
    assert chosen["alpha"] == 0.75 and "no alpha within 0.01 of it has a general score (WiSEFT.general_alphas)" in why
    # a NaN accuracy ranks last
    assert choose_alpha(synthetic([(0.0, math.nan, 1.0, 0.9), (1.0, 0.1, 2.0, 0.2)]), "general_within_margin")[0]["alpha"] == 1.0


def test_the_domain_rules():
    chosen, why = choose_alpha(synthetic(CURVE), "accuracy")
    assert chosen["alpha"] == 0.75 and why == "chose alpha 0.75: best domain accuracy 0.334 (ties: the smaller alpha)"
    chosen, why = choose_alpha(synthetic(CURVE), "loss")
    assert chosen["alpha"] == 0.75 and why == "chose alpha 0.75: lowest target NLL 1.4000 (ties: the smaller alpha)"


def test_a_ranking_metric_can_be_the_domain_score():
    """ESCI at 135M: greedy answers stay near one class, so raw accuracy can favour a mix whose class
    ranking is worse than the fine-tuned model's (data seed 1 of the study chose alpha 0.25 that way)."""
    rows = [(0.0, 0.10, 0.469, 0.60), (0.25, 0.324, 0.454, None), (0.5, 0.30, 0.514, 0.55),
            (0.75, 0.29, 0.541, None), (1.0, 0.28, 0.544, None)]  # (alpha, accuracy, label AUC, general)
    results = [{"alpha": a, "metrics": {"accuracy": acc, "label_auc": auc, "loss": 1.0},
                **({"general": [{"general_best": g}]} if g is not None else {})} for a, acc, auc, g in rows]
    # by accuracy: alpha 0.25 (0.324); nothing else within 0.01, and it has no general score
    assert choose_alpha(results, "general_within_margin", 0.01)[0]["alpha"] == 0.25
    # by label AUC: the best is 0.544 (alpha 1); within 0.01 are 0.544 and 0.541 (alpha 0.75), neither benchmarked
    chosen, why = choose_alpha(results, "general_within_margin", 0.01, domain_metric="label_auc")
    assert chosen["alpha"] == 1.0
    assert why == ("chose alpha 1.00: best domain label_auc 0.544; no alpha within 0.01 of it has a general score "
                   "(WiSEFT.general_alphas), so domain label_auc decides")
    # a margin of 0.05 reaches alpha 0.5 (0.514, 0.030 below), the one benchmarked there
    chosen, why = choose_alpha(results, "general_within_margin", 0.05, domain_metric="label_auc")
    assert chosen["alpha"] == 0.5 and why.endswith("within 0.05 of the best domain label_auc 0.544 (alpha 1.00)")
    assert choose_alpha(results, "accuracy", domain_metric="label_auc")[0]["alpha"] == 1.0


def test_state_dict_round_trip():
    callback = WiSEFT(alphas=[0.0, 1.0])
    callback.results = [{"alpha": 0.0, "metrics": {"loss": 2.0}}, {"alpha": 1.0, "metrics": {"loss": 1.0}}]
    callback.chosen_alpha, callback.choice = 1.0, "chose alpha 1.00: lowest target NLL 1.0000"
    resumed = WiSEFT(alphas=[0.0, 1.0])
    resumed.load_state_dict(callback.state_dict())
    assert resumed.results == callback.results and resumed.chosen_alpha == 1.0 and resumed.choice == callback.choice


def test_lora_runs_fail_clearly(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    lm = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    module = SimpleNamespace(lm=lm, hparams=SimpleNamespace(generate=True))
    with pytest.raises(ValueError, match="full fine-tuning weights"):
        WiSEFT().on_fit_start(None, module)


# -- end to end ------------------------------------------------------------------------------------
class FinalWeights(Callback):
    """Records the weights as training ends, before any on_fit_end hook (last.ckpt holds the last
    validation's state, which need not be the final step's)."""

    def on_train_end(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.lm.state_dict().items()}


LIMIT = 8  # ARC-Easy documents per general benchmark event


@pytest.fixture(scope="module")
def fitted(tiny_model_dir, tmp_path_factory):
    """8 training rows, 2 optimizer steps, validation after each: the best checkpoint (step 1 on
    ties) differs from the final weights (step 2). quickstart.yaml brings ForgettingMonitor;
    GeneralBenchmarks runs 8 ARC-Easy documents per event."""
    out = tmp_path_factory.mktemp("wiseft")
    stdout = io.StringIO()  # not a terminal: plain progress lines, as in a log file
    info = logging.StreamHandler(stdout)  # and Lightning's info lines, which go to stderr
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(info)
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
            mp.chdir(out)  # lm-eval records `git describe` of the working directory; keep it out of the repo
            cli = fit_with_wiseft(tiny_model_dir, out)
    finally:
        logger.removeHandler(info)
    log_dir = Path(cli.trainer.log_dir)
    (out / "stdout.log").write_text(stdout.getvalue())
    return cli, log_dir, json.loads((log_dir / "wiseft.json").read_text())["results"]


def fit_with_wiseft(tiny_model_dir, out):
    return build_cli([
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
        "--trainer.callbacks+=callbacks.general_benchmarks.GeneralBenchmarks",
        "--trainer.callbacks.tasks=[talr_arc_easy]", f"--trainer.callbacks.data_dir={SHARED / 'data'}",
        f"--trainer.callbacks.limit={LIMIT}", "--trainer.callbacks.batch_size=4", "--trainer.callbacks.threshold=0.0",
        "--trainer.callbacks+=callbacks.model_averaging.WiSEFT",
        "--trainer.callbacks.alphas=[0.0,0.5,1.0]",
        "--trainer.callbacks+=test_model_averaging.FinalWeights",
    ])


def test_each_mix_is_a_progress_line_in_a_log_file(fitted):
    cli, _, results = fitted
    lines = (Path(cli.trainer.default_root_dir) / "stdout.log").read_text().splitlines()
    assert "[wiseft] started: 3 mixes" in lines
    assert any(re.fullmatch(r"\[wiseft\] done: 3 mixes in (\d+h)?(\d+m)?\d+s", line) for line in lines)
    for result in results:  # one line per mix with its own numbers, in grid order
        tag = f"wiseft_alpha{result['alpha']:.2f}"
        line = next(line for line in lines if line.startswith(f"[wiseft] {tag}: "))
        assert f"target NLL {result['metrics']['loss']:.4f}" in line


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


def general_record(log_dir: Path, name: str) -> dict:
    return json.loads((log_dir / "general" / f"{name}.json").read_text())


def test_chosen_alpha_is_exported_plotted_and_logged(fitted, tiny_model_dir):
    cli, log_dir, results = fitted
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, WiSEFT))
    # the default rule, worked here from the files: the best general score among the alphas within 0.01 of the
    # best accuracy (ties: the smaller alpha)
    accuracy = {r["alpha"]: r["metrics"]["accuracy"] for r in results}
    general = {a: general_record(log_dir, f"wiseft_alpha{a:.2f}")["general"]["score"] for a in accuracy}
    top = max(accuracy.values())
    within = [a for a in sorted(accuracy) if accuracy[a] >= top - 0.01 - 1e-9]
    expected = max(within, key=lambda a: (general[a], -a))
    assert callback.chosen_alpha == expected
    report = json.loads((log_dir / "wiseft.json").read_text())
    assert report["chosen_alpha"] == expected and report["select"] == "general_within_margin" and report["margin"] == 0.01
    assert report["chosen"] == next(r for r in results if r["alpha"] == expected)
    assert report["choice"].startswith(f"chose alpha {expected:.2f}: best general score {general[expected]:.3f} among "
                                       f"alphas within 0.01 of the best domain accuracy {top:.3f}")
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
    logged = {e.step: e.value for e in events.Scalars("wiseft/general/score")}
    assert [logged[s] for s in (0, 50, 100)] == pytest.approx([general[a] for a in (0.0, 0.5, 1.0)])
    logged = {e.step: e.value for e in events.Scalars("wiseft/forgetting/kl")}
    assert [logged[s] for s in (0, 50, 100)] == pytest.approx([r["forgetting"][0]["kl"] for r in results])
    # GeneralBenchmarks' own curve holds only its events: before training and the best checkpoint at fit end
    assert [e.step for e in events.Scalars("general/score")] == [0, cli.trainer.global_step]


def test_general_scores_at_the_endpoints_are_the_initial_and_the_best_models(fitted):
    """alpha 0 is the initial model (GeneralBenchmarks' fit-start event), alpha 1 the best checkpoint
    (its fit-end event): the same primary metrics and per-document vectors, measured again."""
    cli, log_dir, results = fitted
    start, end = general_record(log_dir, "fit_start"), general_record(log_dir, "fit_end")
    at0, at1 = general_record(log_dir, "wiseft_alpha0.00"), general_record(log_dir, "wiseft_alpha1.00")
    assert end["weights"].startswith("best checkpoint")
    for mixed, reference in ((at0, start), (at1, end)):
        assert mixed["primary"] == reference["primary"]
        assert mixed["per_document"] == reference["per_document"]
        assert mixed["per_document"]["talr_arc_easy"]["doc_ids"] == list(range(LIMIT))
        assert mixed["general"] == reference["general"]
    assert at0["weights"].startswith("WiSE-FT alpha 0.00: 1 x initial model + 0 x best checkpoint")
    # the paired comparison with the initial model: alpha 0 against itself changes nothing, alpha 1 is the fit end's
    paired = at0["paired"]["talr_arc_easy"]
    assert (paired["n"], paired["b"], paired["c"], paired["delta"]) == (LIMIT, 0, 0, 0.0)
    assert at1["paired"] == end["paired"] and at1["general_paired"] == end["general_paired"]
    # the middle alpha: its delta is its own score minus the initial one, from its own documents
    middle = general_record(log_dir, "wiseft_alpha0.50")
    before = start["per_document"]["talr_arc_easy"]["values"]
    after = middle["per_document"]["talr_arc_easy"]["values"]
    assert sum(after) / LIMIT == pytest.approx(middle["primary"]["talr_arc_easy"])
    assert middle["paired"]["talr_arc_easy"]["delta"] == pytest.approx((sum(after) - sum(before)) / LIMIT)
    # GeneralBenchmarks kept its own events as they were: WiSE-FT's records are not among them
    benchmark = next(c for c in cli.trainer.callbacks if isinstance(c, GeneralBenchmarks))
    assert [e["event"] for e in benchmark.events] == ["fit_start", "fit_end"]


def test_forgetting_at_alpha_0_is_the_initial_models_and_at_alpha_1_the_best_steps(fitted):
    cli, log_dir, results = fitted
    by_alpha_forgetting = {r["alpha"]: r["forgetting"][0] for r in results}
    initial = by_alpha_forgetting[0.0]
    assert initial["kl"] == pytest.approx(0.0, abs=1e-6) and initial["nll_increase"] == pytest.approx(0.0, abs=1e-6)
    assert initial["agreement"] == 1.0
    # every number at alpha 0 is the initial model's (the monitor's step 0; kl_calibrated there is the KL at the
    # best-fitting temperature, not 1, so it need not be 0), and alpha 1 holds the best checkpoint's weights,
    # which the monitor scored at that step's validation
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, ForgettingMonitor))
    best_step = torch.load(cli.trainer.checkpoint_callback.best_model_path, map_location="cpu", weights_only=True)["global_step"]
    at_best = next(e for e in monitor.curve if e["step"] == best_step)
    for alpha, reference in ((0.0, monitor.curve[0]), (1.0, at_best)):
        for key in ("kl", "nll_increase", "agreement", "entropy", "kl_calibrated", "temperature", "nll"):
            assert by_alpha_forgetting[alpha][key] == pytest.approx(reference[key], abs=1e-6), (alpha, key)
    assert by_alpha_forgetting[0.5]["tokens"] == at_best["tokens"]
    # the monitor's own curve: one entry per validation, none from WiSE-FT
    assert [e["step"] for e in monitor.curve] == [0, 1, 2]
    assert [e["step"] for e in json.loads((log_dir / "forgetting" / "curve.json").read_text())] == [0, 1, 2]


def test_each_alphas_drift_is_kept_prompt_by_prompt(fitted):
    cli, log_dir, results = fitted
    best_step = torch.load(cli.trainer.checkpoint_callback.best_model_path, map_location="cpu", weights_only=True)["global_step"]

    def read(name):
        lines = (log_dir / "forgetting" / "prompt_scores" / f"{name}.jsonl").read_text().splitlines()
        return {p["prompt_index"]: p for p in map(json.loads, lines)}

    at_best, initial = read(f"step{best_step:06d}"), read("wiseft_alpha0.00")
    # alpha 1 holds the best checkpoint's weights: the monitor's own prompt sums at that step, prompt by prompt
    for index, prompt in read("wiseft_alpha1.00").items():
        for key in ("tokens", "agreement", "nll", "kl", "entropy"):
            assert prompt[key] == pytest.approx(at_best[index][key], abs=1e-6), (index, key)
    # alpha 0 is the initial model: on its own answers it agrees on every token and its KL to itself is 0
    assert set(initial) == set(at_best) == set(read("wiseft_alpha0.50"))
    for prompt in initial.values():
        assert prompt["agreement"] == prompt["tokens"] and prompt["kl"] == pytest.approx(0.0, abs=1e-6)
    # the tokens-weighted means of a mix's file are the numbers WiSE-FT reported for it
    half = read("wiseft_alpha0.50").values()
    reported = next(r["forgetting"][0] for r in results if r["alpha"] == 0.5)
    tokens = sum(p["tokens"] for p in half)
    assert sum(p["agreement"] for p in half) / tokens == pytest.approx(reported["agreement"])
    assert sum(p["kl"] for p in half) / tokens == pytest.approx(reported["kl"])


def test_every_alpha_is_a_row_of_the_run_summary(fitted):
    cli, log_dir, results = fitted
    summary = json.loads((log_dir / "summary.json").read_text())
    rows = {row["alpha"]: row for row in summary["wiseft"]}
    assert sorted(rows) == [0.0, 0.5, 1.0] and summary["wiseft_select"] == "general_within_margin"
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, WiSEFT))
    assert summary["wiseft_alpha"] == callback.chosen_alpha
    for result in results:
        row = rows[result["alpha"]]
        record = general_record(log_dir, f"wiseft_alpha{result['alpha']:.2f}")
        assert row["val_accuracy_best"] == result["metrics"]["accuracy"] and row["val_loss_best"] == result["metrics"]["loss"]
        assert row["general_best"] == record["general"]["score"]
        assert row["general_delta"] == pytest.approx(record["general"]["score"] - summary["general_initial"])
        assert row["general_file_best"] == f"general/wiseft_alpha{result['alpha']:.2f}.json"
        assert row["forgetting_kl_best"] == result["forgetting"][0]["kl"]
        assert row["domain_generations_file"] == f"generations/wiseft_alpha{result['alpha']:.2f}.jsonl"
        assert row["wiseft_chosen"] == (result["alpha"] == callback.chosen_alpha)
    # alpha 1 is the run's best checkpoint, on the domain and the general side
    assert rows[1.0]["val_accuracy_best"] == summary["domain_best"] and rows[1.0]["general_best"] == summary["general_best"]
    assert rows[0.0]["val_accuracy_best"] == summary["domain_initial"]


def test_a_domain_metric_the_task_does_not_log_stops_at_the_first_validation(fitted):
    cli, _, _ = fitted
    logged = sorted(k.removeprefix("val/") for k in cli.trainer.callback_metrics if k.startswith("val/"))
    assert "accuracy" in logged and "label_auc" not in logged  # the MedCalc-style task of the quickstart
    WiSEFT().on_validation_end(cli.trainer, cli.model)  # accuracy: there
    with pytest.raises(ValueError, match=re.escape("WiSEFT.domain_metric 'label_auc' is not a metric of this task's "
                                                   f"validation; it logs {', '.join(logged)}")):
        WiSEFT(domain_metric="label_auc").on_validation_end(cli.trainer, cli.model)
    WiSEFT(select="loss", domain_metric="label_auc").on_validation_end(cli.trainer, cli.model)  # loss needs none


def test_a_middle_alpha_selected_on_loss_is_exported_as_the_mix(fitted, tiny_model_dir, tmp_path):
    """Rerun the sweep on the fitted trainer with one alpha strictly inside (0, 1)."""
    cli, log_dir, _ = fitted
    live = {k: v.clone() for k, v in cli.model.lm.state_dict().items()}
    callback = WiSEFT(alphas=[0.3], select="loss", general_alphas=[], dirpath=str(tmp_path))
    callback.on_fit_end(cli.trainer, cli.model)
    report = json.loads((tmp_path / "wiseft.json").read_text())
    assert callback.chosen_alpha == 0.3 and report["results"][0]["alpha"] == 0.3 and report["chosen_alpha"] == 0.3
    # general_alphas: [] leaves lm-eval out (forgetting is still measured)
    assert "general" not in report["results"][0] and report["results"][0]["forgetting"]
    assert not (log_dir / "general" / "wiseft_alpha0.30.json").exists()
    assert_export_is_the_mix(tmp_path / "wiseft_export", tiny_model_dir,
                             cli.trainer.checkpoint_callback.best_model_path, 0.3)
    assert all(torch.equal(v, live[k]) for k, v in cli.model.lm.state_dict().items())
