"""Flags and typed options models cannot drift: a flag that maps to a field of its command's options model has
the field's default and the field's docstring as its help text, and the command hands the model those defaults."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from saelab.cli import build_cli
from saelab.cli_options import CacheCommandOptions, DataOptions
from saelab.evaluation import EvalConfig
from saelab.examples import ExampleOptions
from saelab.options import Options
from saelab.training import TrainerConfig

COMMAND_MODELS: dict[str, tuple[type[Options], ...]] = {
    "cache": (CacheCommandOptions,),
    "latents": (),  # filled below: the plugin's own model
    "run": (DataOptions, ExampleOptions),
    "explain": (DataOptions, ExampleOptions),
    "score": (DataOptions, ExampleOptions),
    "evaluate": (),  # the plugin's own model
    "train": (),  # the plugin's own model, and TrainerConfig under the trainer flags' names
}

PURE_CLI_FLAGS: dict[str, set[str]] = {
    "evaluate": {"as_json", "no_downstream"},  # --no_downstream is checked against `downstream` below
    "train": {"model_flag", "config"},  # --model is the MODEL argument's twin; --config reads a file of flags
}
"""Flags of the fully generated commands that map to no options-model field."""
FIELDS_WITHOUT_FLAG: dict[str, set[str]] = {
    "evaluate": {"downstream"},  # set by --no_downstream
    "train": {"model"},  # the MODEL argument (or --model)
}
"""Fields of those commands' models that no flag of the same name sets."""


def _models(command: str) -> tuple[type[Options], ...]:
    if command == "latents":
        from saelab.plugins.commands.latents import LatentsCommandOptions

        return (LatentsCommandOptions,)
    if command == "evaluate":
        from saelab.plugins.commands.evaluate import EvaluateCommandOptions

        return (EvaluateCommandOptions,)
    if command == "train":
        from saelab.plugins.commands.train import TrainCommandOptions

        return (TrainCommandOptions,)
    return COMMAND_MODELS[command]


def _trainer_fields() -> dict[str, str]:
    """``{click parameter name: TrainerConfig field}`` of ``saelab train``'s trainer flags."""
    from saelab.plugins.commands.train import TRAIN_FLAG_NAMES, TRAINER_FLAGS_FROM_SHARED

    return {TRAIN_FLAG_NAMES.get(f, f): f for f in TrainerConfig.model_fields if f not in TRAINER_FLAGS_FROM_SHARED}


def _command(command: str) -> click.Command:
    group = build_cli()
    cmd = group.get_command(click.Context(group), command)
    assert cmd is not None, f"command {command!r} is not registered"
    return cmd


def _flags(command: str) -> list[tuple[click.Option, type[Options], str]]:
    """``(option, model, field)`` for every option of ``command`` that maps to a model field."""
    trainer = _trainer_fields() if command == "train" else {}
    out = []
    for param in _command(command).params:
        if not isinstance(param, click.Option) or param.name is None:
            continue
        if param.name in trainer:
            out.append((param, TrainerConfig, trainer[param.name]))
            continue
        model = next((m for m in _models(command) if param.name in m.model_fields), None)
        if model is not None:
            out.append((param, model, param.name))
    return out


def _plain(value: object) -> object:
    return list(value) if isinstance(value, (list, tuple)) else value


@pytest.mark.parametrize("command", sorted(COMMAND_MODELS))
def test_flag_defaults_are_the_model_defaults(command: str):
    checked = 0
    for param, model, name in _flags(command):
        default = param.default() if callable(param.default) else param.default
        if default is None or not isinstance(default, (str, int, float, bool, list, tuple)):
            continue  # no flag default: the model's applies
        field = model.model_fields[name]
        assert _plain(default) == _plain(field.get_default(call_default_factory=True)), (
            f"saelab {command} --{param.name}: flag default {default!r}, {model.__name__}.{name} default "
            f"{field.default!r}")
        checked += 1
    assert checked or command in ("explain", "score")  # those two take no example or data flags with defaults


@pytest.mark.parametrize("command", sorted(COMMAND_MODELS))
def test_flag_help_is_the_model_field_docstring(command: str):
    drift = []
    for param, model, name in _flags(command):
        doc = " ".join((model.model_fields[name].description or "").replace("``", "").split())
        if " ".join((param.help or "").split()).removesuffix(" [required]") != doc:
            drift.append(f"--{param.name}: flag help {param.help!r} != {model.__name__}.{name} {doc!r}")
    assert not drift, f"saelab {command}: " + "; ".join(drift)


@pytest.mark.parametrize("command", sorted(PURE_CLI_FLAGS))
def test_every_flag_maps_to_a_model_field(command: str):
    flags = _flags(command)
    mapped = {param.name for param, _, _ in flags}
    options = {p.name for p in _command(command).params if isinstance(p, click.Option)}
    assert options - mapped == PURE_CLI_FLAGS[command], (
        f"saelab {command}: flags without an options-model field: {sorted(options - mapped)}")
    fields = {f for m in _models(command) for f in m.model_fields}
    assert fields - mapped == FIELDS_WITHOUT_FLAG[command], (
        f"saelab {command}: model fields without a flag: {sorted(fields - mapped)}")
    if command == "train":
        from saelab.plugins.commands.train import TRAINER_FLAGS_FROM_SHARED

        trainer = {name for _, model, name in flags if model is TrainerConfig}
        assert trainer | set(TRAINER_FLAGS_FROM_SHARED) == set(TrainerConfig.model_fields)
        assert set(TRAINER_FLAGS_FROM_SHARED.values()) <= mapped


class _Stop(Exception):
    """Raised by the recording models below once the command has built its config."""


def _invoke(command: str, args: list[str]) -> None:
    cmd = _command(command)
    with cmd.make_context(command, args) as ctx, pytest.raises(_Stop):
        cmd.invoke(ctx)


def test_evaluate_hands_the_model_defaults_and_the_flags_to_evalconfig(monkeypatch, tmp_path: Path):
    import saelab.plugins.commands.evaluate as evaluate_plugin

    seen: list[EvalConfig] = []

    class Recording(EvalConfig):
        @classmethod
        def parse(cls, values, *, where=""):
            seen.append(EvalConfig.parse(values, where=where))
            raise _Stop

    monkeypatch.setattr(evaluate_plugin, "find_dictionaries", lambda root: [Path(root)])
    monkeypatch.setattr(evaluate_plugin, "EvalConfig", Recording)
    _invoke("evaluate", [str(tmp_path)])
    assert seen == [EvalConfig()]
    _invoke("evaluate", [str(tmp_path), "--keep_bos", "--splice_excluded", "--exclude_positions", "0", "-1",
                         "--no_downstream", "--dense_threshold", "0.25", "--n_tokens", "64", "--device", "meta"])
    assert seen[1] == EvalConfig(exclude_bos=False, splice_excluded=True, exclude_positions=(0,), downstream=False,
                                 dense_threshold=0.25, n_tokens=64, device="meta")


def test_train_hands_the_model_defaults_and_the_shared_flags_to_trainerconfig(monkeypatch, tmp_path: Path):
    import saelab.plugins.commands.train as train_plugin
    from saelab.plugins.commands.train import TRAINER_FLAGS_FROM_SHARED, TrainCommandOptions

    seen: list[TrainerConfig] = []

    class Recording(TrainerConfig):
        @classmethod
        def parse(cls, values, *, where=""):
            seen.append(TrainerConfig.parse(values, where=where))
            raise _Stop

    monkeypatch.setenv("SAELAB_RESULTS_DIR", str(tmp_path))
    monkeypatch.setattr(train_plugin, "TrainerConfig", Recording)
    _invoke("train", ["--name", "drift"])
    (config,) = seen
    # flags the trainer shares with the cache: the command's defaults apply (--seed is 22, TrainerConfig's 0)
    shared = {f: TrainCommandOptions.model_fields[flag].default for f, flag in TRAINER_FLAGS_FROM_SHARED.items()}
    assert {f: getattr(config, f) for f in shared} == shared and config.seed == 22
    assert config.model_dump(exclude=set(shared)) == TrainerConfig().model_dump(exclude=set(shared))
    _invoke("train", ["--name", "drift", "--train_batch_size", "64", "--lr", "null", "--lr_decay", "cosine",
                      "--exclude_positions", "none", "--seed", "3", "--filter_bos", "true", "--device", "cpu"])
    assert seen[1] == TrainerConfig(batch_size=64, lr=None, lr_decay="cosine", exclude_positions=(), seed=3,
                                    exclude_bos=True, device="cpu")
