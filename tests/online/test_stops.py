"""A job that stops early (exit 7): it says so whatever shards are left, it leaves the
summary of this run, it stops in seconds even one request at a time, and a restarted
limiter does not forget the stop. Real Ray, real loopback provider."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pytest
import ray

from batchrun.errors import JobCannotSucceed
from batchrun.limits.limiter import RateLimiter, limiter_name
from batchrun.online.breaker import ErrorRate
from batchrun.online.dispatch import Dispatcher
from batchrun.online.worker import Worker, worker_name
from batchrun.runner import RunOptions, run_job
from batchrun.sim import MockConfig, start_subprocess
from batchrun.spec import load_spec
from tests.conftest import make_prompts, write_spec

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(180)]
QUIET = RunOptions(progress=False)


def test_an_error_rate_halt_with_shards_still_queued_is_exit_7(tmp_path: Path) -> None:
    """Both running shards are sent whole before the first answer (1.5 s latency, 300 in
    flight), so the halt finds no shard short; the two queued shards never run. That is
    a job stopped early, not a finished one with rows in error."""
    make_prompts(tmp_path / "in.parquet", 600, row_group=150)
    with start_subprocess(MockConfig(fail_rate=1.0, latency_ms=1500)) as server:
        spec = write_spec(tmp_path, endpoint={"base_url": server.base_url}, workers=1,
                          shard_rows=150, flush_rows=50,
                          retry={"max_attempts": 1, "max_error_rate": 0.5},
                          limits={"rpm": 1_000_000, "max_concurrency": 300})
        with pytest.raises(JobCannotSucceed, match="max_error_rate"):
            run_job(str(spec), QUIET)
        sent = server.stats()["total_requests"]
    assert sent == 300, sent  # the two running shards, whole; the queued ones never
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rows"] == 300 and summary["unsent"] == 300


def test_exit_7_leaves_the_summary_of_this_run(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    make_prompts(tmp_path / "in.parquet", 400)
    with start_subprocess(MockConfig(api_key="sk-right-key")) as server:
        spec = write_spec(tmp_path, endpoint={"base_url": server.base_url,
                                              "api_key_env": "T_STOP_KEY"})
        monkeypatch.setenv("T_STOP_KEY", "sk-right-key")
        run_job(str(spec), RunOptions(progress=False, limit=50))  # a summary of 50 rows
        monkeypatch.setenv("T_STOP_KEY", "sk-wrong-key")
        with pytest.raises(JobCannotSucceed, match="HTTP 401"):
            run_job(str(spec), QUIET)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    # this run's: nothing new, 350 rows left; not the --limit run's 50 rows this run
    assert summary["rows_this_run"] == 0 and summary["requests_this_run"] == 0
    assert summary["rows"] == 50 and summary["unsent"] == 350
    assert "sk-wrong-key" not in json.dumps(summary)


def test_wrong_key_at_concurrency_1_stops_in_seconds(tmp_path: Path) -> None:
    """The default retry policy (backoff up to 30 s): the breaker's 20 failures in a row
    would take minutes of backoff; while it is armed they are retried after a short pause."""
    make_prompts(tmp_path / "in.parquet", 200)
    with start_subprocess(MockConfig(api_key="sk-right-key")) as server:
        spec = write_spec(tmp_path, endpoint={"base_url": server.base_url,
                                              "api_key_env": "T_STOP_KEY_1"},
                          workers=1, retry=None, limits={"rpm": 100_000, "max_concurrency": 1})
        t0 = time.monotonic()
        with pytest.raises(JobCannotSucceed, match="HTTP 401"), pytest.MonkeyPatch.context() as m:
            m.setenv("T_STOP_KEY_1", "sk-wrong-key")
            run_job(str(spec), QUIET)
        seconds = time.monotonic() - t0
        sent = server.stats()["total_requests"]
    assert seconds < 10, f"{seconds:.1f} s to stop"  # generous: ~5 s on a loaded machine
    assert sent == 20, sent  # the breaker's streak, one at a time


def _error_table(n: int) -> pa.Table:
    return pa.table({"id": [f"r{i}" for i in range(n)], "status": ["error"] * n,
                     "attempts": [1] * n, "error_type": ["http_500"] * n,
                     "error_message": ["HTTP 500: boom"] * n})


def test_a_halt_survives_a_limiter_restart(tmp_path: Path) -> None:
    make_prompts(tmp_path / "in.parquet", 10)
    spec = load_spec(str(write_spec(tmp_path, name="t-halt-restart")))
    limiter = RateLimiter.options(name=limiter_name(spec.name)).remote(  # type: ignore[attr-defined]
        spec.name, 100_000, None)
    worker = Worker.options(name=worker_name(spec.name, 0), num_cpus=0).remote(  # type: ignore[attr-defined]
        spec, 4, pa.schema([("id", pa.string())]))
    try:
        d = Dispatcher(limiter, [worker], None, lambda n: None, [None],  # type: ignore[arg-type]
                       ErrorRate(0.5, 200))
        d._watch(_error_table(200))  # the driver's error rate stops the job
        assert d.halted is not None and "max_error_rate" in d.halted
        assert ray.get(limiter.halted.remote(), timeout=30) == d.halted
        ray.kill(limiter, no_restart=False)  # Ray restarts it: its memory is gone
        deadline = time.monotonic() + 60
        while True:  # a call right after ray.kill may still reach the old instance
            try:
                stats = ray.get(limiter.stats.remote(), timeout=30)
                if stats["restarted"]:
                    break
            except ray.exceptions.RayActorError:
                pass
            assert time.monotonic() < deadline, "the limiter did not come back"
            time.sleep(0.2)
        assert stats["halted"] == d.halted  # learnt again from the worker
        answer = ray.get(limiter.lease.remote([1.0, 1.0]), timeout=30)
        assert answer.exhausted and not answer.starts  # and no lease for anyone
    finally:
        ray.kill(limiter, no_restart=True)
        ray.kill(worker, no_restart=True)
