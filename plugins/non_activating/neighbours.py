"""Non-activating source ``neighbours``: windows where a related latent fires and the target does not."""

from __future__ import annotations

from dataclasses import replace

from saelab import NonActivatingSource, Options, hookimpl
from saelab.examples import NonActivatingContext, Window, candidate_windows, fires_in, random_blocks


class NeighboursOptions(Options):
    """Options of the neighbours source."""

    fill_random: bool = True
    """Top up with random silent windows (marked ``random``) when the neighbours give too few."""


class NeighboursNonActivating(NonActivatingSource):
    """Hard negatives from neighbour latents (``--neighbours_type``): their strongest windows in which
    the target latent is silent, taken round-robin over the neighbours, most similar first."""

    name = "neighbours"
    Options = NeighboursOptions
    needs_neighbours = True

    def non_activating(self, latent: int, n: int, context: NonActivatingContext) -> list[Window]:
        """Up to ``n`` windows where a neighbour fires and ``latent`` does not."""
        cache, geometry = context.cache, context.geometry
        exclude = set(context.exclude)
        queues = []
        for neighbour, _ in context.neighbours or []:
            windows = candidate_windows(cache.latent(neighbour), geometry, 1).windows()
            silent = ~fires_in(context.activations, windows, cache.ctx_len)
            queues.append([replace(w, source=f"neighbours:{neighbour}") for w, ok in zip(windows, silent.tolist(),
                                                                                         strict=True) if ok])
        out = []
        depth = 0
        while len(out) < n and any(depth < len(q) for q in queues):
            for q in queues:
                if depth < len(q) and q[depth].key not in exclude and not any(q[depth].overlaps(w) for w in out):
                    out.append(q[depth])
                    exclude.add(q[depth].key)
                    if len(out) == n:
                        break
            depth += 1
        if len(out) < n and self.options.fill_random:
            fill = random_blocks(cache, geometry, context.activations, n - len(out), exclude, context.generator)
            out += [replace(w, source="random") for w in fill]
        return out


@hookimpl
def register_non_activating_sources(register):
    register(NeighboursNonActivating)
