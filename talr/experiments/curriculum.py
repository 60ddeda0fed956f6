"""`talr curriculum LOG_DIR [LOG_DIR ...]`: the paper's Section 4.3 curriculum, the share of easy target tokens (p > 0.2) as training proceeds.

The paper's Figure 3(c) trains with a hard gate (only tokens whose probability is above 0.2 send
gradients: `talr.losses.HardGate`) and finds that the share of tokens above the gate grows from the
first epoch to the second: training starts from the easy tokens and takes in the hard ones as they
become easier. Two views of it, per run (a `talr fit` log directory):

- **Held-out rows, the same tokens at every validation** (`row_scores/val_step*.jsonl`): the share of
  target tokens with p > 0.2, each validation's change from the first paired row by row
  (`talr.stats.compare_paired`). For a classification task (ESCI label only) also the class token
  alone: there the answer's format tokens are easy from the start and the class is the hard one, so
  the share over all tokens barely moves while the class tokens carry the curriculum.
- **Training batches** (TensorBoard `train/<strategy>/passed_share`, HardGate's own metric): the share
  of each logged step's target tokens that passed the gate. Each point is another batch, so single
  points are noisy; the table gives their mean between two validations.

The share is a probability threshold, so a temperature moves it: over ESCI's four classes a flat
distribution puts every class near 0.25, above the gate, and sharpening pushes the other classes
below it. On the same rows CE at 3e-5 has 98% of its class tokens above 0.2 at step 30, TALR 35%,
with a label AUC as high. Read it beside a metric no temperature moves (the label AUC, token accuracy).

Several runs (a gate run beside CE and TALR at the same rate) go on one plot. Writes `curriculum.md`
and `curriculum.png` into `--out` (default: the first log directory).
"""

from __future__ import annotations

import argparse
import io
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from talr.experiments.significance import read_row_scores
from talr.stats import ALPHA, PairedComparison, PairedItems, bootstrap_interval, compare_paired

ROW_SCORES = re.compile(r"^val_step(\d+)\.jsonl$")
PASSED_SHARE = re.compile(r"^train/[^/]+/passed_share$")
EASY_PROBABILITY = 0.2  # the paper's easy token; the row files count `easy` at talr.evaluation.EASY_PROBABILITY (not imported: torch would load for --help)


def validation_files(log_dir: Path) -> dict[int, Path]:
    """Step -> the row-scores file of that validation, in step order."""
    files = {int(m[1]): p for p in (log_dir / "row_scores").glob("val_step*.jsonl") if (m := ROW_SCORES.match(p.name))}
    if not files:
        raise FileNotFoundError(f"{log_dir}: no row_scores/val_step*.jsonl (a talr fit log directory holds them)")
    return dict(sorted(files.items()))


def _class_token_easy(rows: dict[int, dict], items: list[int]) -> np.ndarray:
    """Per row, 1 where the true class's answer token has p > EASY_PROBABILITY, else 0."""
    return np.array([float(math.exp(rows[i]["choice_logprobs"][rows[i]["choice"]]) > EASY_PROBABILITY) for i in items])


def share_interval(easy: np.ndarray, tokens: np.ndarray) -> tuple[float, float]:
    """95% percentile interval of sum(easy) / sum(tokens), rows resampled with replacement (a row's
    tokens stay together: they are not independent draws)."""
    return bootstrap_interval(lambda picks: easy[picks].sum(axis=1) / tokens[picks].sum(axis=1), len(tokens))


def held_out_shares(log_dir: Path) -> pd.DataFrame:
    """One row per validation: the share of easy target tokens (`easy_share`, with its 95% interval over
    rows in `easy_share_interval`) and, where the rows are classified, of easy class tokens
    (`class_easy_share`, `class_easy_share_interval`), each with its paired change from the first
    validation (`*_change`: a PairedComparison, or why there is none)."""
    files = validation_files(log_dir)
    first = read_row_scores(next(iter(files.values())))
    records = []
    for step, path in files.items():
        rows = read_row_scores(path)
        items = sorted(set(first) & set(rows))
        tokens = np.array([rows[i]["tokens"] for i in items], dtype=float)
        easy = np.array([rows[i]["easy"] for i in items], dtype=float)
        record: dict = {"step": step, "rows": len(items), "easy_share": float(easy.sum() / tokens.sum()),
                        "easy_share_interval": share_interval(easy, tokens)}
        if any(first[i]["tokens"] != rows[i]["tokens"] for i in items):
            record["easy_share_change"] = "the rows' target tokens differ between the two validations"
        else:
            before = np.array([first[i]["easy"] for i in items], dtype=float)
            record["easy_share_change"] = compare_paired([PairedItems(before, easy, tokens)])
        classified = [i for i in items if rows[i].get("choice_logprobs") is not None and first[i].get("choice_logprobs") is not None]
        if classified:
            before, after = _class_token_easy(first, classified), _class_token_easy(rows, classified)
            record["class_easy_share"] = float(after.mean())
            record["class_easy_share_interval"] = share_interval(after, np.ones(len(classified)))
            record["class_easy_share_change"] = compare_paired([PairedItems(before, after, np.ones(len(classified)))])
        records.append(record)
    return pd.DataFrame(records)


def training_shares(log_dir: Path) -> pd.DataFrame:
    """Each logged training step's `train/<strategy>/passed_share` (step, value); empty where the run
    logged none (a strategy without a gate)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}).Reload()
    tags = [t for t in events.Tags()["scalars"] if PASSED_SHARE.match(t)]
    points = [(e.step, e.value) for tag in tags for e in events.Scalars(tag)]
    return pd.DataFrame(points, columns=["step", "passed_share"]).drop_duplicates("step", keep="last").sort_values("step")


def between_validations(training: pd.DataFrame, steps: list[int]) -> list[float]:
    """The mean passed share of the logged steps after each validation up to the next (nan before the
    first validation's interval holds none), one per validation but the last."""
    means = []
    for start, end in zip(steps, steps[1:]):
        inside = training[(training["step"] > start) & (training["step"] <= end)]["passed_share"]
        means.append(float(inside.mean()) if len(inside) else math.nan)
    return means


def _cell(outcome: PairedComparison | str | float, alpha: float) -> str:
    if isinstance(outcome, str):
        return outcome
    if not isinstance(outcome, PairedComparison):
        return ""
    mark = "**" if outcome.significant(alpha) else ""
    return f"{mark}{outcome.delta:+.3f}{mark} [{outcome.low:+.3f}, {outcome.high:+.3f}]"


def _level(row: pd.Series, name: str) -> str:
    low, high = row[f"{name}_interval"]
    return f"{row[name]:.3f} [{low:.3f}, {high:.3f}]"


def markdown(runs: dict[str, tuple[pd.DataFrame, pd.DataFrame]], alpha: float = ALPHA) -> str:
    """One table per run: each validation's easy shares, their change from the first, and the mean
    passed share of the training steps that follow it."""
    lines = [f"# Easy target tokens (p > {EASY_PROBABILITY:g}) as training proceeds (the paper's Section 4.3)", "",
             f"Shares with a 95% interval over rows; changes are from the first validation, paired row by row over the same held-out rows, with 95% "
             f"intervals; bold: p < {alpha:g}. 'training passed share': the mean over the logged training steps "
             "after that validation up to the next of the share of the step's target tokens that passed the gate."]
    for label, (held_out, training) in runs.items():
        has_class = "class_easy_share" in held_out
        header = ["step", "rows", "all tokens easy", "change"] + (["class token easy", "change"] if has_class else []) \
            + ["training passed share (until the next validation)"]
        lines += ["", f"## {label}", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        passed = between_validations(training, held_out["step"].tolist()) + [math.nan]
        for (_, row), share in zip(held_out.iterrows(), passed):
            cells = [str(row["step"]), str(row["rows"]), _level(row, "easy_share"), _cell(row["easy_share_change"], alpha)]
            if has_class:
                cells += [_level(row, "class_easy_share"), _cell(row["class_easy_share_change"], alpha)]
            cells.append("" if math.isnan(share) else f"{share:.3f}")
            lines.append("| " + " | ".join(cells) + " |")
        if training.empty:
            lines += ["", "No `train/<strategy>/passed_share` was logged (the strategy has no gate)."]
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, tuple[pd.DataFrame, pd.DataFrame]]):
    """Left: held-out easy shares at each validation with their 95% interval bars (class token where
    the rows are classified, else all tokens); right: the gate's passed share of each logged training step."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    last_step = max(float(held_out["step"].max()) for held_out, _ in runs.values())
    for number, (label, (held_out, training)) in enumerate(runs.items()):
        # runs with the same shares would hide each other: each is moved sideways by 1% of the steps
        dodge = (number - (len(runs) - 1) / 2) * 0.01 * max(last_step, 1.0)
        column = "class_easy_share" if "class_easy_share" in held_out else "easy_share"
        first = held_out[column].iloc[0]
        low, high = [], []
        for outcome, value in zip(held_out[f"{column}_change"], held_out[column]):
            ok = isinstance(outcome, PairedComparison)
            low.append(value - (first + outcome.low) if ok else 0.0)
            high.append((first + outcome.high) - value if ok else 0.0)
        left.errorbar(held_out["step"] + dodge, held_out[column], yerr=[low, high], marker="osD^vP*X"[number % 8], capsize=3,
                      label=f"{label} ({'class token' if column == 'class_easy_share' else 'all tokens'})")
        if not training.empty:
            right.plot(training["step"], training["passed_share"], marker=".", label=label)
    left.set(xlabel="training step", ylabel=f"held-out share with p > {EASY_PROBABILITY:g}",
             title="Held-out target tokens (bars: 95% interval of the change from step 0;\nruns moved apart sideways)")
    right.set(xlabel="training step", ylabel="share of the step's tokens that passed", title="Training batches (the gate's passed share)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.title.set_fontsize(9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def run_labels(log_dirs: list[Path]) -> list[str]:
    """A label per log directory: the name of its run's folder (the nearest folder above it, or itself,
    that holds the run's summary.json: a sweep's run folder), else the path as given."""
    labels = []
    for log_dir in log_dirs:
        folder = next((d for d in (log_dir.resolve(), *log_dir.resolve().parents) if (d / "summary.json").is_file()), None)
        labels.append(folder.name if folder is not None else str(log_dir))
    return labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="talr curriculum", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log_dirs", nargs="+", type=Path, help="talr fit log directories (.../version_N, holding row_scores/)")
    parser.add_argument("--labels", nargs="+", help="a name per log directory (default: where their paths differ)")
    parser.add_argument("--out", type=Path, help="output directory (default: the first log directory)")
    parser.add_argument("--alpha", type=float, default=ALPHA, help=f"significance level of the bold marks (default {ALPHA})")
    args = parser.parse_args(argv)
    from talr.results import write_atomic  # talr.results imports lightning: not for --help

    labels = args.labels or run_labels(args.log_dirs)
    if len(labels) != len(args.log_dirs):
        raise ValueError(f"--labels: {len(labels)} names for {len(args.log_dirs)} log directories")
    if len(set(labels)) != len(labels):
        raise ValueError(f"two log directories have the same label ({', '.join(labels)}): name them with --labels")
    runs = {label: (held_out_shares(d), training_shares(d)) for label, d in zip(labels, args.log_dirs)}
    out = args.out or args.log_dirs[0]
    text = markdown(runs, args.alpha)
    buffer = io.BytesIO()
    plot(runs).savefig(buffer, format="png", dpi=120)
    png = write_atomic(out / "curriculum.png", buffer.getvalue())
    write_atomic(out / "curriculum.md", text)
    print(text)
    print(f"[curriculum] {png}, {out / 'curriculum.md'}")
    return 0
