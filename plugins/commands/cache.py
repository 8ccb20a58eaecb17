"""``saelab cache``: stream LM activations at hookpoints into the shared activation cache."""

from __future__ import annotations

from typing import Any

import click
from saelab import hookimpl
from saelab.activation_cache import PAIRED_PASSES, human_bytes, open_or_build_cache
from saelab.cli_options import (
    EMBEDDED_NOTE,
    CacheCommandOptions,
    cache_options,
    dataset_options,
    field_option,
    hf_token_option,
    hookpoints_option,
    model_argument,
    model_options,
    name_option,
    one_line_warnings,
    overwrite_option,
    resolve_params,
    store_options,
    verbose_option,
)
from saelab.config import config_option, recorded_invocation, write_run_config
from saelab.layout import RunLayout
from saelab.paired import PairedModelOptions


class PairedCacheOptions(CacheCommandOptions, PairedModelOptions):
    """Every resolved option of ``saelab cache``: the cache options and a second model."""


@hookimpl
def register_commands(cli: click.Group) -> None:
    """Add ``saelab cache``."""

    @cli.command("cache", epilog=EMBEDDED_NOTE,
                 short_help="Cache activations of MODEL at hookpoints (resumable shards, shared by fingerprint).")
    @model_argument()
    @hookpoints_option()
    @dataset_options()
    @cache_options()
    @name_option()
    @store_options()
    @overwrite_option()
    @model_options()
    @field_option(PairedCacheOptions, "model_b", metavar="MODEL_B")
    @field_option(PairedCacheOptions, "paired_pass", type=click.Choice(list(PAIRED_PASSES)))
    @hf_token_option()
    @verbose_option()
    @config_option()
    @click.pass_context
    def cache(ctx: click.Context, **params: Any) -> None:
        """Cache activations of MODEL at hookpoints (safetensors shards, resumable, shared by fingerprint).

        A later run of any name with the same model, hookpoints, dataset (repo, name, split, column),
        n_tokens, cache_ctx_len and dtype reuses the cache; --overwrite cache rebuilds it. A killed run
        resumes from its last complete shard when the same command is run again. With --model_b MODEL_B
        both models' activations are cached at each hookpoint (sites HOOKPOINT@A and HOOKPOINT@B).
        """
        options: PairedCacheOptions = resolve_params(ctx, params, model=PairedCacheOptions)
        layout = RunLayout.named(options.name)
        directory = layout.root
        with recorded_invocation(directory, "cache"):
            with one_line_warnings():
                cache = open_or_build_cache(options)
            directory.mkdir(parents=True, exist_ok=True)
            write_run_config(directory, command="cache", config=options,
                             extra={"activation_cache": str(cache.path)})
        if options.verbose:
            from saelab.progress import stdout_console, summary_table

            info = cache.build_info
            rows = [
                ("activation cache", str(cache.path)),
                ("status", info["status"] + (f" (a cache of more sites; asked: {', '.join(info['requested_hookpoints'])})"
                                             if info.get("covering") else "")),
                *_model_rows(options),
                ("hookpoints", ", ".join(f"{hp} (d={cache.dim(hp)})" for hp in cache.hookpoints)),
                ("dataset", f"{options.dataset_repo} split={options.dataset_split}"
                            + (f" name={options.dataset_name}" if options.dataset_name else "")
                            + f" column={options.dataset_column}"),
                ("tokens", f"{cache.n_tokens:,} ({cache.n_sequences:,} x {cache.ctx_len})"
                           + (" - data ran out" if cache.manifest.get("data_exhausted") else "")),
                ("shards", len(cache.shards)),
                ("dtype", cache.manifest["dtype"]),
                ("size on disk", human_bytes(cache.size_on_disk())),
                ("time", f"{info.get('seconds', 0.0):.1f} s"),
            ]
            if info.get("tokens_written") and info.get("seconds"):
                rows.append(("throughput", f"{info['tokens_written'] / info['seconds']:,.0f} tokens/s"))
            rows.append(("run config", str(layout.run_config)))
            stdout_console.print(summary_table("saelab cache", rows))


def _model_rows(options: PairedCacheOptions) -> list[tuple[str, str]]:
    """The summary's model rows: ``model``, or models A and B (and how the pair was cached)."""
    if not options.model_b:
        return [("model", options.model)]
    return [("model A", options.model), ("model B", options.model_b),
            ("paired pass", options.paired_pass)]
