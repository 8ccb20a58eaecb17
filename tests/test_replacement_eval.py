"""Replacement-model evaluation of dictionaries whose sites are layers (``per_layer_sites``) on the tiny
GPT-2 (2 layers): an oracle that returns each MLP's exact output leaves the LM unchanged closed-loop; a
trained cross-layer transcoder's open-loop figures match a computation from clean activations and its
closed-loop ones match the forward rebuilt by hand (layer 0 replaced, layer 1's input recomputed from the
changed stream); excluded positions keep the MLP's own output."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fixtures.tiny_models import TINY_GPT2
from saelab import LayerReplacement, Options, SiteSpec, SparseDictionary, UsageError
from saelab.dictionary import build_dictionary, save_dictionary
from saelab.evaluation import EvalConfig, check_layer_order, closed_loop_forward, evaluate, heldout_windows
from saelab.positions import PositionFilter
from saelab.training import train_on_tensors
from torch import nn

D, CTX, L = 64, 64, 2
EXCLUDED = PositionFilter((0, 1, 2, 3), True)
CONFIG = EvalConfig(batch_size=4, exclude_positions=EXCLUDED.exclude_positions, exclude_bos=True)


@pytest.fixture(scope="module")
def source():
    from saelab.models import load_activation_source

    return load_activation_source(str(TINY_GPT2))


@pytest.fixture(scope="module")
def windows(source) -> list[torch.Tensor]:
    """4 windows (256 tokens) after the 8 the CLT is trained on."""
    from saelab.data import load_dataset_source

    return list(heldout_windows(source, load_dataset_source("news-sample"), CTX, 4 * CTX, skip_tokens=8 * CTX))


def layer_sites(input_site: str) -> dict[str, object]:
    return {"inputs": [f"layers.{i}.{input_site}" for i in range(L)], "outputs": [f"layers.{i}.mlp" for i in range(L)],
            "d_in": D, "d_out": D}


@pytest.fixture(scope="module", params=["mlp.input", "resid_mid"])
def clt(request, source) -> SparseDictionary:
    """A real, imperfect CLT (TopK per layer, F = 32, k = 4) trained briefly on 512 tokens of the LM."""
    from saelab.data import load_dataset_source

    sites = layer_sites(request.param)
    train = torch.stack(list(heldout_windows(source, load_dataset_source("news-sample"), CTX, 8 * CTX, 0)))
    acts = source.activations(train, list(dict.fromkeys([*sites["inputs"], *sites["outputs"]])))
    torch.manual_seed(0)
    module = build_dictionary("clt", sites, {"d_sae": 32, "activation": "topk", "k": 4})
    train_on_tensors(module, {h: a.reshape(-1, D) for h, a in acts.items()}, batch_size=64, epochs=4, seed=0,
                     lr=3e-3)
    return module.eval()


class MLPOracle(SparseDictionary):
    """Test-only dictionary whose sites are layers: its latents are the inputs and layer j's reconstruction
    is a copy of the LM's own MLP j (after its norm, for resid_mid inputs) applied to layer j's input."""

    name = "mlp-oracle"
    per_layer_sites = True

    def __init__(self, source, input_site: str):
        s = layer_sites(input_site)
        super().__init__(SiteSpec(s["inputs"], s["outputs"], D, D), Options())
        blocks = source.blocks
        self.mlps = nn.ModuleList(copy.deepcopy(b.mlp) for b in blocks)
        self.norms = nn.ModuleList(copy.deepcopy(b.ln_2) if input_site == "resid_mid" else nn.Identity()
                                   for b in blocks)

    @property
    def d_sae(self) -> int:
        return L * D

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], L * D)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.reshape(-1, L, D)
        return torch.stack([self.mlps[j](self.norms[j](z[:, j])) for j in range(L)], dim=1)


def keep_mask(source, ids: torch.Tensor) -> torch.Tensor:
    return EXCLUDED.keep_mask(ids, source.tokenizer.bos_token_id)


def fvu(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    y, y_hat = y.double(), y_hat.double()
    return float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def next_token_stats(clean: torch.Tensor, other: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
    """CE of ``other``, KL(clean || other) and top-1 agreement over the predictions at kept positions."""
    pred = mask[:, :-1]
    logp_c = F.log_softmax(clean[:, :-1][pred].double(), -1)
    logp_o = F.log_softmax(other[:, :-1][pred].double(), -1)
    ce = float(F.nll_loss(logp_o, ids[:, 1:][pred]))
    kl = float((logp_c.exp() * (logp_c - logp_o)).sum(-1).mean())
    return ce, kl, float((logp_c.argmax(-1) == logp_o.argmax(-1)).double().mean())


@pytest.mark.parametrize("input_site", ["mlp.input", "resid_mid"])
def test_exact_mlp_outputs_leave_the_model_unchanged(source, windows, input_site: str) -> None:
    """Closed loop through every input site kind: with each MLP's exact output the LM is unchanged."""
    m = evaluate({"oracle": MLPOracle(source, input_site)}, source, windows, CONFIG)["oracle"]
    assert m["n_layers"] == L and len(m["per_layer"]) == L
    assert abs(m["ce_zero"] - m["ce_clean"]) > 1e-3  # zero-ablating both MLPs matters: the ratio is defined
    for loop in ("closed_loop", "open_loop"):
        assert m[f"ce_{loop}"] == pytest.approx(m["ce_clean"], abs=1e-5)
        assert m[f"kl_{loop}"] == pytest.approx(0.0, abs=1e-6)
        assert m[f"top1_{loop}"] == 1.0
        assert m[f"ce_loss_recovered_{loop}"] == pytest.approx(1.0, abs=1e-3)
        assert all(row[f"fvu_{loop}"] == pytest.approx(0.0, abs=1e-10) for row in m["per_layer"])
    assert [row["output"] for row in m["per_layer"]] == ["layers.0.mlp", "layers.1.mlp"]


def test_open_loop_matches_clean_activations_and_differs_from_closed_loop(source, windows, clt) -> None:
    m = evaluate({"clt": clt}, source, windows, CONFIG)["clt"]
    ids = torch.stack(windows)
    acts = source.activations(ids, [*clt.sites.inputs, *clt.sites.outputs])
    keep = keep_mask(source, ids).reshape(-1)
    x = torch.stack([acts[h] for h in clt.sites.inputs], 2).reshape(-1, L, D)[keep]
    y = torch.stack([acts[h] for h in clt.sites.outputs], 2).reshape(-1, L, D)[keep]
    with torch.no_grad():
        out = clt(x)
    latents = out.latents.reshape(-1, L, 32)
    for j, row in enumerate(m["per_layer"]):
        assert row["fvu_open_loop"] == pytest.approx(fvu(y[:, j], out.reconstruction[:, j]), rel=1e-5)
        assert row["l0_open_loop"] == pytest.approx(float((latents[:, j] != 0).sum(-1).double().mean()))
        assert row["dead_frac_open_loop"] == pytest.approx(float((~(latents[:, j] != 0).any(0)).double().mean()))
        assert 0 < row["l0_open_loop"] <= 4 and row["tokens"] == len(x)
        assert 0.0 < row["fvu_open_loop"] < 1.0  # trained: better than the mean, far from perfect
    # layer 0 reads the clean stream in both; layer 1 reads the stream changed by layer 0's replacement
    first, second = m["per_layer"]
    assert first["fvu_closed_loop"] == pytest.approx(first["fvu_open_loop"], rel=1e-6)
    assert second["fvu_closed_loop"] != pytest.approx(second["fvu_open_loop"], rel=1e-4)
    assert abs(m["ce_closed_loop"] - m["ce_open_loop"]) > 1e-5 and m["kl_closed_loop"] != m["kl_open_loop"]
    # the open-loop totals are the generic spliced figures of the same replacement
    assert m["ce_open_loop"] == m["ce_spliced"] and m["kl_open_loop"] == pytest.approx(m["kl_spliced"], rel=1e-9)
    assert m["l0_open_loop"] == pytest.approx(sum(r["l0_open_loop"] for r in m["per_layer"]))
    assert 0 < m["top1_closed_loop"] <= 1 and m["kl_closed_loop"] > 0


def test_closed_loop_matches_the_forward_rebuilt_by_hand(source, windows, clt) -> None:
    """L = 2 by hand: encode layer 0 from the clean input, replace layer 0's MLP output, read layer 1's input
    from the changed stream, encode it, replace layer 1's MLP output."""
    m = evaluate({"clt": clt}, source, windows, CONFIG.model_copy(update={"batch_size": len(windows)}))["clt"]
    ids = torch.stack(windows)
    B, T = ids.shape
    mask = keep_mask(source, ids)
    ins, outs = clt.sites.inputs, clt.sites.outputs
    clean = source.activations(ids, ins)
    x0 = clean[ins[0]].reshape(-1, D)
    with torch.no_grad():
        y0 = clt(torch.stack([x0, clean[ins[1]].reshape(-1, D)], 1)).reconstruction[:, 0].reshape(B, T, D)
    seen: dict[str, torch.Tensor] = {}

    def replace(name: str, y_hat: torch.Tensor | None = None):
        def fn(act: torch.Tensor) -> torch.Tensor:
            seen[name] = act.clone()
            return act if y_hat is None else torch.where(mask[..., None], y_hat, act)
        return fn

    source.logits(ids, {outs[0]: replace(outs[0], y0), ins[1]: replace(ins[1])})
    x1 = seen[ins[1]].reshape(-1, D)
    assert not torch.allclose(x1, clean[ins[1]].reshape(-1, D))  # layer 1's input did change
    with torch.no_grad():
        y1 = clt(torch.stack([x0, x1], 1)).reconstruction[:, 1].reshape(B, T, D)
    logits = source.logits(ids, {outs[0]: replace(outs[0], y0), outs[1]: replace(outs[1], y1)})
    ce, kl, top1 = next_token_stats(source.logits(ids), logits, ids, mask)
    assert m["ce_closed_loop"] == pytest.approx(ce, rel=1e-5)
    assert m["kl_closed_loop"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert m["top1_closed_loop"] == pytest.approx(top1)
    # closed-loop FVU of layer 1: against what MLP 1 outputs on the changed stream
    own1 = seen[outs[1]]
    assert m["per_layer"][1]["fvu_closed_loop"] == pytest.approx(fvu(own1[mask], y1[mask]), rel=1e-5)


def test_excluded_positions_keep_the_mlp_output(source, windows) -> None:
    """A CLT whose decoders and biases are zero replaces the MLP outputs by zeros exactly where positions
    are kept: the first four positions (excluded) keep their clean logits, the rest equal zero-ablation."""
    torch.manual_seed(1)
    module = build_dictionary("clt", layer_sites("mlp.input"), {"d_sae": 16, "activation": "relu"}).eval()
    with torch.no_grad():
        for i in range(L):
            module.decoder(i).zero_()
    ids = torch.stack(windows)
    mask = keep_mask(source, ids)
    assert not mask[:, :4].any() and mask[:, 4:].all()
    clean = source.logits(ids)
    run = closed_loop_forward(module, source, ids, mask)
    zeroed = source.logits(ids, {f"layers.{j}.mlp": lambda a: torch.where(mask[..., None], 0.0, a) for j in range(L)})
    assert torch.allclose(run.logits[:, :4], clean[:, :4], atol=1e-6)
    assert torch.allclose(run.logits, zeroed, atol=1e-6)
    assert not torch.allclose(run.logits[:, 4:], clean[:, 4:], atol=1e-3)
    everywhere = closed_loop_forward(module, source, ids, torch.ones_like(mask))
    assert not torch.allclose(everywhere.logits[:, :4], clean[:, :4], atol=1e-3)
    m = evaluate({"zero": module}, source, windows, CONFIG)["zero"]
    assert m["ce_closed_loop"] == pytest.approx(m["ce_zero"], rel=1e-6)
    assert m["ce_loss_recovered_closed_loop"] == pytest.approx(0.0, abs=1e-4)
    assert m["tokens"] == len(windows) * (CTX - 4)  # excluded positions do not count


PASS_ACTIVATIONS = ["topk", "topk_across_layers", "batchtopk", "jumprelu", "relu"]


@pytest.mark.parametrize("architecture", ["clt", "transcoder_set"])
@pytest.mark.parametrize(("activation", "options"), [
    *[(a, {}) for a in PASS_ACTIVATIONS],
    ("topk", {"skip_connection": True}),
    ("relu", {"decode": "dense"}),
    ("batchtopk", {"threshold": 0.2}),
])
def test_layer_pass_encodes_each_layer_once_and_matches_the_whole_forward(architecture: str, activation: str,
                                                                          options: dict[str, object]) -> None:
    """4 layers driven as the closed loop drives them (input i changed by the outputs below it): the
    architecture's own pass gives the reconstructions and latents of the generic pass, which runs the whole
    dictionary at every output site, without running the dictionary's forward and computing each layer's
    pre-activations once (when its input is read)."""
    n_layers, d, n = 4, 16, 48
    options = dict(options)
    threshold = options.pop("threshold", None)
    torch.manual_seed(3)
    module = build_dictionary(architecture, {"inputs": [f"layers.{i}.mlp.input" for i in range(n_layers)],
                                             "outputs": [f"layers.{i}.mlp" for i in range(n_layers)],
                                             "d_in": d, "d_out": d},
                              {"d_sae": 32, "k": 4, "activation": activation, **options}).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))  # biases, thresholds and skip weights away from their init
        if threshold is not None:
            module.threshold.fill_(threshold)
    clean = torch.randn(n, n_layers, d)
    calls = {"forward": 0, "layer_preacts": 0}
    forward, layer_preacts = module.forward, module._layer_preacts

    def counted(name: str, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    module.forward = counted("forward", forward)
    module._layer_preacts = counted("layer_preacts", layer_preacts)
    generic, own = LayerReplacement(module, clean), module.layer_replacement(clean)
    assert type(own) is not LayerReplacement
    below = torch.zeros(n, d)
    with torch.no_grad():
        for j in range(n_layers):
            x = clean[:, j] + 0.5 * below
            generic.read(j, x)
            own.read(j, x)
            before = calls["forward"]
            below = generic.write(j)
            assert calls["forward"] == before + 1
            assert torch.allclose(own.write(j), below, atol=1e-5), j
            assert calls["forward"] == before + 1  # the architecture's pass never runs the whole dictionary
        assert torch.allclose(own.latents(), generic.latents(), atol=1e-5)
    assert (own.latents() != 0).any()
    assert calls["layer_preacts"] == n_layers


def test_sites_out_of_forward_order_are_refused() -> None:
    sites = SiteSpec(["layers.1.mlp.input", "layers.0.mlp.input"], ["layers.1.mlp", "layers.0.mlp"], D, D)
    module = build_dictionary("clt", {"inputs": sites.inputs, "outputs": sites.outputs, "d_in": D, "d_out": D},
                              {"d_sae": 8})
    with pytest.raises(UsageError, match="forward order"):
        check_layer_order(module)


def test_evaluate_cli_prints_the_per_layer_table(cli, tmp_path: Path) -> None:
    run = tmp_path / "run"
    data = {"dataset_repo": "news-sample", "dataset_split": "train", "n_tokens": 512, "ctx_len": CTX}
    torch.manual_seed(2)
    module = build_dictionary("clt", layer_sites("resid_mid"), {"d_sae": 16, "activation": "topk", "k": 4})
    save_dictionary(module, run / "dictionaries" / "clt", {"model": str(TINY_GPT2), "data": data})
    result = cli("evaluate", str(run), "--n_tokens", "128", "--batch_size", "2")
    assert result.exit_code == 0, result.output
    for text in ("per layer", "FVU closed", "L0 open", "ce_closed_loop", "top1_open_loop", "layers.1.mlp"):
        assert text in result.stdout, text
    payload = json.loads((run / "dictionaries" / "clt" / "eval.json").read_text())
    metrics = payload["metrics"]
    assert [row["layer"] for row in metrics["per_layer"]] == [0, 1]
    assert {"ce_closed_loop", "kl_closed_loop", "top1_closed_loop", "ce_loss_recovered_closed_loop",
            "l0_closed_loop", "ce_open_loop", "top1_open_loop"} <= set(metrics)
    no_downstream = cli("evaluate", str(run), "--n_tokens", "128", "--json", "--no_downstream")
    assert no_downstream.exit_code == 0, no_downstream.output
    parsed = json.loads(no_downstream.stdout)["clt"]["metrics"]
    assert "ce_closed_loop" not in parsed and "fvu_closed_loop" not in parsed["per_layer"][0]
    assert parsed["per_layer"][0]["fvu_open_loop"] > 0


def test_single_site_dictionaries_get_no_replacement_keys(source, windows) -> None:
    module = build_dictionary("topk", {"inputs": ["layers.0"], "outputs": ["layers.0"], "d_in": D, "d_out": D},
                              {"d_sae": 32, "k": 4})
    m = evaluate({"sae": module}, source, windows[:2], CONFIG)["sae"]
    assert not any(k.endswith(("_closed_loop", "_open_loop")) or k in ("per_layer", "n_layers") for k in m)
