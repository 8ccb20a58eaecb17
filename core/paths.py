"""The user cache dir (converted models, embeddings); run paths live in :mod:`saelab.layout`."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SAELAB_CACHE_DIR"


def cache_dir() -> Path:
    """User cache dir for converted models and embeddings: ``$SAELAB_CACHE_DIR`` or ``~/.cache/saelab``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        path = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = Path(base) / "saelab"
    path.mkdir(parents=True, exist_ok=True)
    return path
