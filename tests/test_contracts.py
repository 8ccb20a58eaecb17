"""Contract tests: every registered class of every plugin kind honours its kind's contract.

Two layers: the generic structural checks (``check_generic_contract``: base class, name, docstrings,
typed options, async methods), and behavioural checks per kind, parametrised over every registered
plugin of that kind and built through the factory the CLI uses: architectures train (the loss falls),
save/load and evaluate; scorers, explainers and providers answer against the local test LLM server;
samplers, non-activating sources, neighbour finders, datasets, models and formats do one real step;
and an unknown option key is a one-line error for every plugin. Third-party plugins registered in this
module (the example package in docs/plugins/example and the complete examples of
docs/plugins/hooks.md) get exactly the same checks as the builtins.

``EXPECTED_BUILTINS`` names the builtins each kind must register (so an empty or half-loaded registry
fails); ``PENDING_KINDS`` lists kinds whose builtins have not landed yet. Every kind in
``saelab.manager.KINDS`` must appear in exactly one of the two: when a kind's builtins land, move it
from ``PENDING_KINDS`` to ``EXPECTED_BUILTINS``; when a kind is added, add it to one of them.
"""

from __future__ import annotations

import inspect
import json
import math
import sys

import pytest
import saelab
import torch
from pydantic.fields import PydanticUndefined
from saelab import Options, manager
from saelab.errors import UsageError
from saelab.registry import normalise_name

EXPECTED_BUILTINS: dict[str, set[str]] = {
    "architecture": {"relu", "topk", "batchtopk", "matryoshka", "jumprelu", "transcoder", "skip-transcoder", "clt",
                     "transcoder_set", "crosscoder"},
    "dictionary_format": {"saelab", "saelens", "sparsify", "circuit-tracer", "dictionary-learning"},
    "activation_source": {"transformers", "smollm2"},
    "dataset": {"wikipedia-sample", "news-sample", "huggingface", "local-files"},
    "sampler": {"top", "random", "quantiles", "mix"},
    "neighbour_finder": {"co-occurrence", "decoder_similarity", "encoder_similarity"},
    "explainer": {"default", "contrastive", "single-token", "np_max_act"},
    "scorer": {"detection", "fuzz", "simulation", "surprisal", "embedding", "intruder"},
    "provider": {"transformers", "openai", "litellm"},
}
"""Builtin names each kind must register (matched case-insensitively)."""

PENDING_KINDS: dict[str, str] = {
    "non_activating_source": "random/neighbours/FAISS sources (auto-interpretation issue)",
}
"""Kinds whose builtins are not written yet, with what is expected there."""

EXPECTED_COMMANDS: set[str] = {"plugins", "cache", "hookpoints", "train", "evaluate", "convert"}
"""Builtin commands that must be registered."""

KIND_METHODS: dict[str, tuple[str, ...]] = {
    "architecture": ("encode", "decode"),
    "dictionary_format": ("detect", "load"),
    "activation_source": ("identity", "hookpoints", "hookpoint_dim", "activations", "logits"),
    "dataset": ("texts", "identity"),
    "sampler": ("sample",),
    "non_activating_source": ("non_activating",),
    "neighbour_finder": ("neighbours",),
    "explainer": ("explain",),
    "scorer": ("score",),
    "provider": ("generate",),
}
"""Methods a class of each kind must implement itself (not inherit from the base class)."""

ASYNC_METHODS: dict[str, tuple[str, ...]] = {"explainer": ("explain",), "scorer": ("score",), "provider": ("generate",)}
"""Methods that must stay coroutine functions (the pipeline awaits them concurrently)."""


def check_generic_contract(kind: str, cls: type) -> None:
    """Assert the checks every registered class must pass (also used for third-party examples)."""
    spec = manager.KINDS[kind]
    assert isinstance(cls, type) and issubclass(cls, spec.base), f"{cls} is not a {spec.base.__name__}"
    name = getattr(cls, "name", None)
    assert isinstance(name, str) and name.strip() == name and name, f"{cls} has no usable `name`"
    assert all(isinstance(a, str) and a for a in cls.aliases), f"{cls} has bad aliases {cls.aliases!r}"
    doc = cls.__dict__.get("__doc__")
    assert doc and doc.strip(), f"{cls.__qualname__} has no docstring of its own"
    assert cls.summary(), f"{cls.__qualname__} has an empty summary"
    assert not inspect.isabstract(cls), f"{cls.__qualname__} leaves abstract methods: {cls.__abstractmethods__}"

    model = cls.Options
    assert isinstance(model, type) and issubclass(model, Options), f"{cls.__qualname__}.Options is not an Options"
    assert model.model_config.get("extra") == "forbid"
    for field_name, field in model.model_fields.items():
        assert field.description and field.description.strip(), (
            f"{cls.__qualname__}.Options.{field_name} has no docstring/description")
    required = [n for n, f in model.model_fields.items() if f.is_required() or f.default is PydanticUndefined]
    probe = {n: None for n in required}
    with pytest.raises(UsageError, match="no_such_option_xyz"):
        model.parse({**probe, "no_such_option_xyz": 1})
    if not required:
        model.parse({})  # defaults must validate

    for method in KIND_METHODS.get(kind, ()):
        impl = getattr(cls, method, None)
        assert callable(impl), f"{cls.__qualname__} has no {method}()"
        assert getattr(impl, "__isabstractmethod__", False) is False
        if kind == "architecture":
            assert impl is not getattr(spec.base, method), f"{cls.__qualname__} does not implement {method}()"
    for method in ASYNC_METHODS.get(kind, ()):
        assert inspect.iscoroutinefunction(getattr(cls, method)), f"{cls.__qualname__}.{method} must be async"


EXAMPLE_MODULES: dict[str, str] = {"shout": "saelab_shout.plugin", "shout-provider": "saelab_shout.provider",
                                    "shout-scorer": "saelab_shout.scorer"}
"""The example package's plugins (entry-point name -> module), registered in code here."""
DOCS_HOOK_CLASSES = ("TiedReLU", "NpzFormat", "TailSampler", "FirstWindows", "IndexDistance", "OneWord",
                     "OverlapScorer", "EchoProvider")
"""The complete examples of docs/plugins/hooks.md checked here (``MambaSource`` is a sketch, and its
``shout`` dataset is the example package's)."""


class ClassesPlugin:
    """A plugin object registering given classes, each through its kind's hook."""

    def __init__(self, classes: list[type]):
        self.classes = classes

    def _register(self, kind: str, register) -> None:
        for cls in self.classes:
            if issubclass(cls, manager.KINDS[kind].base):
                register(cls)

    @saelab.hookimpl
    def register_architectures(self, register):
        self._register("architecture", register)

    @saelab.hookimpl
    def register_dictionary_formats(self, register):
        self._register("dictionary_format", register)

    @saelab.hookimpl
    def register_samplers(self, register):
        self._register("sampler", register)

    @saelab.hookimpl
    def register_non_activating_sources(self, register):
        self._register("non_activating_source", register)

    @saelab.hookimpl
    def register_neighbour_finders(self, register):
        self._register("neighbour_finder", register)

    @saelab.hookimpl
    def register_explainers(self, register):
        self._register("explainer", register)

    @saelab.hookimpl
    def register_scorers(self, register):
        self._register("scorer", register)

    @saelab.hookimpl
    def register_providers(self, register):
        self._register("provider", register)


def register_third_party() -> list[str]:
    """Register the example package's plugins and the hooks.md examples in code; returns their names."""
    import importlib

    from plugin_helpers import EXAMPLE_DIR
    from test_docs_examples import HOOKS_MD, exec_markdown

    pm = saelab.get_plugin_manager()
    added = []
    if str(EXAMPLE_DIR) not in sys.path:
        sys.path.append(str(EXAMPLE_DIR))
    for name, module in EXAMPLE_MODULES.items():
        if pm.get_plugin(name) is None:  # not already installed (entry points) in this environment
            saelab.register_plugin(importlib.import_module(module), name=name)
            added.append(name)
    docs = exec_markdown(HOOKS_MD, "docs_hooks_contracts")
    saelab.register_plugin(ClassesPlugin([getattr(docs, n) for n in DOCS_HOOK_CLASSES]), name="docs-hooks")
    return [*added, "docs-hooks"]


def _registered() -> list[tuple[str, str]]:
    names = register_third_party()
    pairs = []
    for kind in manager.KINDS:
        for name in saelab.registry(kind).names():
            pairs.append((kind, name))
    for name in names:
        saelab.unregister_plugin(name)
    manager.reset()
    return pairs


REGISTERED = _registered()
"""Every registered (kind, name): builtins and the third-party plugins above."""


def names_of(kind: str) -> list[str]:
    """Registered names of one kind (parametrisation)."""
    return [name for k, name in REGISTERED if k == kind]


@pytest.fixture(autouse=True)
def third_party() -> None:
    """The third-party plugins are registered for every test of this module (conftest undoes it)."""
    register_third_party()


def test_every_kind_is_expected_or_pending():
    assert set(EXPECTED_BUILTINS).isdisjoint(PENDING_KINDS)
    assert set(EXPECTED_BUILTINS) | set(PENDING_KINDS) == set(manager.KINDS)


@pytest.mark.parametrize("kind", sorted(EXPECTED_BUILTINS))
def test_expected_builtins_are_registered(kind):
    registry = saelab.registry(kind)
    assert len(registry) > 0, f"the {kind} registry is empty"
    missing = {n for n in EXPECTED_BUILTINS[kind] if n not in registry}
    assert not missing, f"builtin {kind}s missing: {sorted(missing)}; registered: {registry.names()}"
    for name in EXPECTED_BUILTINS[kind]:
        assert registry.entry(name).cls.__module__.startswith("saelab.plugins."), name


@pytest.mark.parametrize(("kind", "name"), REGISTERED, ids=[f"{k}:{n}" for k, n in REGISTERED])
def test_registered_class_contract(kind, name):
    registry = saelab.registry(kind)
    entry = registry.entry(name)
    check_generic_contract(kind, entry.cls)
    assert normalise_name(entry.name) == normalise_name(name)
    for alias in entry.aliases:
        assert registry.get(alias.upper()) is entry.cls


def test_dictionary_formats_do_not_claim_an_empty_directory(tmp_path):
    for entry in saelab.registry("dictionary_format").entries():
        assert entry.cls.detect(tmp_path) is False, entry.name


def test_accepts_returns_a_bool_without_raising():
    for kind in ("activation_source", "dataset"):
        for entry in saelab.registry(kind).entries():
            assert isinstance(entry.cls.accepts("definitely-not/a-thing-xyz.nothing"), bool), entry.name


def test_expected_commands_are_registered():
    from saelab.cli import build_cli

    commands = set(build_cli().commands)
    assert EXPECTED_COMMANDS <= commands, sorted(EXPECTED_COMMANDS - commands)


def test_the_contract_check_catches_violations():
    class UndocumentedOptions(Options):
        k: int = 3

    class GoodOptions(Options):
        k: int = 3
        """Documented."""

    class Undocumented(saelab.Scorer):
        name = "undocumented"
        Options = GoodOptions

        async def score(self, record, explanation, provider):
            return None

    class BadOptions(saelab.Scorer):
        """Has an undocumented option field."""

        name = "bad-options"
        Options = UndocumentedOptions

        async def score(self, record, explanation, provider):
            return None

    class SyncScorer(saelab.Scorer):
        """Implements score() synchronously."""

        name = "sync"
        Options = GoodOptions

        def score(self, record, explanation, provider):  # type: ignore[override]
            return None

    class Fine(saelab.Scorer):
        """A scorer that passes."""

        name = "fine"
        Options = GoodOptions

        async def score(self, record, explanation, provider):
            return None

    check_generic_contract("scorer", Fine)
    for broken, message in ((Undocumented, "docstring"), (BadOptions, "description"), (SyncScorer, "async")):
        with pytest.raises(AssertionError, match=message):
            check_generic_contract("scorer", broken)
    with pytest.raises(AssertionError):
        check_generic_contract("architecture", Fine)


# --------------------------------------------------------------------------------------------------
# Behaviour, per kind, through the factories the CLI uses

D = 64
"""Width of the tiny fixture models (and of the synthetic training data)."""
HOOK = "layers.0"
ALL_SCORE_METRICS_IN_UNIT_INTERVAL = ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "auc")
"""Metric names that are fractions; every other metric must be finite."""


def _run(coro):
    import asyncio

    return asyncio.run(coro)


@pytest.fixture(scope="module")
def llm_server():
    """The local test LLM server answering every saelab prompt sensibly (tests/llm_server.py)."""
    from llm_server import ScriptedLLMServer
    from pipeline_helpers import SmartHandler

    with ScriptedLLMServer(SmartHandler(explanation="cat")) as server:
        yield server


@pytest.fixture
def api_keys(monkeypatch):
    for env in ("OPENAI_API_KEY", "OPENROUTER_API_KEY"):
        monkeypatch.setenv(env, "sk-contract-test-key")


def make_provider_for(name: str, server) -> saelab.Provider:
    """Provider ``name`` through the run's factory: the tiny fixture model for local ones, else the server."""
    from fixtures.tiny_models import TINY_GPT2
    from saelab.pipeline import make_run_provider

    cls = saelab.registry("provider").get(name)
    fields = set(cls.Options.model_fields)
    if "device" in fields:  # a local model (transformers)
        return make_run_provider(name, model=str(TINY_GPT2), device="cpu", cache=False,
                                 extra={"max_tokens": 4} if "max_tokens" in fields else None)
    model = "openai/test-model" if cls.name == "litellm" else "test-model"
    extra = {k: v for k, v in {"max_retries": 0}.items() if k in fields}
    return make_run_provider(name, model=model, base_url=server.base_url if "base_url" in fields else None,
                             cache=False, extra=extra)


# ---- architectures


def _architecture_options(cls: type) -> dict:
    fields = cls.Options.model_fields
    options = {"d_sae": 128}
    if "k" in fields:
        options["k"] = 8
    return {k: v for k, v in options.items() if k in fields}


GEN = torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def eval_windows() -> list[torch.Tensor]:
    """128 tokens of held-out windows (Lee articles) for the tiny GPT-2, as ``saelab evaluate`` cuts them."""
    from latents_helpers import lee_dataset, tiny_source
    from saelab.evaluation import heldout_windows

    return list(heldout_windows(tiny_source(), lee_dataset(8), 32, 128, 0))
TRANSCODER_SITES = ("layers.0.mlp.input", "layers.0.mlp")
"""Sites given to an architecture that refuses to reconstruct its own input (transcoders)."""
LAYER_SITES = (("layers.0.self_attn.input", "layers.0.mlp.input", "layers.1.self_attn.input", "layers.1.mlp.input"),
               ("layers.0.self_attn", "layers.0.mlp", "layers.1.self_attn", "layers.1.mlp"))
"""Sites given to an architecture whose sites are layers (``per_layer_sites``: cross-layer transcoders): four
(input, output) pairs of the 2-layer fixture in forward order, so that the triangular indexing runs on more
than two layers."""


def build_architecture(name: str, options: dict | None = None):
    """Architecture ``name`` through the factory ``saelab train`` uses, on ``layers.0`` (an SAE) or, when it
    refuses identical input and output sites, on the tiny models' MLP (a transcoder); returns
    ``(module, (input site, output site))``."""
    from saelab.dictionary import build_dictionary

    cls = saelab.registry("architecture").get(name)
    options = {**_architecture_options(cls), **(options or {})}
    torch.manual_seed(0)
    if cls.per_layer_sites:
        inputs, outputs = LAYER_SITES
        sites = {"inputs": list(inputs), "outputs": list(outputs), "d_in": D, "d_out": D}
        return build_dictionary(name, sites, options), LAYER_SITES
    try:
        return build_dictionary(name, {"inputs": [HOOK], "outputs": [HOOK], "d_in": D, "d_out": D}, options), (HOOK, HOOK)
    except UsageError as exc:
        if "reconstructs another" not in str(exc):
            raise
    torch.manual_seed(0)
    inp, out = TRANSCODER_SITES
    return build_dictionary(name, {"inputs": [inp], "outputs": [out], "d_in": D, "d_out": D}, options), TRANSCODER_SITES


@pytest.mark.parametrize("name", names_of("architecture"))
def test_architecture_trains_saves_loads_and_evaluates(name, tmp_path, eval_windows):
    from saelab.dictionary import load_dictionary, save_dictionary
    from saelab.training import (
        TRAINING_LOG,
        DictionaryJob,
        TensorSource,
        Trainer,
        TrainerConfig,
        init_distributed,
    )
    from training_helpers import synthetic

    module, sites = build_architecture(name)
    inputs, outputs = ([s] if isinstance(s, str) else list(s) for s in sites)
    x, _ = synthetic(n=2048, d=D, n_features=256, active=4.0, scale=3.0)
    data = {HOOK: x} if inputs == outputs else {**{h: x for h in inputs},
                                                **{h: x @ torch.randn(D, D, generator=GEN) / 8 for h in outputs}}
    config = TrainerConfig.parse({"batch_size": 128, "max_steps": 32, "log_every": 4, "device": "cpu",
                                  "init_rows": 512, "exclude_positions": ()})
    out = tmp_path / "dict"
    job = DictionaryJob(name=name, module=module, out_dir=out)
    (result,) = Trainer([job], config, dist=init_distributed("cpu"), progress=False).fit(TensorSource(data))
    losses = [e["loss"] for e in map(json.loads, (out / TRAINING_LOG).read_text().splitlines()) if "loss" in e]
    assert len(losses) >= 4 and losses[-1] < 0.9 * losses[0], f"{name}: loss did not fall: {losses}"

    trained = result.module.eval()
    batch = x[:32, None].repeat(1, len(inputs), 1)
    loaded = load_dictionary(out)
    assert type(loaded) is type(trained)
    save_dictionary(loaded, tmp_path / "again")
    again = load_dictionary(tmp_path / "again")
    with torch.no_grad():
        expected = trained(batch)
        for other in (loaded, again):
            assert torch.equal(other.encode(batch), trained.encode(batch))
            assert torch.equal(other(batch).reconstruction, expected.reconstruction)
    # the evaluation stage `saelab evaluate` runs, on held-out windows of the tiny GPT-2
    from latents_helpers import tiny_source
    from saelab.evaluation import EvalConfig, evaluate

    config = EvalConfig.parse({"n_tokens": 128, "ctx_len": 32, "batch_size": 4})
    metrics = evaluate({name: loaded}, tiny_source(), eval_windows, config)[name]
    assert math.isfinite(metrics["fvu"]) and metrics["l0"] >= 0, metrics


# ---- scorers, explainers, providers against the local test LLM server


SCORER_OPTIONS = {"surprisal": {"batch_size": 2}}
"""Per-scorer options that keep the check small (local models: the tiny fixture)."""


@pytest.mark.parametrize("name", names_of("scorer"))
def test_scorer_predicts_every_example(name, llm_server, api_keys):
    from fixtures.tiny_models import TINY_GPT2
    from interp_helpers import make_record
    from saelab.pipeline import make_scorers
    from saelab.records import Explanation, ScoreResult

    cls = saelab.registry("scorer").get(name)
    options = dict(SCORER_OPTIONS.get(cls.name, {}))
    if cls.name == "surprisal":
        options["model"] = str(TINY_GPT2)
    (scorer,) = make_scorers([name], per_scorer={name: options} if options else None)
    provider = make_provider_for("openai", llm_server) if scorer.uses_provider else None
    record = make_record(n_test=5, n_non=5)
    explanation = Explanation(hookpoint=record.hookpoint, latent=record.latent, text="cat")
    result = _run(scorer.score(record, explanation if scorer.requires_explanation else None, provider))
    assert isinstance(result, ScoreResult), type(result)
    assert result.scorer == cls.name and (result.hookpoint, result.latent) == (record.hookpoint, record.latent)
    examples = len(record.test) + len(record.non_activating)
    if cls.requires_explanation:
        assert len(result.predictions) == examples, (len(result.predictions), examples)
        assert {p.example_id for p in result.predictions} == {e.id for e in record.test + record.non_activating}
    else:  # intruder-style scorers predict per prompt
        assert result.predictions and len(result.predictions) <= examples
    assert result.metrics and not result.errors
    for metric, value in result.metrics.items():
        if value is None:
            continue
        assert math.isfinite(value), (metric, value)
        if metric in ALL_SCORE_METRICS_IN_UNIT_INTERVAL:
            assert 0.0 <= value <= 1.0, (metric, value)


@pytest.mark.parametrize("name", names_of("explainer"))
def test_explainer_explains(name, llm_server, api_keys):
    from interp_helpers import make_record
    from saelab.pipeline import make_explainer
    from saelab.records import Explanation

    explainer = make_explainer(name)
    record = make_record()
    explanation = _run(explainer.explain(record, make_provider_for("openai", llm_server)))
    assert isinstance(explanation, Explanation), type(explanation)
    assert explanation.text.strip() and explanation.usable and not explanation.error
    assert (explanation.hookpoint, explanation.latent) == (record.hookpoint, record.latent)
    assert explanation.usage.calls >= 1


@pytest.mark.parametrize("name", names_of("provider"))
def test_provider_answers_and_counts_usage(name, llm_server, api_keys):
    from saelab.llm import Completion

    provider = make_provider_for(name, llm_server)
    before = len(llm_server.chat_requests)
    reply = _run(provider.generate([{"role": "system", "content": "You label latents."},
                                    {"role": "user", "content": "Example 1: the cat sat"}]))
    assert isinstance(reply, Completion), type(reply)
    assert reply.text.strip()
    assert reply.prompt_tokens > 0 and reply.completion_tokens > 0
    assert provider.usage is not None, f"{name} does not count usage"
    assert provider.usage.calls + provider.usage.cached_calls == 1
    fields = type(provider).Options.model_fields
    uses_server = "base_url" in fields and "device" not in fields  # local models run in-process
    assert len(llm_server.chat_requests) - before == (1 if uses_server else 0)


# ---- samplers, non-activating sources, neighbour finders (a real latent cache)


@pytest.fixture(scope="module")
def latent_cache(tmp_path_factory):
    """A latent cache of a random TopK dictionary on the tiny GPT-2 over a few Lee articles."""
    from latents_helpers import lee_dataset, tiny_dictionary, tiny_source
    from saelab.latents import build_latent_cache

    dictionary = tiny_dictionary()
    cache = build_latent_cache(tiny_source(), dictionary, tmp_path_factory.mktemp("contracts") / HOOK,
                               dataset=lee_dataset(), n_tokens=24 * 64, ctx_len=64, n_splits=2, progress=False)
    cache.dictionary = dictionary  # what `saelab run` hands the record builder next to the cache
    return cache


EXAMPLE_OPTIONS = {"min_examples": 12, "n_examples_train": 4, "n_examples_test": 4, "n_non_activating": 4,
                   "example_ctx_len": 16}


def _records(cache, **options):
    from latents_helpers import tiny_source
    from saelab.examples import RecordBuilder

    builder = RecordBuilder(cache, {**EXAMPLE_OPTIONS, "max_latents": 2, **options}, tokenizer=tiny_source().tokenizer,
                            dictionary=cache.dictionary)
    records = list(builder.iter_records())
    assert records, options
    return records


@pytest.mark.parametrize("name", names_of("sampler"))
def test_sampler_picks_distinct_candidates(name, latent_cache):
    from saelab.examples import candidate_windows

    sampler = saelab.resolve("sampler", name)({})
    latent = int(torch.tensor(latent_cache.stats()["latents"]["firing_count"]).argmax())
    candidates = candidate_windows(latent_cache.latent(latent), _geometry(latent_cache), 10)
    assert len(candidates) >= 8
    picked = torch.as_tensor(sampler.sample(candidates, 6, torch.Generator().manual_seed(0)))
    assert picked.dtype == torch.int64 and len(picked) == 6
    assert len(set(picked.tolist())) == 6 and all(0 <= i < len(candidates) for i in picked.tolist())
    records = _records(latent_cache, train_type=name, test_type=name)
    assert all(len(r.train) == 4 and all(e.source == sampler.name for e in r.train) for r in records)


def _geometry(cache):
    from saelab.examples import WindowGeometry

    return WindowGeometry(cache.ctx_len, EXAMPLE_OPTIONS["example_ctx_len"], 0, True)


@pytest.mark.parametrize("name", names_of("non_activating_source"))
def test_non_activating_source_gives_silent_windows(name, latent_cache):
    for record in _records(latent_cache, non_activating_source=name):
        assert record.non_activating, f"{name}: no non-activating examples for latent {record.latent}"
        assert all(not e.is_activating and max(e.activations) == 0 for e in record.non_activating)


@pytest.mark.parametrize("name", names_of("neighbour_finder"))
def test_neighbour_finder_finds_other_latents(name, latent_cache):
    for record in _records(latent_cache, non_activating_source="neighbours", neighbours_type=name):
        assert record.neighbours, f"{name}: no neighbours for latent {record.latent}"
        assert all(n.latent != record.latent and 0 <= n.latent < latent_cache.d_sae for n in record.neighbours)


# ---- datasets, models, formats


@pytest.fixture
def dataset_repos(tmp_path) -> dict[str, str]:
    """``--dataset_repo`` values for builtin datasets that read user data: a text file, a saved dataset."""
    (tmp_path / "docs.txt").write_text("first document\nsecond document\n")
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "train.jsonl").write_text('{"text": "a hub-style document"}\n{"text": "another"}\n')
    return {"local-files": str(tmp_path / "docs.txt"), "huggingface": str(tmp_path / "hub")}


@pytest.mark.parametrize("name", names_of("dataset"))
def test_dataset_yields_documents(name, dataset_repos):
    from saelab.data import load_dataset_source

    repo = dataset_repos.get(name, name)
    dataset = load_dataset_source(repo)
    assert dataset.name == saelab.registry("dataset").get(name).name
    first = next(iter(dataset.texts()))
    assert isinstance(first, str) and first.strip()
    json.dumps(dataset.identity())


MODEL_IDS = {"transformers": "tiny-gpt2"}
"""Model id per activation source (fixtures under tests/fixtures; others use their own name)."""


@pytest.mark.parametrize("name", names_of("activation_source"))
def test_activation_source_returns_activations(name):
    from fixtures.tiny_models import FIXTURES
    from saelab.models import load_activation_source

    model = str(FIXTURES / MODEL_IDS[name]) if name in MODEL_IDS else name
    source = load_activation_source(model)
    hookpoints = source.hookpoints()
    assert HOOK in hookpoints and source.n_layers >= 1
    ids = torch.tensor([source.tokenizer.encode("The cat sat on the mat and then it slept.")[:8]])
    acts = source.activations(ids, [HOOK])[HOOK]
    assert acts.shape == (1, ids.shape[1], source.hookpoint_dim(HOOK)) and torch.isfinite(acts).all()
    assert source.logits(ids, {}).shape[:2] == ids.shape
    json.dumps(source.identity())


@pytest.mark.parametrize("name", names_of("dictionary_format"))
def test_dictionary_format_loads_a_dictionary(name, tmp_path):
    from plugin_helpers import REPO_ROOT
    from saelab.dictionary import build_dictionary, load_dictionary

    cls = saelab.registry("dictionary_format").get(name)
    fmt = cls()
    if type(fmt).save is not saelab.DictionaryFormat.save:  # writable: round trip
        # a single-site SAE, else a 3-layer cross-layer transcoder (formats that hold only those: circuit-tracer)
        layers = [f"layers.{i}" for i in range(3)]
        candidates = [("topk", {"inputs": [HOOK], "outputs": [HOOK], "d_in": D, "d_out": D}, {}),
                      ("clt", {"inputs": [f"{h}.mlp.input" for h in layers], "outputs": [f"{h}.mlp" for h in layers],
                               "d_in": D, "d_out": D}, {"d_sae": 8, "activation": "relu"})]
        for arch, sites, options in candidates:
            if arch not in saelab.registry("architecture"):
                continue
            torch.manual_seed(0)
            module = build_dictionary(arch, sites, options or _architecture_options(
                saelab.registry("architecture").get(arch))).eval()
            try:
                fmt.save(module, tmp_path / arch)
            except saelab.UsageError:
                continue
            assert cls.detect(tmp_path / arch)
            loaded = fmt.load(tmp_path / arch)
            x = torch.randn(4, len(sites["inputs"]), D)
            with torch.no_grad():
                assert torch.equal(loaded(x).reconstruction, module(x).reconstruction)
            return
        pytest.fail(f"writable format {name!r} saves neither a single-site SAE nor a cross-layer transcoder")
    found = [p for p in (REPO_ROOT / "tests" / "fixtures" / "reference_dicts").rglob("*")
             if p.is_dir() and cls.detect(p)]
    if not found and name == "dictionary-learning":  # fixtures written to their documented layout at test time
        from test_dictionary_learning_format import their_state, write_trainer_dir

        found = [write_trainer_dir(tmp_path / "dictionary_learning", their_state(), batch_topk=False)]
    assert found, f"read-only format {name!r} detects none of the reference fixtures"
    loaded = load_dictionary(found[0], format=name)
    x = torch.randn(4, len(loaded.sites.inputs), loaded.sites.d_in)
    with torch.no_grad():
        assert loaded.encode(x).shape == (4, loaded.d_sae)


# ---- unknown option keys, every kind


def build_with_options(kind: str, name: str, options: dict, tmp_path) -> object:
    """Build plugin ``name`` of ``kind`` with ``options`` through the factory the CLI uses for that kind."""
    from fixtures.tiny_models import TINY_GPT2
    from saelab.models import load_activation_source
    from saelab.pipeline import make_explainer, make_run_provider, make_scorers

    cls = saelab.registry(kind).get(name)
    if kind == "architecture":
        return build_architecture(name, options)
    if kind == "explainer":
        return make_explainer(name, options)
    if kind == "scorer":
        return make_scorers([name], per_scorer={name: options})
    if kind == "provider":
        return make_run_provider(name, model="test-model", extra=options)
    if kind == "activation_source":
        return load_activation_source(str(TINY_GPT2) if name == "transformers" else name, **options)
    if kind in ("dataset", "dictionary_format"):  # no command passes them options: their model must reject
        return cls.Options.parse(options, where=f"{kind.replace('_', ' ')} {cls.name!r}")
    return cls(options)  # samplers, non-activating sources, neighbour finders: cls(mapping)


@pytest.mark.parametrize(("kind", "name"), REGISTERED, ids=[f"{k}:{n}" for k, n in REGISTERED])
def test_unknown_option_key_is_a_one_line_error(kind, name, tmp_path, api_keys):
    cls = saelab.registry(kind).get(name)
    with pytest.raises((UsageError, TypeError)) as info:
        build_with_options(kind, name, {"no_such_option_xyz": 1}, tmp_path)
    message = str(info.value)
    assert isinstance(info.value, UsageError), f"{kind} {name}: not a UsageError: {message}"
    assert "\n" not in message and "no_such_option_xyz" in message, message
    assert cls.name in message or name in message, f"the plugin is not named: {message}"
    accepted = sorted(cls.Options.model_fields)
    assert "accepted" in message and all(f in message for f in accepted[:3]), message
