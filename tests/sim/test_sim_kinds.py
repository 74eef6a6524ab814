"""The simulated provider's /v1/embeddings and /v1/responses, judged by the official client."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import openai
import pytest

from batchrun.api.tokens import count_chat_tokens, count_text_tokens
from batchrun.sim import MockConfig, RunningServer, start_in_thread
from batchrun.sim.kinds import embedding_vector

pytestmark = pytest.mark.timeout(60)

KEY = "sk-test"


@pytest.fixture
def server() -> Iterator[RunningServer]:
    with start_in_thread(MockConfig(api_key=KEY)) as s:
        yield s


def client(s: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=s.base_url, api_key=KEY, max_retries=0, timeout=10)


def test_openai_embeddings_create_decodes_base64_by_default(server: RunningServer) -> None:
    texts = ["the quick brown fox", "a lazy dog", "the quick brown fox"]
    resp = client(server).embeddings.create(model="text-embedding-3-small", input=texts,
                                            dimensions=64)
    assert [d.index for d in resp.data] == [0, 1, 2]
    vecs = [np.asarray(d.embedding, dtype=np.float32) for d in resp.data]
    assert all(v.shape == (64,) for v in vecs)
    np.testing.assert_allclose(vecs[0], embedding_vector(texts[0], 64), rtol=1e-6)
    np.testing.assert_array_equal(vecs[0], vecs[2])  # deterministic in the text
    assert not np.allclose(vecs[0], vecs[1])
    assert abs(float(np.linalg.norm(vecs[1])) - 1.0) < 1e-5
    want = sum(count_text_tokens(t, "text-embedding-3-small") for t in texts)
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == want


def test_embeddings_float_and_base64_carry_the_same_vector(server: RunningServer) -> None:
    c = client(server)
    as_float = c.embeddings.create(model="text-embedding-3-small", input="hello",
                                   encoding_format="float")
    assert len(as_float.data[0].embedding) == 1536  # the model's own size
    raw = c.embeddings.with_raw_response.create(model="text-embedding-3-small", input="hello",
                                                encoding_format="base64")
    b64 = json.loads(raw.http_response.content)["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(b64), dtype="<f4")
    np.testing.assert_array_equal(decoded, np.asarray(as_float.data[0].embedding, "<f4"))


def test_embeddings_bad_requests_are_400(server: RunningServer) -> None:
    c = client(server)
    for kwargs in ({"input": ["ok", ""]}, {"input": ["x"] * 2049}, {"input": "hi",
                   "dimensions": 5000}, {"input": "word " * 9000}):
        with pytest.raises(openai.BadRequestError):
            c.embeddings.create(model="text-embedding-3-small", **kwargs)


def test_embeddings_are_rate_limited_by_tokens() -> None:
    with start_in_thread(MockConfig(tpm=100)) as s:
        c = openai.OpenAI(base_url=s.base_url, api_key="x", max_retries=0, timeout=10)
        c.embeddings.create(model="text-embedding-3-small", input=["word " * 30])  # 30 tokens
        with pytest.raises(openai.RateLimitError):
            for _ in range(4):
                c.embeddings.create(model="text-embedding-3-small", input=["word " * 30])
        assert s.stats()["by_outcome"].get("rate_limited", 0) >= 1


def test_embeddings_and_responses_take_faults_as_chat_does() -> None:
    with start_in_thread(MockConfig(fail_rate=1.0)) as s:
        c = openai.OpenAI(base_url=s.base_url, api_key="x", max_retries=0, timeout=10)
        with pytest.raises(openai.InternalServerError):
            c.embeddings.create(model="text-embedding-3-small", input="hi")
        with pytest.raises(openai.InternalServerError):
            c.responses.create(model="gpt-4.1-mini", input="hi", max_output_tokens=5)
        assert s.stats()["by_outcome"]["server_error"] == 2
    with start_in_thread(MockConfig(api_key=KEY)) as s:
        c = openai.OpenAI(base_url=s.base_url, api_key="wrong", max_retries=0, timeout=10)
        with pytest.raises(openai.AuthenticationError):
            c.embeddings.create(model="text-embedding-3-small", input="hi")


def test_openai_responses_create(server: RunningServer) -> None:
    c = client(server)
    resp = c.responses.create(model="gpt-4.1-mini", instructions="Be brief.",
                              input=[{"role": "user", "content": "Tell me a story."}],
                              max_output_tokens=200)
    assert resp.status == "completed" and resp.output_text
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Tell me a story."}]
    assert resp.usage.input_tokens == count_chat_tokens(msgs, "gpt-4.1-mini")
    assert resp.usage.output_tokens == count_text_tokens(resp.output_text, "gpt-4.1-mini")


def test_responses_cut_at_max_output_tokens_is_incomplete(server: RunningServer) -> None:
    resp = client(server).responses.create(model="gpt-4.1-mini", input="Tell me a story.",
                                           max_output_tokens=2)
    assert resp.status == "incomplete"
    assert resp.incomplete_details is not None
    assert resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage.output_tokens == 2


def test_responses_json_schema_through_text_format(server: RunningServer) -> None:
    schema = {"type": "object", "properties": {"label": {"type": "string"},
                                               "score": {"type": "integer"}},
              "required": ["label", "score"], "additionalProperties": False}
    resp = client(server).responses.create(
        model="gpt-4.1-mini", input="Rate this.", max_output_tokens=200,
        text={"format": {"type": "json_schema", "name": "rating", "schema": schema,
                         "strict": True}})
    value = json.loads(resp.output_text)
    assert set(value) == {"label", "score"} and isinstance(value["score"], int)


def _batch(s: RunningServer, url: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    c = client(s)
    lines = "".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": url, "body": b})
                    + "\n" for i, b in enumerate(bodies))
    f = c.files.create(file=("in.jsonl", lines.encode()), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint=url,  # type: ignore[arg-type]
                         completion_window="24h")
    deadline = time.monotonic() + 20
    while b.status not in ("completed", "failed", "expired") and time.monotonic() < deadline:
        time.sleep(0.1)
        b = c.batches.retrieve(b.id)
    assert b.status == "completed" and b.output_file_id
    out = c.files.content(b.output_file_id).content.decode()
    return sorted((json.loads(x) for x in out.splitlines()), key=lambda d: d["custom_id"])


def test_batches_of_embeddings_and_responses() -> None:
    with start_in_thread(MockConfig(api_key=KEY, batch_delay_s=0.1)) as s:
        emb = _batch(s, "/v1/embeddings", [{"model": "text-embedding-3-small", "input": t,
                                            "dimensions": 8} for t in ("a", "b")])
        assert [len(d["response"]["body"]["data"][0]["embedding"]) for d in emb] == [8, 8]
        res = _batch(s, "/v1/responses", [{"model": "gpt-4.1-mini", "input": "hi",
                                           "max_output_tokens": 3}])
        assert res[0]["response"]["body"]["object"] == "response"
        assert s.stats()["by_outcome"]["ok"] == 3
