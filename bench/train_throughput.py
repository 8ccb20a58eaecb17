"""TopK training throughput and quality: saelab vs a dense reference vs eai-sparsify's training step.

Same data, same number of steps for all three (default: d_in 576, d_sae 16384, k 32, batch 4096 rows,
94 steps ~ 385k tokens, fp32 on CPU):

* **saelab**: the real trainer, ``saelab.training.train_on_tensors`` with its defaults (normalisation,
  geometric-median ``b_dec``, unit-norm decoder, AuxK, Adam with the width-scaled learning rate and
  warm-up/decay) on a ``topk`` dictionary; timed end to end (initialisation included).
* **dense reference** (issue 3): ``pre = (x - b_dec) @ W_enc + b_enc``, top-k, scatter into a dense ``z``,
  ``x_hat = z @ W_dec + b_dec``, MSE, full autograd, Adam (same learning rate, ``b_dec`` at the mean, the
  same input scaling as saelab).
* **sparsify**: eai-sparsify 1.3.3's ``SparseCoder`` driven exactly like its ``Trainer`` step (``b_dec`` at
  the first batch's mean, unit-norm decoder, FVU loss, parallel-gradient removal, dead-latent counters,
  its default optimizer SignSGD+ScheduleFree with lr ``5e-3/sqrt(d_sae/2^14)``; ``--sparsify_adam`` also
  runs its Adam option) in a side venv (``/tmp/refvenv``, created on demand with
  ``torch==2.13.0 eai-sparsify==1.3.3``) through a subprocess that reads the same rows from a temp file.

Quality: FVU on held-out rows (never trained on; 16384, or down to 8192 when the cache is short), the
fraction of latents that never fired during training ("dead") and of those silent over the last tenth of
the training tokens ("quiet", the trainer's default AuxK criterion). Before the runs, a per-step timing
(median of 5 on one batch) compares saelab's step with no dead latent, saelab's step with
``--dead_fraction`` (12%) of the latents dead (AuxK active) and the dense reference's step. Data: real SmolLM2 ``layers.15`` activations from an activation cache when one exists
(``--cache DIR``, else the first cache under ``results/.activations`` holding ``layers.15`` of
``smollm2``), with positions 0-3 of every context dropped (BOS and the massive activations); otherwise,
and always with ``--synthetic``, synthetic data with a known dictionary (sparse non-negative
combinations of 8192 unit directions with power-law frequencies plus noise), where the mean max cosine
similarity (MMCS) of each learned decoder to the true directions is reported as well.

    .venv/bin/python bench/train_throughput.py [--steps 94] [--synthetic] [--skip_sparsify]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VENV = Path("/tmp/refvenv")
SPARSIFY_PINS = ["torch==2.13.0", "eai-sparsify==1.3.3"]
EVAL_ROWS = 16384
QUIET_FRACTION = 0.1
"""``quiet``: fraction of latents that did not fire during the last tenth of the training tokens (the
trainer's default AuxK dead criterion); ``dead``: never fired during the run."""
MIN_EVAL_ROWS = 8192
"""Held-out rows: up to EVAL_ROWS, fewer (not under MIN_EVAL_ROWS) when the cache is short, so that a
~400k-token cache still gives the issue's 94 training steps."""


# --------------------------------------------------------------------------------------------------
# Data


def find_cache(explicit: str | None) -> Path | None:
    """An activation cache directory holding smollm2 ``layers.15``."""
    if explicit:
        return Path(explicit)
    store = Path(os.environ.get("SAELAB_RESULTS_DIR", "results")) / ".activations"
    for manifest in sorted(store.glob("*/manifest.json")):
        try:
            data = json.loads(manifest.read_text())
        except ValueError:
            continue
        inputs = data.get("fingerprint_inputs", {})
        model = json.dumps(inputs.get("model", {})).lower()
        if "layers.15" in inputs.get("hookpoints", []) and "smollm2" in model and data.get("complete"):
            return manifest.parent
    return None


def real_rows(cache_dir: Path, n_rows: int, drop_positions: int = 4) -> torch.Tensor:
    """``n_rows`` rows of ``layers.15`` from the cache, positions ``< drop_positions`` removed, in cache
    order (the trainers shuffle nothing here: all three see the same rows in the same order)."""
    from saelab.activation_cache import ActivationCache

    cache = ActivationCache.open(cache_dir)
    out, have = [], 0
    for shard in range(len(cache.shards)):
        acts = cache.shard_activations("layers.15", shard)[:, drop_positions:, :].float()
        rows = acts.reshape(-1, acts.shape[-1])
        out.append(rows)
        have += rows.shape[0]
        if have >= n_rows:
            break
    rows = torch.cat(out)
    if rows.shape[0] < n_rows:
        print(f"note: the cache holds {rows.shape[0]} usable rows, fewer than the {n_rows} wanted")
    return rows[:n_rows]


def synthetic_rows(n_rows: int, d: int, n_features: int = 8192, active: int = 32,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[n_rows, d]`` = sparse non-negative combinations of unit directions (power-law frequencies,
    ~``active`` per row) + noise, and the true directions ``[n_features, d]``."""
    gen = torch.Generator().manual_seed(seed)
    truth = torch.nn.functional.normalize(torch.randn(n_features, d, generator=gen), dim=1)
    freq = 1.0 / torch.arange(1, n_features + 1).float() ** 0.7
    freq = freq / freq.sum() * active
    freq = freq.clamp(max=0.5)
    rows = torch.empty(n_rows, d)
    for start in range(0, n_rows, 8192):
        n = min(8192, n_rows - start)
        on = torch.rand(n, n_features, generator=gen) < freq
        mags = torch.rand(n, n_features, generator=gen) * 2 * on
        rows[start:start + n] = mags @ truth + 0.01 * torch.randn(n, d, generator=gen)
    return rows, truth


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Pooled fraction of variance unexplained."""
    return float((x - x_hat).double().pow(2).sum() / (x - x.mean(0)).double().pow(2).sum())


@torch.no_grad()
def mmcs(W_dec: torch.Tensor, truth: torch.Tensor | None) -> float | None:
    """:func:`saelab.metrics.mmcs` of the decoder rows, None without planted directions."""
    from saelab.metrics import mmcs as mean_max_cosine

    return None if truth is None else mean_max_cosine(W_dec, truth)


# --------------------------------------------------------------------------------------------------
# saelab


def run_saelab(train: torch.Tensor, held: torch.Tensor, args: argparse.Namespace,
               truth: torch.Tensor | None) -> dict[str, float | None]:
    from saelab.dictionary import build_dictionary
    from saelab.training import train_on_tensors

    d = train.shape[1]
    torch.manual_seed(0)
    module = build_dictionary("topk", {"inputs": ["layers.15"], "outputs": ["layers.15"], "d_in": d, "d_out": d},
                              {"d_sae": args.d_sae, "k": args.k})
    t0 = time.perf_counter()
    result = train_on_tensors(module, train, batch_size=args.batch, max_steps=args.steps, epochs=1,
                              checkpoint_every=0, seed=0, exclude_positions=())
    seconds = time.perf_counter() - t0
    module.eval()
    with torch.no_grad():
        recon = torch.cat([module(held[i:i + 4096, None]).reconstruction[:, 0] for i in range(0, len(held), 4096)])
    quiet = float((result.tokens_since_fired >= QUIET_FRACTION * args.steps * args.batch).float().mean())
    return {"tokens_per_s": args.steps * args.batch / seconds, "seconds": seconds, "fvu": fvu(held, recon),
            "dead": result.dead_final_epoch, "quiet": quiet, "mmcs": mmcs(module.W_dec.detach(), truth)}


# --------------------------------------------------------------------------------------------------
# Dense reference


def run_dense(train: torch.Tensor, held: torch.Tensor, args: argparse.Namespace,
              truth: torch.Tensor | None) -> dict[str, float | None]:
    from saelab.training import auto_lr

    d, n_lat, k = train.shape[1], args.d_sae, args.k
    scale = math.sqrt(d / float(train[:65536].pow(2).sum(-1).mean()))
    torch.manual_seed(0)
    W_dec = torch.nn.functional.normalize(torch.randn(n_lat, d), dim=1)
    W_enc = torch.nn.Parameter(W_dec.T.clone())
    W_dec = torch.nn.Parameter(W_dec)
    b_enc = torch.nn.Parameter(torch.zeros(n_lat))
    b_dec = torch.nn.Parameter((train[:65536] * scale).mean(0))
    opt = torch.optim.Adam([W_enc, W_dec, b_enc, b_dec], lr=auto_lr(n_lat))
    fired = torch.zeros(n_lat, dtype=torch.bool)
    since_fired = torch.zeros(n_lat, dtype=torch.long)
    t0 = time.perf_counter()
    for step in range(args.steps):
        x = train[step * args.batch:(step + 1) * args.batch] * scale
        pre = (x - b_dec) @ W_enc + b_enc
        vals, idx = pre.topk(k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
        x_hat = z @ W_dec + b_dec
        loss = (x_hat - x).pow(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        fired[idx.flatten()] = True
        since_fired += args.batch
        since_fired[idx.flatten()] = 0
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        recon = []
        for i in range(0, len(held), 4096):
            x = held[i:i + 4096] * scale
            pre = (x - b_dec) @ W_enc + b_enc
            vals, idx = pre.topk(k, dim=-1)
            recon.append((torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals)) @ W_dec + b_dec) / scale)
    return {"tokens_per_s": args.steps * args.batch / seconds, "seconds": seconds,
            "fvu": fvu(held, torch.cat(recon)), "dead": float((~fired).float().mean()),
            "quiet": float((since_fired >= QUIET_FRACTION * args.steps * args.batch).float().mean()),
            "mmcs": mmcs(W_dec.detach(), truth)}


# --------------------------------------------------------------------------------------------------
# Per-step timing: saelab's step with and without AuxK against the dense reference's step


def step_timing(train: torch.Tensor, args: argparse.Namespace, repeats: int = 5) -> dict[str, float]:
    """Median seconds of one training step (forward, backward, Adam) on the same batch: saelab's TopK
    step with no dead latent, the same with ``--dead_fraction`` of the latents dead (AuxK active), and
    the dense reference step. Isolates the step from the run's dynamics (how many latents die)."""
    from saelab.dictionary import build_dictionary

    d, n_lat, k = train.shape[1], args.d_sae, args.k
    x = train[:args.batch].clone()
    x = x * math.sqrt(d / float(x.pow(2).sum(-1).mean()))
    torch.manual_seed(0)
    module = build_dictionary("topk", {"inputs": ["h"], "outputs": ["h"], "d_in": d, "d_out": d},
                              {"d_sae": n_lat, "k": k})
    module.train()
    opt = torch.optim.Adam(module.parameters(), lr=1e-4, fused=True)
    dead = torch.zeros(n_lat, dtype=torch.bool)
    dead[torch.randperm(n_lat)[:int(args.dead_fraction * n_lat)]] = True

    def saelab_step(mask: torch.Tensor | None) -> None:
        out = module(x[:, None], dead_mask=mask)
        loss = sum(out.losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        module.before_optimizer_step()
        opt.step()
        module.after_optimizer_step()
        out.fired(), out.l0()  # what the trainer reads for its dead-latent counters and log

    W_dec = torch.nn.Parameter(module.W_dec.detach().clone())
    W_enc = torch.nn.Parameter(module.W_enc.detach().clone())
    b_enc = torch.nn.Parameter(torch.zeros(n_lat))
    b_dec = torch.nn.Parameter(x.mean(0))
    dense_opt = torch.optim.Adam([W_enc, W_dec, b_enc, b_dec], lr=1e-4)

    def dense_step() -> None:
        pre = (x - b_dec) @ W_enc + b_enc
        vals, idx = pre.topk(k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
        loss = ((z @ W_dec + b_dec) - x).pow(2).sum(-1).mean()
        dense_opt.zero_grad(set_to_none=True)
        loss.backward()
        dense_opt.step()

    def median(fn: object, *a: object) -> float:
        fn(*a)  # type: ignore[operator]
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*a)  # type: ignore[operator]
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    return {"saelab": median(saelab_step, None), "saelab_auxk": median(saelab_step, dead),
            "dense": median(dense_step)}


# --------------------------------------------------------------------------------------------------
# sparsify (side venv)

SPARSIFY_SCRIPT = r'''
import json, sys, time, torch
from safetensors.torch import load_file
from sparsify import SparseCoder, SparseCoderConfig
from sparsify.sign_sgd import SignSGD
cfg = json.loads(sys.argv[2])
data = load_file(sys.argv[1])
train, held = data["train"], data["held"]
torch.manual_seed(0)
sae = SparseCoder(train.shape[1], SparseCoderConfig(num_latents=cfg["d_sae"], k=cfg["k"]), dtype=torch.float32)
n = sae.num_latents
if cfg["optimizer"] == "adam":
    from transformers import get_linear_schedule_with_warmup
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (n / 2**14) ** 0.5)
    sched = get_linear_schedule_with_warmup(opt, cfg.get("warmup", 1000), cfg["steps"])
else:
    from schedulefree import ScheduleFreeWrapper
    opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=5e-3 / (n / 2**14) ** 0.5)]), momentum=0.95)
    opt.train()
    sched = None
since_fired = torch.zeros(n, dtype=torch.long)
fired = torch.zeros(n, dtype=torch.bool)
B = cfg["batch"]
t0 = time.perf_counter()
for step in range(cfg["steps"]):
    x = train[step * B:(step + 1) * B]
    if step == 0:
        sae.b_dec.data = x.mean(0)
    sae.set_decoder_norm_to_unit_norm()
    dead_mask = since_fired > 10_000_000 if cfg["auxk_alpha"] > 0 else None
    out = sae(x, x, dead_mask=dead_mask, total_variance=(x - x.mean(0)).pow(2).sum())
    loss = out.fvu + cfg["auxk_alpha"] * out.auxk_loss
    loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    opt.zero_grad()
    if sched is not None:
        sched.step()
    did = torch.zeros(n, dtype=torch.bool)
    did[out.latent_indices.flatten()] = True
    since_fired += x.shape[0]
    since_fired[did] = 0
    fired |= did
seconds = time.perf_counter() - t0
if hasattr(opt, "eval"):
    opt.eval()
sae.eval()
with torch.no_grad():
    recon = torch.cat([sae(held[i:i + 4096]).sae_out for i in range(0, len(held), 4096)])
err = (held - recon).double().pow(2).sum() / (held - held.mean(0)).double().pow(2).sum()
json.dump({"tokens_per_s": cfg["steps"] * B / seconds, "seconds": seconds, "fvu": float(err),
           "dead": float((~fired).float().mean()),
           "quiet": float((since_fired >= cfg["quiet"] * cfg["steps"] * B).float().mean())}, sys.stdout)
from safetensors.torch import save_file
save_file({"W_dec": sae.W_dec.detach().contiguous()}, sys.argv[3])
'''


def ensure_sparsify_venv(venv: Path) -> Path:
    """The side venv's python, installing torch then eai-sparsify when missing."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    if subprocess.run([str(python), "-c", "import sparsify, schedulefree"], capture_output=True).returncode:
        for pin in SPARSIFY_PINS:
            subprocess.run([str(python), "-m", "pip", "install", "-q", pin], check=True)
    return python


def run_sparsify(data_file: Path, args: argparse.Namespace, optimizer: str,
                 truth: torch.Tensor | None) -> dict[str, float | None]:
    from safetensors.torch import load_file

    python = ensure_sparsify_venv(Path(args.venv))
    cfg = {"d_sae": args.d_sae, "k": args.k, "batch": args.batch, "steps": args.steps, "optimizer": optimizer,
           "auxk_alpha": 0.0, "warmup": min(1000, args.steps // 20), "quiet": QUIET_FRACTION}
    w_file = data_file.with_name(f"sparsify_{optimizer}_W_dec.safetensors")
    proc = subprocess.run([str(python), "-c", SPARSIFY_SCRIPT, str(data_file), json.dumps(cfg), str(w_file)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    if proc.returncode != 0:
        raise RuntimeError(f"sparsify run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["mmcs"] = mmcs(load_file(str(w_file))["W_dec"], truth)
    return result


# --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=94)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d_sae", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--d_in", type=int, default=576, help="width of synthetic data")
    parser.add_argument("--cache", default=None, help="activation cache directory holding smollm2 layers.15")
    parser.add_argument("--synthetic", action="store_true", help="use synthetic data even if a cache exists")
    parser.add_argument("--skip_sparsify", action="store_true")
    parser.add_argument("--skip_dense", action="store_true")
    parser.add_argument("--sparsify_adam", action="store_true", help="also run sparsify with Adam")
    parser.add_argument("--venv", default=str(VENV))
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--dead_fraction", type=float, default=0.12,
                        help="latents marked dead in the per-step AuxK timing")
    parser.add_argument("--skip_step_timing", action="store_true")
    args = parser.parse_args()

    n_rows = args.steps * args.batch + EVAL_ROWS
    cache = None if args.synthetic else find_cache(args.cache)
    truth = None
    if cache is not None:
        rows = real_rows(cache, n_rows)
        data_desc = f"smollm2 layers.15 from {cache} (positions 0-3 dropped)"
    else:
        rows, truth = synthetic_rows(n_rows, args.d_in)
        data_desc = f"synthetic (d={args.d_in}, 8192 true directions, ~32 active, noise 0.01)"
    n_held = min(EVAL_ROWS, max(MIN_EVAL_ROWS, rows.shape[0] - args.steps * args.batch))
    train, held = rows[:-n_held].contiguous(), rows[-n_held:].contiguous()
    steps = min(args.steps, train.shape[0] // args.batch)
    args.steps = steps
    print(f"data: {data_desc}; {steps} steps x {args.batch} rows = {steps * args.batch} tokens; "
          f"held-out {held.shape[0]} rows; d_sae {args.d_sae}, k {args.k}, threads {torch.get_num_threads()}")

    timing = None
    if not args.skip_step_timing:
        timing = step_timing(train, args)
        print(f"step seconds (median of 5, one batch of {args.batch}): saelab {timing['saelab']:.3f}, "
              f"saelab with AuxK ({args.dead_fraction:.0%} dead) {timing['saelab_auxk']:.3f}, "
              f"dense reference {timing['dense']:.3f} -> {timing['dense'] / timing['saelab']:.2f}x and "
              f"{timing['dense'] / timing['saelab_auxk']:.2f}x", flush=True)

    results: dict[str, dict[str, float | None]] = {}
    results["saelab"] = run_saelab(train, held, args, truth)
    print("saelab", results["saelab"], flush=True)
    if not args.skip_dense:
        results["dense reference"] = run_dense(train, held, args, truth)
        print("dense reference", results["dense reference"], flush=True)
    if not args.skip_sparsify:
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory() as tmp:
            data_file = Path(tmp) / "data.safetensors"
            save_file({"train": train[: steps * args.batch], "held": held}, str(data_file))
            results["sparsify signsgd"] = run_sparsify(data_file, args, "signum", truth)
            print("sparsify signsgd", results["sparsify signsgd"], flush=True)
            if args.sparsify_adam:
                results["sparsify adam"] = run_sparsify(data_file, args, "adam", truth)
                print("sparsify adam", results["sparsify adam"], flush=True)

    print()
    print(f"{'trainer':<18} {'tokens/s':>9} {'seconds':>8} {'FVU':>7} {'dead':>7} {'quiet':>7} {'MMCS':>6}")
    for name, r in results.items():
        m = "" if r.get("mmcs") is None else f"{r['mmcs']:.3f}"
        print(f"{name:<18} {r['tokens_per_s']:>9.0f} {r['seconds']:>8.1f} {r['fvu']:>7.3f} {r['dead']:>7.1%} "
              f"{r['quiet']:>7.1%} {m:>6}")
    base = results["saelab"]["tokens_per_s"]
    for name, r in results.items():
        if name != "saelab":
            print(f"saelab / {name}: {base / r['tokens_per_s']:.2f}x tokens/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"data": data_desc, "results": results, "step_seconds": timing},
                                              indent=2))


if __name__ == "__main__":
    main()
