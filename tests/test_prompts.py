"""Prompt loading: shipped defaults, override precedence, unknown keys, version hashes."""

from __future__ import annotations

import pytest
import saelab
import yaml
from saelab.prompts import default_prompts, fill, load_prompts, prompt_version


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("PROMPT_CONFIG_FILE", raising=False)
    monkeypatch.chdir(tmp_path)


def test_defaults_have_the_documented_keys():
    p = load_prompts()
    for key in ("explainers.default.system", "explainers.contrastive.system", "explainers.single_token.system",
                "explainers.np_max_act.system", "scorers.detection.system", "scorers.fuzz.system",
                "scorers.simulation.system", "scorers.intruder.system", "scorers.surprisal.prefix",
                "scorers.embedding.query", "explainers.default.examples"):
        assert key in p
    assert "[EXPLANATION]:" in p["explainers.default.system"]
    assert p.source is None


def test_override_precedence(tmp_path, monkeypatch):
    cli_file = write(tmp_path / "cli.yaml", {"scorers": {"detection": {"system": "from cli"}}})
    env_file = write(tmp_path / "env.yaml", {"scorers": {"detection": {"system": "from env"}}})
    write(tmp_path / "prompts.yaml", {"scorers": {"detection": {"system": "from cwd"}}})
    default = default_prompts()["scorers.detection.system"]
    # override off: the defaults even though prompts.yaml and the env variable exist
    monkeypatch.setenv("PROMPT_CONFIG_FILE", str(env_file))
    assert load_prompts()["scorers.detection.system"] == default
    assert load_prompts(cli_file, enabled=True)["scorers.detection.system"] == "from cli"
    assert load_prompts(enabled=True)["scorers.detection.system"] == "from env"
    monkeypatch.delenv("PROMPT_CONFIG_FILE")
    p = load_prompts(enabled=True)
    assert p["scorers.detection.system"] == "from cwd" and p.source.endswith("prompts.yaml")
    # only the overridden subset changes
    assert p["scorers.fuzz.system"] == default_prompts()["scorers.fuzz.system"]
    # a file given without the flag still applies
    assert load_prompts(cli_file)["scorers.detection.system"] == "from cli"


def test_override_enabled_without_any_file(tmp_path):
    with pytest.raises(saelab.UsageError, match="--prompt_config_file"):
        load_prompts(enabled=True)


def test_unknown_key_is_one_line_listing_valid_keys(tmp_path):
    bad = write(tmp_path / "bad.yaml", {"scorers": {"detektion": {"system": "x"}}})
    with pytest.raises(saelab.UsageError) as err:
        load_prompts(bad, enabled=True)
    message = str(err.value)
    assert "scorers.detektion.system" in message and "scorers.detection.system" in message
    assert "\n" not in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(saelab.UsageError, match="does not exist"):
        load_prompts(tmp_path / "nope.yaml", enabled=True)
    (tmp_path / "broken.yaml").write_text("scorers: [unclosed")
    with pytest.raises(saelab.UsageError, match="cannot be parsed"):
        load_prompts(tmp_path / "broken.yaml", enabled=True)
    wrong_type = write(tmp_path / "wrong.yaml", {"scorers": {"detection": {"examples": "not a list"}}})
    with pytest.raises(saelab.UsageError, match="must be a list"):
        load_prompts(wrong_type, enabled=True)


def test_autointerp_full_keys_are_accepted(tmp_path):
    f = write(tmp_path / "ai.yaml", {"explainers": {"default": {"system_contrastive": "C", "system_single_token": "S"},
                                                    "np_max_act": {"system_concise": "N"}}})
    p = load_prompts(f, enabled=True)
    assert p["explainers.contrastive.system"] == "C"
    assert p["explainers.single_token.system"] == "S"
    assert p["explainers.np_max_act.system"] == "N"


def test_prompt_version_changes_with_a_prompt(tmp_path):
    f = write(tmp_path / "o.yaml", {"scorers": {"detection": {"system": "changed"}}})
    default, changed = load_prompts(), load_prompts(f)
    assert default.version("scorers.detection") != changed.version("scorers.detection")
    assert default.version("scorers.fuzz") == changed.version("scorers.fuzz")
    assert len(default.version("scorers.detection")) == 12
    assert prompt_version({"a": "x"}) == prompt_version({"a": "x"}) != prompt_version({"a": "y"})
    # the scorer instance reports the version of the prompts it was given
    cls = saelab.resolve("scorer", "detection")
    assert cls(prompts=default).prompt_version() != cls(prompts=changed).prompt_version()
    assert cls(prompts=default).prompt_version() == default.version("scorers.detection")


def test_fill_leaves_other_braces():
    assert fill('{explanation}: [1, 0] {"a": 1} {other}', explanation="cats") == 'cats: [1, 0] {"a": 1} {other}'


# --------------------------------------------------------------------------------------------------
# Placeholders: AutoInterp Full's {prompt} and the start-up check of every template


def make_stage_run(results_dir, n: int = 2):
    """A run directory holding ``n`` saved latent records (what `saelab run` writes before explaining)."""
    import json

    from interp_helpers import make_record
    from saelab.layout import RunLayout
    from saelab.pipeline import RecordSet, save_records

    layout = RunLayout(results_dir / "run")
    records = []
    for i in range(n):
        record = make_record()
        record.latent = i
        records.append(record)
    save_records(layout, RecordSet("layers.1", records, {}, "fp"))
    (layout.root / "run_config.json").write_text(json.dumps({"commands": {}}))
    return layout


def stage_args(server, prompt_file, *extra: str) -> list[str]:
    return ["--explainer_provider", "openai", "--explainer_api_base_url", server.base_url, "--explainer_model",
            "test-model", "--provider_option", "max_retries", "0", "--verbose", "false",
            "--prompt_override", "--prompt_config_file", str(prompt_file), *extra]


def test_prompt_placeholder_in_system_gets_the_examples_through_the_cli(cli, results_dir, tmp_path):
    from llm_server import ScriptedLLMServer
    from saelab.prompts import PROMPT_IN_SYSTEM_REQUEST

    make_stage_run(results_dir, n=1)
    f = write(tmp_path / "ai.yaml", {"explainers": {"default": {
        "system": "Explain the latent.\n\n{prompt}\n\nAnswer as [EXPLANATION]: <text>"}}})
    with ScriptedLLMServer("[EXPLANATION]: the word cat") as server:
        r = cli("explain", "run", *stage_args(server, f), env={"OPENAI_API_KEY": "sk-test"})
        assert r.exit_code == 0, r.output
        messages = server.chat_requests[0].body["messages"]
    system, user = messages[0]["content"], messages[-1]["content"]
    assert "{prompt}" not in system
    assert "Example 1: the wtr0 <<cat>>" in system and system.startswith("Explain the latent.\n\nExamples of a new")
    assert user == PROMPT_IN_SYSTEM_REQUEST and "<<cat>>" not in user  # the examples are sent once
    assert [m["role"] for m in messages] == ["system", *["user", "assistant"] * 2, "user"]


def test_prompt_placeholder_in_a_scorer_system_template():
    from interp_helpers import make_record
    from saelab.prompts import PROMPT_IN_SYSTEM_REQUEST

    p = load_prompts_from({"scorers": {"detection": {"system": "Decide.\n{prompt}"}}})
    messages = saelab.resolve("scorer", "detection")({"few_shot": False}, p).messages(make_record(), "cats")[0]
    assert messages[0]["content"].startswith("Decide.\nLatent explanation: cats\n\nText examples:\n\nExample 1:")
    assert messages[1] == {"role": "user", "content": PROMPT_IN_SYSTEM_REQUEST}


def load_prompts_from(data, name: str = "override.yaml"):
    from pathlib import Path

    return load_prompts(write(Path.cwd() / name, data), enabled=True)


@pytest.mark.parametrize("kind,plugin,key,template,expected", [
    ("scorer", "detection", "scorers.detection.user", "Explanation: {explanation}",
     "missing placeholder {examples}; accepted placeholders: {explanation} (required), {examples} (required)"),
    ("scorer", "fuzz", "scorers.fuzz.user", "{explanation}\n{examples}\n{exemples}", "unknown placeholder {exemples}"),
    ("scorer", "simulation", "scorers.simulation.system", "Simulate {explanation}",
     "unknown placeholder {explanation}; accepted placeholders: {prompt}"),
    ("scorer", "intruder", "scorers.intruder.user", "Find the odd one out.", "missing placeholder {examples}"),
    ("scorer", "surprisal", "scorers.surprisal.prefix", "Some text:\n", "missing placeholder {explanation}"),
    ("scorer", "embedding", "scorers.embedding.query", "{explanation} {examples}", "unknown placeholder {examples}"),
    ("explainer", "default", "explainers.default.user", "{prompt}", "unknown placeholder {prompt} and missing "
     "placeholder {examples}; accepted placeholders: {examples} (required)"),
    ("explainer", "default", "explainers.default.cot", "Think about {examples}", "accepted placeholders: none"),
    ("explainer", "contrastive", "explainers.contrastive.user", "{activating}",
     "missing placeholder {non_activating}"),
    ("explainer", "single-token", "explainers.single_token.user", "{examples}", "missing placeholder {tokens}"),
    ("explainer", "np_max_act", "explainers.np_max_act.system", "Label {top_logits}",
     "unknown placeholder {top_logits}"),
])
def test_every_template_is_checked_when_the_plugin_is_built(kind, plugin, key, template, expected):
    section, name, leaf = key.split(".")
    p = load_prompts_from({section: {name: {leaf: template}}})
    with pytest.raises(saelab.UsageError) as err:
        saelab.resolve(kind, plugin)(prompts=p)
    message = str(err.value)
    assert message.startswith(f"prompt {key!r} in ") and expected in message and "\n" not in message


def test_valid_overrides_and_the_defaults_pass_the_check():
    p = load_prompts_from({"explainers": {"np_max_act": {"user": "{examples}"},  # logits are optional
                                          "single_token": {"system": "{prompt}", "user": "{tokens}"}},
                           "scorers": {"detection": {"user": "{examples}\n\n{explanation}"}}})
    for kind in ("explainer", "scorer"):
        for name in saelab.registry(kind):
            for prompts in (p, load_prompts()):
                assert saelab.resolve(kind, name)(prompts=prompts).prompts is prompts


def test_template_without_examples_stops_the_score_command_before_any_request(cli, results_dir, tmp_path):
    from llm_server import ScriptedLLMServer

    make_stage_run(results_dir)
    f = write(tmp_path / "bad.yaml", {"scorers": {"detection": {"user": "Explanation: {explanation}"}}})
    with ScriptedLLMServer("[1, 0, 1, 0, 1]") as server:
        r = cli("score", "run", *stage_args(server, f, "--scorers", "detection"), env={"OPENAI_API_KEY": "sk-test"})
        assert len(server.requests) == 0
    assert r.exit_code == 2
    r.assert_user_error("prompt 'scorers.detection.user'", "missing placeholder {examples}",
                        "{explanation} (required), {examples} (required)")


def test_yaml_parse_error_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("scorers:\n  detection:\n    system: ok\n   user: misindented\n")
    with pytest.raises(saelab.UsageError) as err:
        load_prompts(bad, enabled=True)
    assert "cannot be parsed: line 4, column 4:" in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------------
# Prompts ship with their plugin


def test_every_builtin_ships_its_prompts_next_to_its_module():
    from importlib import resources

    from saelab.prompts import prompt_file_location

    assert not resources.files("saelab").joinpath("prompts.yaml").is_file()  # core holds no plugin's prompts
    defaults = default_prompts()
    for kind in ("explainer", "scorer"):
        for name in saelab.registry(kind):
            cls = saelab.resolve(kind, name)
            location = prompt_file_location(cls, cls.prompt_file)
            package = cls.__module__.rpartition(".")[0]
            assert cls.prompt_file and location.is_file()
            assert str(location) == str(resources.files(package).joinpath(cls.prompt_file))
            own = cls.default_prompts()
            assert own and all(key.startswith(cls.prompt_prefix + ".") for key in own)
            assert {k: defaults[k] for k in own} == own  # load_prompts gathers exactly these
            assert set(own) == {f"{cls.prompt_prefix}.{k}" for k in yaml.safe_load(location.read_text())}
            # every template the plugin reads is declared with its placeholders
            templates = {k.rpartition(".")[2] for k, v in own.items() if isinstance(v, str)}
            assert templates == set(cls.prompt_placeholders), (kind, name)


def test_prompt_versions_of_the_builtins_did_not_change_when_prompts_moved():
    # the versions stored with every result before the prompts left core/prompts.yaml: results computed
    # then (the demo's) stay valid
    stored = {"explainer:default": "1402a7261576", "explainer:contrastive": "365d62f274fd",
              "explainer:single-token": "71e59bf170a7", "explainer:np_max_act": "8482a5425fc3",
              "scorer:detection": "64b7e949c5ce", "scorer:fuzz": "ff1c86bc4649",
              "scorer:simulation": "e14ade1c2025", "scorer:intruder": "2dfadb7d668b",
              "scorer:surprisal": "7fc0a3ef05ee", "scorer:embedding": "5a40bf2ce7a6"}
    p = load_prompts()
    for key, version in stored.items():
        kind, name = key.split(":")
        cls = saelab.resolve(kind, name)
        assert cls(prompts=p).prompt_version() == cls().prompt_version() == version, key


THIRD_PARTY_PROMPTS = {"system": "Judge the explanation.", "user": "{explanation}\n{examples}"}


def third_party_scorer(tmp_path, monkeypatch, package: str = "tp_scorer_pkg"):
    """A third-party package (on sys.path) whose scorer ships ``judge.yaml`` next to its module."""
    import importlib
    import sys

    root = tmp_path / "site"
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text("")
    (root / package / "judge.yaml").write_text(yaml.safe_dump(THIRD_PARTY_PROMPTS))
    (root / package / "plugin.py").write_text(
        "from saelab import hookimpl\n"
        "from saelab.autointerp import BinaryPromptScorer\n"
        "from saelab.prompts import SYSTEM_PLACEHOLDERS, Placeholders\n\n\n"
        "class JudgeScorer(BinaryPromptScorer):\n"
        "    '''A third-party scorer with its own prompts.'''\n\n"
        "    name = 'judge'\n"
        "    prompt_prefix = 'scorers.judge'\n"
        "    prompt_file = 'judge.yaml'\n"
        "    prompt_placeholders = {'system': SYSTEM_PLACEHOLDERS,\n"
        "                           'user': Placeholders(required=('explanation', 'examples'))}\n\n\n"
        "@hookimpl\n"
        "def register_scorers(register):\n"
        "    register(JudgeScorer)\n")
    monkeypatch.syspath_prepend(str(root))
    module = importlib.import_module(f"{package}.plugin")
    monkeypatch.setitem(sys.modules, f"{package}.plugin", module)
    return module


def test_a_third_party_scorer_ships_its_prompts_the_same_way(tmp_path, monkeypatch):
    from interp_helpers import make_record

    module = third_party_scorer(tmp_path, monkeypatch)
    assert "scorers.judge.system" not in load_prompts()
    saelab.register_plugin(module, name="judge-plugin")
    defaults = load_prompts()
    assert defaults["scorers.judge.system"] == THIRD_PARTY_PROMPTS["system"]
    assert defaults["scorers.detection.system"] == default_prompts()["scorers.detection.system"]
    # the same dotted-key override as a builtin's, placeholders checked the same way
    p = load_prompts_from({"scorers": {"judge": {"system": "Judge strictly."}}})
    judge = saelab.resolve("scorer", "judge")({"few_shot": False}, p)
    messages = judge.messages(make_record(), None)[0]
    assert messages[0]["content"] == "Judge strictly." and messages[1]["content"].startswith("\nExample 1:")
    assert judge.prompt_version() != saelab.resolve("scorer", "judge")().prompt_version()
    bad = load_prompts_from({"scorers": {"judge": {"user": "{explanation}"}}}, name="bad.yaml")
    with pytest.raises(saelab.UsageError, match="prompt 'scorers.judge.user' in .* missing placeholder {examples}"):
        saelab.resolve("scorer", "judge")(prompts=bad)
    # a subclass in another module (here: this test file) reads the file its parent declares
    sub = type("StricterJudge", (module.JudgeScorer,), {"name": "stricter-judge", "__module__": __name__})
    assert sub.default_prompts() == {f"scorers.judge.{k}": v for k, v in THIRD_PARTY_PROMPTS.items()}


def test_an_unregistered_plugin_class_still_gets_its_own_defaults(tmp_path, monkeypatch):
    module = third_party_scorer(tmp_path, monkeypatch, package="tp_scorer_unregistered")
    given = load_prompts()  # loaded while the plugin is not registered
    judge = module.JudgeScorer(prompts=given)
    assert judge.prompts["scorers.judge.user"] == THIRD_PARTY_PROMPTS["user"]
    assert judge.prompts["scorers.detection.user"] == given["scorers.detection.user"]
    assert judge.prompt_version() == module.JudgeScorer().prompt_version()


def test_override_of_a_disabled_plugins_prompt_is_reported(tmp_path):
    from saelab import manager

    f = write(tmp_path / "o.yaml", {"scorers": {"fuzz": {"system": "x"}}})
    assert load_prompts(f)["scorers.fuzz.system"] == "x"
    manager.disable(["fuzz"])
    with pytest.raises(saelab.UsageError) as err:
        load_prompts(f)
    message = str(err.value)
    assert message.startswith("unknown prompt key 'scorers.fuzz.system' in ") and "\n" not in message
    assert "the prompts of disabled plugins (fuzz) cannot be overridden" in message
    assert "scorers.detection.system" in message  # the valid keys of the enabled plugins


def test_override_keys_under_a_plugin_alias_are_accepted(tmp_path):
    f = write(tmp_path / "a.yaml", {"scorers": {"recall": {"user": "{explanation} {examples}"}},
                                    "explainers": {"single-token": {"user": "{tokens}"}}})
    p = load_prompts(f)
    assert p["scorers.detection.user"] == "{explanation} {examples}"
    assert p["explainers.single_token.user"] == "{tokens}"
