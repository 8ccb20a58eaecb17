"""``saelab plugins``: which plugins are loaded, the hooks they implement and what each registers."""

from __future__ import annotations

import json
from typing import Any

import click
from saelab import hookimpl, manager
from saelab.errors import UsageError, format_choices


def hook_names() -> list[str]:
    """Every hook name declared in ``saelab.hookspecs``."""
    pm = manager.get_plugin_manager()
    return sorted(name for name in dir(pm.hook) if name.startswith("register_"))


def _registered_commands() -> dict[str, list[str]]:
    """``{plugin: [command names]}`` by calling each ``register_commands`` into a scratch group."""
    pm = manager.get_plugin_manager()
    out: dict[str, list[str]] = {}
    for impl in pm.hook.register_commands.get_hookimpls():
        group = click.Group("scratch")
        try:
            impl.function(cli=group)
        except Exception as exc:  # noqa: BLE001 - a listing must not die on one broken plugin
            out[impl.plugin_name] = [f"<error: {type(exc).__name__}: {exc}>"]
            continue
        out[impl.plugin_name] = sorted(group.commands)
    return out


def plugin_table(
    include_all: bool = False, hook: str | None = None, kind: str | None = None
) -> list[dict[str, Any]]:
    """One row per plugin: name, module, distribution, version, status, hooks and registrations per kind.

    ``hook`` keeps plugins implementing that hook; ``kind`` keeps plugins registering that kind.
    """
    hooks = hook_names()
    if hook is not None and hook not in hooks:
        raise UsageError(f"unknown hook {hook!r}; hooks: {format_choices(hooks)}")
    kinds = [*manager.KINDS, "command"]
    if kind is not None:
        kind = kind.replace("-", "_").lower()
        if kind not in kinds and kind.endswith("s") and kind[:-1] in kinds:
            kind = kind[:-1]  # plural, as in the hook names
        if kind not in kinds:
            raise UsageError(f"unknown plugin kind {kind!r}; kinds: {format_choices(kinds)}")
    infos = manager.all_plugin_infos() if include_all else manager.plugin_infos()
    registers: dict[str, dict[str, list[str]]] = {}
    for kind_name in manager.KINDS:
        for entry in manager.registry(kind_name).entries():
            registers.setdefault(entry.plugin, {}).setdefault(kind_name, []).append(entry.name)
    for plugin, commands in _registered_commands().items():
        registers.setdefault(plugin, {})["command"] = commands
    rows = []
    for info in sorted(infos, key=lambda i: ({"loaded": 0, "disabled": 1, "failed": 2}[i.status], i.name)):
        if hook is not None and hook not in info.hooks:
            continue
        if kind is not None and kind not in registers.get(info.name, {}):
            continue
        rows.append({
            "name": info.name,
            "module": info.module,
            "distribution": info.distribution,
            "version": info.version,
            "status": info.status,
            "error": info.error,
            "hooks": info.hooks,
            "registers": registers.get(info.name, {}),
        })
    return rows


@hookimpl
def register_commands(cli: click.Group) -> None:
    """Add ``saelab plugins``."""

    @cli.command("plugins")
    @click.option("--all", "include_all", is_flag=True, help="Also list disabled plugins and ones that failed to import.")
    @click.option("--hook", default=None, metavar="HOOK", help="Only plugins implementing HOOK (e.g. register_scorers).")
    @click.option("--kind", default=None, metavar="KIND", help="Only plugins registering KIND (e.g. scorer).")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
    def plugins_command(include_all: bool, hook: str | None, kind: str | None, as_json: bool) -> None:
        """List plugins, their hooks and what each registers per kind."""
        rows = plugin_table(include_all=include_all, hook=hook, kind=kind)
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        from rich.table import Table
        from saelab.progress import stdout_console

        table = Table(title=f"saelab plugins ({len(rows)})", title_justify="left")
        table.add_column("plugin", no_wrap=True)
        for column in ("distribution", "hooks", "registers"):
            table.add_column(column, overflow="fold")
        for row in rows:
            dist = f"{row['distribution']} {row['version']}" if row["distribution"] else "(in code)"
            name = row["name"] if row["status"] == "loaded" else f"{row['name']} [{row['status']}]"
            registers = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in row["registers"].items())
            if row["error"]:
                registers = row["error"]
            hooks = ", ".join(h.removeprefix("register_") for h in row["hooks"])
            table.add_row(f"{name}\n[dim]{row['module']}[/dim]", dist, hooks, registers)
        stdout_console.print(table)
