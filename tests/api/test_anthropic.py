"""The Anthropic provider: its body and parse (pure), its one error table, its batch
result lines, and online jobs against the simulated Anthropic API (real Ray, loopback)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from batchrun.api.anthropic import AnthropicProvider, MessagesKind
from batchrun.api.client import ApiClient, open_session
from batchrun.api.protocols import Completion
from batchrun.api.registry import kind_for, provider_for
from batchrun.api.structured import Structured
from batchrun.errors import FatalRequestError, RateLimited, RetryableError, SpecError
from batchrun.money.pricing import cost_usd, price_for
from batchrun.runner import RunOptions, run_job
from batchrun.sim import MockConfig, start_in_thread
from batchrun.spec import JobSpec, load_spec
from tests.conftest import make_prompts, write_spec

ANTH, KIND = AnthropicProvider(), MessagesKind()
MODEL = "claude-sonnet-4-5"
SCHEMA = {"type": "object", "properties": {"label": {"type": "string"}},
          "required": ["label"], "additionalProperties": False}


def _spec(**kw: Any) -> JobSpec:
    base: dict[str, Any] = {
        "name": "t", "input": "in.parquet", "prompt_column": "prompt", "model": MODEL,
        "generation": {"max_tokens": 64, "stop": ["END"], "temperature": 0.5},
        "output": "out", "endpoint": {"api": "anthropic", "base_url": "http://127.0.0.1:9"},
        "limits": {"rpm": 60}, "system_prompt": "Be brief."}
    return JobSpec.model_validate({**base, **kw})


def test_body_system_top_level_max_tokens_stop_sequences_and_images() -> None:
    spec = _spec(prompt_column=None, messages_column="m")
    msgs, err = KIND.payload(spec, [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}},
        {"type": "image_url", "image_url": {"url": "https://x.test/cat.png"}}]}])
    assert err is None
    body = KIND.body(spec, msgs, spec.generation.request_fields())
    assert body["system"] == "Be brief." and body["max_tokens"] == 64
    assert body["stop_sequences"] == ["END"] and "stop" not in body
    assert [m["role"] for m in body["messages"]] == ["user"]  # no system message left
    text, b64, url = body["messages"][0]["content"]
    assert text == {"type": "text", "text": "What is this?"}
    assert b64 == {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg",
                                               "data": "AAAA"}}
    assert url == {"type": "image", "source": {"type": "url", "url": "https://x.test/cat.png"}}
    # an image reserves Anthropic's ceiling of tokens: the limiter and budget never under-count
    assert KIND.prompt_tokens(msgs, MODEL) > 2 * 1600


def test_structured_outputs_are_one_forced_tool() -> None:
    spec = _spec()
    fields = {**spec.generation.request_fields(),
              **Structured(SCHEMA, name="tagger").request_fields()}
    body = KIND.body(spec, KIND.payload(spec, "Tag it.")[0], fields)
    assert "response_format" not in body
    assert body["tools"] == [{"name": "tagger", "description": body["tools"][0]["description"],
                              "input_schema": SCHEMA}]
    assert body["tool_choice"] == {"type": "tool", "name": "tagger"}
    c = KIND.parse({"content": [{"type": "tool_use", "id": "t", "name": "tagger",
                                 "input": {"label": "cat"}}], "stop_reason": "tool_use",
                    "usage": {"input_tokens": 10, "output_tokens": 5}})
    assert c.finish_reason == "stop"
    assert Structured(SCHEMA).check(c) == {"parsed": '{"label":"cat"}'}  # validated as chat
    bad = KIND.parse({"content": [{"type": "tool_use", "id": "t", "name": "tagger",
                                   "input": {"label": 3}}], "stop_reason": "tool_use",
                      "usage": {"input_tokens": 10, "output_tokens": 5}})
    with pytest.raises(RetryableError, match="schema"):
        Structured(SCHEMA).check(bad)


def test_parse_usage_cache_tokens_and_stop_reasons() -> None:
    doc = {"content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}],
           "stop_reason": "max_tokens",
           "usage": {"input_tokens": 100, "output_tokens": 7,
                     "cache_creation_input_tokens": 20, "cache_read_input_tokens": 30}}
    assert KIND.parse(doc) == Completion("Hello", "length", 150, 7, 157, 20, 30)
    doc["stop_reason"] = "end_turn"
    assert KIND.parse(doc).finish_reason == "stop"
    with pytest.raises(RetryableError) as e:
        KIND.parse({"content": "nope"})
    assert e.value.error_type == "malformed_body" and e.value.maybe_billed
    # cache tokens are priced at their own rates: writes 1.25x input, reads 0.1x
    price = price_for(_spec())
    plain = cost_usd(price, 100, 7)
    cached = cost_usd(price, 150, 7, cache_write=20, cache_read=30)
    assert cached == pytest.approx(plain + (20 * 1.25 + 30 * 0.1) * 3.0 / 1e6)


@pytest.mark.parametrize(("status", "cls", "etype"), [
    (429, RateLimited, "rate_limited"), (529, RetryableError, "overloaded"),
    (500, RetryableError, "http_500"), (408, RetryableError, "http_408"),
    (400, FatalRequestError, "http_400"), (401, FatalRequestError, "http_401"),
    (413, FatalRequestError, "http_413"),
])
def test_one_status_table(status: int, cls: type, etype: str) -> None:
    e = ANTH.status_error(status, "x", 3.0)
    assert type(e) is cls and e.error_type == etype and not e.maybe_billed


def test_auth_headers_and_error_text() -> None:
    assert ANTH.auth_headers("k") == {"anthropic-version": "2023-06-01", "x-api-key": "k"}
    assert ANTH.auth_headers(None) == {"anthropic-version": "2023-06-01"}
    body = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    assert ANTH.message(body) == "overloaded_error: Overloaded"


def test_batch_result_lines() -> None:
    msg = {"content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
           "usage": {"input_tokens": 3, "output_tokens": 1}}
    assert ANTH.batch_line("c1", KIND, {"model": MODEL}) == {"custom_id": "c1",
                                                             "params": {"model": MODEL}}
    ok = ANTH.line_outcome({"custom_id": "c1", "result": {"type": "succeeded",
                                                          "message": msg}}, "ended", KIND)
    assert ok == Completion("hi", "stop", 3, 1, 4)
    for kind in ("expired", "canceled"):
        e = ANTH.line_outcome({"result": {"type": kind}}, "ended", KIND)
        assert type(e) is RetryableError and e.error_type == f"batch_{kind}"

    def errored(t: str) -> Any:
        return ANTH.line_outcome({"result": {"type": "errored", "error": {
            "type": "error", "error": {"type": t, "message": "m"}}}}, "ended", KIND)
    assert type(errored("invalid_request_error")) is FatalRequestError
    assert type(errored("api_error")) is RetryableError


def test_registry_adapts_chat_and_refuses_other_kinds() -> None:
    spec = _spec()
    assert isinstance(kind_for(spec), MessagesKind)
    assert provider_for(spec).url("https://api.anthropic.com", kind_for(spec)) == \
        "https://api.anthropic.com/v1/messages"
    assert provider_for(spec).url("https://api.anthropic.com/v1", kind_for(spec)) == \
        "https://api.anthropic.com/v1/messages"

    class Other:
        task = "embeddings"
    with pytest.raises(SpecError, match="anthropic"):
        ANTH.adapt(Other(), spec)  # type: ignore[arg-type]


@pytest.mark.parametrize(("over", "needle"), [
    ({"generation": {"temperature": 0.5}}, "generation.max_tokens: required"),
    ({"generation": {"max_tokens": 8, "seed": 3}}, "generation.seed"),
    ({"generation": {"max_tokens": 8, "temperature": 1.5}}, "temperature"),
    ({"endpoint": {"base_url": "http://127.0.0.1:9/v1"},
      "limits": {"rpm": 60, "output_tpm": 1000}}, "limits.output_tpm"),
])
def test_bad_specs_are_one_line(tmp_path: Path, over: dict[str, Any], needle: str) -> None:
    over = {"endpoint": {"api": "anthropic", "base_url": "http://127.0.0.1:9"}, **over}
    path = write_spec(tmp_path, model=MODEL, **over)
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_client_against_the_simulator_sends_anthropic_headers() -> None:
    spec = _spec(response_format={"json_schema": SCHEMA})
    structured = Structured(SCHEMA)
    with start_in_thread(MockConfig(api_key="sk-ant-k")) as srv:
        endpoint = spec.endpoint.model_copy(update={"base_url": srv.url})

        async def go(key: str) -> Completion:
            async with open_session(endpoint, 2) as s:
                client = ApiClient(s, endpoint, key, kind_for(spec), provider_for(spec))
                fields = {**spec.generation.request_fields(), **structured.request_fields()}
                return await client.complete(
                    KIND.body(spec, KIND.payload(spec, "Tag it.")[0], fields))

        c = asyncio.run(go("sk-ant-k"))
        assert json.loads(structured.check(c)["parsed"])["label"]
        with pytest.raises(FatalRequestError) as e:
            asyncio.run(go("wrong"))
        assert e.value.status == 401 and "authentication_error" in str(e.value)
        assert srv.records()[0]["prompt_tokens"] == c.prompt_tokens


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(180)
def test_online_job_on_anthropic(tmp_path: Path) -> None:
    make_prompts(tmp_path / "in.parquet", 120, row_group=40)
    spec = write_spec(
        tmp_path, name="t-anthropic", model=MODEL, system_prompt="Answer in a few words.",
        endpoint={"api": "anthropic", "api_key_env": "T_ANTHROPIC_KEY"},
        simulate={"rpm": 6000, "input_tpm": 400_000, "output_tpm": 100_000,
                  "overload_rate": 0.1, "fail_rate": 0.05},
        limits={"rpm": 6000, "input_tpm": 400_000, "output_tpm": 100_000,
                "max_concurrency": 16},
        budget={"max_cost_usd": 5.0})
    summary = run_job(str(spec), RunOptions(progress=False))
    assert summary.ok == 120 and summary.errors == 0
    table = pq.read_table(tmp_path / "out" / "results").to_pylist()
    assert len(table) == 120 and all(r["response"] for r in table)
    assert {r["finish_reason"] for r in table} <= {"stop", "length"}
    assert all(r["cache_read_tokens"] == 0 and r["cache_creation_tokens"] == 0 for r in table)
    assert any(r["attempts"] > 1 for r in table)  # 529s and 500s were retried
    price = price_for(load_spec(spec))
    assert sum(r["cost_usd"] for r in table) == pytest.approx(sum(
        cost_usd(price, r["prompt_tokens"], r["completion_tokens"]) for r in table))


def test_estimate_names_the_binding_token_window() -> None:
    from batchrun.money.estimate import _duration

    spec = _spec(limits={"rpm": 4000, "input_tpm": 2_000_000, "output_tpm": 40_000})
    minutes, bound = _duration(spec, 10_000, 300_000)  # 640,000 output tokens at most
    assert bound == "output_tpm" and minutes == pytest.approx(16.0)
    minutes, bound = _duration(_spec(limits={"rpm": 4000, "input_tpm": 10_000}), 100, 300_000)
    assert bound == "input_tpm" and minutes == pytest.approx(30.0)
