"""Result files: written atomically, and never over an earlier run's files without consent."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable


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
