"""``saelab train``: train sparse dictionaries (one per hookpoint x config) on LM activations.

Data comes from ``--cache PATH`` (an existing activation cache), ``--on_the_fly`` (the LM streams
activations, nothing is written), or, with neither, from the shared activation cache, built first
(or reused by fingerprint) with the dataset options. Results go to
``results/<name>/dictionaries/<dictionary>/`` (cfg.json + dictionary.safetensors in the saelab
format, training_log.jsonl, checkpoints/). Under ``torchrun --nproc_per_node N -m saelab train ...``
training is data-parallel.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from saelab import SiteSpec, UsageError, hookimpl
from saelab.cli import MultiValueOption
from saelab.cli_options import (
    DEFAULT_MODEL,
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
    seed_option,
    store_options,
    verbose_option,
)
from saelab.config import config_option, recorded_invocation, write_run_config
from saelab.layout import RunLayout
from saelab.models import source_options
from saelab.options import load_config_file, parse_option_value
from saelab.positions import CFG_KEY, PositionFilter, model_exclusions
from saelab.training import TrainerConfig

TRAIN_FLAG_NAMES = {"batch_size": "train_batch_size"}
"""Trainer fields whose flag differs from the field name (``--batch_size`` is the LM's, per CLI.md)."""
TRAINER_FLAGS_FROM_SHARED = {"seed": "seed", "device": "device", "exclude_bos": "filter_bos"}
"""Trainer fields set by a shared flag: ``--seed``, ``--device`` and ``--filter_bos``."""

TRAIN_NOTE = (
    "Hookpoints: NAME trains an autoencoder on NAME; IN:OUT (e.g. layers.3.mlp.input:layers.3.mlp) a "
    "dictionary that reads IN and reconstructs OUT (transcoders). Sweeps: several --architecture values, "
    "or --sweep FILE (YAML/JSON list of {architecture, options, name, lr}); -o KEY VALUE options apply to "
    "every config. A killed run resumes from its last checkpoint when the same command is run again (it says "
    "'resumed from step N'); checkpoints are written every --checkpoint_every steps and every "
    "--checkpoint_every_minutes of wall time."
)


class TrainCommandOptions(CacheCommandOptions):
    """The options of ``saelab train`` besides the trainer's (:class:`saelab.training.TrainerConfig`, whose
    fields are flags too): the cache options and which dictionaries to train on which data. The flags are
    generated from these fields."""

    architectures: list[str] = []
    """Architecture(s) to train (see `saelab plugins`); several make a sweep. [default: topk]"""
    arch_options: list[tuple[str, str]] = []
    """Architecture option, repeatable: -o k 32 -o d_sae 16384 (values parsed as JSON)."""
    sweep: Path | None = None
    """YAML/JSON file with a list 'dictionaries' of {architecture, options, name, lr}."""
    cache_path: Path | None = None
    """Train from this existing activation cache directory."""
    on_the_fly: bool = False
    """Stream activations from the LM while training (no cache written)."""


@dataclass
class DictConfig:
    """One configuration of a sweep."""

    name: str
    architecture: str
    options: dict[str, Any]
    lr: float | None = None


def _trainer_params() -> dict[str, str]:
    """``{click parameter name: TrainerConfig field}`` of the trainer flags."""
    return {TRAIN_FLAG_NAMES.get(f, f): f for f in TrainerConfig.model_fields if f not in TRAINER_FLAGS_FROM_SHARED}


def _trainer_flags(f: Any) -> Any:
    """Add one flag per TrainerConfig field (default and help from the field, see ``field_option``), except
    those set by shared flags. Values stay strings parsed as JSON by :func:`_trainer_config` (``--lr null``)."""
    for param, field_name in reversed(list(_trainer_params().items())):
        annotation = TrainerConfig.model_fields[field_name].annotation
        decls = ("--" + param, param)
        if field_name == "exclude_positions":
            option = field_option(TrainerConfig, field_name, *decls, cls=MultiValueOption, metavar="POS ...")
        elif typing.get_origin(annotation) is typing.Literal:
            option = field_option(TrainerConfig, field_name, *decls, type=click.Choice(typing.get_args(annotation)))
        else:
            option = field_option(TrainerConfig, field_name, *decls, type=click.STRING, metavar="VALUE")
        f = option(f)
    return f


def _trainer_config(values: dict[str, Any]) -> TrainerConfig:
    raw: dict[str, Any] = {}
    for param, field_name in _trainer_params().items():
        value = values.get(param)
        if value is None:
            continue
        if field_name == "exclude_positions":
            items = list(value)
            if not items:
                continue
            raw[field_name] = [] if [str(v).lower() for v in items] == ["none"] else [parse_option_value(v) for v in items]
        else:
            raw[field_name] = parse_option_value(value) if isinstance(value, str) else value
    raw["seed"] = values["seed"]
    raw["device"] = values.get("device") or "auto"
    raw["exclude_bos"] = bool(values.get("filter_bos"))
    config = TrainerConfig.parse(raw, where="train")
    return config


def _with_model_exclusions(config: TrainerConfig, model: str) -> TrainerConfig:
    """``config`` with ``exclude_positions`` from the model's declaration when none was given."""
    if config.exclude_positions is not None:
        return config
    return config.model_copy(update={"exclude_positions": model_exclusions(model)})


def _parse_sites(specs: list[str]) -> list[tuple[str, str]]:
    sites = []
    for spec in specs:
        parts = spec.split(":")
        if len(parts) == 1 and parts[0]:
            sites.append((parts[0], parts[0]))
        elif len(parts) == 2 and all(parts):
            sites.append((parts[0], parts[1]))
        else:
            raise UsageError(f"bad hookpoint {spec!r}; accepted: NAME (e.g. layers.15) or IN:OUT "
                             "(e.g. layers.3.mlp.input:layers.3.mlp)")
    if len(set(sites)) != len(sites):
        raise UsageError(f"hookpoint given twice in {specs}")
    return sites


def _dict_configs(architectures: list[str], options: list[tuple[str, str]], sweep: Path | None) -> list[DictConfig]:
    from saelab import registry

    shared = {key: parse_option_value(value) for key, value in options}
    entries: list[dict[str, Any]] = []
    if sweep is not None:
        data = load_config_file(sweep)
        items = data.get("dictionaries", data.get("sweep"))
        if not isinstance(items, list) or not items:
            raise UsageError(f"sweep file {str(sweep)!r} must hold a list 'dictionaries' of "
                             "{architecture, options, name, lr} entries")
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise UsageError(f"sweep file {str(sweep)!r}: entry {i} must be a mapping")
            unknown = set(item) - {"architecture", "options", "name", "lr"}
            if unknown:
                raise UsageError(f"sweep file {str(sweep)!r}: entry {i} has unknown key {sorted(unknown)[0]!r}; "
                                 "accepted: architecture, options, name, lr")
            entries.append(item)
    else:
        entries = [{"architecture": arch} for arch in (architectures or ["topk"])]
    configs: list[DictConfig] = []
    reg = registry("architecture")
    for item in entries:
        arch = str(item.get("architecture") or (architectures[0] if architectures else "topk"))
        cls = reg.get(arch)  # unknown names: one line listing the known ones
        opts = {**shared, **dict(item.get("options") or {})}
        cls.Options.parse(opts, where=f"architecture {cls.name!r}")
        lr = item.get("lr")
        configs.append(DictConfig(name=str(item.get("name") or cls.name), architecture=cls.name, options=opts,
                                  lr=None if lr is None else float(lr)))
    names = [c.name for c in configs]
    for i, c in enumerate(configs):
        if names.count(c.name) > 1:
            c.name = f"{c.name}-{i}"
    return configs


def _dictionary_name(site: tuple[str, str], config: DictConfig, n_configs: int) -> str:
    base = site[0] if site[0] == site[1] else f"{site[0]}__{site[1]}"
    return base if n_configs == 1 else f"{base}-{config.name}"


@hookimpl
def register_commands(cli: click.Group) -> None:
    """Add ``saelab train``."""

    @cli.command("train", epilog=EMBEDDED_NOTE + " " + TRAIN_NOTE,
                 short_help="Train sparse dictionaries on activations of MODEL at hookpoints.")
    @model_argument()
    @hookpoints_option()
    @field_option(TrainCommandOptions, "architectures", "--architecture", "architectures", cls=MultiValueOption,
                  metavar="NAME ...")
    @field_option(TrainCommandOptions, "arch_options", "-o", "--option", "arch_options", nargs=2, multiple=True,
                  metavar="KEY VALUE")
    @field_option(TrainCommandOptions, "sweep", type=click.Path(dir_okay=False, path_type=Path))
    @field_option(TrainCommandOptions, "cache_path", "--cache", "cache_path", type=click.Path(path_type=Path))
    @field_option(TrainCommandOptions, "on_the_fly", switch=True)
    @_trainer_flags
    @dataset_options()
    @cache_options()
    @name_option()
    @store_options()
    @overwrite_option(("cache", "train"))
    @model_options()
    @hf_token_option()
    @seed_option()
    @verbose_option()
    @config_option()
    @click.pass_context
    def train(ctx: click.Context, **params: Any) -> None:
        """Train sparse dictionaries on activations of MODEL at hookpoints (one per hookpoint x config)."""
        values = resolve_params(ctx, params)
        rank_zero = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 keeps the run history
        history = recorded_invocation(RunLayout.named(values["name"]).root, "train") if rank_zero else contextlib.nullcontext()
        with history, one_line_warnings():
            train_command(values)


def train_command(values: dict[str, Any]) -> None:
    """Run ``saelab train`` with resolved option ``values``."""
    from saelab.dictionary import build_dictionary
    from saelab.training import CacheSource, DictionaryJob, Trainer, init_distributed

    config = _trainer_config(values)
    layout = RunLayout.named(values["name"])
    directory = layout.root
    if values.get("cache_path") is not None and values.get("on_the_fly"):
        raise UsageError("--cache and --on_the_fly exclude each other; give one (or neither to build a cache)")
    if not values.get("hookpoints"):
        raise UsageError("no --hookpoints given; e.g. --hookpoints layers.15")
    sites = _parse_sites(list(values["hookpoints"]))
    configs = _dict_configs(list(values.get("architectures") or []), list(values.get("arch_options") or []),
                            values.get("sweep"))
    needed = list(dict.fromkeys(hp for site in sites for hp in site))
    dist = init_distributed(config.device)

    cache = None
    if values.get("cache_path") is not None:
        from saelab.activation_cache import ActivationCache

        path = Path(values["cache_path"])
        if not path.is_dir():
            raise UsageError(f"activation cache {str(path)!r} does not exist; give a cache directory "
                             "(results/.activations/<fingerprint>) or leave --cache out to build one")
        cache = ActivationCache.open(path)
        if values.get("model") == DEFAULT_MODEL:  # no MODEL given: name the cache's
            values = {**values, "model": (cache.manifest.get("model") or {}).get("model", DEFAULT_MODEL)}
        config = _with_model_exclusions(config, values["model"])
        source = CacheSource(cache, needed, exclude_positions=config.exclude_positions,
                             exclude_bos=config.exclude_bos, shuffle_buffer_shards=config.shuffle_buffer_shards)
        dims = {hp: cache.dim(hp) for hp in needed}
        data_ref = str(cache.path)
    elif values.get("on_the_fly"):
        config = _with_model_exclusions(config, values["model"])
        source, dims = _on_the_fly_source(values, needed, config)
        data_ref = "on_the_fly"
    else:
        from saelab.activation_cache import open_or_build_cache

        cache_values = {**values, "hookpoints": needed}
        if dist.is_main:
            cache = open_or_build_cache(cache_values)
        dist.barrier()
        if not dist.is_main:
            cache = open_or_build_cache({**cache_values, "verbose": False})
        assert cache is not None
        config = _with_model_exclusions(config, values["model"])
        source = CacheSource(cache, needed, exclude_positions=config.exclude_positions,
                             exclude_bos=config.exclude_bos, shuffle_buffer_shards=config.shuffle_buffer_shards)
        dims = {hp: cache.dim(hp) for hp in needed}
        data_ref = str(cache.path)

    provenance = data_provenance(values, cache)

    import torch

    jobs, skipped = [], []
    overwrite = "train" in (values.get("overwrite") or [])
    for site in sites:
        for cfg in configs:
            name = _dictionary_name(site, cfg, len(configs))
            out = layout.dictionary_dir(name)
            if overwrite and out.exists() and dist.is_main:
                shutil.rmtree(out)
            elif (out / "cfg.json").is_file():
                skipped.append((name, out))
                continue
            torch.manual_seed(config.seed)  # the same initial weights on every rank and on a resumed run
            spec = SiteSpec(inputs=[site[0]], outputs=[site[1]], d_in=dims[site[0]], d_out=dims[site[1]])
            module = build_dictionary(cfg.architecture, spec, cfg.options)
            extra = {"model": values.get("model"), "run": values["name"], "dictionary_name": name,
                     "hookpoints": {"inputs": [site[0]], "outputs": [site[1]]}, "activation_cache": data_ref,
                     "data": provenance, CFG_KEY: PositionFilter.of(config.exclude_positions or (),
                                                                   config.exclude_bos).record()}
            jobs.append(DictionaryJob(name=name, module=module, lr=cfg.lr, out_dir=out, extra_cfg=extra))
    dist.barrier()
    results = []
    if jobs:
        results = Trainer(jobs, config, dist=dist, progress=bool(values.get("verbose", True)),
                          run_name=values["name"]).fit(source)
    if not dist.is_main:
        _shutdown(dist)
        return
    directory.mkdir(parents=True, exist_ok=True)
    dictionaries = {r.name: str(r.out_dir) for r in results} | {n: str(p) for n, p in skipped}
    resolved = {k: v for k, v in values.items() if k not in _trainer_params()}
    resolved["trainer"] = config.model_dump(mode="json")
    resolved["dictionary_configs"] = [vars(c) for c in configs]
    write_run_config(directory, command="train", config=resolved,
                     extra={"activation_cache": data_ref, "dictionaries": dictionaries, "world_size": dist.world_size})
    if values.get("verbose", True):
        from saelab.progress import stdout_console, summary_table

        rows = []
        any_resumed = any(r.resumed_from_step is not None for r in results)
        for r in results:
            m = r.metrics
            row = {"dictionary": r.name, "architecture": r.module.name, "d_sae": r.module.d_sae,
                   "steps": r.steps, "tokens": r.tokens, "FVU": m.get("fvu"), "L0": m.get("l0"),
                   "dead %": 100 * m.get("dead_frac", 0.0), "dead last epoch %": 100 * r.dead_final_epoch,
                   "tokens/s": round(r.history[-1]["tokens_per_s"]) if r.history else None}
            if any_resumed:
                row["resumed from step"] = r.resumed_from_step
            rows.append(row)
        for n, _ in skipped:
            rows.append({"dictionary": n, "architecture": "already trained (--overwrite train retrains)"})
        stdout_console.print(summary_table("saelab train", rows))
        stdout_console.print(f"data: {data_ref}")
        stdout_console.print(f"dictionaries: {layout.dictionaries_dir}")
    _shutdown(dist)


def data_provenance(values: dict[str, Any], cache: Any | None) -> dict[str, Any]:
    """Where the training tokens came from, for ``cfg.json`` ``metadata.data`` (``saelab evaluate``
    reads it through ``saelab.evaluation.training_data`` to evaluate on held-out tokens): model,
    dataset_repo/split/name/column, n_tokens and ctx_len. From the activation cache's manifest when
    training read a cache (its own record, whatever the dataset flags say; the model as the command
    names it, which is loadable, else the manifest's), else from the options (``--on_the_fly``)."""
    if cache is not None:
        manifest = cache.manifest
        inputs = manifest.get("fingerprint_inputs") or {}
        dataset = manifest.get("dataset") or inputs.get("dataset") or {}
        model = manifest.get("model") or inputs.get("model") or {}
        return {"model": values.get("model") or (model.get("model") if isinstance(model, dict) else model),
                "dataset_repo": dataset.get("repo"), "dataset_split": dataset.get("split"),
                "dataset_name": dataset.get("name"), "dataset_column": dataset.get("column"),
                "n_tokens": manifest.get("n_tokens"), "ctx_len": manifest.get("ctx_len"),
                "activation_cache": str(cache.path)}
    return {"model": values.get("model"), "dataset_repo": values.get("dataset_repo"),
            "dataset_split": values.get("dataset_split"), "dataset_name": values.get("dataset_name") or None,
            "dataset_column": values.get("dataset_column"), "n_tokens": values.get("n_tokens"),
            "ctx_len": values.get("cache_ctx_len"), "activation_cache": None}


def _shutdown(dist: Any) -> None:
    """Tear the process group down on every rank together (a rank that leaves while rank 0 still
    writes results can abort in gloo's teardown: "terminate called without an active exception")."""
    if dist.active:
        import torch.distributed

        dist.barrier()
        torch.distributed.destroy_process_group()


def _on_the_fly_source(values: dict[str, Any], hookpoints: list[str], config: TrainerConfig) -> tuple[Any, dict]:
    from saelab.data import WindowSpec, iter_windows, load_dataset_source, n_windows_for
    from saelab.models import load_activation_source
    from saelab.training import LMSource

    source = load_activation_source(values["model"], **source_options(values))
    source.check_hookpoints(hookpoints)
    token = values.get("hf_token")
    token = getattr(token, "get_secret_value", lambda: token)()
    dataset = load_dataset_source(values["dataset_repo"], split=values["dataset_split"],
                                  name=values.get("dataset_name") or None, column=values["dataset_column"],
                                  hf_token=token)
    spec = WindowSpec.for_tokenizer(source.tokenizer, values["cache_ctx_len"])
    max_windows = n_windows_for(values["n_tokens"], values["cache_ctx_len"])

    def windows() -> Any:
        return iter_windows(dataset.texts(), source.tokenizer, spec, max_windows=max_windows)

    lm = LMSource(source, windows, hookpoints, lm_batch_size=values["batch_size"],
                  exclude_positions=config.exclude_positions, exclude_bos=config.exclude_bos)
    lm.n_rows = lm.count_rows()
    return lm, {hp: source.hookpoint_dim(hp) for hp in hookpoints}
