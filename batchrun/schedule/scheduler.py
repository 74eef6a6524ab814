"""The scheduler: starts each scheduled job once per cron slot, never two runs of a job at once.

A slot is *claimed* by an INSERT under ``UNIQUE(job_name, slot_utc)`` in a write transaction
(with the overlap check) before anything starts: at most once across restarts. Each run goes
through a small *supervisor* process that logs its output and records its exit code itself,
so outcomes are kept with ``--no-wait`` and across scheduler restarts. Overlap is *deferred*:
nothing is recorded for a busy job's due slot; when its run ends, the catch-up policy decides
as if the scheduler had been down meanwhile. Design notes: docs/scheduling.md.

This module holds job loading and tick/once/loop; the state database (``StateDB``) and the
supervisor live in ``batchrun.schedule.state`` and are re-exported here.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from batchrun.errors import BatchrunError, UserError
from batchrun.schedule.cron import (
    DEFAULT_GRACE,
    CatchUp,
    due_slots,
    next_slots,
    parse_zone,
    slot_ds,
    slot_key,
    validate_cron,
)
from batchrun.schedule.state import (
    EXIT_PENDING,
    RunRecord,
    StateDB,
    _utcnow,
    supervise_main,
    supervisor_command,
)

__all__ = [
    "DEFAULT_STATE_DIR",
    "EXIT_PENDING",
    "CommandFor",
    "RunRecord",
    "ScheduledJob",
    "StateDB",
    "TickResult",
    "default_command",
    "load_jobs",
    "run_loop",
    "run_once",
    "seconds_until_next",
    "supervise_main",
    "tick",
]

log = logging.getLogger("batchrun.schedule.scheduler")

DEFAULT_STATE_DIR = Path("~/.batchrun")
RESCAN_S = 60.0  # longest sleep: the jobs folder is re-read at every wakeup
BUSY_POLL_S = 5.0  # a deferred slot is re-checked this often while its job is busy

CommandFor = Callable[[str, str], list[str]]

# -- jobs and commands --------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduledJob:
    name: str
    spec_path: str
    cron: str
    zone: ZoneInfo
    catch_up: CatchUp


def _spec_files(jobs_dir: Path) -> list[Path]:
    return sorted(p for p in jobs_dir.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def load_jobs(jobs_dir: str | Path, *, strict: bool = True) -> list[ScheduledJob]:
    """The scheduled jobs of a folder's ``*.yaml``/``*.yml`` specs (specs without ``schedule:``
    are skipped). ``strict``: any bad spec is a ``UserError``; otherwise it is logged and skipped
    (the running loop must not die because someone saved a half-written file)."""
    from batchrun.spec import load_spec  # lazy: importing this module needs no pydantic

    folder = Path(jobs_dir).expanduser()
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder; give the folder holding the job specs")
    files = _spec_files(folder)
    if not files and strict:
        raise UserError(f"{folder}: no job specs (*.yaml) in this folder")
    jobs: dict[str, ScheduledJob] = {}
    for path in files:
        try:
            job = _job_of(path, load_spec(path))
        except BatchrunError as e:
            if strict:
                raise
            log.warning("skipping %s", e)
            continue
        if job is None:
            continue
        if job.name in jobs:
            msg = f"{path}: job name {job.name!r} is also used by {jobs[job.name].spec_path}"
            if strict:
                raise UserError(msg)
            log.warning("skipping %s", msg)
            continue
        jobs[job.name] = job
    if not jobs and strict:
        names = ", ".join(p.name for p in files[:5]) + (", ..." if len(files) > 5 else "")
        raise UserError(f"{folder}: none of its specs ({names}) has a schedule; add "
                        "schedule: {cron: '0 2 * * *'} to a spec to run it nightly")
    return list(jobs.values())


def _job_of(path: Path, spec: object) -> ScheduledJob | None:
    sched = getattr(spec, "schedule", None)
    if sched is None:
        return None
    try:
        return ScheduledJob(
            name=spec.name,  # type: ignore[attr-defined]
            spec_path=str(path.resolve()),
            cron=validate_cron(sched.cron),
            zone=parse_zone(sched.timezone),
            catch_up=sched.catch_up,
        )
    except BatchrunError as e:
        raise type(e)(f"{path}: {e}") from None


def default_command(address: str | None = None) -> CommandFor:
    """``batchrun run SPEC --ds DS`` locally, or ``batchrun submit ... --wait`` to a cluster."""

    def build(spec_path: str, ds: str) -> list[str]:
        base = [sys.executable, "-m", "batchrun"]
        if address:
            return [*base, "submit", spec_path, "--ds", ds, "--address", address, "--wait"]
        return [*base, "run", spec_path, "--ds", ds]

    return build


# -- one evaluation, --once, and the loop -------------------------------------------------


@dataclass
class TickResult:
    started: list[tuple[str, str, subprocess.Popen]] = field(default_factory=list)
    deferred: list[str] = field(default_factory=list)  # jobs with a due slot but a live run


def _start(
    db: StateDB, job: ScheduledJob, slot: datetime, command_for: CommandFor, result: TickResult
) -> None:
    key, ds = slot_key(slot), slot_ds(slot, job.zone)
    log_path = db.state_dir / "logs" / job.name / (key.replace("-", "").replace(":", "") + ".log")
    claim = db.claim(job.name, key, ds, log_path)
    if claim == "busy":
        log.info("%s: slot %s deferred, the previous run is still running", job.name, key)
        result.deferred.append(job.name)
        return
    if claim == "taken":
        return
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = command_for(job.spec_path, ds)
        with open(log_path, "ab") as err:  # the supervisor's own errors land in the log too
            proc = subprocess.Popen(
                supervisor_command(db.path, job.name, key, log_path, cmd),
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,  # a scheduler restart or Ctrl-C leaves runs alone
            )
    except Exception as e:
        db.finish(job.name, key, None, "start_failed")
        log.error("%s: slot %s could not start: %s", job.name, key, e)
        return
    db.mark_running(job.name, key, proc.pid)
    log.info("%s: started slot %s (ds %s), log %s", job.name, key, ds, log_path)
    result.started.append((job.name, key, proc))


def tick(
    db: StateDB, jobs: list[ScheduledJob], now: datetime, command_for: CommandFor
) -> TickResult:
    """Evaluate one instant: start the oldest due slot of each job that has one."""
    result = TickResult()
    for job in jobs:
        last = db.last_slot(job.name)
        # A job never run looks back only to when the scheduler first saw it (minus the
        # grace period), so adding a job does not fire a slot from hours ago.
        after = last if last is not None else db.first_seen(job.name, now) - DEFAULT_GRACE
        due = due_slots(job.cron, job.zone, now, after, catch_up=job.catch_up)
        if due:
            _start(db, job, due[0], command_for, result)
    return result


def run_once(
    jobs_dir: str | Path,
    state_dir: str | Path,
    command_for: CommandFor,
    *,
    now: datetime | None = None,
    wait: bool = True,
) -> list[RunRecord]:
    """Start what is due at ``now``; with ``wait``, wait for it (and for further catch-up
    slots of the same jobs, one after the other). Returns the records of started runs."""
    jobs = load_jobs(jobs_dir)
    db = StateDB(state_dir)
    now = now or _utcnow()
    started: list[tuple[str, str]] = []
    try:
        while True:
            result = tick(db, jobs, now, command_for)
            started += [(j, k) for j, k, _ in result.started]
            if not wait or not result.started:
                break
            for _, _, proc in result.started:
                proc.wait()
        return [r for j, k in started if (r := db.get(j, k)) is not None]
    finally:
        db.close()


def seconds_until_next(jobs: list[ScheduledJob], now: datetime) -> float:
    """Seconds from ``now`` to the next slot of any job, capped at the rescan interval."""
    nexts = [next_slots(j.cron, j.zone, now, 1)[0] for j in jobs]
    if not nexts:
        return RESCAN_S
    return min(RESCAN_S, max(0.0, (min(nexts) - now).total_seconds()))


def _rescan(jobs_dir: str | Path, previous: list[ScheduledJob]) -> list[ScheduledJob]:
    try:
        return load_jobs(jobs_dir, strict=False)
    except BatchrunError as e:  # the folder vanished (unmounted?): keep the last good list
        log.warning("keeping the previous jobs: %s", e)
        return previous


def run_loop(
    jobs_dir: str | Path,
    state_dir: str | Path,
    command_for: CommandFor,
    *,
    clock: Callable[[], datetime] = _utcnow,
    sleep: Callable[[float], None] = time.sleep,
    max_wakeups: int | None = None,
) -> None:
    """The foreground scheduler: sleep until the next slot of any job, start what is due.

    The jobs folder is re-read at every wakeup, and wakeups are at most ``RESCAN_S`` apart,
    so a new or edited spec is picked up within a minute. ``clock``/``sleep`` are injectable.
    """
    jobs = load_jobs(jobs_dir)  # strict once: a broken setup fails at startup, exit 2
    db = StateDB(state_dir)
    children: list[subprocess.Popen] = []
    wakeups = 0
    try:
        while max_wakeups is None or wakeups < max_wakeups:
            now = clock()
            result = tick(db, jobs, now, command_for)
            # poll() reaps finished supervisors; their outcome is already in the DB.
            children = [p for p in children + [p for _, _, p in result.started] if p.poll() is None]
            wait = seconds_until_next(jobs, now)
            if result.deferred:
                wait = min(wait, BUSY_POLL_S)
            sleep(wait + 0.05)  # a hair past the slot, so the next tick sees it due
            wakeups += 1
            jobs = _rescan(jobs_dir, jobs)
    except KeyboardInterrupt:
        log.info("scheduler stopped; runs in progress go on and record their outcome")
    finally:
        db.close()
