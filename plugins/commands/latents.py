"""``saelab latents``: the latent cache (sparse activations, per-latent statistics, top logits) of a
dictionary over a dataset, and optionally the example records of the first qualifying latents."""

from __future__ import annotations

from typing import Any

import click
from pydantic import Field
from saelab import UsageError, hookimpl
from saelab.cli import MultiValueOption
from saelab.cli_options import (
    EMBEDDED_NOTE,
    CacheCommandOptions,
    argument_or_flag,
    cache_options,
    dataset_options,
    example_options,
    exclude_positions_option,
    field_option,
    hf_token_option,
    hookpoints_option,
    model_argument,
    model_options,
    name_option,
    one_line_warnings,
    overwrite_option,
    parse_positions,
    resolve_params,
    seed_option,
    verbose_option,
)
from saelab.config import config_option, write_run_config
from saelab.examples import ExampleOptions, feature_num_values
from saelab.layout import RunLayout
from saelab.models import source_options


class LatentsCommandOptions(CacheCommandOptions, ExampleOptions):
    """Every resolved option of ``saelab latents``: the cache options, the example options (shared with
    ``saelab run``) and the latent cache's own."""

    sparse_model: str | None = None
    """Dictionary directory (saelab, SAELens or sparsify format), sparsify run or saelab run."""
    n_splits: int = Field(default=5, ge=1)
    """Shards of the latent cache (latent ranges; reading a latent loads one split)."""
    exclude_positions: list[int] | None = None
    """Positions left out of the latent cache (negative ones count from the window's end; 'none' for none)
    [default: what the dictionary's training recorded in its cfg.json, else the model's declaration: 0 1 2 3
    on SmolLM2, 0 elsewhere]."""
    sampler_option: list[tuple[str, str]] = []
    """An option of one sampler plugin, e.g. --sampler_option mix.ratio_top 0.3 (repeatable; a key the plugin
    does not take is an error)."""
    non_activating_option: list[tuple[str, str]] = []
    """An option of one non-activating source plugin, e.g. --non_activating_option faiss.batch_size 64
    (repeatable; a key the plugin does not take is an error)."""
    neighbour_option: list[tuple[str, str]] = []
    """An option of one neighbour finder plugin, e.g. --neighbour_option co-occurrence.block_latents 512
    (repeatable; a key the plugin does not take is an error)."""


@hookimpl
def register_commands(cli: click.Group) -> None:
    """Add ``saelab latents``."""

    @cli.command("latents", epilog=EMBEDDED_NOTE,
                 short_help="Cache the sparse latent activations of SPARSE_MODEL on MODEL, with statistics.")
    @model_argument()
    @click.argument("sparse_model", required=False, default=None, metavar="SPARSE_MODEL")
    @click.option("--sparse_model", "sparse_model_flag", default=None, metavar="PATH",
                  help="Dictionary directory (same as the SPARSE_MODEL argument).")
    @hookpoints_option()
    @dataset_options()
    @cache_options()
    @example_options()
    @exclude_positions_option()
    @field_option(LatentsCommandOptions, "max_latents", type=click.IntRange(min=1))
    @field_option(LatentsCommandOptions, "feature_num", cls=MultiValueOption, type=str, metavar="LATENT ...")
    @field_option(LatentsCommandOptions, "store")
    @name_option()
    @overwrite_option(("cache", "neighbours"))
    @model_options()
    @hf_token_option()
    @seed_option()
    @verbose_option()
    @config_option()
    @click.pass_context
    def latents(ctx: click.Context, **params: Any) -> None:
        """Latent cache of SPARSE_MODEL on MODEL: sparse activations streamed to
        results/<name>/latents/<hook>/ in --n_splits shards, per-latent statistics (stats.json) and top
        logits; with --max_latents or --feature_num also the example records (records/latent_<i>.json).

        Reads activations from an activation cache holding the dictionary's input sites over the same
        data when one exists in --store, else streams them from the model (no dense cache is written);
        a killed run resumes from its last chunk. `saelab run` builds its latent cache the same way.
        """
        params["sparse_model"] = argument_or_flag(params.get("sparse_model"), params.pop("sparse_model_flag", None),
                                                  what="dictionaries", argument="SPARSE_MODEL",
                                                  option="--sparse_model")
        params["feature_num"] = feature_num_values(params.get("feature_num"))
        params["exclude_positions"] = parse_positions(params.get("exclude_positions"))
        options: LatentsCommandOptions = resolve_params(ctx, params, model=LatentsCommandOptions)
        if not options.sparse_model:
            raise UsageError("missing SPARSE_MODEL: give a dictionary directory (saelab, SAELens or sparsify format)")
        run_latents(options)


def run_latents(options: LatentsCommandOptions) -> list[dict[str, Any]]:
    """Build the latent caches (and records) of ``saelab latents``; prints the summary table."""
    from saelab.examples import build_records, resolve_feature_num
    from saelab.latents import latent_caches_for_run, latent_layers, select_dictionaries
    from saelab.models import load_activation_source
    from saelab.paired import pair_for_dictionaries
    from saelab.pipeline import example_options as example_values

    layout = RunLayout.named(options.name)
    directory = layout.root
    chosen = select_dictionaries(options.sparse_model, options.hookpoints)  # type: ignore[arg-type]
    wanted = {hook: resolve_feature_num(options.feature_num, dictionary.d_sae, latent_layers(dictionary),
                                        f" for {hook!r}") for hook, dictionary, _ in chosen}
    with one_line_warnings():
        opts = source_options(options.model_dump())
        source = pair_for_dictionaries(load_activation_source(options.model, **opts),
                                       [dictionary for _, dictionary, _ in chosen],
                                       lambda model: load_activation_source(model, **opts))
        caches = latent_caches_for_run(options, source, {hook: dictionary for hook, dictionary, _ in chosen},
                                       directory)
        rows = []
        for hook, dictionary, path in chosen:
            cache = caches[hook]
            summary = cache.stats()["summary"]
            row = {"hookpoint": hook, "dictionary": str(path), "status": cache.build_info["status"],
                   "tokens": cache.n_analysed, "d_sae": cache.d_sae, "nonzeros": cache.manifest["n_nonzeros"],
                   "alive": summary["alive"], "dead": summary["dead"], "mean L0": round(summary["mean_l0"], 2),
                   "seconds": round(cache.build_info.get("seconds", 0.0), 1)}
            if options.max_latents or options.feature_num:
                values = {**options.model_dump(), "feature_num": wanted[hook]}
                _, rec = build_records(cache, example_values(values), tokenizer=source.tokenizer,
                                       dictionary=dictionary, out_dir=layout.latent_records_dir(hook))
                row.update({"records": rec.built, "skipped (< min_examples)": len(rec.skipped)})
            rows.append(row)
    directory.mkdir(parents=True, exist_ok=True)
    write_run_config(directory, command="latents", config=options,
                     extra={"latents": {r["hookpoint"]: str(layout.latents_dir(r["hookpoint"])) for r in rows}})
    if options.verbose:
        from saelab.progress import stdout_console, summary_table

        stdout_console.print(summary_table("saelab latents", rows))
    return rows
