"""The aiohttp application of the simulated provider.

Routes: ``POST /v1/chat/completions``, ``POST /v1/embeddings``, ``POST /v1/responses``
(``kinds.py`` says what each answers; ``kind_handler`` serves them), ``GET /v1/models``,
``GET /health`` and the test judge ``GET /_ledger``, ``GET /_ledger/stats``,
``POST /_ledger/reset``. All state lives in one ``MockState`` under ``app[STATE]``
(``state.py``), which the Batch API routes of ``batches.py`` share: the limiter, the
ledger and the clock.

The chat handler decides everything (auth, validation, storm, limits, fault, answer)
without awaiting, records the decision in the ledger, and only then sleeps for the
configured latency and writes: ledger times are thus the admission times the limiter
used, and are in sequence order.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from batchrun.api.tokens import count_chat_tokens
from batchrun.sim import faults
from batchrun.sim.anthropic import add_anthropic_routes
from batchrun.sim.batches import add_batch_routes
from batchrun.sim.config import MockConfig
from batchrun.sim.gemini import add_gemini_routes
from batchrun.sim.kinds import ROUTES, SimRoute
from batchrun.sim.ledger import prompt_key
from batchrun.sim.limits import Decision
from batchrun.sim.protocol import (
    BadRequest,
    ChatRequest,
    answer_request,
    completion_body,
    error_body,
    parse_chat_request,
)
from batchrun.sim.state import STATE, MockState

__all__ = ["STATE", "MockState", "build_app"]

_JSON = "application/json"
_MAX_REQUEST_BYTES = 64 * 1024 * 1024  # aiohttp's 1 MiB default is below real prompt sizes
_ECHO_SALT = 5  # salts 0-4 are taken (faults, answers, batch lines): a draw of its own


def build_app(config: MockConfig, *, clock: Callable[[], float] = time.monotonic
              ) -> web.Application:
    """The application with all routes of the simulated provider; add more before startup."""
    app = web.Application(client_max_size=_MAX_REQUEST_BYTES)
    app[STATE] = MockState(config, clock)
    # Load the BPE tables now, not inside the first request: a half-second stall there
    # queues the first requests and stamps them all with one arrival time.
    for model in config.models:
        count_chat_tokens([{"role": "user", "content": "warm up"}], model)
    app.router.add_post("/v1/chat/completions", chat_completions)
    for url in ("/v1/embeddings", "/v1/responses"):
        app.router.add_post(url, kind_handler(ROUTES[url]))
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/_ledger", ledger_records)
    app.router.add_get("/_ledger/stats", ledger_stats)
    app.router.add_post("/_ledger/reset", ledger_reset)
    add_batch_routes(app)
    add_anthropic_routes(app)  # /v1/messages and Message Batches
    add_gemini_routes(app)  # /v1beta: generateContent and the Batch API
    app.on_cleanup.append(_close_ledger)
    return app


async def _close_ledger(app: web.Application) -> None:
    app[STATE].ledger.close()


def _error(status: int, message: str, type_: str, code: str | None = None,
           param: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=error_body(message, type_, code, param),
                        content_type=_JSON, headers=headers)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    presented = request.headers.get("Authorization", "").removeprefix("Bearer ")
    echo = state.config.echo_key_in_errors
    if state.auth is not None and request.headers.get("Authorization") != state.auth:
        state.ledger.record(state.now(), 401, "unauthorized", "", 0, 0, "", False)
        return _error(401, f"Incorrect API key provided: {presented}." if echo else
                      "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
    try:
        chat = parse_chat_request(json.loads(await request.read()))
    except (ValueError, BadRequest) as exc:  # JSONDecodeError and UnicodeError are ValueErrors
        state.ledger.record(state.now(), 400, "bad_request", "", 0, 0, "", False)
        if isinstance(exc, BadRequest):
            return _error(400, exc.message, "invalid_request_error", None, exc.param)
        return _error(400, "We could not parse the JSON body of your request.",
                      "invalid_request_error")
    now = state.now()
    if chat.model in state.unknown_models:
        state.ledger.record(now, 404, "model_not_found", "", 0, 0, chat.model, False)
        return _error(404, f"The model `{chat.model}` does not exist or you do not have "
                      "access to it.", "invalid_request_error", "model_not_found")
    if echo and faults.unit(state.config.seed, len(state.ledger), _ECHO_SALT) < echo:
        state.ledger.record(now, 400, "bad_request", "", 0, 0, chat.model, False)
        return _error(400, f"Request rejected for key {presented}: this proxy refuses it.",
                      "invalid_request_error")
    return await _admit_and_answer(state, request, chat, now)


async def _admit_and_answer(state: MockState, request: web.Request, chat: ChatRequest,
                            now: float) -> web.StreamResponse:
    """Storm and limit checks, then the (possibly faulty) answer. No await before recording."""
    key = prompt_key(chat.messages)
    ptok = count_chat_tokens(chat.messages, chat.model)
    refused = _refusal(state, now, ptok + chat.max_tokens)
    headers = state.limiter.headers(now) if state.limiter.enabled else {}
    if refused is not None:
        outcome, decision = refused
        state.ledger.record(now, 429, outcome, key, ptok, 0, chat.model, False)
        return _rate_limited(decision, headers, chat.model)
    seq = len(state.ledger)
    cfg = state.config
    fault = faults.draw_fault(cfg, seq) if cfg.any_faults else None
    content, ctok, finish = answer_request(chat, key, config=cfg, seq=seq)
    status = _status_of(cfg, fault, seq)
    state.ledger.record(now, status, fault or "ok", key, ptok, ctok if status == 200 else 0,
                        chat.model, True)
    if cfg.latency_ms or cfg.latency_jitter_ms:
        await asyncio.sleep(faults.latency_s(cfg, seq))
    if fault == "reset":
        # Abort the socket (RST) instead of answering; the exception is never sent.
        if request.transport is not None:
            request.transport.abort()
        raise web.HTTPInternalServerError()
    if status != 200:
        return _server_error(fault, status, headers)
    if fault == "oversize":
        content = _oversize_content(cfg.oversize_bytes)
    body = completion_body(f"chatcmpl-{state.nonce}{seq:x}", int(time.time()), chat.model,
                           content, finish, ptok, ctok)
    if fault == "malformed":
        body = body[: len(body) // 2]  # a truncated JSON document
    return web.Response(body=body, content_type=_JSON, headers=headers)


def _status_of(config: MockConfig, fault: str | None, seq: int) -> int:
    """The status the ledger records: 0 for a reset (nothing was sent)."""
    if fault == "reset":
        return 0
    if fault == "server_error":
        return faults.error_status(config, seq)
    return 502 if fault == "nonjson" else 200


def _refusal(state: MockState, now: float, weight: int) -> tuple[str, Decision] | None:
    """("storm" | "rate_limited" | "too_large", decision) when refused, else None."""
    storm = faults.storm_remaining(state.config, now)
    if storm > 0:
        return "storm", Decision(False, "requests", storm)
    if not state.limiter.enabled:
        return None
    decision = state.limiter.try_acquire(weight, now)
    if decision.allowed:
        return None
    return ("too_large" if decision.too_large else "rate_limited"), decision


def _rate_limited(decision: Decision, headers: dict[str, str], model: str) -> web.Response:
    headers = dict(headers)
    headers["Retry-After"] = str(decision.retry_after_s)
    headers["retry-after-ms"] = str(decision.retry_after_ms)
    if decision.too_large:
        message = f"Request too large for {model}: the request alone exceeds the TPM limit."
    else:
        message = (f"Rate limit reached for {model} on {decision.kind}. "
                   f"Please try again in {decision.retry_after:.3f}s.")
    return _error(429, message, decision.kind or "requests", "rate_limit_exceeded",
                  headers=headers)


def _server_error(fault: str | None, status: int, headers: dict[str, str]) -> web.Response:
    if fault == "nonjson":
        return web.Response(status=502, body=faults.BAD_GATEWAY_HTML,
                            content_type="text/html", headers=headers)
    return _error(status, "The server had an error while processing your request. Sorry about "
                  "that!", "server_error", None, headers=headers)


def _oversize_content(min_bytes: int) -> str:
    # Valid JSON, only too large: a client's response-size cap must reject it.
    return "the " * (min_bytes // 4 + 1)


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    created = int(time.time())
    data = [{"id": m, "object": "model", "created": created, "owned_by": "batchrun-mock"}
            for m in state.config.models]
    return web.json_response({"object": "list", "data": data})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "uptime_s": request.app[STATE].now()})


async def ledger_records(request: web.Request) -> web.Response:
    ledger = request.app[STATE].ledger
    try:
        since = max(0, int(request.query.get("since", "0")))
        limit_text = request.query.get("limit")
        limit = int(limit_text) if limit_text is not None else None
    except ValueError:
        return _error(400, "since and limit must be integers", "invalid_request_error")
    records: list[dict[str, Any]] = ledger.records(since, limit)
    return web.json_response({"records": records, "next": since + len(records),
                              "total": len(ledger)})


async def ledger_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].ledger.stats())


async def ledger_reset(request: web.Request) -> web.Response:
    request.app[STATE].reset()
    return web.json_response({"reset": True})


def kind_handler(route: SimRoute) -> Callable[[web.Request], Any]:
    """The handler of another route of ``kinds.py``, decided as chat's is: auth, parse,
    unknown model, storm and limits (weighed at prompt + max output tokens), fault, answer;
    recorded in the ledger before any await."""

    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE]
        if state.auth is not None and request.headers.get("Authorization") != state.auth:
            state.ledger.record(state.now(), 401, "unauthorized", "", 0, 0, "", False)
            return _error(401, "Incorrect API key provided.", "invalid_request_error",
                          "invalid_api_key")
        try:
            req = route.parse(json.loads(await request.read()))
        except (ValueError, BadRequest) as exc:
            state.ledger.record(state.now(), 400, "bad_request", "", 0, 0, "", False)
            if isinstance(exc, BadRequest):
                return _error(400, exc.message, "invalid_request_error", None, exc.param)
            return _error(400, "We could not parse the JSON body of your request.",
                          "invalid_request_error")
        now, model = state.now(), req.model
        if model in state.unknown_models:
            state.ledger.record(now, 404, "model_not_found", "", 0, 0, model, False)
            return _error(404, f"The model `{model}` does not exist or you do not have "
                          "access to it.", "invalid_request_error", "model_not_found")
        key, ptok = route.key(req), route.prompt_tokens(req)
        refused = _refusal(state, now, ptok + route.max_output(req))
        headers = state.limiter.headers(now) if state.limiter.enabled else {}
        if refused is not None:
            state.ledger.record(now, 429, refused[0], key, ptok, 0, model, False)
            return _rate_limited(refused[1], headers, model)
        seq, cfg = len(state.ledger), state.config
        fault = faults.draw_fault(cfg, seq) if cfg.any_faults else None
        ans = route.answer(req, key, ptok, cfg, seq, f"{state.nonce}{seq:x}", int(time.time()))
        status = _status_of(cfg, fault, seq)
        state.ledger.record(now, status, fault or "ok", key, ptok,
                            ans.completion_tokens if status == 200 else 0, model, True)
        if cfg.latency_ms or cfg.latency_jitter_ms:
            await asyncio.sleep(faults.latency_s(cfg, seq))
        if fault == "reset":
            if request.transport is not None:
                request.transport.abort()
            raise web.HTTPInternalServerError()
        if status != 200:
            return _server_error(fault, status, headers)
        body = ans.body[: len(ans.body) // 2] if fault == "malformed" else ans.body
        return web.Response(body=body, content_type=_JSON, headers=headers)

    return handle
