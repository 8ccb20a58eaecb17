"""File helpers shared by the core and plugins: atomic writes, canonical-JSON hashes, file digests,
timestamps and the exclusive lock a process holds while it writes a cache directory."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from .errors import CorruptCacheError, UsageError

__all__ = ["DirectoryLock", "atomic_write", "canonical_json", "file_sha256", "json_default", "json_sha256",
           "now_iso", "read_manifest", "save_safetensors_atomic", "write_json_atomic"]


def now_iso() -> str:
    """The current UTC time as an ISO 8601 string with seconds (``created_at`` fields)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def json_default(value: Any) -> Any:
    """``json`` fallback: objects with ``to_dict``, numpy/torch values (``tolist``) and paths; else TypeError."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def canonical_json(value: Any, *, ensure_ascii: bool = False,
                   default: Callable[[Any], Any] | None = json_default) -> str:
    """``value`` as compact JSON with sorted keys (the text that hashes identify)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=ensure_ascii, default=default)


def json_sha256(value: Any, length: int | None = None, *, ensure_ascii: bool = False,
                default: Callable[[Any], Any] | None = json_default) -> str:
    """sha256 (hex, first ``length`` chars; all when None) of :func:`canonical_json` of ``value``."""
    text = canonical_json(value, ensure_ascii=ensure_ascii, default=default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) of a file's content, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], *, newline: str | None = None,
                 fsync: bool = False) -> Iterator[IO[str]]:
    """A UTF-8 text handle whose content replaces ``path`` in one rename when the block ends without
    an exception (readers never see half a file). The temporary file is named after the process and
    thread, so concurrent writers of one path do not collide; it is removed on failure. ``fsync``
    flushes it to disk before the rename. The parent directory is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline=newline) as fh:
            yield fh
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike[str], data: Any, *, indent: int | None = 1,
                      default: Callable[[Any], Any] | None = json_default, fsync: bool = False) -> None:
    """Write ``data`` as UTF-8 JSON to ``path`` with :func:`atomic_write` (no half-written files)."""
    with atomic_write(path, fsync=fsync) as fh:
        json.dump(data, fh, ensure_ascii=False, indent=indent, default=default)


class DirectoryLock:
    """An exclusive, non-blocking ``flock`` on ``<directory>/.lock``, held while the block runs (the OS
    releases it if the process dies). Taken while another process holds it: a one-line
    :class:`~saelab.errors.UsageError` naming ``what`` (e.g. ``"activation cache"``) and the directory."""

    def __init__(self, directory: str | os.PathLike[str], what: str = "directory"):
        self.path = Path(directory) / ".lock"
        self.what = what
        self.fh: Any = None

    def __enter__(self) -> DirectoryLock:
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.close()
            raise UsageError(f"{self.what} {self.path.parent} is being written by another process; "
                             f"wait for it or stop it") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
        self.fh.close()


def save_safetensors_atomic(path: str | os.PathLike[str], tensors: dict[str, Any],
                            metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (made contiguous) as a safetensors file through a temporary file and a rename;
    the parent directory is created if needed."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_manifest(directory: str | os.PathLike[str], *, fmt: str, version: int, what: str,
                  name: str = "manifest.json") -> dict[str, Any]:
    """The JSON manifest ``<directory>/<name>`` of a cache whose ``format`` is ``fmt`` and whose
    ``format_version`` is ``version``; otherwise a one-line :class:`~saelab.errors.CorruptCacheError`
    naming ``what`` (e.g. ``"latent cache"``) that says to rebuild with ``--overwrite cache``."""
    path = Path(directory) / name
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CorruptCacheError(f"{what} manifest {path} cannot be read: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise CorruptCacheError(f"{path} is not a saelab {what} manifest")
    if manifest.get("format_version") != version:
        raise CorruptCacheError(f"{what} {directory} has format version {manifest.get('format_version')}; "
                                f"this saelab reads version {version}; rebuild with --overwrite cache")
    return manifest
