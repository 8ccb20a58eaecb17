"""The ``circuit_tracer`` dictionary format against the real circuit-tracer 0.5.0 (installed with
``--no-deps`` by ``make test``): saelab's export loaded by circuit-tracer's own loaders computes the same
latents and reconstructions as saelab (CLTs with JumpReLU, ReLU and BatchTopK, with and without skip
connections, a layer subset padded with zero layers, transcoder sets); files written by circuit-tracer's
own ``to_safetensors`` load into saelab and match the same way; TopK CLTs are refused without an
activation sample and exported with estimated thresholds with one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from saelab import UsageError
from saelab.dictionary import build_dictionary, detect_format, load_dictionary, save_dictionary
from saelab.formats import hookpoint_from_external
from saelab.plugins.formats.circuit_tracer import estimate_thresholds, export_circuit_tracer
from safetensors.torch import load_file

ct_clt = pytest.importorskip("circuit_tracer.transcoder.cross_layer_transcoder",
                             reason="circuit-tracer 0.5.0 is not installed (make test installs it with --no-deps)")
ct_slt = pytest.importorskip("circuit_tracer.transcoder.single_layer_transcoder")
ct_act = pytest.importorskip("circuit_tracer.transcoder.activation_functions")

D, F, BATCH = 8, 16, 32
ATOL = 1e-5
CPU = torch.device("cpu")


def ct_cache_loader():
    """circuit-tracer's loader of a local directory (``config.yaml`` + weights): its
    ``load_transcoders_from_cache``. circuit-tracer 0.5.0 pins huggingface_hub < 1.0 and imports a constant
    that huggingface_hub 1.x removed; it only selects a download mode, so it is defined when missing."""
    import huggingface_hub.constants as hub_constants

    if not hasattr(hub_constants, "HF_HUB_ENABLE_HF_TRANSFER"):
        hub_constants.HF_HUB_ENABLE_HF_TRANSFER = False
    from circuit_tracer.utils.caching import load_transcoders_from_cache

    return load_transcoders_from_cache


def load_with_circuit_tracer(path: Path) -> torch.nn.Module:
    """The exported directory loaded by circuit-tracer itself (float32, CPU, lazy decoders for a CLT)."""
    model, _ = ct_cache_loader()(path.name, cache_dir=path.parent, device=CPU, dtype=torch.float32)
    if isinstance(model, ct_clt.CrossLayerTranscoder) and model.W_skip is None:
        # load_clt 0.5.0 does not read W_skip: attach the exported W_skip_{i} as its CrossLayerTranscoder.W_skip
        skips = [load_file(str(path / f"W_enc_{i}.safetensors")).get(f"W_skip_{i}") for i in range(model.n_layers)]
        if all(s is not None for s in skips):
            model.W_skip = torch.nn.Parameter(torch.stack(skips))
    return model


def sites(layers: list[int], site: str = "mlp.input") -> dict[str, object]:
    return {"inputs": [f"layers.{i}.{site}" for i in layers], "outputs": [f"layers.{i}.mlp" for i in layers],
            "d_in": D, "d_out": D}


def make(architecture: str = "clt", layers: tuple[int, ...] = (0, 1, 2), activation: str = "jumprelu",
         skip: bool = False, site: str = "mlp.input", k: int = 4, seed: int = 0) -> torch.nn.Module:
    """A dictionary with random nonzero weights, biases and thresholds (about half the latents fire)."""
    torch.manual_seed(seed)
    module = build_dictionary(architecture, sites(list(layers), site),
                              {"d_sae": F, "activation": activation, "skip_connection": skip, "k": k})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "log_threshold":
                p.copy_((torch.rand(p.shape, generator=g) * 0.6 + 0.05).log())
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.startswith("W_") else 0.1))
        if activation == "batchtopk":
            module.threshold.copy_(torch.linspace(0.1, 0.4, len(layers)))
    return module.eval()


def inputs(n_layers: int, n: int = BATCH, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, n_layers, D, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def saelab_outputs(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents ``[L, batch, F]`` and reconstruction ``[L, batch, d]`` (circuit-tracer's layer-major order)."""
    z = module.encode(x).reshape(len(x), module.n_layers, -1)
    return z.transpose(0, 1), module(x).reconstruction.transpose(0, 1)


@torch.no_grad()
def tracer_outputs(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """circuit-tracer's own encode and decode of inputs ``[L, batch, d]``."""
    features = model.encode(x)
    if isinstance(model, ct_clt.CrossLayerTranscoder):
        recon = model.decode(features.to_sparse(), x if model.W_skip is not None else None)
    else:
        recon = model.decode(features, x)
    return features, recon


def assert_export_matches(module: torch.nn.Module, path: Path, model_layers: list[int]) -> torch.nn.Module:
    """circuit-tracer's load of ``path`` gives saelab's latents and reconstructions at ``model_layers`` and
    nothing (zero latents, zero output) at the padded layers."""
    model = load_with_circuit_tracer(path)
    x = inputs(module.n_layers)
    x_model = torch.zeros(model.n_layers, BATCH, D)
    x_model[model_layers] = x.transpose(0, 1)
    x_model[[i for i in range(model.n_layers) if i not in model_layers]] = torch.randn(
        model.n_layers - len(model_layers), BATCH, D)
    z, recon = saelab_outputs(module, x)
    z_ct, recon_ct = tracer_outputs(model, x_model)
    assert recon_ct.shape == (model.n_layers, BATCH, D)
    assert (z != 0).float().mean() > 0.1, "the check needs active latents"
    torch.testing.assert_close(z_ct[model_layers], z, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(recon_ct[model_layers], recon, atol=ATOL, rtol=1e-5)
    padded = [i for i in range(model.n_layers) if i not in model_layers]
    assert not z_ct[padded].any() and not recon_ct[padded].any()
    return model


# --------------------------------------------------------------------------------------------------
# saelab -> circuit-tracer


@pytest.mark.parametrize(("architecture", "activation", "skip"), [
    ("clt", "jumprelu", False), ("clt", "jumprelu", True), ("clt", "relu", False), ("clt", "relu", True),
    ("clt", "batchtopk", False), ("transcoder_set", "jumprelu", False), ("transcoder_set", "relu", True),
])
def test_export_loads_in_circuit_tracer_with_identical_outputs(architecture: str, activation: str, skip: bool,
                                                               tmp_path: Path) -> None:
    module = make(architecture, (0, 1, 2, 3), activation, skip)
    with pytest.warns(UserWarning, match="W_skip") if skip and architecture == "clt" else _no_warning():
        save_dictionary(module, tmp_path / "ct", format="circuit_tracer")
    cfg = yaml.safe_load((tmp_path / "ct" / "config.yaml").read_text())
    kind = "cross_layer_transcoder" if architecture == "clt" else "transcoder_set"
    assert (cfg["model_kind"], cfg["feature_input_hook"], cfg["feature_output_hook"]) == (
        kind, "mlp.hook_in", "hook_mlp_out")
    if architecture == "clt":
        for i in range(4):
            enc = load_file(str(tmp_path / "ct" / f"W_enc_{i}.safetensors"))
            dec = load_file(str(tmp_path / "ct" / f"W_dec_{i}.safetensors"))
            assert enc[f"W_enc_{i}"].shape == (F, D) and dec[f"W_dec_{i}"].shape == (F, 4 - i, D)
            assert (f"threshold_{i}" in enc) == (activation != "relu") and (f"W_skip_{i}" in enc) == skip
            assert enc[f"W_enc_{i}"].dtype == torch.float32
    else:
        layer = load_file(str(tmp_path / "ct" / "layer_2.safetensors"))
        assert layer["W_enc"].shape == layer["W_dec"].shape == (F, D)
        assert ("activation_function.threshold" in layer) == (activation != "relu") and ("W_skip" in layer) == skip
    model = assert_export_matches(module, tmp_path / "ct", [0, 1, 2, 3])
    expected = ct_clt.CrossLayerTranscoder if architecture == "clt" else ct_slt.TranscoderSet
    assert isinstance(model, expected)
    assert isinstance(model[0].activation_function if architecture != "clt" else model.activation_function,
                      ct_act.JumpReLU) == (activation != "relu")


def test_layer_subset_is_padded_with_zero_layers_and_restored_on_import(tmp_path: Path) -> None:
    module = make("clt", (3, 4, 5), "jumprelu", skip=True, site="resid_mid")
    with pytest.warns(UserWarning, match="W_skip"):
        config = export_circuit_tracer(module, tmp_path / "ct", n_model_layers=8, model_name="toy-model")
    assert config["feature_input_hook"] == "hook_resid_mid" and config["model_name"] == "toy-model"
    assert sorted(p.name for p in (tmp_path / "ct").glob("W_enc_*")) == [f"W_enc_{i}.safetensors" for i in range(8)]
    model = assert_export_matches(module, tmp_path / "ct", [3, 4, 5])
    assert model.n_layers == 8
    back = load_dictionary(tmp_path / "ct")
    assert back.sites.inputs == [f"layers.{i}.resid_mid" for i in (3, 4, 5)]
    assert back.extra_config["model"] == "toy-model"
    x = inputs(3)
    for a, b in zip(saelab_outputs(module, x), saelab_outputs(back, x), strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)
    # without n_model_layers (and no readable model config) it pads up to the last layer
    export_circuit_tracer(make("clt", (3, 4, 5), "relu"), tmp_path / "short")
    assert load_with_circuit_tracer(tmp_path / "short").n_layers == 6


def test_topk_clt_is_refused_without_a_sample(cli, tmp_path: Path) -> None:
    for activation in ("topk", "topk_across_layers"):
        module = make("clt", (0, 1, 2), activation)
        with pytest.raises(UsageError, match="ReLU and JumpReLU only"):
            save_dictionary(module, tmp_path / activation, format="circuit_tracer")
    save_dictionary(make("clt", (0, 1, 2), "topk"), tmp_path / "saelab_topk")
    cli("convert", str(tmp_path / "saelab_topk"), str(tmp_path / "out"), "--to", "circuit_tracer").assert_user_error(
        "circuit-tracer knows ReLU and JumpReLU only", "activations=")


def test_topk_clt_exports_with_estimated_thresholds(tmp_path: Path) -> None:
    module = make("clt", (0, 1, 2), "topk", k=4)
    sample = inputs(3, n=512, seed=7)
    theta = estimate_thresholds(module, sample)
    fired_topk = (module.encode(sample).reshape(512, 3, F) > 0).sum(0)
    pre = torch.einsum("nld,ldf->nlf", sample, module.W_enc.detach()) + module.b_enc.detach()
    fired_jump = (pre > theta).sum(0)
    # each latent fires as often as under TopK (a latent TopK picks with a negative pre-activation is 0 either way)
    assert (theta >= 0).all()
    assert (fired_jump == fired_topk).float().mean() > 0.95
    targets = module(sample).reconstruction.detach() + 0.05 * torch.randn(512, 3, D)
    config = export_circuit_tracer(module, tmp_path / "ct", activations=sample, targets=targets)
    report = config["saelab"]["threshold_estimate"]
    assert report["against"] == "targets" and len(report["fvu_jumprelu"]) == len(report["fvu_topk"]) == 3
    assert abs(report["l0_jumprelu"] - report["l0_topk"]) < 0.1 * report["l0_topk"]
    # what circuit-tracer loads is saelab's JumpReLU import of the same files
    back = load_dictionary(tmp_path / "ct")
    assert back.options.activation == "jumprelu"
    torch.testing.assert_close(back.threshold_values, theta, atol=1e-6, rtol=1e-6)
    assert_export_matches(back, tmp_path / "ct", [0, 1, 2])


# --------------------------------------------------------------------------------------------------
# circuit-tracer -> saelab


def _randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("threshold"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.6 + 0.05)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "W_" in name else 0.1))


def _write_config(path: Path, kind: str, hook_in: str = "hook_resid_mid") -> None:
    """config.yaml as circuit-tracer's save_transcoders_to_cache writes it (hub keys dropped)."""
    (path / "config.yaml").write_text(yaml.dump({"model_kind": kind, "feature_input_hook": hook_in,
                                                 "feature_output_hook": "hook_mlp_out", "scan": "test"}))


@pytest.mark.parametrize("activation", ["jump_relu", "relu"])
def test_clt_saved_by_circuit_tracer_loads_into_saelab(activation: str, tmp_path: Path) -> None:
    L = 4
    model = ct_clt.CrossLayerTranscoder(L, F, D, activation_function=activation, lazy_decoder=False,
                                        device=CPU, dtype=torch.float32)
    _randomise(model, 11)
    model.to_safetensors(str(tmp_path / "ct"))
    _write_config(tmp_path / "ct", "cross_layer_transcoder")
    assert detect_format(tmp_path / "ct") == "circuit_tracer"
    module = load_dictionary(tmp_path / "ct")
    assert module.name == "clt" and module.sites.inputs == [f"layers.{i}.resid_mid" for i in range(L)]
    assert module.options.activation == ("jumprelu" if activation == "jump_relu" else "relu")
    x = inputs(L)
    z_ct, recon_ct = tracer_outputs(model, x.transpose(0, 1).contiguous())
    z, recon = saelab_outputs(module, x)
    torch.testing.assert_close(z, z_ct, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(recon, recon_ct, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize(("activation", "skip"), [("jump_relu", True), ("relu", False)])
def test_transcoder_set_saved_by_circuit_tracer_loads_into_saelab(activation: str, skip: bool, tmp_path: Path) -> None:
    L = 3
    layers = {}
    for i in range(L):
        act = ct_act.JumpReLU(torch.zeros(F), 0.1) if activation == "jump_relu" else torch.nn.functional.relu
        layers[i] = ct_slt.SingleLayerTranscoder(D, F, act, i, skip_connection=skip, device=CPU, dtype=torch.float32)
        _randomise(layers[i], 20 + i)
    model = ct_slt.TranscoderSet(layers, feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out")
    model.to_safetensors(str(tmp_path / "ct"))
    _write_config(tmp_path / "ct", "transcoder_set", hook_in="mlp.hook_in")
    module = load_dictionary(tmp_path / "ct")
    assert module.name == "transcoder_set" and module.sites.inputs == [f"layers.{i}.mlp.input" for i in range(L)]
    assert bool(module.options.skip_connection) == skip
    x = inputs(L)
    z_ct, recon_ct = tracer_outputs(model, x.transpose(0, 1).contiguous())
    z, recon = saelab_outputs(module, x)
    torch.testing.assert_close(z, z_ct, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(recon, recon_ct, atol=ATOL, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Detection, CLI and errors


def test_convert_cli_both_ways_and_hook_names(cli, tmp_path: Path) -> None:
    module = make("clt", (0, 1, 2), "jumprelu")
    save_dictionary(module, tmp_path / "saelab")
    result = cli("convert", str(tmp_path / "saelab"), str(tmp_path / "ct"), "--to", "circuit_tracer")
    assert result.exit_code == 0, result.output
    assert detect_format(tmp_path / "ct") == "circuit_tracer"
    assert_export_matches(module, tmp_path / "ct", [0, 1, 2])
    result = cli("convert", str(tmp_path / "ct"), str(tmp_path / "back"), "--to", "saelab")
    assert result.exit_code == 0, result.output
    back = load_dictionary(tmp_path / "back")
    x = inputs(3)
    for a, b in zip(saelab_outputs(module, x), saelab_outputs(back, x), strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)
    assert hookpoint_from_external("blocks.3.mlp.hook_in") == "layers.3.mlp.input"
    assert hookpoint_from_external("blocks.3.mlp.hook_out") == "layers.3.mlp"


def test_unsupported_inputs_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="exportable architectures: clt, transcoder_set"):
        save_dictionary(build_dictionary("relu", {"inputs": ["layers.0"], "outputs": ["layers.0"], "d_in": D,
                                                  "d_out": D}, {"d_sae": F}), tmp_path / "relu", format="circuit_tracer")
    model = ct_clt.CrossLayerTranscoder(2, F, D, activation_function="jump_relu", lazy_decoder=False, device=CPU,
                                        dtype=torch.float32)
    _randomise(model, 1)
    with torch.no_grad():
        model.activation_function.threshold[0, 0, 0] = -0.5
    model.to_safetensors(str(tmp_path / "neg"))
    _write_config(tmp_path / "neg", "cross_layer_transcoder")
    with pytest.raises(UsageError, match="negative JumpReLU thresholds"):
        load_dictionary(tmp_path / "neg")
    _write_config(tmp_path / "neg", "cross_layer_transcoder", hook_in="hook_resid_pre")
    with pytest.raises(UsageError, match="feature_input_hook 'hook_resid_pre' is not supported"):
        load_dictionary(tmp_path / "neg")


class _no_warning:
    """A context that fails on any UserWarning from the export."""

    def __enter__(self) -> None:
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error", UserWarning)

    def __exit__(self, *exc: object) -> None:
        self._catch.__exit__(*exc)
