"""Neighbour finder ``co-occurrence``: Jaccard similarity of the token sets two latents fire on,
from sparse products streamed chunk by chunk (never a dense ``d_sae x d_sae`` matrix)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import Field
from saelab import NeighbourFinder, Options, hookimpl
from saelab.examples import NeighbourContext


class CooccurrenceOptions(Options):
    """Options of the co-occurrence finder."""

    block_latents: int = Field(default=1024, ge=1)
    """Target latents per pass over the latent cache (bounds the sparse accumulator)."""


def top_k_rows(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n_rows: int,
               k: int) -> list[list[tuple[int, float]]]:
    """For each row, the ``k`` (col, val) pairs with the largest values (ties: smaller col first)."""
    order = np.lexsort((cols, -vals, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    out: list[list[tuple[int, float]]] = [[] for _ in range(n_rows)]
    starts = np.searchsorted(rows, np.arange(n_rows))
    stops = np.searchsorted(rows, np.arange(n_rows), side="right")
    for r in range(n_rows):
        a, b = starts[r], min(stops[r], starts[r] + k)
        out[r] = [(int(c), float(v)) for c, v in zip(cols[a:b], vals[a:b], strict=True)]
    return out


class Cooccurrence(NeighbourFinder):
    """Latents that fire on the same tokens: Jaccard |A∩B| / |A∪B| over token positions."""

    name = "co-occurrence"
    aliases = ("cooccurrence",)
    Options = CooccurrenceOptions

    def neighbours(self, latents: Sequence[int], k: int,
                   context: NeighbourContext) -> dict[int, list[tuple[int, float]]]:
        """The ``k`` latents with the highest Jaccard index with each of ``latents`` (> 0 only)."""
        import scipy.sparse as sp

        cache = context.cache
        d_sae = cache.d_sae
        counts = np.asarray(cache.stats()["latents"]["firing_count"], dtype=np.float64)
        result: dict[int, list[tuple[int, float]]] = {}
        targets_all = [int(t) for t in dict.fromkeys(latents)]
        for b in range(0, len(targets_all), self.options.block_latents):
            targets = np.asarray(targets_all[b:b + self.options.block_latents], dtype=np.int64)
            slot = np.full(d_sae, -1, dtype=np.int64)
            slot[targets] = np.arange(len(targets))
            acc = sp.csr_matrix((len(targets), d_sae), dtype=np.float64)
            for token, latent, _ in cache.iter_chunks():
                if token.numel() == 0:
                    continue
                tok, lat = token.numpy(), latent.numpy()
                base = tok.min()
                n_rows = int(tok.max() - base + 1)
                ones = np.ones(len(tok))
                B = sp.csr_matrix((ones, (tok - base, lat)), shape=(n_rows, d_sae))
                mine = slot[lat] >= 0
                Bt = sp.csr_matrix((ones[mine], (slot[lat[mine]], tok[mine] - base)), shape=(len(targets), n_rows))
                acc = acc + Bt @ B
            coo = acc.tocoo()
            rows, cols, inter = coo.row.astype(np.int64), coo.col.astype(np.int64), coo.data
            keep = cols != targets[rows]
            rows, cols, inter = rows[keep], cols[keep], inter[keep]
            jaccard = inter / (counts[targets[rows]] + counts[cols] - inter)
            for t, pairs in zip(targets.tolist(), top_k_rows(rows, cols, jaccard, len(targets), k), strict=True):
                result[t] = pairs
        return result


@hookimpl
def register_neighbour_finders(register):
    register(Cooccurrence)
