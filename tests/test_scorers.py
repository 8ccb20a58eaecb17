"""Scorers against the real local OpenAI-compatible server (tests/llm_server.py) through the ``openai``
provider: exact metrics recomputed here from the scripted answers and the ground truth."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import re
import statistics

import pytest
import saelab
from interp_helpers import WORD, filler, make_example, make_record, openai_provider, user_examples
from llm_server import Reply, ScriptedLLMServer
from saelab.records import Example, ScoreResult


def scorer(name: str, **options):
    return saelab.resolve("scorer", name)(options)


def run(coro):
    return asyncio.run(coro)


def confusion(pairs):
    """(tp, fp, tn, fn) from (truth, answer) pairs."""
    tp = sum(1 for t, a in pairs if t and a)
    fp = sum(1 for t, a in pairs if not t and a)
    tn = sum(1 for t, a in pairs if not t and not a)
    fn = sum(1 for t, a in pairs if t and not a)
    return tp, fp, tn, fn


def brute_auc(pos, neg):
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def detection_answer(eid: str) -> int:
    """Scripted verdict: right on every example except te0 (missed) and na1 (false alarm)."""
    if eid == "te0":
        return 0
    if eid == "na1":
        return 1
    return int(eid.startswith("te"))


def answer_list(request) -> list[int]:
    return [detection_answer(filler(text)) for text in user_examples(request)]


# -------------------------------------------------------------------------------------------- detection


def test_detection_exact_metrics_partial_batch_and_concurrency(monkeypatch):
    record = make_record(n_test=7, n_non=6)

    def handler(request):
        return Reply(text=json.dumps(answer_list(request)), delay_s=0.3)

    with ScriptedLLMServer(handler) as server:
        provider = openai_provider(server, monkeypatch)
        result = run(scorer("detection").score(record, "the word cat", provider))
    # 13 examples, 5 per prompt: 5 + 5 + 3; the partial batch is parsed like the others
    assert result.n_prompts == 3 and len(server.chat_requests) == 3
    sizes = [len(user_examples(r.body)) for r in server.chat_requests]
    assert sorted(sizes) == [3, 5, 5]
    assert result.failures.prompts == 0 and result.failures.examples == 0
    assert not any(p.parse_failed for p in result.predictions)
    # concurrent prompts (delphi sends them one at a time)
    assert server.max_in_flight == 3
    chats = server.chat_requests
    assert max(r.started for r in chats) < min(r.finished for r in chats)  # all in flight together
    truths = {e.id: 1 for e in record.test} | {e.id: 0 for e in record.non_activating}
    assert {p.example_id for p in result.predictions} == set(truths)
    tp, fp, tn, fn = confusion([(truths[eid], detection_answer(eid)) for eid in truths])
    assert (tp, fp, tn, fn) == (6, 1, 5, 1)
    m = result.metrics
    assert m["recall"] == pytest.approx(tp / (tp + fn)) == pytest.approx(6 / 7)
    assert m["precision"] == pytest.approx(tp / (tp + fp)) == pytest.approx(6 / 7)
    assert m["balanced_accuracy"] == pytest.approx((tp / (tp + fn) + tn / (tn + fp)) / 2)
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["auc"] is None  # no logprobs requested
    for p in result.predictions:
        assert p.correct == (p.prediction == p.truth)
        assert p.raw is not None and p.prompt_index is not None
    assert result.usage.calls == 3 and result.usage.prompt_tokens > 0
    assert result.prompt_version and result.fingerprint and result.model == "test-model"
    assert ScoreResult.from_json(result.to_json()) == result


def test_detection_auc_from_logprobs(monkeypatch):
    record = make_record(n_test=7, n_non=6)
    prob = {f"te{i}": p for i, p in enumerate([0.4, 0.3, 0.9, 0.8, 0.95, 0.7, 0.6])}
    prob |= {f"na{i}": p for i, p in enumerate([0.1, 0.6, 0.2, 0.35, 0.05, 0.5])}

    def handler(request):
        ids = [filler(t) for t in user_examples(request)]
        answers = [detection_answer(eid) for eid in ids]
        tokens = [{"token": "[", "logprob": -0.01}]
        for i, (eid, a) in enumerate(zip(ids, answers, strict=True)):
            p = prob[eid]
            tops = {"1": math.log(p), "0": math.log(1 - p)}
            tokens.append({"token": ("" if i == 0 else " ") + str(a), "logprob": tops[str(a)], "top_logprobs": tops})
            tokens.append({"token": "," if i < len(ids) - 1 else "]", "logprob": -0.01})
        return Reply(text=json.dumps(answers), logprobs=tokens)

    with ScriptedLLMServer(handler) as server:
        provider = openai_provider(server, monkeypatch)
        result = run(scorer("detection", log_probs=True).score(record, "cat", provider))
    body = server.chat_requests[0].body
    assert body["logprobs"] is True and body["top_logprobs"] == 5
    for p in result.predictions:
        assert p.probability == pytest.approx(prob[p.example_id])
    pos = [prob[e.id] for e in record.test]
    neg = [prob[e.id] for e in record.non_activating]
    assert result.metrics["auc"] == pytest.approx(brute_auc(pos, neg))
    # by hand: negatives below each positive: 4, 3, 6, 6, 6, 6, 5 + one tie (0.6) -> 36.5 of 42 pairs
    assert result.metrics["auc"] == pytest.approx(36.5 / 42)


def test_detection_malformed_answer_counted_with_raw_text(monkeypatch):
    record = make_record(n_test=7, n_non=6)
    garbage = "I think most of them are about cats, yes."

    def handler(request):
        ids = [filler(t) for t in user_examples(request)]
        if "na2" in ids:
            return garbage
        if "te5" in ids and "na2" not in ids:
            return "[1, 0]"  # wrong length: also a failure
        return json.dumps(answer_list(request))

    with ScriptedLLMServer(handler) as server:
        provider = openai_provider(server, monkeypatch)
        result = run(scorer("detection").score(record, "cat", provider))
    requests = [[filler(t) for t in user_examples(r.body)] for r in server.chat_requests]
    bad = [ids for ids in requests if "na2" in ids or "te5" in ids]
    n_bad_examples = sum(len(ids) for ids in bad)
    assert result.failures.prompts == len(bad) >= 1
    assert result.failures.examples == n_bad_examples
    assert result.failures.requests == 0
    failed = [p for p in result.predictions if p.parse_failed]
    assert len(failed) == n_bad_examples
    assert all(p.prediction is None and p.correct is None for p in failed)
    if any("na2" in ids for ids in bad):
        assert any(p.raw == garbage for p in failed)
    assert garbage in result.raw_responses
    bad_ids = {eid for ids in bad for eid in ids}
    truths = {e.id: 1 for e in record.test} | {e.id: 0 for e in record.non_activating}
    tp, fp, tn, fn = confusion([(truths[e], detection_answer(e)) for e in truths if e not in bad_ids])
    assert result.metrics["tp"] == tp and result.metrics["fp"] == fp
    assert result.metrics["tn"] == tn and result.metrics["fn"] == fn
    expected_bacc = statistics.mean([r for r in (tp / (tp + fn) if tp + fn else None,
                                                 tn / (tn + fp) if tn + fp else None) if r is not None])
    assert result.metrics["balanced_accuracy"] == pytest.approx(expected_bacc)


def test_detection_failed_request_counted(monkeypatch):
    record = make_record(n_test=4, n_non=4)

    def handler(request):
        ids = [filler(t) for t in user_examples(request)]
        if "na0" in ids:
            return Reply(status=400)
        return json.dumps(answer_list(request))

    with ScriptedLLMServer(handler) as server:
        provider = openai_provider(server, monkeypatch)
        result = run(scorer("detection", num_examples_per_scorer_prompt=3).score(record, "cat", provider))
    assert result.n_prompts == 3
    assert result.failures.requests == 1 and result.failures.prompts == 1
    assert result.failures.examples == sum(p.parse_failed for p in result.predictions) >= 1
    assert len(result.errors) == 1 and "400" in result.errors[0]
    assert result.usage.calls == 2


def test_shuffle_is_deterministic_and_seeded():
    record = make_record()
    a = scorer("detection", seed=1).messages(record, "cat")
    b = scorer("detection", seed=1).messages(record, "cat")
    c = scorer("detection", seed=2).messages(record, "cat")
    assert a == b and a != c
    order = [filler(t) for m in a for t in user_examples(m[-1] | {"messages": m})]
    assert sorted(order) == sorted([e.id for e in record.test + record.non_activating])


def test_recall_is_an_alias_of_detection():
    assert saelab.resolve("scorer", "recall") is saelab.resolve("scorer", "detection")
    assert saelab.resolve("scorer", "RECALL").name == "detection"


def test_scorer_options_reject_unknown_keys():
    with pytest.raises(saelab.UsageError, match="unknown option 'bogus'"):
        scorer("detection", bogus=1)


# -------------------------------------------------------------------------------------------- fuzz


def test_fuzz_highlighting_and_exact_metrics(monkeypatch):
    record = make_record(n_test=6, n_non=5)
    seen: dict[str, str] = {}

    def handler(request):
        answers = []
        for text in user_examples(request):
            eid = filler(text)
            seen[eid] = text
            ok = f"<<{WORD}>>" in text
            answers.append(0 if eid == "te3" else int(ok))
        return json.dumps(answers)

    with ScriptedLLMServer(handler) as server:
        provider = openai_provider(server, monkeypatch)
        result = run(scorer("fuzz").score(record, "cat", provider))
    assert len(seen) == 11
    for e in record.test:  # activating: exactly the "cat" token highlighted
        assert seen[e.id].count("<<") == 1 and f" <<{WORD}>>" in seen[e.id]
    for e in record.non_activating:  # as many random tokens as activating examples have on average (1)
        text = seen[e.id]
        assert text.count("<<") == 1 and text.count(">>") == 1
        assert text.replace("<<", "").replace(">>", "") == e.text
    truths = {e.id: 1 for e in record.test} | {e.id: 0 for e in record.non_activating}
    answers = {eid: (0 if eid == "te3" else int(f"<<{WORD}>>" in seen[eid])) for eid in truths}
    tp, fp, tn, fn = confusion([(truths[e], answers[e]) for e in truths])
    assert (tp, fp, tn, fn) == (5, 0, 5, 1)
    assert result.metrics["recall"] == pytest.approx(5 / 6)
    assert result.metrics["precision"] == pytest.approx(1.0)
    assert result.metrics["balanced_accuracy"] == pytest.approx((5 / 6 + 1) / 2)
    assert result.metrics["f1"] == pytest.approx(10 / 11)


def test_fuzz_random_highlight_count_follows_activating_mean(monkeypatch):
    # activating examples with 3 highlighted tokens each -> non-activating get 3 random ones
    test = [make_example(f"te{i}", ["the", f"wte{i}", "cat", "cat", "cat", "x"]) for i in range(3)]
    non = [make_example(f"na{i}", ["a", f"wna{i}", "dog", "ran", "far", "away"], activating=False) for i in range(3)]
    record = make_record()
    record.test, record.non_activating = test, non
    texts = [t for m in scorer("fuzz").messages(record, "cat") for t in user_examples(m[-1] | {"messages": m})]
    for text in texts:
        if "wna" in text:
            inner = re.findall(r"<<(.*?)>>", text)
            assert sum(len(s.split()) for s in inner) == 3


# -------------------------------------------------------------------------------------------- simulation


SIM_LINE = re.compile(r"^Example (\d+) \((\d+) tokens\): (\[.*\])$", re.MULTILINE)


def simulate(tokens: list[str], eid: str) -> list[int]:
    values = [10 if t.strip() == WORD else 0 for t in tokens]
    if eid == "te2":
        values[0] = 5  # an imperfect prediction
    return values


def test_simulation_exact_correlations(monkeypatch):
    record = make_record(n_test=5, n_non=4)
    sent: dict[str, list[str]] = {}

    def handler(request):
        lines = []
        for m in SIM_LINE.finditer(request["messages"][-1]["content"]):
            tokens = json.loads(m.group(3))
            eid = filler("".join(tokens))
            sent[eid] = tokens
            values = simulate(tokens, eid)
            if eid == "na0":
                values = values[:-1]  # wrong length: that example fails
            lines.append(f"Example {m.group(1)}: {json.dumps(values)}")
        return "\n".join(lines)

    with ScriptedLLMServer(handler) as server:
        provider = openai_provider(server, monkeypatch)
        result = run(scorer("simulation").score(record, "cat", provider))
    assert len(sent) == 9
    assert result.failures.examples == 1 and result.failures.prompts == 1
    by_id = {p.example_id: p for p in result.predictions}
    assert by_id["na0"].parse_failed and by_id["na0"].values is None
    examples = {e.id: e for e in record.test + record.non_activating}
    xs, ys = [], []
    for eid, e in examples.items():
        if eid == "na0":
            continue
        predicted = simulate(sent[eid], eid)
        assert by_id[eid].values == predicted
        xs += predicted
        ys += e.activations
    assert result.metrics["correlation"] == pytest.approx(statistics.correlation(xs, ys))
    per_example = [statistics.correlation(simulate(sent[e.id], e.id), e.activations) for e in record.test]
    assert per_example[0] == pytest.approx(1.0) and per_example[2] < 1.0
    assert result.metrics["mean_example_correlation"] == pytest.approx(statistics.mean(per_example))
    # every parsed example classified right: activating ones have a prediction >= 1, others all 0
    assert result.metrics["balanced_accuracy"] == pytest.approx(1.0)
    assert result.metrics["auc"] == pytest.approx(1.0)


# -------------------------------------------------------------------------------------------- intruder


def test_intruder_exact_accuracy(monkeypatch):
    record = make_record(n_test=7, n_non=6)
    prompts = []

    def handler(request):
        texts = user_examples(request)
        prompts.append(texts)
        intruder = next(i for i, t in enumerate(texts, 1) if "dog" in t)
        if "wte0" in request["messages"][-1]["content"]:
            return f"The odd one out talks about a dog.\n[RESPONSE]: {intruder}"
        return f"[RESPONSE]: {1 if intruder != 1 else 2}"

    with ScriptedLLMServer(handler) as server:
        provider = openai_provider(server, monkeypatch)
        result = run(scorer("intruder").score(record, None, provider))
    # 7 activating examples in groups of 4 (by quantile) plus one intruder each: prompts of 5 and 4
    assert sorted(len(p) for p in prompts) == [4, 5]
    assert all(sum("dog" in t for t in p) == 1 for p in prompts)
    assert result.n_prompts == 2 and len(result.predictions) == 2
    assert result.metrics["accuracy"] == pytest.approx(0.5)
    assert sorted(p.correct for p in result.predictions) == [False, True]
    assert all(p.example_id.startswith("na") and p.truth == 1 for p in result.predictions)
    assert result.explanation == ""


def test_intruder_malformed_answer(monkeypatch):
    record = make_record(n_test=7, n_non=6)
    with ScriptedLLMServer("no idea") as server:
        provider = openai_provider(server, monkeypatch)
        result = run(scorer("intruder").score(record, None, provider))
    assert result.failures.prompts == 2 and result.metrics["accuracy"] is None
    assert all(p.parse_failed and p.raw == "no idea" for p in result.predictions)


# -------------------------------------------------------------------------------------------- embedding


class BagOfWords:
    """A deterministic embedder: counts of three words."""

    vocab = ("cat", "dog", "sat")

    def encode(self, texts, batch_size=32):
        return [[t.split().count(w) for w in self.vocab] for t in texts]


def test_embedding_exact_auc():
    record = make_record(n_test=6, n_non=4)
    s = scorer("embedding")
    s.embedder = BagOfWords()
    result = run(s.score(record, "cat dog", None))
    q = [1, 1, 0]

    def cos(v):
        return sum(a * b for a, b in zip(q, v, strict=True)) / (math.sqrt(sum(a * a for a in q)) * math.sqrt(sum(b * b for b in v)))

    pos = [cos(BagOfWords().encode([e.text])[0]) for e in record.test]
    neg = [cos(BagOfWords().encode([e.text])[0]) for e in record.non_activating]
    assert set(round(p, 6) for p in pos) == {round(1 / math.sqrt(2), 6), 0.5}  # ties and losses both occur
    assert result.metrics["auc"] == pytest.approx(brute_auc(pos, neg))
    assert result.metrics["mean_similarity_activating"] == pytest.approx(statistics.mean(pos))
    assert result.metrics["mean_similarity_non_activating"] == pytest.approx(statistics.mean(neg))
    assert result.usage.calls == 0 and result.n_prompts == 0


@pytest.mark.slow
def test_embedding_with_the_embedded_sentence_model():
    record = make_record(n_test=3, n_non=3)
    record.test = [make_example(f"te{i}", t.split()) for i, t in
                   enumerate(["my cat sleeps on the sofa", "the kitten chased a mouse", "cats purr loudly"])]
    record.non_activating = [make_example(f"na{i}", t.split(), activating=False) for i, t in
                             enumerate(["stocks fell sharply today", "the bond market rallied", "interest rates rose"])]
    result = run(scorer("embedding").score(record, "cats and kittens", None))
    assert result.metrics["auc"] == pytest.approx(1.0)


# -------------------------------------------------------------------------------------------- surprisal


def test_surprisal_matches_an_independent_loss_computation():
    torch = pytest.importorskip("torch")
    from fixtures.tiny_models import TINY_GPT2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = make_record(n_test=3, n_non=2)
    s = scorer("surprisal", model=str(TINY_GPT2), batch_size=2)
    result = run(s.score(record, "cat", None))

    tok = AutoTokenizer.from_pretrained(TINY_GPT2)
    model = AutoModelForCausalLM.from_pretrained(TINY_GPT2).eval()
    prefix = s.prompts["scorers.surprisal.prefix"]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []

    def loss(explanation: str, text: str) -> float:
        p = bos + tok(prefix.replace("{explanation}", explanation), add_special_tokens=False)["input_ids"]
        t = tok(text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + t])
        labels = ids.clone()
        labels[0, : len(p)] = -100
        with torch.no_grad():
            return float(model(input_ids=ids, labels=labels).loss)

    baseline = s.prompts["scorers.surprisal.baseline_explanation"]
    gains = {}
    for e in record.test + record.non_activating:
        gains[e.id] = loss(baseline, e.text) - loss("cat", e.text)
    by_id = {p.example_id: p for p in result.predictions}
    for eid, gain in gains.items():
        assert by_id[eid].score == pytest.approx(gain, abs=1e-4)
        assert by_id[eid].prediction == int(by_id[eid].score > 0)
    pos = [gains[e.id] for e in record.test]
    neg = [gains[e.id] for e in record.non_activating]
    assert result.metrics["auc"] == pytest.approx(brute_auc(pos, neg))
    assert result.metrics["mean_gain_activating"] == pytest.approx(statistics.mean(pos), abs=1e-4)


# -------------------------------------------------------------------------------------------- answer format


def test_binary_scorers_ask_for_a_list_of_each_batch_length(monkeypatch):
    record = make_record(n_test=7, n_non=6)  # 13 examples, 5 per prompt: 5, 5, 3
    with ScriptedLLMServer(Reply(text="[1]")) as server:
        provider = openai_provider(server, monkeypatch)
        for name in ("detection", "fuzz"):
            batches = scorer(name).batches(record)
            formats = [scorer(name).batch_params(b, provider)["answer_format"] for b in batches]
            assert formats == [{"type": "binary_list", "length": n} for n in (5, 5, 3)]
            assert "answer_format" not in scorer(name, constrain_answer=False).batch_params(batches[0], provider)

            class Bare(saelab.Provider):  # a provider that is not an LLMProvider gets no answer_format
                name = "bare"

                async def generate(self, messages, **params):
                    raise AssertionError("not called")

            assert "answer_format" not in scorer(name).batch_params(batches[0], Bare())
    assert scorer("simulation").answer_format(batches[0]) is None


def sentence_example(eid: str, text: str, hot: set[str], activating: bool) -> Example:
    """An example of real words; activating ones fire on the words in ``hot``."""
    words = text.split(" ")
    acts = [5.0 if activating and w.strip(".,").lower() in hot else 0.0 for w in words]
    return make_example(eid, words, acts, activating=activating, quantile=1 if activating else None)


WATER = ["They walked along the river until sunset.", "The lake was frozen all winter.",
         "Ships crossed the sea in the storm.", "She swam in the ocean every morning.",
         "A small stream ran past the farm.", "Fish live in the river near town.", "The ocean was calm and blue.",
         "We camped by the lake last summer.", "The sea air smelled of salt.", "Water from the stream was cold."]
OTHER = ["The committee approved the budget on Monday.", "He wrote a letter to his mother.",
         "The price of bread went up again.", "She plays the violin in an orchestra.",
         "Our train was delayed by an hour.", "The software update fixed several bugs.",
         "They elected a new mayor in May.", "My cat sleeps on the sofa.", "The museum opens at nine.",
         "He bought a red bicycle."]


@pytest.mark.slow
def test_offline_smollm2_explains_and_scores_with_parseable_answers():
    """The offline pipeline on the embedded SmolLM2: one explanation (one line, no degenerate repetition)
    and detection + fuzz with constrained 0/1 lists: non-null metrics and zero parse failures."""
    from saelab.llm import make_provider
    from saelab.records import LatentRecord, LatentStats

    hot = {"river", "lake", "sea", "ocean", "stream"}
    record = LatentRecord(
        hookpoint="layers.15", latent=3,
        train=[sentence_example(f"tr{i}", t, hot, True) for i, t in enumerate(WATER)],
        test=[sentence_example(f"te{i}", t, hot, True) for i, t in enumerate(WATER)],
        non_activating=[sentence_example(f"na{i}", t, hot, False) for i, t in enumerate(OTHER)],
        stats=LatentStats(frequency=0.01, max_activation=5.0, firing_count=10, n_tokens=1000))
    provider = make_provider("offline", cache=False, device="cpu")

    async def pipeline():
        explanation = await saelab.resolve("explainer", "default")({}).explain(record, provider)
        scores = await asyncio.gather(*(scorer(name, log_probs=True).score(record, explanation, provider)
                                        for name in ("detection", "fuzz")))
        return explanation, scores

    explanation, scores = run(pipeline())
    assert explanation.error is None and not explanation.parse_failed and explanation.text
    assert explanation.raw_responses[0].lstrip().startswith("[EXPLANATION]:")
    assert "\n" not in explanation.raw_responses[0]
    words = re.findall(r"\w+", explanation.text.lower())
    trigrams = list(zip(words, words[1:], words[2:], strict=False))
    assert 0 < len(words) <= 60 and len(set(trigrams)) == len(trigrams), explanation.text  # no loop
    for result in scores:
        assert result.failures.examples == 0 and result.failures.prompts == 0 and result.failures.requests == 0
        assert len(result.predictions) == 20 and all(p.prediction in (0, 1) for p in result.predictions)
        for key in ("balanced_accuracy", "accuracy", "recall", "specificity", "auc"):  # defined with both classes
            assert result.metrics[key] is not None, (result.scorer, key, result.metrics)
        assert all(p.probability is not None and 0.0 <= p.probability <= 1.0 for p in result.predictions)
        assert all(re.fullmatch(r" ?\[[01](, ?[01]){4}\]", raw) for raw in result.raw_responses)


# ------------------------------------------------------------------------------- contracts and options


class _DictScorer(saelab.Scorer):
    """A third-party scorer that breaks the contract: it returns a dict instead of a ScoreResult."""

    name = "dict-scorer"
    requires_explanation = False
    uses_provider = False

    async def score(self, record, explanation, provider):
        return {"scorer": self.name, "metrics": {"accuracy": 1.0}}


class _DictScorerPlugin:
    @saelab.hookimpl
    def register_scorers(self, register):
        register(_DictScorer)


def test_a_scorer_returning_the_wrong_type_is_a_one_line_error_through_the_cli(cli, results_dir):
    from test_prompts import make_stage_run

    layout = make_stage_run(results_dir, n=1)
    saelab.register_plugin(_DictScorerPlugin(), name="dict-scorer-plugin")
    r = cli("score", "run", "--scorers", "dict-scorer", "--verbose", "false")
    assert r.exit_code == 2, r.output
    r.assert_user_error("scorer 'dict-scorer' (test_scorers._DictScorer) returned builtins.dict from score(); "
                        "expected saelab.records.ScoreResult")
    assert not layout.score_path("dict-scorer", "layers.1", 0).exists()


def test_the_engine_rejects_a_wrong_result_type_before_saving_it(tmp_path):
    from saelab.layout import RunLayout
    from saelab.pipeline import AutoInterp, make_scorers

    saelab.register_plugin(_DictScorerPlugin(), name="dict-scorer-plugin")
    scorers = make_scorers(["dict-scorer"])
    layout = RunLayout(tmp_path / "run")
    engine = AutoInterp(layout, None, scorers, None, progress=False)
    with pytest.raises(saelab.UsageError, match=r"^scorer 'dict-scorer' .* expected saelab.records.ScoreResult"):
        engine.run([make_record()])
    assert not layout.score_path("dict-scorer", "layers.1", 7).exists()


def test_an_option_addressed_to_one_scorer_is_rejected_when_unknown(cli, results_dir):
    from saelab.pipeline import make_scorers

    shared = {"num_examples_per_scorer_prompt": 3, "seed": 1, "log_probs": False}  # run-level: filtered per scorer
    built = make_scorers(["detection", "embedding"], shared, {"embedding": {"batch_size": 4}})
    assert built[0].options.num_examples_per_scorer_prompt == 3 and built[1].options.batch_size == 4
    with pytest.raises(saelab.UsageError) as err:
        make_scorers(["detection", "embedding"], shared, {"embedding": {"num_examples_per_scorer_prompt": 3}})
    message = str(err.value)
    assert message.startswith("scorer 'embedding' options: unknown option 'num_examples_per_scorer_prompt'; ")
    assert "accepted options: batch_size, device, model" in message
    from test_prompts import make_stage_run

    make_stage_run(results_dir, n=1)
    r = cli("score", "run", "--scorers", "intruder", "--scorer_option", "intruder.highlite", "true")
    assert r.exit_code == 2
    r.assert_user_error("scorer 'intruder' options: unknown option 'highlite'; accepted options:", "highlight")
