"""Peak disk and peak RSS of ``saelab run`` on the embedded SmolLM2, next to the dense activation cache it
no longer writes.

Trains a small TopK dictionary first (``saelab train smollm2 --on_the_fly``, in its own results tree), then
for each token count runs the real CLI in a fresh interpreter and a fresh results tree::

    python -m saelab run smollm2 DICT --hookpoints HOOK --n_tokens N --dry_run --max_latents 1 ...

``--dry_run`` stops after the latent cache, the example records and the printed plan: no LLM is loaded or
called (an OpenAI-compatible provider at an unreachable URL is named only so that nothing loads), so the
figures are those of the latent stage. A thread sums the allocated bytes (``st_blocks``) of the run
directory and the activation store every ~50 ms for the PEAK disk used during the run; the child's peak RSS
comes from ``os.wait4``. The dense cache the run no longer writes is computed (``n_sequences * ctx_len *
d_model * 4`` bytes of float32 activations + ``n_sequences * ctx_len * 4`` bytes of int32 tokens) and,
unless ``--no_measure``, measured once by running ``saelab cache`` with the same settings at the smallest
size. No assertion: it prints figures::

    .venv/bin/python bench/run_disk.py [--sizes 50000 200000] [--hookpoint layers.15] [--dictionary DIR]

The default sizes are 50k and 200k tokens: on 2 idle CPU cores the two runs take about 76 s and 203 s after
a 54 s training of the dictionary (give smaller ``--sizes`` on a loaded machine).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2"
D_MODEL = 576
"""Residual width of SmolLM2-135M."""


def disk_bytes(paths: list[Path]) -> int:
    """Allocated bytes of every file under ``paths`` (files may vanish while walking)."""
    total = 0
    for root in paths:
        for folder, _dirs, files in os.walk(root):
            for name in files:
                try:
                    total += os.lstat(os.path.join(folder, name)).st_blocks * 512
                except OSError:
                    pass
    return total


class DiskSampler(threading.Thread):
    """Samples :func:`disk_bytes` of ``paths`` every ``interval_s`` until stopped; keeps the peak."""

    def __init__(self, paths: list[Path], interval_s: float = 0.05):
        super().__init__(daemon=True)
        self.paths, self.interval_s = paths, interval_s
        self.peak = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, disk_bytes(self.paths))
            self.samples += 1
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        """Stop sampling and take one last sample."""
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, disk_bytes(self.paths))


def saelab(args: list[str], results: Path, paths: list[Path] | None = None) -> dict[str, float]:
    """Run ``python -m saelab ARGS`` with ``SAELAB_RESULTS_DIR=results``; seconds, peak RSS (MiB) and,
    when ``paths`` are given, the peak disk of ``paths`` during the run."""
    env = {**os.environ, "SAELAB_RESULTS_DIR": str(results), "OPENAI_API_KEY": "sk-bench-never-used",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    sampler = DiskSampler(paths) if paths is not None else None
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen([sys.executable, "-m", "saelab", *args], env=env, stdout=out, stderr=subprocess.STDOUT)
        if sampler is not None:
            sampler.start()
        _pid, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        if sampler is not None:
            sampler.stop()
        if proc.returncode != 0:
            out.seek(0)
            sys.exit(f"saelab {' '.join(args)} exited {proc.returncode}:\n{out.read().decode(errors='replace')[-4000:]}")
    result = {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024}
    if sampler is not None:
        result.update(peak_disk=sampler.peak, samples=sampler.samples)
    return result


def train_dictionary(work: Path, hookpoint: str, tokens: int, d_sae: int, k: int) -> Path:
    """A small TopK dictionary trained on the fly (no activation cache), in its own results tree."""
    results = work / "train_results"
    saelab(["train", MODEL, "--hookpoints", hookpoint, "--architecture", "topk", "-o", "d_sae", str(d_sae),
            "-o", "k", str(k), "--on_the_fly", "--n_tokens", str(tokens), "--init_rows", str(min(tokens, 4096)),
            "--train_batch_size", "1024", "--epochs", "1", "--name", "bench", "--verbose", "false"],
           results)
    found = sorted((results / "bench" / "dictionaries").glob("*/cfg.json"))
    if len(found) != 1:
        sys.exit(f"expected one trained dictionary under {results / 'bench'}, found {len(found)}")
    return found[0].parent


def mib(n: float) -> str:
    """``n`` bytes in MiB."""
    return f"{n / 2**20:,.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000])
    parser.add_argument("--hookpoint", default="layers.15")
    parser.add_argument("--ctx_len", type=int, default=256)
    parser.add_argument("--dictionary", type=Path, default=None, help="Use this dictionary instead of training one.")
    parser.add_argument("--train_tokens", type=int, default=16_384)
    parser.add_argument("--d_sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--no_measure", action="store_true", help="Do not run `saelab cache` to measure the dense cache.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="saelab-run-disk-") as tmp:
        work = Path(tmp)
        if args.dictionary is None:
            started = time.perf_counter()
            dictionary = train_dictionary(work, args.hookpoint, args.train_tokens, args.d_sae, args.k)
            print(f"trained {dictionary.name} (TopK d_sae {args.d_sae}, k {args.k}) on {args.train_tokens:,} tokens "
                  f"in {time.perf_counter() - started:.0f} s", flush=True)
        else:
            dictionary = args.dictionary.resolve()
        rows = []
        for n in args.sizes:
            results = work / f"run_{n}"
            store = results / ".activations"
            run_args = ["run", MODEL, str(dictionary), "--hookpoints", args.hookpoint, "--n_tokens", str(n),
                        "--cache_ctx_len", str(args.ctx_len), "--name", "bench", "--dry_run", "--max_latents", "1",
                        "--min_examples", "1", "--scorers", "detection", "--explainer_provider", "openai",
                        "--explainer_model", "none", "--explainer_api_base_url", "http://127.0.0.1:1/v1",
                        "--num_gpus", "0", "--verbose", "false"]
            row = saelab(run_args, results, [results / "bench", store])
            n_seq = -(-n // args.ctx_len)
            row.update(n_tokens=n_seq * args.ctx_len, final_disk=disk_bytes([results / "bench", store]),
                       store_files=sum(1 for p in store.rglob("*") if p.is_file()) if store.exists() else 0,
                       dense=n_seq * args.ctx_len * (D_MODEL * 4 + 4))
            rows.append(row)
            print(f"{n:,} tokens: {row['seconds']:.0f} s", flush=True)
        measured = None
        if not args.no_measure:
            n = args.sizes[0]
            results = work / "cache_measure"
            saelab(["cache", MODEL, "--hookpoints", args.hookpoint, "--n_tokens", str(n), "--cache_ctx_len",
                    str(args.ctx_len), "--name", "measure", "--verbose", "false"], results)
            measured = (n, disk_bytes([results / ".activations"]))

    print()
    print(f"saelab run {MODEL} <TopK dictionary> --hookpoints {args.hookpoint} --dry_run (latents + records, "
          f"no LLM), ctx_len {args.ctx_len}, CPU")
    print(f"{'tokens':>9} {'seconds':>8} {'peak disk':>12} {'final disk':>12} {'store files':>11} {'peak RSS':>12} "
          f"{'dense cache not written':>24}")
    for r in rows:
        print(f"{r['n_tokens']:>9,} {r['seconds']:>8.0f} {mib(r['peak_disk']):>12} {mib(r['final_disk']):>12} "
              f"{r['store_files']:>11} {mib(r['peak_rss_mib'] * 2**20):>12} {mib(r['dense']):>24}")
    print(f"(disk sampled every ~50 ms: {', '.join(str(r['samples']) for r in rows)} samples; dense cache = "
          f"tokens x ({D_MODEL} x 4 B float32 + 4 B int32 token))")
    if measured is not None:
        n, size = measured
        computed = next(r["dense"] for r in rows if r is rows[0])
        print(f"measured: `saelab cache` of the same settings at {n:,} tokens writes {mib(size)} "
              f"(computed {mib(computed)})")


if __name__ == "__main__":
    main()
