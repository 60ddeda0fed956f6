"""`talr report results.csv`: the domain / general trade-off of a sweep as a Pareto plot and a table.

x is the domain score at the best checkpoint, y the general score there (the paper's Figure 1
layout); the initial model is the star. Runs that differ only in their seed are averaged. Points
that no other point beats on both axes form the Pareto frontier. A run with WiSE-FT adds a curve
through its alphas' rows (`alpha` set in the table), from the initial model (alpha 0) to the
fine-tuned one (alpha 1), and a table of them; a run with task-vector merging (TIES, DARE) a table
of its grid points (`merge_method` set), kept out of the runs' cells as the alphas are. Writes `pareto.png` and
`pareto.md` beside the table (or into `--out`).

Error bars are 95% intervals. On an axis whose column has paired changes from the initial model
(`domain_best`, `general_best`: the sweep table's `<name>_delta_low` / `_high`), a bar is the
interval of that change placed around the point: a bar that crosses the initial model's level is
no significant change. A cell with several seeds gets the t-interval across its seeds' changes;
a column without paired records gets the t-interval of its mean across seeds (none for one run).
`pareto.md` adds a significance table (talr.experiments.significance): each cell against the
initial model, and every two strategies at the same learning rate, paired over the held-out rows
and benchmark documents both runs scored; for a classification task (ESCI label only) also the
balanced accuracy and label AUC, each against the initial model and between strategies. Each WiSE-FT
alpha and merge point is also paired with its own run's fine-tuned model (`points_markdown`).

Several tables (`talr report stage2/results.csv stage3/results.csv --out all/`) are read as one, the
stages of one study: a later table's run that repeats an earlier one's strategy, learning rate and
seeds is left out and named (`read_tables`); `--seeds 0 1` keeps the runs of the seeds every stage ran, so
that each point averages the same held-out rows (`keep_seeds`). `--versus other/results.csv` adds the paper's Finding 2:
each strategy's cost of its larger learning rate here and there, and the difference of the two.
"""

from __future__ import annotations

import argparse
import io
import math
from pathlib import Path
from typing import Any

import pandas as pd

from talr.experiments.significance import (Outcome, against_initial, between_learning_rates, between_strategies,
                                          between_tables, combine_seeds, outcome_from_row, points_against_runs,
                                          replicate_columns, seed_values)
from talr.stats import ALPHA, PairedComparison, compare_replicates, false_discovery_threshold

GROUP = ["loss", "learning_rate"]


def trade_off_table(results: pd.DataFrame, x: str = "domain_best", y: str = "general_best",
                    x_lower_better: bool = False, y_lower_better: bool = False) -> pd.DataFrame:
    """Finished runs averaged over seeds: one row per (loss, learning rate), with mean, std and count.
    The Pareto flags treat a column as a loss (lower is better) when its `*_lower_better` is set."""
    missing = [c for c in (*GROUP, x, y, "status") if c not in results.columns]
    if missing:
        raise ValueError(f"the results table lacks column(s) {missing}; is it a `talr sweep` results.csv?")
    done = fine_tuned_runs(results)
    done = done[done["status"] == "done"]
    if done.empty:
        raise ValueError("no finished run in the results table")
    if done[y].isna().all():
        raise ValueError(f"column {y!r} is empty in every run: add the GeneralBenchmarks callback to the runs "
                         "(configs/general/) or choose another --y column")
    table = _cells(done, GROUP, x, y)
    sign = lambda lower: -1.0 if lower else 1.0  # noqa: E731  (a loss is negated, so higher is better)
    table["pareto"] = pareto_front((sign(x_lower_better) * table["domain"]).tolist(),
                                   (sign(y_lower_better) * table["general"]).tolist())
    return table


def fine_tuned_runs(results: pd.DataFrame) -> pd.DataFrame:
    """The runs' own rows, without the WiSE-FT alphas' (`alpha` set) and task-vector merge points' rows
    (`merge_method` set) that `talr sweep` adds."""
    own = pd.Series(True, index=results.index)
    for column in ("alpha", "merge_method"):
        if column in results.columns:
            own &= results[column].isna()
    return results[own]


def wiseft_table(results: pd.DataFrame, x: str = "domain_best", y: str = "general_best") -> pd.DataFrame:
    """The WiSE-FT alphas' rows averaged over seeds: one row per (loss, learning rate, alpha), with
    mean, std, count, 95% bars as for the runs, and in how many runs the alpha was the chosen one
    (`chosen`). Empty where no run used WiSE-FT."""
    return _points_table(results, ["alpha"], "wiseft_chosen", x, y)


def merge_table(results: pd.DataFrame, x: str = "domain_best", y: str = "general_best") -> pd.DataFrame:
    """The task-vector merge points' rows averaged over seeds: one row per (loss, learning rate,
    merge_method, merge_density, merge_weight), as `wiseft_table`. Empty where no run merged."""
    return _points_table(results, ["merge_method", "merge_density", "merge_weight"], "merge_chosen", x, y)


def _points_table(results: pd.DataFrame, keys: list[str], chosen_column: str, x: str, y: str) -> pd.DataFrame:
    columns = [*GROUP, *keys, "domain", "general", "runs", "chosen"]
    if keys[0] not in results.columns or x not in results.columns or y not in results.columns:
        return pd.DataFrame(columns=columns)
    points = results[results[keys[0]].notna() & (results["status"] == "done")]
    if points.empty:
        return pd.DataFrame(columns=columns)
    table = _cells(points, [*GROUP, *keys], x, y)
    chosen = points.get(chosen_column, pd.Series(False, index=points.index)).astype(str).eq("True")
    table["chosen"] = chosen.groupby([points[k] for k in (*GROUP, *keys)], sort=True).sum().to_numpy()
    return table


def _cells(done: pd.DataFrame, group: list[str], x: str, y: str) -> pd.DataFrame:
    """Rows averaged per `group`: mean, std and count of x (domain) and y (general), with 95% bars."""
    table = done.groupby(group, sort=True).agg(
        domain=(x, "mean"), domain_std=(x, "std"), general=(y, "mean"), general_std=(y, "std"), runs=(x, "size"),
    ).reset_index()
    for axis, column in (("domain", x), ("general", y)):
        bounds = [_bar(rows, column) for _, rows in done.groupby(group, sort=True)]
        table[f"{axis}_low"], table[f"{axis}_high"] = [b[0] for b in bounds], [b[1] for b in bounds]
    return table


def _bar(rows: pd.DataFrame, column: str) -> tuple[float, float]:
    """The 95% interval drawn around a cell's mean of `column` (NaN, NaN: none)."""
    level = float(rows[column].mean())
    prefix = column.removesuffix("_best") if column.endswith("_best") else None
    if prefix and f"{prefix}_delta" in rows:  # paired changes from the initial model
        outcome = combine_seeds([outcome_from_row(row, prefix) for _, row in rows.iterrows()])
        if isinstance(outcome, PairedComparison):
            return level + outcome.low - outcome.delta, level + outcome.high - outcome.delta
    values = rows[column].dropna()
    if len(values) >= 2 and values.nunique() > 1:  # seeds only: the interval of their mean
        spread = compare_replicates(values.tolist())
        return spread.low, spread.high
    return math.nan, math.nan


def pareto_front(xs: list[float], ys: list[float]) -> list[bool]:
    """True for each point that no other point matches or beats on both axes while beating it on one."""
    front = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        dominated = any(
            (xo >= x and yo >= y) and (xo > x or yo > y) for j, (xo, yo) in enumerate(zip(xs, ys)) if j != i
        )
        front.append(not dominated and not (math.isnan(x) or math.isnan(y)))
    return front


def initial_point(results: pd.DataFrame, x: str = "domain_initial", y: str = "general_initial") -> tuple[float, float] | None:
    done = fine_tuned_runs(results)
    done = done[done["status"] == "done"] if "status" in done else done
    if x not in done or y not in done or done[[x, y]].isna().all().any():
        return None
    return float(done[x].mean()), float(done[y].mean())


# one colour and marker per strategy in every figure, so that two reports of one study read alike;
# grey is left to the frontier and black to the initial model
STRATEGY_STYLES = {
    "ce": ("tab:blue", "o"), "talr": ("tab:orange", "s"), "dft": ("tab:green", "D"), "flow": ("tab:red", "^"),
    "l2": ("tab:purple", "v"), "kl": ("tab:brown", "P"), "lora": ("tab:pink", "X"), "gate": ("tab:olive", "<"),
    "eaft": ("tab:cyan", ">"), "stm": ("navy", "h"), "rho1": ("darkgoldenrod", "p"), "kl+dft": ("teal", "d"),  # kl+dft: ASFT
}
_SPARE_STYLES = [("indigo", "o"), ("maroon", "s"), ("darkolivegreen", "D"), ("crimson", "^"), ("slateblue", "v")]


INITIAL_STAR_AREA = 220  # the initial model's star, in points squared
_LABEL_BOX = dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.75)  # legible over bars


def strategy_style(loss: str, others: list[str]) -> tuple[str, str]:
    """The colour and marker of a strategy: its own for the known ones; an unknown one takes the next spare
    style in the sorted order of the unknown names in the figure (`others`)."""
    if loss in STRATEGY_STYLES:
        return STRATEGY_STYLES[loss]
    unknown = sorted(name for name in others if name not in STRATEGY_STYLES)
    return _SPARE_STYLES[unknown.index(loss) % len(_SPARE_STYLES)]


def rate_label(rate: float) -> str:
    """A learning rate as a short label: 0.0001 -> 1e-4, 2.5e-05 -> 2.5e-5, 0.5 -> 0.5."""
    if rate == 0 or abs(rate) >= 1e-2:
        return f"{rate:g}"
    mantissa, exponent = f"{rate:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def plot(table: pd.DataFrame, initial: tuple[float, float] | None, xlabel: str, ylabel: str,
         x_lower_better: bool = False, y_lower_better: bool = False, y_log: bool = False,
         curves: pd.DataFrame | None = None):
    """The Pareto figure: one marker per strategy (the same colour and marker in every report,
    `STRATEGY_STYLES`), learning rates as labels (of strategies run at more than one) placed apart from
    each other and from the points (`place_labels`), the frontier as a line, the legend beside the axes.
    `curves` (`wiseft_table`): each run's WiSE-FT alphas as one connected line, labelled
    `WiSE-FT <loss> <learning rate>`, from alpha 0 (the initial model) to alpha 1 (the fine-tuned
    one). An axis whose column is a loss is reversed, so better is always to the right and up. `y_log`
    draws y on a symmetric log scale, linear below the smallest nonzero value, so a drift that
    spans orders of magnitude stays readable and the initial model's zero stays on the plot."""
    import matplotlib.pyplot as plt  # headless machines get the Agg backend by default

    fig, ax = plt.subplots(figsize=(8.4, 4.8))
    names = sorted(table["loss"].unique())
    labels = []
    for loss, rows in table.groupby("loss"):
        color, marker = strategy_style(str(loss), names)
        ax.errorbar(rows["domain"], rows["general"], xerr=_extent(rows, "domain"), yerr=_extent(rows, "general"),
                    fmt=marker, color=color, capsize=3, label=str(loss), linestyle="none", zorder=3,
                    elinewidth=1, alpha=0.85)
        if rows["learning_rate"].nunique() > 1:  # one rate says nothing the legend does not, and crowds the plot
            labels += [(row["domain"], row["general"], rate_label(row["learning_rate"]), color, 8)
                       for _, row in rows.iterrows()]
    for (loss, rate), rows in (curves if curves is not None else pd.DataFrame(columns=GROUP)).groupby(GROUP, sort=True):
        points = rows.sort_values("alpha").dropna(subset=["domain", "general"])
        if points.empty:
            continue
        color = strategy_style(str(loss), names)[0]
        ax.plot(points["domain"], points["general"], marker=".", linewidth=1, alpha=0.8, color=color,
                label=f"WiSE-FT {loss} {rate_label(rate)}")
        chosen = points[points["chosen"] > 0]  # the alpha WiSE-FT exported (in at least one seed)
        ax.scatter(chosen["domain"], chosen["general"], s=80, facecolors="none", edgecolors=color, zorder=4)
        labels += [(end["domain"], end["general"], f"alpha {end['alpha']:g}", color, 7)
                   for _, end in points.iloc[sorted({0, len(points) - 1})].iterrows()]
    front = table[table["pareto"]].sort_values("domain")
    ax.plot(front["domain"], front["general"], color="grey", linestyle="--", linewidth=1, label="Pareto frontier", zorder=2)
    if initial is not None:
        ax.scatter([initial[0]], [initial[1]], marker="*", s=INITIAL_STAR_AREA, color="black", zorder=5, label="initial model")
    if y_log:
        values = pd.concat([table["general"], pd.Series([initial[1]] if initial else [], dtype=float),
                            *([curves["general"].astype(float)] if curves is not None else [])]).abs()
        nonzero = values[values > 0]
        ax.set_yscale("symlog", linthresh=float(nonzero.min()) if len(nonzero) else 1.0)
    if x_lower_better:
        ax.invert_xaxis()
    if y_lower_better:
        ax.invert_yaxis()
    ax.set_xlabel(xlabel + (" (lower is better, axis reversed)" if x_lower_better else ""))
    ax.set_ylabel(ylabel + (" (lower is better, axis reversed)" if y_lower_better else ""))
    ax.set_title("Domain vs general performance (labels: learning rate; bars: 95% intervals)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    to_px = fig.dpi / 72  # marker sizes are in points: a marker's half-width in pixels, the star's from its area
    markers = [(x, y, plt.rcParams["lines.markersize"] / 2 * to_px) for x, y in zip(table["domain"], table["general"])]
    if initial is not None:
        markers.append((*initial, math.sqrt(INITIAL_STAR_AREA) / 2 * to_px))
    place_labels(ax, labels, markers)
    return fig


# where a label may sit around its point, in typographic points, nearest first: (dx, dy, ha, va)
_LABEL_SPOTS = [(6, 3, "left", "bottom"), (6, -3, "left", "top"), (-6, 3, "right", "bottom"), (-6, -3, "right", "top"),
                (0, 8, "center", "bottom"), (0, -8, "center", "top")]


# A label beside its point (no leader line) must be this many times nearer it than any other point: a label
# only just nearer its own point reads as the other's (seen in a study plot with three points in a row).
NEAR_LABEL_MARGIN = 1.5


def place_labels(ax: Any, labels: list[tuple[float, float, str, str, int]],
                 markers: list[tuple[float, float, float]]) -> list[Any]:
    """Write each label (x, y, text, colour, font size) beside its point at the first spot, nearest first
    and then farther with a leader line, where it covers no other label, no marker (x, y and its
    half-width in pixels), stays inside the axes and cannot be read as another point's: a label without
    a leader line sits at least NEAR_LABEL_MARGIN times nearer its own point than any other marker, one
    with a line (which shows its point) nearer. Where no spot is free, at the one that breaks these
    least. Call it last: the spots are measured against the final axes limits."""
    from matplotlib.transforms import Bbox

    if not labels:
        return []
    figure = ax.figure
    renderer = figure.canvas.get_renderer()
    to_pixels = ax.transData.transform
    visible = [(to_pixels((x, y)), r) for x, y, r in markers if not (math.isnan(x) or math.isnan(y))]
    centres = [centre for centre, _ in visible]
    taken = [Bbox.from_extents(px - r, py - r, px + r, py + r) for (px, py), r in visible]
    frame = ax.get_window_extent(renderer)
    spots = [(dx, dy, ha, va, False) for dx, dy, ha, va in _LABEL_SPOTS]
    spots += [(scale * dx, scale * dy, ha, va, True) for scale in (2.5, 4.0) for dx, dy, ha, va in _LABEL_SPOTS]
    placed = []
    for x, y, text, color, size in labels:
        own = to_pixels((x, y))
        others = [centre for centre in centres if math.dist(centre, own) > 1e-6]
        best = None
        for dx, dy, ha, va, far in spots:
            note = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=size,
                               color=color, bbox=_LABEL_BOX, zorder=6,
                               arrowprops=dict(arrowstyle="-", color=color, lw=0.6) if far else None)
            box = note.get_window_extent(renderer)
            area = box.width * box.height
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            middle = ((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2)
            margin = 1.0 if far else NEAR_LABEL_MARGIN
            mine = margin * math.dist(middle, own) <= min((math.dist(middle, c) for c in others), default=math.inf) + 1e-6
            covered = sum(_overlap(box, other) for other in taken) + (0.0 if inside else area) + (0.0 if mine else area)
            if best is None or covered < best[0]:
                if best is not None:
                    best[1].remove()
                best = (covered, note, box)
            else:
                note.remove()
            if covered == 0:
                break
        taken.append(best[2])
        placed.append(best[1])
    return placed


def _overlap(a: Any, b: Any) -> float:
    """The area two display boxes share (0 when apart)."""
    return max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))


def _extent(rows: pd.DataFrame, axis: str) -> list[list[float]]:
    """matplotlib's asymmetric error extents (below, above) of the bars; 0 where there is none."""
    below = (rows[axis] - rows[f"{axis}_low"]).fillna(0).clip(lower=0)
    above = (rows[f"{axis}_high"] - rows[axis]).fillna(0).clip(lower=0)
    return [below.tolist(), above.tolist()]


def markdown(table: pd.DataFrame, initial: tuple[float, float] | None, x: str = "domain", y: str = "general") -> str:
    lines = [f"| loss | learning rate | {x} | {x} 95% CI | {y} | {y} 95% CI | runs | Pareto |",
             "|---|---|---|---|---|---|---|---|"]
    if initial is not None:
        lines.append(f"| initial model | - | {initial[0]:.4f} | | {initial[1]:.4f} | | - | |")
    for _, row in table.sort_values(["loss", "learning_rate"]).iterrows():
        interval = lambda axis: ("-" if math.isnan(row[f"{axis}_low"])  # noqa: E731
                                 else f"[{row[f'{axis}_low']:.4f}, {row[f'{axis}_high']:.4f}]")
        lines.append(f"| {row['loss']} | {row['learning_rate']:g} | {row['domain']:.4f} | {interval('domain')} | "
                     f"{row['general']:.4f} | {interval('general')} | {int(row['runs'])} | {'yes' if row['pareto'] else ''} |")
    return "\n".join(lines) + "\n"


def wiseft_markdown(curves: pd.DataFrame, x: str = "domain", y: str = "general") -> str:
    """The WiSE-FT section of the report: every alpha's numbers with 95% intervals; empty without alphas."""
    return _points_markdown("## WiSE-FT: (1 - alpha) theta_0 + alpha theta", {"alpha": "{:.2f}"}, curves, x, y)


def merge_markdown(points: pd.DataFrame, x: str = "domain", y: str = "general") -> str:
    """The task-vector merging section of the report: every grid point's numbers with 95% intervals;
    empty without merges."""
    return _points_markdown("## Task-vector merging: theta_0 + weight x merge(theta - theta_0, density)",
                            {"merge_method": "{}", "merge_density": "{:.2f}", "merge_weight": "{:.2f}"}, points, x, y)


def _points_markdown(title: str, keys: dict[str, str], points: pd.DataFrame, x: str, y: str) -> str:
    """A table of a weight-space search's points (`keys`: their columns and formats) with 95% intervals."""
    if points.empty:
        return ""
    names = [key.removeprefix("merge_") for key in keys]
    lines = [title, "",
             f"| loss | learning rate | {' | '.join(names)} | {x} | {x} 95% CI | {y} | {y} 95% CI | runs | chosen in |",
             "|---|---|" + "---|" * len(keys) + "---|---|---|---|---|---|"]
    for _, row in points.sort_values([*GROUP, *keys]).iterrows():
        interval = lambda axis: ("-" if math.isnan(row[f"{axis}_low"])  # noqa: E731
                                 else f"[{row[f'{axis}_low']:.4f}, {row[f'{axis}_high']:.4f}]")
        cells = " | ".join(form.format(row[key]) for key, form in keys.items())
        lines.append(f"| {row['loss']} | {row['learning_rate']:g} | {cells} | {row['domain']:.4f} | "
                     f"{interval('domain')} | {row['general']:.4f} | {interval('general')} | {int(row['runs'])} | "
                     f"{int(row['chosen'])}/{int(row['runs'])} |")
    return "\n".join(lines) + "\n"


def _change(outcome: Outcome, alpha: float, notes: list[str], discovery_p: float = -math.inf) -> str:
    """`change [low, high] | p | test` cells; a missing comparison gets a numbered note; a p at most
    `discovery_p` (the report's false-discovery threshold) is marked with a dagger."""
    if isinstance(outcome, str):
        if outcome not in notes:
            notes.append(outcome)
        return f"- ({notes.index(outcome) + 1}) | | "
    p = "-" if math.isnan(outcome.p) else f"{outcome.p:.3g}" + ("†" if outcome.p <= discovery_p else "")
    mark = "**" if outcome.significant(alpha) else ""
    return f"{mark}{outcome.delta:+.4f}{mark} [{outcome.low:+.4f}, {outcome.high:+.4f}] | {p} | {outcome.test}"


# the leading columns (header -> column) of a table of `between_strategies` pairs and of `against_initial` cells
PAIR_KEYS = {"learning rate": "learning_rate", "a": "a", "b": "b", "seeds": "seeds"}
CELL_KEYS = {"loss": "loss", "learning rate": "learning_rate", "runs": "runs"}
RATE_KEYS = {"loss": "loss", "a": "a", "b": "b", "seeds": "seeds"}
POINT_KEYS = {"run": "run", "a": "a", "b": "b"}
# the classification tables (talr.experiments.significance.CLASSIFICATION): header -> column, and their tests
CLASSIFICATION_TITLES = {"balanced accuracy": "balanced_accuracy", "label AUC": "label_auc",
                         "label AUC, weighted": "label_auc_weighted"}
# the tables of `_between_markdown`, header -> column: the paper's two axes, teacher-forced, drift
BETWEEN_TABLES = ({"domain": "domain", "general": "general"},
                  {"token accuracy": "token_accuracy", "calibrated NLL": "calibrated_nll", "NLL": "nll"},
                  {"agreement": "agreement", "calibrated KL": "kl_calibrated", "KL": "kl", "entropy": "entropy"})
CLASSIFICATION_TESTS = ("paired bootstrap / sign-flip (balanced accuracy) and paired bootstrap / swap (label AUC) = "
                        "the metric recomputed on each resample of the rows, p from swapping each row's two scorings. ")


def _outcome_table(frame: pd.DataFrame, columns: dict[str, str], intro: str, alpha: float, notes: list[str],
                   keys: dict[str, str] = PAIR_KEYS, change: str = "b - a", always: bool = False,
                   discovery_p: float = -math.inf) -> list[str]:
    """A table of outcomes (header -> column) per row of `frame` (`between_strategies` pairs by default;
    `keys`: its leading columns), or nothing when no row has one (unless `always`: then each row says why)."""
    if (frame.empty or not all(name in frame for name in columns.values())
            or not (always or any(isinstance(o, PairedComparison) for name in columns.values() for o in frame[name]))):
        return []
    header = "".join(f" {' '.join(filter(None, (title, change)))} [95% CI] | p | test |" for title in columns)
    lines = ["", intro, "", f"| {' | '.join(keys)} |{header}", "|---" * (len(keys) + 3 * len(columns)) + "|"]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(f"{row[k]:g}" if isinstance(row[k], float) else str(row[k]) for k in keys.values())
                     + " | " + " | ".join(_change(row[name], alpha, notes, discovery_p) for name in columns.values()) + " |")
    return lines


def _between_markdown(pairs: pd.DataFrame, keys: dict[str, str], title: str, alpha: float,
                      notes: list[str], discovery_p: float = -math.inf) -> tuple[list[str], bool]:
    """The tables of `between_strategies` or `between_learning_rates` pairs (`keys`: their leading
    columns): domain and general, then teacher-forced, drift and classification where the pairs have them;
    and whether a classification table was printed."""
    lines = ["", f"{title} (b minus a), paired over the rows and documents both scored; seeds matched by value:", ""]
    if pairs.empty:
        lines += [f"| {' | '.join(keys)} | domain b - a [95% CI] | p | test | general b - a [95% CI] | p | test |",
                  "|---" * (len(keys) + 6) + "|", "| (nothing to compare) |" + " |" * (len(keys) + 5)]
    else:  # the table's header and rows under this section's intro
        lines += _outcome_table(pairs, BETWEEN_TABLES[0], "", alpha, notes, keys=keys, always=True, discovery_p=discovery_p)[3:]
    lines += _outcome_table(pairs, BETWEEN_TABLES[1],
                            "The same pairs on the held-out rows, teacher-forced over all their target tokens (b minus a): "
                            "top-1 token accuracy and NLL at each run's best temperature, which a temperature cannot move, "
                            "beside plain NLL, which it can:", alpha, notes, keys=keys, discovery_p=discovery_p)
    lines += _outcome_table(pairs, BETWEEN_TABLES[2],
                            "The same pairs on the general prompts (b minus a), prompt by prompt over the initial model's "
                            "answers (ForgettingMonitor at the best step): top-1 agreement with the initial model and the KL "
                            "left at each run's best temperature, which a temperature cannot move, beside the KL and the "
                            "entropy, which it can (a sharpened model's entropy falls):", alpha, notes, keys=keys,
                            discovery_p=discovery_p)
    classification = _outcome_table(pairs, CLASSIFICATION_TITLES, "The same pairs on the classes of the held-out rows (b "
                                    "minus a): balanced accuracy of the greedy answers and label AUC, on the same rows:",
                                    alpha, notes, keys=keys, discovery_p=discovery_p)
    return lines + classification, bool(classification)


def significance_markdown(results: pd.DataFrame, alpha: float = ALPHA) -> str:
    """The significance section of the report: each cell against the initial model, and every two
    strategies at the same learning rate, on the domain and the general side; for a classification
    task also balanced accuracy and label AUC, both ways."""
    results = fine_tuned_runs(results)  # a WiSE-FT alpha or a merge point is no seed of its run's cell
    notes: list[str] = []
    cells, strategy_pairs, rates = against_initial(results), between_strategies(results), between_learning_rates(results)
    between_columns = [c for table in (*BETWEEN_TABLES, CLASSIFICATION_TITLES) for c in table.values()]
    family = _p_values(cells, ["domain", "general", *CLASSIFICATION_TITLES.values()]) + _p_values(
        strategy_pairs, between_columns) + _p_values(rates, between_columns)
    discovery_p = false_discovery_threshold(family, alpha)
    lines = [f"## Significance (95% intervals; two-sided p; **bold**: p < {alpha:g}; †: a discovery at a false discovery "
             f"rate of {alpha:g} over the section's {len(family)} tests)", "",
             "Change from the initial model, paired on the same held-out rows (domain: accuracy at the best step, or a "
             "classification run's monitored metric) "
             "and benchmark documents (general score at fit end):", "",
             "| loss | learning rate | runs | domain change [95% CI] | p | test | general change [95% CI] | p | test |",
             "|---|---|---|---|---|---|---|---|---|"]
    for _, cell in cells.iterrows():
        lines.append(f"| {cell['loss']} | {cell['learning_rate']:g} | {cell['runs']} | "
                     f"{_change(cell['domain'], alpha, notes, discovery_p)} | "
                     f"{_change(cell['general'], alpha, notes, discovery_p)} |")
    classification = _outcome_table(
        cells, CLASSIFICATION_TITLES, "Classification: change from the initial model on the same held-out rows at the "
        "best step: balanced accuracy of the greedy answers (the mean of the classes' recalls) and label AUC (one-vs-rest "
        "ROC AUC of the row-centred class log-probabilities, the classes' mean plain and weighted by their rows), which "
        "neither a temperature nor the class "
        "prior moves:", alpha, notes, keys=CELL_KEYS, change="change", discovery_p=discovery_p)
    lines += classification
    strategies, classified_pairs = _between_markdown(
        strategy_pairs, PAIR_KEYS, "Between strategies at the same learning rate", alpha, notes, discovery_p)
    lines += strategies
    if not rates.empty:  # the paper's Finding 1: the same strategy at a smaller and a larger rate
        more, classified_rates = _between_markdown(rates, RATE_KEYS, "Between learning rates of the same strategy (a: "
                                                   "the smaller rate)", alpha, notes, discovery_p)
        lines += more
        classified_pairs = classified_pairs or classified_rates
    lines += ["", "Tests: McNemar = exact McNemar test with Tango's score interval (accuracy of one task); sign-flip = "
              "paired permutation test, interval from the tasks' own intervals (general score over several tasks; "
              "teacher-forced and drift: rows or prompts resampled, a paired bootstrap); "
              "t-test across seeds = the mean of the seeds' paired differences, its t-interval widened where "
              "needed to the seeds' own intervals (the items they share). " + (CLASSIFICATION_TESTS if classification or classified_pairs else "")
              + "p-values are not corrected for the number of comparisons: among k comparisons without any real "
              "difference, about k x alpha come out significant. " + _discoveries_note(discovery_p, family, alpha)]
    if notes:
        lines += ["", "Not compared:"] + [f"({i}) {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def _discoveries_note(discovery_p: float, family: list[float], alpha: float) -> str:
    discoveries = sum(p <= discovery_p for p in family)
    if not discoveries:
        return (f"No p of this section's {len(family)} tests survives Benjamini-Hochberg control of the false "
                f"discovery rate at {alpha:g}.")
    return (f"The daggers: Benjamini-Hochberg over every p of this section, p at most {discovery_p:.3g} ({discoveries} "
            f"of {len(family)} tests), so that among the daggered differences the expected share of null ones is at "
            f"most {alpha:g}.")


def _p_values(frame: pd.DataFrame, columns: list[str]) -> list[float]:
    """The p of every comparison the frame's `columns` hold (a string there is a reason for none)."""
    return [o.p for name in columns if name in frame for o in frame[name] if isinstance(o, PairedComparison)]


def points_markdown(results: pd.DataFrame, runs: pd.DataFrame | None = None, alpha: float = ALPHA) -> str:
    """The WiSE-FT alphas and merge points against their own run's fine-tuned model
    (talr.experiments.significance.points_against_runs), in the tables of the significance section;
    empty where the table has no points."""
    points = points_against_runs(results, runs)
    if points.empty:
        return ""
    notes: list[str] = []
    tables, _ = _between_markdown(points, POINT_KEYS, "", alpha, notes)
    lines = ["## WiSE-FT alphas and merge points against their run's fine-tuned model", "",
             "Each point (b) minus its own run at the run's best step (a), paired over the held-out rows, the benchmark "
             "documents (where the point was benchmarked) and the general prompts; one training run, so the intervals "
             "hold the rows', documents' and prompts' spread, not a seed's:", *tables[2:]]
    if notes:
        lines += ["", "Not compared:"] + [f"({i}) {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def versus_markdown(results: pd.DataFrame, other: pd.DataFrame, name: str, other_name: str, alpha: float = ALPHA) -> str:
    """The paper's Finding 2 between two sweep tables (say ESCI label only against MedCalc with
    explanations): how the general side moves from a smaller to a larger learning rate in each, and the
    other table's move minus this one's, paired per benchmark document and per general prompt
    (talr.experiments.significance.between_tables)."""
    pairs = between_tables(fine_tuned_runs(results), fine_tuned_runs(other))
    other_name = other_name if other_name != name else f"{other_name} (the other table)"
    notes: list[str] = []
    lines = [f"## The learning rates' cost, {other_name} against {name} (the paper's Finding 2)", "",
             f"Per strategy, the change from the smaller learning rate a to the larger b in each table, and {other_name}'s "
             f"change minus {name}'s (a negative general difference: the larger rate costs more of the general score after "
             f"{other_name}'s targets), paired over the benchmark documents and general prompts both tables scored:"]
    if pairs.empty:
        return "\n".join([*lines, "", "(no strategy ran the same two learning rates in both tables)"]) + "\n"
    lines += _outcome_table(pairs, {f"general b - a, {name}": "general_first", f"general b - a, {other_name}": "general_second",
                                    "general, difference": "general"}, "", alpha, notes, keys=RATE_KEYS, change="",
                            always=True)[2:]
    lines += _outcome_table(pairs, {"agreement": "agreement", "calibrated KL": "kl_calibrated", "KL": "kl", "entropy": "entropy"},
                            f"The drift on the general prompts, {other_name}'s change from a to b minus {name}'s, prompt by "
                            "prompt over the initial model's answers:", alpha, notes, keys=RATE_KEYS,
                            change="difference", always=True)
    if notes:
        lines += ["", "Not compared:"] + [f"({i}) {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def read_tables(paths: list[Path]) -> tuple[pd.DataFrame, list[str]]:
    """One table from one or more sweeps' results.csv (the stages of one study, say), and a note per run
    left out (`drop_repeated_runs`)."""
    return drop_repeated_runs(read_results(paths), len(paths))


def read_results(paths: list[Path]) -> pd.DataFrame:
    """The sweeps' results.csv tables one after another, every run as written."""
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"results table not found: {path}")
    return pd.concat([pd.read_csv(path) for path in paths], ignore_index=True)


def drop_repeated_runs(results: pd.DataFrame, tables: int) -> tuple[pd.DataFrame, list[str]]:
    """The runs of `tables` tables read one after another, less a finished run of a later table with the
    same strategy, learning rate and seed values as a finished run of an earlier one (a WiSE-FT run's own
    CE row beside the CE cell it repeats would count one seed twice, so the earlier table's run is kept),
    with a note for each. WiSE-FT alphas and merge points stay."""
    if tables == 1:
        return results, []
    seeds = replicate_columns(results)
    own = fine_tuned_runs(results)
    done = own[own["status"] == "done"]
    if done.empty:
        return results, []
    keys = done.apply(lambda row: (row["loss"], row["learning_rate"], *seed_values(row, seeds)), axis=1)
    repeated = done.index[keys.duplicated()]
    first = {key: done.loc[index, "run"] for index, key in keys[~keys.duplicated()].items()}
    notes = [f"{results.loc[i, 'run']} left out: the same strategy, learning rate and seeds as {first[keys[i]]} of an "
             "earlier table" for i in repeated]
    return results.drop(index=repeated).reset_index(drop=True), notes


def keep_seeds(results: pd.DataFrame, seeds: list[str]) -> pd.DataFrame:
    """The runs whose every seed value (`data.seed`, `seed_everything`, ...) is one of `seeds`: a study whose
    stages ran different seeds compared on the seeds they share, so that no strategy's point is a mean over
    held-out rows the others never saw."""
    columns = replicate_columns(results)
    if not columns:
        raise ValueError("--seeds: the results have no seed column (data.seed, seed_everything, seed)")
    wanted = {str(seed) for seed in seeds}
    kept = results[results.apply(lambda row: set(seed_values(row, columns)) <= wanted, axis=1)]
    if kept.empty:
        present = sorted({value for _, row in results.iterrows() for value in seed_values(row, columns)})
        raise ValueError(f"--seeds {' '.join(seeds)}: no run has these seeds; the results have {', '.join(present)}")
    return kept.reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="talr report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results.csv written by `talr sweep`; several (stages of one study) "
                        "are read as one table, which needs --out")
    parser.add_argument("--out", help="output directory (default: beside the table)")
    parser.add_argument("--x", default="domain_best", help="domain column (default domain_best)")
    parser.add_argument("--y", default="general_best", help="general column (default general_best)")
    parser.add_argument("--x-lower-better", action="store_true", help="the x column is a loss (val_loss_best, ...)")
    parser.add_argument("--y-lower-better", action="store_true", help="the y column is a loss (forgetting_kl_best, ...)")
    parser.add_argument("--y-log", action="store_true", help="y on a log scale (linear near zero), for a drift such as KL")
    parser.add_argument("--alpha", type=float, default=ALPHA, help=f"significance level of the tables (default {ALPHA})")
    parser.add_argument("--versus", metavar="OTHER_RESULTS_CSV",
                        help="another sweep's results.csv: add how each strategy's larger learning rate costs on the general "
                             "side there against here (the paper's Finding 2; both scored on the same documents and prompts)")
    parser.add_argument("--seeds", nargs="+", metavar="SEED",
                        help="only the runs of these seed values (data.seed and the like): stages that ran different "
                             "seeds compared on the seeds they share")
    args = parser.parse_args(argv)
    from talr.results import write_atomic  # here, not at the top: talr.results imports lightning, `--help` need not wait

    paths = [Path(p) for p in args.results]
    if len(paths) > 1 and not args.out:
        raise ValueError("several results tables make one report: give --out <directory>")
    raw = read_results(paths)  # every run as written: a WiSE-FT alpha's own fine-tuned model among them
    results, dropped = drop_repeated_runs(raw, len(paths))
    for note in dropped:
        print(f"[report] {note}")
    if args.seeds:
        results, raw = keep_seeds(results, args.seeds), keep_seeds(raw, args.seeds)
    path = paths[0]
    table = trade_off_table(results, args.x, args.y, args.x_lower_better, args.y_lower_better)
    initial = initial_point(results, args.x.replace("_best", "_initial"), args.y.replace("_best", "_initial"))
    out = Path(args.out) if args.out else path.parent
    curves = wiseft_table(results, args.x, args.y)
    figure = plot(table, initial, f"domain ({args.x})", f"general ({args.y})", args.x_lower_better, args.y_lower_better,
                  args.y_log, curves)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    png = write_atomic(out / "pareto.png", buffer.getvalue())
    text = "\n".join(part for part in (markdown(table, initial, args.x, args.y), wiseft_markdown(curves, args.x, args.y),
                                        merge_markdown(merge_table(results, args.x, args.y), args.x, args.y),
                                        significance_markdown(results, args.alpha),
                                        points_markdown(results, raw, args.alpha))
                    if part)
    if args.versus:
        other = Path(args.versus)
        if not other.is_file():
            raise FileNotFoundError(f"--versus: results table not found: {other}")
        text += "\n" + versus_markdown(results, pd.read_csv(other), path.parent.name, other.parent.name, args.alpha)
    write_atomic(out / "pareto.md", text)
    print(text)
    print(f"[report] {png}, {out / 'pareto.md'}")
    return 0
