"""The ``saelens`` dictionary format: SAELens directories (``cfg.json`` + ``sae_weights.safetensors``).

Reading (SAELens 6.x files, and pre-6.0 ``cfg.json`` keys such as ``hook_point``/``activation_fn_str``):

=====================================  ===========================================================
SAELens ``architecture``               saelab architecture
=====================================  ===========================================================
``standard`` (ReLU)                    ``relu``
``topk`` (``k``)                       ``topk``; ``rescale_acts_by_decoder_norm`` is folded in
                                       (``W_enc``, ``b_enc`` times the decoder norms, ``W_dec``
                                       divided by them: same latents and outputs)
``jumprelu`` (``threshold``)           ``jumprelu`` (``log_threshold`` of old files is exponentiated)
``transcoder`` / ``skip_transcoder``   ``transcoder`` / ``skip-transcoder`` (``W_skip [d_out, d_in]``
                                       is stored transposed)
=====================================  ===========================================================

``apply_b_dec_to_input`` is reconciled with the saelab architecture by folding ``b_dec @ W_enc`` into
the encoder bias when one subtracts ``b_dec`` from its input and the other does not (saelab's ``topk``
does, its ``relu`` and ``jumprelu`` do not). ``normalize_activations``: ``none`` and
``expected_average_only_in`` load as they are (SAELens 6 inference SAEs apply no run-time scaling for
the latter: the scale is folded into the weights when SAELens saves); the per-token schemes
(``constant_norm_rescale``, ``layer_norm``) and ``covariance_whitening`` are not linear maps and are
refused with a one-line error. A pre-6.0 ``scaling_factor`` (fine-tuning scale of the latents) is
folded into ``W_dec``. Hook names are translated to saelab hookpoints (``blocks.8.hook_resid_post`` ->
``layers.8``, ``blocks.8.hook_mlp_out`` -> ``layers.8.mlp``...); this module holds the SAELens /
TransformerLens naming table, which the engine also uses to read ``--hookpoints blocks.8.hook_resid_post``.

Writing (export) maps back: ``relu`` -> ``standard``, ``topk`` -> ``topk``, ``jumprelu`` -> ``jumprelu``,
``batchtopk`` and ``matryoshka`` -> ``jumprelu`` with their inference threshold for every latent (what
SAELens itself saves for BatchTopK), ``transcoder``/``skip-transcoder`` -> ``transcoder``/``skip_transcoder``
when their activation is a ReLU (TopK transcoders have no SAELens form). Every export is checked by loading it back and comparing outputs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from saelab import DictionaryFormat, SparseDictionary, UsageError, hookimpl
from saelab.dictionary import build_dictionary
from saelab.formats import (
    assign_weights,
    canonical_hookpoint,
    check_round_trip,
    fold_pre_encoder_bias,
    has_files,
    module_threshold,
    read_json,
    read_safetensors,
    require_format_dir,
    require_weights,
    threshold_weights,
)
from saelab.manager import saelab_version

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_VERSION = "6.54.12"
"""SAELens version whose format the export writes (and that the reference fixtures come from)."""

_READ = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "transcoder": "transcoder",
         "skip_transcoder": "skip-transcoder"}
_NORMALISATIONS_OK = ("none", "expected_average_only_in")
_SAELENS_SITES = {
    "hook_resid_post": "", "hook_mlp_out": ".mlp", "hook_attn_out": ".self_attn",
    "ln1.hook_normalized": ".self_attn.input", "ln2.hook_normalized": ".mlp.input",
    "hook_resid_mid": ".resid_mid",
}
"""TransformerLens hook of block N -> suffix of the saelab hookpoint ``layers.N``."""
_TL_SITES = {suffix.lstrip("."): hook for hook, suffix in _SAELENS_SITES.items()}
"""Suffix of a saelab hookpoint ``layers.N`` -> TransformerLens hook of block N."""


def to_external_name(hookpoint: str) -> str:
    """A saelab hookpoint as a TransformerLens / SAELens hook name (``layers.8`` ->
    ``blocks.8.hook_resid_post``, ``embed`` -> ``blocks.0.hook_resid_pre``); other names unchanged."""
    if hookpoint == "embed":
        return "blocks.0.hook_resid_pre"
    m = re.fullmatch(r"layers\.(\d+)(?:\.(.+))?", hookpoint)
    if m and (m.group(2) or "") in _TL_SITES:
        return f"blocks.{m.group(1)}.{_TL_SITES[m.group(2) or '']}"
    return hookpoint


def from_external_name(name: str) -> str | None:
    """A SAELens / TransformerLens hook name (``blocks.8.hook_resid_post``, ``blocks.8.hook_resid_pre``,
    ``blocks.2.ln2.hook_normalized``...) as a saelab hookpoint; None when ``name`` is not one."""
    m = re.match(r"^blocks\.(\d+)\.(.+)$", name.strip())
    if m is None:
        return None
    layer, hook = int(m.group(1)), m.group(2)
    if hook == "hook_resid_pre":
        return "embed" if layer == 0 else f"layers.{layer - 1}"
    if hook in _SAELENS_SITES:
        return f"layers.{layer}{_SAELENS_SITES[hook]}"
    return None


def _normalise_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    """Flatten SAELens 6 ``metadata`` and apply the pre-6.0 key renames and defaults."""
    cfg = dict(cfg)
    meta = cfg.get("metadata") or {}
    for key in ("hook_name", "hook_name_out", "model_name"):
        if cfg.get(key) is None and meta.get(key) is not None:
            cfg[key] = meta[key]
    renames = {"hook_point": "hook_name", "activation_fn_str": "activation_fn"}
    for old, new in renames.items():
        if old in cfg and new not in cfg:
            cfg[new] = cfg[old]
    cfg.setdefault("apply_b_dec_to_input", True)
    cfg.setdefault("normalize_activations", "none")
    cfg.setdefault("architecture", "standard")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if cfg.get("activation_fn") == "topk" and kwargs.get("k") is not None:
        cfg["architecture"], cfg["k"] = "topk", kwargs["k"]
    return cfg


class SaeLensFormat(DictionaryFormat):
    """SAELens directories: cfg.json + sae_weights.safetensors (standard, topk, jumprelu, transcoders)."""

    name = "saelens"
    aliases = ("sae_lens", "sae-lens")

    @classmethod
    def hookpoint_from_external(cls, name: str) -> str | None:
        """SAELens / TransformerLens hook names (see :func:`from_external_name`)."""
        return from_external_name(name)

    @classmethod
    def detect(cls, path: Path) -> bool:
        """A directory holding ``cfg.json`` and ``sae_weights.safetensors``."""
        return has_files(path, CFG_FILE, WEIGHTS_FILE)

    # -- reading -------------------------------------------------------------------------------------

    def load(self, path: Path, device: str | torch.device = "cpu") -> SparseDictionary:
        """Load a SAELens directory into the matching saelab architecture."""
        path = Path(path)
        require_format_dir(self.detect(path), path, "SAELens", f"{CFG_FILE} and {WEIGHTS_FILE}")
        cfg = _normalise_cfg(read_json(path / CFG_FILE))
        where = f"SAELens dictionary {str(path)!r}"
        arch = str(cfg["architecture"])
        if arch not in _READ:
            raise UsageError(f"{where}: SAELens architecture {arch!r} is not supported; "
                             f"supported: {', '.join(sorted(_READ))}")
        norm = cfg.get("normalize_activations") or "none"
        if norm not in _NORMALISATIONS_OK:
            raise UsageError(f"{where}: normalize_activations {norm!r} is a per-token transform that a linear "
                             f"dictionary cannot hold; supported: {', '.join(_NORMALISATIONS_OK)}")
        if (cfg.get("reshape_activations") or "none") != "none":
            raise UsageError(f"{where}: reshape_activations {cfg['reshape_activations']!r} (attention hook_z "
                             f"SAEs) is not supported; supported: none")
        w = read_safetensors(path / WEIGHTS_FILE)
        require_weights(w, ("W_enc", "W_dec", "b_dec"), f"{where}: {WEIGHTS_FILE}")
        d_in, d_sae = w["W_enc"].shape
        d_out = w["W_dec"].shape[1]
        b_enc = w.get("b_enc", torch.zeros(d_sae))
        W_enc, W_dec, b_dec = w["W_enc"], w["W_dec"], w["b_dec"]
        if "scaling_factor" in w:  # pre-6.0 fine-tuning scale of the latents, applied before W_dec
            W_dec = W_dec * w["scaling_factor"][:, None]

        hook_in = canonical_hookpoint(str(cfg.get("hook_name") or "unknown"))
        transcoder = arch in ("transcoder", "skip_transcoder")
        if transcoder:
            out_name = cfg.get("hook_name_out")
            if out_name:
                hook_out = canonical_hookpoint(str(out_name))
            elif hook_in.endswith(".mlp.input"):
                hook_out = hook_in[: -len(".input")]
            else:
                hook_out = f"{hook_in}.output"
        else:
            hook_out = hook_in
            if d_in != d_out:
                raise UsageError(f"{where}: an autoencoder needs d_in == d_out, got {d_in} and {d_out}")
        options: dict[str, Any] = {"d_sae": int(d_sae)}
        if transcoder:  # SAELens transcoders are ReLU dictionaries (k is unused then)
            options.update({"activation": "relu", "k": 1})
        if arch == "topk":
            options["k"] = int(cfg.get("k") or 0)
            if cfg.get("rescale_acts_by_decoder_norm"):
                norms = W_dec.norm(dim=-1).clamp_min(1e-8)
                W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
        sites = {"inputs": [hook_in], "outputs": [hook_out], "d_in": int(d_in), "d_out": int(d_out)}
        module = build_dictionary(_READ[arch], sites, options)
        lens_subtracts = not transcoder and bool(cfg.get("apply_b_dec_to_input", True))
        b_enc = fold_pre_encoder_bias(b_enc, b_dec, W_enc, lens_subtracts, module)
        tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
        if arch == "skip_transcoder":
            if "W_skip" not in w:
                raise UsageError(f"{where}: a skip_transcoder needs 'W_skip' in {WEIGHTS_FILE}")
            tensors["W_skip"] = w["W_skip"].T
        if arch == "jumprelu":
            if "threshold" in w:
                threshold = w["threshold"]
            elif "log_threshold" in w:
                threshold = w["log_threshold"].exp()
            else:
                raise UsageError(f"{where}: a jumprelu SAE needs 'threshold' in {WEIGHTS_FILE}")
            tensors.update(threshold_weights(module, threshold))
        assign_weights(module, tensors, where)
        module.extra_config.update({"source_format": "saelens", "source_path": str(path),
                                    "saelens_cfg": {k: v for k, v in cfg.items() if k != "metadata"}})
        return module.to(device).eval()

    # -- writing -------------------------------------------------------------------------------------

    def save(self, dictionary: SparseDictionary, path: Path) -> None:
        """Export ``dictionary`` as a SAELens directory; refuses what SAELens cannot represent."""
        cfg, tensors = saelens_state(dictionary)
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()},
                  str(path / WEIGHTS_FILE))
        (path / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        try:
            check_round_trip(dictionary, self.load(path), "SAELens",
                             scale=float(dictionary.b_dec.detach().abs().mean()) + 1.0)
        except UsageError:
            for name in (CFG_FILE, WEIGHTS_FILE):
                (path / name).unlink(missing_ok=True)
            raise


def _activation_kind(module: SparseDictionary) -> str:
    """How ``module`` turns pre-activations into latents: relu, topk, threshold or unknown."""
    from saelab.dictionary import LinearDictionary

    kind = module.latent_activation if isinstance(module, LinearDictionary) else "unknown"
    if kind == "unknown" and module_threshold(module) is not None:
        return "threshold"
    return kind


def saelens_state(module: SparseDictionary) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The SAELens ``cfg.json`` dict and weights that represent ``module`` (one-line error if impossible)."""
    sites = module.sites
    what = f"cannot export architecture {module.name!r} to SAELens"
    if len(sites.inputs) != 1 or len(sites.outputs) != 1:
        raise UsageError(f"{what}: SAELens holds single-site dictionaries, this one reads {sites.inputs} "
                         f"and writes {sites.outputs}")
    for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
        if not hasattr(module, key):
            raise UsageError(f"{what}: it has no {key} (exportable: linear relu, topk, jumprelu, batchtopk, "
                             f"matryoshka, transcoder and skip-transcoder dictionaries)")
    kind = _activation_kind(module)
    transcoder = not sites.is_autoencoder
    skip = hasattr(module, "W_skip") and getattr(module, "skip_connection", True)
    tensors = {"W_enc": module.W_enc.detach(), "b_enc": module.b_enc.detach(),
               "W_dec": module.W_dec.detach(), "b_dec": module.b_dec.detach()}
    pre_bias = module.uses_pre_encoder_bias
    if transcoder and pre_bias:
        raise UsageError(f"{what}: a transcoder that subtracts b_dec from its input has no SAELens form")
    if skip:
        if not transcoder:
            raise UsageError(f"{what}: SAELens has no autoencoder with a skip connection")
        tensors["W_skip"] = module.W_skip.detach().T
    if transcoder:
        if kind != "relu":
            raise UsageError(f"{what}: SAELens transcoders use a ReLU; this one uses {kind}")
        architecture = "skip_transcoder" if skip else "transcoder"
    elif kind == "relu":
        architecture = "standard"
    elif kind == "topk":
        architecture = "topk"
    elif kind == "threshold":
        threshold = module_threshold(module)
        if threshold is None or float(threshold.min()) < 0:
            raise UsageError(f"{what}: its inference threshold is not set (train it first)")
        architecture = "jumprelu"
        tensors["threshold"] = threshold
    else:
        raise UsageError(f"{what}: unknown activation; exportable: relu, topk, jumprelu, batchtopk, "
                         f"matryoshka, transcoder, skip-transcoder")
    metadata: dict[str, Any] = {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": SAELENS_VERSION,
                                "hook_name": to_external_name(sites.inputs[0]),
                                "exported_by": f"saelab {saelab_version()}", "saelab_architecture": module.name}
    extra = module.extra_config
    if extra.get("model"):
        metadata["model_name"] = extra["model"]
    cfg: dict[str, Any] = {"d_in": sites.d_in, "d_sae": module.d_sae, "dtype": "float32", "device": "cpu",
                           "apply_b_dec_to_input": pre_bias, "normalize_activations": "none",
                           "reshape_activations": "none", "metadata": metadata, "architecture": architecture}
    if transcoder:
        cfg["d_out"] = sites.d_out
        metadata["hook_name_out"] = to_external_name(sites.outputs[0])
    if architecture == "topk":
        cfg["k"] = int(module.k)
        cfg["rescale_acts_by_decoder_norm"] = False
    return cfg, tensors


@hookimpl
def register_dictionary_formats(register):
    """Register the ``saelens`` format."""
    register(SaeLensFormat)
