"""A new request kind is one module and one registry line: shown with a toy kind.

The toy is OpenAI's legacy text-completions API (``POST /completions`` with a ``prompt``
string). Nothing else of batchrun changes: the HTTP client, the provider's error table,
the batch-file line and the spec's ``task`` check all work through the seam.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web

from batchrun.api import registry
from batchrun.api.client import ApiClient, open_session
from batchrun.api.protocols import Completion
from batchrun.api.tokens import count_text_tokens
from batchrun.batch.requests import request_line
from batchrun.errors import FatalRequestError, RetryableError, SpecError
from batchrun.spec import EndpointSpec, JobSpec


class TextCompletionsKind:  # the whole new kind
    task = "text-completions"
    path = "/completions"

    def payload(self, spec: JobSpec, value: Any) -> tuple[str | None, str | None]:
        return (value, None) if isinstance(value, str) and value else (None, "empty prompt")

    def body(self, spec: JobSpec, payload: str, fields: dict[str, Any]) -> dict[str, Any]:
        return {"model": spec.model, "prompt": payload, **fields}

    def parse(self, doc: Any) -> Completion:
        try:
            usage = doc["usage"]
            return Completion(doc["choices"][0]["text"], doc["choices"][0]["finish_reason"],
                              usage["prompt_tokens"], usage["completion_tokens"],
                              usage["total_tokens"])
        except (KeyError, IndexError, TypeError) as e:
            raise RetryableError(f"malformed ({type(e).__name__})", status=200,
                                 error_type="malformed_body", maybe_billed=True) from None

    def prompt_tokens(self, payload: str, model: str) -> int:
        return count_text_tokens(payload, model)


@pytest.fixture
def toy_kind(monkeypatch: pytest.MonkeyPatch) -> TextCompletionsKind:
    kind = TextCompletionsKind()
    monkeypatch.setitem(registry.KINDS, kind.task, kind)  # the one registry line
    return kind


def _spec(task: str) -> JobSpec:
    return JobSpec.model_validate({
        "name": "t", "input": "in.parquet", "prompt_column": "p", "model": "gpt-4.1-mini",
        "task": task, "generation": {"max_tokens": 4}, "limits": {"rpm": 60}, "output": "o",
        "endpoint": {"base_url": "http://127.0.0.1:9/v1"}})


async def _serve_and_send(kind: TextCompletionsKind, spec: JobSpec, prompts: list[str]
                          ) -> tuple[list[Any], list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        if body["prompt"] == "refuse":
            return web.json_response({"error": {"message": "no"}}, status=400)
        return web.json_response({"choices": [{"text": body["prompt"].upper(),
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 2, "completion_tokens": 2,
                                            "total_tokens": 4}})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    endpoint = EndpointSpec(base_url=f"http://127.0.0.1:{port}/v1")  # type: ignore[call-arg]
    out: list[Any] = []
    try:
        async with open_session(endpoint, 4) as session:
            client = ApiClient(session, endpoint, "k", registry.kind_for(spec),
                               registry.provider_for(spec))
            for p in prompts:
                payload, _ = kind.payload(spec, p)
                try:
                    out.append(await client.complete(kind.body(spec, payload, {"max_tokens": 4})))
                except FatalRequestError as e:
                    out.append(e)
    finally:
        await runner.cleanup()
    return out, seen


def test_a_registered_kind_is_sent_parsed_and_judged_through_the_seam(toy_kind):
    spec = _spec("text-completions")
    answers, seen = asyncio.run(_serve_and_send(toy_kind, spec, ["hello", "refuse"]))
    assert answers[0] == Completion("HELLO", "stop", 2, 2, 4)
    assert isinstance(answers[1], FatalRequestError) and answers[1].status == 400
    assert seen[0] == {"model": "gpt-4.1-mini", "prompt": "hello", "max_tokens": 4}
    # batch mode writes its lines through the same kind and provider
    line = json.loads(request_line(spec, "s0-0", "hello"))
    assert line["url"] == "/v1/completions" and line["body"]["prompt"] == "hello"


def test_an_unknown_task_is_one_spec_error_naming_the_known_ones():
    with pytest.raises(SpecError, match="task: unknown 'audio'; use one of: chat, embeddings"):
        registry.kind_for(_spec("audio"))
