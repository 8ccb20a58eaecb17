"""Dictionary formats seen from the engine: finding dictionaries on disk, other libraries' hook names,
and helpers shared by the format plugins that read and write other libraries' files.

Discovery (:func:`find_dictionaries`, :func:`dictionaries_by_hookpoint`) is the one place that turns a
path (one dictionary in any registered format, a directory of them such as a sparsify run, a saelab run
directory with its ``dictionaries/``) into dictionary directories, for ``evaluate``, ``convert``,
``latents`` and ``run`` alike. Hook names of other libraries (SAELens ``blocks.8.hook_resid_post``,
module paths ``model.layers.8``) are translated by the format plugins that know them
(``DictionaryFormat.hookpoint_from_external``), asked in registration order by :func:`hookpoint_from_external`.

saelab's linear dictionaries (:class:`saelab.dictionary.LinearDictionary`) use SAELens's weight layout:
``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_out]``, ``b_dec [d_out]`` and, for skip
transcoders, ``W_skip [d_in, d_out]`` (applied as ``x @ W_skip``). An autoencoder encodes ``x - b_dec``.
Foreign formats are mapped onto that by exact algebra (folding biases and scales into the weights), so
a loaded dictionary computes the same latents and reconstructions as the library that wrote it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import UsageError
from .hookpoints import is_hookpoint
from .interfaces import SiteSpec, SparseDictionary
from .layout import RunLayout

# --------------------------------------------------------------------------------------------------
# Other libraries' hook names


def hookpoint_from_external(name: str) -> str | None:
    """The saelab hookpoint another library's hook name stands for (SAELens ``blocks.8.hook_resid_post``
    -> ``layers.8``, module path ``model.layers.8.mlp`` -> ``layers.8.mlp``), asked of every registered
    dictionary format in registration order; None when none knows ``name``."""
    from .manager import registry

    text = str(name).strip()
    for entry in registry("dictionary_format").entries():
        hookpoint = entry.cls.hookpoint_from_external(text)
        if hookpoint is not None:
            return hookpoint
    return None


def canonical_hookpoint(name: str) -> str:
    """``name`` as a saelab hookpoint: saelab names unchanged, other libraries' names translated
    (:func:`hookpoint_from_external`); else unchanged."""
    text = str(name).strip()
    if is_hookpoint(text):
        return text
    return hookpoint_from_external(text) or text


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
    target_subtracts = module.uses_pre_encoder_bias
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


# --------------------------------------------------------------------------------------------------
# Discovery


def records_hookpoint(sites: SiteSpec) -> bool:
    """True when a dictionary's sites name real hookpoints (some formats record none)."""
    return all(isinstance(site, str) and is_hookpoint(site.rpartition("@")[0] or site)  # HOOKPOINT@LABEL: paired
               for site in (*sites.inputs, *sites.outputs))


def dictionary_sites_text(sites: SiteSpec) -> str:
    """``reads layers.3.mlp.input and writes layers.3.mlp`` / ``reads layers.15``."""
    reads = " ".join(map(str, sites.inputs))
    return f"reads {reads}" if sites.is_autoencoder else f"reads {reads} and writes {' '.join(map(str, sites.outputs))}"


def _recognised(path: Path, *, file_ok: bool = False) -> bool:
    from .manager import registry

    return (path.is_dir() or (file_ok and path.is_file())) and any(
        entry.cls.detect(path) for entry in registry("dictionary_format").entries())


def find_dictionaries(path: str | os.PathLike[str]) -> list[Path]:
    """Dictionary directories at ``path``: itself when a registered format recognises it (a directory, or a
    file such as dictionary_learning's ``ae.pt``), else its sub-directories that one does (a sparsify run
    holding one directory per hookpoint, a saelab run's ``dictionaries/``), sorted by name. A path that holds
    none is a one-line error."""
    from .dictionary import dictionary_formats
    from .errors import format_choices

    path = Path(path)
    if not path.exists():
        raise UsageError(f"dictionary path {str(path)!r} does not exist")
    if _recognised(path, file_ok=True):
        return [path]
    run_dictionaries = RunLayout(path).dictionaries_dir
    roots = [run_dictionaries, path] if run_dictionaries.is_dir() else [path]
    for root in roots:
        found = sorted((p for p in root.iterdir() if _recognised(p)), key=lambda p: p.name) if root.is_dir() else []
        if found:
            return found
    raise UsageError(f"{str(path)!r} holds no dictionary in a known format (nor sub-directories that do); "
                     f"known formats: {format_choices(dictionary_formats())}")


def dictionaries_by_hookpoint(path: str | os.PathLike[str], hookpoints: Sequence[str] = (), *,
                              loaded: dict[Path, SparseDictionary] | None = None) -> dict[str, Path]:
    """The dictionaries of :func:`find_dictionaries` by hook name, selected by ``hookpoints`` (other
    libraries' names are translated; default: all), in order.

    One dictionary (``path`` itself) is loaded to read its sites: it is named by the requested hookpoint,
    which must be a site it reads or writes (or sets the site when its format records none), else by its
    first input site. In a directory of several each is named by its directory; a hookpoint selects the
    directory of that name (as given or translated), else the one whose sites include it. A hookpoint
    that selects nothing is a one-line error saying what was found. Dictionaries loaded along the way
    are kept in ``loaded`` (path -> dictionary) when given, for reuse."""
    from .dictionary import load_dictionary

    loaded = {} if loaded is None else loaded

    def load(directory: Path) -> SparseDictionary:
        if directory not in loaded:
            loaded[directory] = load_dictionary(directory)
        return loaded[directory]

    path = Path(path)
    dirs = find_dictionaries(path)
    hookpoints = list(dict.fromkeys(hookpoints))
    requested = [canonical_hookpoint(h) for h in hookpoints]
    if dirs == [path]:
        sites = load(path).sites
        if len(requested) > 1:
            raise UsageError(f"{str(path)!r} holds one dictionary ({dictionary_sites_text(sites)}) but --hookpoints "
                             f"names {' '.join(hookpoints)}; give one hookpoint or a directory of dictionaries")
        if not records_hookpoint(sites):
            if not requested:
                raise UsageError(f"{str(path)!r} does not record the hookpoint it reads; give it with --hookpoints, "
                                 f"e.g. --hookpoints layers.15")
            return {requested[0]: path}
        accepted = list(dict.fromkeys([*sites.inputs, *sites.outputs]))
        if not requested:
            return {str(sites.inputs[0]): path}
        if requested[0] not in accepted:
            shown = hookpoints[0] + (f" (= {requested[0]})" if requested[0] != hookpoints[0] else "")
            raise UsageError(f"--hookpoints {shown} does not match {str(path)!r}: found one dictionary, which "
                             f"{dictionary_sites_text(sites)}; accepted: {', '.join(accepted)}")
        return {requested[0]: path}
    found = {d.name: d for d in dirs}
    if not requested:
        return found
    by_site = {canonical_hookpoint(name): name for name in found}
    out: dict[str, Path] = {}
    for given, hook in zip(hookpoints, requested, strict=True):
        name = given if given in found else (hook if hook in found else by_site.get(hook))
        if name is None:
            name = next((n for n, d in found.items() if hook in (*load(d).sites.inputs, *load(d).sites.outputs)),
                        None)
        if name is None:
            have = ", ".join(f"{n} ({dictionary_sites_text(load(d).sites)})" for n, d in found.items())
            raise UsageError(f"no dictionary for hookpoint {given!r} in {str(dirs[0].parent)!r}; found: {have}")
        out[name] = found[name]
    return out


@torch.no_grad()
def check_round_trip(original: SparseDictionary, loaded: SparseDictionary, what: str, *, scale: float = 1.0,
                     atol: float = 1e-4) -> None:
    """One-line :class:`UsageError` when ``loaded`` (``original`` written to format ``what`` and read back)
    does not reproduce ``original``'s reconstruction on random inputs of size ``scale`` (an export-bug guard).
    ``loaded`` may hold more sites than ``original`` (padded layers): it reads zeros there and is compared
    on ``original``'s output sites."""
    was_training = original.training
    original.eval()
    try:
        device = next(original.parameters()).device
        gen = torch.Generator().manual_seed(0)
        sites = original.sites
        x = (torch.randn(64, len(sites.inputs), sites.d_in, generator=gen) * scale).to(device)
        a = original(x, torch.zeros(64, len(sites.outputs), sites.d_out, device=device)).reconstruction
        columns = [loaded.sites.inputs.index(s) if s in loaded.sites.inputs else None for s in sites.inputs]
        outputs = [loaded.sites.outputs.index(s) if s in loaded.sites.outputs else None for s in sites.outputs]
        if None in columns or None in outputs:
            raise UsageError(f"export of architecture {original.name!r} to {what} lost its sites")
        x_loaded = x.new_zeros(64, len(loaded.sites.inputs), loaded.sites.d_in)
        x_loaded[:, columns] = x
        target = x.new_zeros(64, len(loaded.sites.outputs), loaded.sites.d_out)
        b = loaded.to(device)(x_loaded, target).reconstruction[:, outputs]
        tol = atol * (1.0 + float(a.abs().max()))
        if not torch.allclose(a, b, atol=tol, rtol=1e-4):
            raise UsageError(f"export of architecture {original.name!r} to {what} does not reproduce its outputs "
                             f"(max difference {float((a - b).abs().max()):.3g}); not exportable")
    finally:
        original.train(was_training)


__all__ = ["assign_weights", "canonical_hookpoint", "check_round_trip", "dictionaries_by_hookpoint",
           "dictionary_sites_text",
           "find_dictionaries", "fold_pre_encoder_bias", "has_files", "hookpoint_from_external", "module_threshold",
           "read_json", "read_safetensors", "records_hookpoint", "require_format_dir", "require_weights",
           "threshold_weights"]
