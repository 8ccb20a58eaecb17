"""Non-activating source ``random``: random windows where the latent is silent (delphi's default)."""

from __future__ import annotations

from saelab import NonActivatingSource, hookimpl
from saelab.examples import NonActivatingContext, Window, random_blocks


class RandomNonActivating(NonActivatingSource):
    """Uniformly drawn fixed blocks of the corpus in which the latent never fires."""

    name = "random"

    def non_activating(self, latent: int, n: int, context: NonActivatingContext) -> list[Window]:
        """Up to ``n`` distinct silent windows, none in ``context.exclude``."""
        return random_blocks(context.cache, context.geometry, context.activations, n, context.exclude,
                             context.generator)


@hookimpl
def register_non_activating_sources(register):
    register(RandomNonActivating)
