"""Configs: run_config.json (resolved values, versions, plugins, redaction) and defaults < file < flags."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
import saelab
from pydantic import SecretStr
from saelab import Options
from saelab.cli import MultiValueOption
from saelab.config import (
    REDACTED,
    config_option,
    is_secret_key,
    merge_config,
    read_run_config,
    redact,
    redact_argv,
    write_run_config,
)
from saelab.errors import UsageError


class CacheOptions(Options):
    """Toy command options."""

    model: str = "smollm2"
    """Model."""
    n_tokens: int = 1000
    """Tokens to cache."""
    hf_token: SecretStr | None = None
    """Hub token."""
    hookpoints: list[str] = []
    """Hookpoints."""
    dtype: str = "float32"
    """Cache dtype."""


def test_secret_key_names():
    for key in ("hf_token", "api_key", "OPENAI_API_KEY", "explainer_api_key", "password", "client_secret",
                "token", "access-token", "apiKey"):
        assert is_secret_key(key), key
    for key in ("n_tokens", "max_new_tokens", "bos_token", "tokenizer", "pad_token", "key", "top_k", "name"):
        assert not is_secret_key(key), key


def test_write_run_config_records_values_versions_and_plugins(tmp_path):
    options = CacheOptions(n_tokens=200, hookpoints=["layers.1"])
    path = write_run_config(tmp_path / "run", "cache", options, extra={"activation_cache": tmp_path / "store" / "abc"},
                            argv=["smollm2", "--n_tokens", "200"])
    assert path == tmp_path / "run" / "run_config.json"
    data = json.loads(path.read_text())
    assert data["command"] == "cache"
    assert data["config"] == {"model": "smollm2", "n_tokens": 200, "hf_token": None, "hookpoints": ["layers.1"],
                              "dtype": "float32"}
    assert data["activation_cache"] == str(tmp_path / "store" / "abc")
    assert data["saelab_version"] == saelab.manager.saelab_version()
    assert data["python"].count(".") == 2
    import torch

    assert data["torch"]["version"] == torch.__version__
    assert data["plugins"]["inspect"]["module"] == "saelab.plugins.commands.inspect"
    assert data["plugins"]["inspect"]["distribution"] == "saelab"
    assert data["argv"] == ["smollm2", "--n_tokens", "200"]
    assert data["created"].endswith("+00:00")


def test_secrets_are_redacted_everywhere(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-or-very-secret-value")
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnop")
    config = {
        "hf_token": "hf_explicit_token_value",
        "explainer_api_key": "plain-key-123",
        "explainer_api_base_url": "https://x.example/v1?key=sk-or-very-secret-value",
        "nested": {"password": "pw", "headers": ["Bearer hf_abcdefghijklmnop"]},
        "secret_obj": SecretStr("hidden-in-model"),
        "n_tokens": 5,
        "bos_token": "<s>",
    }
    path = write_run_config(tmp_path, "run", config,
                            argv=["--hf_token", "hf_cli_token_value", "--explainer_api_key=abc", "--n_tokens", "5"])
    text = path.read_text()
    for secret in ("hf_explicit_token_value", "plain-key-123", "sk-or-very-secret-value", "hf_abcdefghijklmnop",
                   "hidden-in-model", "hf_cli_token_value", '"pw"', "=abc"):
        assert secret not in text, secret
    data = json.loads(text)
    assert data["config"]["hf_token"] == REDACTED
    assert data["config"]["explainer_api_base_url"] == f"https://x.example/v1?key={REDACTED}"
    assert data["config"]["nested"]["headers"] == [f"Bearer {REDACTED}"]
    assert data["config"]["n_tokens"] == 5 and data["config"]["bos_token"] == "<s>"
    assert data["argv"] == ["--hf_token", REDACTED, f"--explainer_api_key={REDACTED}", "--n_tokens", "5"]


def test_secret_str_in_options_model_is_redacted(tmp_path):
    path = write_run_config(tmp_path, "cache", CacheOptions(hf_token="hf_model_secret_1"), argv=[])
    assert "hf_model_secret_1" not in path.read_text()
    assert json.loads(path.read_text())["config"]["hf_token"] == REDACTED


def test_unset_secret_stays_visible_as_null():
    assert redact({"hf_token": None, "api_key": ""}, secrets=[]) == {"hf_token": None, "api_key": ""}


def test_redact_argv_leaves_other_flags():
    assert redact_argv(["--name", "demo", "--api_key", "x", "-o", "k", "32"], secrets=[]) == [
        "--name", "demo", "--api_key", REDACTED, "-o", "k", "32"]


def test_several_commands_share_one_run_config(tmp_path):
    write_run_config(tmp_path, "cache", {"n_tokens": 10}, extra={"activation_cache": "store/abc"}, argv=[])
    write_run_config(tmp_path, "train", {"architecture": "topk"}, argv=[])
    data = read_run_config(tmp_path)
    assert data["command"] == "train"
    assert data["config"] == {"architecture": "topk"}
    assert data["activation_cache"] == "store/abc"  # extras from earlier commands are kept
    assert set(data["commands"]) == {"cache", "train"}
    assert data["commands"]["cache"]["config"] == {"n_tokens": 10}


def test_extra_cannot_overwrite_reserved_keys(tmp_path):
    with pytest.raises(ValueError, match="config"):
        write_run_config(tmp_path, "cache", {}, extra={"config": 1})


# ---------------------------------------------------------------------------------------------------
# defaults < config file < explicit flags


def _command(model: type[Options] | None = None):
    captured: dict = {}

    @click.command("cache")
    @click.argument("model", required=False, default="smollm2")
    @click.option("--n_tokens", type=int, default=1000)
    @click.option("--hookpoints", cls=MultiValueOption, default=())
    @click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32")
    @click.option("--hf_token", default=None, envvar="SAELAB_TEST_HF_TOKEN")
    @config_option()
    @click.pass_context
    def command(ctx, **_params):
        captured["values"] = merge_config(ctx, model=model)

    return command, captured


def _invoke(args, model=None):
    command, captured = _command(model)
    command.main(list(args), standalone_mode=False)
    return captured["values"]


def test_defaults_file_and_flags_merge_in_order(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("n_tokens: 5000\nhookpoints: [layers.1, layers.2]\ndtype: float16\n")
    values = _invoke(["--config", str(cfg), "--n_tokens", "7"])
    assert values == {"model": "smollm2", "n_tokens": 7, "hookpoints": ("layers.1", "layers.2"),
                      "dtype": "float16", "hf_token": None}
    assert _invoke(["gpt2"])["n_tokens"] == 1000  # no file: defaults


def test_explicit_flag_equal_to_default_still_wins(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"n_tokens": 5000}))
    assert _invoke(["--config", str(cfg), "--n_tokens", "1000"])["n_tokens"] == 1000


def test_environment_counts_as_explicit(tmp_path, monkeypatch):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("hf_token: from-file\n")
    assert _invoke(["--config", str(cfg)])["hf_token"] == "from-file"
    monkeypatch.setenv("SAELAB_TEST_HF_TOKEN", "from-env")
    assert _invoke(["--config", str(cfg)])["hf_token"] == "from-env"


def test_file_values_are_converted_like_flags(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("n_tokens: '300'\nhookpoints: layers.1 layers.2\n")
    values = _invoke(["--config", str(cfg)])
    assert values["n_tokens"] == 300 and values["hookpoints"] == ("layers.1", "layers.2")
    cfg.write_text("dtype: bfloat16\n")
    with pytest.raises(UsageError, match="bfloat16.*dtype"):
        _invoke(["--config", str(cfg)])


def test_unknown_key_in_file_is_a_one_line_error_listing_accepted(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("n_tokenz: 5\n")
    with pytest.raises(UsageError) as info:
        _invoke(["--config", str(cfg)])
    message = str(info.value)
    assert "'n_tokenz'" in message and "n_tokens" in message and "\n" not in message


def test_dashes_in_file_keys_and_options_model(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("n-tokens: 42\n")
    values = _invoke(["--config", str(cfg)], model=CacheOptions)
    assert isinstance(values, CacheOptions)
    assert values.n_tokens == 42


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        _invoke(["--config", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError, match="cannot be parsed"):
        _invoke(["--config", str(bad)])


def test_a_run_config_json_can_be_reused_as_config_file(tmp_path):
    path = write_run_config(tmp_path / "run", "cache", {"n_tokens": 123, "hookpoints": ["layers.3"],
                                                       "hf_token": "secret-token-1"}, argv=[])
    values = _invoke(["--config", str(path)])
    assert values["n_tokens"] == 123 and values["hookpoints"] == ("layers.3",)
    assert values["hf_token"] is None  # redacted values are not read back


def test_config_errors_on_the_cli_are_one_line(tmp_path, cli):
    class ConfigPlugin:
        @saelab.hookimpl
        def register_commands(self, cli):
            cli.add_command(_command()[0])

    saelab.register_plugin(ConfigPlugin(), name="config-test")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("bogus: 1\n")
    cli("cache", "--config", str(cfg)).assert_user_error("'bogus'", "n_tokens")
    cli("cache", "--config", str(Path(tmp_path) / "missing.yaml")).assert_user_error("missing.yaml")
