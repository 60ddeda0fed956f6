"""Run model-written Python programs (HumanEval completions plus their tests) away from the caller.

Each program runs in its own interpreter (`sys.executable -I`: no user site-packages, no PYTHON*
variables) in an empty temporary directory, with a minimal environment, and:

- a wall-clock time limit: past it, the whole process group is killed (SIGKILL);
- resource limits set in the child: CPU seconds, address space, file size, no core dumps;
- no network: inside a fresh network namespace (`unshare --net`, unprivileged through a user
  namespace) where the kernel allows it, so the program sees only a loopback that is down; and
  in every case the child replaces the socket constructors and name lookup with functions that
  raise before the program starts.

What this is not: a security boundary against a program written to escape. The program can still
read what the user can read, write in its temporary directory, and undo the socket patch through
the C module when no network namespace is available. Run untrusted models' code in a container
or VM. This module only keeps ordinary mistakes and runaway loops out of the training process.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache

# The child reads the program from stdin, so it never lands in argv or on disk.
_BOOTSTRAP = r"""
import os, resource, socket, sys
cpu_s, memory_bytes = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
if memory_bytes > 0:
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

def _no_network(*args, **kwargs):
    raise PermissionError("network access is disabled in the talr code sandbox")

class _NoNetworkSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        _no_network()

socket.socket = _NoNetworkSocket
for _name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname", "gethostbyname_ex", "fromfd"):
    setattr(socket, _name, _no_network)
del _name

source = sys.stdin.read()
sys.stdin = open(os.devnull)
sys.argv = ["program"]
exec(compile(source, "<program>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""


@dataclass(frozen=True)
class ExecutionResult:
    """`status` is `passed` (exit code 0), `failed` (an exception or non-zero exit) or `timeout`."""

    status: str
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@lru_cache(maxsize=1)
def network_isolation_prefix() -> tuple[str, ...]:
    """`unshare` arguments that put the child in its own network namespace, or () where not allowed."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    for user_flag in ("--map-current-user", "--map-root-user"):  # keep the uid where util-linux can
        prefix = (unshare, user_flag, "--net")
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return ()


def run_program(source: str, timeout_s: float = 10.0, memory_mb: int = 2048) -> ExecutionResult:
    """Run `source` as a Python program in a sandboxed child process; see the module docstring."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    cpu_s = max(1, math.ceil(timeout_s)) + 1  # the wall clock normally fires first
    command = [*network_isolation_prefix(), sys.executable, "-I", "-c", _BOOTSTRAP, str(cpu_s), str(memory_mb << 20)]
    with tempfile.TemporaryDirectory(prefix="talr-sandbox-") as workdir:
        env = {"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            cwd=workdir, env=env, start_new_session=True,  # its own process group: killed as one
        )
        try:
            _, stderr = process.communicate(source.encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            return ExecutionResult("timeout", f"killed after {timeout_s:g} s")
        finally:
            _kill_group(process)  # children the program left behind
    if process.returncode == 0:
        return ExecutionResult("passed")
    lines = stderr.decode(errors="replace").strip().splitlines()
    return ExecutionResult("failed", lines[-1] if lines else f"exit code {process.returncode}")


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def estimate_pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al., 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= num_correct <= num_samples or k < 1:
        raise ValueError(f"need 0 <= correct <= samples and k >= 1, got n={num_samples}, c={num_correct}, k={k}")
    if k > num_samples:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {num_samples}")
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)
