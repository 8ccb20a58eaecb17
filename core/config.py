"""Run configs: merge defaults < config file < explicit CLI flags, and write ``run_config.json``.

Every command that writes into ``results/<name>/`` records what it ran with::

    write_run_config(run_dir, command="cache", config=options, extra={"activation_cache": str(path)})

``run_config.json`` holds every resolved value, the saelab/python/torch versions, the plugins loaded
(names, modules, distributions and versions), a timestamp and the ``extra`` entries (top level, e.g.
``activation_cache``). Several commands may write into one run directory: the top level describes
the latest command, ``commands`` keeps one entry per command, and ``extra`` entries accumulate.
Secrets never reach the file: keys that name a secret (``hf_token``, ``api_key``, ``password``...),
pydantic ``SecretStr`` values and any string holding the value of a secret environment variable
(``OPENAI_API_KEY``, ``HF_TOKEN``...) are replaced by ``"<redacted>"``.

Click commands take ``--config FILE`` with :func:`config_option` and merge it with
:func:`merge_config`, which lets flags given on the command line win over the file and the file win
over defaults (``ctx.get_parameter_source`` tells them apart).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import enum
import json
import os
import platform
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import BaseModel, SecretBytes, SecretStr

from .errors import UsageError, format_choices
from .fileio import atomic_write, now_iso
from .layout import RunLayout
from .options import Options, load_config_file

REDACTED = "<redacted>"
"""What a secret is replaced by."""

SCHEMA_VERSION = 1
"""Version of the ``run_config.json`` layout."""

_RESERVED = {
    "schema_version", "command", "argv", "created", "saelab_version", "python", "torch", "platform",
    "config", "plugins", "commands",
}

_SECRET_WORDS = {"secret", "secrets", "password", "passwd", "passphrase", "apikey", "credential", "credentials"}
_TOKEN_OWNERS = {
    "hf", "hub", "huggingface", "access", "auth", "api", "bearer", "refresh", "session", "id", "github", "gh",
    "openai", "openrouter", "wandb", "private",
}
_ENV_SECRET = re.compile(r"(API_?KEY|TOKEN|SECRET|PASSWORD|PASSWD)", re.IGNORECASE)
_MIN_ENV_SECRET_LEN = 6
_MIN_SECRET_LEN = 4
_BEARER = re.compile(r"(?i)(bearer\s+|api[_-]?key[\"'=:\s]+)[A-Za-z0-9._\-]{8,}")
"""A bearer token or ``api_key=...`` value in a message (an HTTP error echoing the request)."""

OptionsT = TypeVar("OptionsT", bound=Options)


# --------------------------------------------------------------------------------------------------
# Redaction


def is_secret_key(key: str) -> bool:
    """Whether a config key names a secret (``hf_token``, ``api_key``, ``OPENAI_API_KEY``, ``password``...).

    Counts such as ``n_tokens`` or ``max_new_tokens`` and settings such as ``bos_token`` are not secrets.
    """
    words = [w for w in re.split(r"[^a-z0-9]+", key.lower()) if w]
    if not words:
        return False
    if _SECRET_WORDS.intersection(words):
        return True
    if any(a == "api" and b == "key" for a, b in zip(words, words[1:], strict=False)):
        return True
    if words[-1] == "key" and len(words) >= 2 and words[-2] in ("secret", "private", "access"):
        return True
    if words[-1] == "token":
        return len(words) == 1 or words[-2] in _TOKEN_OWNERS
    return False


def env_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names mark secrets (``*_API_KEY``, ``*TOKEN*``...)."""
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if _ENV_SECRET.search(k) and len(v.strip()) >= _MIN_ENV_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def redact(value: Any, *, secrets: Iterable[str] | None = None, by_key: bool = True, _key: str | None = None) -> Any:
    """A JSON-ready copy of ``value`` with every secret replaced by ``"<redacted>"``: saelab's one redaction
    (run configs, run history, LLM raw responses and error messages).

    Mappings are walked key by key (with ``by_key``, secret-named keys are redacted unless their value is
    empty), pydantic models are dumped first, ``SecretStr`` values are redacted wherever they are, and any
    string has each of ``secrets`` (default: :func:`env_secrets`; ones shorter than 4 characters are
    ignored) and bearer tokens / ``api_key=...`` values replaced. ``by_key=False`` keeps values under
    secret-looking keys (e.g. the ``token`` fields of an LLM's logprobs) unless they hold a secret.
    """
    secrets = env_secrets() if secrets is None else [s for s in secrets if s and len(s) >= _MIN_SECRET_LEN]
    if isinstance(value, (SecretStr, SecretBytes)):
        return REDACTED
    if by_key and _key is not None and is_secret_key(_key) and value not in (None, "", False):
        return REDACTED
    if isinstance(value, BaseModel):
        # mode="python" keeps SecretStr objects so that they are seen (and redacted) above
        return redact(value.model_dump(mode="python"), secrets=secrets, by_key=by_key)
    if isinstance(value, Mapping):
        return {str(k): redact(v, secrets=secrets, by_key=by_key, _key=str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [redact(v, secrets=secrets, by_key=by_key) for v in items]
    if isinstance(value, str):
        for secret in secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return _BEARER.sub(lambda m: m.group(1) + REDACTED, value)
    return _jsonable_scalar(value, secrets, by_key)


def _jsonable_scalar(value: Any, secrets: Sequence[str], by_key: bool) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, enum.Enum):
        return redact(value.value, secrets=secrets, by_key=by_key)
    if isinstance(value, os.PathLike):
        return redact(os.fspath(value), secrets=secrets, by_key=by_key)
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy / torch scalars and small arrays
        try:
            return redact(value.tolist(), secrets=secrets, by_key=by_key)
        except Exception:  # noqa: BLE001 - fall back to the string form below
            pass
    return redact(str(value), secrets=secrets, by_key=by_key)


def redact_argv(argv: Sequence[str], *, secrets: Sequence[str] | None = None) -> list[str]:
    """Command-line arguments with the values of secret flags (``--hf_token X``, ``--api_key=X``) redacted."""
    secrets = env_secrets() if secrets is None else list(secrets)
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        if arg.startswith("-"):
            flag, eq, _ = arg.partition("=")
            if is_secret_key(flag.lstrip("-")):
                if eq:
                    out.append(f"{flag}={REDACTED}")
                else:
                    out.append(arg)
                    hide_next = True
                continue
        out.append(redact(arg, secrets=secrets))
    return out


# --------------------------------------------------------------------------------------------------
# run_config.json


def environment_info() -> dict[str, Any]:
    """Versions of saelab, python and torch, and the platform."""
    from .manager import python_version, saelab_version

    info: dict[str, Any] = {"saelab_version": saelab_version(), "python": python_version()}
    try:
        import torch

        info["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda}
    except ImportError:  # pragma: no cover - torch is a dependency
        info["torch"] = None
    info["platform"] = platform.platform()
    return info


def read_run_config(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``run_config.json`` of a run directory (an empty dict when there is none yet)."""
    path = RunLayout(Path(run_dir)).run_config
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{str(path)!r} is not valid JSON ({exc.msg}); delete it or pick another --name") from None
    return data if isinstance(data, dict) else {}


def write_run_config(
    run_dir: str | os.PathLike[str],
    command: str,
    config: Mapping[str, Any] | BaseModel,
    *,
    extra: Mapping[str, Any] | None = None,
    argv: Sequence[str] | None = None,
) -> Path:
    """Write (or update) ``run_dir/run_config.json`` for ``command`` and return its path.

    ``config`` is every resolved value (a mapping or an options model); ``extra`` adds top-level
    entries such as ``{"activation_cache": "results/.activations/<fingerprint>"}``. ``argv``
    defaults to ``sys.argv[1:]``. Secrets are redacted (see :func:`redact`). Entries written by
    other commands into the same run directory are kept under ``commands``.
    """
    if not command:
        raise ValueError("write_run_config needs the command name")
    extra = dict(extra or {})
    clash = _RESERVED.intersection(extra)
    if clash:
        raise ValueError(f"extra keys {sorted(clash)} clash with run_config.json's own keys")
    from .manager import plugin_versions

    secrets = env_secrets()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = read_run_config(run_dir)
    now = now_iso()
    resolved = redact(config, secrets=secrets)
    extra_clean = redact(extra, secrets=secrets)
    args = redact_argv(list(sys.argv[1:] if argv is None else argv), secrets=secrets)

    commands = dict(previous.get("commands") or {})
    commands[command] = {"created": now, "argv": args, "config": resolved, "extra": extra_clean}
    carried = {k: v for k, v in previous.items() if k not in _RESERVED}
    data: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "argv": args,
        "created": now,
        **environment_info(),
        "config": resolved,
        "plugins": redact(plugin_versions(), secrets=secrets),
        **carried,
        **extra_clean,
        "commands": commands,
    }
    path = RunLayout(run_dir).run_config
    with atomic_write(path) as fh:
        fh.write(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def append_run_history(run_dir: str | os.PathLike[str], command: str, outcome: str, *, exit_code: int,
                       message: str = "", started: str | None = None,
                       argv: Sequence[str] | None = None) -> Path | None:
    """Append one line to ``run_dir/run_history.jsonl`` (only when ``run_dir`` exists: a run that
    failed before writing anything leaves no directory behind); returns its path or None."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    secrets = env_secrets()
    entry = {"time": now_iso(), "started": started, "command": command,
             "argv": redact_argv(list(sys.argv[1:] if argv is None else argv), secrets=secrets),
             "outcome": outcome, "exit_code": int(exit_code), "message": redact(message, secrets=secrets)}
    path = RunLayout(run_dir).run_history
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
    except OSError:  # a full or read-only disk must not hide the error being recorded
        return None
    return path


@contextlib.contextmanager
def recorded_invocation(run_dir: str | os.PathLike[str], command: str) -> Iterator[None]:
    """Record this invocation's outcome in ``run_dir``'s run history when the block ends: ``ok``,
    ``failed`` (exit 3), ``error`` (bad input, exit 2), ``interrupted`` (130) or ``crashed`` (1), with the exit
    code :func:`saelab.errors.exit_code_of` gives the CLI; exceptions pass on."""
    from .errors import EXIT_FAILED_WORK, EXIT_USAGE, SaelabError, exit_code_of

    outcomes = {EXIT_FAILED_WORK: "failed", EXIT_USAGE: "error", 130: "interrupted", 1: "crashed"}
    started = now_iso()
    try:
        yield
    except BaseException as exc:
        code = exit_code_of(exc)
        message = str(exc) if isinstance(exc, (SaelabError, OSError)) else f"{type(exc).__name__}: {exc}"
        append_run_history(run_dir, command, outcomes.get(code, "crashed"), exit_code=code,
                           message="" if isinstance(exc, KeyboardInterrupt) else message, started=started)
        raise
    append_run_history(run_dir, command, "ok", exit_code=0, started=started)


# --------------------------------------------------------------------------------------------------
# defaults < config file < explicit CLI flags

EXPLICIT_SOURCES = (
    click.core.ParameterSource.COMMANDLINE,
    click.core.ParameterSource.ENVIRONMENT,
    click.core.ParameterSource.PROMPT,
)
"""Parameter sources that count as the user's explicit choice (they win over a config file)."""


def config_option(
    *param_decls: str, help: str = "YAML or JSON file of option values; flags given on the command line win."
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A click decorator adding ``--config FILE`` (parameter ``config``) to a command."""
    decls = param_decls or ("--config", "config")
    return click.option(*decls, type=click.Path(dir_okay=False, path_type=Path), default=None, help=help)


def explicit_params(ctx: click.Context) -> set[str]:
    """Names of the parameters the user set explicitly (command line, environment or prompt)."""
    return {name for name in ctx.params if ctx.get_parameter_source(name) in EXPLICIT_SOURCES}


def file_values(path: str | os.PathLike[str], *, command: str | None = None) -> dict[str, Any]:
    """Option values from a config file, keys normalised to ``snake_case``.

    A ``run_config.json`` written by saelab is accepted too: its ``config`` section (or, when
    ``command`` is given and present, that command's section) is used.
    """
    data = load_config_file(path)
    if "config" in data and "saelab_version" in data and isinstance(data["config"], Mapping):
        section = (data.get("commands") or {}).get(command or "", {}).get("config") if command else None
        data = dict(section if isinstance(section, Mapping) else data["config"])
        data = {k: v for k, v in data.items() if v != REDACTED}
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def merge_config(
    ctx: click.Context,
    params: Mapping[str, Any] | None = None,
    *,
    config_file: str | os.PathLike[str] | None = None,
    model: type[OptionsT] | None = None,
    ignore: Sequence[str] = ("config",),
) -> dict[str, Any] | OptionsT:
    """Resolve a command's options: defaults < ``config_file`` < flags given explicitly.

    ``params`` defaults to ``ctx.params`` and ``config_file`` to ``params["config"]``. A file key
    must be one of the command's parameters or, when ``model`` is given, one of its fields;
    anything else is a one-line :class:`UsageError` listing the accepted keys. Values for click
    parameters go through the parameter's own type conversion (so ``Choice`` and ``Path`` check
    file values as they check flags). Returns the merged dict, or ``model.parse(merged)``.
    """
    values = dict(ctx.params if params is None else params)
    config_file = config_file if config_file is not None else values.get("config")
    for key in ignore:
        values.pop(key, None)
    if config_file:
        click_params = {p.name: p for p in ctx.command.params if p.name}
        accepted = (set(click_params) | set(model.model_fields if model else ())) - set(ignore)
        explicit = explicit_params(ctx)
        where = f"config file {str(config_file)!r}"
        for key, raw in file_values(config_file, command=ctx.command.name).items():
            if key not in accepted:
                raise UsageError(f"{where}: unknown option {key!r}; accepted options: {format_choices(accepted)}")
            if key in explicit:
                continue
            param = click_params.get(key)
            values[key] = _convert(ctx, param, raw, where) if param is not None else raw
    if model is not None:
        return model.parse(values, where=f"{ctx.command.name} options")
    return values


def _convert(ctx: click.Context, param: click.Parameter, raw: Any, where: str) -> Any:
    if param.multiple or (param.nargs != 1 and param.nargs != 0):
        if isinstance(raw, str):
            from .cli import split_list_value

            raw = split_list_value(raw) if ("," in raw or raw.startswith("[")) else raw.split()
        elif not isinstance(raw, (list, tuple)):
            raw = [raw]
    try:
        return param.type_cast_value(ctx, raw)
    except click.BadParameter as exc:
        raise UsageError(f"{where}: bad value {raw!r} for option {param.name!r}: {exc.format_message()}") from None
