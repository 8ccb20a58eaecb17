"""The ``dictionary-learning`` format: science-of-finetuning dictionary_learning / crosscoder_learning crosscoders
(``CrossCoder``, ``BatchTopKCrossCoder``) in their three layouts, written here to their documented names, shapes
and dtypes (``torch.save`` state dicts, their trainer's output directory, ``model.safetensors`` + ``config.json``
as ``PyTorchModelHubMixin.save_pretrained`` writes it), loaded through the registry the CLI uses and compared
with a reference forward written from their formulas (``dictionary_learning/dictionary.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from saelab import UsageError
from saelab.dictionary import detect_format, load_dictionary, save_dictionary
from saelab.formats import dictionaries_by_hookpoint, find_dictionaries, hookpoint_from_external
from saelab.plugins.formats.dictionary_learning import load_dictionary_learning
from safetensors.torch import save_file

D, F, BATCH, K = 8, 32, 64, 4
ATOL = 1e-5
CODE_IDS = {"CROSSCODER": 1, "SAE": 2, "MIXED": 3, "NONE": 4, "DECOUPLED": 5}

# --------------------------------------------------------------------------------------------------
# Fixture writers: their state-dict keys, shapes and dtypes (CrossCoder registers NormalizableMixin's buffers,
# then encoder.weight/bias, decoder.bias/weight, code_normalization_id; BatchTopKCrossCoder adds k, threshold)


def their_state(n_sites: int = 2, *, batch_topk: bool = False, code_norm: str | None = "CROSSCODER",
                threshold: float | list[float] = -1.0, normaliser: bool = False, n_enc: int | None = None,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict as ``CrossCoder(...).state_dict()`` / ``BatchTopKCrossCoder`` holds it, random weights."""
    g = torch.Generator().manual_seed(seed)
    n_enc = n_sites if n_enc is None else n_enc
    state: dict[str, torch.Tensor] = {"target_rms": torch.tensor(1.0)}
    if normaliser:
        mean = torch.randn(n_sites, D, generator=g) * 0.5
        std = torch.rand(n_sites, D, generator=g) + 0.5
        state |= {"activation_mean": mean, "activation_std": std,
                  "activation_global_scale": 1.0 / torch.sqrt((std ** 2).sum(-1) + 1e-8)}
    else:
        state |= {"activation_mean": torch.full((n_sites, D), float("nan")),
                  "activation_std": torch.full((n_sites, D), float("nan")),
                  "activation_global_scale": torch.ones(n_sites)}
    state |= {"encoder.weight": torch.randn(n_enc, D, F, generator=g) * 0.4,
              "encoder.bias": torch.randn(F, generator=g) * 0.1,
              "decoder.bias": torch.randn(n_sites, D, generator=g) * 0.1,
              "decoder.weight": torch.randn(n_sites, F, D, generator=g) * 0.3}
    if code_norm is not None:
        state["code_normalization_id"] = torch.tensor(CODE_IDS[code_norm])
    if batch_topk:
        state |= {"k": torch.tensor(K, dtype=torch.int32), "threshold": torch.tensor(threshold, dtype=torch.float32)}
    return state


def hub_config(state: dict[str, torch.Tensor], *, batch_topk: bool, code_norm: str = "CROSSCODER",
               k: int = 100, **extra: Any) -> dict[str, Any]:
    """``config.json`` as ``save_pretrained`` writes it: the constructor's JSON-able defaults and passed values
    (a tensor ``k`` is not JSON-able, so the default 100 stays), with crosscoder_learning's ``dict_class``."""
    n_sites, F_, d = state["decoder.weight"].shape
    cfg: dict[str, Any] = {"activation_dim": d, "activation_mean": None, "activation_std": None,
                           "code_normalization": code_norm, "dict_size": F_, "num_layers": n_sites}
    if batch_topk:
        cfg |= {"dict_class": "BatchTopKCrossCoder", "k": k, "norm_init_scale": 1.0, "target_rms": 1.0}
    else:
        cfg |= {"code_normalization_alpha_cc": 0.1, "code_normalization_alpha_sae": 1.0, "dict_class": "CrossCoder",
                "encoder_layers": None, "init_with_transpose": True, "latent_processor": None,
                "norm_init_scale": None, "num_decoder_layers": None, "same_init_for_all_layers": False,
                "target_rms": None}
    return cfg | extra


def write_state_dict(path: Path, state: dict[str, torch.Tensor], compiled: bool = False) -> Path:
    """``torch.save(model.state_dict(), path)`` (keys prefixed ``_orig_mod.`` under ``torch.compile``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({(f"_orig_mod.{k}" if compiled else k): v for k, v in state.items()}, path)
    return path


def write_trainer_dir(path: Path, state: dict[str, torch.Tensor], batch_topk: bool,
                      code_norm: str = "CROSSCODER") -> Path:
    """Their ``trainSAE`` save_dir: ``config.json`` (``{"trainer": ..., "buffer": ...}``), ``model_final.pt``
    and a checkpoint."""
    trainer = {"trainer_class": "BatchTopKCrossCoderTrainer" if batch_topk else "CrossCoderTrainer",
               "dict_class": "BatchTopKCrossCoder" if batch_topk else "CrossCoder",
               "activation_dim": D, "dict_size": F, "lr": 1e-4, "layer": 13, "lm_name": "gemma-2-2b-it-gemma-2-2b",
               "submodule_name": "layer_13_out", "code_normalization": code_norm,
               "dict_class_kwargs": {"same_init_for_all_layers": "False", "encoder_layers": "None"}}
    if batch_topk:
        trainer |= {"k": K, "threshold_beta": 0.999, "threshold_start_step": 1000}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"ctx_len": 1024}}, indent=4))
    write_state_dict(path / "checkpoint_1000.pt", state)
    return write_state_dict(path / "model_final.pt", state).parent


def write_hub(path: Path, state: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """``save_pretrained``: ``model.safetensors`` (the state dict) + ``config.json``."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return path


# --------------------------------------------------------------------------------------------------
# Reference: their CrossCoder / BatchTopKCrossCoder forward


def code_normalization(state: dict[str, torch.Tensor], code_norm: str) -> torch.Tensor:
    """``get_code_normalization`` ``[F]``: CROSSCODER sum of the sites' decoder norms, SAE the norm over sites
    and width, NONE 1."""
    dw = state["decoder.weight"]
    if code_norm == "CROSSCODER":
        return dw.norm(dim=2).sum(0)
    if code_norm == "SAE":
        return dw.norm(dim=(0, 2))
    return torch.ones(dw.shape[1])


def reference(state: dict[str, torch.Tensor], x: torch.Tensor, code_norm: str = "CROSSCODER",
              use_threshold: bool = True, encoder_layers: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f [B, F], x_hat [B, L, d])`` of their ``encode`` / ``forward`` on raw activations ``x``."""
    mean, std, scale = state["activation_mean"], state["activation_std"], state["activation_global_scale"]
    normalise = not (bool(mean.isnan().any()) or bool(std.isnan().any()))
    if normalise:
        x = (x - mean) * scale[None, :, None]
    xe = x if encoder_layers is None else x[:, encoder_layers]
    f = torch.relu(torch.einsum("bld,ldf->bf", xe, state["encoder.weight"]) + state["encoder.bias"])
    if "threshold" in state:
        scaled = f * code_normalization(state, code_norm)
        if use_threshold:
            f = f * (scaled > state["threshold"])
        else:
            top = scaled.flatten().topk(int(state["k"]) * len(x), sorted=False).indices
            f = torch.zeros_like(f).flatten().scatter_(-1, top, f.flatten()[top]).reshape(f.shape)
    x_hat = torch.einsum("bf,lfd->bld", f, state["decoder.weight"]) + state["decoder.bias"]
    if normalise:
        x_hat = x_hat / (scale[None, :, None] + 1e-8) + mean
    return f, x_hat


def inputs(n_sites: int = 2, n: int = BATCH, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, n_sites, D, generator=torch.Generator().manual_seed(seed)) * 1.5


def set_threshold(state: dict[str, torch.Tensor], x: torch.Tensor, code_norm: str) -> None:
    """A threshold that keeps about half of the firing latents, in the widest gap near the median of the
    norm-weighted activations (no value within float error of it)."""
    probe = dict(state, threshold=torch.tensor(-1.0))
    f, _ = reference(probe, x, code_norm)
    scaled = (f * code_normalization(state, code_norm)).flatten()
    values = scaled[scaled > 0].sort().values
    mid = len(values) // 2
    window = values[mid - 20: mid + 20]
    gap = int((window[1:] - window[:-1]).argmax())
    state["threshold"] = ((window[gap] + window[gap + 1]) / 2).reshape(())


def assert_matches(module: torch.nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor, code_norm: str,
                   **kwargs: Any) -> None:
    f_ref, x_hat_ref = reference(state, x, code_norm, **kwargs)
    assert (f_ref > 0).any() and (f_ref == 0).any()
    with torch.no_grad():
        f = module.encode(x)
        torch.testing.assert_close(f, f_ref, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(module.decode(f_ref), x_hat_ref, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(module(x).reconstruction, x_hat_ref, atol=ATOL, rtol=1e-5)


def one_line_error(excinfo: pytest.ExceptionInfo[UsageError], *words: str) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and all(w in text for w in words), text
    return text


# --------------------------------------------------------------------------------------------------
# Tests

KINDS = [("relu", "CROSSCODER"), ("relu", "SAE"), ("batchtopk", "CROSSCODER"), ("batchtopk", "SAE"),
         ("batchtopk", "NONE")]
LAYOUTS = ["state_dict", "compiled_state_dict", "trainer_dir", "hub"]


def write(layout: str, tmp_path: Path, state: dict[str, torch.Tensor], batch_topk: bool, code_norm: str) -> Path:
    if layout == "state_dict":
        return write_state_dict(tmp_path / "ae.pt", state)
    if layout == "compiled_state_dict":
        return write_state_dict(tmp_path / "checkpoint_5000.pt", state, compiled=True)
    if layout == "trainer_dir":
        return write_trainer_dir(tmp_path / "run", state, batch_topk, code_norm)
    return write_hub(tmp_path / "hub", state, hub_config(state, batch_topk=batch_topk, code_norm=code_norm))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("activation", "code_norm"), KINDS)
def test_layouts_load_and_match_their_forward(layout: str, activation: str, code_norm: str, tmp_path: Path) -> None:
    batch_topk = activation == "batchtopk"
    x = inputs()
    state = their_state(batch_topk=batch_topk, code_norm=code_norm, seed=len(code_norm))
    if batch_topk:
        set_threshold(state, x, code_norm)
    path = write(layout, tmp_path, state, batch_topk, code_norm)
    assert detect_format(path) == "dictionary-learning"
    module = load_dictionary(path)
    assert module.name == "crosscoder" and not module.training
    assert module.options.activation == activation
    assert module.options.decoder_norm == {"CROSSCODER": "sum", "SAE": "concat", "NONE": "none"}[code_norm]
    assert module.sites.inputs == module.sites.outputs == ["site.0", "site.1"]
    assert (module.sites.d_in, module.d_sae) == (D, F)
    if batch_topk:
        assert module.options.k == K
        assert float(module.threshold) == pytest.approx(float(state["threshold"]))
        assert int(module.threshold_updates) == 20  # estimated: training goes on with momentum 0.05
    torch.testing.assert_close(module.gating_norms().float(), code_normalization(state, code_norm), atol=1e-5,
                               rtol=1e-5)
    assert_matches(module, state, x, code_norm)


@pytest.mark.parametrize("activation", ["relu", "batchtopk"])
def test_activation_normalisation_is_folded(activation: str, tmp_path: Path) -> None:
    """Their mean / global-scale normalisation reads raw activations after loading; decoder norms and the
    threshold stay in their (normalised) units."""
    batch_topk = activation == "batchtopk"
    x = inputs(3) * 4 + 2
    state = their_state(3, batch_topk=batch_topk, code_norm="SAE", normaliser=True)
    if batch_topk:
        set_threshold(state, x, "SAE")
    path = write_hub(tmp_path / "hub", state, hub_config(state, batch_topk=batch_topk, code_norm="SAE"))
    module = load_dictionary(path)
    assert_matches(module, state, x, "SAE")
    torch.testing.assert_close(module.gating_norms().float(), code_normalization(state, "SAE"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(module.site_decoder_norms().float(), state["decoder.weight"].norm(dim=2).T,
                               atol=1e-5, rtol=1e-5)


def test_hub_config_decides_code_normalisation_and_weights_decide_k(tmp_path: Path) -> None:
    """As their hub loader: the constructor runs with config.json (code_normalization by name, the default
    k=100 a tensor k leaves there), then the weights (k, threshold, the id buffer) are loaded over it."""
    x = inputs()
    state = their_state(batch_topk=True, code_norm="CROSSCODER")
    set_threshold(state, x, "NONE")
    path = write_hub(tmp_path / "hub", state, hub_config(state, batch_topk=True, code_norm="NONE", k=100))
    module = load_dictionary(path)
    assert (module.options.decoder_norm, module.options.k) == ("none", K)
    assert_matches(module, state, x, "NONE")


def test_legacy_torch_save_is_read(tmp_path: Path) -> None:
    """A state dict written without the zip container (``_use_new_zipfile_serialization=False``)."""
    x = inputs()
    state = their_state(batch_topk=True, code_norm="SAE")
    set_threshold(state, x, "SAE")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert_matches(load_dictionary(tmp_path / "legacy.pt"), state, x, "SAE")


def test_missing_code_normalisation_id_is_crosscoder(tmp_path: Path) -> None:
    x = inputs()
    state = their_state(batch_topk=True, code_norm=None)
    set_threshold(state, x, "CROSSCODER")
    module = load_dictionary(write_state_dict(tmp_path / "old.pt", state))
    assert module.options.decoder_norm == "sum"
    assert_matches(module, state, x, "CROSSCODER")


def test_relu_decoupled_loads_as_sum(tmp_path: Path) -> None:
    """A ReLU CrossCoder's forward ignores the normalisation; DECOUPLED sums its per-site norms (their
    ``get_activations`` and penalty), which is saelab's ``sum``."""
    state = their_state(code_norm="DECOUPLED")
    module = load_dictionary(write_state_dict(tmp_path / "ae.pt", state))
    assert module.options.decoder_norm == "sum" and module.extra_config["code_normalization"] == "DECOUPLED"
    assert_matches(module, state, inputs(), "CROSSCODER")


def test_encoder_layers_subset(tmp_path: Path) -> None:
    """``encoder_layers=[2, 0]``: the encoder reads sites 2 and 0 of 3, the decoder writes all three."""
    x = inputs(3)
    state = their_state(3, n_enc=2)
    path = write_hub(tmp_path / "hub", state, hub_config(state, batch_topk=False, encoder_layers=[2, 0],
                                                                    init_with_transpose=False))
    module = load_dictionary(path)
    assert_matches(module, state, x, "CROSSCODER", encoder_layers=[2, 0])
    assert float(module.W_enc[1].detach().abs().max()) == 0.0
    with pytest.raises(UsageError) as excinfo:
        load_dictionary(write_state_dict(tmp_path / "subset.pt", state))
    one_line_error(excinfo, "encoder_layers", "2 sites", "3")


def test_unestimated_threshold_selects_batch_top_k(tmp_path: Path) -> None:
    """threshold -1 (never estimated): saelab selects the batch top k*B (their ``use_threshold=False``)."""
    x = inputs()
    state = their_state(batch_topk=True, code_norm="SAE", threshold=-1.0)
    module = load_dictionary(write_state_dict(tmp_path / "early.pt", state))
    assert float(module.threshold) < 0
    f_ref, x_hat_ref = reference(state, x, "SAE", use_threshold=False)
    with torch.no_grad():
        torch.testing.assert_close(module.encode(x), f_ref, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(module(x).reconstruction, x_hat_ref, atol=ATOL, rtol=1e-5)


def test_sites_given_and_discovery(tmp_path: Path) -> None:
    state = their_state(batch_topk=True, code_norm="SAE", threshold=0.5)
    run = write_trainer_dir(tmp_path / "runs" / "L13", state, batch_topk=True, code_norm="SAE")
    hub = write_hub(tmp_path / "runs" / "hub", state, hub_config(state, batch_topk=True, code_norm="SAE"))
    assert find_dictionaries(tmp_path / "runs") == [run, hub]
    assert find_dictionaries(run) == [run]
    module = load_dictionary_learning(run, sites=["layer_3_out", "layers.4"])
    assert module.sites.inputs == module.sites.outputs == ["layers.3", "layers.4"]
    assert module.extra_config["dictionary_learning_cfg"]["lm_name"] == "gemma-2-2b-it-gemma-2-2b"
    assert hookpoint_from_external("layer_13_out") == "layers.13"
    with pytest.raises(UsageError) as excinfo:
        dictionaries_by_hookpoint(run)
    one_line_error(excinfo, "--hookpoints")
    with pytest.raises(UsageError) as excinfo:
        load_dictionary_learning(run, sites=["layers.3"])
    one_line_error(excinfo, "2 sites")


def test_saelab_format_round_trip(tmp_path: Path) -> None:
    """A loaded crosscoder (normalisation folded, threshold set) saved in saelab's format reloads equal."""
    x = inputs()
    state = their_state(batch_topk=True, code_norm="CROSSCODER", normaliser=True)
    set_threshold(state, x, "CROSSCODER")
    module = load_dictionary(write_state_dict(tmp_path / "ae.pt", state))
    again = load_dictionary(save_dictionary(module, tmp_path / "saelab"))
    assert again.name == "crosscoder"
    assert_matches(again, state, x, "CROSSCODER")


def test_convert_cli_reads_a_bare_state_dict(cli, tmp_path: Path) -> None:
    """``saelab convert ae.pt OUT --to saelab``: a single ``.pt`` file is a dictionary path too."""
    x = inputs()
    state = their_state(batch_topk=True, code_norm="SAE", threshold=0.5)
    path = write_state_dict(tmp_path / "ae.pt", state)
    assert find_dictionaries(path) == [path]
    result = cli("convert", str(path), str(tmp_path / "as_saelab"), "--to", "saelab")
    assert result.exit_code == 0, result.output
    assert_matches(load_dictionary(tmp_path / "as_saelab"), state, x, "SAE")


@pytest.mark.parametrize(("activation", "code_norm"), [("relu", "MIXED"), ("batchtopk", "MIXED"),
                                                       ("batchtopk", "DECOUPLED")])
def test_unsupported_code_normalisation_is_one_line_error(activation: str, code_norm: str, tmp_path: Path) -> None:
    batch_topk = activation == "batchtopk"
    state = their_state(batch_topk=batch_topk, code_norm=code_norm,
                        threshold=[0.1, 0.2] if code_norm == "DECOUPLED" else 0.1)
    with pytest.raises(UsageError) as excinfo:
        load_dictionary(write_state_dict(tmp_path / "ae.pt", state))
    one_line_error(excinfo, code_norm, "supported", "CROSSCODER", "SAE", "NONE")


def test_bad_files_are_one_line_errors(tmp_path: Path) -> None:
    good = their_state(batch_topk=True, threshold=0.2)
    # a corrupt .pt and a truncated one
    (tmp_path / "junk.pt").write_bytes(b"not a torch file" * 10)
    with pytest.raises(UsageError) as excinfo:
        load_dictionary(tmp_path / "junk.pt")
    one_line_error(excinfo, "junk.pt", "corrupt")
    whole = write_state_dict(tmp_path / "whole.pt", good).read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UsageError) as excinfo:
        load_dictionary(tmp_path / "cut.pt")
    one_line_error(excinfo, "cut.pt")
    # a corrupt model.safetensors beside a crosscoder config.json
    hub = write_hub(tmp_path / "hub", good, hub_config(good, batch_topk=True))
    (hub / "model.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(UsageError) as excinfo:
        load_dictionary(hub)
    one_line_error(excinfo, "model.safetensors", "corrupt")
    # a missing weight, a SAE's 2-D weights, a dict_class mismatch, a k without a threshold
    cases = {"nobias.pt": ({k: v for k, v in good.items() if k != "decoder.bias"}, ("decoder.bias",)),
             "sae.pt": ({"encoder.weight": torch.zeros(F, D), "encoder.bias": torch.zeros(F),
                         "decoder.weight": torch.zeros(D, F), "bias": torch.zeros(D)}, ("decoder.bias",)),
             "sae3.pt": ({"encoder.weight": torch.zeros(F, D), "encoder.bias": torch.zeros(F),
                          "decoder.weight": torch.zeros(D, F), "decoder.bias": torch.zeros(D)}, ("crosscoder",)),
             "nothreshold.pt": ({k: v for k, v in good.items() if k != "threshold"}, ("threshold",))}
    for name, (state, words) in cases.items():
        with pytest.raises(UsageError) as excinfo:
            load_dictionary(write_state_dict(tmp_path / name, state))
        one_line_error(excinfo, name, *words)
    relu = their_state()
    hub2 = write_hub(tmp_path / "hub2", relu,
                     hub_config(relu, batch_topk=False) | {"dict_class": "BatchTopKCrossCoder"})
    with pytest.raises(UsageError) as excinfo:
        load_dictionary(hub2)
    one_line_error(excinfo, "dict_class", "BatchTopKCrossCoder")
    # a model directory (model.safetensors + a config.json of another kind) is not claimed
    write_hub(tmp_path / "llama", good, {"model_type": "llama", "num_hidden_layers": 2})
    with pytest.raises(UsageError) as excinfo:
        detect_format(tmp_path / "llama")
    one_line_error(excinfo, "known formats")
    with pytest.raises(UsageError) as excinfo:
        load_dictionary(tmp_path / "llama", format="dictionary-learning")
    one_line_error(excinfo, "config.json", "num_layers")
    # a state dict of something else is not claimed
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(UsageError) as excinfo:
        detect_format(tmp_path / "other.pt")
    one_line_error(excinfo, "known formats")
