"""The ``dictionary-learning`` dictionary format: crosscoders of science-of-finetuning's dictionary_learning and
crosscoder_learning (``CrossCoder``, ``BatchTopKCrossCoder`` in ``dictionary_learning/dictionary.py``), read into
saelab's ``crosscoder`` architecture. Read-only.

Layouts (any of them is a SPARSE_MODEL path):

- a ``torch.save`` state dict (``*.pt``, their trainer's ``model_final.pt`` / ``checkpoint_<step>.pt``), read with
  ``torch.load(..., weights_only=True)``; keys saved under ``torch.compile`` (``_orig_mod.`` prefix) are accepted;
- their trainer's output directory: ``model_final.pt`` beside ``config.json`` (``{"trainer": {...}}``);
- their hub layout (``PyTorchModelHubMixin.save_pretrained``): ``model.safetensors`` + ``config.json`` holding the
  constructor arguments (``activation_dim``, ``dict_size``, ``num_layers``, ``code_normalization`` by name,
  ``encoder_layers``, ``k``..., and ``dict_class`` in crosscoder_learning's uploads).

State dict, L stacked sites of width d, F latents: ``encoder.weight [L, d, F]`` -> ``W_enc``, ``encoder.bias [F]``
-> ``b_enc``, ``decoder.weight [L, F, d]`` -> ``W_dec``, ``decoder.bias [L, d]`` -> ``b_dec``;
``code_normalization_id`` (CROSSCODER=1, SAE=2, MIXED=3, NONE=4, DECOUPLED=5); ``BatchTopKCrossCoder`` adds ``k``
and a 0-dim ``threshold`` (-1 until estimated). They compute ``f = relu(sum_l x_l W_enc[l] + b_enc)``,
``x_hat_l = f W_dec[l] + b_dec[l]``; BatchTopK at inference keeps ``f * 1[f * n > threshold]``, ``n`` the code
normalisation of the latent's decoders: CROSSCODER ``sum_l ||W_dec[l, i]||`` (saelab ``decoder_norm="sum"``),
SAE the norm of the concatenation (``"concat"``), NONE 1 (``"none"``). MIXED (a weighted sum of the two) is refused,
and so is DECOUPLED for BatchTopK (per-site codes and thresholds); a ReLU crosscoder with DECOUPLED loads as
``"sum"``, which its forward and penalty equal. A file without ``code_normalization_id`` is CROSSCODER, as their
loader assumes. In the hub layout ``config.json``'s ``code_normalization`` decides, as it does in their loader.

Their optional activation normalisation (``activation_mean [L, d]``, ``activation_std [L, d]``, not NaN, and
``activation_global_scale [L]``: ``x' = (x - mean) * s``, ``x_hat = x_hat' / (s + 1e-8) + mean``) is folded in
with :meth:`fold_scaling` (input scales ``s``, output scales ``s + 1e-8``) and the means moved into ``b_enc`` and
``b_dec``, so the loaded crosscoder reads raw activations and keeps decoder norms in their training units. An
encoder over a subset of the sites (``encoder_layers`` in ``config.json``) gets zero encoder rows elsewhere.
An estimated BatchTopK threshold counts as ``1/threshold_momentum`` updates (further training moves it as a
running mean). A BatchTopK file whose threshold was never estimated loads with it unset: saelab then selects
the batch top ``k * batch`` (their ``use_threshold=False``); their default ``encode`` would keep every positive
latent.

Sites: their files name none (the L sites are the stacked dimension of their activations: the layers of one model,
or, in model diffing, ``[base, fine-tuned]`` at one layer). They load as placeholder sites ``site.0 ... site.{L-1}``
(not hookpoints, so the commands ask for ``--hookpoints``), or as the names given to
:func:`load_dictionary_learning` ``sites=``. Their trainer's cache directory name ``layer_<N>_out`` reads as
hookpoint ``layers.N``.
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from saelab import DictionaryFormat, SparseDictionary, UsageError, hookimpl
from saelab.dictionary import build_dictionary
from saelab.formats import (
    assign_weights,
    canonical_hookpoint,
    has_files,
    read_json,
    read_safetensors,
    require_weights,
)

CONFIG_FILE = "config.json"
HUB_WEIGHTS = "model.safetensors"
FINAL_CHECKPOINT = "model_final.pt"
STATE_SUFFIXES = (".pt", ".pth")
CODE_NORMALIZATIONS = {1: "CROSSCODER", 2: "SAE", 3: "MIXED", 4: "NONE", 5: "DECOUPLED"}
"""Their ``CodeNormalization`` enum: value (``code_normalization_id``) -> name."""
DECODER_NORMS = {"CROSSCODER": "sum", "SAE": "concat", "NONE": "none"}
"""Their code normalisation -> saelab ``crosscoder`` ``decoder_norm``."""
DICT_CLASSES = ("CrossCoder", "BatchTopKCrossCoder")
NORM_EPS = 1e-8
"""The epsilon of their ``denormalize_activations``."""
SITE_PLACEHOLDER = "site.{}"
"""Site names given to a loaded crosscoder when none are given (their files record none)."""
_COMPILED_PREFIX = "_orig_mod."
_CACHE_NAME_RE = re.compile(r"^layer_(\d+)_out$")
_WEIGHT_KEYS = ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias")


def _is_state_dict_file(path: Path) -> bool:
    """A ``*.pt`` / ``*.pth`` file: a ``torch.save`` zip archive whose pickle names an encoder and a decoder
    weight (read without unpickling), or one that is no zip archive (a legacy or corrupt file, which
    loading then reads or names as unreadable)."""
    if not path.is_file() or path.suffix not in STATE_SUFFIXES:
        return False
    if not zipfile.is_zipfile(path):
        return True
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            data = archive.read(pickles[0]) if len(pickles) == 1 else b""
    except (OSError, zipfile.BadZipFile, KeyError):
        return True
    return b"encoder.weight" in data and b"decoder.weight" in data


def _is_hub_config(path: Path) -> bool:
    """``config.json`` of their hub layout for a crosscoder."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(cfg, dict):
        return False
    return cfg.get("dict_class") in DICT_CLASSES or all(k in cfg for k in ("activation_dim", "dict_size", "num_layers"))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict written by ``torch.save``, floating tensors as float32 (one-line error when unreadable)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt archives and refused pickles raise several exception types
        text = " ".join(str(exc).split())[:200]
        raise UsageError(f"cannot read state dict {str(path)!r} with torch.load(weights_only=True) "
                         f"(corrupt, truncated or not a state dict): {type(exc).__name__}: {text}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{str(path)!r} does not hold a state dict of tensors (got {type(state).__name__})")
    return {str(k): v.float() if v.is_floating_point() else v for k, v in state.items()}


def _strip_compiled(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys saved from a ``torch.compile``'d module without their ``_orig_mod.`` prefix."""
    return {(k[len(_COMPILED_PREFIX):] if k.startswith(_COMPILED_PREFIX) else k): v for k, v in state.items()}


def _resolve(path: Path) -> tuple[str, Path, dict[str, Any]]:
    """``(layout, weights file, config)``: layout ``hub`` (config: constructor arguments) or ``state_dict``
    (config: their trainer's config beside the file, or empty)."""
    if path.is_dir() and has_files(path, HUB_WEIGHTS, CONFIG_FILE):
        cfg = read_json(path / CONFIG_FILE)
        if not _is_hub_config(path / CONFIG_FILE):
            raise UsageError(f"{str(path / CONFIG_FILE)!r} is not a dictionary_learning crosscoder's config (expected "
                             f"dict_class {' or '.join(DICT_CLASSES)}, or activation_dim, dict_size and num_layers)")
        return "hub", path / HUB_WEIGHTS, cfg
    weights = path / FINAL_CHECKPOINT if path.is_dir() else path
    if not _is_state_dict_file(weights):
        raise UsageError(f"{str(path)!r} is not a dictionary_learning crosscoder (expected a torch.save state dict "
                         f"*.pt with encoder.weight and decoder.weight, a directory with {FINAL_CHECKPOINT}, or "
                         f"{HUB_WEIGHTS} + {CONFIG_FILE})")
    trainer: dict[str, Any] = {}
    beside = weights.parent / CONFIG_FILE
    if beside.is_file():
        cfg = read_json(beside)
        trainer = cfg["trainer"] if isinstance(cfg.get("trainer"), dict) else {}
    return "state_dict", weights, trainer


def _code_normalization(layout: str, state: Mapping[str, torch.Tensor], cfg: Mapping[str, Any], where: str) -> str:
    """Their code normalisation name: the hub config's, else ``code_normalization_id``, else the trainer
    config's, else CROSSCODER (as their loaders)."""
    accepted = ", ".join(f"{v}={n}" for v, n in CODE_NORMALIZATIONS.items())
    named = cfg.get("code_normalization")
    if "code_normalization_id" in state and not (layout == "hub" and named is not None):
        value = state["code_normalization_id"]
        if value.numel() != 1 or int(value.item()) not in CODE_NORMALIZATIONS:
            raise UsageError(f"{where}: code_normalization_id {value.tolist()} is not one of {accepted}")
        return CODE_NORMALIZATIONS[int(value.item())]
    if named is None:
        return "CROSSCODER"
    name = str(named).upper()
    if name not in CODE_NORMALIZATIONS.values():
        raise UsageError(f"{where}: code_normalization {named!r} is not one of "
                         f"{', '.join(CODE_NORMALIZATIONS.values())}")
    return name


def _encoder_layers(cfg: Mapping[str, Any], n_enc: int, n_sites: int, where: str) -> list[int]:
    """The sites the encoder reads: ``encoder_layers`` of the config (a list, or the string their trainer
    config writes), else all; one-line error when it does not fit the weights."""
    given = cfg.get("encoder_layers", (cfg.get("dict_class_kwargs") or {}).get("encoder_layers"))
    if isinstance(given, str):
        try:
            given = json.loads(given.replace("None", "null"))
        except ValueError:
            raise UsageError(f"{where}: encoder_layers {given!r} is not a list of site indices") from None
    if given is None:
        if n_enc != n_sites:
            raise UsageError(f"{where}: encoder.weight has {n_enc} sites and decoder.weight {n_sites}; a crosscoder "
                             f"whose encoder reads a subset needs encoder_layers in {CONFIG_FILE}")
        return list(range(n_sites))
    layers = [int(i) for i in given] if isinstance(given, list) else []
    if len(layers) != n_enc or len(set(layers)) != n_enc or not all(0 <= i < n_sites for i in layers):
        raise UsageError(f"{where}: encoder_layers {given!r} must list {n_enc} distinct site indices in "
                         f"0..{n_sites - 1} (encoder.weight has {n_enc} sites)")
    return layers


def _site_names(sites: Sequence[str] | None, n_sites: int, where: str) -> list[str]:
    """Placeholder names ``site.i``, or ``sites`` (other libraries' hook names translated) checked."""
    if sites is None:
        return [SITE_PLACEHOLDER.format(i) for i in range(n_sites)]
    names = [canonical_hookpoint(s) for s in sites]
    if len(names) != n_sites or len(set(names)) != n_sites or not all(names):
        raise UsageError(f"{where}: sites={list(sites)} must name its {n_sites} sites, distinct, in the order of "
                         f"its stacked activations")
    return names


def _normaliser(state: Mapping[str, torch.Tensor], n_sites: int, d: int,
                where: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(mean [L, d], global scale [L])`` of their activation normalisation, None when it is off."""
    mean, std = state.get("activation_mean"), state.get("activation_std")
    if mean is None or std is None or bool(torch.isnan(mean).any()) or bool(torch.isnan(std).any()):
        return None
    scale = state.get("activation_global_scale")
    if scale is None:
        raise UsageError(f"{where}: has activation_mean and activation_std but no activation_global_scale")
    for name, value, shape in (("activation_mean", mean, (n_sites, d)), ("activation_global_scale", scale, (n_sites,))):
        if tuple(value.shape) != shape:
            raise UsageError(f"{where}: {name} has shape {list(value.shape)}, expected {list(shape)}")
    if not bool(torch.isfinite(scale).all()) or float(scale.min()) <= 0:
        raise UsageError(f"{where}: activation_global_scale {scale.tolist()} must be positive and finite")
    return mean, scale


def load_dictionary_learning(path: str | Path, sites: Sequence[str] | None = None,
                             device: str | torch.device = "cpu") -> SparseDictionary:
    """Load a dictionary_learning / crosscoder_learning crosscoder (any layout of the module docstring) as a
    saelab ``crosscoder`` in eval mode; ``sites`` names its sites in order (default ``site.0``...)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"dictionary path {str(path)!r} does not exist")
    layout, weights, cfg = _resolve(path)
    where = f"dictionary_learning crosscoder {str(weights)!r}"
    state = _strip_compiled(read_safetensors(weights) if layout == "hub" else _read_state_dict(weights))
    require_weights(state, _WEIGHT_KEYS, where)
    W_enc, b_enc, W_dec, b_dec = (state[k] for k in _WEIGHT_KEYS)
    if W_enc.dim() != 3 or W_dec.dim() != 3:
        raise UsageError(f"{where}: encoder.weight {list(W_enc.shape)} and decoder.weight {list(W_dec.shape)} are not "
                         f"a crosscoder's [sites, d, F] and [sites, F, d] (a dictionary_learning SAE?); supported: "
                         f"{', '.join(DICT_CLASSES)}")
    n_enc, d, F = W_enc.shape
    n_sites = W_dec.shape[0]
    if tuple(W_dec.shape) != (n_sites, F, d) or tuple(b_enc.shape) != (F,) or tuple(b_dec.shape) != (n_sites, d):
        raise UsageError(f"{where}: inconsistent shapes: encoder.weight {list(W_enc.shape)}, encoder.bias "
                         f"{list(b_enc.shape)}, decoder.weight {list(W_dec.shape)}, decoder.bias {list(b_dec.shape)}")
    dict_class = cfg.get("dict_class")
    batch_topk = "threshold" in state or "k" in state
    if dict_class is not None and dict_class not in DICT_CLASSES:
        raise UsageError(f"{where}: dict_class {dict_class!r} is not a crosscoder; supported: "
                         f"{', '.join(DICT_CLASSES)}")
    if dict_class is not None and (dict_class == "BatchTopKCrossCoder") != batch_topk:
        raise UsageError(f"{where}: config says dict_class {dict_class!r} but the weights "
                         f"{'have' if batch_topk else 'lack'} BatchTopK's k and threshold")
    if batch_topk:
        require_weights(state, ("k", "threshold"), where, note="a BatchTopKCrossCoder stores both")
    code_norm = _code_normalization(layout, state, cfg, where)
    if code_norm == "DECOUPLED" and not batch_topk:
        code_norm_used = "CROSSCODER"  # a ReLU crosscoder sums its per-site norms: the same forward and penalty
    else:
        code_norm_used = code_norm
    if code_norm_used not in DECODER_NORMS:
        raise UsageError(f"{where}: code normalisation {code_norm} is not supported for "
                         f"{'BatchTopKCrossCoder' if batch_topk else 'CrossCoder'}; supported: "
                         f"CROSSCODER (sum of the sites' decoder norms), SAE (norm of their concatenation), NONE"
                         + ("" if batch_topk else ", DECOUPLED"))
    encoder_layers = _encoder_layers(cfg, n_enc, n_sites, where)
    names = _site_names(sites, n_sites, where)
    options: dict[str, Any] = {"d_sae": int(F), "decoder_norm": DECODER_NORMS[code_norm_used],
                               "activation": "batchtopk" if batch_topk else "relu"}
    threshold = None
    if batch_topk:
        k, threshold = state["k"], state["threshold"]
        if k.numel() != 1 or threshold.numel() != 1:
            raise UsageError(f"{where}: k {list(k.shape)} and threshold {list(threshold.shape)} must be scalars "
                             f"(per-site thresholds belong to the DECOUPLED normalisation, not supported)")
        if int(k.item()) < 1 or not math.isfinite(float(threshold.item())):
            raise UsageError(f"{where}: k={int(k.item())} must be >= 1 and threshold={float(threshold.item())} finite")
        options["k"] = int(k.item())
    module = build_dictionary("crosscoder", {"inputs": names, "outputs": names, "d_in": int(d), "d_out": int(d)},
                              options)
    full_enc = W_enc.new_zeros(n_sites, d, F)
    full_enc[encoder_layers] = W_enc
    tensors = {"W_enc": full_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if threshold is not None:
        tensors["threshold"] = threshold.reshape(())
    assign_weights(module, tensors, where)
    if threshold is not None and float(threshold) >= 0:
        # estimated: further training continues the running mean (momentum) instead of restarting it
        module.threshold_updates.fill_(math.ceil(1 / module.options.threshold_momentum))
    normaliser = _normaliser(state, n_sites, int(d), where)
    if normaliser is not None:
        _fold_normaliser(module, *normaliser)
    module.extra_config.update({
        "source_format": "dictionary-learning", "source_path": str(path), "source_layout": layout,
        "dict_class": "BatchTopKCrossCoder" if batch_topk else "CrossCoder", "code_normalization": code_norm,
        "encoder_layers": encoder_layers, "dictionary_learning_cfg": dict(cfg),
        "site_names": "given" if sites is not None else "placeholder"})
    return module.to(device).eval()



@torch.no_grad()
def _fold_normaliser(module: SparseDictionary, mean: torch.Tensor, scale: torch.Tensor) -> None:
    """Make ``module`` (weights in their normalised units) read raw activations: the scales folded by
    ``fold_scaling``, ``x' = (x - mean) * s`` and ``x_hat = x_hat' / (s + eps) + mean`` exactly."""
    module.fold_scaling(scale, scale + NORM_EPS)
    shift = torch.einsum("ld,ldf->f", mean.to(module.W_enc), module.W_enc)
    module.b_enc.sub_(shift)
    module.b_dec.add_(mean.to(module.b_dec))


class DictionaryLearningFormat(DictionaryFormat):
    """science-of-finetuning dictionary_learning / crosscoder_learning crosscoders (CrossCoder,
    BatchTopKCrossCoder): torch.save state dicts and model.safetensors + config.json directories. Read-only."""

    name = "dictionary-learning"
    aliases = ("dictionary_learning", "crosscoder-learning", "crosscoder_learning")

    @classmethod
    def hookpoint_from_external(cls, name: str) -> str | None:
        """Their trainer's activation cache names, ``layer_<N>_out`` -> ``layers.N``."""
        m = _CACHE_NAME_RE.match(name.strip())
        return f"layers.{int(m.group(1))}" if m else None

    @classmethod
    def detect(cls, path: Path) -> bool:
        """A crosscoder state dict (``*.pt``), a directory with ``model_final.pt``, or ``model.safetensors`` beside
        a crosscoder ``config.json``."""
        path = Path(path)
        if path.is_dir():
            if has_files(path, HUB_WEIGHTS, CONFIG_FILE):
                return _is_hub_config(path / CONFIG_FILE)
            return _is_state_dict_file(path / FINAL_CHECKPOINT)
        return _is_state_dict_file(path)

    def load(self, path: Path, device: str | torch.device = "cpu") -> SparseDictionary:
        """Load with placeholder sites ``site.0``... (see :func:`load_dictionary_learning`)."""
        return load_dictionary_learning(path, device=device)


@hookimpl
def register_dictionary_formats(register):
    """Register the ``dictionary-learning`` format."""
    register(DictionaryLearningFormat)


__all__ = ["CODE_NORMALIZATIONS", "DECODER_NORMS", "SITE_PLACEHOLDER", "DictionaryLearningFormat",
           "load_dictionary_learning"]
