"""The Responses API request kind (``task: responses``): ``POST /responses``.

The row's messages are built as for chat (``chat.ChatKind.payload``: prompt or message
list, templated system prompt, image parts); the body then carries the system messages
as ``instructions`` and the rest as ``input``, ``generation.max_tokens`` as
``max_output_tokens``, and structured outputs as ``text.format`` (json_schema). The
answer's text is its ``output_text`` parts joined; a response left ``incomplete``
because of ``max_output_tokens`` ends with ``finish_reason: length``, so structured
outputs refuse it as they refuse a truncated chat answer.
"""

from __future__ import annotations

from typing import Any

from batchrun.api.chat import ChatKind
from batchrun.api.protocols import Completion
from batchrun.errors import RetryableError, SpecError
from batchrun.spec import JobSpec

__all__ = ["UNSUPPORTED_FIELDS", "ResponsesKind", "output_text"]

# generation fields chat takes and the Responses API refuses (400): a spec error up front
UNSUPPORTED_FIELDS = ("stop", "seed", "presence_penalty", "frequency_penalty")

Messages = list[dict[str, Any]]


def output_text(doc: dict[str, Any]) -> str | None:
    """The ``output_text`` parts of the response's messages, joined (None if none)."""
    parts = [part["text"] for item in doc["output"] if item.get("type") == "message"
             for part in item.get("content") or [] if part.get("type") == "output_text"]
    return "".join(parts) if parts else None


def _text_format(fields: dict[str, Any]) -> dict[str, Any]:
    """Chat's ``response_format`` (from ``structured.py``) as the Responses ``text.format``."""
    rf = fields.pop("response_format", None)
    if rf is None:
        return fields
    js = rf.get("json_schema", {})
    fmt = {"type": "json_schema", "name": js.get("name", "answer"),
           "schema": js.get("schema", {}), "strict": js.get("strict", True)}
    return {**fields, "text": {"format": fmt}}


def _input_part(part: Any) -> Any:
    """A chat content part as the Responses API's: text -> input_text, image_url ->
    input_image (its URL and detail); other parts pass through."""
    if not isinstance(part, dict):
        return part
    if part.get("type") == "text":
        return {"type": "input_text", "text": part.get("text")}
    if part.get("type") == "image_url":
        img = part.get("image_url") or {}
        out = {"type": "input_image", "image_url": img.get("url")}
        return {**out, "detail": img["detail"]} if img.get("detail") else out
    return part


def _input(messages: Messages) -> Messages:
    return [{**m, "content": [_input_part(p) for p in m["content"]]}
            if isinstance(m.get("content"), list) else m for m in messages]


class ResponsesKind:
    task = "responses"
    path = "/responses"

    def __init__(self) -> None:
        self._chat = ChatKind()

    def check_spec(self, spec: JobSpec) -> None:
        for name in UNSUPPORTED_FIELDS:  # the Responses API answers them with 400
            if getattr(spec.generation, name) is not None:
                raise SpecError(f"task: responses takes no generation.{name} (the Responses "
                                "API has none); remove it")

    def payload(self, spec: JobSpec, value: Any) -> tuple[Messages | None, str | None]:
        return self._chat.payload(spec, value)

    def body(self, spec: JobSpec, payload: Messages, fields: dict[str, Any]) -> dict[str, Any]:
        fields = dict(fields)
        limit = fields.pop("max_tokens", spec.generation.max_tokens)
        fields = _text_format(fields)
        system = [m["content"] for m in payload if m.get("role") == "system"]
        body: dict[str, Any] = {"model": spec.model,
                                "input": _input([m for m in payload
                                                 if m.get("role") != "system"]),
                                "max_output_tokens": limit, **fields}
        if system:
            body["instructions"] = "\n\n".join(str(s) for s in system)
        return body

    def parse(self, doc: Any) -> Completion:
        try:
            usage = doc.get("usage") or {}
            prompt = int(usage.get("input_tokens") or 0)
            completion = int(usage.get("output_tokens") or 0)
            details = doc.get("incomplete_details") or {}
            finish = "stop"
            if doc.get("status") == "incomplete":  # cut at max_output_tokens, or filtered
                reason = details.get("reason")
                finish = "length" if reason == "max_output_tokens" else str(reason)
            return Completion(
                text=output_text(doc), finish_reason=finish,
                prompt_tokens=prompt, completion_tokens=completion,
                total_tokens=int(usage.get("total_tokens") or prompt + completion))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise RetryableError(f"malformed response body ({type(e).__name__})", status=200,
                                 error_type="malformed_body", maybe_billed=True) from None

    def prompt_tokens(self, payload: Messages, model: str) -> int:
        return self._chat.prompt_tokens(payload, model)
