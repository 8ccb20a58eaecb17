"""Which token positions count: the one mask shared by the activation cache, the trainer, evaluation and
the latent cache.

The rule (:class:`PositionFilter`), for windows of ``ctx_len`` tokens:

* ``exclude_positions`` are positions within the window; a negative one counts from the end (``-1`` is
  the last token), as in Python indexing. A position outside ``[-ctx_len, ctx_len)`` excludes nothing.
* ``exclude_bos`` also drops every token equal to the tokenizer's BOS id, wherever it occurs (nothing
  when the tokenizer has no BOS token).

Which positions to exclude is a property of the model: :attr:`saelab.ActivationSource.excluded_positions`
(SmolLM2 declares ``(0, 1, 2, 3)``: the BOS and its massive activations). The trainer records what it used
in the dictionary's ``cfg.json`` (``metadata.positions``, :meth:`PositionFilter.record`); evaluation and the
latent cache default to that record (:func:`recorded_filter`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from .interfaces import ActivationSource, SparseDictionary

CFG_KEY = "positions"
"""Key of the record in a dictionary's ``cfg.json`` ``metadata``."""


class PositionFilter(NamedTuple):
    """Positions and tokens left out: ``exclude_positions`` (negative ones count from the end) and BOS tokens
    anywhere when ``exclude_bos``."""

    exclude_positions: tuple[int, ...] = ()
    """Positions within a window to drop (``-1``: the last)."""
    exclude_bos: bool = False
    """Also drop every BOS token."""

    @classmethod
    def of(cls, exclude_positions: Sequence[int] = (), exclude_bos: bool = False) -> PositionFilter:
        """A filter with the positions as a tuple of ints."""
        return cls(tuple(int(p) for p in exclude_positions), bool(exclude_bos))

    def positions(self, ctx_len: int) -> list[int]:
        """The excluded positions of a ``ctx_len``-token window, normalised to ``0 <= p < ctx_len``, sorted."""
        return sorted({p % ctx_len for p in self.exclude_positions if -ctx_len <= p < ctx_len})

    def keep_mask(self, ids: torch.Tensor, bos_token_id: int | None) -> torch.Tensor:
        """Boolean ``[batch, seq]``: True where the token ``ids [batch, seq]`` counts."""
        keep = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        positions = self.positions(ids.shape[-1])
        if positions:
            keep[..., positions] = False
        if self.exclude_bos and bos_token_id is not None:
            keep &= ids.to(torch.long) != int(bos_token_id)
        return keep

    def kept_count(self, n_sequences: int, ctx_len: int) -> int:
        """Rows kept out of ``n_sequences`` windows when BOS is not filtered (no tokens needed)."""
        return n_sequences * (ctx_len - len(self.positions(ctx_len)))

    def record(self) -> dict[str, list[int] | bool]:
        """JSON data for ``cfg.json`` ``metadata.positions``."""
        return {"exclude_positions": list(self.exclude_positions), "exclude_bos": self.exclude_bos}


def recorded_filter(metadata: Mapping[str, object] | None) -> PositionFilter | None:
    """The filter a dictionary's ``cfg.json`` ``metadata`` records (None when it records none: dictionaries
    loaded from SAELens / sparsify, or trained before exclusions were recorded)."""
    entry = (metadata or {}).get(CFG_KEY)
    if not isinstance(entry, Mapping) or "exclude_positions" not in entry:
        return None
    return PositionFilter.of(entry["exclude_positions"], bool(entry.get("exclude_bos", False)))  # type: ignore[arg-type]


def model_exclusions(model: str) -> tuple[int, ...]:
    """The positions the activation source of ``model`` declares (``ActivationSource.excluded_positions``),
    without loading the model; the generic default when no registered source takes ``model``."""
    from .errors import UsageError
    from .interfaces import ActivationSource
    from .manager import resolve

    try:
        cls = resolve("activation_source", str(model))
    except UsageError:
        cls = ActivationSource
    return tuple(int(p) for p in cls.excluded_positions)


def dictionary_filter(dictionary: SparseDictionary, source: ActivationSource,
                      exclude_positions: Sequence[int] | None = None, exclude_bos: bool | None = None) -> PositionFilter:
    """The positions a stage leaves out for ``dictionary`` read through ``source``: each value given wins (``()``
    means none); else what the dictionary's training recorded in ``cfg.json``; else the model's declaration
    (``source.excluded_positions``) without BOS filtering. Used by evaluation, ``latents`` and ``run``."""
    recorded = recorded_filter(dictionary.extra_config)
    if exclude_positions is None:
        exclude_positions = recorded.exclude_positions if recorded else tuple(source.excluded_positions)
    if exclude_bos is None:
        exclude_bos = recorded.exclude_bos if recorded else False
    return PositionFilter.of(exclude_positions, exclude_bos)


__all__ = ["CFG_KEY", "PositionFilter", "dictionary_filter", "model_exclusions", "recorded_filter"]
