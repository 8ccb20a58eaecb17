"""Auto-interpretation of layer-spanning dictionaries (issue 11, item 7): ``saelab latents`` / ``saelab run``
on a cross-layer transcoder trained on the tiny GPT-2. ``--feature_num LAYER:INDEX`` names latent
``LAYER * F + INDEX``; a record's examples are that latent's activations (its encoder reads its own layer);
its record and report page carry its decoder norm to each layer and its top logits through the decoder
blocks summed over the layers it writes to."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from saelab import SiteSpec, UsageError
from saelab.dictionary import build_dictionary, load_dictionary
from saelab.examples import resolve_feature_num
from saelab.latents import LatentCache, latent_layers
from saelab.records import LatentRecord
from test_clt import clt_args

F = 32
"""Latents per layer of the CLT ``clt_args`` trains (``-o d_sae 32``)."""
LATENT = F + 3
"""``--feature_num 1:3``."""
ENV = {"OPENAI_API_KEY": "sk-test", "HF_TOKEN": None}


def latents_args(dictionary: Path, name: str, *extra: str) -> list[str]:
    from fixtures.tiny_models import TINY_GPT2

    return [str(TINY_GPT2), str(dictionary), "--name", name, "--dataset_repo", "news-sample", "--dataset_split",
            "train", "--n_tokens", "2048", "--cache_ctx_len", "64", "--batch_size", "8", "--n_splits", "2",
            "--min_examples", "4", "--n_examples_train", "3", "--n_examples_test", "2", "--n_non_activating", "2",
            "--example_ctx_len", "16", "--verbose", "false", *extra]


def test_feature_num_layer_index_forms() -> None:
    clt = build_dictionary("clt", SiteSpec(["layers.0.mlp.input", "layers.1.mlp.input", "layers.2.mlp.input"],
                                           ["layers.0.mlp", "layers.1.mlp", "layers.2.mlp"], 8, 8), {"d_sae": 5})
    layers = latent_layers(clt)
    assert layers == (3, 5)
    assert resolve_feature_num(["1:3", 7, "2:0", "0:4", "14"], clt.d_sae, layers) == [8, 7, 10, 4, 14]
    assert resolve_feature_num(None, 15, layers) is None
    for bad, words in (("3:0", ["3:0", "LAYER 0..2", "INDEX 0..4"]), ("1:5", ["1:5", "INDEX 0..4"]),
                       ("15", ["15", "0..14"]), ("a:b", ["'a:b'", "LAYER:INDEX"]), ("-1", ["-1", "0..14"])):
        with pytest.raises(UsageError) as err:
            resolve_feature_num([bad], clt.d_sae, layers)
        message = str(err.value)
        assert "\n" not in message and all(w in message for w in words), message
    plain = build_dictionary("topk", SiteSpec(["layers.0"], ["layers.0"], 8, 8), {"d_sae": 16, "k": 2})
    assert latent_layers(plain) is None
    assert resolve_feature_num(["3", 4], 16, latent_layers(plain)) == [3, 4]
    with pytest.raises(UsageError, match="LAYER:INDEX needs a dictionary whose latents belong to layers"):
        resolve_feature_num(["0:3"], 16, None)


def test_output_directions_and_norms_match_the_decoder_blocks() -> None:
    """The CLT's own methods equal the generic definition on the dense ``[L * F, L * d]`` decoder."""
    torch.manual_seed(0)
    L, n, d = 3, 4, 6
    clt = build_dictionary("clt", SiteSpec([f"layers.{i}.mlp.input" for i in range(L)],
                                           [f"layers.{i}.mlp" for i in range(L)], d, d), {"d_sae": n})
    dense = torch.zeros(L * n, L, d)
    for i in range(L):
        dense[i * n:(i + 1) * n, i:] = clt.decoder(i).detach()
    torch.testing.assert_close(clt.decoder_norms_by_output(), dense.norm(dim=-1))
    torch.testing.assert_close(clt.output_directions(), dense.sum(1))
    torch.testing.assert_close(clt.output_directions([0, 2]), dense[:, [0, 2]].sum(1))
    # the same code serves a transcoder set (one block per layer, n_targets(i) = 1)
    from saelab.plugins.architectures.clt import CrossLayerTranscoder

    tset = build_dictionary("transcoder_set", clt.sites, {"d_sae": n})
    dense = torch.zeros(L * n, L, d)
    for i in range(L):
        dense[i * n:(i + 1) * n, i] = tset.decoder(i).detach()[:, 0]
    torch.testing.assert_close(CrossLayerTranscoder.decoder_norms_by_output(tset), dense.norm(dim=-1))
    torch.testing.assert_close(CrossLayerTranscoder.output_directions(tset, [1, 2]), dense[:, [1, 2]].sum(1))


def test_latents_and_run_on_a_clt(results_dir: Path, cli) -> None:
    from fixtures.tiny_models import TINY_GPT2
    from saelab.models import load_activation_source

    res = cli(clt_args("clt"))  # a CLT over layers 0-1 trained for 3 steps
    assert res.exit_code == 0, res.stderr
    directory = results_dir / "clt" / "dictionaries" / "layers.0-1"
    clt = load_dictionary(directory)
    assert clt.d_sae == 2 * F
    res = cli("latents", *latents_args(directory, "interp", "--feature_num", "1:3"))
    assert res.exit_code == 0, res.stderr
    (latents_dir,) = [m.parent for m in (results_dir / "interp" / "latents").glob("*/manifest.json")]
    hook = latents_dir.name
    record = LatentRecord.load(latents_dir / "records" / f"latent_{LATENT}.json")
    assert record.latent == LATENT and len(record.train) == 3
    # the decoder norms: layer 1's block for a layer-1 latent, zero to layer 0
    expected = clt.decoder(1)[3, 0].detach().norm().item()
    assert list(record.decoder_norms) == ["layers.0.mlp", "layers.1.mlp"]
    assert record.decoder_norms["layers.0.mlp"] == 0.0
    assert record.decoder_norms["layers.1.mlp"] == pytest.approx(expected, rel=1e-5)

    # top logits: the decoder blocks summed over the target layers, through the unembedding
    source = load_activation_source(str(TINY_GPT2))
    W_U = source.unembedding().detach().float()
    k = len(record.top_logits.values)
    top = (clt.decoder(1)[3].detach().sum(0) @ W_U).topk(k)
    torch.testing.assert_close(torch.tensor(record.top_logits.values), top.values, atol=1e-4, rtol=1e-4)
    assert record.top_logits.tokens == [source.tokenizer.decode([i]) for i in top.indices.tolist()]
    cache = LatentCache.open(latents_dir)
    layer0 = (clt.decoder(0)[3].detach().sum(0) @ W_U).topk(k)  # latent 0:3 writes to both layers
    torch.testing.assert_close(cache.arrays()["top_logit_values"][3], layer0.values, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(layer0.values, (clt.decoder(0)[3, 0].detach() @ W_U).topk(k).values)

    # the examples' activations are the latent's values, recomputed from its layer's input site
    tokens = cache.tokens()
    acts = source.activations(tokens[[e.sequence for e in record.train]].long(), clt.sites.inputs)
    x = torch.stack([acts[s] for s in clt.sites.inputs], dim=2)  # [n, ctx, L, d]
    with torch.no_grad():
        z = clt.encode(x.reshape(-1, len(clt.sites.inputs), x.shape[-1]).float()).reshape(*x.shape[:2], -1)
    assert record.train and any(max(e.activations) > 0 for e in record.train)
    for n, example in enumerate(record.train):
        window = z[n, example.start:example.start + len(example.tokens), LATENT].clone()
        window[[p for p in range(len(window)) if example.start + p in cache.exclude_positions]] = 0
        torch.testing.assert_close(torch.tensor(example.activations), window, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # reading layer 0 instead gives other values: the cache encodes the right layer
        swapped = clt.encode(x.flip(2).reshape(-1, 2, x.shape[-1]).float()).reshape(*x.shape[:2], -1)
    assert not torch.allclose(swapped[..., LATENT], z[..., LATENT])

    bad = cli("latents", *latents_args(directory, "interp", "--feature_num", "2:0"))
    bad.assert_user_error("--feature_num 2:0", "LAYER 0..1", f"INDEX 0..{F - 1}", f"0..{2 * F - 1}")

    # saelab run (dry run: no LLM call) reuses the latent cache; the report page has the bar chart
    run = cli("run", *latents_args(directory, "interp", "--feature_num", "1:3", "--explainer_provider", "openai",
                                   "--explainer_api_base_url", "http://127.0.0.1:1/v1", "--dry_run"), env=ENV)
    assert run.exit_code == 0, run.stderr
    index = json.loads((results_dir / "interp" / "records" / hook / "index.json").read_text())
    assert [int(i) for i in index["latents"]] == [LATENT], index
    stored = LatentRecord.load(results_dir / "interp" / "records" / hook / f"latent_{LATENT}.json")
    assert stored.decoder_norms == record.decoder_norms
    # explain / score over the run take LAYER:INDEX too (the layers come from the records and the latent cache)
    explain = cli("explain", "interp", "--feature_num", "1:3", "--dry_run", env=ENV)
    assert explain.exit_code == 0, explain.stderr
    assert "total: 1 LLM calls" in explain.stdout, explain.stdout
    other = cli("explain", "interp", "--feature_num", "0:3", "--dry_run", env=ENV)  # latent 3: no record
    assert other.exit_code == 0 and "total: 0 LLM calls" in other.stdout, other.stdout
    cli("explain", "interp", "--feature_num", "1:40", "--dry_run", env=ENV).assert_user_error(
        "--feature_num 1:40", f"INDEX 0..{F - 1}")
    assert cli("report", "interp").exit_code == 0
    page = next((results_dir / "interp" / "report").rglob(f"latent_{LATENT}.html")).read_text()
    chart = re.search(r'<section id="decoder-norms">.*?</section>', page, re.S)
    assert chart is not None and "<svg" in chart.group(0)
    assert chart.group(0).count('<rect class="bar"') == 2 and "layers.1.mlp: " in chart.group(0)
