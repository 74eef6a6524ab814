"""The Anthropic provider (``endpoint.api: anthropic``): the Messages API and its one
error table, and the request/result lines of Message Batches.

    POST {base_url}/v1/messages   x-api-key, anthropic-version: 2023-06-01

A chat job's body is Anthropic's, not OpenAI's, so the provider *adapts* the chat kind
(``adapt``): the system prompt goes to the top-level ``system`` field, ``max_tokens`` is
always sent (the spec requires it), ``stop`` becomes ``stop_sequences``, text and image
blocks are Anthropic's, and a JSON Schema answer is asked for as one forced tool
(``tools`` + ``tool_choice``) whose input the chat kind's check then validates as JSON.
The answer's ``usage.input_tokens`` plus the cache-creation and cache-read tokens are the
row's ``prompt_tokens`` (each part priced at its own rate), ``output_tokens`` its
``completion_tokens``; ``stop_reason`` becomes ``finish_reason`` (``max_tokens`` ->
``length``).

The one table, by status code (and, for a batch result, by its ``type``), never by text:

    429                         RateLimited, with retry-after (pauses every worker)
    529 overloaded_error        RetryableError(overloaded), backoff (and retry-after if sent)
    408, 409, 5xx               RetryableError
    other 4xx                   FatalRequestError (413 request_too_large among them)
    batch result expired,
      canceled, api_error,
      overloaded_error          RetryableError
    other errored result        FatalRequestError
"""

from __future__ import annotations

from typing import Any

import orjson
import pyarrow as pa

from batchrun.api.chat import ChatKind
from batchrun.api.protocols import Completion, RequestKind
from batchrun.api.tokens import count_chat_tokens
from batchrun.errors import (
    FatalRequestError,
    RateLimited,
    RequestError,
    RetryableError,
    SpecError,
)
from batchrun.spec import JobSpec

__all__ = ["ANTHROPIC_VERSION", "STOP_REASONS", "AnthropicProvider", "MessagesKind"]

ANTHROPIC_VERSION = "2023-06-01"
OVERLOADED = 529
RETRYABLE_STATUS = frozenset({408, 409})
# error types of an errored batch result that another attempt may fix
RETRYABLE_RESULT_ERRORS = frozenset({"api_error", "overloaded_error", "rate_limit_error",
                                     "timeout_error"})
STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                "tool_use": "stop", "refusal": "content_filter", "pause_turn": "pause_turn",
                "model_context_window_exceeded": "length"}
# An image counts at most about this many input tokens (Anthropic scales images down to
# ~1.15 megapixels, ~1,600 tokens): reserved for each one, since we do not decode it.
IMAGE_TOKENS = 1600

Messages = list[dict[str, Any]]


def _image_block(part: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI ``image_url`` part as Anthropic's image block (data: URL or https URL)."""
    url = part["image_url"]["url"] if isinstance(part.get("image_url"), dict) \
        else str(part.get("image_url"))
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        media = head[5:].split(";")[0] or "image/png"
        return {"type": "image", "source": {"type": "base64", "media_type": media,
                                            "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _content(content: Any) -> Any:
    """A message's content in Anthropic's form: a string, or text and image blocks."""
    if isinstance(content, str) or not isinstance(content, list):
        return content
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image_url":
            out.append(_image_block(part))
        elif kind == "text":
            out.append({"type": "text", "text": part.get("text", "")})
        else:  # Anthropic's own blocks (image with source, document) pass as written
            out.append(part)
    return out


def _structured(fields: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's ``response_format`` json_schema as one tool the model must call."""
    rf = fields.pop("response_format", None)
    if not isinstance(rf, dict) or rf.get("type") != "json_schema":
        return {}
    js = rf["json_schema"]
    name = js.get("name") or "answer"
    tool = {"name": name, "description": "Give the answer as this tool's input.",
            "input_schema": js.get("schema") or {"type": "object"}}
    return {"tools": [tool], "tool_choice": {"type": "tool", "name": name}}


class MessagesKind:
    """The chat kind as Anthropic's Messages API speaks it (see the module's docstring)."""

    task = "chat"
    path = "/v1/messages"

    def __init__(self) -> None:
        self._chat = ChatKind()

    def payload(self, spec: JobSpec, value: Any) -> tuple[Messages | None, str | None]:
        return self._chat.payload(spec, value)  # OpenAI-shaped; body() converts it

    def body(self, spec: JobSpec, payload: Messages, fields: dict[str, Any]) -> dict[str, Any]:
        fields = dict(fields)
        system = [m["content"] for m in payload if m.get("role") in ("system", "developer")]
        messages = [{"role": m["role"], "content": _content(m["content"])}
                    for m in payload if m.get("role") not in ("system", "developer")]
        if "stop" in fields:
            fields["stop_sequences"] = fields.pop("stop")
        body: dict[str, Any] = {"model": spec.model, "messages": messages,
                                **_structured(fields), **fields}
        if system:
            body["system"] = "\n\n".join(s if isinstance(s, str) else orjson.dumps(s).decode()
                                         for s in system)
        return body

    def parse(self, doc: Any) -> Completion:
        try:
            blocks = doc["content"]
            tool = next((b for b in blocks if b.get("type") == "tool_use"), None)
            if tool is not None:  # a structured answer: the forced tool's input
                text: str | None = orjson.dumps(tool["input"]).decode()
            else:
                texts = [b["text"] for b in blocks if b.get("type") == "text"]
                text = "".join(texts) if texts else None
            usage = doc["usage"]
            write = int(usage.get("cache_creation_input_tokens") or 0)
            read = int(usage.get("cache_read_input_tokens") or 0)
            prompt = int(usage["input_tokens"]) + write + read
            completion = int(usage["output_tokens"])
            reason = doc.get("stop_reason")
            return Completion(text=text, finish_reason=STOP_REASONS.get(reason, reason),
                              prompt_tokens=prompt, completion_tokens=completion,
                              total_tokens=prompt + completion, cache_creation_tokens=write,
                              cache_read_tokens=read)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise RetryableError(f"malformed response body ({type(e).__name__})", status=200,
                                 error_type="malformed_body", maybe_billed=True) from None

    def prompt_tokens(self, payload: Messages, model: str) -> int:
        flat, images = [], 0
        for m in payload:
            content = m.get("content")
            if isinstance(content, list):
                texts = [p.get("text", "") for p in content
                         if isinstance(p, dict) and p.get("type") == "text"]
                images += sum(1 for p in content if isinstance(p, dict)
                              and p.get("type") in ("image", "image_url"))
                content = "\n".join(texts)
            flat.append({"role": m.get("role"), "content": content})
        return count_chat_tokens(flat, model) + images * IMAGE_TOKENS


class AnthropicProvider:
    """Anthropic's API: api.anthropic.com, or anything that speaks it."""

    api = "anthropic"

    def adapt(self, kind: RequestKind, spec: JobSpec) -> RequestKind:
        if kind.task == "chat":
            return MessagesKind()
        raise SpecError(f"task: {kind.task!r} is not served by endpoint.api: anthropic "
                        "(it speaks chat, through its Messages API); use task: chat")

    def url(self, base_url: str, kind: RequestKind) -> str:
        # the SDK's base URL has no /v1 (https://api.anthropic.com); take either form
        return base_url.removesuffix("/v1") + kind.path

    def result_fields(self) -> list[pa.Field]:
        return [pa.field("cache_creation_tokens", pa.int64()),
                pa.field("cache_read_tokens", pa.int64())]

    def auth_headers(self, api_key: str | None) -> dict[str, str]:
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        if api_key:
            headers["x-api-key"] = api_key
        return headers

    def message(self, body: bytes) -> str:
        try:
            err = orjson.loads(body).get("error", {})
            msg = err.get("message") if isinstance(err, dict) else str(err)
            kind = err.get("type") if isinstance(err, dict) else None
            text = f"{kind}: {msg}" if kind and msg else msg
            return str(text)[:300] if text else body[:200].decode("utf-8", "replace")
        except (ValueError, AttributeError):
            return body[:200].decode("utf-8", "replace")

    def status_error(self, status: int, detail: str, retry_after: float | None
                     ) -> RequestError:
        message = f"HTTP {status}: {detail}"
        if status == 429:
            return RateLimited(message, retry_after=retry_after)
        if status == OVERLOADED:  # the service, not this account: back off, do not pause all
            return RetryableError(message, status=status, error_type="overloaded",
                                  retry_after=retry_after)
        if status >= 500 or status in RETRYABLE_STATUS:
            return RetryableError(message, status=status, error_type=f"http_{status}",
                                  retry_after=retry_after)
        return FatalRequestError(message, status=status, error_type=f"http_{status}")

    def batch_line(self, custom_id: str, kind: RequestKind, body: dict[str, Any]
                   ) -> dict[str, Any]:
        return {"custom_id": custom_id, "params": body}

    def line_outcome(self, line: dict[str, Any] | None, batch_status: str,
                     kind: RequestKind) -> Completion | RequestError:
        if line is None:
            return RetryableError(f"no result: batch {batch_status}",
                                  error_type=f"batch_{batch_status}")
        result = line.get("result")
        kind_of = result.get("type") if isinstance(result, dict) else None
        if kind_of == "succeeded":
            try:
                return kind.parse(result["message"])  # type: ignore[index]
            except RetryableError as e:
                return e
        if kind_of in ("expired", "canceled"):
            return RetryableError(f"request {kind_of} in the batch", error_type=f"batch_{kind_of}")
        if kind_of == "errored":
            err = (result.get("error") or {}).get("error") or {}  # type: ignore[union-attr]
            code = str(err.get("type") or "batch_error")
            msg = f"{code}: {err.get('message') or ''}"[:300]
            cls = RetryableError if code in RETRYABLE_RESULT_ERRORS else FatalRequestError
            return cls(msg, error_type=code)
        return RetryableError("malformed line in batch results", error_type="malformed_body")
