"""The simulated Anthropic Messages API: ``POST /v1/messages``, as Anthropic has it.

Checks what Anthropic checks: the key in ``x-api-key`` (401 ``authentication_error``),
the ``anthropic-version`` header, a body with ``model``, ``messages`` (user/assistant
only: the system prompt is the top-level ``system``), ``max_tokens`` and no unknown
field (400 ``invalid_request_error``). Limits are Anthropic's three per-minute ones,
requests, input tokens and output tokens, plus RPM/6 per 10 s in strict mode; the output
window admits a request when its ``max_tokens`` fits and then keeps its actual count
(Anthropic "adjusts at the end of the request"). A refusal is 429 ``rate_limit_error``
with ``retry-after`` (whole seconds); every answer carries the
``anthropic-ratelimit-{requests,input-tokens,output-tokens}-{limit,remaining,reset}``
headers. ``overload_rate`` answers 529 ``overloaded_error``; the transport faults of
``faults.py`` (5xx, resets, malformed bodies) apply as on the OpenAI route.

The answer is the same deterministic text as an OpenAI answer to the same messages
(``protocol.answer_request``), billed with the same tokenizer; a forced tool
(``tool_choice: {type: tool}``) is answered with a ``tool_use`` block whose input is an
instance of the tool's ``input_schema``. The ledger judges as on the OpenAI route
(outcome ``overloaded`` for 529s).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from datetime import UTC, datetime, timedelta

from aiohttp import web

from batchrun.sim import faults
from batchrun.sim import ledger as ledger_mod
from batchrun.sim.anthropic_batches import add_message_batch_routes
from batchrun.sim.anthropic_protocol import (
    BadRequest,
    answer_message,
    anthropic_error,
    key_ok,
    parse_messages_request,
)
from batchrun.sim.limits import SlidingWindow
from batchrun.sim.protocol import ChatRequest
from batchrun.sim.state import STATE, MockState

__all__ = ["ANTHROPIC_LIMITS", "AnthropicLimits", "add_anthropic_routes", "create_message"]

_OVERLOAD_SALT = 6  # salts 0-5 are taken (faults, answers, batch lines, echo)


def _register_outcomes() -> None:
    if "overloaded" not in ledger_mod.OUTCOMES:  # the list is append-only
        ledger_mod._OUTCOME_INDEX["overloaded"] = len(ledger_mod.OUTCOMES)
        ledger_mod.OUTCOMES = (*ledger_mod.OUTCOMES, "overloaded")


class AnthropicLimits:
    """Requests, input tokens and output tokens per minute (0 disables one)."""

    def __init__(self, rpm: int, input_tpm: int, output_tpm: int, *, strict: bool = True):
        self.windows: dict[str, list[SlidingWindow]] = {}
        if rpm:
            self.windows["requests"] = [SlidingWindow(rpm, 60.0)]
            if strict:
                self.windows["requests"].append(SlidingWindow(max(1, rpm // 6), 10.0))
        if input_tpm:
            self.windows["input-tokens"] = [SlidingWindow(input_tpm, 60.0)]
        if output_tpm:
            self.windows["output-tokens"] = [SlidingWindow(output_tpm, 60.0)]

    def check(self, now: float, input_tokens: int, max_tokens: int) -> tuple[str, float] | None:
        """(the binding limit, seconds to wait) when refused, else None (nothing recorded)."""
        need = {"requests": 1, "input-tokens": input_tokens, "output-tokens": max_tokens}
        waits = [(w.wait_for(now, need[k]), k) for k, ws in self.windows.items() for w in ws]
        wait, kind = max(waits, default=(0.0, ""))
        return (kind, wait) if wait > 0 else None

    def add(self, now: float, input_tokens: int, output_tokens: int) -> None:
        used = {"requests": 1, "input-tokens": input_tokens, "output-tokens": output_tokens}
        for kind, ws in self.windows.items():
            for w in ws:
                w.add(now, used[kind])

    def headers(self, now: float) -> dict[str, str]:
        out: dict[str, str] = {}
        wall = datetime.now(UTC)
        for kind, ws in self.windows.items():
            w = ws[0]
            reset = wall + timedelta(seconds=w.reset_in(now))
            out[f"anthropic-ratelimit-{kind}-limit"] = str(w.limit)
            out[f"anthropic-ratelimit-{kind}-remaining"] = str(max(0, w.limit - w.used(now)))
            out[f"anthropic-ratelimit-{kind}-reset"] = reset.strftime("%Y-%m-%dT%H:%M:%SZ")
        return out

    def clear(self) -> None:
        for ws in self.windows.values():
            for w in ws:
                w.clear()




ANTHROPIC_LIMITS = web.AppKey("batchrun_mock_anthropic_limits", AnthropicLimits)


def add_anthropic_routes(app: web.Application) -> None:
    """``POST /v1/messages`` (and, from ``anthropic_batches.py``, Message Batches)."""
    _register_outcomes()
    cfg = app[STATE].config
    limits = AnthropicLimits(cfg.rpm, cfg.input_tpm, cfg.output_tpm, strict=cfg.strict)
    app[ANTHROPIC_LIMITS] = limits
    app[STATE].on_reset.append(limits.clear)
    app.router.add_post("/v1/messages", create_message)
    add_message_batch_routes(app)


def _denied(state: MockState, request: web.Request) -> web.Response | None:
    key = state.config.api_key
    if key is not None and not key_ok(request, key):
        state.ledger.record(state.now(), 401, "unauthorized", "", 0, 0, "", False)
        return anthropic_error(401, "authentication_error", "invalid x-api-key")
    if not request.headers.get("anthropic-version"):
        state.ledger.record(state.now(), 400, "bad_request", "", 0, 0, "", False)
        return anthropic_error(400, "invalid_request_error",
                               "anthropic-version: header is required")
    return None


async def create_message(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if (denied := _denied(state, request)) is not None:
        return denied
    try:
        chat, images = parse_messages_request(json.loads(await request.read()))
    except (ValueError, BadRequest) as e:
        state.ledger.record(state.now(), 400, "bad_request", "", 0, 0, "", False)
        text = str(e) if isinstance(e, BadRequest) else "The request body is not valid JSON."
        return anthropic_error(400, "invalid_request_error", text)
    if chat.model in state.unknown_models:
        state.ledger.record(state.now(), 404, "model_not_found", "", 0, 0, chat.model, False)
        return anthropic_error(404, "not_found_error", f"model: {chat.model}")
    return await _admit_and_answer(state, request, chat, images)


async def _admit_and_answer(state: MockState, request: web.Request, chat: ChatRequest,
                            images: int) -> web.StreamResponse:
    """Limits, overload and faults, then the answer; no await before the ledger record."""
    limits, cfg, now = request.app[ANTHROPIC_LIMITS], state.config, state.now()
    seq = len(state.ledger)
    msg, ptok, ctok = answer_message(state, chat, images, seq)
    key = ledger_mod.prompt_key(chat.messages)
    refused = limits.check(now, ptok, chat.max_tokens)
    if refused is not None:
        kind, wait = refused
        state.ledger.record(now, 429, "rate_limited", key, ptok, 0, chat.model, False)
        headers = {**limits.headers(now), "retry-after": str(max(1, math.ceil(wait - 1e-9)))}
        return anthropic_error(429, "rate_limit_error", f"This request would exceed the rate "
                               f"limit for your organization of {kind} per minute.", headers)
    if faults.unit(cfg.seed, seq, _OVERLOAD_SALT) < cfg.overload_rate:
        state.ledger.record(now, 529, "overloaded", key, ptok, 0, chat.model, False)
        return anthropic_error(529, "overloaded_error", "Overloaded")
    fault = faults.draw_fault(cfg, seq) if cfg.any_faults else None
    status = 0 if fault == "reset" else faults.error_status(cfg, seq) \
        if fault == "server_error" else 502 if fault == "nonjson" else 200
    limits.add(now, ptok, ctok if status == 200 else 0)
    state.ledger.record(now, status, fault or "ok", key, ptok, ctok if status == 200 else 0,
                        chat.model, True)
    headers = limits.headers(now)
    if cfg.latency_ms or cfg.latency_jitter_ms:
        await asyncio.sleep(faults.latency_s(cfg, seq))
    if fault == "reset":
        if request.transport is not None:
            request.transport.abort()
        raise web.HTTPInternalServerError()
    if status != 200:
        return anthropic_error(status, "api_error", "Internal server error", headers)
    body = json.dumps(msg, separators=(",", ":")).encode()
    if fault == "malformed":
        body = body[: len(body) // 2]
    headers["request-id"] = f"req_{os.urandom(12).hex()}"
    return web.Response(body=body, content_type="application/json", headers=headers)
