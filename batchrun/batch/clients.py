"""The batch seam: what ``batch/run.py`` needs of a provider's batch API, as one Protocol,
and which client each ``endpoint.api`` uses.

    OpenAI      Files + Batch API      ``provider.BatchProvider``
    Anthropic   Message Batches        ``anthropic.MessageBatches``
    Gemini      batchGenerateContent   ``gemini.GeminiBatches`` (inline requests, 20 MB)

Statuses come back in one vocabulary (OpenAI's: ``in_progress``, ``cancelling``, and
the ``TERMINAL`` ones), ``created_at`` as epoch seconds, so the driver never asks which
provider it talks to. A provider without a batch API is a spec error (exit 2) before
anything is sent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from batchrun.api.registry import kind_for
from batchrun.batch.anthropic import MAX_BATCH_BYTES, MAX_BATCH_REQUESTS, MessageBatches
from batchrun.batch.gemini import MAX_INLINE_BYTES, GeminiBatches
from batchrun.batch.provider import BatchProvider, MetadataFn
from batchrun.batch.state import ChunkState
from batchrun.errors import SpecError
from batchrun.spec import JobSpec

__all__ = ["BATCH_CLIENTS", "BatchClient", "batch_client", "require_batch_api"]


class BatchClient(Protocol):
    """One provider's batch API (used as an async context manager)."""

    async def __aenter__(self) -> BatchClient: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def probe(self) -> None:
        """A cheap call that finds an endpoint without the API (``NoBatchApi``)."""
        ...

    async def upload(self, path: Path) -> dict[str, Any]:
        """Make the chunk file available to ``create``; {"id": ...}."""
        ...

    async def create(self, file_id: str, window: str, metadata: dict[str, str],
                     find: Callable[[], Awaitable[dict[str, Any] | None]]) -> dict[str, Any]:
        """Create the batch; ``find`` after a failure looks for one it made after all."""
        ...

    async def retrieve(self, batch_id: str) -> dict[str, Any]: ...

    async def results(self, batch: dict[str, Any]) -> list[bytes]:
        """The JSONL result lines of an ended batch (one ``custom_id`` per line)."""
        ...

    async def cancel(self, batch_id: str) -> dict[str, Any]: ...

    def list_batches(self, page_size: int = 100) -> AsyncIterator[dict[str, Any]]: ...

    async def find_created(self, waiting: list[ChunkState], metadata: MetadataFn,
                           folder: str | Path,
                           taken: set[str]) -> dict[int, dict[str, Any]]:
        """Batches created for ``waiting`` chunks but never recorded; seq -> batch."""
        ...


BATCH_CLIENTS: dict[str, type[Any]] = {"openai": BatchProvider, "anthropic": MessageBatches,
                                        "gemini": GeminiBatches}
# what one batch may hold, where the provider caps it below the spec's own limits
_CAPS = {"anthropic": (MAX_BATCH_REQUESTS, MAX_BATCH_BYTES),
         "gemini": (MAX_BATCH_REQUESTS, MAX_INLINE_BYTES)}


def require_batch_api(spec: JobSpec) -> JobSpec:
    """``mode: batch`` needs a provider with a batch API; returns the spec with its chunk
    limits cut to the provider's caps where left at their defaults (one set above a cap
    is a spec error)."""
    api = spec.endpoint.api
    if api not in BATCH_CLIENTS:
        raise SpecError(f"mode: batch: endpoint.api {api} has no batch API in batchrun; use "
                        f"mode: online, or one of: {', '.join(sorted(BATCH_CLIENTS))}")
    cap = _CAPS.get(api)
    if cap is None:
        return spec
    b, given = spec.batch, spec.batch.model_fields_set
    for field, limit in (("max_requests_per_file", cap[0]), ("max_bytes_per_file", cap[1])):
        if field in given and getattr(b, field) > limit:
            raise SpecError(f"batch.{field}: {api} takes at most {limit:,} per batch; lower it")
    fitted = b.model_copy(update={"max_requests_per_file": min(b.max_requests_per_file, cap[0]),
                                  "max_bytes_per_file": min(b.max_bytes_per_file, cap[1])})
    return spec.model_copy(update={"batch": fitted})


def batch_client(spec: JobSpec, api_key: str | None, folder: str | Path) -> BatchClient:
    """The client of the spec's provider; ``folder`` holds the chunk files."""
    require_batch_api(spec)
    if spec.endpoint.api == "anthropic":
        return MessageBatches(spec.endpoint, api_key, spec.retry, folder=folder)
    if spec.endpoint.api == "gemini":
        return GeminiBatches(spec.endpoint, api_key, spec.retry, folder=folder,
                             model=spec.model)
    return BatchProvider(spec.endpoint, api_key, spec.retry,  # type: ignore[return-value]
                         kind=kind_for(spec))  # its lines' url: the task's endpoint
