"""Auto-interpretation of crosscoder latents over two models: per-model top logits, the diffing class on
records and pages, each example's per-site share of the pre-activation, the relative-norm histogram."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from fixtures.tiny_models import TINY_GPT2
from saelab.data import load_dataset_source
from saelab.dictionary import build_dictionary
from saelab.diffing import decoder_diff
from saelab.examples import build_records
from saelab.interfaces import SiteSpec
from saelab.latents import build_latent_cache, has_site_shares
from saelab.layout import RunLayout, latent_filename
from saelab.models import load_activation_source
from saelab.paired import PairedSource
from saelab.records import LatentRecord
from test_paired_cache import make_variant

SITES = ["layers.1@A", "layers.1@B"]
OPTIONS = {"min_examples": 2, "n_examples_train": 3, "n_examples_test": 2, "n_non_activating": 1,
           "example_ctx_len": 8, "max_latents": 6}


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A random crosscoder over ``layers.1`` of tiny-gpt2 (A) and a perturbed copy (B), its latent cache in a
    run directory and its records there."""
    root = tmp_path_factory.mktemp("xc")
    model_b = make_variant(root / "models" / "tiny-gpt2-b", noise_seed=1)
    source = PairedSource({"A": load_activation_source(str(TINY_GPT2), device="cpu"),
                           "B": load_activation_source(str(model_b), device="cpu")})
    d = source.hookpoint_dim("layers.1@A")
    torch.manual_seed(0)
    module = build_dictionary("crosscoder", SiteSpec(SITES, SITES, d, d), {"d_sae": 16, "activation": "relu"})
    with torch.no_grad():  # spread the relative norms: latent i's B decoder scaled by i / 8
        module.W_dec[1] *= (torch.arange(16, dtype=torch.float32) / 8)[:, None]
        module.b_enc.fill_(0.0)
    module.eval()
    run = RunLayout(root / "run")
    cache = build_latent_cache(source, module, run.latents_dir("layers.1@A"), dataset=load_dataset_source("news-sample"),
                               n_tokens=512, ctx_len=32, n_splits=2, batch_size=8, progress=False)
    out = run.record_dir("layers.1@A")
    out.mkdir(parents=True)
    records, _ = build_records(cache, OPTIONS, tokenizer=source.tokenizer, dictionary=module, out_dir=out)
    return {"source": source, "module": module, "cache": cache, "records": records, "run": run}


def test_shares_are_stored_per_nonzero_and_match_site_preactivations(built):
    source, module, cache = built["source"], built["module"], built["cache"]
    assert has_site_shares(module) and cache.manifest["fingerprint_inputs"]["site_shares"] is True
    assert cache.stats()["logit_models"] == ["A", "B"]
    tokens = cache.tokens()[:4].long()
    acts = source.activations(tokens, SITES)
    x = torch.stack([acts[s].reshape(-1, acts[s].shape[-1]) for s in SITES], dim=1).float()
    with torch.no_grad():
        pre = module.site_preactivations(x)  # [rows, 2, F]
        codes = module.encode(x)
    checked = 0
    for latent in range(module.d_sae):
        fired = cache.latent(latent)
        assert fired.site_share is not None and fired.site_share.shape == (len(fired), 2)
        rows = fired.seq * cache.ctx_len + fired.pos
        keep = fired.seq < 4
        expected = pre[rows[keep], :, latent]
        torch.testing.assert_close(fired.site_share[keep], expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fired.value[keep], codes[rows[keep], latent], rtol=1e-4, atol=1e-5)
        checked += int(keep.sum())
    assert checked > 0


def test_records_hold_top_logits_per_model_through_each_unembedding(built):
    source, module, records = built["source"], built["module"], built["records"]
    assert records
    for record in records:
        assert set(record.top_logits_by_model) == set(record.bottom_logits_by_model) == {"A", "B"}
        for index, label in enumerate(("A", "B")):
            W_U = source.source(label).unembedding().float()
            logits = module.output_directions([index])[record.latent].float() @ W_U
            top = logits.topk(10)
            want = [source.tokenizer.decode([i]) for i in top.indices.tolist()]
            assert record.top_logits_by_model[label].tokens == want
            assert record.top_logits_by_model[label].values == pytest.approx(top.values.tolist(), rel=1e-4)
            bottom = logits.topk(10, largest=False)
            assert record.bottom_logits_by_model[label].values == pytest.approx(bottom.values.tolist(), rel=1e-4)
    # the two models' tables differ (model B's unembedding and decoder are not A's)
    first = records[0]
    assert first.top_logits_by_model["A"].values != first.top_logits_by_model["B"].values


def test_records_hold_the_diffing_class_and_example_shares(built):
    source, module, cache, records = built["source"], built["module"], built["cache"], built["records"]
    diff = decoder_diff(module, [0], [1])
    stats = cache.stats()["diffing"]
    assert stats["a_sites"] == SITES[:1] and stats["b_sites"] == SITES[1:]
    seen_classes = set()
    for record in records:
        i = record.latent
        assert record.diffing["class"] == diff.classes[i] == stats["class"][i]
        assert record.diffing["relative_norm"] == pytest.approx(float(diff.relative[i]), rel=1e-6)
        if math.isnan(float(diff.cosine[i])):  # a zero B decoder (latent 0): no cosine, stored as null
            assert record.diffing["cosine"] is None
        else:
            assert record.diffing["cosine"] == pytest.approx(float(diff.cosine[i]), rel=1e-6, abs=1e-7)
        seen_classes.add(record.diffing["class"])
        for example in record.train + record.test:
            # direct computation: the LM on the example's sequence, the crosscoder's per-site shares at the
            # window's max-activating token
            ids = cache.tokens()[example.sequence:example.sequence + 1].long()
            acts = source.activations(ids, SITES)
            x = torch.stack([acts[s][0] for s in SITES], dim=1).float()
            with torch.no_grad():
                pre = module.site_preactivations(x)[:, :, i]
            peak = example.start + max(range(len(example.activations)), key=lambda t: example.activations[t])
            share = pre[peak].double()
            want = (share / share.sum()).tolist()
            assert list(example.site_shares) == SITES
            assert list(example.site_shares.values()) == pytest.approx(want, rel=1e-3, abs=1e-4)
        for example in record.non_activating:
            assert example.site_shares is None
        loaded = LatentRecord.load(built["run"].record_dir("layers.1@A") / latent_filename(i))
        assert loaded.to_dict() == record.to_dict()
    assert len(seen_classes) >= 2


def test_single_model_records_are_unchanged(tmp_path):
    """A one-site SAE: no per-model logits, no diffing, no shares; the record's JSON keys are the old ones."""
    source = load_activation_source(str(TINY_GPT2), device="cpu")
    d = source.hookpoint_dim("layers.1")
    torch.manual_seed(0)
    module = build_dictionary("crosscoder", SiteSpec(["layers.1"], ["layers.1"], d, d), {"d_sae": 8})
    assert not has_site_shares(module)
    cache = build_latent_cache(source, module, tmp_path / "lat", dataset=load_dataset_source("news-sample"),
                               n_tokens=256, ctx_len=32, n_splits=1, batch_size=8, progress=False)
    assert "site_shares" not in cache.manifest["fingerprint_inputs"] and "diffing" not in cache.stats()
    assert "logit_models" not in cache.stats()
    assert cache.logits_by_model(0) is None and cache.latent(0).site_share is None
    records, _ = build_records(cache, OPTIONS, tokenizer=source.tokenizer, dictionary=module)
    assert records
    for record in records:
        data = record.to_dict()
        assert set(data) == {"schema", "hookpoint", "latent", "stats", "top_logits", "bottom_logits", "neighbours",
                             "train", "test", "non_activating", "train_non_activating"}
        assert all("site_shares" not in e for e in data["train"] + data["test"])


def test_old_records_load(built):
    data = built["records"][0].to_dict()
    for key in ("top_logits_by_model", "bottom_logits_by_model", "diffing"):
        data.pop(key)
    for example in data["train"] + data["test"]:
        example.pop("site_shares", None)
    record = LatentRecord.from_dict(data)
    assert record.diffing is None and record.top_logits_by_model is None
    assert all(e.site_shares is None for e in record.examples())
    assert record.to_dict() == data


def test_report_shows_per_model_logits_diffing_shares_and_histogram(built):
    from saelab.plugins.report.html import fmt, write_report

    run, records = built["run"], built["records"]
    index = write_report(run.root)
    text = index.read_text()
    assert "layers.1@A relative norm" in text and "latents that fired" in text
    fired = sum(1 for c, r in zip(built["cache"].stats()["latents"]["firing_count"],
                                  built["cache"].stats()["diffing"]["relative_norm"], strict=True) if c and r is not None)
    assert f"({fired} latents that fired)" in text
    record = records[0]
    page = next(Path(index.parent).rglob(f"latent_{record.latent}.html")).read_text()
    assert 'id="logits-by-model"' in page
    assert "model A: top positive logits" in page and "model B: top positive logits" in page
    assert "model diffing" in page and record.diffing["class"] in page
    example = record.train[0]
    a, b = example.site_shares.values()
    assert f"share A {fmt(a, 2)} / B {fmt(b, 2)}" in page
    assert json.loads(json.dumps(record.to_dict()))["diffing"]["class"] == record.diffing["class"]
