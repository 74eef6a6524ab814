"""The ``batchrun`` command line (typer). Commands stay thin: parse, call, print.

Each command is wrapped by ``common.clean_errors``: one line and an exit code per error.
"""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console

from batchrun.cli.common import clean_errors, err_console, setup_logging
from batchrun.errors import EXIT_PENDING, BudgetExhausted

__all__ = ["app", "main"]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Batch inference over OpenAI-compatible APIs on Ray.")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"batchrun {version('batchrun')} (ray {version('ray')}, "
              f"python {sys.version.split()[0]})")
        raise typer.Exit(0)


@app.callback()
def _root(
    _: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                           help="Print batchrun's version and exit."),
) -> None:
    """Batch inference over OpenAI-compatible APIs on Ray."""


@app.command(
    "mock-server", add_help_option=False,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def mock_server(ctx: typer.Context) -> None:
    """The simulated OpenAI-compatible provider (see --help for its limits and faults)."""
    from batchrun.sim.run import main as mock_main

    raise typer.Exit(mock_main(list(ctx.args)))


@app.command()
@clean_errors
def run(
    spec: str = typer.Argument(..., help="Job spec YAML."),
    address: str = typer.Option(None, "--address", help="Ray cluster to join (or RAY_ADDRESS)."),
    retry_errors: bool = typer.Option(False, "--retry-errors",
                                      help="Re-send rows that ended in error."),
    mode: str = typer.Option(None, "--mode", help="online or batch (overrides the spec)."),
    no_wait: bool = typer.Option(False, "--no-wait",
                                 help="Batch mode: submit and exit 10; rerun later to collect."),
    force: bool = typer.Option(False, "--force",
                               help="Resume even though the inputs or request fields changed."),
    ds: str = typer.Option(None, "--ds", help="Run date substituted for {ds} in paths."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    no_dashboard: bool = typer.Option(False, "--no-dashboard", help="Local Ray without dashboard."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    limit: int = typer.Option(None, "--limit", min=1,
                              help="Smoke test: send only the input's first N rows, into the "
                                   "same output (a full run later sends the rest)."),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
) -> None:
    """Run or resume a job; results and summary.json go to the spec's output folder."""
    from batchrun.io.summary import errors_line, exit_code, render_summary
    from batchrun.public import run as run_job

    setup_logging(verbose)
    if mode not in (None, "online", "batch"):
        raise typer.BadParameter("--mode must be online or batch")
    # the Python API's call: one code path (refuses --no-wait with simulate: in _prepare)
    summary = run_job(spec, address=address, retry_errors=retry_errors, force=force, ds=ds,
                      mode=mode, wait=not no_wait,  # type: ignore[arg-type]
                      progress=not no_progress and sys.stderr.isatty(),
                      include_dashboard=False if no_dashboard else None, limit=limit)
    if summary.rows == 0 and summary.unsent == 0:  # no rows at all: not "complete"
        err_console.print(f"job {summary.job}: input has 0 rows: nothing to send")
    elif summary.rows_this_run == 0 and summary.unsent == 0 and limit is not None:
        err_console.print(f"job {summary.job}: the first {limit:,} rows already have results; "
                          "run without --limit to send the rest", soft_wrap=True)
    elif summary.rows_this_run == 0 and summary.unsent == 0:
        err_console.print(f"job {summary.job} is already complete: nothing to send")
    if as_json:
        print(json.dumps(summary.model_dump(), indent=2))
    else:
        Console().print(render_summary(summary))
    if summary.output:
        err_console.print(f"results: {summary.output.rstrip('/')}/results/  "
                          f"(summary: {summary.output.rstrip('/')}/summary.json)",
                          highlight=False, soft_wrap=True)
    if summary.pending_batches:
        err_console.print(f"{summary.pending_batches} batches pending; run the same command "
                          "later to collect them")
        raise typer.Exit(EXIT_PENDING)
    if summary.budget_exhausted:
        err_console.print(f"budget exhausted: {summary.unsent:,} rows left unsent; raise "
                          "budget.max_cost_usd (or wait for a new day) and run again to resume")
        raise typer.Exit(BudgetExhausted.exit_code)
    if summary.unsent:  # rows with no result and no reason given: never a success
        err_console.print(f"batchrun: error: {summary.unsent:,} rows were left unsent for no "
                          "reason the run knows of, so the job cannot count as done; run the "
                          "same command again to send them", highlight=False, soft_wrap=True,
                          markup=False)
        raise typer.Exit(exit_code(summary))
    if line := errors_line(summary, f"batchrun run {spec}"):  # cron and CI must see them
        err_console.print(line, highlight=False, soft_wrap=True, markup=False)
        raise typer.Exit(exit_code(summary))


def main() -> None:
    app(prog_name="batchrun")


@app.command()
@clean_errors
def estimate(
    spec: str = typer.Argument(..., help="Job spec YAML."),
    compare: bool = typer.Option(False, "--compare", help="Price the job on every model."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ds: str = typer.Option(None, "--ds", help="Run date substituted for {ds} in paths."),
    sample: int = typer.Option(None, "--sample", help="Count tokens on N sampled rows."),
    output_ratio: float = typer.Option(0.5, "--output-ratio",
                                       help="Expected output tokens as a share of max_tokens."),
    throughput: float = typer.Option(None, "--throughput", min=0.001,
                                     help="engine: jobs, with --compare: rows per second of "
                                     "the replicas (default: the previous run's summary)."),
) -> None:
    """Rows, tokens, worst-case and expected cost, and duration: nothing is sent."""
    from batchrun.money.estimate import estimate_command

    raise typer.Exit(estimate_command(spec, compare, as_json, ds=ds,
                                      sample_rows=sample if sample else "auto",
                                      expected_output_ratio=output_ratio,
                                      throughput=throughput))


def _mount_subcommands() -> None:
    # commcheck and the scheduler keep their own modules; they import their heavy
    # dependencies (torch, croniter) only when run.
    from batchrun.cli.ops import (
        list_command,
        logs_command,
        status_command,
        stop_command,
        submit_command,
    )
    from batchrun.cli.schedule import schedule_app, scheduler_command
    from batchrun.commcheck.cli import commcheck

    app.command("submit")(submit_command)
    app.command("status")(status_command)
    app.command("logs")(logs_command)
    app.command("stop")(stop_command)
    app.command("list")(list_command)

    app.command("commcheck")(commcheck)
    app.command("scheduler")(clean_errors(scheduler_command))
    # wrapped copies (the scheduler module's own app stays raw for its tests): a bad
    # folder or spec under `schedule list` is one line too
    schedule = typer.Typer(help=schedule_app.info.help, no_args_is_help=True)
    for cmd in schedule_app.registered_commands:
        assert cmd.callback is not None
        schedule.command(cmd.name)(clean_errors(cmd.callback))
    app.add_typer(schedule, name="schedule")


_mount_subcommands()
