"""Language models as activation sources: loading one by name, hub credentials, and weights hashes.

The hookpoint names the sources answer to are the grammar of :mod:`saelab.hookpoints`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from .errors import UsageError
from .fileio import atomic_write
from .fileio import file_sha256 as _file_sha256
from .interfaces import ActivationSource

# --------------------------------------------------------------------------------------------------
# Loading


def takes_credential(cls: type, name: str = "hf_token") -> bool:
    """Whether ``cls(...)`` accepts the credential keyword ``name`` (or any keyword).

    Credentials (the Hugging Face token) are not plugin options: a class that downloads from the hub
    takes them as a keyword argument of its constructor (``cls(id, options, hf_token=...)``); a class
    that never downloads (an embedded model or sample) does not declare one and is not given one.
    """
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) or p.kind == p.VAR_KEYWORD
               for p in params)


def credential_kwargs(cls: type, hf_token: str | None) -> dict[str, str]:
    """``{"hf_token": token}`` when there is a token and ``cls`` takes it (see :func:`takes_credential`)."""
    return {"hf_token": hf_token} if hf_token and takes_credential(cls) else {}


def load_activation_source(model: str, *, hf_token: str | None = None, **options: Any) -> ActivationSource:
    """Create the activation source for ``model`` (an embedded name such as ``smollm2``, a hub id or
    a local directory). ``options`` are that source's options (e.g. ``dtype="float16"``,
    ``device="cpu"``); ``None`` values are dropped so callers can pass optional flags through.
    ``hf_token`` is a credential, not an option: it goes to the source's constructor when that takes
    one (hub-backed sources), and is never written anywhere. Returns an :class:`~saelab.ActivationSource`."""
    from .manager import resolve

    if not model or not str(model).strip():
        raise UsageError("no model given; give an embedded name (smollm2), a hub id or a local directory")
    cls = resolve("activation_source", str(model))
    opts = cls.Options.parse({k: v for k, v in options.items() if v is not None}, where=f"model {model} (activation source {cls.name!r})")
    return cls(str(model), opts, **credential_kwargs(cls, hf_token))


def source_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword options for :func:`saelab.models.load_activation_source` from resolved values."""
    token = values.get("hf_token")
    if isinstance(token, SecretStr):
        token = token.get_secret_value()
    opts = {"device": values.get("device"), "dtype": values.get("model_dtype"), "revision": values.get("revision"),
            "hf_token": token}
    if values.get("load_in_8bit"):
        opts["load_in_8bit"] = True
    if values.get("device") == "auto":
        opts.pop("device")
    if values.get("model_dtype") == "float32":
        opts.pop("dtype")
    return opts


# --------------------------------------------------------------------------------------------------
# Weights hashes (fingerprints of local model directories)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_hash_lock = threading.Lock()
_memo: dict[tuple[str, int, int], str] = {}


def _hash_store() -> Path:
    from .paths import cache_dir

    return cache_dir() / "weights-sha256.json"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of one file, remembered (in memory and in the user cache dir) by (path, size, mtime)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _hash_lock:
        if key in _memo:
            return _memo[key]
        store_key = f"{key[0]}|{key[1]}|{key[2]}"
        store = _hash_store()
        try:
            known = json.loads(store.read_text())
        except (OSError, ValueError):
            known = {}
        digest = known.get(store_key)
        if digest is None:
            digest = _file_sha256(path)
            known[store_key] = digest
            try:
                with atomic_write(store) as fh:
                    fh.write(json.dumps(known, indent=0, sort_keys=True))
            except OSError:  # a read-only cache dir only costs re-hashing next time
                pass
        _memo[key] = digest
        return digest


def weights_hash(directory: str | os.PathLike[str]) -> str:
    """sha256 over the weight files of a model directory (names and contents, sorted by name)."""
    directory = Path(directory)
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if not files:
        raise UsageError(f"model directory {str(directory)!r} holds no weight files (*.safetensors, *.bin)")
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()
