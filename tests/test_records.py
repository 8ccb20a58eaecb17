"""Record schemas (JSON round trips, schema checks) and delphi-style highlighting."""

from __future__ import annotations

import json
import random

import pytest
import saelab
from interp_helpers import make_record
from saelab.highlight import activation_line, highlight, normalized_activations, random_mask
from saelab.records import (
    Example,
    Explanation,
    LatentRecord,
    Neighbour,
    Prediction,
    ScoreResult,
    load_record,
)


def test_latent_record_round_trip_and_fingerprint(tmp_path):
    record = make_record()
    record.neighbours = [Neighbour(3, 0.5, "co-occurrence")]
    path = tmp_path / "r.json"
    record.save(path)
    loaded = LatentRecord.load(path)
    assert loaded == record and loaded.fingerprint() == record.fingerprint()
    assert isinstance(load_record(path), LatentRecord)
    record.test[0].activations[2] += 1.0
    assert record.fingerprint() != loaded.fingerprint()


def test_example_validates_lengths_and_computes_max():
    e = Example("a", 0, 0, [1, 2], ["x", "y"], [0.5, 2.0])
    assert e.max_activation == 2.0 and e.text == "xy"
    with pytest.raises(ValueError, match="same length"):
        Example("b", 0, 0, [1, 2], ["x"], [0.0, 1.0])


def test_score_result_json_is_strict_json(tmp_path):
    result = ScoreResult("detection", "layers.1", 3, "cats",
                         predictions=[Prediction("a", 1, 1, probability=float("nan"), correct=True)],
                         metrics={"auc": float("nan"), "f1": 0.5})
    data = json.loads(result.to_json())  # NaN becomes null
    assert data["schema"] == "saelab.score/1" and data["metrics"]["auc"] is None
    assert data["predictions"][0]["probability"] is None
    with pytest.raises(saelab.UsageError, match="expected a 'saelab.explanation' record"):
        Explanation.from_dict(data)
    with pytest.raises(saelab.UsageError, match="malformed"):
        ScoreResult.from_json('{"schema": "saelab.score/1"}')


def test_highlight_merges_adjacent_tokens():
    toks = ["The", " cow", " jumped", " over", " the", " moon", "."]
    acts = [0, 0, 1.0, 4.0, 5.0, 10.0, 0]
    # 1.0 is not above 0.3 * 10
    assert highlight(toks, acts) == "The cow jumped <<over the moon>>."
    assert highlight(["a", "\n", "b"], [0, 5, 0]) == "a<<\n>>b"
    assert highlight(["a", "b"], [0, 0]) == "ab"


def test_activation_line_scale():
    toks, acts = ["a", " b", " c", " d"], [0.0, 3.0, 7.0, 2.0]
    assert normalized_activations(acts) == [0, 5, 10, 3]  # ceil(30 / 7) = 5, ceil(20 / 7) = 3
    # 2.0 is not above 0.3 * 7 = 2.1: not listed
    assert activation_line(toks, acts) == 'Activations: (" b", 5), (" c", 10)'
    assert activation_line(toks, acts, max_activation=14.0) == 'Activations: (" b", 3), (" c", 5)'


def test_random_mask_count():
    mask = random_mask(10, 3, random.Random(0))
    assert sum(mask) == 3 and len(mask) == 10
    assert sum(random_mask(2, 5, random.Random(0))) == 2
