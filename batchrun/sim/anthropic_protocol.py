"""The simulated Anthropic Messages API's protocol, free of routes: the error envelope,
the key check, a request's validation and its answer (shared by ``anthropic.py``, online,
and ``anthropic_batches.py``, per batch request).
"""

from __future__ import annotations

import json
import os
from typing import Any

from aiohttp import web

from batchrun.api.tokens import count_chat_tokens
from batchrun.sim.protocol import ChatRequest, answer_request
from batchrun.sim.state import MockState

__all__ = [
    "IMAGE_TOKENS",
    "BadRequest",
    "answer_message",
    "anthropic_error",
    "key_ok",
    "message_body",
    "parse_messages_request",
]

IMAGE_TOKENS = 1600  # what an image bills here: the figure api/anthropic.py reserves
_KNOWN = frozenset({"model", "messages", "max_tokens", "system", "metadata", "stop_sequences",
                    "stream", "temperature", "top_p", "top_k", "tools", "tool_choice",
                    "thinking", "service_tier"})
_STOP = {"stop": "end_turn", "length": "max_tokens"}


class BadRequest(Exception):
    """What Anthropic answers 400 ``invalid_request_error``."""


def anthropic_error(status: int, type_: str, message: str,
                    headers: dict[str, str] | None = None) -> web.Response:
    body = {"type": "error", "error": {"type": type_, "message": message},
            "request_id": f"req_{os.urandom(12).hex()}"}
    return web.Response(status=status, content_type="application/json",
                        body=json.dumps(body).encode(), headers=headers)


def _flat(content: Any) -> tuple[str, int]:
    """A message's text (blocks joined) and its number of images."""
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list):
        raise BadRequest("messages: content must be a string or a list of content blocks")
    texts, images = [], 0
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "image" and isinstance(block.get("source"), dict):
            images += 1
        elif kind not in ("document", "tool_result", "tool_use"):
            raise BadRequest(f"messages: content block type {kind!r} is not valid")
    return "\n".join(texts), images


def parse_messages_request(body: Any) -> tuple[ChatRequest, int]:
    """The request as a ``ChatRequest`` and its images; ``BadRequest`` as Anthropic would."""
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    extra = sorted(set(body) - _KNOWN)
    if extra:
        raise BadRequest(f"{extra[0]}: Extra inputs are not permitted")
    model, messages, max_tokens = body.get("model"), body.get("messages"), body.get("max_tokens")
    if not isinstance(model, str) or not model:
        raise BadRequest("model: Field required")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest("max_tokens: Field required (an integer >= 1)")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: at least one message is required")
    flat: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        flat.append({"role": "system", "content": _flat(system)[0]})
    images = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise BadRequest(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        text, n = _flat(m.get("content"))
        images += n
        flat.append({"role": m["role"], "content": text})
    return ChatRequest(model, flat, max_tokens, _forced_tool(body)), images


def _forced_tool(body: dict[str, Any]) -> dict[str, Any] | None:
    """The forced tool's input_schema, as the json_schema response_format it amounts to."""
    choice, tools = body.get("tool_choice"), body.get("tools")
    if not isinstance(choice, dict) or choice.get("type") != "tool":
        return None
    tool = next((t for t in tools or [] if isinstance(t, dict)
                 and t.get("name") == choice.get("name")), None)
    if tool is None or not isinstance(tool.get("input_schema"), dict):
        raise BadRequest("tool_choice: names no tool with an input_schema")
    return {"type": "json_schema", "json_schema": {"name": tool["name"],
                                                   "schema": tool["input_schema"]}}


def message_body(msg_id: str, chat: ChatRequest, content: str, finish: str,
                 input_tokens: int, output_tokens: int) -> dict[str, Any]:
    """A ``message`` object as Anthropic returns it (what the official SDK reads)."""
    block: dict[str, Any] = {"type": "text", "text": content}
    stop = _STOP.get(finish, "end_turn")
    if chat.response_format is not None and finish == "stop":
        try:
            value = json.loads(content)
        except ValueError:
            value = None  # a spoiled answer: plain text, which the client's check refuses
        if isinstance(value, dict):
            block = {"type": "tool_use", "id": f"toolu_{msg_id[4:]}",
                     "name": chat.response_format["json_schema"]["name"], "input": value}
            stop = "tool_use"
    return {"id": msg_id, "type": "message", "role": "assistant", "model": chat.model,
            "content": [block], "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                      "service_tier": "standard"}}


def answer_message(state: MockState, chat: ChatRequest, images: int, seq: int
                   ) -> tuple[dict[str, Any], int, int]:
    """(message, input tokens, output tokens) of a parsed request; online and batch share it."""
    ptok = count_chat_tokens(chat.messages, chat.model) + images * IMAGE_TOKENS
    content, ctok, finish = answer_request(chat, None, config=state.config, seq=seq)
    msg = message_body(f"msg_{state.nonce}{seq:x}", chat, content, finish, ptok, ctok)
    return msg, ptok, ctok


def key_ok(request: web.Request, key: str) -> bool:
    """The key in ``x-api-key``, or as a bearer token (what SDK 2.x sends)."""
    return (request.headers.get("x-api-key") == key
            or request.headers.get("Authorization") == f"Bearer {key}")
