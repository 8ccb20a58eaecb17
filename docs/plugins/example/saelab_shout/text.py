"""Word splitting shared by the provider and the scorer of saelab-shout."""

from __future__ import annotations

import re

_WORD = re.compile(r"[A-Za-z]{3,}")


def words(text: str) -> list[str]:
    """Lower-cased words of three or more letters, in order."""
    return [w.lower() for w in _WORD.findall(text)]
