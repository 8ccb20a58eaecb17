"""``saelab evaluate`` (reconstruction, sparsity and spliced-LM metrics on held-out tokens) and
``saelab convert`` (between dictionary formats: saelab, SAELens, sparsify, circuit-tracer)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import click
from pydantic import Field
from saelab import UsageError, hookimpl
from saelab.cli import MultiValueOption
from saelab.cli_options import field_option
from saelab.dictionary import detect_format, dictionary_formats, load_dictionary
from saelab.errors import format_choices
from saelab.evaluation import (
    DIFFING_FILE,
    DIFFING_LATENTS,
    EvalConfig,
    evaluate,
    heldout_windows,
    layers_table,
    results_table,
    sites_table,
    skip_tokens_for,
    training_data,
    write_eval,
)
from saelab.formats import find_dictionaries

DEFAULT_DATASET = "wikipedia-sample"
"""Dataset used when none is recorded for the dictionary and none is given."""
DEFAULT_CTX_LEN = 256
"""Tokens per window when neither ``--ctx_len`` nor the training cache's is known."""


class EvaluateCommandOptions(EvalConfig):
    """Every option of ``saelab evaluate`` that is not a pure CLI concern: the evaluation's own
    (:class:`saelab.evaluation.EvalConfig`) and which LM and data to evaluate on (by default those recorded
    at training). The flags are generated from these fields (``--no_downstream`` sets ``downstream``)."""

    model: str | None = None
    """LM to splice into [default: the one recorded at training]."""
    dataset_repo: str | None = Field(
        default=None, description=f"Dataset [default: the training dataset, else {DEFAULT_DATASET}].")
    dataset_split: str | None = None
    """Split expression [default: the training split, else train]."""
    dataset_name: str | None = None
    """Dataset configuration name [default: the training one]."""
    dataset_column: str | None = None
    """Text column [default: the training column, else text]."""


def _dictionary_name(path: Path, root: Path) -> str:
    return path.name if path != root else (path.resolve().name or str(path))


def run_evaluation(path: str, *, model: str | None = None, dataset_repo: str | None = None,
                   dataset_split: str | None = None, dataset_name: str | None = None,
                   dataset_column: str | None = None, write: bool = True, progress: bool = True,
                   **options: Any) -> dict[str, dict[str, Any]]:
    """Evaluate every dictionary at ``path`` (a dictionary directory in any format, a sparsify run or a
    saelab run directory); writes ``eval.json`` into each directory (when ``write``) and returns
    ``{name: eval payload}``. ``options`` are :class:`saelab.evaluation.EvalConfig` fields."""
    from saelab.data import load_dataset_source
    from saelab.models import load_activation_source
    from saelab.progress import progress as make_progress

    root = Path(path)
    dirs = find_dictionaries(root)
    config = EvalConfig.parse({k: v for k, v in options.items() if v is not None}, where="evaluate")
    recorded = [training_data(d) for d in dirs]
    models = {r["model"] for r in recorded if r["model"]}
    if model is None:
        if len(models) > 1:
            raise UsageError(f"dictionaries under {str(root)!r} were trained on different models "
                             f"({', '.join(sorted(models))}); evaluate them one at a time or give --model")
        if not models:
            raise UsageError(f"no model is recorded for {str(root)!r}; give --model (an embedded name such as "
                             f"smollm2, a hub id or a local directory)")
        model = next(iter(models))
    paired = {json.dumps(r["models"], sort_keys=True) for r in recorded if r.get("models")}
    if paired and (len(paired) > 1 or any(not r.get("models") for r in recorded)):
        raise UsageError(f"dictionaries under {str(root)!r} were trained on different models or model pairs; "
                         f"evaluate them one at a time")
    first = recorded[0]
    dataset_repo = dataset_repo or first["dataset_repo"] or DEFAULT_DATASET
    same_data = dataset_repo == first["dataset_repo"] and (dataset_split or first["dataset_split"]) == first[
        "dataset_split"]
    split = dataset_split or first["dataset_split"] or "train"
    ctx_len = config.ctx_len or int(first["ctx_len"] or DEFAULT_CTX_LEN)
    if config.skip_tokens is not None:
        skip, held_out, how = config.skip_tokens, config.skip_tokens > 0, "skip_tokens given"
    else:
        trained = skip_tokens_for(first["n_tokens"], first["ctx_len"]) if same_data else None
        if trained is None:
            skip, held_out = 0, not same_data and first["dataset_repo"] is not None
            how = ("different dataset/split than training" if held_out
                   else "training data not recorded: evaluated from the start of the dataset (may overlap training)")
        else:
            skip, held_out, how = trained, True, f"skipped the {trained} stream tokens of the training cache"

    modules = {_dictionary_name(d, root): load_dictionary(d, device=config.device) for d in dirs}
    if paired:
        from saelab.paired import LABELS, PairedSource

        models = {**first["models"], LABELS[0]: model}
        source = PairedSource({label: load_activation_source(m) for label, m in models.items()})
    else:
        source = load_activation_source(model)
    for m in modules.values():
        source.check_hookpoints(list(dict.fromkeys([*m.sites.inputs, *m.sites.outputs])))
    dataset = load_dataset_source(dataset_repo, split=split, name=dataset_name or first["dataset_name"],
                                  column=dataset_column or first["dataset_column"] or "text")
    windows = heldout_windows(source, dataset, ctx_len, config.n_tokens, skip)
    n_windows = -(-config.n_tokens // ctx_len)
    with make_progress(unit="windows") as bar:
        task = bar.add_task("evaluate", total=n_windows) if progress else None

        def advance(done: int) -> None:
            if task is not None:
                bar.update(task, completed=done)

        metrics = evaluate(modules, source, windows, config, progress=advance)
    info = {"model": model, "dataset": {"repo": dataset_repo, "split": split, "name": dataset_name or first["dataset_name"]},
            "ctx_len": ctx_len, "skip_tokens": skip, "held_out": held_out, "held_out_how": how,
            "config": config.model_dump(mode="json")}
    out: dict[str, dict[str, Any]] = {}
    for d, (name, m) in zip(dirs, metrics.items(), strict=True):
        payload = {"dictionary": str(d), "format": detect_format(d), **info}
        if write:
            write_eval(d, m, payload)
        out[name] = {"metrics": {k: v for k, v in m.items() if k != DIFFING_LATENTS}, **payload}
    return out


def convert_dictionaries(src: str, dst: str, to: str, overwrite: bool = False) -> list[Path]:
    """Convert every dictionary at ``src`` to format ``to`` under ``dst`` (one directory, or one
    sub-directory per dictionary when ``src`` holds several); returns the written directories."""
    from saelab.dictionary import save_dictionary
    from saelab.manager import registry

    formats = registry("dictionary_format")
    if to not in formats:
        raise UsageError(f"unknown target format {to!r}; accepted: {format_choices(dictionary_formats())}")
    to = formats.get(to).name
    dirs = find_dictionaries(src)
    dst_path = Path(dst)
    occupied = any(dst_path.iterdir()) if dst_path.is_dir() else dst_path.exists()
    if occupied:
        if not overwrite:
            raise UsageError(f"destination {str(dst_path)!r} exists and is not empty; give --overwrite to replace it")
        if dst_path.is_dir():
            shutil.rmtree(dst_path)
        else:
            dst_path.unlink()
    single = len(dirs) == 1 and dirs[0] == Path(src)
    modules = [(d, load_dictionary(d)) for d in dirs]  # every source loads before anything is written
    written = []
    for d, module in modules:
        target = dst_path if single else dst_path / d.name
        save_dictionary(module, target, format=to)
        written.append(target)
    return written


@hookimpl
def register_commands(cli):
    """Add ``evaluate`` and ``convert``."""

    @cli.command("evaluate", short_help="Evaluate dictionaries: FVU, L0, dead latents, CE loss recovered, KL.")
    @click.argument("path", metavar="RUN_OR_DICT_DIR")
    @field_option(EvaluateCommandOptions, "model")
    @field_option(EvaluateCommandOptions, "dataset_repo")
    @field_option(EvaluateCommandOptions, "dataset_split")
    @field_option(EvaluateCommandOptions, "dataset_name")
    @field_option(EvaluateCommandOptions, "dataset_column")
    @field_option(EvaluateCommandOptions, "n_tokens", type=int)
    @field_option(EvaluateCommandOptions, "ctx_len", type=int)
    @field_option(EvaluateCommandOptions, "batch_size", type=int)
    @field_option(EvaluateCommandOptions, "skip_tokens", type=int)
    @field_option(EvaluateCommandOptions, "exclude_positions", cls=MultiValueOption, type=int)
    @field_option(EvaluateCommandOptions, "exclude_bos", "--exclude_bos/--keep_bos")
    @field_option(EvaluateCommandOptions, "splice_excluded", switch=True)
    @field_option(EvaluateCommandOptions, "dense_threshold", type=float)
    @click.option("--no_downstream", is_flag=True, help="Skip the CE/KL metrics (no spliced forward passes).")
    @field_option(EvaluateCommandOptions, "device")
    @click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
    def evaluate_cmd(path: str, model: str | None, dataset_repo: str | None, dataset_split: str | None,
                     dataset_name: str | None, dataset_column: str | None, n_tokens: int,
                     ctx_len: int | None, batch_size: int, skip_tokens: int | None,
                     exclude_positions: tuple[int, ...] | None, exclude_bos: bool | None,
                     splice_excluded: bool, dense_threshold: float, no_downstream: bool, device: str,
                     as_json: bool) -> None:
        """Evaluate dictionaries: FVU, L0, dead/dense latents, CE loss recovered, KL; writes eval.json."""
        from saelab.progress import stdout_console

        excluded = None
        if exclude_positions:
            excluded = tuple(p for p in exclude_positions if p >= 0)
        results = run_evaluation(
            path, model=model, dataset_repo=dataset_repo, dataset_split=dataset_split, dataset_name=dataset_name,
            dataset_column=dataset_column, n_tokens=n_tokens, ctx_len=ctx_len, batch_size=batch_size,
            skip_tokens=skip_tokens, exclude_positions=excluded, exclude_bos=exclude_bos,
            splice_excluded=splice_excluded, dense_threshold=dense_threshold,
            downstream=False if no_downstream else None, device=device, progress=not as_json)
        if as_json:
            click.echo(json.dumps(results, indent=2, default=str))
            return
        stdout_console.print(results_table({k: v["metrics"] for k, v in results.items()}))
        for name, v in results.items():
            for table in (layers_table(name, v["metrics"]), sites_table(name, v["metrics"])):
                if table is not None:
                    stdout_console.print(table)
            diffing = v["metrics"].get("diffing")
            if diffing:
                counts = ", ".join(f"{k} {n}" for k, n in diffing["counts"].items())
                stdout_console.print(
                    f"{name}: diffing (A = {' '.join(diffing['a_sites'])}, B = {' '.join(diffing['b_sites'])}) of the "
                    f"{diffing['latents_fired']} latents that fired: {counts}; {diffing['artifacts']} flagged by "
                    f"latent scaling; per latent in {DIFFING_FILE}", markup=False)
        first = next(iter(results.values()))
        stdout_console.print(f"model {first['model']}, dataset {first['dataset']['repo']} "
                             f"({first['dataset']['split']}), held out: {first['held_out']} ({first['held_out_how']})")
        for v in results.values():
            stdout_console.print(f"wrote {Path(v['dictionary']) / 'eval.json'}")

    @cli.command("convert", short_help="Convert dictionaries between formats (saelab, SAELens, sparsify, circuit-tracer).")
    @click.argument("src", metavar="SRC")
    @click.argument("dst", metavar="DST")
    @click.option("--to", "to", required=True, metavar="FORMAT",
                  help="Target format: saelab, saelens, sparsify or circuit_tracer (any registered dictionary format).")
    @click.option("--overwrite", is_flag=True, help="Replace DST when it exists.")
    def convert_cmd(src: str, dst: str, to: str, overwrite: bool) -> None:
        """Convert a dictionary (or a directory of them) between formats: saelab, SAELens, sparsify, circuit-tracer."""
        for path in convert_dictionaries(src, dst, to, overwrite=overwrite):
            click.echo(f"wrote {path} ({to})")
