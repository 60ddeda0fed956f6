"""Result files: written atomically, and never over an earlier run's files without consent."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from lightning.pytorch.callbacks import Callback


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Temporary file beside `path`, then one rename: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def refuse_to_overwrite(paths: Iterable[str | Path], option: str) -> None:
    """Raise if any of `paths` (files, or directories with files) holds an earlier run's results.

    Call it when a run starts, unless the run resumes its own checkpoint or the user set `option`.
    """
    taken = []
    for path in map(Path, paths):
        if path.is_file() or (path.is_dir() and any(p.is_file() for p in path.rglob("*"))):
            taken.append(str(path))
    if taken:
        raise FileExistsError(
            f"{', '.join(taken)} already hold(s) results of an earlier run; set {option}: true to replace them, "
            "resume that run with --ckpt_path, or write elsewhere (another logger version or dirpath)"
        )


def resumes_its_own_run(trainer) -> bool:
    """A fit restored from a checkpoint continues its own run and may rewrite that run's files."""
    return trainer.ckpt_path is not None and trainer.state.fn == "fit"


class ResultGuard:
    """Before a run's first write, its result files must not hold an earlier run's results.

    Checked once per run: at the first call that is not a fit resuming its own checkpoint (a resumed
    run continues, and may rewrite, its own files). With `overwrite`, `clear` runs instead of the
    refusal, so old and new files never mix.
    """

    def __init__(self, option: str) -> None:
        self.option = option  # the setting that allows replacing, named in the error
        self.done = False

    def check(self, trainer, paths: Callable[[], Iterable[str | Path]], overwrite: bool = False,
              clear: Callable[[], None] | None = None, always: bool = False) -> None:
        """`always`: check even when resuming (the checkpoint is not of a run that wrote these files)."""
        if not always and (self.done or resumes_its_own_run(trainer)):
            return
        found = list(paths())  # every rank asks: log_dir is a broadcast
        if overwrite:
            if clear is not None:
                clear()
        else:
            refuse_to_overwrite(found, self.option)
        self.done = True


class GuardsResults(Callback):
    """Base of callbacks that write result files: a new run never writes over an earlier run's.

    The files named by `result_paths` are checked (see `ResultGuard`) at the first setup of a
    validate or test (so before the CLI's validate-before-fit writes) or at fit start, the first
    hook where Lightning knows whether the fit resumes its own checkpoint. With `overwrite`,
    `clear_results` may remove them instead.
    """

    overwrite: bool = False

    @property
    def result_guard(self) -> ResultGuard:
        if "_result_guard" not in self.__dict__:
            self._result_guard = ResultGuard(f"{type(self).__name__}.overwrite")
        return self._result_guard

    def result_paths(self, trainer) -> list[Path]:
        raise NotImplementedError

    def clear_results(self, trainer) -> None:
        """With `overwrite`: remove what must not mix into this run's results (default: nothing)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            self.guard_results(trainer)

    def on_fit_start(self, trainer, pl_module) -> None:
        self.guard_results(trainer)

    def guard_results(self, trainer, always: bool = False) -> None:
        """`always`: also when resuming a checkpoint that is not of a run with this callback."""
        self.result_guard.check(trainer, lambda: self.result_paths(trainer), self.overwrite,
                                lambda: self.clear_results(trainer), always)
