"""delphi side of ``bench/autointerp_throughput.py``: runs under the side venv's Python (eai-delphi 0.1.3), never
imported by saelab. Builds the same hand-made latents as the bench (by default delphi's own example counts:
40 train, 50 test, 50 non-activating; the latent fires on ``cat``), wires delphi's own pieces as its
``__main__`` does (``OpenRouter`` client, ``DefaultExplainer`` with threshold 0.3, ``DetectionScorer`` with
5 examples per prompt, a ``Pipeline`` of an explainer ``Pipe`` and a scorer ``Pipe``, explanations and
scores written as files) and times ``Pipeline.run(max_concurrent)`` (delphi's CLI passes 1 with OpenRouter).
Prints one JSON line: ``{"seconds", "latents", "explained", "predictions", "samples"}`` (``predictions``:
samples with a parsed prediction, out of ``samples``; delphi rejects the answer to a final partial batch).

    python delphi_driver.py BASE_URL --latents 20 --concurrency 1 --train 40 --test 50 --non 50 --out DIR
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from pathlib import Path

import orjson
import torch
from delphi.clients import OpenRouter
from delphi.explainers import DefaultExplainer
from delphi.latents import ActivatingExample, Latent, LatentRecord, NonActivatingExample
from delphi.pipeline import Pipe, Pipeline, process_wrapper
from delphi.scorers import DetectionScorer

WORD = "cat"


def _tokens(words: list[str]) -> list[str]:
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def _activating(i: int, prefix: str) -> ActivatingExample:
    words = ["the", f"w{prefix}{i}", WORD, "sat", "on", "mats"][: 3 + i % 4]
    acts = torch.tensor([float(2 + j) if w == WORD else 0.0 for j, w in enumerate(words)])
    return ActivatingExample(tokens=torch.arange(len(words)), activations=acts,
                             normalized_activations=(acts * 10 / acts.max()).floor(),
                             str_tokens=_tokens(words), quantile=i % 3)


def _non_activating(i: int) -> NonActivatingExample:
    words = ["a", f"wna{i}", "dog", "ran"]
    return NonActivatingExample(tokens=torch.arange(len(words)), activations=torch.zeros(len(words)),
                                str_tokens=_tokens(words), distance=-1.0)


def record(latent: int, n_train: int = 40, n_test: int = 50, n_non: int = 50) -> LatentRecord:
    """One hand-made latent record (default counts: delphi's defaults)."""
    train = [_activating(i, "tr") for i in range(n_train)]
    test = [_activating(i, "te") for i in range(n_test)]
    return LatentRecord(latent=Latent("layers.1", latent), examples=train + test, train=train, test=test,
                        not_active=[_non_activating(i) for i in range(n_non)])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("base_url", help="OpenAI-style base URL, e.g. http://127.0.0.1:PORT/v1")
    parser.add_argument("--latents", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=1, help="Pipeline.run(max_concurrent=...)")
    parser.add_argument("--train", type=int, default=40, help="train examples (delphi's n_examples_train)")
    parser.add_argument("--test", type=int, default=50, help="activating test examples (n_examples_test)")
    parser.add_argument("--non", type=int, default=50, help="non-activating examples (n_non_activating)")
    parser.add_argument("--per-prompt", type=int, default=5, help="num_examples_per_scorer_prompt")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.getLogger("delphi").setLevel(logging.ERROR)  # "no logprobs for OpenRouter" warning

    client = OpenRouter("test-model", api_key="sk-bench-not-a-secret",
                        base_url=args.base_url.rstrip("/") + "/chat/completions")
    explanations = args.out / "explanations"
    scores = args.out / "scores" / "detection"
    explanations.mkdir(parents=True, exist_ok=True)
    scores.mkdir(parents=True, exist_ok=True)
    counts = {"explained": 0, "predictions": 0, "samples": 0}

    def explainer_postprocess(result):
        with open(explanations / f"{result.record.latent}.txt", "wb") as f:
            f.write(orjson.dumps(result.explanation))
        counts["explained"] += result.explanation != "Explanation could not be parsed."
        return result

    def scorer_preprocess(result):
        if isinstance(result, list):
            result = result[0]
        rec = result.record
        rec.explanation = result.explanation
        rec.extra_examples = rec.not_active
        return rec

    def scorer_postprocess(result):
        with open(scores / f"{result.record.latent}.txt", "wb") as f:
            f.write(orjson.dumps(result.score))
        counts["samples"] += len(result.score)
        counts["predictions"] += sum(s.prediction is not None for s in result.score)

    explainer = DefaultExplainer(client, threshold=0.3, verbose=False)
    scorer = DetectionScorer(client, n_examples_shown=args.per_prompt, verbose=False, log_prob=False)
    records = [record(i, args.train, args.test, args.non) for i in range(args.latents)]
    pipeline = Pipeline(
        lambda: iter(records),
        Pipe(process_wrapper(explainer, postprocess=explainer_postprocess)),
        Pipe(process_wrapper(scorer, preprocess=scorer_preprocess, postprocess=scorer_postprocess)),
    )
    start = time.perf_counter()
    asyncio.run(pipeline.run(args.concurrency))
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "latents": args.latents, **counts}))


if __name__ == "__main__":
    main()
