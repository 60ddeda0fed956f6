"""Loss math against brute-force float64 references written independently of talr.losses."""

import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from talr.losses import DFT, FLOW, TALR, CrossEntropy, HardGate, KLToInitial, L2Anchor, Needs, TokenBatch
from talr.token_loss import IGNORE_INDEX, target_token_nll


def reference_talr(nll: list[float], seq: list[int], w_min: float, tau: float | None = None):
    """Per-token weights and weighted sum, by plain Python loops."""
    if tau is None:
        by_seq: dict[int, list[float]] = {}
        for loss, s in zip(nll, seq):
            by_seq.setdefault(s, []).append(loss)
        tau = statistics.median(sum(v) / len(v) for v in by_seq.values())
    weights = [max(math.exp(-loss / max(tau, 1e-6)), w_min) for loss in nll]
    return weights, sum(w * loss for w, loss in zip(weights, nll)), tau


def random_tokens(seed: int, n_seqs: int = 5, vocab: int = 11):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 7, (n_seqs,), generator=g).tolist()
    seq = torch.tensor([s for s, n in enumerate(lengths) for _ in range(n)])
    logits = torch.randn(len(seq), vocab, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, vocab, (len(seq),), generator=g)
    return logits, targets, seq, n_seqs


def test_ce_is_the_plain_sum():
    logits, targets, seq, n = random_tokens(0)
    nll = F.cross_entropy(logits, targets, reduction="none")
    out = CrossEntropy()(TokenBatch(nll, seq, n))
    rows, tgt = logits.tolist(), targets.tolist()
    expected = sum(math.log(sum(math.exp(x) for x in row)) - row[t] for row, t in zip(rows, tgt))
    assert out.total.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("w_min", [0.01, 0.2])
def test_talr_weights_tau_and_sum_match_brute_force(seed, w_min):
    logits, targets, seq, n = random_tokens(seed)
    nll = F.cross_entropy(logits, targets, reduction="none")
    weights, total, tau = reference_talr(nll.tolist(), seq.tolist(), w_min)
    strategy = TALR(w_min=w_min, tau_scope="local")
    out = strategy(TokenBatch(nll, seq, n))
    assert out.metrics["tau"].item() == pytest.approx(tau, rel=1e-9)
    assert out.total.item() == pytest.approx(total, rel=1e-9)
    assert out.metrics["weight_mean"].item() == pytest.approx(sum(weights) / len(weights), rel=1e-9)
    at_cutoff = sum(w <= w_min for w in weights) / len(weights)
    assert out.metrics["cutoff_share"].item() == pytest.approx(at_cutoff)


def test_talr_weight_is_probability_to_the_power_one_over_tau():
    p = torch.tensor([0.9, 0.5, 0.2, 0.05], dtype=torch.float64)
    nll = -p.log()
    tau = 0.7
    out = TALR(w_min=1e-9, tau=tau)(TokenBatch(nll, torch.arange(4), 4))
    assert out.total.item() == pytest.approx(float((p ** (1 / tau) * nll).sum()), rel=1e-12)


def test_cutoff_keeps_hard_tokens_learning():
    nll = torch.tensor([0.01, 0.02, 30.0], dtype=torch.float64)  # one very hard token
    out = TALR(w_min=0.2)(TokenBatch(nll, torch.tensor([0, 0, 1]), 2))  # tau = 15.0075, exp(-2) < 0.2
    assert out.total.item() == pytest.approx(float(reference_talr(nll.tolist(), [0, 0, 1], 0.2)[1]))
    assert out.metrics["cutoff_share"].item() == pytest.approx(1 / 3)


def test_median_of_an_even_count_averages_the_middle_pair():
    nll = torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=torch.float64)
    out = TALR(w_min=1e-9, tau_scope="local")(TokenBatch(nll, torch.arange(4), 4))
    assert out.metrics["tau"].item() == pytest.approx(2.5)


def test_gradient_equals_weighted_ce_with_detached_weights():
    logits, targets, seq, n = random_tokens(3)
    leaf = logits.clone().requires_grad_(True)
    nll = F.cross_entropy(leaf, targets, reduction="none")
    TALR(w_min=0.01, tau_scope="local")(TokenBatch(nll, seq, n)).total.backward()

    weights, _, _ = reference_talr(F.cross_entropy(logits, targets, reduction="none").tolist(), seq.tolist(), 0.01)
    ref_leaf = logits.clone().requires_grad_(True)
    (torch.tensor(weights, dtype=torch.float64) * F.cross_entropy(ref_leaf, targets, reduction="none")).sum().backward()
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-10, atol=1e-12)


def test_step_losses_set_tau_for_every_micro_batch():
    """Given the whole step's sequence losses, each micro-batch uses the step median."""
    nll = torch.tensor([0.5, 1.5, 4.0], dtype=torch.float64)
    step = torch.tensor([0.5, 1.5, 4.0, 9.0, float("nan")], dtype=torch.float64)  # NaN: a row without targets
    out = TALR(w_min=1e-9)(TokenBatch(nll, torch.arange(3), 3, step_seq_losses=step))
    assert out.metrics["tau"].item() == pytest.approx(statistics.median([0.5, 1.5, 4.0, 9.0]))


def test_zero_tau_and_fully_masked_batches_stay_finite():
    zero = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    out = TALR()(TokenBatch(zero, torch.tensor([0, 0, 1, 1]), 2))  # every sequence perfect: tau = 0
    assert torch.isfinite(out.total) and out.metrics["tau"].item() == 0.0
    out.total.backward()
    assert torch.isfinite(zero.grad).all()

    empty = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    out = TALR()(TokenBatch(empty, torch.zeros(0, dtype=torch.long), 3))  # every target masked
    assert out.total.item() == 0.0 and torch.isfinite(out.metrics["tau"])


def test_option_errors():
    with pytest.raises(TypeError, match="wmin"):
        TALR(wmin=0.1)
    with pytest.raises(ValueError, match="w_min"):
        TALR(w_min=0.0)
    with pytest.raises(ValueError, match="tau"):
        TALR(tau=-1.0)


def test_needs_of_a_regulariser_are_its_own_and_its_base_s():
    # What each strategy needs, written out by hand from its definition
    assert CrossEntropy().needs == Needs() and DFT().needs == Needs()
    assert TALR().needs == Needs(step_losses=True)  # the step's median, over all micro-batches
    assert TALR(tau=0.5).needs == Needs() and TALR(tau_scope="local").needs == Needs()
    assert FLOW().needs == Needs(sequence_weights=True)
    assert KLToInitial().needs == Needs(reference=True)
    assert KLToInitial(estimator="exact", base=TALR()).needs == Needs(reference=True, logits=True, step_losses=True)
    assert KLToInitial(base=FLOW()).needs == Needs(reference=True, sequence_weights=True)
    assert L2Anchor(base=TALR(tau_scope="local")).needs == Needs(anchor=True)
    assert L2Anchor(base=FLOW()).needs == Needs(sequence_weights=True, anchor=True)
    # the field-wise union, against every pair of single-field needs
    names = ["reference", "logits", "sequence_weights", "step_losses", "anchor"]
    for a in names:
        for b in names:
            assert (Needs(**{a: True}) | Needs(**{b: True})) == Needs(**{a: True, b: True})


def test_token_strategy_is_the_strategy_or_the_regularisers_base():
    talr = TALR(w_min=0.05)
    assert talr.token_strategy is talr
    assert KLToInitial(base=talr).token_strategy is talr and L2Anchor(base=talr).token_strategy is talr
    assert isinstance(L2Anchor().token_strategy, CrossEntropy)  # the default base
    with pytest.raises(ValueError, match="base must be a token strategy"):
        L2Anchor(base=KLToInitial())
    with pytest.raises(TypeError, match="base must be a loss strategy"):
        KLToInitial(base="talr")


def test_config_is_plain_data_in_the_config_form():
    strategy = KLToInitial(beta=0.2, base=TALR(w_min=0.05, tau_scope="local"))
    assert strategy.config() == {
        "class_path": "talr.losses.KLToInitial",
        "init_args": {"beta": 0.2, "estimator": "k3", "direction": "model_initial", "base": {
            "class_path": "talr.losses.TALR",
            "init_args": {"w_min": 0.05, "tau": None, "tau_scope": "local", "tau_floor": 1e-6}}},
    }
    assert CrossEntropy().config() == {"class_path": "talr.losses.CrossEntropy", "init_args": {}}
    assert repr(L2Anchor(lam=0.5)) == "L2Anchor(lam=0.5, reduction='sum', base=CrossEntropy())"


def test_target_token_nll_matches_full_logits_cross_entropy():
    """Projecting only target positions equals the usual shifted CE over full logits."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(13, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 13, (3, 7), generator=g)
    labels[:, :3] = IGNORE_INDEX  # prompt
    labels[2, 5:] = IGNORE_INDEX  # padding
    nll, seq = target_token_nll(hidden, weight, labels)

    logits = hidden @ weight.T
    expected, rows = [], []
    for b in range(3):
        for t in range(6):
            if labels[b, t + 1] != IGNORE_INDEX:
                expected.append(-torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]])
                rows.append(b)
    torch.testing.assert_close(nll.double(), torch.stack(expected), rtol=1e-6, atol=1e-6)
    assert seq.tolist() == rows
    # the same total as torch's mean CE with ignore_index, times the token count
    full = F.cross_entropy(logits[:, :-1].reshape(-1, 13), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert nll.sum().item() == pytest.approx(full.item() * len(rows), rel=1e-6)


@pytest.mark.parametrize("threshold", [0.2, 0.05])
def test_hard_gate_trains_only_tokens_above_the_threshold(threshold):
    logits, targets, seq, n = random_tokens(4, n_seqs=8)
    leaf = logits.clone().requires_grad_(True)
    out = HardGate(threshold)(TokenBatch(F.cross_entropy(leaf, targets, reduction="none"), seq, n))
    out.total.backward()
    # from the definition: the target's softmax probability, by hand, against the threshold
    probs = [math.exp(row[t]) / sum(math.exp(v) for v in row) for row, t in zip(logits.tolist(), targets.tolist())]
    kept = [p > threshold for p in probs]
    assert 0 < sum(kept) < len(kept), "the draw must have tokens on both sides of the threshold"
    assert float(out.total) == pytest.approx(sum(-math.log(p) for p, k in zip(probs, kept) if k), rel=1e-12)
    assert float(out.metrics["passed_share"]) == pytest.approx(sum(kept) / len(kept))
    for row, (p, k) in enumerate(zip(probs, kept)):  # a gated token has no gradient at all
        assert bool(leaf.grad[row].abs().sum() > 0) == k
    with pytest.raises(ValueError, match="threshold must be in"):
        HardGate(1.0)
