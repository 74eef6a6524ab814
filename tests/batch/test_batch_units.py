"""Batch mode's small rules, each on real objects: the exit code of rows left unsent, the
Retry-After cap, a refused answer kept with what it cost, a refused key (401/403), the
state file's commit."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from batchrun.api.protocols import Completion
from batchrun.api.retry import MAX_RETRY_AFTER_S, pause_s
from batchrun.batch import run_batch_job
from batchrun.batch.collect import collect_chunk
from batchrun.batch.provider import LONG_WAIT_S, BatchProvider
from batchrun.batch.requests import custom_id
from batchrun.batch.state import BatchJobState, ChunkState, StateFile
from batchrun.cli import app
from batchrun.errors import JobCannotSucceed, OutputError, RateLimited, RetryableError
from batchrun.io.shards import plan_shards
from batchrun.io.summary import exit_code, summarize
from batchrun.money.pricing import cost_usd, price_for
from batchrun.spec import JobSpec, load_spec
from tests.conftest import error_server, make_prompts, write_spec

KEY_ENV = "BATCHRUN_TEST_UNITS_KEY"
KEY = "sk-units-secret-0f0f"


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


def _spec(tmp_path: Path, base_url: str = "http://127.0.0.1:9/v1", n: int = 10) -> JobSpec:
    make_prompts(tmp_path / "in.parquet", n)
    return load_spec(str(write_spec(
        tmp_path, mode="batch", retry={"max_attempts": 1},
        endpoint={"base_url": base_url, "api_key_env": KEY_ENV})))


# -- finding 1: rows left unsent are never a success ----------------------------------


def test_unsent_rows_without_a_reason_exit_7() -> None:
    s = summarize([], job="j", wall_s=1.0, run_started=datetime.now(UTC), total_rows=5)
    assert s.unsent == 5 and s.errors == 0
    assert exit_code(s) == JobCannotSucceed.exit_code == 7  # was 0: a silent success
    assert exit_code(s.model_copy(update={"budget_exhausted": True})) == 4  # its own reason
    assert exit_code(s.model_copy(update={"pending_batches": 2})) == 10
    assert exit_code(s.model_copy(update={"unsent": 0})) == 0
    assert exit_code(s.model_copy(update={"unsent": 0, "errors": 1})) == 6


# -- 9(d): Retry-After is capped, and a long wait is logged ----------------------------


def test_retry_after_is_capped_and_long_waits_are_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    policy = _spec(tmp_path).retry
    rng = random.Random(0)
    day = RateLimited("GET http://x/v1/batches/b1: HTTP 429: slow down", retry_after=86400)
    assert pause_s(day, 1, policy, rng) == 86400  # no cap asked: the provider's wait
    assert pause_s(day, 1, policy, rng, cap_s=600) == 600
    assert pause_s(RateLimited("x", retry_after=5), 1, policy, rng, cap_s=600) == 5
    assert MAX_RETRY_AFTER_S == 600

    p = BatchProvider(_spec(tmp_path).endpoint, KEY, policy, rng)
    with caplog.at_level(logging.WARNING, logger="batchrun"):
        assert p.pause(day, 2) == MAX_RETRY_AFTER_S
        assert p.pause(RateLimited("GET http://x/v1/files: HTTP 429", retry_after=3), 1) < 30
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and LONG_WAIT_S == 30
    assert "GET http://x/v1/batches/b1" in warned[0] and "600 s" in warned[0]
    assert "attempt 3" in warned[0]


# -- finding 7: an answer the check refuses is kept with what it cost --------------------


def test_refused_answer_keeps_response_tokens_and_batch_cost(tmp_path: Path) -> None:
    spec = _spec(tmp_path, n=4)
    shards = {s.index: s for s in plan_shards(spec)}
    sidx = min(shards)
    n = shards[sidx].num_rows
    chunk = ChunkState(seq=0, rows={sidx: [(0, n)]}, n_rows=n, n_requests=n, file="c.jsonl",
                       batch_id="batch_1", created_at=1.0)
    lines = {}
    for pos in range(n):
        text, usage = f"not json {pos}", {"prompt_tokens": 20, "completion_tokens": 7}
        lines[custom_id(sidx, pos)] = {"custom_id": custom_id(sidx, pos), "response": {
            "status_code": 200, "body": {"choices": [{"message": {"content": text},
                                                      "finish_reason": "stop"}],
                                         "usage": usage}}}

    def check(c: Completion) -> dict[str, Any]:
        raise RetryableError("not what the schema wants", error_type="invalid_output")

    price = price_for(spec)
    assert price is not None
    res = collect_chunk(spec, chunk, shards, lines, "completed", price=price, check=check,
                        can_retry=False)
    recs = res.records[sidx]
    one = cost_usd(price, 20, 7, batch=True)
    assert one > 0 and one < cost_usd(price, 20, 7)  # the batch price
    assert len(recs) == n and res.errors == n and res.paid_usd == pytest.approx(n * one)
    for pos, r in enumerate(recs):
        assert (r["status"], r["error_type"]) == ("error", "invalid_output")
        assert r["response"] == f"not json {pos}" and r["finish_reason"] == "stop"
        assert (r["prompt_tokens"], r["completion_tokens"], r["total_tokens"]) == (20, 7, 27)
        assert r["cost_usd"] == pytest.approx(one)
    # a retried refusal has no record yet, but its cost still reaches the budget
    again = collect_chunk(spec, chunk, shards, lines, "completed", price=price, check=check,
                          can_retry=True)
    assert len(again.retry) == n and again.paid_usd == pytest.approx(n * one)


# -- 9(e): a refused key stops a batch job like an online one (exit 7) -------------------


@pytest.fixture(params=[401, 403])
def refuses(request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    """Answers every call with 401/403, echoing the key it was sent (as some proxies do)."""
    echo = lambda auth: f"Incorrect API key provided: {auth.removeprefix('Bearer ')}"  # noqa: E731
    with error_server(request.param, echo) as (url, _):
        yield url, request.param


def test_refused_key_stops_with_7_naming_status_message_and_url(tmp_path: Path,
                                                                refuses: tuple[str, int]) -> None:
    url, status = refuses  # the status the server sends, not one guessed from the text
    spec = _spec(tmp_path, url)
    with pytest.raises(JobCannotSucceed) as e:  # was a UserError: exit 2
        run_batch_job(spec, initial_poll_s=0.05)
    msg = str(e.value)
    assert e.value.exit_code == 7 and "\n" not in msg and f"HTTP {status}" in msg
    assert f"GET {url}/batches" in msg and "Incorrect API key provided: <api key>" in msg
    assert KEY not in msg and "api_key_env" in msg

    cli = CliRunner().invoke(app, ["run", str(tmp_path / "job.yaml"), "--mode", "batch",
                                   "--no-progress"])
    assert cli.exit_code == 7, cli.output
    assert f"HTTP {status}" in cli.output and KEY not in cli.output
    assert "Traceback" not in cli.output


# -- D4: the batch state is committed like every other state file ------------------------


def test_batch_state_is_committed_with_the_one_output_message(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    sf = StateFile(tmp_path / "out")
    sf.save(BatchJobState(job=spec.name, fingerprint="f"))
    assert sf.load(spec).fingerprint == "f" and not list(sf.dir.glob(".*.tmp"))
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the output folder should be")  # unwritable, even as root
    with pytest.raises(OutputError) as e:
        StateFile(blocked).save(BatchJobState(job=spec.name, fingerprint="f"))
    text = str(e.value)
    assert e.value.exit_code == 3 and "\n" not in text
    assert text.startswith(f"output: cannot write {blocked}/batch/state.json")
    assert "fix the folder's permissions" in text
