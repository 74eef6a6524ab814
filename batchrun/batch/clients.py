"""The batch seam: what ``batch/run.py`` needs of a provider's batch API, as one Protocol,
and which client each ``endpoint.api`` uses.

    OpenAI      Files + Batch API      ``provider.BatchProvider``
    Anthropic   Message Batches        ``anthropic.MessageBatches``

Statuses come back in one vocabulary (OpenAI's: ``in_progress``, ``cancelling``, and
the ``TERMINAL`` ones), ``created_at`` as epoch seconds, so the driver never asks which
provider it talks to. A provider without a batch API is a spec error (exit 2) before
anything is sent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from batchrun.batch.anthropic import MAX_BATCH_BYTES, MAX_BATCH_REQUESTS, MessageBatches
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

    async def find_created(self, waiting: list[ChunkState], metadata: MetadataFn, folder: Path,
                           taken: set[str]) -> dict[int, dict[str, Any]]:
        """Batches created for ``waiting`` chunks but never recorded; seq -> batch."""
        ...


BATCH_CLIENTS: dict[str, type[Any]] = {"openai": BatchProvider, "anthropic": MessageBatches}
# what one batch may hold, where the provider caps it below the spec's own limits
_CAPS = {"anthropic": (MAX_BATCH_REQUESTS, MAX_BATCH_BYTES)}


def require_batch_api(spec: JobSpec) -> None:
    """``mode: batch`` needs a provider with a batch API, and chunks within its caps."""
    api = spec.endpoint.api
    if api not in BATCH_CLIENTS:
        raise SpecError(f"mode: batch: endpoint.api {api} has no batch API in batchrun; use "
                        f"mode: online, or one of: {', '.join(sorted(BATCH_CLIENTS))}")
    cap = _CAPS.get(api)
    b = spec.batch
    if cap and (b.max_requests_per_file > cap[0] or b.max_bytes_per_file > cap[1]):
        raise SpecError(f"batch.max_requests_per_file/max_bytes_per_file: {api} takes at most "
                        f"{cap[0]:,} requests and {cap[1]:,} bytes per batch; lower them")


def batch_client(spec: JobSpec, api_key: str | None, folder: Path) -> BatchClient:
    """The client of the spec's provider; ``folder`` holds the chunk files."""
    require_batch_api(spec)
    if spec.endpoint.api == "anthropic":
        return MessageBatches(spec.endpoint, api_key, spec.retry, folder=folder)
    return BatchProvider(spec.endpoint, api_key, spec.retry)  # type: ignore[return-value]
