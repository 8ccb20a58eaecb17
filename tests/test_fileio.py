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
    StreamedSafetensorsFile,
    atomic_write,
    file_sha256,
    json_sha256,
    read_manifest,
    save_safetensors_atomic,
    write_json_atomic,
)
from safetensors import safe_open
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int32])
def test_streamed_safetensors_file_matches_the_whole_tensor(tmp_path: Path, dtype: torch.dtype) -> None:
    whole = (torch.randn(10, 3, 5) * 100).to(dtype)
    path = tmp_path / "sub" / "shard.safetensors"
    file = StreamedSafetensorsFile(path, "activations", dtype, whole.shape, metadata={"format": "x"})
    for block in whole.split(4):
        assert not path.exists()
        file.write(block)
    file.close()
    assert torch.equal(load_file(path)["activations"], whole)
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata() == {"format": "x"}
    assert [p.name for p in path.parent.iterdir()] == ["shard.safetensors"]


def test_streamed_safetensors_file_shrinks_when_the_data_runs_out(tmp_path: Path) -> None:
    whole = torch.arange(1000 * 6, dtype=torch.float32).reshape(1000, 6)
    path = tmp_path / "shard.safetensors"
    file = StreamedSafetensorsFile(path, "x", torch.float32, whole.shape)
    file.write(whole[:7])
    file.close(7)
    assert torch.equal(load_file(path)["x"], whole[:7])
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert path.stat().st_size == 8 + header_len + 7 * 6 * 4


def test_streamed_safetensors_file_refuses_bad_rows_and_aborts_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "shard.safetensors"
    file = StreamedSafetensorsFile(path, "x", torch.float32, (4, 3))
    with pytest.raises(ValueError, match="do not fit"):
        file.write(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="do not fit"):
        file.write(torch.zeros(2, 3, dtype=torch.float64))
    file.write(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="cannot write 2 more after 3"):
        file.write(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="3 rows written, 4 declared"):
        file.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UsageError, match="bad safetensors dtype 'complex64'"):
        StreamedSafetensorsFile(path, "x", torch.complex64, (4, 3))
    with pytest.raises(RuntimeError), StreamedSafetensorsFile(path, "x", torch.float32, (4, 3)) as open_file:
        open_file.write(torch.zeros(1, 3))
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
