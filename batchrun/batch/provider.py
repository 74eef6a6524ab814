"""An aiohttp client of the OpenAI Files and Batch APIs, the one boundary for their errors.

    404 on /v1/files or /v1/batches  -> NoBatchApi (a UserError naming the fallback)
    401 / 403                        -> UserError (check the key variable)
    408, 409, 429, 5xx, timeouts,
    resets, non-JSON answers         -> RetryableError (the driver backs off and retries)
    other 4xx                        -> FatalRequestError

Messages carry the status and the provider's error text, never request headers: the
API key goes only into the Authorization header.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from batchrun.errors import FatalRequestError, RetryableError, UserError
from batchrun.spec import EndpointSpec

__all__ = ["TERMINAL", "BatchProvider", "NoBatchApi"]

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})


class NoBatchApi(UserError):
    """The endpoint answers 404 to the Files or Batch API."""


def _message(body: bytes) -> str:
    try:
        err = json.loads(body).get("error", {})
        msg = err.get("message") if isinstance(err, dict) else err
        return str(msg)[:300] if msg else body[:200].decode("utf-8", "replace")
    except (ValueError, AttributeError):
        return body[:200].decode("utf-8", "replace")


class BatchProvider:
    """Files and batches of one endpoint; use as ``async with BatchProvider(...) as p``."""

    def __init__(self, endpoint: EndpointSpec, api_key: str | None):
        self._base = endpoint.base_url
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = aiohttp.ClientTimeout(total=endpoint.read_timeout_s,
                                              sock_connect=endpoint.connect_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> BatchProvider:
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def _raise_for(self, method: str, path: str, status: int, body: bytes) -> None:
        what = f"{method} {self._base}{path.removeprefix('/v1')}: HTTP {status}"
        detail = _message(body)
        if status == 404 and (path.startswith("/v1/batches") or path == "/v1/files"):
            raise NoBatchApi(
                f"endpoint {self._base} has no Batch API (404 on {path}); use mode: online "
                "or batch.fallback: online")
        if status in (401, 403):
            raise UserError(f"{what}: {detail}; check the key in endpoint.api_key_env")
        if status in (408, 409, 429) or status >= 500:
            raise RetryableError(f"{what}: {detail}", status=status, error_type=f"http_{status}")
        raise FatalRequestError(f"{what}: {detail}", status=status, error_type=f"http_{status}")

    async def _request(self, method: str, path: str, **kw: Any) -> bytes:
        assert self._session is not None, "use BatchProvider as an async context manager"
        url = self._base + path.removeprefix("/v1")
        try:
            async with self._session.request(method, url, headers=self._headers, **kw) as r:
                body = await r.read()
                status = r.status
        except TimeoutError:
            raise RetryableError(f"{method} {url}: timed out", error_type="timeout") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            raise RetryableError(f"{method} {url}: connection failed: {type(e).__name__}",
                                 error_type="connection") from None
        if status >= 400:
            self._raise_for(method, path, status, body)
        return body

    async def _json(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        body = await self._request(method, path, **kw)
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise RetryableError(f"{method} {path}: answer is not a JSON object",
                                 error_type="malformed_body")
        return doc

    async def probe(self) -> None:
        """GET /v1/batches?limit=1: finds an endpoint without a Batch API by a cheap 404
        before any upload (a server may answer a large POST's 404 by dropping the
        connection mid-body, which looks like a network fault, not a missing API)."""
        await self._json("GET", "/v1/batches", params={"limit": 1})

    async def upload(self, path: Path) -> dict[str, Any]:
        """POST /v1/files (multipart, purpose=batch), streaming the file from disk."""
        with open(path, "rb") as f:
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", f, filename=path.name, content_type="application/jsonl")
            return await self._json("POST", "/v1/files", data=form)

    async def file(self, file_id: str) -> dict[str, Any]:
        return await self._json("GET", f"/v1/files/{file_id}")

    async def content(self, file_id: str) -> bytes:
        return await self._request("GET", f"/v1/files/{file_id}/content")

    async def create(self, file_id: str, window: str, metadata: dict[str, str]
                     ) -> dict[str, Any]:
        body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                "completion_window": window, "metadata": metadata}
        return await self._json("POST", "/v1/batches", json=body)

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        return await self._json("GET", f"/v1/batches/{batch_id}")

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return await self._json("POST", f"/v1/batches/{batch_id}/cancel")

    async def list_batches(self, page_size: int = 100) -> AsyncIterator[dict[str, Any]]:
        """Every batch of the account, page by page (``after`` = the last id seen)."""
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": page_size}
            if after:
                params["after"] = after
            page = await self._json("GET", "/v1/batches", params=params)
            data = page.get("data") or []
            for batch in data:
                yield batch
            if not page.get("has_more") or not data:
                return
            after = str(data[-1]["id"])
