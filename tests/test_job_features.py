"""Job behaviour end to end: errors, overlap, resume, budget, secrets, batch and structured."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray

from batchrun.mockserver import MockConfig, max_in_window, start_subprocess
from batchrun.runner import RunOptions, run_job
from batchrun.summary import percentile
from tests.conftest import make_prompts, write_spec

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(180)]
QUIET = RunOptions(progress=False)
FAST = {"rpm": 100_000, "max_concurrency": 32}


def results(out: Path) -> pa.Table:
    return pq.read_table(sorted((out / "results").glob("shard-*.parquet")))


def test_non_retryable_errors_are_recorded_once(tmp_path: Path) -> None:
    make_prompts(tmp_path / "in.parquet", 60)
    with start_subprocess(MockConfig(unknown_models=("gone-model",))) as server:
        spec = write_spec(tmp_path, endpoint={"base_url": server.base_url}, model="gone-model",
                          price=0, limits=FAST)
        summary = run_job(str(spec), QUIET)
        stats = server.stats()
    t = results(tmp_path / "out")
    assert set(t["error_type"].to_pylist()) == {"http_404"}
    assert set(t["attempts"].to_pylist()) == {1}
    assert stats["total_requests"] == 60 and summary.errors_by_type == {"http_404": 60}


def test_wrong_key_is_401_and_not_retried(tmp_path: Path, monkeypatch) -> None:
    make_prompts(tmp_path / "in.parquet", 20)
    monkeypatch.setenv("T_WRONG_KEY", "not-the-key")
    with start_subprocess(MockConfig(api_key="the-key")) as server:
        spec = write_spec(tmp_path, endpoint={"base_url": server.base_url,
                                              "api_key_env": "T_WRONG_KEY"}, limits=FAST)
        run_job(str(spec), QUIET)
        stats = server.stats()
    assert set(results(tmp_path / "out")["error_type"].to_pylist()) == {"http_401"}
    assert stats["total_requests"] == 20


def test_requests_overlap_instead_of_one_by_one(tmp_path: Path) -> None:
    make_prompts(tmp_path / "in.parquet", 64)
    with start_subprocess(MockConfig(latency_ms=500)) as server:
        spec = write_spec(tmp_path, endpoint={"base_url": server.base_url},
                          limits={"rpm": 100_000, "max_concurrency": 64})
        run_job(str(spec), QUIET)
        arrivals = [r["t"] for r in server.records()]
    # requests awaited one by one would arrive 500 ms apart; here dozens arrive
    # before the first answer could have come back
    assert max_in_window(sorted(arrivals), 0.5) >= 32


def test_null_and_empty_prompts_are_row_errors(tmp_path: Path) -> None:
    prompts = ["hello"] * 10 + [None, "", "   "]
    ids = [f"r{i:06d}" for i in range(len(prompts))]
    pq.write_table(pa.table({"id": ids, "prompt": prompts, "topic": ["t"] * len(ids)}),
                   tmp_path / "in.parquet")
    with start_subprocess(MockConfig()) as server:
        spec = write_spec(tmp_path, endpoint={"base_url": server.base_url}, limits=FAST)
        summary = run_job(str(spec), QUIET)
    assert summary.ok == 10 and summary.errors_by_type == {"bad_row": 3}


def test_resume_sends_only_what_is_missing(tmp_path: Path) -> None:
    make_prompts(tmp_path / "in.parquet", 600)
    out = tmp_path / "out"
    with start_subprocess(MockConfig()) as server:
        spec = write_spec(tmp_path, endpoint={"base_url": server.base_url}, limits=FAST)
        run_job(str(spec), QUIET)
        assert server.stats()["total_requests"] == 600
        again = run_job(str(spec), QUIET)  # complete: nothing is sent
        assert again.rows_this_run == 0 and server.stats()["total_requests"] == 600
        (out / "results" / "shard-000001.parquet").unlink()  # lost: redo its 200 rows
        (out / "results" / "shard-000002.parquet").write_bytes(b"not parquet")  # corrupt
        third = run_job(str(spec), QUIET)
        stats = server.stats()
    assert third.rows_this_run == 400 and stats["total_requests"] == 1000
    assert sorted(results(out)["id"].to_pylist()) == [f"r{i:06d}" for i in range(600)]
    assert len(list((out / "quarantine").iterdir())) == 1


def test_budget_cap_holds_with_requests_in_flight_and_resumes(tmp_path: Path) -> None:
    n = 400
    make_prompts(tmp_path / "in.parquet", n)
    price = {"input_per_1m": 2000.0, "output_per_1m": 2000.0}  # ~$0.1 a row: easy sums
    with start_subprocess(MockConfig(latency_ms=50)) as server:
        spec = write_spec(tmp_path, endpoint={"base_url": server.base_url}, price=price,
                          limits={"rpm": 100_000, "max_concurrency": 64},
                          budget={"max_cost_usd": 10.0})
        first = run_job(str(spec), QUIET)
        s1 = server.stats()
        billed1 = (s1["prompt_tokens_billed"] + s1["completion_tokens_billed"]) * 2000 / 1e6
        assert first.budget_exhausted and first.unsent > 0
        assert billed1 <= 10.0  # measured from the provider's usage, not our own sums
        assert billed1 > 10.0 / 3  # it did spend (the full job costs several times the cap)
        spec = write_spec(tmp_path, endpoint={"base_url": server.base_url}, price=price,
                          limits={"rpm": 100_000, "max_concurrency": 64},
                          budget={"max_cost_usd": 100.0})
        second = run_job(str(spec), QUIET)
        s2 = server.stats()
    assert not second.budget_exhausted and second.unsent == 0 and second.ok == n
    assert s2["duplicate_ok_prompts"] == 0 and s2["ok"] == n
    assert abs(second.cost_usd - (s2["prompt_tokens_billed"] + s2["completion_tokens_billed"])
               * 2000 / 1e6) < 1e-6


def test_api_key_never_leaks_into_outputs_or_logs(tmp_path: Path, monkeypatch) -> None:
    key = "sk-batchrun-leak-canary-7f3a9c1e5b"
    make_prompts(tmp_path / "in.parquet", 100)
    monkeypatch.setenv("T_CANARY_KEY", key)
    with start_subprocess(MockConfig(api_key=key, fail_rate=0.1, seed=3)) as server:
        spec = write_spec(tmp_path, endpoint={"base_url": server.base_url,
                                              "api_key_env": "T_CANARY_KEY"}, limits=FAST)
        summary = run_job(str(spec), QUIET)
    assert summary.ok == 100  # the key reached the workers
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    places = [tmp_path / "out", session / "logs"]
    hits = subprocess.run(["grep", "-rl", key, *map(str, places)], capture_output=True, text=True)
    assert hits.stdout == "", hits.stdout


def test_batch_mode_through_the_runner_with_online_fallback(tmp_path: Path) -> None:
    make_prompts(tmp_path / "in.parquet", 60, row_group=30)
    spec = write_spec(
        tmp_path, mode="batch", shard_rows=30, limits=FAST,
        batch={"max_requests_per_file": 20, "poll_interval_s": 0.5, "fallback": "online"},
        simulate={"batch_delay_s": 0.3, "batch_line_error_rate": 0.2, "seed": 2})
    summary = run_job(str(spec), QUIET)
    t = results(tmp_path / "out")
    assert summary.ok == 60 and sorted(t["id"].to_pylist()) == [f"r{i:06d}" for i in range(60)]
    online = t.filter(pc.is_null(t["batch_id"]))
    assert 0 < online.num_rows < 60  # line errors went online, the rest came from batches


def test_batch_no_wait_exits_pending_then_collects(tmp_path: Path) -> None:
    make_prompts(tmp_path / "in.parquet", 40)
    spec = write_spec(tmp_path, mode="batch", limits=FAST,
                      batch={"max_requests_per_file": 20, "poll_interval_s": 0.5},
                      simulate={"batch_delay_s": 0.5})
    cli = [sys.executable, "-m", "batchrun", "run", str(spec), "--no-progress"]
    first = subprocess.run([*cli, "--no-wait"], capture_output=True, text=True, timeout=60)
    assert first.returncode == 10, first.stderr[-1500:]
    assert "pending" in first.stderr


def test_structured_output_online_with_typed_columns(tmp_path: Path) -> None:
    make_prompts(tmp_path / "in.parquet", 80)
    schema = {"type": "object", "additionalProperties": False,
              "required": ["label", "score", "tags"],
              "properties": {"label": {"type": "string", "enum": ["pos", "neg"]},
                             "score": {"type": "integer", "minimum": 0, "maximum": 9},
                             "tags": {"type": "array", "items": {"type": "string"}}}}
    with start_subprocess(MockConfig(invalid_json_rate=0.05, seed=4)) as server:
        spec = write_spec(tmp_path, endpoint={"base_url": server.base_url}, limits=FAST,
                          generation={"max_tokens": 200},
                          response_format={"json_schema": schema, "expand": True})
        summary = run_job(str(spec), QUIET)
    t = results(tmp_path / "out")
    assert t.schema.field("score").type == pa.int64()
    assert t.schema.field("tags").type == pa.list_(pa.string())
    ok = t.filter(pc.equal(t["status"], "ok"))
    assert set(ok["label"].to_pylist()) <= {"pos", "neg"}
    assert summary.ok + summary.errors_by_type.get("invalid_output", 0) == 80
    assert int(pc.sum(t["attempts"]).as_py()) > 80  # invalid answers were retried


def test_percentile_is_linear_interpolation() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100, 1001):
        x = rng.exponential(100, n)
        got = percentile(pa.array(x), [0.5, 0.95, 0.99])
        assert np.allclose(got, np.percentile(x, [50, 95, 99]))
    assert percentile(pa.array([], pa.float64()), [0.5]) == [None]


def test_oversized_and_non_json_answers_are_row_errors(tmp_path: Path) -> None:
    make_prompts(tmp_path / "in.parquet", 100)
    cfg = MockConfig(oversize_rate=0.1, oversize_bytes=2_000_000, nonjson_rate=0.1, seed=9)
    with start_subprocess(cfg) as server:
        spec = write_spec(tmp_path, limits=FAST, retry={"max_attempts": 1},
                          endpoint={"base_url": server.base_url, "max_response_bytes": 100_000})
        summary = run_job(str(spec), QUIET)
    assert summary.rows == 100
    assert summary.errors_by_type.get("response_too_large", 0) > 0
    assert summary.errors_by_type.get("http_502", 0) > 0  # an HTML error page: retryable


def test_daily_ledger_is_shared_by_jobs(tmp_path: Path) -> None:
    price = {"input_per_1m": 2000.0, "output_per_1m": 2000.0}
    budget = {"daily_usd": 6.0, "ledger_dir": str(tmp_path / "ledger"),
              "timezone": "Asia/Ho_Chi_Minh"}
    billed = 0.0
    with start_subprocess(MockConfig(latency_ms=20)) as server:
        for name in ("job-a", "job-b"):
            folder = tmp_path / name
            make_prompts(folder / "in.parquet", 150)
            spec = write_spec(folder, name=name, endpoint={"base_url": server.base_url},
                              price=price, limits=FAST, budget=budget)
            run_job(str(spec), QUIET)
        s = server.stats()
        billed = (s["prompt_tokens_billed"] + s["completion_tokens_billed"]) * 2000 / 1e6
    assert 3.0 < billed <= 6.0  # both jobs together stayed under the shared daily cap


def test_batch_mode_budget_reserves_chunks_at_the_batch_price(tmp_path: Path) -> None:
    make_prompts(tmp_path / "in.parquet", 90, row_group=30)
    price = {"input_per_1m": 2000.0, "output_per_1m": 2000.0,
             "batch_input_per_1m": 1000.0, "batch_output_per_1m": 1000.0}
    common = dict(mode="batch", shard_rows=30, limits=FAST, price=price,
                  batch={"max_requests_per_file": 30, "poll_interval_s": 0.5},
                  simulate={"batch_delay_s": 0.2})
    spec = write_spec(tmp_path, budget={"max_cost_usd": 4.0}, **common)
    first = run_job(str(spec), QUIET)
    # a 30-row chunk's worst case is ~30 x (40 + 32 tokens) x $0.001 = ~$2.2: one fits in $4
    assert first.budget_exhausted and 0 < first.rows < 90 and first.cost_usd <= 4.0
    spec = write_spec(tmp_path, budget={"max_cost_usd": 50.0}, **common)
    second = run_job(str(spec), QUIET)
    assert second.ok == 90 and not second.budget_exhausted and second.cost_usd <= 50.0


def test_batch_mode_draws_chunks_from_the_daily_ledger(tmp_path: Path) -> None:
    make_prompts(tmp_path / "in.parquet", 90, row_group=30)
    price = {"input_per_1m": 2000.0, "output_per_1m": 2000.0,
             "batch_input_per_1m": 1000.0, "batch_output_per_1m": 1000.0}
    spec = write_spec(tmp_path, mode="batch", shard_rows=30, limits=FAST, price=price,
                      batch={"max_requests_per_file": 30, "poll_interval_s": 0.5},
                      simulate={"batch_delay_s": 0.2},
                      budget={"daily_usd": 4.0, "ledger_dir": str(tmp_path / "ledger")})
    summary = run_job(str(spec), QUIET)
    assert summary.budget_exhausted and 0 < summary.rows < 90 and summary.cost_usd <= 4.0
