"""ApiClient against a real aiohttp server on 127.0.0.1: what the HTTP boundary lets through."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from batchrun.api.client import ApiClient, open_session
from batchrun.errors import FatalRequestError, RequestError
from batchrun.spec import EndpointSpec

Handler = Callable[[web.Request], Awaitable[web.Response]]


def _answer(text: str) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


async def _complete(handler: Handler, body: dict[str, Any], max_bytes: int,
                    key: str | None = None) -> Any:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    endpoint = EndpointSpec(base_url=f"http://127.0.0.1:{port}/v1",  # type: ignore[call-arg]
                            max_response_bytes=max_bytes)
    try:
        async with open_session(endpoint, 4) as session:
            return await ApiClient(session, endpoint, key).complete(body)
    finally:
        await runner.cleanup()


def test_a_gzip_body_is_capped_by_its_inflated_size() -> None:
    big = _answer("x" * 2_000_000)  # 2 MB of text: a few kB on the wire

    async def handler(request: web.Request) -> web.Response:
        raw = gzip.compress(json.dumps(big).encode())
        assert len(raw) < 100_000  # declared Content-Length is under the cap
        return web.Response(body=raw, headers={"Content-Encoding": "gzip",
                                               "Content-Type": "application/json"})

    with pytest.raises(FatalRequestError) as e:
        asyncio.run(_complete(handler, {"model": "m", "messages": []}, max_bytes=100_000))
    assert e.value.error_type == "response_too_large"


def test_integer_keys_in_extra_fields_are_sent_as_json_strings() -> None:
    seen: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.Response:
        seen.update(await request.json())
        return web.json_response(_answer("ok"))

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "logit_bias": {50256: -100}}  # what YAML gives for `logit_bias: {50256: -100}`
    done = asyncio.run(_complete(handler, body, max_bytes=1_000_000))
    assert done.text == "ok" and done.total_tokens == 5
    assert seen["logit_bias"] == {"50256": -100}


KEY = "sk-proj-" + "Zq8x7Kp2" * 6


@pytest.mark.parametrize(("status", "body", "content_type"), [
    # a proxy quoting the key in its JSON error: masked in the message
    (401, {"error": {"message": f"Incorrect API key provided: {KEY}."}}, "application/json"),
    # the key across the 300-character cut of a long message: no prefix of it survives
    (400, {"error": {"message": "x" * 290 + KEY}}, "application/json"),
    # a plain-text body, the key across its 200-character cut
    (502, "y" * 190 + KEY, "text/plain"),
])
def test_the_key_in_a_provider_error_is_masked_at_the_source(
        status: int, body: Any, content_type: str) -> None:
    async def handler(request: web.Request) -> web.Response:
        text = body if isinstance(body, str) else json.dumps(body)
        return web.Response(status=status, text=text, content_type=content_type)

    with pytest.raises(RequestError) as e:
        asyncio.run(_complete(handler, {"model": "m", "messages": []}, 1_000_000, key=KEY))
    message = str(e.value)
    assert message.startswith(f"HTTP {status}: ") and e.value.status == status
    assert KEY[:10] not in message and "Zq8x7Kp2" not in message, message
    if status == 401:
        assert message == "HTTP 401: Incorrect API key provided: <api key>."
