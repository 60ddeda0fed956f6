"""Which allocator serves this process's memory, and giving freed memory back to the system.

Why it matters. A memory budget on a CPU (talr/memory_budget.py) promises that every training step
peaks where its trial step did, and the quickstart's steps allocate about 20 GB of activations and
temporaries each. glibc can keep that promise only by mapping every large block on its own (the
kernel faults in and zeroes each one: 22 s a step of 4 x 600 tokens); letting its heap reuse the
blocks is fast but the heap fragments and the peak rises 0.5-1.5 GiB above the trial's
(benchmarks/RESULTS.md). tcmalloc (gperftools) keeps freed blocks by size for reuse and gives them
back on request: with the freed memory given back before each step and the loss chunked, as the
budget does, the same step took 17 s and peaked at 2.86 GiB, flat from step to step, against 3.03 GiB
with glibc's mapped blocks.

How. An allocator must be in place before the process allocates anything, so `talr fit` executes
itself again once with LD_PRELOAD naming tcmalloc's library, where one is installed (Debian/Ubuntu:
`apt install libtcmalloc-minimal4`; `make install` does it where it may): the way PyTorch's own CPU
launcher (`python -m torch.backends.xeon.run_cpu --enable_tcmalloc`) does. Elsewhere (macOS, no
library, TALR_ALLOCATOR=system) the system allocator stays; under glibc the budget fixes its thresholds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from pathlib import Path

ALLOCATOR_ENV = "TALR_ALLOCATOR"  # "auto" (default): tcmalloc where installed; "system": never preload
_REEXECUTED_ENV = "TALR_ALLOCATOR_PRELOADED"  # set before the one re-execution, so there is never a second
_LIBRARY_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def find_tcmalloc() -> str | None:
    """The path of an installed tcmalloc library (this Python's prefix first, as conda installs it), or None."""
    for directory in (Path(sys.prefix) / "lib", *map(Path, _LIBRARY_DIRS)):
        for name in _LIBRARY_NAMES:
            if (directory / name).is_file():
                return str(directory / name)
    found = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    return found or None


@functools.cache  # the allocator is chosen at process start; it never changes after
def _tcmalloc_release():
    """tcmalloc's C entry point that returns its free memory to the system, if tcmalloc serves this process."""
    try:
        return ctypes.CDLL(None).MallocExtension_ReleaseFreeMemory
    except (OSError, AttributeError):
        return None


def current_allocator() -> str:
    """`tcmalloc` where it serves this process's malloc, else `system`."""
    return "tcmalloc" if _tcmalloc_release() is not None else "system"


def use_tcmalloc() -> None:
    """Execute this command again with tcmalloc preloaded, where Linux has it and nothing forbids it;
    return (doing nothing) otherwise. Call before anything large is imported: the new process starts over."""
    if (not sys.platform.startswith("linux") or os.environ.get(ALLOCATOR_ENV, "auto") == "system"
            or os.environ.get(_REEXECUTED_ENV) or current_allocator() == "tcmalloc"):
        return
    library = find_tcmalloc()
    if library is None:
        return
    os.environ[_REEXECUTED_ENV] = "1"  # if the loader refuses the library, the second process runs as is
    os.environ["LD_PRELOAD"] = os.pathsep.join(filter(None, [library, os.environ.get("LD_PRELOAD")]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def release_free_memory() -> None:
    """Give the memory this process has freed back to the system, so that the next peak is measured from
    what is live: tcmalloc's free spans, or glibc's free heap pages (malloc_trim)."""
    release = _tcmalloc_release()
    if release is not None:
        release()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
