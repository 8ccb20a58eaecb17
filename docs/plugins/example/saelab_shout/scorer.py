"""The ``shout-scorer`` plugin module (entry point ``shout-scorer``): the ``contains`` scorer."""

from __future__ import annotations

from saelab import Provider, Scorer, hookimpl
from saelab.records import Explanation, LatentRecord, Prediction, ScoreResult

from saelab_shout.text import words


class ContainsScorer(Scorer):
    """Predicts that an example activates when it contains a word of the explanation (case-insensitive)."""

    name = "contains"
    uses_provider = False

    async def score(self, record: LatentRecord, explanation: Explanation | None,
                    provider: Provider | None) -> ScoreResult:
        """One prediction per test and non-activating example; metric ``accuracy``."""
        text = explanation.text if explanation is not None else ""
        wanted = set(words(text))
        predictions = []
        for example in [*record.test, *record.non_activating]:
            guess = int(bool(wanted & set(words(example.text))))
            truth = int(example.is_activating)
            predictions.append(Prediction(example.id, truth, guess, correct=guess == truth))
        accuracy = sum(bool(p.correct) for p in predictions) / max(1, len(predictions))
        return ScoreResult(scorer=self.name, hookpoint=record.hookpoint, latent=record.latent, explanation=text,
                           predictions=predictions, metrics={"accuracy": accuracy},
                           options=self.options.model_dump(mode="json"))


@hookimpl
def register_scorers(register):  # noqa: ANN001 - the hookspec documents the signature
    register(ContainsScorer)
