"""The house rules of /work/shared/design/ARCHITECTURE.md, checked on the source: which way imports
run (read from each file's syntax tree, imports inside functions included), that the experiment
commands answer `--help` without importing torch, lightning or transformers, and that the README's
Layout names what the tree holds."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "lightning", "transformers")


def imported_modules(source: str, module: str) -> set[str]:
    """Every module that `source` (the file of dotted `module`) imports: `import a.b`, `from a import b`
    (as `a` and `a.b`, since b may be a submodule), relative imports resolved, and
    `importlib.import_module("...")` with a literal name."""
    package = module.split(".")[:-1]  # also right for `pkg.__init__`
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return found


def dotted(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def sources(*roots: str) -> list[Path]:
    return sorted(p for root in roots for p in (REPO / root).rglob("*.py"))


# (files the rule covers, modules they must not import, why)
RULES = [
    (lambda m: within(m, "talr"), ("callbacks", "cli"), "the library never imports the callbacks or the CLI"),
    (lambda m: within(m, "talr") and not within(m, "talr.experiments"), ("talr.experiments",),
     "the library never imports the experiment commands"),
    (lambda m: within(m, "callbacks"), ("cli", "talr.experiments"), "callbacks never import the CLI or the commands"),
    (lambda m: m in ("talr.losses", "talr.token_loss"), ("lightning", "transformers"),
     "the loss math is pure torch"),
    (lambda m: within(m, "talr.tasks"), ("talr.module",), "a task never imports the module"),
]


def violations(module: str, source: str) -> list[str]:
    imports = imported_modules(source, module)
    return [f"{module} imports {name} ({why})" for covers, forbidden, why in RULES if covers(module)
            for name in sorted(imports) if any(within(name, f) for f in forbidden)]


def test_imports_run_the_documented_way():
    files = sources("talr", "callbacks")
    modules = {dotted(p) for p in files}
    # the walk must see the files the rules are about, or it would pass by finding nothing
    assert {"talr.losses", "talr.token_loss", "talr.tasks.medcalc", "talr.experiments.sweep",
            "callbacks.run_summary"} <= modules
    assert [v for p in files for v in violations(dotted(p), p.read_text(encoding="utf-8"))] == []


def test_the_synthetic_generator_needs_only_the_standard_library():
    # it is the embedded default data: it must run wherever Python does, with nothing installed
    files = sources("talr/tasks/medcalc_synth")
    assert {dotted(p) for p in files} >= {"talr.tasks.medcalc_synth.formulas", "talr.tasks.medcalc_synth.prose"}
    outside = {f"{dotted(p)}: {name}" for p in files for name in imported_modules(p.read_text(encoding="utf-8"), dotted(p))
               if name.split(".")[0] not in sys.stdlib_module_names and not within(name, "talr.tasks.medcalc_synth")}
    assert outside == set()


def test_the_import_reader_sees_every_form(tmp_path):
    source = textwrap.dedent("""
        import os, lightning.pytorch as pl
        from callbacks.run_summary import RunSummary
        from . import losses
        from ..experiments import sweep
        def later():
            import transformers
            importlib.import_module("cli")
        if TYPE_CHECKING:
            from torch import Tensor
    """)
    found = imported_modules(source, "talr.tasks.example")
    expected = {"os", "lightning.pytorch", "callbacks.run_summary", "callbacks.run_summary.RunSummary",
                "talr.tasks", "talr.tasks.losses", "talr.experiments", "talr.experiments.sweep",
                "transformers", "cli", "torch", "torch.Tensor"}
    assert found == expected


def test_forbidden_imports_are_reported():
    lazy_command = "def f():\n    from talr.experiments.sweep import Sweep\n    import lightning\n"
    assert violations("talr.tasks.example", lazy_command) == [
        "talr.tasks.example imports talr.experiments.sweep (the library never imports the experiment commands)",
        "talr.tasks.example imports talr.experiments.sweep.Sweep (the library never imports the experiment commands)",
    ]
    assert violations("talr.experiments.sweep", lazy_command) == []  # a command may import a command
    assert violations("talr.losses", "import lightning.pytorch as pl\nfrom .module import SFTModule\n") == [
        "talr.losses imports lightning.pytorch (the loss math is pure torch)",
    ]
    assert violations("callbacks.x", "import cli\n") == ["callbacks.x imports cli (callbacks never import the CLI or the commands)"]


def test_every_extra_command_module_is_in_experiments():
    tree = ast.parse((REPO / "cli.py").read_text(encoding="utf-8"))
    commands = next(ast.literal_eval(node.value) for node in ast.walk(tree)
                    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "EXTRA_COMMANDS" for t in node.targets))
    assert set(commands) == {"cot", "sweep", "report", "curriculum", "verdicts"}
    for name, target in commands.items():
        module, function = target.split(":")
        assert module == f"talr.experiments.{name}" and function == "main"
        assert (REPO / Path(*module.split("."))).with_suffix(".py").is_file()


@pytest.mark.parametrize("command", ["sweep", "report", "cot", "curriculum", "verdicts"])
def test_help_imports_no_torch_lightning_or_transformers(command):
    # A fresh interpreter: in this test process torch is already imported by conftest.
    probe = textwrap.dedent(f"""
        import sys
        from talr.experiments.{command} import main
        try:
            main(["--help"])
        except SystemExit as done:
            assert done.code == 0, done.code
        print("HEAVY=" + ",".join(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})))
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: talr {command}")
    assert result.stdout.rstrip().endswith("HEAVY="), result.stdout[-300:]


def readme_layout() -> list[tuple[str, str]]:
    """(path, description) per entry of the README's Layout block; continuation lines join the entry above."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    entries: list[tuple[str, str]] = []
    for line in block.strip("\n").splitlines():
        if line.startswith(" "):
            path, description = entries[-1]
            entries[-1] = (path, f"{description} {line.strip()}")
        else:
            path, _, description = line.partition(" ")
            entries.append((path, description.strip()))
    return entries


def test_readme_layout_matches_the_tree():
    entries = dict(readme_layout())
    missing = [path for path in entries if not (REPO / path).exists()]
    assert missing == []
    # files named inside a directory's entry ("sweep.py, report.py") are in that directory
    for path, description in entries.items():
        if path.endswith("/"):
            named = re.findall(r"\b[\w.]+\.(?:py|md|yaml)\b", description)
            assert [n for n in named if not (REPO / path / n).exists()] == [], path
    # and every module and package of the library, and every callback, has its entry
    library = {p.relative_to(REPO).as_posix() + ("/" if p.is_dir() else "") for p in (REPO / "talr").iterdir()
               if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()}
    listed = set(entries) | {f"{p}/" for p in entries}
    assert sorted(library - listed) == []
    callbacks = {p.stem for p in (REPO / "callbacks").glob("*.py") if p.name != "__init__.py"}
    assert sorted(c for c in callbacks if c not in entries["callbacks/"]) == []
