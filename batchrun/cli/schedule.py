"""CLI of the scheduler: ``batchrun scheduler JOBS_DIR`` and ``batchrun schedule list JOBS_DIR``.

The lead's main CLI mounts these::

    main_app.command("scheduler")(scheduler_command)
    main_app.add_typer(schedule_app, name="schedule")

Bad input raises a ``UserError`` (one line, exit 2, printed by the main CLI).
``app`` bundles both for tests and for running this module alone.
"""

from __future__ import annotations

import logging
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from batchrun.errors import UserError
from batchrun.schedule.cron import next_slots, parse_now
from batchrun.schedule.scheduler import (
    DEFAULT_STATE_DIR,
    CommandFor,
    RunRecord,
    StateDB,
    default_command,
    load_jobs,
    run_loop,
    run_once,
)

__all__ = [
    "app",
    "schedule_app",
    "schedule_list_command",
    "scheduler_command",
    "template_command",
]

FAILED = ("failed", "start_failed", "lost")

app = typer.Typer(help="Run scheduled batch jobs.", no_args_is_help=True)
schedule_app = typer.Typer(help="Inspect the schedules of job specs.", no_args_is_help=True)


def template_command(template: str) -> CommandFor:
    """The hidden ``--command-template``: ``{python}``, ``{spec}``, ``{ds}`` filled in (tests).

    Split first, substituted after: a spec path with spaces stays one argument, and other
    braces (a Python one-liner's dict) are left alone.
    """
    tokens = shlex.split(template)

    def build(spec_path: str, ds: str) -> list[str]:
        subst = {"{python}": sys.executable, "{spec}": spec_path, "{ds}": ds}
        out = []
        for tok in tokens:
            for k, v in subst.items():
                tok = tok.replace(k, v)
            out.append(tok)
        return out

    return build


def _console() -> Console:
    return Console(highlight=False)


def _check_address(address: str | None) -> None:
    if address is not None and not address.startswith(("http://", "https://")):
        raise UserError(f"--address {address!r}: give the dashboard URL, e.g. http://HEAD:8265")


def _setup_logging() -> None:
    # Only when the embedding CLI configured nothing: the loop reports through logging.
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


def _runs_table(runs: list[RunRecord]) -> Table:
    table = Table("job", "slot (UTC)", "ds", "status", "exit", "log")
    for r in runs:
        code = "" if r.exit_code is None else str(r.exit_code)
        table.add_row(r.job_name, r.slot_utc, r.ds, r.status, code, r.log_path or "")
    return table


def scheduler_command(
    jobs_dir: Path = typer.Argument(..., help="Folder of job specs (*.yaml) with schedule:."),
    once: bool = typer.Option(False, "--once", help="Evaluate one instant, start what is due."),
    now: str | None = typer.Option(
        None, "--now", help="With --once: the instant, ISO with offset (2026-01-02T02:00+07:00)."
    ),
    state: Path = typer.Option(
        DEFAULT_STATE_DIR, "--state", help="State folder: scheduler.db and logs/."
    ),
    address: str | None = typer.Option(
        None, "--address", help="Ray dashboard URL: runs become `batchrun submit ... --wait`."
    ),
    no_wait: bool = typer.Option(
        False, "--no-wait", help="With --once: return once runs are started."
    ),
    command_template: str | None = typer.Option(
        None, "--command-template", hidden=True, help="Tests: '{python} ... {spec} {ds}'."
    ),
) -> None:
    """Start each scheduled job once per cron slot (foreground loop, or --once)."""
    _check_address(address)
    if not once and (now is not None or no_wait):
        raise UserError("--now and --no-wait only go with --once")
    command_for = template_command(command_template) if command_template else None
    command_for = command_for or default_command(address)
    _setup_logging()
    if not once:
        run_loop(jobs_dir, state, command_for)
        return
    at = parse_now(now) if now else datetime.now(UTC)
    runs = run_once(jobs_dir, state, command_for, now=at, wait=not no_wait)
    console = _console()
    if not runs:
        console.print(f"nothing due at {at.isoformat()}")
        return
    console.print(_runs_table(runs))
    if any(r.status in FAILED for r in runs):
        raise typer.Exit(1)


def _last_run(db: StateDB | None, job: str) -> str:
    runs = db.runs(job) if db else []
    if not runs:
        return "never"
    r = runs[-1]
    code = "" if r.exit_code is None else f" (exit {r.exit_code})"
    return f"{r.ds} {r.status}{code}\nslot {r.slot_utc}"


def schedule_list_command(
    jobs_dir: Path = typer.Argument(..., help="Folder of job specs (*.yaml)."),
    now: str | None = typer.Option(None, "--now", help="List from this instant (ISO)."),
    n: int = typer.Option(3, "--n", min=1, max=100, help="Next runs to show per job."),
    state: Path = typer.Option(DEFAULT_STATE_DIR, "--state", help="State folder of the DB."),
) -> None:
    """Show each scheduled job's next runs (its zone and UTC) and its last recorded run."""
    jobs = load_jobs(jobs_dir)
    at = parse_now(now) if now else datetime.now(UTC)
    db_file = state.expanduser() / "scheduler.db"
    db = StateDB(state) if db_file.exists() else None  # listing must not create state
    table = Table("job", "schedule", "next (local)", "next (UTC)", "last run")
    try:
        for job in jobs:
            slots = next_slots(job.cron, job.zone, at, n)
            local = "\n".join(s.strftime("%Y-%m-%d %H:%M %Z") for s in slots)
            utc = "\n".join(s.astimezone(UTC).strftime("%Y-%m-%d %H:%M") for s in slots)
            sched = f"{job.cron}\n{job.zone.key}\ncatch-up {job.catch_up}"
            table.add_row(job.name, sched, local, utc, _last_run(db, job.name))
    finally:
        if db:
            db.close()
    _console().print(table)


app.command("scheduler")(scheduler_command)
schedule_app.command("list")(schedule_list_command)
app.add_typer(schedule_app, name="schedule")
