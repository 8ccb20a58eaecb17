"""Helpers shared by the dictionary-format plugins that read and write other libraries' files.

saelab's linear dictionaries (:class:`saelab.dictionary.LinearDictionary`) use SAELens's weight layout:
``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_out]``, ``b_dec [d_out]`` and, for skip
transcoders, ``W_skip [d_in, d_out]`` (applied as ``x @ W_skip``). An autoencoder encodes ``x - b_dec``.
Foreign formats are mapped onto that by exact algebra (folding biases and scales into the weights), so
a loaded dictionary computes the same latents and reconstructions as the library that wrote it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import UsageError
from .interfaces import SparseDictionary

_TL_SITES = {"": "hook_resid_post", "mlp": "hook_mlp_out", "self_attn": "hook_attn_out",
             "self_attn.input": "ln1.hook_normalized", "mlp.input": "ln2.hook_normalized"}


def to_external_name(hookpoint: str) -> str:
    """A saelab hookpoint as a TransformerLens / SAELens hook name (``layers.8`` ->
    ``blocks.8.hook_resid_post``, ``embed`` -> ``blocks.0.hook_resid_pre``); other names unchanged."""
    if hookpoint == "embed":
        return "blocks.0.hook_resid_pre"
    m = re.fullmatch(r"layers\.(\d+)(?:\.(.+))?", hookpoint)
    if m and (m.group(2) or "") in _TL_SITES:
        return f"blocks.{m.group(1)}.{_TL_SITES[m.group(2) or '']}"
    return hookpoint


def from_external_name(name: str) -> str:
    """A SAELens hook name or Hugging Face module path as a saelab hookpoint (unknown names unchanged)."""
    from .models import from_external_name as translate

    return translate(name) or name


def has_files(path: str | Path, *names: str) -> bool:
    """Whether directory ``path`` holds a file of each of ``names`` (the usual ``detect`` of a format)."""
    return all((Path(path) / name).is_file() for name in names)


def require_format_dir(detected: bool, path: Path, label: str, expected: str) -> None:
    """The one-line error of a format's ``load`` given a directory it does not recognise:
    ``'<path>' is not a <label> dictionary directory (expected <expected>)``."""
    if not detected:
        raise UsageError(f"{str(path)!r} is not a {label} dictionary directory (expected {expected})")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path`` (one-line error when unreadable)."""
    try:
        data = json.loads(Path(path).read_text())
    except ValueError as exc:
        raise UsageError(f"{str(path)!r} is not valid JSON ({exc}); fix or replace the file") from None
    except OSError as exc:
        raise UsageError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{str(path)!r} must hold a JSON object")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file as float32 CPU tensors (one-line error when unreadable)."""
    from safetensors.torch import load_file

    try:
        return {k: v.float() for k, v in load_file(str(path), device="cpu").items()}
    except Exception as exc:  # corrupt or truncated files raise several exception types
        raise UsageError(f"cannot read weights {str(path)!r} (corrupt or truncated): "
                         f"{type(exc).__name__}: {exc}") from None


def require_weights(tensors: Mapping[str, torch.Tensor], keys: Sequence[str], where: str, note: str = "") -> None:
    """Raise a one-line error naming ``where`` (e.g. ``"SAELens dictionary 'x': sae_weights.safetensors"``),
    the first of ``keys`` missing from ``tensors`` and the keys it has, followed by ``note`` if given."""
    for key in keys:
        if key not in tensors:
            raise UsageError(f"{where} has no {key!r} (has {', '.join(sorted(tensors))})" + (f"; {note}" if note else ""))


def fold_pre_encoder_bias(b_enc: torch.Tensor, b_dec: torch.Tensor, W_enc: torch.Tensor, source_subtracts: bool,
                          module: SparseDictionary) -> torch.Tensor:
    """The encoder bias that makes ``module`` compute the same pre-activations as a source that does
    (``source_subtracts``) or does not encode ``x - b_dec``: ``b_dec @ W_enc`` folded in where the two differ."""
    target_subtracts = bool(getattr(module, "uses_pre_encoder_bias", False))
    if source_subtracts == target_subtracts:
        return b_enc
    shift = b_dec @ W_enc
    return b_enc - shift if source_subtracts else b_enc + shift


@torch.no_grad()
def assign_weights(module: SparseDictionary, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Copy ``tensors`` into ``module``'s parameters/buffers of the same names; a missing name or a
    shape mismatch is a one-line error mentioning ``where``."""
    own = dict(module.named_parameters()) | dict(module.named_buffers())
    for name, value in tensors.items():
        if name not in own:
            raise UsageError(f"{where}: architecture {module.name!r} has no weight {name!r}")
        target = own[name]
        if tuple(target.shape) != tuple(value.shape):
            raise UsageError(f"{where}: weight {name!r} has shape {list(value.shape)}, architecture "
                             f"{module.name!r} expects {list(target.shape)}")
        target.copy_(value.to(target.dtype))


def threshold_weights(module: SparseDictionary, threshold: torch.Tensor) -> dict[str, torch.Tensor]:
    """The weights that give ``module`` (a JumpReLU-style architecture) the per-latent ``threshold``:
    ``{"threshold": t}`` or ``{"log_threshold": log t}``, whichever the module stores."""
    names = dict(module.named_parameters()) | dict(module.named_buffers())
    if "threshold" in names:
        return {"threshold": threshold.reshape(names["threshold"].shape)}
    if "log_threshold" in names:
        return {"log_threshold": threshold.clamp_min(1e-12).log().reshape(names["log_threshold"].shape)}
    raise UsageError(f"architecture {module.name!r} has no threshold or log_threshold weight")


def module_threshold(module: SparseDictionary) -> torch.Tensor | None:
    """The per-latent firing threshold ``[d_sae]`` of a JumpReLU/BatchTopK-style module, if it has one."""
    names = dict(module.named_parameters()) | dict(module.named_buffers())
    if "threshold" in names:
        return names["threshold"].detach().float().expand(module.d_sae).clone()
    if "log_threshold" in names:
        return names["log_threshold"].detach().float().exp().expand(module.d_sae).clone()
    return None


__all__ = ["assign_weights", "find_dictionaries", "fold_pre_encoder_bias", "from_external_name", "has_files",
           "module_threshold", "read_json", "read_safetensors", "require_format_dir", "require_weights", "threshold_weights", "to_external_name"]


def find_dictionaries(path: str | Path) -> list[Path]:
    """Dictionary directories at ``path``: itself when a registered format recognises it, else its
    sub-directories that one does (a sparsify run holding one directory per hookpoint, a saelab run's
    ``dictionaries/``), sorted by name. A path that holds none is a one-line error."""
    from .dictionary import detect_format, dictionary_formats
    from .errors import format_choices
    from .manager import registry

    path = Path(path)
    if not path.exists():
        raise UsageError(f"dictionary path {str(path)!r} does not exist")
    formats = [entry.cls for entry in registry("dictionary_format").entries()]

    def recognised(p: Path) -> bool:
        return p.is_dir() and any(cls.detect(p) for cls in formats)

    if recognised(path):
        detect_format(path)
        return [path]
    roots = [path / "dictionaries", path] if (path / "dictionaries").is_dir() else [path]
    for root in roots:
        found = sorted((p for p in root.iterdir() if recognised(p)), key=lambda p: p.name) if root.is_dir() else []
        if found:
            return found
    raise UsageError(f"{str(path)!r} holds no dictionary in a known format (nor sub-directories that do); "
                     f"known formats: {format_choices(dictionary_formats())}")
