"""The hookpoint grammar: model-agnostic names of the sites a dictionary reads and writes.

Hookpoint names are the same for every architecture (GPT-2, Llama, Mistral, Qwen, Gemma, GPT-NeoX...):

==========================  ============================================================================
``embed``                   input of block 0 (token embeddings, plus position embeddings where the
                            model adds them)
``layers.N``                residual stream after block N (block N's output; for the last block this is
                            *before* the final norm, unlike Hugging Face's last ``hidden_states`` entry)
``layers.N.self_attn``      output of block N's attention module (after its output projection)
``layers.N.self_attn.input``  input of the attention module (the normed residual stream)
``layers.N.resid_mid``      residual stream between block N's attention and its MLP (block N's input
                            plus its attention output, before the norm that feeds the MLP;
                            TransformerLens ``blocks.N.hook_resid_mid``); models whose attention and MLP
                            run in parallel (GPT-J, Phi-2, GPT-NeoX with ``use_parallel_residual``) have none
``layers.N.mlp``            output of block N's MLP module
``layers.N.mlp.input``      input of the MLP module (the normed residual stream)
==========================  ============================================================================

Other libraries' names (SAELens ``blocks.8.hook_resid_post``, module paths ``model.layers.8.mlp``) belong to
the dictionary-format plugins that read those libraries' files (``DictionaryFormat.hookpoint_from_external``).
This module only asks for them when it words an error's "did you mean" hint, through the translator that
the package installs with :func:`use_external_names` (it imports nothing but :mod:`saelab.errors`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from .errors import UsageError

Site = Literal["embed", "resid", "resid_mid", "self_attn", "mlp"]
"""Where in a block a hookpoint is."""
IO = Literal["output", "input"]
"""Whether a hookpoint is a module's input or its output."""
ExternalNames = Callable[[str], str | None]
"""A translator from another library's hook name to a saelab hookpoint (None when it is not one)."""

HOOKPOINT_FORMS = (
    "embed, layers.N, layers.N.mlp, layers.N.mlp.input, layers.N.resid_mid, layers.N.self_attn, "
    "layers.N.self_attn.input"
)
"""The accepted hookpoint forms, for error messages."""

_HOOKPOINT_RE = re.compile(r"^layers\.(\d+)(?:\.(mlp|self_attn)(?:\.(input))?|\.(resid_mid))?$")
_LAYER_RE = re.compile(r"layers\.\d+")
_SITE_ORDER = {("self_attn", "input"): 0, ("self_attn", "output"): 1, ("resid_mid", "output"): 2,
               ("mlp", "input"): 3, ("mlp", "output"): 4, ("resid", "output"): 5}
_external_names: list[ExternalNames] = []


@dataclass(frozen=True)
class Hookpoint:
    """A parsed hookpoint name: which block, which site in it, and whether its input or output."""

    layer: int
    """Block index; ``-1`` for ``embed`` (the residual stream before block 0)."""
    site: Site
    """``embed``, ``resid`` (the block's output), ``resid_mid`` (between attention and MLP), ``self_attn``
    or ``mlp``."""
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
        if self.site == "resid_mid":
            return f"{base}.resid_mid"
        return f"{base}.{self.site}" + (".input" if self.io == "input" else "")

    @property
    def order(self) -> tuple[int, int]:
        """Sort key in forward-pass order."""
        if self.site == "embed":
            return (-1, 0)
        return (self.layer, _SITE_ORDER[(self.site, self.io)])

    def __str__(self) -> str:
        return self.name


def use_external_names(translate: ExternalNames | None) -> None:
    """Install the translator of other libraries' hook names that error hints use (None removes it).
    The ``saelab`` package installs one that asks every registered dictionary format."""
    _external_names[:] = [] if translate is None else [translate]


def is_hookpoint(name: str) -> bool:
    """Whether ``name`` is a well-formed saelab hookpoint (whatever the model's depth)."""
    text = str(name).strip()
    return text == "embed" or _HOOKPOINT_RE.match(text) is not None


def parse_hookpoint(name: str) -> Hookpoint:
    """Parse a hookpoint name; a malformed one is a one-line :class:`UsageError` naming the forms."""
    text = str(name).strip()
    if text == "embed":
        return Hookpoint(-1, "embed")
    m = _HOOKPOINT_RE.match(text)
    if m is None:
        hint = _hint(text)
        raise UsageError(
            f"unknown hookpoint {name!r}"
            + (f" (did you mean {hint!r}?)" if hint else "")
            + f"; accepted forms: {HOOKPOINT_FORMS}"
        )
    if m.group(4):
        return Hookpoint(int(m.group(1)), "resid_mid")
    layer, site, io = int(m.group(1)), m.group(2) or "resid", m.group(3) or "output"
    return Hookpoint(layer, site, io)  # type: ignore[arg-type]


def hookpoint_names(n_layers: int, *, resid_mid: bool = True) -> list[str]:
    """Every valid hookpoint of a model with ``n_layers`` blocks, in forward order (without the
    ``layers.N.resid_mid`` sites when ``resid_mid`` is false: a parallel attention + MLP block)."""
    names = ["embed"]
    for i in range(n_layers):
        names += [f"layers.{i}.self_attn.input", f"layers.{i}.self_attn"]
        names += [f"layers.{i}.resid_mid"] if resid_mid else []
        names += [f"layers.{i}.mlp.input", f"layers.{i}.mlp", f"layers.{i}"]
    return names


def _hint(text: str) -> str | None:
    """A likely meant hookpoint for a malformed ``text``: another library's name translated, or a
    near-miss of the grammar (``layer.3`` -> ``layers.3``, ``.attn`` -> ``.self_attn``)."""
    for translate in _external_names:
        hint = translate(text)
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
    n_layers = sum(1 for v in valid if _LAYER_RE.fullmatch(v))
    forms = HOOKPOINT_FORMS if n_layers and set(hookpoint_names(n_layers)) == valid_set else None
    if forms is None and n_layers and set(hookpoint_names(n_layers, resid_mid=False)) == valid_set:
        forms = HOOKPOINT_FORMS.replace(" layers.N.resid_mid,", "")
    listing = (f"valid hookpoints: {forms} with N in 0..{n_layers - 1}" if forms is not None
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
            hint = _hint(hp) or next(iter(difflib.get_close_matches(hp, valid, n=1)), None)
            if hint:
                why = f" (did you mean {hint!r}?)"
        raise UsageError(f"unknown hookpoint {hp!r} for {model}{why}; {listing}")
    return out


def sort_hookpoints(names: Sequence[str]) -> list[str]:
    """``names`` in forward-pass order."""
    return sorted(names, key=lambda n: parse_hookpoint(n).order)


__all__ = ["HOOKPOINT_FORMS", "IO", "ExternalNames", "Hookpoint", "Site", "hookpoint_names", "is_hookpoint",
           "parse_hookpoint", "sort_hookpoints", "use_external_names", "validate_hookpoints"]
