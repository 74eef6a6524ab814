"""The simulated Anthropic Message Batches API: ``/v1/messages/batches``.

    POST /v1/messages/batches                  {requests: [{custom_id, params}]}
    GET  /v1/messages/batches                  newest first; limit, after_id, before_id
    GET  /v1/messages/batches/{id}
    POST /v1/messages/batches/{id}/cancel
    GET  /v1/messages/batches/{id}/results     JSONL, once processing_status is "ended"

The real life cycle: ``in_progress`` (``request_counts.processing`` = n) until
``batch_delay_s`` has passed, then ``ended`` with each request ``succeeded``, ``errored``
(the ``batch_line_error_rate`` share: ``invalid_request_error``, or ``api_error`` for
half of them) or, for every ``batch_expire_every``-th batch, half of them ``expired``;
a cancel makes it ``canceling``, then ``ended`` with the unprocessed requests
``canceled``. Batches carry no metadata (Anthropic's have none).

``batch_queue_requests`` (0: none) caps the requests of the account's open batches: a
create beyond it is answered 429 ``rate_limit_error``, as Anthropic's processing queue
limit does. The ledger gets one ``batch_created`` record per batch (key = the batch id)
and one record per succeeded (``ok``, billed) or errored (``server_error``) request.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from batchrun.sim.anthropic_protocol import (
    BadRequest,
    answer_message,
    anthropic_error,
    key_ok,
    parse_messages_request,
)
from batchrun.sim.faults import unit
from batchrun.sim.ledger import prompt_key
from batchrun.sim.state import STATE, MockState

__all__ = ["MESSAGE_BATCHES", "MessageBatchStore", "add_message_batch_routes"]

_ERROR_SALT = 7
MAX_REQUESTS = 100_000


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class _MBatch:
    obj: dict[str, Any]
    requests: list[dict[str, Any]]
    expire: bool
    results: list[str] = field(default_factory=list)
    task: asyncio.Task[None] | None = None


class MessageBatchStore:
    """The account's message batches, in creation order."""

    def __init__(self) -> None:
        self.batches: dict[str, _MBatch] = {}
        self.create_answer_delay_s = 0.0  # a test kills the driver while a create waits

    def queued(self) -> int:
        return sum(b.obj["request_counts"]["processing"] for b in self.batches.values())


MESSAGE_BATCHES = web.AppKey("batchrun_mock_message_batches", MessageBatchStore)


def add_message_batch_routes(app: web.Application) -> None:
    app[MESSAGE_BATCHES] = MessageBatchStore()
    app.router.add_post("/v1/messages/batches", create_batch)
    app.router.add_get("/v1/messages/batches", list_batches)
    app.router.add_get("/v1/messages/batches/{id}", get_batch)
    app.router.add_post("/v1/messages/batches/{id}/cancel", cancel_batch)
    app.router.add_get("/v1/messages/batches/{id}/results", batch_results)
    app.on_cleanup.append(_stop_tasks)


async def _stop_tasks(app: web.Application) -> None:
    for b in app[MESSAGE_BATCHES].batches.values():
        if b.task is not None:
            b.task.cancel()


def _denied(request: web.Request) -> web.Response | None:
    key = request.app[STATE].config.api_key
    if key is not None and not key_ok(request, key):
        return anthropic_error(401, "authentication_error", "invalid x-api-key")
    if not request.headers.get("anthropic-version"):
        return anthropic_error(400, "invalid_request_error",
                               "anthropic-version: header is required")
    return None


def _bad(message: str, status: int = 400, type_: str = "invalid_request_error"
         ) -> web.Response:
    return anthropic_error(status, type_, message)


def _check_requests(body: Any) -> str | None:
    reqs = body.get("requests") if isinstance(body, dict) else None
    if not isinstance(reqs, list) or not reqs:
        return "requests: at least one request is required"
    if len(reqs) > MAX_REQUESTS:
        return f"requests: at most {MAX_REQUESTS} requests per batch"
    seen: set[str] = set()
    for i, r in enumerate(reqs):
        cid = r.get("custom_id") if isinstance(r, dict) else None
        if not isinstance(cid, str) or not 1 <= len(cid) <= 64 or cid in seen:
            return f"requests.{i}.custom_id: 1 to 64 characters, unique in the batch"
        if not isinstance(r.get("params"), dict):
            return f"requests.{i}.params: Field required"
        seen.add(cid)
    return None


async def create_batch(request: web.Request) -> web.Response:
    if (denied := _denied(request)) is not None:
        return denied
    state, store = request.app[STATE], request.app[MESSAGE_BATCHES]
    try:
        body = json.loads(await request.read())
    except ValueError:
        return _bad("The request body is not valid JSON.")
    if (problem := _check_requests(body)) is not None:
        return _bad(problem)
    n, quota = len(body["requests"]), state.config.batch_queue_requests
    if quota and store.queued() + n > quota:
        state.ledger.record(state.now(), 429, "rate_limited", "POST /v1/messages/batches",
                            0, 0, "", False)
        return _bad(f"Number of batch requests in the processing queue would exceed {quota}",
                    429, "rate_limit_error")
    now = datetime.now(UTC)
    bid = f"msgbatch_{os.urandom(12).hex()}"
    obj = {"id": bid, "type": "message_batch", "processing_status": "in_progress",
           "request_counts": {"processing": n, "succeeded": 0, "errored": 0, "canceled": 0,
                              "expired": 0},
           "ended_at": None, "created_at": _iso(now), "expires_at": _iso(now + timedelta(1)),
           "archived_at": None, "cancel_initiated_at": None, "results_url": None}
    every = state.config.batch_expire_every
    b = _MBatch(obj, body["requests"], bool(every) and (len(store.batches) + 1) % every == 0)
    store.batches[bid] = b
    state.ledger.record(state.now(), 200, "batch_created", bid, 0, 0, "", False)
    b.task = asyncio.get_running_loop().create_task(_process(state, request, b))
    held = asyncio.get_running_loop().time()
    while asyncio.get_running_loop().time() - held < store.create_answer_delay_s:
        await asyncio.sleep(0.02)
    return web.json_response(obj)


def _found(request: web.Request) -> _MBatch | web.Response:
    b = request.app[MESSAGE_BATCHES].batches.get(request.match_info["id"])
    if b is None:
        return _bad(f"message batch {request.match_info['id']} not found", 404,
                    "not_found_error")
    return b


async def get_batch(request: web.Request) -> web.Response:
    if (denied := _denied(request)) is not None:
        return denied
    b = _found(request)
    return b if isinstance(b, web.Response) else web.json_response(b.obj)


async def list_batches(request: web.Request) -> web.Response:
    """Newest first, as Anthropic lists them; ``after_id``/``before_id`` page through."""
    if (denied := _denied(request)) is not None:
        return denied
    try:
        limit = min(1000, max(1, int(request.query.get("limit", "20"))))
    except ValueError:
        return _bad("limit: Input should be a valid integer")
    ids = list(reversed(request.app[MESSAGE_BATCHES].batches))
    after, before = request.query.get("after_id"), request.query.get("before_id")
    lo, hi = 0, len(ids)
    if after in ids:
        lo = ids.index(after) + 1
    if before in ids:
        hi = ids.index(before)
        lo = max(lo, hi - limit)
    page_ids = ids[lo:min(hi, lo + limit)]
    page = [request.app[MESSAGE_BATCHES].batches[i].obj for i in page_ids]
    return web.json_response({"data": page, "has_more": lo + limit < hi,
                              "first_id": page_ids[0] if page_ids else None,
                              "last_id": page_ids[-1] if page_ids else None})


async def cancel_batch(request: web.Request) -> web.Response:
    if (denied := _denied(request)) is not None:
        return denied
    b = _found(request)
    if isinstance(b, web.Response):
        return b
    if b.obj["processing_status"] == "in_progress":
        b.obj["processing_status"] = "canceling"
        b.obj["cancel_initiated_at"] = _iso(datetime.now(UTC))
        if b.task is not None:
            b.task.cancel()
        b.task = asyncio.get_running_loop().create_task(_finish_cancel(request, b))
    return web.json_response(b.obj)


async def batch_results(request: web.Request) -> web.StreamResponse:
    if (denied := _denied(request)) is not None:
        return denied
    b = _found(request)
    if isinstance(b, web.Response):
        return b
    if b.obj["processing_status"] != "ended":
        return _bad(f"message batch {b.obj['id']} has not ended; results are not ready")
    data = ("\n".join(b.results) + "\n").encode() if b.results else b""
    return web.Response(body=data, content_type="application/binary")


# -- processing ----------------------------------------------------------------------


def _answer(state: MockState, b: _MBatch, req: dict[str, Any]) -> None:
    """One request answered like an online one (and billed), or errored."""
    cid, counts, now, cfg = req["custom_id"], b.obj["request_counts"], state.now(), state.config
    seq = len(state.ledger)
    result: dict[str, Any]
    try:
        chat, images = parse_messages_request(req["params"])
    except BadRequest as e:
        state.ledger.record(now, 400, "bad_request", "", 0, 0, "", False)
        result = _errored("invalid_request_error", str(e))
    else:
        key = prompt_key(chat.messages)
        if unit(cfg.seed, seq, _ERROR_SALT) < cfg.batch_line_error_rate:
            state.ledger.record(now, 500, "server_error", key, 0, 0, chat.model, False)
            transient = unit(cfg.seed, seq, _ERROR_SALT + 1) < 0.5
            result = _errored("api_error" if transient else "invalid_request_error",
                              "simulated error (batch_line_error_rate)")
        else:
            msg, ptok, ctok = answer_message(state, chat, images, seq)
            state.ledger.record(now, 200, "ok", key, ptok, ctok, chat.model, False)
            result = {"type": "succeeded", "message": msg}
    counts["processing"] -= 1
    counts["succeeded" if result["type"] == "succeeded" else "errored"] += 1
    b.results.append(json.dumps({"custom_id": cid, "result": result}, separators=(",", ":")))


def _errored(type_: str, message: str) -> dict[str, Any]:
    return {"type": "errored", "error": {"type": "error",
                                         "error": {"type": type_, "message": message}}}


def _end(request: web.Request, b: _MBatch, unrun: str | None) -> None:
    done = {json.loads(r)["custom_id"] for r in b.results}
    counts = b.obj["request_counts"]
    for req in b.requests:
        if req["custom_id"] not in done and unrun:
            b.results.append(json.dumps({"custom_id": req["custom_id"],
                                         "result": {"type": unrun}}, separators=(",", ":")))
            counts[unrun] += 1
    counts["processing"] = 0
    b.obj["processing_status"] = "ended"
    b.obj["ended_at"] = _iso(datetime.now(UTC))
    origin = f"{request.scheme}://{request.host}"
    b.obj["results_url"] = f"{origin}/v1/messages/batches/{b.obj['id']}/results"


async def _process(state: MockState, request: web.Request, b: _MBatch) -> None:
    await asyncio.sleep(state.config.batch_delay_s / 2)
    todo = b.requests[: len(b.requests) // 2] if b.expire else b.requests
    for req in todo:
        _answer(state, b, req)
    await asyncio.sleep(state.config.batch_delay_s / 2)
    _end(request, b, "expired")


async def _finish_cancel(request: web.Request, b: _MBatch) -> None:
    await asyncio.sleep(min(0.2, request.app[STATE].config.batch_delay_s / 3))
    _end(request, b, "canceled")
