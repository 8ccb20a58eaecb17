"""The streamed activation cache: writer, manifest, fingerprint reuse, resume, corruption, reader."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cache_helpers import FakeSource, snapshot, window_hash
from fixtures.tiny_models import TINY_GPT2
from saelab import CorruptCacheError, UsageError
from saelab.activation_cache import (
    MANIFEST,
    ActivationCache,
    Fp16RangeWarning,
    build_activation_cache,
    fingerprint,
    fingerprint_inputs,
)
from saelab.data import DataExhaustedWarning, load_dataset_source
from safetensors.torch import load_file

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def tiny_source():
    from saelab.models import load_activation_source

    return load_activation_source(str(TINY_GPT2), device="cpu")


@pytest.fixture(scope="module")
def tokenizer(tiny_source):
    return tiny_source.tokenizer


@pytest.fixture(scope="module")
def news():
    return load_dataset_source("news-sample")


def build(source, dataset, tmp_path, hookpoints=("layers.0", "layers.1"), **kw):
    args = {"n_tokens": 2000, "ctx_len": 32, "batch_size": 4, "store": tmp_path / "store",
            "shard_size_tokens": 256, "progress": False}
    args.update(kw)
    return build_activation_cache(source, dataset, list(hookpoints), **args)


# ------------------------------------------------------------------------------------------ writer


def test_cached_activations_equal_a_plain_forward(tiny_source, news, tmp_path):
    cache = build(tiny_source, news, tmp_path, hookpoints=("layers.0", "layers.1.mlp", "layers.1"))
    tokens = cache.tokens()
    assert tokens.dtype == torch.int32 and tokens.shape == (cache.n_sequences, 32)
    assert cache.n_sequences == 63 and cache.n_tokens == 2016  # ceil(2000 / 32) whole sequences
    assert (tokens[:, 0] == tiny_source.tokenizer.bos_token_id).all()
    model = tiny_source.model
    captured = {}
    handle = model.transformer.h[1].mlp.register_forward_hook(lambda m, a, out: captured.__setitem__("mlp", out))
    try:
        with torch.no_grad():
            out = model(tokens.long(), output_hidden_states=True)
    finally:
        handle.remove()
    seqs = {hp: torch.cat([s[hp] for _, s in cache.iter_sequences([hp], 16)]) for hp in cache.hookpoints}
    torch.testing.assert_close(seqs["layers.0"], out.hidden_states[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seqs["layers.1.mlp"], captured["mlp"], rtol=1e-5, atol=1e-5)
    # the last block's output is before the final norm, unlike hidden_states[-1]
    assert not torch.allclose(seqs["layers.1"], out.hidden_states[-1], atol=1e-3)


def test_manifest_lists_shards_with_checksums_and_tokens_stored_once(tiny_source, news, tmp_path):
    cache = build(tiny_source, news, tmp_path)
    manifest = json.loads((cache.path / MANIFEST).read_text())
    assert manifest["complete"] and cache.path.name == manifest["fingerprint"]
    assert [s["n_sequences"] for s in manifest["shards"]] == [8] * 7 + [7]
    import hashlib

    for shard in manifest["shards"]:
        files = [shard["files"]["tokens"], *shard["files"]["activations"].values()]
        for entry in files:
            data = (cache.path / entry["path"]).read_bytes()
            assert len(data) == entry["size"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
        acts = load_file(cache.path / shard["files"]["activations"]["layers.0"]["path"])
        assert set(acts) == {"activations"}  # tokens live only in their own shards
    assert sorted(p.name for p in (cache.path / "activations").iterdir()) == ["layers.0", "layers.1"]
    assert manifest["tokenization"]["bos_token_id"] == tiny_source.tokenizer.bos_token_id
    assert manifest["fingerprint_inputs"]["model"]["weights_sha256"]


def test_fingerprint_covers_what_changes_values_but_not_batch_size(tokenizer, news):
    src = FakeSource(tokenizer)
    base = fingerprint(fingerprint_inputs(src, news, ["layers.0", "layers.1"], n_tokens=1000, ctx_len=32))
    same = fingerprint(fingerprint_inputs(src, news, ["layers.1", "layers.0"], n_tokens=1000, ctx_len=32))
    assert base == same
    other_split = load_dataset_source("news-sample", split="train[:50%]")
    variants = [
        fingerprint_inputs(src, news, ["layers.0"], n_tokens=1000, ctx_len=32),
        fingerprint_inputs(src, news, ["layers.0", "layers.1"], n_tokens=1001, ctx_len=32),
        fingerprint_inputs(src, news, ["layers.0", "layers.1"], n_tokens=1000, ctx_len=64),
        fingerprint_inputs(src, news, ["layers.0", "layers.1"], n_tokens=1000, ctx_len=32, dtype="float16"),
        fingerprint_inputs(src, other_split, ["layers.0", "layers.1"], n_tokens=1000, ctx_len=32),
        fingerprint_inputs(FakeSource(tokenizer, model_id="other"), news, ["layers.0", "layers.1"],
                           n_tokens=1000, ctx_len=32),
    ]
    assert len({fingerprint(v) for v in variants} | {base}) == len(variants) + 1


def test_reuse_ignores_batch_size_and_overwrite_rebuilds(tokenizer, news, tmp_path):
    first = build(FakeSource(tokenizer), news, tmp_path, batch_size=4)
    before = snapshot(first.path)
    src = FakeSource(tokenizer)
    again = build(src, news, tmp_path, batch_size=7)
    assert again.path == first.path and again.build_info["status"] == "reused" and src.calls == 0
    assert snapshot(first.path) == before
    rebuilt = build(FakeSource(tokenizer), news, tmp_path, batch_size=7, overwrite=True)
    assert rebuilt.build_info["status"] == "built"
    after = snapshot(rebuilt.path)
    assert after.keys() == before.keys()
    assert all(after[k][0:2] != before[k][0:2] for k in before)  # files rewritten
    assert all(after[k][2] == before[k][2] for k in before)  # same values (fake source is exact)


def _store_dirs(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_a_complete_cache_of_more_sites_is_reused_and_read_only_where_asked(tiny_source, news, tmp_path):
    sites = ("layers.0", "layers.1.resid_mid", "layers.1")
    wide = build(tiny_source, news, tmp_path, hookpoints=sites)
    store = tmp_path / "store"
    assert _store_dirs(store) == [wide.path.name]
    reused = build(tiny_source, news, tmp_path, hookpoints=("layers.1.resid_mid", "layers.0"), batch_size=7)
    assert reused.path == wide.path and reused.hookpoints == list(sites)
    assert reused.build_info["status"] == "reused" and reused.build_info["covering"] is True
    assert reused.build_info["requested_hookpoints"] == ["layers.1.resid_mid", "layers.0"]
    assert _store_dirs(store) == [wide.path.name]  # nothing written
    # The same storage dtype only, and the same model, data, n_tokens and ctx_len.
    for other in ({"dtype": "float16"}, {"n_tokens": 1000}, {"ctx_len": 64}):
        built = build(tiny_source, news, tmp_path, hookpoints=("layers.1",), **other)
        assert built.build_info["status"] == "built" and built.path != wide.path, other
    # --overwrite cache builds the exact cache; its values are those of the covering cache, bit for bit.
    exact = build(tiny_source, news, tmp_path, hookpoints=("layers.1.resid_mid",), overwrite=True)
    assert exact.build_info["status"] == "built" and exact.path != wide.path
    assert exact.hookpoints == ["layers.1.resid_mid"]
    assert build(tiny_source, news, tmp_path, hookpoints=("layers.1.resid_mid",)).path == exact.path  # exact first
    read: list[str] = []
    original = ActivationCache._load

    def spy(self, entry, key):
        read.append(entry["path"])
        return original(self, entry, key)

    ActivationCache._load = spy
    try:
        kwargs = {"seed": 3, "exclude_positions": (0, 1), "shuffle_buffer_shards": 2}
        from_wide = list(reused.iter_batches(["layers.1.resid_mid"], 50, **kwargs))
    finally:
        ActivationCache._load = original
    assert read and all(p.startswith(("activations/layers.1.resid_mid/", "tokens/")) for p in read)
    from_exact = list(exact.iter_batches(["layers.1.resid_mid"], 50, **kwargs))
    assert len(from_wide) == len(from_exact) > 1
    assert all(torch.equal(a["layers.1.resid_mid"], b["layers.1.resid_mid"]) for a, b in zip(from_wide, from_exact, strict=True))


def test_find_activation_cache_other_dtypes_only_when_asked(tiny_source, news, tmp_path):
    from saelab.activation_cache import find_activation_cache

    store = tmp_path / "store"
    half = build(tiny_source, news, tmp_path, hookpoints=("layers.0", "layers.1"), dtype="float16")
    find = {"n_tokens": 2000, "ctx_len": 32, "store": store}
    assert find_activation_cache(tiny_source, news, ["layers.1"], **find).path == half.path  # latents: any dtype
    assert find_activation_cache(tiny_source, news, ["layers.1"], other_dtypes=False, **find) is None
    assert find_activation_cache(tiny_source, news, ["layers.1"], dtype="float16", other_dtypes=False,
                                 **find).path == half.path
    # A damaged covering cache is passed over, and building then writes the exact cache.
    shard = half.path / half.shards[0]["files"]["activations"]["layers.1"]["path"]
    shard.write_bytes(shard.read_bytes()[:-8])
    assert find_activation_cache(tiny_source, news, ["layers.1"], dtype="float16", **find) is None
    built = build(tiny_source, news, tmp_path, hookpoints=("layers.1",), dtype="float16")
    assert built.build_info["status"] == "built" and built.path != half.path


def test_shards_are_streamed_to_disk_while_building(tokenizer, news, tmp_path):
    seen = []
    store = tmp_path / "store"

    def watch(call):
        manifests = list(store.glob(f"*/{MANIFEST}"))
        shards = json.loads(manifests[0].read_text())["shards"] if manifests else []
        files = list(store.glob("*/activations/layers.0/*.safetensors"))
        seen.append((call, len(shards), len(files)))

    build(FakeSource(tokenizer, on_batch=watch), news, tmp_path, batch_size=4, hookpoints=("layers.0",))
    # 2 batches per shard of 8 sequences: before batch 2k the manifest already lists k shards
    for call, listed, on_disk in seen:
        assert listed == call // 2 and on_disk == call // 2


def test_writer_memory_stays_flat(tokenizer, news, tmp_path):
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    rss = []
    dim = 4096
    src = FakeSource(tokenizer, dim=dim, on_batch=lambda call: rss.append(proc.memory_info().rss))
    cache = build(src, news, tmp_path, hookpoints=("layers.0",), n_tokens=32 * 160, batch_size=8,
                  shard_size_tokens=32 * 8)
    total_bytes = cache.n_tokens * dim * 4  # 84 MB of activations; one shard is 4 MB
    growth = max(rss[5:]) - rss[4]
    assert total_bytes > 80e6 and growth < 0.25 * total_bytes, (growth, total_bytes)


def test_resume_after_interruption_is_byte_identical(tokenizer, news, tmp_path):
    reference = build(FakeSource(tokenizer), news, tmp_path / "ref", batch_size=3)

    class Killed(BaseException):
        pass

    def die(call):
        if call == 7:  # mid-way through the third shard (3 batches per shard of 8 sequences)
            raise Killed

    with pytest.raises(Killed):
        build(FakeSource(tokenizer, on_batch=die), news, tmp_path, batch_size=3)
    directory = tmp_path / "store" / reference.path.name
    manifest = json.loads((directory / MANIFEST).read_text())
    assert not manifest["complete"] and len(manifest["shards"]) == 2
    with pytest.raises(UsageError, match="incomplete"):
        ActivationCache.open(directory)
    (directory / "activations" / "layers.0" / "000002.safetensors.tmp").write_bytes(b"half a shard")
    done_before = {k: v for k, v in snapshot(directory).items() if k.endswith(("000000.safetensors", "000001.safetensors"))}
    resumed = build(FakeSource(tokenizer), news, tmp_path, batch_size=3)
    assert resumed.build_info["status"] == "resumed"
    after = snapshot(directory)
    assert all(after[k] == v for k, v in done_before.items())  # finished shards not rewritten
    assert not list(directory.rglob("*.tmp"))
    ref = snapshot(reference.path)
    assert after.keys() == ref.keys() and all(after[k][2] == ref[k][2] for k in ref)


def test_data_running_out_warns_once_and_caches_what_there_is(tokenizer, tmp_path):
    small = load_dataset_source("news-sample", split="train[:3]")
    with pytest.warns(DataExhaustedWarning, match="ran out") as record:
        cache = build(FakeSource(tokenizer), small, tmp_path, n_tokens=10**6)
    assert len([w for w in record if issubclass(w.category, DataExhaustedWarning)]) == 1
    assert 0 < cache.n_sequences < 10**6 // 32 and cache.manifest["data_exhausted"]
    stream = []
    for text in small.texts():
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert cache.n_sequences == len(stream) // 31


def test_float16_cache_clamps_out_of_range_values_with_a_warning(tokenizer, news, tmp_path):
    src = FakeSource(tokenizer, dim=6, scale=1e5)
    with pytest.warns(Fp16RangeWarning, match="layers.0"):
        cache = build(src, news, tmp_path, dtype="float16", hookpoints=("layers.0",))
    acts = cache.shard_activations("layers.0", 0)
    assert acts.dtype == torch.float16 and torch.isfinite(acts).all()
    assert acts[..., 3:].max().item() == 65504.0
    ref = FakeSource(tokenizer, dim=6, scale=1e5).activations(cache.tokens().long(), ["layers.0"])["layers.0"]
    assert cache.manifest["fp16_clamped"]["layers.0"] == int((ref.abs() > 65504).sum()) >= cache.n_tokens * 3
    batch = next(cache.iter_batches(["layers.0"], 10))
    assert batch["layers.0"].dtype == torch.float32


def test_truncated_and_corrupted_shards_are_named(tokenizer, news, tmp_path):
    cache = build(FakeSource(tokenizer), news, tmp_path)
    shard = cache.path / "activations" / "layers.1" / "000003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    ActivationCache.open(cache.path)  # sizes only: not detected
    with pytest.raises(CorruptCacheError, match="000003.safetensors is corrupted"):
        ActivationCache.open(cache.path, checksums=True)
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(CorruptCacheError, match=r"layers.1/000003.safetensors is truncated"):
        ActivationCache.open(cache.path)
    shard.unlink()
    with pytest.raises(CorruptCacheError, match="000003.safetensors is missing"):
        ActivationCache.open(cache.path)


def test_open_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        ActivationCache.open(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MANIFEST).write_text("{not json")
    with pytest.raises(CorruptCacheError, match="cannot be read"):
        ActivationCache.open(tmp_path / "bad")


# ------------------------------------------------------------------------------------------ reader


@pytest.fixture(scope="module")
def rows_cache(tmp_path_factory, tokenizer, news):
    """60 sequences of 16 tokens in 8 shards; rows carry (window hash, position, token)."""
    store = tmp_path_factory.mktemp("rows")
    return build_activation_cache(FakeSource(tokenizer), news, ["layers.0", "layers.1"], n_tokens=960,
                                  ctx_len=16, batch_size=5, store=store, shard_size_tokens=16 * 8,
                                  progress=False)


def row_keys(batch):
    x = batch["layers.0"]
    return [tuple(r) for r in x[:, :3].long().tolist()]


def all_keys(cache, exclude_positions=(), exclude_bos=False):
    tokens = cache.tokens().long()
    hashes = window_hash(tokens)
    keys = []
    for s in range(tokens.shape[0]):
        for p in range(cache.ctx_len):
            if p in exclude_positions or (exclude_bos and tokens[s, p] == cache.bos_token_id):
                continue
            keys.append((int(hashes[s]), p, int(tokens[s, p])))
    return keys


def test_epoch_covers_every_row_once_in_a_seeded_order(rows_cache):
    batches = list(rows_cache.iter_batches(["layers.0", "layers.1"], 64, seed=3, epoch=0))
    keys = [k for b in batches for k in row_keys(b)]
    assert sorted(keys) == sorted(all_keys(rows_cache)) and len(keys) == rows_cache.n_tokens
    assert keys != all_keys(rows_cache)  # shuffled
    for b in batches:  # the same rows for every hookpoint
        assert torch.equal(b["layers.0"][:, :3], b["layers.1"][:, :3])
        assert torch.equal(b["layers.1"][:, 3:], b["layers.0"][:, 3:] + 0.5)
    assert [len(b["layers.0"]) for b in batches] == [64] * 15
    again = [k for b in rows_cache.iter_batches(["layers.0"], 64, seed=3, epoch=0) for k in row_keys(b)]
    other = [k for b in rows_cache.iter_batches(["layers.0"], 64, seed=3, epoch=1) for k in row_keys(b)]
    assert again == keys and other != keys and sorted(other) == sorted(keys)
    plain = [k for b in rows_cache.iter_batches(["layers.0"], 100, shuffle=False) for k in row_keys(b)]
    assert plain == all_keys(rows_cache)


def test_excluding_positions_and_bos(rows_cache):
    keys = [k for b in rows_cache.iter_batches(["layers.0"], 50, exclude_positions=(1, 2, -1)) for k in row_keys(b)]
    assert sorted(keys) == sorted(all_keys(rows_cache, exclude_positions=(1, 2, 15)))
    assert rows_cache.n_rows(exclude_positions=(1, 2, -1)) == len(keys) == 60 * 13
    keys = [k for b in rows_cache.iter_batches(["layers.0"], 50, exclude_bos=True) for k in row_keys(b)]
    expected = all_keys(rows_cache, exclude_bos=True)
    assert sorted(keys) == sorted(expected) and rows_cache.n_rows(exclude_bos=True) == len(expected)
    assert len(expected) < 60 * 15  # BOS at position 0 and as document separator (GPT-2: bos == eos)


def test_ranks_split_global_batches(rows_cache):
    single = list(rows_cache.iter_batches(["layers.0"], 64, seed=1))
    ranks = [list(rows_cache.iter_batches(["layers.0"], 32, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for whole, a, b in zip(single, *ranks, strict=True):
        assert torch.equal(whole["layers.0"], torch.cat([a["layers.0"], b["layers.0"]]))
    for r in range(2):
        n = sum(len(b["layers.0"]) for b in ranks[r])
        assert n == rows_cache.n_rows(rank=r, world_size=2, batch_size=32) == 480
    shard_ranks = [list(rows_cache.iter_batches(["layers.0"], 32, rank=r, world_size=2, rank_split="shards"))
                   for r in range(2)]
    assert len(shard_ranks[0]) == len(shard_ranks[1]) > 0
    seqs = [{k[0] for b in rs for k in row_keys(b)} for rs in shard_ranks]
    assert not seqs[0] & seqs[1]  # disjoint shards


def test_start_batch_skips_without_reading_skipped_shards(rows_cache, monkeypatch):
    full = list(rows_cache.iter_batches(["layers.0"], 40, seed=5, shuffle_buffer_shards=2))
    loaded = []
    original = ActivationCache.shard_activations

    def spy(self, hookpoint, shard):
        loaded.append(shard)
        return original(self, hookpoint, shard)

    monkeypatch.setattr(ActivationCache, "shard_activations", spy)
    tail = list(rows_cache.iter_batches(["layers.0"], 40, seed=5, shuffle_buffer_shards=2, start_batch=20))
    assert len(tail) == len(full) - 20
    for a, b in zip(tail, full[20:], strict=True):
        assert torch.equal(a["layers.0"], b["layers.0"])
    assert len(loaded) <= 4  # the last buffer of 2 shards (plus at most the one before it)
    loaded.clear()
    list(rows_cache.iter_batches(["layers.0"], 40, seed=5, shuffle_buffer_shards=2))
    assert len(loaded) == 8  # each shard read once per epoch


def test_reader_bad_arguments(rows_cache):
    with pytest.raises(UsageError, match="cached hookpoints: layers.0, layers.1"):
        next(rows_cache.iter_batches(["layers.7"], 8))
    with pytest.raises(UsageError, match="bad batch size"):
        next(rows_cache.iter_batches(["layers.0"], 0))
    with pytest.raises(UsageError, match="bad rank"):
        next(rows_cache.iter_batches(["layers.0"], 8, rank=2, world_size=2))
    assert rows_cache.dim("layers.1") == 4


# ------------------------------------------------------------------------------------------ CLI

TINY = str(TINY_GPT2)
COMMON = ["--hookpoints", "layers.0", "layers.1", "--dataset_repo", "news-sample", "--n_tokens", "1500",
          "--cache_ctx_len", "32", "--shard_size_tokens", "256"]


def test_cli_reuses_across_run_names_and_records_the_cache(cli, results_dir):
    first = cli("cache", TINY, *COMMON, "--name", "a", "--batch_size", "4")
    assert first.exit_code == 0, first.stderr
    second = cli("cache", TINY, *COMMON, "--name", "b", "--batch_size", "9", "--verify")
    assert second.exit_code == 0, second.stderr
    assert "reused" in second.stdout
    configs = [json.loads((results_dir / n / "run_config.json").read_text()) for n in ("a", "b")]
    paths = {c["activation_cache"] for c in configs}
    assert len(paths) == 1 and Path(paths.pop()).parent == results_dir / ".activations"
    third = cli("cache", TINY, *COMMON, "--name", "c", "--overwrite", "cache", "--verbose", "false")
    assert third.exit_code == 0 and third.stdout == ""
    cache = ActivationCache.open(configs[0]["activation_cache"], checksums=True)
    assert cache.hookpoints == ["layers.0", "layers.1"] and cache.n_tokens == 1504


def test_cli_train_reuses_a_cache_of_more_sites_and_trains_the_same_weights(cli, results_dir):
    from training_helpers import train_args

    data = ["--dataset_repo", "news-sample", "--dataset_split", "train", "--n_tokens", "4096",
            "--cache_ctx_len", "64"]
    store = results_dir / ".activations"
    res = cli("cache", TINY, "--hookpoints", "layers.0", "layers.1.resid_mid", "layers.1", *data, "--name", "wide",
              "--verbose", "false")
    assert res.exit_code == 0, res.stderr
    wide = json.loads((results_dir / "wide" / "run_config.json").read_text())["activation_cache"]
    assert _store_dirs(store) == [Path(wide).name]
    again = cli("cache", TINY, "--hookpoints", "layers.1.resid_mid", *data, "--name", "sub")
    assert again.exit_code == 0, again.stderr
    assert "reused (a cache of more sites; asked: layers.1.resid_mid)" in " ".join(again.stdout.split())
    assert json.loads((results_dir / "sub" / "run_config.json").read_text())["activation_cache"] == wide

    def train(name: str, *extra: str) -> dict:
        res = cli(train_args(None, name, "--hookpoints", "layers.1.resid_mid", *data, "--max_steps", "6", *extra))
        assert res.exit_code == 0, res.stderr
        return json.loads((results_dir / name / "dictionaries" / "layers.1.resid_mid" / "cfg.json").read_text())

    cfg = train("reusing")
    assert cfg["metadata"]["activation_cache"] == wide and _store_dirs(store) == [Path(wide).name]
    cfg = train("exact", "--overwrite", "cache")
    exact = cfg["metadata"]["activation_cache"]
    assert exact != wide and sorted(_store_dirs(store)) == sorted([Path(wide).name, Path(exact).name])
    assert ActivationCache.open(exact).hookpoints == ["layers.1.resid_mid"]
    weights = [load_file(results_dir / n / "dictionaries" / "layers.1.resid_mid" / "dictionary.safetensors")
               for n in ("reusing", "exact")]
    assert weights[0].keys() == weights[1].keys() and weights[0]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    # A transcoder from resid_mid to the MLP output of the same block.
    res = cli(train_args(None, "tc", "--hookpoints", "layers.1.resid_mid:layers.1.mlp", "--architecture",
                         "transcoder", *data, "--max_steps", "4"))
    assert res.exit_code == 0, res.stderr
    cfg = json.loads(next((results_dir / "tc" / "dictionaries").glob("*/cfg.json")).read_text())
    assert cfg["sites"]["inputs"] == ["layers.1.resid_mid"] and cfg["sites"]["outputs"] == ["layers.1.mlp"]


def test_cli_names_a_truncated_shard(cli, results_dir):
    assert cli("cache", TINY, *COMMON, "--name", "a", "--verbose", "false").exit_code == 0
    path = json.loads((results_dir / "a" / "run_config.json").read_text())["activation_cache"]
    shard = Path(path) / "tokens" / "000001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    cli("cache", TINY, *COMMON, "--name", "b").assert_user_error("tokens/000001.safetensors", "truncated")


def test_cli_warns_in_one_line_when_data_runs_out(cli, results_dir):
    result = cli("cache", TINY, "--hookpoints", "layers.0", "--dataset_repo", "news-sample", "--dataset_split",
                 "train[:2]", "--n_tokens", "100000", "--cache_ctx_len", "32", "--name", "x", "--verbose", "false")
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1 and "ran out" in warnings[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--hookpoints", "layers.9"], ["layers.9"]),
        (["--hookpoints", "layers.0", "--dataset_repo", "no/such/dataset/here"], ["no/such/dataset/here", "wikipedia-sample"]),
        (["--hookpoints", "layers.0", "--dataset_repo", "news-sample", "--dataset_column", "body"], ["'body'", "columns: text"]),
        (["--hookpoints", "layers.0", "--dataset_repo", "news-sample", "--dataset_split", "test"], ["'test'", "train"]),
        (["--hookpoints", "layers.0", "--dataset_repo", "missing.jsonl"], ["missing.jsonl", "does not exist"]),
        (["--hookpoints", "layers.0", "--dtype", "int8"], ["int8", "float16"]),
        (["--hookpoints", "layers.0", "--n_tokens", "0"], ["--n_tokens", "0"]),
        (["--hookpoints", "layers.0", "--cache_ctx_len", "1"], ["--cache_ctx_len"]),
        (["--hookpoints", "layers.0", "--overwrite", "everything"], ["everything", "cache"]),
        (["--dataset_repo", "news-sample"], ["--hookpoints"]),
        (["--hookpoints", "layers.0", "--model", "other-model"], ["two models"]),
    ],
)
def test_cli_bad_inputs_are_one_line_errors(cli, args, fragments):
    cli("cache", TINY, *args, "--name", "bad").assert_user_error(*fragments)


def test_cli_missing_name_and_missing_model(cli, tmp_path):
    cli("cache", TINY, "--hookpoints", "layers.0").assert_user_error("--name")
    cli("cache", str(tmp_path / "no-model"), "--hookpoints", "layers.0", "--name", "x").assert_user_error("no-model")


@pytest.mark.slow
def test_kill_and_resume_is_byte_identical(tmp_path, results_dir):
    """SIGKILL a real `saelab cache` after some shards, resume it, compare with an uninterrupted run."""
    args = [sys.executable, "-m", "saelab", "cache", TINY, "--hookpoints", "layers.0", "layers.1.mlp",
            "--dataset_repo", "news-sample", "--n_tokens", "12000", "--cache_ctx_len", "32",
            "--shard_size_tokens", "256", "--batch_size", "4", "--name", "k", "--verbose", "false"]
    # one intra-op thread: on a busy 2-core machine torch's thread pool is many times slower
    env = {**os.environ, "SAELAB_RESULTS_DIR": str(results_dir), "OMP_NUM_THREADS": "1"}
    store = results_dir / ".activations"
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed_at = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        manifests = list(store.glob(f"*/{MANIFEST}"))
        if manifests:
            try:
                shards = json.loads(manifests[0].read_text())["shards"]
            except (OSError, ValueError):
                shards = []
            if len(shards) >= 3:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed_at = manifests[0].parent
                break
        time.sleep(0.005)
    assert killed_at is not None, f"the run ended before it could be killed: {proc.communicate()}"
    manifest = json.loads((killed_at / MANIFEST).read_text())
    assert not manifest["complete"] and 3 <= len(manifest["shards"]) < manifest["n_sequences_target"] // 8
    listed = {e["path"] for s in manifest["shards"] for e in [s["files"]["tokens"], *s["files"]["activations"].values()]}
    before = {k: v for k, v in snapshot(killed_at).items() if k in listed}

    resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    after = snapshot(killed_at)
    assert all(after[k] == v for k, v in before.items())  # finished shards untouched (inode, mtime, bytes)

    ref_args = [*args[:-4], "--name", "ref", "--store", str(tmp_path / "ref"), "--verbose", "false"]
    ref = subprocess.run(ref_args, env=env, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    reference = snapshot(tmp_path / "ref" / killed_at.name)
    assert after.keys() == reference.keys() and all(after[k][2] == reference[k][2] for k in reference)
    cache = ActivationCache.open(killed_at, checksums=True)
    assert cache.build_info["status"] == "opened" and cache.n_tokens == 12000


@pytest.mark.parametrize(("exclude_positions", "exclude_bos"), [
    ((0, 1, 2, 3), False),
    ((1, -1), True),
    ((), True),
    ((-3, 2, 16, -17), False),  # 16 and -17 lie outside a 16-token window: they exclude nothing
])
def test_every_stage_keeps_the_same_positions(rows_cache, tokenizer, tmp_path, exclude_positions, exclude_bos):
    """The activation cache, the on-the-fly trainer stream, the latent cache and evaluation keep exactly the
    rows of one rule: negative positions count from the end, BOS dropped anywhere (GPT-2: mid-sequence too)."""
    from saelab import SiteSpec
    from saelab.dictionary import build_dictionary
    from saelab.evaluation import EvalConfig, evaluate
    from saelab.latents import build_latent_cache
    from saelab.training import LMSource

    tokens = rows_cache.tokens().long()
    bos = rows_cache.bos_token_id
    assert (tokens[:, 1:] == bos).any()  # BOS mid-sequence, as a document separator
    ctx = rows_cache.ctx_len
    excluded = {p if p >= 0 else p + ctx for p in exclude_positions if -ctx <= p < ctx}
    hashes = window_hash(tokens)
    expected = sorted((int(hashes[s]), p) for s in range(tokens.shape[0]) for p in range(ctx)
                      if p not in excluded and not (exclude_bos and tokens[s, p] == bos))

    args = {"exclude_positions": exclude_positions, "exclude_bos": exclude_bos}
    cached = sorted((k[0], k[1]) for b in rows_cache.iter_batches(["layers.0"], 50, **args) for k in row_keys(b))
    assert cached == expected and rows_cache.n_rows(**args) == len(expected)

    source = FakeSource(tokenizer)
    stream = LMSource(source, lambda: iter(tokens), ["layers.0"], buffer_sequences=7, **args)
    assert stream.count_rows() == len(expected)
    stream.n_rows = len(expected)
    streamed = sorted((k[0], k[1]) for b in stream.batches(1, epoch=0, seed=0) for k in row_keys(b))
    assert streamed == expected

    dictionary = build_dictionary("topk", SiteSpec(inputs=["layers.0"], outputs=["layers.0"], d_in=4, d_out=4),
                                  {"d_sae": 8, "k": 2})
    with torch.no_grad():
        dictionary.W_enc.zero_()
        dictionary.b_enc.fill_(1.0)  # every latent fires on every row: k non-zeros per kept row
    latents = build_latent_cache(source, dictionary, tmp_path / "latents", activation_cache=rows_cache, n_splits=2,
                                 filter_bos=exclude_bos, exclude_positions=exclude_positions, progress=False)
    assert latents.n_analysed == len(expected) and latents.manifest["n_nonzeros"] == 2 * len(expected)
    assert latents.exclude_positions == sorted(excluded)

    config = EvalConfig(batch_size=8, downstream=False, exclude_positions=exclude_positions, exclude_bos=exclude_bos)
    metrics = evaluate({"d": dictionary}, source, list(tokens), config)["d"]
    assert metrics["tokens"] == len(expected) and metrics["tokens_all"] == tokens.numel()

