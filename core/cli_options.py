"""Click options shared by the commands (delphi / CLI.md names and defaults) and their models.

Commands stack the decorators they need::

    @cli.command()
    @model_argument()
    @hookpoints_option()
    @dataset_options()
    @cache_options()
    @name_option()
    def cache(**params): ...

and resolve the values with :func:`resolve_params`, which merges ``--config FILE`` (defaults <
file < explicit flags) and applies the defaults the plugins declare (:func:`apply_embedded_defaults`):
the activation source MODEL resolves to may bring CLI defaults (``ActivationSource.default_values``;
the embedded ``smollm2`` replaces the defaults that need a network or a GPU: ``--dataset_repo``
becomes ``wikipedia-sample`` and ``--n_tokens`` 200000), and a dataset that says it is read whole
(``Dataset.reads_whole``: the embedded samples ``wikipedia-sample`` and ``news-sample``, local files and
directories) gets the split ``train`` unless ``--dataset_split`` is given (the hub default
``train[:1%]`` would keep one article, or 3 rows of a 300-row file). Whatever is given explicitly
still wins; keys set by a ``--config`` file count as given.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import click
from pydantic import SecretStr

from .cli import MultiValueOption
from .errors import UsageError
from .options import Options

F = Callable[..., Any]

DEFAULT_MODEL = "meta-llama/Meta-Llama-3-8B"
"""CLI.md default for ``--model``."""
DEFAULT_DATASET = "EleutherAI/SmolLM2-135M-10B"
"""CLI.md default for ``--dataset_repo``."""
DEFAULT_SPLIT = "train[:1%]"
"""CLI.md default for ``--dataset_split``."""
DEFAULT_N_TOKENS = 10_000_000
"""CLI.md default for ``--n_tokens``."""
OVERWRITE_CHOICES = ("cache", "neighbours", "scores")
"""What ``--overwrite`` may recompute."""

EMBEDDED_NOTE = (
    "With an embedded MODEL (smollm2) the defaults become --dataset_repo wikipedia-sample and "
    "--n_tokens 200000 (offline, CPU); embedded datasets and local files or directories are read whole (split "
    "'train') unless --dataset_split is given."
)
"""Sentence for ``--help`` epilogs (what the builtin ``smollm2`` and dataset plugins declare)."""


def _resolved(kind: str, value: str | None) -> type | None:
    """The plugin class ``value`` resolves to, or None (no value, or nothing registered takes it: the
    command's own loading then reports that with its one-line error)."""
    from .errors import SaelabError
    from .manager import resolve

    if not value or not str(value).strip():
        return None
    try:
        return resolve(kind, str(value).strip())
    except SaelabError:
        return None


def model_defaults(model: str | None) -> dict[str, str | int | float | bool]:
    """The CLI defaults the activation source of ``model`` declares (``ActivationSource.default_values``;
    ``{}`` when it declares none or nothing registered loads ``model``)."""
    cls = _resolved("activation_source", model)
    return dict(getattr(cls, "default_values", None) or {})


def is_embedded_model(model: str | None) -> bool:
    """Whether ``model``'s activation source brings its own CLI defaults (the embedded ``smollm2``)."""
    return bool(model_defaults(model))


def dataset_reads_whole(repo: str | None) -> bool:
    """Whether the dataset ``repo`` resolves to is read whole by default (``Dataset.reads_whole``)."""
    cls = _resolved("dataset", repo)
    return cls is not None and bool(cls.reads_whole(str(repo).strip()))


# --------------------------------------------------------------------------------------------------
# Option models


class DataOptions(Options):
    """Dataset and tokenisation options (``--dataset_*``, ``--n_tokens``, ``--cache_ctx_len``...)."""

    dataset_repo: str = DEFAULT_DATASET
    """Dataset: an embedded name (wikipedia-sample, news-sample), a hub id, a dataset directory or a data file."""
    dataset_split: str = DEFAULT_SPLIT
    """Split expression (``train``, ``train[:1%]``, ``train[100:200]``)."""
    dataset_name: str = ""
    """Dataset configuration name (empty: none)."""
    dataset_column: str = "text"
    """Column holding the text."""
    n_tokens: int = DEFAULT_N_TOKENS
    """Tokens to cache (rounded up to whole ``cache_ctx_len`` sequences)."""
    batch_size: int = 32
    """Sequences per forward pass (does not change the cached values beyond float rounding)."""
    cache_ctx_len: int = 256
    """Tokens per cached sequence (position 0 is BOS when the tokenizer has one)."""
    filter_bos: bool = False
    """Drop BOS tokens from training rows, examples and statistics (the cache still holds them)."""


class CacheCommandOptions(DataOptions):
    """Every resolved option of ``saelab cache``."""

    model: str = DEFAULT_MODEL
    """Base LM: embedded name, hub id or local directory."""
    hookpoints: list[str] = []
    """Hookpoints to cache."""
    name: str
    """Run name: ``results/<name>/``."""
    store: Path | None = None
    """Activation cache store (default ``results/.activations``)."""
    dtype: Literal["float32", "float16"] = "float32"
    """Storage dtype of the cached activations."""
    shard_size_tokens: int | None = None
    """Tokens per shard (default: about 128 MiB per hookpoint file)."""
    overwrite: list[str] = []
    """Stages to recompute (``cache`` rebuilds the activation cache)."""
    verify: bool = False
    """Check the sha256 of every shard when reusing a cache."""
    device: str = "auto"
    """Device of the LM (auto, cpu, cuda, cuda:N, mps)."""
    model_dtype: str = "float32"
    """Weights and compute dtype of the LM."""
    revision: str | None = None
    """Hub revision of a hub model."""
    load_in_8bit: bool = False
    """Load the LM in 8 bits (CUDA GPU only)."""
    hf_token: SecretStr | None = None
    """Hugging Face token (never written to disk or logs)."""
    seed: int = 22
    """Random seed."""
    verbose: bool = True
    """Progress bar and summary table."""


# --------------------------------------------------------------------------------------------------
# Decorators


def bool_option(*decls: str, default: bool, help: str) -> F:
    """A boolean option typed like delphi's: ``--flag``, ``--flag True`` or ``--flag false``."""
    return click.option(*decls, type=click.BOOL, is_flag=False, flag_value=True, default=default,
                        show_default=True, metavar="[BOOL]", help=help)


def stack_options(*decorators: F) -> F:
    """One decorator applying ``decorators`` in the order written (the first is the outermost)."""

    def apply(f: F) -> F:
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return apply


def model_argument(required: bool = False) -> F:
    """``MODEL`` positional argument plus ``--model`` (the same value, delphi style)."""
    return stack_options(
        click.argument("model", required=required, default=None, metavar="MODEL" if required else "[MODEL]"),
        click.option("--model", "model_flag", default=None, metavar="MODEL",
                     help=f"Base LM (same as the MODEL argument): embedded name (smollm2), hub id or local "
                          f"directory. Default: {DEFAULT_MODEL}."),
    )


def model_options() -> F:
    """How the LM is loaded: ``--device``, ``--model_dtype``, ``--revision``, ``--load_in_8bit``."""
    return stack_options(
        click.option("--device", default="auto", show_default=True,
                     help="Device of the LM: auto (cuda if available), cpu, cuda, cuda:N, mps."),
        click.option("--model_dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
                     show_default=True, help="Weights/compute dtype of the LM (float32 is fastest on CPU)."),
        click.option("--revision", default=None, help="Hub revision (branch, tag or commit) of a hub model."),
        bool_option("--load_in_8bit", default=False, help="8-bit model loading (CUDA GPU only)."),
    )


def hookpoints_option(required: bool = False) -> F:
    """``--hookpoints a b c`` (delphi style; also repeatable or comma-separated)."""
    return click.option("--hookpoints", cls=MultiValueOption, required=required, metavar="HOOKPOINT ...",
                        help="Sites, e.g. layers.15 or layers.3.mlp (see `saelab hookpoints MODEL`).")


def dataset_options() -> F:
    """``--dataset_repo``, ``--dataset_split``, ``--dataset_name``, ``--dataset_column``."""
    return stack_options(
        click.option("--dataset_repo", default=DEFAULT_DATASET, show_default=True,
                     help="Embedded name (wikipedia-sample, news-sample), hub id, dataset directory or "
                          ".txt/.jsonl/.json/.parquet/.csv file. Default with smollm2: wikipedia-sample."),
        click.option("--dataset_split", default=DEFAULT_SPLIT, show_default=True,
                     help="Split expression (train, train[:1%], train[100:200]); embedded datasets and local "
                          "files/directories: train (all of it)."),
        click.option("--dataset_name", default="", show_default=True, help="Dataset configuration name."),
        click.option("--dataset_column", default="text", show_default=True, help="Column holding the text."),
    )


def cache_options() -> F:
    """``--n_tokens``, ``--batch_size``, ``--cache_ctx_len``, ``--filter_bos``."""
    return stack_options(
        click.option("--n_tokens", type=click.IntRange(min=1), default=DEFAULT_N_TOKENS, show_default=True,
                     help="Tokens to cache (whole sequences). Default with smollm2: 200000."),
        click.option("--batch_size", type=click.IntRange(min=1), default=32, show_default=True,
                     help="Sequences per forward pass."),
        click.option("--cache_ctx_len", type=click.IntRange(min=2), default=256, show_default=True,
                     help="Tokens per cached sequence (BOS first when the tokenizer has one)."),
        bool_option("--filter_bos", default=False,
                     help="Drop BOS tokens from training rows, examples and statistics (cached values unchanged)."),
    )


def store_options() -> F:
    """``--store``, ``--dtype``, ``--shard_size_tokens``, ``--verify`` (where and how caches are written)."""
    return stack_options(
        click.option("--store", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Activation cache store shared by runs [default: results/.activations]."),
        click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
                     help="Storage dtype of cached activations (float16 clamps values beyond +-65504, with a warning)."),
        click.option("--shard_size_tokens", type=click.IntRange(min=1), default=None,
                     help="Tokens per shard [default: about 128 MiB per hookpoint file]."),
        bool_option("--verify", default=False, help="Check every shard's sha256 when reusing a cache."),
    )


def example_options() -> F:
    """delphi's latent-cache and example options: ``--n_splits``, ``--min_examples``, ``--n_examples_*``,
    ``--n_non_activating``, ``--example_ctx_len``, ``--center_examples``, ``--non_activating_source``,
    ``--neighbours_type``, ``--n_quantiles``, ``--train_type``, ``--test_type``, ``--ratio_top`` and the
    ``--sampler_option`` / ``--non_activating_option`` / ``--neighbour_option`` pairs."""
    return stack_options(
        click.option("--n_splits", type=click.IntRange(min=1), default=5, show_default=True,
                     help="Shards of the latent cache (latent ranges; reading a latent loads one split)."),
        click.option("--min_examples", type=click.IntRange(min=1), default=200, show_default=True,
                     help="Minimum activating examples for a latent to qualify (fewer: skipped, counted)."),
        click.option("--n_examples_train", type=click.IntRange(min=0), default=40, show_default=True,
                     help="Examples shown to the explainer."),
        click.option("--n_examples_test", type=click.IntRange(min=0), default=50, show_default=True,
                     help="Activating examples for scoring (disjoint from the train examples)."),
        click.option("--n_non_activating", type=click.IntRange(min=0), default=50, show_default=True,
                     help="Non-activating examples for scoring."),
        click.option("--example_ctx_len", type=click.IntRange(min=1), default=32, show_default=True,
                     help="Tokens per example window."),
        bool_option("--center_examples", default=True, help="Centre windows on the max-activating token."),
        click.option("--non_activating_source", default="random", show_default=True,
                     help="random, neighbours, FAISS (any non-activating-source plugin)."),
        click.option("--neighbours_type", default="co-occurrence", show_default=True,
                     help="co-occurrence, decoder_similarity, encoder_similarity."),
        click.option("--n_quantiles", type=click.IntRange(min=1), default=10, show_default=True,
                     help="Activation quantiles (statistics and quantile sampling)."),
        click.option("--train_type", default="quantiles", show_default=True, help="top, random, quantiles, mix."),
        click.option("--test_type", default="quantiles", show_default=True, help="Sampler of the test examples."),
        click.option("--ratio_top", type=click.FloatRange(0, 1), default=0.2, show_default=True,
                     help="Share of top examples in mix."),
        *(click.option(f"--{kind}_option", f"{kind}_option", type=(str, str), multiple=True,
                       metavar="PLUGIN.KEY VALUE",
                       help=f"An option of one {what} plugin, e.g. --{kind}_option {example} (repeatable; a key "
                            f"the plugin does not take is an error).")
          for kind, what, example in ADDRESSED_OPTION_FLAGS),
    )


ADDRESSED_OPTION_FLAGS = (("sampler", "sampler", "mix.ratio_top 0.3"),
                          ("non_activating", "non-activating source", "faiss.batch_size 64"),
                          ("neighbour", "neighbour finder", "co-occurrence.block_latents 512"))
"""``(flag stem, plugin kind, example)`` of the ``--<stem>_option PLUGIN.KEY VALUE`` flags."""


class _LateRequiredOption(click.Option):
    """An option required after ``--config`` is merged (so a config file may supply it)."""

    saelab_required = True


def name_option(required: bool = True) -> F:
    """``--name``: the run name (``results/<name>/``); required unless ``required=False`` (checked by
    :func:`resolve_params`, after a ``--config`` file had its chance to supply it)."""
    return click.option("--name", cls=_LateRequiredOption if required else click.Option, default=None,
                        help="Run name; results go to results/<name>/." + ("  [required]" if required else ""))


def overwrite_option(choices: Sequence[str] = OVERWRITE_CHOICES) -> F:
    """``--overwrite cache neighbours scores`` (delphi style, several values)."""
    return click.option("--overwrite", cls=MultiValueOption, type=click.Choice(list(choices)),
                        metavar=" ".join(choices), help="Recompute these stages instead of reusing them.")


def hf_token_option() -> F:
    """``--hf_token`` (also ``$HF_TOKEN``; never written to disk or logs)."""
    return click.option("--hf_token", default=None, envvar="HF_TOKEN", show_envvar=True,
                        help="Hub token for gated models/datasets (never written to disk or logs).")


def seed_option() -> F:
    """``--seed`` (default 22)."""
    return click.option("--seed", type=int, default=22, show_default=True, help="Random seed.")


def verbose_option() -> F:
    """``--verbose`` (default True): progress bars and summary tables."""
    return bool_option("--verbose", default=True, help="Progress bars and detailed output.")


# --------------------------------------------------------------------------------------------------
# Resolution


def apply_embedded_defaults(values: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    """Apply the defaults the plugins declare (see the module docstring) to ``values`` in place: those of
    MODEL's activation source, then the whole split ``train`` for a dataset read whole; returns it."""
    if "model" in values:
        for key, value in model_defaults(values.get("model")).items():
            if key in values and key not in explicit:
                values[key] = value
    if "dataset_split" in values and "dataset_split" not in explicit and dataset_reads_whole(values.get("dataset_repo")):
        values["dataset_split"] = "train"
    return values


def argument_or_flag(positional: Any, flag: Any, *, what: str, argument: str, option: str) -> Any:
    """The value given as the positional ``argument`` or as ``option`` (None when neither); both with
    different values is a one-line error (``two models given: MODEL 'a' and --model 'b'; give one``)."""
    if positional and flag and positional != flag:
        raise UsageError(f"two {what} given: {argument} {positional!r} and {option} {flag!r}; give one")
    return positional or flag


def resolve_params(ctx: click.Context, params: Mapping[str, Any] | None = None,
                   model: type[Options] | None = None) -> Any:
    """Merge ``--config`` (when the command has it) with the flags, pick MODEL from the argument or
    ``--model``, apply the embedded-model rule; returns a dict, or ``model.parse(values)``."""
    from .config import explicit_params, file_values, merge_config

    values = dict(ctx.params if params is None else params)
    explicit = explicit_params(ctx)
    if "config" in values:
        if values["config"]:
            explicit |= set(file_values(values["config"], command=ctx.command.name))
        values = dict(merge_config(ctx, values))
    if "model_flag" in values:
        flag, positional = values.pop("model_flag", None), values.get("model")
        given = argument_or_flag(positional, flag, what="models", argument="MODEL", option="--model")
        values["model"] = given or DEFAULT_MODEL
        if positional or flag:
            explicit.add("model")
        explicit.discard("model_flag")
    for key in ("hookpoints", "overwrite"):
        if key in values and values[key] is not None:
            values[key] = list(values[key])
    apply_embedded_defaults(values, explicit)
    for param in ctx.command.params:
        if getattr(param, "saelab_required", False) and values.get(param.name) in (None, ""):
            raise UsageError(f"missing option --{param.name}; it is required (e.g. --{param.name} demo)")
    if model is not None:
        return model.parse(values, where=ctx.command.name or "")
    return values


def source_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword options for :func:`saelab.models.load_activation_source` from resolved values."""
    token = values.get("hf_token")
    if isinstance(token, SecretStr):
        token = token.get_secret_value()
    opts = {"device": values.get("device"), "dtype": values.get("model_dtype"), "revision": values.get("revision"),
            "hf_token": token}
    if values.get("load_in_8bit"):
        opts["load_in_8bit"] = True
    if values.get("device") == "auto":
        opts.pop("device")
    if values.get("model_dtype") == "float32":
        opts.pop("dtype")
    return opts


def open_or_build_cache(values: Mapping[str, Any] | Options, *, source: Any = None,
                        results_root: str | Path | None = None) -> Any:
    """The activation cache for resolved command values: reused by fingerprint, resumed, or built.

    ``values`` holds the :class:`CacheCommandOptions` fields (the train and run commands pass
    theirs); ``source`` reuses an already loaded LM. Returns an :class:`~saelab.activation_cache.ActivationCache`
    whose ``build_info`` says whether it was ``reused``, ``resumed`` or ``built``.
    """
    from .activation_cache import build_activation_cache, check_request_not_being_built
    from .data import load_dataset_source
    from .models import load_activation_source
    from .paths import activation_store

    if isinstance(values, Options):
        values = values.model_dump()
    if not values.get("hookpoints"):
        raise UsageError("no --hookpoints given; e.g. --hookpoints layers.15 (list them: saelab hookpoints MODEL)")
    token = values.get("hf_token")
    if isinstance(token, SecretStr):
        token = token.get_secret_value()
    store = Path(values.get("store") or activation_store(results_root))
    request_key = cache_request_key(values)
    check_request_not_being_built(store, request_key)  # before the model loads: fail in seconds, not minutes
    if source is None:
        source = load_activation_source(values["model"], **source_options(values))
    dataset = load_dataset_source(
        values["dataset_repo"], split=values["dataset_split"], name=values.get("dataset_name") or None,
        column=values["dataset_column"], hf_token=token,
    )
    return build_activation_cache(
        source, dataset, values["hookpoints"], n_tokens=values["n_tokens"], ctx_len=values["cache_ctx_len"],
        batch_size=values["batch_size"], store=store, dtype=values.get("dtype", "float32"),
        overwrite="cache" in (values.get("overwrite") or ()), shard_size_tokens=values.get("shard_size_tokens"),
        progress=bool(values.get("verbose", True)), verify_checksums=bool(values.get("verify", False)),
        request_key=request_key,
    )


def cache_request_key(values: Mapping[str, Any]) -> str:
    """A short hash of the cache flags as given (model, revision, model dtype, hookpoints, dataset, split,
    name, column, n_tokens, ctx_len, cache dtype; local paths made absolute). Unlike the fingerprint it
    needs no model, so a second run of the same request can find the cache lock before loading one."""
    from .fileio import json_sha256

    def where(value: Any) -> Any:
        path = Path(str(value)).expanduser()
        return str(path.resolve()) if value and path.exists() else value

    return json_sha256({
        "model": where(values.get("model")), "revision": values.get("revision"),
        "model_dtype": values.get("model_dtype"), "load_in_8bit": bool(values.get("load_in_8bit")),
        "hookpoints": list(dict.fromkeys(values.get("hookpoints") or ())),
        "dataset": where(values.get("dataset_repo")), "split": values.get("dataset_split"),
        "name": values.get("dataset_name") or None, "column": values.get("dataset_column"),
        "n_tokens": values.get("n_tokens"), "ctx_len": values.get("cache_ctx_len"),
        "dtype": values.get("dtype", "float32"),
    }, 24)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Show warnings raised inside as one ``Warning: ...`` line each on stderr."""

    def show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: Any = None) -> None:
        from .cli import one_line

        click.echo(f"Warning: {one_line(str(message))}", err=True)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield
