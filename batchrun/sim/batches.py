"""The simulated Files and Batch APIs: ``/v1/files`` and ``/v1/batches``, as OpenAI has them.

A batch lives through the real status life cycle, spread over ``batch_delay_s``::

    validating -> in_progress -> finalizing -> completed
               -> failed                    (every ``batch_fail_every``-th created batch)
                  in_progress -> expired    (every ``batch_expire_every``-th: half answered)
    any open   -> cancelling -> cancelled   (POST /v1/batches/{id}/cancel)

Each line is answered by the same code as an online request (``kinds.ROUTES`` by its url)
and billed with the same tokenizer. The ledger gets one record per batch creation
(outcome ``batch_created``, key = the input file id) and one per answered line (``ok``,
or ``server_error`` for the ``batch_line_error_rate`` share), so tests can prove each
row was billed once. Lines never run (expired, cancelled) cost nothing.

The first ``batch_429_first`` calls (after the key check) are answered 429 with
``Retry-After: batch_retry_after_s``, each a ledger record (``rate_limited``, key =
``METHOD /path``); ``batch_queue_tokens`` is OpenAI's per-model enqueued-token quota
(``quotas.py``). ``app[BATCHES].create_answer_delay_s`` holds back a create's answer
after the batch exists: a test kills the driver meanwhile, as a crash would.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from batchrun.sim import ledger as ledger_mod
from batchrun.sim.faults import unit
from batchrun.sim.kinds import ROUTES
from batchrun.sim.protocol import (
    BadRequest,
    error_body,
)
from batchrun.sim.quotas import over_quota
from batchrun.sim.state import STATE, MockState

__all__ = ["BATCHES", "BATCH_OUTCOMES", "BatchStore", "add_batch_routes"]

BATCH_OUTCOMES = ("batch_created",)
_LINE_ERROR_SALT = 4  # fault draws: 0-2 transport faults, 3 structured answers


def _register_outcomes() -> None:
    # The ledger's outcome list is append-only: batch outcomes join its end (a no-op now).
    for name in BATCH_OUTCOMES:
        if name not in ledger_mod.OUTCOMES:
            ledger_mod._OUTCOME_INDEX[name] = len(ledger_mod.OUTCOMES)
            ledger_mod.OUTCOMES = (*ledger_mod.OUTCOMES, name)


@dataclass
class MockFile:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def obj(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": len(self.data),
                "created_at": self.created_at, "filename": self.filename,
                "purpose": self.purpose, "status": "processed", "status_details": None}


@dataclass
class _Batch:
    obj: dict[str, Any]
    fate: str  # ok | fail | expire
    lines: list[dict[str, Any]] = field(default_factory=list)
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)
    done: set[str] = field(default_factory=set)
    task: asyncio.Task[None] | None = None


class BatchStore:
    """Files and batches of the simulated account, in creation order."""

    def __init__(self) -> None:
        self.files: dict[str, MockFile] = {}
        self.batches: dict[str, _Batch] = {}
        self.created = 0
        self.calls = 0  # Files/Batch API calls that passed the key check
        self.create_answer_delay_s = 0.0  # read while waiting: 0 releases a held answer

    def add_file(self, filename: str, purpose: str, data: bytes) -> MockFile:
        f = MockFile(f"file-{os.urandom(12).hex()}", filename, purpose, data, int(time.time()))
        self.files[f.id] = f
        return f


BATCHES = web.AppKey("batchrun_mock_batches", BatchStore)


def add_batch_routes(app: web.Application) -> None:
    """Add the Files and Batch API routes to an application made by ``build_app``."""
    _register_outcomes()
    app[BATCHES] = BatchStore()
    app.router.add_post("/v1/files", upload_file)
    app.router.add_get("/v1/files/{id}", get_file)
    app.router.add_get("/v1/files/{id}/content", file_content)
    app.router.add_post("/v1/batches", create_batch)
    app.router.add_get("/v1/batches", list_batches)
    app.router.add_get("/v1/batches/{id}", get_batch)
    app.router.add_post("/v1/batches/{id}/cancel", cancel_batch)
    app.on_cleanup.append(_stop_tasks)


async def _stop_tasks(app: web.Application) -> None:
    for b in app[BATCHES].batches.values():
        if b.task is not None:
            b.task.cancel()


def _error(status: int, message: str, code: str | None = None,
           param: str | None = None) -> web.Response:
    return web.Response(status=status, content_type="application/json",
                        body=error_body(message, "invalid_request_error", code, param))


def _unauthorized(request: web.Request) -> web.Response | None:
    """401 without the key; else 429 + Retry-After for the first ``batch_429_first`` calls."""
    state = request.app[STATE]
    if state.auth is not None and request.headers.get("Authorization") != state.auth:
        return _error(401, "Incorrect API key provided.", "invalid_api_key")
    store = request.app[BATCHES]
    store.calls += 1
    if store.calls > state.config.batch_429_first:
        return None
    state.ledger.record(state.now(), 429, "rate_limited", f"{request.method} {request.path}",
                        0, 0, "", False)
    return web.Response(
        status=429, content_type="application/json",
        headers={"Retry-After": f"{state.config.batch_retry_after_s:g}"},
        body=error_body("Rate limit reached for the Batch API: too many requests for this "
                        "key.", "rate_limit_error", "rate_limit_exceeded"))


# -- files ---------------------------------------------------------------------------


async def upload_file(request: web.Request) -> web.Response:
    if (denied := _unauthorized(request)) is not None:
        return denied
    purpose, filename, data = None, "upload.jsonl", None
    async for part in await request.multipart():
        if getattr(part, "name", None) == "purpose":
            purpose = (await part.read()).decode()  # type: ignore[union-attr]
        elif getattr(part, "name", None) == "file":
            filename = getattr(part, "filename", None) or filename
            data = bytes(await part.read())  # type: ignore[union-attr]
    if data is None:
        return _error(400, "Missing required parameter: 'file'.", param="file")
    if purpose not in ("batch", "fine-tune", "assistants", "user_data"):
        return _error(400, f"Invalid value for 'purpose': {purpose!r}.", param="purpose")
    return web.json_response(request.app[BATCHES].add_file(filename, purpose, data).obj())


def _file_or_404(request: web.Request) -> MockFile | web.Response:
    fid = request.match_info["id"]
    f = request.app[BATCHES].files.get(fid)
    if f is None:
        return _error(404, f"No such File object: {fid}", param="id")
    return f


async def get_file(request: web.Request) -> web.Response:
    if (denied := _unauthorized(request)) is not None:
        return denied
    f = _file_or_404(request)
    return f if isinstance(f, web.Response) else web.json_response(f.obj())


async def file_content(request: web.Request) -> web.Response:
    if (denied := _unauthorized(request)) is not None:
        return denied
    f = _file_or_404(request)
    if isinstance(f, web.Response):
        return f
    return web.Response(body=f.data, content_type="application/octet-stream")


# -- batches -------------------------------------------------------------------------


def _new_batch(store: BatchStore, body: dict[str, Any]) -> dict[str, Any]:
    now = int(time.time())
    return {
        "id": f"batch_{os.urandom(12).hex()}", "object": "batch", "endpoint": body["endpoint"],
        "errors": None, "input_file_id": body["input_file_id"],
        "completion_window": body["completion_window"], "status": "validating",
        "output_file_id": None, "error_file_id": None, "created_at": now,
        "in_progress_at": None, "expires_at": now + 86400, "finalizing_at": None,
        "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None,
        "cancelled_at": None, "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": body.get("metadata"),
    }


def _check_create(store: BatchStore, body: Any) -> web.Response | None:
    if not isinstance(body, dict):
        return _error(400, "The request body must be a JSON object.")
    if body.get("input_file_id") not in store.files:
        return _error(400, f"Invalid 'input_file_id': {body.get('input_file_id')!r}.",
                      param="input_file_id")
    if body.get("endpoint") not in ROUTES:
        return _error(400, f"Invalid 'endpoint': one of {', '.join(ROUTES)}.",
                      param="endpoint")
    if body.get("completion_window") != "24h":
        return _error(400, "Invalid 'completion_window': expected '24h'.",
                      param="completion_window")
    meta = body.get("metadata")
    if meta is not None and (not isinstance(meta, dict) or len(meta) > 16 or not all(
            isinstance(v, str) and len(v) <= 512 for v in meta.values())):
        return _error(400, "Invalid 'metadata': up to 16 string values of 512 chars.",
                      param="metadata")
    return None


def _fate(config: Any, n: int) -> str:
    """Whether the n-th created batch (1-based) fails, expires or completes."""
    if config.batch_fail_every and n % config.batch_fail_every == 0:
        return "fail"
    if config.batch_expire_every and n % config.batch_expire_every == 0:
        return "expire"
    return "ok"


async def create_batch(request: web.Request) -> web.Response:
    if (denied := _unauthorized(request)) is not None:
        return denied
    state, store = request.app[STATE], request.app[BATCHES]
    try:
        body = json.loads(await request.read())
    except ValueError:
        return _error(400, "We could not parse the JSON body of your request.")
    if (bad := _check_create(store, body)) is not None:
        return bad
    store.created += 1
    b = _Batch(_new_batch(store, body), _fate(state.config, store.created))
    store.batches[b.obj["id"]] = b
    state.ledger.record(state.now(), 200, "batch_created", body["input_file_id"], 0, 0, "",
                        False)
    b.task = asyncio.get_running_loop().create_task(_process(state, store, b))
    held = time.monotonic()
    while time.monotonic() - held < store.create_answer_delay_s:
        await asyncio.sleep(0.02)
    return web.json_response(b.obj)


async def get_batch(request: web.Request) -> web.Response:
    if (denied := _unauthorized(request)) is not None:
        return denied
    b = request.app[BATCHES].batches.get(request.match_info["id"])
    if b is None:
        return _error(404, f"No such Batch object: {request.match_info['id']}", param="id")
    return web.json_response(b.obj)


async def list_batches(request: web.Request) -> web.Response:
    """Newest first; ``after`` is the id of the last batch of the previous page."""
    if (denied := _unauthorized(request)) is not None:
        return denied
    try:
        limit = min(100, max(1, int(request.query.get("limit", "20"))))
    except ValueError:
        return _error(400, "Invalid 'limit': expected an integer.", param="limit")
    ids = list(reversed(request.app[BATCHES].batches))
    after = request.query.get("after")
    start = ids.index(after) + 1 if after in ids else 0
    page = [request.app[BATCHES].batches[i].obj for i in ids[start:start + limit]]
    return web.json_response({
        "object": "list", "data": page, "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(ids)})


async def cancel_batch(request: web.Request) -> web.Response:
    if (denied := _unauthorized(request)) is not None:
        return denied
    state, store = request.app[STATE], request.app[BATCHES]
    b = store.batches.get(request.match_info["id"])
    if b is None:
        return _error(404, f"No such Batch object: {request.match_info['id']}", param="id")
    if b.obj["status"] not in ("validating", "in_progress", "finalizing"):
        return _error(409, f"Cannot cancel a batch with status {b.obj['status']}.")
    if b.task is not None:
        b.task.cancel()
    _set(b, "cancelling")
    b.task = asyncio.get_running_loop().create_task(_finish_cancel(state, store, b))
    return web.json_response(b.obj)


# -- processing ----------------------------------------------------------------------


def _set(b: _Batch, status: str) -> None:
    b.obj["status"] = status
    b.obj[f"{status}_at"] = int(time.time())


def _fail(b: _Batch, code: str, message: str) -> None:
    b.obj["errors"] = {"object": "list",
                       "data": [{"code": code, "message": message, "param": None, "line": None}]}
    _set(b, "failed")


def _validate_lines(store: BatchStore, b: _Batch) -> str | None:
    """Parse the input file into ``b.lines``; a message if the file is not a valid batch."""
    seen: set[str] = set()
    for i, raw in enumerate(store.files[b.obj["input_file_id"]].data.splitlines(), 1):
        try:
            doc = json.loads(raw)
        except ValueError:
            return f"line {i} is not valid JSON"
        cid = doc.get("custom_id") if isinstance(doc, dict) else None
        if not isinstance(cid, str) or cid in seen:
            return f"line {i}: custom_id missing or not unique"
        if doc.get("url") != b.obj["endpoint"] or doc.get("method") != "POST":
            return f"line {i}: url must be {b.obj['endpoint']} and method POST"
        seen.add(cid)
        b.lines.append(doc)
    return None if b.lines else "the input file holds no requests"


def _result_line(cid: str, status: int | None, body: Any, error: Any = None) -> str:
    resp = None if status is None else {
        "status_code": status, "request_id": os.urandom(8).hex(), "body": body}
    return json.dumps({"id": f"batch_req_{os.urandom(8).hex()}", "custom_id": cid,
                       "response": resp, "error": error}, separators=(",", ":"))


def _answer_line(state: MockState, doc: dict[str, Any]) -> tuple[str, bool]:
    """One request line answered like an online request and billed: (line, ok)."""
    cid, now, cfg = doc["custom_id"], state.now(), state.config
    route = ROUTES[doc["url"]]  # the batch's endpoint, checked by _validate_lines
    try:
        req = route.parse(doc.get("body"))
    except BadRequest as e:
        state.ledger.record(now, 400, "bad_request", "", 0, 0, "", False)
        return _result_line(cid, 400, json.loads(error_body(
            e.message, "invalid_request_error", None, e.param))), False
    key, ptok = route.key(req), route.prompt_tokens(req)
    seq = len(state.ledger)
    if unit(cfg.seed, seq, _LINE_ERROR_SALT) < cfg.batch_line_error_rate:
        state.ledger.record(now, 500, "server_error", key, ptok, 0, req.model, False)
        if unit(cfg.seed, seq, _LINE_ERROR_SALT + 1) < 0.5:  # both shapes OpenAI uses
            return _result_line(cid, 500, json.loads(error_body(
                "The server had an error processing your request.", "server_error"))), False
        return _result_line(cid, None, None, {"code": "server_error",
                                              "message": "The server had an error."}), False
    ans = route.answer(req, key, ptok, cfg, seq, f"{state.nonce}{seq:x}", int(time.time()))
    state.ledger.record(now, 200, "ok", key, ptok, ans.completion_tokens, req.model, False)
    return _result_line(cid, 200, json.loads(ans.body)), True


def _answer(state: MockState, b: _Batch, lines: list[dict[str, Any]]) -> None:
    counts = b.obj["request_counts"]
    for doc in lines:
        line, ok = _answer_line(state, doc)
        (b.out if ok else b.err).append(line)
        b.done.add(doc["custom_id"])
        counts["completed" if ok else "failed"] += 1


def _close(store: BatchStore, b: _Batch, status: str, unrun_code: str | None) -> None:
    """Write the output and error files and end the batch in ``status``."""
    for doc in b.lines:
        if unrun_code and doc["custom_id"] not in b.done:
            b.err.append(_result_line(doc["custom_id"], None, None, {
                "code": unrun_code, "message": f"This request was not run: batch {status}."}))
            b.obj["request_counts"]["failed"] += 1
    bid = b.obj["id"]
    for key, lines, name in (("output_file_id", b.out, "output"),
                             ("error_file_id", b.err, "error")):
        if lines:
            data = ("\n".join(lines) + "\n").encode()
            b.obj[key] = store.add_file(f"{bid}_{name}.jsonl", "batch_output", data).id
    _set(b, status)


async def _process(state: MockState, store: BatchStore, b: _Batch) -> None:
    step = state.config.batch_delay_s / 3
    await asyncio.sleep(step)
    problem = _validate_lines(store, b)
    if problem is not None or b.fate == "fail":
        _fail(b, "invalid_file", problem or "simulated failure (batch_fail_every)")
        return
    if full := over_quota(state.config.batch_queue_tokens, b, store.batches.values()):
        return _fail(b, "token_limit_exceeded", full)  # sim/quotas.py
    b.obj["request_counts"]["total"] = len(b.lines)
    _set(b, "in_progress")
    if b.fate == "expire":  # half answered, then the window runs out
        _answer(state, b, b.lines[: len(b.lines) // 2])
        await asyncio.sleep(step)
        _close(store, b, "expired", "batch_expired")
        return
    _answer(state, b, b.lines)
    await asyncio.sleep(step)
    _set(b, "finalizing")
    await asyncio.sleep(step)
    _close(store, b, "completed", None)


async def _finish_cancel(state: MockState, store: BatchStore, b: _Batch) -> None:
    await asyncio.sleep(min(0.2, state.config.batch_delay_s / 3))
    _close(store, b, "cancelled", "batch_cancelled")
