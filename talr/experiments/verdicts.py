"""`talr verdicts FAMILY.yaml`: a study's named tests, read under false-discovery control.

Each test is one of `talr report`'s pairs. A report prints every pair it can form (138 tests for six cells of two seeds), so about one in twenty
null differences comes out significant. A study's verdicts rest on a few comparisons named before the
last numbers are in (docs/study_plan.md, "The verdicts' family"); this command computes just those,
as the report pairs them (seeds combined by talr.stats.combine_replicates), and applies
Benjamini-Hochberg at `alpha` within each family (talr.stats.false_discovery_threshold): a test whose
p is at most its family's threshold is a discovery. A named test not yet in the tables counts as p = 1:
the family keeps the size it was named with. The family file:

    alpha: 0.05
    families:
      - name: the paper's claims
        tests:
          - claim: Finding 1
            results: [docs/results/esci_cpu_study/results.csv]  # one or more sweep tables, read as talr report reads them
            between: learning_rates  # a and b: two learning rates of `loss`
            loss: ce
            a: 1.0e-5
            b: 1.0e-4
            metric: agreement
          - claim: TALR against CE
            results: [docs/results/esci_cpu_study/results.csv]
            between: strategies  # a and b: two strategies at `learning_rate`
            learning_rate: 1.0e-5
            a: ce
            b: talr
            metric: label_auc_weighted
          - claim: Finding 2
            results: [docs/results/esci_cpu_study/results.csv]
            between: tables  # `versus`'s change from rate a to b of `loss`, minus the results' change
            versus: docs/results/medcalc_cpu_finding2/results.csv
            loss: ce
            a: 1.0e-5
            b: 1.0e-4
            metric: general

Each test's difference is b minus a. Writes `verdicts.md` beside the family file (or into --out) and
prints it; a test that cannot be paired (a table not there yet, no seed in common, files missing) is
listed with the reason and counted as p = 1.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from talr.experiments.report import fine_tuned_runs, rate_label, read_tables
from talr.experiments.significance import (CLASSIFICATION, DRIFT, SIDES, TEACHER_FORCED, Outcome, between_learning_rates,
                                          between_strategies, between_tables)
from talr.stats import ALPHA, PairedComparison, false_discovery_threshold, two_seed_spread_for

PAIR_METRICS = (*SIDES, *TEACHER_FORCED, *DRIFT, *CLASSIFICATION)  # the columns of a report's pair of cells
METRICS = {"strategies": PAIR_METRICS, "learning_rates": PAIR_METRICS, "tables": ("general", *DRIFT)}


@dataclass(frozen=True)
class NamedTest:
    """One comparison of a family: `metric` of b minus a (see the module docstring)."""

    claim: str
    results: tuple[str, ...]
    between: str
    metric: str
    a: Any
    b: Any
    loss: str | None = None
    learning_rate: float | None = None
    versus: str | None = None

    def describe(self) -> str:
        if self.between == "strategies":
            return f"{self.a} -> {self.b} at {rate_label(self.learning_rate)}"
        rates = f"{self.loss} {rate_label(self.a)} -> {rate_label(self.b)}"
        if self.between == "tables":
            return f"{rates}: {Path(self.versus).parent.name} minus {Path(self.results[0]).parent.name}"
        return rates


@dataclass
class Family:
    name: str
    tests: list[NamedTest]


def read_family_file(path: Path) -> tuple[list[Family], float]:
    """The families of a family file and its alpha; a ValueError names the test that is wrong."""
    import yaml

    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict) or not spec.get("families"):
        raise ValueError(f"{path}: no `families` (see `talr verdicts --help` for the file's form)")
    alpha = float(spec.get("alpha", ALPHA))
    families = []
    for f, family in enumerate(spec["families"]):
        name = family.get("name", f"family {f + 1}")
        tests = [_named_test(entry, f"{path}: {name}, test {t + 1}") for t, entry in enumerate(family.get("tests") or [])]
        if not tests:
            raise ValueError(f"{path}: {name} has no tests")
        families.append(Family(name, tests))
    return families, alpha


def _named_test(entry: dict[str, Any], where: str) -> NamedTest:
    between = entry.get("between")
    if between not in METRICS:
        raise ValueError(f"{where}: `between` must be one of {', '.join(METRICS)}; got {between!r}")
    metric = entry.get("metric")
    if metric not in METRICS[between]:
        raise ValueError(f"{where}: `metric` must be one of {', '.join(METRICS[between])} for between: {between}; "
                         f"got {metric!r}")
    needed = {"strategies": ("learning_rate", "a", "b"), "learning_rates": ("loss", "a", "b"),
              "tables": ("versus", "loss", "a", "b")}[between]
    missing = [key for key in ("claim", "results", *needed) if entry.get(key) is None]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    results = entry["results"]
    a, b = (str(entry["a"]), str(entry["b"])) if between == "strategies" else (float(entry["a"]), float(entry["b"]))
    return NamedTest(claim=str(entry["claim"]), results=tuple([results] if isinstance(results, str) else results),
                     between=between, metric=metric, a=a, b=b,
                     loss=entry.get("loss"), learning_rate=float(entry["learning_rate"]) if between == "strategies" else None,
                     versus=entry.get("versus"))


class Pairs:
    """Each test's pair row, computed once per pair of cells (several metrics of one pair share it)."""

    def __init__(self) -> None:
        self._tables: dict[tuple[str, ...], pd.DataFrame] = {}
        self._pairs: dict[tuple, pd.DataFrame] = {}

    def table(self, paths: tuple[str, ...]) -> pd.DataFrame:
        if paths not in self._tables:
            self._tables[paths] = fine_tuned_runs(read_tables([Path(p) for p in paths])[0])
        return self._tables[paths]

    def outcome(self, test: NamedTest) -> tuple[Outcome, int]:
        """The test's outcome (or why there is none: a table not there yet, no finished runs of both cells)
        and the number of seeds it combines."""
        try:
            first = self.table(test.results)
            other = self.table((test.versus,)) if test.versus else None
        except FileNotFoundError as missing:
            return f"{test.describe()}: {missing}", 0
        if test.between == "strategies":
            cells = first[_close(first["learning_rate"], test.learning_rate) & first["loss"].isin([test.a, test.b])]
            key: tuple = (test.results, "strategies", test.learning_rate, *sorted((test.a, test.b)))
            pairs = self._cached(key, lambda: between_strategies(cells))
        else:
            cells = _rate_cells(first, test)
            if test.between == "learning_rates":
                key = (test.results, "learning_rates", test.loss, *sorted((test.a, test.b)))
                pairs = self._cached(key, lambda: between_learning_rates(cells))
            else:
                key = (test.results, test.versus, test.loss, *sorted((test.a, test.b)))
                pairs = self._cached(key, lambda: between_tables(cells, _rate_cells(other, test)))
        low, high = sorted((test.a, test.b))
        row = pairs[pairs["a"].map(lambda v: _same(v, low)) & pairs["b"].map(lambda v: _same(v, high))]
        if row.empty:
            return f"{test.describe()}: not in the tables (no finished runs of both)", 0
        if test.metric not in row.columns:  # a classification metric of tables without classes, say
            return f"{test.describe()}: the tables have no {test.metric}", 0
        outcome = row.iloc[0][test.metric]
        seeds = int(row.iloc[0]["seeds"])
        return (_reversed(outcome) if _same(test.a, high) and not _same(low, high) else outcome), seeds

    def _cached(self, key: tuple, compute) -> pd.DataFrame:
        if key not in self._pairs:
            self._pairs[key] = compute()
        return self._pairs[key]


def _rate_cells(table: pd.DataFrame, test: NamedTest) -> pd.DataFrame:
    return table[(table["loss"] == test.loss) & (_close(table["learning_rate"], test.a) | _close(table["learning_rate"], test.b))]


def _close(values: pd.Series, rate: float) -> pd.Series:
    return values.map(lambda v: _same(v, rate))


def _same(value: Any, other: Any) -> bool:
    if isinstance(value, str) or isinstance(other, str):
        return value == other
    return math.isclose(float(value), float(other), rel_tol=1e-9)


def _reversed(outcome: Outcome) -> Outcome:
    """a minus b, from b minus a (the report orders a pair's cells; a test may name them the other way)."""
    if not isinstance(outcome, PairedComparison):
        return outcome
    return PairedComparison(n=outcome.n, before=outcome.after, after=outcome.before, delta=-outcome.delta,
                            low=-outcome.high, high=-outcome.low, p=outcome.p, test=outcome.test, b=outcome.c,
                            c=outcome.b, confidence=outcome.confidence)


def verdicts_markdown(families: list[Family], alpha: float = ALPHA, pairs: Pairs | None = None) -> str:
    """One table per family: each test's difference, interval, p, and whether it is a discovery."""
    pairs = pairs or Pairs()
    lines = [f"# Verdicts: the named tests, Benjamini-Hochberg at {alpha:g} within each family", ""]
    for family in families:
        outcomes = [(test, *pairs.outcome(test)) for test in family.tests]
        tested = [o.p for _, o, _ in outcomes if isinstance(o, PairedComparison) and not math.isnan(o.p)]
        untested = len(outcomes) - len(tested)
        # the family is the one named in advance: a test not yet in the tables (or without a p) counts as p = 1,
        # so a reading while runs are pending finds no discovery that a smaller family would have made easier
        threshold = false_discovery_threshold(tested + [1.0] * untested, alpha)
        lines += [f"## {family.name}", "", "| claim | comparison | metric | seeds | b - a [95% CI] | p | discovery |",
                  "|---|---|---|---|---|---|---|"]
        notes = []
        for test, outcome, seeds in outcomes:
            head = f"| {test.claim} | {test.describe()} | {test.metric} | {seeds} |"
            if not isinstance(outcome, PairedComparison) or math.isnan(outcome.p):
                notes.append(outcome if isinstance(outcome, str) else f"{test.describe()}: no p ({outcome.test})")
                lines.append(f"{head} - ({len(notes)}) | | |")
                continue
            found = outcome.p <= threshold
            mark = "**" if found else ""
            lines.append(f"{head} {mark}{outcome.delta:+.4f}{mark} [{outcome.low:+.4f}, {outcome.high:+.4f}] | "
                         f"{outcome.p:.3g} | {'yes' if found else 'no'} |")
        found_count = sum(p <= threshold for p in tested)
        lines += ["", f"{found_count} of {len(tested)} tests are discoveries"
                  + (f" (p at most {threshold:.3g})" if found_count else "")
                  + (f"; {untested} of the family's {len(outcomes)} not tested, each counted as p = 1." if untested else ".")]
        if any(seeds == 1 and isinstance(o, PairedComparison) for _, o, seeds in outcomes):
            lines += ["", "A test of one seed holds the noise of the held-out rows, benchmark documents and general prompts, "
                      "not that of another training run: its discovery is one run's, not yet the strategy's."]
        if any(seeds == 2 and isinstance(o, PairedComparison) for _, o, seeds in outcomes):
            smallest = alpha / len(outcomes)  # Benjamini-Hochberg's threshold when one test is a discovery
            lines += ["", "A test of two seeds is at most as strong as a t-test with one degree of freedom: its p "
                      f"reaches {alpha:g} only where the two seeds' differences lie apart by at most "
                      f"{two_seed_spread_for(alpha):.1%} of their mean, and {smallest:.3g} (this family's threshold for "
                      f"a single discovery) only by at most {two_seed_spread_for(smallest):.1%}."]
        if notes:
            lines += ["", "Not tested (each counted as p = 1):"] + [f"({i}) {note}" for i, note in enumerate(notes, 1)]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="talr verdicts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", help="a family file (YAML; the form above)")
    parser.add_argument("--out", help="output directory for verdicts.md (default: beside the family file)")
    args = parser.parse_args(argv)
    from talr.results import write_atomic  # here, not at the top: talr.results imports lightning

    path = Path(args.family)
    if not path.is_file():
        raise FileNotFoundError(f"family file not found: {path}")
    families, alpha = read_family_file(path)
    text = verdicts_markdown(families, alpha)
    out = Path(args.out) if args.out else path.parent
    write_atomic(out / "verdicts.md", text)
    print(text)
    print(f"[verdicts] {out / 'verdicts.md'}")
    return 0
