"""The simulated Files and Batch APIs, driven by the official openai client."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from batchrun.sim import MockConfig, RunningServer, answer_for, start_in_thread

KEY = "test-key"
TERMINAL = {"completed", "failed", "expired", "cancelled"}


def _jsonl(n: int, start: int = 0) -> bytes:
    return b"".join(json.dumps({
        "custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "gpt-4.1-mini", "max_tokens": 40,
                 "messages": [{"role": "user", "content": f"prompt {i}"}]},
    }).encode() + b"\n" for i in range(start, start + n))


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    cfg = dict(batch_delay_s=0.3, api_key=KEY)
    cfg.update(getattr(request, "param", {}))
    with start_in_thread(MockConfig(**cfg)) as srv:  # type: ignore[arg-type]
        yield srv


def _client(srv: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url, api_key=KEY, max_retries=0)


def _wait(client: openai.OpenAI, batch_id: str) -> Any:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        b = client.batches.retrieve(batch_id)
        if b.status in TERMINAL:
            return b
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} did not end")


def _lines(client: openai.OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    if file_id is None:
        return {}
    raw = client.files.content(file_id).content
    return {d["custom_id"]: d for d in map(json.loads, raw.splitlines())}


def test_life_cycle_answers_and_ledger(server: RunningServer) -> None:
    client = _client(server)
    f = client.files.create(file=("in.jsonl", _jsonl(12)), purpose="batch")
    assert client.files.retrieve(f.id).bytes == len(_jsonl(12))
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                              completion_window="24h", metadata={"job": "j", "chunk": "0"})
    assert b.status == "validating" and b.metadata == {"job": "j", "chunk": "0"}
    seen = {b.status}
    while b.status not in TERMINAL:
        time.sleep(0.02)
        b = client.batches.retrieve(b.id)
        seen.add(b.status)
    assert b.status == "completed" and {"in_progress", "finalizing"} <= seen
    assert b.request_counts is not None and b.request_counts.completed == 12
    out = _lines(client, b.output_file_id)
    assert b.error_file_id is None and len(out) == 12
    body = out["c3"]["response"]["body"]
    content, ctok, _ = answer_for([{"role": "user", "content": "prompt 3"}], 40)
    assert body["choices"][0]["message"]["content"] == content
    assert body["usage"]["completion_tokens"] == ctok
    stats = server.stats()
    assert stats["by_outcome"] == {"batch_created": 1, "ok": 12}
    assert stats["distinct_ok_prompts"] == 12 and stats["duplicate_ok_prompts"] == 0
    assert stats["completion_tokens_billed"] == sum(
        d["response"]["body"]["usage"]["completion_tokens"] for d in out.values())


def test_list_paginates_and_cancel(server: RunningServer) -> None:
    client = _client(server)
    ids = []
    for i in range(3):
        f = client.files.create(file=("in.jsonl", _jsonl(2, 10 * i)), purpose="batch")
        ids.append(client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                         completion_window="24h", metadata={"n": str(i)}).id)
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
    assert [b.id for b in client.batches.list(limit=2)] == ids[::-1]  # auto-paging
    cancelled = client.batches.cancel(ids[0])
    assert cancelled.status == "cancelling"
    end = _wait(client, ids[0])
    assert end.status == "cancelled"
    assert all(d["error"]["code"] == "batch_cancelled"
               for d in _lines(client, end.error_file_id).values())
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(ids[0])
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")


@pytest.mark.parametrize("server", [{"batch_line_error_rate": 0.5, "seed": 3}], indirect=True)
def test_line_errors(server: RunningServer) -> None:
    client = _client(server)
    f = client.files.create(file=("in.jsonl", _jsonl(40)), purpose="batch")
    b = _wait(client, client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                            completion_window="24h").id)
    out, err = _lines(client, b.output_file_id), _lines(client, b.error_file_id)
    assert b.status == "completed" and len(out) + len(err) == 40 and 5 < len(err) < 35
    assert b.request_counts.failed == len(err)
    shapes = {"status" if d["response"] else "error" for d in err.values()}
    assert shapes == {"status", "error"}  # both of OpenAI's error-line shapes
    assert server.stats()["by_outcome"]["server_error"] == len(err)


@pytest.mark.parametrize("server", [{"batch_expire_every": 2, "batch_fail_every": 3}],
                         indirect=True)
def test_expired_and_failed_batches(server: RunningServer) -> None:
    client = _client(server)
    ends = []
    for _ in range(3):
        f = client.files.create(file=("in.jsonl", _jsonl(10)), purpose="batch")
        ends.append(client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                          completion_window="24h").id)
    done, expired, failed = (_wait(client, i) for i in ends)
    assert (done.status, expired.status, failed.status) == ("completed", "expired", "failed")
    assert len(_lines(client, expired.output_file_id)) == 5
    assert {d["error"]["code"] for d in _lines(client, expired.error_file_id).values()} == {
        "batch_expired"}
    assert failed.errors is not None and failed.output_file_id is None
    assert server.stats()["ok"] == 15  # lines never run are not billed


def test_auth_and_bad_requests(server: RunningServer) -> None:
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="wrong").batches.list()
    client = _client(server)
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id="file-missing", endpoint="/v1/chat/completions",
                              completion_window="24h")


@pytest.mark.parametrize("server", [{"batch_429_first": 2, "batch_retry_after_s": 3}],
                         indirect=True)
def test_key_limit_answers_429_with_retry_after(server: RunningServer) -> None:
    client = _client(server)
    for _ in range(2):  # the first two calls, whichever route
        with pytest.raises(openai.RateLimitError) as e:
            client.batches.list()
        assert e.value.response.headers["Retry-After"] == "3"
    assert client.batches.list().data == []  # then served
    refused = [r for r in server.records() if r["outcome"] == "rate_limited"]
    assert [(r["status"], r["key"]) for r in refused] == [(429, "GET /v1/batches")] * 2
    cfg = MockConfig(batch_429_first=2, batch_retry_after_s=3)
    assert MockConfig.from_argv(cfg.to_argv()) == cfg  # the subprocess flags round-trip
