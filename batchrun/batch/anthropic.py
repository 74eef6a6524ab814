"""Anthropic's Message Batches as a ``clients.BatchClient``: ``/v1/messages/batches``.

There are no files: a chunk's JSONL lines (``{custom_id, params}``, written by
``api/anthropic.py``) go into the create call's body as ``{"requests": [...]}``, so
``upload`` only names the local chunk file. A batch holds at most 100,000 requests and
256 MB (``clients.require_batch_api`` keeps the chunks within both). Statuses come back
in the driver's vocabulary: ``in_progress``, ``canceling`` -> ``cancelling``, ``ended``
-> ``completed`` (``cancelled`` once a cancel was asked); each result line names its
own fate (succeeded, errored, canceled, expired).

Exactly once without metadata. Anthropic batches carry none, so a batch created just
before a crash cannot be found by a tag. The driver records the intent (the chunk at
``uploaded``, with ``intent_at``) before the create call; ``find_created`` then takes,
among the account's batches not recorded by this job, one created no earlier than the
intent (less ``MATCH_SKEW_S`` for clocks) with exactly the chunk's number of requests,
and, once it has ended, exactly the chunk's ``custom_id``s. Results are fetched from
this endpoint's own host (the path of ``results_url``), so the key goes nowhere else.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from batchrun.api.anthropic import AnthropicProvider
from batchrun.batch.provider import BatchProvider, MetadataFn
from batchrun.batch.quotas import QueueFull
from batchrun.batch.state import ChunkState, chunk_path
from batchrun.errors import RateLimited
from batchrun.io.storage import output_error, read_bytes
from batchrun.spec import EndpointSpec, RetrySpec

__all__ = ["MATCH_SKEW_S", "MAX_BATCH_BYTES", "MAX_BATCH_REQUESTS", "MessageBatches"]

MAX_BATCH_REQUESTS = 100_000
MAX_BATCH_BYTES = 256 * 1024 * 1024
MATCH_SKEW_S = 300.0  # our clock against the provider's created_at
_LOCAL = "local:"
_PATH = "/v1/messages/batches"
_STATUS = {"in_progress": "in_progress", "canceling": "cancelling", "ended": "completed"}


def _epoch(value: Any) -> float:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def normal(b: dict[str, Any]) -> dict[str, Any]:
    """A message batch in the driver's vocabulary (the provider's fields kept beside)."""
    status = _STATUS.get(str(b.get("processing_status")), str(b.get("processing_status")))
    if status == "completed" and b.get("cancel_initiated_at"):
        status = "cancelled"
    counts: dict[str, Any] = b["request_counts"] if isinstance(b.get("request_counts"),
                                                               dict) else {}
    total = sum(v for v in counts.values() if isinstance(v, int))
    return {**b, "status": status, "created_at": _epoch(b.get("created_at")), "total": total}


def _ids(lines: list[bytes]) -> set[str]:
    out = set()
    for content in lines:
        for raw in content.splitlines():
            try:
                cid = json.loads(raw).get("custom_id")
            except (ValueError, AttributeError):
                continue
            if isinstance(cid, str):
                out.add(cid)
    return out


class MessageBatches(BatchProvider):
    """Message Batches of one Anthropic endpoint (``base_url`` with or without /v1)."""

    _api_paths = (_PATH,)

    def __init__(self, endpoint: EndpointSpec, api_key: str | None, retry: RetrySpec,
                 rng: random.Random | None = None, *, folder: str | Path):
        super().__init__(endpoint, api_key, retry, rng, api=AnthropicProvider())
        self._root = endpoint.base_url.removesuffix("/v1")
        self._folder = folder
        self._headers = {**self._headers, "content-type": "application/json"}

    def _full_url(self, path: str) -> str:
        return self._root + path

    def _read(self, file_id: str) -> bytes:
        path = chunk_path(self._folder, file_id.removeprefix(_LOCAL))
        try:
            return read_bytes(path)
        except OSError as e:
            raise output_error(path, e, verb="read") from None

    async def probe(self) -> None:
        await self._retrying(lambda: self._json("GET", _PATH, params={"limit": 1}))

    async def upload(self, path: Path) -> dict[str, Any]:
        return {"id": _LOCAL + path.name}  # the requests travel in the create call

    async def create(self, file_id: str, window: str, metadata: dict[str, str],
                     find: Callable[[], Awaitable[dict[str, Any] | None]]) -> dict[str, Any]:
        """POST the chunk's requests (window and metadata: Anthropic has neither)."""
        lines = [x for x in self._read(file_id).splitlines() if x.strip()]
        body = b'{"requests":[' + b",".join(lines) + b"]}"

        async def once() -> dict[str, Any]:
            try:
                return await self._json("POST", _PATH, data=body, need_id=True)
            except RateLimited as e:  # nothing made; the queue (or the key) is full
                raise QueueFull(str(e), e.retry_after) from None
        return normal(await self._retrying(once, find))

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        return normal(await self._retrying(lambda: self._json("GET", f"{_PATH}/{batch_id}")))

    async def results(self, batch: dict[str, Any]) -> list[bytes]:
        url = batch.get("results_url")
        path = urlparse(str(url)).path if url else f"{_PATH}/{batch['id']}/results"
        return [await self._retrying(lambda: self._request("GET", path))]

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        doc = await self._retrying(lambda: self._json("POST", f"{_PATH}/{batch_id}/cancel"))
        return normal(doc)

    async def list_batches(self, page_size: int = 100) -> AsyncIterator[dict[str, Any]]:
        """The account's batches, newest first (``after_id`` = the last id seen)."""
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": page_size}
            if after:
                params["after_id"] = after
            page = await self._retrying(
                lambda p=params: self._json("GET", _PATH, params=p))  # type: ignore[misc]
            data = [b for b in page.get("data") or [] if isinstance(b, dict)]
            for b in data:
                yield normal(b)
            last = page.get("last_id")
            if not page.get("has_more") or not isinstance(last, str):
                return
            after = last

    async def find_created(self, waiting: list[ChunkState], metadata: MetadataFn,
                           folder: str | Path,
                           taken: set[str]) -> dict[int, dict[str, Any]]:
        """Match by time, size and, once results exist, custom_ids (module docs)."""
        if not waiting:
            return {}
        since = min((c.intent_at or 0.0) for c in waiting) - MATCH_SKEW_S
        candidates = []
        async for b in self.list_batches():
            if b["created_at"] and b["created_at"] < since:
                break  # newest first: the rest were made before any of our intents
            if isinstance(b.get("id"), str) and b["id"] not in taken:
                candidates.append(b)
        found: dict[int, dict[str, Any]] = {}
        for c in waiting:
            for b in reversed(candidates):  # oldest first: the create made first
                if b["id"] in taken or b["total"] != c.n_requests or (
                        c.intent_at and b["created_at"] < c.intent_at - MATCH_SKEW_S):
                    continue
                if b["status"] in ("completed", "cancelled") and _ids(
                        await self.results(b)) != _ids([self._read(_LOCAL + c.file)]):
                    continue  # another batch of the same size: its custom_ids differ
                found[c.seq] = b
                taken.add(b["id"])
                break
        return found
