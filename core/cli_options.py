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
    """Embedded name (wikipedia-sample, news-sample), hub id, dataset directory or .txt/.jsonl/.json/.parquet/.csv
    file. Default with smollm2: wikipedia-sample."""
    dataset_split: str = DEFAULT_SPLIT
    """Split expression (train, train[:1%], train[100:200]); embedded datasets and local files/directories:
    train (all of it)."""
    dataset_name: str = ""
    """Dataset configuration name (empty: none)."""
    dataset_column: str = "text"
    """Column holding the text."""
    n_tokens: int = DEFAULT_N_TOKENS
    """Tokens to cache (rounded up to whole --cache_ctx_len sequences). Default with smollm2: 200000."""
    batch_size: int = 32
    """Sequences per forward pass (changes the cached values by float rounding at most)."""
    cache_ctx_len: int = 256
    """Tokens per cached sequence (BOS first when the tokenizer has one)."""
    filter_bos: bool = False
    """Drop BOS tokens from training rows, examples and statistics (cached values unchanged)."""


class CacheCommandOptions(DataOptions):
    """Every resolved option of ``saelab cache``."""

    model: str = DEFAULT_MODEL
    """Base LM: embedded name, hub id or local directory."""
    hookpoints: list[str] = []
    """Sites, e.g. layers.15 or layers.3.mlp (see `saelab hookpoints MODEL`)."""
    name: str
    """Run name; results go to results/<name>/."""
    store: Path | None = None
    """Activation cache store shared by runs [default: results/.activations]."""
    dtype: Literal["float32", "float16"] = "float32"
    """Storage dtype of cached activations (float16 clamps values beyond +-65504, with a warning)."""
    shard_size_tokens: int | None = None
    """Tokens per shard [default: about 128 MiB per hookpoint file]."""
    overwrite: list[str] = []
    """Recompute these stages instead of reusing them."""
    verify: bool = False
    """Check every shard's sha256 when reusing a cache."""
    device: str = "auto"
    """Device of the LM: auto (cuda if available), cpu, cuda, cuda:N, mps."""
    model_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Weights/compute dtype of the LM (float32 is fastest on CPU)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of a hub model."""
    load_in_8bit: bool = False
    """8-bit model loading (CUDA GPU only)."""
    hf_token: SecretStr | None = None
    """Hub token for gated models/datasets (never written to disk or logs)."""
    seed: int = 22
    """Random seed."""
    verbose: bool = True
    """Progress bars and detailed output."""


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


def field_option(model: type[Options], field: str, *decls: str, switch: bool = False, **click_kwargs: Any) -> F:
    """A click option whose default and help text are ``model``'s field ``field`` (its default and docstring),
    so that the flag and the typed options model cannot drift. ``decls`` default to ``--<field>``;
    ``click_kwargs`` add the click type or metavar (never ``default`` or ``help``). A boolean field gives
    delphi's ``--flag [BOOL]``, or with ``switch=True`` a plain ``--flag`` taking no value (one that must
    not read a following positional argument as its value)."""
    if {"default", "help"} & set(click_kwargs):
        raise TypeError("field_option takes its default and help from the options model")
    info = model.model_fields[field]
    default = info.get_default(call_default_factory=True)
    help_text = _doc(field, model)
    decls = decls or (f"--{field}",)
    if info.annotation is bool and switch:
        return click.option(*decls, is_flag=True, default=bool(default), help=help_text)
    if info.annotation is bool:
        return bool_option(*decls, default=bool(default), help=help_text)
    show = default is not None and default != "" and default != []
    return click.option(*decls, default=default, help=help_text, show_default=show, **click_kwargs)


def _doc(field: str, model: type[Options] | None = None) -> str:
    """The docstring of ``field`` of ``model`` (default :class:`CacheCommandOptions`) as one line of help."""
    info = (model or CacheCommandOptions).model_fields[field]
    return " ".join((info.description or "").replace("``", "").split())


def model_options() -> F:
    """How the LM is loaded: ``--device``, ``--model_dtype``, ``--revision``, ``--load_in_8bit``."""
    return stack_options(
        field_option(CacheCommandOptions, "device"),
        field_option(CacheCommandOptions, "model_dtype", type=click.Choice(["float32", "float16", "bfloat16"])),
        field_option(CacheCommandOptions, "revision"),
        field_option(CacheCommandOptions, "load_in_8bit"),
    )


def hookpoints_option(required: bool = False) -> F:
    """``--hookpoints a b c`` (delphi style; also repeatable or comma-separated)."""
    return click.option("--hookpoints", cls=MultiValueOption, required=required, metavar="HOOKPOINT ...",
                        help=_doc("hookpoints"))


def dataset_options() -> F:
    """``--dataset_repo``, ``--dataset_split``, ``--dataset_name``, ``--dataset_column``."""
    return stack_options(*(field_option(DataOptions, field) for field in
                           ("dataset_repo", "dataset_split", "dataset_name", "dataset_column")))


def cache_options() -> F:
    """``--n_tokens``, ``--batch_size``, ``--cache_ctx_len``, ``--filter_bos``."""
    return stack_options(
        field_option(DataOptions, "n_tokens", type=click.IntRange(min=1)),
        field_option(DataOptions, "batch_size", type=click.IntRange(min=1)),
        field_option(DataOptions, "cache_ctx_len", type=click.IntRange(min=2)),
        field_option(DataOptions, "filter_bos"),
    )


def store_options() -> F:
    """``--store``, ``--dtype``, ``--shard_size_tokens``, ``--verify`` (where and how caches are written)."""
    return stack_options(
        field_option(CacheCommandOptions, "store", type=click.Path(file_okay=False, path_type=Path)),
        field_option(CacheCommandOptions, "dtype", type=click.Choice(["float32", "float16"])),
        field_option(CacheCommandOptions, "shard_size_tokens", type=click.IntRange(min=1)),
        field_option(CacheCommandOptions, "verify"),
    )


def example_options() -> F:
    """delphi's latent-cache and example options: ``--n_splits``, ``--min_examples``, ``--n_examples_*``,
    ``--n_non_activating``, ``--example_ctx_len``, ``--center_examples``, ``--non_activating_source``,
    ``--neighbours_type``, ``--n_quantiles``, ``--train_type``, ``--test_type``, ``--ratio_top`` and the
    ``--sampler_option`` / ``--non_activating_option`` / ``--neighbour_option`` pairs."""
    from .examples import ExampleOptions

    return stack_options(
        click.option("--n_splits", type=click.IntRange(min=1), default=5, show_default=True,
                     help="Shards of the latent cache (latent ranges; reading a latent loads one split)."),
        field_option(ExampleOptions, "min_examples", type=click.IntRange(min=1)),
        field_option(ExampleOptions, "n_examples_train", type=click.IntRange(min=0)),
        field_option(ExampleOptions, "n_examples_test", type=click.IntRange(min=0)),
        field_option(ExampleOptions, "n_non_activating", type=click.IntRange(min=0)),
        field_option(ExampleOptions, "example_ctx_len", type=click.IntRange(min=1)),
        field_option(ExampleOptions, "center_examples"),
        field_option(ExampleOptions, "non_activating_source"),
        field_option(ExampleOptions, "neighbours_type"),
        field_option(ExampleOptions, "n_quantiles", type=click.IntRange(min=1)),
        field_option(ExampleOptions, "train_type"),
        field_option(ExampleOptions, "test_type"),
        field_option(ExampleOptions, "ratio_top", type=click.FloatRange(0, 1)),
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


EXCLUDE_POSITIONS_HELP = (
    "Positions left out of the latent cache (negative ones count from the window's end; 'none' for none) "
    "[default: what the dictionary's training recorded in its cfg.json, else the model's declaration: "
    "0 1 2 3 on SmolLM2, 0 elsewhere].")
"""Help of ``--exclude_positions`` in ``saelab latents`` and ``saelab run`` (and the options models' docs)."""


def exclude_positions_option() -> F:
    """``--exclude_positions POS ...`` or ``none`` (parsed by :func:`parse_positions`)."""
    return click.option("--exclude_positions", cls=MultiValueOption, metavar="POS ...|none", default=None,
                        help=EXCLUDE_POSITIONS_HELP)


def parse_positions(values: Sequence[str | int] | None) -> list[int] | None:
    """``--exclude_positions`` values: None when not given (the recorded or model default applies), ``[]``
    for ``none``, else the integers; anything else is a one-line error."""
    if values is None or (not isinstance(values, str) and len(values) == 0):
        return None
    items = [values] if isinstance(values, (str, int)) else list(values)
    if [str(v).strip().lower() for v in items] == ["none"]:
        return []
    try:
        return [int(v) for v in items]
    except (TypeError, ValueError):
        raise UsageError(f"bad --exclude_positions {items}; accepted: integer positions (negative ones count "
                         f"from the window's end) or 'none'") from None


def name_option(required: bool = True) -> F:
    """``--name``: the run name (``results/<name>/``); required unless ``required=False`` (checked by
    :func:`resolve_params`, after a ``--config`` file had its chance to supply it)."""
    return click.option("--name", cls=_LateRequiredOption if required else click.Option, default=None,
                        help=_doc("name") + ("  [required]" if required else ""))


def overwrite_option(choices: Sequence[str] = OVERWRITE_CHOICES) -> F:
    """``--overwrite cache neighbours scores`` (delphi style, several values)."""
    return click.option("--overwrite", cls=MultiValueOption, type=click.Choice(list(choices)),
                        metavar=" ".join(choices), help=_doc("overwrite"))


def hf_token_option() -> F:
    """``--hf_token`` (also ``$HF_TOKEN``; never written to disk or logs)."""
    return click.option("--hf_token", default=None, envvar="HF_TOKEN", show_envvar=True,
                        help=_doc("hf_token"))


def seed_option() -> F:
    """``--seed`` (default 22)."""
    return field_option(CacheCommandOptions, "seed", type=int)


def verbose_option() -> F:
    """``--verbose`` (default True): progress bars and summary tables."""
    return field_option(CacheCommandOptions, "verbose")


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
