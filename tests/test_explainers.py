"""Explainers against the real local OpenAI-compatible server through the ``openai`` provider."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import saelab
from interp_helpers import make_example, make_record, openai_provider, user_examples
from llm_server import Reply, ScriptedLLMServer
from saelab.autointerp import FewShotContent, parse_explanation
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
    assert [m["role"] for m in body["messages"]] == ["system", *["user", "assistant"] * 2, "user"]  # 2 few-shot pairs
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
    assert 'Example 1: <<over the moon>> again\nActivations: ("over", 4), (" the", 4), (" moon", 10)\n' in user
    assert 'Activations: (" 1998", 10)' in body["messages"][1]["content"]  # few-shot with activations too
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


# --------------------------------------------------------------------------------------------------
# Few-shot copies


DEMO_ANSWERS = Path(__file__).parent / "fixtures" / "demo_offline_answers.json"
"""The offline explainer's raw answers in `make demo` with the earlier few-shot prompts (cow, money, adverbs)."""


def demo_few_shot():
    """The few-shot answers and example texts the demo's answers were given."""
    from saelab.autointerp import FewShotContent

    data = json.loads(DEMO_ANSWERS.read_text())
    return FewShotContent(tuple(data["few_shot"]["answers"]), tuple(data["few_shot"]["texts"]))


def test_demo_answers_replayed_through_the_copy_detector():
    data = json.loads(DEMO_ANSWERS.read_text())
    few_shot = demo_few_shot()
    flagged = [few_shot.copied_by(parse_explanation(a["raw"])[0]) is not None for a in data["answers"]]
    assert flagged == [a["copied"] for a in data["answers"]]  # the hand check of each answer
    assert (sum(flagged), len(flagged)) == (17, 20)
    # the shipped few-shot prompts no longer hold what the demo copied
    shipped = FewShotContent.from_messages(explainer("default").few_shot())
    assert not any(shipped.copied_by(parse_explanation(a["raw"])[0]) for a in data["answers"] if a["copied"])


@pytest.mark.parametrize("text", [
    "Adverbs saying how or when an action happens.",  # a few-shot answer word for word
    "  ADVERBS saying how   or when an action happens",  # case and spacing do not matter
    "Words like: adverbs saying how or when an action happens!",  # contains a few-shot answer
    "The cow jumped over the moon",  # quotes a few-shot example text
    "A cow jumping over the moon.",  # the same words, inflected
    "Fans on cloud nine after the final whistle",
    "They left the party early",
    "Idioms meaning extremely happy",  # the start of a few-shot answer
])
def test_copy_detector_flags_few_shot_copies(text):
    assert demo_few_shot().copied_by(text) is not None


@pytest.mark.parametrize("text", [
    "The word \"moon\"",
    "Money and banks",  # shares words with an answer, but no run of four
    "Financial terms such as money, banks and credit cards",
    "Adverbs of manner",
    "Words that come after the name of a city",  # a run of generic words only
    "Dates and years in the text of an article",
    "The token \"over\" in phrases such as \"over the years\"",
    "",
])
def test_copy_detector_spares_real_explanations(text):
    assert demo_few_shot().copied_by(text) is None


def test_copy_detector_with_the_shipped_few_shot():
    shipped = FewShotContent.from_messages(explainer("default").few_shot())
    assert shipped.copied_by("Years.") and shipped.copied_by("city  NAMES")  # a short answer, repeated
    assert shipped.copied_by("The mayor of Chicago said")  # an example text
    for text in ("Years and dates in history articles", "Names of cities and countries",
                 "The highlighted tokens of these examples have in common that they are years"):
        assert shipped.copied_by(text) is None  # a short answer inside a longer one, the question echoed


def test_copied_answer_is_a_failed_explanation(monkeypatch):
    answer = "[EXPLANATION]: City names."
    with ScriptedLLMServer(answer) as server:
        copied = explain("default", make_record(), server, monkeypatch)
        unseen = explain("default", make_record(), server, monkeypatch, few_shot=False)
    assert copied.parse_failed and copied.failure == "copied_few_shot" and not copied.usable
    assert copied.text == "City names." and copied.raw_responses == [answer]
    assert Explanation.from_json(copied.to_json()).failure == "copied_few_shot"
    # without few-shot examples in the prompt there is nothing to copy
    assert not unseen.parse_failed and unseen.failure is None and unseen.usable
    with ScriptedLLMServer("[EXPLANATION]: The cow jumped over the moon") as server:
        contrastive = explain("contrastive", make_record(), server, monkeypatch)
    assert contrastive.usable  # the contrastive few-shot example is about river banks, not the cow


def test_explain_command_reports_copies_and_does_not_score_them(cli, results_dir):
    import json

    from pipeline_helpers import SmartHandler, kind_of
    from test_prompts import make_stage_run

    layout = make_stage_run(results_dir, n=2)
    handler = SmartHandler()

    def copying(request):
        if kind_of(request) == "explain":
            return "[EXPLANATION]: the mayor of Chicago"
        return handler(request)

    args = ["--explainer_provider", "openai", "--explainer_model", "test-model", "--verbose", "false",
            "--provider_option", "max_retries", "0"]
    with ScriptedLLMServer(copying) as server:
        env = {"OPENAI_API_KEY": "sk-test"}
        r = cli("explain", "run", "--explainer_api_base_url", server.base_url, *args, env=env)
        assert r.exit_code in (0, 3), r.output  # 3 where a run whose every latent failed says so
        assert len(server.chat_requests) == 2
        cli("score", "run", "--scorers", "detection", "--explainer_api_base_url", server.base_url, *args, env=env)
        assert len(server.chat_requests) == 2  # copied explanations are not scored
    stored = [Explanation.load(layout.explanation_path("layers.1", i)) for i in (0, 1)]
    assert [(e.failure, e.parse_failed) for e in stored] == [("copied_few_shot", True)] * 2
    summary = json.loads(layout.summary_json.read_text())
    row = next(row for row in summary["rows"] if row["name"] == "default")
    assert row["failure_reasons"] == {"copied_few_shot": 2}


# ------------------------------------------------------------------------------- contracts and options


class _TextExplainer(saelab.Explainer):
    """A third-party explainer that breaks the contract: it returns the explanation's text only."""

    name = "text-explainer"

    async def explain(self, record, provider):
        return "the word cat"


class _TextExplainerPlugin:
    @saelab.hookimpl
    def register_explainers(self, register):
        register(_TextExplainer)


def test_an_explainer_returning_the_wrong_type_is_a_one_line_error_through_the_cli(cli, results_dir):
    from test_prompts import make_stage_run

    layout = make_stage_run(results_dir, n=1)
    saelab.register_plugin(_TextExplainerPlugin(), name="text-explainer-plugin")
    with ScriptedLLMServer("[EXPLANATION]: unused") as server:
        r = cli("explain", "run", "--explainer", "text-explainer", "--explainer_provider", "openai",
                "--explainer_api_base_url", server.base_url, "--explainer_model", "test-model", "--verbose", "false",
                env={"OPENAI_API_KEY": "sk-test"})
    assert r.exit_code == 2, r.output
    r.assert_user_error("explainer 'text-explainer' (test_explainers._TextExplainer) returned builtins.str from explain(); "
                        "expected saelab.records.Explanation")
    assert not layout.explanation_path("layers.1", 0).exists()


def test_an_unknown_explainer_option_names_the_key_the_plugin_and_the_accepted_keys(cli, results_dir):
    from saelab.pipeline import make_explainer
    from test_prompts import make_stage_run

    assert make_explainer("contrastive", {"max_non_activating": 3}).options.max_non_activating == 3
    with pytest.raises(saelab.UsageError) as err:
        make_explainer("contrastive", {"show_activations": True})  # an option of the default explainer only
    assert str(err.value).startswith("explainer 'contrastive' options: unknown option 'show_activations'; "
                                     "accepted options: ")
    assert "max_non_activating" in str(err.value) and "\n" not in str(err.value)
    make_stage_run(results_dir, n=1)
    r = cli("explain", "run", "--explainer_option", "shw_activations", "true", "--verbose", "false")
    assert r.exit_code == 2
    r.assert_user_error("explainer 'default' options: unknown option 'shw_activations'; accepted options:",
                        "show_activations")
