"""The ``transformers`` provider (``--explainer_provider offline``): a local Hugging Face causal LM.

The default model is the embedded SmolLM2-135M-Instruct (loaded through ``saelab.models``, with its chat
template). Any local path or hub id works too. Concurrent ``generate`` calls are batched: requests that
arrive within ``batch_wait_ms`` of each other (up to ``max_concurrency``) are left-padded and run in ONE
``model.generate`` call (in a worker thread, so the event loop keeps serving), then split per request.
Log probabilities of generated tokens come from the raw output logits.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field
from saelab import hookimpl
from saelab.errors import UsageError
from saelab.llm import Completion, LLMProvider, ProviderError, ProviderOptions, TokenLogprob

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


@dataclass
class _Request:
    messages: list[dict[str, str]]
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
    extra_params: ClassVar[tuple[str, ...] | None] = ("stop", "seed")

    def __init__(self, options: ProviderOptions | dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(options, **kwargs)
        self.options: TransformersOptions
        self.generate_calls = 0
        """Number of ``model.generate`` calls made (each serves a whole batch)."""
        self.batch_sizes: list[int] = []
        """Size of each batch, in order."""
        self._hf_model: Any = None
        self._tokenizer: Any = None
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

    # -- batching

    async def _complete(self, messages: list[dict[str, str]], params: dict[str, Any]) -> Completion:
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
        while state.pending:
            await asyncio.sleep(self.options.batch_wait_ms / 1000.0)
            first = state.pending[0]
            key = sorted(first.params.items(), key=lambda kv: kv[0])
            batch = [r for r in state.pending if sorted(r.params.items(), key=lambda kv: kv[0]) == key]
            batch = batch[: self.max_concurrency]
            for request in batch:
                state.pending.remove(request)
            try:
                results = await asyncio.to_thread(self._generate_batch, [r.messages for r in batch], first.params)
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

    def _generate_batch(self, conversations: list[list[dict[str, str]]], params: dict[str, Any]) -> list[Completion]:
        import torch
        from transformers import GenerationConfig

        model, tokenizer = self.load()
        texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in conversations]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        max_new = int(params.get("max_tokens", self.options.max_tokens))
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        longest = enc["input_ids"].shape[1]
        if limit and longest + max_new > limit:
            raise ProviderError(f"prompt of {longest} tokens + max_tokens {max_new} exceeds the context of "
                                f"{limit} tokens of model {self.model!r}")
        temperature = float(params.get("temperature", 0.0))
        want_logprobs = bool(params.get("logprobs"))
        top_n = int(params.get("top_logprobs") or 0)
        eos = tokenizer.eos_token_id
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
            out = model.generate(**enc, generation_config=config)
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


@hookimpl
def register_providers(register: Any) -> None:
    """Register the ``transformers`` provider."""
    register(TransformersProvider)
