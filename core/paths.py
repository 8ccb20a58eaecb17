"""Where saelab keeps things: the user cache dir and the results tree."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SAELAB_CACHE_DIR"
RESULTS_ENV = "SAELAB_RESULTS_DIR"


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


def results_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """Root of run directories: ``root``, else ``$SAELAB_RESULTS_DIR``, else ``./results``."""
    return Path(root or os.environ.get(RESULTS_ENV) or "results")


def run_dir(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """``results/<name>/``."""
    from .errors import UsageError

    if not name or "/" in name or name in (".", "..") or name.startswith(".activations"):
        raise UsageError(f"bad run name {name!r}; use a plain directory name such as 'demo'")
    return results_dir(root) / name


def activation_store(root: str | os.PathLike[str] | None = None) -> Path:
    """Shared activation-cache store: ``results/.activations/``."""
    return results_dir(root) / ".activations"
