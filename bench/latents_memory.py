"""Peak RSS of building a latent cache at two token counts: memory must stay flat in n_tokens.

Runs each size in a fresh interpreter (tiny GPT-2 fixture, TopK dictionary d_sae 4096, k 32, Lee corpus
repeated as needed) and prints peak RSS, nonzeros stored and throughput::

    .venv/bin/python bench/latents_memory.py [--sizes 40000 160000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {tests!r})
import torch
from fixtures.tiny_models import TINY_GPT2, lee_corpus
from latents_helpers import ListDataset
from saelab.dictionary import build_dictionary
from saelab.latents import build_latent_cache
from saelab.models import load_activation_source

n_tokens, out = int(sys.argv[1]), sys.argv[2]
source = load_activation_source(str(TINY_GPT2))
torch.manual_seed(0)
d = build_dictionary("topk", {{"inputs": ["layers.1"], "outputs": ["layers.1"], "d_in": 64, "d_out": 64}},
                     {{"d_sae": 4096, "k": 32}}).eval()
texts = lee_corpus() * 40
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
cache = build_latent_cache(source, d, out, dataset=ListDataset(texts), n_tokens=n_tokens, ctx_len=256,
                           n_splits=5, batch_size=16, flush_nonzeros=1_000_000, progress=False)
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"n_tokens": cache.n_tokens, "nonzeros": cache.manifest["n_nonzeros"],
                  "chunks": len(cache.manifest["chunks"]), "peak_rss_mib": peak / 1024,
                  "rss_before_build_mib": base / 1024, "seconds": dt}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[40_000, 160_000])
    args = parser.parse_args()
    code = CHILD.format(tests=str(ROOT / "tests"))
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run([sys.executable, "-c", code, str(n), str(Path(tmp) / "lat")], capture_output=True,
                                  text=True, check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{'tokens':>10} {'nonzeros':>12} {'chunks':>7} {'RSS before':>11} {'peak RSS':>10} {'tok/s':>9}")
    for r in rows:
        print(f"{r['n_tokens']:>10,} {r['nonzeros']:>12,} {r['chunks']:>7} {r['rss_before_build_mib']:>9.0f}Mi "
              f"{r['peak_rss_mib']:>8.0f}Mi {r['n_tokens'] / r['seconds']:>9,.0f}")
    grow = rows[-1]["peak_rss_mib"] - rows[0]["peak_rss_mib"]
    ratio = rows[-1]["nonzeros"] / max(1, rows[0]["nonzeros"])
    print(f"nonzeros x{ratio:.1f}; peak RSS grew {grow:+.0f} MiB "
          f"(holding every nonzero in RAM would need {rows[-1]['nonzeros'] * 12 / 2**20:.0f} MiB at the larger size)")


if __name__ == "__main__":
    main()
