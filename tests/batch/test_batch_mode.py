"""Batch mode end to end on the simulated provider: chunks, retries, crashes, no-wait, 404."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun.api.protocols import Completion
from batchrun.batch import run_batch_job
from batchrun.batch.run import batch_status, cancel_batches
from batchrun.errors import RetryableError, UserError
from batchrun.io.shards import plan_shards
from batchrun.io.summary import summarize
from batchrun.io.writer import ResultsStore
from batchrun.sim import MockConfig, RunningServer, answer_for, start_in_thread
from batchrun.sim.batches import BATCHES
from batchrun.spec import JobSpec, load_spec
from tests.conftest import error_server, make_prompts, write_spec

KEY_ENV = "BATCHRUN_TEST_BATCH_KEY"
KEY = "sk-batch-secret-123"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


def _spec(tmp_path: Path, base_url: str, n: int = 90, **batch: Any) -> JobSpec:
    make_prompts(tmp_path / "in.parquet", n, row_group=50)
    settings = {"max_requests_per_file": 30, "poll_interval_s": 0.2, **batch}
    path = write_spec(tmp_path, mode="batch", batch=settings, shard_rows=40,
                      endpoint={"base_url": base_url, "api_key_env": KEY_ENV})
    return load_spec(path)


def _results(spec: JobSpec) -> Any:
    files = sorted((Path(spec.output) / "results").glob("shard-*.parquet"))
    return pq.read_table(files).to_pylist() if files else []


def _assert_one_result_per_row(spec: JobSpec, n: int) -> list[dict[str, Any]]:
    rows = _results(spec)
    assert sorted(r["id"] for r in rows) == [f"r{i:06d}" for i in range(n)]
    for r in rows:
        assert r["status"] == "ok", r
        i = int(r["id"][1:])
        want = answer_for([{"role": "user", "content": f"Say something short about item {i}."}],
                          32)[0]
        assert r["response"] == want and r["topic"] == f"t{i % 7}" and r["batch_id"]
    return rows


def _outcomes(records: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        out[r["outcome"]] = out.get(r["outcome"], 0) + 1
    return out


def test_three_chunks_line_errors_and_an_expired_batch(tmp_path: Path) -> None:
    cfg = MockConfig(batch_delay_s=0.3, batch_line_error_rate=0.1, batch_expire_every=3,
                     api_key=KEY, seed=7)
    with start_in_thread(cfg) as srv:
        spec = _spec(tmp_path, srv.base_url)
        out = run_batch_job(spec, wait=True, initial_poll_s=0.05)
        stats = srv.stats()
    assert out.pending == 0 and out.fallback_rows == 0
    first = [b for b in out.batches if b["attempt"] == 1]
    assert len(first) == 3 and [b["rows"] for b in first] == [30, 30, 30]
    assert any(b["status"] == "expired" for b in out.batches)
    retried = [b for b in out.batches if b["attempt"] > 1]
    assert retried, "the expired batch's rows and line errors go into new batches"
    rows = _assert_one_result_per_row(spec, 90)
    assert max(r["attempts"] for r in rows) >= 2
    assert stats["by_outcome"]["server_error"] > 0
    # every row billed exactly once, and every batch created once
    assert stats["ok"] == 90 and stats["duplicate_ok_prompts"] == 0
    assert stats["by_outcome"]["batch_created"] == len(out.batches)
    assert sum(r["completion_tokens"] for r in rows) == stats["completion_tokens_billed"]
    store_files = ResultsStore(spec.output, pq.read_schema(
        next((Path(spec.output) / "results").glob("*.parquet")))).result_files()
    assert len(store_files) == len(plan_shards(spec))  # one per shard
    s = summarize(store_files, job=spec.name, wall_s=1.0,
                  run_started=datetime(2000, 1, 1, tzinfo=UTC), total_rows=90)
    assert s.rows == 90 and s.ok == 90 and s.cost_usd > 0
    state = (Path(spec.output) / "batch" / "state.json").read_text()
    assert KEY not in state


def test_no_wait_then_collect(tmp_path: Path) -> None:
    with start_in_thread(MockConfig(batch_delay_s=0.6, api_key=KEY)) as srv:
        spec = _spec(tmp_path, srv.base_url)
        first = run_batch_job(spec, wait=False, initial_poll_s=0.05)
        assert first.pending == 3 and _results(spec) == []
        status = batch_status(spec)
        assert len(status) == 3 and all(s["batch_id"] for s in status)
        assert all(s["request_counts"]["total"] in (0, 30) for s in status)
        time.sleep(0.8)
        second = run_batch_job(spec, wait=False, initial_poll_s=0.05)
        if second.pending:
            second = run_batch_job(spec, wait=True, initial_poll_s=0.05)
        stats = srv.stats()
    assert second.pending == 0
    _assert_one_result_per_row(spec, 90)
    assert stats["by_outcome"] == {"batch_created": 3, "ok": 90}


def test_stop_cancels_and_rerun_resends(tmp_path: Path) -> None:
    with start_in_thread(MockConfig(batch_delay_s=3.0, api_key=KEY)) as srv:
        spec = _spec(tmp_path, srv.base_url)
        assert run_batch_job(spec, wait=False, initial_poll_s=0.05).pending == 3
        assert cancel_batches(spec) == 3
        out = run_batch_job(spec, wait=True, initial_poll_s=0.05, retry_errors=False)
        stats = srv.stats()
    assert {b["status"] for b in out.batches if b["attempt"] == 1} == {"cancelled"}
    _assert_one_result_per_row(spec, 90)
    assert stats["ok"] == 90 and stats["duplicate_ok_prompts"] == 0


@pytest.fixture
def no_batch_api() -> Iterator[tuple[str, list[str]]]:
    with error_server(404) as stub:
        yield stub


def test_endpoint_without_batch_api(tmp_path: Path,
                                    no_batch_api: tuple[str, list[str]]) -> None:
    url, calls = no_batch_api
    spec = _spec(tmp_path, url)
    with pytest.raises(UserError) as e:
        run_batch_job(spec, wait=True, initial_poll_s=0.05)
    msg = str(e.value)
    assert "\n" not in msg and "no Batch API (404" in msg and "mode: online" in msg
    assert "fallback: online" in msg and KEY not in msg
    chunks = sorted((Path(spec.output) / "batch").glob("chunk-*.jsonl"))
    assert len(chunks) == 3 and _results(spec) == []  # nothing lost: rerun can go on
    assert "POST" not in calls  # found by the probe, before uploading anything
    spec2 = _spec(tmp_path / "fb", url, fallback="online")
    assert run_batch_job(spec2, wait=True).fallback_rows == 90


# -- crashes: the driver is a real process, killed -----------------------------------

_DRIVER = ("import sys; from batchrun.spec import load_spec; "
           "from batchrun.batch.run import run_batch_job; "
           "run_batch_job(load_spec(sys.argv[1]), wait=True, initial_poll_s=0.05)")


def _driver(spec_path: Path) -> subprocess.Popen[bytes]:
    child_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", _DRIVER, str(spec_path)], env=child_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _state(spec: JobSpec) -> dict[str, Any]:
    path = Path(spec.output) / "batch" / "state.json"
    return json.loads(path.read_text()) if path.exists() else {"chunks": []}


def _kill_driver(tmp_path: Path, srv: RunningServer, spec: JobSpec, hold_create: bool) -> None:
    """Kill -9 the driver once a chunk is recorded ``created``, or (``hold_create``) while
    the provider holds back the answer to the batch it just created (the ledger shows it):
    a batch that exists but that the state never recorded."""
    srv.app[BATCHES].create_answer_delay_s = 60.0 if hold_create else 0.0
    proc = _driver(tmp_path / "job.yaml")
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        if (any(r["outcome"] == "batch_created" for r in srv.records()) if hold_create
                else any(c["step"] == "created" for c in _state(spec)["chunks"])):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(10)
    srv.app[BATCHES].create_answer_delay_s = 0.0  # releases the held answer
    assert proc.returncode == -9, proc.stderr.read() if proc.stderr else ""


def _crash_and_rerun(tmp_path: Path, hold_create: bool, expect_step: str) -> None:
    with start_in_thread(MockConfig(batch_delay_s=1.5, api_key=KEY)) as srv:
        spec = _spec(tmp_path, srv.base_url)
        _kill_driver(tmp_path, srv, spec, hold_create)
        steps = [c["step"] for c in _state(spec)["chunks"]]
        assert "collected" not in steps and _results(spec) == []
        assert expect_step in steps
        out = run_batch_job(spec, wait=True, initial_poll_s=0.05)
        records = srv.records()
    assert out.pending == 0 and len(out.batches) == 3
    _assert_one_result_per_row(spec, 90)
    outcomes = _outcomes(records)
    assert outcomes == {"batch_created": 3, "ok": 90}  # each chunk created once
    ok_keys = [r["key"] for r in records if r["outcome"] == "ok"]
    assert len(set(ok_keys)) == 90  # each row billed once
    created = [r["key"] for r in records if r["outcome"] == "batch_created"]
    assert len(set(created)) == 3


def test_kill_9_after_batches_are_created(tmp_path: Path) -> None:
    _crash_and_rerun(tmp_path, hold_create=False, expect_step="created")


def test_crash_between_create_and_recording_it(tmp_path: Path) -> None:
    # Killed while POST /v1/batches is answered: the state still says uploaded.
    _crash_and_rerun(tmp_path, hold_create=True, expect_step="uploaded")


def test_a_batch_adopted_after_a_crash_counts_against_the_budget(tmp_path: Path) -> None:
    with start_in_thread(MockConfig(batch_delay_s=1.5, api_key=KEY)) as srv:
        spec = _spec(tmp_path, srv.base_url)
        _kill_driver(tmp_path, srv, spec, hold_create=True)
        w = [c["worst_usd"] for c in _state(spec)["chunks"]]
        assert len(w) == 3 and _state(spec)["chunks"][0]["step"] == "uploaded"
        # room for the adopted chunk and one more, not two more
        cap = w[0] + w[1] + 0.5 * w[2]
        spec = load_spec(str(write_spec(
            tmp_path, mode="batch", shard_rows=40, budget={"max_cost_usd": cap},
            batch={"max_requests_per_file": 30, "poll_interval_s": 0.2},
            endpoint={"base_url": srv.base_url, "api_key_env": KEY_ENV})))
        out = run_batch_job(spec, wait=True, initial_poll_s=0.05)
        stats = srv.stats()
        assert out.budget_exhausted and stats["by_outcome"]["batch_created"] == 2
        assert len(_results(spec)) == 60 and stats["ok"] == 60
        spec = _spec(tmp_path, srv.base_url)  # the cap lifted: the last chunk goes
        assert run_batch_job(spec, wait=True, initial_poll_s=0.05).pending == 0
        stats = srv.stats()
    _assert_one_result_per_row(spec, 90)
    assert stats["by_outcome"] == {"batch_created": 3, "ok": 90}


def test_check_rejects_answers_and_extra_columns(tmp_path: Path) -> None:
    def check(c: Completion) -> dict[str, Any]:
        if c.text and c.text.startswith("the"):  # deterministic answers: always invalid
            raise RetryableError("not what the schema wants", error_type="invalid_output")
        return {"parsed": (c.text or "").upper()}

    with start_in_thread(MockConfig(batch_delay_s=0.2, api_key=KEY)) as srv:
        make_prompts(tmp_path / "in.parquet", 90, row_group=50)
        path = write_spec(tmp_path, mode="batch", shard_rows=40,
                          batch={"max_requests_per_file": 30, "poll_interval_s": 0.2},
                          retry={"max_attempts": 2},
                          endpoint={"base_url": srv.base_url, "api_key_env": KEY_ENV})
        spec = load_spec(path)
        out = run_batch_job(spec, check=check, extra_fields=[pa.field("parsed", pa.string())],
                            initial_poll_s=0.05)
        stats = srv.stats()
    rows = _results(spec)
    bad = [r for r in rows if r["status"] == "error"]
    assert len(rows) == 90 and bad and out.pending == 0
    assert {(r["error_type"], r["attempts"]) for r in bad} == {("invalid_output", 2)}
    assert all(r["parsed"] == r["response"].upper() for r in rows if r["status"] == "ok")
    assert stats["ok"] == 90 + len(bad)  # a rejected answer is billed, then asked again


def test_fallback_online_leaves_failed_rows_unanswered(tmp_path: Path) -> None:
    cfg = MockConfig(batch_delay_s=0.2, batch_line_error_rate=0.3, api_key=KEY, seed=1)
    with start_in_thread(cfg) as srv:
        spec = _spec(tmp_path, srv.base_url, fallback="online")
        out = run_batch_job(spec, initial_poll_s=0.05)
        stats = srv.stats()
    assert out.pending == 0 and out.fallback_rows == stats["by_outcome"]["server_error"] > 0
    assert len(out.batches) == 3  # no retry batches: the online path takes those rows
    store = ResultsStore(spec.output, pq.read_schema(
        next((Path(spec.output) / "parts").glob("*/*.parquet"))))
    shards = [s.name for s in plan_shards(spec)]
    answered = sum(len(store.answered_ids(s, redo_errors=False)) for s in shards)
    assert answered == 90 - out.fallback_rows == stats["ok"]
