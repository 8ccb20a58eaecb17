"""The paired activation cache of two models: labelled sites, one pass and two passes, resume, the checks."""

from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from cache_helpers import snapshot
from fixtures.tiny_models import TINY_GPT2, TINY_LLAMA
from saelab import UsageError
from saelab.activation_cache import MANIFEST, ActivationCache, build_activation_cache, fingerprint_inputs
from saelab.data import load_dataset_source
from saelab.models import load_activation_source
from saelab.paired import TOKENIZER_CHECK_WINDOWS, PairedSource, label_site, split_site

TINY = str(TINY_GPT2)


pytestmark = pytest.mark.usefixtures("one_thread_module")


def make_variant(out: Path, *, noise_seed: int | None = None, **config: int) -> Path:
    """A GPT-2 model directory with tiny-gpt2's tokenizer: tiny-gpt2's weights plus seeded noise, or a
    new random model with ``config`` changed (fewer layers, another width)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if config:
        cfg = GPT2Config.from_pretrained(TINY_GPT2)
        for key, value in config.items():
            setattr(cfg, key, value)
        torch.manual_seed(7)
        model = GPT2LMHeadModel(cfg)
    else:
        model = GPT2LMHeadModel.from_pretrained(TINY_GPT2)
    if noise_seed is not None:
        gen = torch.Generator().manual_seed(noise_seed)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=gen))
    out.mkdir(parents=True)
    model.eval().save_pretrained(str(out), safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_GPT2 / name, out / name)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "b": make_variant(root / "b" / "tiny-gpt2-b", noise_seed=1),
        "b_other_weights": make_variant(root / "b2" / "tiny-gpt2-b", noise_seed=2),
        "one_layer": make_variant(root / "one-layer", n_layer=1),
        "narrow": make_variant(root / "narrow", n_embd=32),
    }


@pytest.fixture(scope="module")
def news():
    return load_dataset_source("news-sample")


def load(path: Path | str):
    return load_activation_source(str(path), device="cpu")


def pair(model_b: Path | str, model_a: Path | str = TINY) -> PairedSource:
    return PairedSource({"A": load(model_a), "B": load(model_b)})


SITES = ["layers.1@A", "layers.0@B", "layers.1@B"]


def build(source, news, store: Path, **kw) -> ActivationCache:
    args = {"n_tokens": 2000, "ctx_len": 32, "batch_size": 4, "store": store, "shard_size_tokens": 256,
            "progress": False}
    args.update(kw)
    return build_activation_cache(source, news, SITES, **args)


def counting(source, calls: list[str], label: str, fail_at: int | None = None) -> None:
    """Make ``source.activations`` record each call under ``label`` (and raise at call ``fail_at``)."""
    inner = source.activations

    def activations(ids, hookpoints, attention_mask=None):
        if fail_at is not None and calls.count(label) == fail_at:
            raise RuntimeError(f"killed in model {label}'s pass")
        calls.append(label)
        return inner(ids, hookpoints, attention_mask)

    source.activations = activations


def one_line_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message.strip()
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# ------------------------------------------------------------------------------------------ site names


def test_site_labels():
    assert label_site("layers.6", "A") == "layers.6@A"
    assert split_site("layers.6@B") == ("layers.6", "B")
    assert split_site("layers.6.mlp") == ("layers.6.mlp", None)
    with pytest.raises(UsageError, match="bad paired site 'layers.6@'"):
        split_site("layers.6@")
    with pytest.raises(UsageError, match="bad model label 'a b'"):
        label_site("layers.6", "a b")


# ------------------------------------------------------------------------------------------ one pass


def test_one_pass_holds_both_models_over_one_tokenisation(models, news, tmp_path):
    source = pair(models["b"])
    cache = build(source, news, tmp_path / "store")
    assert cache.hookpoints == SITES and cache.n_sequences == 63 and len(cache.shards) == 8
    assert sorted(p.name for p in (cache.path / "activations").iterdir()) == sorted(SITES)
    assert len(list((cache.path / "tokens").iterdir())) == len(cache.shards)  # tokens stored once
    assert set(cache.manifest["model"]) == {"A", "B"}
    assert cache.manifest["model"]["B"]["weights_sha256"] == load(models["b"]).identity()["weights_sha256"]
    tokens = cache.tokens().long()
    single = {"A": load(TINY), "B": load(models["b"])}
    expected = {**{f"{hp}@A": a for hp, a in single["A"].activations(tokens, ["layers.1"]).items()},
                **{f"{hp}@B": a for hp, a in single["B"].activations(tokens, ["layers.0", "layers.1"]).items()}}
    for site in SITES:
        got = torch.cat([acts[site] for _, acts in cache.iter_sequences([site], 16)])
        torch.testing.assert_close(got, expected[site], rtol=1e-5, atol=1e-5)
    assert (expected["layers.1@A"] - expected["layers.1@B"]).abs().max() > 0.1  # the models differ


def test_paired_source_runs_each_model_once_per_batch(models):
    source = pair(models["b"])
    calls: list[str] = []
    for label in ("A", "B"):
        counting(source.source(label), calls, label)
    ids = torch.randint(0, 2048, (2, 8))
    out = source.activations(ids, ["layers.1@B", "layers.0@A", "layers.0@B"])
    assert list(out) == ["layers.1@B", "layers.0@A", "layers.0@B"] and calls == ["B", "A"]
    single = source.source("A").hookpoints()
    assert source.hookpoints() == [f"{hp}@A" for hp in single] + [f"{hp}@B" for hp in single]
    assert source.hookpoint_dim("layers.1@B") == 64 and source.tokenizer is source.source("A").tokenizer
    logits = source.logits(ids, {"layers.0@B": lambda t: t})
    torch.testing.assert_close(logits, source.source("B").logits(ids))
    with pytest.raises(UsageError, match="sites of models A, B"):
        source.logits(ids, {"layers.0@B": lambda t: t, "layers.0@A": lambda t: t})


def test_fingerprint_covers_both_models_and_their_weights(models, news):
    def inputs(source):
        return fingerprint_inputs(source, news, SITES, n_tokens=2000, ctx_len=32)

    base = inputs(pair(models["b"]))
    assert base["model"]["A"] == load(TINY).identity() and base["model"]["B"] == load(models["b"]).identity()
    other_weights = inputs(pair(models["b_other_weights"]))  # same directory name, other weights
    assert other_weights["model"]["B"]["model"] == base["model"]["B"]["model"]
    assert other_weights != base
    assert inputs(pair(TINY)) != base  # another model B
    assert inputs(pair(models["b"])) == base


# ------------------------------------------------------------------------------------------ two passes


def test_two_pass_builds_the_same_cache_one_model_at_a_time(models, news, tmp_path):
    one = build(pair(models["b"]), news, tmp_path / "one")
    model_a = load(TINY)
    a_alive = weakref.ref(model_a)
    source = PairedSource({"A": model_a, "B": load(models["b"])})
    del model_a
    calls: list[str] = []
    counting(source.source("A"), calls, "A")
    a_gone_when_b_ran = []
    inner = source.source("B").activations

    def b_activations(ids, hookpoints, attention_mask=None):
        a_gone_when_b_ran.append(a_alive() is None)
        calls.append("B")
        return inner(ids, hookpoints, attention_mask)

    source.source("B").activations = b_activations
    two = build(source, news, tmp_path / "two", paired_pass="two")
    assert calls == ["A"] * 16 + ["B"] * 16  # 8 shards of 2 batches, model A's pass first
    assert all(a_gone_when_b_ran)  # model A was released before model B ran
    assert two.path.name == one.path.name == two.fingerprint == one.fingerprint
    assert two.manifest["fingerprint_inputs"] == one.manifest["fingerprint_inputs"]
    first, second = snapshot(one.path), snapshot(two.path)
    assert first.keys() == second.keys() and len(first) == 8 * 4
    assert all(first[k][2] == second[k][2] for k in first)  # byte-identical shard files
    again = build(pair(models["b"]), news, tmp_path / "two")  # one pass finds the two-pass cache
    assert again.build_info["status"] == "reused" and again.path == two.path


def test_two_pass_resumes_after_a_kill_in_model_b_pass(models, news, tmp_path):
    reference = build(pair(models["b"]), news, tmp_path / "one")
    store = tmp_path / "two"
    killed = pair(models["b"])
    counting(killed.source("B"), [], "B", fail_at=5)  # 2 shards of 2 batches, then a kill mid-shard
    with pytest.raises(RuntimeError, match="killed in model B's pass"):
        build(killed, news, store, paired_pass="two")
    directory = store / reference.path.name
    manifest = json.loads((directory / MANIFEST).read_text())
    assert not manifest["complete"] and len(manifest["shards"]) == 8
    assert [sorted(s["files"]["activations"]) for s in manifest["shards"]] == \
        [sorted(SITES)] * 2 + [["layers.1@A"]] * 6  # a shard counts for B once all its B files are listed
    assert sorted(p.name for p in (directory / "activations" / "layers.1@B").iterdir()) == \
        ["000000.safetensors", "000001.safetensors"]
    with pytest.raises(UsageError, match="is incomplete"):
        ActivationCache.open(directory)
    before = snapshot(directory)
    resumed_source = pair(models["b"])
    calls: list[str] = []
    for label in ("A", "B"):
        counting(resumed_source.source(label), calls, label)
    resumed = build(resumed_source, news, store, paired_pass="two")
    assert calls == ["B"] * 12  # model A's shards are not recomputed; B's 6 missing shards are
    assert resumed.build_info["status"] == "resumed" and resumed.path == directory
    after = snapshot(directory)
    assert all(after[k][:2] == before[k][:2] for k in before)  # files written before the kill untouched
    expected = snapshot(reference.path)
    assert after.keys() == expected.keys() and all(after[k][2] == expected[k][2] for k in expected)


def test_one_pass_completes_a_cache_a_two_pass_run_left(models, news, tmp_path):
    store = tmp_path / "store"
    killed = pair(models["b"])
    counting(killed.source("B"), [], "B", fail_at=0)
    with pytest.raises(RuntimeError):
        build(killed, news, store, paired_pass="two")
    source = pair(models["b"])
    calls: list[str] = []
    for label in ("A", "B"):
        counting(source.source(label), calls, label)
    cache = build(source, news, store)
    assert calls == ["B"] * 16
    reference = build(pair(models["b"]), news, tmp_path / "one")
    assert snapshot(cache.path).keys() == snapshot(reference.path).keys()
    for site in SITES:
        assert torch.equal(cache.shard_activations(site, 7), reference.shard_activations(site, 7))


def test_two_passes_need_two_models(news, tmp_path):
    with pytest.raises(UsageError, match="--paired_pass two needs two models"):
        build_activation_cache(load(TINY), news, ["layers.1"], n_tokens=64, ctx_len=32, batch_size=4,
                               store=tmp_path, progress=False, paired_pass="two")
    with pytest.raises(UsageError, match="bad --paired_pass 'three'; accepted: one, two"):
        build_activation_cache(load(TINY), news, ["layers.1"], n_tokens=64, ctx_len=32, batch_size=4,
                               store=tmp_path, progress=False, paired_pass="three")


# ------------------------------------------------------------------------------------------ checks


def test_tokenizer_mismatch_is_one_line_before_any_shard(news, tmp_path):
    source = pair(TINY_LLAMA)
    with pytest.raises(UsageError) as excinfo:
        build(source, news, tmp_path / "store")
    one_line_error(excinfo, "model A (", "tiny-gpt2)", "model B (", "tiny-llama)", "window 0, position 0", "token 0 ('<|endoftext|>')",
                   "has 1 ('<s>')", f"first {TOKENIZER_CHECK_WINDOWS} windows")
    assert not list((tmp_path / "store").rglob("*.safetensors"))


def test_tokenizer_mismatch_inside_a_window(news, tmp_path):
    """Same BOS, one body token split differently: the error points into the window."""
    from transformers import AutoTokenizer

    source = pair(TINY)
    tokenizer_b = AutoTokenizer.from_pretrained(TINY)
    tokenizer_b.add_tokens([" the"])  # a new id for a frequent word
    source.source("B").tokenizer = tokenizer_b
    with pytest.raises(UsageError) as excinfo:
        source.check_tokenizers(news, build_window_spec(source, 32))
    message = one_line_error(excinfo, "window 0, position ", "A has token ", "has 2048 (' the')")
    assert "position 0:" not in message


def build_window_spec(source, ctx_len):
    from saelab.data import WindowSpec

    return WindowSpec.for_tokenizer(source.tokenizer, ctx_len)


def test_width_mismatch_is_one_line(models):
    source = pair(models["narrow"])
    with pytest.raises(UsageError) as excinfo:
        source.check_widths(["layers.1"])
    one_line_error(excinfo, "hookpoint 'layers.1'", "64 in model A", "32 in model B (", "narrow)", "same width")
    pair(models["b"]).check_widths(["layers.1", "layers.0@B"])  # equal widths pass


def test_a_hookpoint_model_b_lacks_is_one_line(models, news, tmp_path):
    source = pair(models["one_layer"])
    with pytest.raises(UsageError) as excinfo:
        build(source, news, tmp_path / "store")
    one_line_error(excinfo, "site 'layers.1@B'", "model B (", "one-layer", "no hookpoint 'layers.1'",
                   "N in 0..0")
    with pytest.raises(UsageError) as excinfo:
        source.check_hookpoints(["layers.1"])
    one_line_error(excinfo, "site 'layers.1' names no model", "layers.1@A, layers.1@B")
    with pytest.raises(UsageError) as excinfo:
        source.check_hookpoints(["layers.0@C"])
    one_line_error(excinfo, "no model labelled 'C'", "labels: A (", "B (")


# ------------------------------------------------------------------------------------------ CLI

COMMON = ["--hookpoints", "layers.1", "--dataset_repo", "news-sample", "--n_tokens", "1500",
          "--cache_ctx_len", "32", "--shard_size_tokens", "256", "--batch_size", "4"]


def test_cli_caches_two_models(cli, results_dir, models):
    res = cli("cache", TINY, "--model_b", str(models["b"]), *COMMON, "--name", "pair")
    assert res.exit_code == 0, res.stderr
    text = " ".join(res.stdout.split())
    assert "model A" in text and "model B" in text and str(models["b"].name) in text
    assert "layers.1@A (d=64)" in text and "layers.1@B (d=64)" in text
    config = json.loads((results_dir / "pair" / "run_config.json").read_text())
    cache = ActivationCache.open(config["activation_cache"], checksums=True)
    assert cache.hookpoints == ["layers.1@A", "layers.1@B"] and cache.n_tokens == 1504
    single = load(models["b"]).activations(cache.tokens().long(), ["layers.1"])["layers.1"]
    got = torch.cat([acts["layers.1@B"] for _, acts in cache.iter_sequences(["layers.1@B"], 64)])
    torch.testing.assert_close(got, single, rtol=1e-5, atol=1e-5)
    two = cli("cache", TINY, "--model_b", str(models["b"]), *COMMON, "--paired_pass", "two", "--name", "pair2")
    assert two.exit_code == 0, two.stderr
    assert "reused" in two.stdout
    assert json.loads((results_dir / "pair2" / "run_config.json").read_text())["activation_cache"] == \
        config["activation_cache"]


def test_cli_paired_errors(cli, models):
    cli("cache", TINY, "--model_b", str(models["narrow"]), *COMMON, "--name", "w").assert_user_error(
        "hookpoint 'layers.1' has different widths", "32 in model B")
    cli("cache", TINY, "--model_b", str(TINY_LLAMA), *COMMON, "--name", "t").assert_user_error(
        "disagree at window 0, position 0")
    cli("cache", TINY, "--model_b", str(models["one_layer"]), *COMMON, "--name", "m").assert_user_error(
        "site 'layers.1@B'", "no hookpoint 'layers.1'")
    cli("cache", TINY, *COMMON, "--paired_pass", "two", "--name", "s").assert_user_error(
        "--paired_pass two needs two models")


def test_cli_trains_a_crosscoder_on_two_models(cli, results_dir, models):
    """``saelab train MODEL --model_b B --hookpoints layers.1 --architecture crosscoder``: one crosscoder over
    ``layers.1@A`` and ``layers.1@B`` trained on the paired cache, both models recorded in its cfg.json; the
    paired cache is the one ``saelab cache --model_b`` builds."""
    from saelab.dictionary import load_dictionary

    res = cli("train", TINY, "--model_b", str(models["b"]), *COMMON, "--architecture", "crosscoder",
              "-o", "d_sae", "32", "-o", "activation", "batchtopk", "-o", "k", "4", "--train_batch_size", "64",
              "--max_steps", "3", "--name", "xc")
    assert res.exit_code == 0, res.stderr
    directory = results_dir / "xc" / "dictionaries" / "layers.1"
    cfg = json.loads((directory / "cfg.json").read_text())
    assert cfg["sites"]["inputs"] == cfg["sites"]["outputs"] == ["layers.1@A", "layers.1@B"]
    assert cfg["metadata"]["models"] == {"A": TINY, "B": str(models["b"])}
    module = load_dictionary(directory)
    assert module.name == "crosscoder" and module.W_dec.shape == (2, 32, 64)
    cached = cli("cache", TINY, "--model_b", str(models["b"]), *COMMON, "--name", "pair")
    assert "reused" in cached.stdout
    assert json.loads((results_dir / "xc" / "run_config.json").read_text())["activation_cache"] == \
        json.loads((results_dir / "pair" / "run_config.json").read_text())["activation_cache"]
    # evaluate loads both models from cfg.json: per model, its site spliced in against its own clean forward
    res = cli("evaluate", str(results_dir / "xc"), "--n_tokens", "128", "--batch_size", "2")
    assert res.exit_code == 0, res.stderr
    metrics = json.loads((directory / "eval.json").read_text())["metrics"]
    assert set(metrics["per_model"]) == {"A", "B"} and "ce_spliced" not in metrics
    site_a, site_b = metrics["per_site"]
    assert (site_a["site"], site_b["site"]) == ("layers.1@A", "layers.1@B")
    for label, site in (("A", site_a), ("B", site_b)):
        assert site["ce_spliced"] == pytest.approx(metrics["per_model"][label]["ce_spliced"])
    assert metrics["per_model"]["A"]["ce_clean"] != pytest.approx(metrics["per_model"]["B"]["ce_clean"])
    assert metrics["diffing"]["a_sites"] == ["layers.1@A"] and (directory / "diffing.json").is_file()
    # saelab latents loads model B from cfg.json too: latent records of the two-model crosscoder
    res = cli("latents", TINY, str(directory), "--name", "lat", "--dataset_repo", "news-sample", "--n_tokens", "1024",
              "--cache_ctx_len", "32", "--batch_size", "8", "--n_splits", "2", "--min_examples", "2",
              "--n_examples_train", "2", "--n_examples_test", "1", "--n_non_activating", "1", "--example_ctx_len", "8",
              "--max_latents", "4", "--verbose", "false")
    assert res.exit_code == 0, res.stderr
    from saelab.records import LatentRecord

    records = sorted((results_dir / "lat" / "latents").glob("*/records/latent_*.json"))
    assert records, res.stdout
    record = LatentRecord.load(records[0])
    assert list(record.decoder_norms) == ["layers.1@A", "layers.1@B"]  # the report's per-site bar chart
    norms = module.W_dec[:, record.latent].norm(dim=-1)
    assert list(record.decoder_norms.values()) == pytest.approx(norms.tolist(), rel=1e-5)
    # saelab run (dry run: no LLM call) on the same dictionary reuses the latent cache; the report draws the chart
    run = cli("run", TINY, str(directory), "--name", "lat", "--dataset_repo", "news-sample", "--n_tokens", "1024",
              "--cache_ctx_len", "32", "--batch_size", "8", "--n_splits", "2", "--min_examples", "2",
              "--n_examples_train", "2", "--n_examples_test", "1", "--n_non_activating", "1", "--example_ctx_len", "8",
              "--max_latents", "4", "--verbose", "false", "--explainer_provider", "openai",
              "--explainer_api_base_url", "http://127.0.0.1:1/v1", "--dry_run",
              env={"OPENAI_API_KEY": "sk-test", "HF_TOKEN": None})
    assert run.exit_code == 0, run.stderr
    assert cli("report", "lat").exit_code == 0
    page = next((results_dir / "lat" / "report").rglob(f"latent_{record.latent}.html")).read_text()
    assert 'id="decoder-norms"' in page and "layers.1@B" in page
    assert "model (layers.1)" in page  # the bars are labelled by model, not both "1"
    # --diffing_class restricts the run to the latents of one class (site A vs site B)
    from saelab.diffing import CLASSES, class_latents

    by_class = {c: class_latents(module, c) for c in CLASSES}
    biggest = max(CLASSES, key=lambda c: len(by_class[c]))
    args = ["--dataset_repo", "news-sample", "--n_tokens", "1024", "--cache_ctx_len", "32", "--batch_size", "8",
            "--n_splits", "2", "--min_examples", "2", "--n_examples_train", "2", "--n_examples_test", "1",
            "--n_non_activating", "1", "--example_ctx_len", "8", "--max_latents", "3", "--verbose", "false",
            "--explainer_provider", "openai", "--explainer_api_base_url", "http://127.0.0.1:1/v1", "--dry_run"]
    env = {"OPENAI_API_KEY": "sk-test", "HF_TOKEN": None}
    run = cli("run", TINY, str(directory), "--name", "cls", "--diffing_class", biggest, *args, env=env)
    assert run.exit_code == 0, run.stderr
    (index,) = (results_dir / "cls" / "records").glob("*/index.json")
    chosen = [int(i) for i in json.loads(index.read_text())["latents"]]
    assert chosen and set(chosen) <= set(by_class[biggest][:3])
    cli("train", TINY, "--model_b", str(models["b"]), *COMMON[2:], "--architecture", "clt", "--layers", "0-1",
        "--name", "c").assert_user_error("architecture 'clt' reads one model's layers", "crosscoder")
    cli("train", TINY, "--model_b", str(models["narrow"]), *COMMON, "--architecture", "crosscoder",
        "--name", "w").assert_user_error("different widths")
