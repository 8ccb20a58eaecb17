"""The latent cache against a dense recomputation on the tiny GPT-2, resume, reuse, statistics, CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from latents_helpers import lee_dataset, tiny_dictionary, tiny_source
from saelab.data import WindowSpec, iter_windows
from saelab.latents import LatentCache, build_latent_cache, split_bounds

CTX = 64
N_TOKENS = 24 * CTX


def dense_reference(dictionary, hookpoint="layers.0"):
    source = tiny_source()
    ids = torch.stack(list(iter_windows(lee_dataset().texts(), source.tokenizer,
                                        WindowSpec.for_tokenizer(source.tokenizer, CTX), max_windows=N_TOKENS // CTX)))
    with torch.no_grad():
        x = source.activations(ids, [hookpoint])[hookpoint].reshape(-1, 1, 64)
        return ids, dictionary.encode(x)


def build(out, dictionary, **kwargs):
    args = {"dataset": lee_dataset(), "n_tokens": N_TOKENS, "ctx_len": CTX, "n_splits": 3, "batch_size": 5,
            "flush_nonzeros": 1500, "progress": False}
    args.update(kwargs)
    return build_latent_cache(tiny_source(), dictionary, out, **args)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    dictionary = tiny_dictionary()
    cache = build(tmp_path_factory.mktemp("lat") / "layers.0", dictionary)
    return cache, dictionary


def test_cache_equals_dense_recomputation(built):
    cache, dictionary = built
    ids, dense = dense_reference(dictionary)
    assert len(cache.manifest["chunks"]) > 2 and cache.n_splits == 3
    assert torch.equal(cache.tokens().long(), ids)
    torch.testing.assert_close(cache.dense().reshape(-1, dictionary.d_sae), dense, rtol=1e-5, atol=1e-6)
    # every latent's arrays come from its own split, sorted by (seq, pos)
    for latent in (0, 17, 47):
        acts = cache.latent(latent)
        token = acts.seq * CTX + acts.pos
        assert torch.all(token[1:] > token[:-1])
        lo, hi = cache.splits[cache.split_of(latent)]
        assert lo <= latent < hi
    files = [p for p in cache.path.rglob("*.safetensors") if p.parent.name.startswith("split_")]
    assert len(files) == 3 * len(cache.manifest["chunks"])


def test_index_dtypes_and_tokens_stored_once(built):
    from safetensors.torch import load_file

    cache, _ = built
    chunk = load_file(str(cache.path / cache.manifest["chunks"][0]["splits"][1]["path"]))
    assert chunk["token"].dtype == torch.int32 and chunk["latent"].dtype == torch.int32
    assert set(chunk["latent"].tolist()) <= set(range(*cache.splits[1]))
    assert "tokens" not in chunk
    assert sorted(p.name for p in (cache.path / "tokens").iterdir()) == [
        f"{i:06d}.safetensors" for i in range(len(cache.manifest["chunks"]))]


def test_statistics_match_dense(built):
    cache, dictionary = built
    _, dense = dense_reference(dictionary)
    stats = cache.stats()
    fired = dense > 0
    assert stats["latents"]["firing_count"] == fired.sum(0).tolist()
    assert stats["n_analysed"] == N_TOKENS
    torch.testing.assert_close(torch.tensor(stats["latents"]["max_activation"]), dense.max(0).values, atol=1e-5, rtol=0)
    arrays = cache.arrays()
    assert arrays["histogram"].sum(1).tolist() == fired.sum(0).tolist()
    bounds = arrays["quantile_bounds"]
    assert bounds.shape == (dictionary.d_sae, 10)
    for latent in range(dictionary.d_sae):
        values = dense[:, latent][fired[:, latent]]
        if values.numel() < 20:
            continue
        assert bounds[latent, 0] == pytest.approx(float(values.min()), abs=1e-6)
        assert torch.all(bounds[latent, 1:] >= bounds[latent, :-1] - 1e-6)
        exact = torch.quantile(values, 0.5)
        step = float(values.max()) / 256 * 2 + 1e-6  # histogram-interpolated: within two fine bins
        assert float(bounds[latent, 5]) == pytest.approx(float(exact), abs=step)
    record_stats = cache.latent_stats(3)
    assert record_stats.firing_count == int(fired[:, 3].sum()) and record_stats.n_tokens == N_TOKENS


def test_top_logits_are_decoder_rows_through_unembedding(built):
    cache, dictionary = built
    W_U = tiny_source().unembedding()
    logits = dictionary.W_dec.detach() @ W_U
    arrays = cache.arrays()
    assert torch.equal(arrays["top_logit_ids"].long(), logits.topk(10, dim=1).indices)
    assert torch.equal(arrays["bottom_logit_ids"].long(), logits.topk(10, dim=1, largest=False).indices)
    top, bottom = cache.logits(5)
    tok = tiny_source().tokenizer
    assert top.tokens[0] == tok.decode([int(logits[5].argmax())])
    assert bottom.values[0] == pytest.approx(float(logits[5].min()), abs=1e-5)


def test_interface_defaults_give_a_third_party_dictionary_direct_logits():
    """A SparseDictionary that is not a LinearDictionary: ``decoder_directions()`` defaults to its ``W_dec``
    (None without one, and then no top logits), ``extra_config`` starts empty, no pre-encoder bias."""
    import saelab
    from saelab.interfaces import SiteSpec
    from saelab.latents import _direct_logits

    class Tied(saelab.SparseDictionary):
        name = "tied-test"

        def __init__(self, sites, options, weight=None):
            super().__init__(sites, options)
            if weight is not None:
                self.W_dec = torch.nn.Parameter(weight)

        @property
        def d_sae(self):
            return 12

        def encode(self, x):
            return torch.relu(x[:, 0] @ self.W_dec.T)

        def decode(self, latents):
            return (latents @ self.W_dec)[:, None]

    sites = SiteSpec(inputs=["layers.0"], outputs=["layers.0"], d_in=64, d_out=64)
    weight = torch.randn(12, 64, generator=torch.Generator().manual_seed(0))
    tied = Tied(sites, saelab.Options(), weight)
    assert tied.decoder_directions() is tied.W_dec and tied.extra_config == {} and not tied.uses_pre_encoder_bias
    logits = _direct_logits(tiny_source(), tied, 3)
    assert logits is not None
    expected = (weight @ tiny_source().unembedding().float()).topk(3, dim=1).indices
    assert torch.equal(logits["top_logit_ids"].long(), expected)
    bare = Tied(sites, saelab.Options())
    assert bare.decoder_directions() is None and _direct_logits(tiny_source(), bare, 3) is None


def test_reuse_and_rebuild_on_other_dictionary(built, tmp_path):
    cache, dictionary = built
    again = build(cache.path, dictionary)
    assert again.build_info["status"] == "reused"
    other = build(cache.path.parent / "other", tiny_dictionary(seed=1))
    rebuilt = build(other.path, dictionary)
    assert rebuilt.build_info["status"] == "rebuilt"
    assert torch.equal(rebuilt.dense(), cache.dense())


def test_resume_after_kill(built, tmp_path, monkeypatch):
    from saelab import latents

    cache, dictionary = built
    calls = {"n": 0}
    real = latents._Writer._flush

    def dying_flush(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        real(self)

    monkeypatch.setattr(latents._Writer, "_flush", dying_flush)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "resume", dictionary)
    manifest = json.loads((tmp_path / "resume" / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["chunks"]) == 2
    monkeypatch.setattr(latents._Writer, "_flush", real)
    resumed = build(tmp_path / "resume", dictionary)
    assert resumed.build_info["status"] == "resumed" and resumed.build_info["resumed_from_sequences"] > 0
    assert torch.equal(resumed.dense(), cache.dense())
    assert torch.equal(resumed.tokens(), cache.tokens())
    assert resumed.stats()["latents"] == cache.stats()["latents"]


def test_filter_bos_and_excluded_positions(tmp_path):
    dictionary = tiny_dictionary()
    cache = build(tmp_path / "f", dictionary, filter_bos=True, exclude_positions=[1, -1])
    ids, dense = dense_reference(dictionary)
    dense = dense.reshape(-1, CTX, dictionary.d_sae)
    keep = ids != tiny_source().tokenizer.bos_token_id  # GPT-2: BOS = EOS, so separators go too
    keep[:, [1, CTX - 1]] = False
    assert (~keep[:, 2:CTX - 1]).any()  # the fixture has mid-sequence BOS tokens
    assert cache.n_analysed == int(keep.sum())
    got = cache.dense()
    assert got[~keep].abs().sum() == 0
    torch.testing.assert_close(got[keep], dense[keep], rtol=1e-5, atol=1e-6)


def test_reads_an_activation_cache_and_reuses_its_tokens(built, tmp_path):
    from saelab.activation_cache import build_activation_cache
    from saelab.latents import find_activation_cache

    cache, dictionary = built
    store = tmp_path / "store"
    acts = build_activation_cache(tiny_source(), lee_dataset(), ["layers.0"], n_tokens=N_TOKENS, ctx_len=CTX,
                                  batch_size=8, store=store, progress=False)
    found = find_activation_cache(tiny_source(), lee_dataset(), ["layers.0"], n_tokens=N_TOKENS, ctx_len=CTX,
                                  store=store)
    assert found is not None and found.path == acts.path
    assert find_activation_cache(tiny_source(), lee_dataset(), ["layers.1"], n_tokens=N_TOKENS, ctx_len=CTX,
                                 store=store) is None
    from_cache = build(tmp_path / "from_cache", dictionary, activation_cache=found, dataset=None, n_tokens=None)
    assert from_cache.manifest["tokens"]["kind"] == "activation_cache"
    assert not (from_cache.path / "tokens").exists()
    assert torch.equal(from_cache.tokens(), cache.tokens())
    torch.testing.assert_close(from_cache.dense(), cache.dense(), rtol=1e-5, atol=1e-6)


def test_an_activation_cache_holding_more_sites_is_found_only_for_the_same_data(tmp_path):
    from saelab.activation_cache import build_activation_cache
    from saelab.latents import find_activation_cache

    store = tmp_path / "store"
    find = dict(n_tokens=N_TOKENS, ctx_len=CTX, store=store)
    assert find_activation_cache(tiny_source(), lee_dataset(), ["layers.0"], **find) is None
    assert not store.exists()  # looking writes nothing
    other = build_activation_cache(tiny_source(), lee_dataset(), ["layers.0", "layers.1"], n_tokens=2 * N_TOKENS,
                                   ctx_len=CTX, batch_size=8, store=store, progress=False)
    assert find_activation_cache(tiny_source(), lee_dataset(), ["layers.0"], **find) is None  # other n_tokens
    both = build_activation_cache(tiny_source(), lee_dataset(), ["layers.0", "layers.1"], n_tokens=N_TOKENS,
                                  ctx_len=CTX, batch_size=8, store=store, progress=False, dtype="float16")
    found = find_activation_cache(tiny_source(), lee_dataset(), ["layers.1"], **find)
    assert found is not None and found.path == both.path != other.path
    assert find_activation_cache(tiny_source(), lee_dataset(), ["layers.0", "layers.1"], **find).path == both.path
    assert find_activation_cache(tiny_source(), lee_dataset(), ["layers.0"], **{**find, "ctx_len": 32}) is None
    assert find_activation_cache(tiny_source(), lee_dataset(39), ["layers.0"], **find) is None  # other data
    one = build_activation_cache(tiny_source(), lee_dataset(), ["layers.1"], n_tokens=N_TOKENS, ctx_len=CTX,
                                 batch_size=8, store=store, progress=False)
    assert find_activation_cache(tiny_source(), lee_dataset(), ["layers.1"], **find).path == one.path  # exact first


def test_split_bounds_and_errors(tmp_path):
    from saelab import UsageError

    assert split_bounds(10, 3) == [(0, 4), (4, 8), (8, 10)]
    assert split_bounds(3, 5) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(UsageError, match="n_splits"):
        split_bounds(10, 0)
    with pytest.raises(UsageError, match="does not exist"):
        LatentCache.open(tmp_path / "nothing")


def test_latents_command(tmp_path, cli, monkeypatch):
    from fixtures.tiny_models import TINY_GPT2, lee_corpus
    from saelab.dictionary import save_dictionary

    monkeypatch.chdir(tmp_path)
    save_dictionary(tiny_dictionary(), tmp_path / "dict")
    (tmp_path / "data.txt").write_text("\n\n".join(lee_corpus()[:40]))
    common = [str(TINY_GPT2), str(tmp_path / "dict"), "--dataset_repo", str(tmp_path / "data.txt"),
              "--dataset_split", "train", "--n_tokens", str(N_TOKENS), "--cache_ctx_len", str(CTX), "--batch_size", "8",
              "--name", "lat", "--verbose", "false"]
    result = cli("latents", *common, "--hookpoints", "layers.0", "--n_splits", "2", "--max_latents", "3",
                 "--min_examples", "10", "--n_examples_train", "4", "--n_examples_test", "4", "--n_non_activating", "4",
                 "--example_ctx_len", "16")
    assert result.exit_code == 0, result.output
    out = tmp_path / "results" / "lat" / "latents" / "layers.0"
    assert (out / "stats.json").is_file() and LatentCache.open(out).n_splits == 2
    records = sorted((out / "records").glob("latent_*.json"))
    assert len(records) == 3
    summary = json.loads((out / "records" / "summary.json").read_text())
    assert summary["built"] == 3
    bad = cli("latents", *common, "--hookpoints", "layers.1")
    bad.assert_user_error("layers.1", "found")
    records_args = ["--hookpoints", "layers.0", "--max_latents", "3", "--min_examples", "10", "--n_examples_train", "4",
                    "--n_examples_test", "4", "--n_non_activating", "4", "--example_ctx_len", "16"]
    typo = cli("latents", *common, *records_args, "--train_type", "mix", "--sampler_option", "mix.ratio_tp", "0.3")
    typo.assert_user_error("'ratio_tp'", "mix", "accepted options: n_quantiles, ratio_top")
    unused = cli("latents", *common, *records_args, "--neighbour_option", "co-occurrence.block_latents", "8")
    unused.assert_user_error("co-occurrence", "does not use")
    addressed = cli("latents", *common, *records_args, "--train_type", "mix", "--sampler_option", "mix.ratio_top", "0.5")
    assert addressed.exit_code == 0, addressed.output


def test_several_dictionaries_share_one_forward_pass(tmp_path, monkeypatch):
    """Dictionaries at two sites built together: one LM forward per batch reading both sites, and each cache
    holds exactly the files and values it gets when built alone (also when one of them resumes)."""
    from saelab.latents import LatentCacheJob, build_latent_caches

    first, second = tiny_dictionary("layers.0", seed=0), tiny_dictionary("layers.1", seed=1)
    alone = [build(tmp_path / "alone" / hook, d) for hook, d in (("layers.0", first), ("layers.1", second))]
    # the second cache was killed after its first chunks: the shared pass starts at its first missing sequence
    shutil.copytree(alone[1].path, tmp_path / "together" / "layers.1")
    manifest = json.loads((tmp_path / "together" / "layers.1" / "manifest.json").read_text())
    kept = manifest["chunks"][:2]
    manifest.update(complete=False, chunks=kept, n_sequences=kept[-1]["seq_stop"],
                    n_analysed=sum(c["n_analysed"] for c in kept),
                    n_nonzeros=sum(s["nnz"] for c in kept for s in c["splits"]))
    (tmp_path / "together" / "layers.1" / "manifest.json").write_text(json.dumps(manifest))
    source = tiny_source()
    calls = []
    activations = source.activations
    monkeypatch.setattr(source, "activations",
                        lambda ids, hookpoints: calls.append(list(hookpoints)) or activations(ids, hookpoints))
    jobs = [LatentCacheJob(first, tmp_path / "together" / "layers.0", "layers.0"),
            LatentCacheJob(second, tmp_path / "together" / "layers.1", "layers.1")]
    together = build_latent_caches(source, jobs, dataset=lee_dataset(), n_tokens=N_TOKENS, ctx_len=CTX, n_splits=3,
                                   batch_size=5, flush_nonzeros=1500, progress=False)
    assert calls and all(hooks == ["layers.0", "layers.1"] for hooks in calls)
    assert len(calls) == -(-(N_TOKENS // CTX) // 5)  # one forward per batch for both dictionaries
    assert [c.build_info["status"] for c in together] == ["built", "resumed"]
    for one, both in zip(alone, together, strict=True):
        assert torch.equal(one.tokens(), both.tokens())
        assert torch.equal(one.dense(), both.dense())
    assert together[0].manifest["chunks"] == alone[0].manifest["chunks"]
    assert together[1].build_info["resumed_from_sequences"] == kept[-1]["seq_stop"] > 0
