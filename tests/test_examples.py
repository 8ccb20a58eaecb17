"""Example windows: centring, disjoint train/test and negatives, min_examples, max_latents, samplers."""

from __future__ import annotations

import pytest
import torch
from latents_helpers import lee_dataset, tiny_dictionary, tiny_source
from saelab import UsageError, resolve
from saelab.examples import (
    Candidates,
    RecordBuilder,
    WindowGeometry,
    assign_quantiles,
    candidate_windows,
    fires_in,
    split_pools,
)
from saelab.latents import LatentActivations, build_latent_cache

CTX = 64


def acts(entries):
    seq, pos, val = zip(*entries, strict=True)
    return LatentActivations(0, torch.tensor(seq), torch.tensor(pos), torch.tensor(val, dtype=torch.float32))


def test_centred_windows_put_the_max_at_the_centre():
    a = acts([(0, 20, 1.0), (0, 22, 3.0), (0, 40, 2.0), (1, 1, 5.0), (1, 62, 4.0), (2, 30, 0.5)])
    g = WindowGeometry(CTX, 8, 0, True)
    c = candidate_windows(a, g, n_quantiles=2)
    got = {(int(s), int(st), int(p)) for s, st, p in zip(c.seq, c.start, c.peak, strict=True)}
    # 22 beats 20 (same window); 40 is far enough for its own window; edges clip the window
    assert got == {(0, 18, 22), (0, 36, 40), (1, 0, 1), (1, 56, 62), (2, 26, 30)}
    assert c.value.tolist() == sorted(c.value.tolist(), reverse=True)
    for _s, st, p in got:
        if 4 <= p <= CTX - 4:
            assert p - st == 4  # index L//2 of the window
    windows = c.windows()
    assert not any(w.overlaps(v) for i, w in enumerate(windows) for v in windows[i + 1:])


def test_centring_resolves_overlaps_by_strength():
    a = acts([(0, 10, 1.0), (0, 15, 2.0), (0, 21, 1.5)])
    c = candidate_windows(a, WindowGeometry(CTX, 8, 0, True))
    assert c.peak.tolist() == [15]  # 10 and 21 lie in 15's window or overlap it; they are not window maxima


def test_fixed_blocks_when_centring_is_off():
    a = acts([(0, 3, 1.0), (0, 5, 2.0), (0, 9, 0.5), (0, 63, 9.0)])
    c = candidate_windows(a, WindowGeometry(CTX, 8, 1, False))
    assert sorted(c.start.tolist()) == [1, 9]  # 63 lies in the trailing partial block [57, 65): dropped
    assert c.peak.tolist()[c.start.tolist().index(1)] == 5


def test_geometry_rejects_long_windows():
    with pytest.raises(UsageError, match="example_ctx_len"):
        WindowGeometry(16, 32)


def test_split_pools_are_disjoint_and_stratified():
    n = 200
    c = Candidates(torch.arange(n), torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long),
                   torch.linspace(10, 1, n), assign_quantiles(n, 10), 8)
    train, test = split_pools(c, 40, 50, torch.Generator().manual_seed(0))
    assert set(train.tolist()).isdisjoint(test.tolist()) and len(train) + len(test) == n
    assert abs(len(train) - n * 40 / 90) <= 1
    for q in range(10):
        in_q = (c.quantile[train] == q).sum().item()
        assert abs(in_q - 20 * 40 / 90) <= 1.5


def test_samplers():
    n = 100
    c = Candidates(torch.arange(n), torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long),
                   torch.linspace(10, 1, n), assign_quantiles(n, 10), 8)
    g = torch.Generator().manual_seed(0)
    assert resolve("sampler", "top")().sample(c, 5, g).tolist() == [0, 1, 2, 3, 4]
    r = resolve("sampler", "random")().sample(c, 30, g)
    assert len(set(r.tolist())) == 30
    q = resolve("sampler", "quantiles")().sample(c, 20, g)
    assert torch.bincount(c.quantile[q], minlength=10).tolist() == [2] * 10
    m = resolve("sampler", "mix")({"ratio_top": 0.5}).sample(c, 20, g)
    assert set(range(10)) <= set(m.tolist()) and len(set(m.tolist())) == 20


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return build_latent_cache(tiny_source(), tiny_dictionary(), tmp_path_factory.mktemp("ex") / "layers.0",
                              dataset=lee_dataset(), n_tokens=24 * CTX, ctx_len=CTX, n_splits=2, progress=False)


OPTS = {"min_examples": 20, "n_examples_train": 8, "n_examples_test": 8, "n_non_activating": 6,
        "n_train_non_activating": 4, "example_ctx_len": 16}


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("source", ["random", "neighbours"])
def test_records_train_test_and_negatives_are_disjoint(cache, center, source):
    builder = RecordBuilder(cache, {**OPTS, "center_examples": center, "non_activating_source": source,
                                    "max_latents": 5}, tokenizer=tiny_source().tokenizer, dictionary=None)
    records = list(builder.iter_records())
    assert len(records) == 5
    tokens = cache.tokens()
    for r in records:
        train = {(e.sequence, e.start) for e in r.train}
        test = {(e.sequence, e.start) for e in r.test}
        assert len(r.train) == 8 and len(r.test) == 8 and not train & test
        windows = [*r.train, *r.test]
        for i, e in enumerate(windows):  # activating windows never share a token
            assert not any(e.sequence == f.sequence and abs(e.start - f.start) < 16 for f in windows[i + 1:])
        neg = {(e.sequence, e.start) for e in r.non_activating}
        train_neg = {(e.sequence, e.start) for e in r.train_non_activating}
        assert len(neg) == 6 and len(train_neg) == 4 and not neg & train_neg and not (neg | train_neg) & (train | test)
        for e in r.non_activating + r.train_non_activating:
            assert not e.is_activating and max(e.activations) == 0
        for e in r.train + r.test:
            assert e.tokens == tokens[e.sequence, e.start:e.start + 16].tolist()
            assert e.max_activation > 0 and e.quantile is not None
            if center:
                peak = max(range(16), key=lambda i: e.activations[i])
                assert peak == 8 or e.start in (0, CTX - 16)
        la = cache.latent(r.latent)
        from saelab.examples import Window
        assert not fires_in(la, [Window(e.sequence, e.start, 16) for e in r.non_activating], CTX).any()
        if source == "neighbours":
            assert r.neighbours and any(e.source.startswith("neighbours:") for e in r.non_activating)


def test_min_examples_skips_and_counts_and_max_latents_takes_first_qualifying(cache):
    probe = RecordBuilder(cache, {**OPTS, "example_ctx_len": 4}, tokenizer=tiny_source().tokenizer)
    n_windows = [len(probe.candidates(i)) for i in range(cache.d_sae)]
    threshold = sorted(n_windows)[len(n_windows) // 2]
    builder = RecordBuilder(cache, {**OPTS, "min_examples": threshold, "max_latents": 3, "example_ctx_len": 4},
                            tokenizer=tiny_source().tokenizer)
    latents = builder.qualifying()
    expected = [i for i in range(cache.d_sae) if n_windows[i] >= threshold][:3]
    assert len(expected) == 3 and latents == expected
    assert builder.summary.skipped == [i for i in range(expected[-1]) if i not in expected]
    builder = RecordBuilder(cache, {**OPTS, "min_examples": threshold, "feature_num": [7, 3, 40],
                                    "example_ctx_len": 4}, tokenizer=tiny_source().tokenizer)
    want = [i for i in (7, 3, 40) if len(builder.candidates(i)) >= threshold]
    assert [r.latent for r in builder.iter_records()] == want
    assert builder.summary.built == len(want) and len(builder.summary.skipped) == 3 - len(want)
    with pytest.raises(UsageError, match="feature_num"):
        RecordBuilder(cache, {"feature_num": [999]}, tokenizer=tiny_source().tokenizer)


def test_records_are_reproducible_and_carry_stats(cache):
    opts = {**OPTS, "feature_num": [2]}
    a = list(RecordBuilder(cache, opts, tokenizer=tiny_source().tokenizer).iter_records())
    b = list(RecordBuilder(cache, opts, tokenizer=tiny_source().tokenizer).iter_records())
    assert a[0].to_dict() == b[0].to_dict()
    assert a[0].stats.firing_count == cache.stats()["latents"]["firing_count"][2]
    assert a[0].top_logits is not None and len(a[0].top_logits.tokens) == 10


def test_faiss_source_offline(cache):
    builder = RecordBuilder(cache, {**OPTS, "non_activating_source": "FAISS", "feature_num": [0, 1]},
                            tokenizer=tiny_source().tokenizer)
    records = list(builder.iter_records())
    assert records and all(len(r.non_activating) == 6 for r in records)
    stored = list((cache.path / "faiss").glob("*.safetensors"))
    assert len(stored) == 1  # the corpus was embedded once for both latents
    mtime = stored[0].stat().st_mtime_ns
    list(RecordBuilder(cache, {**OPTS, "non_activating_source": "faiss", "feature_num": [3]},
                       tokenizer=tiny_source().tokenizer).iter_records())
    assert stored[0].stat().st_mtime_ns == mtime


MULTILINGUAL = ["Η γλώσσα μας είναι ελληνική και όμορφη. 日本語のテキストです。東京は大きい都市です。 "
                "Emoji 🙂🚀 and marks \u200f\u200e here. Καλημέρα κόσμε, こんにちは世界. " * 3] * 12


def test_records_decode_split_characters_whole(tmp_path):
    from latents_helpers import ListDataset

    source = tiny_source()
    cache = build_latent_cache(source, tiny_dictionary(), tmp_path / "layers.0", dataset=ListDataset(MULTILINGUAL),
                               n_tokens=12 * CTX, ctx_len=CTX, n_splits=1, progress=False)
    builder = RecordBuilder(cache, {**OPTS, "min_examples": 4, "n_examples_train": 4, "n_examples_test": 4,
                                    "n_non_activating": 2, "n_train_non_activating": 0, "max_latents": 4},
                            tokenizer=source.tokenizer)
    examples = [e for r in builder.iter_records() for e in r.examples()]
    assert examples and any(e.char_spans for e in examples)
    for e in examples:
        # the window reads as its sequence does, also where its edge cuts a character (only a character cut
        # by the sequence's own edge stays broken)
        row_text = source.tokenizer.decode(cache.tokens()[e.sequence].tolist())
        assert e.text in row_text, (e.start, e.text)
        assert "\ufffd" not in e.text or "\ufffd" in row_text, (e.start, e.text)
        for a, b in e.char_spans:
            assert e.token_strs[a] and all(s == "" for s in e.token_strs[a + 1:b])
        decoded = source.tokenizer.decode(e.tokens)
        if "\ufffd" not in decoded:  # a window that holds whole characters reads exactly as the tokenizer decodes it
            assert e.text == decoded


# --------------------------------------------------------------------------------------------------
# Options addressed to one sampler / non-activating source / neighbour finder


def test_options_addressed_to_one_plugin_reach_it(cache):
    tok = tiny_source().tokenizer
    builder = RecordBuilder(cache, {**OPTS, "train_type": "mix", "test_type": "quantiles", "ratio_top": 0.2,
                                    "sampler_options": {"MIX": {"ratio_top": 1.0}},
                                    "non_activating_source": "neighbours",
                                    "non_activating_options": {"neighbours": {"fill_random": False}},
                                    "neighbour_options": {"co-occurrence": {"block_latents": 7}}},
                            tokenizer=tok)
    assert builder.train_sampler.options.ratio_top == 1.0  # the addressed value beats the run-level one
    assert builder.source.options.fill_random is False and builder.finder.options.block_latents == 7
    # mix with ratio_top 1 takes only top windows: the same train examples as the top sampler
    mixed = next(builder.iter_records())
    top = RecordBuilder(cache, {**OPTS, "train_type": "top", "test_type": "quantiles",
                                "feature_num": [mixed.latent]}, tokenizer=tok).record(mixed.latent)
    assert [e.id for e in mixed.train] == [e.id for e in top.train]


@pytest.mark.parametrize("options,expected", [
    ({"train_type": "mix", "sampler_options": {"mix": {"ratio_tp": 0.5}}},
     "sampler 'mix' options: unknown option 'ratio_tp'; accepted options: n_quantiles, ratio_top"),
    ({"sampler_options": {"mix": {"ratio_top": 0.5}}},
     "sampler options given for 'mix', which this run does not use; accepted: options of the selected sampler "
     "(quantiles)"),
    ({"non_activating_source": "random", "non_activating_options": {"random": {"fill_random": False}}},
     "non-activating source 'random' options: unknown option 'fill_random'; accepted options: (none)"),
    ({"non_activating_source": "FAISS", "non_activating_options": {"faiss": {"embedder": "x"}}},
     "non-activating source 'faiss' options: unknown option 'embedder'; accepted options: batch_size, "
     "embedding_model, fill_random"),
    ({"non_activating_source": "neighbours", "neighbour_options": {"co-occurrence": {"chunk": 64}}},
     "neighbour finder 'co-occurrence' options: unknown option 'chunk'; accepted options: block_latents"),
    ({"neighbour_options": {"co-occurrence": {"block_latents": 64}}},
     "neighbour finder options given for 'co-occurrence', which this run does not use; accepted: options of the "
     "selected neighbour finder (none)"),
])
def test_unknown_options_addressed_to_one_plugin_are_rejected(cache, options, expected):
    with pytest.raises(UsageError) as err:
        RecordBuilder(cache, {**OPTS, **options}, tokenizer=tiny_source().tokenizer)
    assert str(err.value) == expected


def test_run_values_address_plugins_through_the_factory_the_cli_uses(cache, tmp_path):
    from saelab.layout import RunLayout
    from saelab.pipeline import example_options, record_set

    values = {**OPTS, "train_type": "mix", "sampler_option": [("mix.ratio_top", "1.0")],
              "non_activating_option": [("random.fill_random", "false")]}
    options = example_options(values)
    assert options["sampler_options"] == {"mix": {"ratio_top": 1.0}}
    with pytest.raises(UsageError, match="^non-activating source 'random' options: unknown option 'fill_random'"):
        record_set(RunLayout(tmp_path / "run"), cache, options, tokenizer=tiny_source().tokenizer)
    with pytest.raises(UsageError, match=r"^bad --sampler_option key 'ratio_top'; accepted: PLUGIN.KEY"):
        example_options({"sampler_option": [("ratio_top", "1.0")]})
    del values["non_activating_option"]
    layout = RunLayout(tmp_path / "run")
    built = record_set(layout, cache, {**example_options(values), "max_latents": 1}, tokenizer=tiny_source().tokenizer)
    plain = record_set(RunLayout(tmp_path / "plain"), cache, {**OPTS, "max_latents": 1},
                       tokenizer=tiny_source().tokenizer)
    assert built.fingerprint != plain.fingerprint  # addressed options are part of what the records depend on
    # without addressed options the fingerprint is what it was before they existed (stored records stay valid)
    from saelab.examples import TEXT_DECODING, ExampleOptions
    from saelab.pipeline import PLUGIN_OPTION_KEYS, inputs_fingerprint

    opts = ExampleOptions.parse({**OPTS, "max_latents": 1})
    assert plain.fingerprint == inputs_fingerprint({
        "latent_cache": cache.fingerprint, "text_decoding": TEXT_DECODING,
        "examples": opts.model_dump(mode="json", exclude={"overwrite_neighbours", *PLUGIN_OPTION_KEYS})})
