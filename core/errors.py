"""Errors a user can cause: each renders as one line naming the bad value and what is accepted."""

from __future__ import annotations

import errno
from collections.abc import Iterable

EXIT_OK = 0
"""Exit code: everything asked for was done."""
EXIT_USAGE = 2
"""Exit code: bad input (a value, file, dataset or plugin name); nothing was started or damaged."""
EXIT_FAILED_WORK = 3
"""Exit code: work started but failed: LLM requests failed after their retries, an I/O error (e.g. a full
disk) stopped work, a requested latent is missing, or 0 latents were analysed. What completed is kept."""


DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})
"""OSErrors that stop work mid-run (a full disk, a quota, a read-only or failing filesystem): exit code 3."""


def exit_code_of(exc: BaseException) -> int:
    """The exit code a command ends with when ``exc`` escapes it: a :class:`SaelabError`'s own, 3 for a
    disk error (:data:`DISK_ERRNOS`), 130 for an interrupt, 1 for anything else (a bug: traceback)."""
    if isinstance(exc, SaelabError):
        return exc.exit_code
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        return EXIT_FAILED_WORK
    if isinstance(exc, KeyboardInterrupt):
        return 130
    return 1


class SaelabError(Exception):
    """Base class for every saelab error that is the user's to fix (exit code 2, no traceback)."""

    exit_code: int = EXIT_USAGE


class UsageError(SaelabError):
    """A bad value given on the command line, in a config file or through the Python API."""


def format_choices(choices: Iterable[str], limit: int = 40) -> str:
    """Render accepted values as a short comma-separated list."""
    items = sorted(set(choices))
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items) - limit} more)"
    return shown or "(none registered)"


class UnknownNameError(UsageError, KeyError):
    """A name that no registry entry matches."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        self.kind, self.name, self.known = kind, name, sorted(set(known))
        super().__init__(f"unknown {kind} {name!r}; known {kind}s: {format_choices(self.known)}")

    def __str__(self) -> str:
        return self.args[0]


class DuplicateNameError(SaelabError):
    """Two plugins registered the same name for one kind."""


class CorruptCacheError(SaelabError):
    """A cache shard or manifest on disk is truncated, corrupted or inconsistent."""


class FailedWorkError(SaelabError):
    """Work started but did not complete (exit code 3); the message is a one-line summary of what failed."""

    exit_code = EXIT_FAILED_WORK


class PluginLoadError(SaelabError):
    """A plugin cannot be loaded (e.g. a misspelled hook implementation such as ``register_architecture``)."""


def wrong_return_type(kind: str, plugin: object, value: object, expected: str, method: str) -> UsageError:
    """The one-line error for a plugin whose ``method`` returned ``value`` instead of an ``expected`` (the
    dotted name of the contract's type): the engine never guesses at what a plugin meant."""
    cls = type(plugin)
    name = getattr(cls, "name", cls.__qualname__)
    return UsageError(f"{kind} {name!r} ({cls.__module__}.{cls.__qualname__}) returned "
                      f"{type(value).__module__}.{type(value).__qualname__} from {method}(); expected {expected} "
                      f"(fix or disable the plugin with -p no:NAME)")
