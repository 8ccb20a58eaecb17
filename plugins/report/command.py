"""``saelab report RUN``: the static HTML report of a run (``results/<name>/report/index.html``).

``saelab run --enable_visualization`` invokes this command through the CLI (with ``--quiet``), so
disabling this plugin (``-p no:report``) disables the run's report too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from saelab import UsageError, hookimpl


def resolve_run_dir(run: str) -> Path:
    """A run directory from RUN: an existing directory, else ``results/<RUN>``."""
    from saelab.layout import RunLayout, results_dir

    path = Path(run).expanduser()
    if path.is_dir() and RunLayout(path).looks_like_run():
        return path
    candidate = results_dir() / run
    if "/" not in run and candidate.is_dir():
        return candidate
    raise UsageError(f"run {run!r} not found (looked for the directory {str(path)!r} and {str(candidate)!r}); "
                     f"give a run name under results/ or a run directory")


@hookimpl
def register_commands(cli: click.Group) -> None:
    """Register ``saelab report``."""

    @cli.command("report", short_help="Write the static HTML report of a run.")
    @click.argument("run")
    @click.option("--out", "out", type=click.Path(file_okay=False), default=None,
                  help="Directory to write the site to [default: RUN/report].")
    @click.option("--max_latents", type=click.IntRange(min=1), default=None,
                  help="Pages for at most this many latents per hookpoint (the first ones) [default: all].")
    @click.option("--quiet", is_flag=True, default=False, hidden=True,
                  help="Print nothing (for `saelab run --enable_visualization`, which prints the path).")
    def report(run: str, out: str | None, max_latents: int | None, quiet: bool) -> Path:
        """Write the static HTML report of RUN (a name under results/ or a run directory): run config,
        evaluation table, score and frequency histograms, a sortable latent table and one page per latent.
        Opens from disk (file://) with no server and no network."""
        from saelab.plugins.report.html import report_summary, write_run_report
        from saelab.plugins.report.run_data import load_run
        from saelab.progress import stdout_console, summary_table

        data = load_run(resolve_run_dir(run), max_latents=max_latents)
        index = write_run_report(data, out)
        if not quiet:
            rows: list[tuple[str, Any]] = report_summary(data)
            stdout_console.print(summary_table(f"saelab report: {data.root.name}", rows))
            # one unwrapped line, so the path can be copied or parsed
            stdout_console.print(f"report: {index.resolve().as_uri()}", soft_wrap=True, highlight=False,
                                 markup=False)
        return index
