"""Base classes of every plugin kind. A plugin subclasses one and registers it through a hook.

The core defines these contracts and never imports an implementation; implementations live in
plugin modules (the builtins under ``saelab.plugins``, or third-party packages).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from .options import Options

if TYPE_CHECKING:
    from .prompts import Placeholders


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

    Hookpoint names: ``embed``, ``layers.N`` (residual stream after block N), ``layers.N.mlp`` /
    ``layers.N.mlp.input``, ``layers.N.self_attn`` / ``layers.N.self_attn.input`` (see
    :mod:`saelab.models`). Created as ``cls(model_id, options)`` with ``options`` an instance of
    ``cls.Options``; :func:`saelab.models.load_activation_source` does that from a name, adding the
    credential ``hf_token=...`` (not an option) when the constructor takes that keyword.
    """

    tokenizer: Any
    """The model's tokenizer (a Hugging Face tokenizer)."""
    model_id: str
    """The id, path or embedded name the source was created from."""

    @classmethod
    def accepts(cls, model: str) -> bool:
        """Whether this class can load ``model`` when it is not one of the registered names."""
        return False

    @abstractmethod
    def identity(self) -> dict[str, Any]:
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
        from .models import validate_hookpoints

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


class Dataset(Plugin, ABC):
    """A source of text documents (embedded samples, hub datasets, local files).

    Instances are created as ``cls(repo, cls.Options.parse({...}))`` by
    :func:`saelab.data.load_dataset_source`; ``Options`` should subclass
    :class:`saelab.data.DatasetOptions` (split, name, column, streaming). A class that downloads takes
    the hub credential as a constructor keyword ``hf_token`` (not an option), given when there is one.
    """

    def __init__(self, repo: str, options: Options | None = None):
        self.repo = repo
        """The registered name, hub id or path the dataset was created from."""
        self.options = options if options is not None else self.Options()
        """The validated options."""

    @classmethod
    def accepts(cls, repo: str) -> bool:
        """Whether this class can read ``repo`` when it is not one of the registered names."""
        return False

    @abstractmethod
    def texts(self) -> Iterator[str]:
        """Documents in a fixed order."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
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


class SparseDictionary(nn.Module, Plugin):
    """An architecture: encoder to ``d_sae`` sparse latents and decoder back to the output sites.

    Subclasses implement ``encode`` and ``decode``; ``forward`` adds architecture-specific loss terms.
    ``requires_sequences`` marks architectures (e.g. Lorsa) that need ``[batch, seq, n_sites, d]``.
    """

    requires_sequences: ClassVar[bool] = False
    """True when the architecture reads whole token sequences rather than independent rows."""

    def __init__(self, sites: SiteSpec, options: Options):
        super().__init__()
        self.sites = sites
        self.options = options

    @property
    def d_sae(self) -> int:
        """Number of latents."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations ``[batch, d_sae]`` for inputs ``[batch, n_inputs, d_in]``."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[batch, n_outputs, d_out]`` from latents ``[batch, d_sae]``."""
        raise NotImplementedError

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

    def fold_scaling(self, input_scale: float, output_scale: float) -> None:
        """Fold activation normalisation into the weights, so that the saved dictionary takes raw
        activations: training saw ``x * input_scale`` and reconstructed ``y * output_scale``."""
        raise NotImplementedError(f"{type(self).__name__} cannot fold activation scaling")

    def config(self) -> dict[str, Any]:
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

    def save(self, dictionary: SparseDictionary, path: Path) -> None:
        """Write ``dictionary`` to ``path`` in this format."""
        from .errors import UsageError

        raise UsageError(f"dictionary format {self.name!r} is read-only")


# --------------------------------------------------------------------------------------------------
# Auto-interpretation


class _OptionedPlugin(Plugin):
    """Shared construction of samplers, non-activating sources and neighbour finders: ``cls(options)``
    with ``options`` an instance of ``cls.Options`` or a mapping validated into one."""

    def __init__(self, options: Options | Mapping[str, Any] | None = None):
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
    def sample(self, candidates: Any, n: int, generator: torch.Generator) -> torch.Tensor:
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
    def non_activating(self, latent: int, n: int, context: Any) -> list[Any]:
        """At most ``n`` :class:`saelab.examples.Window` s where ``latent`` does not fire, none of them
        in ``context.exclude``."""


class NeighbourFinder(_OptionedPlugin, ABC):
    """Finds latents related to a latent (co-occurrence, decoder or encoder similarity...).

    ``context`` is a :class:`saelab.examples.NeighbourContext` (the latent cache and the dictionary).
    """

    @abstractmethod
    def neighbours(self, latents: Sequence[int], k: int, context: Any) -> dict[int, list[tuple[int, float]]]:
        """For each latent, its ``k`` nearest other latents with their similarity, most similar first."""


class Provider(Plugin, ABC):
    """An LLM backend (local transformers, OpenAI-compatible servers, litellm...).

    Implementations normally subclass :class:`saelab.llm.LLMProvider`, which adds the response cache,
    the concurrency limit, retries and usage accounting around one ``_complete`` attempt.
    """

    @abstractmethod
    async def generate(self, messages: list[dict[str, str]], **params: Any) -> Any:
        """One chat completion for ``messages``: a :class:`saelab.llm.Completion` (text, logprobs, tokens,
        cost, cached...), or :class:`saelab.llm.ProviderError` after retries. ``params`` override the
        provider's options per call (``temperature``, ``max_tokens``, ``logprobs``, ``top_logprobs``...)."""


class _PromptedPlugin(Plugin):
    """Shared construction of explainers and scorers: typed options plus resolved prompts."""

    prompt_prefix: ClassVar[str] = ""
    """Dotted prefix of this class's prompts in ``prompts.yaml`` (e.g. ``"scorers.detection"``)."""
    prompt_placeholders: ClassVar[Mapping[str, Placeholders]] = {}
    """Template name under ``prompt_prefix`` -> :class:`saelab.prompts.Placeholders` it takes; checked when
    the plugin is built (a template missing a required placeholder or holding an unknown one is a UsageError)."""

    def __init__(self, options: Options | Mapping[str, Any] | None = None, prompts: Mapping[str, Any] | None = None):
        if not isinstance(options, Options):
            options = self.Options.parse(dict(options or {}), where=f"{self.name} options")
        self.options = options
        if prompts is None:
            from .prompts import load_prompts

            prompts = load_prompts()
        self.prompts = prompts
        """Resolved prompts (:class:`saelab.prompts.Prompts`)."""
        if self.prompt_placeholders:
            from .prompts import check_templates

            check_templates(prompts, self.prompt_prefix, self.prompt_placeholders)

    def prompt_version(self) -> str:
        """Hash of the prompts this instance uses (stored with every result)."""
        from .prompts import prompt_version

        prefix = self.prompt_prefix.rstrip(".") + "."
        return prompt_version({k: v for k, v in self.prompts.items() if k.startswith(prefix)})

    def identity(self) -> dict[str, Any]:
        """What determines this instance's results besides its inputs: name, options, prompt version
        (part of every explanation and score fingerprint)."""
        return {"name": self.name, "options": self.options.model_dump(mode="json"),
                "prompt_version": self.prompt_version()}


class Explainer(_PromptedPlugin, ABC):
    """Turns a latent's examples into a natural-language explanation using a provider.

    Constructed as ``cls(options, prompts)`` (both optional: defaults and the shipped prompts).
    """

    def messages(self, record: Any) -> list[list[dict[str, str]]]:
        """The chat prompts :meth:`explain` would send for ``record`` (for dry runs and token estimates)."""
        return []

    @abstractmethod
    async def explain(self, record: Any, provider: Provider) -> Any:
        """The :class:`saelab.records.Explanation` of one :class:`saelab.records.LatentRecord`."""


class Scorer(_PromptedPlugin, ABC):
    """Measures how well an explanation predicts a latent's activations.

    Constructed as ``cls(options, prompts)`` (both optional: defaults and the shipped prompts).
    """

    requires_explanation: ClassVar[bool] = True
    """False for explanation-free scorers (intruder)."""
    uses_provider: ClassVar[bool] = True
    """False for scorers that run local models instead of the LLM provider (surprisal, embedding)."""

    def messages(self, record: Any, explanation: str) -> list[list[dict[str, str]]]:
        """The chat prompts :meth:`score` would send (for dry runs and token estimates)."""
        return []

    @abstractmethod
    async def score(self, record: Any, explanation: Any, provider: Provider | None) -> Any:
        """The :class:`saelab.records.ScoreResult` of one latent: per-example predictions and metrics.
        ``explanation`` is an :class:`saelab.records.Explanation` or its text (None for
        explanation-free scorers)."""
