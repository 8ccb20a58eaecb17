"""Datasets to token windows: loading a dataset plugin, split expressions, and tokenisation.

Tokenisation scheme (``concat-eos/bos-per-window/v1``), used by the activation cache:

1. Documents are read in the dataset's fixed order and tokenised without special tokens.
2. They are joined into one stream, each document followed by the tokenizer's EOS token (when it
   has one), so a window can span the end of one document and the start of the next.
3. The stream is cut into consecutive windows of ``ctx_len`` tokens. When the tokenizer has a BOS
   token, every window starts with BOS followed by the next ``ctx_len - 1`` stream tokens (so
   position 0 of every cached sequence is BOS, whether or not a document starts there); without
   BOS the window is ``ctx_len`` stream tokens.
4. The final partial window is dropped. When the data runs out before the requested number of
   tokens, one warning line says so and the windows there are are used.

``--filter_bos`` does not change what is cached (it is not part of the fingerprint): readers drop
rows whose token is BOS (``ActivationCache.iter_batches(exclude_bos=True)``, latent statistics).
For tokenizers where BOS and EOS are the same token (GPT-2), that also drops document separators.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .errors import UsageError
from .interfaces import Dataset, DatasetOptions

TOKENIZATION_SCHEME = "concat-eos/bos-per-window/v1"
"""Name and version of the tokenisation scheme described in this module's docstring."""


class DataExhaustedWarning(UserWarning):
    """The dataset held fewer tokens than requested; what there was is used."""


# --------------------------------------------------------------------------------------------------
# Dataset loading


def load_dataset_source(
    repo: str,
    *,
    split: str = "train",
    name: str | None = None,
    column: str = "text",
    hf_token: str | None = None,
    streaming: bool = False,
) -> Dataset:
    """The dataset plugin for ``repo`` (a registered name, a hub id or a local path), instantiated.

    Resolution: a registered dataset name (``wikipedia-sample``, ``news-sample``...), else the first
    dataset class whose ``accepts(repo)`` is true (``local-files`` for data files, ``huggingface``
    for hub ids and dataset directories). Unknown values are one-line errors listing the names.
    The class must follow the :class:`~saelab.Dataset` contract (``cls(repo, options)`` with ``Options``
    a :class:`DatasetOptions`); one that does not is a one-line error naming it and what to change.
    ``hf_token`` is a credential, not an option: it goes to the dataset class's constructor when that
    takes one (``cls(repo, options, hf_token=...)``, the hub-backed classes) and is never written anywhere.
    """
    from .manager import resolve
    from .models import credential_kwargs

    if not repo or not str(repo).strip():
        raise UsageError("empty --dataset_repo; give a dataset name (e.g. wikipedia-sample), hub id or local file")
    cls = resolve("dataset", str(repo))
    check_dataset_class(cls)
    options = cls.Options.parse(
        {"split": split, "name": name or None, "column": column, "streaming": streaming},
        where=f"dataset {repo} (dataset plugin {cls.name!r})",
    )
    return cls(str(repo), options, **credential_kwargs(cls, hf_token))


def check_dataset_class(cls: type[Dataset]) -> None:
    """One-line error when dataset class ``cls`` breaks the contract the factory relies on: ``Options``
    subclassing :class:`DatasetOptions`, a constructor taking ``(repo, options)``."""
    import inspect

    where = f"dataset plugin {getattr(cls, 'name', cls.__name__)!r} ({cls.__module__}.{cls.__qualname__})"
    if not (isinstance(cls.Options, type) and issubclass(cls.Options, DatasetOptions)):
        raise UsageError(f"{where} cannot take the --dataset_split/--dataset_name/--dataset_column options: its "
                         f"Options ({cls.Options.__qualname__}) must subclass saelab.data.DatasetOptions")
    try:
        inspect.signature(cls).bind("repo", None)
    except TypeError:
        raise UsageError(f"{where} cannot be built as cls(repo, options): its constructor takes "
                         f"{inspect.signature(cls)}; take (repo, options) and call Dataset.__init__") from None
    except ValueError:  # no signature to inspect (a builtin); the call itself will tell
        pass


def split_rows(split: str, n_rows: int, split_name: str = "train", where: str = "") -> list[tuple[int, int]]:
    """Row ranges ``[(start, stop), ...]`` selected by a split expression over one split of ``n_rows``.

    Uses the ``datasets`` split grammar (``train``, ``train[:1%]``, ``train[10:-5]``, ``a+b``); every
    part must name ``split_name``.
    """
    from datasets import ReadInstruction

    try:
        instruction = ReadInstruction.from_spec(split)
        parts = instruction.to_absolute({split_name: n_rows})
    except (ValueError, AssertionError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        prefix = f"{where}: " if where else ""
        raise UsageError(
            f"{prefix}bad split {split!r} ({first}); accepted: '{split_name}', '{split_name}[:1%]', "
            f"'{split_name}[10:200]' (this dataset has only the split {split_name!r})"
        ) from None
    return [(p.from_, p.to) for p in parts]


def check_column(column: str, columns: Iterable[str], where: str) -> None:
    """One-line error when ``column`` is not among ``columns``."""
    columns = list(columns)
    if column not in columns:
        raise UsageError(f"{where}: no column {column!r}; columns: {', '.join(map(str, columns)) or '(none)'}")


# --------------------------------------------------------------------------------------------------
# Tokenisation


@dataclass(frozen=True)
class WindowSpec:
    """How documents become token windows (see the module docstring)."""

    ctx_len: int
    """Tokens per window."""
    bos_token_id: int | None
    """Token put at position 0 of every window, or None when the tokenizer has no BOS."""
    eos_token_id: int | None
    """Token appended after every document, or None when the tokenizer has no EOS."""
    scheme: str = TOKENIZATION_SCHEME
    """Scheme name and version."""

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, ctx_len: int) -> WindowSpec:
        """The spec for ``tokenizer`` and ``ctx_len`` (BOS prepended when the tokenizer has one)."""
        if ctx_len < 2:
            raise UsageError(f"bad --cache_ctx_len {ctx_len}; accepted: an integer >= 2")
        bos = getattr(tokenizer, "bos_token_id", None)
        eos = getattr(tokenizer, "eos_token_id", None)
        return cls(ctx_len=int(ctx_len), bos_token_id=None if bos is None else int(bos),
                   eos_token_id=None if eos is None else int(eos))

    def identity(self) -> dict[str, Any]:
        """JSON data for fingerprints and manifests."""
        return asdict(self)


def n_windows_for(n_tokens: int, ctx_len: int) -> int:
    """Windows needed to cache at least ``n_tokens`` tokens: ``ceil(n_tokens / ctx_len)``."""
    if n_tokens < 1:
        raise UsageError(f"bad --n_tokens {n_tokens}; accepted: a positive integer")
    return -(-int(n_tokens) // int(ctx_len))


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """What identifies a tokenizer's output: class, vocabulary size, special ids and a content hash."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        vocab = tokenizer.get_vocab()
        digest.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    return {
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "bos_token_id": getattr(tokenizer, "bos_token_id", None),
        "eos_token_id": getattr(tokenizer, "eos_token_id", None),
        "sha256": digest.hexdigest(),
    }


def iter_windows(
    texts: Iterable[str],
    tokenizer: Any,
    spec: WindowSpec,
    *,
    max_windows: int | None = None,
    skip_windows: int = 0,
    doc_batch: int = 16,
) -> Iterator[torch.Tensor]:
    """Token windows ``[ctx_len]`` (int64) of ``texts`` under ``spec``, in order.

    ``skip_windows`` drops the first windows (resuming); at most ``max_windows`` are produced after
    that. Exhausting ``texts`` first ends the iteration early (callers warn, see
    :func:`warn_data_exhausted`).
    """
    body = spec.ctx_len - (1 if spec.bos_token_id is not None else 0)
    buffer: list[int] = []
    produced = 0
    index = 0  # windows cut so far, skipped ones included
    limit = None if max_windows is None else skip_windows + max_windows

    def cut() -> Iterator[torch.Tensor]:
        nonlocal buffer, produced, index
        start = 0
        while len(buffer) - start >= body and (limit is None or index < limit):
            if index >= skip_windows:
                window = buffer[start:start + body]
                if spec.bos_token_id is not None:
                    window = [spec.bos_token_id, *window]
                produced += 1
                yield torch.tensor(window, dtype=torch.int64)
            index += 1
            start += body
        buffer = buffer[start:]

    docs: list[str] = []
    for text in texts:
        if limit is not None and index >= limit:
            return
        docs.append(text)
        if len(docs) >= doc_batch:
            _extend(buffer, docs, tokenizer, spec)
            docs = []
            yield from cut()
    if docs and (limit is None or index < limit):
        _extend(buffer, docs, tokenizer, spec)
        yield from cut()


def _extend(buffer: list[int], docs: list[str], tokenizer: Any, spec: WindowSpec) -> None:
    encoded = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
    for ids in encoded:
        buffer.extend(ids)
        if spec.eos_token_id is not None:
            buffer.append(spec.eos_token_id)


def warn_data_exhausted(dataset: str, got_windows: int, wanted_windows: int, ctx_len: int) -> None:
    """The one warning line for a dataset that ran out before the requested number of tokens."""
    warnings.warn(
        f"dataset {dataset} ran out after {got_windows * ctx_len} tokens ({got_windows} windows of "
        f"{ctx_len}); wanted {wanted_windows * ctx_len}; caching what there is",
        DataExhaustedWarning,
        stacklevel=2,
    )


def bos_mask(tokens: torch.Tensor, bos_token_id: int | None) -> torch.Tensor:
    """Boolean mask of positions holding BOS (all False when there is no BOS)."""
    if bos_token_id is None:
        return torch.zeros_like(tokens, dtype=torch.bool)
    return tokens == bos_token_id


def clean_text(text: str) -> str:
    """Strip a document and collapse runs of blank lines."""
    return re.sub(r"\n\s*\n(\s*\n)+", "\n\n", text).strip()
