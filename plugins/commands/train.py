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
import torch
from saelab import SiteSpec, SparseDictionary, UsageError, hookimpl
from saelab.activation_cache import cache_bytes, free_disk, human_bytes
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
from saelab.layout import RunLayout, activation_store
from saelab.models import load_activation_source, source_options
from saelab.options import load_config_file, parse_option_value
from saelab.paired import LABELS, PairedModelOptions, paired_sites, split_site
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


class TrainCommandOptions(CacheCommandOptions, PairedModelOptions):
    """The options of ``saelab train`` besides the trainer's (:class:`saelab.training.TrainerConfig`, whose
    fields are flags too): the cache options, a second model, and which dictionaries to train on which data.
    The flags are generated from these fields."""

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
    layers: list[str] = []
    """Train one dictionary spanning these layers instead of one per hookpoint (an architecture that spans
    layers: clt, transcoder_set, crosscoder): a range 0-29, a list 0,3,5 or 0 3 5, or both (0-3,7); its sites
    come from the architecture's options (clt: -o input_site mlp.input|resid_mid; crosscoder: -o layer_site)."""


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


Sites = tuple[tuple[str, ...], tuple[str, ...]]
"""The input and output hookpoints of one dictionary."""


def _parse_sites(specs: list[str]) -> list[Sites]:
    sites: list[Sites] = []
    for spec in specs:
        parts = spec.split(":")
        if len(parts) == 1 and parts[0]:
            sites.append(((parts[0],), (parts[0],)))
        elif len(parts) == 2 and all(parts):
            sites.append(((parts[0],), (parts[1],)))
        else:
            raise UsageError(f"bad hookpoint {spec!r}; accepted: NAME (e.g. layers.15) or IN:OUT "
                             "(e.g. layers.3.mlp.input:layers.3.mlp)")
    if len(set(sites)) != len(sites):
        raise UsageError(f"hookpoint given twice in {specs}")
    return sites


def parse_layers(specs: list[str]) -> list[int]:
    """``--layers`` values (``0-29``, ``0,3,5``, ``0 3 5``, ``0-3,7``) as sorted distinct block indices."""
    layers: set[int] = set()
    for part in (p.strip() for spec in specs for p in str(spec).replace(",", " ").split()):
        low, dash, high = part.partition("-")
        if not (low.isdigit() and (not dash or high.isdigit())) or (dash and int(high) < int(low)):
            raise UsageError(f"bad --layers {part!r}; accepted: a range 0-29, a list 0,3,5 or both (0-3,7)")
        layers.update(range(int(low), int(high if dash else low) + 1))
    if not layers:
        raise UsageError("--layers names no layer; e.g. --layers 0-2")
    return sorted(layers)


def _paired_sites(pairs: list[tuple[Sites, DictConfig]]) -> list[tuple[Sites, DictConfig]]:
    """With --model_b: each dictionary reads and writes its sites in both models (``HOOKPOINT@A`` ones, then
    ``HOOKPOINT@B``); architectures whose sites are layers (clt, transcoder_set) are a one-line error."""
    from saelab import registry

    reg = registry("architecture")
    out = []
    for (inputs, outputs), cfg in pairs:
        if reg.get(cfg.architecture).per_layer_sites:
            paired = sorted(n for n in reg.names() if not reg.get(n).per_layer_sites)
            raise UsageError(f"architecture {cfg.architecture!r} reads one model's layers; with --model_b accepted: "
                             f"{', '.join(paired)} (e.g. crosscoder)")
        out.append(((tuple(paired_sites(inputs)), tuple(paired_sites(outputs))), cfg))
    return out


def _spans_layers(cls: type[SparseDictionary]) -> bool:
    """Whether ``cls`` defines the sites of one dictionary spanning layers (``--layers``)."""
    return cls.sites_for_layers.__func__ is not SparseDictionary.sites_for_layers.__func__  # type: ignore[attr-defined]


def _layer_sites(layers: list[int], configs: list[DictConfig]) -> list[tuple[Sites, DictConfig]]:
    """One dictionary spanning ``layers`` per configuration (one-line error for an architecture that does
    not span layers)."""
    from saelab import registry

    reg = registry("architecture")
    pairs = []
    for cfg in configs:
        cls = reg.get(cfg.architecture)
        sites = cls.sites_for_layers(layers, cls.Options.parse(cfg.options, where=f"architecture {cls.name!r}"))
        if sites is None:
            spanning = sorted(n for n in reg.names() if _spans_layers(reg.get(n)))
            raise UsageError(f"architecture {cls.name!r} does not span layers (--layers); accepted: "
                             f"{', '.join(spanning) or 'none registered'}, or --hookpoints for one dictionary per site")
        pairs.append(((tuple(sites[0]), tuple(sites[1])), cfg))
    return pairs


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


def _dictionary_name(site: Sites, config: DictConfig, n_configs: int, layers: list[int] | None = None) -> str:
    if layers:
        base = "layers." + _compact(layers)
    else:
        first_in, first_out = split_site(site[0][0])[0], split_site(site[1][0])[0]  # a paired site by its hookpoint
        base = first_in if site[0] == site[1] else f"{first_in}__{first_out}"
    return base if n_configs == 1 else f"{base}-{config.name}"


def _compact(layers: list[int]) -> str:
    """``[0, 1, 2, 5]`` as ``0-2_5``."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return "_".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


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
    @field_option(TrainCommandOptions, "layers", cls=MultiValueOption, metavar="LAYERS")
    @field_option(TrainCommandOptions, "model_b", metavar="MODEL_B")
    @field_option(TrainCommandOptions, "paired_pass", type=click.Choice(["one", "two"]))
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
    layers = parse_layers(list(values["layers"])) if values.get("layers") else None
    if layers and values.get("hookpoints"):
        raise UsageError("--layers and --hookpoints exclude each other; give --layers for one dictionary spanning "
                         "layers, --hookpoints for one per site")
    if not layers and not values.get("hookpoints"):
        raise UsageError("no --hookpoints given; e.g. --hookpoints layers.15 (or --layers 0-2 with --architecture clt)")
    configs = _dict_configs(list(values.get("architectures") or []), list(values.get("arch_options") or []),
                            values.get("sweep"))
    pairs = (_layer_sites(layers, configs) if layers
             else [(site, cfg) for site in _parse_sites(list(values["hookpoints"])) for cfg in configs])
    plain = list(dict.fromkeys(hp for site, _ in pairs for group in site for hp in group))
    if values.get("model_b"):
        if values.get("on_the_fly"):
            raise UsageError("--on_the_fly does not read two models yet; leave it out with --model_b (a paired "
                             "cache is built)")
        pairs = _paired_sites(pairs)
    needed = list(dict.fromkeys(hp for site, _ in pairs for group in site for hp in group))
    dist = init_distributed(config.device)

    cache = None
    plan = f"{len(pairs)} dictionar{'y' if len(pairs) == 1 else 'ies'}"
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
        preflight(pairs, dims, config, values, plan, f"activation cache {human_bytes(cache.size_on_disk())} (reused)")
    elif values.get("on_the_fly"):
        config = _with_model_exclusions(config, values["model"])
        source, dims = _on_the_fly_source(values, needed, config)
        data_ref = "on_the_fly"
        preflight(pairs, dims, config, values, plan, "no activation cache (streamed from the LM)")
    else:
        from saelab.activation_cache import open_or_build_cache

        cache_values = {**values, "hookpoints": needed}
        lm = load_activation_source(values["model"], **source_options(values))
        if values.get("model_b"):
            from saelab.activation_cache import paired_request

            lm, _ = paired_request({**values, "hookpoints": plain}, lm)  # model B; one-line width errors
        dims = {hp: lm.hookpoint_dim(hp) for hp in lm.check_hookpoints(needed)}
        size = cache_bytes(list(dims.values()), -(-values["n_tokens"] // values["cache_ctx_len"]),
                           values["cache_ctx_len"], values.get("dtype") or "float32")
        preflight(pairs, dims, config, values, plan, f"activation cache at most {human_bytes(size)} to write "
                  f"(free disk {human_bytes(free_disk(values.get('store') or activation_store()))}) unless a "
                  f"matching cache is reused")
        if dist.is_main:
            cache = open_or_build_cache(cache_values, source=lm)
        dist.barrier()
        if not dist.is_main:
            cache = open_or_build_cache({**cache_values, "verbose": False}, source=lm)
        del lm  # the trainer reads the cache: the LM's memory goes back before training
        assert cache is not None
        config = _with_model_exclusions(config, values["model"])
        source = CacheSource(cache, needed, exclude_positions=config.exclude_positions,
                             exclude_bos=config.exclude_bos, shuffle_buffer_shards=config.shuffle_buffer_shards)
        dims = {hp: cache.dim(hp) for hp in needed}
        data_ref = str(cache.path)

    provenance = data_provenance(values, cache)

    jobs, skipped = [], []
    overwrite = "train" in (values.get("overwrite") or [])
    for site, cfg in pairs:
        name = _dictionary_name(site, cfg, len(configs), layers)
        out = layout.dictionary_dir(name)
        if overwrite and out.exists() and dist.is_main:
            shutil.rmtree(out)
        elif (out / "cfg.json").is_file():
            skipped.append((name, out))
            continue
        torch.manual_seed(config.seed)  # the same initial weights on every rank and on a resumed run
        module = build_dictionary(cfg.architecture, _site_spec(site, dims), cfg.options)
        extra = {"model": values.get("model"), "run": values["name"], "dictionary_name": name,
                 **({"models": {LABELS[0]: values.get("model"), LABELS[1]: values["model_b"]}}
                    if values.get("model_b") else {}),
                 "hookpoints": {"inputs": list(site[0]), "outputs": list(site[1])}, "activation_cache": data_ref,
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


ADAM_BYTES_PER_PARAMETER = 16
"""float32 weights, gradients and Adam's two moment estimates."""


def preflight(pairs: list[tuple[Sites, DictConfig]], dims: dict[str, int], config: TrainerConfig,
              values: dict[str, Any], plan: str, data: str) -> None:
    """Print what training will hold (parameters; weights, gradients and Adam state; the data) and refuse
    in one line when the weights and optimiser state exceed the memory free on the training device."""
    from saelab.dictionary import build_dictionary

    params = 0
    for site, cfg in pairs:
        try:
            with torch.device("meta"):  # shapes only: nothing is allocated
                module = build_dictionary(cfg.architecture, _site_spec(site, dims), cfg.options)
        except (NotImplementedError, RuntimeError):  # an initialisation that needs real values
            module = build_dictionary(cfg.architecture, _site_spec(site, dims), cfg.options)
        params += sum(p.numel() for p in module.parameters())
    state = params * ADAM_BYTES_PER_PARAMETER
    device, free = available_memory(config.device)
    if values.get("verbose", True) and os.environ.get("RANK", "0") == "0":
        click.echo(f"train: {plan}, {params:,} parameters; weights + gradients + Adam state "
                   f"{human_bytes(state)} ({device} free: {human_bytes(free)}); {data}", err=True)
    if state > free:
        raise UsageError(f"training needs {human_bytes(state)} for the weights, gradients and Adam state of "
                         f"{params:,} parameters but {device} has {human_bytes(free)} free; train fewer layers, "
                         f"a smaller -o d_sae or fewer architectures at once")


def available_memory(device: str) -> tuple[str, int]:
    """``(what, bytes free)`` of the device training runs on: the GPU's free memory, else the RAM the OS
    says is available (``MemAvailable``)."""
    from saelab.training import resolve_device

    resolved = resolve_device(device)
    if resolved.type == "cuda":
        return f"GPU {resolved}", int(torch.cuda.mem_get_info(resolved)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return "RAM", int(line.split()[1]) * 1024
    except OSError:
        pass
    return "RAM", os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _site_spec(site: Sites, dims: dict[str, int]) -> SiteSpec:
    """The :class:`SiteSpec` of one dictionary (its input sites of one width, its output sites of one width)."""
    widths = [{dims[h] for h in group} for group in site]
    for group, width in zip(site, widths, strict=True):
        if len(width) > 1:
            raise UsageError(f"the sites {', '.join(group)} differ in width ({', '.join(str(dims[h]) for h in group)}); "
                             f"one dictionary reads sites of one width")
    return SiteSpec(inputs=list(site[0]), outputs=list(site[1]), d_in=widths[0].pop(), d_out=widths[1].pop())


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
