"""Dictionary formats: SAELens and sparsify directories written by the real libraries (see
``tests/fixtures/make_reference_dicts.py``) load into saelab architectures and reproduce the outputs
those libraries computed; export to SAELens round-trips; ``saelab convert`` and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from saelab import UsageError
from saelab.dictionary import build_dictionary, load_dictionary, save_dictionary
from saelab.formats import find_dictionaries
from saelab.plugins.formats.saelens import to_external_name
from safetensors.torch import load_file

REF = Path(__file__).resolve().parent / "fixtures" / "reference_dicts"
ATOL = 1e-5

# fixture directory -> (outputs file stem, expected saelab architecture, inputs, outputs)
CASES = {
    "saelens_standard": ("saelens_standard", "relu", ["layers.0"], ["layers.0"]),
    "saelens_standard_nobdec": ("saelens_standard_nobdec", "relu", ["layers.0"], ["layers.0"]),
    "saelens_topk": ("saelens_topk", "topk", ["layers.1"], ["layers.1"]),
    "saelens_topk_rescale": ("saelens_topk_rescale", "topk", ["layers.1.mlp"], ["layers.1.mlp"]),
    "saelens_jumprelu": ("saelens_jumprelu", "jumprelu", ["layers.0"], ["layers.0"]),
    "saelens_transcoder": ("saelens_transcoder", "transcoder", ["layers.0.mlp.input"], ["layers.0.mlp"]),
    "saelens_skip_transcoder": ("saelens_skip_transcoder", "skip-transcoder", ["layers.1.mlp.input"],
                                ["layers.1.mlp"]),
    "sparsify_run/layers.0": ("sparsify_run__layers.0", "topk", ["layers.0"], ["layers.0"]),
    "sparsify_run/layers.1.mlp": ("sparsify_run__layers.1.mlp", "skip-transcoder", ["layers.1.mlp.input"],
                                  ["layers.1.mlp"]),
}


def reference(stem: str) -> dict[str, torch.Tensor]:
    """The input and the outputs the real library computed for fixture ``stem``."""
    return load_file(str(REF / f"{stem}.outputs.safetensors"))


def outputs(module, x: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """saelab's encode(x), decode(reference latents) and full forward, as 2-D tensors."""
    with torch.no_grad():
        z = module.encode(x[:, None, :])
        decoded = module.decode(latents)[:, 0]
        target = torch.zeros(x.shape[0], 1, module.sites.d_out)  # only feeds the loss terms
        forward = module(x[:, None, :], target).reconstruction[:, 0]
    return z, decoded, forward


@pytest.mark.parametrize("directory", list(CASES))
def test_reference_dictionary_reproduces_library_outputs(directory: str) -> None:
    stem, arch, inputs, outs = CASES[directory]
    ref = reference(stem)
    module = load_dictionary(REF / directory)
    assert module.name == arch
    assert module.sites.inputs == inputs and module.sites.outputs == outs
    z, decoded, forward = outputs(module, ref["x"], ref["latents"])
    # the fixtures are not trivial: some latents fire, most do not
    assert 0 < int((ref["latents"] != 0).sum()) < ref["latents"].numel() // 2 + ref["latents"].numel() // 4
    torch.testing.assert_close(z, ref["latents"], atol=ATOL, rtol=0)
    torch.testing.assert_close(decoded, ref["decoded"], atol=ATOL, rtol=0)
    torch.testing.assert_close(forward, ref["output"], atol=ATOL, rtol=0)


def test_formats_are_detected() -> None:
    from saelab.dictionary import detect_format

    assert detect_format(REF / "saelens_topk") == "saelens"
    assert detect_format(REF / "sparsify_run" / "layers.0") == "sparsify"
    assert find_dictionaries(REF / "sparsify_run") == [REF / "sparsify_run" / "layers.0",
                                                       REF / "sparsify_run" / "layers.1.mlp"]


@pytest.mark.parametrize("directory", list(CASES))
def test_export_to_saelens_and_back(directory: str, tmp_path: Path) -> None:
    stem = CASES[directory][0]
    ref = reference(stem)
    module = load_dictionary(REF / directory)
    if directory == "sparsify_run/layers.1.mlp":  # a TopK transcoder: SAELens transcoders are ReLU only
        with pytest.raises(UsageError, match="SAELens transcoders use a ReLU"):
            save_dictionary(module, tmp_path / "exported", format="saelens")
        return
    save_dictionary(module, tmp_path / "exported", format="saelens")
    cfg = json.loads((tmp_path / "exported" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == to_external_name(module.sites.inputs[0])
    back = load_dictionary(tmp_path / "exported")
    assert back.sites.inputs == module.sites.inputs and back.sites.outputs == module.sites.outputs
    for a, b in zip(outputs(module, ref["x"], ref["latents"]), outputs(back, ref["x"], ref["latents"]),
                    strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    torch.testing.assert_close(outputs(back, ref["x"], ref["latents"])[2], ref["output"], atol=ATOL, rtol=0)


def test_saelab_topk_exports_and_reloads_equal(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = build_dictionary("topk", {"inputs": ["layers.3"], "outputs": ["layers.3"], "d_in": 16, "d_out": 16},
                              {"d_sae": 64, "k": 4}).eval()
    with torch.no_grad():
        module.b_dec.normal_()
        module.b_enc.normal_()
        module.W_dec.mul_(torch.rand(64, 1) + 0.5)
    save_dictionary(module, tmp_path / "lens", format="saelens")
    cfg = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4 and cfg["apply_b_dec_to_input"] is True
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    back = load_dictionary(tmp_path / "lens")
    x = torch.randn(50, 1, 16) * 3
    with torch.no_grad():
        torch.testing.assert_close(back(x).reconstruction, module(x).reconstruction, atol=1e-5, rtol=0)
        torch.testing.assert_close(back.encode(x), module.encode(x), atol=1e-5, rtol=0)
    # and to sparsify and back
    save_dictionary(module, tmp_path / "sp" / "layers.3", format="sparsify")
    again = load_dictionary(tmp_path / "sp" / "layers.3")
    assert again.sites.inputs == ["layers.3"]
    with torch.no_grad():
        torch.testing.assert_close(again(x).reconstruction, module(x).reconstruction, atol=1e-5, rtol=0)


def test_export_refuses_multi_site_dictionaries(tmp_path: Path) -> None:
    module = build_dictionary("topk", {"inputs": ["layers.0", "layers.1"], "outputs": ["layers.0", "layers.1"],
                                       "d_in": 8, "d_out": 8}, {"d_sae": 16, "k": 2})
    with pytest.raises(UsageError, match="single-site"):
        save_dictionary(module, tmp_path / "x", format="saelens")


def test_saelens_unsupported_normalisation_is_one_line_error(tmp_path: Path) -> None:
    import shutil

    shutil.copytree(REF / "saelens_topk", tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "cfg.json").read_text())
    cfg["normalize_activations"] = "layer_norm"
    (tmp_path / "d" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match="layer_norm") as info:
        load_dictionary(tmp_path / "d")
    assert "\n" not in str(info.value)


def test_convert_cli_round_trip(cli, tmp_path: Path) -> None:
    ref = reference("saelens_topk")
    result = cli("convert", str(REF / "saelens_topk"), str(tmp_path / "as_saelab"), "--to", "saelab")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "as_saelab" / "cfg.json").read_text())["format"] == "saelab"
    result = cli("convert", str(tmp_path / "as_saelab"), str(tmp_path / "as_lens"), "--to", "saelens")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "as_lens" / "sae_weights.safetensors").is_file()
    for path in (tmp_path / "as_saelab", tmp_path / "as_lens"):
        module = load_dictionary(path)
        torch.testing.assert_close(outputs(module, ref["x"], ref["latents"])[2], ref["output"], atol=ATOL, rtol=0)
    # a sparsify run directory converts hookpoint by hookpoint
    result = cli("convert", str(REF / "sparsify_run"), str(tmp_path / "run_saelab"), "--to", "saelab")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "run_saelab").iterdir()) == ["layers.0", "layers.1.mlp"]
    # an occupied destination needs --overwrite
    cli("convert", str(REF / "saelens_topk"), str(tmp_path / "as_saelab"), "--to", "saelab").assert_user_error(
        "--overwrite")


def test_convert_cli_errors(cli, tmp_path: Path) -> None:
    cli("convert", str(tmp_path / "missing"), str(tmp_path / "out"), "--to", "saelens").assert_user_error(
        "does not exist")
    cli("convert", str(REF / "saelens_topk"), str(tmp_path / "out"), "--to", "bogus").assert_user_error(
        "bogus", "saelens")
    (tmp_path / "empty").mkdir()
    cli("convert", str(tmp_path / "empty"), str(tmp_path / "out"), "--to", "saelab").assert_user_error(
        "no dictionary in a known format")


def test_one_discovery_names_and_selects_dictionaries_for_every_command(tmp_path: Path) -> None:
    """``run`` (pipeline.find_dictionaries) and ``latents`` (latents.select_dictionaries) select through
    formats.dictionaries_by_hookpoint over formats.find_dictionaries: same names, same choices."""
    from saelab.formats import dictionaries_by_hookpoint
    from saelab.latents import select_dictionaries
    from saelab.pipeline import find_dictionaries as run_dictionaries

    run = REF / "sparsify_run"
    everything = {"layers.0": run / "layers.0", "layers.1.mlp": run / "layers.1.mlp"}
    assert dictionaries_by_hookpoint(run) == everything == run_dictionaries(run)
    assert [(hook, path) for hook, _, path in select_dictionaries(run)] == list(everything.items())
    # a directory name, its SAELens / module-path spelling, or a site the dictionary reads selects it
    for given in ("layers.1.mlp", "blocks.1.hook_mlp_out", "model.layers.1.mlp", "layers.1.mlp.input"):
        assert dictionaries_by_hookpoint(run, [given]) == {"layers.1.mlp": run / "layers.1.mlp"}, given
        assert [hook for hook, _, _ in select_dictionaries(run, [given])] == ["layers.1.mlp"]
    assert dictionaries_by_hookpoint(run, ["layers.0", "layers.0"]) == {"layers.0": run / "layers.0"}
    with pytest.raises(UsageError) as err:
        dictionaries_by_hookpoint(run, ["layers.5"])
    assert "'layers.5'" in str(err.value) and "found: layers.0 (reads layers.0)" in str(err.value)
    # a saelab run directory: its dictionaries/
    save_dictionary(load_dictionary(run / "layers.0"), tmp_path / "dictionaries" / "layers.0")
    assert dictionaries_by_hookpoint(tmp_path) == {"layers.0": tmp_path / "dictionaries" / "layers.0"}
    assert find_dictionaries(tmp_path) == [tmp_path / "dictionaries" / "layers.0"]
    # one dictionary: named by the site asked for, which must be one it reads or writes
    single = REF / "saelens_transcoder"
    assert dictionaries_by_hookpoint(single) == {"layers.0.mlp.input": single}
    assert dictionaries_by_hookpoint(single, ["blocks.0.hook_mlp_out"]) == {"layers.0.mlp": single}
    with pytest.raises(UsageError) as err:
        select_dictionaries(single, ["layers.1"])
    assert "found one dictionary, which reads layers.0.mlp.input and writes layers.0.mlp" in str(err.value)
    with pytest.raises(UsageError, match="SPARSE_MODEL"):
        run_dictionaries(tmp_path / "missing")
    with pytest.raises(UsageError, match="dictionary path .* does not exist"):
        select_dictionaries(tmp_path / "missing")
