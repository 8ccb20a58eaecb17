"""The ``saelab`` command group. Commands come from plugins through the ``register_commands`` hook."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any

import click

from . import manager as plugins
from .errors import EXIT_FAILED_WORK, SaelabError, exit_code_of, format_choices
from .registry import normalise_name

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

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        name = click.utils.make_str(args[0]) if args else ""
        if args and self.get_command(ctx, name) is None and not name.startswith("-"):
            known = ", ".join(self.list_commands(ctx)) or "(none)"
            raise click.UsageError(
                f"unknown command {name!r}; commands: {known} "
                f"(or the delphi-style run: saelab MODEL SPARSE_MODEL ...)", ctx
            )
        return super().resolve_command(ctx, args)

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
        epilog="Delphi-style run: saelab MODEL SPARSE_MODEL --hookpoints ... (same as `saelab run ...`).\n\n"
               + EXIT_CODES_NOTE,
    )
    @click.option("-p", "plugin_flags", metavar="no:NAME", multiple=True,
                  help="Disable the plugin NAME for this invocation (repeatable); also SAELAB_DISABLE_PLUGINS=a,b.")
    @click.version_option(plugins.saelab_version(), "--version", prog_name="saelab")
    def cli(plugin_flags: tuple[str, ...]) -> None:
        """saelab: cache LM activations, train sparse dictionaries, evaluate, explain, score and report."""

    plugins.get_plugin_manager().hook.register_commands(cli=cli)
    return cli


def extract_plugin_flags(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Pull ``-p no:NAME`` (and ``-pno:NAME``) out of ``args``; returns (disabled names, other args).

    Before the command name every ``-p`` is the root option (a value other than ``no:NAME`` is an
    error); after it only ``-p no:NAME`` is taken, so commands keep ``-p`` for their own options.
    """
    disabled: list[str] = []
    rest: list[str] = []
    in_command = False
    i = 0
    while i < len(args):
        arg = args[i]
        value = None
        if arg == "-p" and i + 1 < len(args):
            value, step = args[i + 1], 2
        elif arg.startswith("-p") and not arg.startswith("--") and len(arg) > 2:
            value, step = arg[2:].lstrip("="), 1
        if value is None or (in_command and not value.startswith("no:")):
            in_command = in_command or not arg.startswith("-")
            rest.append(arg)
            i += 1
            continue
        i += step
        if not value.startswith("no:") or not value[3:].strip():
            raise SaelabError(f"bad plugin flag '-p {value}'; accepted: -p no:NAME to disable the plugin NAME")
        disabled.append(value[3:].strip())
    return disabled, rest
def one_line(message: str) -> str:
    """Collapse a message onto one line."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _check_plugin_names(names: Sequence[str]) -> None:
    known = plugins.known_plugin_names()
    normalised = {normalise_name(k) for k in known}
    for name in names:
        if normalise_name(name) not in normalised:
            raise SaelabError(
                f"cannot disable unknown plugin {name!r} (-p no:{name}); known plugins: {format_choices(known)}"
            )


def _one_line_warning(message: Any, category: type[Warning], filename: str, lineno: int,
                      file: Any = None, line: str | None = None) -> None:
    stream = file or sys.stderr
    stream.write(f"Warning: {one_line(str(message))}\n")


EXIT_CODES_NOTE = (
    "Exit codes: 0 done; 2 bad input (a one-line error, nothing written); 3 work failed: LLM requests failed "
    "after their retries, an I/O error (e.g. a full disk) stopped work, a requested latent is missing or 0 "
    "latents were analysed (with --strict also unparsed or copied explanations); a one-line summary of what "
    "failed goes to stderr and what completed is kept; 130 interrupted."
)
"""Sentence for ``--help`` texts and epilogs."""

def main(args: Sequence[str] | None = None, prog_name: str = "saelab") -> None:
    """Console entry point: one-line errors on stderr with exit code 2, never a traceback for user errors."""
    args = list(sys.argv[1:] if args is None else args)
    disabled: list[str] = []
    previous_showwarning = warnings.showwarning
    warnings.showwarning = _one_line_warning
    try:
        disabled, args = extract_plugin_flags(args)
        if disabled:
            _check_plugin_names(disabled)
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
    except click.NoSuchOption as exc:
        message = one_line(exc.format_message())
        command = exc.ctx.command if exc.ctx is not None else None
        if command is not None:
            accepted = sorted(opt for p in command.params for opt in (*p.opts, *p.secondary_opts)
                              if opt.startswith("-"))
            message += f" Accepted options of {exc.ctx.command_path!r}: {', '.join(accepted)}"
        click.echo(f"Error: {message}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"Error: {one_line(exc.format_message())}", err=True)
        sys.exit(2)
    except SaelabError as exc:
        click.echo(f"Error: {one_line(str(exc))}", err=True)
        sys.exit(exc.exit_code)
    except OSError as exc:
        if exit_code_of(exc) != EXIT_FAILED_WORK:
            raise
        where = f" writing {exc.filename!r}" if exc.filename else ""
        click.echo(f"Error: {exc.strerror or exc}{where}; what completed before it is kept, free space and "
                   f"re-run to finish", err=True)
        sys.exit(exit_code_of(exc))
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    finally:
        warnings.showwarning = previous_showwarning
        if disabled:
            plugins.enable(disabled)
