"""Cross-layer transcoder vs transcoder set on the embedded SmolLM2, end to end (issue 11's benchmark).

For a range of L layers, F latents per layer, TopK k (or another ``--activation``) and a token budget:

1. Caching throughput of all 2L sites (``layers.i.<input_site>`` and ``layers.i.mlp`` of every layer) with
   ``build_activation_cache``: in ONE forward (the forward stops after the last layer, tokens stored once)
   over the whole budget, and on a small token subset (``--per_site_tokens``) both in one forward and with
   one ``build_activation_cache`` per site (2L forwards, each stopped at its site). The ratio of the two
   subset figures is the gain; the full-budget figure is what training waits for.
2. Training (``saelab.training.Trainer``, same stream, same seed, same order): tokens/s of the CLT and of
   the transcoder set, and the step time (forward + backward of the trained module on one training batch
   of real activations) with the ``decode`` option ``dense`` vs ``sparse``, without AuxK and with AuxK on
   the latents dead at the end of training (what the trainer's steps also run).
3. Per-layer FVU of both on held-out tokens (the windows after the training ones), open- and closed-loop.
4. Replacement model (``saelab.evaluation.evaluate``, all L MLP outputs replaced at once): CE loss, CE
   loss recovered, KL and top-1 agreement with the clean model, closed- and open-loop.
5. One closed-loop forward on one held-out window with each dictionary's own pass (each layer encoded
   once) vs the generic ``saelab.LayerReplacement`` (the whole dictionary at every output site): seconds,
   ratio, and the largest difference of their reconstructions.

``--save_dir DIR`` keeps both trained dictionaries; ``--load_dir DIR`` evaluates them again (sections 3-5)
without caching or training.

Presets: ``b`` (the default with ``--device cuda``) is configuration (b) of issue 11 (layers 0-7, F 2048,
~200k tokens, fp16 cache); ``a`` is configuration (a) (all 30 layers, F 1024, ~100k tokens; add ``--stream``
to train on activations streamed from the LM instead of a cache); ``cpu`` (the default on a CPU, what
``make bench`` runs here) is layers 0-3, F 512, 50k tokens, 8192 held-out tokens, batches of 512 tokens,
13-16 minutes on 2 shared CPU cores, about half of it the evaluation (8 LM forwards per batch). Every size
is an option; ``--dry_run`` prints the sizes, parameter counts and memory without loading the model. No
assertion: it prints figures::

    .venv/bin/python bench/clt_smollm2.py [--preset a|b|cpu] [--layers 0-7] [--d_sae 2048] [--k 32]
        [--tokens 200000] [--eval_tokens 16384] [--cache_dtype float16] [--stream] [--device cpu] [--dry_run]
        [--save_dir DIR | --load_dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from saelab import LayerReplacement, SiteSpec, UsageError, registry
from saelab.activation_cache import build_activation_cache, cache_bytes, human_bytes
from saelab.data import WindowSpec, iter_windows, load_dataset_source, n_windows_for
from saelab.dictionary import build_dictionary, load_dictionary, save_dictionary
from saelab.evaluation import EvalConfig, closed_loop_forward, evaluate, heldout_windows, skip_tokens_for
from saelab.plugins.commands.train import ADAM_BYTES_PER_PARAMETER, parse_layers
from saelab.positions import model_exclusions
from saelab.training import CacheSource, DictionaryJob, LMSource, Trainer, TrainerConfig

MODEL = "smollm2"
D_MODEL = 576
"""Residual width of SmolLM2-135M (for ``--dry_run``, which loads nothing)."""
N_LAYERS = 30
"""Blocks of SmolLM2-135M."""
PRESETS: dict[str, dict[str, Any]] = {
    "a": {"layers": "0-29", "d_sae": 1024, "tokens": 100_000, "eval_tokens": 16384, "train_batch_size": 1024,
          "per_site_tokens": 2048, "step_repeats": 1},
    "b": {"layers": "0-7", "d_sae": 2048, "tokens": 200_000, "eval_tokens": 16384, "train_batch_size": 1024,
          "per_site_tokens": 4096, "step_repeats": 3},
    "cpu": {"layers": "0-3", "d_sae": 512, "tokens": 50_000, "eval_tokens": 8192, "train_batch_size": 512,
            "per_site_tokens": 4096, "step_repeats": 3},
}
"""Issue 11's configurations a and b, and a reduced one for a CPU (13-16 minutes on 2 shared cores);
explicit options override them. At 30 layers one forward per site is 60 forwards and a CLT step takes
12-36 s on 2 CPU cores, so (a) caches a smaller per-site subset and times one step of each path."""
ARCHITECTURES = ("clt", "transcoder_set")
ACTIVATIONS = ("topk", "topk_across_layers", "batchtopk", "jumprelu", "relu")


def log(message: str) -> None:
    """A progress line (the figures come in the table at the end)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args() -> argparse.Namespace:
    """Command-line options, with the preset's sizes where none was given."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="issue 11's configuration: a (30 layers, F 1024, 100k tokens) or b (layers 0-7, "
                             "F 2048, 200k tokens), or cpu (layers 0-3, F 512, 50k tokens) [default: b on a GPU "
                             "(--device cuda), else cpu]")
    parser.add_argument("--layers", default=None, help="layers spanned: a range 0-7, a list 0,3,5 [preset]")
    parser.add_argument("--d_sae", type=int, default=None, help="latents per layer F [preset]")
    parser.add_argument("--k", type=int, default=32, help="TopK latents per layer and token (TopK family)")
    parser.add_argument("--activation", choices=ACTIVATIONS, default="topk")
    parser.add_argument("--input_site", choices=("mlp.input", "resid_mid"), default="mlp.input")
    parser.add_argument("--tokens", type=int, default=None, help="training token budget [preset]")
    parser.add_argument("--eval_tokens", type=int, default=None, help="held-out tokens evaluated [preset]")
    parser.add_argument("--per_site_tokens", type=int, default=None,
                        help="token subset of the caching comparison (one forward per site is 2L forwards) [preset]")
    parser.add_argument("--cache_dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--stream", action="store_true",
                        help="train on activations streamed from the LM (no cache; each dictionary re-runs the LM)")
    parser.add_argument("--ctx_len", type=int, default=256)
    parser.add_argument("--lm_batch_size", type=int, default=32, help="windows per LM forward")
    parser.add_argument("--train_batch_size", type=int, default=None, help="tokens per optimisation step [preset]")
    parser.add_argument("--lr", type=float, default=None, help="learning rate [default: saelab's auto_lr]")
    parser.add_argument("--step_repeats", type=int, default=None, help="timed dense/sparse steps (median) [preset]")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (LM, training and evaluation)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry_run", action="store_true", help="print sizes and memory; load and run nothing")
    parser.add_argument("--save_dir", type=Path, default=None,
                        help="save both trained dictionaries under DIR/clt and DIR/transcoder_set")
    parser.add_argument("--load_dir", type=Path, default=None,
                        help="load both dictionaries from a --save_dir of the same sizes and only evaluate them "
                             "(sections 3 and 4; no caching, training or step timing)")
    args = parser.parse_args()
    args.preset = args.preset or ("b" if str(args.device).startswith("cuda") else "cpu")
    preset = PRESETS[args.preset]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.layer_list = parse_layers([args.layers])
    except UsageError as exc:
        parser.error(str(exc))
    if args.save_dir and args.load_dir:
        parser.error("--save_dir and --load_dir: accepted: one of them (--load_dir trains nothing to save)")
    if args.load_dir:
        missing = [arch for arch in ARCHITECTURES if not (args.load_dir / arch).is_dir()]
        if missing:
            parser.error(f"--load_dir {args.load_dir}: no {', '.join(missing)} directory in it; accepted: a "
                         f"--save_dir of an earlier run")
    if args.layer_list[-1] >= N_LAYERS:
        parser.error(f"--layers {args.layers}: smollm2 has layers 0-{N_LAYERS - 1}")
    for name in ("d_sae", "k", "tokens", "eval_tokens", "per_site_tokens", "ctx_len", "lm_batch_size",
                 "train_batch_size", "step_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: accepted: a positive integer")
    return args


def dictionary_options(args: argparse.Namespace, decode: str = "auto") -> dict[str, Any]:
    """Architecture options shared by the CLT and the transcoder set."""
    return {"d_sae": args.d_sae, "k": args.k, "activation": args.activation, "input_site": args.input_site,
            "decode": decode}


def layer_sites(args: argparse.Namespace, architecture: str) -> tuple[list[str], list[str]]:
    """Input and output sites of ``architecture`` spanning ``args.layer_list`` (as ``saelab train --layers``)."""
    cls = registry("architecture").get(architecture)
    sites = cls.sites_for_layers(args.layer_list, cls.Options.parse(dictionary_options(args)))
    assert sites is not None
    return list(sites[0]), list(sites[1])


def build(args: argparse.Namespace, architecture: str, d: int) -> torch.nn.Module:
    """A fresh dictionary (seeded: both start from the same RNG state)."""
    inputs, outputs = layer_sites(args, architecture)
    torch.manual_seed(args.seed)
    return build_dictionary(architecture, SiteSpec(inputs, outputs, d, d), dictionary_options(args))


def parameter_count(args: argparse.Namespace, architecture: str, d: int) -> int:
    """Parameters of one dictionary (built on the meta device: nothing allocated)."""
    with torch.device("meta"):
        module = build(args, architecture, d)
    return sum(p.numel() for p in module.parameters())


def print_sizes(args: argparse.Namespace, d: int) -> None:
    """The sizes of this run: layers, widths, tokens, parameters, memory, cache."""
    L = len(args.layer_list)
    n_sites = 2 * L
    windows = n_windows_for(args.tokens, args.ctx_len)
    print(f"sizes: {MODEL}, layers {args.layers} (L={L}, {n_sites} sites, d={d}), F={args.d_sae} per layer "
          f"(d_sae {L * args.d_sae:,}), {args.activation} k={args.k}, input site {args.input_site}")
    print(f"  training tokens {args.tokens:,} ({windows} windows of {args.ctx_len}), train batch "
          f"{args.train_batch_size}, held-out eval tokens {args.eval_tokens:,}, per-site caching subset "
          f"{args.per_site_tokens:,} tokens, device {args.device}, "
          f"{'streamed from the LM' if args.stream else f'{args.cache_dtype} cache'}")
    for arch in ARCHITECTURES:
        params = parameter_count(args, arch, d)
        print(f"  {arch:15s} {params:>13,} parameters; weights + grads + Adam "
              f"{human_bytes(params * ADAM_BYTES_PER_PARAMETER)}")
    if not args.stream:
        size = cache_bytes([d] * n_sites, windows, args.ctx_len, args.cache_dtype)
        print(f"  activation cache of {n_sites} sites: {human_bytes(size)} ({args.cache_dtype})")


def cache_throughput(source: Any, dataset: Any, sites: list[str], args: argparse.Namespace,
                     store: Path) -> tuple[dict[str, float], Any]:
    """Tokens/s of one-forward caching (full budget and subset) and of one forward per site (subset); the
    full-budget cache (None with ``--stream``)."""
    figures: dict[str, float] = {}
    sub = n_windows_for(args.per_site_tokens, args.ctx_len) * args.ctx_len

    def timed_build(hookpoints: list[str], n_tokens: int, where: str) -> tuple[float, Any]:
        start = time.perf_counter()
        cache = build_activation_cache(source, dataset, hookpoints, n_tokens=n_tokens, ctx_len=args.ctx_len,
                                       batch_size=args.lm_batch_size, store=store / where, dtype=args.cache_dtype,
                                       progress=False)
        return time.perf_counter() - start, cache

    timed_build(sites[:1], args.ctx_len, "warmup")  # first forward, tokenizer and dataset reads: untimed
    seconds, _ = timed_build(sites, sub, "subset_all")
    figures["subset_one_forward"] = sub / seconds
    log(f"subset, all {len(sites)} sites in one forward: {sub / seconds:.0f} tokens/s")
    per_site = 0.0
    for i, hp in enumerate(sites):
        seconds, _ = timed_build([hp], sub, f"subset_site_{i}")  # a store per site: no covering cache reused
        per_site += seconds
    figures["subset_per_site"] = sub / per_site
    log(f"subset, one forward per site: {sub / per_site:.0f} tokens/s")
    cache = None
    if not args.stream:
        seconds, cache = timed_build(sites, args.tokens, "full")
        n = int(cache.manifest.get("n_tokens") or args.tokens)
        figures["full_one_forward"] = n / seconds
        figures["full_tokens"] = n
        log(f"full budget, all sites in one forward: {n / seconds:.0f} tokens/s ({n:,} tokens, "
            f"{human_bytes(cache.size_on_disk())})")
    return figures, cache


def train(args: argparse.Namespace, architecture: str, module: Any, make_source: Any,
          config: TrainerConfig) -> tuple[Any, float, int]:
    """Train ``module`` on a fresh stream from ``make_source``; (TrainResult, wall seconds of ``fit``, the
    trainer's dead-latent horizon in tokens)."""
    start = time.perf_counter()
    trainer = Trainer([DictionaryJob(name=architecture, module=module)], config, progress=False)
    (result,) = trainer.fit(make_source(), resume=False)
    return result, time.perf_counter() - start, trainer.dead_tokens


def step_times(module: Any, batch: dict[str, torch.Tensor], repeats: int, device: str,
               dead_mask: torch.Tensor | None = None) -> dict[str, float]:
    """Median seconds of forward + backward of ``module`` on ``batch`` with ``decode`` dense and sparse
    (with ``dead_mask``, the AuxK loss of those latents too, as in training)."""
    sites = module.sites
    x = torch.stack([batch[hp] for hp in sites.inputs], dim=1).float().to(device)
    y = torch.stack([batch[hp] for hp in sites.outputs], dim=1).float().to(device)
    module.train()
    original = module.options.decode
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    for round_ in range(repeats + 1):  # round 0 warms up
        for path in ("dense", "sparse"):
            module.options.decode = path
            module.zero_grad(set_to_none=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = module(x, y, dead_mask=dead_mask)
            sum(out.losses.values()).backward()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if round_:
                times[path].append(time.perf_counter() - start)
    module.options.decode = original
    module.zero_grad(set_to_none=True)
    module.eval()
    return {p: statistics.median(t) for p, t in times.items()}


def closed_loop_times(modules: dict[str, Any], source: Any, ids: torch.Tensor, device: str) -> dict[str, Any]:
    """Seconds of one closed-loop forward (LM and dictionary) on windows ``ids`` with each dictionary's own
    pass (each layer encoded once) and with the generic :class:`saelab.LayerReplacement` (the whole
    dictionary at every output site), and the largest difference of their reconstructions."""
    figures: dict[str, Any] = {}
    mask = torch.ones_like(ids, dtype=torch.bool)
    for arch, module in modules.items():
        module.eval()
        runs = {}
        closed_loop_forward(module, source, ids, mask, device=device)  # warm-up, untimed
        for path in ("own", "generic"):
            if path == "generic":
                module.layer_replacement = lambda x, y=None, m=module: LayerReplacement(m, x, y)
            start = time.perf_counter()
            runs[path] = closed_loop_forward(module, source, ids, mask, device=device)
            figures[f"{arch}_{path}"] = time.perf_counter() - start
            if path == "generic":
                del module.layer_replacement
        figures[f"{arch}_max_diff"] = float((runs["own"].reconstruction - runs["generic"].reconstruction).abs().max())
    return figures


def fmt(value: Any, spec: str = ".4f") -> str:
    """A figure, or '-' when missing."""
    return "-" if value is None else format(value, spec)


def print_table(args: argparse.Namespace, d: int, measured: dict[str, Any] | None,
                metrics: dict[str, dict[str, Any]], eval_tokens: int, loop_times: dict[str, Any],
                elapsed: float) -> None:
    """Every figure of the run, with its sizes (``measured``: sections 1 and 2, None with ``--load_dir``)."""
    print()
    print("=" * 100)
    print_sizes(args, d)
    print(f"  torch {torch.__version__}, {torch.get_num_threads()} threads; total wall time {elapsed:.0f} s")
    print()
    if measured is None:
        print(f"1-2. caching and training: not run (dictionaries loaded from {args.load_dir})")
    else:
        print_training(args, **measured)
    print_evaluation(args, metrics, eval_tokens)
    print()
    print(f"5. one closed-loop forward (LM + dictionary, {args.ctx_len} tokens): each layer encoded once vs the "
          f"whole dictionary at every output site (seconds)")
    for arch in ARCHITECTURES:
        own, generic = loop_times[f"{arch}_own"], loop_times[f"{arch}_generic"]
        print(f"  {arch:15s} {own:8.2f} vs {generic:8.2f}  ({generic / own:.2f}x); largest reconstruction "
              f"difference {loop_times[f'{arch}_max_diff']:.2e}")


def print_training(args: argparse.Namespace, caching: dict[str, float], trained: dict[str, Any],
                   steps: dict[str, float], density: float) -> None:
    """Sections 1 and 2: caching throughput, training tokens/s, dense vs sparse step time."""
    print("1. caching throughput (tokens/s)")
    n = 2 * len(args.layer_list)
    sub = n_windows_for(args.per_site_tokens, args.ctx_len) * args.ctx_len
    rows = [(f"all {n} sites in one forward, {sub:,}-token subset", caching["subset_one_forward"]),
            (f"one forward per site ({n} forwards), same subset", caching["subset_per_site"])]
    if "full_one_forward" in caching:
        rows.insert(0, (f"all {n} sites in one forward, full budget ({int(caching['full_tokens']):,} tokens)",
                        caching["full_one_forward"]))
    for label, rate in rows:
        print(f"  {label:62s} {rate:10.0f}")
    print(f"  one forward / one forward per site (subset): {caching['subset_one_forward'] / caching['subset_per_site']:.2f}x")
    print()
    print(f"2. training ({'LM streamed on the fly' if args.stream else 'from the cache'}, batch "
          f"{args.train_batch_size})")
    for arch in ARCHITECTURES:
        r, wall, _ = trained[arch]
        rate = r.history[-1]["tokens_per_s"] if r.history else None
        print(f"  {arch:15s} {r.steps:5d} steps, {r.tokens:,} tokens, {fmt(rate, '8.0f')} tokens/s in the loop "
              f"({r.tokens / wall:.0f} tokens/s over fit incl. init); final train FVU {fmt(r.metrics.get('fvu'))}, "
              f"L0 {fmt(r.metrics.get('l0'), '.1f')}, lr {r.lr:.2e}")
    print(f"  CLT step (fwd+bwd, batch {args.train_batch_size}, density {density:.2%}): dense "
          f"{steps['dense'] * 1e3:.1f} ms, sparse {steps['sparse'] * 1e3:.1f} ms; dense / sparse "
          f"{steps['dense'] / steps['sparse']:.2f}x (median of {args.step_repeats})")
    if "dense_auxk" in steps:
        print(f"  the same with AuxK on the {int(steps['dead']):,} latents dead at the end of training (as the trainer "
              f"steps): dense {steps['dense_auxk'] * 1e3:.1f} ms, sparse {steps['sparse_auxk'] * 1e3:.1f} ms; "
              f"dense / sparse {steps['dense_auxk'] / steps['sparse_auxk']:.2f}x")


def print_evaluation(args: argparse.Namespace, metrics: dict[str, dict[str, Any]], eval_tokens: int) -> None:
    """Sections 3 and 4: per-layer FVU and the replacement model, both dictionaries."""
    print()
    print(f"3. per-layer FVU on {eval_tokens:,} held-out tokens (positions the training left out excluded)")
    header = f"  {'layer':>5} | {'CLT open':>9} {'CLT closed':>10} {'CLT L0':>7} | {'TS open':>9} {'TS closed':>10} {'TS L0':>7}"
    print(header)
    print("  " + "-" * (len(header) - 2))
    clt, ts = metrics["clt"], metrics["transcoder_set"]
    for a, b in zip(clt["per_layer"], ts["per_layer"], strict=True):
        print(f"  {a['layer']:>5} | {fmt(a.get('fvu_open_loop')):>9} {fmt(a.get('fvu_closed_loop')):>10} "
              f"{fmt(a.get('l0_open_loop'), '.1f'):>7} | {fmt(b.get('fvu_open_loop')):>9} "
              f"{fmt(b.get('fvu_closed_loop')):>10} {fmt(b.get('l0_open_loop'), '.1f'):>7}")
    print(f"  {'all':>5} | {fmt(clt.get('fvu_open_loop')):>9} {fmt(clt.get('fvu_closed_loop')):>10} "
          f"{fmt(clt.get('l0_open_loop'), '.1f'):>7} | {fmt(ts.get('fvu_open_loop')):>9} "
          f"{fmt(ts.get('fvu_closed_loop')):>10} {fmt(ts.get('l0_open_loop'), '.1f'):>7}")
    print()
    print(f"4. replacement model, all {len(args.layer_list)} MLP outputs replaced (held-out tokens)")
    print(f"  CE clean {fmt(clt.get('ce_clean'))}, CE with all {len(args.layer_list)} MLP outputs zeroed "
          f"{fmt(clt.get('ce_zero'))}")
    print(f"  {'dictionary':15s} {'loop':12s} {'CE':>8} {'CE recovered':>13} {'KL':>8} {'top-1':>7}")
    for name, m in (("clt", clt), ("transcoder_set", ts)):
        for loop in ("closed_loop", "open_loop"):
            print(f"  {name:15s} {loop.replace('_', '-'):12s} {fmt(m.get(f'ce_{loop}')):>8} "
                  f"{fmt(m.get(f'ce_loss_recovered_{loop}')):>13} {fmt(m.get(f'kl_{loop}')):>8} "
                  f"{fmt(m.get(f'top1_{loop}')):>7}")
    print("  (closed-loop is the headline: each encoder reads the stream changed by the replaced layers below it)")


def train_both(args: argparse.Namespace, source: Any, dataset: Any, sites: list[str], d: int,
               config: TrainerConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sections 1 and 2: cache all sites, train the CLT and the transcoder set on the same stream (saved
    under ``--save_dir`` when given), time dense vs sparse steps; (the trained modules, their figures)."""
    excluded = config.exclude_positions
    with tempfile.TemporaryDirectory() as tmp:
        log(f"caching {len(sites)} sites")
        caching, cache = cache_throughput(source, dataset, sites, args, Path(tmp))

        if args.stream:
            spec = WindowSpec.for_tokenizer(source.tokenizer, args.ctx_len)
            max_windows = n_windows_for(args.tokens, args.ctx_len)

            def make_source() -> Any:
                lm = LMSource(source, lambda: iter_windows(dataset.texts(), source.tokenizer, spec,
                                                           max_windows=max_windows),
                              sites, lm_batch_size=args.lm_batch_size, exclude_positions=excluded)
                lm.n_rows = lm.count_rows()
                return lm
        else:
            def make_source() -> Any:
                return CacheSource(cache, sites, exclude_positions=excluded)

        trained: dict[str, Any] = {}
        modules: dict[str, Any] = {}
        for arch in ARCHITECTURES:
            log(f"training {arch}")
            modules[arch] = build(args, arch, d)
            trained[arch] = train(args, arch, modules[arch], make_source, config)
            log(f"{arch}: {trained[arch][0].steps} steps in {trained[arch][1]:.0f} s")
            if args.save_dir:
                save_dictionary(modules[arch], args.save_dir / arch)
                log(f"saved {arch} to {args.save_dir / arch}")

        log("timing dense vs sparse decode steps")
        batch = make_source().sample(args.train_batch_size, seed=args.seed)
        clt = modules["clt"]
        steps = step_times(clt, batch, args.step_repeats, args.device)
        result, _, dead_tokens = trained["clt"]
        dead_mask = None
        if result.tokens_since_fired is not None:
            dead_mask = (result.tokens_since_fired >= dead_tokens).to(args.device)
            steps_auxk = step_times(clt, batch, args.step_repeats, args.device, dead_mask)
            steps.update({f"{p}_auxk": t for p, t in steps_auxk.items()})
            steps["dead"] = float(dead_mask.sum())
        with torch.no_grad():
            x = torch.stack([batch[hp] for hp in clt.sites.inputs], dim=1).float().to(args.device)
            density = float((clt.encode(x) != 0).float().mean())
        del batch
    return modules, {"caching": caching, "trained": trained, "steps": steps, "density": density}


def main() -> None:
    """Parse the options, run the four measurements, print the table."""
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
    source = load_activation_source(MODEL, device=args.device)
    dataset = load_dataset_source("wikipedia-sample")
    source.identity()  # weights hash once, outside the timings
    inputs, outputs = layer_sites(args, "clt")
    sites = [hp for pair in zip(inputs, outputs, strict=True) for hp in pair]
    d = source.hookpoint_dim(inputs[0])
    excluded = model_exclusions(MODEL)
    config = TrainerConfig(batch_size=args.train_batch_size, lr=args.lr, seed=args.seed, device=args.device,
                           exclude_positions=excluded, checkpoint_every=0, checkpoint_every_minutes=0, log_every=5)

    measured: dict[str, Any] | None = None
    if args.load_dir:
        modules = {arch: load_dictionary(args.load_dir / arch, device=args.device) for arch in ARCHITECTURES}
        for arch, module in modules.items():
            expected = layer_sites(args, arch)
            if (list(module.sites.inputs), list(module.sites.outputs)) != expected:
                raise SystemExit(f"--load_dir {args.load_dir}: {arch} spans {list(module.sites.outputs)}; "
                                 f"accepted: a dictionary over {expected[1]} (the --layers and --input_site given)")
        log(f"loaded {', '.join(ARCHITECTURES)} from {args.load_dir}")
    else:
        modules, measured = train_both(args, source, dataset, sites, d, config)

    skip = skip_tokens_for(args.tokens, args.ctx_len)
    assert skip is not None
    eval_windows = n_windows_for(args.eval_tokens, args.ctx_len)
    log(f"evaluating both on {eval_windows} held-out windows (after the first {skip:,} stream tokens)")
    windows = list(heldout_windows(source, dataset, args.ctx_len, args.eval_tokens, skip))
    eval_config = EvalConfig(n_tokens=args.eval_tokens, ctx_len=args.ctx_len, batch_size=8, skip_tokens=skip,
                             device=args.device)
    start = time.perf_counter()
    metrics = evaluate(modules, source, windows, eval_config)
    log(f"evaluated in {time.perf_counter() - start:.0f} s; timing one closed-loop forward of each")
    loop_times = closed_loop_times(modules, source, windows[0][None], args.device)
    print_table(args, d, measured, metrics, len(windows) * args.ctx_len, loop_times, time.perf_counter() - started)


if __name__ == "__main__":
    main()
