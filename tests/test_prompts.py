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
