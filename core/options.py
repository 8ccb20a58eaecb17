"""Typed option models: every plugin class and every command has one.

Options are pydantic models that reject unknown keys. Fields are documented with attribute
docstrings (the string literal right below the field), which become the field's description::

    class TopKOptions(Options):
        k: int = 32
        \"\"\"Number of latents kept per token.\"\"\"
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import UsageError

OptionsT = TypeVar("OptionsT", bound="Options")


class Options(BaseModel):
    """Base class for option models: unknown keys are errors, fields carry docstrings."""

    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, validate_assignment=True, protected_namespaces=()
    )

    @classmethod
    def parse(cls: type[OptionsT], values: dict[str, Any] | None = None, *, where: str = "") -> OptionsT:
        """Validate ``values``; a failure becomes one :class:`UsageError` line naming the bad key."""
        try:
            return cls.model_validate(values or {})
        except ValidationError as exc:
            raise UsageError(describe_validation_error(exc, cls, where)) from None

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        """Map each field name to its documentation."""
        return {name: (field.description or "") for name, field in cls.model_fields.items()}


def describe_validation_error(exc: ValidationError, model: type[BaseModel], where: str = "") -> str:
    """One line for the first validation error: the bad key and value, and what is accepted."""
    err = exc.errors()[0]
    loc = ".".join(str(part) for part in err["loc"]) or "?"
    prefix = f"{where}: " if where else ""
    if err["type"] == "extra_forbidden":
        known = ", ".join(sorted(model.model_fields)) or "(none)"
        return f"{prefix}unknown option {loc!r}; accepted options: {known}"
    value = err.get("input")
    return f"{prefix}bad value {value!r} for option {loc!r}: {err['msg']}"


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict (one-line error when missing or malformed)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {str(path)!r} does not exist; give a .yaml, .yml or .json file")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # malformed files of either syntax
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"config file {str(path)!r} cannot be parsed: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {str(path)!r} must hold a mapping of option names to values")
    return data


def parse_option_value(raw: str) -> Any:
    """Parse a ``-o KEY VALUE`` value: JSON where it parses (numbers, lists, booleans), else the string."""
    try:
        return json.loads(raw)
    except (ValueError, TypeError):
        lowered = raw.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        if lowered in ("none", "null"):
            return None
        return raw
