"""Writing files so that a crash never leaves one that looks complete."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import PersonavecError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temp file in the same folder, then rename it to `path`.

    The file gets the mode a plain `open(path, "w")` would give it (0o666 less the umask), not the temp file's 0600.
    """
    path = Path(path)
    if path.is_dir():
        raise PersonavecError(f"{path}: is a folder; give a file path to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise PersonavecError(f"{path}: cannot be written, a part of its folder path is a file") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
