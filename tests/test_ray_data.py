"""``batchrun.ray_data.complete``: a real Ray Data pipeline (the session's local Ray) against
the strict simulated provider, several actors sharing one limiter and one budget."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import ray

import batchrun
import batchrun.ray_data as brd
from batchrun.sim import MockConfig, RunningServer, start_in_thread
from tests.conftest import error_server


@pytest.fixture
def ray_data(ray_session: None) -> Iterator[None]:
    ctx = ray.data.DataContext.get_current()
    bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    yield
    ctx.enable_progress_bars = bars


def _spec(srv: RunningServer, **over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "rd", "prompt_column": "prompt", "model": "gpt-4.1-mini",
        "endpoint": {"base_url": srv.base_url}, "generation": {"max_tokens": 16},
        "limits": {"rpm": 100_000, "max_concurrency": 24},
        "retry": {"max_attempts": 4, "backoff_base_s": 0.05, "backoff_cap_s": 0.5},
    }
    spec.update(over)
    return spec


def _ds(n: int, blocks: int = 6) -> ray.data.Dataset:
    items = [{"k": i, "prompt": f"Say something about item {i}."} for i in range(n)]
    return ray.data.from_items(items, override_num_blocks=blocks)


def test_actors_share_one_limiter_and_every_row_gets_one_result(ray_data: None) -> None:
    # 600 rpm, strict: 100 requests per 10 s. 150 rows on 3 actors: one shared limiter
    # paces them (~15 s, no 429); a limiter per actor would send 300 per 10 s and get 429s.
    with start_in_thread(MockConfig(rpm=600, latency_ms=20)) as srv:
        out = brd.complete(_ds(150), _spec(srv, limits={"rpm": 600, "max_concurrency": 24}),
                           concurrency=3, batch_size=10)
        rows = out.take_all()
        stats = srv.stats()
    assert sorted(r["k"] for r in rows) == list(range(150))  # exactly one row each
    assert {r["status"] for r in rows} == {"ok"}
    assert stats["by_outcome"] == {"ok": 150}  # no 429, no request twice
    assert stats["max_in_window_10s"] <= 100 and stats["max_in_window_60s"] <= 600
    r = rows[0]
    assert r["response"] and r["finish_reason"] and r["attempts"] == 1
    assert r["total_tokens"] == r["prompt_tokens"] + r["completion_tokens"] > 0
    assert r["cost_usd"] > 0 and r["latency_ms"] > 0 and r["error_type"] is None
    assert r["prompt"] == f"Say something about item {r['k']}."  # the input columns stay


def test_one_budget_for_every_actor(ray_data: None) -> None:
    cap = 0.0006  # the worst case of about 20 of these rows: far fewer than 120
    with start_in_thread(MockConfig()) as srv:
        out = brd.complete(_ds(120), _spec(srv, budget={"max_cost_usd": cap}),
                           concurrency=3, batch_size=10)
        rows = out.take_all()
        billed = srv.stats()["ok"]
    assert sorted(r["k"] for r in rows) == list(range(120))
    ok = [r for r in rows if r["status"] == "ok"]
    unsent = [r for r in rows if r["status"] != "ok"]
    assert 0 < len(ok) < 40 and len(ok) == billed
    assert sum(r["cost_usd"] for r in ok) <= cap  # one gate: never the cap per actor
    assert {(r["error_type"], r["attempts"], r["response"]) for r in unsent} == {
        ("budget_exhausted", 0, None)}


def test_missing_prompt_column_fails_before_any_request(ray_data: None) -> None:
    ds = ray.data.from_items([{"text": "hello"}] * 5)
    with start_in_thread(MockConfig()) as srv:
        with pytest.raises(batchrun.UserError) as e:
            brd.complete(ds, _spec(srv))
        assert srv.stats()["total_requests"] == 0
    assert "'prompt'" in str(e.value) and "text" in str(e.value) and "\n" not in str(e.value)


def test_key_reaches_the_actors_without_being_an_argument(ray_data: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # The session's Ray started before this variable was set: its actors can only
    # get the key through the object the driver put (a reference in the arguments).
    monkeypatch.setenv("RD_TEST_KEY", "sk-test-rd-0123456789")
    with start_in_thread(MockConfig(api_key="sk-test-rd-0123456789")) as srv:
        spec = _spec(srv, endpoint={"base_url": srv.base_url, "api_key_env": "RD_TEST_KEY"})
        out = brd.complete(_ds(20, blocks=2), spec, concurrency=2)
        ctor = out._logical_plan.dag.fn_constructor_args  # what the actors are built from
        rows = out.take_all()
    assert "sk-test-rd" not in repr(ctor) and isinstance(ctor[2][0], ray.ObjectRef)
    assert {r["status"] for r in rows} == {"ok"} and len(rows) == 20


def test_pipeline_spec_takes_a_job_file_without_input_or_output(tmp_path: Any) -> None:
    path = tmp_path / "pipe.yaml"
    path.write_text("name: p\nprompt_column: prompt\nmodel: gpt-4.1-mini\n"
                    "generation: {max_tokens: 8}\nlimits: {rpm: 60}\n")
    assert brd.pipeline_spec(path).limits.rpm == 60
    path.write_text(path.read_text().replace("rpm: 60", "rpm: -1"))
    with pytest.raises(batchrun.SpecError, match=r"pipe.yaml: limits.rpm: "):
        brd.pipeline_spec(path)
    with pytest.raises(batchrun.SpecError, match="mode: batch"):
        brd.pipeline_spec({"name": "p", "prompt_column": "prompt", "model": "m", "mode": "batch",
                           "generation": {"max_tokens": 8}, "limits": {"rpm": 60}})


def test_429_storms_pause_and_every_row_still_gets_one_result(ray_data: None) -> None:
    # 429 storms of 2 s every 4 s, Retry-After = the storm's rest: the actors wait it out
    # (RowRunner's pause, told to the shared limiter) and every row still ends ok, once.
    with start_in_thread(MockConfig(storm_every=4.0, storm_seconds=2.0)) as srv:
        out = brd.complete(_ds(240), _spec(srv, limits={"rpm": 1200, "max_concurrency": 24},
                                           retry={"max_attempts": 8, "backoff_base_s": 0.05,
                                                  "backoff_cap_s": 0.2}),
                           concurrency=3, batch_size=10)
        rows = out.take_all()
        stats = srv.stats()
    assert sorted(r["k"] for r in rows) == list(range(240))
    assert {r["status"] for r in rows} == {"ok"}
    storms = stats["by_outcome"].get("storm", 0)
    assert storms > 0  # it met a storm and came through
    assert stats["ok"] == 240  # no row answered twice


def test_a_job_wide_failure_stops_the_pipeline(ray_data: None) -> None:
    # every request 401: the breaker trips after its first 20, the shared limiter refuses
    # every actor's next lease, and the pipeline fails naming the cause, early
    with error_server(401, lambda auth: "Incorrect API key provided") as (url, calls):
        spec = {"name": "b", "prompt_column": "prompt", "model": "gpt-4.1-mini",
                "endpoint": {"base_url": url}, "generation": {"max_tokens": 8},
                "limits": {"rpm": 100_000}}
        out = brd.complete(_ds(400, blocks=4), spec, concurrency=2, batch_size=50)
        with pytest.raises(ray.exceptions.RayTaskError) as e:  # Ray Data wraps the error
            out.take_all()
    assert "JobCannotSucceed" in str(e.value) and "HTTP 401" in str(e.value)
    assert len(calls) < 100  # stopped at the breaker, not after every row's attempts


def test_response_format_adds_parsed_and_expanded_columns(ray_data: None) -> None:
    schema = {"type": "object", "additionalProperties": False, "required": ["label", "score"],
              "properties": {"label": {"type": "string"}, "score": {"type": "integer"}}}
    with start_in_thread(MockConfig()) as srv:
        spec = _spec(srv, generation={"max_tokens": 64},
                     response_format={"json_schema": schema, "expand": True})
        rows = brd.complete(_ds(30, blocks=2), spec, concurrency=2).take_all()
    assert len(rows) == 30 and {r["status"] for r in rows} == {"ok"}
    assert all(isinstance(r["label"], str) and isinstance(r["score"], int) for r in rows)
    assert all(r["parsed"].startswith("{") for r in rows)
