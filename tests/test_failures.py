"""Failures a user can meet mid-run: a full disk, a killed cache, a second concurrent cache, corrupt or
empty inputs. Each is one line on stderr (exit 2 bad input, 3 a full disk mid-run) and damages nothing
already complete; a killed run's temporaries are removed by the next run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures.tiny_models import TINY_GPT2

TINY = str(TINY_GPT2)


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.tmp") if p.is_file()]


# ------------------------------------------------------------------------------------------ full disk


@pytest.fixture
def small_filesystem(tmp_path: Path):
    """A 700 KiB tmpfs (root only); skipped, with the reason, where the machine cannot mount one."""
    mount = tmp_path / "small-fs"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_cache_larger_than_the_free_disk_is_refused_before_writing(cli, small_filesystem):
    """The size of the cache to write is checked against the free disk first: one line naming both, exit 2,
    nothing written."""
    store = small_filesystem / "store"
    result = cli("cache", TINY, "--hookpoints", "layers.0", "layers.1", "--dataset_repo", "news-sample",
                 "--n_tokens", "20000", "--cache_ctx_len", "32", "--store", str(store), "--name", "full",
                 "--verbose", "false")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and "needs 9.8 MiB" in lines[0] and "free" in lines[0], lines
    assert not store.exists() or not any(store.rglob("*.safetensors"))


@pytest.mark.parametrize("shard_tokens", ["1024", "4096"])
def test_full_disk_while_caching_is_one_line_exit_3_and_keeps_complete_shards(cli, small_filesystem, shard_tokens,
                                                                            monkeypatch):
    """Whether the disk fills in a streamed activation file or in the tokens file (safetensors' own writer,
    which reported ENOSPC as a SafetensorError traceback), the error is one line naming the file, exit 3;
    no temporary file is left and the shards listed in the manifest are intact. (The disk fills after the
    free-space check: another process took the space.)"""
    import saelab.activation_cache

    monkeypatch.setattr(saelab.activation_cache, "check_free_disk", lambda where, n_bytes, what: None)
    store = small_filesystem / "store"
    result = cli("cache", TINY, "--hookpoints", "layers.0", "layers.1", "--dataset_repo", "news-sample",
                 "--n_tokens", "20000", "--cache_ctx_len", "32", "--shard_size_tokens", shard_tokens,
                 "--store", str(store), "--name", "full", "--verbose", "false")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 3, result.output
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    assert "No space left on device" in lines[0] and ".safetensors" in lines[0], lines[0]
    assert _temporaries(store) == []
    for manifest in store.glob("*/manifest.json"):
        data = json.loads(manifest.read_text())
        assert not data["complete"]
        for shard in data["shards"]:  # every listed shard is whole (sizes and sha256)
            for entry in (shard["files"]["tokens"], *shard["files"]["activations"].values()):
                assert (manifest.parent / entry["path"]).stat().st_size == entry["size"]


def test_streamed_file_on_a_full_disk_leaves_no_temporary(small_filesystem):
    import torch
    from saelab.fileio import StreamedSafetensorsFile

    path = small_filesystem / "big.safetensors"
    file = StreamedSafetensorsFile(path, "x", torch.float32, (4096, 64))
    with pytest.raises(OSError) as err:
        for _ in range(64):
            file.write(torch.zeros(64, 64))
        file.close()
    file.abort()
    assert err.value.errno == 28 and err.value.filename == str(path)
    assert list(small_filesystem.iterdir()) == []


def _fill(directory: Path) -> None:
    """Write a filler file until the filesystem of ``directory`` is full."""
    with open(directory / "filler", "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass


def test_safetensors_writer_on_a_full_disk_raises_a_named_oserror(small_filesystem):
    """safetensors reports ENOSPC as a ``SafetensorError`` (a 43-line traceback in the CLI); it becomes the
    OSError it is, naming the file, and the temporary file is removed."""
    import torch
    from saelab.fileio import save_safetensors_atomic

    path = small_filesystem / "tokens" / "000000.safetensors"
    path.parent.mkdir()
    _fill(small_filesystem)
    with pytest.raises(OSError) as err:
        save_safetensors_atomic(path, {"tokens": torch.zeros(64, 64, dtype=torch.int32)})
    assert err.value.errno == 28 and err.value.filename == str(path)
    assert not path.exists() and _temporaries(small_filesystem) == []


# ------------------------------------------------------------------------------------------ kill -9, lock


def test_killed_cache_is_cleaned_by_the_next_run_and_a_second_run_fails_before_loading_the_model(
        cli, results_dir, monkeypatch):
    """kill -9 in the middle of a single-shard cache leaves its temporary shard; while it runs a second
    identical `saelab cache` fails at once (before loading the model) naming the holder's PID; after the
    kill the same command rebuilds, says in one line that it threw partial data away, and leaves no
    temporary behind."""
    args = ["cache", TINY, "--hookpoints", "layers.0", "--dataset_repo", "news-sample", "--n_tokens", "16384",
            "--cache_ctx_len", "64", "--name", "k", "--verbose", "false"]
    env = {**os.environ, "SAELAB_RESULTS_DIR": str(results_dir), "OMP_NUM_THREADS": "1"}
    store = results_dir / ".activations"
    # a real `saelab cache` process, its forward passes slowed (one sequence per batch, 50 ms each) so that
    # it is still writing its only shard when it is killed; batch size is not in the fingerprint
    slow = ("import sys, time; from saelab.plugins.models import transformers_models as models; forward = models.TransformersSource.activations; "
            "models.TransformersSource.activations = lambda *a, **k: (time.sleep(0.05), forward(*a, **k))[1]; "
            "from saelab.cli import main; main(sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", slow, *args, "--batch_size", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not [p for p in _temporaries(store) if p.stat().st_size > 0]:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the cache never started writing"
            time.sleep(0.1)

        import saelab.models

        def no_model(*_a, **_k):
            raise AssertionError("the model was loaded before the lock was checked")

        with monkeypatch.context() as patch:
            patch.setattr(saelab.models, "load_activation_source", no_model)
            started = time.monotonic()
            second = cli(*args, "--name", "k2", "--batch_size", "64")
        second.assert_user_error("being written by another process", f"PID {proc.pid}", ".lock")
        assert time.monotonic() - started < 15
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    left = _temporaries(store)
    assert left and not list(store.glob("*/manifest.json"))  # the killed run's partial shard
    rerun = cli(*args, "--batch_size", "64")
    assert rerun.exit_code == 0, rerun.output
    notes = [line for line in rerun.stderr.splitlines() if "partial data" in line]
    assert len(notes) == 1 and "threw away" in notes[0] and "rebuilding" in notes[0], (rerun.output, left)
    assert _temporaries(store) == [] and not any(p.exists() for p in left)
    again = cli(*args, "--batch_size", "64")  # reused, nothing more to say
    assert again.exit_code == 0 and "partial data" not in again.stderr


def test_remove_stale_temporaries_keeps_live_writers(tmp_path):
    from saelab.fileio import _temporary_path, remove_stale_temporaries

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    (tmp_path / "sub").mkdir()
    mine = _temporary_path(tmp_path / "sub" / "a.json")
    mine.write_text("live")
    stale = tmp_path / "sub" / f".b.json.{dead_pid}.1.tmp"
    stale.write_text("dead")
    stale_dir = tmp_path / f".report.tmp-{dead_pid}"
    stale_dir.mkdir()
    (stale_dir / "index.html").write_text("x" * 10)
    other = tmp_path / "keep.tmp"
    other.write_text("not ours")
    removed = dict(remove_stale_temporaries(tmp_path))
    assert set(removed) == {stale, stale_dir} and removed[stale_dir] == 10
    assert mine.exists() and other.exists()
    assert [p for p, _ in remove_stale_temporaries(tmp_path, writers_gone=True)] == [mine]


# ------------------------------------------------------------------------------------------ bad inputs


@pytest.fixture(scope="module")
def saved_dictionary(tmp_path_factory) -> Path:
    from pipeline_helpers import make_dictionary

    return make_dictionary(tmp_path_factory.mktemp("dicts") / "topk")


@pytest.mark.parametrize(("damage", "fragments"), [
    ("truncate-weights", ["dictionary.safetensors", "corrupt or truncated"]),
    ("bad-json", ["cfg.json", "is not valid JSON"]),
    ("no-architecture", ["cfg.json", "has no 'architecture'"]),
])
def test_a_damaged_dictionary_is_one_line_naming_the_file(cli, tmp_path, saved_dictionary, damage, fragments):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved_dictionary, broken)
    if damage == "truncate-weights":
        weights = broken / "dictionary.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "bad-json":
        (broken / "cfg.json").write_text("{not json\n")
    else:
        cfg = json.loads((broken / "cfg.json").read_text())
        del cfg["architecture"]
        (broken / "cfg.json").write_text(json.dumps(cfg))
    before = {p.name: p.read_bytes() for p in broken.iterdir()}
    cli("convert", str(broken), str(tmp_path / "out"), "--to", "saelens").assert_user_error(str(broken), *fragments)
    assert {p.name: p.read_bytes() for p in broken.iterdir()} == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("name", "content", "fragments"), [
    ("empty.jsonl", "", ["empty.jsonl", "is empty"]),
    ("blank.txt", "\n\n", ["blank.txt", "is empty"]),
    ("header-only.csv", "text,n\n", ["header-only.csv", "holds no rows"]),
])
def test_an_empty_dataset_is_one_line_naming_it(cli, tmp_path, name, content, fragments):
    data = tmp_path / name
    data.write_text(content)
    cli("cache", TINY, "--hookpoints", "layers.0", "--dataset_repo", str(data), "--name", "e",
        "--verbose", "false").assert_user_error(*fragments)


def _fill_until(mount: Path, leave_bytes: int) -> None:
    """Fill the small filesystem until about ``leave_bytes`` are free."""
    free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
    (mount / "filler").write_bytes(b"\0" * max(0, free - leave_bytes))


@pytest.mark.parametrize("leave_kib", [16, 160])
def test_full_disk_during_run_is_one_line_exit_3(cli, small_filesystem, monkeypatch, tmp_path, leave_kib):
    """A delphi-style run whose results directory fills up (wherever the disk fills: config, latent
    cache, records, explanations) ends with one line naming the problem and exit code 3."""
    from llm_server import ScriptedLLMServer
    from pipeline_helpers import API_KEY, SmartHandler, make_dictionary, run_args

    dictionary = make_dictionary(tmp_path / "layers.0")
    monkeypatch.setenv("SAELAB_RESULTS_DIR", str(small_filesystem / "results"))
    _fill_until(small_filesystem, leave_kib * 1024)
    with ScriptedLLMServer(SmartHandler()) as server:
        args = run_args(dictionary, "full", server.base_url, "--store", str(tmp_path / "store"))
        result = cli(*args, env={"OPENAI_API_KEY": API_KEY, "HF_TOKEN": None})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 3, result.output
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    assert "No space left on device" in lines[0], lines[0]


def test_full_disk_while_checkpointing_raises_a_named_oserror_and_leaves_no_partial_checkpoint(small_filesystem):
    import errno

    import torch
    from saelab.dictionary import build_dictionary
    from saelab.training import DictionaryJob, TrainerConfig, _JobState, save_checkpoint

    module = build_dictionary("topk", {"inputs": ["layers.0"], "outputs": ["layers.0"], "d_in": 64, "d_out": 64},
                              {"d_sae": 4096, "k": 4})
    state = _JobState(DictionaryJob("d", module), TrainerConfig(), total_steps=10, device=torch.device("cpu"))
    _fill_until(small_filesystem, 64 * 1024)
    with pytest.raises(OSError) as err:
        save_checkpoint(state, small_filesystem / "checkpoints", step=5, epoch=0, batch_in_epoch=5,
                        fingerprint="f", keep=1)
    assert err.value.errno == errno.ENOSPC and "state.safetensors" in str(err.value.filename)
    assert list((small_filesystem / "checkpoints").iterdir()) == []
