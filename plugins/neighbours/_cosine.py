"""Cosine-similarity neighbours of latent directions, shared by the encoder and decoder finders."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field
from saelab import Options, SparseDictionary, UsageError


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


def latent_directions(dictionary: SparseDictionary | None, which: Literal["encoder", "decoder"], finder: str,
                      accepted: str = "co-occurrence") -> torch.Tensor:
    """Each latent's ``which`` (encoder or decoder) direction, ``[d_sae, width]`` (one-line error when the
    dictionary has none)."""
    if dictionary is None:
        weight, what = None, "no dictionary was given"
    else:
        weight = dictionary.encoder_directions() if which == "encoder" else dictionary.decoder_directions()
        what = f"architecture {dictionary.name!r} has no {which} matrix"
    if weight is None:
        raise UsageError(f"--neighbours_type {finder} needs the dictionary's {which} directions, but {what}; "
                         f"accepted instead: {accepted}")
    return weight
