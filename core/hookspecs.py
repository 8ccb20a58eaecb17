"""Hook specifications: one ``register_<kind>s(register)`` hook per plugin kind, plus commands.

Every hook here must be documented in ``docs/plugins/hooks.md`` (a test checks it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import pluggy

if TYPE_CHECKING:
    import click

PROJECT = "saelab"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

PluginClass = TypeVar("PluginClass", bound=type)

Register = Callable[[PluginClass], PluginClass]
"""What a ``register_<kind>s`` hook receives: ``register(cls)`` adds ``cls`` to the kind's registry and
returns it."""


@hookspec
def register_architectures(register: Register) -> None:
    """Register :class:`~saelab.SparseDictionary` subclasses (SAE, transcoder, crosscoder... architectures)."""


@hookspec
def register_dictionary_formats(register: Register) -> None:
    """Register :class:`~saelab.DictionaryFormat` subclasses that load/save dictionaries on disk."""


@hookspec
def register_activation_sources(register: Register) -> None:
    """Register :class:`~saelab.ActivationSource` subclasses (language models with hookpoints)."""


@hookspec
def register_datasets(register: Register) -> None:
    """Register :class:`~saelab.Dataset` subclasses (text sources)."""


@hookspec
def register_samplers(register: Register) -> None:
    """Register :class:`~saelab.Sampler` subclasses that pick activating examples."""


@hookspec
def register_non_activating_sources(register: Register) -> None:
    """Register :class:`~saelab.NonActivatingSource` subclasses that pick windows where a latent is off."""


@hookspec
def register_neighbour_finders(register: Register) -> None:
    """Register :class:`~saelab.NeighbourFinder` subclasses (latent similarity measures)."""


@hookspec
def register_explainers(register: Register) -> None:
    """Register :class:`~saelab.Explainer` subclasses."""


@hookspec
def register_scorers(register: Register) -> None:
    """Register :class:`~saelab.Scorer` subclasses."""


@hookspec
def register_providers(register: Register) -> None:
    """Register :class:`~saelab.Provider` subclasses (LLM backends)."""


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add click commands to the ``saelab`` command group ``cli``."""
