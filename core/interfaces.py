"""Base classes of every plugin kind. A plugin subclasses one and registers it through a hook.

The core defines these contracts and never imports an implementation; implementations live in
plugin modules (the builtins under ``saelab.plugins``, or third-party packages).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from .hookpoints import validate_hookpoints
from .options import Options

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .examples import Candidates, NeighbourContext, NonActivatingContext, Window
    from .llm import ChatMessage, Completion, ParamValue
    from .prompts import Placeholders, Prompts, PromptValue
    from .records import Explanation, LatentRecord, ScoreResult, Usage


class Plugin:
    """Shared shape of registered classes: a registry ``name``, optional ``aliases`` and ``Options``."""

    name: ClassVar[str]
    """Registry key (matched case-insensitively)."""
    aliases: ClassVar[tuple[str, ...]] = ()
    """Other names that resolve to this class (e.g. an old name users still type)."""
    Options: ClassVar[type[Options]] = Options
    """Typed options model of this class; rejects unknown keys."""

    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""


# --------------------------------------------------------------------------------------------------
# Activation sources (language models) and datasets


class ActivationSource(Plugin, ABC):
    """A language model that returns activations at model-agnostic hookpoints.

    Hookpoint names: ``embed``, ``layers.N`` (residual stream after block N), ``layers.N.resid_mid``
    (between its attention and its MLP), ``layers.N.mlp`` / ``layers.N.mlp.input``, ``layers.N.self_attn`` /
    ``layers.N.self_attn.input`` (see :mod:`saelab.hookpoints`). Created as ``cls(model_id, options)`` with
    ``options`` an instance of ``cls.Options``; :func:`saelab.models.load_activation_source` does that from a
    name, adding the credential ``hf_token=...`` (not an option) when the constructor takes that keyword.
    """

    default_values: ClassVar[Mapping[str, str | int | float | bool]] = {}
    """CLI defaults this source brings when MODEL names it: option name -> value, used for the options
    the user did not give (the embedded ``smollm2`` brings ``dataset_repo`` and ``n_tokens`` that need no
    network or GPU). Empty for sources that keep the delphi defaults."""
    excluded_positions: ClassVar[tuple[int, ...]] = (0,)
    """Window positions training leaves out by default (and evaluation / latents after it, through the
    dictionary's ``cfg.json``); see :mod:`saelab.positions`. Default: position 0, where every window's BOS
    token sits (the same input everywhere, a constant activation). A model with massive activations on
    its first tokens declares them too (SmolLM2: ``(0, 1, 2, 3)``)."""
    tokenizer: PreTrainedTokenizerBase
    """The model's tokenizer (a Hugging Face tokenizer)."""
    model_id: str
    """The id, path or embedded name the source was created from."""
    device: torch.device | str | None = None
    """Where the model runs: the engine moves input ids there before :meth:`activations` (None: it leaves
    them on the CPU, for a source that places its inputs itself)."""

    @classmethod
    def accepts(cls, model: str) -> bool:
        """Whether this class can load ``model`` when it is not one of the registered names."""
        return False

    @abstractmethod
    def identity(self) -> dict[str, object]:
        """What identifies the model's values: id, weights hash or revision, dtype (for fingerprints)."""

    @abstractmethod
    def hookpoints(self) -> list[str]:
        """Every valid hookpoint name, in forward order."""

    @abstractmethod
    def hookpoint_dim(self, hookpoint: str) -> int:
        """Width of the activations at ``hookpoint``."""

    def check_hookpoints(self, hookpoints: Sequence[str]) -> list[str]:
        """Validate names and return them deduplicated; an unknown one raises a one-line error saying
        what is wrong (bad form, layer out of range, a close match) and listing the valid names."""
        return validate_hookpoints(hookpoints, self.hookpoints(), self.model_id)

    @property
    @abstractmethod
    def n_layers(self) -> int:
        """Number of transformer blocks."""

    @abstractmethod
    def activations(
        self, input_ids: torch.Tensor, hookpoints: Sequence[str], attention_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Activations ``[batch, seq, d]`` at each hookpoint; the forward stops after the last one needed."""

    @abstractmethod
    def logits(
        self,
        input_ids: torch.Tensor,
        replacements: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Full-forward logits, with the activation at each hookpoint in ``replacements`` replaced by
        ``fn(activation)`` (how a dictionary is spliced into the model for CE/KL evaluation)."""

    def unembedding(self) -> torch.Tensor | None:
        """The unembedding matrix ``[d_model, vocab]`` for direct logit attribution, if there is one."""
        return None


class DatasetOptions(Options):
    """Options every dataset plugin takes (the ``--dataset_*`` flags); a dataset's own ``Options``
    subclass this."""

    split: str = "train"
    """Split expression, e.g. ``train``, ``train[:1%]``, ``train[100:200]``, ``train[:50%]+test``."""
    name: str | None = None
    """Dataset configuration name (``--dataset_name``); empty means none."""
    column: str = "text"
    """Column holding the text (``--dataset_column``)."""
    streaming: bool = False
    """Stream a hub dataset instead of downloading it (simple ``split[a:b]`` slices are supported)."""


class Dataset(Plugin, ABC):
    """A source of text documents (embedded samples, hub datasets, local files).

    The contract :func:`saelab.data.load_dataset_source` (the factory every command uses) relies on:
    the constructor takes ``(repo, options)``, ``repo`` being what the user typed (a registered name,
    a hub id, a path, or anything :meth:`accepts` claims) and ``options`` an instance of ``cls.Options``,
    which must subclass :class:`DatasetOptions` (split, name, column, streaming: the ``--dataset_*``
    flags); the base ``__init__`` stores both. A class that downloads takes the hub credential as a
    constructor keyword ``hf_token`` (not an option), given when there is one.
    """

    Options: ClassVar[type[Options]] = DatasetOptions

    def __init__(self, repo: str, options: Options | None = None):
        self.repo = repo
        """The registered name, hub id or path the dataset was created from."""
        self.options = options if options is not None else self.Options()
        """The validated options."""

    @classmethod
    def accepts(cls, repo: str) -> bool:
        """Whether this class can read ``repo`` when it is not one of the registered names."""
        return False

    @classmethod
    def reads_whole(cls, repo: str) -> bool:
        """Whether ``repo`` is read whole (split ``train``) unless ``--dataset_split`` is given: True for
        small local or embedded data, where the hub default ``train[:1%]`` would keep a handful of rows."""
        return False

    @abstractmethod
    def texts(self) -> Iterator[str]:
        """Documents in a fixed order."""

    @abstractmethod
    def identity(self) -> dict[str, object]:
        """What identifies the documents (repo, name, split, column, file hash...) for fingerprints."""


# --------------------------------------------------------------------------------------------------
# Sparse dictionaries


@dataclass
class SiteSpec:
    """Where a dictionary reads and writes.

    A plain SAE reads and writes one site (``inputs == outputs == ["layers.8"]``); a transcoder reads
    ``["layers.8.mlp.input"]`` and writes ``["layers.8.mlp"]``; a crosscoder reads and writes several
    layers; a cross-layer transcoder reads one site per layer and writes every later one.
    Activations are passed as tensors ``[batch, n_sites, d]`` in the order listed here.
    """

    inputs: list[str]
    """Hookpoints the encoder reads."""
    outputs: list[str]
    """Hookpoints the decoder reconstructs."""
    d_in: int
    """Width of each input site."""
    d_out: int
    """Width of each output site."""

    @property
    def is_autoencoder(self) -> bool:
        """True when the dictionary reconstructs exactly what it reads."""
        return self.inputs == self.outputs


@dataclass
class SparseLatents:
    """Active latents of a batch in COO form, without a dense ``[batch, d_sae]`` tensor.

    Entry ``i`` says that latent ``cols[i]`` of batch row ``rows[i]`` has activation ``values[i]``
    (entries in row-major order; an entry may hold 0, e.g. a TopK pick whose ReLU is 0).
    """

    rows: torch.Tensor
    """``[nnz]`` int64 batch row of each entry (non-decreasing)."""
    cols: torch.Tensor
    """``[nnz]`` int64 latent index of each entry."""
    values: torch.Tensor
    """``[nnz]`` activations (detached)."""
    batch: int
    """Rows in the batch."""
    d_sae: int
    """Number of latents."""

    def dense(self) -> torch.Tensor:
        """Dense latents ``[batch, d_sae]`` (zeros where off)."""
        out = self.values.new_zeros(self.batch, self.d_sae)
        return out.index_put_((self.rows, self.cols), self.values)

    def fired(self) -> torch.Tensor:
        """``[d_sae]`` bool: latents with a nonzero activation somewhere in the batch."""
        out = torch.zeros(self.d_sae, dtype=torch.bool, device=self.cols.device)
        return out.index_fill_(0, self.cols[self.values != 0], True)

    def l0(self) -> torch.Tensor:
        """Mean number of nonzero latents per row (a 0-dim float tensor)."""
        return (self.values != 0).sum().float() / max(1, self.batch)


class DictionaryOutput:
    """Result of a dictionary's forward pass: reconstruction, latents and named loss terms.

    Latents come dense (``latents``) or sparse (``sparse_latents``, what the TopK family produces so
    that training never builds a dense ``[batch, d_sae]`` tensor). ``latents`` densifies sparse ones
    on first access; :meth:`fired` and :meth:`l0` (what the trainer logs) read the sparse form when there
    is one.
    """

    def __init__(self, reconstruction: torch.Tensor, latents: torch.Tensor | None = None,
                 losses: dict[str, torch.Tensor] | None = None, *,
                 sparse_latents: SparseLatents | None = None):
        if latents is None and sparse_latents is None:
            raise ValueError("a DictionaryOutput needs dense latents or sparse_latents")
        self.reconstruction = reconstruction
        """``[batch, n_outputs, d_out]``."""
        self.losses: dict[str, torch.Tensor] = dict(losses or {})
        """Named loss terms; the trainer minimises their sum. Empty when there is nothing to compare
        with (a transcoder run without its target, i.e. inference)."""
        self.sparse_latents = sparse_latents
        """The active latents in COO form, when the architecture produces them (else None)."""
        self._latents = latents

    @property
    def latents(self) -> torch.Tensor:
        """Latent activations ``[batch, d_sae]`` (dense; zeros where a latent is off)."""
        if self._latents is None:
            assert self.sparse_latents is not None
            self._latents = self.sparse_latents.dense()
        return self._latents

    def fired(self) -> torch.Tensor:
        """``[d_sae]`` bool: latents active on at least one row of the batch."""
        if self.sparse_latents is not None:
            return self.sparse_latents.fired()
        return (self.latents != 0).any(0)

    def l0(self) -> torch.Tensor:
        """Mean number of active latents per row (0-dim float tensor)."""
        if self.sparse_latents is not None:
            return self.sparse_latents.l0()
        return (self.latents != 0).sum(-1).float().mean()

    def __repr__(self) -> str:
        shape = tuple(self.reconstruction.shape)
        return f"DictionaryOutput(reconstruction={shape}, losses={sorted(self.losses)})"


class LayerReplacement:
    """One closed-loop pass of a dictionary whose sites are layers (``per_layer_sites``), driven by the
    LM's forward in layer order: :meth:`read` when input site ``i`` is reached, :meth:`write` when output
    site ``j`` is (after ``read(j)``), :meth:`latents` after the last write.

    This generic pass runs the whole dictionary at every output site (L forwards per pass; layers not
    read yet keep their clean inputs) and keeps that site's reconstruction. Architectures whose layers
    can be encoded one at a time return a pass that encodes each layer once from
    :meth:`SparseDictionary.layer_replacement`; both must give the same outputs."""

    def __init__(self, module: SparseDictionary, inputs: torch.Tensor, targets: torch.Tensor | None = None):
        self.module = module
        """The dictionary (in eval mode, set by the caller)."""
        self.inputs = inputs.clone()
        """``[N, L, d_in]`` what each input site holds: clean until :meth:`read` replaces it."""
        self.targets = targets
        """``[N, L, d_out]`` clean outputs, only for architectures that compute loss terms in forward."""
        self._latents: torch.Tensor | None = None

    def read(self, i: int, x: torch.Tensor) -> None:
        """Input site ``i`` holds ``x [N, d_in]`` in this forward."""
        self.inputs[:, i] = x

    def write(self, j: int) -> torch.Tensor:
        """Reconstruction ``[N, d_out]`` of output site ``j`` from the inputs read so far."""
        out = self.module(self.inputs, self.targets)
        if j == self.inputs.shape[1] - 1:
            self._latents = out.latents
        return out.reconstruction[:, j]

    def latents(self) -> torch.Tensor:
        """``[N, d_sae]`` every layer's latents on the inputs read (after the last :meth:`write`)."""
        if self._latents is None:
            raise RuntimeError("latents are known after the last output site is written")
        return self._latents


class SparseDictionary(nn.Module, Plugin, ABC):
    """An architecture: encoder to ``d_sae`` sparse latents and decoder back to the output sites.

    **Must implement** (abstract): :attr:`d_sae`, :meth:`encode` and :meth:`decode`. A class that lacks
    one is refused with a one-line error when it is built by name (``build_dictionary``, the CLI) and
    cannot be instantiated directly.

    **Working defaults** (override where the architecture needs more): :meth:`forward` (encode, decode,
    loss ``mse``), the training hooks :meth:`initialize_from_data`, :meth:`before_optimizer_step`,
    :meth:`after_optimizer_step`, :meth:`synchronize` (no-ops), :meth:`config`, :attr:`extra_config`,
    :attr:`uses_pre_encoder_bias` (False), :meth:`decoder_directions` (``W_dec`` when there is one) and
    :meth:`encoder_directions` (``W_enc`` transposed).

    **Needed for normalised training**: :meth:`fold_scaling` has no generic default (the base raises:
    how scales enter the weights depends on the architecture). The trainer normalises by default
    (``normalise="norm"``) and checks this before the first step: a class without it is refused with a
    one-line error (train with ``normalise="none"``, or implement it).
    :class:`saelab.dictionary.LinearDictionary` implements it (and everything but ``encode``) for any
    linear encoder/decoder; third-party architectures normally subclass it.

    ``requires_sequences`` marks architectures (e.g. Lorsa) that need ``[batch, seq, n_sites, d]``.
    """

    requires_sequences: ClassVar[bool] = False
    """True when the architecture reads whole token sequences rather than independent rows."""

    def __init__(self, sites: SiteSpec, options: Options):
        super().__init__()
        self.sites = sites
        self.options = options
        self.extra_config: dict[str, object] = {}
        """Free-form metadata recorded with the dictionary (training's position exclusions, normalisation,
        source format...); :class:`saelab.dictionary.LinearDictionary` saves it under ``"metadata"`` in
        ``cfg.json``."""

    @property
    def uses_pre_encoder_bias(self) -> bool:
        """Whether the encoder reads ``x - b_dec`` (SAELens' ``apply_b_dec_to_input``); False by default."""
        return False

    def decoder_directions(self) -> torch.Tensor | None:
        """Each latent's decoder direction, ``[d_sae, n_outputs * d_out]`` (SAELens ``W_dec`` layout), for
        direct logit attribution; None when the decoder has no such matrix. Default: the module's ``W_dec``
        tensor when it has one."""
        weight = getattr(self, "W_dec", None)
        return weight if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None

    def _decoder_blocks(self) -> torch.Tensor | None:
        """:meth:`decoder_directions` as float32 ``[d_sae, n_outputs, d_out]``; None without one."""
        weight = self.decoder_directions()
        n, d = len(self.sites.outputs), self.sites.d_out
        if weight is None or weight.shape[-1] != n * d:
            return None
        return weight.detach().float().reshape(-1, n, d)

    def output_directions(self, outputs: Sequence[int] | None = None) -> torch.Tensor | None:
        """Each latent's decoder rows summed over the output sites ``outputs`` (indices into
        ``sites.outputs``; default all), float32 ``[d_sae, d_out]``: what the latent adds to the residual
        stream when ``outputs`` are the sites that write into it (direct logit attribution). None when the
        decoder has no such matrix. Default: built on :meth:`decoder_directions`."""
        blocks = self._decoder_blocks()
        if blocks is None:
            return None
        return (blocks if outputs is None else blocks[:, list(outputs)]).sum(1)

    def site_preactivations(self, x: torch.Tensor) -> torch.Tensor | None:
        """Each input site's additive share of the pre-activation, ``[batch, n_inputs, d_sae]`` for inputs
        ``[batch, n_inputs, d_in]`` (a crosscoder: ``x_h @ W_enc[h]``, summing to the pre-activation less
        the encoder bias); None when the encoder does not split into per-site shares (the default)."""
        return None

    def decoder_norms_by_output(self) -> torch.Tensor | None:
        """Norm of each latent's decoder to each output site, float32 ``[d_sae, n_outputs]`` (zero where it
        does not write); None when the decoder has no such matrix. Default: built on
        :meth:`decoder_directions`."""
        blocks = self._decoder_blocks()
        return None if blocks is None else blocks.norm(dim=-1)

    per_layer_sites: ClassVar[bool] = False
    """True when the sites are layers: input site ``i`` and output site ``i`` belong to layer ``i``, in forward
    order, and ``d_sae`` counts the latents of every layer (a cross-layer transcoder)."""

    @classmethod
    def sites_for_layers(cls, layers: Sequence[int], options: Options) -> tuple[list[str], list[str]] | None:
        """The input and output sites of one dictionary of this architecture spanning ``layers`` (sorted
        block indices; ``saelab train --layers``) with ``options`` (an instance of ``cls.Options``); None
        (the default) when the architecture does not span layers."""
        return None

    def layer_replacement(self, inputs: torch.Tensor, targets: torch.Tensor | None = None) -> LayerReplacement:
        """A closed-loop pass over ``inputs [N, L, d_in]`` (clean; ``targets [N, L, d_out]`` the clean
        outputs) for a ``per_layer_sites`` dictionary. Default: the generic :class:`LayerReplacement`
        (the whole dictionary at every output site); override with one that encodes each layer once."""
        return LayerReplacement(self, inputs, targets)

    def encoder_directions(self) -> torch.Tensor | None:
        """Each latent's encoder direction, ``[d_sae, n_inputs * d_in]``, for encoder-similarity neighbours;
        None when the encoder has no such matrix. Default: the transpose of the module's ``W_enc`` tensor
        (``[n_inputs * d_in, d_sae]``) when it has one."""
        weight = getattr(self, "W_enc", None)
        return weight.T if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None

    @classmethod
    def missing_methods(cls, *, fold_scaling: bool = False) -> list[str]:
        """Names of the required methods ``cls`` does not implement (with ``fold_scaling``: also that one)."""
        missing = sorted(getattr(cls, "__abstractmethods__", ()))
        if fold_scaling and cls.fold_scaling is SparseDictionary.fold_scaling:
            missing.append("fold_scaling")
        return missing

    @classmethod
    def check_contract(cls, *, fold_scaling: bool = False, why: str = "") -> None:
        """One-line :class:`~saelab.UsageError` naming ``cls`` and the required methods it lacks (see
        :meth:`missing_methods`); ``why`` says what needs them."""
        missing = cls.missing_methods(fold_scaling=fold_scaling)
        if missing:
            from .errors import UsageError

            label = f"architecture {getattr(cls, 'name', '?')!r} (class {cls.__module__}.{cls.__qualname__})"
            raise UsageError(f"{label} does not implement {', '.join(missing)}{why}; a SparseDictionary must "
                             f"implement d_sae, encode and decode (and fold_scaling for normalised training), "
                             f"or subclass saelab.dictionary.LinearDictionary")

    @property
    @abstractmethod
    def d_sae(self) -> int:
        """Number of latents."""

    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations ``[batch, d_sae]`` for inputs ``[batch, n_inputs, d_in]``."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[batch, n_outputs, d_out]`` from latents ``[batch, d_sae]``."""

    def forward(
        self, x: torch.Tensor, target: torch.Tensor | None = None, dead_mask: torch.Tensor | None = None
    ) -> DictionaryOutput:
        """Encode, decode and compute loss terms against ``target`` (defaults to ``x``).

        ``dead_mask`` (``[d_sae]`` bool, set by the trainer) marks latents that have not fired for a
        while; architectures with an auxiliary dead-latent loss (AuxK) use it.
        """
        latents = self.encode(x)
        recon = self.decode(latents)
        target = x if target is None else target
        return DictionaryOutput(recon, latents, {"mse": (recon - target).pow(2).sum(-1).mean()})

    # Training hooks: the generic trainer calls these; the defaults do nothing.

    def initialize_from_data(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """Data-dependent initialisation (e.g. ``b_dec`` at the geometric median) from a sample batch."""

    def before_optimizer_step(self) -> None:
        """Adjust gradients before the optimizer step (e.g. remove the part parallel to decoder rows)."""

    def after_optimizer_step(self) -> None:
        """Restore invariants after the step (e.g. unit-norm decoder rows)."""

    def synchronize(self, all_reduce_mean: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Average global training state (e.g. BatchTopK thresholds) across data-parallel ranks."""

    def fold_scaling(self, input_scales: torch.Tensor, output_scales: torch.Tensor) -> None:
        """Fold activation normalisation into the weights, so that the saved dictionary takes raw
        activations: training saw ``x[:, i] * input_scales[i]`` and reconstructed
        ``y[:, j] * output_scales[j]``. Both are 1-D tensors, one scale per input (output) site in
        :class:`SiteSpec` order. No generic default: required for normalised training (see the class)."""
        raise NotImplementedError(f"{type(self).__name__} cannot fold activation scaling")

    def config(self) -> dict[str, object]:
        """Everything needed to rebuild the module (architecture name, sites, options) as JSON data."""
        return {
            "architecture": self.name,
            "sites": {"inputs": self.sites.inputs, "outputs": self.sites.outputs,
                      "d_in": self.sites.d_in, "d_out": self.sites.d_out},
            "options": self.options.model_dump(mode="json"),
        }


class DictionaryFormat(Plugin, ABC):
    """Reads (and possibly writes) dictionaries in an on-disk format (saelab, SAELens, sparsify...)."""

    @classmethod
    @abstractmethod
    def detect(cls, path: Path) -> bool:
        """Whether ``path`` holds a dictionary in this format."""

    @abstractmethod
    def load(self, path: Path, device: str | torch.device = "cpu") -> SparseDictionary:
        """Load the dictionary stored at ``path``."""

    @classmethod
    def hookpoint_from_external(cls, name: str) -> str | None:
        """The saelab hookpoint that ``name``, a hook name in the library this format reads (SAELens
        ``blocks.8.hook_resid_post``, a module path ``model.layers.8.mlp``...), stands for; None when
        ``name`` is not one of its names. Asked of every registered format by
        :func:`saelab.formats.hookpoint_from_external`."""
        return None

    def save(self, dictionary: SparseDictionary, path: Path) -> None:
        """Write ``dictionary`` to ``path`` in this format."""
        from .errors import UsageError

        raise UsageError(f"dictionary format {self.name!r} is read-only")


# --------------------------------------------------------------------------------------------------
# Auto-interpretation


class _OptionedPlugin(Plugin):
    """Shared construction of samplers, non-activating sources and neighbour finders: ``cls(options)``
    with ``options`` an instance of ``cls.Options`` or a mapping validated into one."""

    def __init__(self, options: Options | Mapping[str, object] | None = None):
        if not isinstance(options, Options):
            options = self.Options.parse(dict(options or {}), where=f"{self.name} options")
        self.options = options
        """The validated options."""


class Sampler(_OptionedPlugin, ABC):
    """Chooses activating example windows of a latent (top, random, quantiles, mix...).

    ``candidates`` is a :class:`saelab.examples.Candidates` (one latent's non-overlapping activating
    windows, strongest first, each with its activation quantile); train and test samplers each get
    their own disjoint pool of candidates.
    """

    @abstractmethod
    def sample(self, candidates: Candidates, n: int, generator: torch.Generator) -> torch.Tensor:
        """Indices (int64, into ``candidates``, no repeats) of at most ``n`` chosen windows."""


class NonActivatingSource(_OptionedPlugin, ABC):
    """Provides windows where a latent is silent (random, neighbours, FAISS hard negatives...).

    ``context`` is a :class:`saelab.examples.NonActivatingContext`: the latent cache, the window
    geometry, the reference (activating) windows to match, windows to exclude, a generator, and
    the neighbour finder and run directory where a source needs them.
    """

    needs_neighbours: ClassVar[bool] = False
    """True when the source reads ``context.neighbours`` (the builder then computes them)."""

    @abstractmethod
    def non_activating(self, latent: int, n: int, context: NonActivatingContext) -> list[Window]:
        """At most ``n`` :class:`saelab.examples.Window` s where ``latent`` does not fire, none of them
        in ``context.exclude``."""


class NeighbourFinder(_OptionedPlugin, ABC):
    """Finds latents related to a latent (co-occurrence, decoder or encoder similarity...).

    ``context`` is a :class:`saelab.examples.NeighbourContext` (the latent cache and the dictionary).
    """

    @abstractmethod
    def neighbours(self, latents: Sequence[int], k: int,
                   context: NeighbourContext) -> dict[int, list[tuple[int, float]]]:
        """For each latent, its ``k`` nearest other latents with their similarity, most similar first."""


class Provider(Plugin, ABC):
    """An LLM backend (local transformers, OpenAI-compatible servers, litellm...).

    Implementations normally subclass :class:`saelab.llm.LLMProvider`, which adds the response cache,
    the concurrency limit, retries and usage accounting around one ``_complete`` attempt.

    **Must implement**: :meth:`generate`. **Working defaults**: the constructor ``cls(options)`` (stores
    ``options``), :attr:`model`, :attr:`max_concurrency`, :attr:`usage`, :meth:`identity`, :meth:`prices` and
    :meth:`aclose` (a no-op).
    """

    takes_answer_format: ClassVar[bool] = False
    """True when :meth:`generate` takes the ``answer_format`` parameter (every
    :class:`saelab.llm.LLMProvider` does); the engine passes it only then."""
    usage: Usage | None = None
    """Calls, tokens and cost so far (:class:`saelab.records.Usage`; :class:`saelab.llm.LLMProvider` keeps
    one per instance); None for a provider that does not count (the run summary then shows no usage)."""
    max_concurrency: int | None = None
    """Requests this provider keeps in flight at once; the engine runs twice as many latents at a time
    (None: no limit of its own; the engine then runs 4 latents at a time)."""
    options: Options | None = None
    """The validated options (``cls.Options``) the provider was built with; None for one that keeps none."""
    _model: str | None = None

    def __init__(self, options: Options | None = None):
        """Store ``options`` (``cls.Options()`` when None); how :func:`saelab.llm.make_provider` builds it."""
        self.options = options if options is not None else self.Options()

    @property
    def model(self) -> str:
        """The model that answers, recorded with every explanation and score and part of their fingerprints:
        what the provider assigned (``self.model = ...``), else its options' ``model`` field when the options
        model has one, else ``""``."""
        if self._model:
            return self._model
        fields = self.options.model_dump(include={"model"}) if self.options is not None else {}
        return str(fields.get("model") or "")

    @model.setter
    def model(self, value: str) -> None:
        self._model = value

    def identity(self) -> dict[str, object]:
        """What identifies this provider's answers, part of every explanation and score fingerprint
        (default: ``{"provider": name, "model": model}``)."""
        return {"provider": self.name, "model": self.model}

    def prices(self) -> tuple[float, float] | None:
        """USD per 1k input and per 1k output tokens of this provider's model, when known (dry-run
        estimates)."""
        return None

    async def aclose(self) -> None:
        """Release clients and background tasks; the engine calls it when a run's LLM work ends (default:
        nothing to release)."""

    @abstractmethod
    async def generate(self, messages: Sequence[ChatMessage], **params: ParamValue) -> Completion:
        """One chat completion for ``messages`` (``{"role", "content"}`` dicts): a
        :class:`saelab.llm.Completion` (text, logprobs, tokens, cost, cached...), never another type (the
        engine rejects it with a one-line error), or :class:`saelab.llm.ProviderError` after retries.
        ``params`` override the provider's options per call (``temperature``, ``max_tokens``, ``logprobs``,
        ``top_logprobs``, ``answer_format``...)."""


class _PromptedPlugin(Plugin):
    """Shared construction of explainers and scorers: typed options plus resolved prompts.

    A class ships its default prompts with it: ``prompt_file`` names a YAML file next to its module (in its
    package, read with :mod:`importlib.resources`) holding the templates under ``prompt_prefix`` without the
    prefix (``system: ...``, ``user: ...``, ``examples: [...]``); or it overrides :meth:`default_prompts`.
    Users override them by dotted key (``scorers.detection.user``) with ``--prompt_override``.
    """

    prompt_prefix: ClassVar[str] = ""
    """Dotted prefix of this class's prompt keys (e.g. ``"scorers.detection"``)."""
    prompt_file: ClassVar[str] = ""
    """YAML file of the default prompts, next to the module of the class that sets it (e.g.
    ``"detection.yaml"``); empty when the class has no shipped prompts."""
    prompt_key_aliases: ClassVar[Mapping[str, str]] = {}
    """Keys of other prompt files (delphi / AutoInterp Full) -> the template name under ``prompt_prefix`` each
    one sets (e.g. ``{"explainers.default.system_contrastive": "system"}``)."""
    prompt_placeholders: ClassVar[Mapping[str, Placeholders]] = {}
    """Template name under ``prompt_prefix`` -> :class:`saelab.prompts.Placeholders` it takes; checked when
    the plugin is built (a template missing a required placeholder or holding an unknown one is a UsageError)."""

    def __init__(self, options: Options | Mapping[str, object] | None = None,
                 prompts: Mapping[str, PromptValue] | None = None):
        from .prompts import Prompts, check_templates

        if not isinstance(options, Options):
            options = self.Options.parse(dict(options or {}), where=f"{self.name} options")
        self.options = options
        defaults = self.default_prompts()
        if prompts is None:
            prompts = Prompts(defaults)
        elif not isinstance(prompts, Prompts):
            prompts = Prompts({**defaults, **prompts})
        self.prompts: Prompts = prompts.with_defaults(defaults)
        """Resolved prompts: the ones given (the same object when it has every key this class needs),
        completed with this class's defaults."""
        if self.prompt_placeholders:
            check_templates(self.prompts, self.prompt_prefix, self.prompt_placeholders)

    @classmethod
    def default_prompts(cls) -> dict[str, PromptValue]:
        """The shipped default prompts as ``{dotted key: value}`` (keys under ``prompt_prefix``): read from
        ``prompt_file``, ``{}`` without one."""
        if not cls.prompt_file:
            return {}
        from .prompts import read_prompt_file

        return read_prompt_file(cls, cls.prompt_file, cls.prompt_prefix)

    def call_params(self) -> dict[str, ParamValue]:
        """Per-call provider parameters this plugin sends (``temperature``, ``max_tokens``...); the engine
        reads ``max_tokens`` for dry-run estimates and context fitting. Default: the options' ``max_tokens``
        when the options model has that field, else nothing."""
        max_tokens = self.options.model_dump(include={"max_tokens"}).get("max_tokens")
        return {} if max_tokens is None else {"max_tokens": max_tokens}

    def prompt_version(self) -> str:
        """Hash of the prompts this instance uses (stored with every result)."""
        from .prompts import prompt_version

        prefix = self.prompt_prefix.rstrip(".") + "."
        return prompt_version({k: v for k, v in self.prompts.items() if k.startswith(prefix)})

    def identity(self) -> dict[str, object]:
        """What determines this instance's results besides its inputs: name, options, prompt version
        (part of every explanation and score fingerprint)."""
        return {"name": self.name, "options": self.options.model_dump(mode="json"),
                "prompt_version": self.prompt_version()}


class Explainer(_PromptedPlugin, ABC):
    """Turns a latent's examples into a natural-language explanation using a provider.

    Constructed as ``cls(options, prompts)`` (both optional: defaults and the shipped prompts).
    """

    def messages(self, record: LatentRecord) -> list[list[dict[str, str]]]:
        """The chat prompts :meth:`explain` would send for ``record`` (for dry runs and token estimates)."""
        return []

    @abstractmethod
    async def explain(self, record: LatentRecord, provider: Provider) -> Explanation:
        """The :class:`saelab.records.Explanation` of one :class:`saelab.records.LatentRecord` (the engine
        rejects any other return type)."""


class Scorer(_PromptedPlugin, ABC):
    """Measures how well an explanation predicts a latent's activations.

    Constructed as ``cls(options, prompts)`` (both optional: defaults and the shipped prompts).
    """

    requires_explanation: ClassVar[bool] = True
    """False for explanation-free scorers (intruder)."""
    uses_provider: ClassVar[bool] = True
    """False for scorers that run local models instead of the LLM provider (surprisal, embedding)."""

    def messages(self, record: LatentRecord, explanation: Explanation | None) -> list[list[dict[str, str]]]:
        """The chat prompts :meth:`score` would send for ``explanation`` (for dry runs and token estimates)."""
        return []

    @abstractmethod
    async def score(self, record: LatentRecord, explanation: Explanation | None,
                    provider: Provider | None) -> ScoreResult:
        """The :class:`saelab.records.ScoreResult` of one latent: per-example predictions and metrics (the
        engine rejects any other return type). ``explanation`` is None for explanation-free scorers
        (``requires_explanation = False``); ``provider`` is None when ``uses_provider`` is False."""
