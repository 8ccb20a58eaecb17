"""Benchmark of the activation cache at ``layers.15`` of the embedded SmolLM2 (prints figures).

1. Throughput over the same batches (wikipedia-sample windows of ``--ctx_len`` tokens):
   a. a plain transformers forward of all layers (``model(ids, output_hidden_states=True)``),
   b. a bare forward stopped after layer 15, nothing written (``source.activations``),
   c. ``build_activation_cache`` into a fresh store (tokenising, forward, shard writing, sha256).
   Targets: c >= 1.8 x a, and c within 15% of b. Methods are interleaved over ``--repeats`` rounds
   and the best round of each is reported (the machine may be shared).
2. Peak RSS of ``saelab cache smollm2 --hookpoints layers.15`` at 50k and 400k tokens, each in its
   own subprocess (``os.wait4`` rusage of that child), ``--rss_repeats`` times each, interleaved.
   Target: the medians within 10% of each other. These runs come first, while this process is
   small: a child's ``ru_maxrss`` starts from its parent's RSS at the fork, so a parent holding a
   model would inflate them.

Usage: ``.venv/bin/python bench/cache_throughput.py [--tokens 16384] [--rss 50000 400000] [--rss_repeats 3] [--skip_rss]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOOKPOINT = "layers.15"


def throughput(n_tokens: int, ctx_len: int, batch_size: int, repeats: int) -> dict[str, float]:
    """Best tokens/s of the three methods over ``repeats`` interleaved rounds."""
    import torch
    from saelab.activation_cache import build_activation_cache
    from saelab.data import WindowSpec, iter_windows, load_dataset_source, n_windows_for
    from saelab.models import load_activation_source

    source = load_activation_source("smollm2", device="cpu")
    dataset = load_dataset_source("wikipedia-sample")
    spec = WindowSpec.for_tokenizer(source.tokenizer, ctx_len)
    windows = list(iter_windows(dataset.texts(), source.tokenizer, spec, max_windows=n_windows_for(n_tokens, ctx_len)))
    batches = [torch.stack(windows[i:i + batch_size]) for i in range(0, len(windows), batch_size)]
    tokens = sum(b.numel() for b in batches)
    model = source.model
    source.identity()  # weights hash computed once, outside the timings
    with torch.no_grad():
        model(batches[0][:1])  # warm-up

    def full() -> None:
        with torch.no_grad():
            for ids in batches:
                out = model(ids, output_hidden_states=True, use_cache=False)
                out.hidden_states[16].clone()

    def bare() -> None:
        for ids in batches:
            source.activations(ids, [HOOKPOINT])

    def cache() -> None:
        with tempfile.TemporaryDirectory() as store:
            build_activation_cache(source, dataset, [HOOKPOINT], n_tokens=tokens, ctx_len=ctx_len,
                                   batch_size=batch_size, store=Path(store), progress=False)

    best = {"full forward (all layers)": 0.0, "bare forward to layers.15": 0.0, "saelab cache": 0.0}
    for round_ in range(repeats):
        for name, fn in zip(best, (full, bare, cache), strict=True):
            start = time.perf_counter()
            fn()
            rate = tokens / (time.perf_counter() - start)
            best[name] = max(best[name], rate)
            print(f"  round {round_ + 1}: {name:28s} {rate:8.0f} tokens/s", flush=True)
    return best


def own_rss_mib() -> float:
    """This process's current RSS in MiB."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss(n_tokens: int, ctx_len: int, batch_size: int, hookpoint: str = HOOKPOINT) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one ``saelab cache`` subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "SAELAB_RESULTS_DIR": tmp, "SAELAB_PROGRESS": "0"}
        args = [sys.executable, "-m", "saelab", "cache", "smollm2", "--hookpoints", hookpoint, "--n_tokens",
                str(n_tokens), "--cache_ctx_len", str(ctx_len), "--batch_size", str(batch_size),
                "--name", "bench", "--verbose", "false"]
        start = time.perf_counter()
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"saelab cache failed: {proc.stderr.read().decode() if proc.stderr else ''}")
        return usage.ru_maxrss / 1024, elapsed


def main() -> None:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per throughput round")
    parser.add_argument("--ctx_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rss", type=int, nargs=2, default=[50_000, 400_000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--rss_hookpoint", default=HOOKPOINT,
                        help="hookpoint of the RSS runs (an early layer makes them fast; memory is the same)")
    parser.add_argument("--rss_repeats", type=int, default=3,
                        help="runs per size (a forward pass's transient peak varies by about 100 MiB run to run)")
    parser.add_argument("--skip_throughput", action="store_true")
    parser.add_argument("--skip_rss", action="store_true")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; this process holds {own_rss_mib():.0f} MiB before the RSS runs", flush=True)
    if not args.skip_rss:
        small, large = args.rss
        hp = args.rss_hookpoint
        peaks: dict[int, list[float]] = {small: [], large: []}
        for round_ in range(args.rss_repeats):
            for n in (small, large):
                rss, seconds = peak_rss(n, args.ctx_len, args.batch_size, hp)
                peaks[n].append(rss)
                print(f"  round {round_ + 1}: peak RSS of saelab cache at {hp}, {n} tokens: {rss:.0f} MiB "
                      f"({seconds:.0f} s)", flush=True)
        med_small, med_large = statistics.median(peaks[small]), statistics.median(peaks[large])
        print(f"median peak RSS: {med_small:.0f} MiB at {small} tokens, {med_large:.0f} MiB at {large} tokens")
        print(f"  ratio of medians {med_large / med_small:.3f} (target within 10%); largest {large}-token peak "
              f"over smallest {small}-token peak {max(peaks[large]) / min(peaks[small]):.3f}", flush=True)
    if not args.skip_throughput:
        import torch

        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(f"throughput at {HOOKPOINT} of smollm2, {args.tokens} tokens, ctx {args.ctx_len}, batch {args.batch_size}:")
        best = throughput(args.tokens, args.ctx_len, args.batch_size, args.repeats)
        full, bare, cache = best.values()
        for name, rate in best.items():
            print(f"  best {name:28s} {rate:8.0f} tokens/s")
        print(f"  cache / full forward = {cache / full:.2f}x (target >= 1.8x)")
        print(f"  cache / bare forward = {cache / bare:.2f} (target >= 0.85: writing costs {100 * (1 - cache / bare):.1f}%)")

if __name__ == "__main__":
    main()
