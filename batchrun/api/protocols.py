"""The API seam: a request kind and a provider, each a small Protocol.

    RequestKind   what a task sends and reads back: a row's value -> a request payload
                  (or the row's own error), the JSON body, a 200 body -> result fields,
                  the prompt's tokens. Chat completions is ``api/chat.py``.
    Provider      who answers: auth headers, the one table from an HTTP status to an
                  error (429 and its Retry-After, 5xx, 4xx), the batch-file line of a
                  request and the outcome of an output line. OpenAI is ``api/openai.py``,
                  Anthropic ``api/anthropic.py``. A provider whose body for a kind differs
                  from OpenAI's (Anthropic's chat is its Messages API) *adapts* the kind:
                  ``adapt(kind, spec)`` returns the kind as that provider speaks it, and
                  ``registry.kind_for`` hands every caller the adapted one.

Online mode (``online/``) and batch mode (``batch/``) both go through them, so a new
kind or provider is one module and one line in ``api/registry.py``.

A kind may also define (read through the functions below, with chat's defaults):
``inputs_per_request(spec)`` rows one request carries (embeddings: many; the engine then
groups rows), ``output_tokens(spec)`` the worst-case output a request reserves (default
``generation.max_tokens``) and ``result_fields(spec)`` its own result columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa

from batchrun.errors import RequestError
from batchrun.spec import JobSpec

__all__ = ["Completion", "Provider", "RequestKind", "inputs_per_request", "kind_result_fields",
           "output_tokens"]


@dataclass(frozen=True)
class Completion:
    """The result fields one answer fills, whatever the kind or provider."""

    text: str | None
    finish_reason: str | None
    prompt_tokens: int  # every input token, cached ones included
    completion_tokens: int
    total_tokens: int
    cache_creation_tokens: int = 0  # of prompt_tokens: written to a prompt cache (Anthropic)
    cache_read_tokens: int = 0  # of prompt_tokens: read from a prompt cache
    # result fields per input of a request that carries several (embeddings: one vector
    # each, in input order); empty for a one-row answer
    extra: tuple[dict[str, Any], ...] = ()


class RequestKind(Protocol):
    task: str  # the spec's ``task``
    path: str  # below the endpoint's base_url, e.g. "/chat/completions"

    def payload(self, spec: JobSpec, value: Any) -> tuple[Any, str | None]:
        """A row's input value -> (what the request carries, None), or (None, the row's error)."""
        ...

    def body(self, spec: JobSpec, payload: Any, fields: dict[str, Any]) -> dict[str, Any]:
        """The JSON body: the model, the payload, the generation and extra ``fields``."""
        ...

    def parse(self, doc: Any) -> Completion:
        """A 200 answer's JSON -> result fields; ``RetryableError(malformed_body)`` if not."""
        ...

    def prompt_tokens(self, payload: Any, model: str) -> int:
        """The prompt's tokens, counted offline, for TPM and the budget's worst case."""
        ...


class Provider(Protocol):
    api: str  # the spec's ``endpoint.api``

    def adapt(self, kind: RequestKind, spec: JobSpec) -> RequestKind:
        """The kind as this provider speaks it (the kind itself for OpenAI's API);
        ``SpecError`` for a kind it does not serve."""
        ...

    def url(self, base_url: str, kind: RequestKind) -> str:
        """Where a request of ``kind`` goes, from the spec's ``endpoint.base_url``."""
        ...

    def result_fields(self) -> list[pa.Field]:
        """Result columns only this provider fills (Anthropic's cache tokens)."""
        ...

    def auth_headers(self, api_key: str | None) -> dict[str, str]:
        """The headers that carry the key: it goes here and nowhere else."""
        ...

    def message(self, body: bytes) -> str:
        """The provider's error text in a non-200 body (cut short; the caller redacts)."""
        ...

    def status_error(self, status: int, detail: str, retry_after: float | None
                     ) -> RequestError:
        """The one table: an HTTP status other than 200 -> the error to retry or record."""
        ...

    def batch_line(self, custom_id: str, kind: RequestKind, body: dict[str, Any]
                   ) -> dict[str, Any]:
        """The line of a batch input file that asks for ``body``."""
        ...

    def line_outcome(self, line: dict[str, Any] | None, batch_status: str,
                     kind: RequestKind) -> Completion | RequestError:
        """What a batch output line says of its row: an answer, or the error."""
        ...


def inputs_per_request(kind: RequestKind, spec: JobSpec) -> int:
    """Rows one request of ``kind`` carries: 1 unless the kind says otherwise."""
    fn = getattr(kind, "inputs_per_request", None)
    return int(fn(spec)) if fn is not None else 1


def output_tokens(kind: RequestKind, spec: JobSpec) -> int:
    """The output tokens one request may bill, for TPM and the budget's worst case."""
    fn = getattr(kind, "output_tokens", None)
    return int(fn(spec)) if fn is not None else spec.generation.max_tokens


def kind_result_fields(kind: RequestKind, spec: JobSpec) -> list[pa.Field]:
    """The kind's own result columns (embeddings: ``embedding``), after the fixed ones."""
    fn = getattr(kind, "result_fields", None)
    return list(fn(spec)) if fn is not None else []
