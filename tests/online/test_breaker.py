"""The circuit breaker and the rolling error rate (pure), the client's classification of
unreachable hosts, and the row runner's breaker against a real loopback provider (no Ray)."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections import deque
from typing import Any

from batchrun.api.client import ApiClient, open_session
from batchrun.errors import FatalRequestError, RateLimited, RequestError, RetryableError
from batchrun.io.shards import RequestRow
from batchrun.limits.permits import LeaseAnswer, PermitPool
from batchrun.online.breaker import Breaker, ErrorRate, job_wide_cause, safe_url
from batchrun.online.engine import RowRunner
from batchrun.sim import MockConfig, start_in_thread
from batchrun.spec import EndpointSpec, JobSpec

# --- Breaker ------------------------------------------------------------------------------


def test_breaker_trips_after_n_failures_of_one_cause_once() -> None:
    b = Breaker(3)
    assert not b.failure("http_401", "HTTP 401: bad key")
    assert not b.failure("http_401", "HTTP 401: bad key")
    assert b.failure("http_401", "HTTP 401: bad key") and b.tripped
    assert b.reason is not None and "3 requests" in b.reason and "HTTP 401: bad key" in b.reason
    assert not b.failure("http_401", "x")  # reports the trip once
    b.success()
    assert b.tripped  # a late success does not undo a stop


def test_breaker_success_first_disarms_it_for_good() -> None:
    b = Breaker(3)
    b.failure("http_401")
    b.success()
    assert b.state == "disarmed"
    assert not any(b.failure("http_401") for _ in range(100)) and not b.tripped


def test_breaker_needs_the_same_cause_in_a_row() -> None:
    b = Breaker(3)
    for cause in ("http_401", "http_401", "http_404", "http_404", None, "http_404", "http_404"):
        assert not b.failure(cause)  # a different cause or another failure restarts the count
    assert b.armed
    assert b.failure("http_404") and b.reason and "3 requests" in b.reason


def test_breaker_zero_is_off() -> None:
    b = Breaker(0)
    assert not any(b.failure("http_401") for _ in range(50)) and not b.tripped


def test_job_wide_causes_are_classified_by_status_and_class() -> None:
    assert job_wide_cause(FatalRequestError("HTTP 401: x", status=401)) == "http_401"
    assert job_wide_cause(FatalRequestError("HTTP 403: x", status=403)) == "http_403"
    assert job_wide_cause(FatalRequestError("HTTP 404: x", status=404)) == "http_404"
    # one row's bad request, a provider hiccup, a rate limit: not the job's fault
    assert job_wide_cause(FatalRequestError("HTTP 400: x", status=400)) is None
    assert job_wide_cause(RetryableError("HTTP 500: x", status=500)) is None
    assert job_wide_cause(RateLimited("HTTP 429: x")) is None
    assert job_wide_cause(RetryableError("reset", error_type="connection")) is None
    # the text says 401, the status does not: never classified by text
    assert job_wide_cause(FatalRequestError("HTTP 401", status=422)) is None
    assert job_wide_cause(RetryableError("x", error_type="connect_refused")) == "connect_refused"
    assert job_wide_cause(RetryableError("x", error_type="dns")) == "dns"


def test_safe_url_drops_user_info_and_query() -> None:
    assert (safe_url("https://user:sk-secret@api.example.com:8443/v1/chat/completions?key=sk-2")
            == "https://api.example.com:8443/v1/chat/completions")
    assert safe_url("http://[::1]:9000/v1") == "http://[::1]:9000/v1"


# --- ErrorRate ----------------------------------------------------------------------------


def test_error_rate_waits_for_a_full_window_then_names_the_top_type() -> None:
    r = ErrorRate(0.5, 200)
    assert r.add([("http_500", "HTTP 500: boom")] * 199) is None  # window not full yet
    reason = r.add([("http_400", "HTTP 400: bad")])
    assert reason is not None
    assert "200 of the last 200" in reason and "http_500 (199 rows" in reason
    assert "HTTP 500: boom" in reason and "max_error_rate 50%" in reason


def test_error_rate_at_the_limit_is_not_past_it_and_old_rows_leave() -> None:
    r = ErrorRate(0.5, 200)
    r.add_ok(100)
    assert r.add([("http_500", None)] * 100) is None  # exactly 50%: not past it
    assert r.add([("http_500", None)]) is not None  # 101 of 200
    r.add_ok(1_000)  # the errors slide out of the window
    assert r.errors == 0 and r.verdict() is None


def test_error_rate_runs_match_a_plain_window() -> None:
    rng = random.Random(7)
    r, plain = ErrorRate(0.3, 200), deque[str | None](maxlen=200)
    for _ in range(300):
        if rng.random() < 0.5:
            n = rng.randint(0, 400)
            r.add_ok(n)
            plain.extend([None] * n)
            got = r.verdict()
        else:
            batch = [(rng.choice([None, "http_500", "timeout"]), "m")
                     for _ in range(rng.randint(1, 50))]
            got = r.add(batch)
            plain.extend(t for t, _ in batch)
        errors = sum(t is not None for t in plain)
        assert r.errors == errors
        assert (got is not None) == (len(plain) == 200 and errors > 0.3 * 200)


# --- the client: an unreachable host is classified by exception class ----------------------


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: nothing listens there


async def _one_attempt(base_url: str) -> RequestError:
    endpoint = EndpointSpec(base_url=base_url)  # type: ignore[call-arg]
    async with open_session(endpoint, 4) as session:
        try:
            await ApiClient(session, endpoint, None).complete({"model": "m", "messages": []})
        except RequestError as e:
            return e
    raise AssertionError("the request succeeded")


def test_connection_refused_is_its_own_error_type() -> None:
    e = asyncio.run(_one_attempt(f"http://127.0.0.1:{_dead_port()}/v1"))
    assert isinstance(e, RetryableError) and e.error_type == "connect_refused"
    assert job_wide_cause(e) == "connect_refused"


# --- the row runner's breaker against a real provider ---------------------------------------


async def _grant_all(costs: list[float], *_budget: Any) -> LeaseAnswer:
    now = time.monotonic()
    return LeaseAnswer(now=now, starts=[now] * len(costs), retry_at=None, paused_until=0.0)


def _spec(base_url: str, **retry: Any) -> JobSpec:
    return JobSpec.model_validate({
        "name": "t", "input": "in.parquet", "prompt_column": "prompt", "model": "gpt-4.1-mini",
        "generation": {"max_tokens": 16}, "limits": {"rpm": 100_000}, "output": "out",
        "endpoint": {"base_url": base_url},
        "retry": {"max_attempts": 1, "backoff_base_s": 0.01, "backoff_cap_s": 0.05, **retry}})


async def _run(spec: JobSpec, key: str, n: int, lanes: int) -> tuple[list[Any], list[str]]:
    trips: list[str] = []
    async with open_session(spec.endpoint, lanes) as session:
        permits = PermitPool(_grant_all, validity=60.0)
        runner = RowRunner(spec, ApiClient(session, spec.endpoint, key), permits,
                           pause_all=permits.pause, on_trip=trips.append)
        rows = deque(RequestRow(f"r{i}", [{"role": "user", "content": f"item {i}"}])
                     for i in range(n))
        out: list[Any] = []

        async def lane() -> None:  # as the worker's lanes: one row after another
            while rows:
                out.append(await runner.run(rows.popleft()))

        await asyncio.gather(*(lane() for _ in range(lanes)))
    return out, trips


def test_wrong_key_trips_the_breaker_and_leaves_every_row_unsent() -> None:
    with start_in_thread(MockConfig(api_key="the-key")) as server:
        spec = _spec(server.base_url)
        records, trips = asyncio.run(_run(spec, "a-wrong-key", 500, lanes=16))
        sent = server.stats()["total_requests"]
    assert records == [None] * 500  # unsent, not error rows: a plain rerun sends them
    assert sent <= 20 + 16, sent  # the streak, and what was in flight when it tripped
    assert len(trips) == 1 and "HTTP 401" in trips[0] and "Incorrect API key" in trips[0]
    assert f"{server.base_url}/chat/completions" in trips[0]


def test_unknown_model_404s_trip_it_too() -> None:
    with start_in_thread(MockConfig(unknown_models=("gone",))) as server:
        spec = _spec(server.base_url).model_copy(update={"model": "gone"})
        records, trips = asyncio.run(_run(spec, "k", 60, lanes=8))
    assert records == [None] * 60
    assert len(trips) == 1 and "HTTP 404" in trips[0] and "gone" in trips[0]


def test_breaker_off_records_401_rows_once() -> None:
    with start_in_thread(MockConfig(api_key="the-key")) as server:
        spec = _spec(server.base_url, breaker_requests=0)
        records, trips = asyncio.run(_run(spec, "wrong", 30, lanes=4))
    assert not trips
    assert {(r["error_type"], r["attempts"]) for r in records} == {("http_401", 1)}
