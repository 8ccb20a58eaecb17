"""Crosscoder model diffing on the embedded SmolLM2 vs a derived model, end to end (issue 12's benchmark).

Model A is ``smollm2``; model B is derived from it (``tests/fixtures/derived_model.py``: a local copy whose
MLP at ``--layer`` writes ``n_new`` planted new directions, and one existing direction at half strength),
built once under ``--derived_dir`` and reused. At ``--hookpoint`` (default ``layers.15.mlp``, the MLP output,
where the planted directions are written; ``layers.15`` is the block output, where the residual carries
the inputs that make the planted neurons fire in both models, so their latents lean less to B):

1. Paired caching throughput of the same tokens: ONE pass (``PairedSource``: both models per LM batch,
   tokens stored once), two separate single-model caches (the sum of their times), and the paired cache's
   two-pass mode (``paired_pass="two"``: model B in a second pass over the token shards).
2. Crosscoder (``relu`` by default, as tests/test_crosscoder_smollm2.py: its L1 penalty on decoder-norm-weighted
   activations shrinks a B-specific latent's A decoder; TopK/BatchTopK keep it at the least-squares fit and
   leave the planted latents in "other") training from the one-pass cache: tokens/s of the trainer's loop,
   then ``saelab.evaluation.evaluate`` with the ``PairedSource`` on held-out windows: per site FVU and L0,
   per model CE loss recovered (open-loop: the crosscoder reads both models' clean activations).
3. Model diffing (``saelab.diffing``): latents per class (A-only, B-only, shared, other); for each planted
   new direction the best cosine among the B-only latents' B decoders and, over all latents, the best
   matching latent's class and relative norm; for the half-strength direction the best latent (cosine of
   its A decoder), its class and latent scaling's artifact flag.

Presets: ``cpu`` (default on a CPU: 24k tokens, 5 epochs, F 1024, 2048 held-out tokens; the four caches
are most of the time: two single-model forwards per token each way) and ``gpu`` (default with
``--device cuda``: 1M tokens, F 16384). Every size
is an option; ``--dry_run`` prints the sizes and memory without loading a model. No assertion: it prints
figures::

    .venv/bin/python bench/crosscoder_smollm2.py [--preset cpu|gpu] [--hookpoint layers.15.mlp] [--d_sae 1024]
        [--activation relu] [--tokens 24576] [--derived_dir DIR] [--strength 20] [--device cpu] [--dry_run]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from saelab import SiteSpec, UsageError
from saelab.activation_cache import build_activation_cache, cache_bytes, human_bytes
from saelab.data import load_dataset_source, n_windows_for
from saelab.dictionary import build_dictionary
from saelab.diffing import A_ONLY_BELOW, B_ONLY_ABOVE, CLASSES, decoder_diff, latent_scaling, site_decoders
from saelab.evaluation import EvalConfig, evaluate, heldout_windows, skip_tokens_for
from saelab.paired import LABELS, PairedSource, label_site
from saelab.plugins.commands.train import ADAM_BYTES_PER_PARAMETER
from saelab.positions import model_exclusions
from saelab.training import CacheSource, DictionaryJob, Trainer, TrainerConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fixtures.derived_model import DerivedModel, make_derived_model  # noqa: E402

MODEL = "smollm2"
D_MODEL = 576
"""Residual width of SmolLM2-135M (for ``--dry_run``, which loads nothing)."""
N_LAYERS = 30
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"d_sae": 1024, "tokens": 24_576, "eval_tokens": 2048, "train_batch_size": 512, "epochs": 5,
            "lm_batch_size": 16},
    "gpu": {"d_sae": 16384, "tokens": 1_000_000, "eval_tokens": 32768, "train_batch_size": 4096, "epochs": 1,
            "lm_batch_size": 64},
}
"""Sizes of a CPU run and of a GPU run; explicit options override them."""
ACTIVATIONS = ("batchtopk", "topk", "relu", "jumprelu")


def log(message: str) -> None:
    """A progress line (the figures come in the table at the end)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args() -> argparse.Namespace:
    """Command-line options, with the preset's sizes where none was given."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="sizes: cpu (24k tokens, F 1024) or gpu (1M tokens, F 16384) [default: gpu with "
                             "--device cuda, else cpu]")
    parser.add_argument("--hookpoint", default="layers.15.mlp",
                        help="hookpoint crosscoded in both models (layers.L or layers.L.mlp of the derived layer)")
    parser.add_argument("--layer", type=int, default=15, help="block whose MLP the derived model changes")
    parser.add_argument("--strength", type=float, default=20.0, help="derived model: alpha / column norm")
    parser.add_argument("--derived_dir", default=None,
                        help="directory of the derived model (built there once, then reused) "
                             "[default: /tmp/saelab-bench/smollm2-derived-L<layer>-s<strength>]")
    parser.add_argument("--d_sae", type=int, default=None, help="latents F [preset]")
    parser.add_argument("--k", type=int, default=32, help="latents per token (TopK family; BatchTopK on average)")
    parser.add_argument("--activation", choices=ACTIVATIONS, default="relu")
    parser.add_argument("--tokens", type=int, default=None, help="cached and training tokens [preset]")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs over the cache [preset]")
    parser.add_argument("--eval_tokens", type=int, default=None, help="held-out tokens evaluated [preset]")
    parser.add_argument("--cache_dtype", choices=("float16", "float32"), default="float32")
    parser.add_argument("--ctx_len", type=int, default=128)
    parser.add_argument("--lm_batch_size", type=int, default=None, help="windows per LM forward [preset]")
    parser.add_argument("--train_batch_size", type=int, default=None, help="tokens per optimisation step [preset]")
    parser.add_argument("--lr", type=float, default=None, help="learning rate [default: saelab's auto_lr]")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (LMs, training and evaluation)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry_run", action="store_true", help="print sizes and memory; load and run nothing")
    args = parser.parse_args()
    args.preset = args.preset or ("gpu" if str(args.device).startswith("cuda") else "cpu")
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.hookpoint not in (f"layers.{args.layer}", f"layers.{args.layer}.mlp"):
        parser.error(f"--hookpoint {args.hookpoint}: accepted: layers.{args.layer} or layers.{args.layer}.mlp "
                     f"(where the derived model's directions are recorded; --layer {args.layer})")
    if not 0 <= args.layer < N_LAYERS:
        parser.error(f"--layer {args.layer}: accepted: 0-{N_LAYERS - 1}")
    for name in ("d_sae", "k", "tokens", "epochs", "eval_tokens", "ctx_len", "lm_batch_size", "train_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: accepted: a positive integer")
    if args.derived_dir is None:
        args.derived_dir = f"/tmp/saelab-bench/smollm2-derived-L{args.layer}-s{args.strength:g}"
    args.sites = [label_site(args.hookpoint, label) for label in LABELS]
    return args


def build(args: argparse.Namespace, d: int) -> Any:
    """A fresh crosscoder over the two labelled sites (seeded)."""
    torch.manual_seed(args.seed)
    return build_dictionary("crosscoder", SiteSpec(args.sites, args.sites, d, d),
                            {"d_sae": args.d_sae, "k": args.k, "activation": args.activation})


def print_sizes(args: argparse.Namespace, d: int) -> None:
    """The sizes of this run: sites, width, tokens, parameters, memory, cache."""
    with torch.device("meta"):
        params = sum(p.numel() for p in build(args, d).parameters())
    windows = n_windows_for(args.tokens, args.ctx_len)
    print(f"sizes: {MODEL} (A) vs its derived model (B, strength {args.strength:g}, {args.derived_dir}); sites "
          f"{', '.join(args.sites)} (d={d}); crosscoder F={args.d_sae}, {args.activation} k={args.k}")
    print(f"  tokens {args.tokens:,} ({windows} windows of {args.ctx_len}), {args.epochs} epoch(s), train batch "
          f"{args.train_batch_size}, held-out eval tokens {args.eval_tokens:,}, device {args.device}")
    print(f"  crosscoder {params:,} parameters; weights + grads + Adam {human_bytes(params * ADAM_BYTES_PER_PARAMETER)}; "
          f"paired cache {human_bytes(cache_bytes([d, d], windows, args.ctx_len, args.cache_dtype))} "
          f"({args.cache_dtype})")


def caching(args: argparse.Namespace, paired: PairedSource, dataset: Any, store: Path) -> tuple[dict[str, float], Any]:
    """Seconds of the one-pass paired cache, of the two single-model caches and of the two-pass paired cache
    (same tokens); the one-pass cache."""
    seconds: dict[str, float] = {}

    def timed(source: Any, hookpoints: list[str], where: str, **kw: Any) -> Any:
        start = time.perf_counter()
        cache = build_activation_cache(source, dataset, hookpoints, n_tokens=args.tokens, ctx_len=args.ctx_len,
                                       batch_size=args.lm_batch_size, store=store / where,
                                       dtype=args.cache_dtype, progress=False, **kw)
        seconds[where] = time.perf_counter() - start
        log(f"{where}: {seconds[where]:.1f} s")
        return cache

    for label in LABELS:  # load weights and tokenizer, first forward: untimed
        build_activation_cache(paired.source(label), dataset, [args.hookpoint], n_tokens=args.ctx_len,
                               ctx_len=args.ctx_len, batch_size=1, store=store / f"warmup_{label}", progress=False)
    cache = timed(paired, args.sites, "one_pass")
    for label in LABELS:
        timed(paired.source(label), [args.hookpoint], f"single_{label}")
    # a two-pass build releases each model of its source after its pass: give it its own pair
    timed(PairedSource({label: paired.source(label) for label in LABELS}), args.sites, "two_pass",
          paired_pass="two")
    seconds["tokens"] = float(cache.manifest.get("n_tokens") or args.tokens)
    return seconds, cache


def diffing(args: argparse.Namespace, module: Any, derived: DerivedModel, cache: Any,
            excluded: tuple[int, ...]) -> dict[str, Any]:
    """Class counts, the planted directions' best latents, and latent scaling of the half direction's one."""
    diff = decoder_diff(module, [0], [1])
    decoders = site_decoders(module).cpu()  # [F, 2, d]
    b_only = diff.latents_of("b_only")
    out: dict[str, Any] = {"counts": diff.counts, "new": []}
    for u in derived.new_directions:
        cos = torch.nn.functional.cosine_similarity(decoders[:, 1], u[None].float(), dim=1)
        best = int(cos.argmax())
        out["new"].append({"b_only_cos": float(cos[b_only].max()) if b_only else None,
                           "best": best, "best_cos": float(cos[best]), "best_class": diff.classes[best],
                           "best_relative": float(diff.relative[best])})
    half = derived.half_direction.float()[None]
    cos_a = torch.nn.functional.cosine_similarity(decoders[:, 0], half, dim=1)
    best = int(cos_a.argmax())
    source = CacheSource(cache, args.sites, exclude_positions=excluded)
    n_rows = min(32768, args.tokens)
    batch = source.sample(n_rows, seed=args.seed)
    x = torch.stack([batch[s] for s in args.sites], dim=1).float()
    scaling = latent_scaling(module, x.to(args.device).split(4096), [0], [1], latents=[best])
    out["half"] = {"best": best, "cos_a": float(cos_a[best]),
                   "cos_b": float(torch.nn.functional.cosine_similarity(decoders[best, 1], half[0], dim=0)),
                   "class": diff.classes[best], "relative": float(diff.relative[best]),
                   "artifact": bool(scaling.artifact[0]), "nu_error": float(scaling.nu_error[0]),
                   "nu_reconstruction": float(scaling.nu_reconstruction[0]), "rows": scaling.rows}
    return out


def fmt(value: Any, spec: str = ".4f") -> str:
    """A figure, or '-' when missing."""
    return "-" if value is None else format(value, spec)


def print_table(args: argparse.Namespace, seconds: dict[str, float], result: Any, wall: float,
                metrics: dict[str, Any], eval_tokens: int, diff: dict[str, Any], derived: DerivedModel,
                elapsed: float) -> None:
    """Every figure of the run, with its sizes."""
    print()
    print("=" * 100)
    print_sizes(args, D_MODEL)
    print(f"  derived model: new neurons {derived.new_neurons}, half neuron {derived.half_neuron}; held-out CE "
          f"A {derived.ce_base:.4f}, B {derived.ce_derived:.4f}")
    print(f"  torch {torch.__version__}, {torch.get_num_threads()} threads; total wall time {elapsed:.0f} s")
    print()
    n = seconds["tokens"]
    two_single = seconds["single_A"] + seconds["single_B"]
    print(f"1. paired caching of {int(n):,} tokens at {args.hookpoint} (tokens/s; seconds)")
    for label, secs in (("one pass (both models per LM batch, tokens stored once)", seconds["one_pass"]),
                        ("two single-model caches (A, then B; sum of both)", two_single),
                        (f"  of which A {seconds['single_A']:.1f} s, B", seconds["single_B"]),
                        ("paired cache, two-pass mode (B in a second pass)", seconds["two_pass"])):
        print(f"  {label:62s} {n / secs:10.0f} {secs:8.1f} s")
    print(f"  one pass / two single caches: {two_single / seconds['one_pass']:.2f}x; two-pass / two single "
          f"caches: {two_single / seconds['two_pass']:.2f}x")
    print()
    rate = result.history[-1]["tokens_per_s"] if result.history else None
    print(f"2. crosscoder training (from the one-pass cache, batch {args.train_batch_size}, {args.epochs} epoch(s))")
    print(f"  {result.steps} steps, {result.tokens:,} tokens, {fmt(rate, '.0f')} tokens/s in the loop "
          f"({result.tokens / wall:.0f} tokens/s over fit incl. init); final train FVU {fmt(result.metrics.get('fvu'))}, "
          f"L0 {fmt(result.metrics.get('l0'), '.1f')}, dead {fmt(result.metrics.get('dead_frac'), '.1%')}, "
          f"lr {result.lr:.2e}")
    print(f"  held-out ({eval_tokens:,} tokens): FVU {fmt(metrics.get('fvu'))}, L0 {fmt(metrics.get('l0'), '.1f')}, "
          f"dead {fmt(metrics.get('dead_frac'), '.1%')}")
    print(f"  {'site':22s} {'FVU':>8} {'CE recovered':>13}")
    for site in metrics.get("per_site") or []:
        print(f"  {site['site']:22s} {fmt(site.get('fvu')):>8} {fmt(site.get('ce_loss_recovered')):>13}")
    print(f"  {'model':6s} {'CE clean':>9} {'CE spliced':>11} {'CE zero':>9} {'CE recovered':>13}")
    for label, m in (metrics.get("per_model") or {}).items():
        print(f"  {label:6s} {fmt(m.get('ce_clean')):>9} {fmt(m.get('ce_spliced')):>11} {fmt(m.get('ce_zero')):>9} "
              f"{fmt(m.get('ce_loss_recovered')):>13}")
    print("  (open-loop: the crosscoder reads both models' clean activations; each model's site spliced in)")
    print()
    print(f"3. model diffing (A-only: relative norm < {A_ONLY_BELOW}, B-only: > {B_ONLY_ABOVE})")
    print("  latents per class: " + ", ".join(f"{c} {diff['counts'].get(c, 0)}" for c in CLASSES))
    print(f"  {'planted':9s} {'best B-only cos':>16} {'best latent':>12} {'its cos':>8} {'its class':>10} {'rel norm':>9}")
    for i, row in enumerate(diff["new"]):
        print(f"  {'new ' + str(i):9s} {fmt(row['b_only_cos']):>16} {row['best']:>12} {row['best_cos']:8.4f} "
              f"{row['best_class']:>10} {row['best_relative']:9.4f}")
    h = diff["half"]
    print(f"  half-strength direction: best latent {h['best']} (A decoder cos {h['cos_a']:.4f}, B {h['cos_b']:.4f}), "
          f"class {h['class']}, relative norm {h['relative']:.4f}; latent scaling nu_error {h['nu_error']:.3f}, "
          f"nu_reconstruction {h['nu_reconstruction']:.3f}, artifact flag {h['artifact']} ({h['rows']:,} rows)")


def main() -> None:
    """Parse the options, build or reuse the derived model, run the three measurements, print the table."""
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dry_run:
        print_sizes(args, D_MODEL)
        print("dry run: nothing loaded or trained")
        return
    from saelab.models import load_activation_source

    started = time.perf_counter()
    print_sizes(args, D_MODEL)
    log(f"derived model at {args.derived_dir} (built once, ~2 min on a CPU)")
    try:
        derived = make_derived_model(args.derived_dir, layer=args.layer, strength=args.strength)
    except UsageError as exc:
        raise SystemExit(f"error: {exc}") from None
    paired = PairedSource({LABELS[0]: load_activation_source(MODEL, device=args.device),
                           LABELS[1]: load_activation_source(str(derived.path), device=args.device)})
    dataset = load_dataset_source("wikipedia-sample")
    paired.identity()  # weights hashes once, outside the timings
    excluded = model_exclusions(MODEL)
    config = TrainerConfig(batch_size=args.train_batch_size, lr=args.lr, seed=args.seed, device=args.device,
                           epochs=args.epochs, exclude_positions=excluded, checkpoint_every=0,
                           checkpoint_every_minutes=0, log_every=10)
    with tempfile.TemporaryDirectory() as tmp:
        log("caching")
        seconds, cache = caching(args, paired, dataset, Path(tmp))
        log("training the crosscoder")
        module = build(args, paired.hookpoint_dim(args.sites[0]))
        start = time.perf_counter()
        trainer = Trainer([DictionaryJob(name="crosscoder", module=module)], config, progress=False)
        (result,) = trainer.fit(CacheSource(cache, args.sites, exclude_positions=excluded), resume=False)
        wall = time.perf_counter() - start
        log(f"{result.steps} steps in {wall:.0f} s; diffing")
        diff = diffing(args, module, derived, cache, excluded)

    skip = skip_tokens_for(args.tokens, args.ctx_len)
    assert skip is not None
    log(f"evaluating on {n_windows_for(args.eval_tokens, args.ctx_len)} held-out windows")
    windows = list(heldout_windows(paired, dataset, args.ctx_len, args.eval_tokens, skip))
    eval_config = EvalConfig(n_tokens=args.eval_tokens, ctx_len=args.ctx_len, batch_size=8, skip_tokens=skip,
                             device=args.device)
    metrics = evaluate({"crosscoder": module}, paired, windows, eval_config)["crosscoder"]
    print_table(args, seconds, result, wall, metrics, len(windows) * args.ctx_len, diff, derived,
                time.perf_counter() - started)


if __name__ == "__main__":
    main()
