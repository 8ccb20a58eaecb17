"""Builtin datasets: embedded samples from gensim's test data, Hugging Face datasets, local files.

- ``wikipedia-sample``: 106 Wikipedia articles shipped in the ``gensim`` wheel (wikitext cleaned
  with ``gensim.corpora.wikicorpus.filter_wiki``; ~729k SmolLM2 tokens).
- ``news-sample``: gensim's Lee corpus, 300 news articles, one per line (~75k tokens).
- ``huggingface``: any hub id (``datasets.load_dataset(repo, name, split=..., streaming=...)``) or a
  local dataset repository directory.
- ``local-files``: a ``.txt`` (one document per non-empty line), ``.jsonl``/``.json``, ``.parquet`` or
  ``.csv`` file; ``--dataset_column`` picks the text column.

Split expressions (``train``, ``train[:1%]``, ``train[10:200]``) work for every one of them; the
embedded samples and local files have the single split ``train``, and they (and local dataset directories)
are read whole unless ``--dataset_split`` is given (``Dataset.reads_whole``).
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from pydantic import SecretStr
from saelab import Dataset, UsageError, hookimpl
from saelab.data import DatasetOptions, check_column, clean_text, split_rows
from saelab.fileio import file_sha256 as sha256_of_file

WIKIPEDIA_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_FILE = "lee_background.cor"
LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
"""Local file suffixes and the ``datasets`` builder that reads each (the one list of local data suffixes)."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_of_file(path)


def file_sha256(path: Path) -> str:
    """sha256 of a file's content (memoised on path, size and mtime)."""
    stat = path.stat()
    return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


def tree_sha256(root: Path) -> str:
    """sha256 over the relative paths and contents of the files under ``root`` (hidden ones skipped)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        digest.update(str(rel).encode() + b"\0" + file_sha256(path).encode() + b"\n")
    return digest.hexdigest()


def _gensim_datapath(filename: str) -> Path:
    try:
        from gensim.test.utils import datapath
    except ImportError:
        raise UsageError(
            "the embedded datasets need gensim; install it with `pip install gensim` (or `pip install saelab[embedded]`)"
        ) from None
    return Path(datapath(filename))


class EmbeddedOptions(DatasetOptions):
    """Options of the embedded samples (single split ``train``, single column ``text``)."""


class _EmbeddedDataset(Dataset):
    """Shared behaviour of the embedded samples: a fixed document list with split slicing."""

    Options = EmbeddedOptions
    filename: ClassVar[str]
    parser_version: ClassVar[int] = 1

    def __init__(self, repo: str, options: DatasetOptions | None = None):
        super().__init__(repo, options)
        where = f"dataset {self.name}"
        if self.options.name:
            raise UsageError(f"{where} has no configurations; got --dataset_name {self.options.name!r}; leave it empty")
        check_column(self.options.column, ["text"], where)
        self._ranges = split_rows(self.options.split, len(self.documents()), where=where)

    @classmethod
    def reads_whole(cls, repo: str) -> bool:
        """Yes: a small sample, read whole unless ``--dataset_split`` is given."""
        return True

    @classmethod
    def path(cls) -> Path:
        """The data file inside the gensim wheel."""
        return _gensim_datapath(cls.filename)

    @classmethod
    def documents(cls) -> list[str]:
        """Every document of the sample, in order."""
        return _documents(cls.name, str(cls.path()))

    def texts(self) -> Iterator[str]:
        """Documents of the selected split."""
        docs = self.documents()
        for start, stop in self._ranges:
            yield from docs[start:stop]

    def identity(self) -> dict[str, Any]:
        """Name, file hash, parser version, split and column."""
        return {"repo": self.name, "file": self.filename, "sha256": file_sha256(self.path()),
                "parser_version": self.parser_version, "split": self.options.split, "column": "text"}


@functools.lru_cache(maxsize=4)
def _documents(kind: str, path: str) -> list[str]:
    if kind == "wikipedia-sample":
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki

        docs = []
        with bz2.open(path, "rb") as fh:
            for _title, text, _pageid in extract_pages(fh):
                if text.lstrip().lower().startswith("#redirect"):
                    continue
                cleaned = clean_text(filter_wiki(text))
                if cleaned:
                    docs.append(cleaned)
        return docs
    with open(path, encoding="utf-8", errors="replace") as fh:
        return [line.strip() for line in fh if line.strip()]


class WikipediaSample(_EmbeddedDataset):
    """106 Wikipedia articles from gensim's test data (embedded, offline; ~729k SmolLM2 tokens)."""

    name = "wikipedia-sample"
    filename = WIKIPEDIA_FILE


class NewsSample(_EmbeddedDataset):
    """300 news articles (gensim's Lee corpus), one per line (embedded, offline; ~75k tokens)."""

    name = "news-sample"
    filename = LEE_FILE


class _DatasetsBacked(Dataset):
    """Reads through ``datasets.load_dataset`` and checks the text column."""

    Options = DatasetOptions

    def __init__(self, repo: str, options: DatasetOptions | None = None, *, hf_token: str | None = None):
        super().__init__(repo, options)
        self._ds: Any = None
        self._hf_token = SecretStr(hf_token) if hf_token else None  # a credential: memory only

    def load_args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Positional and keyword arguments for ``datasets.load_dataset`` (split excluded)."""
        raise NotImplementedError

    def dataset(self) -> Any:
        """The loaded ``datasets`` split (``Dataset`` or ``IterableDataset``), column checked."""
        if self._ds is None:
            self._ds = self._load()
            columns = self._ds.column_names
            if columns is None:  # some streamed datasets only know their columns after a row
                first = next(iter(self._ds), None)
                columns = list(first) if first is not None else []
            check_column(self.options.column, columns, f"dataset {self.repo} (split {self.options.split!r})")
        return self._ds

    def _load(self) -> Any:
        import datasets

        args, kwargs = self.load_args()
        split = self.options.split
        streaming = self.options.streaming
        slice_ = None
        if streaming:
            match = re.fullmatch(r"\s*([\w.-]+)\s*(?:\[\s*(-?\d*)\s*:\s*(-?\d*)\s*\])?\s*", split)
            if match is None or any(v.startswith("-") for v in match.groups()[1:] if v):
                raise UsageError(
                    f"split {split!r} cannot be streamed; accepted with streaming: 'train' or 'train[A:B]' "
                    f"with non-negative A, B (or turn streaming off)"
                )
            split = match.group(1)
            slice_ = (int(match.group(2) or 0), int(match.group(3)) if match.group(3) else None)
        bars_were_off = datasets.utils.are_progress_bars_disabled()
        datasets.utils.disable_progress_bars()
        verbosity = datasets.logging.get_verbosity()
        datasets.logging.set_verbosity_error()  # its own error logs would add lines before our one-line error
        try:
            ds = datasets.load_dataset(*args, split=split, streaming=streaming,
                                       token=self._hf_token.get_secret_value() if self._hf_token else None, **kwargs)
        except Exception as exc:
            message = " ".join(str(exc).split()) or type(exc).__name__
            cause = exc.__cause__ or exc.__context__
            if cause is not None and "error occurred while generating" in message:
                message += ": " + (" ".join(str(cause).split()) or type(cause).__name__)
            if isinstance(exc, StopIteration) or "corresponds to no data" in message:
                raise UsageError(f"dataset {self.repo!r} (split {self.options.split!r}) holds no rows; give a "
                                 f"dataset with at least one document") from None
            raise UsageError(
                f"cannot load dataset {self.repo!r} (name {self.options.name!r}, split {self.options.split!r}): "
                f"{message[:400]}"
            ) from None
        finally:
            datasets.logging.set_verbosity(verbosity)
            if not bars_were_off:
                datasets.utils.enable_progress_bars()
        if slice_ is not None:
            start, stop = slice_
            if start:
                ds = ds.skip(start)
            if stop is not None:
                ds = ds.take(max(0, stop - start))
        return ds

    def texts(self) -> Iterator[str]:
        """Values of the text column, in order (empty values skipped)."""
        ds = self.dataset()
        column = self.options.column
        if hasattr(ds, "select_columns"):
            ds = ds.select_columns([column])
        if hasattr(ds, "iter") and not getattr(ds, "_is_streaming", False) and hasattr(ds, "__len__"):
            rows: Any = (text for batch in ds.iter(batch_size=256) for text in batch[column])
        else:
            rows = (row[column] for row in ds)
        for text in rows:
            if text is None:
                continue
            if not isinstance(text, str):
                raise UsageError(
                    f"column {column!r} of dataset {self.repo} holds {type(text).__name__} values, not text; "
                    f"choose a text column with --dataset_column"
                )
            if text.strip():
                yield text


class HuggingFaceDataset(_DatasetsBacked):
    """A Hugging Face hub dataset id or a local dataset repository directory (``datasets.load_dataset``)."""

    name = "huggingface"
    aliases = ("hf",)

    @classmethod
    def accepts(cls, repo: str) -> bool:
        """Existing directories and strings shaped like hub ids (``org/name`` or ``name``)."""
        path = Path(repo).expanduser()
        if path.is_dir():
            return True
        if path.suffix.lower() in LOCAL_BUILDERS or path.exists():
            return False
        return bool(_HUB_ID.match(repo))

    @classmethod
    def reads_whole(cls, repo: str) -> bool:
        """A local dataset directory is read whole unless ``--dataset_split`` is given; a hub id is not."""
        return Path(repo).expanduser().exists()

    def load_args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``load_dataset(repo, name)``."""
        path = Path(self.repo).expanduser()
        return (str(path) if path.is_dir() else self.repo, self.options.name or None), {}

    def identity(self) -> dict[str, Any]:
        """Repo, config name, split, column, and a content hash (local dir) or the hub revision."""
        out: dict[str, Any] = {"repo": self.repo, "name": self.options.name or None,
                               "split": self.options.split, "column": self.options.column}
        path = Path(self.repo).expanduser()
        if path.is_dir():
            out["repo"] = str(path.resolve())
            out["sha256"] = tree_sha256(path)
        else:
            out["revision"] = _hub_revision(self.repo)
        return out


def _hub_revision(repo: str) -> str | None:
    """The commit of ``refs/main`` of a dataset in the local hub cache (None when unknown)."""
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        return None
    ref = Path(os.environ.get("HF_HUB_CACHE", HF_HUB_CACHE)) / f"datasets--{repo.replace('/', '--')}" / "refs" / "main"
    try:
        return ref.read_text().strip() or None
    except OSError:
        return None


class LocalFiles(_DatasetsBacked):
    """A local .txt (one document per line), .jsonl/.json, .parquet or .csv file; split ``train``."""

    name = "local-files"

    @classmethod
    def accepts(cls, repo: str) -> bool:
        """Paths ending in a supported suffix (a missing file is then a clear error)."""
        return Path(repo).suffix.lower() in LOCAL_BUILDERS and not Path(repo).expanduser().is_dir()

    @classmethod
    def reads_whole(cls, repo: str) -> bool:
        """Yes: a local file is read whole unless ``--dataset_split`` is given."""
        return True

    def __init__(self, repo: str, options: DatasetOptions | None = None):
        super().__init__(repo, options)
        path = Path(repo).expanduser()
        if not path.is_file():
            raise UsageError(
                f"dataset file {repo!r} does not exist; give an existing {', '.join(LOCAL_BUILDERS)} file, "
                f"a dataset directory, a hub id or an embedded name (wikipedia-sample, news-sample)"
            )
        if self.options.name:
            raise UsageError(f"local file {repo!r} has no configurations; got --dataset_name {self.options.name!r}")
        size = path.stat().st_size
        if size == 0 or (size < 2**16 and not path.read_bytes().strip()):
            raise UsageError(f"dataset file {repo!r} is empty; give a file with at least one document")
        self.file = path.resolve()
        if self.builder == "text":
            check_column(self.options.column, ["text"], f"dataset {repo} (a .txt file)")

    @property
    def builder(self) -> str:
        """The ``datasets`` builder for this file's suffix."""
        return LOCAL_BUILDERS[self.file.suffix.lower()]

    def texts(self) -> Iterator[str]:
        """Documents of the selected split (for .txt: non-empty lines, the split counting those)."""
        if self.builder != "text":
            yield from super().texts()
            return
        with open(self.file, encoding="utf-8", errors="replace") as fh:
            lines = [line.rstrip("\r\n") for line in fh if line.strip()]
        for start, stop in split_rows(self.options.split, len(lines), where=f"dataset {self.repo}"):
            yield from lines[start:stop]

    def load_args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``load_dataset(builder, data_files=path)``."""
        return (self.builder,), {"data_files": str(self.file)}

    def identity(self) -> dict[str, Any]:
        """Path, content hash, split and column."""
        return {"repo": str(self.file), "sha256": file_sha256(self.file), "split": self.options.split,
                "column": self.options.column}


@hookimpl
def register_datasets(register: Any) -> None:
    """Register the builtin datasets (local files before hub ids: a path wins over an id)."""
    register(WikipediaSample)
    register(NewsSample)
    register(LocalFiles)
    register(HuggingFaceDataset)
