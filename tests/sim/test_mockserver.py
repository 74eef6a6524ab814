"""The simulated provider over real loopback HTTP, with real aiohttp and openai clients."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from batchrun.api.tokens import count_chat_tokens
from batchrun.sim import (
    MockConfig,
    RunningServer,
    answer_for,
    build_app,
    faults,
    prompt_key,
    start_in_thread,
    start_subprocess,
)

pytestmark = pytest.mark.timeout(60)

MODEL = "gpt-4.1-mini"


def body(i: int = 0, max_tokens: int | None = 50, **extra: Any) -> dict[str, Any]:
    b: dict[str, Any] = {"model": MODEL,
                         "messages": [{"role": "user", "content": f"prompt {i}"}], **extra}
    if max_tokens is not None:
        b["max_tokens"] = max_tokens
    return b


@pytest.fixture
def server() -> Iterator[RunningServer]:
    with start_in_thread(MockConfig(api_key="sk-test")) as s:
        yield s


def client(s: RunningServer, key: str = "sk-test") -> openai.OpenAI:
    return openai.OpenAI(base_url=s.base_url, api_key=key, max_retries=0, timeout=10)


async def post_all(url: str, bodies: list[dict[str, Any]], concurrency: int = 16,
                   headers: dict[str, str] | None = None) -> list[tuple[Any, Any, Any]]:
    """POST every body; (status | exception class name, headers, raw body) per request."""
    sem = asyncio.Semaphore(concurrency)

    async def one(session: aiohttp.ClientSession, b: dict[str, Any]) -> tuple[Any, Any, Any]:
        async with sem:
            try:
                async with session.post(url, json=b, headers=headers) as resp:
                    return resp.status, resp.headers, await resp.read()
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                return type(exc).__name__, None, None

    async with aiohttp.ClientSession() as session:
        return await asyncio.gather(*(one(session, b) for b in bodies))


def test_openai_client_accepts_the_answer(server: RunningServer) -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is a mock?"}]
    answer = client(server).chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                                    max_tokens=100)
    content, n, finish = answer_for(messages, 100)
    assert answer.object == "chat.completion" and answer.model == MODEL
    assert answer.choices[0].message.content == content
    assert answer.choices[0].finish_reason == finish == "stop"
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == count_chat_tokens(messages, MODEL)
    assert answer.usage.completion_tokens == n
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + n
    stats = server.stats()
    assert stats["ok"] == 1 and stats["prompt_tokens_billed"] == answer.usage.prompt_tokens
    record = server.records()[0]
    assert record["key"] == prompt_key(messages) and record["outcome"] == "ok"


def test_finish_reason_length_when_capped(server: RunningServer) -> None:
    answer = client(server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=2)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == 2


def test_wrong_key_is_401(server: RunningServer) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        client(server, key="sk-wrong").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    assert server.stats()["by_outcome"] == {"unauthorized": 1}


def test_missing_max_tokens_is_400(server: RunningServer) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(server).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert info.value.param == "max_tokens" and info.value.type == "invalid_request_error"


def test_unknown_model_is_404_and_models_are_listed() -> None:
    config = MockConfig(models=("m1", "m2"), unknown_models=("gone",))
    with start_in_thread(config) as s:
        c = client(s)
        assert [m.id for m in c.models.list()] == ["m1", "m2"]
        with pytest.raises(openai.NotFoundError) as info:
            c.chat.completions.create(model="gone", messages=[{"role": "user", "content": "x"}],
                                      max_tokens=5)
        assert info.value.code == "model_not_found"
        # Any other name is served, as a proxy in front of many models would.
        c.chat.completions.create(model="anything", messages=[{"role": "user", "content": "x"}],
                                  max_tokens=5)
        health = json.loads(urllib.request.urlopen(f"{s.url}/health", timeout=5).read())
        assert health["status"] == "ok"


def test_429_reaches_openai_client_with_retry_after() -> None:
    with start_in_thread(MockConfig(rpm=6)) as s:  # strict: 1 per 10 s
        c = client(s)
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"}],
                                  max_tokens=5)
        with pytest.raises(openai.RateLimitError) as info:
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "b"}],
                                      max_tokens=5)
        headers = info.value.response.headers
        assert headers["retry-after"] == "10" and 9000 < int(headers["retry-after-ms"]) <= 10000
        assert headers["x-ratelimit-limit-requests"] == "6"
        assert headers["x-ratelimit-remaining-requests"] == "5"
        assert info.value.code == "rate_limit_exceeded" and info.value.type == "requests"


def test_rpm_burst_admits_exactly_rpm_over_6() -> None:
    with start_in_thread(MockConfig(rpm=60)) as s:
        results = asyncio.run(post_all(f"{s.base_url}/chat/completions",
                                       [body(i) for i in range(30)]))
        statuses = Counter(r[0] for r in results)
        assert statuses == {200: 10, 429: 20}
        for status, headers, raw in results:
            assert "x-ratelimit-remaining-requests" in headers
            if status == 429:
                assert 1 <= int(headers["Retry-After"]) <= 10
                assert json.loads(raw)["error"]["code"] == "rate_limit_exceeded"
        stats = s.stats()
        assert stats["max_in_window_10s"] == 10 and stats["max_arrivals_10s"] == 30
        assert stats["by_outcome"] == {"ok": 10, "rate_limited": 20}
        assert stats["distinct_ok_prompts"] == 10 and stats["duplicate_ok_prompts"] == 0


def test_tpm_limit_counts_prompt_plus_max_tokens() -> None:
    with start_in_thread(MockConfig(tpm=1000)) as s:
        results = asyncio.run(post_all(f"{s.base_url}/chat/completions",
                                       [body(i, max_tokens=400) for i in range(3)]
                                       + [body(9, max_tokens=5000)], concurrency=1))
        assert [r[0] for r in results] == [200, 200, 429, 429]
        assert json.loads(results[2][2])["error"]["type"] == "tokens"
        assert results[0][1]["x-ratelimit-limit-tokens"] == "1000"
        assert s.stats()["by_outcome"] == {"ok": 2, "rate_limited": 1, "too_large": 1}


def test_faults_have_their_shares_and_are_in_the_ledger() -> None:
    config = MockConfig(fail_rate=0.1, reset_rate=0.1, malformed_rate=0.1, seed=42)
    with start_in_thread(config) as s:
        results = asyncio.run(post_all(f"{s.base_url}/chat/completions",
                                       [body(i) for i in range(400)]))
        seen: Counter[str] = Counter()
        for status, _, raw in results:
            if status == 200:
                try:
                    json.loads(raw)
                    seen["ok"] += 1
                except ValueError:
                    seen["malformed"] += 1
            elif status in (500, 502, 503):
                assert json.loads(raw)["error"]["type"] == "server_error"
                seen["server_error"] += 1
            else:
                assert status in ("ServerDisconnectedError", "ClientOSError")
                seen["reset"] += 1
        stats = s.stats()
        assert stats["by_outcome"] == dict(seen)
        for name in ("server_error", "reset", "malformed"):
            assert 20 <= seen[name] <= 60, seen
        # The fate of each request is a function of (seed, sequence number) only.
        for record in s.records():
            assert (faults.draw_fault(config, record["seq"]) or "ok") == record["outcome"]


def test_nonjson_and_oversize_answers() -> None:
    config = MockConfig(nonjson_rate=0.5, oversize_rate=0.5, oversize_bytes=100_000)
    with start_in_thread(config) as s:
        results = asyncio.run(post_all(f"{s.base_url}/chat/completions",
                                       [body(i) for i in range(20)]))
        for status, headers, raw in results:
            if status == 502:
                assert headers["Content-Type"].startswith("text/html") and b"<html>" in raw
            else:
                assert status == 200 and len(raw) > 100_000
                assert json.loads(raw)["object"] == "chat.completion"
        assert set(s.stats()["by_outcome"]) == {"nonjson", "oversize"}


def test_latency_delays_the_answer_without_blocking_the_loop() -> None:
    with start_in_thread(MockConfig(latency_ms=300)) as s:
        loop_time = asyncio.run(_timed_burst(f"{s.base_url}/chat/completions", 40))
        assert 0.3 <= loop_time < 2.0  # 40 concurrent answers overlap their sleeps


async def _timed_burst(url: str, n: int) -> float:
    start = asyncio.get_running_loop().time()
    results = await post_all(url, [body(i) for i in range(n)], concurrency=n)
    assert all(r[0] == 200 for r in results)
    return asyncio.get_running_loop().time() - start


def test_storm_answers_429_with_remaining_seconds() -> None:
    clock = [0.0]
    app = build_app(MockConfig(storm_every=100, storm_seconds=10), clock=lambda: clock[0])

    async def scenario() -> list[Any]:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/chat/completions"
        try:
            out = []
            for t in (50.0, 103.5, 111.0):
                clock[0] = t
                out.append((await post_all(url, [body()]))[0])
            return out
        finally:
            await runner.cleanup()

    calm, storm, after = asyncio.run(scenario())
    assert calm[0] == 200 and after[0] == 200
    assert storm[0] == 429 and storm[1]["Retry-After"] == "7"


def test_ledger_endpoints_page_and_reset(tmp_path: Path) -> None:
    ledger_file = tmp_path / "ledger.jsonl"
    with start_in_thread(MockConfig(ledger_file=str(ledger_file))) as s:
        asyncio.run(post_all(f"{s.base_url}/chat/completions",
                             [body(i % 3) for i in range(5)] + [body(max_tokens=None)]))

        def get(path: str, method: str = "GET") -> Any:
            req = urllib.request.Request(f"{s.url}{path}", method=method)
            return json.loads(urllib.request.urlopen(req, timeout=5).read())

        page = get("/_ledger?since=4")
        assert [r["seq"] for r in page["records"]] == [4, 5] and page["next"] == 6
        assert page["records"][1]["outcome"] == "bad_request"
        stats = get("/_ledger/stats")
        assert stats["total_requests"] == 6 and stats["distinct_ok_prompts"] == 3
        assert stats["duplicate_ok_prompts"] == 2
        assert get("/_ledger/reset", "POST") == {"reset": True}
        assert get("/_ledger")["records"] == [] and s.stats()["total_requests"] == 0
    lines = [json.loads(line) for line in ledger_file.read_text().splitlines()]
    assert sum(1 for line in lines if "seq" in line) == 6


def test_subprocess_comes_up_answers_and_terminates() -> None:
    with start_subprocess(MockConfig(rpm=600, api_key="sk-sub", seed=5)) as proc:
        assert proc.base_url.endswith("/v1") and proc.alive()
        c = openai.OpenAI(base_url=proc.base_url, api_key="sk-sub", max_retries=0, timeout=10)
        answer = c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        assert answer.usage is not None and answer.usage.completion_tokens == 5
        assert proc.stats()["ok"] == 1 and proc.records()[0]["status"] == 200
    assert proc.proc.returncode == 0  # SIGTERM is a clean shutdown
