"""The API seam's pure parts: the chat kind and the OpenAI provider's one error table."""

from __future__ import annotations

import pytest

from batchrun.api.chat import ChatKind
from batchrun.api.openai import OpenAIProvider
from batchrun.api.protocols import Completion
from batchrun.api.registry import KINDS, PROVIDERS
from batchrun.errors import FatalRequestError, RateLimited, RetryableError
from batchrun.spec import JobSpec

OPENAI, CHAT = OpenAIProvider(), ChatKind()


def _spec(**kw) -> JobSpec:
    base = {"name": "t", "input": "in.parquet", "prompt_column": "prompt", "model": "gpt-4.1-mini",
            "generation": {"max_tokens": 8}, "output": "out",
            "endpoint": {"base_url": "http://127.0.0.1:9/v1"}, "limits": {"rpm": 60}}
    return JobSpec.model_validate({**base, **kw})


@pytest.mark.parametrize(("status", "cls", "retry_after"), [
    (429, RateLimited, 7.0), (503, RetryableError, 3.0), (500, RetryableError, None),
    (408, RetryableError, None), (409, RetryableError, None),
    (400, FatalRequestError, None), (401, FatalRequestError, None), (404, FatalRequestError, None),
])
def test_one_status_table(status, cls, retry_after):
    e = OPENAI.status_error(status, "nope", retry_after)
    assert type(e) is cls and e.status == status and "HTTP" in str(e)
    assert e.retry_after == (retry_after if cls is not FatalRequestError else None)
    assert not e.maybe_billed  # a non-200 answer is never billed
    assert e.error_type == ("rate_limited" if status == 429 else f"http_{status}")


def _line(status=200, body=None, error=None):
    resp = None if status is None else {"status_code": status, "body": body}
    return {"custom_id": "s0-1", "response": resp, "error": error}


OK_BODY = {"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
           "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


def test_batch_lines_judged_by_status_and_code_never_by_message():
    assert OPENAI.line_outcome(_line(body=OK_BODY), "completed", CHAT) == Completion(
        "hi", "stop", 3, 1, 4)
    assert isinstance(OPENAI.line_outcome(None, "expired", CHAT), RetryableError)
    retry = OPENAI.line_outcome(_line(None, error={"code": "batch_expired", "message": "x"}),
                                "expired", CHAT)
    assert type(retry) is RetryableError and retry.error_type == "batch_expired"
    # an unknown code is not retried blindly; "invalid..." in a message decides nothing
    odd = OPENAI.line_outcome(_line(None, error={"code": "quota", "message": "invalid"}),
                              "completed", CHAT)
    assert type(odd) is FatalRequestError
    five = OPENAI.line_outcome(_line(500, {"error": {"message": "boom"}}), "completed", CHAT)
    assert type(five) is RetryableError and "boom" in str(five)
    four = OPENAI.line_outcome(_line(400, {"error": {"message": "bad"}}), "completed", CHAT)
    assert type(four) is FatalRequestError
    garbled = OPENAI.line_outcome({"custom_id": "s0-1", "response": "?"}, "completed", CHAT)
    assert garbled.error_type == "malformed_body"


def test_chat_kind_builds_messages_and_parses():
    spec = _spec(system_prompt="Be brief.")
    msgs, err = CHAT.payload(spec, "hello")
    assert err is None and msgs == [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "hello"}]
    assert CHAT.payload(spec, "  ") == (None, "empty prompt")
    assert CHAT.payload(spec, None) == (None, "null prompt")
    mspec = _spec(prompt_column=None, messages_column="m")
    assert CHAT.payload(mspec, [{"role": "user"}]) == (None, "a message without role or content")
    body = CHAT.body(spec, msgs, {"max_tokens": 8})
    assert body == {"model": "gpt-4.1-mini", "messages": msgs, "max_tokens": 8}
    line = OPENAI.batch_line("s0-1", CHAT, body)
    assert line["url"] == "/v1/chat/completions" and line["body"] is body
    assert CHAT.prompt_tokens(msgs, "gpt-4.1-mini") > 0
    with pytest.raises(RetryableError) as bad:
        CHAT.parse({"choices": []})
    assert bad.value.maybe_billed and bad.value.status == 200  # a 200 was billed


def test_openai_headers_carry_the_key_only_in_authorization():
    assert OPENAI.auth_headers("k-1") == {"Authorization": "Bearer k-1"}
    assert OPENAI.auth_headers(None) == {}
    assert OPENAI.message(b'{"error": {"message": "no such model"}}') == "no such model"
    assert OPENAI.message(b"<html>gateway</html>") == "<html>gateway</html>"


def test_registry_has_one_entry_per_kind_and_provider():
    assert set(KINDS) == {"chat", "embeddings", "responses"}
    assert set(PROVIDERS) == {"openai", "anthropic", "gemini"}


def test_an_embeddings_batch_line_with_several_inputs_is_its_rows_error():
    from batchrun.api.embeddings import EmbeddingsKind
    from batchrun.api.rawbody import RawBody, RawBodyKind

    kind = RawBodyKind(EmbeddingsKind())
    one = RawBody({"model": "m", "input": ["a"]})
    assert kind.payload(None, one) == (one, None)  # type: ignore[arg-type]
    payload, error = kind.payload(None, RawBody({"model": "m", "input": ["a", "b"]}))  # type: ignore[arg-type]
    assert payload is None and error is not None and "one input per line" in error


def test_gemini_cached_tokens_are_billed_as_plain_input():
    from batchrun.api.gemini import GenerateContentKind

    doc = {"candidates": [{"content": {"parts": [{"text": "hi"}]}, "finishReason": "STOP"}],
           "usageMetadata": {"promptTokenCount": 1000, "candidatesTokenCount": 10,
                             "cachedContentTokenCount": 800}}
    c = GenerateContentKind("gemini-2.5-flash").parse(doc)
    # a cache-read rate (Anthropic's 0.1x) would under-count Gemini's bill and the budget
    assert c.prompt_tokens == 1000 and c.cache_read_tokens == 0
