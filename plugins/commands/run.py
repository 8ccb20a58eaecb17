"""``saelab run`` (the delphi-style command), ``saelab explain`` and ``saelab score``.

``python -m saelab MODEL SPARSE_MODEL [options]`` (or ``saelab run MODEL SPARSE_MODEL``) runs
latent cache -> example records -> explanations -> scores into ``results/<name>/`` and prints a summary
table per scorer. The latent cache is built as ``saelab latents`` builds it: from a matching activation
cache when one exists (``run_config.json`` names it under ``activation_cache``), else streamed from the
model's forward pass without writing dense activations (``activation_cache`` is then null for that
hook). Every option of delphi's command is accepted with its name and default (see ``saelab run
--help``). ``saelab explain RUN`` and ``saelab score RUN`` redo one stage over an existing run directory,
taking their defaults from the run's ``run_config.json``. Re-running reuses every result whose input fingerprint matches.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click
from saelab import FailedWorkError, SparseDictionary, UsageError, hookimpl
from saelab.cli import EXIT_CODES_NOTE, MultiValueOption
from saelab.cli_options import (
    EMBEDDED_NOTE,
    argument_or_flag,
    bool_option,
    cache_options,
    dataset_options,
    example_options,
    exclude_positions_option,
    field_option,
    hf_token_option,
    hookpoints_option,
    is_embedded_model,
    model_argument,
    model_options,
    name_option,
    one_line_warnings,
    parse_positions,
    resolve_params,
    seed_option,
    stack_options,
    store_options,
    verbose_option,
)
from saelab.config import (
    config_option,
    explicit_params,
    file_values,
    read_run_config,
    recorded_invocation,
    write_run_config,
)
from saelab.examples import ExampleOptions, feature_num_values
from saelab.models import source_options
from saelab.options import parse_option_value

DEFAULT_SPARSE_MODEL = "EleutherAI/sae-llama-3-8b-32x"
"""CLI.md default of ``--sparse_model``."""
DEFAULT_EXPLAINER_MODEL = "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4"
"""CLI.md default of ``--explainer_model``."""
EMBEDDED_EXPLAINER_MODEL = "smollm2"
"""Explainer model of the embedded run (offline SmolLM2 through the transformers provider)."""
RUN_OVERWRITE = ("cache", "neighbours", "explanations", "scores")

RUN_NOTE = (
    EMBEDDED_NOTE + " With an embedded MODEL the explainer is also the embedded SmolLM2 (--explainer_provider "
    "offline, --explainer_model smollm2) unless --explainer_model is given. The delphi defaults "
    "(Llama-3-8B, a 70B explainer, 10M tokens) need a GPU and a network. SPARSE_MODEL is a saelab, SAELens or "
    "sparsify dictionary directory, a directory of them named by hookpoint, or a run directory "
    "(results/<name>). Latents are computed from the model's forward pass (no dense activation cache is "
    "written) unless an activation cache of the same model, data and sites exists in --store. "
    "Re-running the same command reuses every result whose inputs match; a killed run "
    "finishes only what is missing. --dry_run builds caches and records but makes no LLM call: it prints "
    "the calls, estimated prompt tokens and cost. " + EXIT_CODES_NOTE
)


def _default_proc() -> int:
    return max(1, (os.cpu_count() or 2) // 2)


def _default_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def provider_options() -> Any:
    """``--explainer_model``, ``--explainer_provider``, base URL, concurrency, key and cache options."""
    return stack_options(
        click.option("--explainer_model", default=DEFAULT_EXPLAINER_MODEL, show_default=True,
                     help="LLM that explains and scores. Default with an embedded MODEL: smollm2 (offline)."),
        click.option("--explainer_model_max_len", type=click.IntRange(min=16), default=5120, show_default=True,
                     help="Context length of the explainer model: train examples are dropped from the explainer "
                          "prompt until prompt + answer fit."),
        click.option("--explainer_provider", default="offline", show_default=True,
                     help="offline (local transformers), openrouter, vllm (OpenAI-compatible server), openai, "
                          "litellm, or any provider plugin."),
        click.option("--explainer_api_base_url", default=None,
                     help="Base URL of an API provider, e.g. http://localhost:8002/v1."),
        click.option("--max_concurrency", type=click.IntRange(min=1), default=None,
                     help="LLM requests in flight at once (the throughput knob) [default: the provider's, 8 for APIs]."),
        click.option("--latent_concurrency", type=click.IntRange(min=1), default=None,
                     help="Latents processed at once [default: twice --max_concurrency]."),
        click.option("--api_key_env", default=None,
                     help="Environment variable holding the API key [default: OPENAI_API_KEY; OPENROUTER_API_KEY "
                          "for openrouter]. Keys are never written or logged."),
        bool_option("--response_cache", default=True,
              help="Cache LLM answers in results/<name>/llm_cache (a re-run with --overwrite scores asks nothing)."),
        click.option("--provider_option", "provider_option", nargs=2, multiple=True, metavar="KEY VALUE",
                     help="Provider option, repeatable (e.g. --provider_option timeout_s 30)."),
    )


def explainer_options() -> Any:
    """``--explainer``, ``--explainer_option``, ``--prompt_override``, ``--prompt_config_file``."""
    return stack_options(
        click.option("--explainer", default="default", show_default=True,
                     help="Explanation strategy (explainer plugin): default, contrastive, single-token, np_max_act. "
                          "With --non_activating_source FAISS the default becomes contrastive."),
        click.option("--explainer_option", "explainer_option", nargs=2, multiple=True, metavar="KEY VALUE",
                     help="Explainer option, repeatable (e.g. --explainer_option show_activations true)."),
        bool_option("--prompt_override", default=False, help="Use prompts from a YAML file (see --prompt_config_file)."),
        click.option("--prompt_config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="YAML prompt overrides; else $PROMPT_CONFIG_FILE, else prompts.yaml in the working dir."),
    )


def scorer_options() -> Any:
    """``--scorers``, ``--num_examples_per_scorer_prompt``, ``--log_probs``, ``--scorer_option``."""
    return stack_options(
        click.option("--scorers", cls=MultiValueOption, default=("fuzz", "detection"), show_default=True,
                     metavar="NAME ...", help="Scorer plugins: detection (old name: recall), fuzz, simulation, "
                                              "surprisal, embedding, intruder."),
        click.option("--num_examples_per_scorer_prompt", type=click.IntRange(min=1), default=5, show_default=True,
                     help="Examples per scorer prompt."),
        bool_option("--log_probs", default=False, help="Request log probabilities (AUC from P(1)/(P(0)+P(1)))."),
        click.option("--scorer_option", "scorer_option", nargs=2, multiple=True, metavar="SCORER.KEY VALUE",
                     help="Option of one scorer, repeatable (e.g. --scorer_option surprisal.model smollm2)."),
    )


def common_stage_options() -> Any:
    """Latent selection, overwrite, dry run, CPU workers."""
    return stack_options(
        field_option(ExampleOptions, "max_latents", type=click.IntRange(min=1)),
        field_option(ExampleOptions, "feature_num", cls=MultiValueOption, type=str, metavar="I ..."),
        click.option("--overwrite", cls=MultiValueOption, type=click.Choice(list(RUN_OVERWRITE)),
                     metavar=" ".join(RUN_OVERWRITE),
                     help="Recompute these stages instead of reusing them (explanations implies scores)."),
        click.option("--dry_run", "--dry-run", "dry_run", is_flag=True, default=False,
                     help="Print the LLM calls, estimated prompt tokens and cost; make no LLM call."),
        click.option("--pipeline_num_proc", type=click.IntRange(min=1), default=_default_proc(),
                     show_default="cpu_count()//2", help="CPU workers for data processing and local scorers."),
        click.option("--strict", is_flag=True, default=False,
                     help="Exit with code 3 also when answers could not be parsed or copied the few-shot examples "
                          "(counted on stderr either way)."),
    )


# --------------------------------------------------------------------------------------------------
# Commands


@hookimpl
def register_commands(cli: click.Group) -> None:
    """Add ``saelab run``, ``saelab explain`` and ``saelab score``."""

    @cli.command("run", epilog=RUN_NOTE)
    @model_argument()
    @click.argument("sparse_model", required=False, default=None, metavar="[SPARSE_MODEL]")
    @click.option("--sparse_model", "sparse_model_flag", default=None, metavar="PATH",
                  help=f"Dictionary path (same as SPARSE_MODEL). Default: {DEFAULT_SPARSE_MODEL}.")
    @hookpoints_option()
    @common_stage_options()
    @field_option(ExampleOptions, "diffing_class", type=click.Choice(["a_only", "b_only", "shared", "other"]))
    @provider_options()
    @explainer_options()
    @scorer_options()
    @dataset_options()
    @cache_options()
    @example_options()
    @exclude_positions_option()
    @name_option()
    @store_options()
    @model_options()
    @click.option("--num_gpus", type=click.IntRange(min=0), default=_default_gpus(),
                  show_default="torch.cuda.device_count()", help="GPUs for model inference (0: CPU).")
    @hf_token_option()
    @seed_option()
    @verbose_option()
    @bool_option("--enable_visualization", default=False, help="Write the HTML report (results/<name>/report/).")
    @config_option()
    @click.pass_context
    def run(ctx: click.Context, **params: Any) -> None:
        """Delphi-style run: cache, latents, explain, score.

        Writes results/<name>/; also `saelab MODEL SPARSE_MODEL [options]`."""
        explicit = explicit_params(ctx)
        values = resolve_params(ctx, params)
        values = finish_run_values(values, explicit | _explicit_model(values, params))
        with one_line_warnings():
            run_command(values)

    @cli.command("explain")
    @click.argument("run_name", required=False, default=None, metavar="[RUN]")
    @name_option(required=False)
    @hookpoints_option()
    @common_stage_options()
    @provider_options()
    @explainer_options()
    @verbose_option()
    @click.pass_context
    def explain(ctx: click.Context, **params: Any) -> None:
        """Explain the latent records of an existing run.

        RUN is a name under results/ or a run directory."""
        values = stage_values(ctx, params)
        with one_line_warnings():
            stage_command(values, explain=True, score=False)

    @cli.command("score")
    @click.argument("run_name", required=False, default=None, metavar="[RUN]")
    @name_option(required=False)
    @hookpoints_option()
    @common_stage_options()
    @provider_options()
    @scorer_options()
    @bool_option("--prompt_override", default=False, help="Use prompts from a YAML file (see --prompt_config_file).")
    @click.option("--prompt_config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="YAML prompt overrides; else $PROMPT_CONFIG_FILE, else prompts.yaml in the working dir.")
    @verbose_option()
    @click.pass_context
    def score(ctx: click.Context, **params: Any) -> None:
        """Score the stored explanations of an existing run."""
        values = stage_values(ctx, params)
        with one_line_warnings():
            stage_command(values, explain=False, score=True)


def _explicit_model(values: Mapping[str, Any], params: Mapping[str, Any]) -> set[str]:
    return {"sparse_model"} if (params.get("sparse_model") or params.get("sparse_model_flag")) else set()


# --------------------------------------------------------------------------------------------------
# Value resolution


def _pairs(pairs: Sequence[Sequence[str]] | None) -> dict[str, Any]:
    return {str(k): parse_option_value(str(v)) for k, v in (pairs or ())}


def _scorer_pairs(pairs: Sequence[Sequence[str]] | None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, value in pairs or ():
        scorer, dot, option = str(key).partition(".")
        if not dot or not scorer or not option:
            raise UsageError(f"bad --scorer_option key {key!r}; accepted: SCORER.KEY, e.g. detection.max_tokens")
        out.setdefault(scorer, {})[option] = parse_option_value(str(value))
    return out


def finish_run_values(values: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    """Apply the run command's own rules to resolved values: SPARSE_MODEL from the argument or the
    flag, the embedded explainer default, list-valued options as lists, device from ``--num_gpus``."""
    flag, positional = values.pop("sparse_model_flag", None), values.get("sparse_model")
    values["sparse_model"] = argument_or_flag(positional, flag, what="dictionaries", argument="SPARSE_MODEL",
                                              option="--sparse_model") or DEFAULT_SPARSE_MODEL
    if is_embedded_model(values.get("model")) and "explainer_model" not in explicit:
        values["explainer_model"] = EMBEDDED_EXPLAINER_MODEL
    for key in ("scorers", "feature_num", "hookpoints", "overwrite"):
        if values.get(key) is not None:
            values[key] = list(values[key])
    values["feature_num"] = feature_num_values(values.get("feature_num"))
    values["exclude_positions"] = parse_positions(values.get("exclude_positions"))
    if not values.get("scorers"):
        values["scorers"] = []
    values["explainer_option"] = _pairs(values.get("explainer_option"))
    values["scorer_option"] = _scorer_pairs(values.get("scorer_option"))
    values["provider_option"] = _pairs(values.get("provider_option"))
    if (values.get("non_activating_source") or "").lower() == "faiss" and "explainer" not in explicit:
        values["explainer"] = "contrastive"
    values["device"] = resolve_device(values.get("device") or "auto", int(values.get("num_gpus") or 0))
    if values.get("load_in_8bit") and not values["device"].startswith("cuda"):
        raise UsageError(f"--load_in_8bit needs a CUDA GPU, but the model would run on {values['device']!r} "
                         f"(--num_gpus {values.get('num_gpus')}); drop --load_in_8bit or run on a GPU machine")
    return values


def resolve_device(device: str, num_gpus: int) -> str:
    """The LM device: ``--device`` when given, else ``cuda`` with ``--num_gpus`` > 0, else ``cpu``."""
    import torch

    available = torch.cuda.device_count()
    if num_gpus > available:
        raise UsageError(f"--num_gpus {num_gpus} but this machine has {available} CUDA GPU(s); "
                         f"accepted: 0..{available}")
    if device != "auto":
        return device
    return "cuda" if num_gpus > 0 else "cpu"


STAGE_DEFAULT_KEYS = (
    "explainer_model", "explainer_model_max_len", "explainer_provider", "explainer_api_base_url", "max_concurrency",
    "latent_concurrency", "api_key_env", "response_cache", "provider_option", "explainer", "explainer_option",
    "prompt_override", "prompt_config_file", "scorers", "num_examples_per_scorer_prompt", "log_probs",
    "scorer_option", "pipeline_num_proc", "seed",
)
"""Options ``explain`` / ``score`` take from the run's ``run_config.json`` unless given explicitly."""


def stage_values(ctx: click.Context, params: Mapping[str, Any]) -> dict[str, Any]:
    """Resolved values of ``explain`` / ``score``: defaults < the run's config < explicit flags."""
    from saelab.layout import RunLayout, results_dir

    values = dict(params)
    explicit = explicit_params(ctx)
    name, run_name = values.pop("name", None), values.pop("run_name", None)
    if name and run_name and name != run_name:
        raise UsageError(f"two runs given: RUN {run_name!r} and --name {name!r}; give one")
    target = run_name or name
    if not target:
        raise UsageError("missing RUN; give a run name (results/<name>) or a run directory, e.g. `saelab "
                         f"{ctx.command.name} demo`")
    given = RunLayout(Path(target))
    directory = given.root if given.run_config.is_file() or given.records_root.is_dir() else results_dir() / target
    if not directory.is_dir():
        raise UsageError(f"run {target!r} not found (looked for {str(directory)!r}); run `saelab run ... --name "
                         f"{target}` first")
    values["run_dir"] = directory
    stored = read_run_config(directory)
    previous: dict[str, Any] = {}
    for command in ("run", "explain", "score"):
        section = ((stored.get("commands") or {}).get(command) or {}).get("config") or {}
        previous.update({k: v for k, v in section.items() if v != "<redacted>"})
    for key in STAGE_DEFAULT_KEYS:
        if key in values and key not in explicit and key in previous:
            values[key] = previous[key]
    values["model"] = previous.get("model")
    for key in ("scorers", "feature_num", "hookpoints", "overwrite"):
        if values.get(key) is not None:
            values[key] = list(values[key])
    values["feature_num"] = feature_num_values(values.get("feature_num"))
    for key, parse in (("explainer_option", _pairs), ("provider_option", _pairs), ("scorer_option", _scorer_pairs)):
        raw = values.get(key)
        values[key] = dict(raw) if isinstance(raw, Mapping) else parse(raw)
    if is_embedded_model(values.get("model")) and "explainer_model" not in explicit and \
            "explainer_model" not in previous:
        values["explainer_model"] = EMBEDDED_EXPLAINER_MODEL
    values["device"] = previous.get("device", "auto")
    return values


# --------------------------------------------------------------------------------------------------
# Execution


def build_stage_plugins(values: Mapping[str, Any], layout: Any, *, explain: bool, score: bool) -> tuple[Any, list, Any]:
    """(explainer or None, scorers, provider or None) from resolved values."""
    from saelab.pipeline import make_explainer, make_run_provider, make_scorers
    from saelab.prompts import load_prompts

    prompts = load_prompts(values.get("prompt_config_file"), enabled=bool(values.get("prompt_override")))
    explainer = None
    if explain:
        explainer = make_explainer(values.get("explainer") or "default", values.get("explainer_option"), prompts)
    scorers: list[Any] = []
    if score:
        shared = {"num_examples_per_scorer_prompt": values.get("num_examples_per_scorer_prompt", 5),
                  "seed": values.get("seed", 22), "log_probs": bool(values.get("log_probs"))}
        scorers = make_scorers(values.get("scorers") or [], shared, values.get("scorer_option"), prompts)
    provider = None
    if explainer is not None or any(s.uses_provider for s in scorers):
        device = values.get("device")
        provider = make_run_provider(
            values.get("explainer_provider") or "offline", model=values.get("explainer_model"),
            base_url=values.get("explainer_api_base_url"), max_concurrency=values.get("max_concurrency"),
            api_key_env=values.get("api_key_env"), cache=bool(values.get("response_cache", True)),
            cache_dir=layout.llm_cache, device=None if device in (None, "auto") else device,
            extra=values.get("provider_option"), given=_given_provider_options())
    return explainer, scorers, provider


PROVIDER_FLAGS = {"explainer_model": "model", "explainer_api_base_url": "base_url",
                  "max_concurrency": "max_concurrency", "api_key_env": "api_key_env", "response_cache": "cache"}
"""Run flags that set a provider option: one the user gives must be an option the provider accepts."""


def _given_provider_options() -> set[str]:
    """Provider options set by flags the user gave to the running command (command line, environment or
    ``--config`` file); empty outside a command."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return set()
    explicit = explicit_params(ctx)
    if ctx.params.get("config"):
        explicit |= set(file_values(ctx.params["config"], command=ctx.command.name))
    return {option for flag, option in PROVIDER_FLAGS.items() if flag in explicit}


def _select(records: list[Any], feature_num: Sequence[int] | None, max_latents: int | None) -> list[Any]:
    if feature_num:
        by_latent = {r.latent: r for r in records}
        records = [by_latent[i] for i in feature_num if i in by_latent]
    return records[:max_latents] if max_latents else records


def interp_stage(values: Mapping[str, Any], layout: Any, record_sets: Sequence[Any], *, explain: bool,
                 score: bool, command: str) -> dict[str, Any]:
    """Explain and/or score ``record_sets`` (or plan it with ``dry_run``); prints and writes the summary."""
    from saelab.pipeline import AutoInterp, outcome, print_plan, print_summary, summarize, write_summary

    explainer, scorers, provider = build_stage_plugins(values, layout, explain=explain, score=score)
    engine = AutoInterp(layout, explainer, scorers, provider, overwrite=values.get("overwrite") or (),
                        latent_concurrency=values.get("latent_concurrency"),
                        explainer_max_len=values.get("explainer_model_max_len"),
                        cpu_workers=values.get("pipeline_num_proc"), progress=bool(values.get("verbose", True)))
    records = [r for rs in record_sets for r in rs.records]
    if values.get("dry_run"):
        plan = engine.plan(records)
        print_plan(plan)
        return {"dry_run": plan.to_dict()}
    report = engine.run(records)
    selection = {rs.hookpoint: [r.latent for r in rs.records] for rs in record_sets}
    result = outcome(report, analysed=len(records), missing_requested=_missing_requested(values, record_sets),
                     no_latents_reason=_no_latents_reason(record_sets))
    skipped = {rs.hookpoint: rs.skipped for rs in record_sets}
    all_scorers = [s.name for s in scorers] if score else []
    if not score:  # keep the run's scorers in the summary when only explaining
        from saelab.pipeline import scorer_names

        all_scorers = scorer_names(values.get("scorers") or []) if values.get("scorers") else []
    summary = summarize(layout, selection, all_scorers, skipped, report)
    summary["command"] = command
    summary["outcome"] = {"problems": result.problems, "notes": result.notes}
    write_summary(layout, summary)
    if values.get("verbose", True):
        print_summary(summary)
        from saelab.progress import stdout_console

        usage = report.usage
        stdout_console.print(
            f"this {command}: {usage.get('calls', 0)} LLM requests, {usage.get('cached_calls', 0)} answered from "
            f"the response cache; results in {layout.root}")
        for line in report.errors:
            stdout_console.print(f"[red]error[/red] {line}")
    return summary


def _missing_requested(values: Mapping[str, Any], record_sets: Sequence[Any]) -> dict[int, str]:
    """Latents named by ``--feature_num`` that have no record, with why."""
    missing: dict[int, str] = {}
    cap = values.get("max_latents")
    for rs in record_sets:
        have = {int(r.latent) for r in rs.records}
        for latent in values.get("feature_num") or ():
            if int(latent) in have:
                continue
            if int(latent) in rs.skipped:
                missing[int(latent)] = rs.skipped[int(latent)]
            elif cap and len(rs.records) >= cap:
                missing[int(latent)] = f"--max_latents {cap} was reached first (raise it to analyse them)"
            else:
                missing[int(latent)] = f"no latent record at {rs.hookpoint}"
    return missing


def _no_latents_reason(record_sets: Sequence[Any]) -> str:
    """Why no latent was analysed, for the one-line failure summary."""
    skipped = {reason for rs in record_sets for reason in rs.skipped.values()}
    n_skipped = sum(len(rs.skipped) for rs in record_sets)
    if n_skipped:
        return (f"all {n_skipped} latents considered were skipped ({'; '.join(sorted(skipped))}); read more tokens "
                "(--n_tokens, a larger dataset or --dataset_split) or lower --min_examples")
    return "no latent records (no latent fired in the tokens read: check --n_tokens, --dataset_repo, --dataset_split)"


def finish_stage(summary: Mapping[str, Any], *, strict: bool) -> None:
    """Print what failed as one line on stderr (whatever ``--verbose`` says) and raise
    :class:`saelab.FailedWorkError` (exit code 3) when the invocation failed (see :class:`saelab.pipeline.Outcome`)."""
    from saelab.pipeline import Outcome

    found = summary.get("outcome")
    if not found:
        return
    result = Outcome(problems=list(found.get("problems") or ()), notes=list(found.get("notes") or ()))
    if result.failed(strict):
        raise FailedWorkError(result.line)
    if result.line:
        click.echo(f"Warning: {result.line} (exit code 3 only with --strict)", err=True)


def stage_command(values: dict[str, Any], *, explain: bool, score: bool) -> dict[str, Any]:
    """``saelab explain`` / ``saelab score`` over an existing run directory."""
    command = "explain" if explain else "score"
    with recorded_invocation(Path(values["run_dir"]), command):
        summary = _stage(values, explain=explain, score=score, command=command)
        finish_stage(summary, strict=bool(values.get("strict")))
        return summary


def _stage(values: dict[str, Any], *, explain: bool, score: bool, command: str) -> dict[str, Any]:
    from saelab.layout import RunLayout
    from saelab.pipeline import load_records

    layout = RunLayout(Path(values["run_dir"]))
    hooks = values.get("hookpoints") or layout.hookpoints_with_records()
    if not hooks:
        raise UsageError(f"no latent records in {str(layout.root)!r}; build them with `saelab run MODEL SPARSE_MODEL "
                         f"--name {layout.root.name}` first")
    record_sets = [load_records(layout, hook) for hook in hooks]
    if any(isinstance(v, str) for v in values.get("feature_num") or ()):
        _resolve_feature_num(values, {rs.hookpoint: _latent_shape(layout, rs.hookpoint) for rs in record_sets})
    for rs in record_sets:
        rs.records = _select(rs.records, values.get("feature_num"), values.get("max_latents"))
    if not values.get("dry_run"):
        write_run_config(layout.root, command=command, config={k: v for k, v in values.items() if k != "run_dir"})
    return interp_stage(values, layout, record_sets, explain=explain, score=score, command=command)


def run_command(values: dict[str, Any]) -> dict[str, Any]:
    """The whole delphi-style run with resolved ``values``: nothing is written until the model, the
    hookpoints and the dictionaries are validated and loaded."""
    from saelab.layout import RunLayout

    root = RunLayout.named(values["name"]).root
    with recorded_invocation(root, "run"):
        return _run(values, root)


def _run(values: dict[str, Any], root: Path) -> dict[str, Any]:
    from saelab.dictionary import load_dictionary
    from saelab.latents import latent_caches_for_run, latent_layers
    from saelab.layout import RunLayout
    from saelab.models import load_activation_source
    from saelab.paired import pair_for_dictionaries
    from saelab.pipeline import (
        canonical_hookpoint,
        example_options,
        find_dictionaries,
        record_set,
        sparse_model_path,
    )

    layout = RunLayout(root)
    sparse_model_path(values["sparse_model"])
    build_stage_plugins(values, layout, explain=True, score=True)  # bad plugin names and options fail early
    source = load_activation_source(values["model"], **{**source_options(values), "device": values["device"]})
    requested = [canonical_hookpoint(h) for h in values.get("hookpoints") or ()]
    if requested:
        source.check_hookpoints(requested)
    loaded: dict[Path, SparseDictionary] = {}
    found = find_dictionaries(values["sparse_model"], values.get("hookpoints") or (), loaded=loaded)
    dictionaries = {hook: loaded[path].to(values["device"]) if path in loaded
                    else load_dictionary(path, device=values["device"]) for hook, path in found.items()}
    source = pair_for_dictionaries(source, dictionaries.values(), lambda model: load_activation_source(
        model, **{**source_options(values), "device": values["device"]}))  # a two-model crosscoder's model B
    for hook, dictionary in dictionaries.items():
        _place_dictionary(source, hook, dictionary, values["sparse_model"])
    _resolve_feature_num(values, {hook: (d.d_sae, latent_layers(d)) for hook, d in dictionaries.items()})
    if values.get("diffing_class"):
        values["feature_num"] = _class_latents(values, dictionaries)
    paths = {hook: str(path) for hook, path in found.items()}
    overwrite = set(values.get("overwrite") or ())
    contrastive = (values.get("explainer") or "").lower() == "contrastive"
    record_sets: list[Any] = []
    caches: dict[str, str | None] = {}
    # the same path as `saelab latents`: a matching activation cache is read, else the latents of every
    # dictionary are computed from one forward pass of the model and no dense activation is written
    latent_caches = latent_caches_for_run(values, source, dictionaries, layout.root)
    for hook, dictionary in dictionaries.items():
        latent_cache = latent_caches[hook]
        caches[hook] = latent_cache.activation_cache_path
        record_sets.append(record_set(layout, latent_cache, example_options(values, contrastive),
                                      tokenizer=source.tokenizer, dictionary=dictionary,
                                      rebuild="cache" in overwrite))
    # only now are the model, dictionaries and dataset loaded and validated: a run rejected earlier leaves
    # the run_config.json of the results beside it as it was
    layout.root.mkdir(parents=True, exist_ok=True)
    write_run_config(layout.root, command="run", config=values,
                     extra={"dictionaries": paths, "activation_cache": caches})
    summary = interp_stage(values, layout, record_sets, explain=True, score=True, command="run")
    if values.get("enable_visualization") and not values.get("dry_run"):
        write_visualization(layout.root, bool(values.get("verbose", True)))
    finish_stage(summary, strict=bool(values.get("strict")))
    return summary


def _place_dictionary(source: Any, hook: str, dictionary: Any, sparse_model: str) -> None:
    """Check that ``dictionary`` reads sites ``source`` has, with their widths; a dictionary whose format
    records no hookpoint is placed at ``hook`` (from ``--hookpoints``), with a note on stderr."""
    from saelab.pipeline import dictionary_sites_text, records_hookpoint, sites_at

    if not records_hookpoint(dictionary.sites):
        dictionary.sites = sites_at(hook, dictionary.sites)
        click.echo(f"note: {sparse_model} records no hookpoint; --hookpoints sets it: the dictionary "
                   f"{dictionary_sites_text(dictionary.sites)}", err=True)
    model = source.model_id or "the model"
    source.check_hookpoints([*dictionary.sites.inputs, *dictionary.sites.outputs])
    for site, width in ((s, dictionary.sites.d_in) for s in dictionary.sites.inputs):
        have = source.hookpoint_dim(site)
        if have != width:
            raise UsageError(f"dictionary {hook!r} reads {width}-wide activations at {site} but {model} has "
                             f"width {have} there; give a dictionary trained on {model}")


def _class_latents(values: dict[str, Any], dictionaries: Mapping[str, SparseDictionary]) -> list[int]:
    """``--diffing_class``: the latents of that class of the one dictionary (among ``--feature_num`` when
    given), at most ``--max_latents``; one-line errors for several dictionaries or an empty class."""
    from saelab.diffing import class_latents

    wanted = values["diffing_class"]
    if len(dictionaries) != 1:
        raise UsageError(f"--diffing_class {wanted} selects the latents of one dictionary; {len(dictionaries)} were "
                         f"given ({', '.join(dictionaries)}): pick one with --hookpoints")
    ((hook, dictionary),) = dictionaries.items()
    latents = class_latents(dictionary, wanted, values.get("feature_num") or None)
    if not latents:
        raise UsageError(f"--diffing_class {wanted}: no latent of {hook!r} is in that class")
    return latents[:values["max_latents"]] if values.get("max_latents") else latents


def _resolve_feature_num(values: dict[str, Any], shapes: Mapping[str, tuple[int, tuple[int, int] | None]]) -> None:
    """Replace ``values["feature_num"]`` (indices and ``LAYER:INDEX``) by latent indices, checked against every
    dictionary's ``(d_sae, (L, F) or None)``; one-line error when they name different latents in two of them."""
    from saelab.examples import resolve_feature_num

    given = values.get("feature_num")
    if not given:
        return
    resolved = {hook: resolve_feature_num(given, d_sae, layers, f" for {hook!r}")
                for hook, (d_sae, layers) in shapes.items()}
    distinct = {tuple(v or ()) for v in resolved.values()}
    if len(distinct) > 1:
        raise UsageError(f"--feature_num {' '.join(map(str, given))} names different latents in {', '.join(resolved)} "
                         f"(their layers have different widths); select one dictionary with --hookpoints")
    if distinct:
        values["feature_num"] = list(distinct.pop())


def _latent_shape(layout: Any, hook: str) -> tuple[int, tuple[int, int] | None]:
    """``(d_sae, (L, F) or None)`` of a run's dictionary at ``hook``, from its latent cache's manifest."""
    from saelab.latents import LatentCache

    cache = LatentCache.open(layout.latents_dir(hook))
    return cache.d_sae, cache.layers


def write_visualization(directory: Path, verbose: bool = True) -> Path | None:
    """Write the run's HTML report through the registered ``report`` command (``saelab report DIR``); when
    that plugin is disabled (``-p no:report``) or not installed, say so and write nothing."""
    from saelab.progress import stdout_console

    ctx = click.get_current_context(silent=True)
    group = ctx.find_root().command if ctx is not None else None
    command = group.get_command(ctx, "report") if isinstance(group, click.Group) and ctx is not None else None
    if ctx is None or command is None:
        stdout_console.print("--enable_visualization: the report plugin (report) is disabled or not installed; "
                             "no report written")
        return None
    quiet = {"quiet": True} if any(p.name == "quiet" for p in command.params) else {}
    path = ctx.invoke(command, run=str(directory), **quiet)
    if verbose:
        stdout_console.print(f"report: {path}")
    return Path(path) if path is not None else None
