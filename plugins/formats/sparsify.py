"""The ``sparsify`` dictionary format: EleutherAI sparsify directories (``cfg.json`` + ``sae.safetensors``).

sparsify writes one directory per hookpoint (named after the module, e.g. ``layers.8`` or
``layers.8.mlp``) under a run directory; this format reads one hookpoint directory, and
:func:`saelab.formats.find_dictionaries` expands a run directory into its hookpoints. This module holds the
naming of Hugging Face module paths (``model.layers.8.mlp``, ``transformer.h.8.attn``, ``h.8``), which the
engine also uses to read ``--hookpoints model.layers.8``.

Mapping (sparsify 1.x ``SparseCoder``): ``encoder.weight [d_sae, d_in]`` -> ``W_enc`` (transposed),
``encoder.bias`` -> ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec``, ``W_skip [d_out, d_in]`` (applied as
``x @ W_skip.T``) -> ``W_skip`` transposed. ``activation: topk`` with ``k`` loads as saelab ``topk``
(sparsify's ReLU-then-top-k selects the same latents as saelab's top-k-then-ReLU); ``transcode: true``
loads as ``transcoder`` (or ``skip-transcoder`` with ``skip_connection``) reading the module's input
(``layers.8.mlp.input`` for ``layers.8.mlp``; the previous residual stream for a whole block) and writing
its output, without subtracting ``b_dec`` from the input, as sparsify does. ``groupmax`` is refused.
Writing supports the TopK family with a fixed ``k`` (``topk``, TopK transcoders).
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
    fold_pre_encoder_bias,
    has_files,
    read_json,
    read_safetensors,
    require_format_dir,
    require_weights,
)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
_MODULE_PATH_RE = re.compile(
    r"^(?:model\.|transformer\.|gpt_neox\.|model\.language_model\.)?(?:layers|h|blocks)\.(\d+)"
    r"(?:\.(mlp|attn|self_attn|attention|self_attention|feed_forward))?$")


def from_module_path(name: str) -> str | None:
    """A Hugging Face module path (``model.layers.8.mlp``, ``transformer.h.8.attn``, ``gpt_neox.layers.8``,
    ``h.8``) as a saelab hookpoint (a block's output, its MLP or its attention); None when it is not one."""
    m = _MODULE_PATH_RE.match(name.strip())
    if m is None:
        return None
    layer, module = int(m.group(1)), m.group(2)
    if module is None:
        return f"layers.{layer}"
    return f"layers.{layer}" + (".mlp" if module in ("mlp", "feed_forward") else ".self_attn")


def _input_site(hookpoint: str) -> str:
    """The hookpoint a transcoder for module ``hookpoint`` reads."""
    m = re.fullmatch(r"layers\.(\d+)", hookpoint)
    if m:
        layer = int(m.group(1))
        return "embed" if layer == 0 else f"layers.{layer - 1}"
    return f"{hookpoint}.input"


class SparsifyFormat(DictionaryFormat):
    """EleutherAI sparsify hookpoint directories: cfg.json + sae.safetensors (TopK SAEs and transcoders)."""

    name = "sparsify"
    aliases = ("eai-sparsify",)

    @classmethod
    def hookpoint_from_external(cls, name: str) -> str | None:
        """Module paths, as sparsify names its hookpoint directories (see :func:`from_module_path`)."""
        return from_module_path(name)

    @classmethod
    def detect(cls, path: Path) -> bool:
        """A directory holding ``cfg.json`` and ``sae.safetensors``."""
        return has_files(path, CFG_FILE, WEIGHTS_FILE)

    def load(self, path: Path, device: str | torch.device = "cpu") -> SparseDictionary:
        """Load one sparsify hookpoint directory (the directory name is the hookpoint)."""
        path = Path(path)
        require_format_dir(self.detect(path), path, "sparsify", f"{CFG_FILE} and {WEIGHTS_FILE}")
        where = f"sparsify dictionary {str(path)!r}"
        cfg = read_json(path / CFG_FILE)
        activation = cfg.get("activation", "topk")
        if activation != "topk":
            raise UsageError(f"{where}: activation {activation!r} is not supported; supported: topk")
        w = read_safetensors(path / WEIGHTS_FILE)
        require_weights(w, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), f"{where}: {WEIGHTS_FILE}",
                        note="a decoder-less (encoder-only) file cannot be used")
        d_sae, d_in = w["encoder.weight"].shape
        d_out = w["W_dec"].shape[1]
        k = int(cfg.get("k", 32))
        transcode = bool(cfg.get("transcode", False))
        skip = "W_skip" in w
        hookpoint = canonical_hookpoint(path.resolve().name)
        inputs = [_input_site(hookpoint)] if transcode else [hookpoint]
        if not transcode and d_in != d_out:
            raise UsageError(f"{where}: an autoencoder needs d_in == d_out, got {d_in} and {d_out}")
        architecture = "skip-transcoder" if skip else ("transcoder" if transcode else "topk")
        sites = {"inputs": inputs, "outputs": [hookpoint], "d_in": int(d_in), "d_out": int(d_out)}
        module = build_dictionary(architecture, sites, {"d_sae": int(d_sae), "k": k})
        W_enc = w["encoder.weight"].T
        # sparsify encodes x - b_dec exactly when it autoencodes
        b_enc = fold_pre_encoder_bias(w["encoder.bias"], w["b_dec"], W_enc, not transcode, module)
        tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": w["W_dec"], "b_dec": w["b_dec"]}
        if skip:
            tensors["W_skip"] = w["W_skip"].T
        assign_weights(module, tensors, where)
        module.extra_config.update({"source_format": "sparsify", "source_path": str(path),
                                    "sparsify_cfg": cfg})
        return module.to(device).eval()

    def save(self, dictionary: SparseDictionary, path: Path) -> None:
        """Write a fixed-k TopK dictionary as a sparsify hookpoint directory (name it after the hookpoint)."""
        from saelab.dictionary import LinearDictionary
        from safetensors.torch import save_file

        sites = dictionary.sites
        what = f"cannot export architecture {dictionary.name!r} to sparsify"
        if not isinstance(dictionary, LinearDictionary) or dictionary.latent_activation != "topk":
            raise UsageError(f"{what}: sparsify stores TopK dictionaries with a fixed k (topk, TopK transcoders)")
        if len(sites.inputs) != 1 or len(sites.outputs) != 1 or sites.d_in != sites.d_out:
            raise UsageError(f"{what}: sparsify holds single-site dictionaries with equal input and output widths")
        transcode = not sites.is_autoencoder
        tensors: dict[str, torch.Tensor] = {
            "encoder.weight": dictionary.W_enc.detach().T, "encoder.bias": dictionary.b_enc.detach(),
            "W_dec": dictionary.W_dec.detach(), "b_dec": dictionary.b_dec.detach()}
        skip = bool(getattr(dictionary, "skip_connection", False))
        if skip:
            tensors["W_skip"] = dictionary.W_skip.detach().T
        cfg: dict[str, Any] = {"activation": "topk", "expansion_factor": max(1, dictionary.d_sae // sites.d_in),
                               "normalize_decoder": True, "num_latents": dictionary.d_sae, "k": int(dictionary.k),
                               "multi_topk": False, "skip_connection": skip, "transcode": transcode,
                               "d_in": sites.d_in}
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.float().contiguous().cpu() for k, v in tensors.items()}, str(path / WEIGHTS_FILE))
        (path / CFG_FILE).write_text(json.dumps(cfg) + "\n")


@hookimpl
def register_dictionary_formats(register):
    """Register the ``sparsify`` format."""
    register(SparsifyFormat)
