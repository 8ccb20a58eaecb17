"""A small synthetic run directory for the report tests, built from the record classes.

Dataset text and LLM answers carry HTML/script payloads (:data:`PAYLOADS`) that would set
``window.__pwned`` if the report ever let them run.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from saelab.config import write_run_config
from saelab.layout import RunLayout
from saelab.pipeline import RecordSet, save_records
from saelab.records import (
    Example,
    Explanation,
    Failures,
    LatentRecord,
    LatentStats,
    Neighbour,
    Prediction,
    ScoreResult,
    TokenValues,
    Usage,
)
from safetensors.torch import save_file

PAYLOADS = (
    "<script>window.__pwned=1</script>",
    "</script><script>window.__pwned=1</script>",
    '<img src=x onerror="window.__pwned=1">',
)
"""Strings that run code if inserted as HTML (each sets ``window.__pwned``)."""

HOOK = "layers.1"
D_SAE = 64
LATENTS = (3, 7, 11, 20, 42)
"""Latents with records; 42 has a record but no explanation or scores."""
EXPLANATIONS = {
    3: "the word 'moon' and other celestial bodies",
    7: "closing HTML tags " + PAYLOADS[1],
    11: "image markup " + PAYLOADS[2],
    20: "numbers in dates\u2028and years " + PAYLOADS[0],
}
"""Explanation text per latent (LLM output, payloads included)."""
SCORES = {"detection": {3: 0.9, 7: 0.55, 11: 0.7, 20: 0.62}, "fuzz": {3: 0.8, 7: 0.95, 11: 0.5, 20: 0.75}}
"""balanced_accuracy per scorer and latent."""
FREQUENCY = {3: 0.02, 7: 0.0005, 11: 0.1, 20: 0.004, 42: 0.00001}
MAX_ACT = {3: 12.5, 7: 3.25, 11: 7.0, 20: 1.5, 42: 0.75}


def _example(rng: random.Random, latent: int, k: int, activating: bool, quantile: int | None) -> Example:
    words = [" the", " moon", " over", " a", " hill", "\n", " 1969", " and", " then", " night"]
    tokens = [rng.choice(words) for _ in range(12)]
    if k == 0:  # dataset text carrying the payloads
        tokens[2:5] = [" " + p for p in PAYLOADS]
    acts = [0.0] * len(tokens)
    if activating:
        peak = MAX_ACT[latent] * (1.0 - 0.08 * k)
        acts[6] = peak
        acts[7] = round(peak / 3, 3)
    return Example(id=f"s{latent * 100 + k}:p{k}", sequence=latent * 100 + k, start=k, tokens=list(range(12)),
                   token_strs=tokens, activations=acts, quantile=quantile, is_activating=activating,
                   source="quantiles" if activating else "random")


def build_run(root: Path, *, with_stats: bool = True) -> Path:
    """Write a synthetic run into ``root`` (a run directory) and return it."""
    rng = random.Random(0)
    layout = RunLayout(root)
    write_run_config(root, command="run", config={"model": "tiny-gpt2", "hookpoints": [HOOK],
                                                  "dataset_repo": "text " + PAYLOADS[0], "n_tokens": 4096},
                     argv=["run", "tiny-gpt2"])
    dict_dir = root / "dictionaries" / HOOK
    dict_dir.mkdir(parents=True)
    (dict_dir / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_sae": D_SAE, "d_in": 16}))
    (dict_dir / "eval.json").write_text(json.dumps({"metrics": {
        "fvu": 0.1234, "explained_variance": 0.8766, "l0": 8.0, "dead_frac": 0.125, "ce_loss_recovered": 0.91,
        "fvu_all": 0.5, "kl_spliced": 0.02, "tokens": 2048}, "held_out": True}))
    records = []
    for latent in LATENTS:
        train = [_example(rng, latent, k, True, 9 - k) for k in range(4)]
        test = [_example(rng, latent, k, True, 5 - k % 3) for k in range(4, 8)]
        negs = [_example(rng, latent, k, False, None) for k in range(8, 12)]
        records.append(LatentRecord(
            hookpoint=HOOK, latent=latent, train=train, test=test, non_activating=negs,
            stats=LatentStats(FREQUENCY[latent], MAX_ACT[latent], int(FREQUENCY[latent] * 4096), 4096,
                              [0.1 * q for q in range(10)]),
            top_logits=TokenValues([" moon", PAYLOADS[0], " sky"], [2.5, 1.5, 0.5]),
            bottom_logits=TokenValues([" sun", PAYLOADS[2]], [-2.0, -1.0]),
            neighbours=[Neighbour(n, 0.5 - 0.1 * j, "co-occurrence") for j, n in enumerate(LATENTS) if n != latent][:3],
        ))
    save_records(layout, RecordSet(HOOK, records, {"50": "fewer than min_examples=10 activating windows"}, "fp"))
    for record in records:
        if record.latent not in EXPLANATIONS:
            continue
        text = EXPLANATIONS[record.latent]
        Explanation(HOOK, record.latent, text, explainer="default", provider="transformers", model="smollm2",
                    raw_responses=[f"Reasoning {PAYLOADS[1]}\n[EXPLANATION]: {text}"],
                    usage=Usage(1, 0, 500, 30)).save(layout.explanation_path(HOOK, record.latent))
        for scorer, values in SCORES.items():
            predictions = []
            for j, example in enumerate(record.test + record.non_activating):
                truth = int(example.is_activating)
                guess = truth if j % 3 else 1 - truth
                predictions.append(Prediction(example.id, truth, guess, correct=guess == truth,
                                              quantile=example.quantile, raw=f"[{guess}] {PAYLOADS[2]}",
                                              prompt_index=j // 4))
            ScoreResult(scorer, HOOK, record.latent, text, predictions=predictions,
                        metrics={"balanced_accuracy": values[record.latent], "f1": 0.5, "auc": None},
                        failures=Failures(), n_prompts=2, raw_responses=[f"[1, 0] {PAYLOADS[0]}", "[0, 1]"],
                        provider="transformers", model="smollm2").save(
                layout.score_path(scorer, HOOK, record.latent))
    if with_stats:
        latents_dir = root / "latents" / HOOK
        latents_dir.mkdir(parents=True)
        freq = [0.0] * D_SAE
        vmax = [0.0] * D_SAE
        for latent in LATENTS:
            freq[latent], vmax[latent] = FREQUENCY[latent], MAX_ACT[latent]
        for i in range(D_SAE):
            if freq[i] == 0 and i % 4:
                freq[i], vmax[i] = 10 ** -rng.uniform(1, 5), rng.uniform(0.5, 5)
        (latents_dir / "stats.json").write_text(json.dumps({
            "schema": "saelab.latent_stats/1", "hookpoint": HOOK, "d_sae": D_SAE, "n_analysed": 4096,
            "latents": {"frequency": freq, "max_activation": vmax, "firing_count": [int(f * 4096) for f in freq]}}))
        hist = torch.zeros(D_SAE, 32, dtype=torch.int32)
        hist[:, 0] = 50
        hist[:, 5] = 7
        hist[:, 31] = 1
        rng_t = torch.stack([torch.zeros(D_SAE), torch.tensor(vmax)], 1)
        save_file({"histogram": hist, "histogram_range": rng_t}, str(latents_dir / "stats.safetensors"))
    return root
