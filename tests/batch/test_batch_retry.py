"""The batch client honours Retry-After under the job's retry policy, and every way the
batch path stops is a documented exit code (7 when the provider keeps refusing)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchrun.batch import run_batch_job
from batchrun.errors import JobCannotSucceed, ResumeRefused
from batchrun.sim import MockConfig, start_in_thread
from batchrun.sim.batches import BATCHES
from batchrun.spec import JobSpec, load_spec
from tests.conftest import error_server, make_prompts, write_spec

KEY_ENV = "BATCHRUN_TEST_RETRY_KEY"
KEY = "sk-retry-secret-789"
ROOT = Path(__file__).resolve().parents[2]
N = 90
# backoff alone would come back within 0.5 s; a Retry-After of 2 s must win
RETRY = {"max_attempts": 6, "backoff_base_s": 0.05, "backoff_cap_s": 0.5}


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


def _spec_path(folder: Path, base_url: str) -> Path:
    if not (folder / "in.parquet").exists():
        make_prompts(folder / "in.parquet", N, row_group=50)
    return write_spec(folder, mode="batch", shard_rows=40, retry=RETRY,
                      batch={"max_requests_per_file": 30, "poll_interval_s": 0.2},
                      endpoint={"base_url": base_url, "api_key_env": KEY_ENV})


def _spec(folder: Path, base_url: str) -> JobSpec:
    return load_spec(str(_spec_path(folder, base_url)))


def _one_ok_per_row(folder: Path) -> None:
    files = sorted((folder / "out" / "results").glob("shard-*.parquet"))
    rows = pq.read_table(files).to_pylist()
    assert sorted(r["id"] for r in rows) == [f"r{i:06d}" for i in range(N)]
    assert {r["status"] for r in rows} == {"ok"}


def test_retry_after_on_the_batch_api_is_honoured(tmp_path: Path) -> None:
    cfg = MockConfig(batch_delay_s=0.3, api_key=KEY, batch_429_first=3, batch_retry_after_s=2)
    with start_in_thread(cfg) as srv:
        out = run_batch_job(_spec(tmp_path, srv.base_url), initial_poll_s=0.05)
        records = srv.records()
    assert out.pending == 0
    _one_ok_per_row(tmp_path)
    refused = [r for r in records if r["outcome"] == "rate_limited"]
    assert len(refused) == 3 and all(r["status"] == 429 for r in refused)
    after = next(r for r in records if r["outcome"] != "rate_limited")  # the first batch
    times = [r["t"] for r in refused] + [after["t"]]
    gaps = [b - a for a, b in pairwise(times)]
    assert min(gaps) >= 1.9, gaps  # each retry waited out the provider's 2 s


_DRIVER = "from batchrun.cli import main; main()"


def test_provider_that_keeps_refusing_exits_7_and_a_rerun_continues(tmp_path: Path) -> None:
    with start_in_thread(MockConfig(batch_delay_s=0.3, api_key=KEY)) as healthy:
        spec = _spec(tmp_path, healthy.base_url)
        assert run_batch_job(spec, wait=False, initial_poll_s=0.05).pending == 3
        state = (tmp_path / "out" / "batch" / "state.json").read_text()

        busy_cfg = MockConfig(api_key=KEY, batch_429_first=10**9, batch_retry_after_s=0.2)
        with start_in_thread(busy_cfg) as busy:
            path = _spec_path(tmp_path, busy.base_url)
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            p = subprocess.run([sys.executable, "-c", _DRIVER, "run", str(path), "--no-progress"],
                               env=env, capture_output=True, text=True, timeout=120)
            refused = [r for r in busy.records() if r["outcome"] == "rate_limited"]
        assert p.returncode == 7, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1, p.stderr
        assert "GET" in lines[0] and "/batches/batch_" in lines[0] and "HTTP 429" in lines[0]
        assert "Rate limit reached" in lines[0] and "6 attempts" in lines[0]
        assert "Traceback" not in p.stderr and KEY not in p.stderr + p.stdout
        assert len(refused) == RETRY["max_attempts"]  # the job's retry policy, then stop
        times = [r["t"] for r in refused]
        assert min(b - a for a, b in pairwise(times)) >= 0.19
        assert (tmp_path / "out" / "batch" / "state.json").read_text() == state  # intact

        out = run_batch_job(_spec(tmp_path, healthy.base_url), initial_poll_s=0.05)
        stats = healthy.stats()
    assert out.pending == 0
    _one_ok_per_row(tmp_path)
    assert stats["ok"] == N and stats["duplicate_ok_prompts"] == 0  # nothing sent twice
    assert stats["by_outcome"]["batch_created"] == 3  # the same three batches, collected


@pytest.fixture
def bad_request() -> Iterator[str]:
    """A provider that refuses every call for good (400), echoing the key it was sent."""
    with error_server(400, lambda auth: f"bad request from {auth}") as (url, _):
        yield url


def test_other_batch_failures_exit_with_documented_codes(tmp_path: Path,
                                                        bad_request: str) -> None:
    spec = _spec(tmp_path, bad_request)
    with pytest.raises(JobCannotSucceed) as e:  # was a FatalRequestError: exit 1
        run_batch_job(spec, initial_poll_s=0.05)
    msg = str(e.value)
    assert e.value.exit_code == 7 and "\n" not in msg and "HTTP 400" in msg
    assert "bad request from" in msg and KEY not in msg

    (tmp_path / "out" / "batch" / "state.json").write_text('{"job": ')  # a torn write
    with pytest.raises(ResumeRefused) as r:  # was a pydantic traceback
        run_batch_job(spec, initial_poll_s=0.05)
    assert r.value.exit_code == 2 and "state.json is unreadable" in str(r.value)


def test_create_that_times_out_is_found_not_made_twice(tmp_path: Path) -> None:
    # Each create's answer comes after the client gave up on it (read timeout), though
    # the batch exists: create retries under the provider's one retry loop, and before
    # each retry looks the batch up by metadata, so each chunk gets one batch.
    with start_in_thread(MockConfig(batch_delay_s=0.3, api_key=KEY)) as srv:
        srv.app[BATCHES].create_answer_delay_s = 3.0
        path = write_spec(tmp_path, mode="batch", shard_rows=40, retry=RETRY,
                          batch={"max_requests_per_file": 30, "poll_interval_s": 0.2},
                          endpoint={"base_url": srv.base_url, "api_key_env": KEY_ENV,
                                    "read_timeout_s": 1.0})
        make_prompts(tmp_path / "in.parquet", N, row_group=50)
        out = run_batch_job(load_spec(str(path)), initial_poll_s=0.05)
        stats = srv.stats()
    assert out.pending == 0 and len(out.batches) == 3
    _one_ok_per_row(tmp_path)
    assert stats["by_outcome"]["batch_created"] == 3 and stats["ok"] == N
    assert stats["duplicate_ok_prompts"] == 0
