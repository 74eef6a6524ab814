"""The scheduler against a real sqlite DB and real subprocesses (tiny python commands)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from typer.testing import CliRunner

from batchrun.cli.schedule import app, template_command
from batchrun.errors import SpecError, UserError
from batchrun.schedule.scheduler import (
    StateDB,
    default_command,
    run_loop,
    run_once,
)

HCM = ZoneInfo("Asia/Ho_Chi_Minh")
JAN2_0200 = datetime(2026, 1, 2, 2, 0, tzinfo=HCM)

# Appends "<ds>" to the file next to the spec named <job>.ran, then exits with `code`.
_RECORD = (
    "import sys, time, pathlib; spec, ds, code, nap = sys.argv[1:5]; "
    "p = pathlib.Path(spec).with_suffix('.ran'); "
    "open(p, 'a').write('start ' + ds + chr(10)); time.sleep(float(nap)); "
    "open(p, 'a').write('end ' + ds + chr(10)); print('ran', ds); sys.exit(int(code))"
)


def write_spec(
    folder: Path,
    name: str,
    cron: str = "0 2 * * *",
    tz: str = "Asia/Ho_Chi_Minh",
    catch_up: str = "latest",
    extra: str = "",
) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(
        f"name: {name}\ninput: data/{{ds}}.parquet\nprompt_column: prompt\nmodel: m\n"
        "generation: {max_tokens: 16}\nlimits: {rpm: 60}\noutput: out/{ds}\n"
        f"schedule: {{cron: '{cron}', timezone: {tz}, catch_up: {catch_up}}}\n{extra}"
    )
    return path


def recorder(code: int = 0, nap: Callable[[str], float] = lambda ds: 0.0):
    def build(spec: str, ds: str) -> list[str]:
        return [sys.executable, "-c", _RECORD, spec, ds, str(code), str(nap(ds))]

    return build


def ran(jobs: Path, name: str) -> list[str]:
    p = jobs / f"{name}.ran"
    return p.read_text().splitlines() if p.exists() else []


def wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    jobs, state = tmp_path / "jobs", tmp_path / "state"
    jobs.mkdir()
    return jobs, state


def test_due_slot_runs_once_with_log_and_record(dirs: tuple[Path, Path]) -> None:
    jobs, state = dirs
    write_spec(jobs, "nightly")
    runs = run_once(jobs, state, recorder(), now=JAN2_0200)
    assert [(r.job_name, r.slot_utc, r.ds, r.status, r.exit_code) for r in runs] == [
        ("nightly", "2026-01-01T19:00:00Z", "2026-01-02", "succeeded", 0)
    ]
    log = Path(runs[0].log_path or "")
    assert log == state / "logs" / "nightly" / "20260101T190000Z.log"
    assert "ran 2026-01-02" in log.read_text() and "# exit code 0" in log.read_text()
    assert runs[0].finished_at and runs[0].pid
    # Same instant again (a second --once, or a restart): claimed already, not started.
    assert run_once(jobs, state, recorder(), now=JAN2_0200) == []
    assert run_once(jobs, state, recorder(), now=JAN2_0200 + timedelta(hours=3)) == []
    assert ran(jobs, "nightly") == ["start 2026-01-02", "end 2026-01-02"]


def test_restart_after_missing_three_slots(dirs: tuple[Path, Path]) -> None:
    jobs, state = dirs
    write_spec(jobs, "latest")
    write_spec(jobs, "every", catch_up="all")
    write_spec(jobs, "skipper", catch_up="none")
    first = datetime(2026, 1, 1, 2, 0, tzinfo=HCM)
    assert len(run_once(jobs, state, recorder(), now=first)) == 3
    # Down for Jan 2, 3 and 4; back at 09:30 on Jan 4.
    runs = run_once(jobs, state, recorder(nap=lambda ds: 0.1), now=first + timedelta(days=3.3))
    assert ran(jobs, "latest")[2:] == ["start 2026-01-04", "end 2026-01-04"]
    assert ran(jobs, "skipper") == ["start 2026-01-01", "end 2026-01-01"]
    # "all" replays each slot, oldest first, one after the other (start/end alternate).
    assert ran(jobs, "every")[2:] == [
        f"{what} 2026-01-0{d}" for d in (2, 3, 4) for what in ("start", "end")
    ]
    assert sorted((r.job_name, r.ds) for r in runs) == [
        ("every", "2026-01-02"),
        ("every", "2026-01-03"),
        ("every", "2026-01-04"),
        ("latest", "2026-01-04"),
    ]


def test_new_job_does_not_fire_a_slot_from_before_it_was_seen(dirs: tuple[Path, Path]) -> None:
    jobs, state = dirs
    write_spec(jobs, "fresh", catch_up="all")
    seen = datetime(2026, 1, 1, 9, 30, tzinfo=HCM)  # 7.5 h after the Jan 1 slot
    assert run_once(jobs, state, recorder(), now=seen) == []
    runs = run_once(jobs, state, recorder(), now=seen + timedelta(days=1))
    assert [r.ds for r in runs] == ["2026-01-02"]


def test_exit_codes_are_recorded(dirs: tuple[Path, Path]) -> None:
    jobs, state = dirs
    codes = {"ok": 0, "broken": 3, "batchwait": 10}
    for name in codes:
        write_spec(jobs, name)

    def build(spec: str, ds: str) -> list[str]:
        return recorder(codes[Path(spec).stem])(spec, ds)

    runs = {r.job_name: r for r in run_once(jobs, state, build, now=JAN2_0200)}
    assert {k: (r.status, r.exit_code) for k, r in runs.items()} == {
        "ok": ("succeeded", 0),
        "broken": ("failed", 3),
        "batchwait": ("pending", 10),
    }


def test_command_that_cannot_start_is_recorded(dirs: tuple[Path, Path]) -> None:
    jobs, state = dirs
    write_spec(jobs, "nocmd")
    runs = run_once(jobs, state, lambda s, d: ["/nonexistent/batchrun-x"], now=JAN2_0200)
    assert [(r.status, r.exit_code) for r in runs] == [("start_failed", 127)]
    assert "could not start" in Path(runs[0].log_path or "").read_text()


def test_overlap_is_deferred_until_the_previous_run_ends(dirs: tuple[Path, Path]) -> None:
    jobs, state = dirs
    write_spec(jobs, "slow")
    build = recorder(nap=lambda ds: 1.5 if ds == "2026-01-01" else 0.0)
    jan1 = JAN2_0200 - timedelta(days=1)
    started = run_once(jobs, state, build, now=jan1, wait=False)
    assert [(r.ds, r.status) for r in started] == [("2026-01-01", "running")]
    # Next slot while the first run is alive: nothing starts, nothing is recorded.
    assert run_once(jobs, state, build, now=JAN2_0200) == []
    db = StateDB(state)
    assert [r.ds for r in db.runs("slow")] == ["2026-01-01"]
    # The supervisor records the outcome of a --no-wait run by itself.
    wait_for(lambda: db.runs("slow")[0].status == "succeeded")
    assert db.runs("slow")[0].exit_code == 0
    runs = run_once(jobs, state, build, now=JAN2_0200 + timedelta(minutes=1))
    assert [(r.ds, r.status) for r in runs] == [("2026-01-02", "succeeded")]
    assert ran(jobs, "slow") == [
        "start 2026-01-01",
        "end 2026-01-01",
        "start 2026-01-02",
        "end 2026-01-02",
    ]
    db.close()


def test_run_whose_supervisor_died_is_marked_lost(dirs: tuple[Path, Path]) -> None:
    jobs, state = dirs
    write_spec(jobs, "orphan")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    db = StateDB(state)
    db.conn.execute(
        "INSERT INTO runs VALUES ('orphan', '2025-12-31T19:00:00Z', '2026-01-01', "
        "'2026-01-01T00:00:00+00:00', NULL, 'running', NULL, ?, NULL)",
        (dead.pid,),
    )
    runs = run_once(jobs, state, recorder(), now=JAN2_0200)
    assert [(r.ds, r.status) for r in runs] == [("2026-01-02", "succeeded")]
    assert db.runs("orphan")[0].status == "lost"
    db.close()


def test_unique_claim_across_two_connections(tmp_path: Path) -> None:
    a, b = StateDB(tmp_path), StateDB(tmp_path)
    log = tmp_path / "x.log"
    assert a.claim("j", "2026-01-01T19:00:00Z", "2026-01-02", log) == "claimed"
    assert b.claim("j", "2026-01-01T19:00:00Z", "2026-01-02", log) == "taken"
    with pytest.raises(sqlite3.IntegrityError):  # the constraint itself, not only the code
        a.conn.execute(
            "INSERT INTO runs (job_name, slot_utc, ds, status) "
            "VALUES ('j', '2026-01-01T19:00:00Z', 'x', 'y')"
        )
    a.close()
    b.close()


def test_loop_sleeps_until_next_slot_and_rescans(dirs: tuple[Path, Path]) -> None:
    jobs, state = dirs
    write_spec(jobs, "early")
    clock = [datetime(2026, 1, 2, 1, 59, 30, tzinfo=HCM)]
    sleeps: list[float] = []

    def fake_sleep(secs: float) -> None:
        sleeps.append(secs)
        clock[0] += timedelta(seconds=secs)
        if len(sleeps) == 1:  # a spec added while the scheduler sleeps is picked up
            write_spec(jobs, "added")

    run_loop(jobs, state, recorder(), clock=lambda: clock[0], sleep=fake_sleep, max_wakeups=2)
    assert sleeps[0] == pytest.approx(30.05)  # computed, not polled
    assert sleeps[1] == pytest.approx(60.05)  # next slot is a day away: rescan cap
    db = StateDB(state)
    wait_for(lambda: all(r.status == "succeeded" for r in db.runs()) and len(db.runs()) == 2)
    assert sorted(r.job_name for r in db.runs()) == ["added", "early"]
    db.close()


def test_command_builders() -> None:
    assert default_command()("/j/x.yaml", "2026-01-02") == [
        sys.executable,
        "-m",
        "batchrun",
        "run",
        "/j/x.yaml",
        "--ds",
        "2026-01-02",
    ]
    assert default_command("http://h:8265")("/j/x.yaml", "2026-01-02")[3:] == [
        "submit",
        "/j/x.yaml",
        "--ds",
        "2026-01-02",
        "--address",
        "http://h:8265",
        "--wait",
    ]
    tpl = template_command("{python} -c 'd={1: 2}' '{spec}' {ds}")
    assert tpl("/a b/x.yaml", "2026-01-02") == [
        sys.executable,
        "-c",
        "d={1: 2}",
        "/a b/x.yaml",
        "2026-01-02",
    ]


# -- the CLI, through typer's CliRunner ----------------------------------------------------

runner = CliRunner()
TEMPLATE = '{python} -c "' + _RECORD.replace('"', '\\"') + '" {spec} {ds} 0 0'


def cli(*args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "200"})


def test_cli_once_at_an_instant_runs_once(dirs: tuple[Path, Path]) -> None:
    jobs, state = dirs
    write_spec(jobs, "nightly")
    args = (
        "scheduler",
        str(jobs),
        "--once",
        "--now",
        "2026-01-02T02:00+07:00",
        "--state",
        str(state),
        "--command-template",
        TEMPLATE,
    )
    first = cli(*args)
    assert first.exit_code == 0, first.output
    assert "succeeded" in first.output and "2026-01-02" in first.output
    second = cli(*args)
    assert second.exit_code == 0 and "nothing due" in second.output
    assert ran(jobs, "nightly") == ["start 2026-01-02", "end 2026-01-02"]
    listing = cli(
        "schedule",
        "list",
        str(jobs),
        "--now",
        "2026-01-02T03:00+07:00",
        "--state",
        str(state),
        "--n",
        "2",
    )
    assert listing.exit_code == 0, listing.output
    out = listing.output
    assert "2026-01-03 02:00 +07" in out and "2026-01-02 19:00" in out
    assert "2026-01-04 02:00" in out and "2026-01-05" not in out
    assert "2026-01-02 succeeded (exit 0)" in out


def test_cli_once_exits_1_when_a_run_failed(dirs: tuple[Path, Path]) -> None:
    jobs, state = dirs
    write_spec(jobs, "nightly")
    res = cli(
        "scheduler",
        str(jobs),
        "--once",
        "--now",
        "2026-01-02T02:00+07:00",
        "--state",
        str(state),
        "--command-template",
        TEMPLATE.replace("0 0", "4 0"),
    )
    assert res.exit_code == 1 and "failed" in res.output


@pytest.mark.parametrize(
    ("setup", "error", "needle"),
    [
        (lambda j: None, UserError, "no job specs"),
        (lambda j: write_spec(j, "x", cron="0 25 * * *"), SpecError, "x.yaml: schedule.cron"),
        (lambda j: write_spec(j, "x", tz="Mars/Base"), SpecError, "unknown time zone"),
        (lambda j: write_spec(j, "x", extra="bogus: 1\n"), SpecError, "bogus: unknown key"),
        (lambda j: (j / "a.yaml").write_text("name: a\nmodel: m\n"), SpecError, "a.yaml: "),
    ],
)
def test_cli_bad_input_is_a_one_line_user_error(dirs, setup, error, needle) -> None:
    jobs, state = dirs
    setup(jobs)
    for args in (("scheduler", str(jobs), "--once"), ("schedule", "list", str(jobs))):
        res = cli(*args, "--state", str(state))
        assert isinstance(res.exception, error), res.output
        assert needle in str(res.exception) and "\n" not in str(res.exception)


def test_cli_rejects_bad_now_and_flags(dirs: tuple[Path, Path]) -> None:
    jobs, state = dirs
    write_spec(jobs, "x")
    res = cli("scheduler", str(jobs), "--once", "--now", "2026-01-02T02:00", "--state", str(state))
    assert isinstance(res.exception, UserError) and "UTC offset" in str(res.exception)
    res = cli("scheduler", str(jobs), "--now", "2026-01-02T02:00Z", "--state", str(state))
    assert isinstance(res.exception, UserError) and "--once" in str(res.exception)
    res = cli("scheduler", str(jobs), "--once", "--address", "h:8265")
    assert isinstance(res.exception, UserError) and "8265" in str(res.exception)
    missing = cli("scheduler", str(jobs / "nope"), "--once", "--state", str(state))
    assert isinstance(missing.exception, UserError)
