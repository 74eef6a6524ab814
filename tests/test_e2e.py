"""End to end: real local Ray, a real loopback provider, real Parquet in and out."""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from batchrun.io.writer import RESULT_FIELDS
from batchrun.runner import RunOptions, run_job
from batchrun.sim import MockConfig, start_subprocess
from tests.conftest import make_prompts, write_spec

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(180)]

QUIET = RunOptions(progress=False)


def read_results(out: Path):
    return pq.read_table(sorted((out / "results").glob("shard-*.parquet")))


def endpoint(server, key_env: str | None = None) -> dict:
    ep = {"base_url": server.base_url}
    if key_env:
        ep["api_key_env"] = key_env
    return ep


def test_1200_rows_with_faults_under_rpm_every_row_once(tmp_path, monkeypatch):
    make_prompts(tmp_path / "in.parquet", 1200)
    monkeypatch.setenv("T_KEY", "k-e2e-secret")
    rpm = 6000  # the limiter still binds: 64 in flight at 20 ms could send 3,200 a second
    cfg = MockConfig(rpm=rpm, latency_ms=20, fail_rate=0.03, reset_rate=0.01,
                     malformed_rate=0.01, api_key="k-e2e-secret", seed=1)
    with start_subprocess(cfg) as server:  # the provider in its own process, as in real life
        spec = write_spec(tmp_path, endpoint=endpoint(server, "T_KEY"),
                          limits={"rpm": rpm, "max_concurrency": 64})
        summary = run_job(str(spec), QUIET)
        stats = server.stats()
    t = read_results(tmp_path / "out")
    ids = t["id"].to_pylist()
    assert sorted(ids) == [f"r{i:06d}" for i in range(1200)]  # every row, exactly once
    assert t.schema.names[: len(RESULT_FIELDS)] == [f.name for f in RESULT_FIELDS]
    assert "topic" in t.schema.names
    assert summary.ok == 1200 and summary.rows == 1200
    # the provider is the judge: its windows never saw more than the limit
    assert stats["max_arrivals_60s"] <= rpm
    assert stats["max_arrivals_10s"] <= rpm // 6
    assert stats["by_outcome"].get("rate_limited", 0) == 0
    assert stats["ok"] == 1200 and stats["duplicate_ok_prompts"] == 0
    faults = sum(stats["by_outcome"].get(k, 0) for k in ("server_error", "reset", "malformed"))
    assert faults > 0
    assert summary.retries == faults  # every injected fault was retried, and only those
    assert int(pc.sum(t["attempts"]).as_py()) == stats["total_requests"]
    # the summary agrees with the results files
    assert summary.prompt_tokens == int(pc.sum(t["prompt_tokens"]).as_py())
    assert summary.prompt_tokens == stats["prompt_tokens_billed"]
