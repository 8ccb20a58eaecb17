"""Model diffing (``saelab.diffing``): per-site decoder norms in training units, relative norms, cosines,
classes at their bounds, the relative-norm histogram, closed-form latent scaling against a direct
least-squares fit, its artifact flags on hand-built Complete Shrinkage and Latent Decoupling, and the
synthetic two-model recovery test of issue 12 through the trainer."""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
import torch.nn.functional as F
from saelab import Options, SiteSpec, SparseDictionary, UsageError
from saelab.dictionary import build_dictionary
from saelab.diffing import (
    ARTIFACT_NU_THRESHOLD,
    CLASSES,
    LatentScalingAccumulator,
    class_counts,
    classify,
    decoder_diff,
    latent_scaling,
    relative_norm_histogram,
    site_decoder_norms,
    site_decoders,
)
from saelab.training import train_on_tensors

NAN = float("nan")


class HandCrosscoder(SparseDictionary):
    """A ReLU crosscoder with hand-set weights: ``W_enc [H, d, F]``, ``b_enc [F]``, ``W_dec [H, F, d]``,
    ``b_dec [H, d]`` (the crosscoder contract's layout)."""

    name = "hand_crosscoder"

    def __init__(self, W_dec: torch.Tensor, W_enc: torch.Tensor | None = None, b_enc: torch.Tensor | None = None,
                 b_dec: torch.Tensor | None = None):
        H, n_latents, d = W_dec.shape
        names = [f"model{h}.layers.0" for h in range(H)]
        super().__init__(SiteSpec(names, names, d, d), Options())
        self.W_dec = torch.nn.Parameter(W_dec.clone())
        self.W_enc = torch.nn.Parameter(W_dec.transpose(1, 2).clone() if W_enc is None else W_enc.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(n_latents) if b_enc is None else b_enc.clone())
        self.b_dec = torch.nn.Parameter(torch.zeros(H, d) if b_dec is None else b_dec.clone())

    @property
    def d_sae(self) -> int:
        return self.W_dec.shape[1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(torch.einsum("bhd,hdf->bf", x, self.W_enc) + self.b_enc)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bf,hfd->bhd", latents, self.W_dec) + self.b_dec

    def decoder_directions(self) -> torch.Tensor:
        return self.W_dec.permute(1, 0, 2).reshape(self.d_sae, -1)

    @torch.no_grad()
    def fold_scaling(self, input_scales: torch.Tensor, output_scales: torch.Tensor) -> None:
        s_in, s_out = input_scales.tolist(), output_scales.tolist()
        for h, (a, b) in enumerate(zip(s_in, s_out, strict=True)):
            self.W_enc[h] *= a
            self.W_dec[h] /= b
            self.b_dec[h] /= b
        self.extra_config["scaling_folded"] = {"input_scales": s_in, "output_scales": s_out}


def decoders(*rows: tuple[list[float], list[float]]) -> torch.Tensor:
    """``W_dec [2, F, d]`` from one (A row, B row) pair per latent."""
    return torch.tensor([[a for a, _ in rows], [b for _, b in rows]], dtype=torch.float32)


def same(a: list[float], b: list[float]) -> bool:
    return all((math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, abs=1e-6) for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------------------------------
# Decoder geometry


def test_relative_norms_cosines_classes_and_counts() -> None:
    W_dec = decoders(([1, 0, 0], [0, 0, 0]),      # A only
                     ([0, 0, 0], [0, 2, 0]),      # B only
                     ([1, 0, 0], [1, 0, 0]),      # shared, same direction
                     ([3, 0, 0], [0, 1, 0]),      # 1/4: other, orthogonal
                     ([1, 1, 0], [-1, -1, 0]),    # 1/2, opposite
                     ([0, 0, 0], [0, 0, 0]),      # dead: undefined
                     ([0, 0, 1], [0, 0, 1.5]))    # 0.6: shared (inclusive bound)
    diff = decoder_diff(HandCrosscoder(W_dec), [0], [1], bins=4)
    assert diff.norms.shape == (7, 2)
    assert same(diff.norms[:, 1].tolist(), [0, 2, 1, 1, math.sqrt(2), 0, 1.5])
    assert same(diff.relative.tolist(), [0, 1, 0.5, 0.25, 0.5, NAN, 0.6])
    assert diff.cosine is not None
    assert same(diff.cosine.tolist(), [NAN, NAN, 1, 0, -1, NAN, 1])
    assert diff.classes == ["a_only", "b_only", "shared", "other", "shared", "other", "shared"]
    assert diff.counts == {"a_only": 1, "b_only": 1, "shared": 3, "other": 2}
    assert list(diff.counts) == list(CLASSES)
    assert diff.latents_of("shared") == [2, 4, 6]
    assert diff.histogram.counts == [1, 1, 3, 1] and diff.histogram.undefined == 1
    with pytest.raises(UsageError, match="'weird' is not one of"):
        diff.latents_of("weird")  # type: ignore[arg-type]


@pytest.mark.parametrize(("relative", "expected"), [
    (0.0, "a_only"), (0.0999, "a_only"), (0.1, "other"), (0.1001, "other"), (0.3999, "other"), (0.4, "shared"),
    (0.5, "shared"), (0.6, "shared"), (0.6001, "other"), (0.8999, "other"), (0.9, "other"), (0.9001, "b_only"),
    (1.0, "b_only"), (NAN, "other"),
])
def test_classes_at_and_around_the_bounds(relative: float, expected: str) -> None:
    assert classify(torch.tensor([relative], dtype=torch.float64)) == [expected]


def test_class_counts_cover_every_class() -> None:
    assert class_counts(["other", "other", "a_only"]) == {"a_only": 1, "b_only": 0, "shared": 0, "other": 2}


def test_histogram_bins_edges_and_undefined() -> None:
    hist = relative_norm_histogram(torch.tensor([0.0, 0.05, 0.1, 0.49, 0.5, 0.99, 1.0, NAN]), bins=10)
    assert hist.edges == pytest.approx([i / 10 for i in range(11)])
    assert hist.counts == [2, 1, 0, 0, 1, 1, 0, 0, 0, 2]
    assert hist.undefined == 1 and sum(hist.counts) == 7
    with pytest.raises(UsageError, match="bins = 0"):
        relative_norm_histogram(torch.zeros(3), bins=0)


def test_groups_of_several_sites_use_the_concatenation() -> None:
    # H = 4: model A owns sites 0 and 2, model B sites 1 and 3 (paired 0<->1, 2<->3).
    W_dec = torch.zeros(4, 2, 2)
    W_dec[0, 0], W_dec[2, 0] = torch.tensor([3.0, 0]), torch.tensor([0, 4.0])   # ||d_A|| = 5
    W_dec[1, 0], W_dec[3, 0] = torch.tensor([0, 0.0]), torch.tensor([0, 5.0])   # ||d_B|| = 5
    W_dec[0, 1], W_dec[1, 1] = torch.tensor([1.0, 0]), torch.tensor([1.0, 0])   # site 0 == site 1
    W_dec[2, 1], W_dec[3, 1] = torch.tensor([0, 1.0]), torch.tensor([0, -1.0])  # site 2 == -site 3
    diff = decoder_diff(HandCrosscoder(W_dec), [0, 2], [1, 3])
    assert same(diff.relative.tolist(), [0.5, 0.5])
    assert diff.cosine is not None
    assert same(diff.cosine.tolist(), [(0 + 4 * 5) / 25, 0.0])
    assert decoder_diff(HandCrosscoder(W_dec), [0, 2], [1]).cosine is None  # unpaired: no cosine


@pytest.mark.parametrize(("a", "b", "fragment"), [
    ([0], [0], "overlap"), ([], [1], "group A = []"), ([0], [2], "group B = [2]"), ([0, 0], [1], "group A"),
])
def test_bad_site_groups_are_one_line_errors(a: list[int], b: list[int], fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment.replace("[", r"\[").replace("]", r"\]")) as err:
        decoder_diff(HandCrosscoder(decoders(([1, 0], [0, 1]))), a, b)
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="same number of sites"):
        latent_scaling(HandCrosscoder(torch.ones(3, 2, 2)), [torch.ones(2, 3, 2)], [0, 1], [2])


def test_norms_are_in_training_units_after_folding() -> None:
    W_dec = decoders(([1, 0, 0], [0, 1, 0]), ([1, 0, 0], [0, 0, 0]))
    module = HandCrosscoder(W_dec)
    before = decoder_diff(module, [0], [1])
    module.fold_scaling(torch.tensor([2.0, 0.25]), torch.tensor([2.0, 0.25]))
    raw = module.W_dec.norm(dim=-1).T  # [F, H]: 0.5 and 4 for latent 0
    assert same(raw[0].tolist(), [0.5, 4.0])
    after = decoder_diff(module, [0], [1])
    assert torch.allclose(after.norms, before.norms) and same(after.relative.tolist(), [0.5, 0.0])
    assert torch.allclose(site_decoder_norms(module), before.norms)
    module.extra_config["scaling_folded"] = {"output_scales": [1.0]}
    with pytest.raises(UsageError, match="one scale per output site"):
        site_decoder_norms(module)


def test_a_dictionary_without_a_decoder_matrix_is_refused() -> None:
    class NoDecoder(HandCrosscoder):
        def decoder_directions(self) -> None:  # type: ignore[override]
            return None

    with pytest.raises(UsageError, match="no decoder matrix"):
        decoder_diff(NoDecoder(torch.ones(2, 1, 2)), [0], [1])


# --------------------------------------------------------------------------------------------------
# Latent scaling


def random_crosscoder(seed: int, H: int = 2, n: int = 7, d: int = 5) -> HandCrosscoder:
    g = torch.Generator().manual_seed(seed)
    module = HandCrosscoder(torch.randn(H, n, d, generator=g), torch.randn(H, d, n, generator=g) * 0.5,
                            torch.randn(n, generator=g) * 0.3, torch.randn(H, d, generator=g) * 0.2)
    with torch.no_grad():
        module.b_enc[3] = -1e4  # never fires: beta undefined
        module.W_dec[1, 2] *= 0.05  # leans to A
    return module


def lstsq_beta(f: torch.Tensor, d: torch.Tensor, y: torch.Tensor) -> float:
    """argmin_beta sum_n ||beta f_n d - y_n||^2 by a direct least-squares solve."""
    A = (f[:, None] * d[None, :]).reshape(-1, 1)
    return float(torch.linalg.lstsq(A, y.reshape(-1, 1)).solution)


@pytest.mark.parametrize("folded", [False, True])
def test_betas_match_a_direct_least_squares_fit(folded: bool) -> None:
    module = random_crosscoder(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 2, 5, generator=g) + 0.2
    scales = torch.tensor([1.0, 1.0])
    if folded:  # training saw x * s; the folded module takes raw x and reports betas in training units
        scales = torch.tensor([3.0, 0.5])
        module.fold_scaling(scales, scales)
        x = x / scales[None, :, None]
    result = latent_scaling(module, x.split(64), [0], [1])
    module, x, scales = copy.deepcopy(module).double(), x.double(), scales.double()
    with torch.no_grad():
        f = module.encode(x)
        recon = module.decode(f)
    s = scales[None, :, None]
    xs, rs = recon * s, (x - recon) * s
    dec = module.W_dec.detach() * scales[:, None, None]  # [H, F, d] training units
    assert result.rows == 300 and result.latents == list(range(7))
    assert result.active[3] == 0 and math.isnan(result.beta_error_a[3]) and math.isnan(result.nu_error[3])
    assert not result.own_is_b[2]
    for i in range(7):
        if i == 3:
            continue
        own = 1 if result.own_is_b[i] else 0
        D = dec[own, i]
        for m, name in ((0, "a"), (1, "b")):
            error_target = rs[:, m] + f[:, i, None] * dec[m, i][None, :]
            expected_err = lstsq_beta(f[:, i], D, error_target)
            expected_rec = lstsq_beta(f[:, i], D, xs[:, m])
            assert float(getattr(result, f"beta_error_{name}")[i]) == pytest.approx(expected_err, rel=1e-4, abs=1e-5)
            assert float(getattr(result, f"beta_reconstruction_{name}")[i]) == pytest.approx(expected_rec, rel=1e-4,
                                                                                              abs=1e-5)
        own_name, other_name = ("b", "a") if own else ("a", "b")
        nu = getattr(result, f"beta_error_{other_name}")[i] / getattr(result, f"beta_error_{own_name}")[i]
        assert float(result.nu_error[i]) == pytest.approx(float(nu))


def artifact_data(n: int = 4000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features c0 (in both models, direction e0), c1 (only in B, e1), c2 (in both, e2); x [n, 2, 4]."""
    g = torch.Generator().manual_seed(seed)
    c = (torch.rand(n, 3, generator=g) < 0.3) * (torch.rand(n, 3, generator=g) + 0.5)
    e = torch.eye(4)
    x = torch.zeros(n, 2, 4)
    x[:, 0] = c[:, 0, None] * e[0] + c[:, 2, None] * e[2]
    x[:, 1] = c[:, 0, None] * e[0] + c[:, 1, None] * e[1] + c[:, 2, None] * e[2]
    return x, c


def test_latent_scaling_flags_complete_shrinkage_and_latent_decoupling() -> None:
    e = torch.eye(4)
    W_dec, W_enc = torch.zeros(2, 4, 4), torch.zeros(2, 4, 4)
    # latent 0: truly B-only (reads and writes e1 in B)
    W_enc[1, :, 0], W_dec[1, 0] = e[1], e[1]
    # latent 1: Complete Shrinkage: c0 lives in both models but its A decoder is zero
    W_enc[1, :, 1], W_dec[1, 1] = e[0], e[0]
    # latents 2 and 3: Latent Decoupling: c2 lives in both models, split into a B-only and an A-only latent
    W_enc[1, :, 2], W_dec[1, 2] = e[2], e[2]
    W_enc[0, :, 3], W_dec[0, 3] = e[2], e[2]
    module = HandCrosscoder(W_dec, W_enc)
    x, c = artifact_data()
    result = latent_scaling(module, x.split(500), [0], [1])
    assert result.classes == ["b_only", "b_only", "b_only", "a_only"]
    assert result.own_is_b.tolist() == [True, True, True, False]
    assert result.active.tolist() == [int((c[:, j] > 0).sum()) for j in (1, 0, 2, 2)]
    assert same(result.nu_error.tolist(), [0, 1, 0, 0])
    assert same(result.nu_reconstruction.tolist(), [0, 0, 1, 1])
    assert result.artifact.tolist() == [False, True, True, True]
    assert result.threshold == ARTIFACT_NU_THRESHOLD
    only = latent_scaling(module, x.split(500), [0], [1], latents=[1, 0])
    assert only.latents == [1, 0] and only.artifact.tolist() == [True, False]
    assert torch.equal(only.nu_error, result.nu_error[[1, 0]])


def test_shared_latents_are_never_flagged_and_the_accumulator_streams() -> None:
    e = torch.eye(4)
    W_dec, W_enc = torch.zeros(2, 1, 4), torch.zeros(2, 4, 1)
    W_enc[1, :, 0], W_dec[0, 0], W_dec[1, 0] = e[0], e[0], e[0]  # c0 shared: relative 0.5, nu ~ 1
    module = HandCrosscoder(W_dec, W_enc)
    x, _ = artifact_data()
    acc = LatentScalingAccumulator(module, [0], [1])
    for part in x.split(333):
        acc.update(part)
    result = acc.result()
    assert result.classes == ["shared"] and not result.artifact.any()
    assert float(result.nu_error[0]) == pytest.approx(1.0) and float(result.nu_reconstruction[0]) == pytest.approx(1.0)
    assert result.rows == len(x)


def test_latent_scaling_bad_input_is_one_line_error() -> None:
    module = HandCrosscoder(torch.ones(2, 3, 4))
    with pytest.raises(UsageError, match=r"shape \(5, 3, 4\) is not \[batch, 2, 4\]"):
        latent_scaling(module, [torch.ones(5, 3, 4)], [0], [1])
    with pytest.raises(UsageError, match="no activation batches"):
        latent_scaling(module, [], [0], [1])
    with pytest.raises(UsageError, match=r"latents \[7\] are out of range"):
        latent_scaling(module, [torch.ones(5, 2, 4)], [0], [1], latents=[0, 7])
    with pytest.raises(UsageError, match="threshold -1"):
        latent_scaling(module, [torch.ones(5, 2, 4)], [0], [1], threshold=-1)


# --------------------------------------------------------------------------------------------------
# The crosscoder architecture



XC_SITES = SiteSpec(["a.layers.0", "b.layers.0"], ["a.layers.0", "b.layers.0"], 32, 32)


def test_crosscoder_norms_match_its_own_training_unit_norms_after_folding() -> None:
    torch.manual_seed(0)
    module = build_dictionary("crosscoder", XC_SITES, {"d_sae": 16, "activation": "batchtopk", "k": 2})
    before = decoder_diff(module, [0], [1])
    module.fold_scaling(torch.tensor([4.0, 0.5]), torch.tensor([4.0, 0.5]))
    after = decoder_diff(module, [0], [1])
    assert torch.allclose(after.norms, module.site_decoder_norms().float(), rtol=1e-5)
    assert torch.allclose(after.norms, before.norms, rtol=1e-5)
    assert torch.allclose(after.relative, before.relative, atol=1e-6)
    raw = module.W_dec.detach().norm(dim=-1).T
    assert not torch.allclose(raw, after.norms, rtol=1e-2)  # the raw (folded) norms differ: scales matter


def two_models(n: int, d: int = 32, n_shared: int = 12, n_a: int = 4, n_b: int = 4, active: float = 3.0,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two "models" (sites A and B of width ``d``) over one orthonormal basis, as a base model and its
    fine-tune share a residual basis: ``n_shared`` features write the same direction to both, ``n_a`` only
    to A, ``n_b`` only to B, and the last one to both but at half strength in B. Each feature is on with
    probability ``active / n_features``, magnitude uniform in [0.5, 1.5]; noise 0.01.
    Returns ``(x [n, 2, d], A [nf, d], B [nf, d])`` (A's and B's write of each feature)."""
    g = torch.Generator().manual_seed(seed)
    nf = n_shared + n_a + n_b + 1
    basis = torch.linalg.qr(torch.randn(d, d, generator=g)).Q.T[:nf]
    A, B = basis.clone(), basis.clone()
    B[n_shared:n_shared + n_a] = 0
    A[n_shared + n_a:n_shared + n_a + n_b] = 0
    B[-1] *= 0.5
    c = (torch.rand(n, nf, generator=g) < active / nf) * (torch.rand(n, nf, generator=g) + 0.5)
    x = torch.stack([c @ A, c @ B], 1) + 0.01 * torch.randn(n, 2, d, generator=g)
    return x, A, B


def precision_recall(members: list[int], decoders: torch.Tensor, planted: torch.Tensor) -> tuple[float, float]:
    """Latents ``members`` against planted directions at cosine >= 0.9: precision (members matching some
    planted direction) and recall (planted directions matched by some member)."""
    cos = F.normalize(decoders[members], dim=-1) @ F.normalize(planted, dim=-1).T
    hit = cos >= 0.9
    return (float(hit.any(1).float().mean()) if members else 0.0), float(hit.any(0).float().mean())


def test_synthetic_two_models_planted_differences_are_recovered(one_thread) -> None:
    n_shared, n_a, n_b = 12, 4, 4
    x, A, B = two_models(8000, n_shared=n_shared, n_a=n_a, n_b=n_b)
    torch.manual_seed(0)
    module = build_dictionary("crosscoder", XC_SITES, {"d_sae": 32, "activation": "batchtopk", "k": 3})
    start = time.perf_counter()
    result = train_on_tensors(module, x, batch_size=256, epochs=8, seed=0)
    seconds = time.perf_counter() - start
    diff = decoder_diff(module.eval(), [0], [1])
    dec = site_decoders(module)  # [F, 2, d], training units
    a_only, b_only = slice(n_shared, n_shared + n_a), slice(n_shared + n_a, n_shared + n_a + n_b)
    prec_a, rec_a = precision_recall(diff.latents_of("a_only"), dec[:, 0], A[a_only])
    prec_b, rec_b = precision_recall(diff.latents_of("b_only"), dec[:, 1], B[b_only])
    # each planted feature's latent: the best cosine between concatenated decoders and concatenated writes
    cos = F.normalize(dec.flatten(1), dim=-1) @ F.normalize(torch.cat([A, B], 1), dim=-1).T
    best_cos, best = cos.max(0)
    scaling = latent_scaling(module, x[:4096].split(1024), [0], [1], latents=best.tolist())
    half = len(best) - 1
    print(f"\ncrosscoder batchtopk: FVU {result.metrics['fvu']:.4f}, {seconds:.1f}s, classes {diff.counts}, "
          f"A-only P/R {prec_a:.2f}/{rec_a:.2f}, B-only P/R {prec_b:.2f}/{rec_b:.2f}, half-strength: "
          f"{diff.classes[int(best[half])]} (relative {float(diff.relative[best[half]]):.2f}, nu_error "
          f"{float(scaling.nu_error[half]):.2f}, nu_reconstruction {float(scaling.nu_reconstruction[half]):.2f})")
    assert prec_a >= 0.8 and rec_a >= 0.8 and prec_b >= 0.8 and rec_b >= 0.8
    assert (best_cos >= 0.9).all(), best_cos
    shared_classes = [diff.classes[i] for i in best[:n_shared].tolist()]
    assert shared_classes == ["shared"] * n_shared
    half_class = diff.classes[int(best[half])]
    assert half_class != "b_only" or bool(scaling.artifact[half])
    # latent scaling measures presence: ~0 for the planted model-specific latents (not flagged), ~1 for the
    # shared ones, ~1/2 for the feature B carries at half strength
    specific = list(range(n_shared, n_shared + n_a + n_b))
    assert [scaling.classes[i] for i in specific] == ["a_only"] * n_a + ["b_only"] * n_b
    assert not scaling.artifact[specific].any()
    assert scaling.nu_error[specific].abs().max() < 0.1 and scaling.nu_reconstruction[specific].abs().max() < 0.1
    assert (scaling.nu_error[:n_shared] > 0.8).all() and (scaling.nu_reconstruction[:n_shared] > 0.8).all()
    assert float(scaling.nu_error[half]) == pytest.approx(0.5, abs=0.15)


def test_class_latents_needs_two_sites() -> None:
    from saelab.diffing import class_latents

    three = build_dictionary("crosscoder", SiteSpec(["a", "b", "c"], ["a", "b", "c"], 8, 8), {"d_sae": 4})
    with pytest.raises(UsageError, match="two sites") as excinfo:
        class_latents(three, "b_only")
    assert "\n" not in str(excinfo.value)
    two = build_dictionary("crosscoder", SiteSpec(["a", "b"], ["a", "b"], 8, 8), {"d_sae": 4})
    with torch.no_grad():
        two.W_dec[0, 1:3] = 0  # latents 1 and 2 write to B only
    assert class_latents(two, "b_only") == [1, 2] and class_latents(two, "b_only", among=[2, 3]) == [2]


def test_run_diffing_class_errors_are_one_line() -> None:
    """``saelab run --diffing_class``: an empty class and several dictionaries are one-line errors; the
    class's latents are capped by ``--max_latents``."""
    from saelab.plugins.commands.run import _class_latents

    two = build_dictionary("crosscoder", SiteSpec(["a", "b"], ["a", "b"], 8, 8), {"d_sae": 4})
    with torch.no_grad():
        two.W_dec[0, 1:3] = 0  # latents 1 and 2 write to B only; none to A only
    assert _class_latents({"diffing_class": "b_only", "max_latents": 1}, {"x": two}) == [1]
    for values, dictionaries, fragment in (({"diffing_class": "a_only"}, {"x": two}, "--diffing_class a_only: no latent"),
                                           ({"diffing_class": "b_only"}, {"x": two, "y": two}, "one dictionary")):
        with pytest.raises(UsageError, match=fragment) as excinfo:
            _class_latents(values, dictionaries)
        assert "\n" not in str(excinfo.value)
