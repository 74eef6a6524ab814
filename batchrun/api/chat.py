"""The chat-completions request kind (``task: chat``, the default): ``POST /chat/completions``.

A row's prompt (``prompt_column``) or message list (``messages_column``), after the
spec's ``system_prompt``, is the request's ``messages``; the answer's first choice is
the row's response.
"""

from __future__ import annotations

from typing import Any

from batchrun.api.protocols import Completion
from batchrun.api.tokens import count_chat_tokens
from batchrun.errors import RetryableError
from batchrun.spec import JobSpec

__all__ = ["ChatKind"]

Messages = list[dict[str, Any]]


def _content(value: Any) -> Any:
    """A message's content: text, or a list of parts (text, image_url, input_audio, file)
    passed through, less the null fields a Parquet struct gives the parts it lacks."""
    if isinstance(value, list):
        return [_strip(p) for p in value]
    return value


def _strip(part: Any) -> Any:
    if isinstance(part, dict):
        return {k: _strip(v) for k, v in part.items() if v is not None}
    return part


class ChatKind:
    task = "chat"
    path = "/chat/completions"

    def payload(self, spec: JobSpec, value: Any) -> tuple[Messages | None, str | None]:
        if spec.messages_column is None:  # a prompt column's or a template's text
            if not isinstance(value, str) or not value.strip():
                return None, "empty prompt" if isinstance(value, str) else "null prompt"
            msgs = [{"role": "user", "content": value}]
        else:
            if not value:
                return None, "null or empty messages"
            msgs = [{"role": m.get("role"), "content": _content(m.get("content"))}
                    for m in value]
            if any(not isinstance(m["role"], str) or m["content"] is None for m in msgs):
                return None, "a message without role or content"
        if spec.system_prompt:
            msgs.insert(0, {"role": "system", "content": spec.system_prompt})
        return msgs, None

    def body(self, spec: JobSpec, payload: Messages, fields: dict[str, Any]) -> dict[str, Any]:
        return {"model": spec.model, "messages": payload, **fields}

    def parse(self, doc: Any) -> Completion:
        try:
            choice = doc["choices"][0]
            usage = doc.get("usage") or {}
            prompt = int(usage.get("prompt_tokens") or 0)
            completion = int(usage.get("completion_tokens") or 0)
            return Completion(
                text=choice["message"].get("content"), finish_reason=choice.get("finish_reason"),
                prompt_tokens=prompt, completion_tokens=completion,
                total_tokens=int(usage.get("total_tokens") or prompt + completion))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise RetryableError(f"malformed response body ({type(e).__name__})", status=200,
                                 error_type="malformed_body", maybe_billed=True) from None

    def prompt_tokens(self, payload: Messages, model: str) -> int:
        return count_chat_tokens(payload, model)
