"""File helpers shared by the core and plugins: atomic writes, streamed safetensors files,
canonical-JSON hashes, file digests, timestamps and the exclusive lock a process holds while it
writes a cache directory."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import torch

from .errors import CorruptCacheError, UsageError

__all__ = ["DirectoryLock", "StreamedSafetensorsFile", "atomic_write", "canonical_json", "file_sha256",
           "json_default", "json_sha256", "now_iso", "read_manifest", "remove_stale_temporaries",
           "safetensors_os_errors", "save_safetensors_atomic", "write_json_atomic"]


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


def _temporary_path(path: Path) -> Path:
    """A hidden sibling of ``path``, unique to this process and thread, to write before renaming:
    ``.<name>.<pid>.<thread>.tmp`` (see :func:`remove_stale_temporaries`)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


_TEMPORARY_NAMES = (
    re.compile(r"^\..+\.(\d+)\.\d+\.tmp$"),  # files of _temporary_path: .<name>.<pid>.<thread>.tmp
    re.compile(r"^\..+\.(?:tmp|old)-(\d+)$"),  # directories such as .report.tmp-<pid> / .report.old-<pid>
)


def temporary_owner(name: str) -> int | None:
    """The process id in a temporary name (``.<name>.<pid>.<thread>.tmp``, ``.<name>.tmp-<pid>`` or
    ``.<name>.old-<pid>``); None
    when ``name`` is not a saelab temporary."""
    for pattern in _TEMPORARY_NAMES:
        match = pattern.match(name)
        if match:
            return int(match.group(1))
    return None


def process_alive(pid: int) -> bool:
    """Whether a process with id ``pid`` runs on this machine (a process of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike[str], *, writers_gone: bool = False,
                             recursive: bool = True) -> list[tuple[Path, int]]:
    """Delete the temporaries (files named by :func:`atomic_write` and the streamed writers, and
    ``.<name>.tmp-<pid>`` directories) under ``directory`` left by processes that died (kill -9,
    power loss); returns ``(path, bytes)`` of each removed one.

    A temporary is stale when the process id in its name no longer runs here; this process's own are
    kept, and so is one whose id was reused by a live process (pids are host-local: on a filesystem
    shared by several machines pass ``writers_gone`` instead). ``writers_gone=True`` says that the
    caller holds the directory's exclusive :class:`DirectoryLock`, so no writer can be alive: every
    temporary there is removed whatever its pid.
    """
    root = Path(directory)
    if not root.is_dir():
        return []
    removed: list[tuple[Path, int]] = []
    candidates = root.rglob(".*") if recursive else root.glob(".*")
    for path in sorted(candidates, key=lambda p: len(p.parts)):
        pid = temporary_owner(path.name)
        if pid is None or not path.exists():
            continue
        if not writers_gone and (pid == os.getpid() or process_alive(pid)):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                shutil.rmtree(path)
            else:
                size = path.stat().st_size
                path.unlink()
        except FileNotFoundError:  # removed meanwhile by another cleaner
            continue
        removed.append((path, size))
    return removed


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], *, newline: str | None = None,
                 fsync: bool = False) -> Iterator[IO[str]]:
    """A UTF-8 text handle whose content replaces ``path`` in one rename when the block ends without
    an exception (readers never see half a file). The temporary file is named after the process and
    thread, so concurrent writers of one path do not collide; it is removed on failure. ``fsync``
    flushes it to disk before the rename. The parent directory is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_path(path)
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
    releases it if the process dies); the holder writes its pid, host and start time into the file.
    Taken while another process holds it: a one-line :class:`~saelab.errors.UsageError` naming ``what``
    (e.g. ``"activation cache"``), the directory and the holder's pid. A lock held only for an instant
    (a :meth:`holder` probe) is waited for, up to ``patience_s``."""

    def __init__(self, directory: str | os.PathLike[str], what: str = "directory", *, patience_s: float = 0.5):
        self.path = Path(directory) / ".lock"
        self.what = what
        self.patience_s = patience_s
        self.fh: Any = None

    def __enter__(self) -> DirectoryLock:
        self.fh = open(self.path, "a+")  # noqa: SIM115 - closed in __exit__
        deadline = time.monotonic() + self.patience_s
        while True:
            try:
                fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                self.fh.close()
                raise UsageError(self.busy_message(self.path.parent, self.what)) from None
        with contextlib.suppress(OSError):  # the holder's note is for messages only
            self.fh.seek(0)
            self.fh.truncate()
            self.fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": now_iso()}))
            self.fh.flush()
        return self

    def __exit__(self, *exc: Any) -> None:
        with contextlib.suppress(OSError):
            self.fh.truncate(0)
        fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
        self.fh.close()

    @staticmethod
    def holder(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
        """The note (``pid``, ``host``, ``since``) of the process holding ``<directory>/.lock``, or None
        when nobody holds it. Probes with a shared lock for an instant; never blocks."""
        path = Path(directory) / ".lock"
        try:
            fh = open(path)  # noqa: SIM115 - closed below
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    note = json.loads(fh.read() or "{}")
                except ValueError:
                    note = {}
                return note if isinstance(note, dict) else {}
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            return None
        finally:
            fh.close()

    @classmethod
    def busy_message(cls, directory: str | os.PathLike[str], what: str) -> str:
        """``<what> <directory> is being written by another process (PID n ...); wait for it or stop it``."""
        note = cls.holder(directory) or {}
        who = ""
        if note.get("pid"):
            who = f" (PID {note['pid']}"
            if note.get("host") and note["host"] != socket.gethostname():
                who += f" on {note['host']}"
            who += f", since {note['since']})" if note.get("since") else ")"
        return f"{what} {directory} is being written by another process{who}; wait for it or stop it"


_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)")


@contextlib.contextmanager
def safetensors_os_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn the ``SafetensorError`` that the safetensors writer raises for an I/O failure (``... No space
    left on device (os error 28)``) into the :class:`OSError` it is, naming ``path`` (so a full disk is
    the one-line exit-3 error of the CLI, not a traceback); other errors pass unchanged."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    except Exception as exc:
        match = _OS_ERROR_IN_TEXT.search(str(exc))
        if type(exc).__name__ != "SafetensorError" or match is None:
            raise
        code = int(match.group(1))
        raise OSError(code, os.strerror(code), str(path)) from exc


def save_safetensors_atomic(path: str | os.PathLike[str], tensors: dict[str, Any],
                            metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (made contiguous) as a safetensors file through a temporary file and a rename;
    the parent directory is created if needed."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_path(path)
    try:
        with safetensors_os_errors(path):
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class StreamedSafetensorsFile:
    """One tensor written to a safetensors file block of rows by block of rows, so that it is never
    whole in memory; the file appears under ``path`` (by rename) only when :meth:`close` succeeds.

    The header is written first for ``shape``; ``close(n_rows)`` may shrink the first dimension
    (data ran out), rewriting the header in place, padded with spaces, and truncating the file.
    As a context manager, an exception inside the block aborts the file; :meth:`close` stays explicit.
    """

    _DTYPE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
                    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}

    def __init__(self, path: str | os.PathLike[str], name: str, dtype: torch.dtype, shape: Sequence[int],
                 metadata: dict[str, str] | None = None):
        dtype_name = str(dtype).removeprefix("torch.")
        if dtype_name not in self._DTYPE_CODES:
            raise UsageError(f"bad safetensors dtype {dtype_name!r}; accepted: {', '.join(self._DTYPE_CODES)}")
        self.path, self.name, self.dtype, self.metadata = Path(path), name, dtype, metadata
        self.shape = [int(d) for d in shape]
        self.row_shape = tuple(self.shape[1:])
        self._code = self._DTYPE_CODES[dtype_name]
        self._row_bytes = math.prod(self.row_shape) * dtype.itemsize
        self.rows_written = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = _temporary_path(self.path)
        self._file: IO[bytes] | None = open(self._tmp, "wb")  # noqa: SIM115 - closed by close()/abort()
        self._header_len = 0
        try:
            with safetensors_os_errors(self.path):
                self._file.write(self._header(self.shape[0]))
        except BaseException:
            self.abort()
            raise

    def _header(self, n_rows: int) -> bytes:
        entry = {"dtype": self._code, "shape": [n_rows, *self.row_shape], "data_offsets": [0, n_rows * self._row_bytes]}
        header: dict[str, Any] = {"__metadata__": self.metadata} if self.metadata else {}
        header[self.name] = entry
        text = json.dumps(header, separators=(",", ":")).encode()
        width = self._header_len or -(-len(text) // 8) * 8
        if len(text) > width:
            raise ValueError(f"safetensors header of {self.path} grew beyond its reserved {width} bytes")
        self._header_len = width
        return width.to_bytes(8, "little") + text.ljust(width, b" ")

    def write(self, rows: torch.Tensor) -> None:
        """Append ``rows`` (a CPU tensor of this file's dtype, shape ``(k, *shape[1:])``)."""
        if self._file is None:
            raise ValueError(f"{self.path} is already closed")
        if tuple(rows.shape[1:]) != self.row_shape or rows.dtype != self.dtype:
            raise ValueError(f"rows of shape {tuple(rows.shape)} and dtype {rows.dtype} do not fit {self.path} "
                             f"({self.dtype}, rows of {self.row_shape})")
        if self.rows_written + rows.shape[0] > self.shape[0]:
            raise ValueError(f"{self.path} holds {self.shape[0]} rows; cannot write {rows.shape[0]} more "
                             f"after {self.rows_written}")
        with safetensors_os_errors(self.path):
            self._file.write(memoryview(rows.detach().contiguous().view(torch.uint8).numpy()).cast("B"))
        self.rows_written += int(rows.shape[0])

    def close(self, n_rows: int | None = None) -> None:
        """Finish the file with ``n_rows`` rows (default: the planned first dimension) and rename it into place."""
        n_rows = self.shape[0] if n_rows is None else n_rows
        if self._file is None:
            raise ValueError(f"{self.path} is already closed")
        if n_rows != self.rows_written:
            self.abort()
            raise ValueError(f"{self.path}: {self.rows_written} rows written, {n_rows} declared")
        try:
            with safetensors_os_errors(self.path):
                if n_rows != self.shape[0]:
                    self._file.seek(0)
                    self._file.write(self._header(n_rows))
                    self._file.truncate(8 + self._header_len + n_rows * self._row_bytes)
                self._file.close()
                self._file = None
                os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Close and delete the temporary file; nothing appears under ``path``. Never raises for the
        close itself (flushing the last buffered bytes fails again on a full disk)."""
        if self._file is not None:
            file, self._file = self._file, None
            with contextlib.suppress(OSError):
                file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> StreamedSafetensorsFile:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.abort()


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
