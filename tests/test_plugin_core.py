"""The plugin core: registries, discovery, in-code registration, disabling, load errors."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import saelab
from plugin_helpers import write_distribution
from saelab import hookimpl, manager
from saelab.errors import DuplicateNameError, PluginLoadError, UnknownNameError
from saelab.registry import Registry

# ---------------------------------------------------------------------------------------------------
# toy plugin classes


class FaissSource(saelab.NonActivatingSource):
    """Toy FAISS-like source."""

    name = "faiss-test"

    def non_activating(self, latent, n, context):
        return []


class Relu(saelab.SparseDictionary):
    """Toy architecture A."""

    name = "toy-arch"


class OtherRelu(saelab.SparseDictionary):
    """Toy architecture B, same name as A."""

    name = "TOY_ARCH"


class PathDataset(saelab.Dataset):
    """Toy dataset accepting paths ending in .toy."""

    name = "toy-files"

    @classmethod
    def accepts(cls, repo: str) -> bool:
        return repo.endswith(".toy")

    def texts(self):
        yield from ()

    def identity(self):
        return {}


class ArchPlugin:
    """A plugin object (instance with hookimpl methods)."""

    def __init__(self, *classes: type) -> None:
        self.classes = classes

    @hookimpl
    def register_architectures(self, register):
        for cls in self.classes:
            register(cls)


class MixedPlugin:
    @hookimpl
    def register_non_activating_sources(self, register):
        register(FaissSource)

    @hookimpl
    def register_datasets(self, register):
        register(PathDataset)


class MisspelledPlugin:
    @hookimpl
    def register_architecture(self, register):  # missing the final "s"
        register(Relu)


# ---------------------------------------------------------------------------------------------------
# registries


def test_registry_is_case_insensitive_and_accepts_dash_or_underscore():
    reg = Registry("non-activating source")
    reg.register(FaissSource)
    assert reg.get("FAISS-TEST") is FaissSource
    assert reg.get("faiss_test") is FaissSource
    assert "Faiss-Test" in reg
    assert reg.names() == ["faiss-test"]


def test_registry_via_plugin_manager_is_case_insensitive():
    saelab.register_plugin(MixedPlugin(), name="mixed")
    reg = saelab.registry("non_activating_source")
    assert reg.get("FAISS-test") is FaissSource
    assert reg.entry("faiss-TEST").plugin == "mixed"


def test_duplicate_names_raise_naming_both_classes():
    saelab.register_plugin(ArchPlugin(Relu), name="first")
    saelab.register_plugin(ArchPlugin(OtherRelu), name="second")
    with pytest.raises(DuplicateNameError) as info:
        saelab.registry("architecture")
    message = str(info.value)
    assert f"{__name__}.Relu" in message and f"{__name__}.OtherRelu" in message
    assert "'first'" in message and "'second'" in message


def test_duplicate_alias_raises():
    class Aliased(saelab.SparseDictionary):
        """Alias clashes with toy-arch."""

        name = "unique-name"
        aliases = ("Toy-Arch",)

    reg = Registry("architecture", base=saelab.SparseDictionary)
    reg.register(Relu)
    with pytest.raises(DuplicateNameError, match="Aliased"):
        reg.register(Aliased)


def test_unknown_name_lists_known_names():
    saelab.register_plugin(MixedPlugin(), name="mixed")
    with pytest.raises(UnknownNameError) as info:
        saelab.registry("dataset").get("nope-dataset")
    message = str(info.value)
    assert "'nope-dataset'" in message and "toy-files" in message
    assert "\n" not in message


def test_unknown_kind_lists_kinds():
    with pytest.raises(UnknownNameError, match="architecture"):
        saelab.registry("architectures-typo")


def test_register_rejects_wrong_base_class_and_missing_name():
    reg = Registry("architecture", base=saelab.SparseDictionary)
    with pytest.raises(TypeError, match="not a subclass"):
        reg.register(FaissSource)

    class Nameless(saelab.SparseDictionary):
        """No name."""

    with pytest.raises(TypeError, match="no `name`"):
        reg.register(Nameless)


def test_resolve_prefers_names_then_accepts(monkeypatch):
    monkeypatch.setenv("SAELAB_DISABLE_PLUGINS", "datasets")  # builtin datasets accept hub ids and paths
    saelab.register_plugin(MixedPlugin(), name="mixed")
    assert saelab.resolve("dataset", "TOY-FILES") is PathDataset
    assert saelab.resolve("dataset", "corpus/data.toy") is PathDataset
    with pytest.raises(UnknownNameError, match="toy-files"):
        saelab.resolve("dataset", "corpus/data.csv-nothing-accepts-this")


# ---------------------------------------------------------------------------------------------------
# in-code registration, load errors


def test_register_plugin_in_code_and_unregister():
    saelab.register_plugin(ArchPlugin(Relu), name="toy-arch-plugin")
    assert saelab.registry("architecture").get("toy-arch") is Relu
    names = [info.name for info in saelab.plugin_infos()]
    assert "toy-arch-plugin" in names
    with pytest.raises(ValueError, match="already registered"):
        saelab.register_plugin(ArchPlugin(), name="toy-arch-plugin")
    saelab.unregister_plugin("toy-arch-plugin")
    assert "toy-arch" not in saelab.registry("architecture")


def test_misspelled_hookimpl_fails_at_load_with_a_clear_error():
    saelab.register_plugin(MisspelledPlugin(), name="misspelled")
    with pytest.raises(PluginLoadError) as info:
        saelab.get_plugin_manager()
    message = str(info.value)
    assert "'misspelled'" in message
    assert "'register_architecture'" in message
    assert "did you mean 'register_architectures'" in message
    assert "-p no:misspelled" in message


def test_misspelled_hookimpl_is_one_line_exit_2_on_the_cli(cli):
    saelab.register_plugin(MisspelledPlugin(), name="misspelled")
    result = cli("plugins")
    result.assert_user_error("register_architecture", "misspelled")
    # and disabling it lets saelab start again
    ok = cli("-p", "no:misspelled", "plugins", "--json")
    assert ok.exit_code == 0, ok.stderr
    assert "misspelled" not in [row["name"] for row in json.loads(ok.stdout)]


BROKEN_MODULE = """
raise ImportError("this plugin needs a package that is not installed")
"""

GOOD_MODULE = """
from saelab import hookimpl, Dataset

class GoodDataset(Dataset):
    '''A dataset from a working third-party plugin.'''
    name = "good-third-party"
    def texts(self):
        yield "good"
    def identity(self):
        return {"name": self.name}

@hookimpl
def register_datasets(register):
    register(GoodDataset)
"""


@pytest.fixture
def broken_and_good_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = write_distribution(
        tmp_path / "site", "saelab-thirdparty", "1.2.3",
        {"broken-plugin": "broken_plugin_mod", "good-plugin": "good_plugin_mod"},
        {"broken_plugin_mod.py": BROKEN_MODULE, "good_plugin_mod.py": GOOD_MODULE},
    )
    monkeypatch.syspath_prepend(str(site))
    manager.reset()
    return site


def test_plugin_failing_to_import_gives_exactly_one_warning_and_the_rest_load(broken_and_good_site):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        saelab.get_plugin_manager()
    plugin_warnings = [w for w in caught if issubclass(w.category, manager.PluginImportWarning)]
    assert len(plugin_warnings) == 1, [str(w.message) for w in caught]
    message = str(plugin_warnings[0].message)
    assert "'broken-plugin'" in message and "not installed" in message
    assert saelab.registry("dataset").get("good-third-party").__name__ == "GoodDataset"
    loaded = {info.name: info for info in saelab.plugin_infos()}
    assert "broken-plugin" not in loaded
    assert loaded["good-plugin"].distribution == "saelab-thirdparty"
    assert loaded["good-plugin"].version == "1.2.3"
    assert "inspect" in loaded  # builtins still load
    assert "broken-plugin" in manager.failed_plugins()


def test_failing_plugin_warning_on_the_cli_is_one_line(broken_and_good_site, cli):
    result = cli("plugins", "--all", "--json")
    assert result.exit_code == 0, result.stderr
    warning_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(warning_lines) == 1 and "broken-plugin" in warning_lines[0], result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["broken-plugin"]["status"] == "failed"
    assert "not installed" in rows["broken-plugin"]["error"]
    assert rows["good-plugin"]["registers"] == {"dataset": ["good-third-party"]}


# ---------------------------------------------------------------------------------------------------
# disabling


def _loaded(cli, *args: str, env=None) -> dict[str, dict]:
    result = cli(*args, "plugins", "--all", "--json", env=env)
    assert result.exit_code == 0, result.stderr
    return {row["name"]: row for row in json.loads(result.stdout)}


def test_dash_p_no_disables_by_registered_name_for_one_call(cli):
    saelab.register_plugin(ArchPlugin(Relu), name="toy-arch-plugin")
    rows = _loaded(cli, "-p", "no:topk", "-p", "no:toy-arch-plugin")
    assert rows["topk"]["status"] == "disabled"
    assert rows["toy-arch-plugin"]["status"] == "disabled"
    assert rows["relu"]["status"] == "loaded"
    # the flag lasts for that call only
    rows = _loaded(cli)
    assert rows["topk"]["status"] == "loaded"
    assert rows["toy-arch-plugin"]["status"] == "loaded"


def test_dash_p_attached_form_and_case(cli):
    rows = _loaded(cli, "-pno:TOPK")
    assert rows["topk"]["status"] == "disabled"


def test_env_var_disables_several_plugins(cli):
    rows = _loaded(cli, env={"SAELAB_DISABLE_PLUGINS": "topk, relu"})
    assert rows["topk"]["status"] == "disabled"
    assert rows["relu"]["status"] == "disabled"
    assert rows["jumprelu"]["status"] == "loaded"


def test_disabled_plugin_registers_nothing(monkeypatch):
    saelab.register_plugin(ArchPlugin(Relu), name="toy-arch-plugin")
    assert "toy-arch" in saelab.registry("architecture")
    monkeypatch.setenv("SAELAB_DISABLE_PLUGINS", "toy-arch-plugin")
    manager.reset()
    assert "toy-arch" not in saelab.registry("architecture")
    assert "toy-arch-plugin" in manager.blocked_plugins()


def test_disabling_the_inspect_plugin_removes_its_command(cli):
    result = cli("-p", "no:inspect", "plugins")
    result.assert_user_error("unknown command 'plugins'")


def test_bad_plugin_flags_are_one_line_errors(cli):
    cli("-p", "yes:topk", "plugins").assert_user_error("-p yes:topk", "no:NAME")
    cli("-p", "no:", "plugins").assert_user_error("no:NAME")
    cli("-p", "no:not-a-plugin", "plugins").assert_user_error("'not-a-plugin'", "topk")


def test_dash_p_after_the_command_is_left_to_the_command(cli):
    # a command's own `-p VALUE` option must not be eaten by the plugin flag parser
    from saelab.cli import extract_plugin_flags

    assert extract_plugin_flags(["serve", "-p", "8080"]) == ([], ["serve", "-p", "8080"])
    assert extract_plugin_flags(["serve", "-p", "no:x"]) == (["x"], ["serve"])
    assert extract_plugin_flags(["-p", "no:x", "serve"]) == (["x"], ["serve"])


def test_discovery_uses_entry_points_of_installed_distribution():
    """Builtins are found through the `saelab` entry points of the installed saelab distribution."""
    infos = {info.name: info for info in saelab.plugin_infos()}
    assert infos["inspect"].distribution == "saelab"
    assert infos["inspect"].module == "saelab.plugins.commands.inspect"
    assert infos["inspect"].hooks == ["register_commands"]
    assert sys.modules["saelab.plugins.commands.inspect"]
