"""Registries: one per plugin kind, keyed case-insensitively by each class's ``name``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .errors import DuplicateNameError, UnknownNameError

T = TypeVar("T")


def normalise_name(name: str) -> str:
    """Registry key for a name: case-insensitive, ``_`` and ``-`` interchangeable."""
    return name.strip().lower().replace("_", "-")


def qualified_name(obj: Any) -> str:
    """``module.QualName`` of a class (or of an object's class)."""
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered class, the plugin that registered it and the names it answers to."""

    name: str
    cls: type[T]
    plugin: str
    aliases: tuple[str, ...] = ()


class Registry(Generic[T]):
    """Maps names (and aliases) to classes of one plugin kind.

    Registering a name twice raises :class:`DuplicateNameError` naming both classes; looking up an
    unknown name raises :class:`UnknownNameError` listing the known names.
    """

    def __init__(self, kind: str, base: type | None = None):
        self.kind = kind
        self.base = base
        self._entries: dict[str, Entry[T]] = {}
        self._keys: dict[str, str] = {}

    def register(self, cls: type[T], *, plugin: str = "<code>") -> type[T]:
        """Register ``cls`` under ``cls.name`` and its ``aliases``; returns ``cls`` (usable as a decorator)."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{qualified_name(cls)} cannot be registered as a {self.kind}: it has no `name`")
        if self.base is not None and not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(
                f"{qualified_name(cls)} cannot be registered as a {self.kind}: "
                f"it is not a subclass of {qualified_name(self.base)}"
            )
        aliases = tuple(getattr(cls, "aliases", ()) or ())
        for key in (name, *aliases):
            norm = normalise_name(key)
            if norm in self._keys:
                other = self._entries[self._keys[norm]]
                raise DuplicateNameError(
                    f"{self.kind} name {key!r} is registered twice: by {qualified_name(other.cls)} "
                    f"(plugin {other.plugin!r}) and by {qualified_name(cls)} (plugin {plugin!r}); "
                    f"disable one with -p no:{other.plugin} or -p no:{plugin}"
                )
        entry = Entry(name=name, cls=cls, plugin=plugin, aliases=aliases)
        primary = normalise_name(name)
        self._entries[primary] = entry
        for key in (name, *aliases):
            self._keys[normalise_name(key)] = primary
        return cls

    def entry(self, name: str) -> Entry[T]:
        """The entry registered under ``name`` or one of its aliases."""
        key = self._keys.get(normalise_name(name))
        if key is None:
            raise UnknownNameError(self.kind, name, self.names())
        return self._entries[key]

    def get(self, name: str) -> type[T]:
        """The class registered under ``name`` (case-insensitive; aliases accepted)."""
        return self.entry(name).cls

    def canonical(self, name: str) -> str:
        """The primary name for ``name`` (resolving aliases and case)."""
        return self.entry(name).name

    def names(self) -> list[str]:
        """Primary names, in registration order."""
        return [entry.name for entry in self._entries.values()]

    def entries(self) -> list[Entry[T]]:
        """Every entry, in registration order."""
        return list(self._entries.values())

    def find(self, predicate: Callable[[type[T]], bool]) -> type[T] | None:
        """The first registered class for which ``predicate`` is true."""
        for entry in self._entries.values():
            if predicate(entry.cls):
                return entry.cls
        return None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and normalise_name(name) in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()!r})"
