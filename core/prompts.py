"""Prompts of explainers and scorers: the mechanism that gathers their shipped defaults and applies user
overrides.

Each explainer or scorer plugin ships its default prompts with it: a YAML file next to its module named by
its class's ``prompt_file`` (e.g. ``saelab/plugins/scorers/detection.yaml``) holding the templates under its
``prompt_prefix`` (``system``, ``user``, few-shot ``examples``...), read with :mod:`importlib.resources`
(:func:`read_prompt_file`), or whatever its ``default_prompts()`` classmethod returns. Prompts are addressed
by dotted keys (``explainers.default.system``, ``scorers.detection.user``...): prefix plus template name.

:func:`load_prompts` returns the defaults of every registered explainer and scorer, with any subset
overridden from a YAML file when override is on: ``--prompt_override --prompt_config_file F``, else the
env variable ``PROMPT_CONFIG_FILE``, else ``prompts.yaml`` in the working directory. Giving a file turns
override on. Unknown keys (including those of a disabled plugin) are one-line errors listing the valid
keys. Templates use ``{name}`` placeholders filled by plain substitution (:func:`fill`; other braces stay);
few-shot ``examples`` are lists of ``{user, assistant}`` entries sent before the real question.
:func:`prompt_version` hashes the prompts a result used; every explanation and score stores it.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import UsageError, format_choices
from .fileio import json_sha256

if TYPE_CHECKING:
    from .interfaces import _PromptedPlugin

ENV_VAR = "PROMPT_CONFIG_FILE"
"""Environment variable naming a prompt override file."""
CWD_FILE = "prompts.yaml"
"""Override file looked up in the working directory."""
PROMPT_KINDS = ("explainer", "scorer")
"""The plugin kinds whose registered classes contribute default prompts."""

PromptValue = str | list[dict[str, str]]
"""A prompt is a string template, or a list of few-shot ``{user, assistant, ...}`` dicts."""


def _flatten(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flatten(value, dotted + ".")
        else:
            yield dotted, value


def _declaring_module(cls: type, attribute: str) -> str:
    for klass in cls.__mro__:
        if attribute in vars(klass):
            return klass.__module__
    return cls.__module__


def prompt_file_location(cls: type, filename: str) -> Traversable | Path:
    """Where ``filename`` of ``cls``'s ``prompt_file`` lives: in the package of the module of the class that
    declares ``prompt_file`` (a subclass inheriting it reads its parent's file), or, for a module outside any
    package (a script), in that module's directory."""
    module_name = _declaring_module(cls, "prompt_file")
    module = sys.modules.get(module_name)
    spec = getattr(module, "__spec__", None)
    package = module_name if hasattr(module, "__path__") else (spec.parent if spec is not None else "")
    if package:
        return resources.files(package).joinpath(filename)
    module_file = getattr(module, "__file__", None)
    return Path(module_file).parent / filename if module_file else Path(filename)


@functools.cache
def _read_yaml_resource(cls: type, filename: str) -> dict[str, Any]:
    location = prompt_file_location(cls, filename)
    try:
        text = location.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        raise UsageError(f"{cls.__qualname__} declares prompt_file {filename!r}, but {str(location)!r} does "
                         f"not exist; accepted: a YAML file next to the module {_declaring_module(cls, 'prompt_file')!r}"
                         ) from None
    return _yaml_mapping(text, location, "a mapping of template names to templates")


def _yaml_mapping(text: str, location: object, expected: str) -> dict[str, PromptValue]:
    """The mapping a prompt file holds (``{}`` when empty); a parse error or another shape is one line."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"prompt file {str(location)!r} cannot be parsed: {yaml_error_line(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise UsageError(f"prompt file {str(location)!r} must hold {expected}")
    return dict(data)


def read_prompt_file(cls: type, filename: str, prefix: str) -> dict[str, PromptValue]:
    """``{prefix.name: value}`` of the YAML file ``filename`` shipped next to ``cls``'s module (see
    :func:`prompt_file_location`); read once per process."""
    dotted = prefix.rstrip(".") + "."
    return dict(_flatten(_read_yaml_resource(cls, filename), dotted))


def _prompted_classes() -> list[type[_PromptedPlugin]]:
    from .manager import registry

    return [entry.cls for kind in PROMPT_KINDS for entry in registry(kind).entries()]


def default_prompts() -> dict[str, PromptValue]:
    """The shipped defaults of every registered explainer and scorer as ``{dotted key: value}``."""
    values: dict[str, PromptValue] = {}
    for cls in _prompted_classes():
        values.update(cls.default_prompts())
    return values


def key_aliases() -> dict[str, str]:
    """Other keys a prompt file may use -> the saelab key each one sets: the keys of delphi / AutoInterp Full
    prompt files that registered classes declare (``prompt_key_aliases``), and each template under a
    registered name or alias of its plugin (``scorers.recall.system`` -> ``scorers.detection.system``)."""
    aliases: dict[str, str] = {}
    for cls in _prompted_classes():
        prefix = cls.prompt_prefix.rstrip(".")
        if not prefix:
            continue
        section, _, own = prefix.rpartition(".")
        leaves = [key[len(prefix) + 1:] for key in cls.default_prompts()]
        for name in (cls.name, *cls.aliases):
            if name != own and section:
                aliases.update({f"{section}.{name}.{leaf}": f"{prefix}.{leaf}" for leaf in leaves})
        aliases.update({key: f"{prefix}.{leaf}" for key, leaf in cls.prompt_key_aliases.items()})
    return aliases


class Prompts(Mapping[str, PromptValue]):
    """Resolved prompts: a read-only mapping of dotted keys to templates / few-shot lists."""

    def __init__(self, values: Mapping[str, PromptValue], source: str | None = None):
        self._values = dict(values)
        self.source = source
        """The override file used, or None for the defaults."""

    def __getitem__(self, key: str) -> PromptValue:
        try:
            return self._values[key]
        except KeyError:
            raise UsageError(f"unknown prompt key {key!r}; valid keys: {format_choices(self._values)}") from None

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def get(self, key: str, default: PromptValue | None = None) -> PromptValue | None:
        """The prompt under ``key``, or ``default``."""
        return self._values.get(key, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def with_defaults(self, defaults: Mapping[str, PromptValue]) -> Prompts:
        """These prompts plus the keys of ``defaults`` they lack (``self`` when they lack none), e.g. the
        defaults of a plugin class that was not registered when these prompts were loaded."""
        missing = {k: v for k, v in defaults.items() if k not in self._values}
        return Prompts({**self._values, **missing}, self.source) if missing else self

    def subset(self, prefix: str) -> dict[str, PromptValue]:
        """Every prompt under ``prefix`` (e.g. ``"scorers.detection"``), keyed by full dotted key."""
        dotted = prefix.rstrip(".") + "."
        return {k: v for k, v in self._values.items() if k.startswith(dotted) or k == prefix}

    def version(self, prefix: str) -> str:
        """:func:`prompt_version` of the prompts under ``prefix``."""
        return prompt_version(self.subset(prefix))

    def few_shot(self, prefix: str, user_key: str = "user", assistant_keys: tuple[str, ...] = ("assistant",)) -> list[dict[str, str]]:
        """Few-shot chat messages from ``<prefix>.examples``: for each entry, a user message from
        ``user_key`` (falling back to ``user``) and one assistant message joining ``assistant_keys``
        that the entry has."""
        messages: list[dict[str, str]] = []
        for entry in self._values.get(f"{prefix}.examples") or []:
            user = entry.get(user_key) or entry.get("user")
            answer = "\n".join(str(entry[k]) for k in assistant_keys if entry.get(k))
            if user and answer:
                messages += [{"role": "user", "content": str(user)}, {"role": "assistant", "content": answer}]
        return messages


def prompt_version(prompts_subset: Mapping[str, Any]) -> str:
    """sha256 (first 12 hex chars) of a set of prompts, in canonical JSON: changes whenever a prompt does."""
    return json_sha256(dict(prompts_subset), 12, default=None)


def find_override_file(override_file: str | os.PathLike[str] | None, cwd: str | os.PathLike[str] | None = None) -> Path | None:
    """The override file by precedence: ``override_file``, ``$PROMPT_CONFIG_FILE``, ``./prompts.yaml``."""
    if override_file:
        return Path(override_file)
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    local = Path(cwd or os.getcwd()) / CWD_FILE
    return local if local.is_file() else None


def load_prompts(
    override_file: str | os.PathLike[str] | None = None,
    enabled: bool = False,
    cwd: str | os.PathLike[str] | None = None,
) -> Prompts:
    """The default prompts, overridden from a YAML file when ``enabled`` or ``override_file`` is given.

    File precedence: ``override_file`` (``--prompt_config_file``), else ``$PROMPT_CONFIG_FILE``, else
    ``prompts.yaml`` in ``cwd`` (default: the working directory). Any subset of keys may be given.
    """
    values = default_prompts()
    if not (enabled or override_file):
        return Prompts(values)
    path = find_override_file(override_file, cwd)
    if path is None:
        raise UsageError(
            f"--prompt_override needs a prompt file: pass --prompt_config_file FILE, set {ENV_VAR}, or put "
            f"{CWD_FILE} in {str(Path(cwd or os.getcwd()))!r}"
        )
    aliases = key_aliases()
    overrides = read_override_file(path, aliases)
    for key, value in overrides.items():
        if key not in values:
            raise UsageError(
                f"unknown prompt key {key!r} in {str(path)!r}{_disabled_hint()}; valid keys: "
                f"{format_choices(list(values) + list(aliases), limit=80)}"
            )
        default = values[key]
        if isinstance(default, str) != isinstance(value, str):
            kind = "a string" if isinstance(default, str) else "a list of {user, assistant} entries"
            raise UsageError(f"prompt {key!r} in {str(path)!r} must be {kind}")
        values[key] = value
    return Prompts(values, source=str(path))


def _disabled_hint() -> str:
    from .manager import disabled_plugins

    disabled = sorted(disabled_plugins())
    if not disabled:
        return ""
    return (f" (no enabled explainer or scorer declares it; the prompts of disabled plugins "
            f"({', '.join(disabled)}) cannot be overridden)")


def read_override_file(path: str | os.PathLike[str], aliases: Mapping[str, str] | None = None
                       ) -> dict[str, PromptValue]:
    """Flattened ``{dotted key: value}`` of an override file, with the keys of ``aliases`` (default:
    :func:`key_aliases`) mapped to saelab's."""
    if aliases is None:
        aliases = key_aliases()
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"prompt file {str(path)!r} does not exist; give a YAML file of prompt overrides")
    data = _yaml_mapping(path.read_text(encoding="utf-8"), path,
                         "a mapping such as 'scorers: {detection: {system: ...}}'")
    return {aliases.get(k, k): v for k, v in _flatten(data)}


def yaml_error_line(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: ``line L, column C: problem (context)``."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None)
    context = getattr(exc, "context", None)
    if not problem:
        text = str(exc).splitlines()
        problem = text[0] if text else type(exc).__name__
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}" + (f" ({context})" if context else "")


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def fill(template: str, **values: Any) -> str:
    """Substitute ``{name}`` placeholders named in ``values``; other braces (JSON, lists) stay as they are."""
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), template)


def placeholders_in(template: str) -> list[str]:
    """The ``{name}`` placeholders of ``template``, in order of first appearance."""
    return list(dict.fromkeys(_PLACEHOLDER.findall(template)))


PROMPT_PLACEHOLDER = "prompt"
"""AutoInterp Full's placeholder for a system template: replaced with the filled user template (the example
data), which is then not sent again in the user turn."""

PROMPT_IN_SYSTEM_REQUEST = "Answer for the examples given in the system message, in the format asked for there."
"""The user turn sent when the system template holds ``{prompt}`` (the examples are already in the system)."""


@dataclass(frozen=True)
class Placeholders:
    """The placeholders one prompt template takes: those it must contain and those it may contain."""

    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()

    @property
    def accepted(self) -> tuple[str, ...]:
        """Every placeholder the template may contain."""
        return (*self.required, *self.optional)

    def describe(self) -> str:
        """E.g. ``{explanation} (required), {examples} (required), {prompt}``; ``none`` when it takes none."""
        parts = [f"{{{name}}} (required)" for name in self.required] + [f"{{{name}}}" for name in self.optional]
        return ", ".join(parts) or "none"


SYSTEM_PLACEHOLDERS = Placeholders(optional=(PROMPT_PLACEHOLDER,))
"""A system template of an LLM explainer or scorer: no placeholder, or AutoInterp Full's ``{prompt}``."""
NO_PLACEHOLDERS = Placeholders()
"""A template that is sent as it is (e.g. ``explainers.default.cot``)."""

TemplateSpec = Mapping[str, Placeholders]
"""What a plugin declares as ``prompt_placeholders``: template name under its ``prompt_prefix`` (``"user"``)
-> the placeholders that template takes."""


def check_templates(prompts: Mapping[str, PromptValue], prefix: str, spec: TemplateSpec) -> None:
    """Raise a one-line :class:`UsageError` when a template under ``prefix`` named in ``spec`` lacks a
    required placeholder or has one it does not accept (keys absent from ``prompts`` are skipped)."""
    source = getattr(prompts, "source", None)
    where = f" in {source!r}" if source else ""
    for name, allowed in spec.items():
        key = f"{prefix.rstrip('.')}.{name}"
        if key not in prompts:
            continue
        template = prompts[key]
        if not isinstance(template, str):
            raise UsageError(f"prompt {key!r}{where} must be a string template; accepted placeholders: "
                             f"{allowed.describe()}")
        found = placeholders_in(template)
        unknown = [p for p in found if p not in allowed.accepted]
        missing = [p for p in allowed.required if p not in found]
        if unknown or missing:
            problems = ([f"unknown placeholder {', '.join('{' + p + '}' for p in unknown)}"] if unknown else []) + \
                       ([f"missing placeholder {', '.join('{' + p + '}' for p in missing)}"] if missing else [])
            raise UsageError(f"prompt {key!r}{where} has {' and '.join(problems)}; accepted placeholders: "
                             f"{allowed.describe()}")


def chat_prompt(system: str, few_shot: list[dict[str, str]], user: str) -> list[dict[str, str]]:
    """``[system, *few_shot, user]`` chat messages; a system template holding ``{prompt}`` gets ``user``
    there instead, and the user turn is then :data:`PROMPT_IN_SYSTEM_REQUEST`."""
    if PROMPT_PLACEHOLDER in placeholders_in(system):
        system, user = fill(system, prompt=user), PROMPT_IN_SYSTEM_REQUEST
    return [{"role": "system", "content": system}, *few_shot, {"role": "user", "content": user}]
