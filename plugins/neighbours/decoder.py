"""Neighbour finder ``decoder_similarity``: cosine similarity of decoder rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from saelab import NeighbourFinder, Options, UsageError, hookimpl
from saelab.examples import NeighbourContext


class CosineOptions(Options):
    """Options of the cosine-similarity finders."""

    chunk: int = Field(default=256, ge=1)
    """Target latents per matmul chunk."""


def cosine_neighbours(directions: torch.Tensor, latents: Sequence[int], k: int,
                      chunk: int) -> dict[int, list[tuple[int, float]]]:
    """For each latent, the ``k`` other rows of ``directions [d_sae, w]`` with the highest cosine
    similarity, by chunked matmul (``chunk x d_sae`` at a time)."""
    unit = torch.nn.functional.normalize(directions.detach().float().cpu(), dim=1)
    k = min(k, unit.shape[0] - 1)
    out: dict[int, list[tuple[int, float]]] = {}
    targets = [int(t) for t in dict.fromkeys(latents)]
    for a in range(0, len(targets), chunk):
        idx = torch.tensor(targets[a:a + chunk], dtype=torch.long)
        sims = unit[idx] @ unit.T
        sims[torch.arange(len(idx)), idx] = float("-inf")
        values, cols = sims.topk(k, dim=1) if k > 0 else (sims[:, :0], idx[:, None][:, :0])
        for t, vs, cs in zip(idx.tolist(), values.tolist(), cols.tolist(), strict=True):
            out[t] = [(int(c), float(v)) for c, v in zip(cs, vs, strict=True)]
    return out


def dictionary_weight(dictionary, name: str, finder: str) -> torch.Tensor:
    """The dictionary's ``name`` weight (one-line error when it has none)."""
    weight = getattr(dictionary, name, None) if dictionary is not None else None
    if not isinstance(weight, torch.Tensor):
        what = "no dictionary was given" if dictionary is None else f"architecture {dictionary.name!r} has no {name}"
        raise UsageError(f"--neighbours_type {finder} needs the dictionary's {name}, but {what}; "
                         f"accepted instead: co-occurrence")
    return weight


class DecoderSimilarity(NeighbourFinder):
    """Latents whose decoder directions point the same way (cosine of ``W_dec`` rows)."""

    name = "decoder_similarity"
    aliases = ("decoder-similarity", "decoder")
    Options = CosineOptions

    def neighbours(self, latents: Sequence[int], k: int,
                   context: NeighbourContext) -> dict[int, list[tuple[int, float]]]:
        """Top-``k`` cosine neighbours of each latent's decoder row."""
        W_dec = dictionary_weight(context.dictionary, "W_dec", self.name)
        return cosine_neighbours(W_dec.reshape(W_dec.shape[0], -1), latents, k, self.options.chunk)


@hookimpl
def register_neighbour_finders(register):
    register(DecoderSimilarity)
