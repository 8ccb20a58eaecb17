"""The ``crosscoder`` architecture: every activation against a naive einsum reference with norm-weighted
ranking, the sparse and dense decode paths, the decoder-norm conventions, BatchTopK's inference threshold,
per-site folding, AuxK, per-site pre-activations, recovery of planted per-site directions through the
trainer, and ``saelab train --architecture crosscoder --layers`` followed by ``saelab evaluate``."""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch
from saelab import SiteSpec, UsageError
from saelab.dictionary import build_dictionary, geometric_median, load_dictionary, save_dictionary
from saelab.metrics import mmcs
from saelab.training import train_on_tensors

ACTIVATIONS = ["relu", "jumprelu", "topk", "batchtopk"]
NORMS = ["sum", "concat", "none"]
H, D, F, K, BATCH = 3, 10, 24, 3, 32


def sites(h: int = H, d: int = D) -> SiteSpec:
    names = [f"layers.{i}" for i in range(h)]
    return SiteSpec(names, list(names), d, d)


def make(h: int = H, seed: int = 0, **options) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_dictionary("crosscoder", sites(h), {"d_sae": F, "k": K, **options})


def batch(h: int = H, n: int = BATCH, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, h, D, generator=g) + 0.3


def randomise(module: torch.nn.Module, seed: int = 5) -> None:
    """Nonzero biases, decoders of uneven per-site norms and non-unit ``norm_scales``: every term shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "log_threshold":
                p.copy_(torch.rand(p.shape, generator=g).log() - 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.startswith("W_") else 0.1))
        module.W_dec.mul_(torch.rand(module.W_dec.shape[:2], generator=g)[..., None] * 2 + 0.1)
        module.norm_scales.copy_(torch.rand(module.norm_scales.shape, generator=g) + 0.5)


def gating(module, how: str) -> torch.Tensor:
    N = module.norm_scales[:, None] * module.W_dec.norm(dim=-1)  # [H, F]
    return {"sum": N.sum(0), "concat": N.pow(2).sum(0).sqrt(), "none": torch.ones_like(N[0])}[how]


def naive(module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents and reconstruction by the formulas, one einsum each (BatchTopK: training-mode selection, or
    the threshold when the module is in eval mode with one)."""
    o = module.options
    h = torch.einsum("bhd,hdf->bf", x, module.W_enc) + module.b_enc
    f = h.relu()
    n = gating(module, o.decoder_norm)
    if o.activation == "relu":
        z = f
    elif o.activation == "jumprelu":
        z = h * (h > module.log_threshold.exp())
    elif o.activation == "topk":
        idx = (f * n).topk(o.k, dim=1).indices
        z = torch.zeros_like(f).scatter(1, idx, f.gather(1, idx))
    elif module.training or float(module.threshold) < 0:
        w = (f * n).reshape(-1)
        keep = torch.zeros_like(w, dtype=torch.bool)
        keep[w.topk(o.k * len(x)).indices] = True
        z = f * (keep & (w > 0)).reshape(f.shape)
    else:
        z = f * (f * n > module.threshold)
    return z, torch.einsum("bf,hfd->bhd", z, module.W_dec) + module.b_dec


# --------------------------------------------------------------------------------------------------
# Forward, encode, decode


@pytest.mark.parametrize("decoder_norm", NORMS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_matches_a_naive_reference(activation: str, decoder_norm: str) -> None:
    module = make(activation=activation, decoder_norm=decoder_norm, l0_coefficient=0.7, tanh_scale=3.0).double()
    randomise(module)
    assert module.W_enc.shape == (H, D, F) and module.b_enc.shape == (F,)
    assert module.W_dec.shape == (H, F, D) and module.b_dec.shape == (H, D) and module.d_sae == F
    x = batch().double()
    module.train()
    with torch.no_grad():
        z, recon = naive(module, x)
        out = module(x)
    assert (z != 0).any() and (z == 0).any()
    torch.testing.assert_close(out.latents, z, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.reconstruction, recon, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.losses["mse"], (recon - x).pow(2).sum((1, 2)).mean())
    n = gating(module, decoder_norm)
    if activation == "relu":
        torch.testing.assert_close(out.losses["sparsity"], 0.7 * (z * n).sum(-1).mean())
    elif activation == "jumprelu":
        torch.testing.assert_close(out.losses["sparsity"], 0.7 * torch.tanh(3.0 * z * n).sum(-1).mean())
    else:
        assert set(out.losses) == {"mse"}
    if activation == "batchtopk":  # the smallest kept f * n, estimated by the training-mode forward above
        torch.testing.assert_close(module.threshold, (z * n)[z != 0].min())
    module.eval()
    x = batch(seed=2).double()
    with torch.no_grad():
        z, recon = naive(module, x)
        torch.testing.assert_close(module.encode(x), z, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(module.decode(z), recon, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(module(x).reconstruction, recon, rtol=1e-10, atol=1e-12)


def test_site_preactivations_sum_to_the_shared_preactivation() -> None:
    module = make().double()
    randomise(module)
    x = batch().double()
    shares = module.site_preactivations(x)
    assert shares.shape == (BATCH, H, F)
    torch.testing.assert_close(shares[:, 1], x[:, 1] @ module.W_enc[1])
    h = torch.einsum("bhd,hdf->bf", x, module.W_enc) + module.b_enc
    torch.testing.assert_close(shares.sum(1), h - module.b_enc)


def test_directions_and_norms_per_site() -> None:
    module = make()
    randomise(module)
    dec, enc = module.decoder_directions(), module.encoder_directions()
    assert dec.shape == enc.shape == (F, H * D)
    for h in range(H):
        assert torch.equal(dec[:, h * D:(h + 1) * D], module.W_dec[h])
        assert torch.equal(enc[:, h * D:(h + 1) * D], module.W_enc[h].T)
    raw = module.W_dec.detach().norm(dim=-1).T
    torch.testing.assert_close(module.decoder_norms_by_output(), raw)  # the interface default: raw units
    torch.testing.assert_close(module.output_directions([0, 2]), module.W_dec[0] + module.W_dec[2])
    trained = module.site_decoder_norms()
    assert trained.shape == (F, H) and trained.dtype == torch.float32
    torch.testing.assert_close(trained, raw * module.norm_scales)


def test_decoder_norm_conventions() -> None:
    """Per-site decoder norms 3 and 4 (times norm_scales 1, 2): sum 11, concat sqrt(9 + 64), none 1."""
    results = {}
    for how in NORMS:
        module = make(h=2, decoder_norm=how)
        with torch.no_grad():
            module.W_dec.copy_(torch.nn.functional.normalize(module.W_dec, dim=-1))
            module.W_dec[0].mul_(3.0)
            module.W_dec[1].mul_(4.0)
            module.norm_scales.copy_(torch.tensor([1.0, 2.0]))
        results[how] = module.gating_norms().detach()
        torch.testing.assert_close(module.site_decoder_norms(), torch.tensor([[3.0, 8.0]]).expand(F, 2))
    torch.testing.assert_close(results["sum"], torch.full((F,), 11.0))
    torch.testing.assert_close(results["concat"], torch.full((F,), 73.0 ** 0.5))
    torch.testing.assert_close(results["none"], torch.ones(F))


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_topk_ranking_is_decoder_norm_weighted(activation: str) -> None:
    """Latent 0 has the larger pre-activation (2 vs 1) but decoder norms 0.1 per site; latent 1's are 1:
    ``f * n`` ranks latent 1 first (0.4 vs 2), unless ``decoder_norm="none"``."""
    chosen = {}
    for how in ("sum", "none"):
        module = build_dictionary("crosscoder", sites(2, 4), {"d_sae": 4, "k": 1, "activation": activation,
                                                               "decoder_norm": how})
        module.train()
        with torch.no_grad():
            module.W_enc.zero_()
            module.W_enc[0, 0, 0], module.W_enc[0, 0, 1] = 2.0, 1.0
            module.b_enc.copy_(torch.tensor([0.0, 0.0, -1.0, -1.0]))
            module.W_dec.copy_(torch.nn.functional.normalize(torch.randn(2, 4, 4), dim=-1))
            module.W_dec[:, 0].mul_(0.1)
        x = torch.zeros(1, 2, 4)
        x[0, 0, 0] = 1.0
        z = module(x).latents
        chosen[how] = int(z[0].nonzero().squeeze())
        assert float(z[0, chosen[how]]) == pytest.approx(2.0 if chosen[how] == 0 else 1.0)  # the value is f
    assert chosen == {"sum": 1, "none": 0}


# --------------------------------------------------------------------------------------------------
# Sparse and dense decoding, losses


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_sparse_and_dense_decode_paths_agree(activation: str) -> None:
    """Same reconstruction, losses and gradients of every parameter (float64) through either path."""
    results = []
    for decode in ("sparse", "dense"):
        module = make(activation=activation, decode=decode, auxk_k=5).double()
        randomise(module)
        module.train()
        x = batch().double()
        out = module(x, dead_mask=torch.arange(F) % 3 == 0)
        params = dict(module.named_parameters())
        grads = torch.autograd.grad(sum(out.losses.values()), list(params.values()), allow_unused=True)
        results.append((out, dict(zip(params, grads, strict=True))))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a.reconstruction, b.reconstruction, rtol=1e-10, atol=1e-10)
    assert a.losses.keys() == b.losses.keys()
    assert a.losses.keys() == ({"mse", "auxk"} if activation in ("topk", "batchtopk") else {"mse", "sparsity"})
    for key in a.losses:
        torch.testing.assert_close(a.losses[key], b.losses[key], rtol=1e-10, atol=1e-10, msg=key)
    for name in ga:
        assert ga[name] is not None and gb[name] is not None, name
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-9, atol=1e-10, msg=name)
        assert ga[name].abs().sum() > 0, name


def test_auto_decode_picks_the_path_by_density() -> None:
    module = make(activation="topk", sparse_max_density=0.1)
    chosen = []
    module.decode_sparse = lambda codes, f=module.decode_sparse: chosen.append("sparse") or f(codes)
    module.decode_dense = lambda z, f=module.decode_dense: chosen.append("dense") or f(z)
    module(batch())  # k/F = 3/24 > 0.1
    module.options = module.Options.parse({**module.options.model_dump(), "k": 2})  # 2/24 <= 0.1
    module(batch())
    assert chosen == ["dense", "sparse"]


def test_loss_reduction_mean_divides_every_term_by_the_sites() -> None:
    x = batch()
    out = {}
    for reduction in ("sum", "mean"):
        module = make(activation="relu", loss_reduction=reduction)
        randomise(module)
        out[reduction] = module(x).losses
    for key in ("mse", "sparsity"):
        torch.testing.assert_close(out["mean"][key], out["sum"][key] / H)


def test_penalty_warms_up_over_steps() -> None:
    module = make(activation="relu", l0_warmup_steps=4)
    x = batch()
    with torch.no_grad():
        full = float(make(activation="relu")(x).losses["sparsity"])
        assert float(module(x).losses["sparsity"]) == pytest.approx(full / 4)
        for _ in range(5):
            module.after_optimizer_step()
        assert float(module(x).losses["sparsity"]) == pytest.approx(full)


# --------------------------------------------------------------------------------------------------
# AuxK


def auxk_reference(module, x: torch.Tensor, dead: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """AuxK by the formulas: the ``auxk_k`` dead latents with the largest ``pre * n`` per row, ReLU'd,
    reconstruct the detached residual of all sites; normalised by its variance times the data's."""
    o = module.options
    pre = torch.einsum("bhd,hdf->bf", x, module.W_enc) + module.b_enc
    score = (pre * gating(module, o.decoder_norm)).detach().masked_fill(~dead, float("-inf"))
    idx = score.topk(min(o.auxk_k, int(dead.sum())), dim=1).indices
    z = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).relu())
    e_hat = torch.einsum("bf,hfd->bhd", z, module.W_dec)
    resid = (x - recon).detach()
    var_x = (x - x.mean(0)).pow(2).sum((1, 2)).mean()
    var_e = (resid - resid.mean(0)).pow(2).sum((1, 2)).mean()
    scale = min(int(dead.sum()) / o.auxk_k, 1.0)
    return o.auxk_alpha * scale * (e_hat - resid).pow(2).sum((1, 2)).mean() * var_x / var_e


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
@pytest.mark.parametrize(("auxk_k", "dead_every"), [(5, 3), (2, 2)], ids=["dense-auxk", "sparse-auxk"])
def test_auxk_reaches_only_dead_latents(activation: str, auxk_k: int, dead_every: int) -> None:
    module = make(activation=activation, auxk_k=auxk_k, auxk_alpha=0.5).double()
    randomise(module)
    x = batch().double()
    dead = torch.arange(F) % dead_every == 0
    out = module(x, dead_mask=dead)
    params = dict(module.named_parameters())
    got = dict(zip(params, torch.autograd.grad(out.losses["auxk"], list(params.values()), allow_unused=True),
                   strict=True))
    ref = auxk_reference(module, x, dead, out.reconstruction)
    torch.testing.assert_close(out.losses["auxk"], ref)
    want = dict(zip(params, torch.autograd.grad(ref, list(params.values()), allow_unused=True), strict=True))
    for name in ("W_enc", "b_enc", "W_dec"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12, msg=name)
    assert got["W_enc"][..., dead].abs().sum() > 0 and got["W_dec"][:, dead].abs().sum() > 0
    assert torch.all(got["W_enc"][..., ~dead] == 0) and torch.all(got["b_enc"][~dead] == 0)
    assert torch.all(got["W_dec"][:, ~dead] == 0)
    assert got["b_dec"] is None or torch.all(got["b_dec"] == 0)
    assert "auxk" not in module(x, dead_mask=torch.zeros(F, dtype=torch.bool)).losses


# --------------------------------------------------------------------------------------------------
# BatchTopK's threshold


def test_batchtopk_threshold_is_estimated_in_training_and_used_in_eval(tmp_path) -> None:
    module = make(activation="batchtopk", threshold_momentum=0.25)
    randomise(module)
    assert float(module.threshold) < 0
    module.train()
    n = gating(module, "sum").detach()
    expected = None
    for step in range(1, 7):
        out = module(batch(seed=step))
        s = out.sparse_latents
        assert s.values.numel() == K * BATCH
        smallest = float((s.values * n[s.cols]).min())
        w = max(1 / step, 0.25)
        expected = smallest if expected is None else (1 - w) * expected + w * smallest
        assert float(module.threshold) == pytest.approx(expected, rel=1e-5)
    assert int(module.threshold_updates) == 6
    module.eval()
    x = batch(n=256, seed=9)
    with torch.no_grad():
        before = module.threshold.clone()
        z = module.encode(x)
        module(x)
        assert torch.equal(module.threshold, before)  # not updated in eval mode
        f = (torch.einsum("bhd,hdf->bf", x, module.W_enc) + module.b_enc).relu()
    assert torch.equal(z != 0, f * n > module.threshold)
    torch.testing.assert_close(module.encode(x[:1]), z[:1])  # inference does not depend on the batch
    assert K / 3 < float((z != 0).sum(-1).float().mean()) < 3 * K
    save_dictionary(module, tmp_path / "xc")
    loaded = load_dictionary(tmp_path / "xc")
    assert torch.equal(loaded.threshold, module.threshold) and int(loaded.threshold_updates) == 6
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), z)
    module.synchronize(lambda t: t * 0 + 0.5)
    assert float(module.threshold) == 0.5


# --------------------------------------------------------------------------------------------------
# Folding, save/load, options


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fold_scaling_per_site(activation: str, tmp_path) -> None:
    """Folded: raw inputs give the latents of scaled inputs and the unscaled reconstructions; the
    training-unit decoder norms (gating, ranking, penalty) do not move; save/load keeps ``norm_scales``."""
    module = make(activation=activation)
    randomise(module)
    module.train()
    s = torch.tensor([3.0, 0.5, 2.0])
    x = batch()
    module(x * s[None, :, None])  # BatchTopK: a threshold
    module.eval()
    folded = copy.deepcopy(module)
    folded.fold_scaling(s, s)
    with torch.no_grad():
        scaled = module(x * s[None, :, None])
        got = folded(x)
    torch.testing.assert_close(got.latents, scaled.latents, rtol=1e-4, atol=1e-5)
    assert (got.latents != 0).any()
    torch.testing.assert_close(got.reconstruction, scaled.reconstruction / s[None, :, None], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(folded.site_decoder_norms(), module.site_decoder_norms())
    torch.testing.assert_close(folded.gating_norms(), module.gating_norms())
    for key in set(got.losses) - {"mse"}:
        torch.testing.assert_close(got.losses[key], scaled.losses[key], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(folded.norm_scales, module.norm_scales * s)
    assert folded.extra_config["scaling_folded"] == {"input_scales": s.tolist(), "output_scales": s.tolist()}
    save_dictionary(folded, tmp_path / "folded")
    loaded = load_dictionary(tmp_path / "folded")
    assert loaded.state_dict().keys() == folded.state_dict().keys()
    assert all(torch.equal(v, folded.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert loaded.extra_config["scaling_folded"] == folded.extra_config["scaling_folded"]
    with pytest.raises(UsageError, match="one scale per site"):
        folded.fold_scaling(torch.ones(2), torch.ones(3))


@pytest.mark.parametrize("how", ["geometric_median", "mean", "zeros"])
def test_initialize_from_data_sets_each_sites_decoder_bias(how: str) -> None:
    module = make(b_dec_init=how)
    x = batch(n=64) + torch.arange(H)[None, :, None]
    module.initialize_from_data(x, x)
    for h in range(H):
        expected = {"geometric_median": geometric_median(x[:, h]), "mean": x[:, h].mean(0),
                    "zeros": torch.zeros(D)}[how]
        torch.testing.assert_close(module.b_dec[h].detach(), expected)


def test_sites_for_layers() -> None:
    cls = make().__class__
    assert cls.sites_for_layers([3, 4], cls.Options()) == (["layers.3", "layers.4"], ["layers.3", "layers.4"])
    mlp = cls.Options.parse({"layer_site": "mlp"})
    assert cls.sites_for_layers([3, 4], mlp) == (["layers.3.mlp", "layers.4.mlp"], ["layers.3.mlp", "layers.4.mlp"])
    assert not cls.per_layer_sites


def test_bad_sites_and_options_are_one_line_errors() -> None:
    with pytest.raises(UsageError, match=r"reconstructs the sites it reads.*\['a', 'b'\].*\['c', 'd'\]") as info:
        build_dictionary("crosscoder", SiteSpec(["a", "b"], ["c", "d"], 8, 8), {"d_sae": 8})
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="k=9 is larger than d_sae=8"):
        build_dictionary("crosscoder", sites(), {"d_sae": 8, "k": 9, "activation": "topk"})
    build_dictionary("crosscoder", sites(), {"d_sae": 8, "k": 9})  # relu ignores k
    for key, value in (("activation", "gelu"), ("decoder_norm", "max"), ("layer_site", "mlp.output")):
        with pytest.raises(UsageError, match=key) as info:
            build_dictionary("crosscoder", sites(), {"d_sae": 8, key: value})
        assert "\n" not in str(info.value)


def test_one_site_accepts_two_dimensional_inputs() -> None:
    module = make(h=1, activation="topk")
    x = batch(h=1)
    with torch.no_grad():
        torch.testing.assert_close(module(x[:, 0]).reconstruction, module(x).reconstruction)
    with pytest.raises(ValueError, match=r"input must have shape \[batch, 3, 10\]"):
        make()(torch.zeros(4, 2, D))


# --------------------------------------------------------------------------------------------------
# Synthetic ground truth


def planted_sites(n: int, h: int, d: int, shared: int, per_site: int, active: float, seed: int = 0):
    """H sites of width d. ``shared`` features write to every site, ``per_site`` more to one site each;
    each (feature, site) pair has its own random unit direction. Each feature is on with probability
    ``active / n_features``, magnitude uniform in [0.5, 1.5], shared by the sites it writes to; noise
    N(0, 0.01^2). Returns ``(x [n, H, d], directions [nf, H, d] (zero where a feature does not write),
    writes [nf, H] bool)``."""
    g = torch.Generator().manual_seed(seed)
    nf = shared + h * per_site
    writes = torch.zeros(nf, h, dtype=torch.bool)
    writes[:shared] = True
    for i in range(h):
        writes[shared + i * per_site:shared + (i + 1) * per_site, i] = True
    directions = torch.nn.functional.normalize(torch.randn(nf, h, d, generator=g), dim=-1) * writes[..., None]
    on = torch.rand(n, nf, generator=g) < active / nf
    c = on * (torch.rand(n, nf, generator=g) + 0.5)
    return torch.einsum("nf,fhd->nhd", c, directions) + 0.01 * torch.randn(n, h, d, generator=g), directions, writes



@pytest.mark.parametrize("activation", ["topk", "batchtopk", "relu"])
def test_recovers_planted_per_site_directions(activation: str, one_thread) -> None:
    """3 sites of width 64, 16 shared features and 8 per site: every site's decoders find the planted
    directions written there (MMCS >= 0.9), a site-specific feature's latent has almost no decoder at
    the other sites and a shared feature's latent decodes to all three."""
    h, d = 3, 64
    x, directions, writes = planted_sites(8000, h, d, shared=16, per_site=8, active=4.0)
    torch.manual_seed(0)
    module = build_dictionary("crosscoder", sites(h, d), {"d_sae": 64, "k": 4, "activation": activation})
    start = time.perf_counter()
    result = train_on_tensors(module, x, batch_size=256, epochs=8, seed=0)
    seconds = time.perf_counter() - start
    W = module.W_dec.detach()
    scores = [mmcs(W[i], directions[writes[:, i], i]) for i in range(h)]
    shares = []  # the best-matching latent's share of decoder norm per site, for every planted feature
    for f in range(len(directions)):
        site = int(writes[f].nonzero()[0])
        latent = int((torch.nn.functional.normalize(W[site], dim=-1) @ directions[f, site]).argmax())
        norms = W[:, latent].norm(dim=-1)
        shares.append(norms / norms.sum())
    shares_ = torch.stack(shares)
    specific = ~writes.all(1)
    off_site = float(shares_[specific][~writes[specific]].max())
    shared_min = float(shares_[writes.all(1)].min())
    print(f"\ncrosscoder {activation}: FVU {result.metrics['fvu']:.3f}, L0 {result.metrics['l0']:.1f}, {seconds:.0f}s, "
          f"MMCS per site {[round(s, 3) for s in scores]}, largest off-site share {off_site:.2f}, "
          f"smallest shared share {shared_min:.2f}")
    assert min(scores) >= 0.9, scores
    assert off_site < 0.15 and shared_min > 0.15


# --------------------------------------------------------------------------------------------------
# saelab train --layers, saelab evaluate


def test_train_layers_then_evaluate(cli, results_dir) -> None:
    """``saelab train --architecture crosscoder --layers 0-1`` on the tiny GPT-2 (a few steps) writes one
    crosscoder over the block outputs ``layers.0``, ``layers.1``; ``saelab evaluate`` on the run reports it."""
    from fixtures.tiny_models import TINY_GPT2

    res = cli(["train", str(TINY_GPT2), "--name", "xc", "--architecture", "crosscoder", "--layers", "0-1",
               "-o", "d_sae", "32", "-o", "activation", "batchtopk", "-o", "k", "4",
               "--dataset_repo", "news-sample", "--dataset_split", "train", "--n_tokens", "2048",
               "--cache_ctx_len", "64", "--train_batch_size", "64", "--max_steps", "3"])
    assert res.exit_code == 0, res.stderr
    directory = results_dir / "xc" / "dictionaries" / "layers.0-1"
    cfg = json.loads((directory / "cfg.json").read_text())
    assert cfg["architecture"] == "crosscoder" and cfg["d_sae"] == 32
    assert cfg["sites"]["inputs"] == cfg["sites"]["outputs"] == ["layers.0", "layers.1"]
    assert len(cfg["metadata"]["scaling_folded"]["output_scales"]) == 2
    module = load_dictionary(directory)
    assert module.name == "crosscoder" and float(module.threshold) > 0 and int(module.threshold_updates) == 3
    assert not torch.equal(module.norm_scales, torch.ones(2))  # the per-site normalisation was folded in
    res = cli("evaluate", str(results_dir / "xc"), "--n_tokens", "256", "--batch_size", "4")
    assert res.exit_code == 0, res.stderr
    metrics = json.loads((directory / "eval.json").read_text())["metrics"]
    assert 0 < metrics["fvu"] < 1.5 and metrics["l0"] > 0 and metrics["d_sae"] == 32
    assert [row["site"] for row in metrics["per_site"]] == ["layers.0", "layers.1"]
    # model diffing of the two sites (A = layers.0, B = layers.1): summary in eval.json, columns in diffing.json
    diffing = metrics["diffing"]
    assert diffing["a_sites"] == ["layers.0"] and diffing["b_sites"] == ["layers.1"] and "diffing_latents" not in metrics
    per_latent = json.loads((directory / "diffing.json").read_text())["latents"]
    assert len(per_latent["class"]) == 32 and "diffing (A = layers.0, B = layers.1)" in res.stdout
    fired = [n > 0 for n in per_latent["fired"]]
    assert sum(diffing["counts"].values()) == diffing["latents_fired"] == sum(fired) > 0
    norms = module.site_decoder_norms().double()
    expected = norms[:, 1] / norms.sum(1)
    assert torch.allclose(torch.tensor(per_latent["relative_norm"], dtype=torch.float64), expected, atol=1e-5)
