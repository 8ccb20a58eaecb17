"""Explainers against the real local OpenAI-compatible server through the ``openai`` provider."""

from __future__ import annotations

import asyncio

import pytest
import saelab
from interp_helpers import make_example, make_record, openai_provider, user_examples
from llm_server import Reply, ScriptedLLMServer
from saelab.autointerp import parse_explanation
from saelab.records import Explanation


def explainer(name: str, **options):
    return saelab.resolve("explainer", name)(options)


def explain(name, record, server, monkeypatch, **options):
    provider = openai_provider(server, monkeypatch)
    return asyncio.run(explainer(name, **options).explain(record, provider))


def test_default_explainer_prompt_and_parse(monkeypatch):
    record = make_record(n_train=3)
    with ScriptedLLMServer("The tokens are all cats.\n[EXPLANATION]: the word \"cat\"\n") as server:
        result = explain("default", record, server, monkeypatch)
    assert result.text == 'the word "cat"' and not result.parse_failed and result.error is None
    assert result.raw_responses == ["The tokens are all cats.\n[EXPLANATION]: the word \"cat\"\n"]
    body = server.chat_requests[0].body
    assert body["messages"][0]["role"] == "system" and "[EXPLANATION]:" in body["messages"][0]["content"]
    assert [m["role"] for m in body["messages"]] == ["system", *["user", "assistant"] * 3, "user"]  # 3 few-shot pairs
    lines = user_examples(body)
    assert lines == ["the wtr0 <<cat>>", "the wtr1 <<cat>> sat", "the wtr2 <<cat>> sat on"]
    assert "Activations:" not in body["messages"][-1]["content"]
    assert result.explainer == "default" and result.provider == "openai" and result.model == "test-model"
    assert result.usage.calls == 1 and result.usage.completion_tokens > 0
    assert result.prompt_version and result.fingerprint
    assert Explanation.from_json(result.to_json()) == result


def test_default_explainer_activations_and_cot(monkeypatch):
    record = make_record(n_train=2)
    record.train = [make_example("tr0", ["over", "the", "moon", "again"], [3.5, 4.0, 10.0, 0.5])]
    with ScriptedLLMServer("(1) ... (3) ...\n[EXPLANATION]: idiom for happiness") as server:
        result = explain("default", record, server, monkeypatch, show_activations=True, cot=True)
    body = server.chat_requests[0].body
    user = body["messages"][-1]["content"]
    # 3.5 > 0.3 * 10: "over the moon" merged; 0.5 not highlighted; 0-10 scale against the latent max (10)
    assert user == 'Example 1: <<over the moon>> again\nActivations: ("over", 4), (" the", 4), (" moon", 10)'
    system = body["messages"][0]["content"]
    assert "step by step" in system and "activation values" in system
    assert "(1) Highlighted" in body["messages"][2]["content"]  # chain-of-thought few-shot answer
    assert result.text == "idiom for happiness"


def test_explanation_without_marker_is_a_parse_failure(monkeypatch):
    record = make_record()
    with ScriptedLLMServer("I am not sure what this is.\nMaybe animals") as server:
        result = explain("default", record, server, monkeypatch)
    assert result.parse_failed and result.text == "Maybe animals"
    assert result.raw_responses == ["I am not sure what this is.\nMaybe animals"]


def test_failed_request_sets_error(monkeypatch):
    with ScriptedLLMServer(Reply(status=401)) as server:
        result = explain("default", make_record(), server, monkeypatch)
    assert result.error and "401" in result.error and result.parse_failed and result.raw_responses == []


def test_contrastive_explainer_shows_both_groups(monkeypatch):
    record = make_record(n_train=2, n_non=3)
    record.train_non_activating = [make_example("xn0", ["a", "dog", "barked"], activating=False)]
    with ScriptedLLMServer("[EXPLANATION]: cats rather than dogs") as server:
        result = explain("contrastive", record, server, monkeypatch)
    user = server.chat_requests[0].body["messages"][-1]["content"]
    assert user.startswith("ACTIVATING EXAMPLES:\nExample 1: the wtr0 <<cat>>")
    assert "NON-ACTIVATING EXAMPLES:\nExample 1: a dog barked" in user
    assert "wna0" not in user  # scoring negatives are not shown when train negatives exist
    assert result.text == "cats rather than dogs" and result.explainer == "contrastive"


def test_contrastive_falls_back_to_scoring_negatives():
    record = make_record(n_train=1, n_non=2)
    user = explainer("contrastive", max_non_activating=1).messages(record)[0][-1]["content"]
    assert "wna0" in user and "wna1" not in user


def test_single_token_explainer_counts_strongest_tokens(monkeypatch):
    record = make_record(n_train=1)
    record.train = [make_example("a", ["x", "cat"]), make_example("b", ["cat", "y"], [5.0, 0.0]),
                    make_example("c", ["the", "dog"], [0.1, 2.0])]
    with ScriptedLLMServer("[EXPLANATION]: cat") as server:
        result = explain("single-token", record, server, monkeypatch)
    user = server.chat_requests[0].body["messages"][-1]["content"]
    assert user.startswith('Strongest tokens:\n" cat" (x1)\n"cat" (x1)\n" dog" (x1)')
    assert result.text == "cat"
    assert saelab.resolve("explainer", "single_token").name == "single-token"


def test_np_max_act_uses_top_logits_and_cuts_label(monkeypatch):
    record = make_record(n_train=3)
    answer = "[EXPLANATION]: \"Cat mentions in simple sentences about pets and their many habits.\""
    with ScriptedLLMServer(answer) as server:
        result = explain("np_max_act", record, server, monkeypatch, max_words=4)
    user = server.chat_requests[0].body["messages"][-1]["content"]
    assert 'Promoted output tokens: " cat", " kitten"' in user and 'Suppressed output tokens: " dog"' in user
    # strongest example first (activation grows with the position of "cat")
    assert result.text == "Cat mentions in simple" and not result.parse_failed
    with ScriptedLLMServer("Feline words.") as server:
        bare = explain("np_max_act", record, server, monkeypatch)
    assert bare.text == "Feline words" and not bare.parse_failed


@pytest.mark.parametrize("text,expected", [
    ("[EXPLANATION]: cats", ("cats", True)),
    ("reasoning [explanation]: first\n[EXPLANATION]:\n  second line  ", ("second line", True)),
    ("Explanation: 'quoted'", ("quoted", True)),
    ("", ("", False)),
])
def test_parse_explanation(text, expected):
    assert parse_explanation(text) == expected


def test_explainers_are_registered_with_options():
    names = set(saelab.registry("explainer"))
    assert {"default", "contrastive", "single-token", "np_max_act"} <= names
    with pytest.raises(saelab.UsageError, match="unknown option"):
        explainer("default", activations=True)


def test_explainers_ask_for_one_explanation_line(monkeypatch):
    with ScriptedLLMServer("[EXPLANATION]: x") as server:
        provider = openai_provider(server, monkeypatch)
        line = {"type": "prefixed_line", "prefix": "[EXPLANATION]:"}
        for name in ("default", "contrastive", "single-token", "np_max_act"):
            assert explainer(name).provider_params(provider)["answer_format"] == line
            assert "answer_format" not in explainer(name, constrain_answer=False).provider_params(provider)
        cot = explainer("default", cot=True).provider_params(provider)
        assert "answer_format" not in cot and cot["max_tokens"] == 500  # reasoning spans lines
        assert explainer("default").provider_params(provider)["max_tokens"] == 100
        result = explain("default", make_record(), server, monkeypatch)
    assert result.text == "x" and "answer_format" not in server.chat_requests[0].body  # not sent to APIs
