"""Flags and typed options models cannot drift: a flag named like a field of its command's options model has
the field's default and the field's docstring as its help text."""

from __future__ import annotations

import click
import pytest
from saelab.cli import build_cli
from saelab.cli_options import CacheCommandOptions, DataOptions
from saelab.examples import ExampleOptions
from saelab.options import Options

COMMAND_MODELS: dict[str, tuple[type[Options], ...]] = {
    "cache": (CacheCommandOptions,),
    "latents": (),  # filled below: the plugin's own model
    "run": (DataOptions, ExampleOptions),
    "explain": (DataOptions, ExampleOptions),
    "score": (DataOptions, ExampleOptions),
}


def _models(command: str) -> tuple[type[Options], ...]:
    if command == "latents":
        from saelab.plugins.commands.latents import LatentsCommandOptions

        return (LatentsCommandOptions,)
    return COMMAND_MODELS[command]


def _flags(command: str) -> list[tuple[click.Option, type[Options]]]:
    group = build_cli()
    cmd = group.get_command(click.Context(group), command)
    assert cmd is not None, f"command {command!r} is not registered"
    out = []
    for param in cmd.params:
        if not isinstance(param, click.Option) or param.name is None:
            continue
        model = next((m for m in _models(command) if param.name in m.model_fields), None)
        if model is not None:
            out.append((param, model))
    return out


def _plain(value: object) -> object:
    return list(value) if isinstance(value, (list, tuple)) else value


@pytest.mark.parametrize("command", sorted(COMMAND_MODELS))
def test_flag_defaults_are_the_model_defaults(command: str):
    checked = 0
    for param, model in _flags(command):
        default = param.default() if callable(param.default) else param.default
        if default is None or not isinstance(default, (str, int, float, bool, list, tuple)):
            continue  # no flag default: the model's applies
        field = model.model_fields[param.name]
        assert _plain(default) == _plain(field.get_default(call_default_factory=True)), (
            f"saelab {command} --{param.name}: flag default {default!r}, {model.__name__} default {field.default!r}")
        checked += 1
    assert checked or command in ("explain", "score")  # those two take no example or data flags with defaults


@pytest.mark.parametrize("command", sorted(COMMAND_MODELS))
def test_flag_help_is_the_model_field_docstring(command: str):
    drift = []
    for param, model in _flags(command):
        doc = " ".join((model.model_fields[param.name].description or "").replace("``", "").split())
        if " ".join((param.help or "").split()).removesuffix(" [required]") != doc:
            drift.append(f"--{param.name}: flag help {param.help!r} != {model.__name__}.{param.name} {doc!r}")
    assert not drift, f"saelab {command}: " + "; ".join(drift)
