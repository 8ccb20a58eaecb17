"""Two language models as one activation source: labelled sites for a paired cache (model diffing).

A paired site is ``<hookpoint>@<label>`` (``layers.6@A``: ``layers.6`` of the first model, ``layers.6@B``:
of the second); labels are ``[A-Za-z0-9_-]+``, :data:`LABELS` by default. :class:`PairedSource` composes
single activation sources under their labels; the engine builds one when a command gets a second model
(``saelab cache MODEL --model_b MODEL_B``), so that :func:`saelab.activation_cache.build_activation_cache`
caches both models' activations over one tokenisation, with both models' identities in the fingerprint.

Both models must tokenise the data identically: :meth:`PairedSource.check_tokenizers` compares the token
ids of the first :data:`TOKENIZER_CHECK_WINDOWS` dataset windows (each tokenizer under its own BOS/EOS
scheme, :mod:`saelab.data`) and says where they first differ.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal

import torch

from .data import WindowSpec, iter_windows
from .errors import UsageError
from .interfaces import ActivationSource, Dataset, SparseDictionary
from .options import Options

LABELS = ("A", "B")
"""Labels of the first and second model of a pair."""
TOKENIZER_CHECK_WINDOWS = 16
"""Dataset windows (of the cache's ``ctx_len``) whose token ids both tokenizers must produce identically."""
LABEL_RE = re.compile(r"[A-Za-z0-9_-]+")
"""What a model label may hold."""


def label_site(hookpoint: str, label: str) -> str:
    """The paired site name ``<hookpoint>@<label>``."""
    if not LABEL_RE.fullmatch(label):
        raise UsageError(f"bad model label {label!r}; accepted: letters, digits, '_' and '-' (e.g. A, B)")
    return f"{hookpoint}@{label}"


def paired_sites(hookpoints: Sequence[str], labels: Sequence[str] = LABELS) -> list[str]:
    """Every hookpoint in every model, model by model: ``[h@A for h in hookpoints] + [h@B ...]``."""
    return [label_site(hp, label) for label in labels for hp in hookpoints]


def split_site(name: str) -> tuple[str, str | None]:
    """``(hookpoint, label)`` of a paired site name; ``(name, None)`` for a plain hookpoint."""
    if "@" not in name:
        return name, None
    hookpoint, label = name.rsplit("@", 1)
    if not hookpoint or not LABEL_RE.fullmatch(label):
        raise UsageError(f"bad paired site {name!r}; accepted: HOOKPOINT@LABEL, e.g. layers.6@A or layers.6@B")
    return hookpoint, label


def pair_for_dictionaries(source: ActivationSource, dictionaries: Iterable[SparseDictionary],
                          load: Callable[[str], ActivationSource]) -> ActivationSource:
    """``source`` as model A, paired with the model B that dictionaries trained on two models' sites record
    (``extra_config["models"]``: ``metadata.models`` of their ``cfg.json``), loaded with ``load``; ``source``
    itself when none does. Dictionaries recording different B models are a one-line error."""
    wanted = set()
    for dictionary in dictionaries:
        models = dictionary.extra_config.get("models")
        if isinstance(models, Mapping) and models.get(LABELS[1]):
            wanted.add(str(models[LABELS[1]]))
    if not wanted:
        return source
    if len(wanted) > 1:
        raise UsageError(f"the dictionaries were trained against different second models ({', '.join(sorted(wanted))}); "
                         f"give them one at a time")
    return PairedSource({LABELS[0]: source, LABELS[1]: load(wanted.pop())})


class PairedModelOptions(Options):
    """The options that give a command a second model (``saelab cache``, ``saelab train``)."""

    model_b: str | None = None
    """Second LM (same forms as MODEL, loaded with MODEL's options): read both models' activations, sites
    labelled HOOKPOINT@A (MODEL) and HOOKPOINT@B (model B); their tokenizers must agree."""
    paired_pass: Literal["one", "two"] = "one"
    """With --model_b: one pass runs both models per batch; two runs MODEL over the data, then model B over the
    stored token shards (one model loaded at a time; same cache)."""


class PairedSource(ActivationSource):
    """Several language models under labels (``{"A": source_a, "B": source_b}``) as one activation source
    whose hookpoints are the labelled sites ``<hookpoint>@<label>``.

    Not a registered plugin: the engine composes it. Tokens are the first model's (its :attr:`tokenizer`,
    checked against the others by :meth:`check_tokenizers`); :meth:`identity` holds every model's identity
    under its label. :meth:`activations` runs each model it needs once on the same ids. :meth:`release`
    drops one model (its identity, hookpoints and widths are kept), which is how a two-pass cache build
    holds one model at a time: sources load their weights on first use (the transformers sources do).
    """

    def __init__(self, sources: Mapping[str, ActivationSource]):
        if len(sources) < 2:
            raise UsageError(f"a paired source needs two or more models; got {len(sources)}")
        for label in sources:
            label_site("x", label)
        self._sources: dict[str, ActivationSource | None] = dict(sources)
        self.labels: tuple[str, ...] = tuple(sources)
        """Model labels, the first model's first."""
        self.model_ids: dict[str, str] = {label: src.model_id for label, src in sources.items()}
        """Each label's model id."""
        first = sources[self.labels[0]]
        self.tokenizer = first.tokenizer
        self.model_id = " + ".join(f"{mid}@{label}" for label, mid in self.model_ids.items())
        self.device = None  # each model places its ids (moved to its own device in activations)
        self.excluded_positions = tuple(sorted(set().union(*(s.excluded_positions for s in sources.values()))))
        self._identities: dict[str, dict[str, object]] = {}
        self._hookpoints: dict[str, list[str]] = {}
        self._dims: dict[str, int] = {}

    # ---- the models

    def source(self, label: str) -> ActivationSource:
        """The model labelled ``label`` (a one-line error for an unknown or released one)."""
        if label not in self._sources:
            raise UsageError(f"no model labelled {label!r}; labels: {self._describe()}")
        src = self._sources[label]
        if src is None:
            raise UsageError(f"model {label} ({self.model_ids[label]}) was released; load it again to run it")
        return src

    def release(self, label: str) -> None:
        """Drop the model labelled ``label`` (its weights are freed once nothing else holds them); its
        identity, hookpoints and widths stay known."""
        src = self.source(label)
        self._identities[label] = src.identity()
        self._hookpoints[label] = src.hookpoints()
        for hp in self._hookpoints[label]:
            self._dims[label_site(hp, label)] = int(src.hookpoint_dim(hp))
        self._sources[label] = None
        del src
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _describe(self) -> str:
        return ", ".join(f"{label} ({mid})" for label, mid in self.model_ids.items())

    def _hookpoints_of(self, label: str) -> list[str]:
        return self._hookpoints[label] if self._sources.get(label) is None else self.source(label).hookpoints()

    # ---- ActivationSource

    def identity(self) -> dict[str, object]:
        """Every model's identity (id, weights hash or revision, dtype...) under its label."""
        return {label: (self._identities[label] if src is None else src.identity())
                for label, src in self._sources.items()}

    def hookpoints(self) -> list[str]:
        """Every labelled site: the first model's hookpoints, then the second's..."""
        return [hp for label in self.labels for hp in paired_sites(self._hookpoints_of(label), [label])]

    def check_hookpoints(self, hookpoints: Sequence[str]) -> list[str]:
        """Labelled sites whose model has the hookpoint, deduplicated; anything else is a one-line error
        naming the model label, the model and its valid hookpoints."""
        names = [hookpoints] if isinstance(hookpoints, str) else list(hookpoints)
        if not names:
            raise UsageError(f"no sites given for the paired models {self._describe()}; e.g. layers.6@A, layers.6@B")
        for name in names:
            hp, label = split_site(name)
            if label is None:
                raise UsageError(
                    f"site {name!r} names no model; paired sites are HOOKPOINT@LABEL, e.g. "
                    f"{', '.join(label_site(hp, lab) for lab in self.labels)} (models: {self._describe()})")
            if label not in self._sources:
                raise UsageError(f"site {name!r}: no model labelled {label!r}; labels: {self._describe()}")
            src = self._sources[label]
            if src is None:
                if hp not in self._hookpoints[label]:
                    raise UsageError(f"site {name!r}: model {label} ({self.model_ids[label]}) has no hookpoint "
                                     f"{hp!r}; its hookpoints: {', '.join(self._hookpoints[label])}")
                continue
            try:
                src.check_hookpoints([hp])
            except UsageError as exc:
                raise UsageError(f"site {name!r}: model {label} ({self.model_ids[label]}) has no hookpoint "
                                 f"{hp!r}: {str(exc).splitlines()[0]}") from None
        return list(dict.fromkeys(names))

    def hookpoint_dim(self, hookpoint: str) -> int:
        """Width of the labelled site ``hookpoint`` in its model."""
        self.check_hookpoints([hookpoint])
        if hookpoint in self._dims:
            return self._dims[hookpoint]
        hp, label = split_site(hookpoint)
        return int(self.source(str(label)).hookpoint_dim(hp))

    @property
    def n_layers(self) -> int:
        """Blocks of the first model (the one whose tokens and, by default, logits are used)."""
        return self.source(self.labels[0]).n_layers

    def activations(
        self, input_ids: torch.Tensor, hookpoints: Sequence[str], attention_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Activations ``[batch, seq, d]`` at labelled sites: each model needed runs once on the same ids,
        stopping after its last requested hookpoint."""
        names = self.check_hookpoints(hookpoints)
        by_label: dict[str, list[str]] = {}
        for name in names:
            hp, label = split_site(name)
            by_label.setdefault(str(label), []).append(hp)
        out: dict[str, torch.Tensor] = {}
        for label, hps in by_label.items():
            src = self.source(label)
            ids = input_ids if src.device is None else input_ids.to(src.device)
            mask = attention_mask if attention_mask is None or src.device is None else attention_mask.to(src.device)
            acts = src.activations(ids, hps, mask)
            out.update({label_site(hp, label): acts[hp] for hp in hps})
        return {name: out[name] for name in names}

    def logits_of(
        self,
        label: str,
        input_ids: torch.Tensor,
        replacements: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of the model labelled ``label``, with its (plain-named) hookpoints replaced."""
        src = self.source(label)
        ids = input_ids if src.device is None else input_ids.to(src.device)
        return src.logits(ids, replacements, attention_mask)

    def logits(
        self,
        input_ids: torch.Tensor,
        replacements: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of one model: the model whose labelled sites ``replacements`` replace (all of one model),
        or the first model without replacements. Replacing sites of two models is a one-line error (one
        forward pass gives one model's logits): use :meth:`logits_of` per model."""
        replacements = dict(replacements or {})
        labels = {str(split_site(name)[1]) for name in self.check_hookpoints(list(replacements))} if replacements \
            else {self.labels[0]}
        if len(labels) > 1:
            raise UsageError(f"replacements at sites of models {', '.join(sorted(labels))} in one forward pass; "
                             f"accepted: sites of one model (logits_of(label, ...) per model)")
        label = labels.pop()
        plain = {split_site(name)[0]: fn for name, fn in replacements.items()}
        return self.logits_of(label, input_ids, plain, attention_mask)

    def unembedding(self) -> torch.Tensor | None:
        """The first model's unembedding (``source(label).unembedding()`` for another model's)."""
        return self.source(self.labels[0]).unembedding()

    # ---- checks for a paired cache

    def check_tokenizers(self, dataset: Dataset, spec: WindowSpec) -> None:
        """One-line :class:`UsageError` unless every model tokenises the first :data:`TOKENIZER_CHECK_WINDOWS`
        windows of ``dataset`` (``spec``'s ``ctx_len``, each tokenizer with its own BOS/EOS) into the same
        ids as the first model; it names the window, the position and both tokens where they first differ."""
        first = self.labels[0]

        def windows(tokenizer: object, window_spec: WindowSpec) -> list[torch.Tensor]:
            return list(iter_windows(dataset.texts(), tokenizer, window_spec, max_windows=TOKENIZER_CHECK_WINDOWS))

        reference = windows(self.tokenizer, spec)
        for label in self.labels[1:]:
            if self._sources[label] is None:
                continue  # a released model was checked before it ran
            tokenizer = self.source(label).tokenizer
            other = windows(tokenizer, WindowSpec.for_tokenizer(tokenizer, spec.ctx_len))
            for index in range(max(len(reference), len(other))):
                if index >= len(reference) or index >= len(other):
                    short = first if index >= len(reference) else label
                    raise UsageError(
                        f"the tokenizers of model {first} ({self.model_ids[first]}) and model {label} "
                        f"({self.model_ids[label]}) disagree: model {short} cuts only {index} windows of "
                        f"{spec.ctx_len} tokens from the data, the other more; a paired cache needs identical "
                        f"token ids (checked on the first {TOKENIZER_CHECK_WINDOWS} windows)")
                a, b = reference[index], other[index]
                differs = (a != b).nonzero()
                if differs.numel():
                    pos = int(differs[0, 0])
                    ida, idb = int(a[pos]), int(b[pos])
                    raise UsageError(
                        f"the tokenizers of model {first} ({self.model_ids[first]}) and model {label} "
                        f"({self.model_ids[label]}) disagree at window {index}, position {pos}: {first} has "
                        f"token {ida} ({_token(self.tokenizer, ida)!r}), {label} has {idb} "
                        f"({_token(tokenizer, idb)!r}); a paired cache needs identical token ids (checked on "
                        f"the first {TOKENIZER_CHECK_WINDOWS} windows of {spec.ctx_len} tokens)")

    def check_widths(self, hookpoints: Sequence[str]) -> None:
        """One-line :class:`UsageError` when the models' widths at a hookpoint (plain, or the hookpoint of
        a labelled site) differ: a crosscoder over the models needs equal widths."""
        plain = list(dict.fromkeys(split_site(name)[0] for name in hookpoints))
        for hp in plain:
            sites = self.check_hookpoints(paired_sites([hp], self.labels))
            dims = {split_site(site)[1]: self.hookpoint_dim(site) for site in sites}
            if len(set(dims.values())) > 1:
                widths = ", ".join(f"{dims[label]} in model {label} ({self.model_ids[label]})" for label in self.labels)
                raise UsageError(f"hookpoint {hp!r} has different widths: {widths}; a crosscoder over two models "
                                 f"needs the same width at every crosscoded hookpoint")


def _token(tokenizer: object, token_id: int) -> str:
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    return str(convert(token_id)) if convert is not None else str(token_id)


__all__ = ["LABELS", "LABEL_RE", "TOKENIZER_CHECK_WINDOWS", "PairedSource", "label_site", "split_site"]
