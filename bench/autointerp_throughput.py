"""Auto-interp throughput: 20 latents x (explain + detection + fuzz) against a local OpenAI-compatible
server that waits 200 ms per request, at concurrency 16 vs 1; then a second run that must make zero
requests (everything reused from disk).

    .venv/bin/python bench/autointerp_throughput.py [--latents 20] [--delay 0.2] [--concurrency 16]

Prints latents/s for each setting, the speed-up (target >= 10x) and the second run's request count.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from interp_helpers import make_record  # noqa: E402
from llm_server import ScriptedLLMServer  # noqa: E402
from pipeline_helpers import SmartHandler  # noqa: E402


def records(n: int) -> list:
    """``n`` hand-made latent records (7 test + 6 non-activating examples: 3 prompts per scorer)."""
    out = []
    for i in range(n):
        r = make_record()
        r.latent = i
        out.append(r)
    return out


def one_run(server: ScriptedLLMServer, root: Path, n: int, concurrency: int) -> tuple[float, int]:
    """Seconds and requests of one explain + detection + fuzz run into ``root``."""
    from saelab.llm import make_provider
    from saelab.pipeline import AutoInterp, RunLayout, make_explainer, make_scorers

    provider = make_provider("openai", model="test-model", base_url=server.base_url, cache=False,
                             max_concurrency=concurrency, max_retries=0, timeout_s=30)
    engine = AutoInterp(RunLayout(root), make_explainer("default"), make_scorers(["detection", "fuzz"]), provider,
                        progress=False)
    server.reset()
    start = time.perf_counter()
    engine.run(records(n))
    return time.perf_counter() - start, len(server.chat_requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, default=20)
    parser.add_argument("--delay", type=float, default=0.2, help="server wait per request (s)")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench-not-a-secret")
    with ScriptedLLMServer(SmartHandler(delay_s=args.delay)) as server, tempfile.TemporaryDirectory() as tmp:
        fast_s, fast_req = one_run(server, Path(tmp) / "fast", args.latents, args.concurrency)
        again_s, again_req = one_run(server, Path(tmp) / "fast", args.latents, args.concurrency)
        slow_s, slow_req = one_run(server, Path(tmp) / "slow", args.latents, 1)
        print(f"server wait per request: {args.delay * 1000:.0f} ms; {args.latents} latents x "
              f"(explain + detection + fuzz) = {fast_req} requests")
        print(f"concurrency {args.concurrency:>2}: {fast_s:6.2f} s  {args.latents / fast_s:6.2f} latents/s  "
              f"max in flight {args.concurrency}")
        print(f"concurrency  1: {slow_s:6.2f} s  {args.latents / slow_s:6.2f} latents/s  ({slow_req} requests)")
        print(f"speed-up: {slow_s / fast_s:.1f}x (target >= 10x)")
        print(f"second run: {again_req} requests, {again_s:.2f} s (target: 0 requests)")


if __name__ == "__main__":
    main()
