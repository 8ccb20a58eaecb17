"""The ``circuit_tracer`` dictionary format: circuit-tracer's cross-layer transcoders and transcoder sets
(the layouts its ``load_clt`` / ``load_transcoder_set`` read and its ``to_safetensors`` write, version 0.5.0).

A directory holds ``config.yaml`` (``model_kind``, ``feature_input_hook``, ``feature_output_hook``,
``model_name``; circuit-tracer's loaders read the first three, its CLI the last) and, per layer ``i`` of
the model (circuit-tracer covers layers ``0..n_layers-1``):

=====================================  ===========================================================
``model_kind: cross_layer_transcoder``  ``W_enc_{i}.safetensors``: ``W_enc_{i} [F, d]`` (saelab
                                        ``W_enc[i]`` transposed), ``b_enc_{i} [F]``, ``b_dec_{i} [d]``
                                        (bias of output layer i), ``threshold_{i} [F]`` (JumpReLU, in
                                        every file or none), ``W_skip_{i} [d, d]`` (``x @ W_skip_i``,
                                        the layout of circuit-tracer's ``CrossLayerTranscoder.W_skip[i]``);
                                        ``W_dec_{i}.safetensors``: ``W_dec_{i} [F, L-i, d]`` (targets
                                        ``i..L-1``, saelab's own decoder layout)
``model_kind: transcoder_set``          ``layer_{i}.safetensors``: ``W_enc [F, d]``, ``W_dec [F, d]``,
                                        ``b_enc``, ``b_dec``, ``activation_function.threshold [F]``
                                        (JumpReLU), ``W_skip [d, d]`` (applied as ``x @ W_skip.T``)
=====================================  ===========================================================

Latents are JumpReLU (strict ``pre > threshold``) when thresholds are present, else ReLU; circuit-tracer
has no decoder-norm gating and no activation scaling. Hooks are TransformerLens names within a block:
input ``hook_resid_mid`` (saelab ``layers.i.resid_mid``) or ``mlp.hook_in`` / ``ln2.hook_normalized``
(``layers.i.mlp.input``), output ``hook_mlp_out`` / ``mlp.hook_out`` (``layers.i.mlp``).

Export (``saelab convert SRC DST --to circuit_tracer``, or :func:`export_circuit_tracer`) takes a ``clt``
or ``transcoder_set`` dictionary (its activation scales are folded into its weights when it is saved):
``relu`` and ``jumprelu`` map as they are; ``batchtopk`` becomes JumpReLU with its per-layer inference
threshold for every latent of the layer (the same latents at inference); ``topk`` and
``topk_across_layers`` become JumpReLU with a per-latent threshold estimated from an activation sample
(:func:`export_circuit_tracer` ``activations=``; each latent fires as often on the sample as under TopK),
and without one are refused. A dictionary over a layer subset (layers 3-5 of a 30-layer model) is
padded with all-zero layers to the model's layer count (``n_model_layers``, else the model's config
when it can be read, else the last layer + 1); ``config.yaml`` records saelab's layers under ``saelab``
so that import restores the subset. circuit-tracer 0.5.0's ``load_clt`` does not read ``W_skip_{i}``
(a skip CLT loads there without its skip path; the export warns); ``load_transcoder_set`` reads ``W_skip``.

Import (``load``) reads both kinds into saelab's ``clt`` / ``transcoder_set`` (ReLU or JumpReLU, skip
connection when present); a negative threshold (which saelab's JumpReLU cannot hold) is refused.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from saelab import DictionaryFormat, SparseDictionary, UsageError, hookimpl
from saelab.dictionary import build_dictionary
from saelab.formats import (
    assign_weights,
    check_round_trip,
    read_safetensors,
    require_format_dir,
    require_weights,
)
from saelab.manager import registry, saelab_version

CONFIG_FILE = "config.yaml"
CLT_KIND = "cross_layer_transcoder"
SET_KIND = "transcoder_set"
CIRCUIT_TRACER_VERSION = "0.5.0"
"""circuit-tracer version whose loaders the export is tested against."""

_INPUT_HOOK = {"resid_mid": "hook_resid_mid", "mlp.input": "mlp.hook_in"}
"""saelab input site of layer i -> circuit-tracer ``feature_input_hook`` (written)."""
_READ_INPUT = {"hook_resid_mid": "resid_mid", "mlp.hook_in": "mlp.input", "ln2.hook_normalized": "mlp.input"}
_READ_OUTPUT = ("hook_mlp_out", "mlp.hook_out")
_OUTPUT_HOOK = "hook_mlp_out"
_INPUT_RE = re.compile(r"^layers\.(\d+)\.(mlp\.input|resid_mid)$")
_OUTPUT_RE = re.compile(r"^layers\.(\d+)\.mlp$")
_BLOCK_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(mlp\.hook_in|mlp\.hook_out)$")
_EXPORTABLE = ("clt", "transcoder_set")


# --------------------------------------------------------------------------------------------------
# Export


def _layers_of(module: SparseDictionary, what: str) -> tuple[list[int], str]:
    """Model layer of each of ``module``'s layers and its input site (``mlp.input`` or ``resid_mid``)."""
    sites = module.sites
    layers, kinds = [], set()
    for inp, out in zip(sites.inputs, sites.outputs, strict=True):
        m_in, m_out = _INPUT_RE.match(str(inp)), _OUTPUT_RE.match(str(out))
        if m_in is None or m_out is None or m_in.group(1) != m_out.group(1):
            raise UsageError(f"{what}: circuit-tracer layers read layers.N.mlp.input or layers.N.resid_mid and "
                             f"write layers.N.mlp; this one reads {inp} and writes {out}")
        layers.append(int(m_in.group(1)))
        kinds.add(m_in.group(2))
    if len(kinds) != 1 or layers != sorted(set(layers)):
        raise UsageError(f"{what}: its layers must read one kind of site in increasing layer order; got {sites.inputs}")
    return layers, kinds.pop()


def _model_layer_count(module: SparseDictionary) -> int | None:
    """The number of layers of the dictionary's model when its config can be read (no weights loaded)."""
    model = module.extra_config.get("model")
    if not isinstance(model, str) or not model:
        return None
    try:
        from saelab.models import load_activation_source

        return int(load_activation_source(model).n_layers)
    except Exception:  # no readable config (offline hub id, removed directory...): the count is unknown
        return None


def _thresholds(module: SparseDictionary, what: str) -> torch.Tensor | None:
    """Per-latent JumpReLU thresholds ``[L, F]`` (None: ReLU) for activations that need no sample."""
    act = module.options.activation
    if act == "relu":
        return None
    if act == "jumprelu":
        return module.threshold_values.detach().float()
    if act == "batchtopk":
        per_layer = module.threshold.detach().float()
        if float(per_layer.min()) < 0:
            raise UsageError(f"{what}: its BatchTopK inference thresholds are not set (train it first)")
        return per_layer[:, None].expand(module.n_layers, module.d_sae_per_layer).clone()
    raise UsageError(f"{what}: circuit-tracer knows ReLU and JumpReLU only; a {act!r} dictionary exports as "
                     f"JumpReLU with thresholds estimated from activations (export_circuit_tracer(..., "
                     f"activations=[n, {module.n_layers}, {module.sites.d_in}]))")


@torch.no_grad()
def estimate_thresholds(module: SparseDictionary, activations: torch.Tensor) -> torch.Tensor:
    """Per-latent JumpReLU thresholds ``[L, F]`` that make each latent of a TopK-family ``module`` fire as
    often on ``activations`` (inputs ``[n, L, d_in]``) as its TopK selection does: the midpoint between the
    latent's ``c``-th and ``c+1``-th largest pre-activation, ``c`` its TopK count (never below 0; a latent
    TopK never picks gets its largest pre-activation, so that it does not fire on the sample)."""
    L, F_ = module.n_layers, module.d_sae_per_layer
    x = activations.to(module.W_enc.device, module.W_enc.dtype)
    fired = (module.encode(x).reshape(len(x), L, F_) > 0).sum(0)  # [L, F]
    out = torch.empty(L, F_, device=x.device)
    for i in range(L):
        pre = torch.addmm(module.b_enc[i], x[:, i], module.W_enc[i])
        top = pre.sort(dim=0, descending=True).values.float()  # [n, F]
        c = fired[i]
        upper = top.gather(0, (c - 1).clamp_min(0)[None]).squeeze(0)
        lower = top.gather(0, c.clamp_max(len(x) - 1)[None]).squeeze(0)
        theta = torch.where(c == 0, top[0], torch.where(c >= len(x), lower - 1.0, (upper + lower) / 2))
        out[i] = theta.clamp_min(0.0)
    return out.cpu()


def circuit_tracer_state(module: SparseDictionary, *, n_model_layers: int | None = None,
                         thresholds: torch.Tensor | None = None) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """``config.yaml`` contents and ``{file name: tensors}`` that represent ``module`` (a ``clt`` or
    ``transcoder_set``) in circuit-tracer's layout, padded to ``n_model_layers``; ``thresholds [L, F]``
    replaces the module's own activation by JumpReLU (TopK family). One-line error when impossible."""
    what = f"cannot export architecture {module.name!r} to circuit-tracer"
    if module.name not in _EXPORTABLE:
        raise UsageError(f"{what}: exportable architectures: {', '.join(_EXPORTABLE)}")
    norm = module.extra_config.get("normalisation")
    if isinstance(norm, dict) and norm.get("folded") is False:
        raise UsageError(f"{what}: its activation scales are not folded into its weights")
    sites = module.sites
    if sites.d_in != sites.d_out:
        raise UsageError(f"{what}: circuit-tracer reads and writes the residual width d_model; this one reads "
                         f"d_in={sites.d_in} and writes d_out={sites.d_out}")
    layers, input_site = _layers_of(module, what)
    theta = _thresholds(module, what) if thresholds is None else thresholds.detach().float().cpu()
    n_model = n_model_layers if n_model_layers is not None else (_model_layer_count(module) or layers[-1] + 1)
    if n_model <= layers[-1]:
        raise UsageError(f"{what}: n_model_layers={n_model} but the dictionary reaches layer {layers[-1]}")
    cross = any(module.decoder(i).shape[1] > 1 for i in range(module.n_layers)) or module.name == "clt"
    kind = CLT_KIND if cross else SET_KIND
    F_, d = module.d_sae_per_layer, sites.d_in
    skip = bool(module.options.skip_connection)
    local = {layer: a for a, layer in enumerate(layers)}
    W_enc, b_enc, b_dec = (t.detach().float().cpu() for t in (module.W_enc, module.b_enc, module.b_dec))
    W_skip = module.W_skip.detach().float().cpu() if skip else None
    files: dict[str, dict[str, torch.Tensor]] = {}
    for layer in range(n_model):
        a = local.get(layer)
        enc = W_enc[a].T.contiguous() if a is not None else torch.zeros(F_, d)
        benc = b_enc[a].clone() if a is not None else torch.zeros(F_)
        bdec = b_dec[a].clone() if a is not None else torch.zeros(d)
        thr = (theta[a].clone() if a is not None else torch.zeros(F_)) if theta is not None else None
        wskip = (W_skip[a].clone() if a is not None else torch.zeros(d, d)) if W_skip is not None else None
        if kind == CLT_KIND:
            dec = torch.zeros(F_, n_model - layer, d)
            if a is not None:
                W = module.decoder(a).detach().float().cpu()
                for t in range(W.shape[1]):
                    dec[:, layers[a + t] - layer] = W[:, t]
            tensors = {f"W_enc_{layer}": enc, f"b_enc_{layer}": benc, f"b_dec_{layer}": bdec}
            if thr is not None:
                tensors[f"threshold_{layer}"] = thr
            if wskip is not None:
                tensors[f"W_skip_{layer}"] = wskip
            files[f"W_enc_{layer}.safetensors"] = tensors
            files[f"W_dec_{layer}.safetensors"] = {f"W_dec_{layer}": dec}
        else:
            dec = module.decoder(a).detach().float().cpu()[:, 0].clone() if a is not None else torch.zeros(F_, d)
            tensors = {"W_enc": enc, "W_dec": dec, "b_enc": benc, "b_dec": bdec}
            if thr is not None:
                tensors["activation_function.threshold"] = thr
            if wskip is not None:
                tensors["W_skip"] = wskip.T.contiguous()
            files[f"layer_{layer}.safetensors"] = tensors
    config: dict[str, Any] = {"model_kind": kind, "feature_input_hook": _INPUT_HOOK[input_site],
                              "feature_output_hook": _OUTPUT_HOOK}
    if module.extra_config.get("model"):
        config["model_name"] = str(module.extra_config["model"])
    config["saelab"] = {"exported_by": f"saelab {saelab_version()}", "circuit_tracer_version": CIRCUIT_TRACER_VERSION,
                        "architecture": module.name, "activation": str(module.options.activation),
                        "layers": layers, "n_model_layers": n_model, "d_sae_per_layer": F_,
                        "skip_connection": skip}
    return config, files


def export_circuit_tracer(module: SparseDictionary, path: str | Path, *, n_model_layers: int | None = None,
                          activations: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                          model_name: str | None = None) -> dict[str, Any]:
    """Write ``module`` (``clt`` or ``transcoder_set``) to directory ``path`` in circuit-tracer's layout and
    return the ``config.yaml`` contents. A TopK-family dictionary needs ``activations`` (inputs ``[n, L,
    d_in]``): its thresholds are estimated from them (:func:`estimate_thresholds`) and the FVU of the TopK
    and the exported JumpReLU reconstructions is recorded under ``saelab.threshold_estimate`` (against
    ``targets [n, L, d_out]`` when given, else against the TopK reconstruction). ``n_model_layers`` pads
    to the model's layer count; ``model_name`` overrides the recorded model."""
    from safetensors.torch import save_file

    thresholds = None
    act = str(getattr(module.options, "activation", ""))
    if module.name in _EXPORTABLE and act in ("topk", "topk_across_layers") and activations is not None:
        thresholds = estimate_thresholds(module, activations)
    config, files = circuit_tracer_state(module, n_model_layers=n_model_layers, thresholds=thresholds)
    if model_name:
        config["model_name"] = model_name
    if thresholds is not None:
        assert activations is not None
        config["saelab"]["threshold_estimate"] = _estimate_report(module, thresholds, activations, targets)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, tensors in files.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / name))
    (path / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    if thresholds is None:
        check_round_trip(module, CircuitTracerFormat().load(path), "circuit-tracer")
    if config["saelab"]["skip_connection"] and config["model_kind"] == CLT_KIND:
        warnings.warn(f"circuit-tracer {CIRCUIT_TRACER_VERSION}'s load_clt does not read W_skip_{{i}}: the CLT "
                      f"written to {str(path)!r} loads there without its skip connection", stacklevel=2)
    return config


@torch.no_grad()
def _estimate_report(module: SparseDictionary, thresholds: torch.Tensor, activations: torch.Tensor,
                     targets: torch.Tensor | None) -> dict[str, Any]:
    """FVU and L0 of the TopK module and of the JumpReLU export on the sample."""
    was_training = module.training
    module.eval()
    try:
        x = activations.to(module.W_enc.device, module.W_enc.dtype)
        L, F_ = module.n_layers, module.d_sae_per_layer
        topk_out = module(x)
        pre = torch.einsum("nld,ldf->nlf", x, module.W_enc) + module.b_enc
        theta = thresholds.to(pre.device, pre.dtype)
        z = pre * (pre > theta)
        jr_recon = module.decode(z.reshape(len(x), L * F_))
        if module.options.skip_connection:
            jr_recon = jr_recon + torch.einsum("nld,lde->nle", x, module.W_skip)
        topk_recon = topk_out.reconstruction
        reference = topk_recon if targets is None else targets.to(x.device, x.dtype)

        def fvu(recon: torch.Tensor) -> list[float]:
            var = (reference - reference.mean(0)).pow(2).sum((0, 2)).clamp_min(1e-12)
            return ((recon - reference).pow(2).sum((0, 2)) / var).tolist()

        report: dict[str, Any] = {
            "n_rows": len(x), "against": "targets" if targets is not None else "topk_reconstruction",
            "fvu_jumprelu": fvu(jr_recon),
            "l0_topk": float((module.encode(x) > 0).sum(1).float().mean()),
            "l0_jumprelu": float((z > 0).sum((1, 2)).float().mean()),
        }
        if targets is not None:
            report["fvu_topk"] = fvu(topk_recon)
        return report
    finally:
        module.train(was_training)


# --------------------------------------------------------------------------------------------------
# Import


def _read_config(path: Path) -> dict[str, Any] | None:
    try:
        data = yaml.safe_load((path / CONFIG_FILE).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _count(path: Path, stem: str, where: str) -> int:
    """Number of ``{stem}{i}.safetensors`` files, which must be numbered ``0..n-1``."""
    found = sorted(int(m.group(1)) for p in path.glob(f"{stem}*.safetensors")
                   if (m := re.fullmatch(rf"{stem}(\d+)\.safetensors", p.name)))
    if not found or found != list(range(len(found))):
        raise UsageError(f"{where}: expected {stem}0.safetensors .. {stem}N.safetensors, found layers {found}")
    return len(found)


def _read_clt(path: Path, where: str) -> dict[str, Any]:
    """Per-layer tensors of a circuit-tracer CLT directory."""
    L = _count(path, "W_enc_", where)
    layers = []
    for i in range(L):
        enc = read_safetensors(path / f"W_enc_{i}.safetensors")
        require_weights(enc, (f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"), f"{where}: W_enc_{i}.safetensors")
        if not (path / f"W_dec_{i}.safetensors").is_file():
            raise UsageError(f"{where}: W_dec_{i}.safetensors is missing")
        dec = read_safetensors(path / f"W_dec_{i}.safetensors")
        require_weights(dec, (f"W_dec_{i}",), f"{where}: W_dec_{i}.safetensors")
        skip = enc.get(f"W_skip_{i}")
        if skip is None and (path / f"W_skip_{i}.safetensors").is_file():
            skip = read_safetensors(path / f"W_skip_{i}.safetensors").get(f"W_skip_{i}")
        layers.append({"W_enc": enc[f"W_enc_{i}"].T, "b_enc": enc[f"b_enc_{i}"], "b_dec": enc[f"b_dec_{i}"],
                       "threshold": enc.get(f"threshold_{i}"), "W_skip": skip, "W_dec": dec[f"W_dec_{i}"]})
    F_, d = layers[0]["W_enc"].shape[1], layers[0]["W_enc"].shape[0]
    for i, t in enumerate(layers):
        if tuple(t["W_dec"].shape) != (F_, L - i, d):
            raise UsageError(f"{where}: W_dec_{i} has shape {list(t['W_dec'].shape)}, expected {[F_, L - i, d]}")
    return {"layers": layers, "F": F_, "d": d, "cross": True}


def _read_set(path: Path, where: str) -> dict[str, Any]:
    """Per-layer tensors of a circuit-tracer transcoder-set directory."""
    L = _count(path, "layer_", where)
    layers = []
    for i in range(L):
        w = read_safetensors(path / f"layer_{i}.safetensors")
        require_weights(w, ("W_enc", "W_dec", "b_enc", "b_dec"), f"{where}: layer_{i}.safetensors")
        skip = w.get("W_skip")
        layers.append({"W_enc": w["W_enc"].T, "b_enc": w["b_enc"], "b_dec": w["b_dec"],
                       "threshold": w.get("activation_function.threshold"),
                       "W_skip": skip.T if skip is not None else None, "W_dec": w["W_dec"][:, None]})
    F_, d = layers[0]["W_enc"].shape[1], layers[0]["W_enc"].shape[0]
    return {"layers": layers, "F": F_, "d": d, "cross": False}


def _all_zero(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or not bool(t.any()) for t in tensors)


def _kept_layers(data: dict[str, Any], cfg: dict[str, Any]) -> list[int]:
    """The layers to load: saelab's recorded subset when every other layer is zero padding, else all."""
    layers = data["layers"]
    L = len(layers)
    meta = cfg.get("saelab") if isinstance(cfg.get("saelab"), dict) else {}
    subset = meta.get("layers") if isinstance(meta, dict) else None
    if not (isinstance(subset, list) and subset and all(isinstance(v, int) for v in subset)
            and subset == sorted(set(subset)) and 0 <= subset[0] and subset[-1] < L):
        return list(range(L))
    kept = set(subset)
    for j, t in enumerate(layers):
        dropped = [t["W_dec"][:, s] for s in range(t["W_dec"].shape[1]) if data["cross"] and j + s not in kept]
        if j not in kept and not _all_zero(t["W_enc"], t["b_enc"], t["b_dec"], t["W_dec"], t["W_skip"]):
            return list(range(L))
        if j in kept and not _all_zero(*dropped):
            return list(range(L))
    return list(subset)


class CircuitTracerFormat(DictionaryFormat):
    """circuit-tracer directories: config.yaml + per-layer safetensors (CLTs and transcoder sets)."""

    name = "circuit_tracer"
    aliases = ("circuit-tracer",)

    @classmethod
    def hookpoint_from_external(cls, name: str) -> str | None:
        """circuit-tracer's MLP wrapper hooks ``blocks.N.mlp.hook_in`` / ``blocks.N.mlp.hook_out``."""
        m = _BLOCK_HOOK_RE.match(name.strip())
        if m is None:
            return None
        return f"layers.{m.group(1)}.mlp" + (".input" if m.group(2) == "mlp.hook_in" else "")

    @classmethod
    def detect(cls, path: Path) -> bool:
        """A directory whose config.yaml says ``model_kind: cross_layer_transcoder`` or ``transcoder_set``."""
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            return False
        cfg = _read_config(path)
        return cfg is not None and cfg.get("model_kind") in (CLT_KIND, SET_KIND)

    def load(self, path: Path, device: str | torch.device = "cpu") -> SparseDictionary:
        """Load a circuit-tracer CLT or transcoder set into saelab's ``clt`` / ``transcoder_set``."""
        path = Path(path)
        require_format_dir(self.detect(path), path, "circuit-tracer",
                           f"{CONFIG_FILE} with model_kind {CLT_KIND} or {SET_KIND}")
        cfg = _read_config(path) or {}
        where = f"circuit-tracer dictionary {str(path)!r}"
        kind = cfg["model_kind"]
        hook_in = str(cfg.get("feature_input_hook", "hook_resid_mid"))
        hook_out = str(cfg.get("feature_output_hook", "hook_mlp_out"))
        if hook_in not in _READ_INPUT:
            raise UsageError(f"{where}: feature_input_hook {hook_in!r} is not supported; supported: "
                             f"{', '.join(_READ_INPUT)}")
        if hook_out not in _READ_OUTPUT:
            raise UsageError(f"{where}: feature_output_hook {hook_out!r} is not supported; supported: "
                             f"{', '.join(_READ_OUTPUT)}")
        data = _read_clt(path, where) if kind == CLT_KIND else _read_set(path, where)
        layers, F_, d = data["layers"], data["F"], data["d"]
        has_thr = [t["threshold"] is not None for t in layers]
        has_skip = [t["W_skip"] is not None for t in layers]
        if len(set(has_thr)) > 1 or len(set(has_skip)) > 1:
            raise UsageError(f"{where}: thresholds and skip weights must be in every layer's file or in none")
        kept = _kept_layers(data, cfg)
        site = _READ_INPUT[hook_in]
        sites = {"inputs": [f"layers.{j}.{site}" for j in kept], "outputs": [f"layers.{j}.mlp" for j in kept],
                 "d_in": d, "d_out": d}
        architecture = "clt" if data["cross"] or "transcoder_set" not in registry("architecture") else "transcoder_set"
        options: dict[str, Any] = {"d_sae": F_, "activation": "jumprelu" if has_thr[0] else "relu",
                                   "skip_connection": has_skip[0], "input_site": site}
        module = build_dictionary(architecture, sites, options)
        tensors: dict[str, torch.Tensor] = {
            "W_enc": torch.stack([layers[j]["W_enc"] for j in kept]),
            "b_enc": torch.stack([layers[j]["b_enc"] for j in kept]),
            "b_dec": torch.stack([layers[j]["b_dec"] for j in kept])}
        for a, j in enumerate(kept):
            W = layers[j]["W_dec"]
            n_targets = module.decoder(a).shape[1]
            if data["cross"]:
                block = torch.stack([W[:, kept[a + t] - j] for t in range(len(kept) - a)], dim=1)
                if n_targets == 1 and bool(block[:, 1:].any()):
                    raise UsageError(f"{where}: layer {j} writes to later layers; saelab's transcoder_set cannot")
                tensors[f"W_dec_{a}"] = block[:, :n_targets]
            else:
                block = torch.zeros(F_, n_targets, d)
                block[:, 0] = W[:, 0]
                tensors[f"W_dec_{a}"] = block
        if has_skip[0]:
            tensors["W_skip"] = torch.stack([layers[j]["W_skip"] for j in kept])
        if has_thr[0]:
            theta = torch.stack([layers[j]["threshold"].reshape(-1) for j in kept])
            if float(theta.min()) < 0:
                raise UsageError(f"{where}: it has negative JumpReLU thresholds (min {float(theta.min()):.3g}); "
                                 f"saelab's JumpReLU thresholds are >= 0")
            tensors["log_threshold"] = theta.log()
        assign_weights(module, tensors, where)
        module.extra_config.update({"source_format": self.name, "source_path": str(path),
                                    "circuit_tracer_config": {k: v for k, v in cfg.items() if k != "saelab"}})
        if cfg.get("model_name"):
            module.extra_config["model"] = str(cfg["model_name"])
        return module.to(device).eval()

    def save(self, dictionary: SparseDictionary, path: Path) -> None:
        """Export a ``clt`` or ``transcoder_set`` (see :func:`export_circuit_tracer`); a TopK-family one needs
        an activation sample and is refused here."""
        export_circuit_tracer(dictionary, path)


@hookimpl
def register_dictionary_formats(register):
    """Register the ``circuit_tracer`` format."""
    register(CircuitTracerFormat)
