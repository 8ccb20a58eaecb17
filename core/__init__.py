"""saelab: the sparse-dictionary pipeline for language models, every step a plugin.

Public API for plugins and users. Plugins import only from here (and the documented submodules
``saelab.options``, ``saelab.errors``, ``saelab.interfaces``, ``saelab.cli`` and later stage modules).
"""

from . import hookpoints as _hookpoints
from .errors import (
    CorruptCacheError,
    DuplicateNameError,
    FailedWorkError,
    SaelabError,
    UnknownNameError,
    UsageError,
)
from .formats import hookpoint_from_external as _hookpoint_from_external
from .hookspecs import hookimpl
from .interfaces import (
    ActivationSource,
    Dataset,
    DictionaryFormat,
    DictionaryOutput,
    Explainer,
    LayerReplacement,
    NeighbourFinder,
    NonActivatingSource,
    Plugin,
    Provider,
    Sampler,
    Scorer,
    SiteSpec,
    SparseDictionary,
    SparseLatents,
)
from .manager import (
    KINDS,
    get_plugin_manager,
    plugin_infos,
    register_plugin,
    registry,
    resolve,
    unregister_plugin,
)
from .options import Options
from .registry import Registry

_hookpoints.use_external_names(_hookpoint_from_external)  # error hints name other libraries' hooks via formats

__all__ = [
    "FailedWorkError",
    "KINDS",
    "ActivationSource",
    "CorruptCacheError",
    "Dataset",
    "DictionaryFormat",
    "DictionaryOutput",
    "DuplicateNameError",
    "Explainer",
    "LayerReplacement",
    "NeighbourFinder",
    "NonActivatingSource",
    "Options",
    "Plugin",
    "Provider",
    "Registry",
    "SaelabError",
    "Sampler",
    "Scorer",
    "SiteSpec",
    "SparseDictionary",
    "SparseLatents",
    "UnknownNameError",
    "UsageError",
    "get_plugin_manager",
    "hookimpl",
    "plugin_infos",
    "register_plugin",
    "registry",
    "resolve",
    "unregister_plugin",
]
