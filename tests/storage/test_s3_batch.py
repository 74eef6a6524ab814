"""Batch mode with its output on a real S3 protocol server (moto, loopback): the state
and the JSONL chunks are objects in the store, and a rerun adopts them from there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from batchrun.batch import run_batch_job
from batchrun.runner import RunOptions, run_job
from batchrun.sim import MockConfig, RunningServer, start_in_thread
from batchrun.spec import JobSpec, load_spec
from tests.conftest import make_prompts, write_spec
from tests.storage.conftest import keys, s3_client

pytestmark = pytest.mark.timeout(180)
KEY_ENV = "BATCHRUN_TEST_BATCH_KEY"
KEY = "sk-batch-secret-s3"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


def _spec_path(tmp_path: Path, bucket: str, base_url: str) -> Path:
    make_prompts(tmp_path / "in.parquet", 90, row_group=50)
    return write_spec(tmp_path, mode="batch", output=f"s3://{bucket}/out/",
                      batch={"max_requests_per_file": 30, "poll_interval_s": 0.2},
                      shard_rows=40, endpoint={"base_url": base_url, "api_key_env": KEY_ENV})


def _state(bucket: str) -> dict[str, Any]:
    try:
        got = s3_client().get_object(Bucket=bucket, Key="out/batch/state.json")
    except Exception:  # not written yet
        return {"chunks": []}
    return dict(json.loads(got["Body"].read()))


def _results(bucket: str) -> list[dict[str, Any]]:
    s3 = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"],
                           region="us-east-1")
    finals = [f"{bucket}/{k}" for k in keys(bucket, "out/results/shard-")]
    return pq.read_table(finals, filesystem=s3).to_pylist() if finals else []


def _one_per_row(bucket: str) -> None:
    rows = _results(bucket)
    assert sorted(r["id"] for r in rows) == [f"r{i:06d}" for i in range(90)]
    assert {r["status"] for r in rows} == {"ok"}


def _outcomes(srv: RunningServer) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in srv.records():
        out[r["outcome"]] = out.get(r["outcome"], 0) + 1
    return out


def test_batch_mode_end_to_end_with_the_output_on_s3(tmp_path: Path, bucket: str) -> None:
    with start_in_thread(MockConfig(batch_delay_s=0.3, api_key=KEY)) as srv:
        spec = _spec_path(tmp_path, bucket, srv.base_url)
        summary = run_job(str(spec), RunOptions(progress=False))
        outcomes = _outcomes(srv)
    assert summary.ok == 90
    assert outcomes == {"batch_created": 3, "ok": 90}
    out = keys(bucket, "out/")
    chunks = [k for k in out if k.startswith("out/batch/chunk-")]
    assert len(chunks) == 3  # the JSONL chunks are objects in the store
    assert "out/batch/state.json" in out and "out/lease.json" not in out
    assert not [k for k in out if "/parts/" in k]
    state = _state(bucket)
    assert [c["step"] for c in state["chunks"]] == ["collected"] * 3
    assert KEY not in json.dumps(state)
    first = s3_client().get_object(Bucket=bucket, Key=chunks[0])["Body"].read()
    assert len(first.splitlines()) == 30 and b'"custom_id"' in first
    _one_per_row(bucket)


_DRIVER = ("import sys; from batchrun.spec import load_spec; "
           "from batchrun.batch.run import run_batch_job; "
           "run_batch_job(load_spec(sys.argv[1]), wait=True, initial_poll_s=0.05)")


def _kill_after_create(spec_path: Path, bucket: str) -> None:
    """Kill -9 a driver (a real process) once the state in the store records a batch."""
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(spec_path)],
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if any(c["step"] == "created" for c in _state(bucket)["chunks"]):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(10)
    assert proc.returncode == -9, proc.stderr.read() if proc.stderr else ""


def test_kill_9_after_create_then_a_rerun_adopts_the_state_from_s3(tmp_path: Path,
                                                                   bucket: str) -> None:
    with start_in_thread(MockConfig(batch_delay_s=1.5, api_key=KEY)) as srv:
        path = _spec_path(tmp_path, bucket, srv.base_url)
        _kill_after_create(path, bucket)
        steps = [c["step"] for c in _state(bucket)["chunks"]]
        assert "created" in steps and "collected" not in steps
        assert _results(bucket) == []
        spec: JobSpec = load_spec(path)
        out = run_batch_job(spec, wait=True, initial_poll_s=0.05)
        records = srv.records()
    assert out.pending == 0 and len(out.batches) == 3
    _one_per_row(bucket)
    created = [r["key"] for r in records if r["outcome"] == "batch_created"]
    assert len(created) == len(set(created)) == 3  # one batch per chunk, none made twice
    ok = [r["key"] for r in records if r["outcome"] == "ok"]
    assert len(ok) == len(set(ok)) == 90  # each row billed once


def test_a_stale_state_writer_is_refused(tmp_path: Path, bucket: str) -> None:
    """Two drivers of one output: the one whose view of the state is stale cannot
    overwrite the other's record (conditional write on the state object)."""
    from batchrun.batch.state import StateFile
    from batchrun.errors import OutputError

    with start_in_thread(MockConfig(batch_delay_s=0.1, api_key=KEY)) as srv:
        spec = load_spec(_spec_path(tmp_path, bucket, srv.base_url))
    a, b = StateFile(spec.output), StateFile(spec.output)
    sa, sb = a.load(spec, "tag"), b.load(spec, "tag")
    a.save(sa)  # created by a
    sb.next_seq = 1  # (the same bytes again would be no change at all)
    with pytest.raises(OutputError, match="changed by another driver"):
        b.save(sb)  # b saw no state: its create loses
    sa.next_seq = 5
    a.save(sa)  # a's own version: replaced
    sb2 = b.load(spec)
    sb2.next_seq = 6
    a.save(sa.model_copy(update={"next_seq": 7}))
    with pytest.raises(OutputError, match="changed by another driver"):
        b.save(sb2)
    assert _state(bucket)["next_seq"] == 7
