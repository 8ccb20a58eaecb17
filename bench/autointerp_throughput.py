"""Auto-interp throughput against a local OpenAI-compatible server that waits 200 ms per request.

1. saelab, 20 latents x (explain + detection + fuzz), at concurrency 16 vs 1 (target: >= 10x faster), with
   small records (4 train, 7 test, 6 non-activating examples: 3 prompts per scorer and latent);
2. the same command again: it must make zero requests (everything reused from disk);
3. side by side with delphi (eai-delphi 0.1.3 in a side venv), explain + detection on the same server and
   latents, both with delphi's default example counts (40 train; 50 activating test + 50 non-activating,
   ``num_examples_per_scorer_prompt`` 5: 20 detection prompts per latent). delphi runs as its CLI runs it
   with OpenRouter (``__main__`` forces ``pipeline_num_proc = 1``: one latent at a time) and with its
   ``Pipeline`` at ``max_concurrent`` 16 and = the number of latents (all latents at once: its best; each
   latent's prompts still go one at a time, so it never has more requests in flight than latents); saelab
   runs at request concurrency 16 and at a higher one that the server takes (default 128: half vLLM's
   default ``max_num_seqs`` of 256, and the test server's listen backlog; past it that threaded server, not
   the client, is the limit on a small machine). Each run prints latents/s, the most requests the server saw
   in flight, and failed / parsed predictions.
   Headline (target >= 3x): saelab at the higher concurrency against delphi's best variant -- same server,
   latents and example counts, each tool at its best setting for a server that accepts many concurrent
   requests (like vLLM). The equal-cap ratio (both at most 16 in flight) is printed too.

The server runs in a child process (its own GIL), so it does not take CPU from the client being measured;
it answers each request on its own thread (any number in flight).

    .venv/bin/python bench/autointerp_throughput.py [--latents 20] [--delay 0.2] [--concurrency 16]
        [--high-concurrency 128] [--delphi-venv /tmp/delphivenv] [--no-delphi] [--no-delphi-cli]

The side venv is created when missing (``python3 -m venv``, ``pip install torch==2.13.0``, ``pip install
--no-deps eai-delphi==0.1.3``, then each module delphi fails to import, until it imports); delphi imports
``vllm`` at import time, so a stub ``vllm`` package (never used: the OpenRouter client talks HTTP) is put on
its path. When the venv cannot be set up, the delphi part is skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
TESTS = BENCH.parent / "tests"
sys.path.insert(0, str(TESTS))

from llm_server import Reply, ScriptedLLMServerProcess  # noqa: E402

DELPHI_VERSION = "0.1.3"
SMALL = {"train": 4, "test": 7, "non": 6}
"""Example counts of the concurrency-16-vs-1 section (3 prompts per scorer and latent)."""
DELPHI_DEFAULTS = {"train": 40, "test": 50, "non": 50}
"""delphi 0.1.3's defaults: ``n_examples_train``, ``n_examples_test``, ``n_non_activating``."""
PER_PROMPT = 5
"""``num_examples_per_scorer_prompt`` (delphi's default) for both tools."""
TORCH_VERSION = "2.13.0"
_EXAMPLE = re.compile(r"^Example (\d+):", re.MULTILINE)
_MODULE_TO_PACKAGE = {"faiss": "faiss-cpu", "sklearn": "scikit-learn", "yaml": "pyyaml", "PIL": "pillow"}
_DELPHI_IMPORTS = "import delphi.clients, delphi.explainers, delphi.scorers, delphi.latents, delphi.pipeline"
_VLLM_STUB = {
    "vllm/__init__.py": '"""Stub: delphi imports vllm at import time; its vLLM client is never used here."""\n'
                        "class LLM:\n    pass\n\n\nclass SamplingParams:\n    pass\n",
    "vllm/inputs.py": "class TokensPrompt(dict):\n    pass\n",
    "vllm/distributed/__init__.py": "",
    "vllm/distributed/parallel_state.py": "def destroy_distributed_environment():\n    pass\n\n\n"
                                          "def destroy_model_parallel():\n    pass\n",
}


class BenchHandler:
    """Answers explainer prompts (system prompt asks for ``[EXPLANATION]:``, saelab's and delphi's alike) with
    an explanation, and scorer prompts with a 0/1 list, one entry per ``Example N:`` line; every answer
    waits ``delay_s``."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s

    def __call__(self, request: dict[str, Any]) -> Reply:
        messages = request["messages"]
        system = next((str(m["content"]) for m in messages if m.get("role") == "system"), "")
        if "[EXPLANATION]" in system:
            return Reply(text="[EXPLANATION]: the word cat", delay_s=self.delay_s)
        n = len(_EXAMPLE.findall(str(messages[-1]["content"])))
        return Reply(text="[" + ",".join("1" if i % 2 == 0 else "0" for i in range(n)) + "]", delay_s=self.delay_s)


def records(n: int, counts: dict[str, int]) -> list:
    """``n`` hand-made latent records with ``counts`` (``train``, ``test``, ``non``) examples."""
    from interp_helpers import make_record

    out = []
    for i in range(n):
        r = make_record(n_test=counts["test"], n_non=counts["non"], n_train=counts["train"])
        r.latent = i
        out.append(r)
    return out


def saelab_run(server: ScriptedLLMServerProcess, root: Path, n: int, concurrency: int,
               scorers: tuple[str, ...] = ("detection", "fuzz"), counts: dict[str, int] = SMALL) -> dict[str, Any]:
    """Seconds, requests, the most requests in flight, failed stages, and parsed / all predictions (read back
    from the score files) of one saelab explain + ``scorers`` run into ``root``."""
    from saelab.layout import RunLayout
    from saelab.llm import make_provider
    from saelab.pipeline import AutoInterp, make_explainer, make_scorers
    from saelab.records import ScoreResult

    layout = RunLayout(root)
    provider = make_provider("openai", model="test-model", base_url=server.base_url, cache=False,
                             max_concurrency=concurrency, max_retries=0, timeout_s=30)
    engine = AutoInterp(layout, make_explainer("default"),
                        make_scorers(list(scorers), {"num_examples_per_scorer_prompt": PER_PROMPT}), provider,
                        progress=False)
    batch = records(n, counts)
    server.reset()
    start = time.perf_counter()
    report = engine.run(batch)
    seconds = time.perf_counter() - start
    stats = server.stats()
    failed = report.explain.failed + report.explain.crashed + sum(
        s.failed + s.crashed for s in report.scores.values())
    for line in report.errors[:5]:
        print(f"  ! {line}")
    predictions = [p for name in scorers for r in batch
                   if layout.score_path(name, r.hookpoint, r.latent).is_file()
                   for p in ScoreResult.load(layout.score_path(name, r.hookpoint, r.latent)).predictions]
    return {"seconds": seconds, "requests": stats["chat_requests"], "max_in_flight": stats["max_in_flight"],
            "failed": failed, "explained": n - report.explain.failed - report.explain.crashed,
            "predictions": sum(p.prediction is not None for p in predictions), "samples": len(predictions)}


# --------------------------------------------------------------------------------------------------- delphi


def _missing_module(python: Path, stub: Path) -> tuple[str | None, str]:
    """The top-level module delphi fails to import (None when it imports), and the error's last line."""
    proc = subprocess.run([str(python), "-c", _DELPHI_IMPORTS], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(stub)})
    if proc.returncode == 0:
        return None, ""
    last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    match = re.search(r"No module named '([^'.]+)", last)
    return (match.group(1) if match else ""), last


def ensure_delphi_venv(venv: Path) -> tuple[Path | None, Path, str]:
    """(python of the side venv or None, the vllm stub dir, why not) -- sets the venv up when needed."""
    stub = venv / "vllm_stub"
    for rel, text in _VLLM_STUB.items():
        path = stub / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    python = venv / "bin" / "python"

    def pip(*args: str) -> subprocess.CompletedProcess[str]:
        print(f"  [delphi venv] pip install {' '.join(args)}", flush=True)
        return subprocess.run([str(python), "-m", "pip", "install", "-q", *args], capture_output=True, text=True,
                              timeout=1800)

    try:
        if not python.exists():
            print(f"  [delphi venv] creating {venv}", flush=True)
            subprocess.run(["python3", "-m", "venv", str(venv)], check=True, capture_output=True, timeout=600)
            stub.mkdir(parents=True, exist_ok=True)
            for rel, text in _VLLM_STUB.items():
                (stub / rel).parent.mkdir(parents=True, exist_ok=True)
                (stub / rel).write_text(text)
        check = subprocess.run([str(python), "-c", "import torch, delphi; print(delphi.__version__)"],
                               capture_output=True, text=True, timeout=600)
        if check.returncode != 0 or check.stdout.strip() != DELPHI_VERSION:
            for args in ((f"torch=={TORCH_VERSION}",), ("--no-deps", f"eai-delphi=={DELPHI_VERSION}")):
                proc = pip(*args)
                if proc.returncode != 0:
                    return None, stub, f"pip install {' '.join(args)} failed: {proc.stderr.strip()[-300:]}"
        tried: set[str] = set()
        for _ in range(40):
            module, error = _missing_module(python, stub)
            if module is None:
                return python, stub, ""
            if not module or module in tried:
                return None, stub, f"delphi does not import: {error}"
            tried.add(module)
            proc = pip(_MODULE_TO_PACKAGE.get(module, module))
            if proc.returncode != 0:
                return None, stub, f"cannot install {module!r}: {proc.stderr.strip()[-300:]}"
        return None, stub, "delphi still misses modules after 40 installs"
    except (OSError, subprocess.SubprocessError) as exc:
        return None, stub, f"{type(exc).__name__}: {exc}"


def delphi_run(python: Path, stub: Path, server: ScriptedLLMServerProcess, root: Path, n: int,
               concurrency: int, counts: dict[str, int] = DELPHI_DEFAULTS) -> dict[str, Any]:
    """delphi's explain + detection on ``n`` latents (``bench/delphi_driver.py`` in the side venv)."""
    server.reset()
    proc = subprocess.run(
        [str(python), str(BENCH / "delphi_driver.py"), server.base_url, "--latents", str(n),
         "--concurrency", str(concurrency), "--train", str(counts["train"]), "--test", str(counts["test"]),
         "--non", str(counts["non"]), "--per-prompt", str(PER_PROMPT), "--out", str(root)],
        capture_output=True, text=True, timeout=1800, env={**os.environ, "PYTHONPATH": str(stub)},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"delphi driver failed: {proc.stderr.strip()[-500:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    stats = server.stats()
    result.update(requests=stats["chat_requests"], max_in_flight=stats["max_in_flight"])
    return result


# --------------------------------------------------------------------------------------------------- main


def _line(label: str, run: dict[str, Any], n: int) -> str:
    failed = f"  {run['failed']} failed stages" if run.get("failed") else ""
    return (f"{label:<46} {run['seconds']:7.2f} s  {n / run['seconds']:6.2f} latents/s  "
            f"{run['requests']:4d} requests  max in flight {run['max_in_flight']:3d}{failed}")


def _outcome(run: dict[str, Any], n: int) -> str:
    return (f"      explained {run['explained']}/{n}; detection predictions parsed {run['predictions']}"
            f"/{run['samples']}, failed {run['samples'] - run['predictions']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, default=20)
    parser.add_argument("--delay", type=float, default=0.2, help="server wait per request (s)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--high-concurrency", type=int, default=128,
                        help="saelab's second request concurrency in the side by side")
    parser.add_argument("--delphi-venv", type=Path, default=Path(tempfile.gettempdir()) / "delphivenv",
                        help="side venv for eai-delphi (created when missing)")
    parser.add_argument("--no-delphi", action="store_true", help="skip the delphi side-by-side")
    parser.add_argument("--no-delphi-cli", action="store_true",
                        help="skip delphi as its CLI runs it (one latent at a time: the slowest run)")
    args = parser.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench-not-a-secret")
    n, c, high = args.latents, args.concurrency, args.high_concurrency
    print(f"server (child process) waits {args.delay * 1000:.0f} ms per request, any number in flight; "
          f"{n} latents", flush=True)
    with ScriptedLLMServerProcess(BenchHandler, args.delay) as server, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # warm-up (not timed): imports saelab, torch and openai, and builds the prompt templates, so that the
        # first timed run does not pay one-off start-up costs the later ones do not
        saelab_run(server, root / "warm-up", 2, c)
        print(f"\n1. saelab, explain + detection + fuzz; {SMALL['train']} train / {SMALL['test']} test / "
              f"{SMALL['non']} non-activating examples, {PER_PROMPT} per scorer prompt", flush=True)
        fast = saelab_run(server, root / "fast", n, c)
        print(_line(f"  concurrency {c}", fast, n), flush=True)
        again = saelab_run(server, root / "fast", n, c)
        slow = saelab_run(server, root / "slow", n, 1)
        print(_line("  concurrency 1", slow, n), flush=True)
        print(f"  speed-up: {slow['seconds'] / fast['seconds']:.1f}x (target >= 10x)")
        print(f"\n2. second run of the same command: {again['requests']} requests, {again['seconds']:.2f} s "
              f"(target: 0 requests)", flush=True)

        d = DELPHI_DEFAULTS
        prompts = -(-(d["test"] + d["non"]) // PER_PROMPT)
        print(f"\n3. side by side, explain + detection; both tools: {n} latents, delphi's default counts "
              f"({d['train']} train / {d['test']} test / {d['non']} non-activating, {PER_PROMPT} per prompt: "
              f"1 + {prompts} requests per latent)", flush=True)
        ours = {}
        for conc in dict.fromkeys((c, high)):
            ours[conc] = saelab_run(server, root / f"side{conc}", n, conc, ("detection",), DELPHI_DEFAULTS)
            print(_line(f"  saelab, request concurrency {conc}", ours[conc], n), flush=True)
            print(_outcome(ours[conc], n), flush=True)
        if args.no_delphi:
            print("  delphi: skipped (--no-delphi)")
            return
        python, stub, why = ensure_delphi_venv(args.delphi_venv)
        if python is None:
            print(f"  delphi: skipped ({why})")
            return
        theirs: dict[str, dict[str, Any]] = {}
        variants = [(f"Pipeline max_concurrent {k}", k) for k in dict.fromkeys((c, n))]
        if not args.no_delphi_cli:
            variants.insert(0, ("as its CLI runs it (1 latent at once)", 1))
        try:
            for label, k in variants:
                theirs[label] = delphi_run(python, stub, server, root / f"delphi-{k}", n, k)
                print(_line(f"  delphi {label}", theirs[label], n), flush=True)
                print(_outcome(theirs[label], n), flush=True)
        except (RuntimeError, ValueError, subprocess.SubprocessError) as exc:
            print(f"  delphi: failed ({exc})")
            if not theirs:
                return

        def rate(run: dict[str, Any]) -> float:
            return n / run["seconds"]

        print("\n  ratios (saelab latents/s / delphi latents/s):")
        for conc, run in ours.items():
            for label, other in theirs.items():
                print(f"    saelab concurrency {conc:<3} / delphi {label:<40} {rate(run) / rate(other):5.1f}x",
                      flush=True)
        best_label = max(theirs, key=lambda k: rate(theirs[k]))
        headline = rate(ours[high]) / rate(theirs[best_label])
        verdict = "meets" if headline >= 3 else "MISSES"
        print(f"\n  HEADLINE: saelab at request concurrency {high} / delphi's best ({best_label}): "
              f"{headline:.1f}x -- {verdict} the >= 3x target.\n"
              f"    Why this ratio: same server (waits {args.delay * 1000:.0f} ms, takes any number of requests in "
              f"flight, like vLLM), same {n} latents, same example counts (delphi's defaults), explain + "
              f"detection; each tool at its best setting. delphi sends a latent's {prompts} detection prompts one "
              f"at a time, so with {n} latents it never has more than {n} requests in flight; saelab sends them "
              f"concurrently, up to its request limit.")
        same_cap = f"Pipeline max_concurrent {c}"
        if same_cap in theirs:
            ratio = rate(ours[c]) / rate(theirs[same_cap])
            print(f"    At the same cap ({c} requests in flight for both): {ratio:.1f}x"
                  f"{'' if ratio >= 3 else ' (below 3x: with equal request slots, the gain is only from not idling them)'}.")


if __name__ == "__main__":
    main()
