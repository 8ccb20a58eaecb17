"""Language models as activation sources: loading by name, and model-agnostic hookpoint names.

Hookpoint names are the same for every architecture (GPT-2, Llama, Mistral, Qwen, Gemma, GPT-NeoX...):

==========================  ============================================================================
``embed``                   input of block 0 (token embeddings, plus position embeddings where the
                            model adds them)
``layers.N``                residual stream after block N (block N's output; for the last block this is
                            *before* the final norm, unlike Hugging Face's last ``hidden_states`` entry)
``layers.N.self_attn``      output of block N's attention module (after its output projection)
``layers.N.self_attn.input``  input of the attention module (the normed residual stream)
``layers.N.mlp``            output of block N's MLP module
``layers.N.mlp.input``      input of the MLP module (the normed residual stream)
==========================  ============================================================================
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import UsageError
from .fileio import atomic_write
from .fileio import file_sha256 as _file_sha256

Site = Literal["embed", "resid", "self_attn", "mlp"]
IO = Literal["output", "input"]

HOOKPOINT_FORMS = (
    "embed, layers.N, layers.N.mlp, layers.N.mlp.input, layers.N.self_attn, layers.N.self_attn.input"
)
"""The accepted hookpoint forms, for error messages."""

_HOOKPOINT_RE = re.compile(r"^layers\.(\d+)(?:\.(mlp|self_attn)(?:\.(input))?)?$")
_SITE_ORDER = {("self_attn", "input"): 0, ("self_attn", "output"): 1, ("mlp", "input"): 2,
               ("mlp", "output"): 3, ("resid", "output"): 4}


@dataclass(frozen=True)
class Hookpoint:
    """A parsed hookpoint name: which block, which site in it, and whether its input or output."""

    layer: int
    """Block index; ``-1`` for ``embed`` (the residual stream before block 0)."""
    site: Site
    """``embed``, ``resid`` (the block's output), ``self_attn`` or ``mlp``."""
    io: IO = "output"
    """``input`` for the ``.input`` sites (the module's input, i.e. after the norm), else ``output``."""

    @property
    def name(self) -> str:
        """The canonical name (``layers.3.mlp.input``)."""
        if self.site == "embed":
            return "embed"
        base = f"layers.{self.layer}"
        if self.site == "resid":
            return base
        return f"{base}.{self.site}" + (".input" if self.io == "input" else "")

    @property
    def order(self) -> tuple[int, int]:
        """Sort key in forward-pass order."""
        if self.site == "embed":
            return (-1, 0)
        return (self.layer, _SITE_ORDER[(self.site, self.io)])

    def __str__(self) -> str:
        return self.name


def parse_hookpoint(name: str) -> Hookpoint:
    """Parse a hookpoint name; a malformed one is a one-line :class:`UsageError` naming the forms."""
    text = str(name).strip()
    if text == "embed":
        return Hookpoint(-1, "embed")
    m = _HOOKPOINT_RE.match(text)
    if m is None:
        hint = _external_hint(text)
        raise UsageError(
            f"unknown hookpoint {name!r}"
            + (f" (did you mean {hint!r}?)" if hint else "")
            + f"; accepted forms: {HOOKPOINT_FORMS}"
        )
    layer, site, io = int(m.group(1)), m.group(2) or "resid", m.group(3) or "output"
    return Hookpoint(layer, site, io)  # type: ignore[arg-type]


def hookpoint_names(n_layers: int) -> list[str]:
    """Every valid hookpoint of a model with ``n_layers`` blocks, in forward order."""
    names = ["embed"]
    for i in range(n_layers):
        names += [f"layers.{i}.self_attn.input", f"layers.{i}.self_attn", f"layers.{i}.mlp.input",
                  f"layers.{i}.mlp", f"layers.{i}"]
    return names


_SAELENS_SITES = {
    "hook_resid_post": "", "hook_mlp_out": ".mlp", "hook_attn_out": ".self_attn",
    "ln1.hook_normalized": ".self_attn.input", "ln2.hook_normalized": ".mlp.input",
}


def from_external_name(name: str) -> str | None:
    """Translate a SAELens hook name (``blocks.8.hook_resid_post``) or a Hugging Face module path
    (``model.layers.8.mlp``, ``transformer.h.8.attn``, ``h.8``) to a saelab hookpoint; None if unknown."""
    text = name.strip()
    m = re.match(r"^blocks\.(\d+)\.(.+)$", text)
    if m:
        layer, hook = int(m.group(1)), m.group(2)
        if hook == "hook_resid_pre":
            return "embed" if layer == 0 else f"layers.{layer - 1}"
        if hook in _SAELENS_SITES:
            return f"layers.{layer}{_SAELENS_SITES[hook]}"
        return None
    m = re.match(r"^(?:model\.|transformer\.|gpt_neox\.|model\.language_model\.)?(?:layers|h|blocks)\.(\d+)"
                 r"(?:\.(mlp|attn|self_attn|attention|self_attention|feed_forward))?$", text)
    if m:
        layer, mod = int(m.group(1)), m.group(2)
        if mod is None:
            return f"layers.{layer}"
        return f"layers.{layer}" + (".mlp" if mod in ("mlp", "feed_forward") else ".self_attn")
    return None


def _external_hint(text: str) -> str | None:
    hint = from_external_name(text)
    if hint is not None:
        return hint
    fixed = re.sub(r"^layer(?=\.)", "layers", text)
    fixed = re.sub(r"\.(attn|attention)(?=$|\.)", ".self_attn", fixed)
    return fixed if fixed != text and _HOOKPOINT_RE.match(fixed) else None


def validate_hookpoints(requested: Sequence[str], valid: Sequence[str], model: str) -> list[str]:
    """Check ``requested`` against the ``valid`` names of ``model``; returns them deduplicated, in
    the given order. An unknown name is one :class:`UsageError` line saying what is wrong (bad form,
    layer out of range, a close match) and listing the valid names."""
    valid_set = set(valid)
    n_layers = sum(1 for v in valid if re.fullmatch(r"layers\.\d+", v))
    listing = (f"valid hookpoints: {HOOKPOINT_FORMS} with N in 0..{n_layers - 1}"
               if n_layers and set(hookpoint_names(n_layers)) == valid_set
               else "valid hookpoints: " + ", ".join(valid))
    if isinstance(requested, str):
        requested = [requested]
    if not requested:
        raise UsageError(f"no hookpoints given for {model}; {listing}")
    out: list[str] = []
    for hp in requested:
        if hp in valid_set:
            if hp not in out:
                out.append(hp)
            continue
        why = ""
        try:
            parsed = parse_hookpoint(hp)
            if parsed.layer >= n_layers:
                why = f" (layer {parsed.layer} is out of range: {model} has {n_layers} layers)"
        except UsageError:
            hint = _external_hint(hp) or next(iter(difflib.get_close_matches(hp, valid, n=1)), None)
            if hint:
                why = f" (did you mean {hint!r}?)"
        raise UsageError(f"unknown hookpoint {hp!r} for {model}{why}; {listing}")
    return out


def sort_hookpoints(names: Sequence[str]) -> list[str]:
    """``names`` in forward-pass order."""
    return sorted(names, key=lambda n: parse_hookpoint(n).order)


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


def load_activation_source(model: str, *, hf_token: str | None = None, **options: Any) -> Any:
    """Create the activation source for ``model`` (an embedded name such as ``smollm2``, a hub id or
    a local directory). ``options`` are that source's options (e.g. ``dtype="float16"``,
    ``device="cpu"``); ``None`` values are dropped so callers can pass optional flags through.
    ``hf_token`` is a credential, not an option: it goes to the source's constructor when that takes
    one (hub-backed sources), and is never written anywhere. Returns an :class:`~saelab.ActivationSource`."""
    from .manager import resolve

    if not model or not str(model).strip():
        raise UsageError("no model given; give an embedded name (smollm2), a hub id or a local directory")
    cls = resolve("activation_source", str(model))
    opts = cls.Options.parse({k: v for k, v in options.items() if v is not None}, where=f"model {model}")
    return cls(str(model), opts, **credential_kwargs(cls, hf_token))


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
