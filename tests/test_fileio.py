"""Tests of saelab.fileio: atomic writes, canonical hashes, cache manifests and the directory lock."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from saelab import UsageError
from saelab.errors import CorruptCacheError
from saelab.fileio import (
    DirectoryLock,
    atomic_write,
    file_sha256,
    json_sha256,
    read_manifest,
    save_safetensors_atomic,
    write_json_atomic,
)
from safetensors.torch import load_file


def test_write_json_atomic_replaces_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "data.json"
    write_json_atomic(path, {"b": "é", "a": Path("x")})
    write_json_atomic(path, {"v": 2}, fsync=True)
    assert json.loads(path.read_text(encoding="utf-8")) == {"v": 2}
    assert [p.name for p in path.parent.iterdir()] == ["data.json"]


def test_atomic_write_keeps_the_old_file_when_the_block_fails(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(path) as fh:
        fh.write("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["data.csv"]
    with pytest.raises(TypeError):
        write_json_atomic(path, {"x": object()})
    assert path.read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_hashes() -> None:
    value = {"b": [1, "ü"], "a": None}
    ascii_text = '{"a":null,"b":[1,"\\u00fc"]}'
    assert json_sha256(value, 20, ensure_ascii=True) == hashlib.sha256(ascii_text.encode()).hexdigest()[:20]
    utf8_text = '{"a":null,"b":[1,"ü"]}'
    assert json_sha256(value) == hashlib.sha256(utf8_text.encode()).hexdigest()
    assert json_sha256({"p": Path("x")}, default=str) == json_sha256({"p": "x"})


def test_file_sha256_and_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "a" / "t.safetensors"
    save_safetensors_atomic(path, {"x": torch.arange(6).reshape(2, 3).T}, metadata={"format": "f"})
    assert torch.equal(load_file(str(path))["x"], torch.arange(6).reshape(2, 3).T)
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.name for p in path.parent.iterdir()] == ["t.safetensors"]


def test_read_manifest_errors(tmp_path: Path) -> None:
    kw = {"fmt": "thing", "version": 2, "what": "thing cache"}
    with pytest.raises(CorruptCacheError, match="thing cache manifest .* cannot be read"):
        read_manifest(tmp_path, **kw)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other", "format_version": 2}))
    with pytest.raises(CorruptCacheError, match="is not a saelab thing cache manifest"):
        read_manifest(tmp_path, **kw)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "thing", "format_version": 1}))
    with pytest.raises(CorruptCacheError, match="format version 1; this saelab reads version 2"):
        read_manifest(tmp_path, **kw)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "thing", "format_version": 2, "n": 3}))
    assert read_manifest(tmp_path, **kw)["n"] == 3


def test_directory_lock_refuses_a_second_writer(tmp_path: Path) -> None:
    # flock locks belong to open files: a second open of .lock conflicts even inside one process
    with DirectoryLock(tmp_path, "activation cache"):
        with pytest.raises(UsageError, match=f"latent cache {tmp_path} is being written by another process"):
            with DirectoryLock(tmp_path, "latent cache"):
                pass
    with DirectoryLock(tmp_path, "latent cache"):  # released on exit
        assert (tmp_path / ".lock").exists()
