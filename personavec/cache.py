"""Where personavec keeps downloaded models, converted folders and judge caches."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$PERSONAVEC_CACHE`, else `$XDG_CACHE_HOME/personavec`, else `~/.cache/personavec`."""
    explicit = os.environ.get("PERSONAVEC_CACHE")
    if explicit:
        root = Path(explicit)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "personavec"
    root.mkdir(parents=True, exist_ok=True)
    return root
