"""The simulated Anthropic API, driven by the official ``anthropic`` SDK."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx2 as httpx
import pytest

from batchrun.sim import MockConfig, RunningServer, start_in_thread

KEY = "sk-ant-test"
MODEL = "claude-sonnet-4-5"


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    cfg: dict[str, Any] = dict(batch_delay_s=0.3, api_key=KEY)
    cfg.update(getattr(request, "param", {}))
    with start_in_thread(MockConfig(**cfg)) as srv:
        yield srv


def _client(srv: RunningServer, key: str = KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=srv.url, api_key=key, max_retries=0)


def test_sdk_messages_create_reads_the_answer(server: RunningServer) -> None:
    msg = _client(server).messages.create(
        model=MODEL, max_tokens=64, system="Be brief.",
        messages=[{"role": "user", "content": "Name a colour."}])
    assert msg.type == "message" and msg.role == "assistant" and msg.model == MODEL
    assert msg.content[0].type == "text" and msg.content[0].text
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert msg.usage.input_tokens > 0 and msg.usage.output_tokens > 0
    rec = server.records()[-1]
    assert rec["outcome"] == "ok" and rec["prompt_tokens"] == msg.usage.input_tokens
    assert rec["completion_tokens"] == msg.usage.output_tokens


def test_sdk_forced_tool_gets_a_tool_use_block(server: RunningServer) -> None:
    schema = {"type": "object", "properties": {"label": {"type": "string"}},
              "required": ["label"], "additionalProperties": False}
    msg = _client(server).messages.create(
        model=MODEL, max_tokens=200, messages=[{"role": "user", "content": "Tag this."}],
        tools=[{"name": "answer", "input_schema": schema}],
        tool_choice={"type": "tool", "name": "answer"})
    block = msg.content[0]
    assert block.type == "tool_use" and block.name == "answer"
    assert isinstance(block.input, dict) and isinstance(block.input["label"], str)
    assert msg.stop_reason == "tool_use"


def test_wrong_key_missing_version_and_unknown_fields(server: RunningServer) -> None:
    with pytest.raises(anthropic.AuthenticationError):
        _client(server, "wrong").messages.create(
            model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.BadRequestError):  # OpenAI's seed is no Messages field
        _client(server).messages.create(
            model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "x"}],
            extra_body={"seed": 1})
    r = httpx.post(server.url + "/v1/messages", headers={"x-api-key": KEY},
                   json={"model": MODEL, "max_tokens": 8,
                         "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and "anthropic-version" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/messages",
                   headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
                   json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]


@pytest.mark.parametrize("server", [{"rpm": 600, "output_tpm": 100}], indirect=True)
def test_output_tpm_429_with_retry_after_and_headers(server: RunningServer) -> None:
    client = _client(server)
    ok = client.messages.with_raw_response.create(
        model=MODEL, max_tokens=60, messages=[{"role": "user", "content": "one"}])
    assert ok.headers["anthropic-ratelimit-output-tokens-limit"] == "100"
    assert int(ok.headers["anthropic-ratelimit-requests-remaining"]) == 599
    used = ok.parse().usage.output_tokens
    assert int(ok.headers["anthropic-ratelimit-output-tokens-remaining"]) == 100 - used
    with pytest.raises(anthropic.RateLimitError) as e:  # max_tokens no longer fits
        client.messages.create(model=MODEL, max_tokens=100 - used + 1,
                               messages=[{"role": "user", "content": "two"}])
    assert int(e.value.response.headers["retry-after"]) >= 1
    assert e.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


@pytest.mark.parametrize("server", [{"overload_rate": 1.0}], indirect=True)
def test_overloaded_is_529(server: RunningServer) -> None:
    with pytest.raises(anthropic.APIStatusError) as e:
        _client(server).messages.create(
            model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 529
    assert server.stats()["by_outcome"] == {"overloaded": 1}


def _requests(n: int) -> list[dict[str, Any]]:
    return [{"custom_id": f"r{i}", "params": {
        "model": MODEL, "max_tokens": 40, "messages": [{"role": "user", "content": f"p {i}"}]}}
        for i in range(n)]


def _ended(client: anthropic.Anthropic, bid: str) -> Any:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        b = client.messages.batches.retrieve(bid)
        if b.processing_status == "ended":
            return b
        time.sleep(0.05)
    raise AssertionError("batch did not end")


@pytest.mark.parametrize("server", [{"batch_line_error_rate": 0.3}], indirect=True)
def test_sdk_message_batches_life_cycle(server: RunningServer) -> None:
    client = _client(server)
    b = client.messages.batches.create(requests=_requests(20))  # type: ignore[arg-type]
    assert b.processing_status == "in_progress" and b.request_counts.processing == 20
    assert b.results_url is None
    ended = _ended(client, b.id)
    counts = ended.request_counts
    assert counts.processing == 0 and counts.succeeded + counts.errored == 20
    assert counts.errored > 0 and counts.succeeded > 0
    results = list(client.messages.batches.results(b.id))
    assert sorted(r.custom_id for r in results) == sorted(f"r{i}" for i in range(20))
    kinds = {r.result.type for r in results}
    assert kinds == {"succeeded", "errored"}
    good = next(r for r in results if r.result.type == "succeeded")
    assert good.result.message.usage.output_tokens > 0  # type: ignore[union-attr]
    assert server.stats()["ok"] == counts.succeeded  # one bill per succeeded request
    listed = [x.id for x in client.messages.batches.list(limit=5)]
    assert listed == [b.id]


@pytest.mark.parametrize("server", [{"batch_delay_s": 5.0}], indirect=True)
def test_sdk_cancel_and_list_pages(server: RunningServer) -> None:
    client = _client(server)
    ids = [client.messages.batches.create(requests=_requests(2)).id  # type: ignore[arg-type]
           for _ in range(3)]
    canceling = client.messages.batches.cancel(ids[0])
    assert canceling.processing_status == "canceling"
    ended = _ended(client, ids[0])
    assert ended.request_counts.canceled == 2
    assert {r.result.type for r in client.messages.batches.results(ids[0])} == {"canceled"}
    page = client.messages.batches.list(limit=2)
    assert [x.id for x in page.data] == [ids[2], ids[1]] and page.has_more
    assert [x.id for x in page] == list(reversed(ids))  # the SDK follows after_id


@pytest.mark.parametrize("server", [{"batch_expire_every": 1, "batch_delay_s": 0.2}],
                         indirect=True)
def test_expired_requests_on_request(server: RunningServer) -> None:
    client = _client(server)
    b = client.messages.batches.create(requests=_requests(4))  # type: ignore[arg-type]
    assert _ended(client, b.id).request_counts.expired == 2
    assert server.stats()["ok"] == 2  # expired requests are not billed


@pytest.mark.parametrize("server", [{"batch_queue_requests": 5, "batch_delay_s": 5.0}],
                         indirect=True)
def test_queue_quota_is_a_429(server: RunningServer) -> None:
    client = _client(server)
    client.messages.batches.create(requests=_requests(4))  # type: ignore[arg-type]
    with pytest.raises(anthropic.RateLimitError):
        client.messages.batches.create(requests=_requests(2))  # type: ignore[arg-type]
