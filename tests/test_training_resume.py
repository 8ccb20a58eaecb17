"""A ``saelab train`` run killed with SIGKILL after a checkpoint resumes, says so, and ends equal to an
uninterrupted run with the same seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from saelab.training import TRAINING_LOG
from safetensors.torch import load_file
from training_helpers import build_tiny_cache, kill_after_first_checkpoint, train_args


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_after_checkpoint_resumes_to_identical_weights(tmp_path: Path, results_dir: Path) -> None:
    cache = build_tiny_cache(tmp_path / "store", hookpoints=("layers.1",))
    env = {**os.environ, "SAELAB_PROGRESS": "0"}
    # ~60 steps per epoch of 128 rows; 3 epochs leave time to kill after the first checkpoint
    extra = ["--hookpoints", "layers.1", "--epochs", "3", "--checkpoint_every", "10", "--keep_checkpoints", "2",
             "--exclude_positions", "0", "1", "2", "3"]  # 60 steps per epoch (the tiny GPT-2 declares only 0)

    ref = subprocess.run([sys.executable, "-m", "saelab", *train_args(cache.path, "ref", *extra)], env=env,
                         capture_output=True, text=True, timeout=500)
    assert ref.returncode == 0, ref.stderr

    out = results_dir / "killed" / "dictionaries" / "layers.1"
    partial = kill_after_first_checkpoint([sys.executable, "-m", "saelab", *train_args(cache.path, "killed", *extra)],
                                          out, env)
    assert partial and max(partial) < 180

    resumed = subprocess.run([sys.executable, "-m", "saelab", *train_args(cache.path, "killed", *extra)],
                             env=env, capture_output=True, text=True, timeout=500)
    assert resumed.returncode == 0, resumed.stderr
    start = max(partial)
    assert f"resumed from step {start} of 180" in resumed.stderr
    a = load_file(str(results_dir / "ref" / "dictionaries" / "layers.1" / "dictionary.safetensors"))
    b = load_file(str(out / "dictionary.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), "resumed weights differ"
    ref_log = (results_dir / "ref" / "dictionaries" / "layers.1" / TRAINING_LOG).read_text().splitlines()
    entries = [json.loads(line) for line in (out / TRAINING_LOG).read_text().splitlines()]
    assert [(e["event"], e["step"]) for e in entries if "event" in e] == [("resumed", start)]
    log = [e for e in entries if "event" not in e]
    assert [e["step"] for e in log] == [json.loads(line)["step"] for line in ref_log]  # none duplicated or lost
    assert [e["loss"] for e in log] == [json.loads(line)["loss"] for line in ref_log]
