"""Job behaviour end to end: errors, overlap, resume, budget, secrets, batch and structured."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray

from batchrun.errors import JobCannotSucceed
from batchrun.io.summary import errors_line, exit_code, percentile, summarize
from batchrun.runner import RunOptions, run_job
from batchrun.schedule.state import _status_for
from batchrun.sim import MockConfig, max_in_window, start_subprocess
from tests.conftest import make_prompts, write_spec

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(180)]
QUIET = RunOptions(progress=False)
FAST = {"rpm": 100_000, "max_concurrency": 32}


def results(out: Path) -> pa.Table:
    return pq.read_table(sorted((out / "results").glob("shard-*.parquet")))


def test_non_retryable_errors_are_recorded_once(tmp_path: Path) -> None:
    make_prompts(tmp_path / "in.parquet", 60)
    with start_subprocess(MockConfig(unknown_models=("gone-model",))) as server:
        # the breaker off: what every 404 row looks like once the endpoint is known to work
        spec = write_spec(tmp_path, endpoint={"base_url": server.base_url}, model="gone-model",
                          price=0, limits=FAST, retry={"max_attempts": 6, "breaker_requests": 0})
        summary = run_job(str(spec), QUIET)
        stats = server.stats()
    t = results(tmp_path / "out")
    assert set(t["error_type"].to_pylist()) == {"http_404"}
    assert set(t["attempts"].to_pylist()) == {1}
    assert stats["total_requests"] == 60 and summary.errors_by_type == {"http_404": 60}


def written(out: Path) -> pa.Table:
    """Every row on disk: final shard files and checkpoint parts."""
    files = sorted((out / "results").glob("*.parquet")) + sorted(out.glob("parts/*/*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else pa.table(
        {"id": pa.array([], pa.string()), "status": pa.array([], pa.string())})


def _cli(spec: Path, env: dict[str, str], *extra: str) -> tuple[subprocess.CompletedProcess[str],
                                                                 float]:
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "batchrun", "run", str(spec), "--address", address,
           "--no-progress", *extra]
    t0 = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=170,
                          env={**os.environ, **env})
    return done, time.monotonic() - t0


def test_wrong_key_stops_in_seconds_then_the_right_key_sends_every_row(tmp_path: Path) -> None:
    n, wrong = 3000, "sk-wrong-0123456789abcdef"
    make_prompts(tmp_path / "in.parquet", n)
    with start_subprocess(MockConfig(api_key="sk-the-right-key")) as server:
        spec = write_spec(tmp_path, endpoint={"base_url": server.base_url,
                                              "api_key_env": "T_BREAKER_KEY"}, limits=FAST)
        first, seconds = _cli(spec, {"T_BREAKER_KEY": wrong})
        sent = server.stats()["total_requests"]
        lines = [ln for ln in first.stderr.splitlines() if "batchrun: error" in ln]
        assert first.returncode == 7, first.stderr[-2000:]
        assert len(lines) == 1, first.stderr[-2000:]
        # one line: the status, the provider's message, the URL; never the key
        for part in ("HTTP 401", "Incorrect API key", f"{server.base_url}/chat/completions"):
            assert part in lines[0], lines[0]
        assert wrong not in first.stderr + first.stdout
        assert sent < n // 10, sent  # stopped after a few dozen requests, not the input
        assert seconds < 90, seconds  # Ray is already up: seconds, with a loaded machine
        assert (pc.sum(pc.equal(written(tmp_path / "out")["status"], "error")).as_py()
                or 0) == 0  # nothing recorded as an error: the rerun sends those rows
        second, _ = _cli(spec, {"T_BREAKER_KEY": "sk-the-right-key"})
        assert second.returncode == 0, second.stderr[-2000:]
        assert server.stats()["ok"] == n
    t = results(tmp_path / "out")
    assert t.num_rows == n and set(t["status"].to_pylist()) == {"ok"}


def test_base_url_without_v1_stops_on_404(tmp_path: Path) -> None:
    make_prompts(tmp_path / "in.parquet", 400)
    with start_subprocess(MockConfig()) as server:
        root = server.base_url.removesuffix("/v1")
        spec = write_spec(tmp_path, endpoint={"base_url": root}, limits=FAST)
        with pytest.raises(JobCannotSucceed) as stop:
            run_job(str(spec), QUIET)
        sent = server.stats()["total_requests"]
    assert stop.value.exit_code == 7
    assert "HTTP 404" in str(stop.value) and f"{root}/chat/completions" in str(stop.value)
    assert "\n" not in str(stop.value) and sent < 100, sent


def test_dead_port_stops_on_connection_refused(tmp_path: Path) -> None:
    make_prompts(tmp_path / "in.parquet", 400)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    spec = write_spec(tmp_path, endpoint={"base_url": f"http://127.0.0.1:{port}/v1"},
                      limits=FAST)
    with pytest.raises(JobCannotSucceed) as stop:
        run_job(str(spec), QUIET)
    assert "connection refused" in str(stop.value) and f"127.0.0.1:{port}" in str(stop.value)
    assert written(tmp_path / "out").num_rows == 0  # every row left for the rerun


def test_error_rate_above_max_stops_and_a_rerun_sends_only_the_rest(tmp_path: Path) -> None:
    n = 2000
    make_prompts(tmp_path / "in.parquet", n)
    retry = {"max_attempts": 1, "max_error_rate": 0.5}
    with start_subprocess(MockConfig(fail_rate=0.7, latency_ms=50, seed=1)) as server:
        spec = write_spec(tmp_path, endpoint={"base_url": server.base_url}, retry=retry,
                          flush_rows=50, limits={"rpm": 100_000, "max_concurrency": 16})
        with pytest.raises(JobCannotSucceed) as stop:
            run_job(str(spec), QUIET)
        sent = server.stats()["total_requests"]
    assert "max_error_rate 50%" in str(stop.value) and "http_500" in str(stop.value)
    kept = written(tmp_path / "out")
    assert 200 <= kept.num_rows <= sent < n * 0.6, (kept.num_rows, sent)
    with start_subprocess(MockConfig()) as server:  # the provider recovered
        spec = write_spec(tmp_path, endpoint={"base_url": server.base_url}, retry=retry,
                          flush_rows=50, limits={"rpm": 100_000, "max_concurrency": 16})
        summary = run_job(str(spec), QUIET)
        again = server.stats()["total_requests"]
    assert again == n - len(set(kept["id"].to_pylist()))  # answered rows were kept
    assert summary.rows == n and summary.errors > 0  # the old errors stay until --retry-errors


def test_error_rate_below_max_finishes_with_exit_6_and_counts_them(tmp_path: Path) -> None:
    make_prompts(tmp_path / "in.parquet", 400)
    spec = write_spec(tmp_path, limits=FAST, retry={"max_attempts": 1},
                      simulate={"fail_rate": 0.2, "seed": 3})
    done, _ = _cli(spec, {})
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert done.returncode == 6, done.stderr[-2000:]
    assert 40 < summary["errors"] < 120 and summary["rows"] == 400
    assert f"{summary['errors']:,} of 400 rows ended in error" in done.stderr
    assert "--retry-errors" in done.stderr


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
        # one worker: 600 rows are 3 shards of shard_rows (200), not smaller ones
        spec = write_spec(tmp_path, endpoint={"base_url": server.base_url}, limits=FAST,
                          workers=1)
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
    # a provider that outlives the command (--no-wait with simulate: is refused)
    with start_subprocess(MockConfig(batch_delay_s=1.0)) as server:
        spec = write_spec(tmp_path, mode="batch", limits=FAST,
                          endpoint={"base_url": server.base_url},
                          batch={"max_requests_per_file": 20, "poll_interval_s": 0.5})
        first, _ = _cli(spec, {}, "--no-wait")
        assert first.returncode == 10, first.stderr[-1500:]
        assert "pending" in first.stderr
        second, _ = _cli(spec, {})
        assert second.returncode == 0, second.stderr[-1500:]
    t = results(tmp_path / "out")
    assert t.num_rows == 40 and set(t["status"].to_pylist()) == {"ok"}


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


def test_exit_code_precedence_and_the_scheduler_counts_6_and_7_as_failed() -> None:
    s = summarize([], job="j", wall_s=1.0, run_started=datetime.now(UTC), total_rows=0)
    assert exit_code(s) == 0 and errors_line(s) is None  # (rows left unsent: 7, see
    # tests/test_batch_units.py)
    err = s.model_copy(update={"rows": 5, "errors": 2, "errors_by_type": {"http_500": 2}})
    assert exit_code(err) == 6
    assert errors_line(err, "batchrun run j.yaml") == (
        "2 of 5 rows ended in error (http_500 2); `batchrun run j.yaml --retry-errors` "
        "re-sends them")
    assert exit_code(err.model_copy(update={"budget_exhausted": True})) == 4
    assert exit_code(err.model_copy(update={"budget_exhausted": True,
                                            "pending_batches": 1})) == 10
    assert _status_for(6) == _status_for(7) == "failed"


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
