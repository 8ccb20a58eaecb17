"""Architectures recover a known ground-truth dictionary when trained by the real trainer.

Synthetic data: 1000 random unit directions in R^128; each sample is a non-negative combination
(magnitudes uniform in [0.5, 1.5]) of features drawn independently with power-law frequencies
(p_i proportional to (i+1)^-0.5, about 8 active per sample, the rarest at ~0.4%), plus N(0, 0.01^2)
noise. Quality is the mean max cosine similarity (MMCS) of the true directions to the learned decoder
rows. A random dictionary of the same size scores ~0.28. Each test prints its figures (``pytest -s``).
"""

from __future__ import annotations

import time

import pytest
import torch
from saelab.dictionary import build_dictionary
from saelab.metrics import mmcs
from saelab.training import train_on_tensors

D, N_FEATURES, ACTIVE, N_SAMPLES = 128, 1000, 8, 40_000


def make_synthetic(n: int = N_SAMPLES, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples ``[n, D]`` and the true dictionary ``[N_FEATURES, D]``."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.nn.functional.normalize(torch.randn(N_FEATURES, D, generator=g), dim=1)
    weights = (torch.arange(N_FEATURES) + 1.0) ** -0.5
    p = (weights * ACTIVE / weights.sum()).clamp(max=1.0)
    active = torch.rand(n, N_FEATURES, generator=g) < p
    codes = active * (torch.rand(n, N_FEATURES, generator=g) + 0.5)
    return codes @ truth + 0.01 * torch.randn(n, D, generator=g), truth


@pytest.fixture(scope="module")
def synthetic() -> tuple[torch.Tensor, torch.Tensor]:
    return make_synthetic()


def test_synthetic_data_has_the_stated_statistics(synthetic) -> None:
    x, truth = synthetic
    assert x.shape == (N_SAMPLES, D) and truth.shape == (N_FEATURES, D)
    mean_norm2 = float(x.pow(2).sum(1).mean())
    # 8 active features with E[m^2] = 13/12, plus cross terms of nearly orthogonal directions.
    assert 6.0 < mean_norm2 < 12.0


def test_random_dictionary_baseline(synthetic) -> None:
    _, truth = synthetic
    score = mmcs(torch.randn(N_FEATURES, D, generator=torch.Generator().manual_seed(1)), truth)
    print(f"\nrandom dictionary of {N_FEATURES} rows: MMCS {score:.3f}")
    assert 0.2 < score < 0.5


CASES = [
    pytest.param("topk", {"k": 8}, 0.9, id="topk"),
    pytest.param("batchtopk", {"k": 8}, 0.9, id="batchtopk", marks=pytest.mark.slow),
    pytest.param("matryoshka", {"k": 8}, 0.9, id="matryoshka", marks=pytest.mark.slow),
    pytest.param("relu", {}, 0.8, id="relu", marks=pytest.mark.slow),
    pytest.param("jumprelu", {}, 0.8, id="jumprelu", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("arch", "options", "minimum"), CASES)
def test_recovers_ground_truth(synthetic, arch: str, options: dict, minimum: float) -> None:
    x, truth = synthetic
    torch.manual_seed(0)
    sites = {"inputs": ["synthetic"], "outputs": ["synthetic"], "d_in": D, "d_out": D}
    module = build_dictionary(arch, sites, {"d_sae": N_FEATURES, **options})
    start = time.perf_counter()
    result = train_on_tensors(module, x, batch_size=512, epochs=5, seed=0)
    seconds = time.perf_counter() - start
    score = mmcs(module.W_dec, truth)
    m = result.metrics
    print(f"\n{arch}: MMCS {score:.4f} (minimum {minimum}), FVU {m['fvu']:.3f}, L0 {m['l0']:.1f}, "
          f"dead {result.dead_final_epoch:.1%}, {result.steps} steps in {seconds:.0f}s")
    assert score >= minimum
