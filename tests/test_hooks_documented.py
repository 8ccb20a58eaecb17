"""Every hookspec is documented in docs/plugins/hooks.md, with its signature, base class and an example."""

from __future__ import annotations

import inspect
import re

import pytest
from plugin_helpers import REPO_ROOT
from saelab import hookspecs, manager

HOOKS_MD = REPO_ROOT / "docs" / "plugins" / "hooks.md"


def hookspec_functions() -> dict[str, object]:
    """Functions of saelab.hookspecs marked as hookspecs."""
    marker = f"{hookspecs.PROJECT}_spec"
    return {name: fn for name, fn in vars(hookspecs).items() if callable(fn) and hasattr(fn, marker)}


def sections() -> dict[str, str]:
    """``## `name(args)``` sections of hooks.md keyed by hook name."""
    text = HOOKS_MD.read_text()
    parts = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    out = {}
    for part in parts:
        title, _, body = part.partition("\n")
        match = re.fullmatch(r"`(\w+)\(([^)]*)\)`", title.strip())
        if match:
            out[match.group(1)] = (match.group(2), body)
    return out


def test_hookspecs_are_found():
    specs = hookspec_functions()
    assert {"register_architectures", "register_commands", "register_scorers"} <= set(specs)
    assert {kind.hook for kind in manager.KINDS.values()} <= set(specs)


@pytest.mark.parametrize("hook", sorted(hookspec_functions()))
def test_hook_is_documented(hook):
    documented = sections()
    assert hook in documented, f"hook {hook!r} has no `## `{hook}(...)`` section in {HOOKS_MD}"
    args, body = documented[hook]
    expected_args = ", ".join(inspect.signature(hookspec_functions()[hook]).parameters)
    assert args == expected_args, f"documented signature {hook}({args}) != {hook}({expected_args})"
    assert "```python" in body and "@hookimpl" in body and f"def {hook}(" in body, f"{hook}: no example"
    kind = next((k for k in manager.KINDS.values() if k.hook == hook), None)
    if kind is not None:
        assert f"saelab.{kind.base.__name__}" in body, f"{hook}: base class saelab.{kind.base.__name__} not named"
        assert "register(" in body, f"{hook}: the example does not call register()"


def test_no_documented_hook_is_missing_from_hookspecs():
    extra = set(sections()) - set(hookspec_functions())
    assert not extra, f"hooks.md documents hooks that do not exist: {sorted(extra)}"
