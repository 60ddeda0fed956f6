"""talr.stats against computations written here from each method's definition: binomial sums with
math.comb, a published McNemar p-value and Tango interval, the closed-form quartic of Tango's
interval, a bootstrap and a full sign-flip enumeration written out, and the t formula; the
classification metrics against sklearn's roc_auc_score and balanced_accuracy_score."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from talr.stats import (PairedComparison, PairedItems, _picked_ovr_auc, compare_auc, compare_balanced_accuracy, compare_binary,
                        false_discovery_threshold,
                        combine_replicates, compare_paired, compare_replicates, mcnemar_exact_p, mean_score, one_vs_rest_auc, pair_by_id,
                        paired_bootstrap_interval, sign_flip_p, tango_interval)

Z95 = scipy_stats.norm.ppf(0.975)


def two_sided_binomial_tail(b: int, c: int) -> float:
    """min(1, 2 P[Binom(b + c, 1/2) <= min(b, c)]), summed term by term."""
    n = b + c
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def vectors(b: int, c: int, both_right: int, both_wrong: int) -> tuple[list[int], list[int]]:
    """0/1 scores before / after with the given discordant and concordant counts."""
    before = [1] * b + [0] * c + [1] * both_right + [0] * both_wrong
    after = [0] * b + [1] * c + [1] * both_right + [0] * both_wrong
    return before, after


@pytest.mark.parametrize("b, c, by_hand", [
    (2, 9, 2 * (1 + 11 + 55) / 2 ** 11),  # C(11,0) + C(11,1) + C(11,2) = 67
    (0, 5, 2 / 2 ** 5),
    (9, 2, 2 * (1 + 11 + 55) / 2 ** 11),  # symmetric in b and c
    (4, 4, 1.0),                           # b = c: twice a tail above 1/2, capped
    (0, 0, 1.0),                           # no discordant document
    (1, 7, 18 / 256),                      # 2 (1 + 8) / 2^8
])
def test_mcnemar_exact_p_value_by_hand(b, c, by_hand):
    assert two_sided_binomial_tail(b, c) == pytest.approx(by_hand, rel=1e-15)
    before, after = vectors(b, c, both_right=13, both_wrong=6)
    comparison = compare_binary(before, after)
    assert (comparison.b, comparison.c, comparison.n) == (b, c, b + c + 19)
    assert comparison.p == pytest.approx(by_hand, rel=1e-12)
    assert mcnemar_exact_p(b, c) == pytest.approx(by_hand, rel=1e-12)
    assert comparison.delta == pytest.approx((c - b) / (b + c + 19))
    assert comparison.before == pytest.approx((b + 13) / (b + c + 19))
    assert comparison.after == pytest.approx((c + 13) / (b + c + 19))


def test_published_airway_example():
    """Fagerland, Lydersen & Laake (2014, Stat Med 33:2850; also BMC Med Res Methodol 13:91): airway
    hyper-responsiveness before / after stem cell transplantation, n = 21 children, 1 + 12
    concordant, discordant 1 and 7. Published: exact conditional McNemar p = 0.070, Tango's
    asymptotic score interval for the difference -0.517 to -0.026 (estimate -0.286)."""
    before, after = vectors(b=7, c=1, both_right=1, both_wrong=12)
    comparison = compare_binary(before, after)
    assert comparison.delta == pytest.approx(-0.286, abs=5e-4)
    assert round(comparison.p, 3) == 0.070
    assert comparison.low == pytest.approx(-0.517, abs=5e-4) and comparison.high == pytest.approx(-0.026, abs=5e-4)


def yang_sun_hardin_quartic_roots(n: int, b: int, c: int) -> np.ndarray:
    """Tango's bounds are roots of a quartic (Yang, Sun & Hardin 2013, "A non-iterative implementation
    of Tango's score confidence interval for a paired difference of proportions", Stat Med): their b
    is the count that raises the difference, so their (b, c) is our (c, b)."""
    g = Z95 ** 2
    up, down = c, b
    m = [n ** 2 * (n / g + 1) ** 2,
         -n * (up - down) * (n / g + 1) * (4 * n / g + 1),
         2 * n * (up - down) ** 2 * (3 * n / g + 2) / g - n ** 2 * ((up + down) / g + 1),
         n * (up - down) * (2 * (up + down) / g + 1) - (up - down) ** 3 * (4 * n / g + 1) / g,
         (up - down) ** 2 * ((up - down) ** 2 / g - (up + down)) / g]
    roots = np.roots(m)
    return np.sort(roots[np.abs(roots.imag) < 1e-9].real)


@pytest.mark.parametrize("b, c, n", [(7, 1, 21), (2, 9, 100), (10, 4, 200), (0, 5, 30), (3, 3, 50), (40, 25, 1000)])
def test_tango_interval_is_the_outer_roots_of_the_closed_form_quartic(b, c, n):
    roots = yang_sun_hardin_quartic_roots(n, b, c)
    low, high = tango_interval(b, c, n)
    assert low == pytest.approx(roots[0], abs=1e-9) and high == pytest.approx(roots[-1], abs=1e-9)


def tango_z(b: int, c: int, n: int, d: float) -> float:
    """Tango's (1998) score statistic for a difference d = p(after) - p(before), from the paper:
    the constrained maximum-likelihood probability of a discordant b-item is the positive root q of
    2n q^2 + (-(b + c) + (2n - c + b) d) q - b d (1 - d) = 0."""
    quad_b = -(b + c) + (2 * n - c + b) * d
    q = (-quad_b + math.sqrt(quad_b ** 2 + 8 * n * b * d * (1 - d))) / (4 * n)
    return (c - b - n * d) / math.sqrt(n * (2 * q + d * (1 - d)))


def test_tango_interval_holds_the_differences_the_score_test_accepts():
    b, c, n = 0, 0, 100  # no discordant pair: the interval still has a width, z^2 / (n + z^2) each side
    low, high = tango_interval(b, c, n)
    assert high == pytest.approx(Z95 ** 2 / (n + Z95 ** 2), abs=1e-10) and low == pytest.approx(-high, abs=1e-10)
    b, c, n = 4, 11, 60
    low, high = tango_interval(b, c, n)
    for d in np.linspace(-0.9, 0.9, 721):
        if abs(d - low) > 1e-6 and abs(d - high) > 1e-6:
            assert (abs(tango_z(b, c, n, d)) <= Z95) == (low < d < high), d
    assert tango_z(b, c, n, low) == pytest.approx(Z95, abs=1e-7) and tango_z(b, c, n, high) == pytest.approx(-Z95, abs=1e-7)
    assert tango_interval(0, 21, 21)[1] == 1.0 and tango_interval(21, 0, 21)[0] == -1.0  # bounded by [-1, 1]


def test_a_zero_change_has_p_one_and_an_interval_around_zero():
    before, _ = vectors(b=0, c=0, both_right=30, both_wrong=20)
    same = compare_binary(before, before)
    assert (same.b, same.c, same.delta, same.p) == (0, 0, 0.0, 1.0)
    assert same.low < 0 < same.high and same.verdict() == "no significant change"


def test_bootstrap_interval_by_its_definition():
    """Items resampled with replacement, the same draws for before and after; the percentile interval
    of the difference of scores (sum of scores / sum of counts). One task: numpy's generator with
    the seed draws the resamples' item indices as a (resamples, items) array."""
    before = [[1, 0], [1, 1, 1], [0], 1, 0, [0, 1], 1, 1, 0, [1, 1]] * 3
    after = [[1, 1], [1, 0, 1], [0], 1, 1, [0, 0], 1, 0, 0, [1, 1]] * 3
    items = PairedItems.from_values(before, after)
    sums_before = np.array([sum(v) if isinstance(v, list) else v for v in before], dtype=float)
    sums_after = np.array([sum(v) if isinstance(v, list) else v for v in after], dtype=float)
    counts = np.array([len(v) if isinstance(v, list) else 1 for v in before], dtype=float)
    rng = np.random.default_rng(7)
    deltas = []
    for picks in rng.integers(0, len(before), size=(2000, len(before))):
        deltas.append((sums_after[picks].sum() - sums_before[picks].sum()) / counts[picks].sum())
    expected = np.quantile(deltas, [0.025, 0.975])
    assert paired_bootstrap_interval(items, resamples=2000, seed=7) == pytest.approx(tuple(expected), abs=1e-12)

    # another generator and more resamples: the same interval up to Monte Carlo error
    loop = np.random.default_rng(12345)
    n = len(before)
    more = [(sums_after[p].sum() - sums_before[p].sum()) / counts[p].sum() for p in loop.integers(0, n, size=(20000, n))]
    low, high = paired_bootstrap_interval(items, resamples=20000, seed=0)
    assert low == pytest.approx(np.quantile(more, 0.025), abs=0.01) and high == pytest.approx(np.quantile(more, 0.975), abs=0.01)


def test_an_unbounded_per_token_sum_keeps_its_whole_interval():
    """Per-row NLL sums over their tokens (not scores in [0, 1]) can change by more than 1 nat per token:
    the interval is the bootstrap's, by its definition, not cut at +-1 as a change of accuracy is."""
    tokens = np.array([10, 20, 30, 40, 25, 15] * 5, dtype=float)
    rng = np.random.default_rng(3)
    before = tokens * rng.uniform(0.3, 0.7, len(tokens))  # about 0.5 nats per token
    after = tokens * rng.uniform(2.0, 3.0, len(tokens))  # about 2.5 nats per token
    outcome = compare_paired([PairedItems(before, after, tokens)], resamples=2000, seed=7)
    assert outcome.delta == pytest.approx((after.sum() - before.sum()) / tokens.sum())
    draws = np.random.default_rng(7).integers(0, len(tokens), size=(2000, len(tokens)))
    by_hand = [((after[p] - before[p]).sum()) / tokens[p].sum() for p in draws]
    assert (outcome.low, outcome.high) == pytest.approx(tuple(np.quantile(by_hand, [0.025, 0.975])), abs=1e-12)
    assert outcome.low > 1.0  # the whole interval lies above the +-1 a change of accuracy is bounded by


def test_a_mean_over_tasks_combines_the_tasks_intervals_by_mover():
    """The general score's change: the mean of the tasks' changes; its bounds by MOVER from each
    task's own interval (Tango's for 0/1 tasks, here from the quartic's roots; the bootstrap's for
    a task with several scores per item); its p-value a sign-flip test over all items, each weighed
    1 / (tasks x the task's score count), here enumerated in full."""
    one = PairedItems.from_values([1, 0, 1, 1, 0, 1, 0, 0], [1, 1, 1, 0, 0, 1, 1, 0])  # b 1, c 2
    two = PairedItems.from_values([1, 1, 0, 1, 1, 0], [0, 1, 0, 0, 1, 0])              # b 2, c 0
    three = PairedItems.from_values([[1, 0], [1, 1], 1, [0, 0, 1]], [[1, 1], [0, 1], 1, [1, 0, 1]])
    deltas = [(5 - 4) / 8, (2 - 4) / 6, (6 - 5) / 8]  # three: 5 of 8 instructions before, 6 after
    bounds = [yang_sun_hardin_quartic_roots(8, 1, 2)[[0, -1]], yang_sun_hardin_quartic_roots(6, 2, 0)[[0, -1]],
              np.array(paired_bootstrap_interval(three))]
    mean = sum(deltas) / 3
    low = mean - math.sqrt(sum(((d - b[0]) / 3) ** 2 for d, b in zip(deltas, bounds)))
    high = mean + math.sqrt(sum(((b[1] - d) / 3) ** 2 for d, b in zip(deltas, bounds)))
    comparison = compare_paired([one, two, three])
    assert (comparison.delta, comparison.low, comparison.high) == pytest.approx((mean, low, high), abs=1e-9)
    assert comparison.n == 18 and comparison.b is None and comparison.test == "sign-flip"

    terms = []  # each item's weighed change
    for task, total in ((one, 8), (two, 6), (three, 8)):
        terms += [(a - b) / (3 * total) for a, b in zip(task.after, task.before) if a != b]
    observed = abs(sum(terms))
    flips = [abs(sum(s * t for s, t in zip(signs, terms))) for signs in itertools.product((1, -1), repeat=len(terms))]
    assert comparison.p == pytest.approx(sum(f >= observed - 1e-12 for f in flips) / len(flips), abs=1e-12)

    nothing = compare_paired([one, PairedItems.from_values([1, 0], [1, 0])])  # a task without change keeps a width
    assert nothing.low < nothing.delta < nothing.high


def test_sign_flip_p_value_by_full_enumeration():
    """Exact when 2^items is below the resamples: every way of swapping the items' two scores."""
    before = np.array([0.5, 1.0, 0.0, 0.25, 1.0, 0.75, 0.0, 1.0, 0.5])
    after = np.array([1.0, 1.0, 0.5, 0.75, 0.0, 1.0, 0.25, 1.0, 1.0])
    diffs = after - before
    observed = abs(diffs.sum())
    flips = [abs(np.dot(signs, diffs)) for signs in itertools.product((1, -1), repeat=len(diffs))]
    by_hand = sum(f >= observed - 1e-12 for f in flips) / len(flips)
    assert sign_flip_p(before, after) == pytest.approx(by_hand, abs=1e-12)
    assert sign_flip_p(np.array([0.5, 1.0]), np.array([0.5, 0.0])) == 1.0  # one changed item: both signs as extreme
    # non-binary scores go through compare_paired: the same p and the bootstrap interval
    items = PairedItems.from_values(list(before), list(after))
    comparison = compare_paired([items])
    assert comparison.p == pytest.approx(by_hand, abs=1e-12)
    assert comparison.delta == pytest.approx(diffs.mean()) and comparison.low <= comparison.delta <= comparison.high


def test_binary_items_of_one_task_use_mcnemar_and_tango():
    before, after = vectors(b=2, c=9, both_right=50, both_wrong=39)
    comparison = compare_paired([PairedItems.from_values(before, after)])
    assert comparison.test == "McNemar" and (comparison.b, comparison.c) == (2, 9)
    assert (comparison.low, comparison.high) == pytest.approx(tango_interval(2, 9, 100))


def test_replicates_t_interval_by_formula():
    deltas = [0.012, 0.031, -0.004, 0.020]
    k, mean = len(deltas), sum(deltas) / len(deltas)
    sd = math.sqrt(sum((d - mean) ** 2 for d in deltas) / (k - 1))
    half = scipy_stats.t.ppf(0.975, k - 1) * sd / math.sqrt(k)
    p = 2 * scipy_stats.t.sf(abs(mean / (sd / math.sqrt(k))), k - 1)
    result = compare_replicates(deltas, before=0.4, items=100)
    assert (result.delta, result.low, result.high, result.p) == pytest.approx((mean, mean - half, mean + half, p))
    assert result.after == pytest.approx(0.4 + mean) and result.test == "t-test across 4 seeds"
    with pytest.raises(ValueError, match="at least 2 replicates"):
        compare_replicates([0.1])


def paired(delta: float, low: float, high: float, n: int = 100) -> PairedComparison:
    return PairedComparison(n=n, before=0.5, after=0.5 + delta, delta=delta, low=low, high=high, p=0.5, test="own")


def test_seeds_on_the_same_difference_keep_their_own_intervals_not_a_zero_width_one():
    """Two seeds at +0.010 with own intervals [0.000, 0.020] and [-0.002, 0.022]: no spread, so the
    interval is the mean of their offsets, [0.010 - 0.011, 0.010 + 0.011], and p the normal test of
    0.010 against the standard error that interval implies: erfc(|z| / sqrt 2)."""
    result = combine_replicates([paired(0.010, 0.000, 0.020), paired(0.010, -0.002, 0.022)])
    se = 0.022 / (2 * 1.959963984540054)
    assert (result.delta, result.low, result.high) == pytest.approx((0.010, -0.001, 0.021))
    assert result.p == pytest.approx(math.erfc(0.010 / se / math.sqrt(2)))
    assert result.test == "t-test across 2 seeds, at least their own intervals" and result.n == 100


def test_seeds_far_apart_keep_the_t_interval_across_them():
    """Seeds at +0.10 and +0.30 with tight own intervals: the t-interval across two seeds (t with one
    degree of freedom is Cauchy: quantile tan(pi (q - 1/2)), two-sided p = 1 - 2 atan(|t|) / pi) is
    the wider, mean 0.2 +- 12.706 x 0.1, p 0.295."""
    result = combine_replicates([paired(0.10, 0.09, 0.11), paired(0.30, 0.29, 0.31)])
    half = math.tan(math.pi * 0.475) * 0.1  # sd of the two = 0.1414, its standard error 0.1414 / sqrt 2
    assert (result.delta, result.low, result.high) == pytest.approx((0.2, 0.2 - half, 0.2 + half))
    assert result.p == pytest.approx(1 - 2 * math.atan(2.0) / math.pi)
    with pytest.raises(ValueError, match="at least 2 replicates"):
        combine_replicates([paired(0.1, 0.0, 0.2)])


def test_seeds_that_differ_only_by_float_rounding_show_no_difference():
    """Two runs that answer every row alike in each of three seeds: their balanced accuracies differ by
    float rounding (0.25 against 0.24999999999999994, recalls summed in another order). That is no
    difference and no spread: delta 0, no t-test (p NaN); with zero-width own intervals, p 1."""
    deltas = [0.0, 0.24999999999999994 - 0.25, 0.25 - 0.24999999999999997]
    assert any(d != 0.0 for d in deltas)
    across = compare_replicates(deltas)
    assert (across.delta, across.low, across.high) == (0.0, 0.0, 0.0) and math.isnan(across.p)
    combined = combine_replicates([paired(d, d, d) for d in deltas])
    assert (combined.delta, combined.low, combined.high, combined.p) == (0.0, 0.0, 0.0, 1.0)
    constant = compare_replicates([0.1 + 1e-17, 0.1, 0.1 - 2e-17])  # one difference in every seed
    assert constant.delta == pytest.approx(0.1) and math.isnan(constant.p)


def test_pairing_by_id_and_the_instruction_level_mean():
    items = pair_by_id([3, 1, 2], [1, [1, 0], 0], [1, 2, 4], [[1, 1], 1, 0])
    assert items.before.tolist() == [1.0, 0.0] and items.after.tolist() == [2.0, 1.0]
    assert items.counts.tolist() == [2.0, 1.0]
    assert mean_score([[1, 0, 1], 1, [0]]) == pytest.approx(3 / 5)  # lm-eval's instruction-level mean
    with pytest.raises(ValueError, match="how many scores"):
        PairedItems.from_values([[1, 0]], [1])


def test_verdict_line():
    line = PairedComparison(n=1000, before=0.70, after=0.688, delta=-0.012, low=-0.031, high=0.007, p=0.2301,
                            test="McNemar", b=40, c=28).describe("ARC-Easy")
    assert line == "ARC-Easy: -0.012 [-0.031, +0.007], n 1000 (b 40, c 28), McNemar p 0.23: no significant change"
    drop = PairedComparison(n=50, before=0.5, after=0.3, delta=-0.2, low=-0.3, high=-0.1, p=0.001, test="McNemar")
    assert drop.verdict() == "significant drop"


# -- classification: one-vs-rest AUC and balanced accuracy ------------------------------------------------

def macro_auc_by_sklearn(scores: np.ndarray, labels: np.ndarray) -> float:
    """The definition: sklearn's ROC AUC of each class against the rest on the row-centred scores,
    averaged over the classes that have positive and negative rows."""
    from sklearn.metrics import roc_auc_score

    centred = scores - scores.mean(axis=1, keepdims=True)
    return float(np.mean([roc_auc_score(labels == c, centred[:, c]) for c in range(scores.shape[1])
                          if 0 < np.sum(labels == c) < len(labels)]))


def macro_auc_by_pairs(scores: np.ndarray, labels: np.ndarray) -> float:
    """The same by counting: per class, the share of (positive, negative) row pairs whose centred scores
    are ordered right, ties 1/2."""
    centred = scores - scores.mean(axis=1, keepdims=True)
    aucs = []
    for c in range(scores.shape[1]):
        positives, negatives = centred[labels == c, c], centred[labels != c, c]
        if len(positives) and len(negatives):
            aucs.append(np.mean(0.5 + 0.5 * np.sign(positives[:, None] - negatives[None, :])))
    return float(np.mean(aucs))


def class_scores(rows: int, classes: int, signal: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Log-probability-like scores: a bump of `signal` on each row's own class, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, rows)
    logits = rng.normal(size=(rows, classes)) + signal * np.eye(classes)[labels]
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True)), labels


def test_one_vs_rest_auc_is_sklearns_macro_auc_of_the_centred_scores():
    scores, labels = class_scores(200, 4, 1.0, seed=3)
    assert one_vs_rest_auc(scores, labels) == pytest.approx(macro_auc_by_sklearn(scores, labels), abs=1e-12)
    # ties count 1/2: integer scores with many ties, and a class absent from the rows (left out)
    rng = np.random.default_rng(4)
    tied, few = rng.integers(0, 3, size=(60, 4)).astype(float), rng.choice([0, 1, 3], size=60)
    assert one_vs_rest_auc(tied, few) == pytest.approx(macro_auc_by_sklearn(tied, few), abs=1e-12)
    # by hand: two classes, centred scores of class 1 are (s1 - s0) / 2: rows 0.5, -0.5, 1, 1 for labels 1, 0, 0, 1
    hand = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]])
    # class 1's positives (0.5, 1) against negatives (-0.5, 1): 1 + 0 + 1 + 1/2 of 4 pairs; class 0 mirrors it
    assert one_vs_rest_auc(hand, np.array([1, 0, 0, 1])) == pytest.approx(2.5 / 4)
    with pytest.raises(ValueError, match="at least one row of it and one row of another"):
        one_vs_rest_auc(hand, np.array([1, 1, 1, 1]))
    with pytest.raises(ValueError, match="class indices 0..1"):
        one_vs_rest_auc(hand, np.array([1, 0, 2, 1]))


def test_the_weighted_one_vs_rest_auc_is_sklearns_weighted_auc_of_the_centred_scores():
    """average="weighted": each class's AUC weighted by its share of the rows, sklearn's definition
    (roc_auc_score on the one-hot labels with average="weighted")."""
    from sklearn.metrics import roc_auc_score

    scores, labels = class_scores(300, 4, 0.8, seed=6)
    labels[:280] = np.where(labels[:280] == 2, 0, labels[:280])  # class 2 rare, as ESCI's Complement
    centred = scores - scores.mean(axis=1, keepdims=True)
    by_sklearn = roc_auc_score(np.eye(4)[labels], centred, average="weighted")
    assert one_vs_rest_auc(scores, labels, average="weighted") == pytest.approx(by_sklearn, abs=1e-12)
    # by hand: support-weighted mean of the per-class AUCs counted over row pairs
    per_class = [np.mean(0.5 + 0.5 * np.sign(centred[labels == c, c][:, None] - centred[labels != c, c][None, :]))
                 for c in range(4)]
    weights = np.bincount(labels, minlength=4) / len(labels)
    assert one_vs_rest_auc(scores, labels, average="weighted") == pytest.approx(float(weights @ per_class), abs=1e-12)
    with pytest.raises(ValueError, match="'macro' or 'weighted'"):
        one_vs_rest_auc(scores, labels, average="micro")


def test_compare_auc_weighted_is_the_change_of_the_weighted_auc_and_is_tighter_with_a_rare_class():
    """With a rare class, the macro mean gives its noisy AUC a full share: the weighted change's
    interval is narrower on the same rows (the study's reason to report it beside the macro one)."""
    rng = np.random.default_rng(31)
    labels = rng.choice(4, size=419, p=[0.38, 0.25, 0.02, 0.35])
    before, _ = class_scores(419, 4, 0.0, seed=32)
    after = before + 0.6 * np.eye(4)[labels] + rng.normal(size=before.shape) * 0.5
    weighted = compare_auc(before, after, labels, resamples=2000, average="weighted")
    macro = compare_auc(before, after, labels, resamples=2000)
    assert weighted.before == pytest.approx(one_vs_rest_auc(before, labels, average="weighted"), abs=1e-12)
    assert weighted.after == pytest.approx(one_vs_rest_auc(after, labels, average="weighted"), abs=1e-12)
    assert weighted.low < weighted.delta < weighted.high
    assert weighted.high - weighted.low < macro.high - macro.low


def test_one_vs_rest_auc_cannot_be_moved_by_a_temperature_or_a_class_prior():
    """log softmax(z / T + b) for any T > 0 and per-class bias b (a prior shift; a collapse to one class)
    ranks every class's rows as log softmax(z) does: the AUC is exactly the same."""
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, 300)
    logits = rng.normal(size=(300, 4)) + 0.8 * np.eye(4)[labels]

    def log_softmax(z):
        return z - np.log(np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1, keepdims=True)) - z.max(axis=1, keepdims=True)

    plain = one_vs_rest_auc(log_softmax(logits), labels)
    for temperature in (0.25, 3.0):
        for bias in (np.zeros(4), np.array([6.0, -2.0, 0.5, -9.0])):
            shifted = log_softmax(logits / temperature + bias)
            assert one_vs_rest_auc(shifted, labels) == plain
            # the model now answers (nearly) one class: its accuracy falls, its ranking stays
            if bias[0] == 6.0 and temperature == 3.0:
                assert np.mean(shifted.argmax(axis=1) == 0) > 0.95
    # the mass a row leaves to the rest of the vocabulary lowers all its classes' log-probabilities alike:
    # the centred AUC ignores it, the uncentred one would rank rows by it
    from sklearn.metrics import roc_auc_score

    elsewhere = log_softmax(logits) - rng.exponential(3.0, size=(300, 1))
    assert one_vs_rest_auc(elsewhere, labels) == pytest.approx(plain, abs=1e-12)
    uncentred = np.mean([roc_auc_score(labels == c, elsewhere[:, c]) for c in range(4)])
    assert abs(uncentred - 0.5) < abs(plain - 0.5) / 2


def test_auc_of_resampled_rows_counts_pairs_with_repeats_and_ties():
    """`_picked_ovr_auc` (the bootstrap's and the swap test's AUC, by counting) against the definition on
    each resample's rows written out: every (positive, negative) pair of picks, ties 1/2, for the macro
    mean and the mean weighted by the resample's positives."""
    rng = np.random.default_rng(5)
    scores, labels = class_scores(30, 3, 0.8, seed=4)
    scores = np.round(scores, 1)  # ties within a class's scores
    centred = scores - scores.mean(axis=1, keepdims=True)
    picks = rng.integers(0, 30, size=(40, 30))
    picks[0] = np.arange(30)  # a resample without repeats
    first_of = [int(np.argmax(labels == c)) for c in range(2)]
    picks[1] = np.where(np.arange(30) % 3 == 0, first_of[0], first_of[1])  # two rows, repeated
    picks[2] = first_of[0]  # one class only: no class has a negative, no AUC
    for average in ("macro", "weighted"):
        counted = _picked_ovr_auc(np.ascontiguousarray(centred.T), labels, picks, average)
        assert np.isnan(counted[2])
        for resample, value in zip(np.delete(picks, 2, axis=0), np.delete(counted, 2)):
            rows, classes_of_rows = centred[resample], labels[resample]
            aucs, weights = [], []
            for c in range(3):
                positives, negatives = rows[classes_of_rows == c, c], rows[classes_of_rows != c, c]
                if len(positives) and len(negatives):
                    aucs.append(np.mean(0.5 + 0.5 * np.sign(positives[:, None] - negatives[None, :])))
                    weights.append(len(positives) if average == "weighted" else 1)
            assert value == pytest.approx(np.average(aucs, weights=weights), abs=1e-12), (average, resample)


def test_compare_auc_by_its_definition():
    """Interval: rows resampled with numpy's generator (one (resamples, rows) draw), the macro AUC of the
    centred scores counted over row pairs on each resample (classes without positives or negatives left out), the
    percentile interval of the change. p: every swap of the rows' two score vectors enumerated."""
    before, labels = class_scores(9, 3, 0.5, seed=11)
    after, _ = class_scores(9, 3, 0.5, seed=12)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])
    comparison = compare_auc(before, after, labels, resamples=600, seed=2)  # 600 > 2^9: the swap test is exact
    assert comparison.before == pytest.approx(macro_auc_by_sklearn(before, labels), abs=1e-12)
    assert comparison.after == pytest.approx(macro_auc_by_sklearn(after, labels), abs=1e-12)
    assert comparison.delta == pytest.approx(comparison.after - comparison.before) and comparison.n == 9
    deltas = []
    for picks in np.random.default_rng(2).integers(0, 9, size=(600, 9)):
        if len(set(labels[picks])) > 1:  # a resample of one class has no AUC
            deltas.append(macro_auc_by_pairs(after[picks], labels[picks]) - macro_auc_by_pairs(before[picks], labels[picks]))
    assert (comparison.low, comparison.high) == pytest.approx(tuple(np.quantile(deltas, [0.025, 0.975])), abs=1e-12)
    observed = comparison.delta
    # the swap test exchanges each row's two scorings as ranks within their own scoring (per class, over
    # the rows, of the centred scores): an AUC counted over row pairs of those ranks is the same as of
    # the scores, but a swapped row then sits on the other scoring's scale
    def ranks(scores: np.ndarray) -> np.ndarray:
        centred = scores - scores.mean(axis=1, keepdims=True)
        return np.stack([[np.sum(column < x) + 0.5 * (np.sum(column == x) - 1) + 1 for x in column]
                         for column in centred.T], axis=1)

    def macro_auc_of(values: np.ndarray) -> float:  # already comparable across rows: counted as is
        return float(np.mean([np.mean(0.5 + 0.5 * np.sign(values[labels == c, c][:, None] - values[labels != c, c][None, :]))
                              for c in range(values.shape[1])]))

    ranked_before, ranked_after = ranks(before), ranks(after)
    assert macro_auc_of(ranked_after) - macro_auc_of(ranked_before) == pytest.approx(observed, abs=1e-12)
    null = []
    for swap in itertools.product((False, True), repeat=9):
        mask = np.array(swap)[:, None]
        null.append(macro_auc_of(np.where(mask, ranked_before, ranked_after))
                    - macro_auc_of(np.where(mask, ranked_after, ranked_before)))
    null = np.array(null)
    # two-sided as scipy's permutation_test: twice the smaller tail, exact over the 2^9 swaps
    by_hand = min(1.0, 2 * min(np.mean(null >= observed - 1e-12), np.mean(null <= observed + 1e-12)))
    assert comparison.p == pytest.approx(by_hand, abs=1e-12) and comparison.test == "paired bootstrap / swap"


def test_the_auc_swap_test_sees_a_better_ranking_on_a_sharper_scale():
    """A fine-tuned model's log-probabilities spread wider (sharpening). Swapping raw scores between a
    narrow and a wide scoring ranks rows of both scales together, which worsens every swapped ranking
    and hides a real gain; swapping ranks does not: the p-value agrees with the bootstrap interval."""
    before, labels = class_scores(419, 4, 0.3, seed=41)
    rng = np.random.default_rng(42)
    after = 8.0 * (before + 0.1 * np.eye(4)[labels] + rng.normal(size=before.shape) * 0.3)
    gain = compare_auc(before, after, labels, resamples=2000, average="weighted")
    assert gain.low > 0 and gain.p < 0.005  # raw scores swapped: p 0.04 here (0.019 at 4x, the smaller spread)
    # the same change on the before's own scale: the same delta, interval and verdict
    same_scale = compare_auc(before, after / 8.0, labels, resamples=2000, average="weighted")
    assert (same_scale.delta, same_scale.low, same_scale.high) == pytest.approx((gain.delta, gain.low, gain.high), abs=1e-12)
    assert same_scale.p == pytest.approx(gain.p, abs=1e-12)


def test_compare_auc_finds_a_better_model_and_no_change_between_equals():
    before, labels = class_scores(419, 4, 0.3, seed=21)
    rng = np.random.default_rng(22)
    after = before + 1.5 * np.eye(4)[labels] + rng.normal(size=before.shape) * 0.3  # ranks its classes' rows higher
    better = compare_auc(before, after, labels, resamples=1000)
    assert better.low < better.delta < better.high and better.low > 0
    assert better.p == pytest.approx(2 / 1001) and better.verdict() == "significant gain"  # no swap reaches it
    same = compare_auc(before, before, labels, resamples=1000)
    assert (same.delta, same.low, same.high, same.p) == (0.0, 0.0, 0.0, 1.0)
    # two scorings of equal quality (the same signal, fresh noise): no significant change either way
    other = before + rng.normal(size=before.shape) * 0.05
    equal = compare_auc(before, other, labels, resamples=1000)
    assert equal.low < equal.delta < equal.high and equal.p > 0.05
    backwards = compare_auc(other, before, labels, resamples=1000)
    assert backwards.delta == pytest.approx(-equal.delta) and backwards.p == pytest.approx(equal.p)
    # a better ranking is found even where both models answer one class: the bias is invisible to the AUC
    collapsed = compare_auc(before + [9.0, 0, 0, 0], after + [9.0, 0, 0, 0], labels, resamples=1000)
    assert collapsed.delta == pytest.approx(better.delta, abs=1e-12)


def test_compare_balanced_accuracy_by_sklearn():
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(31)
    classes = rng.choice(4, size=120, p=[0.5, 0.3, 0.15, 0.05])
    guesses_before = np.where(rng.random(120) < 0.3, classes, rng.integers(0, 4, 120))
    guesses_after = np.where(rng.random(120) < 0.6, classes, rng.integers(0, 4, 120))
    before, after = (guesses_before == classes).astype(int), (guesses_after == classes).astype(int)
    comparison = compare_balanced_accuracy(before, after, classes, resamples=500, seed=4)
    assert comparison.before == pytest.approx(balanced_accuracy_score(classes, guesses_before), abs=1e-12)
    assert comparison.after == pytest.approx(balanced_accuracy_score(classes, guesses_after), abs=1e-12)
    assert comparison.delta == pytest.approx(comparison.after - comparison.before, abs=1e-12)
    assert comparison.test == "paired bootstrap / sign-flip" and comparison.n == 120
    # the interval: sklearn's balanced accuracy recomputed on each resample of the rows (absent classes left out)
    deltas = [balanced_accuracy_score(classes[p], guesses_after[p]) - balanced_accuracy_score(classes[p], guesses_before[p])
              for p in np.random.default_rng(4).integers(0, 120, size=(500, 120))]
    assert (comparison.low, comparison.high) == pytest.approx(tuple(np.quantile(deltas, [0.025, 0.975])), abs=1e-12)
    # the p-value: the sign-flip test of each row's weighed change, weight 1 / (classes x rows of its class)
    weights = np.array([1 / (4 * np.sum(classes == c)) for c in classes])
    assert comparison.p == pytest.approx(sign_flip_p(before * weights, after * weights, 500, 4), abs=1e-12)
    assert comparison.p < 0.01
    # a collapse from one class to another moves no class's share: balanced accuracy stays at chance,
    # on every resample, whatever the classes' sizes
    collapse = compare_balanced_accuracy((classes == 0).astype(int), (classes == 3).astype(int), classes, resamples=500)
    assert collapse.before == pytest.approx(0.25) and collapse.after == pytest.approx(0.25)
    assert collapse.low == pytest.approx(0.0, abs=1e-12) and collapse.high == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="one class per row"):
        compare_balanced_accuracy(before, after, classes[:-1])
    with pytest.raises(ValueError, match="0/1 correctness"):
        compare_balanced_accuracy(before * 0.5, after, classes)


def test_false_discovery_threshold_by_the_step_up_rule():
    # Benjamini-Hochberg by hand: sorted p_(k) against k/m x alpha, m = 10, alpha 0.05: thresholds 0.005, 0.010,
    # 0.015, ...; p_(1) = 0.001 and p_(2) = 0.008 pass, every later one fails its own, so the largest k is 2
    family = [0.216, 0.039, 0.001, 0.041, 0.205, 0.042, 0.06, 0.008, 0.074, 0.212]
    assert false_discovery_threshold(family) == 0.008
    # step-up: a later p that passes its own threshold takes the earlier failing ones with it
    # (m = 4: thresholds 0.0125, 0.025, 0.0375, 0.05; p_(4) = 0.05 passes, so all four are discoveries)
    assert false_discovery_threshold([0.02, 0.03, 0.04, 0.05]) == 0.05
    assert false_discovery_threshold([0.2, 0.5, float("nan")]) == -math.inf  # nothing survives; NaN is no test
    assert false_discovery_threshold([0.01, float("nan")]) == 0.01  # a NaN is not counted in m
    assert false_discovery_threshold([]) == -math.inf
