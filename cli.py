"""`talr <command>`: fit/validate/test through LightningCLI (talr/lightning_cli.py), and plain commands.

A dispatcher, thin on purpose: `talr --help` and `talr --version` answer before torch and
Lightning load (about 10 s on a CPU machine), and a user error ends in one line (talr/errors.py).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

import talr
from talr.allocator import use_tcmalloc
from talr.errors import DEBUG_ENV, EXIT_STATUS, user_errors_in_one_line

if TYPE_CHECKING:
    from talr.lightning_cli import TalrCLI

USAGE = "usage: talr <command> [options]"

# LightningCLI's commands, as talr --help lists them (TalrCLI.subcommands() has the same names).
LIGHTNING_COMMANDS = {
    "fit": "train a model on a task's rows (validates before and during training)",
    "validate": "score a model or a checkpoint on the validation rows",
    "test": "score a model or a checkpoint on the test task",
}

# Plain subcommands beside LightningCLI's fit/validate/test: name -> "module:function", where the
# function takes the remaining arguments and returns the exit status.
EXTRA_COMMANDS = {"cot": "talr.experiments.cot:main", "sweep": "talr.experiments.sweep:main", "report": "talr.experiments.report:main",
                  "curriculum": "talr.experiments.curriculum:main", "verdicts": "talr.experiments.verdicts:main"}


def build_cli(args: list[str] | None = None) -> TalrCLI:
    """Parse `args` (default: sys.argv) and run the subcommand; returns the CLI for inspection."""
    from callbacks.plain_progress import PlainProgress  # torch and Lightning load here, not for --help
    from callbacks.run_summary import RunSummary
    from callbacks.throughput import Throughput
    from talr.lightning_cli import TalrCLI

    # every run logs its speed, reports its before / best / last numbers and writes summary.json;
    # with stdout in a file, progress comes as plain lines
    return TalrCLI(args=args, default_callbacks=[Throughput, RunSummary], log_progress_bar=PlainProgress)


def talr_version() -> str:
    """The installed package's version (setup.cfg's, through the package metadata)."""
    try:
        return version("talr")
    except PackageNotFoundError:  # a source tree on PYTHONPATH that pip never installed
        return talr.__version__


def command_summary(target: str) -> str:
    """The first line of a command module's docstring, read without importing the module (or torch)."""
    spec = importlib.util.find_spec(target.split(":")[0])
    if spec is None or spec.origin is None:
        return ""
    with open(spec.origin, encoding="utf-8") as f:
        docstring = ast.get_docstring(ast.parse(f.read())) or ""
    first = docstring.strip().splitlines()[0] if docstring.strip() else ""
    return first.split("`: ", 1)[-1].rstrip(".")  # "`talr sweep --config ...`: a grid of ..." -> "a grid of ..."


def help_text() -> str:
    commands = {**LIGHTNING_COMMANDS, **{name: command_summary(t) for name, t in EXTRA_COMMANDS.items()}}
    width = max(map(len, commands)) + 2
    return "\n".join([
        USAGE,
        "",
        talr.__doc__.strip(),
        "",
        "commands (talr <command> --help lists a command's options):",
        *(f"  {name:<{width}}{summary}" for name, summary in commands.items()),
        "",
        "options:",
        "  -h, --help     show this message and exit",
        "  --version      print talr's version and exit",
        f"  --traceback    on an error, print the whole traceback (or set {DEBUG_ENV}=1)",
    ])


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--traceback" in args:
        args = [a for a in args if a != "--traceback"]
        os.environ[DEBUG_ENV] = "1"  # the environment also reaches DDP ranks and sweep runs
    if args in (["-h"], ["--help"]):
        print(help_text())
        sys.exit(0)
    if args == ["--version"]:
        print(f"talr {talr_version()}")
        sys.exit(0)
    if not args or not (args[0].startswith("-") or args[0] in {*LIGHTNING_COMMANDS, *EXTRA_COMMANDS}):
        problem = f"{args[0]!r} is not a talr command" if args else "no command given"
        commands = ", ".join([*LIGHTNING_COMMANDS, *EXTRA_COMMANDS])
        print(f"{USAGE}\ntalr: error: {problem}; the commands are {commands} (talr --help)", file=sys.stderr)
        sys.exit(EXIT_STATUS)
    if argv is None and args[0] == "fit":
        use_tcmalloc()  # a training step's allocations (talr/allocator.py); runs this command again, once
    with user_errors_in_one_line():
        if args[0] in EXTRA_COMMANDS:
            module, function = EXTRA_COMMANDS[args[0]].split(":")
            sys.exit(getattr(importlib.import_module(module), function)(args[1:]))
        if argv is None:
            sys.argv[1:] = args  # LightningCLI reads sys.argv itself; given a list as well, it warns
            build_cli()
        else:
            build_cli(args)


if __name__ == "__main__":
    main()
