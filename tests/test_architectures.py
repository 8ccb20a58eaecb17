"""Contract test of every registered architecture (SparseDictionary plugins), plus TopK-specific checks."""

from __future__ import annotations

import copy
import gc
import json
import math
import weakref

import pytest
import saelab
import torch
from saelab import SiteSpec, UsageError
from saelab.dictionary import (
    DictionaryOptions,
    LinearDictionary,
    SparseCodes,
    build_dictionary,
    geometric_median,
    load_dictionary,
    save_dictionary,
)
from saelab.metrics import mmcs
from saelab.plugins.architectures._topk_family import BatchTopKDictionary, TopKDictionary
from saelab.training import train_on_tensors
from training_helpers import synthetic

BUILTIN = {"relu", "topk", "batchtopk", "matryoshka", "jumprelu", "transcoder", "skip-transcoder"}
D_IN, D_OUT, D_SAE, K, BATCH = 16, 12, 64, 4, 32
ARCHS = saelab.registry("architecture").names()


def test_builtin_architectures_registered() -> None:
    assert BUILTIN <= {n.lower() for n in ARCHS}


def _options(cls: type) -> dict:
    fields = cls.Options.model_fields
    opts = {"d_sae": D_SAE} if "d_sae" in fields else {}
    if "k" in fields:
        opts["k"] = K
    return opts


def make(name: str, multi: bool = False, **extra) -> saelab.SparseDictionary:
    """An instance of ``name``: an autoencoder on 1 (or 2) sites, or a transcoder when it refuses that."""
    cls = saelab.registry("architecture").get(name)
    opts = {**_options(cls), **extra}
    n = 2 if multi else 1
    auto = SiteSpec([f"l{i}" for i in range(n)], [f"l{i}" for i in range(n)], D_IN, D_IN)
    try:
        return build_dictionary(name, auto, opts)
    except UsageError:
        trans = SiteSpec([f"l{i}.in" for i in range(n)], [f"l{i}.out" for i in range(n)], D_IN, D_OUT)
        return build_dictionary(name, trans, opts)


def data(module: saelab.SparseDictionary, batch: int = BATCH, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    s = module.sites
    x = torch.randn(batch, len(s.inputs), s.d_in, generator=g) + 0.5
    if s.is_autoencoder:
        return x, None
    w = torch.randn(len(s.inputs) * s.d_in, len(s.outputs) * s.d_out, generator=g) / math.sqrt(s.d_in)
    y = torch.relu(x.reshape(batch, -1) @ w).reshape(batch, len(s.outputs), s.d_out)
    return x, y


def train(module: saelab.SparseDictionary, steps: int = 20, lr: float = 1e-2, batch: int = BATCH) -> None:
    """A plain training loop honouring the training hooks (the real trainer is tested elsewhere)."""
    module.train()
    x, y = data(module, batch=256)
    module.initialize_from_data(x, x if y is None else y)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    for step in range(steps):
        i = (step * batch) % 256
        out = module(x[i:i + batch], target=None if y is None else y[i:i + batch])
        loss = sum(out.losses.values())
        opt.zero_grad()
        loss.backward()
        module.before_optimizer_step()
        opt.step()
        module.after_optimizer_step()


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("multi", [False, True], ids=["1site", "2sites"])
def test_shapes(name: str, multi: bool) -> None:
    torch.manual_seed(0)
    module = make(name, multi=multi)
    s = module.sites
    x, y = data(module)
    z = module.encode(x)
    width = D_SAE * (len(s.inputs) if module.per_layer_sites else 1)  # d_sae per layer for layer-spanning ones
    assert z.shape == (BATCH, module.d_sae) == (BATCH, width)
    assert module.decode(z).shape == (BATCH, len(s.outputs), s.d_out)
    out = module(x, target=y)
    assert out.reconstruction.shape == (BATCH, len(s.outputs), s.d_out)
    assert out.latents.shape == (BATCH, width)
    assert "mse" in out.losses and all(v.dim() == 0 and torch.isfinite(v) for v in out.losses.values())
    target = x if y is None else y
    expected_mse = (out.reconstruction - target).pow(2).sum((1, 2)).mean()
    torch.testing.assert_close(out.losses["mse"], expected_mse)
    cfg = module.config()
    assert cfg["architecture"] == module.name and json.loads(json.dumps(cfg)) == cfg


@pytest.mark.parametrize("name", ARCHS)
def test_save_load_round_trip(name: str, tmp_path) -> None:
    torch.manual_seed(1)
    module = make(name)
    train(module, steps=5)
    module.eval()
    save_dictionary(module, tmp_path / "d", {"note": "test"})
    assert json.loads((tmp_path / "d" / "cfg.json").read_text())["metadata"]["note"] == "test"
    loaded = load_dictionary(tmp_path / "d")
    assert type(loaded) is type(module) and not loaded.training
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x, y = data(module, seed=3)
    with torch.no_grad():
        a, b = module(x, target=y), loaded(x, target=y)
    assert torch.equal(a.reconstruction, b.reconstruction)
    assert torch.equal(a.latents, b.latents)


@pytest.mark.parametrize("name", ARCHS)
def test_gradients_flow(name: str) -> None:
    torch.manual_seed(2)
    module = make(name)
    x, y = data(module)
    module.initialize_from_data(x, x if y is None else y)
    dead = torch.ones(module.d_sae, dtype=torch.bool)  # every latent "dead": AuxK active where there is one
    out = module(x, target=y, dead_mask=dead)
    sum(out.losses.values()).backward()
    for pname, param in module.named_parameters():
        assert param.grad is not None, f"{pname} gets no gradient"
        assert param.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"


def _is_exact_topk(module: saelab.SparseDictionary) -> bool:
    return (isinstance(module, TopKDictionary) and not isinstance(module, BatchTopKDictionary)
            and getattr(module.options, "activation", "topk") == "topk")


@pytest.mark.parametrize("name", ARCHS)
def test_a_training_step_frees_its_sparse_codes(name: str, monkeypatch) -> None:
    """A step's codes (and the activations they hold) are freed once its outputs go: an autograd context
    that held the codes, whose values hold that context through the graph, made a cycle Python's garbage
    collector cannot see through, and a CLT's peak RSS grew ~0.1 GB per training step."""
    created: list[weakref.ref] = []
    init = SparseCodes.__init__

    def tracked(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        created.append(weakref.ref(self))

    monkeypatch.setattr(SparseCodes, "__init__", tracked)
    torch.manual_seed(2)
    module = make(name, multi=True)
    x, y = data(module)
    module.initialize_from_data(x, x if y is None else y)
    module.train()
    out = module(x, target=y, dead_mask=torch.ones(module.d_sae, dtype=torch.bool))
    sum(out.losses.values()).backward()
    del out
    gc.collect()
    alive = sum(ref() is not None for ref in created)
    assert alive == 0, f"{name}: {alive} of {len(created)} SparseCodes outlive their training step"


@pytest.mark.parametrize("name", ARCHS)
def test_sparsity_as_configured(name: str) -> None:
    torch.manual_seed(3)
    module = make(name)
    x, y = data(module, batch=64)
    module.train()
    latents = module(x, target=y).latents
    l0 = (latents != 0).sum(-1)
    if _is_exact_topk(module):
        assert (l0 == K).all()
        assert ((module.encode(x) != 0).sum(-1) == K).all()
    elif isinstance(module, BatchTopKDictionary):
        assert int(l0.sum()) == K * 64  # batch*k latents over the batch: mean L0 == k
        assert (l0 != K).any()  # ... distributed unevenly across rows
    else:
        penalty = next(f for f in ("l1_coefficient", "l0_coefficient") if f in module.Options.model_fields)
        l0s = []
        for coef in (0.0, 20.0):
            torch.manual_seed(3)
            m = make(name, **{penalty: coef})
            train(m, steps=60, lr=2e-2)
            m.eval()
            xe, ye = data(m, batch=256, seed=9)
            with torch.no_grad():
                l0s.append(float((m(xe, target=ye).latents != 0).sum(-1).float().mean()))
        assert l0s[1] < 0.5 * l0s[0], f"L0 without / with the penalty: {l0s}"


def test_transcoder_relu_penalty_reduces_l0() -> None:
    l0s = []
    for coef in (0.0, 20.0):
        torch.manual_seed(4)
        m = make("transcoder", activation="relu", l1_coefficient=coef)
        train(m, steps=60, lr=2e-2)
        xe, ye = data(m, batch=256, seed=9)
        with torch.no_grad():
            l0s.append(float((m(xe, target=ye).latents != 0).sum(-1).float().mean()))
    assert l0s[1] < 0.5 * l0s[0], l0s


@pytest.mark.parametrize("name", ARCHS)
def test_fold_scaling(name: str) -> None:
    torch.manual_seed(5)
    module = make(name)
    train(module, steps=10)
    module.eval()
    s_in = 3.0
    s_out = s_in if module.sites.is_autoencoder else 0.25
    folded = copy.deepcopy(module)
    folded.fold_scaling(torch.tensor([s_in]), torch.tensor([s_out]))
    x, y = data(module, seed=6)
    with torch.no_grad():
        expected = module(x * s_in, target=None if y is None else y * s_out).reconstruction / s_out
        got = folded(x, target=y)
    torch.testing.assert_close(got.reconstruction, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.latents, module.encode(x * s_in), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ARCHS)
def test_optimizer_step_invariants(name: str) -> None:
    torch.manual_seed(6)
    module = make(name)
    if not hasattr(module, "W_dec"):
        pytest.skip("no decoder matrix")
    x, y = data(module)
    sum(module(x, target=y, dead_mask=torch.ones(module.d_sae, dtype=torch.bool)).losses.values()).backward()
    before = module.W_dec.detach().clone()
    module.before_optimizer_step()
    if module.unit_norm_decoder:
        torch.testing.assert_close(before.norm(dim=1), torch.ones(module.d_sae))
        parallel = (module.W_dec.grad * module.W_dec).sum(1)
        assert parallel.abs().max() < 1e-5
        with torch.no_grad():
            module.W_dec.mul_(torch.rand(module.d_sae, 1) + 0.5)
        module.after_optimizer_step()
        torch.testing.assert_close(module.W_dec.norm(dim=1), torch.ones(module.d_sae))
        directions = torch.nn.functional.cosine_similarity(module.W_dec, before, dim=1)
        torch.testing.assert_close(directions, torch.ones(module.d_sae))
    else:
        grad = module.W_dec.grad.clone()
        with torch.no_grad():
            module.W_dec.mul_(2.0)
        module.after_optimizer_step()
        torch.testing.assert_close(module.W_dec, before * 2.0)  # free norms: left alone
        torch.testing.assert_close(module.W_dec.grad, grad)


@pytest.mark.parametrize("name", ["topk", "batchtopk", "matryoshka", "transcoder"])
def test_k_larger_than_d_sae_is_one_line_error(name: str) -> None:
    with pytest.raises(UsageError) as info:
        make(name, d_sae=8, k=9)
    message = str(info.value)
    assert "k=9" in message and "d_sae=8" in message and "\n" not in message
    with pytest.raises(UsageError, match="k=9 .*d_sae=4"):  # d_sae from the expansion factor
        make(name, d_sae=None, expansion_factor=0.25, k=9)


def test_unknown_option_is_one_line_error() -> None:
    with pytest.raises(UsageError, match="unknown option 'kk'.*accepted options:.*k"):
        make("topk", kk=3)
    with pytest.raises(UsageError, match="b_dec_init"):
        make("topk", b_dec_init="median")


def test_transcoder_refuses_identical_sites() -> None:
    with pytest.raises(UsageError, match="reads one site and reconstructs another"):
        build_dictionary("transcoder", SiteSpec(["a"], ["a"], 8, 8), {"d_sae": 16, "k": 2})


def _dense_topk_reference(module, x: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor:
    """Issue 3's dense reference: top-k scattered into a dense z, z @ W_dec, full autograd (+ AuxK)."""
    xf = x.reshape(len(x), -1)
    pre = (xf - module.b_dec) @ module.W_enc + module.b_enc
    vals, idx = pre.topk(module.k, dim=1)
    z = torch.zeros_like(pre).scatter(1, idx, vals.relu())
    recon = z @ module.W_dec + module.b_dec
    loss = (recon - xf).pow(2).sum(-1).mean()
    if dead is not None:
        k_aux = module.options.auxk_k
        aux_pre = pre.masked_fill(~dead, float("-inf"))
        av, ai = aux_pre.topk(min(k_aux, int(dead.sum())), dim=1)
        e_hat = torch.zeros_like(pre).scatter(1, ai, av.relu()) @ module.W_dec
        resid = (xf - recon).detach()
        var_t = (xf - xf.mean(0)).pow(2).sum(-1).mean()
        var_e = (resid - resid.mean(0)).pow(2).sum(-1).mean()
        scale = min(int(dead.sum()) / k_aux, 1.0)
        loss = loss + module.options.auxk_alpha * scale * (e_hat - resid).pow(2).sum(-1).mean() * var_t / var_e
    return loss


@pytest.mark.parametrize("with_dead", [False, True])
def test_topk_sparse_forward_matches_dense_reference(with_dead: bool) -> None:
    torch.manual_seed(7)
    module = make("topk", auxk_k=6)
    x, _ = data(module)
    module.initialize_from_data(x, x)
    dead = (torch.arange(D_SAE) % 3 == 0) if with_dead else None
    out = module(x, dead_mask=dead)
    sum(out.losses.values()).backward()
    sparse = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad()
    _dense_topk_reference(module, x, dead).backward()
    for n, p in module.named_parameters():
        torch.testing.assert_close(sparse[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_batchtopk_threshold_used_in_eval() -> None:
    torch.manual_seed(8)
    module = make("batchtopk")
    assert float(module.threshold) < 0
    train(module, steps=30)
    assert float(module.threshold) > 0 and int(module.threshold_updates) == 30
    module.eval()
    x, _ = data(module, batch=256, seed=10)
    with torch.no_grad():
        latents = module.encode(x)
        pre = (x[:, 0] - module.b_dec) @ module.W_enc + module.b_enc
    assert torch.equal(latents != 0, pre > module.threshold)
    single = module.encode(x[:1])  # inference does not depend on the rest of the batch
    torch.testing.assert_close(single, latents[:1])
    assert K / 3 < float((latents != 0).sum(-1).float().mean()) < 3 * K
    module.synchronize(lambda t: t * 0 + 0.5)
    assert float(module.threshold) == 0.5


def test_matryoshka_prefix_losses() -> None:
    torch.manual_seed(9)
    module = make("matryoshka", prefixes=[8, 16, 32])
    assert module.prefixes == [8, 16, 32, D_SAE]
    x, _ = data(module)
    out = module(x)
    z = out.latents
    xf = x[:, 0]
    expected = sum(((z[:, :w] @ module.W_dec[:w] + module.b_dec) - xf).pow(2).sum(-1).mean() for w in (8, 16, 32))
    torch.testing.assert_close(out.losses["matryoshka"], expected)
    with pytest.raises(UsageError, match="strictly increasing"):
        make("matryoshka", prefixes=[16, 8])


def test_skip_transcoder_uses_skip_path() -> None:
    torch.manual_seed(10)
    module = make("skip-transcoder")
    with torch.no_grad():
        module.W_skip.normal_()
        skip = module.W_skip.clone()
        x, y = data(module)
        a = module(x, target=y).reconstruction
        module.W_skip.zero_()
        b = module(x, target=y).reconstruction
    torch.testing.assert_close(a - b, (x.reshape(BATCH, -1) @ skip).reshape(a.shape), rtol=1e-4, atol=1e-4)


def test_geometric_median_and_mmcs() -> None:
    g = torch.Generator().manual_seed(0)
    pts = torch.cat([torch.randn(99, 4, generator=g) * 0.01, torch.full((1, 4), 1000.0)])
    assert geometric_median(pts).abs().max() < 0.1  # the outlier drags the mean, not the median
    assert pts.mean(0).abs().max() > 5
    truth = torch.eye(4)
    assert mmcs(truth * 3, truth) == pytest.approx(1.0)
    assert mmcs(torch.ones(1, 4), truth) == pytest.approx(0.5)


def _dense_autograd_losses(module, out, x: torch.Tensor, y: torch.Tensor | None,
                           dead: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The module's loss terms recomputed densely with plain autograd, on the entries it selected."""
    xf = x.reshape(len(x), -1)
    yf = xf if y is None else y.reshape(len(y), -1)
    x_in = xf - module.b_dec if module.uses_pre_encoder_bias else xf
    pre = x_in @ module.W_enc + module.b_enc
    chosen = torch.zeros_like(pre, dtype=torch.bool)
    chosen[out.sparse_latents.rows, out.sparse_latents.cols] = True
    z = torch.where(chosen, pre.relu(), torch.zeros_like(pre))
    recon = z @ module.W_dec + module.b_dec + (xf @ module.W_skip if module.skip_connection else 0)
    ref = {"mse": (recon - yf).pow(2).sum(-1).mean()}
    if "matryoshka" in out.losses:
        partial, total, start = module.b_dec.expand_as(yf), 0, 0
        for width in module.prefixes[:-1]:
            band = torch.zeros(module.d_sae, dtype=torch.bool)
            band[start:width] = True
            partial = partial + (z * band) @ module.W_dec
            total, start = total + (partial - yf).pow(2).sum(-1).mean(), width
        ref["matryoshka"] = total
    if dead is not None:
        cols = dead.nonzero().squeeze(1)
        k_aux = min(module.options.auxk_k, len(cols))
        idx = pre[:, cols].detach().topk(k_aux, dim=1).indices
        z_dead = torch.zeros(len(xf), len(cols), dtype=pre.dtype).scatter(1, idx, pre[:, cols].gather(1, idx).relu())
        resid = (yf - recon).detach()
        var_t = (yf - yf.mean(0)).pow(2).sum(-1).mean()
        var_e = (resid - resid.mean(0)).pow(2).sum(-1).mean()
        scale = min(len(cols) / module.options.auxk_k, 1.0)
        ref["auxk"] = module.options.auxk_alpha * scale * (z_dead @ module.W_dec[cols] - resid).pow(2).sum(-1).mean() \
            * var_t / var_e
    return ref


@pytest.mark.parametrize("name", ["topk", "batchtopk", "matryoshka", "transcoder", "skip-transcoder"])
@pytest.mark.parametrize("dead_every", [0, 3, 1], ids=["no-dead", "third-dead", "all-dead"])
def test_sparse_backward_matches_dense_autograd(name: str, dead_every: int) -> None:
    """The TopK family's custom sparse backward (encoder, decoder and AuxK) gives plain autograd's
    gradients, in float64, for every parameter, with some, all or no latents dead."""
    torch.manual_seed(11)
    module = make(name, auxk_k=6, prefixes=[8, 16, 32]) if name == "matryoshka" else make(name, auxk_k=6)
    module = module.double()
    with torch.no_grad():
        module.b_enc.normal_()
        module.b_dec.normal_()
        if module.skip_connection:
            module.W_skip.normal_()
    x, y = data(module)
    x, y = x.double(), None if y is None else y.double()
    dead = (torch.arange(D_SAE) % dead_every == 0) if dead_every else None
    out = module(x, target=y, dead_mask=dead)
    assert set(out.losses) == {"mse"} | ({"matryoshka"} if name == "matryoshka" else set()) | (
        {"auxk"} if dead is not None else set())
    params = dict(module.named_parameters())
    got = torch.autograd.grad(sum(out.losses.values()), list(params.values()))
    ref = _dense_autograd_losses(module, out, x, y, dead)
    for key, value in ref.items():
        torch.testing.assert_close(out.losses[key], value, msg=key)
    want = torch.autograd.grad(sum(ref.values()), list(params.values()), allow_unused=True)
    for (pname, p), a, b in zip(params.items(), got, want, strict=True):
        torch.testing.assert_close(a, torch.zeros_like(p) if b is None else b, rtol=1e-9, atol=1e-10, msg=pname)


def test_sparse_latents_give_the_dense_statistics() -> None:
    """``DictionaryOutput.fired``/``l0`` from the sparse codes equal the dense latents' figures."""
    torch.manual_seed(12)
    for name in ("topk", "batchtopk"):
        module = make(name)
        x, _ = data(module, batch=64)
        out = module(x)
        assert out.sparse_latents is not None
        dense = out.latents
        assert dense.shape == (64, D_SAE)
        assert torch.equal(out.fired(), (dense != 0).any(0))
        assert float(out.l0()) == pytest.approx(float((dense != 0).sum(-1).float().mean()))
        assert not (dense < 0).any()


@pytest.mark.parametrize("name", ["transcoder", "skip-transcoder"])
@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_transcoder_inference_without_target(name: str, activation: str) -> None:
    """A transcoder's forward works without a target (inference): same reconstruction and latents as
    with one, no losses; with the target the losses are there."""
    torch.manual_seed(13)
    module = make(name, activation=activation)
    assert not module.sites.is_autoencoder
    with torch.no_grad():
        if module.skip_connection:
            module.W_skip.normal_()
    module.eval()
    x, y = data(module)
    with torch.no_grad():
        infer = module(x)
        trained = module(x, target=y)
        via_reconstruct = module.reconstruct(x)
    assert infer.losses == {} and "mse" in trained.losses
    assert infer.reconstruction.shape == (BATCH, 1, D_OUT)
    torch.testing.assert_close(infer.reconstruction, trained.reconstruction)
    torch.testing.assert_close(via_reconstruct, trained.reconstruction)
    torch.testing.assert_close(infer.latents, trained.latents)
    expected_mse = (trained.reconstruction - y).pow(2).sum((1, 2)).mean()
    torch.testing.assert_close(trained.losses["mse"], expected_mse)


# --------------------------------------------------------------------------------------------------
# The SparseDictionary contract: a third-party architecture, missing methods, per-site scales


class ThirdPartyOptions(DictionaryOptions):
    """Options of the third-party test architecture (the shared ones only)."""


class ThirdPartyReLU(LinearDictionary):
    """A third-party ReLU SAE built on the documented base: it implements ``encode`` and nothing else."""

    name = "third-party-relu"
    Options = ThirdPartyOptions

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.preacts(self.flat_input(x)))


class NoDecode(saelab.SparseDictionary):
    """Lacks the required ``decode``."""

    name = "no-decode"

    @property
    def d_sae(self) -> int:
        return 8

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


class NoFold(saelab.SparseDictionary):
    """Implements what is abstract but not ``fold_scaling``; counts its forward calls."""

    name = "no-fold"

    def __init__(self, sites: SiteSpec, options: saelab.Options):
        super().__init__(sites, options)
        self.W = torch.nn.Parameter(torch.randn(sites.d_in, 32) * 0.1)
        self.calls = 0

    @property
    def d_sae(self) -> int:
        return 32

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x[:, 0] @ self.W)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents @ self.W.T)[:, None]

    def forward(self, x, target=None, dead_mask=None):
        self.calls += 1
        return super().forward(x, target, dead_mask)


class _ContractPlugin:
    @saelab.hookimpl
    def register_architectures(self, register):
        for cls in (ThirdPartyReLU, NoDecode, NoFold):
            register(cls)


def test_third_party_linear_dictionary_trains_saves_and_loads(tmp_path) -> None:
    """An architecture that subclasses LinearDictionary and only implements ``encode`` is built by name,
    trains through the real trainer (normalisation folded by the inherited ``fold_scaling``), then
    saves and loads to identical outputs."""
    saelab.register_plugin(_ContractPlugin(), name="contract-test")
    x, _ = synthetic(n=2048, d=16, n_features=48, scale=50.0, offset=5.0, seed=2)
    torch.manual_seed(0)
    module = build_dictionary("third-party-relu", SiteSpec(["h"], ["h"], 16, 16), {"d_sae": 64})
    assert isinstance(module, ThirdPartyReLU)
    with torch.no_grad():
        before = float((module(x).reconstruction[:, 0] - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    result = train_on_tensors(module, x, epochs=3, out_dir=tmp_path, batch_size=128, log_every=4, device="cpu")
    losses = [entry["loss"] for entry in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.folded and result.input_scale != pytest.approx(1.0)
    with torch.no_grad():
        raw = float((module(x).reconstruction[:, 0] - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert raw < 0.5 * before and raw == pytest.approx(result.metrics["fvu"], abs=0.08)
    loaded = load_dictionary(tmp_path / "third-party-relu")
    assert type(loaded) is ThirdPartyReLU
    with torch.no_grad():
        assert torch.equal(loaded(x).reconstruction, module.eval()(x).reconstruction)


def test_missing_required_method_is_refused_by_name_in_one_line() -> None:
    saelab.register_plugin(_ContractPlugin(), name="contract-test")
    with pytest.raises(UsageError) as info:
        build_dictionary("no-decode", SiteSpec(["h"], ["h"], 8, 8), {})
    message = str(info.value)
    assert "'no-decode'" in message and "NoDecode" in message and "does not implement decode" in message
    assert "\n" not in message


def test_missing_fold_scaling_is_refused_before_the_first_step(tmp_path) -> None:
    saelab.register_plugin(_ContractPlugin(), name="contract-test")
    x, _ = synthetic(n=1024, d=16, n_features=48, scale=20.0)
    module = build_dictionary("no-fold", SiteSpec(["h"], ["h"], 16, 16), {})
    with pytest.raises(UsageError) as info:
        train_on_tensors(module, x, out_dir=tmp_path / "run", batch_size=128, device="cpu")
    message = str(info.value)
    assert "'no-fold'" in message and "NoFold" in message and "fold_scaling" in message
    assert "--normalise none" in message and "\n" not in message
    assert module.calls == 0 and not (tmp_path / "run").exists()
    result = train_on_tensors(module, x, normalise="none", batch_size=128, device="cpu")  # nothing to fold
    assert result.steps == 8 and module.calls == 8


def _site_scaled(t: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return t * scales[None, :, None]


@pytest.mark.parametrize("name", ARCHS)
def test_fold_scaling_per_site(name: str) -> None:
    """Two sites with different scales: the folded module on raw inputs equals the unfolded one on
    inputs scaled per site, with its outputs unscaled per site."""
    torch.manual_seed(14)
    module = make(name, multi=True)
    train(module, steps=10)
    module.eval()
    if getattr(module, "skip_connection", False):
        with torch.no_grad():
            module.W_skip.normal_()
    s_in = torch.tensor([3.0, 0.5])
    s_out = s_in if module.sites.is_autoencoder else torch.tensor([0.25, 2.0])
    folded = copy.deepcopy(module)
    folded.fold_scaling(s_in, s_out)
    x, y = data(module, seed=15)
    with torch.no_grad():
        scaled = module(_site_scaled(x, s_in), target=None if y is None else _site_scaled(y, s_out))
        got = folded(x, target=y)
    torch.testing.assert_close(got.reconstruction, _site_scaled(scaled.reconstruction, 1 / s_out), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.latents, scaled.latents, rtol=1e-4, atol=1e-4)
    if isinstance(module, LinearDictionary):
        assert folded.extra_config["scaling_folded"] == {"input_scales": [3.0, 0.5], "output_scales": s_out.tolist()}


def test_fold_scaling_rejects_bad_scales() -> None:
    module = make("topk", multi=True)
    for bad in (3.0, torch.tensor([3.0]), torch.ones(2, 1)):
        with pytest.raises(UsageError, match="input_scales must be a 1-D tensor with one scale per site"):
            module.fold_scaling(bad, torch.ones(2))
    with pytest.raises(UsageError, match="positive and finite"):
        module.fold_scaling(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]))
    with pytest.raises(UsageError, match="same scale for a site's input and output"):
        module.fold_scaling(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0]))
