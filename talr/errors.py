"""A user's mistake ends the command in one line; a bug keeps its traceback.

How a user error is recognised: an exception of `USER_ERROR_TYPES` that a `raise` statement in
talr's own code raised (talr/, callbacks/, cli.py). Those are the project's input checks (bad
data, a bad option, a missing model or file), and their messages already name the option, file
or row and the fix, so the traceback adds nothing for the user. Everything else is a bug and
keeps its traceback: an AttributeError anywhere, a ValueError raised inside torch or
transformers, and a ValueError that a builtin raised on a talr line (`int("x")`, an unpacking),
which is no `raise` statement. The rule needs no change to the ~150 checks that exist (ValueError
and its DataError, FileNotFoundError, ...), nor anything for a new check to remember; a marker
class (`UserError`) would need both.

Only the CLI uses this (`cli.main`); the library raises as usual for callers in Python.
"""

from __future__ import annotations

import dis
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Iterator

# FileExistsError: "set overwrite: true"; ModuleNotFoundError: "pip install ..." for an optional package.
USER_ERROR_TYPES = (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError, ModuleNotFoundError)
EXIT_STATUS = 2  # what argparse and jsonargparse use for a usage error
DEBUG_ENV = "TALR_DEBUG"

_ROOT = Path(__file__).resolve().parents[1]
_PROJECT = (_ROOT / "talr", _ROOT / "callbacks", _ROOT / "cli.py")


def debug_requested() -> bool:
    """TALR_DEBUG set to anything but empty or 0: show tracebacks (`--traceback` sets it)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _innermost(tb: TracebackType) -> TracebackType:
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb


def raised_by_project(exc: BaseException) -> bool:
    """Whether a `raise` statement in talr/, callbacks/ or cli.py raised `exc`."""
    if exc.__traceback__ is None:
        return False
    tb = _innermost(exc.__traceback__)
    code = tb.tb_frame.f_code
    path = Path(code.co_filename).resolve()
    if not any(path == root or root in path.parents for root in _PROJECT):
        return False
    # The instruction that raised: RAISE_VARARGS for `raise X(...)`; a builtin's error stops at CALL.
    instruction = next((i for i in dis.get_instructions(code) if i.offset == tb.tb_lasti), None)
    return instruction is not None and instruction.opname == "RAISE_VARARGS"


def find_user_error(exc: BaseException) -> BaseException | None:
    """The user error behind `exc`, or None when `exc` is a bug.

    A library that wraps what talr raised (jsonargparse re-raises with `from`) is looked through:
    the chain of causes is followed while the exception at hand was raised outside talr.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if raised_by_project(current):
            return current if isinstance(current, USER_ERROR_TYPES) else None
        current = current.__cause__
    return None


@contextmanager
def user_errors_in_one_line(prog: str = "talr") -> Iterator[None]:
    """Inside the block, a user error prints `<prog>: error: <message>` to stderr and exits with 2.

    Bugs, and everything while TALR_DEBUG is set, propagate with their traceback.
    """
    try:
        yield
    except Exception as exc:
        error = None if debug_requested() else find_user_error(exc)
        if error is None:
            raise
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"{prog}: error: {message or type(error).__name__}", file=sys.stderr)
        raise SystemExit(EXIT_STATUS) from None
