"""delphi-style highlighting of examples for explainer and scorer prompts.

Tokens whose activation is above ``threshold x`` the example's max are wrapped in ``<<...>>``, a run
of adjacent ones together (``jumped <<over the moon>>``); the leading whitespace of a run's first
token is kept outside the delimiters so words stay separated. ``activation_line`` lists the
highlighted tokens with integer activations 0-10, ``ceil(10 * a / max)``.

A character that the tokenizer splits over several tokens (byte-level BPE: Greek, CJK, emoji...) is
shown as one *span*: :func:`display_spans` groups an example's tokens (see
``saelab.records.Example.char_spans``), a span's activation is the max over its tokens, and the
functions here are then applied to span texts and span activations. :func:`visible` writes control
characters as escapes so they never reach a prompt or a page raw.
"""

from __future__ import annotations

import json
import math
import random
import unicodedata
from collections.abc import Sequence

OPEN = "<<"
CLOSE = ">>"

_NAMED_ESCAPES = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}


def _escape_char(ch: str) -> str:
    if ch in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: str) -> str:
    """``text`` on one line with control characters written as escapes: ``\\n``, ``\\t``, ``\\r``,
    ``\\x00``... (C0, DEL and C1 controls) and ``\\u2028`` / ``\\u2029`` (line and paragraph separators).
    Other characters, format characters such as U+200F included, are kept as they are."""
    if text.isprintable() and not any(ch in text for ch in "\u2028\u2029"):
        return text
    return "".join(_escape_char(ch) if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch for ch in text)


def display_spans(n_tokens: int, char_spans: Sequence[Sequence[int]] = ()) -> list[tuple[int, int]]:
    """The ``[start, stop)`` token ranges shown as one piece of text: each range of ``char_spans`` (tokens
    that together encode a character) and every other token on its own, in order."""
    out: list[tuple[int, int]] = []
    i = 0
    for start, stop in sorted((int(a), int(b)) for a, b in char_spans):
        out += [(t, t + 1) for t in range(i, start)]
        out.append((start, stop))
        i = stop
    out += [(t, t + 1) for t in range(i, n_tokens)]
    return out


def span_texts(token_strs: Sequence[str], spans: Sequence[tuple[int, int]]) -> list[str]:
    """The text of each span (its tokens' strings joined)."""
    return ["".join(token_strs[a:b]) for a, b in spans]


def span_activations(activations: Sequence[float], spans: Sequence[tuple[int, int]]) -> list[float]:
    """The activation of each span: the max over its tokens."""
    return [max(activations[a:b]) for a, b in spans]


def highlight_mask(activations: Sequence[float], threshold: float = 0.3, max_activation: float | None = None) -> list[bool]:
    """Which tokens are highlighted: activation > ``threshold * max`` (and > 0); the max defaults to
    the example's own."""
    top = max(activations, default=0.0) if max_activation is None else max_activation
    if top <= 0:
        return [False] * len(activations)
    cut = threshold * top
    return [a > cut and a > 0 for a in activations]


def highlight_tokens(token_strs: Sequence[str], mask: Sequence[bool]) -> str:
    """Join tokens, wrapping each run of masked tokens in ``<<...>>`` (leading whitespace outside)."""
    if len(token_strs) != len(mask):
        raise ValueError(f"{len(token_strs)} tokens but a mask of {len(mask)}")
    out: list[str] = []
    i = 0
    while i < len(token_strs):
        if not mask[i]:
            out.append(token_strs[i])
            i += 1
            continue
        j = i
        while j < len(token_strs) and mask[j]:
            j += 1
        run = "".join(token_strs[i:j])
        stripped = run.lstrip()
        # whitespace-only runs (newline tokens) are wrapped whole so the highlight stays visible
        out.append(run[: len(run) - len(stripped)] + OPEN + stripped + CLOSE if stripped else OPEN + run + CLOSE)
        i = j
    return "".join(out)


def highlight(token_strs: Sequence[str], activations: Sequence[float], threshold: float = 0.3,
              max_activation: float | None = None) -> str:
    """The example's text with tokens above ``threshold x`` its max activation wrapped in ``<<...>>``."""
    return highlight_tokens(token_strs, highlight_mask(activations, threshold, max_activation))


def normalized_activations(activations: Sequence[float], max_activation: float | None = None) -> list[int]:
    """Integer activations 0-10: ``ceil(10 * a / max)`` (clipped to 0-10); the max defaults to the example's."""
    top = max(activations, default=0.0) if max_activation is None else max_activation
    if top <= 0:
        return [0] * len(activations)
    return [min(10, max(0, math.ceil(10 * a / top))) for a in activations]


def activation_line(token_strs: Sequence[str], activations: Sequence[float], threshold: float = 0.3,
                    max_activation: float | None = None, limit: int | None = None) -> str:
    """``Activations: ("tok", 7), ...`` for the highlighted tokens (the first ``limit`` of them).

    The highlight threshold uses the example's max; the 0-10 scale uses ``max_activation`` when given
    (e.g. the latent's max, so strengths are comparable across examples), else the example's max.
    """
    mask = highlight_mask(activations, threshold)
    scaled = normalized_activations(activations, max_activation)
    items = [f"({json.dumps(tok, ensure_ascii=False)}, {v})"
             for tok, v, m in zip(token_strs, scaled, mask, strict=True) if m]
    if limit is not None:
        items = items[:limit]
    return "Activations: " + ", ".join(items)


def random_mask(n_tokens: int, n_highlighted: int, rng: random.Random) -> list[bool]:
    """A mask with ``n_highlighted`` random tokens set (all tokens when there are fewer)."""
    k = max(0, min(n_tokens, n_highlighted))
    chosen = set(rng.sample(range(n_tokens), k))
    return [i in chosen for i in range(n_tokens)]
