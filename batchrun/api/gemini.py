"""The Gemini provider (``endpoint.api: gemini``): the native Generative Language API.

    POST {base_url}/v1beta/models/{model}:generateContent     x-goog-api-key

(``base_url`` is ``https://generativelanguage.googleapis.com``, with or without
``/v1beta``.) The chat kind is adapted (``adapt``): messages become ``contents`` with
roles user/model and text parts, the system prompt ``systemInstruction``, the generation
settings ``generationConfig`` (``maxOutputTokens``, ``stopSequences``, ...), and a JSON
Schema answer ``responseMimeType: application/json`` + ``responseJsonSchema``, whose text
the chat kind's check validates. ``usageMetadata.promptTokenCount`` and
``candidatesTokenCount`` (+ ``thoughtsTokenCount``, billed as output) fill the token
counts; ``finishReason`` STOP -> stop, MAX_TOKENS -> length, SAFETY and the like ->
content_filter.

The one table, by status code: 429 RateLimited (RESOURCE_EXHAUSTED, pauses every
worker), 408/409/5xx retried (503 UNAVAILABLE is Gemini's "overloaded"), other 4xx
recorded. A batch line (``batch/gemini.py``) is ``{"request": ..., "metadata": {"key":
custom_id}}``; its result carries ``response`` or ``error`` (a google.rpc.Status, judged
by its gRPC ``code``: 4, 8, 10, 13, 14 retried, the others recorded).
"""

from __future__ import annotations

from typing import Any

import orjson
import pyarrow as pa

from batchrun.api.chat import ChatKind
from batchrun.api.protocols import Completion, RequestKind
from batchrun.errors import FatalRequestError, RateLimited, RequestError, RetryableError, SpecError
from batchrun.spec import JobSpec

__all__ = ["FINISH_REASONS", "GeminiProvider", "GenerateContentKind"]

FINISH_REASONS = {"STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter",
                  "RECITATION": "content_filter", "BLOCKLIST": "content_filter",
                  "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter"}
_CONFIG = {"max_tokens": "maxOutputTokens", "temperature": "temperature", "top_p": "topP",
           "stop": "stopSequences", "seed": "seed", "presence_penalty": "presencePenalty",
           "frequency_penalty": "frequencyPenalty"}
# DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, INTERNAL, UNAVAILABLE: transient
RETRYABLE_RPC_CODES = frozenset({4, 8, 10, 13, 14})
Messages = list[dict[str, Any]]


def _parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}]
    out = []
    for p in content or []:
        if isinstance(p, dict) and p.get("type") == "text":
            out.append({"text": p.get("text", "")})
        elif isinstance(p, dict) and "type" not in p:
            out.append(p)  # Gemini's own parts (inlineData, fileData) pass as written
    return out


class GenerateContentKind:
    """The chat kind as Gemini's ``generateContent`` speaks it."""

    task = "chat"

    def __init__(self, model: str):
        self.path = f"/v1beta/models/{model.removeprefix('models/')}:generateContent"
        self._chat = ChatKind()

    def payload(self, spec: JobSpec, value: Any) -> tuple[Messages | None, str | None]:
        return self._chat.payload(spec, value)

    def body(self, spec: JobSpec, payload: Messages, fields: dict[str, Any]) -> dict[str, Any]:
        fields = dict(fields)
        rf = fields.pop("response_format", None)
        config = {_CONFIG.get(k, k): v for k, v in fields.items()}
        if isinstance(rf, dict) and rf.get("type") == "json_schema":
            config["responseMimeType"] = "application/json"
            config["responseJsonSchema"] = rf["json_schema"].get("schema") or {}
        system = [m["content"] for m in payload if m.get("role") in ("system", "developer")]
        body: dict[str, Any] = {
            "contents": [{"role": "model" if m["role"] == "assistant" else "user",
                          "parts": _parts(m["content"])}
                         for m in payload if m.get("role") not in ("system", "developer")],
            "generationConfig": config}
        if system:
            body["systemInstruction"] = {"parts": [p for s in system for p in _parts(s)]}
        return body

    def parse(self, doc: Any) -> Completion:
        try:
            cand = doc["candidates"][0]
            parts = (cand.get("content") or {}).get("parts") or []
            texts = [p["text"] for p in parts if "text" in p and not p.get("thought")]
            usage = doc["usageMetadata"]
            prompt = int(usage.get("promptTokenCount") or 0)
            completion = int(usage.get("candidatesTokenCount") or 0) + int(
                usage.get("thoughtsTokenCount") or 0)
            reason = cand.get("finishReason")
            return Completion(text="".join(texts) if texts else None,
                              finish_reason=FINISH_REASONS.get(reason, reason),
                              prompt_tokens=prompt, completion_tokens=completion,
                              # cachedContentTokenCount is not passed on as cache reads:
                              # priced at Anthropic's 0.1x it would under-count Gemini's
                              # discount (0.25x), and the budget must never under-count
                              total_tokens=prompt + completion)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise RetryableError(f"malformed response body ({type(e).__name__})", status=200,
                                 error_type="malformed_body", maybe_billed=True) from None

    def prompt_tokens(self, payload: Messages, model: str) -> int:
        return self._chat.prompt_tokens(payload, model)


class GeminiProvider:
    """Google's Gemini API (AI Studio keys)."""

    api = "gemini"

    def adapt(self, kind: RequestKind, spec: JobSpec) -> RequestKind:
        if kind.task == "chat":
            return GenerateContentKind(spec.model)
        raise SpecError(f"task: {kind.task!r} is not served by endpoint.api: gemini; use "
                        "task: chat, or api: openai with Gemini's OpenAI-compatible URL")

    def url(self, base_url: str, kind: RequestKind) -> str:
        return base_url.removesuffix("/v1beta") + kind.path

    def result_fields(self) -> list[pa.Field]:
        return []

    def auth_headers(self, api_key: str | None) -> dict[str, str]:
        return {"x-goog-api-key": api_key} if api_key else {}

    def message(self, body: bytes) -> str:
        try:
            err = orjson.loads(body).get("error", {})
            text = f"{err.get('status')}: {err.get('message')}" if isinstance(err, dict) else err
            return str(text)[:300] if text else body[:200].decode("utf-8", "replace")
        except (ValueError, AttributeError):
            return body[:200].decode("utf-8", "replace")

    def status_error(self, status: int, detail: str, retry_after: float | None
                     ) -> RequestError:
        message = f"HTTP {status}: {detail}"
        if status == 429:
            return RateLimited(message, retry_after=retry_after)
        if status >= 500 or status in (408, 409):
            return RetryableError(message, status=status, error_type=f"http_{status}",
                                  retry_after=retry_after)
        return FatalRequestError(message, status=status, error_type=f"http_{status}")

    def batch_line(self, custom_id: str, kind: RequestKind, body: dict[str, Any]
                   ) -> dict[str, Any]:
        return {"request": body, "metadata": {"key": custom_id}}

    def line_outcome(self, line: dict[str, Any] | None, batch_status: str,
                     kind: RequestKind) -> Completion | RequestError:
        if line is None:
            return RetryableError(f"no result: batch {batch_status}",
                                  error_type=f"batch_{batch_status}")
        err = line.get("error")
        if isinstance(err, dict):  # a google.rpc.Status: judged by its gRPC code
            code = err.get("code")
            msg = f"gRPC code {code}: {err.get('message') or ''}"[:300]
            cls = RetryableError if code in RETRYABLE_RPC_CODES else FatalRequestError
            return cls(msg, error_type=f"rpc_{code}")
        try:
            return kind.parse(line.get("response"))
        except RetryableError as e:
            return e
