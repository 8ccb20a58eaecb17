"""Neighbour finder ``encoder_similarity``: cosine similarity of encoder directions."""

from __future__ import annotations

from collections.abc import Sequence

from saelab import NeighbourFinder, hookimpl
from saelab.examples import NeighbourContext

from ._cosine import CosineOptions, cosine_neighbours, latent_directions


class EncoderSimilarity(NeighbourFinder):
    """Latents that read the same input direction (cosine of encoder directions, ``W_enc`` columns)."""

    name = "encoder_similarity"
    aliases = ("encoder-similarity", "encoder")
    Options = CosineOptions

    def neighbours(self, latents: Sequence[int], k: int,
                   context: NeighbourContext) -> dict[int, list[tuple[int, float]]]:
        """Top-``k`` cosine neighbours of each latent's encoder direction (chunked matmul)."""
        directions = latent_directions(context.dictionary, "encoder", self.name,
                                       accepted="co-occurrence, decoder_similarity")
        return cosine_neighbours(directions, latents, k, self.options.chunk)


@hookimpl
def register_neighbour_finders(register):
    register(EncoderSimilarity)
