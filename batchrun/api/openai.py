"""The OpenAI-compatible provider: its headers, its one error table, its batch-file lines.

Online answers, Files/Batch API calls and batch output lines are all judged here, by
status code (and, for a batch line without one, by its error ``code``), never by
message text:

    429                          RateLimited, with the provider's Retry-After
    408, 409, 5xx                RetryableError, with Retry-After when sent
    other 4xx                    FatalRequestError: another attempt cannot fix it
    line error, code in
      RETRYABLE_LINE_CODES       RetryableError (the batch expired, was cancelled, ...)
    line error, other code       FatalRequestError

None of these was billed: a provider bills answers, which come with status 200.
"""

from __future__ import annotations

from typing import Any

import orjson
import pyarrow as pa

from batchrun.api.protocols import Completion, RequestKind
from batchrun.errors import FatalRequestError, RateLimited, RequestError, RetryableError
from batchrun.spec import JobSpec

__all__ = ["RETRYABLE_LINE_CODES", "RETRYABLE_STATUS", "OpenAIProvider"]

RETRYABLE_STATUS = frozenset({408, 409})
# error codes of batch output lines that ran into the batch's end or a transient fault
RETRYABLE_LINE_CODES = frozenset({"batch_expired", "batch_cancelled", "batch_failed",
                                  "server_error", "rate_limit_exceeded", "timeout"})


class OpenAIProvider:
    """Any endpoint that speaks OpenAI's API: OpenAI, gateways, vLLM, LiteLLM."""

    api = "openai"

    def adapt(self, kind: RequestKind, spec: JobSpec) -> RequestKind:
        return kind  # the kinds are written in OpenAI's shape

    def url(self, base_url: str, kind: RequestKind) -> str:
        return base_url + kind.path

    def result_fields(self) -> list[pa.Field]:
        return []

    def auth_headers(self, api_key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def message(self, body: bytes) -> str:
        try:
            err = orjson.loads(body).get("error", {})
            msg = err.get("message") if isinstance(err, dict) else str(err)
            return str(msg)[:300] if msg else body[:200].decode("utf-8", "replace")
        except (ValueError, AttributeError):
            return body[:200].decode("utf-8", "replace")

    def status_error(self, status: int, detail: str, retry_after: float | None
                     ) -> RequestError:
        message = f"HTTP {status}: {detail}"
        if status == 429:
            return RateLimited(message, retry_after=retry_after)
        if status >= 500 or status in RETRYABLE_STATUS:
            return RetryableError(message, status=status, error_type=f"http_{status}",
                                  retry_after=retry_after)
        return FatalRequestError(message, status=status, error_type=f"http_{status}")

    def batch_line(self, custom_id: str, kind: RequestKind, body: dict[str, Any]
                   ) -> dict[str, Any]:
        return {"custom_id": custom_id, "method": "POST", "url": "/v1" + kind.path,
                "body": body}

    def line_outcome(self, line: dict[str, Any] | None, batch_status: str,
                     kind: RequestKind) -> Completion | RequestError:
        if line is None:  # never run: the batch expired, failed or was cancelled
            return RetryableError(f"no answer: batch {batch_status}",
                                  error_type=f"batch_{batch_status}")
        err = line.get("error")
        if isinstance(err, dict):
            code = str(err.get("code") or "batch_error")
            msg = f"{code}: {err.get('message') or ''}"[:300]
            cls = RetryableError if code in RETRYABLE_LINE_CODES else FatalRequestError
            return cls(msg, error_type=code)
        resp = line.get("response")
        status = resp.get("status_code") if isinstance(resp, dict) else None
        if not isinstance(resp, dict) or not isinstance(status, int):  # garbled: retry
            return RetryableError("malformed line in batch output", error_type="malformed_body")
        body = resp.get("body")
        if status != 200:
            detail = self.message(orjson.dumps(body)) if body is not None else "error"
            return self.status_error(status, detail, None)
        try:
            return kind.parse(body)
        except RetryableError as e:
            return e
