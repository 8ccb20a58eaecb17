"""Contract tests: every registered class of every plugin kind honours the generic plugin contract.

``EXPECTED_BUILTINS`` names the builtins each kind must register (so an empty or half-loaded registry
fails); ``PENDING_KINDS`` lists kinds whose builtins have not landed yet. Every kind in
``saelab.manager.KINDS`` must appear in exactly one of the two: when a kind's builtins land, move it
from ``PENDING_KINDS`` to ``EXPECTED_BUILTINS``; when a kind is added, add it to one of them.
"""

from __future__ import annotations

import inspect

import pytest
import saelab
from pydantic.fields import PydanticUndefined
from saelab import Options, manager
from saelab.errors import UsageError
from saelab.registry import normalise_name

EXPECTED_BUILTINS: dict[str, set[str]] = {
    "architecture": {"relu", "topk", "batchtopk", "matryoshka", "jumprelu", "transcoder", "skip-transcoder"},
    "dictionary_format": {"saelab", "saelens", "sparsify"},
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


def _registered() -> list[tuple[str, str]]:
    pairs = []
    for kind in manager.KINDS:
        for name in saelab.registry(kind).names():
            pairs.append((kind, name))
    manager.reset()
    return pairs


REGISTERED = _registered()


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
