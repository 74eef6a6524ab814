"""Gemini's native Batch API as a ``clients.BatchClient``, with inline requests.

    POST {root}/v1beta/models/{model}:batchGenerateContent
         {"batch": {"display_name", "input_config": {"requests": {"requests": [...]}}}}
    GET  {root}/v1beta/batches?pageSize&pageToken     GET {root}/v1beta/batches/{id}
    POST {root}/v1beta/batches/{id}:cancel

A chunk's JSONL lines (``{"request", "metadata": {"key": custom_id}}``, written by
``api/gemini.py``) go inline into the create call, so a batch holds at most 20 MB
(``clients``: chunks are cut to it). A batch is a long-running Operation whose
``metadata.state`` (``BATCH_STATE_PENDING``/``RUNNING``/``SUCCEEDED``/``FAILED``/
``CANCELLED``/``EXPIRED``, or the SDK's ``JOB_STATE_*``) comes back in the driver's
vocabulary; its ``response.inlinedResponses`` become result lines keyed by
``custom_id``. Exactly once as with OpenAI: the ``display_name`` carries the job, the
chunk, the attempt and the output's tag, so a batch created but not recorded before a
crash is found by listing. Not covered: input and output *files* (the Files API's
resumable upload), needed beyond 20 MB per batch; a batch whose output is a file stops
the job with one line.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from batchrun.api.gemini import GeminiProvider
from batchrun.batch.provider import BatchProvider
from batchrun.batch.state import chunk_path
from batchrun.errors import JobCannotSucceed
from batchrun.io.storage import output_error, read_bytes
from batchrun.spec import EndpointSpec, RetrySpec

__all__ = ["MAX_INLINE_BYTES", "GeminiBatches", "display_name", "normal"]

MAX_INLINE_BYTES = 20 * 1000 * 1000
_LOCAL = "local:"
_STATES = {"PENDING": "validating", "RUNNING": "in_progress", "SUCCEEDED": "completed",
           "FAILED": "failed", "CANCELLED": "cancelled", "EXPIRED": "expired"}
_KEYS = ("job", "chunk", "attempt", "fingerprint")


def display_name(metadata: dict[str, str]) -> str:
    """``batchrun|job|chunk|attempt|fingerprint``: what ``normal`` reads back."""
    return "|".join(["batchrun", *(metadata.get(k, "") for k in _KEYS)])


def _epoch(value: Any) -> float:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def normal(op: dict[str, Any]) -> dict[str, Any]:
    """An Operation (or a GenerateContentBatch) in the driver's vocabulary."""
    meta: dict[str, Any] = op["metadata"] if isinstance(op.get("metadata"), dict) else op
    state = str(meta.get("state") or "").removeprefix("BATCH_STATE_").removeprefix(
        "JOB_STATE_")
    parts = str(meta.get("displayName") or meta.get("display_name") or "").split("|")
    tag = dict(zip(_KEYS, parts[1:], strict=False)) if parts[0] == "batchrun" else None
    return {"id": str(op.get("name") or meta.get("name")),
            "status": _STATES.get(state, state.lower() or "validating"), "metadata": tag,
            "created_at": _epoch(meta.get("createTime")),
            "request_counts": meta.get("batchStats") or {},
            "response": op.get("response") or meta.get("output")}


class GeminiBatches(BatchProvider):
    """Batches of one Gemini endpoint (``base_url`` with or without /v1beta)."""

    _api_paths = ("/v1beta/batches",)

    def __init__(self, endpoint: EndpointSpec, api_key: str | None, retry: RetrySpec,
                 rng: random.Random | None = None, *, folder: str | Path, model: str):
        super().__init__(endpoint, api_key, retry, rng, api=GeminiProvider())
        self._root = endpoint.base_url.removesuffix("/v1beta")
        self._folder, self._model = folder, model.removeprefix("models/")
        self._headers = {**self._headers, "content-type": "application/json"}

    def _full_url(self, path: str) -> str:
        return self._root + path

    async def probe(self) -> None:
        await self._retrying(lambda: self._json("GET", "/v1beta/batches",
                                                params={"pageSize": 1}))

    async def upload(self, path: Path) -> dict[str, Any]:
        return {"id": _LOCAL + path.name}  # inline: the requests travel in the create call

    async def create(self, file_id: str, window: str, metadata: dict[str, str],
                     find: Callable[[], Awaitable[dict[str, Any] | None]]) -> dict[str, Any]:
        path = chunk_path(self._folder, file_id.removeprefix(_LOCAL))
        try:
            lines = [x for x in read_bytes(path).splitlines() if x.strip()]
        except OSError as e:
            raise output_error(path, e, verb="read") from None
        body = (b'{"batch":{"display_name":' + json.dumps(display_name(metadata)).encode()
                + b',"input_config":{"requests":{"requests":[' + b",".join(lines) + b"]}}}}")
        url = f"/v1beta/models/{self._model}:batchGenerateContent"
        doc = await self._retrying(lambda: self._json("POST", url, data=body), find)
        return normal(doc)

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        return normal(await self._retrying(lambda: self._json("GET", f"/v1beta/{batch_id}")))

    async def results(self, batch: dict[str, Any]) -> list[bytes]:
        out = batch.get("response") or {}
        if out.get("responsesFile"):
            raise JobCannotSucceed(f"batch API: {batch['id']} answered in a file, which "
                                   "batchrun does not read; lower batch.max_bytes_per_file")
        inline = (out.get("inlinedResponses") or {}).get("inlinedResponses") or []
        lines = [json.dumps({"custom_id": (r.get("metadata") or {}).get("key"),
                             "response": r.get("response"), "error": r.get("error")})
                 for r in inline if isinstance(r, dict)]
        return [("\n".join(lines) + "\n").encode()] if lines else []

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        await self._retrying(lambda: self._json("POST", f"/v1beta/{batch_id}:cancel"))
        return {"id": batch_id}

    async def list_batches(self, page_size: int = 100) -> AsyncIterator[dict[str, Any]]:
        token: str | None = None
        while True:
            params: dict[str, Any] = {"pageSize": page_size}
            if token:
                params["pageToken"] = token
            page = await self._retrying(
                lambda p=params: self._json("GET", "/v1beta/batches", params=p))  # type: ignore[misc]
            for op in page.get("operations") or page.get("batches") or []:
                if isinstance(op, dict):
                    yield normal(op)
            token = page.get("nextPageToken")
            if not isinstance(token, str) or not token:
                return
