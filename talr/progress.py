"""Progress of long work where nobody watches a terminal: plain lines instead of redrawn bars.

tqdm and Lightning redraw one line with carriage returns. Written to a file (SLURM, CI, nohup) that
is either nothing until the end or one endless line. When stdout is not a terminal, talr's loops
print one plain line when they start, one every `PLAIN_INTERVAL_S` seconds while they run, and one
when they end (counts and durations); on a terminal they keep tqdm's live bar.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from typing import Iterable, Iterator, Sized, TypeVar

import torch
from tqdm.auto import tqdm

PLAIN_INTERVAL_S = 30.0  # at most about two lines a minute from one loop: readable in a log of a long run

T = TypeVar("T")


def on_terminal() -> bool:
    """Whether stdout is an interactive terminal (live bars) rather than a file or pipe (plain lines)."""
    return sys.stdout.isatty()


def plain_line(text: str) -> None:
    """One progress line on stdout, flushed at once so a log file shows it while the run goes on."""
    print(text, flush=True)


def format_duration(seconds: float) -> str:
    """`45s`, `3m05s`, `2h07m`: short enough for a progress line, exact enough for a log."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def peak_memory(device: torch.device) -> str:
    """The peak memory so far: allocated tensors on a CUDA device, else the process's peak RSS."""
    if device.type == "cuda":
        return f"peak mem {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (cuda)"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    gib = kib / 2**30 if sys.platform == "darwin" else kib / 2**20
    return f"peak mem {gib:.2f} GiB (RSS)"


def counted(n: int | float | None, noun: str) -> str:
    """`1 batch`, `3 batches`, `? batches` (unknown)."""
    if n is None or (isinstance(n, float) and not math.isfinite(n)):
        return f"? {_plural(noun)}"
    return f"{int(n)} {noun if n == 1 else _plural(noun)}"


def _plural(noun: str) -> str:
    return noun + "es" if noun.endswith(("ch", "sh", "s", "x")) else noun + "s"


def track(items: Iterable[T], desc: str, unit: str = "batch", total: int | None = None, enabled: bool = True,
          interval_s: float = PLAIN_INTERVAL_S) -> Iterator[T]:
    """Iterate `items` with progress: tqdm's bar on a terminal; otherwise plain lines on stdout.

    The plain lines read `[desc] started: 4 batches`, `[desc] 2/4 batches, 1m02s elapsed, ~1m02s left`
    (every `interval_s` seconds) and `[desc] done: 4 batches in 2m04s`.
    `enabled` False (other ranks, an unnamed loop) iterates silently.
    """
    if total is None and isinstance(items, Sized):
        total = len(items)
    if on_terminal():
        yield from tqdm(items, desc=desc, unit=unit, total=total, leave=False, disable=not enabled)
        return
    if not enabled:
        yield from items
        return
    plain_line(f"[{desc}] started: {counted(total, unit)}")
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= interval_s and (total is None or done < total):
            last = now
            left = f", ~{format_duration((now - start) / done * (total - done))} left" if total else ""
            plain_line(f"[{desc}] {done}/{counted(total, unit)}, {format_duration(now - start)} elapsed{left}")
    plain_line(f"[{desc}] done: {counted(done, unit)} in {format_duration(time.monotonic() - start)}")
