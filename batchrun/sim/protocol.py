"""OpenAI chat-completion protocol pieces of the simulated provider, free of I/O.

Answers are deterministic functions of the prompt so tests (and the lead's checks that
each output row belongs to its input row) can recompute them with ``answer_for``. The
content is made of words that are one token each in cl100k_base and o200k_base, so
``usage.completion_tokens`` equals ``count_text_tokens(content)`` exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from batchrun.api.tokens import count_text_tokens
from batchrun.sim.config import MockConfig
from batchrun.sim.faults import unit
from batchrun.sim.ledger import prompt_key
from batchrun.sim.schema_answers import draw_fate, structured_answer

__all__ = [
    "BadRequest",
    "ChatRequest",
    "answer_for",
    "answer_request",
    "completion_body",
    "error_body",
    "parse_chat_request",
]

# Each word is a single token with or without a leading space in both encodings.
_WORDS = (
    "sit", "the", "quick", "brown", "fox", "over", "lazy", "dog", "river", "stone",
    "light", "green", "blue", "water", "fire", "wind", "earth", "cloud", "rain", "sun",
    "moon", "star", "tree", "bird", "fish", "house", "road", "city", "field", "song",
    "book", "paper", "time", "world", "table", "chair", "door", "window", "music", "dream",
)
_MIN_ANSWER_TOKENS = 5
_MAX_ANSWER_TOKENS = 60
_MASK64 = (1 << 64) - 1


class BadRequest(Exception):
    """A request OpenAI would answer 400 (``param`` names the offending field)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]
    max_tokens: int
    response_format: dict[str, Any] | None = None

    def json_schema(self) -> Any | None:
        """The schema of a ``json_schema`` response_format (``{}`` if it has none), or None."""
        rf = self.response_format
        if rf is None or rf.get("type") != "json_schema":
            return None
        return rf["json_schema"].get("schema", {})


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a decoded request body the way OpenAI does, or raise ``BadRequest``."""
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array.", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"Missing required parameter: 'messages[{i}].role'.",
                             f"messages[{i}].role")
        if "content" not in m:
            raise BadRequest(f"Missing required parameter: 'messages[{i}].content'.",
                             f"messages[{i}].content")
    return ChatRequest(model, messages, _max_tokens(body), _response_format(body))


def _response_format(body: dict[str, Any]) -> dict[str, Any] | None:
    """``response_format`` checked as OpenAI does: a type, and a named json_schema object."""
    rf = body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise BadRequest("Invalid value for 'response_format.type': expected one of 'text', "
                         "'json_object' or 'json_schema'.", "response_format.type")
    if rf["type"] != "json_schema":
        return rf
    js = rf.get("json_schema")
    if not isinstance(js, dict) or not isinstance(js.get("name"), str):
        raise BadRequest("Missing required parameter: 'response_format.json_schema.name'.",
                         "response_format.json_schema.name")
    if not isinstance(js.get("schema", {}), dict):
        raise BadRequest("Invalid type for 'response_format.json_schema.schema': expected an "
                         "object.", "response_format.json_schema.schema")
    return rf


def answer_request(chat: ChatRequest, key: str | None = None, *,
                   config: MockConfig | None = None, seq: int = 0) -> tuple[str, int, str]:
    """The answer to a parsed request: (content, completion_tokens, finish_reason).

    Plain requests get ``answer_for``. A ``json_schema`` response_format gets a JSON
    instance of the schema, deterministic in the prompt; whether it is spoiled on
    purpose (config.invalid_json_rate, config.truncate_rate) is drawn per request
    number ``seq``, so that a retry of the same prompt can come back valid.
    """
    key = key or prompt_key(chat.messages)
    schema = chat.json_schema()
    if schema is None:
        return answer_for(chat.messages, chat.max_tokens, key)
    fate = "ok"
    if config is not None and (config.invalid_json_rate or config.truncate_rate):
        fate = draw_fate(unit(config.seed, seq, salt=3), config.invalid_json_rate,
                         config.truncate_rate)
    return structured_answer(schema, int(key, 16), fate, chat.max_tokens,
                             lambda text: count_text_tokens(text, chat.model))


def _max_tokens(body: dict[str, Any]) -> int:
    # max_completion_tokens is the newer name; either one is accepted, as by OpenAI.
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    value = body.get(param)
    if value is None:
        raise BadRequest("Missing required parameter: 'max_tokens'.", "max_tokens")
    # bool is an int subclass; OpenAI rejects true/false here.
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BadRequest(f"Invalid '{param}': expected an integer greater than 0.", param)
    return value


def answer_for(messages: Any, max_tokens: int, key: str | None = None) -> tuple[str, int, str]:
    """The answer to ``messages``: (content, completion_tokens, finish_reason).

    The natural length (5..60 tokens) and the words come from the prompt key; the
    answer is cut at ``max_tokens`` with finish_reason "length", else "stop".
    """
    h = int(key or prompt_key(messages), 16)
    natural = _MIN_ANSWER_TOKENS + h % (_MAX_ANSWER_TOKENS - _MIN_ANSWER_TOKENS + 1)
    n = min(natural, max_tokens)
    words = []
    x = h
    for _ in range(n):
        # A 64-bit LCG (Knuth's MMIX constants): cheap and fully deterministic.
        x = (x * 6364136223846793005 + 1442695040888963407) & _MASK64
        words.append(_WORDS[(x >> 33) % len(_WORDS)])
    return " ".join(words), n, ("length" if max_tokens < natural else "stop")


def completion_body(completion_id: str, created: int, model: str, content: str,
                    finish_reason: str, prompt_tokens: int, completion_tokens: int) -> bytes:
    """A ``chat.completion`` object as OpenAI returns it (fields the official client reads)."""
    return json.dumps({
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": None},
            "logprobs": None,
            "finish_reason": finish_reason,
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "system_fingerprint": "fp_batchrun_mock",
    }, separators=(",", ":")).encode("utf-8")


def error_body(message: str, type_: str, code: str | None = None,
               param: str | None = None) -> bytes:
    """OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}``."""
    return json.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    ).encode("utf-8")
