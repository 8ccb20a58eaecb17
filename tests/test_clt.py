"""The ``clt`` architecture (cross-layer transcoder): triangular decoding against a naive loop, the sparse
and dense decode paths, sparsity of every activation, per-site folding, save/load of the per-source-layer
decoders, recovery of a planted cross-layer dictionary through the trainer, ``saelab train --layers``, and
resuming after SIGKILL."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from saelab import SiteSpec, UsageError
from saelab.dictionary import build_dictionary, load_dictionary, save_dictionary
from saelab.metrics import mmcs
from saelab.training import TRAINING_LOG, train_on_tensors
from safetensors.torch import load_file
from training_helpers import build_tiny_cache, kill_after_first_checkpoint, train_args

ACTIVATIONS = ["jumprelu", "relu", "topk", "topk_across_layers", "batchtopk"]
D_IN, D_OUT, F, K, BATCH = 12, 10, 16, 3, 24


def sites(L: int, d_in: int = D_IN, d_out: int = D_OUT) -> SiteSpec:
    """L layers: ``layers.i.mlp.input`` -> ``layers.i.mlp``."""
    return SiteSpec([f"layers.{i}.mlp.input" for i in range(L)], [f"layers.{i}.mlp" for i in range(L)], d_in, d_out)


def make(L: int = 3, seed: int = 0, **options) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_dictionary("clt", sites(L), {"d_sae": F, "k": K, **options})


def batch(L: int, n: int = BATCH, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, L, D_IN, generator=g) + 0.3, torch.randn(n, L, D_OUT, generator=g)


def randomise(module: torch.nn.Module) -> None:
    """Nonzero biases, skip weights and decoders, so that every term of the reconstruction shows."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name != "log_threshold":
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.startswith("W_") else 0.1))


def naive_reconstruction(module, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """y_hat_j = b_dec[j] + sum_{i <= j} z_i @ W_dec_i[:, j - i] (+ x_j @ W_skip[j]), one block at a time."""
    L, F_ = module.n_layers, module.d_sae_per_layer
    z = z.reshape(len(z), L, F_)
    out = []
    for j in range(L):
        y = module.b_dec[j].expand(len(z), -1).clone()
        for i in range(j + 1):
            y = y + z[:, i] @ getattr(module, f"W_dec_{i}")[:, j - i]
        if module.options.skip_connection:
            y = y + x[:, j] @ module.W_skip[j]
        out.append(y)
    return torch.stack(out, 1)


# --------------------------------------------------------------------------------------------------
# Layout and triangular indexing


@pytest.mark.parametrize("L", [3, 4])
def test_layout_has_one_decoder_per_source_layer(L: int) -> None:
    module = make(L)
    assert module.W_enc.shape == (L, D_IN, F) and module.b_enc.shape == (L, F) and module.b_dec.shape == (L, D_OUT)
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters() if n.startswith("W_dec_")}
    assert shapes == {f"W_dec_{i}": (F, L - i, D_OUT) for i in range(L)}
    assert sum(s[1] for s in shapes.values()) == L * (L + 1) // 2
    assert module.d_sae == L * F and module.config()["d_sae"] == L * F


@pytest.mark.parametrize("L", [3, 4])
@pytest.mark.parametrize("decode", ["sparse", "dense"])
def test_triangular_decoding_matches_a_naive_loop(L: int, decode: str) -> None:
    module = make(L, activation="relu", skip_connection=True, decode=decode).double()
    randomise(module)
    x, y = (t.double() for t in batch(L))
    with torch.no_grad():
        z = module.encode(x)
        out = module(x, target=y)
        assert (z != 0).any() and (z == 0).any()
        torch.testing.assert_close(out.reconstruction, naive_reconstruction(module, x, z), rtol=1e-10, atol=1e-10)
        no_skip = naive_reconstruction(module, x, z) - torch.stack([x[:, j] @ module.W_skip[j] for j in range(L)], 1)
        torch.testing.assert_close(module.decode(z), no_skip, rtol=1e-10, atol=1e-10)
        # one latent of layer i moves exactly the targets j >= i
        for i in range(L):
            one = torch.zeros(1, L * F, dtype=torch.float64)
            one[0, i * F + 3] = 2.0
            moved = module.decode(one) - module.b_dec
            assert torch.all(moved[0, :i] == 0) and torch.all(moved[0, i:].abs().sum(-1) > 0)
            torch.testing.assert_close(moved[0, i:], 2.0 * getattr(module, f"W_dec_{i}")[3])


def test_zero_init_off_diagonal_starts_as_per_layer_transcoders() -> None:
    module = make(4, zero_init_off_diagonal=True)
    for i in range(4):
        W = getattr(module, f"W_dec_{i}")
        assert W[:, 0].abs().sum() > 0 and torch.all(W[:, 1:] == 0)


# --------------------------------------------------------------------------------------------------
# Sparse and dense decoding


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_sparse_and_dense_decode_paths_agree(activation: str) -> None:
    """Same reconstruction, losses and gradients of every parameter (float64) through either path."""
    L = 4
    results = []
    for decode in ("sparse", "dense"):
        module = make(L, activation=activation, decode=decode, skip_connection=True, auxk_k=5).double()
        randomise(module)
        module.train()
        x, y = (t.double() for t in batch(L))
        dead = torch.arange(L * F) % 3 == 0
        out = module(x, target=y, dead_mask=dead)
        params = dict(module.named_parameters())
        grads = torch.autograd.grad(sum(out.losses.values()), list(params.values()), allow_unused=True)
        results.append((out, dict(zip(params, grads, strict=True))))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a.reconstruction, b.reconstruction, rtol=1e-10, atol=1e-10)
    assert a.losses.keys() == b.losses.keys()
    for key in a.losses:
        torch.testing.assert_close(a.losses[key], b.losses[key], rtol=1e-10, atol=1e-10, msg=key)
    for name in ga:
        assert (ga[name] is None) == (gb[name] is None), name
        if ga[name] is not None:
            torch.testing.assert_close(ga[name], gb[name], rtol=1e-9, atol=1e-10, msg=name)
    assert ga["W_enc"].abs().sum() > 0 and ga["W_dec_0"].abs().sum() > 0


def test_auto_decode_picks_the_path_by_density() -> None:
    module = make(3, activation="topk", sparse_max_density=0.1)
    chosen = []
    module.decode_sparse = lambda codes, f=module.decode_sparse: chosen.append("sparse") or f(codes)
    module.decode_dense = lambda z, f=module.decode_dense: chosen.append("dense") or f(z)
    x, _ = batch(3)
    module(x)  # k/F = 3/16 > 0.1
    module.options = module.Options.parse({**module.options.model_dump(), "k": 1})  # 1/16 <= 0.1
    module(x)
    assert chosen == ["dense", "sparse"]


# --------------------------------------------------------------------------------------------------
# Activations


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_trains_a_step_with_the_stated_sparsity(activation: str) -> None:
    L, n = 3, 64
    module = make(L, activation=activation)
    module.train()
    x, y = batch(L, n=n)
    module.initialize_from_data(x, y)
    out = module(x, target=y, dead_mask=torch.ones(L * F, dtype=torch.bool))
    loss = sum(out.losses.values())
    loss.backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert module.W_enc.grad.abs().sum() > 0 and module.decoder(L - 1).grad.abs().sum() > 0
    active = (out.latents != 0).reshape(n, L, F)
    per_layer = active.sum(-1)  # [n, L]
    if activation == "topk":
        assert torch.all(per_layer == K)
    elif activation == "topk_across_layers":
        assert torch.all(per_layer.sum(-1) == K) and (per_layer != per_layer[:, :1]).any()
    elif activation == "batchtopk":
        assert torch.all(per_layer.sum(0) == K * n)  # k*batch per layer: k per token on average
        assert (per_layer != K).any()
        assert float(out.l0()) == pytest.approx(K * L)
    else:
        assert "sparsity" in out.losses and out.losses["sparsity"] > 0
    if activation in ("topk", "topk_across_layers", "batchtopk"):
        assert set(out.losses) == {"mse", "auxk"} and out.losses["auxk"] > 0
        assert out.sparse_latents is not None and torch.equal(out.fired(), active.reshape(n, -1).any(0))


def test_batchtopk_uses_per_layer_thresholds_at_inference() -> None:
    L = 3
    module = make(L, activation="batchtopk")
    module.train()
    x, y = batch(L, n=128)
    for _ in range(3):
        module(x, target=y)
    assert torch.all(module.threshold > 0) and int(module.threshold_updates) == 3
    module.eval()
    with torch.no_grad():
        z = module.encode(x).reshape(128, L, F)
        pre = torch.einsum("bld,ldf->blf", x, module.W_enc) + module.b_enc
    assert torch.equal(z != 0, pre > module.threshold[None, :, None])
    torch.testing.assert_close(module.encode(x[:1]), module.encode(x)[:1])


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_tanh_penalty_uses_the_concatenated_decoder_norm(activation: str) -> None:
    L = 3
    module = make(L, activation=activation, l0_coefficient=0.7, tanh_scale=3.0, loss_reduction="mean")
    randomise(module)
    x, y = batch(L)
    out = module(x, target=y)
    z = out.latents.reshape(len(x), L, F)
    norms = torch.stack([getattr(module, f"W_dec_{i}").reshape(F, -1).norm(dim=1) for i in range(L)])
    expected = 0.7 * torch.tanh(3.0 * z * norms).sum(-1).mean(-1).mean()
    torch.testing.assert_close(out.losses["sparsity"], expected)
    torch.testing.assert_close(out.losses["mse"], (out.reconstruction - y).pow(2).sum(-1).mean(-1).mean())
    summed = make(L, activation=activation, loss_reduction="sum")
    randomise(summed)
    out = summed(x, target=y)
    torch.testing.assert_close(out.losses["mse"], (out.reconstruction - y).pow(2).sum((1, 2)).mean())


def test_topk_family_keeps_concatenated_decoder_rows_unit_norm() -> None:
    L = 3
    module = make(L, activation="topk")
    x, y = batch(L)
    sum(module(x, target=y).losses.values()).backward()
    module.before_optimizer_step()
    for i in range(L):
        W = getattr(module, f"W_dec_{i}")
        rows = W.reshape(F, -1)
        torch.testing.assert_close(rows.norm(dim=1), torch.ones(F))
        assert (W.grad.reshape(F, -1) * rows).sum(1).abs().max() < 1e-5
        with torch.no_grad():
            W.mul_(1.7)
    module.after_optimizer_step()
    for i in range(L):
        torch.testing.assert_close(getattr(module, f"W_dec_{i}").reshape(F, -1).norm(dim=1), torch.ones(F))


# --------------------------------------------------------------------------------------------------
# Options, folding, save/load


def test_bad_sites_and_k_are_one_line_errors() -> None:
    with pytest.raises(UsageError, match="reconstructs another") as info:
        build_dictionary("clt", SiteSpec(["a", "b"], ["a", "b"], 8, 8), {"d_sae": 8})
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="one input and one output site per layer"):
        build_dictionary("clt", SiteSpec(["a", "b"], ["A"], 8, 8), {"d_sae": 8})
    with pytest.raises(UsageError, match="k=9 is larger than the 8 latents"):
        build_dictionary("clt", sites(3), {"d_sae": 8, "k": 9, "activation": "topk"})
    build_dictionary("clt", sites(3), {"d_sae": 8, "k": 9, "activation": "topk_across_layers"})  # 24 latents
    with pytest.raises(UsageError, match="activation"):
        build_dictionary("clt", sites(3), {"d_sae": 8, "activation": "gelu"})


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fold_scaling_per_layer(activation: str) -> None:
    L = 4
    module = make(L, activation=activation, skip_connection=True)
    randomise(module)
    module.eval()
    s_in, s_out = torch.tensor([3.0, 0.5, 2.0, 1.5]), torch.tensor([0.25, 2.0, 4.0, 0.8])
    folded = copy.deepcopy(module)
    folded.fold_scaling(s_in, s_out)
    x, y = batch(L)
    with torch.no_grad():
        scaled = module(x * s_in[None, :, None])
        got = folded(x)
    torch.testing.assert_close(got.reconstruction, scaled.reconstruction / s_out[None, :, None], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.latents, scaled.latents, rtol=1e-4, atol=1e-5)
    assert folded.extra_config["scaling_folded"] == {"input_scales": s_in.tolist(), "output_scales": s_out.tolist()}
    with pytest.raises(UsageError, match="one scale per site"):
        folded.fold_scaling(torch.ones(3), torch.ones(4))


@pytest.mark.parametrize("activation", ["jumprelu", "batchtopk"])
def test_save_load_round_trip(activation: str, tmp_path) -> None:
    L = 4
    module = make(L, activation=activation, skip_connection=True)
    randomise(module)
    module.train()
    x, y = batch(L)
    module(x, target=y)
    module.eval()
    save_dictionary(module, tmp_path / "clt", {"note": "x"})
    loaded = load_dictionary(tmp_path / "clt")
    assert type(loaded) is type(module) and loaded.extra_config["note"] == "x"
    assert loaded.state_dict().keys() == module.state_dict().keys()
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(loaded(x).reconstruction, module(x).reconstruction)


# --------------------------------------------------------------------------------------------------
# Synthetic ground truth


def toy_stack(n: int, L: int, d: int, per_layer: int, active: float, seed: int = 0):
    """A toy stack of L layers. Feature ``f`` is read at layer ``src[f]`` (direction ``read[f]`` added to
    that layer's input) and written to every layer ``j >= src[f]`` (direction ``write[f, j]``); inputs
    carry the earlier layers forward, ``x_j = x_{j-1} + y_{j-1} + (features read at j)``. Directions are
    orthonormal; magnitudes uniform in [0.5, 1.5], each feature on with probability ``active / per_layer``.
    Returns ``(x [n, L, d], y [n, L, d], read [nf, d], write [nf, L, d], src [nf])``."""
    g = torch.Generator().manual_seed(seed)
    nf = L * per_layer
    src = torch.arange(nf) // per_layer
    basis = torch.linalg.qr(torch.randn(d, d, generator=g)).Q.T
    read, rest = basis[:nf], iter(basis[nf:])
    write = torch.zeros(nf, L, d)
    for f in range(nf):
        for j in range(int(src[f]), L):
            write[f, j] = next(rest)
    on = torch.rand(n, nf, generator=g) < active / per_layer
    c = on * (torch.rand(n, nf, generator=g) + 0.5)
    xs, ys, x = [], [], torch.zeros(n, d)
    for j in range(L):
        x = x + (ys[-1] if ys else 0) + c[:, src == j] @ read[src == j]
        ys.append(c[:, src <= j] @ write[src <= j, j])
        xs.append(x)
    noise = 0.01 * torch.randn(2, n, L, d, generator=g)
    return torch.stack(xs, 1) + noise[0], torch.stack(ys, 1) + noise[1], read, write, src


TOY = {"L": 3, "d": 160, "per_layer": 16, "active": 3.0}
"""3 layers x 16 planted features (48 read + 96 written directions in R^160)."""



@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_recovers_planted_cross_layer_features(activation: str, one_thread) -> None:
    L = TOY["L"]
    x, y, read, write, src = toy_stack(10_000, **TOY)
    torch.manual_seed(0)
    module = build_dictionary("clt", sites(L, TOY["d"], TOY["d"]),
                              {"d_sae": 2 * TOY["per_layer"], "k": 3, "activation": activation,
                               "encoder_init_scale": 0.03})
    start = time.perf_counter()
    result = train_on_tensors(module, x, y, batch_size=256, epochs=8, seed=0)
    seconds = time.perf_counter() - start
    scores = {}
    for i in range(L):
        mine = src == i
        scores[f"enc{i}"] = mmcs(module.W_enc[i].T, read[mine])
        for j in range(i, L):
            scores[f"dec{i}->{j}"] = mmcs(module.decoder(i)[:, j - i], write[mine, j])
    print(f"\nclt {activation}: FVU {result.metrics['fvu']:.3f}, L0 {result.metrics['l0']:.1f}, {seconds:.0f}s, "
          + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    assert len(scores) == L + L * (L + 1) // 2
    low = {k: round(v, 3) for k, v in scores.items() if v < 0.9}
    assert not low, f"MMCS below 0.9: {low}"


# --------------------------------------------------------------------------------------------------
# saelab train --layers


CLT_OPTIONS = ("-o", "d_sae", "32", "-o", "activation", "topk", "-o", "k", "4")


def clt_args(name: str, *extra: str, options: tuple[str, ...] = CLT_OPTIONS) -> list[str]:
    """``saelab train --architecture clt --layers 0-1`` on the tiny GPT-2 (a few steps)."""
    from fixtures.tiny_models import TINY_GPT2

    return ["train", str(TINY_GPT2), "--name", name, "--architecture", "clt", "--layers", "0-1",
            *options, "--dataset_repo", "news-sample",
            "--dataset_split", "train", "--n_tokens", "2048", "--cache_ctx_len", "64", "--train_batch_size", "64",
            "--max_steps", "3", *extra]


def test_train_layers_builds_one_clt_over_the_layers(cli, results_dir) -> None:
    res = cli(clt_args("clt"))
    assert res.exit_code == 0, res.stderr
    directory = results_dir / "clt" / "dictionaries" / "layers.0-1"
    cfg = json.loads((directory / "cfg.json").read_text())
    assert cfg["sites"]["inputs"] == ["layers.0.mlp.input", "layers.1.mlp.input"]
    assert cfg["sites"]["outputs"] == ["layers.0.mlp", "layers.1.mlp"]
    module = load_dictionary(directory)
    params = sum(p.numel() for p in module.parameters())
    assert module.d_sae == 2 * 32
    # printed before training: parameters and their memory, the cache to write
    line = next(line for line in res.stderr.splitlines() if line.startswith("train: "))
    assert f"1 dictionary, {params:,} parameters" in line and "activation cache at most" in line
    res = cli(clt_args("mid", "-o", "input_site", "resid_mid", "--verbose", "false"))
    assert res.exit_code == 0, res.stderr
    cfg = json.loads((results_dir / "mid" / "dictionaries" / "layers.0-1" / "cfg.json").read_text())
    assert cfg["sites"]["inputs"] == ["layers.0.resid_mid", "layers.1.resid_mid"]
    assert not any(line.startswith("train: ") for line in res.stderr.splitlines())


@pytest.mark.parametrize(("extra", "fragments"), [
    (["--architecture", "topk"], ["architecture 'topk' does not span layers", "accepted: ", "clt", "transcoder_set"]),
    (["--layers", "2-1"], ["bad --layers '2-1'", "a range 0-29"]),
    (["--layers", "x"], ["bad --layers 'x'"]),
    (["--hookpoints", "layers.0"], ["--layers and --hookpoints exclude each other"]),
    (["-o", "d_sae", "4000000000"], ["training needs", "Adam state", "free"]),
])
def test_train_layers_bad_input_is_one_line_error(cli, results_dir, extra, fragments) -> None:
    res = cli(clt_args("bad", *extra, options=CLT_OPTIONS[:3] if "topk" in extra else CLT_OPTIONS))
    assert res.exit_code == 2, res.stdout + res.stderr
    message = res.stderr.strip().splitlines()[-1]
    assert all(f in message for f in fragments), message
    assert not (results_dir / "bad" / "dictionaries").exists()


# --------------------------------------------------------------------------------------------------
# Kill -9 and resume


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_after_checkpoint_resumes_to_identical_clt_weights(tmp_path, results_dir) -> None:
    """``saelab train --architecture clt --layers 0-1`` (BatchTopK: running per-layer thresholds and AuxK
    in the state) killed with SIGKILL after a checkpoint, then run again with the same command, ends with
    the same weights, buffers and logged losses, bit for bit, as an uninterrupted run."""
    sites_ = ("layers.0.mlp.input", "layers.1.mlp.input", "layers.0.mlp", "layers.1.mlp")
    cache = build_tiny_cache(tmp_path / "store", hookpoints=sites_)
    env = {**os.environ, "SAELAB_PROGRESS": "0"}
    extra = ["--architecture", "clt", "--layers", "0-1", "-o", "activation", "batchtopk", "--epochs", "3",
             "--checkpoint_every", "10", "--keep_checkpoints", "2",
             "--exclude_positions", "0", "1", "2", "3"]  # 60 steps of 128 rows per epoch, 180 in all

    def command(name: str) -> list[str]:
        return [sys.executable, "-m", "saelab", *train_args(cache.path, name, *extra)]

    ref = subprocess.run(command("ref"), env=env, capture_output=True, text=True, timeout=500)
    assert ref.returncode == 0, ref.stderr
    out = results_dir / "killed" / "dictionaries" / "layers.0-1"
    partial = kill_after_first_checkpoint(command("killed"), out, env)
    assert partial and max(partial) < 180

    resumed = subprocess.run(command("killed"), env=env, capture_output=True, text=True, timeout=500)
    assert resumed.returncode == 0, resumed.stderr
    start = max(partial)
    assert f"resumed from step {start} of 180" in resumed.stderr
    reference = results_dir / "ref" / "dictionaries" / "layers.0-1"
    a = load_file(str(reference / "dictionary.safetensors"))
    b = load_file(str(out / "dictionary.safetensors"))
    assert {"W_enc", "W_dec_0", "W_dec_1", "threshold", "threshold_updates"} <= a.keys()
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), \
        f"resumed weights differ: {[k for k in a if not a[k].equal(b[k])]}"
    assert int(a["threshold_updates"]) == 180
    ref_log = [json.loads(line) for line in (reference / TRAINING_LOG).read_text().splitlines()]
    entries = [json.loads(line) for line in (out / TRAINING_LOG).read_text().splitlines()]
    assert [(e["event"], e["step"]) for e in entries if "event" in e] == [("resumed", start)]
    log = [e for e in entries if "event" not in e]
    assert [(e["step"], e["loss"]) for e in log] == [(e["step"], e["loss"]) for e in ref_log]
