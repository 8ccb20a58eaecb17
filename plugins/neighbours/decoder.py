"""Neighbour finder ``decoder_similarity``: cosine similarity of decoder rows."""

from __future__ import annotations

from collections.abc import Sequence

from saelab import NeighbourFinder, hookimpl
from saelab.examples import NeighbourContext

from ._cosine import CosineOptions, cosine_neighbours, latent_directions


class DecoderSimilarity(NeighbourFinder):
    """Latents whose decoder directions point the same way (cosine of ``W_dec`` rows)."""

    name = "decoder_similarity"
    aliases = ("decoder-similarity", "decoder")
    Options = CosineOptions

    def neighbours(self, latents: Sequence[int], k: int,
                   context: NeighbourContext) -> dict[int, list[tuple[int, float]]]:
        """Top-``k`` cosine neighbours of each latent's decoder row."""
        directions = latent_directions(context.dictionary, "decoder", self.name)
        return cosine_neighbours(directions.reshape(directions.shape[0], -1), latents, k, self.options.chunk)


@hookimpl
def register_neighbour_finders(register):
    register(DecoderSimilarity)
