"""The simulated Gemini API (native): ``generateContent`` and the Batch API, inline only.

    POST /v1beta/models/{model}:generateContent
    POST /v1beta/models/{model}:batchGenerateContent   -> an Operation "batches/<id>"
    GET  /v1beta/batches  (pageSize, pageToken)         GET /v1beta/batches/{id}
    POST /v1beta/batches/{id}:cancel

The key in ``x-goog-api-key`` (or ``?key=``); errors in Google's envelope
``{"error": {"code", "message", "status"}}``. Online requests share the OpenAI route's
RPM/TPM limiter (429 RESOURCE_EXHAUSTED). A batch goes ``BATCH_STATE_PENDING`` ->
``RUNNING`` -> ``SUCCEEDED`` over ``batch_delay_s``, each inline request answered like an
online one (ledger ``ok``, billed once) or, for the ``batch_line_error_rate`` share, an
error Status (gRPC 13 INTERNAL or 3 INVALID_ARGUMENT, half each); every
``batch_expire_every``-th batch ends ``EXPIRED`` with no responses; a cancel ends it
``CANCELLED``. ``app[GEMINI_BATCHES].create_answer_delay_s`` holds back a create's answer
after the batch exists (a crash test kills the driver meanwhile). Not simulated: the
Files API (input/output files), thinking tokens, safety blocks.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from batchrun.api.tokens import count_chat_tokens
from batchrun.sim.faults import unit
from batchrun.sim.ledger import prompt_key
from batchrun.sim.protocol import ChatRequest, answer_request
from batchrun.sim.state import STATE, MockState

__all__ = ["GEMINI_BATCHES", "GeminiBatchStore", "add_gemini_routes"]

_ERROR_SALT = 8
_FINISH = {"stop": "STOP", "length": "MAX_TOKENS"}
_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1beta."


@dataclass
class _GBatch:
    meta: dict[str, Any]
    requests: list[dict[str, Any]]
    expire: bool
    response: dict[str, Any] | None = None
    task: asyncio.Task[None] | None = None

    def op(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.meta["name"],
                               "metadata": {"@type": _TYPE + "GenerateContentBatch", **self.meta}}
        if self.meta["state"] not in ("BATCH_STATE_PENDING", "BATCH_STATE_RUNNING"):
            out["done"] = True
            out["response"] = self.response or {"@type": _TYPE + "GenerateContentBatchOutput"}
        return out


class GeminiBatchStore:
    def __init__(self) -> None:
        self.batches: dict[str, _GBatch] = {}
        self.create_answer_delay_s = 0.0


GEMINI_BATCHES = web.AppKey("batchrun_mock_gemini_batches", GeminiBatchStore)


def add_gemini_routes(app: web.Application) -> None:
    app[GEMINI_BATCHES] = GeminiBatchStore()
    app.router.add_post("/v1beta/models/{model:[^/:]+}:generateContent", generate)
    app.router.add_post("/v1beta/models/{model:[^/:]+}:batchGenerateContent", create_batch)
    app.router.add_get("/v1beta/batches", list_batches)
    app.router.add_get("/v1beta/batches/{id:[^/:]+}", get_batch)
    app.router.add_post("/v1beta/batches/{id:[^/:]+}:cancel", cancel_batch)


def _error(code: int, status: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message, "status": status}},
                             status=code)


def _denied(request: web.Request) -> web.Response | None:
    key = request.app[STATE].config.api_key
    given = request.headers.get("x-goog-api-key") or request.query.get("key")
    if key is not None and given != key:
        return _error(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.")
    return None


def _chat(model: str, body: Any) -> ChatRequest:
    """A GenerateContentRequest as the chat request the answer code knows; ValueError if bad."""
    if not isinstance(body, dict) or not isinstance(body.get("contents"), list):
        raise ValueError("contents is required")
    msgs = []
    system = body.get("systemInstruction") or body.get("system_instruction")
    if isinstance(system, dict):
        msgs.append({"role": "system", "content": "".join(
            p.get("text", "") for p in system.get("parts") or [])})
    for c in body["contents"]:
        if not isinstance(c, dict) or not isinstance(c.get("parts"), list):
            raise ValueError("contents[].parts is required")
        role = "assistant" if c.get("role") == "model" else "user"
        msgs.append({"role": role, "content": "".join(p.get("text", "") for p in c["parts"])})
    cfg = body.get("generationConfig") or {}
    schema = cfg.get("responseJsonSchema") or cfg.get("responseSchema")
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}} \
        if schema else None
    return ChatRequest(model, msgs, int(cfg.get("maxOutputTokens") or 8192), rf)


def _answer(state: MockState, chat: ChatRequest, seq: int) -> tuple[dict[str, Any], int, int]:
    ptok = count_chat_tokens(chat.messages, chat.model)
    content, ctok, finish = answer_request(chat, None, config=state.config, seq=seq)
    return {"candidates": [{"content": {"parts": [{"text": content}], "role": "model"},
                            "finishReason": _FINISH.get(finish, "STOP"), "index": 0}],
            "usageMetadata": {"promptTokenCount": ptok, "candidatesTokenCount": ctok,
                              "totalTokenCount": ptok + ctok},
            "modelVersion": chat.model, "responseId": os.urandom(8).hex()}, ptok, ctok


async def generate(request: web.Request) -> web.Response:
    if (denied := _denied(request)) is not None:
        return denied
    state = request.app[STATE]
    try:
        chat = _chat(request.match_info["model"], json.loads(await request.read()))
    except ValueError as e:
        return _error(400, "INVALID_ARGUMENT", str(e))
    now, seq = state.now(), len(state.ledger)
    doc, ptok, ctok = _answer(state, chat, seq)
    if state.limiter.enabled and not state.limiter.try_acquire(ptok + chat.max_tokens,
                                                              now).allowed:
        state.ledger.record(now, 429, "rate_limited", prompt_key(chat.messages), ptok, 0,
                            chat.model, False)
        return _error(429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check "
                      "quota).")
    state.ledger.record(now, 200, "ok", prompt_key(chat.messages), ptok, ctok, chat.model, True)
    return web.json_response(doc)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def create_batch(request: web.Request) -> web.Response:
    if (denied := _denied(request)) is not None:
        return denied
    state, store = request.app[STATE], request.app[GEMINI_BATCHES]
    try:
        batch = json.loads(await request.read())["batch"]
        reqs = batch["input_config"]["requests"]["requests"]
        name = str(batch["display_name"])
        assert isinstance(reqs, list) and reqs
    except (ValueError, KeyError, TypeError, AssertionError):
        return _error(400, "INVALID_ARGUMENT", "batch.display_name and inline "
                      "batch.input_config.requests.requests are required")
    bid = f"batches/{os.urandom(10).hex()}"
    meta = {"name": bid, "model": f"models/{request.match_info['model']}", "displayName": name,
            "createTime": _now(), "updateTime": _now(), "state": "BATCH_STATE_PENDING",
            "batchStats": {"requestCount": str(len(reqs)), "pendingRequestCount": str(len(reqs))}}
    every = state.config.batch_expire_every
    b = _GBatch(meta, reqs, bool(every) and (len(store.batches) + 1) % every == 0)
    store.batches[bid] = b
    state.ledger.record(state.now(), 200, "batch_created", bid, 0, 0, "", False)
    b.task = asyncio.get_running_loop().create_task(_process(state, b))
    loop = asyncio.get_running_loop()
    held = loop.time()
    while loop.time() - held < store.create_answer_delay_s:
        await asyncio.sleep(0.02)
    return web.json_response(b.op())


def _one(state: MockState, model: str, item: dict[str, Any]) -> dict[str, Any]:
    cfg, seq, now = state.config, len(state.ledger), state.now()
    meta = item.get("metadata")
    try:
        chat = _chat(model, item.get("request"))
    except ValueError as e:
        state.ledger.record(now, 400, "bad_request", "", 0, 0, "", False)
        return {"error": {"code": 3, "message": str(e)}, "metadata": meta}
    if unit(cfg.seed, seq, _ERROR_SALT) < cfg.batch_line_error_rate:
        state.ledger.record(now, 500, "server_error", prompt_key(chat.messages), 0, 0, model,
                            False)
        code = 13 if unit(cfg.seed, seq, _ERROR_SALT + 1) < 0.5 else 3
        return {"error": {"code": code, "message": "simulated error"}, "metadata": meta}
    doc, ptok, ctok = _answer(state, chat, seq)
    state.ledger.record(now, 200, "ok", prompt_key(chat.messages), ptok, ctok, model, False)
    return {"response": doc, "metadata": meta}


async def _process(state: MockState, b: _GBatch) -> None:
    await asyncio.sleep(state.config.batch_delay_s / 2)
    b.meta.update(state="BATCH_STATE_RUNNING", updateTime=_now())
    await asyncio.sleep(state.config.batch_delay_s / 2)
    if b.expire:
        b.meta.update(state="BATCH_STATE_EXPIRED", updateTime=_now(), endTime=_now())
        return
    model = b.meta["model"].removeprefix("models/")
    out = [_one(state, model, r) for r in b.requests]
    b.response = {"@type": _TYPE + "GenerateContentBatchOutput",
                  "inlinedResponses": {"inlinedResponses": out}}
    b.meta.update(state="BATCH_STATE_SUCCEEDED", updateTime=_now(), endTime=_now())
    b.meta["batchStats"].update(pendingRequestCount="0", successfulRequestCount=str(
        sum("response" in r for r in out)), failedRequestCount=str(
        sum("error" in r for r in out)))


def _found(request: web.Request) -> _GBatch | web.Response:
    b = request.app[GEMINI_BATCHES].batches.get("batches/" + request.match_info["id"])
    return b if b is not None else _error(404, "NOT_FOUND", "batch not found")


async def get_batch(request: web.Request) -> web.Response:
    if (denied := _denied(request)) is not None:
        return denied
    b = _found(request)
    return b if isinstance(b, web.Response) else web.json_response(b.op())


async def cancel_batch(request: web.Request) -> web.Response:
    if (denied := _denied(request)) is not None:
        return denied
    b = _found(request)
    if isinstance(b, web.Response):
        return b
    if b.meta["state"] in ("BATCH_STATE_PENDING", "BATCH_STATE_RUNNING"):
        if b.task is not None:
            b.task.cancel()
        b.meta.update(state="BATCH_STATE_CANCELLED", updateTime=_now(), endTime=_now())
    return web.json_response({})


async def list_batches(request: web.Request) -> web.Response:
    """Newest first; ``pageToken`` is the index of the page's first batch."""
    if (denied := _denied(request)) is not None:
        return denied
    try:
        size = min(1000, max(1, int(request.query.get("pageSize", "50"))))
        start = int(request.query.get("pageToken", "0") or 0)
    except ValueError:
        return _error(400, "INVALID_ARGUMENT", "pageSize and pageToken are integers")
    ops = [b.op() for b in reversed(request.app[GEMINI_BATCHES].batches.values())]
    page: dict[str, Any] = {"operations": ops[start:start + size]}
    if start + size < len(ops):
        page["nextPageToken"] = str(start + size)
    return web.json_response(page)
