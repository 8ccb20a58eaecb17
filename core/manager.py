"""The plugin manager: entry-point discovery, in-code registration, disabling, and kind registries."""

from __future__ import annotations

import importlib.metadata
import os
import sys
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs, interfaces
from .registry import Registry, normalise_name

ENTRY_POINT_GROUP = "saelab"
DISABLE_ENV = "SAELAB_DISABLE_PLUGINS"


@dataclass(frozen=True)
class Kind:
    """A plugin kind: its registry name, the hook that fills it and the base class of its entries."""

    name: str
    hook: str
    base: type


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("architecture", "register_architectures", interfaces.SparseDictionary),
        Kind("dictionary_format", "register_dictionary_formats", interfaces.DictionaryFormat),
        Kind("activation_source", "register_activation_sources", interfaces.ActivationSource),
        Kind("dataset", "register_datasets", interfaces.Dataset),
        Kind("sampler", "register_samplers", interfaces.Sampler),
        Kind("non_activating_source", "register_non_activating_sources", interfaces.NonActivatingSource),
        Kind("neighbour_finder", "register_neighbour_finders", interfaces.NeighbourFinder),
        Kind("explainer", "register_explainers", interfaces.Explainer),
        Kind("scorer", "register_scorers", interfaces.Scorer),
        Kind("provider", "register_providers", interfaces.Provider),
    )
}
"""Every registry kind, keyed by kind name."""


class PluginImportWarning(UserWarning):
    """A plugin's module could not be imported; the other plugins still load."""


@dataclass
class PluginInfo:
    """A loaded plugin: registered name, the distribution that ships it (if any) and its version."""

    name: str
    module: str
    distribution: str | None
    version: str | None
    hooks: list[str]
    status: str = "loaded"
    """``loaded``, ``disabled`` (``-p no:NAME`` / ``SAELAB_DISABLE_PLUGINS``) or ``failed`` (import error)."""
    error: str | None = None
    """Why a ``failed`` plugin could not be imported."""


_lock = threading.RLock()
_manager: pluggy.PluginManager | None = None
_registries: dict[str, Registry] = {}
_in_code: list[tuple[object, str]] = []
_extra_disabled: set[str] = set()
_failed: dict[str, tuple[str, str]] = {}


def disabled_plugins() -> set[str]:
    """Plugin names disabled through ``SAELAB_DISABLE_PLUGINS`` or ``-p no:NAME``."""
    from_env = {normalise_name(n) for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
    return from_env | _extra_disabled


def disable(names: Iterable[str]) -> None:
    """Disable plugins by registered name (what ``-p no:NAME`` does); takes effect on the next load."""
    with _lock:
        _extra_disabled.update(normalise_name(n) for n in names)
        reset()


def enable(names: Iterable[str]) -> None:
    """Undo :func:`disable` for ``names`` (``SAELAB_DISABLE_PLUGINS`` still applies); reloads on next use."""
    with _lock:
        _extra_disabled.difference_update(normalise_name(n) for n in names)
        reset()


def known_plugin_names() -> list[str]:
    """Names of every discoverable plugin (entry points and in-code), disabled or not."""
    with _lock:
        names = [ep.name for ep in _entry_points()] + [name for _, name in _in_code]
    return sorted(set(names))


def _module_name(obj: object) -> str:
    return obj.__name__ if isinstance(obj, ModuleType) else f"{type(obj).__module__}.{type(obj).__qualname__}"


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, loading entry-point and in-code plugins on first use."""
    global _manager
    with _lock:
        if _manager is not None:
            return _manager
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        disabled = disabled_plugins()
        _failed.clear()
        for ep in _entry_points():
            if normalise_name(ep.name) in disabled:
                pm.set_blocked(ep.name)
                continue
            if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue
            try:
                module = ep.load()
            except Exception as exc:  # a broken third-party plugin must not take the rest down
                _failed[ep.name] = (ep.value, f"{type(exc).__name__}: {exc}")
                warnings.warn(
                    f"saelab plugin {ep.name!r} ({ep.value}) failed to import and was skipped: "
                    f"{type(exc).__name__}: {exc}",
                    PluginImportWarning,
                    stacklevel=2,
                )
                continue
            pm.register(module, name=ep.name)
            dist = getattr(ep, "dist", None)
            if dist is not None:
                _dist_of[ep.name] = (dist.metadata["Name"], dist.version)
        for obj, name in _in_code:
            if normalise_name(name) in disabled:
                pm.set_blocked(name)
                continue
            pm.register(obj, name=name)
        _check_pending(pm)
        _manager = pm
        return pm


_dist_of: dict[str, tuple[str, str]] = {}


def _check_pending(pm: pluggy.PluginManager) -> None:
    """Fail on hook implementations that match no hookspec (misspelled ``register_architecture``...)."""
    import difflib

    from .errors import PluginLoadError

    known = sorted(name for name in dir(hookspecs) if name.startswith("register_"))
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        for caller in pm.get_hookcallers(plugin) or []:
            if caller.spec is not None:
                continue
            close = difflib.get_close_matches(caller.name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PluginLoadError(
                f"plugin {name!r} ({_module_name(plugin)}) implements unknown hook {caller.name!r}{hint}; "
                f"known hooks: {', '.join(known)}; disable the plugin with -p no:{name}"
            )
    pm.check_pending()


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    seen: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in eps:  # one entry per name even when a path holds two copies of a distribution
        seen.setdefault(ep.name, ep)
    return list(seen.values())


def register_plugin(obj: object, name: str | None = None) -> None:
    """Register a plugin object (a module or an instance with ``@hookimpl`` methods) in code."""
    with _lock:
        name = name or _module_name(obj)
        if any(n == name for _, n in _in_code):
            raise ValueError(f"a plugin named {name!r} is already registered in code")
        _in_code.append((obj, name))
        reset()


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered in code."""
    with _lock:
        _in_code[:] = [(o, n) for o, n in _in_code if n != name]
        reset()


def reset() -> None:
    """Forget the loaded plugins and registries; the next use reloads them."""
    global _manager
    with _lock:
        _manager = None
        _registries.clear()


def registry(kind: str) -> Registry:
    """The registry of one plugin kind (e.g. ``registry("architecture")``), filled by its hook."""
    with _lock:
        if kind in _registries:
            return _registries[kind]
        if kind not in KINDS:
            from .errors import UnknownNameError

            raise UnknownNameError("plugin kind", kind, KINDS)
        spec = KINDS[kind]
        pm = get_plugin_manager()
        reg: Registry = Registry(kind.replace("_", " "), base=spec.base)
        caller = getattr(pm.hook, spec.hook)
        # Call implementations one by one, in registration order, so each entry records its plugin.
        for impl in reversed(caller.get_hookimpls()):
            plugin_name = impl.plugin_name

            def register(cls: type, _plugin: str = plugin_name) -> type:
                return reg.register(cls, plugin=_plugin)

            impl.function(register=register)
        _registries[kind] = reg
        return reg


def plugin_infos() -> list[PluginInfo]:
    """Every loaded plugin, with the hooks it implements."""
    pm = get_plugin_manager()
    infos = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        dist, version = _dist_of.get(name, (None, None))
        infos.append(PluginInfo(name=name, module=_module_name(plugin), distribution=dist,
                                version=version, hooks=hooks))
    return infos


def blocked_plugins() -> list[str]:
    """Names of discovered plugins that are disabled."""
    pm = get_plugin_manager()
    return [name for name in known_plugin_names() if pm.is_blocked(name)]


def failed_plugins() -> dict[str, str]:
    """``{name: error}`` of entry-point plugins that failed to import at the last load."""
    get_plugin_manager()
    return {name: error for name, (_value, error) in _failed.items()}


def all_plugin_infos() -> list[PluginInfo]:
    """Loaded plugins, then disabled and failed ones (``saelab plugins --all``)."""
    infos = plugin_infos()
    eps = {ep.name: ep for ep in _entry_points()}
    for name in blocked_plugins():
        ep = eps.get(name)
        dist = getattr(ep, "dist", None) if ep is not None else None
        infos.append(PluginInfo(
            name=name, module=ep.value if ep is not None else "<code>",
            distribution=dist.metadata["Name"] if dist is not None else None,
            version=dist.version if dist is not None else None, hooks=[], status="disabled"))
    for name, (value, error) in _failed.items():
        dist = getattr(eps.get(name), "dist", None)
        infos.append(PluginInfo(
            name=name, module=value, distribution=dist.metadata["Name"] if dist is not None else None,
            version=dist.version if dist is not None else None, hooks=[], status="failed", error=error))
    return infos


def plugin_versions() -> dict[str, Any]:
    """``{plugin name: version}`` of loaded plugins (for ``run_config.json``)."""
    out: dict[str, Any] = {}
    for info in plugin_infos():
        out[info.name] = {"module": info.module, "distribution": info.distribution, "version": info.version}
    return out


def saelab_version() -> str:
    """The installed saelab version."""
    try:
        return importlib.metadata.version("saelab")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def python_version() -> str:
    """The running Python version."""
    return sys.version.split()[0]


def resolve(kind: str, value: str) -> type:
    """The class for ``value``: a registered name (or alias) first, else the first class that
    ``accepts(value)`` (hub ids, local paths); otherwise a one-line error listing the known names."""
    reg = registry(kind)
    if value in reg:
        return reg.get(value)
    cls = reg.find(lambda c: bool(getattr(c, "accepts", lambda _v: False)(value)))
    if cls is not None:
        return cls
    reg.get(value)  # raises UnknownNameError listing the names
    raise AssertionError("unreachable")
