"""llamabind's cache directory: ``$LLAMABIND_CACHE``, else ``$XDG_CACHE_HOME/llamabind``, else
``~/.cache/llamabind``. Standard library only: the build backend loads this file by path."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    base = os.environ.get("LLAMABIND_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "llamabind"
