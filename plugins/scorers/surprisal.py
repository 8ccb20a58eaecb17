"""The ``surprisal`` scorer: does prefixing the explanation lower a local LM's loss on activating
examples more than on non-activating ones?"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

from pydantic import Field
from saelab import Provider, Scorer, hookimpl
from saelab.autointerp import explanation_text, score_fingerprint
from saelab.metrics import binary_metrics, roc_auc
from saelab.options import Options
from saelab.prompts import NO_PLACEHOLDERS, Placeholders, fill
from saelab.records import Example, Explanation, Failures, LatentRecord, Prediction, ScoreResult, Usage


class SurprisalOptions(Options):
    """Options of the ``surprisal`` scorer."""

    model: str = "smollm2"
    """Local causal LM: an embedded name, hub id or local directory (any activation source)."""
    device: str = "cpu"
    """Device of the local LM."""
    batch_size: int = Field(default=8, ge=1)
    """Sequences per forward pass."""
    max_example_tokens: int = Field(default=128, ge=1)
    """Example text is cut to this many tokens of the scoring LM."""


_models: dict[tuple[str, str], Any] = {}
_load_lock = threading.Lock()
_run_lock = threading.Lock()


def _load(model: str, device: str) -> Any:
    with _load_lock:
        key = (model, device)
        if key not in _models:
            from saelab.models import load_activation_source

            _models[key] = load_activation_source(model, device=device)
        return _models[key]


def mean_losses(source: Any, prefix_ids: list[int], texts: Sequence[list[int]], batch_size: int) -> list[float]:
    """Mean next-token loss (nats) over each text's tokens, each text following ``prefix_ids``."""
    import torch

    out: list[float] = []
    for start in range(0, len(texts), batch_size):
        chunk = [prefix_ids + t for t in texts[start:start + batch_size]]
        width = max(len(ids) for ids in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        with torch.no_grad():
            logprobs = source.logits(ids, attention_mask=mask).float().log_softmax(-1)
        for row, seq in enumerate(chunk):
            n_text = len(seq) - len(prefix_ids)
            positions = torch.arange(len(prefix_ids) - 1, len(seq) - 1)
            targets = ids[row, positions + 1]
            nll = -logprobs[row, positions, targets]
            out.append(float(nll.sum() / max(1, n_text)))
    return out


class SurprisalScorer(Scorer):
    """Loss of each test/non-activating example under a local LM, after a prompt naming the
    explanation vs. the same prompt with a generic baseline. Per example, ``score`` = baseline loss -
    explained loss (nats/token; positive = the explanation helps). Metrics: ``auc`` (activating
    examples should gain more), mean gains per class, and classification metrics with "gain > 0"
    as the prediction."""

    name = "surprisal"
    Options = SurprisalOptions
    prompt_prefix = "scorers.surprisal"
    prompt_file = "surprisal.yaml"
    prompt_placeholders = {"prefix": Placeholders(required=("explanation",)), "baseline_explanation": NO_PLACEHOLDERS}
    uses_provider = False

    def _ids(self, tokenizer: Any, text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def _compute(self, record: LatentRecord, explanation: str) -> tuple[list[Example], list[float], list[float]]:
        source = _load(self.options.model, self.options.device)
        tok = source.tokenizer
        bos = [tok.bos_token_id] if getattr(tok, "bos_token_id", None) is not None else []
        template = str(self.prompts["scorers.surprisal.prefix"])
        with_prefix = bos + self._ids(tok, fill(template, explanation=explanation))
        baseline = str(self.prompts["scorers.surprisal.baseline_explanation"])
        without_prefix = bos + self._ids(tok, fill(template, explanation=baseline))
        examples = [*record.test, *record.non_activating]
        texts = [self._ids(tok, e.text)[: self.options.max_example_tokens] or [tok.eos_token_id or 0]
                 for e in examples]
        with _run_lock:  # one forward at a time: CPU threads are shared
            explained = mean_losses(source, with_prefix, texts, self.options.batch_size)
            generic = mean_losses(source, without_prefix, texts, self.options.batch_size)
        return examples, explained, generic

    async def score(self, record: LatentRecord, explanation: Explanation | None,
                    provider: Provider | None = None) -> ScoreResult:
        """Score on the local LM (in a worker thread)."""
        text = explanation_text(explanation)
        examples, explained, generic = await asyncio.to_thread(self._compute, record, text)
        test_ids = {e.id for e in record.test}
        predictions = []
        for example, loss_with, loss_without in zip(examples, explained, generic, strict=True):
            truth = int(example.id in test_ids)
            gain = loss_without - loss_with
            predicted = int(gain > 0)
            predictions.append(Prediction(example_id=example.id, truth=truth, prediction=predicted, score=gain,
                                          correct=predicted == truth, quantile=example.quantile,
                                          values=[loss_with, loss_without]))
        return ScoreResult(
            scorer=self.name, hookpoint=record.hookpoint, latent=record.latent, explanation=text,
            predictions=predictions, metrics=self.metrics(predictions), failures=Failures(),
            n_prompts=0, usage=Usage(), provider="local", model=self.options.model,
            prompt_version=self.prompt_version(), fingerprint=score_fingerprint(record, text, self, None),
            options=self.options.model_dump(mode="json"),
        )

    @staticmethod
    def metrics(predictions: Sequence[Prediction]) -> dict[str, float | None]:
        """AUC of the gains, mean gain per class and classification metrics of gain > 0."""
        truths = [p.truth for p in predictions]
        gains = [p.score for p in predictions]
        pos = [g for t, g in zip(truths, gains, strict=True) if t and g is not None]
        neg = [g for t, g in zip(truths, gains, strict=True) if not t and g is not None]
        metrics = binary_metrics(truths, [p.prediction for p in predictions])
        metrics["auc"] = roc_auc(truths, gains)
        metrics["mean_gain_activating"] = sum(pos) / len(pos) if pos else None
        metrics["mean_gain_non_activating"] = sum(neg) / len(neg) if neg else None
        return metrics


@hookimpl
def register_scorers(register):
    register(SurprisalScorer)
