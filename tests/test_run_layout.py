"""The run layout: :mod:`saelab.layout` is the only place the paths of ``results/<name>/`` are spelled."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from saelab import UsageError
from saelab.config import append_run_history, read_run_config, recorded_invocation, write_run_config
from saelab.layout import RunLayout, activation_store, hook_dirname, latent_filename, results_dir, run_dir

REPO = Path(__file__).resolve().parents[1]
SOURCES = [REPO / "core", REPO / "plugins"]
LAYOUT_MODULE = REPO / "core" / "layout.py"

FILE_NAMES = {"run_config.json", "run_history.jsonl", "summary.json", "summary.csv", "llm_cache", ".activations",
              "index.json"}
"""Names that are run paths wherever they appear."""
DIR_NAMES = {"records", "explanations", "scores", "latents", "dictionaries", "report"}
"""Names that are run paths when a path is built from them (elsewhere they are JSON keys or stage names)."""
PATH_CALLS = {"Path", "PurePath", "joinpath", "glob", "rglob", "with_name", "join"}
ALLOWED = {("plugins/report/html.py", "LATENT_PAGES")}
"""Module constants that spell one of the names for something that is not a run path: the report site's
own folder of latent pages."""


def _texts(tree: ast.AST) -> set[int]:
    """ids of docstrings and help texts, which may name run paths in prose."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        for stmt in getattr(node, "body", []) if isinstance(getattr(node, "body", None), list) else []:
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, (ast.Constant, ast.JoinedStr)):
                skip.update(id(n) for n in ast.walk(stmt.value))
        if isinstance(node, ast.keyword) and node.arg in {"help", "short_help", "epilog"}:
            skip.update(id(n) for n in ast.walk(node.value))
    return skip


def _call_name(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def spelled_run_paths(source: str) -> list[tuple[int, str]]:
    """(line, name) of each place ``source`` spells a run path itself."""
    tree = ast.parse(source)
    parents = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    skip = _texts(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str) or id(node) in skip:
            continue
        value, parent = node.value, parents.get(id(node))
        if isinstance(parent, ast.JoinedStr):
            parent = parents.get(id(parent))
        in_path = (isinstance(parent, ast.BinOp) and isinstance(parent.op, ast.Div)) or (
            isinstance(parent, ast.Call) and _call_name(parent) in PATH_CALLS and node in parent.args)
        fragment = any(value.startswith(f"{name}/") for name in FILE_NAMES | DIR_NAMES)
        if value in FILE_NAMES or fragment or (value in DIR_NAMES and in_path):
            found.append((node.lineno, value))
    for stmt in (s for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef)) for s in n.body):
        if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant) and stmt.value.value in DIR_NAMES:
            names = [t.id for t in stmt.targets if isinstance(t, ast.Name)]
            found += [(stmt.lineno, name) for name in names]
    return found


def test_the_scanner_finds_spelled_run_paths_and_ignores_keys_and_prose():
    source = '''
"""Reads results/<name>/records/ and run_config.json."""
A = "latents"
def f(root, data):
    """Writes ``summary.json``."""
    click.option("--x", help="see records/<hook>/")
    data["latents"], data.get("scores")
    if "explanations" in data: pass
    return (root / "records", Path(root, "dictionaries"), root.glob("scores/*"), f"latents/{root}",
            root / "summary.json", root.joinpath("report"))
'''
    found = spelled_run_paths(source)
    assert sorted(v for _, v in found) == sorted(["A", "records", "dictionaries", "scores/*", "latents/",
                                                  "summary.json", "report"])


def test_only_the_layout_module_spells_run_paths():
    offenders = []
    for base in SOURCES:
        for path in sorted(base.rglob("*.py")):
            if path == LAYOUT_MODULE:
                continue
            rel = path.relative_to(REPO).as_posix()
            offenders += [f"{rel}:{line}: {value!r}" for line, value in spelled_run_paths(path.read_text())
                          if (rel, value) not in ALLOWED]
    assert not offenders, "run paths spelled outside saelab.layout:\n" + "\n".join(offenders)


def test_the_layout_keeps_the_on_disk_names(tmp_path):
    layout = RunLayout(tmp_path / "demo")
    root = tmp_path / "demo"
    assert layout.run_config == root / "run_config.json"
    assert layout.run_history == root / "run_history.jsonl"
    assert layout.dictionary_dir("layers.1") == root / "dictionaries" / "layers.1"
    assert layout.latents_dir("layers.1/mlp") == root / "latents" / "layers.1_mlp"
    assert layout.latent_records_dir("layers.1") == root / "latents" / "layers.1" / "records"
    assert layout.record_path("a:b", 3) == root / "records" / "a__b" / "latent_3.json"
    assert layout.record_index("layers.1") == root / "records" / "layers.1" / "index.json"
    assert layout.explanation_path("layers.1", 0) == root / "explanations" / "layers.1" / "latent_0.json"
    assert layout.score_path("fuzz", "layers.1", 7) == root / "scores" / "fuzz" / "layers.1" / "latent_7.json"
    assert (layout.llm_cache, layout.summary_json, layout.summary_csv, layout.report_dir) == (
        root / "llm_cache", root / "summary.json", root / "summary.csv", root / "report")
    assert hook_dirname("x\\y") == "x_y" and latent_filename(12) == "latent_12.json"


def test_results_root_and_run_names(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_RESULTS_DIR", str(tmp_path / "res"))
    assert results_dir() == tmp_path / "res" and activation_store() == tmp_path / "res" / ".activations"
    assert RunLayout.named("demo").root == run_dir("demo") == tmp_path / "res" / "demo"
    assert run_dir("demo", tmp_path) == tmp_path / "demo"
    for bad in ("", "a/b", "..", ".activations"):
        with pytest.raises(UsageError, match="bad run name"):
            RunLayout.named(bad)
    with pytest.raises(UsageError, match="bad hookpoint name"):
        hook_dirname("..")


def test_looks_like_run(tmp_path):
    layout = RunLayout(tmp_path)
    assert not layout.looks_like_run()
    layout.scores_root.mkdir()
    assert layout.looks_like_run()
    assert not RunLayout(tmp_path / "other").looks_like_run()
    write_run_config(tmp_path / "other", "cache", {"n_tokens": 1}, argv=[])
    assert RunLayout(tmp_path / "other").looks_like_run()


def test_run_config_and_history_go_where_the_layout_says(tmp_path):
    layout = RunLayout(tmp_path / "run")
    assert append_run_history(layout.root, "cache", "ok", exit_code=0) is None  # no run directory yet
    assert write_run_config(layout.root, "cache", {"n_tokens": 5}, argv=[]) == layout.run_config
    assert read_run_config(layout.root)["config"] == {"n_tokens": 5}
    with pytest.raises(UsageError), recorded_invocation(layout.root, "train"):
        raise UsageError("bad")
    lines = [json.loads(line) for line in layout.run_history.read_text().splitlines()]
    assert [(h["command"], h["outcome"], h["exit_code"]) for h in lines] == [("train", "error", 2)]
