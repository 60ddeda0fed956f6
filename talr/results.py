"""Result files: written atomically, and never over an earlier run's files without consent."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

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


class GuardsResults(Callback):
    """Base of callbacks that write result files: a new run never writes over an earlier run's.

    Before this run's first write, the files named by `result_paths` must not exist, unless
    `overwrite` (then `clear_results` may remove them so old and new never mix). The check runs at
    the first setup of a validate or test (so before the CLI's validate-before-fit writes) or at fit
    start, the first hook where Lightning knows whether the fit resumes its own checkpoint, which
    continues and may rewrite its own files.
    """

    overwrite: bool = False
    _results_guarded: bool = False

    def result_paths(self, trainer) -> list[Path]:
        raise NotImplementedError

    def clear_results(self, trainer) -> None:
        """With `overwrite`: remove what must not mix into this run's results (default: nothing)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            self.guard_results(trainer)

    def on_fit_start(self, trainer, pl_module) -> None:
        self.guard_results(trainer)

    def guard_results(self, trainer) -> None:
        if not self._results_guarded and not resumes_its_own_run(trainer):
            self.check_results(trainer)
        self._results_guarded = self._results_guarded or not resumes_its_own_run(trainer)

    def check_results(self, trainer) -> None:
        """Refuse the earlier files, or clear them with `overwrite`."""
        paths = self.result_paths(trainer)  # every rank asks: log_dir is a broadcast
        if self.overwrite:
            self.clear_results(trainer)
        else:
            refuse_to_overwrite(paths, f"{type(self).__name__}.overwrite")
