"""talr.allocator: `talr fit` runs under tcmalloc where it is installed (read off the process's own memory
map), never under TALR_ALLOCATOR=system, and `release_free_memory` gives freed memory back to the system
(read off the resident set) under whichever allocator serves the process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import cli

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
# the library as the dynamic loader's cache lists it, apart from talr/allocator.py's own search
INSTALLED = sorted(line.split(" => ")[-1] for line in subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout.splitlines()
                   if "libtcmalloc" in line and "debug" not in line)

# the call `talr fit` makes first, then what the process runs under, from /proc/self/maps
PROBE = textwrap.dedent("""
    from talr.allocator import use_tcmalloc
    use_tcmalloc()
    print("tcmalloc mapped" if "libtcmalloc" in open("/proc/self/maps").read() else "tcmalloc not mapped")
""")


def run_probe(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "TALR_ALLOCATOR", "TALR_ALLOCATOR_PRELOADED")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**clean, "PYTHONPATH": str(REPO), **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_fit_preloads_tcmalloc_where_installed_and_not_when_told_not_to():
    expected = "tcmalloc mapped" if INSTALLED else "tcmalloc not mapped"
    assert run_probe(PROBE).strip() == expected
    assert run_probe(PROBE, TALR_ALLOCATOR="system").strip() == "tcmalloc not mapped"


@pytest.mark.parametrize("command, preloads", [("fit", True), ("validate", False), ("test", False)])
def test_only_the_fit_command_asks_for_tcmalloc(monkeypatch, command, preloads):
    asked: list[bool] = []

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(cli, "use_tcmalloc", lambda: asked.append(True))
    monkeypatch.setattr(cli, "build_cli", stop)
    monkeypatch.setattr(sys, "argv", ["talr", command, "--config", "x.yaml"])
    with pytest.raises(Stop):
        cli.main()
    assert asked == ([True] if preloads else [])
    with pytest.raises(Stop):  # a call from Python (a test, a notebook) never executes the process again
        cli.main([command, "--config", "x.yaml"])
    assert len(asked) == (1 if preloads else 0)


# 1 GiB in 64 KiB blocks, each touched; all freed but the last, which keeps glibc's heap from shrinking on its own
RELEASE = textwrap.dedent("""
    import ctypes, re
    from talr.allocator import current_allocator, release_free_memory
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    def rss():
        return int(re.search(r"VmRSS:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024
    base = rss()
    blocks = [libc.malloc(65536) for _ in range(16384)]
    for block in blocks:
        ctypes.memset(block, 1, 65536)
    for block in blocks[:-1]:
        libc.free(block)
    held = rss()
    release_free_memory()
    print(current_allocator(), base, held, rss())
""")


@pytest.mark.parametrize("allocator", ["tcmalloc", "system"])
def test_freed_memory_goes_back_to_the_system_on_request(allocator):
    if allocator == "tcmalloc" and not INSTALLED:
        allocator = "system"  # nothing to preload on this machine: the system allocator's case again
    env = {"LD_PRELOAD": INSTALLED[0]} if allocator == "tcmalloc" else {"TALR_ALLOCATOR": "system"}
    name, base, held, after = run_probe(RELEASE, **env).split()
    base, held, after = int(base), int(held), int(after)
    assert name == allocator
    assert held - base > 0.9 * GIB  # the freed blocks were still resident ...
    assert after - base < 0.1 * GIB  # ... until the release
