"""The ``transformers`` provider and its preset ``offline`` (delphi's name): a local Hugging Face causal LM.

The default model is the embedded SmolLM2-135M-Instruct (loaded through ``saelab.models``, with its chat
template). Any local path or hub id works too. Concurrent ``generate`` calls are batched: requests that
arrive within ``batch_wait_ms`` of each other (up to ``max_concurrency``) are left-padded and run in ONE
``model.generate`` call (in a worker thread, so the event loop keeps serving), then split per request.
Log probabilities of generated tokens come from the raw output logits.

Constrained decoding: ``generate(..., answer_format=...)`` (see :func:`saelab.llm.check_answer_format`)
makes the answer take the given shape. A logits processor, per row of the batch, allows only the tokens
that keep the generated text a valid prefix of the format (``regex`` partial matching), then only EOS
once the answer is complete. Candidate tokens are precomputed once per format: the tokens whose decoded
string (byte-level ``Ġ``/SentencePiece ``▁`` spaces resolved by decoding after an anchor token) uses only
the format's characters, and for ``binary_list`` holds at most one digit, so each 0/1 sits in its own
token. Logprobs stay those of the unconstrained distribution; at a constrained step ``top_logprobs``
also lists every token the format allowed, so P(1) / (P(0) + P(1)) is defined at each list position.
``prefixed_line`` forces the prefix, then leaves the text free except that a newline ends the answer
(the newline tokens' probability goes to EOS).

Free text (rows without a format, and the free part of ``prefixed_line``) gets ``repetition_penalty``
and ``no_repeat_ngram_size`` applied to the GENERATED tokens only (Hugging Face's own processors also
count the prompt, which would forbid repeating the few-shot answer's ``[EXPLANATION]:``); they stop the
degenerate loops a small greedy model falls into. Constrained lists get neither (they would bias 0/1).
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field
from saelab import hookimpl
from saelab.errors import UsageError
from saelab.llm import (
    ChatMessage,
    Completion,
    LLMProvider,
    ProviderError,
    ProviderOptions,
    TokenLogprob,
    answer_format_bound,
)

FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}System: {{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n\n"
    "{% else %}Assistant: {{ message['content'] }}\n\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
"""Plain ``System:/User:/Assistant:`` template for tokenizers without a chat template."""


class TransformersOptions(ProviderOptions):
    """Options of the local ``transformers`` provider."""

    model: str | None = "smollm2"
    """Embedded model name, local path or hub id of a causal LM (default: the embedded SmolLM2)."""
    device: str = "auto"
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when available)."""
    dtype: str = Field(default="float32", pattern="^(float32|float16|bfloat16)$")
    """Weights dtype (float32 on CPU: bf16 matmuls are slow there)."""
    batch_wait_ms: float = Field(default=5.0, ge=0)
    """How long the first request of a batch waits for others before ``generate`` runs."""
    chat_template: str | None = None
    """Jinja chat template used when the tokenizer has none (default: a plain System/User/Assistant one)."""
    seed: int = 0
    """Seed of sampling when ``temperature`` > 0."""
    max_tokens: int = Field(default=256, ge=1)
    """Largest number of generated tokens."""
    repetition_penalty: float = Field(default=1.1, ge=1.0)
    """Divides the logits of tokens already generated in this answer (1 = off; the prompt is not counted)."""
    no_repeat_ngram_size: int = Field(default=4, ge=0)
    """Forbid repeating any n-gram of this many generated tokens within an answer (0 = off; the prompt is
    not counted)."""


# --------------------------------------------------------------------------------------------------
# Constrained decoding


def token_strings(tokenizer: Any) -> list[str]:
    """The text each token id adds when decoded after other text: decoded after an anchor token and with
    the anchor's text removed, so byte-level (``Ġ1`` -> `` 1``) and SentencePiece (``▁1`` -> `` 1``)
    leading spaces come out right. Incomplete UTF-8 pieces decode to U+FFFD."""
    anchor = tokenizer.encode("a", add_special_tokens=False)
    base = tokenizer.decode(anchor, clean_up_tokenization_spaces=False)
    texts = tokenizer.batch_decode([[*anchor, i] for i in range(len(tokenizer))], clean_up_tokenization_spaces=False)
    return [t[len(base):] if t.startswith(base) else tokenizer.decode([i]) for i, t in enumerate(texts)]


class AnswerConstraint:
    """One answer format compiled for one tokenizer's vocabulary (see the module docstring)."""

    def __init__(self, answer_format: dict[str, Any], vocab: Sequence[str], special: set[int]):
        import regex

        self.format = answer_format
        self.vocab = vocab
        kind = answer_format["type"]
        self.free_after: int | None = None
        if kind == "binary_list":
            n = int(answer_format["length"])
            self.pattern = regex.compile(r" ?\[[01](?:, ?[01]){" + str(n - 1) + r"}\]")
            chars = set("[]01, ")

            def usable(s: str) -> bool:
                return set(s) <= chars and sum(c in "01" for c in s) <= 1
        elif kind == "choice":
            self.pattern = regex.compile(" ?(?:" + "|".join(regex.escape(o) for o in answer_format["options"]) + ")")
            chars = set("".join(answer_format["options"])) | {" "}

            def usable(s: str) -> bool:
                return set(s) <= chars
        else:
            prefix = answer_format["prefix"]
            self.pattern = regex.compile(" ?" + regex.escape(prefix))
            self.prefix = prefix

            def usable(s: str) -> bool:
                return s in " " + prefix
        self.candidates = [i for i, s in enumerate(vocab) if s and i not in special and usable(s)]
        self.newlines = ([i for i, s in enumerate(vocab) if "\n" in s and i not in special]
                         if kind == "prefixed_line" else [])

    def free(self, text: str) -> bool:
        """True when ``text`` has passed the forced part (``prefixed_line`` after its prefix)."""
        return self.format["type"] == "prefixed_line" and text.lstrip(" ").startswith(self.prefix)

    def allowed(self, text: str) -> list[int]:
        """Candidate tokens that keep ``text`` a valid prefix of the format."""
        return [i for i in self.candidates if self.pattern.fullmatch(text + self.vocab[i], partial=True)]

    def complete(self, text: str) -> bool:
        """True when ``text`` is a whole answer (EOS allowed)."""
        return self.pattern.fullmatch(text) is not None


class AnswerFormatProcessor:
    """Logits processor: per batch row, the allowed tokens of its :class:`AnswerConstraint` (None: free).
    Records, per row and step, the tokens it allowed (None where free) for the logprob alternatives."""

    def __init__(self, start: int, constraints: Sequence[AnswerConstraint | None], eos: int):
        self.start = start
        self.constraints = list(constraints)
        self.eos = eos
        self.allowed_log: list[list[list[int] | None]] = [[] for _ in constraints]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        scores = scores.clone()  # generate keeps the tensor it passes as the raw logits (for logprobs)
        for row, constraint in enumerate(self.constraints):
            if constraint is None:
                self.allowed_log[row].append(None)
                continue
            ids = input_ids[row, self.start:].tolist()
            if self.eos in ids:  # finished row: its tokens are padding from now on
                keep: list[int] | None = [self.eos]
            else:
                text = "".join(constraint.vocab[i] for i in ids)
                if constraint.free(text):
                    keep = None
                    if constraint.newlines:  # a newline ends the line: its probability goes to EOS
                        lines = scores[row, constraint.newlines]
                        scores[row, self.eos] = torch.logaddexp(scores[row, self.eos], lines.logsumexp(0))
                        scores[row, constraint.newlines] = -float("inf")
                else:
                    keep = constraint.allowed(text)
                    if constraint.complete(text) or not keep:
                        keep.append(self.eos)
            self.allowed_log[row].append(keep)
            if keep is not None:
                kept = scores[row, keep].clone()
                scores[row] = -float("inf")
                scores[row, keep] = kept
        return scores


class GeneratedRepetitionGuard:
    """Logits processor: repetition penalty and no-repeat n-grams over the generated tokens of the given
    rows only (the prompt is not counted)."""

    def __init__(self, start: int, rows: Sequence[int], penalty: float, ngram: int):
        self.start, self.rows, self.penalty, self.ngram = start, list(rows), penalty, ngram

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        scores = scores.clone()  # generate keeps the tensor it passes as the raw logits (for logprobs)
        for row in self.rows:
            generated = input_ids[row, self.start:]
            if generated.numel() == 0:
                continue
            if self.penalty != 1.0:
                ids = generated.unique()
                values = scores[row, ids]
                scores[row, ids] = torch.where(values > 0, values / self.penalty, values * self.penalty)
            n = self.ngram
            if n and generated.numel() >= n:
                tokens = generated.tolist()
                context = tokens[len(tokens) - n + 1:] if n > 1 else []
                banned = {tokens[j + n - 1] for j in range(len(tokens) - n + 1) if tokens[j:j + n - 1] == context}
                scores[row, sorted(banned)] = -float("inf")
        return scores


@dataclass
class _Request:
    messages: list[ChatMessage]
    params: dict[str, Any]
    future: asyncio.Future[Completion]


class _LoopState:
    """Pending requests and the running batcher task of one event loop."""

    def __init__(self) -> None:
        self.pending: list[_Request] = []
        self.task: asyncio.Task[None] | None = None


class TransformersProvider(LLMProvider):
    """Local Hugging Face causal LM (default: embedded SmolLM2); batches concurrent prompts."""

    name: ClassVar[str] = "transformers"
    Options: ClassVar[type[ProviderOptions]] = TransformersOptions
    default_model: ClassVar[str | None] = "smollm2"
    default_concurrency: ClassVar[int] = 16
    """Prompts batched into one ``generate`` call; one ``generate`` runs at a time."""
    extra_params: ClassVar[tuple[str, ...] | None] = ("stop", "seed", "repetition_penalty", "no_repeat_ngram_size")
    answer_formats: ClassVar[frozenset[str]] = frozenset({"binary_list", "choice", "prefixed_line"})

    def __init__(self, options: ProviderOptions | dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(options, **kwargs)
        self.options: TransformersOptions
        self.generate_calls = 0
        """Number of ``model.generate`` calls made (each serves a whole batch)."""
        self.batch_sizes: list[int] = []
        """Size of each batch, in order."""
        self._hf_model: Any = None
        self._tokenizer: Any = None
        self._vocab: list[str] | None = None
        self._constraints: dict[str, AnswerConstraint] = {}
        self._load_lock = threading.Lock()
        self._generate_lock = threading.Lock()
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = (
            weakref.WeakKeyDictionary())

    def prices(self) -> tuple[float, float] | None:
        """Local inference costs nothing unless prices are given."""
        return super().prices() if self.options.input_price_per_1k is not None else (0.0, 0.0)

    # -- loading

    def load(self) -> tuple[Any, Any]:
        """Load (once) and return ``(model, tokenizer)``."""
        with self._load_lock:
            if self._hf_model is None:
                self._hf_model, self._tokenizer = self._load()
            return self._hf_model, self._tokenizer

    def _device(self) -> str:
        import torch

        if self.options.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.options.device

    def _load(self) -> tuple[Any, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        name = self.model
        dtype = getattr(torch, self.options.dtype)
        model = tokenizer = None
        if not Path(name).expanduser().exists():
            from saelab import registry

            if name in registry("activation_source"):  # an embedded model such as smollm2
                from saelab.models import load_activation_source

                source = load_activation_source(name)
                model = getattr(source, "model", None)
                tokenizer = source.tokenizer
                if model is None or not hasattr(model, "generate"):
                    raise UsageError(f"model {name!r} cannot generate text; give a causal LM path or hub id")
        if model is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(Path(name).expanduser()) if Path(name).expanduser()
                                                          .exists() else name)
                model = AutoModelForCausalLM.from_pretrained(
                    str(Path(name).expanduser()) if Path(name).expanduser().exists() else name, dtype=dtype)
            except OSError as exc:
                raise UsageError(f"cannot load model {name!r} for the transformers provider: "
                                 f"{str(exc).splitlines()[0]}; give an embedded name (smollm2), a local "
                                 f"path or a hub id in the local cache") from None
        model = model.to(device=self._device(), dtype=dtype).eval()
        tokenizer = copy.deepcopy(tokenizer)  # padding settings must not leak into a shared tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = self.options.chat_template or FALLBACK_CHAT_TEMPLATE
        return model, tokenizer

    def constraint(self, answer_format: dict[str, Any]) -> AnswerConstraint:
        """The compiled constraint of a (checked) answer format, cached per provider."""
        _, tokenizer = self.load()
        key = json.dumps(answer_format, sort_keys=True)
        with self._load_lock:
            if self._vocab is None:
                self._vocab = token_strings(tokenizer)
            if key not in self._constraints:
                self._constraints[key] = AnswerConstraint(answer_format, self._vocab, set(tokenizer.all_special_ids))
            return self._constraints[key]

    # -- batching

    async def _complete(self, messages: list[ChatMessage], params: dict[str, Any]) -> Completion:
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            state = self._states[loop] = _LoopState()
        future: asyncio.Future[Completion] = loop.create_future()
        state.pending.append(_Request(messages, params, future))
        if state.task is None or state.task.done():
            state.task = loop.create_task(self._batcher(state))
        return await future

    async def _batcher(self, state: _LoopState) -> None:
        def key(request: _Request) -> list[tuple[str, Any]]:  # rows of one batch may differ in answer_format
            return sorted((k, v) for k, v in request.params.items() if k != "answer_format")

        while state.pending:
            await asyncio.sleep(self.options.batch_wait_ms / 1000.0)
            first = state.pending[0]
            batch = [r for r in state.pending if key(r) == key(first)]
            batch = batch[: self.max_concurrency]
            for request in batch:
                state.pending.remove(request)
            try:
                results = await asyncio.to_thread(self._generate_batch, [r.messages for r in batch], first.params,
                                                  [r.params.get("answer_format") for r in batch])
            except Exception as exc:
                error = exc if isinstance(exc, (ProviderError, UsageError)) else ProviderError(
                    f"transformers generation with {self.model!r} failed: {type(exc).__name__}: {exc}")
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(error)
                continue
            for request, result in zip(batch, results, strict=True):
                if not request.future.done():
                    request.future.set_result(result)

    def _generate_batch(self, conversations: list[list[ChatMessage]], params: dict[str, Any],
                        formats: Sequence[dict[str, Any] | None] | None = None) -> list[Completion]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        model, tokenizer = self.load()
        formats = list(formats) if formats is not None else [params.get("answer_format")] * len(conversations)
        constraints = [None if f is None else self.constraint(f) for f in formats]
        texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in conversations]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        max_new = int(params.get("max_tokens", self.options.max_tokens))
        bounds = [None if f is None else answer_format_bound(f) for f in formats]
        if all(b is not None for b in bounds):  # every row's answer has a known longest length (+ EOS)
            max_new = min(max_new, max(b for b in bounds if b is not None) + 1)
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        longest = enc["input_ids"].shape[1]
        if limit and longest + max_new > limit:
            raise ProviderError(f"prompt of {longest} tokens + max_tokens {max_new} exceeds the context of "
                                f"{limit} tokens of model {self.model!r}")
        temperature = float(params.get("temperature", 0.0))
        want_logprobs = bool(params.get("logprobs"))
        top_n = int(params.get("top_logprobs") or 0)
        eos = tokenizer.eos_token_id
        if eos is None and any(c is not None for c in constraints):
            raise ProviderError(f"answer_format needs an EOS token; model {self.model!r}'s tokenizer has none")
        penalty = float(params.get("repetition_penalty", self.options.repetition_penalty))
        ngram = int(params.get("no_repeat_ngram_size", self.options.no_repeat_ngram_size))
        free_rows = [i for i, c in enumerate(constraints) if c is None or c.format["type"] == "prefixed_line"]
        processors: list[Any] = []
        if free_rows and (penalty != 1.0 or ngram):
            processors.append(GeneratedRepetitionGuard(longest, free_rows, penalty, ngram))
        shaper = None
        if any(c is not None for c in constraints):
            shaper = AnswerFormatProcessor(longest, constraints, eos)
            processors.append(shaper)  # last: it has the final word on which tokens are possible
        config = GenerationConfig(
            max_new_tokens=max_new,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos,
            bos_token_id=tokenizer.bos_token_id,
            return_dict_in_generate=True,
            output_logits=want_logprobs,
        )
        device = next(model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        with self._generate_lock, torch.no_grad():
            if temperature > 0:
                torch.manual_seed(int(params.get("seed", self.options.seed)))
            self.generate_calls += 1
            self.batch_sizes.append(len(texts))
            out = model.generate(**enc, generation_config=config, logits_processor=LogitsProcessorList(processors))
        new_tokens = out.sequences[:, longest:].cpu()
        logprobs = None
        if want_logprobs:
            logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1).cpu()  # [batch, steps, vocab]
        stops = params.get("stop") or []
        stops = [stops] if isinstance(stops, str) else list(stops)
        results = []
        for i in range(len(texts)):
            ids = new_tokens[i].tolist()
            eos_hit = eos is not None and eos in ids
            n = ids.index(eos) if eos_hit else len(ids)
            finish = "stop" if eos_hit else "length"
            text = tokenizer.decode(ids[:n], skip_special_tokens=True)
            for stop in stops:
                if stop and stop in text:
                    text = text[: text.index(stop)]
                    finish = "stop"
            token_logprobs = None
            if logprobs is not None:
                token_logprobs = []
                for step in range(n):
                    row = logprobs[i, step]
                    tops: dict[str, float] = {}
                    if top_n:
                        values, indices = row.topk(top_n)
                        for value, index in zip(values.tolist(), indices.tolist(), strict=True):
                            tops.setdefault(tokenizer.decode([index]), value)
                        allowed = shaper.allowed_log[i][step] if shaper is not None else None
                        for index in allowed or ():  # the format's alternatives, unconstrained logprobs
                            if index != eos:
                                tops.setdefault(tokenizer.decode([index]), float(row[index]))
                    token_logprobs.append(TokenLogprob(tokenizer.decode([ids[step]]), float(row[ids[step]]), tops))
            generated = n + 1 if eos_hit else n
            results.append(Completion(
                text=text,
                logprobs=token_logprobs,
                prompt_tokens=int(enc["attention_mask"][i].sum()),
                completion_tokens=generated,
                cost=None,
                raw={"prompt": texts[i], "generated_ids": ids[:generated], "finish_reason": finish},
                finish_reason=finish,
            ))
        return results


class OfflineProvider(TransformersProvider):
    """delphi's ``offline`` provider (``--explainer_provider offline``, the default): the ``transformers``
    provider with its defaults (the embedded SmolLM2)."""

    name: ClassVar[str] = "offline"
    preset_of: ClassVar[str | None] = "transformers"


@hookimpl
def register_providers(register: Callable[[type], type]) -> None:
    """Register the ``transformers`` provider and its ``offline`` preset."""
    register(TransformersProvider)
    register(OfflineProvider)
