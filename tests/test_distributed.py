"""Data-parallel training under torchrun (gloo, 2 CPU processes) equals a single-process run, and a
killed torchrun run resumes from its wall-time checkpoint to the uninterrupted result."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from saelab.training import (
    CHECKPOINT_DIR,
    TRAINING_LOG,
    DictionaryJob,
    DistContext,
    TensorSource,
    Trainer,
    TrainerConfig,
    list_checkpoints,
)
from safetensors.torch import load_file
from training_helpers import build_tiny_cache, synthetic, topk_sae, train_args, wait_for_checkpoint

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
"""``torchrun`` with two local processes (gloo on CPU)."""


CLT_SITES = ("layers.0.mlp.input", "layers.1.mlp.input", "layers.0.mlp", "layers.1.mlp")
"""The sites of a cross-layer transcoder over layers 0-1."""


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("hookpoints", "dictionary", "sites"), [
    (["--hookpoints", "layers.1"], "layers.1", ("layers.1",)),
    (["--architecture", "clt", "--layers", "0-1", "-o", "activation", "topk"], "layers.0-1", CLT_SITES),
], ids=["topk", "clt"])
def test_two_process_gloo_run_matches_single_process(tmp_path: Path, results_dir: Path, hookpoints: list[str],
                                                     dictionary: str, sites: tuple[str, ...]) -> None:
    cache = build_tiny_cache(tmp_path / "store", hookpoints=sites)
    env = {**os.environ, "SAELAB_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    # batchtopk would also exercise threshold synchronisation; topk keeps the comparison tight
    extra = [*hookpoints, "--max_steps", "30", "--device", "cpu", "--checkpoint_every", "0"]
    single = subprocess.run([sys.executable, "-m", "saelab", *train_args(cache.path, "single", *extra)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([*TORCHRUN, "-m", "saelab", *train_args(cache.path, "ddp", *extra)],
                         env=env, capture_output=True, text=True, timeout=400)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    run = results_dir / "ddp"
    config = __import__("json").loads((run / "run_config.json").read_text())
    assert config["world_size"] == 2
    a = load_file(str(results_dir / "single" / "dictionaries" / dictionary / "dictionary.safetensors"))
    b = load_file(str(run / "dictionaries" / dictionary / "dictionary.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        # the 2-process global batch is the 1-process batch: only float summation order differs
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4, msg=f"{key} differs")
    # one process wrote the results (rank 0): one training log, no duplicated lines
    log = (run / "dictionaries" / dictionary / "training_log.jsonl").read_text().splitlines()
    assert len(log) == len((results_dir / "single" / "dictionaries" / dictionary / "training_log.jsonl")
                           .read_text().splitlines())


class _FollowerRank(DistContext):
    """Rank 1 of 2 in one process: its collectives are local, and the 1-byte "checkpoint now?" flag that
    rank 0 broadcasts is played from ``rank0_flags`` (rank 0's decisions, in order)."""

    def __init__(self, rank0_flags: list[int]):
        super().__init__(rank=1, world_size=2)
        self.rank0_flags = list(rank0_flags)
        self.flags_received = 0
        self.barriers = 0

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return tensor  # both ranks hold the same values

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if tensor.dtype == torch.uint8 and tensor.numel() == 1:  # the checkpoint decision
            tensor.fill_(self.rank0_flags[self.flags_received])
            self.flags_received += 1
        return tensor

    def barrier(self) -> None:
        self.barriers += 1


@pytest.mark.parametrize(("own_clock_step", "rank0_flags", "checkpoints"), [
    (0.0, [0, 1, 0, 1, 0, 0, 0], 2),  # own clock never due; rank 0 says twice: two checkpoints
    (1e9, [0] * 7, 0),  # own clock always due; rank 0 says never: none
])
def test_rank_zero_decides_wall_time_checkpoints(tmp_path: Path, own_clock_step: float, rank0_flags: list[int],
                                                 checkpoints: int) -> None:
    """A non-zero rank checkpoints (enters the checkpoint's barrier) exactly when rank 0's clock says so,
    whatever its own clock says: otherwise the ranks would leave step with each other and hang."""
    x, _ = synthetic(n=1024, d=16, n_features=48)
    config = TrainerConfig(batch_size=128, log_every=1, device="cpu", checkpoint_every=1000,
                           checkpoint_every_minutes=1.0)  # 8 steps; the clock is read after steps 1-7
    dist = _FollowerRank(rank0_flags)
    job = DictionaryJob(name="sae", module=topk_sae(16, 32, 4), out_dir=tmp_path)
    Trainer([job], config, dist=dist, progress=False, clock=itertools.count(0.0, own_clock_step).__next__).fit(
        TensorSource({"h": x}))
    assert dist.flags_received == 7
    assert dist.barriers == checkpoints + 1  # + the barrier after saving the result


def _child_pids(parent: int) -> list[int]:
    """Ids of the live child processes of ``parent`` (from /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children


def _wait_gone(pids: list[int], timeout: float = 30) -> None:
    """Wait until none of ``pids`` is alive any more (killed orphans are reaped by init)."""
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in pids):
        assert time.monotonic() < deadline, f"processes {pids} still alive"
        time.sleep(0.02)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def _kill_torchrun(proc: subprocess.Popen[str]) -> list[int]:
    """SIGKILL a torchrun launcher and its workers (each in a session of its own); returns the workers' ids."""
    workers = _child_pids(proc.pid)
    for pid in [*workers, proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    _wait_gone(workers)
    return workers


def _torchrun_saelab(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``torchrun ... -m saelab ARGS`` to completion; a hung run (ranks out of step) is killed and fails."""
    proc = subprocess.Popen([*TORCHRUN, "-m", "saelab", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_torchrun(proc)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun still running after {timeout} s (ranks out of step?): {stderr[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers through /proc")
def test_killed_two_process_run_resumes_from_wall_time_checkpoint(tmp_path: Path, results_dir: Path) -> None:
    """A 2-process run far shorter than --checkpoint_every still checkpoints by wall time (rank 0 decides
    and tells rank 1; a disagreement would hang in the checkpoint's barrier); SIGKILL to both workers and
    the launcher, then the same command says "resumed from step N" and ends bitwise equal to an uninterrupted
    2-process run."""
    cache = build_tiny_cache(tmp_path / "store", hookpoints=("layers.1",))
    env = {**os.environ, "SAELAB_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    # positions 0-3 left out, 60 steps per epoch of 128 rows: 300 steps, checkpoints every ~0.1 s, none by
    # step count (1000)
    extra = ["--hookpoints", "layers.1", "--epochs", "5", "--device", "cpu", "--checkpoint_every_minutes", "0.002",
             "--exclude_positions", "0", "1", "2", "3"]
    ref = _torchrun_saelab(train_args(cache.path, "ref", *extra), env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_out = results_dir / "ref" / "dictionaries" / "layers.1"
    total = json.loads((ref_out / "cfg.json").read_text())["metadata"]["training"]["steps"]
    assert total == 300 and "resumed" not in ref.stderr

    out = results_dir / "killed" / "dictionaries" / "layers.1"
    proc = subprocess.Popen([*TORCHRUN, "-m", "saelab", *train_args(cache.path, "killed", *extra)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_checkpoint(proc, out)
    finally:
        workers = _kill_torchrun(proc)
    assert len(workers) == 2
    partial = list_checkpoints(out / CHECKPOINT_DIR)
    assert partial and max(partial) < total
    assert not (out / "cfg.json").exists()  # killed before the end

    resumed = _torchrun_saelab(train_args(cache.path, "killed", *extra), env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = [line for line in resumed.stderr.splitlines() if "resumed from step" in line]
    assert len(said) == 1, resumed.stderr[-3000:]  # rank 0 only
    step = int(said[0].split("resumed from step ")[1].split()[0])
    assert step >= max(partial) and step < total
    entries = [json.loads(line) for line in (out / TRAINING_LOG).read_text().splitlines()]
    assert [e for e in entries if "event" in e] == [
        {"event": "resumed", "step": step, "tokens": step * 128, "epoch": step // 60,
         "checkpoint": f"checkpoints/step_{step:09d}"}]
    ref_entries = [json.loads(line) for line in (ref_out / TRAINING_LOG).read_text().splitlines()]
    assert [e["step"] for e in entries if "event" not in e] == [e["step"] for e in ref_entries]
    a = load_file(str(ref_out / "dictionary.safetensors"))
    b = load_file(str(out / "dictionary.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), "resumed weights differ"
