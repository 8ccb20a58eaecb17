"""Helpers for the trainer tests: synthetic sparse data, and a script entry point used in subprocesses
(SIGKILL/resume and torchrun tests).

``python tests/training_helpers.py DATA.safetensors OUT_DIR [key=value ...]`` trains a ``topk`` SAE on
the ``x`` tensor of DATA with the given trainer options, saves it under ``OUT_DIR/topk`` and writes
``OUT_DIR/done.json`` with the final metrics. ``SLOW_STEP_S`` (env) sleeps after each batch so a
test can kill the process mid-run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from saelab.training import TensorSource


def synthetic(n: int = 4096, d: int = 32, n_features: int = 96, active: float = 4.0, seed: int = 0,
              scale: float = 1.0, offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that are sparse non-negative combinations of unit directions, plus small noise.

    Returns ``(x [n, d], directions [n_features, d])``; ``scale``/``offset`` move the data away from the
    unit scale so that normalisation matters.
    """
    gen = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n_features, d, generator=gen), dim=-1)
    freq = active / n_features
    on = torch.rand(n, n_features, generator=gen) < freq
    coeff = on * torch.rand(n, n_features, generator=gen) * 2
    x = coeff @ directions + 0.01 * torch.randn(n, d, generator=gen)
    return x * scale + offset, directions


@torch.no_grad()
def topk_sae(d: int, d_sae: int, k: int, seed: int = 0):
    """A real ``topk`` architecture instance (seeded)."""
    from saelab import SiteSpec
    from saelab.dictionary import build_dictionary

    torch.manual_seed(seed)
    return build_dictionary("topk", SiteSpec(["h"], ["h"], d, d), {"d_sae": d_sae, "k": k})


def state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Bitwise equality of two modules' state dicts."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class SlowTensorSource(TensorSource):
    """A TensorSource that sleeps after each batch (so a subprocess can be killed mid-run)."""

    def __init__(self, data: dict[str, torch.Tensor], delay: float):
        super().__init__(data)
        self.delay = delay

    def batches(self, *args: Any, **kwargs: Any) -> Iterator[dict[str, torch.Tensor]]:
        for batch in super().batches(*args, **kwargs):
            yield batch
            if self.delay:
                time.sleep(self.delay)


def main(argv: list[str]) -> None:
    """Script entry point (see the module docstring)."""
    from saelab.training import DictionaryJob, Trainer, TrainerConfig, init_distributed
    from safetensors.torch import load_file

    data_path, out_dir, *pairs = argv
    options: dict[str, object] = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        options[key] = json.loads(value)
    d_sae = int(options.pop("d_sae", 64))
    k = int(options.pop("k", 4))
    config = TrainerConfig.parse(options)
    dist = init_distributed(config.device)
    x = load_file(data_path)["x"]
    module = topk_sae(x.shape[1], d_sae, k, seed=config.seed)
    out = Path(out_dir)
    job = DictionaryJob(name="topk", module=module, out_dir=out / "topk")
    source = SlowTensorSource({"h": x}, float(os.environ.get("SLOW_STEP_S", "0")))
    (result,) = Trainer([job], config, dist=dist, progress=False).fit(source)
    if dist.is_main:
        (out / "done.json").write_text(json.dumps({"steps": result.steps, "metrics": result.metrics,
                                                   "world_size": dist.world_size}))
    if dist.active:
        import torch.distributed

        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])


def build_tiny_cache(store: Path, hookpoints: tuple[str, ...] = ("layers.0", "layers.1"), n_tokens: int = 8192,
                     ctx_len: int = 64):
    """An activation cache of the tiny GPT-2 fixture over the embedded news sample (seconds)."""
    from fixtures.tiny_models import TINY_GPT2
    from saelab.activation_cache import build_activation_cache
    from saelab.data import load_dataset_source
    from saelab.models import load_activation_source

    source = load_activation_source(str(TINY_GPT2))
    dataset = load_dataset_source("news-sample", split="train")
    return build_activation_cache(source, dataset, list(hookpoints), n_tokens=n_tokens, ctx_len=ctx_len,
                                  batch_size=16, store=store, progress=False)


def train_args(cache: Path | None, name: str, *extra: str) -> list[str]:
    """``saelab train`` arguments for a small TopK run on the tiny cache."""
    from fixtures.tiny_models import TINY_GPT2

    args = ["train", str(TINY_GPT2), "--name", name, "-o", "k", "8", "-o", "d_sae", "128",
            "--train_batch_size", "128", "--log_every", "5", "--verbose", "false"]
    if cache is not None:
        args += ["--cache", str(cache)]
    return [*args, *extra]


def cached_rows(cache, hookpoint: str, exclude: tuple[int, ...] = (0, 1, 2, 3)) -> torch.Tensor:
    """All rows of ``hookpoint`` in a cache, excluded positions dropped (raw values)."""
    rows = []
    for _, acts in cache.iter_sequences([hookpoint], 64):
        a = acts[hookpoint]
        keep = [p for p in range(a.shape[1]) if p not in exclude]
        rows.append(a[:, keep].reshape(-1, a.shape[-1]))
    return torch.cat(rows)


def wait_for_checkpoint(proc: subprocess.Popen[str], out: Path, timeout_s: float = 300.0) -> None:
    """Wait until the training run ``proc`` (writing dictionary ``out``) has written a checkpoint, failing
    when it ends first or none appears within ``timeout_s``; ``proc`` is still running on return."""
    from saelab.training import CHECKPOINT_DIR, list_checkpoints

    deadline = time.monotonic() + timeout_s
    while not list_checkpoints(out / CHECKPOINT_DIR):
        assert proc.poll() is None, f"run ended before a checkpoint: {proc.stderr.read() if proc.stderr else ''}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    assert proc.poll() is None


def kill_after_first_checkpoint(command: list[str], out: Path, env: dict[str, str]) -> list[int]:
    """Start the training ``command``, SIGKILL it once dictionary ``out`` has a checkpoint (before the run
    ends: no ``cfg.json``), and return the steps of the checkpoints it left."""
    import signal

    from saelab.training import CHECKPOINT_DIR, list_checkpoints

    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_checkpoint(proc, out)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "cfg.json").exists()  # killed before the end
    return list_checkpoints(out / CHECKPOINT_DIR)
