"""Unit tests of the generic trainer (core/training.py) on small in-memory data."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from saelab import SiteSpec, UsageError
from saelab.dictionary import build_dictionary, load_dictionary
from saelab.training import (
    CHECKPOINT_DIR,
    TRAINING_LOG,
    DictionaryJob,
    TensorSource,
    Trainer,
    TrainerConfig,
    auto_lr,
    init_rows,
    list_checkpoints,
    lr_lambda,
    train_on_tensors,
)
from training_helpers import state_equal, synthetic, topk_sae

FAST = {"batch_size": 128, "log_every": 4, "device": "cpu"}


def fvu(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> float:
    """FVU of ``module`` on raw rows ``x [N, d]`` (targets ``y``, default ``x``)."""
    target = None if y is None else y.unsqueeze(1)
    y = x if y is None else y
    with torch.no_grad():
        rec = module(x.unsqueeze(1), target=target).reconstruction.squeeze(1)
    return float((rec - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def test_lr_schedule_warmup_plateau_decay() -> None:
    total, warm = 100, 10
    lin = [lr_lambda(s, total, warm, "linear", 0.2) for s in range(total)]
    assert lin[0] == pytest.approx(1 / warm) and lin[warm - 1] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lin[:warm - 1], lin[1:warm], strict=True))  # rising warm-up
    assert all(v == 1.0 for v in lin[warm:80])  # plateau until the last 20%
    assert all(a > b for a, b in zip(lin[80:], lin[81:], strict=False))  # strictly decaying
    assert lin[-1] == pytest.approx(0.0)
    cos = [lr_lambda(s, total, 0, "cosine", 0.5) for s in range(total)]
    assert cos[49] == 1.0 and cos[-1] == pytest.approx(0.0, abs=1e-12)
    assert cos[75] == pytest.approx(0.5 * (1 + math.cos(math.pi * 26 / 50)))
    assert all(lr_lambda(s, total, 0, "none", 0.2) == 1.0 for s in range(total))
    # the default learning rate scales with width as sparsify's
    assert auto_lr(16384) == pytest.approx(4e-3) and auto_lr(4096) == pytest.approx(4e-3)
    assert auto_lr(65536) == pytest.approx(2e-3)


def test_trains_topk_and_folds_normalisation_into_raw_space() -> None:
    # Far from unit scale and centred away from 0: without folding, a module fed raw data would fail.
    x, _ = synthetic(n=2048, d=32, scale=300.0, offset=40.0)
    sae = topk_sae(32, 64, k=4)
    before = fvu(sae, x)
    result = train_on_tensors(sae, x, epochs=4, **FAST)
    assert result.steps == 4 * (2048 // 128) and result.tokens == result.steps * 128
    # the scale makes the mean squared row norm equal the width
    assert result.input_scale == pytest.approx(math.sqrt(32 / x.pow(2).sum(-1).mean().item()), rel=0.05)
    assert result.folded and result.metrics["l0"] == pytest.approx(4.0)
    raw = fvu(sae, x)  # the trained module takes raw activations
    assert raw < 0.6 * before
    assert raw == pytest.approx(result.metrics["fvu"], abs=0.08)
    assert 0.0 <= result.dead_final_epoch < 0.5
    assert [h["step"] for h in result.history] == list(range(4, result.steps + 1, 4))


def test_saved_dictionary_reconstructs_raw_activations(tmp_path: Path) -> None:
    x, _ = synthetic(n=2048, d=32, scale=50.0, offset=-7.0, seed=1)
    sae = topk_sae(32, 64, k=4)
    before = fvu(sae, x)
    result = train_on_tensors(sae, x, epochs=3, out_dir=tmp_path, **FAST)
    out = tmp_path / "topk"
    assert result.out_dir == out
    loaded = load_dictionary(out)
    cfg = json.loads((out / "cfg.json").read_text())
    norm = cfg["metadata"]["normalisation"]
    assert norm["method"] == "norm" and norm["folded"] is True
    assert norm["input_scales"] == [pytest.approx(result.input_scale)]
    assert cfg["metadata"]["training"]["steps"] == result.steps
    assert fvu(loaded, x) == pytest.approx(fvu(sae, x), rel=1e-5)
    assert fvu(loaded, x) < 0.75 * before
    lines = [json.loads(line) for line in (out / TRAINING_LOG).read_text().splitlines()]
    assert lines and {"step", "tokens", "lr", "loss", "mse", "fvu", "l0", "dead_frac"} <= set(lines[-1])
    assert lines[-1]["step"] == result.steps


def test_init_sample_is_capped_for_wide_dictionaries(monkeypatch) -> None:
    """The initialisation sample of a many-site dictionary is capped in float32 bytes (a 30-layer CLT at
    d=576 asked for 65,536 rows of 60 sites: 9 GB of inputs and targets, twice over while scaled); a
    single site keeps every row asked for."""
    def spec(n: int, d: int = 576) -> SiteSpec:
        return SiteSpec([f"in{i}" for i in range(n)], [f"out{i}" for i in range(n)], d, d)

    single = SiteSpec(["l0"], ["l0"], 576, 576)
    assert init_rows(65536, [single]) == 65536
    assert init_rows(65536, [spec(8)]) == 58_254  # 2 GiB of float32 rows of 16 sites of width 576
    assert init_rows(65536, [single, spec(30)]) == 15_534  # the widest decides
    assert init_rows(65536, [spec(10_000)]) == 1024  # never below 1024
    assert init_rows(500, [spec(8)]) == 500

    x, _ = synthetic(n=2048, d=8)
    data = {f"in{i}": x for i in range(3)} | {f"out{i}": x.flip(0) for i in range(3)}
    requested: list[int] = []

    class RecordingSource(TensorSource):
        def sample(self, n_rows: int, *, seed: int):
            requested.append(n_rows)
            return super().sample(n_rows, seed=seed)

    monkeypatch.setattr("saelab.training.INIT_SAMPLE_BYTES", 4 * 6 * 8 * 1500)  # 1,500 rows of 6 sites
    module = build_dictionary("clt", spec(3, 8), {"d_sae": 16, "k": 2, "activation": "topk"})
    config = TrainerConfig(**FAST, max_steps=2, init_rows=4096, checkpoint_every=0, checkpoint_every_minutes=0)
    Trainer([DictionaryJob("clt", module)], config, progress=False).fit(RecordingSource(data), resume=False)
    assert requested == [1500]


def test_normalise_none_trains_on_raw_values() -> None:
    x, _ = synthetic(n=2048, d=16, n_features=48, scale=3.0)
    sae = topk_sae(16, 32, k=4)
    result = train_on_tensors(sae, x, epochs=2, normalise="none", **FAST)
    assert result.input_scale == 1.0 and result.output_scale == 1.0
    assert fvu(sae, x) == pytest.approx(result.metrics["fvu"], abs=0.1)


def test_sweep_trains_several_configs_on_one_stream() -> None:
    x, _ = synthetic(n=2048, d=32)
    reads = []

    class CountingSource(TensorSource):
        def batches(self, *args, **kwargs):
            reads.append(kwargs.get("epoch"))
            yield from super().batches(*args, **kwargs)

    saes = [topk_sae(32, 64, k=2, seed=1), topk_sae(32, 128, k=8, seed=2)]
    before = [fvu(s, x) for s in saes]
    jobs = [DictionaryJob(name=f"k{s.k}", module=s) for s in saes]
    results = Trainer(jobs, TrainerConfig(epochs=2, **FAST), progress=False).fit(CountingSource({"h": x}))
    assert reads == [0, 1]  # one pass per epoch, shared by both dictionaries
    assert [r.metrics["l0"] for r in results] == [pytest.approx(2.0), pytest.approx(8.0)]
    assert results[1].metrics["fvu"] < results[0].metrics["fvu"]  # more latents, lower error
    assert all(fvu(s, x) < 0.9 * b for s, b in zip(saes, before, strict=True))
    # per-dictionary learning rates follow width unless overridden
    assert [r.lr for r in results] == [pytest.approx(auto_lr(64)), pytest.approx(auto_lr(128))]


def test_several_hookpoints_in_one_run() -> None:
    xa, _ = synthetic(n=2048, d=32, seed=3, scale=10.0)
    xb, _ = synthetic(n=2048, d=16, n_features=48, seed=4, scale=0.1)
    torch.manual_seed(0)
    sa = build_dictionary("topk", SiteSpec(["a"], ["a"], 32, 32), {"d_sae": 64, "k": 4})
    sb = build_dictionary("topk", SiteSpec(["b"], ["b"], 16, 16), {"d_sae": 32, "k": 4})
    before = fvu(sa, xa), fvu(sb, xb)
    ra, rb = train_on_tensors([sa, sb], {"a": xa, "b": xb}, epochs=2, **FAST)
    assert ra.input_scale == pytest.approx(rb.input_scale * math.sqrt(2) / 100, rel=0.15)
    assert fvu(sa, xa) < 0.8 * before[0] and fvu(sb, xb) < 0.8 * before[1]
    assert fvu(sa, xa) == pytest.approx(ra.metrics["fvu"], abs=0.1)


def test_transcoder_sites_use_separate_scales() -> None:
    if "transcoder" not in __import__("saelab").registry("architecture"):
        pytest.skip("the transcoder architecture is not registered yet")
    x, _ = synthetic(n=2048, d=16, n_features=48, seed=5)
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(0))
    y = torch.relu(x @ w) * 20.0
    torch.manual_seed(0)
    tc = build_dictionary("transcoder", SiteSpec(["in"], ["out"], 16, 24), {"d_sae": 64, "k": 8})
    before = fvu(tc, x, y)
    result = train_on_tensors(tc, x, target=y, epochs=2, **FAST)
    assert result.input_scale != pytest.approx(result.output_scale, rel=0.1)
    assert fvu(tc, x, y) == pytest.approx(result.metrics["fvu"], abs=0.1)
    assert fvu(tc, x, y) < 0.8 * before


def test_two_site_dictionary_gets_one_scale_per_site(tmp_path: Path) -> None:
    """Each site is normalised by its own scale, recorded per site and folded per site: the saved module
    on raw activations gives the trained FVU once its error is measured in the normalised units."""
    xa, _ = synthetic(n=2048, d=16, n_features=48, seed=6, scale=10.0)
    xb, _ = synthetic(n=2048, d=16, n_features=48, seed=7, scale=0.1)
    torch.manual_seed(0)
    sae = build_dictionary("topk", SiteSpec(["a", "b"], ["a", "b"], 16, 16), {"d_sae": 64, "k": 8})
    result = train_on_tensors(sae, {"a": xa, "b": xb}, epochs=2, out_dir=tmp_path, **FAST)
    expected = [math.sqrt(16 / x.pow(2).sum(-1).mean().item()) for x in (xa, xb)]
    assert result.input_scales == [pytest.approx(e, rel=0.05) for e in expected]
    assert result.output_scales == result.input_scales
    with pytest.raises(ValueError, match="input_scales"):
        _ = result.input_scale
    scales = torch.tensor(result.input_scales)[None, :, None]
    x = torch.stack([xa, xb], dim=1)
    with torch.no_grad():
        rec = sae(x).reconstruction
    normalised_fvu = float(((rec - x) * scales).pow(2).sum() / ((x - x.mean(0)) * scales).pow(2).sum())
    assert normalised_fvu == pytest.approx(result.metrics["fvu"], abs=0.08)
    norm = json.loads((tmp_path / "topk" / "cfg.json").read_text())["metadata"]["normalisation"]
    assert norm["input_scales"] == norm["output_scales"] == pytest.approx(result.input_scales)


def test_resume_reads_checkpoints_with_scalar_scales(tmp_path: Path) -> None:
    """A checkpoint written before per-site scales (one ``input_scale``/``output_scale``) resumes to the
    uninterrupted result; a scale count that does not match the sites is a one-line error."""
    x, _ = synthetic(n=1024, d=16, n_features=48, scale=30.0)
    config = TrainerConfig(epochs=2, checkpoint_every=5, **FAST)  # 8 steps per epoch

    def run(out: Path, crash_after: int | None = None):
        sae = topk_sae(16, 32, k=4)
        job = DictionaryJob(name="sae", module=sae, out_dir=out)
        return Trainer([job], config, progress=False).fit(_CrashingSource({"h": x}, crash_after)), sae

    (full,), ref = run(tmp_path / "full")
    with pytest.raises(_Crash):
        run(tmp_path / "old", crash_after=7)
    state = tmp_path / "old" / CHECKPOINT_DIR / "step_000000005" / "state.json"
    meta = json.loads(state.read_text())
    (s_in,), (s_out,) = meta.pop("input_scales"), meta.pop("output_scales")
    state.write_text(json.dumps({**meta, "input_scale": s_in, "output_scale": s_out}))
    (resumed,), sae = run(tmp_path / "old")
    assert resumed.resumed_from_step == 5 and state_equal(sae, ref) and resumed.metrics == full.metrics
    assert resumed.input_scales == full.input_scales
    with pytest.raises(_Crash):
        run(tmp_path / "bad", crash_after=7)
    state = tmp_path / "bad" / CHECKPOINT_DIR / "step_000000005" / "state.json"
    meta = json.loads(state.read_text())
    state.write_text(json.dumps({**meta, "input_scales": meta["input_scales"] * 2}))
    with pytest.raises(UsageError) as info:
        run(tmp_path / "bad")
    assert "has 2 input scales for 1 input sites" in str(info.value) and "\n" not in str(info.value)


class _Crash(RuntimeError):
    pass


class _CrashingSource(TensorSource):
    """A :class:`TensorSource` that counts the batches it gives (``seen``) and raises :class:`_Crash` before
    batch ``crash_after`` (never when None)."""

    def __init__(self, data: dict[str, torch.Tensor], crash_after: int | None = None):
        super().__init__(data)
        self.crash_after = crash_after
        self.seen = 0

    def batches(self, *args, **kwargs):
        for batch in super().batches(*args, **kwargs):
            if self.crash_after is not None and self.seen == self.crash_after:
                raise _Crash
            self.seen += 1
            yield batch


def _log_entries(path: Path) -> tuple[list[dict], list[dict]]:
    """``(metric entries, event entries)`` of a JSONL training log."""
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    return [e for e in entries if "event" not in e], [e for e in entries if "event" in e]


def test_checkpoint_resume_equals_uninterrupted_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x, _ = synthetic(n=2048, d=32)
    config = TrainerConfig(epochs=3, checkpoint_every=5, keep_checkpoints=2, **FAST)  # 16 steps per epoch

    def run(out: Path, crash_after: int | None = None):
        sae = topk_sae(32, 64, k=4)
        source = _CrashingSource({"h": x}, crash_after)
        job = DictionaryJob(name="sae", module=sae, out_dir=out)
        return Trainer([job], config, progress=False).fit(source), sae, source.seen

    (full,), ref, _ = run(tmp_path / "full")
    with pytest.raises(_Crash):
        run(tmp_path / "resumed", crash_after=23)  # dies in epoch 1, after the step-20 checkpoint
    assert list_checkpoints(tmp_path / "resumed" / CHECKPOINT_DIR) == [15, 20]
    capsys.readouterr()
    (resumed,), sae, consumed = run(tmp_path / "resumed")
    assert consumed == full.steps - 20  # resumed at the checkpoint's data position
    assert state_equal(sae, ref)
    assert resumed.metrics == full.metrics
    assert (full.resumed_from_step, resumed.resumed_from_step) == (None, 20)
    assert f"resumed from step 20 of {full.steps}" in capsys.readouterr().err
    metrics, events = _log_entries(tmp_path / "resumed" / TRAINING_LOG)
    assert [e["step"] for e in metrics] == list(range(4, full.steps + 1, 4))  # no duplicated or missing entries
    assert events == [{"event": "resumed", "step": 20, "tokens": 20 * 128, "epoch": 1,
                       "checkpoint": "checkpoints/step_000000020"}]


def test_wall_clock_checkpoints_resume_to_identical_weights(tmp_path: Path) -> None:
    """``checkpoint_every_minutes`` checkpoints by elapsed time (an injected clock: one minute per batch)
    whatever ``checkpoint_every`` says, and a run killed after one resumes to the uninterrupted result."""
    x, _ = synthetic(n=1024, d=16, n_features=48)
    config = TrainerConfig(epochs=2, checkpoint_every=1000, checkpoint_every_minutes=2.5, keep_checkpoints=100,
                           **{**FAST, "log_every": 2})  # 8 steps per epoch; the clock is read every 2 steps

    def run(out: Path, crash_after: int | None = None):
        sae = topk_sae(16, 32, k=4)
        source = _CrashingSource({"h": x}, crash_after)

        def clock() -> float:
            return 60.0 * source.seen

        job = DictionaryJob(name="sae", module=sae, out_dir=out)
        return Trainer([job], config, progress=False, clock=clock).fit(source), sae

    (full,), ref = run(tmp_path / "full")
    assert list_checkpoints(tmp_path / "full" / CHECKPOINT_DIR) == [4, 8, 12]  # 4 min >= 2.5 min > 2 min
    with pytest.raises(_Crash):
        run(tmp_path / "resumed", crash_after=11)
    assert list_checkpoints(tmp_path / "resumed" / CHECKPOINT_DIR) == [4, 8]
    (resumed,), sae = run(tmp_path / "resumed")
    assert resumed.resumed_from_step == 8 and resumed.steps == full.steps == 16
    assert state_equal(sae, ref) and resumed.metrics == full.metrics
    # after the resume the timer restarts: the next checkpoint comes 4 minutes (4 steps) later
    assert list_checkpoints(tmp_path / "resumed" / CHECKPOINT_DIR) == [4, 8, 12]
    # 0 turns wall-time checkpoints off
    off = config.model_copy(update={"checkpoint_every_minutes": 0.0})
    job = DictionaryJob(name="sae", module=topk_sae(16, 32, 4), out_dir=tmp_path / "off")
    Trainer([job], off, progress=False, clock=itertools.count(0.0, 1e6).__next__).fit(TensorSource({"h": x}))
    assert list_checkpoints(tmp_path / "off" / CHECKPOINT_DIR) == []


def test_resume_with_other_options_is_refused(tmp_path: Path) -> None:
    x, _ = synthetic(n=1024, d=16, n_features=48)
    config = TrainerConfig(epochs=1, checkpoint_every=3, **FAST)
    job = DictionaryJob(name="sae", module=topk_sae(16, 32, 4), out_dir=tmp_path)
    Trainer([job], config, progress=False).fit(TensorSource({"h": x}))
    assert list_checkpoints(tmp_path / CHECKPOINT_DIR) == [6]
    other = config.model_copy(update={"lr": 1e-2})
    job = DictionaryJob(name="sae", module=topk_sae(16, 32, 4), out_dir=tmp_path)
    with pytest.raises(UsageError, match="other options"):
        Trainer([job], other, progress=False).fit(TensorSource({"h": x}))
    # resume=False starts afresh
    job = DictionaryJob(name="sae", module=topk_sae(16, 32, 4), out_dir=tmp_path)
    (result,) = Trainer([job], other, progress=False).fit(TensorSource({"h": x}), resume=False)
    assert result.steps == 8


def test_dead_latents_feed_auxk_and_are_reported() -> None:
    x, _ = synthetic(n=2048, d=32)
    sae = topk_sae(32, 64, k=4)
    masks = []
    forward = type(sae).forward

    def spy(self, x, target=None, dead_mask=None):
        masks.append(dead_mask.clone())
        return forward(self, x, target, dead_mask)

    with torch.no_grad():
        sae.b_enc[:8] = -1e6  # these 8 latents can never be selected
    sae.forward = spy.__get__(sae)
    result = train_on_tensors(sae, x, epochs=1, dead_tokens=640, **FAST)  # dead after 5 steps of 128
    assert not masks[4][:8].any() and masks[5][:8].all()
    assert result.metrics["dead_frac"] >= 8 / 64
    assert result.dead_final_epoch >= 8 / 64
    assert result.metrics["auxk"] >= 0.0 and "auxk" in result.history[-1]


def test_progress_display_and_options_validation(tmp_path: Path) -> None:
    x, _ = synthetic(n=512, d=16, n_features=48)
    result = train_on_tensors(topk_sae(16, 32, 4), x, progress=True, **FAST)
    assert result.steps == 4
    with pytest.raises(UsageError, match="larger than the data"):
        train_on_tensors(topk_sae(16, 32, 4), x[:100], **FAST)
    with pytest.raises(UsageError, match="unknown option 'bogus'"):
        train_on_tensors(topk_sae(16, 32, 4), x, bogus=1)
    with pytest.raises(UsageError, match="lr_decay"):
        TrainerConfig.parse({"lr_decay": "exp"})
    with pytest.raises(UsageError, match="lacks"):
        Trainer([DictionaryJob("s", topk_sae(16, 32, 4))], TrainerConfig(**FAST),
                progress=False).fit(TensorSource({"other": x}))


def test_wandb_offline_logging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    x, _ = synthetic(n=1024, d=16, n_features=48)
    train_on_tensors(topk_sae(16, 32, 4), x, out_dir=tmp_path / "run", wandb_project="saelab-test", **FAST)
    runs = list((tmp_path).rglob("offline-run-*"))
    assert runs, "no offline W&B run directory was written"
    files = {p.name for p in runs[0].rglob("*")}
    assert any(name.endswith(".wandb") for name in files)
    assert wandb.run is None  # finished


# --------------------------------------------------------------------------------------------------
# saelab train (CLI) on the tiny GPT-2 cache


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory):
    from training_helpers import build_tiny_cache

    store = tmp_path_factory.mktemp("store")
    return build_tiny_cache(store)


def test_cli_sweep_over_hookpoints_from_cache(cli, tiny_cache, results_dir: Path, tmp_path: Path) -> None:
    from training_helpers import cached_rows, train_args

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("dictionaries:\n  - {architecture: topk, name: k4, options: {k: 4}}\n"
                     "  - {architecture: topk, name: k8, lr: 0.002}\n")
    res = cli(train_args(tiny_cache.path, "sw", "--hookpoints", "layers.0", "layers.1", "--sweep", str(sweep)))
    assert res.exit_code == 0, res.stderr
    base = results_dir / "sw" / "dictionaries"
    names = sorted(p.name for p in base.iterdir())
    assert names == ["layers.0-k4", "layers.0-k8", "layers.1-k4", "layers.1-k8"]
    run_config = json.loads((results_dir / "sw" / "run_config.json").read_text())
    assert run_config["activation_cache"] == str(tiny_cache.path)
    assert sorted(run_config["dictionaries"]) == names and run_config["config"]["trainer"]["epochs"] == 1
    for name in names:
        cfg = json.loads((base / name / "cfg.json").read_text())
        hp = name.split("-")[0]
        assert cfg["sites"]["inputs"] == [hp] and cfg["options"]["d_sae"] == 128
        assert cfg["options"]["k"] == (4 if name.endswith("k4") else 8)
        assert cfg["metadata"]["training"]["lr"] == pytest.approx(0.002 if name.endswith("k8") else auto_lr(128))
        log = [json.loads(line) for line in (base / name / TRAINING_LOG).read_text().splitlines()]
        # the saved dictionary takes raw cached activations; its FVU there matches the training log
        x = cached_rows(tiny_cache, hp)
        assert fvu(load_dictionary(base / name), x) == pytest.approx(log[-1]["fvu"], abs=0.1)
        assert log[-1]["l0"] == pytest.approx(cfg["options"]["k"])
    # a second run with the same name skips what is trained; --overwrite train retrains
    res = cli(train_args(tiny_cache.path, "sw", "--hookpoints", "layers.0", "--sweep", str(sweep)))
    assert res.exit_code == 0 and (base / "layers.0-k4" / "cfg.json").stat().st_mtime_ns > 0
    before = (base / "layers.0-k4" / "dictionary.safetensors").stat().st_mtime_ns
    res = cli(train_args(tiny_cache.path, "sw", "--hookpoints", "layers.0", "--sweep", str(sweep)))
    assert (base / "layers.0-k4" / "dictionary.safetensors").stat().st_mtime_ns == before
    res = cli(train_args(tiny_cache.path, "sw", "--hookpoints", "layers.0", "--sweep", str(sweep),
                         "--overwrite", "train", "--max_steps", "3"))
    assert res.exit_code == 0, res.stderr
    cfg = json.loads((base / "layers.0-k4" / "cfg.json").read_text())
    assert cfg["metadata"]["training"]["steps"] == 3


def test_cli_builds_or_reuses_the_cache_and_on_the_fly(cli, tiny_cache, results_dir: Path) -> None:
    from training_helpers import train_args

    store = tiny_cache.path.parent
    common = ["--hookpoints", "layers.0", "layers.1", "--dataset_repo", "news-sample", "--dataset_split", "train",
              "--n_tokens", "8192", "--cache_ctx_len", "64", "--max_steps", "6"]
    res = cli(train_args(None, "built", *common, "--store", str(store)))
    assert res.exit_code == 0, res.stderr
    cfg = json.loads((results_dir / "built" / "dictionaries" / "layers.1" / "cfg.json").read_text())
    assert cfg["metadata"]["activation_cache"] == str(tiny_cache.path)  # same fingerprint: reused
    common[1:3] = ["layers.1"]
    res = cli(train_args(None, "otf", *common, "--on_the_fly", "--n_tokens", "2048"))
    assert res.exit_code == 0, res.stderr
    out = results_dir / "otf" / "dictionaries" / "layers.1"
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"]["activation_cache"] == "on_the_fly" and cfg["metadata"]["training"]["steps"] == 6
    assert not (results_dir / ".activations").exists()


@pytest.mark.parametrize(("extra", "fragments"), [
    (["--architecture", "nosuch"], ["unknown architecture 'nosuch'", "topk"]),
    (["-o", "k", "500"], ["k=500", "d_sae=128"]),
    (["-o", "bogus", "1"], ["unknown option 'bogus'"]),
    (["--lr", "fast"], ["'lr'", "fast"]),
    (["--hookpoints", "a:b:c"], ["bad hookpoint 'a:b:c'", "IN:OUT"]),
    (["--hookpoints", "layers.7"], ["layers.7", "not in the activation cache"]),
    (["--checkpoint_every_minutes", "-1"], ["bad value -1", "checkpoint_every_minutes", "minutes >= 0"]),
    (["--checkpoint_every", "-5"], ["bad value -5", "checkpoint_every", ">= 0"]),
])
def test_cli_bad_options_are_one_line_errors(cli, tiny_cache, extra: list[str], fragments: list[str]) -> None:
    from training_helpers import train_args

    args = train_args(tiny_cache.path, "bad", *extra)
    if "--hookpoints" not in extra:
        args += ["--hookpoints", "layers.0"]
    cli(args).assert_user_error(*fragments)


def test_cli_checkpoints_by_wall_time_and_says_it_resumed(cli, tiny_cache, results_dir: Path) -> None:
    """A short run (far fewer steps than --checkpoint_every) still checkpoints, by wall time; a rerun of a
    run that did not finish says "resumed from step N" on stderr and in the training log, and ends equal."""
    from training_helpers import train_args

    args = train_args(tiny_cache.path, "wall", "--hookpoints", "layers.1", "--checkpoint_every_minutes", "1e-6")
    res = cli(args)
    assert res.exit_code == 0, res.stderr
    assert "resumed" not in res.stderr
    out = results_dir / "wall" / "dictionaries" / "layers.1"
    steps = json.loads((out / "cfg.json").read_text())["metadata"]["training"]["steps"]
    last = (steps - 1) // 5 * 5  # the clock is read every --log_every 5 steps; nothing is saved at the end
    assert steps < 1000 and list_checkpoints(out / CHECKPOINT_DIR) == [last]
    first = load_dictionary(out)
    # as if killed after its last checkpoint: the rerun resumes there instead of starting afresh
    (out / "cfg.json").unlink()
    (out / "dictionary.safetensors").unlink()
    res = cli(*args, "--verbose", "true")
    assert res.exit_code == 0, res.stderr
    assert f"resumed from step {last} of {steps}" in res.stderr
    assert "resumed from step" in res.stdout  # a column of the summary table
    metrics, events = _log_entries(out / TRAINING_LOG)
    assert [e["event"] for e in events] == ["resumed"] and events[0]["step"] == last
    assert metrics[-1]["step"] == steps and len({e["step"] for e in metrics}) == len(metrics)
    assert state_equal(load_dictionary(out), first)
    cfg = json.loads((out / "cfg.json").read_text())["metadata"]["training"]
    assert cfg["trainer"]["checkpoint_every_minutes"] == 1e-6


def test_cli_missing_cache_path(cli, tmp_path: Path) -> None:
    from training_helpers import train_args

    cli(train_args(tmp_path / "nope", "bad", "--hookpoints", "layers.0")).assert_user_error(
        "does not exist", str(tmp_path / "nope"))


def test_cli_records_training_data_so_evaluate_holds_it_out(cli, tiny_cache, results_dir: Path) -> None:
    """``saelab train`` writes where its tokens came from into cfg.json (from the cache's manifest, not
    from dataset flags that did not make it), and ``saelab evaluate`` then skips those tokens."""
    from fixtures.tiny_models import TINY_GPT2
    from saelab.evaluation import skip_tokens_for, training_data
    from saelab.plugins.commands.evaluate import run_evaluation
    from training_helpers import train_args

    res = cli(train_args(tiny_cache.path, "prov", "--hookpoints", "layers.1", "--max_steps", "2",
                         "--dataset_repo", "wikipedia-sample", "--n_tokens", "999"))
    assert res.exit_code == 0, res.stderr
    out = results_dir / "prov" / "dictionaries" / "layers.1"
    data = json.loads((out / "cfg.json").read_text())["metadata"]["data"]
    manifest = tiny_cache.manifest
    assert data == {"model": str(TINY_GPT2), "dataset_repo": "news-sample", "dataset_split": "train",
                    "dataset_name": None, "dataset_column": "text", "n_tokens": manifest["n_tokens"],
                    "ctx_len": 64, "activation_cache": str(tiny_cache.path)}
    recorded = training_data(out)
    assert {k: recorded[k] for k in ("dataset_repo", "n_tokens", "ctx_len")} == {
        "dataset_repo": "news-sample", "n_tokens": manifest["n_tokens"], "ctx_len": 64}
    skip = skip_tokens_for(recorded["n_tokens"], recorded["ctx_len"])
    assert skip is not None and skip >= manifest["n_tokens"]
    payload = run_evaluation(str(out), write=False, progress=False, n_tokens=128, batch_size=4,
                             downstream=False)["layers.1"]
    assert payload["held_out"] is True and payload["skip_tokens"] == skip and payload["model"] == str(TINY_GPT2)
    assert payload["dataset"]["repo"] == "news-sample"

    res = cli(train_args(None, "prov_otf", "--hookpoints", "layers.1", "--on_the_fly", "--dataset_repo",
                         "news-sample", "--n_tokens", "2048", "--cache_ctx_len", "64", "--max_steps", "2"))
    assert res.exit_code == 0, res.stderr
    data = json.loads((results_dir / "prov_otf" / "dictionaries" / "layers.1" / "cfg.json").read_text())["metadata"]
    assert data["data"] == {"model": str(TINY_GPT2), "dataset_repo": "news-sample", "dataset_split": "train",
                            "dataset_name": None, "dataset_column": "text", "n_tokens": 2048, "ctx_len": 64,
                            "activation_cache": None}


def test_cli_records_position_exclusions_that_evaluate_and_latents_use(cli, tiny_cache, results_dir: Path) -> None:
    """Training records the positions it left out in cfg.json (by default the model's declaration; explicit
    --exclude_positions wins, 'none' is none); evaluation and the latent cache default to that record, and an
    explicit setting still overrides it."""
    from fixtures.tiny_models import TINY_GPT2
    from saelab.evaluation import EvalConfig, position_filter
    from saelab.latents import _default_exclusions
    from saelab.models import load_activation_source
    from saelab.plugins.commands.evaluate import run_evaluation
    from saelab.positions import PositionFilter
    from training_helpers import train_args

    def positions(name: str) -> dict:
        cfg = json.loads((results_dir / name / "dictionaries" / "layers.1" / "cfg.json").read_text())
        return cfg["metadata"]["positions"]

    for name, extra, expected in (("pos_default", [], [0]), ("pos_none", ["--exclude_positions", "none"], []),
                                  ("pos_given", ["--exclude_positions", "1", "-2", "--filter_bos", "true"], [1, -2])):
        res = cli(train_args(tiny_cache.path, name, "--hookpoints", "layers.1", "--max_steps", "2", *extra))
        assert res.exit_code == 0, res.stderr
        assert positions(name) == {"exclude_positions": expected, "exclude_bos": name == "pos_given"}
    out = results_dir / "pos_given" / "dictionaries" / "layers.1"
    module = load_dictionary(out)
    source = load_activation_source(str(TINY_GPT2), device="cpu")
    assert position_filter(EvalConfig(), module, source) == PositionFilter((1, -2), True)
    assert position_filter(EvalConfig(exclude_positions=(3,), exclude_bos=False), module, source) == PositionFilter((3,))
    assert _default_exclusions(None, module, source) == (1, -2) and _default_exclusions([5], module, source) == (5,)
    unrecorded = build_dictionary("topk", module.sites, {"d_sae": 16, "k": 2})
    assert position_filter(EvalConfig(), unrecorded, source) == PositionFilter((0,), False)
    assert _default_exclusions(None, unrecorded, source) == (0,)

    # 2 windows of 64 tokens: positions 1 and 62 out of the headline metrics, and BOS tokens wherever they sit
    metrics = run_evaluation(str(out), write=False, progress=False, n_tokens=128, batch_size=4,
                             downstream=False)["layers.1"]["metrics"]
    keep_bos = run_evaluation(str(out), write=False, progress=False, n_tokens=128, batch_size=4, downstream=False,
                              exclude_bos=False)["layers.1"]["metrics"]
    assert metrics["tokens_all"] == 128 and keep_bos["tokens"] == 124 and metrics["tokens"] <= 124 - 2
    every = run_evaluation(str(out), write=False, progress=False, n_tokens=128, batch_size=4, downstream=False,
                           exclude_positions=(), exclude_bos=False)["layers.1"]["metrics"]
    assert every["tokens"] == 128


def test_a_third_party_source_declaring_exclusions_gets_them(cli, tiny_cache, results_dir: Path) -> None:
    """A model plugin's ``excluded_positions`` is the trainer's default, recorded in cfg.json, and evaluation's
    default for a dictionary that records nothing."""
    import saelab
    from fixtures.tiny_models import TINY_GPT2
    from saelab.evaluation import EvalConfig, position_filter
    from saelab.models import load_activation_source
    from saelab.plugins.models.transformers_models import TransformersSource
    from saelab.positions import PositionFilter, model_exclusions
    from training_helpers import train_args

    class ShiftedSource(TransformersSource):
        """The tiny GPT-2 under another name, with its own massive-activation positions."""

        name = "tiny-shifted"
        excluded_positions = (0, 5, -1)

        def __init__(self, model_id: str = "tiny-shifted", options: object = None):
            super().__init__(model_id, options, path=TINY_GPT2)

        @classmethod
        def accepts(cls, model: str) -> bool:
            return False

    class Plugin:
        @saelab.hookimpl
        def register_activation_sources(self, register):
            register(ShiftedSource)

    saelab.register_plugin(Plugin(), name="tiny-shifted-plugin")
    try:
        assert model_exclusions("tiny-shifted") == (0, 5, -1) and model_exclusions(str(TINY_GPT2)) == (0,)
        args = train_args(tiny_cache.path, "shifted", "--hookpoints", "layers.1", "--max_steps", "2")
        args[1] = "tiny-shifted"
        res = cli(args)
        assert res.exit_code == 0, res.stderr
        cfg = json.loads((results_dir / "shifted" / "dictionaries" / "layers.1" / "cfg.json").read_text())
        assert cfg["metadata"]["positions"] == {"exclude_positions": [0, 5, -1], "exclude_bos": False}
        unrecorded = build_dictionary("topk", SiteSpec(inputs=["layers.1"], outputs=["layers.1"], d_in=64, d_out=64),
                                      {"d_sae": 16, "k": 2})
        source = load_activation_source("tiny-shifted", device="cpu")
        assert position_filter(EvalConfig(), unrecorded, source) == PositionFilter((0, 5, -1), False)
    finally:
        saelab.unregister_plugin("tiny-shifted-plugin")
