"""The quickstart with and without its memory budget: peak resident memory and time, measured in one run.

Both variants run `talr fit --config configs/quickstart.yaml` in their own subprocess, one after the
other, each in a fresh run directory and with its own cold cache of the initial model's numbers (the
converted embedded model is shared through a link), so neither reuses the other's work:

- `budget`: the quickstart as shipped (`data.micro_batch_size: auto`, `data.memory_budget: 3.5GiB`);
- `no budget`: one micro-batch of the whole step (`data.micro_batch_size` = `data.batch_size`, no
  budget), the setting the quickstart had before the budget.

Both run under the same allocator: tcmalloc where it is installed, as `talr fit` preloads it
(talr/allocator.py), or glibc with `--allocator system`; each line names the one its run reported.

Peak memory is the child's own peak resident set (`ru_maxrss` of `os.wait4`, exact on Linux); time is
its wall time, process start to exit. The targets (issue 16): the budgeted peak at most 4 GB and its
time at most 1.3x the unbudgeted one.

    python benchmarks/memory_budget.py                       # the whole quickstart twice, ~15 min on 2 cores
    python benchmarks/memory_budget.py --rows 24 --val-size 4 # a shorter check of the same comparison
    python benchmarks/memory_budget.py --allocator system     # both variants on glibc, tcmalloc not preloaded
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from talr.allocator import ALLOCATOR_ENV
from talr.models import EMBEDDED_ALIAS, cache_dir

REPO = Path(__file__).resolve().parents[1]
GB = 10**9
BATCH_SIZE = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())["data"]["batch_size"]
VARIANTS = {
    "budget": [],
    "no budget": ["--data.micro_batch_size", str(BATCH_SIZE), "--data.memory_budget", "null"],
}


def run_quickstart(extra: list[str], workdir: Path, allocator: str) -> tuple[float, float, str]:
    """Wall seconds, peak resident bytes and the combined output of one quickstart in `workdir`."""
    cache = workdir / "cache"
    cache.mkdir(parents=True)
    (cache / EMBEDDED_ALIAS).symlink_to(cache_dir() / EMBEDDED_ALIAS, target_is_directory=True)
    env = {**os.environ, ALLOCATOR_ENV: allocator, "TALR_CACHE": str(cache), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    log = workdir / "fit.log"
    # output to a file: plain progress lines with each stage's duration (callbacks/plain_progress.py)
    args = [sys.executable, "-m", "cli", "fit", "--config", str(REPO / "configs" / "quickstart.yaml"), *extra]
    start = time.perf_counter()
    with log.open("w") as out:
        child = subprocess.Popen(args, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    if child.returncode != 0:
        sys.exit(f"memory_budget: the quickstart failed (exit {child.returncode}):\n{text[-3000:]}")
    return seconds, usage.ru_maxrss * 1024, text  # Linux reports kilobytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, help="generated rows, validation included (default: the quickstart's)")
    parser.add_argument("--val-size", type=int, help="validation rows (default: the quickstart's)")
    parser.add_argument("--logs", type=Path, help="a folder to keep each variant's fit log in")
    parser.add_argument("--allocator", choices=("auto", "system"), default="auto",
                        help="both variants' TALR_ALLOCATOR: auto (tcmalloc where installed, as shipped) or system")
    args = parser.parse_args()
    if not (cache_dir() / EMBEDDED_ALIAS).is_dir():
        sys.exit(f"memory_budget: convert the embedded model first (`make quickstart` or `talr fit` once): "
                 f"{cache_dir() / EMBEDDED_ALIAS} is missing")
    shorter = [*(["--data.task.init_args.num_synthetic", str(args.rows)] if args.rows else []),
               *(["--data.val_size", str(args.val_size)] if args.val_size else [])]
    measured = {}
    with tempfile.TemporaryDirectory(prefix="talr-memory-budget-") as tmp:
        for name, extra in VARIANTS.items():
            workdir = Path(tmp) / name.replace(" ", "_")
            seconds, peak, text = run_quickstart([*extra, *shorter], workdir, args.allocator)
            choice = re.search(r"^\[talr\] memory budget .*$", text, re.M)
            summary = re.search(r"^\[talr\] run summary: (.+)$", text, re.M)
            allocator = json.loads((workdir / summary[1]).read_text())["allocator"] if summary else "not reported"
            measured[name] = seconds, peak
            if args.logs:
                args.logs.mkdir(parents=True, exist_ok=True)
                (args.logs / f"{name.replace(' ', '_')}.log").write_text(text)
            print(f"{name:>9}: {seconds:7.1f} s, peak resident {peak / GB:5.2f} GB, allocator {allocator}"
                  + (f"   ({choice[0]})" if choice else ""), flush=True)
    (t_budget, peak_budget), (t_full, peak_full) = measured["budget"], measured["no budget"]
    print(f"peak memory: {peak_budget / GB:.2f} GB with the budget (target <= 4 GB: "
          f"{'met' if peak_budget <= 4 * GB else 'NOT met'}), {peak_full / peak_budget:.2f}x less than without")
    print(f"time: {t_budget / t_full:.2f}x the unbudgeted run (target <= 1.3x: "
          f"{'met' if t_budget <= 1.3 * t_full else 'NOT met'})")


if __name__ == "__main__":
    main()
