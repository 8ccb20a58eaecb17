"""Helpers for the dataset and activation-cache tests: a cheap fake activation source whose rows
identify themselves, and file snapshots for resume checks."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from saelab import ActivationSource

WINDOW_MOD = 2**20
"""Window hashes are kept below this so they are exact in float32."""


def window_hash(ids: torch.Tensor) -> torch.Tensor:
    """A per-window integer hash ``[batch]`` (exact in float32)."""
    weights = torch.arange(1, ids.shape[-1] + 1, dtype=torch.int64) * 7919
    return (ids.long() * weights).sum(-1) % WINDOW_MOD


class FakeSource(ActivationSource):
    """Activations that name their row: ``[window hash, position, token, 1, 1, ...]`` (width ``dim``).

    ``scale`` multiplies column 3 onward (to exercise float16 clamping); ``on_batch`` is called
    before every batch with the running batch count (to kill a build mid-way or watch the disk).
    """

    name = "fake-source"

    def __init__(self, tokenizer: Any, dim: int = 4, n_layers: int = 2, scale: float = 1.0,
                 on_batch: Callable[[int], None] | None = None, model_id: str = "fake"):
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.dim = dim
        self._n_layers = n_layers
        self.scale = scale
        self.on_batch = on_batch
        self.calls = 0

    def identity(self) -> dict[str, Any]:
        return {"model": self.model_id, "dim": self.dim, "scale": self.scale}

    def hookpoints(self) -> list[str]:
        return ["embed", *[f"layers.{i}" for i in range(self._n_layers)]]

    def hookpoint_dim(self, hookpoint: str) -> int:
        return self.dim

    @property
    def n_layers(self) -> int:
        return self._n_layers

    def activations(self, input_ids: torch.Tensor, hookpoints: Sequence[str],
                    attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.on_batch is not None:
            self.on_batch(self.calls)
        self.calls += 1
        b, t = input_ids.shape
        out = torch.ones(b, t, self.dim) * self.scale
        out[:, :, 0] = window_hash(input_ids)[:, None].float()
        out[:, :, 1] = torch.arange(t, dtype=torch.float32)[None]
        out[:, :, 2] = input_ids.float()
        return {hp: out + i * 0.5 * (torch.arange(self.dim) >= 3) for i, hp in enumerate(hookpoints)}

    def logits(self, input_ids: torch.Tensor, replacements: Mapping[str, Any] | None = None,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """``{relative path: (inode, mtime_ns, content)}`` of the shard files under a cache directory."""
    out = {}
    for path in sorted(root.rglob("*.safetensors")):
        st = os.stat(path)
        out[str(path.relative_to(root))] = (st.st_ino, st.st_mtime_ns, path.read_bytes())
    return out
