"""The ``saelab`` command group. Commands come from plugins through the ``register_commands`` hook."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import click

from . import manager as plugins
from .errors import SaelabError

DELPHI_COMMAND = "run"
"""Command that ``saelab MODEL SPARSE_MODEL ...`` (first argument not a command) dispatches to."""


class MultiValueOption(click.Option):
    """An option that takes several space-separated values, delphi style: ``--hookpoints a b c``.

    Values are consumed until the next argument that starts with ``-``; the option may also be
    repeated, and comma-separated or bracketed lists (``[a,b]``) are split.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["multiple"] = True
        super().__init__(*args, **kwargs)

    def add_to_parser(self, parser: Any, ctx: click.Context) -> None:
        super().add_to_parser(parser, ctx)
        for opt_name in self.opts:
            option = parser._long_opt.get(opt_name) or parser._short_opt.get(opt_name)
            if option is None:
                continue
            previous = option.process

            def process(value: Any, state: Any, _previous: Any = previous) -> None:
                values = [value]
                while state.rargs and not _looks_like_option(state.rargs[0]):
                    values.append(state.rargs.pop(0))
                for item in values:
                    for part in split_list_value(item):
                        _previous(part, state)

            option.process = process

    def type_cast_value(self, ctx: click.Context, value: Any) -> Any:
        return super().type_cast_value(ctx, value)


def _looks_like_option(arg: str) -> bool:
    if not arg.startswith("-") or arg == "-":
        return False
    try:
        float(arg)  # negative numbers are values
        return False
    except ValueError:
        return True


def split_list_value(item: str) -> list[str]:
    """Split ``"a,b"`` and ``"[a, b]"`` into items; plain values pass through."""
    text = item.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if "," in text or item.strip().startswith("["):
        return [part.strip().strip("'\"") for part in text.split(",") if part.strip()]
    return [item]


class SaelabGroup(click.Group):
    """Root group: lists commands sorted, with their one-line summaries."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is None or cmd.hidden:
                continue
            rows.append((name, cmd.get_short_help_str(limit=90)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def build_cli() -> click.Group:
    """Create the command group and let every plugin add its commands."""

    @click.group(
        cls=SaelabGroup,
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
        epilog="Delphi-style run: saelab MODEL SPARSE_MODEL --hookpoints ... (same as `saelab run ...`).",
    )
    @click.option("-p", "plugin_flags", metavar="no:NAME", multiple=True,
                  help="Disable the plugin NAME for this invocation (repeatable); also SAELAB_DISABLE_PLUGINS=a,b.")
    @click.version_option(plugins.saelab_version(), "--version", prog_name="saelab")
    def cli(plugin_flags: tuple[str, ...]) -> None:
        """saelab: cache LM activations, train sparse dictionaries, evaluate, explain, score and report."""

    plugins.get_plugin_manager().hook.register_commands(cli=cli)
    return cli


def extract_plugin_flags(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Pull ``-p no:NAME`` (and ``-pno:NAME``) out of ``args``; returns (disabled names, other args)."""
    disabled: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        value = None
        if arg == "-p" and i + 1 < len(args):
            value, i = args[i + 1], i + 2
        elif arg.startswith("-p") and not arg.startswith("--") and len(arg) > 2:
            value, i = arg[2:].lstrip("="), i + 1
        else:
            rest.append(arg)
            i += 1
            continue
        if not value.startswith("no:"):
            raise SaelabError(f"bad plugin flag '-p {value}'; accepted: -p no:NAME to disable plugin NAME")
        disabled.append(value[3:])
    return disabled, rest


def one_line(message: str) -> str:
    """Collapse a message onto one line."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def main(args: Sequence[str] | None = None, prog_name: str = "saelab") -> None:
    """Console entry point: one-line errors on stderr with exit code 2, never a traceback for user errors."""
    args = list(sys.argv[1:] if args is None else args)
    try:
        disabled, args = extract_plugin_flags(args)
        if disabled:
            plugins.disable(disabled)
        cli = build_cli()
        if args and not args[0].startswith("-") and args[0] not in cli.commands:
            if DELPHI_COMMAND in cli.commands and len(args) >= 2 and not args[1].startswith("-"):
                args = [DELPHI_COMMAND, *args]
        rv = cli.main(args, prog_name=prog_name, standalone_mode=False)
        sys.exit(rv if isinstance(rv, int) else 0)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"Error: {one_line(exc.format_message())}", err=True)
        sys.exit(2)
    except SaelabError as exc:
        click.echo(f"Error: {one_line(str(exc))}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
