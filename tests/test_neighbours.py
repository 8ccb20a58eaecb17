"""Neighbour finders on hand-made latent sets: known Jaccard values and known cosine neighbours."""

from __future__ import annotations

import pytest
import torch
from latents_helpers import PatternSource, lee_dataset, passthrough_dictionary
from saelab import Options, SiteSpec, SparseDictionary, UsageError, resolve
from saelab.examples import NeighbourContext
from saelab.latents import build_latent_cache

CTX = 16


@pytest.fixture(scope="module")
def pattern_cache(tmp_path_factory):
    """Latent A fires at positions 0-7, B at 4-11, C at 0-7, D at 12-15, E never (16 sequences)."""
    pattern = torch.zeros(CTX, 5)
    pattern[0:8, 0] = 1.0
    pattern[4:12, 1] = 2.0
    pattern[0:8, 2] = 0.5
    pattern[12:16, 3] = 3.0
    out = tmp_path_factory.mktemp("neighbours") / "latents"
    return build_latent_cache(PatternSource(pattern), passthrough_dictionary(5), out, dataset=lee_dataset(20),
                              n_tokens=16 * CTX, ctx_len=CTX, n_splits=2, batch_size=4, flush_nonzeros=100, progress=False)


def test_pattern_cache_counts(pattern_cache):
    counts = pattern_cache.stats()["latents"]["firing_count"]
    assert counts == [8 * 16, 8 * 16, 8 * 16, 4 * 16, 0]
    assert len(pattern_cache.manifest["chunks"]) > 1  # the co-occurrence sums run over several chunks


def test_cooccurrence_jaccard_known_values(pattern_cache):
    finder = resolve("neighbour_finder", "co-occurrence")({"block_latents": 2})  # two passes over the data
    found = finder.neighbours([0, 1, 3, 4], k=3, context=NeighbourContext(pattern_cache))
    assert found[0] == [(2, pytest.approx(1.0)), (1, pytest.approx(4 / 12))]
    assert found[1] == [(0, pytest.approx(1 / 3)), (2, pytest.approx(1 / 3))]
    assert found[3] == []  # D never fires with anyone
    assert found[4] == []
    assert finder.neighbours([0], k=1, context=NeighbourContext(pattern_cache))[0] == [(2, pytest.approx(1.0))]



class HandDictionary(SparseDictionary):
    """A dictionary with hand-set weights (``W_dec [d_sae, d]``, ``W_enc [d, d_sae]``; none when not given)."""

    name = "hand"

    def __init__(self, W_dec: torch.Tensor | None = None, W_enc: torch.Tensor | None = None):
        super().__init__(SiteSpec(["layers.0"], ["layers.0"], 3, 3), Options())
        if W_dec is not None:
            self.W_dec = torch.nn.Parameter(W_dec)
        if W_enc is not None:
            self.W_enc = torch.nn.Parameter(W_enc)

    @property
    def d_sae(self) -> int:
        return 5

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.W_enc

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents @ self.W_dec


def test_decoder_and_encoder_similarity_known_neighbours():
    W_dec = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    dictionary = HandDictionary(W_dec, W_dec.T.clone())
    context = NeighbourContext(cache=None, dictionary=dictionary)
    for kind in ("decoder_similarity", "encoder_similarity"):
        finder = resolve("neighbour_finder", kind)({"chunk": 2})
        found = finder.neighbours([0, 4, 3], k=2, context=context)
        cos01 = 0.9 / (0.81 + 0.01) ** 0.5
        assert [j for j, _ in found[0]] == [1, 2] or [j for j, _ in found[0]] == [1, 4]
        assert found[0][0][1] == pytest.approx(cos01, abs=1e-6)
        assert found[3][0][1] == pytest.approx(0.0, abs=1e-6)  # the opposite direction is last, not first
        assert 0 not in [j for j, _ in found[3]][:1]
        assert all(j != 4 for j, _ in found[4]) and len(found[4]) == 2


def test_similarity_needs_weights():
    finder = resolve("neighbour_finder", "decoder_similarity")()
    with pytest.raises(UsageError, match="co-occurrence"):
        finder.neighbours([0], 2, NeighbourContext(cache=None, dictionary=HandDictionary()))


def test_names_are_case_insensitive():
    assert resolve("non_activating_source", "FAISS").name == "faiss"
    assert resolve("neighbour_finder", "Co-Occurrence").name == "co-occurrence"


def test_finder_options_are_validated_by_the_finder(pattern_cache):
    finder = resolve("neighbour_finder", "co-occurrence")({"block_latents": 2})
    assert finder.options.block_latents == 2
    # a small block gives the same neighbours as one pass (the option changes how, not what)
    ctx = NeighbourContext(pattern_cache)
    assert finder.neighbours([0, 1, 2], 2, ctx) == resolve("neighbour_finder", "co-occurrence")().neighbours(
        [0, 1, 2], 2, ctx)
    with pytest.raises(UsageError) as err:
        resolve("neighbour_finder", "encoder_similarity")({"block_latents": 2})
    assert str(err.value) == ("encoder_similarity options: unknown option 'block_latents'; "
                              "accepted options: chunk")
