"""Neighbour finder ``encoder_similarity``: cosine similarity of encoder directions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from saelab import NeighbourFinder, Options, UsageError, hookimpl
from saelab.examples import NeighbourContext


class EncoderOptions(Options):
    """Options of the encoder-similarity finder."""

    chunk: int = Field(default=256, ge=1)
    """Target latents per matmul chunk."""


class EncoderSimilarity(NeighbourFinder):
    """Latents that read the same input direction (cosine of ``W_enc`` columns)."""

    name = "encoder_similarity"
    aliases = ("encoder-similarity", "encoder")
    Options = EncoderOptions

    def neighbours(self, latents: Sequence[int], k: int,
                   context: NeighbourContext) -> dict[int, list[tuple[int, float]]]:
        """Top-``k`` cosine neighbours of each latent's encoder direction (chunked matmul)."""
        dictionary = context.dictionary
        W_enc = getattr(dictionary, "W_enc", None) if dictionary is not None else None
        if not isinstance(W_enc, torch.Tensor):
            what = "no dictionary was given" if dictionary is None else f"architecture {dictionary.name!r} has no W_enc"
            raise UsageError(f"--neighbours_type {self.name} needs the dictionary's W_enc, but {what}; "
                             f"accepted instead: co-occurrence, decoder_similarity")
        unit = torch.nn.functional.normalize(W_enc.detach().float().cpu().T, dim=1)  # [d_sae, d_in]
        k = min(k, unit.shape[0] - 1)
        out: dict[int, list[tuple[int, float]]] = {}
        targets = [int(t) for t in dict.fromkeys(latents)]
        for a in range(0, len(targets), self.options.chunk):
            idx = torch.tensor(targets[a:a + self.options.chunk], dtype=torch.long)
            sims = unit[idx] @ unit.T
            sims[torch.arange(len(idx)), idx] = float("-inf")
            values, cols = sims.topk(max(k, 0), dim=1)
            for t, vs, cs in zip(idx.tolist(), values.tolist(), cols.tolist(), strict=True):
                out[t] = [(int(c), float(v)) for c, v in zip(cs, vs, strict=True)]
        return out


@hookimpl
def register_neighbour_finders(register):
    register(EncoderSimilarity)
