"""Paired comparisons of per-item scores: the same documents (or held-out rows) scored twice.

Two scorings of the same items (the initial model and a fine-tuned one; two strategies on the
same held-out rows) are compared item by item, which has far more power than comparing two
independent means: an item both models get right, or both wrong, carries no noise into the
difference. Everything here is numpy / scipy, with no model code, so it is tested on fixed vectors.

Which method, when:

- **0/1 scores, one task** (accuracy, exact match): the exact McNemar test and Tango's score
  interval (`compare_binary`). Only the discordant items count: b (right before, wrong after) and
  c (wrong before, right after); the difference is (c - b) / n.
- **other scores** (an item holding several 0/1 scores, such as IFEval's instructions per prompt;
  fractional scores): a paired bootstrap percentile interval and a sign-flip permutation test
  (`compare_paired`).
- **a mean over tasks** (the general score): the sign-flip test over all tasks' items, and the
  tasks' own intervals combined by MOVER (`compare_paired` with several tasks).
- **several replicates** (seeds) of the same comparison: a t-interval and t-test across the
  replicates' differences (`compare_replicates`), widened to at least the replicates' own paired
  intervals where each has one (`combine_replicates`).
- **classification metrics that are not a plain mean over rows**: balanced accuracy
  (`compare_balanced_accuracy`) and the macro one-vs-rest ROC AUC of the classes' scores
  (`one_vs_rest_auc`, `compare_auc`): a paired bootstrap that recomputes the metric on each resample
  of the rows, and a permutation test that swaps each row's two scorings.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np
from scipy import optimize, stats

CONFIDENCE = 0.95
ALPHA = 0.05
RESAMPLES = 10_000  # bootstrap resamples and sign-flip permutations
AucAverage = Literal["macro", "weighted"]  # how one-vs-rest AUCs of the classes are averaged
SEED = 0  # the resampling is seeded, so the same records give the same interval every time
# Differences this close are float rounding, not data: two runs that answer every row alike can differ by 1e-17
# when their recalls are summed in another order, and a t-test across such seeds returns an arbitrary p.
ROUNDING = 1e-12


@dataclass(frozen=True)
class PairedComparison:
    """`after - before` over `n` paired items, its interval and the two-sided p-value of no change.

    `b` / `c` (0/1 scores only): items right before and wrong after / wrong before and right after.
    """

    n: int
    before: float
    after: float
    delta: float
    low: float
    high: float
    p: float
    test: str  # what produced p and the interval, for the reader
    b: int | None = None
    c: int | None = None
    confidence: float = CONFIDENCE

    def significant(self, alpha: float = ALPHA) -> bool:
        return bool(self.p < alpha)

    def verdict(self, alpha: float = ALPHA) -> str:
        if math.isnan(self.p):
            return "no test"
        if not self.significant(alpha):
            return "no significant change"
        return "significant gain" if self.delta > 0 else "significant drop"

    def describe(self, name: str, alpha: float = ALPHA) -> str:
        """One line: `ARC-Easy: -0.012 [-0.031, +0.007], n 1000, McNemar p 0.23: no significant change`."""
        counts = f" (b {self.b}, c {self.c})" if self.b is not None else ""
        return (f"{name}: {self.delta:+.3f} [{self.low:+.3f}, {self.high:+.3f}], n {self.n}{counts}, "
                f"{self.test} p {self.p:.3g}: {self.verdict(alpha)}")

    @property
    def interval(self) -> tuple[float, float]:
        return self.low, self.high

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def mcnemar_exact_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: min(1, 2 P[Binom(b + c, 1/2) <= min(b, c)]).

    Under no change each discordant item is equally likely to go either way, so b given b + c is
    Binomial(b + c, 1/2). scipy's binomtest sums the outcomes no likelier than the one observed,
    which for p = 1/2 (a symmetric distribution) is exactly twice the smaller tail, capped at 1.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    if b + c == 0:
        return 1.0  # no discordant item: no evidence of any change
    return float(stats.binomtest(min(b, c), b + c, 0.5).pvalue)


def tango_interval(b: int, c: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Tango's (1998) asymptotic score interval for the paired difference (c - b) / n.

    Why this interval: it inverts the score test whose value at a difference of zero is McNemar's
    statistic (c - b) / sqrt(b + c), so interval and test tell the same story; it stays inside
    [-1, 1], has a sensible width when b = c = 0 (the Wald interval collapses to a point there),
    and holds its coverage with few discordant pairs (Tango 1998; Fagerland, Lydersen & Laake 2014
    recommend it for paired proportions). The exact McNemar test can still disagree with it at very
    small b + c; the verdicts go by the exact p-value.

    The interval is every d in [-1, 1] with |Z(d)| <= z, where
    Z(d) = (c - b - n d) / sqrt(n (2 q(d) + d (1 - d))) and q(d) is the maximum-likelihood
    probability of a "right before, wrong after" item under the constraint that the difference is d
    (the positive root of 2n q^2 + (-b - c + (2n - c + b) d) q - b d (1 - d) = 0). Z falls as d
    rises, so each bound is one root, found with scipy's brentq.
    """
    if not 0 <= b + c <= n or b < 0 or c < 0:
        raise ValueError(f"need 0 <= b, c and b + c <= n, got b={b}, c={c}, n={n}")
    if n == 0:
        return math.nan, math.nan
    z = stats.norm.ppf(0.5 + confidence / 2)
    estimate = (c - b) / n

    def score(d: float) -> float:
        # In Tango's notation the pair counts are x12 = c (improves the difference), x21 = b.
        quad_b = -b - c + (2 * n - c + b) * d
        quad_c = -b * d * (1 - d)
        q = (math.sqrt(max(quad_b * quad_b - 8 * n * quad_c, 0.0)) - quad_b) / (4 * n)
        variance = n * (2 * q + d * (1 - d))
        excess = c - b - n * d
        if excess == 0:  # the estimate itself (also where the variance vanishes, b = c = 0)
            return 0.0
        return excess / math.sqrt(variance) if variance > 0 else math.copysign(math.inf, excess)

    edge = 1 - 1e-12  # Z is undefined at exactly +-1
    middle = min(max(estimate, -edge), edge)
    low = -1.0 if score(-edge) <= z else optimize.brentq(lambda d: score(d) - z, -edge, middle, xtol=1e-13)
    high = 1.0 if score(edge) >= -z else optimize.brentq(lambda d: score(d) + z, middle, edge, xtol=1e-13)
    return float(low), float(high)


def compare_binary(before: Sequence[float], after: Sequence[float], confidence: float = CONFIDENCE) -> PairedComparison:
    """0/1 scores of the same items before and after: exact McNemar p-value and Tango's interval."""
    x, y = _pair(before, after)
    if not np.isin(np.concatenate([x, y]), (0.0, 1.0)).all():
        raise ValueError("compare_binary needs 0/1 scores; use compare_paired for other scores")
    b = int(np.sum((x == 1) & (y == 0)))
    c = int(np.sum((x == 0) & (y == 1)))
    n = len(x)
    low, high = tango_interval(b, c, n, confidence)
    return PairedComparison(n=n, before=_mean(x), after=_mean(y), delta=(c - b) / n if n else math.nan, low=low,
                            high=high, p=mcnemar_exact_p(b, c), test="McNemar", b=b, c=c, confidence=confidence)


@dataclass(frozen=True)
class PairedItems:
    """One task's items scored twice: per item the sum of its scores before and after, and how many
    scores it holds (1 for a plain accuracy; IFEval: the prompt's instructions). The task's score is
    sum(scores) / sum(counts), as lm-eval aggregates instruction-level accuracy. `scores`: False where
    the values are differences of scores (a change of changes), which are no 0/1 scores even where
    they happen to be 0 or 1, so no exact McNemar test applies to them."""

    before: np.ndarray
    after: np.ndarray
    counts: np.ndarray
    scores: bool = True

    @classmethod
    def from_values(cls, before: Sequence[Any], after: Sequence[Any]) -> "PairedItems":
        """Items given as numbers, or as lists of numbers (several scores per item)."""
        (x, counts), (y, counts_after) = _sums(before), _sums(after)
        if len(x) != len(y) or not np.array_equal(counts, counts_after):
            raise ValueError("the paired items differ in number or in how many scores each holds")
        return cls(x, y, counts)

    @property
    def binary(self) -> bool:
        """One 0/1 score per item: McNemar's setting."""
        return self.scores and bool((self.counts == 1).all() and np.isin(np.concatenate([self.before, self.after]), (0.0, 1.0)).all())

    def score(self, which: np.ndarray) -> float:
        return float(which.sum() / self.counts.sum()) if self.counts.sum() else math.nan


def pair_by_id(before_ids: Sequence[Any], before_values: Sequence[Any], after_ids: Sequence[Any],
               after_values: Sequence[Any]) -> PairedItems:
    """The items that both scorings hold (matched by id: a document or row id), in `after`'s order."""
    if len(before_ids) != len(before_values) or len(after_ids) != len(after_values):
        raise ValueError("each scoring needs one id per value")
    before = dict(zip(before_ids, before_values))
    shared = [(before[key], value) for key, value in zip(after_ids, after_values) if key in before]
    return PairedItems.from_values([x for x, _ in shared], [y for _, y in shared])


def mean_score(values: Sequence[Any]) -> float:
    """The score of items given as numbers or lists of numbers: all scores summed over all counted
    (lm-eval's mean, and its instruction-level mean for IFEval)."""
    sums, counts = _sums(values)
    return float(sums.sum() / counts.sum()) if counts.sum() else math.nan


def compare_paired(tasks: Sequence[PairedItems], confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                   seed: int = SEED) -> PairedComparison:
    """The change of the mean over `tasks` of each task's score (after minus before), on paired items.

    One task with one 0/1 score per item: `compare_binary` (exact McNemar, Tango's interval).
    Otherwise the p-value is a sign-flip permutation test (`sign_flip_p`): under no change an
    item's two scorings are exchangeable; on 0/1 items of one task this is exactly McNemar's
    conditional test, and over several tasks it weighs each item as the general score does. The
    interval combines each task's own interval (Tango's for 0/1 items, else a paired bootstrap
    percentile interval) by MOVER (Zou & Donner 2008; Newcombe 2011): for the mean of T independent
    task changes d_t with intervals [l_t, u_t], the bounds are d -/+ sqrt(sum ((d_t - l_t) / T)^2)
    and sqrt(sum ((u_t - d_t) / T)^2). It keeps Tango's asymmetry and its width where few items
    change; a bootstrap over all tasks' items would collapse to a point when none changed.
    """
    tasks = [t for t in tasks if len(t.counts)]
    if not tasks:
        return PairedComparison(0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, "no paired items",
                                confidence=confidence)
    if len(tasks) == 1 and tasks[0].binary:
        return compare_binary(tasks[0].before, tasks[0].after, confidence)
    deltas, lows, highs = [], [], []
    for task in tasks:
        delta = task.score(task.after) - task.score(task.before)
        if task.binary:
            low, high = compare_binary(task.before, task.after, confidence).interval
        else:
            low, high = paired_bootstrap_interval(task, confidence, resamples, seed)
        deltas.append(delta), lows.append(low), highs.append(high)
    deltas_, lows_, highs_ = np.asarray(deltas), np.asarray(lows), np.asarray(highs)
    delta = float(deltas_.mean())
    low = delta - math.sqrt(float(np.sum(((deltas_ - lows_) / len(tasks)) ** 2)))
    high = delta + math.sqrt(float(np.sum(((highs_ - deltas_) / len(tasks)) ** 2)))
    # Item i of task t enters the mean of task scores with weight 1 / (T * count_t): the change is
    # then sum_i w_i (after_i - before_i), and a swap flips the sign of item i's term.
    weights = np.concatenate([np.full(len(t.counts), 1.0 / (len(tasks) * t.counts.sum())) for t in tasks])
    x = np.concatenate([t.before for t in tasks]) * weights
    y = np.concatenate([t.after for t in tasks]) * weights
    before = float(np.mean([t.score(t.before) for t in tasks]))
    # a mean of scores in [0, 1] changes by at most 1; an NLL or a KL (sums per token) has no such bound
    bounded = all(t.scores and ((0 <= v).all() and (v <= t.counts).all()) for t in tasks for v in (t.before, t.after))
    return PairedComparison(n=int(sum(len(t.counts) for t in tasks)), before=before, after=before + delta, delta=delta,
                            low=max(low, -1.0) if bounded else low, high=min(high, 1.0) if bounded else high,
                            p=sign_flip_p(x, y, resamples, seed),
                            test="sign-flip", confidence=confidence)


def sign_flip_p(before: np.ndarray, after: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> float:
    """Two-sided p-value of sum(after - before) = 0 by swapping each item's two scores at random
    (scipy's permutation_test, paired samples; exact when 2^items <= `resamples`)."""
    changed = before != after  # an item scored the same twice adds nothing, swapped or not: leave it out (faster)
    x, y = before[changed], after[changed]
    if len(x) < 2:  # none, or one item: its two signs give the observed |difference| both ways
        return 1.0
    result = stats.permutation_test((x, y), lambda u, v, axis: np.sum(v - u, axis=axis), permutation_type="samples",
                                    vectorized=True, n_resamples=resamples, alternative="two-sided",
                                    rng=np.random.default_rng(seed), batch=max(1, 2_000_000 // len(x)))
    return float(min(1.0, result.pvalue))


def paired_bootstrap_interval(task: PairedItems, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                              seed: int = SEED) -> tuple[float, float]:
    """Percentile interval of the task's change (after - before score), items resampled with
    replacement, the same items for before and after (paired); an item's several scores stay together.

    Written out rather than scipy.stats.bootstrap because the score is a ratio (sum of scores over
    sum of counts) and the resamples must not hold a large task's (items x resamples) array at once.
    """
    differences = task.after - task.before
    return bootstrap_interval(lambda picks: differences[picks].sum(axis=1) / task.counts[picks].sum(axis=1),
                              len(task.counts), confidence, resamples, seed)


def bootstrap_interval(change: Callable[[np.ndarray], np.ndarray], items: int, confidence: float = CONFIDENCE,
                       resamples: int = RESAMPLES, seed: int = SEED, values_per_item: int = 1) -> tuple[float, float]:
    """Percentile interval of `change` over `resamples` resamples of `items` paired items drawn with
    replacement: `change` maps an (resamples, items) array of item indices to one change per resample
    (NaN: the resample does not define the metric; it is left out of the quantiles). The resamples are
    drawn in chunks of about 2 million values (`values_per_item` per item), so memory stays bounded
    (MMLU: 14k items)."""
    rng = np.random.default_rng(seed)
    deltas = np.empty(resamples)
    chunk = max(1, 2_000_000 // (items * values_per_item))
    for start in range(0, resamples, chunk):
        picks = rng.integers(0, items, size=(min(chunk, resamples - start), items))
        deltas[start:start + len(picks)] = change(picks)
    deltas = deltas[~np.isnan(deltas)]
    if not len(deltas):
        return math.nan, math.nan
    tail = (1 - confidence) / 2
    low, high = np.quantile(deltas, [tail, 1 - tail])
    return float(low), float(high)


def compare_replicates(deltas: Sequence[float], confidence: float = CONFIDENCE, before: float = math.nan,
                       items: int = 0) -> PairedComparison:
    """Replicates (seeds) of one comparison: the mean of their differences, a t-interval and a
    one-sample t-test across them (df = replicates - 1).

    Why across replicates, not pooled over items: the spread between seeds holds the training
    randomness as well as the items' sampling noise, and a strategy's effect is only worth its
    name if it survives both. With two seeds the t quantile is 12.7: the interval is wide because
    two seeds say little. `before` is the mean score the differences start from; `items` the paired
    items per replicate, for the record.
    """
    values = np.asarray([d for d in deltas if not math.isnan(d)], dtype=float)
    if len(values) < 2:
        raise ValueError(f"compare_replicates needs at least 2 replicates with a difference, got {len(values)}")
    values[np.abs(values) <= ROUNDING] = 0.0
    mean = float(values.mean())
    if np.ptp(values) <= ROUNDING * max(1.0, float(np.abs(values).max())):  # no spread: no t statistic
        low = high = mean
        p = math.nan
    else:
        test = stats.ttest_1samp(values, 0.0)
        low, high = (float(v) for v in test.confidence_interval(confidence))
        p = float(test.pvalue)
    return PairedComparison(n=items, before=before, after=before + mean, delta=mean, low=low, high=high, p=p,
                            test=f"t-test across {len(values)} seeds", confidence=confidence)


def two_seed_spread_for(p: float) -> float:
    """The largest |d1 - d2| / |mean| of two seeds' differences at which a t-test across them reaches the
    two-sided `p`: with one degree of freedom t = |d1 + d2| / |d1 - d2|, so the ratio is 2 / t(p). At
    0.05 it is 0.157: two seeds decide a difference only where they nearly repeat each other."""
    return float(2 / stats.t.ppf(1 - p / 2, df=1))


def combine_replicates(comparisons: Sequence[PairedComparison], confidence: float = CONFIDENCE,
                       before: float = math.nan) -> PairedComparison:
    """Replicates (seeds) of one paired comparison, each with its own interval over the items: the
    mean of their differences, with an interval that holds both the seeds' spread and the items' noise.

    Why both: the t-interval across seeds (`compare_replicates`) holds the training randomness, but
    not the sampling noise of items that every seed shares (the same benchmark documents, the same
    general prompts): two seeds that land on the same difference would get an interval of zero width,
    and two that land close together one narrower than either run's own. The items' part is the mean of
    the seeds' own interval offsets around their differences: the interval of the seeds' mean if their
    item noise were perfectly correlated, the widest it can be (the standard deviation of a mean is at
    most the mean of the standard deviations). The interval reported spans both; p is the larger of the
    t-test's and the items' part's (a normal approximation from that part's width)."""
    if len(comparisons) < 2:
        raise ValueError(f"combine_replicates needs at least 2 replicates, got {len(comparisons)}")
    deltas = [c.delta for c in comparisons]
    across = compare_replicates(deltas, confidence, before, items=round(sum(c.n for c in comparisons) / len(comparisons)))
    mean = across.delta
    low = mean + float(np.mean([c.low - c.delta for c in comparisons]))
    high = mean + float(np.mean([c.high - c.delta for c in comparisons]))
    se = (high - low) / (2 * stats.norm.ppf(0.5 + confidence / 2))
    p_items = float(2 * stats.norm.sf(abs(mean) / se)) if se > 0 else float(mean == 0)
    p = p_items if math.isnan(across.p) else max(across.p, p_items)
    return PairedComparison(n=across.n, before=across.before, after=across.after, delta=mean,
                            low=min(low, across.low), high=max(high, across.high), p=p,
                            test=f"t-test across {len(deltas)} seeds, at least their own intervals",
                            confidence=confidence)


def false_discovery_threshold(p_values: Sequence[float], alpha: float = ALPHA) -> float:
    """The largest p-value that survives Benjamini-Hochberg control of the false discovery rate at `alpha`
    over the family `p_values` (NaNs are no test and not counted): a comparison with p at most the
    threshold is a discovery, and among the discoveries the expected share of null differences is at
    most `alpha`. -inf when none survives."""
    tested = np.asarray([p for p in p_values if not math.isnan(p)], dtype=float)
    if tested.size == 0:
        return -math.inf
    adjusted = stats.false_discovery_control(tested, method="bh")
    survivors = tested[adjusted <= alpha]
    return float(survivors.max()) if survivors.size else -math.inf


# -- classification: balanced accuracy and the one-vs-rest ROC AUC of the classes' scores ---------------

def one_vs_rest_auc(scores: Any, labels: Any, average: AucAverage = "macro") -> float:
    """One-vs-rest ROC AUC of per-row class scores (rows x classes; labels: each row's class index).

    For each class c with at least one row of c and one of another class: the probability that a row
    of class c gets a higher score s_ic than a row of another class (ties count 1/2: the Mann-Whitney
    statistic, from average ranks), where s_ic = scores[i, c] - mean_k scores[i, k] is the row-centred
    score. `average`: "macro", the mean over those classes; "weighted", their mean weighted by each
    class's share of the rows (sklearn's `average="weighted"`): a class of 9 rows among 419 then adds
    its own noise in proportion, where the macro mean gives it a quarter of the number.

    Why centred: with log-probabilities log p(c | row) = z_c / T - logsumexp(z / T), the per-row
    normaliser (and the mass left to the rest of the vocabulary) cancels, a global temperature T
    scales every centred score by 1/T, and a per-class bias b_c (a shift of the class prior, which is
    what a collapse to answering one class is) adds b_c - mean(b) to every row's s_ic alike. Neither
    changes any class's ranking of the rows, so this number cannot be moved by sharpening or by the
    class prior, only by how well the scores tell the classes apart.
    """
    centred, labels_ = _class_scores(scores, labels)
    value = float(_ovr_auc(centred, labels_, average))
    if math.isnan(value):
        raise ValueError("one_vs_rest_auc needs a class with at least one row of it and one row of another class; "
                         f"got {len(labels_)} row(s), all of class(es) {sorted(set(labels_.tolist()))}")
    return value


def compare_auc(before_scores: Any, after_scores: Any, labels: Any, confidence: float = CONFIDENCE,
                resamples: int = RESAMPLES, seed: int = SEED, average: AucAverage = "macro") -> PairedComparison:
    """The change of `one_vs_rest_auc` (after minus before, the same `average`) on the same rows.

    Interval: paired bootstrap percentile interval, rows resampled with replacement (the same rows
    for both scorings) and the AUC recomputed on each resample; a class without a positive or
    without a negative row in a resample is left out of that resample's mean. p-value: a
    paired permutation test, each row's two score vectors swapped at random, each class's scores as their
    ranks within their own scoring (two-sided, scipy's
    permutation_test as in `sign_flip_p`; exact when 2^rows <= `resamples`). Vectorised over
    resamples in chunks: 10,000 of each on 419 rows x 4 classes take a few seconds.
    """
    before, labels_ = _class_scores(before_scores, labels)
    after, _ = _class_scores(after_scores, labels)
    if before.shape != after.shape:
        raise ValueError(f"paired class scores need the same shape, got {before.T.shape} and {after.T.shape}")
    classes, rows = before.shape
    start, end = float(_ovr_auc(before, labels_, average)), float(_ovr_auc(after, labels_, average))
    if math.isnan(start):
        one_vs_rest_auc(before_scores, labels)  # raises: no class with positives and negatives
    low, high = bootstrap_interval(
        lambda picks: _picked_ovr_auc(after, labels_, picks, average) - _picked_ovr_auc(before, labels_, picks, average),
        rows, confidence, resamples, seed, values_per_item=4 * classes)  # two scorings, their counts
    # The swap test mixes the two scorings' rows in one ranking, so each class's scores enter as their
    # ranks within their own scoring (an AUC depends on nothing else): a sharper model's wider spread of
    # log-probabilities would otherwise make every mixed ranking worse and the test blind (Venkatraman &
    # Begg 1996 swap ranks, not raw scores, for the same reason).
    stacked = np.concatenate([stats.rankdata(before, axis=1), stats.rankdata(after, axis=1)], axis=1) / rows
    stacked_labels = np.concatenate([labels_, labels_])

    def change(first: np.ndarray, second: np.ndarray, axis: int) -> np.ndarray:  # (..., rows) indices into stacked
        def of(picks: np.ndarray) -> np.ndarray:
            flat = picks.astype(int).reshape(-1, rows)
            return _picked_ovr_auc(stacked, stacked_labels, flat, average).reshape(picks.shape[:-1])
        return of(second) - of(first)

    if np.array_equal(before, after):
        p = 1.0  # every swap gives the observed change of zero
    else:
        result = stats.permutation_test((np.arange(rows), np.arange(rows) + rows), change, permutation_type="samples",
                                        vectorized=True, n_resamples=resamples, alternative="two-sided",
                                        rng=np.random.default_rng(seed), batch=max(1, 500_000 // (rows * classes)))
        p = float(min(1.0, result.pvalue))
    return PairedComparison(n=rows, before=start, after=end, delta=end - start, low=low, high=high, p=p,
                            test="paired bootstrap / swap", confidence=confidence)


def compare_balanced_accuracy(before_correct: Any, after_correct: Any, classes: Any, confidence: float = CONFIDENCE,
                              resamples: int = RESAMPLES, seed: int = SEED) -> PairedComparison:
    """The change of balanced accuracy (the mean over the classes present of each class's recall;
    sklearn's balanced_accuracy_score) from 0/1 correctness of the same rows, `classes` their gold classes.

    Balanced accuracy is the weighted mean of the rows' correctness with weights
    1 / (classes present x rows of the row's class), so the change is sum_i w_i (after_i - before_i)
    and its p-value is the sign-flip test of those weighed terms (`sign_flip_p`; the weights do not
    move when a row's two verdicts are swapped). The interval is a paired bootstrap percentile interval
    that recomputes every class's recall on each resample of the rows (a class without a row in the
    resample is left out, as sklearn does). `compare_paired` on (correct x w, w) would resample with
    the weights of the full set: the classes' shares in a resample would then move the score, and a
    change that only moves correct answers from one class to another (a collapse from one class to
    another: balanced accuracy stays at chance whatever the class sizes) would get a spread it does not have.
    """
    before, after = _pair(before_correct, after_correct)
    if not np.isin(np.concatenate([before, after]), (0.0, 1.0)).all():
        raise ValueError("compare_balanced_accuracy needs 0/1 correctness per row")
    labels = np.asarray(classes)
    if labels.shape != before.shape:
        raise ValueError(f"need one class per row: {len(before)} rows, classes of shape {labels.shape}")
    if not len(before):
        return PairedComparison(0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, "no paired items",
                                confidence=confidence)
    _, codes, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    weights = 1.0 / (len(sizes) * sizes[codes])
    start, end = float(weights @ before), float(weights @ after)
    onehot = codes[:, None] == np.arange(len(sizes))
    differences = after - before

    def change(picks: np.ndarray) -> np.ndarray:  # the mean over the classes in the resample of each recall's change
        members = onehot[picks]  # (resamples, rows, classes)
        counts = members.sum(axis=1)
        sums = np.einsum("rn,rnc->rc", differences[picks], members)
        present = counts > 0
        return np.where(present, sums / np.maximum(counts, 1), 0.0).sum(axis=1) / present.sum(axis=1)

    low, high = bootstrap_interval(change, len(before), confidence, resamples, seed, values_per_item=len(sizes))
    return PairedComparison(n=len(before), before=start, after=end, delta=end - start, low=low, high=high,
                            p=sign_flip_p(before * weights, after * weights, resamples, seed),
                            test="paired bootstrap / sign-flip", confidence=confidence)


def _class_scores(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Row-centred float64 class scores, laid out classes x rows (ranks along the last, contiguous axis
    are twice as fast), and integer labels, checked."""
    values, labels_ = np.asarray(scores, dtype=float), np.asarray(labels)
    if values.ndim != 2 or labels_.shape != values.shape[:1]:
        raise ValueError(f"need class scores of shape (rows, classes) and one label per row, got {values.shape} "
                         f"and {labels_.shape}")
    if not np.isfinite(values).all():
        raise ValueError("class scores must be finite (a log-probability of -inf cannot be ranked against others)")
    if labels_.size and (not np.issubdtype(labels_.dtype, np.integer) or labels_.min() < 0
                         or labels_.max() >= values.shape[1]):
        raise ValueError(f"labels must be class indices 0..{values.shape[1] - 1}, got {sorted(set(labels_.tolist()))}")
    return np.ascontiguousarray((values - values.mean(axis=1, keepdims=True)).T), labels_.astype(int)


def _ovr_auc(centred: np.ndarray, labels: np.ndarray, average: AucAverage = "macro") -> float:
    """One-vs-rest AUC of centred scores laid out (classes, rows) with one label per row: the mean over
    the classes with positives and negatives, plain or weighted by their positives (NaN where there is none)."""
    return float(_picked_ovr_auc(centred, labels, np.arange(centred.shape[1])[None], average)[0])


def _picked_ovr_auc(centred: np.ndarray, labels: np.ndarray, picks: np.ndarray, average: AucAverage = "macro") -> np.ndarray:
    """`_ovr_auc` of `centred[:, picks]` with `labels[picks]` for each row of `picks` (resamples, n): column
    indices that may repeat (a bootstrap resample) or not (a swap of two scorings). A resample is a
    multiset of the columns, so each class's AUC is the Mann-Whitney count over its positive and negative
    picks, U = sum over positives of (negatives below + half the negatives tied), read from the columns'
    order by score, sorted once per class: O(resamples x columns) per class, where ranking every resample
    would cost O(resamples x columns x log columns). The report's AUC intervals and swap tests spend
    their time here."""
    if average not in ("macro", "weighted"):
        raise ValueError(f"average must be 'macro' or 'weighted', got {average!r}")
    classes, columns = centred.shape
    resamples = picks.shape[0]
    offsets = columns * np.arange(resamples)[:, None]
    counts = np.bincount((picks + offsets).ravel(), minlength=resamples * columns).reshape(resamples, columns)
    total = np.zeros(resamples)
    weights = np.zeros(resamples)
    for c in range(classes):
        order = np.argsort(centred[c], kind="stable")
        ordered = centred[c][order]
        positive = labels[order] == c
        taken = counts[:, order]
        positives, negatives = taken * positive, taken * ~positive
        below_or_tied = np.cumsum(negatives, axis=1)
        opens_group = np.r_[True, ordered[1:] != ordered[:-1]]  # a column that starts a group of tied scores
        starts = np.flatnonzero(opens_group)
        group = np.cumsum(opens_group) - 1
        first, last = starts[group], (np.r_[starts[1:], columns] - 1)[group]  # each column's group's ends
        below = below_or_tied[:, first] - negatives[:, first]
        tied = below_or_tied[:, last] - below
        u = (positives * (below + 0.5 * tied)).sum(axis=1)
        p, n = positives.sum(axis=1), negatives.sum(axis=1)
        valid = (p > 0) & (n > 0)
        weight = valid * (p if average == "weighted" else 1)
        total += np.where(valid, u / np.maximum(p * n, 1), 0.0) * weight
        weights += weight
    with np.errstate(invalid="ignore"):  # no valid class: 0 / 0, NaN
        return total / weights


def _pair(before: Sequence[float], after: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired scores need two vectors of the same length, got shapes {x.shape} and {y.shape}")
    return x, y


def _sums(values: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    sums, counts = [], []
    for value in values:
        scores = value if isinstance(value, (list, tuple)) else [value]
        sums.append(float(sum(scores)))
        counts.append(len(scores))
    return np.asarray(sums, dtype=float), np.asarray(counts, dtype=float)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else math.nan
