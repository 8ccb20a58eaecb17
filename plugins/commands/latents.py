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
    hf_token_option,
    hookpoints_option,
    model_argument,
    model_options,
    name_option,
    one_line_warnings,
    overwrite_option,
    resolve_params,
    seed_option,
    source_options,
    verbose_option,
)
from saelab.config import config_option, write_run_config
from saelab.paths import run_dir


class LatentsCommandOptions(CacheCommandOptions):
    """Every resolved option of ``saelab latents``."""

    sparse_model: str | None = None
    """Dictionary directory (saelab, SAELens or sparsify format), sparsify run or saelab run."""
    n_splits: int = Field(default=5, ge=1)
    """Shards of the latent cache (latent ranges)."""
    n_quantiles: int = Field(default=10, ge=1)
    """Activation quantiles in the statistics and for sampling."""
    exclude_positions: list[int] = []
    """Absolute positions whose latents are not stored (e.g. 1 2 3 for SmolLM2's massive activations)."""
    max_latents: int | None = Field(default=None, ge=1)
    """Write example records of the first N qualifying latents."""
    feature_num: list[int] | None = None
    """Write example records of these latents."""
    min_examples: int = Field(default=200, ge=1)
    """Minimum activating windows for a latent to get a record."""
    n_examples_train: int = Field(default=40, ge=0)
    """Train examples per record."""
    n_examples_test: int = Field(default=50, ge=0)
    """Test examples per record (disjoint from train)."""
    n_non_activating: int = Field(default=50, ge=0)
    """Non-activating examples per record."""
    example_ctx_len: int = Field(default=32, ge=1)
    """Tokens per example window."""
    center_examples: bool = True
    """Centre windows on the max-activating token."""
    train_type: str = "quantiles"
    """Train sampler."""
    test_type: str = "quantiles"
    """Test sampler."""
    ratio_top: float = Field(default=0.2, ge=0, le=1)
    """Share of top examples in ``mix``."""
    non_activating_source: str = "random"
    """Non-activating source."""
    neighbours_type: str = "co-occurrence"
    """Neighbour finder for the neighbours source."""
    sampler_option: list[tuple[str, str]] = []
    """``PLUGIN.KEY VALUE`` options addressed to one sampler (``--sampler_option mix.ratio_top 0.3``)."""
    non_activating_option: list[tuple[str, str]] = []
    """``PLUGIN.KEY VALUE`` options addressed to one non-activating source."""
    neighbour_option: list[tuple[str, str]] = []
    """``PLUGIN.KEY VALUE`` options addressed to one neighbour finder."""


def _int_list(values: Any) -> list[int] | None:
    if not values:
        return None
    try:
        return [int(v) for v in values]
    except ValueError:
        raise UsageError(f"bad latent index in {list(values)}; accepted: integers") from None


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
    @click.option("--exclude_positions", cls=MultiValueOption, type=int, metavar="POS ...",
                  help="Absolute positions left out of the latent cache (e.g. 1 2 3 on SmolLM2).")
    @click.option("--max_latents", type=click.IntRange(min=1), default=None,
                  help="Write records (examples) of the first N latents that qualify.")
    @click.option("--feature_num", cls=MultiValueOption, type=int, metavar="LATENT ...",
                  help="Write records of these latent indices.")
    @click.option("--store", default=None, help="Activation cache store to reuse activations from "
                                                "[default: results/.activations].")
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
        params["feature_num"] = _int_list(params.get("feature_num"))
        params["exclude_positions"] = list(params.get("exclude_positions") or [])
        options: LatentsCommandOptions = resolve_params(ctx, params, model=LatentsCommandOptions)
        if not options.sparse_model:
            raise UsageError("missing SPARSE_MODEL: give a dictionary directory (saelab, SAELens or sparsify format)")
        run_latents(options)


def run_latents(options: LatentsCommandOptions) -> list[dict[str, Any]]:
    """Build the latent caches (and records) of ``saelab latents``; prints the summary table."""
    from saelab.examples import build_records
    from saelab.latents import latent_cache_for_run, select_dictionaries
    from saelab.models import load_activation_source
    from saelab.pipeline import example_options as example_values

    directory = run_dir(options.name)
    chosen = select_dictionaries(options.sparse_model, options.hookpoints)  # type: ignore[arg-type]
    with one_line_warnings():
        source = load_activation_source(options.model, **source_options(options.model_dump()))
        rows = []
        for hook, dictionary, path in chosen:
            cache = latent_cache_for_run(options, source, dictionary, hook, directory)
            summary = cache.stats()["summary"]
            row = {"hookpoint": hook, "dictionary": str(path), "status": cache.build_info["status"],
                   "tokens": cache.n_analysed, "d_sae": cache.d_sae, "nonzeros": cache.manifest["n_nonzeros"],
                   "alive": summary["alive"], "dead": summary["dead"], "mean L0": round(summary["mean_l0"], 2),
                   "seconds": round(cache.build_info.get("seconds", 0.0), 1)}
            if options.max_latents or options.feature_num:
                _, rec = build_records(cache, example_values(options.model_dump()), tokenizer=source.tokenizer,
                                       dictionary=dictionary, out_dir=cache.path / "records")
                row.update({"records": rec.built, "skipped (< min_examples)": len(rec.skipped)})
            rows.append(row)
    directory.mkdir(parents=True, exist_ok=True)
    write_run_config(directory, command="latents", config=options,
                     extra={"latents": {r["hookpoint"]: str(directory / "latents" / r["hookpoint"]) for r in rows}})
    if options.verbose:
        from saelab.progress import stdout_console, summary_table

        stdout_console.print(summary_table("saelab latents", rows))
    return rows
