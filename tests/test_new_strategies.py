"""EAFT, ASFT (DFT + KL(initial || model)), selective token masking and Rho-1 against float64
references written here from the papers' formulas, and one short `talr fit` per medcalc config."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cli import build_cli
from talr.losses import DFT, EAFT, CrossEntropy, KLToInitial, Rho1, SelectiveTokenMasking, TokenBatch
from talr.module import SFTModule

REPO = Path(__file__).resolve().parents[1]


def tokens(seed: int, n: int = 12, vocab: int = 30):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2.5
    ref_logits = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2.5
    targets = torch.randint(0, vocab, (n,), generator=g)
    seq = torch.arange(n) // 3
    return logits, ref_logits, targets, seq


def log_softmax_row(row: list[float]) -> list[float]:
    z = math.log(sum(math.exp(x) for x in row))
    return [x - z for x in row]


def ref_nll(logits: torch.Tensor, targets: torch.Tensor) -> list[float]:
    return [-log_softmax_row(row)[t] for row, t in zip(logits.tolist(), targets.tolist())]


def eaft_weight(row: list[float], alpha: float, k: int) -> float:
    """Paper: w = (H / ln K)^alpha, H the entropy of the softmax over the K largest logits."""
    top = sorted(row, reverse=True)[:k]
    logp = log_softmax_row(top)
    entropy = -sum(math.exp(lp) * lp for lp in logp)
    return (entropy / math.log(len(top))) ** alpha


def weighted_ce_grad(logits: torch.Tensor, targets: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Gradient of sum_i w_i * CE_i with the weights as constants."""
    leaf = logits.clone().requires_grad_(True)
    (torch.tensor(weights, dtype=torch.float64) * F.cross_entropy(leaf, targets, reduction="none")).sum().backward()
    return leaf.grad


def run(strategy, logits, targets, seq, ref_logits=None, micro_batches=1):
    """The strategy's total and gradient w.r.t. the logits, fed in `micro_batches` slices as the
    module does with gradient accumulation (each slice's sum, backward per slice)."""
    leaf = logits.clone().requires_grad_(True)
    total = 0.0
    for part in torch.arange(len(targets)).tensor_split(micro_batches):
        nll = F.cross_entropy(leaf[part], targets[part], reduction="none")
        batch = TokenBatch(nll, seq[part] - seq[part].min(), int(seq[part].max() - seq[part].min() + 1), logits=leaf[part])
        if ref_logits is not None:
            batch.ref_logits = ref_logits[part]
            batch.ref_nll = F.cross_entropy(ref_logits[part], targets[part], reduction="none")
        out = strategy(batch)
        out.total.backward()
        total += out.total.item()
    return total, leaf.grad


@pytest.mark.parametrize("alpha,k", [(1.0, 20), (0.5, 5), (2.0, 50)])  # k = 50 > vocab: capped at 30
@pytest.mark.parametrize("micro_batches", [1, 3])
def test_eaft_loss_and_gradient_match_the_paper_formula(alpha, k, micro_batches):
    logits, _, targets, seq = tokens(0)
    weights = [eaft_weight(row, alpha, k) for row in logits.tolist()]
    expected = sum(w * l for w, l in zip(weights, ref_nll(logits, targets)))
    total, grad = run(EAFT(alpha=alpha, k=k), logits, targets, seq, micro_batches=micro_batches)
    assert total == pytest.approx(expected, rel=1e-10)
    # the weight is detached: no gradient flows through the entropy
    torch.testing.assert_close(grad, weighted_ce_grad(logits, targets, weights), rtol=1e-10, atol=1e-12)


def test_eaft_weight_is_one_for_a_flat_top_k_and_near_zero_for_a_confident_prediction():
    flat = torch.zeros(1, 10, dtype=torch.float64)
    confident = torch.tensor([[40.0] + [0.0] * 9], dtype=torch.float64)
    assert EAFT(k=10).weights(flat).item() == pytest.approx(1.0)
    assert EAFT(k=10).weights(confident).item() < 1e-12


@pytest.mark.parametrize("micro_batches", [1, 4])
def test_asft_is_dft_plus_beta_kl_initial_to_model_over_the_vocabulary(micro_batches):
    logits, ref_logits, targets, seq = tokens(1)
    beta = 0.1
    expected = 0.0
    for row, ref_row, t in zip(logits.tolist(), ref_logits.tolist(), targets.tolist()):
        logp, logq = log_softmax_row(row), log_softmax_row(ref_row)
        dft = math.exp(logp[t]) * -logp[t]  # p_t (detached) * CE
        kl = sum(math.exp(b) * (b - a) for a, b in zip(logp, logq))  # KL(initial || model)
        expected += dft + beta * kl
    asft = KLToInitial(beta=beta, estimator="exact", direction="initial_model", base=DFT())
    total, grad = run(asft, logits, targets, seq, ref_logits, micro_batches)
    assert total == pytest.approx(expected, rel=1e-10)

    # d/dz of sum_v q_v (log q_v - log p_v) is p - q per row; DFT's part is p_t (constant) * d CE
    p, q = logits.softmax(-1), ref_logits.softmax(-1)
    weights = [math.exp(-x) for x in ref_nll(logits, targets)]
    expected_grad = weighted_ce_grad(logits, targets, weights) + beta * (p - q)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_the_default_kl_direction_is_unchanged_and_the_reverse_direction_needs_exact():
    logits, ref_logits, targets, seq = tokens(2)
    forward, _ = run(KLToInitial(beta=1.0, estimator="exact", base=CrossEntropy()), logits, targets, seq, ref_logits)
    kl = sum(sum(math.exp(a) * (a - b) for a, b in zip(log_softmax_row(r), log_softmax_row(s)))
             for r, s in zip(logits.tolist(), ref_logits.tolist()))  # KL(model || initial)
    assert forward == pytest.approx(sum(ref_nll(logits, targets)) + kl, rel=1e-10)
    with pytest.raises(ValueError, match="direction 'initial_model' needs estimator 'exact'"):
        KLToInitial(direction="initial_model")
    with pytest.raises(ValueError, match="direction must be"):
        KLToInitial(estimator="exact", direction="reverse")


@pytest.mark.parametrize("threshold", [2.5, 20.0])
@pytest.mark.parametrize("micro_batches", [1, 3])
def test_stm_masks_tokens_above_the_reference_perplexity_threshold(threshold, micro_batches):
    logits, ref_logits, targets, seq = tokens(3)
    targets[::2] = ref_logits.argmax(-1)[::2]  # some tokens the reference finds easy
    ppl = [math.exp(x) for x in ref_nll(ref_logits, targets)]
    keep = [1.0 if x <= threshold else 0.0 for x in ppl]
    assert 0 < sum(keep) < len(keep)  # the case masks some tokens and keeps some
    expected = sum(k * l for k, l in zip(keep, ref_nll(logits, targets)))
    total, grad = run(SelectiveTokenMasking(threshold), logits, targets, seq, ref_logits, micro_batches)
    assert total == pytest.approx(expected, rel=1e-10)
    torch.testing.assert_close(grad, weighted_ce_grad(logits, targets, keep), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ratio", [0.25, 0.6, 1.0])
def test_rho1_trains_the_top_share_of_excess_loss_in_the_batch(ratio):
    logits, ref_logits, targets, seq = tokens(4)
    nll, ref = ref_nll(logits, targets), ref_nll(ref_logits, targets)
    excess = [a - b for a, b in zip(nll, ref)]
    count = math.ceil(ratio * len(nll))
    chosen = sorted(range(len(nll)), key=lambda i: excess[i], reverse=True)[:count]
    keep = [1.0 if i in chosen else 0.0 for i in range(len(nll))]
    total, grad = run(Rho1(ratio), logits, targets, seq, ref_logits)
    assert total == pytest.approx(sum(k * l for k, l in zip(keep, nll)), rel=1e-10)
    torch.testing.assert_close(grad, weighted_ce_grad(logits, targets, keep), rtol=1e-10, atol=1e-12)


def test_rho1_selects_within_each_micro_batch():
    """Documented behaviour: with micro-batches each selects its own top share (not the step's)."""
    logits, ref_logits, targets, seq = tokens(5)
    nll, ref = ref_nll(logits, targets), ref_nll(ref_logits, targets)
    keep = []
    for part in torch.arange(12).tensor_split(2).__iter__():
        excess = {i: nll[i] - ref[i] for i in part.tolist()}
        keep += sorted(excess, key=excess.get, reverse=True)[:math.ceil(0.5 * len(excess))]
    total, _ = run(Rho1(0.5), logits, targets, seq, ref_logits, micro_batches=2)
    assert total == pytest.approx(sum(nll[i] for i in keep), rel=1e-10)


def test_empty_batches_give_zero():
    empty = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    none = torch.zeros(0, dtype=torch.long)
    for strategy in (SelectiveTokenMasking(), Rho1()):
        assert strategy(TokenBatch(empty, none, 2, ref_nll=empty.detach())).total.item() == 0.0
    assert EAFT()(TokenBatch(empty, none, 2, logits=torch.zeros(0, 5, dtype=torch.float64))).total.item() == 0.0


def test_options_that_cannot_work_stop_with_the_reason():
    with pytest.raises(ValueError, match="alpha must be positive"):
        EAFT(alpha=0)
    with pytest.raises(ValueError, match="k must be at least 2"):
        EAFT(k=1)
    with pytest.raises(ValueError, match="threshold is a perplexity"):
        SelectiveTokenMasking(threshold=0.5)
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        Rho1(ratio=0.0)
    with pytest.raises(ValueError, match="loss_chunk_size: loss EAFT.*needs full logits; unset the chunk size"):
        SFTModule(model="org/never-loaded", loss=EAFT(), loss_chunk_size=64)
    with pytest.raises(ValueError, match="model.reference: loss CrossEntropy.*uses no reference model"):
        SFTModule(model="org/never-loaded", loss=CrossEntropy(), reference="org/other")
    SFTModule(model="org/never-loaded", loss=SelectiveTokenMasking(), loss_chunk_size=64)  # NLL only: chunking works


def fit_config(name: str, tiny_model_dir: Path, out: Path, *extra: str):
    return build_cli([
        "fit", "--config", str(REPO / "configs" / "medcalc" / f"{name}.yaml"), "--model.model", str(tiny_model_dir),
        "--model.generate", "false", "--model.learning_rate", "1e-3", "--trainer.callbacks", "[]",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_steps", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
        "--data.task.init_args.source", "synthetic", "--data.task.init_args.num_synthetic", "12",
        "--data.test_task.init_args.source", "synthetic", "--data.max_length", "384",
        "--data.val_size", "4", "--data.batch_size", "4", "--data.micro_batch_size", "2", "--data.eval_batch_size", "4",
        "--validate_before_fit", "false", "--trainer.limit_val_batches", "0",
        "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out), *extra,
    ])


@pytest.mark.usefixtures("one_cpu_thread")
@pytest.mark.parametrize("name,metric", [("eaft", "eaft/weight_mean"), ("asft", "kl/kl"),
                                         ("stm", "stm/kept_share"), ("rho1", "rho1/kept_share")])
def test_each_config_trains_two_steps(name, metric, tiny_model_dir, tmp_path):
    cli = fit_config(name, tiny_model_dir, tmp_path)
    assert cli.trainer.global_step == 2
    value = cli.trainer.callback_metrics[f"train/{metric}"].item()
    assert math.isfinite(value) and value >= 0
    if name == "rho1":
        assert 0.6 <= value <= 0.8  # ceil(0.6 N) of each micro-batch's N tokens


@pytest.mark.usefixtures("one_cpu_thread")
def test_rho1_with_another_reference_model_loads_it(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other.save_pretrained(tmp_path / "reference")
    for file in Path(tiny_model_dir).glob("*token*"):  # the same tokenizer
        (tmp_path / "reference" / file.name).write_bytes(file.read_bytes())
    cli = fit_config("rho1", tiny_model_dir, tmp_path / "run", "--model.reference", str(tmp_path / "reference"))
    reference = cli.model._reference[0].lm.state_dict()
    expected = other.state_dict()
    assert all(torch.equal(reference[k], expected[k]) for k in expected)
    assert cli.trainer.global_step == 2
