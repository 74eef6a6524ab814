"""The scheduler's state and its per-run supervisor (used by ``batchrun.schedule.scheduler``).

``StateDB`` is the sqlite state database (``STATE_DIR/scheduler.db``): one ``runs`` row per
claimed slot, and when each job was first seen. The *supervisor* is the small process started
once per run: it runs the job's command, logs its output, and records the exit code in the DB
itself, so outcomes are kept with ``--no-wait`` and across scheduler restarts. It is started as
``python -c _BOOT PKG_ROOT DB JOB SLOT LOG -- CMD...`` (see ``supervisor_command``) and imports
only this module, so it stays light. Design notes: docs/scheduling.md.
"""

from __future__ import annotations

import os
import shlex
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil

from batchrun.schedule.cron import slot_key

__all__ = [
    "EXIT_PENDING",
    "RunRecord",
    "StateDB",
    "supervise_main",
    "supervisor_command",
]

EXIT_PENDING = 10  # reserved by `batchrun run/submit`: a Batch API job is still pending
ACTIVE = ("starting", "running")
_START_WINDOW = timedelta(seconds=60)  # claim -> supervisor start, and pid-reuse guard

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    job_name TEXT NOT NULL, slot_utc TEXT NOT NULL, ds TEXT NOT NULL,
    started_at TEXT, finished_at TEXT, status TEXT NOT NULL,
    exit_code INTEGER, pid INTEGER, log_path TEXT,
    UNIQUE (job_name, slot_utc)
);
CREATE TABLE IF NOT EXISTS jobs (job_name TEXT PRIMARY KEY, first_seen_utc TEXT NOT NULL);
"""


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="seconds")


def _from_key(key: str) -> datetime:
    return datetime.strptime(key, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def _status_for(exit_code: int) -> str:
    if exit_code == 0:
        return "succeeded"
    return "pending" if exit_code == EXIT_PENDING else "failed"


@dataclass(frozen=True)
class RunRecord:
    job_name: str
    slot_utc: str
    ds: str
    started_at: str | None
    finished_at: str | None
    status: str
    exit_code: int | None
    pid: int | None
    log_path: str | None


class StateDB:
    """The scheduler's sqlite state: one row per claimed slot, and when each job was first seen."""

    def __init__(self, state_dir: str | Path):
        self.state_dir = Path(state_dir).expanduser()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.state_dir / "scheduler.db"
        # Autocommit; writes that must be atomic use BEGIN IMMEDIATE (the write lock).
        # WAL + a busy timeout let supervisors write while the scheduler reads.
        self.conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.executescript(_SCHEMA)

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def first_seen(self, job: str, now: datetime) -> datetime:
        """When the scheduler first saw ``job`` (recorded as ``now`` the first time)."""
        self.conn.execute("INSERT OR IGNORE INTO jobs VALUES (?, ?)", (job, slot_key(now)))
        row = self.conn.execute("SELECT first_seen_utc FROM jobs WHERE job_name=?", (job,))
        return _from_key(row.fetchone()[0])

    def last_slot(self, job: str) -> datetime | None:
        # slot_utc is fixed-width ISO text, so text order is time order.
        row = self.conn.execute("SELECT MAX(slot_utc) FROM runs WHERE job_name=?", (job,))
        key = row.fetchone()[0]
        return _from_key(key) if key else None

    def runs(self, job: str | None = None) -> list[RunRecord]:
        sql = "SELECT * FROM runs" + (" WHERE job_name=?" if job else "") + " ORDER BY slot_utc"
        return [RunRecord(*r) for r in self.conn.execute(sql, (job,) if job else ())]

    def get(self, job: str, key: str) -> RunRecord | None:
        cur = self.conn.execute("SELECT * FROM runs WHERE job_name=? AND slot_utc=?", (job, key))
        row = cur.fetchone()
        return RunRecord(*row) if row else None

    def claim(self, job: str, key: str, ds: str, log_path: Path) -> str:
        """Claim a slot: ``claimed``, ``busy`` (a run of the job is alive) or ``taken``."""
        with self._write() as c:
            if self.get(job, key) is not None:
                return "taken"
            for pid, started, slot in c.execute(
                "SELECT pid, started_at, slot_utc FROM runs WHERE job_name=? AND status IN (?, ?)",
                (job, *ACTIVE),
            ).fetchall():
                if _alive(pid, started):
                    return "busy"
                # The supervisor died without recording (SIGKILL, reboot): close the row.
                c.execute(
                    "UPDATE runs SET status='lost', finished_at=? WHERE job_name=? AND slot_utc=?",
                    (_iso(_utcnow()), job, slot),
                )
            try:
                c.execute(
                    "INSERT INTO runs (job_name, slot_utc, ds, started_at, status, log_path) "
                    "VALUES (?, ?, ?, ?, 'starting', ?)",
                    (job, key, ds, _iso(_utcnow()), str(log_path)),
                )
            except sqlite3.IntegrityError:
                return "taken"
        return "claimed"

    def mark_running(self, job: str, key: str, pid: int) -> None:
        # Conditional: a fast supervisor may already have written its final status.
        self.conn.execute(
            "UPDATE runs SET status='running', pid=COALESCE(pid, ?) "
            "WHERE job_name=? AND slot_utc=? AND status='starting'",
            (pid, job, key),
        )

    def finish(self, job: str, key: str, exit_code: int | None, status: str) -> None:
        self.conn.execute(
            "UPDATE runs SET status=?, exit_code=?, finished_at=? WHERE job_name=? AND slot_utc=?",
            (status, exit_code, _iso(_utcnow()), job, key),
        )


def _alive(pid: int | None, started_at: str | None) -> bool:
    """Whether the supervisor of a run still lives (a zombie or a reused pid does not count)."""
    started = datetime.fromisoformat(started_at) if started_at else _utcnow()
    if pid is None:  # claimed, supervisor not started yet (or the claimer died right there)
        return _utcnow() - started < _START_WINDOW
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        # A pid reused by a later process has a creation time well after the claim.
        return proc.create_time() <= (started + _START_WINDOW).timestamp()
    except psutil.Error:
        return False


# -- the supervisor: one small process per run, started with `python -c _BOOT` ------------

_PKG_ROOT = str(Path(__file__).resolve().parent.parent)
# Not `python -m batchrun.schedule.state`: that needs batchrun installed or the cwd at the
# repo root; the supervisor must import this very copy of batchrun.
_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from batchrun.schedule.state import supervise_main; sys.exit(supervise_main(sys.argv[2:]))"
)


def supervisor_command(
    db_path: Path, job: str, key: str, log_path: Path, cmd: list[str]
) -> list[str]:
    """The command line that starts a supervisor running ``cmd`` for slot ``key`` of ``job``."""
    run_args = [str(db_path), job, key, str(log_path)]
    return [sys.executable, "-c", _BOOT, _PKG_ROOT, *run_args, "--", *cmd]


def supervise_main(argv: list[str]) -> int:
    """``DB JOB SLOT LOG -- CMD...``: run CMD, log its output, record its outcome in DB."""
    db_path, job, key, log_path, sep, *cmd = argv
    assert sep == "--" and cmd, "usage: DB JOB SLOT LOG -- CMD..."
    db = StateDB(Path(db_path).parent)
    db.mark_running(job, key, os.getpid())
    with open(log_path, "ab") as out:
        out.write(f"# batchrun scheduler: {job} slot {key}: {shlex.join(cmd)}\n".encode())
        out.flush()
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        except OSError as e:
            out.write(f"# could not start: {e}\n".encode())
            db.finish(job, key, 127, "start_failed")
            return 127
        # Stopping the supervisor stops its run, and the outcome is still recorded.
        signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
        code = proc.wait()
        out.write(f"# exit code {code}\n".encode())
    db.finish(job, key, code, _status_for(code))
    return 0
