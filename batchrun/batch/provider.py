"""An aiohttp client of the OpenAI Files and Batch APIs, the one boundary for their errors.

    404 on /v1/files or /v1/batches  -> NoBatchApi (a UserError naming the fallback)
    401 / 403                        -> JobCannotSucceed (exit 7, as online's breaker)
    any other status                 -> the provider's one table (``api/openai.py``):
                                        429 and 408/409/5xx retried with their Retry-After,
                                        other 4xx FatalRequestError
    timeouts, resets, non-JSON       -> RetryableError

Every call is retried here with the job's ``retry`` policy, the one online mode uses
(``api.retry``, full jitter), never waiting less than Retry-After nor more than
``MAX_RETRY_AFTER_S`` (a wait over ``LONG_WAIT_S`` is logged); when the attempts run
out the job stops with ``JobCannotSucceed`` (exit 7), and the state on disk lets the same
command continue. ``create`` is special: a failed create may still have made the batch,
and a blind retry would create, and bill, it twice, so before each retry the caller's
``find`` looks for it.

Messages carry the status and the provider's error text (with the key masked, should a
proxy echo it), never request headers: the key goes only into the Authorization header.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from batchrun.api.chat import ChatKind
from batchrun.api.openai import OpenAIProvider
from batchrun.api.protocols import Provider, RequestKind
from batchrun.api.retry import MAX_RETRY_AFTER_S, pause_s, retry_after_s
from batchrun.api.secrets import redact
from batchrun.batch.state import ChunkState
from batchrun.errors import (
    JobCannotSucceed,
    RetryableError,
    UserError,
)
from batchrun.io.storage import output_error
from batchrun.spec import EndpointSpec, RetrySpec

__all__ = ["LONG_WAIT_S", "TERMINAL", "BatchProvider", "NoBatchApi",
           "gave_up"]

T = TypeVar("T")
MetadataFn = Callable[[ChunkState], dict[str, str]]  # what a chunk's create carries
log = logging.getLogger("batchrun")
LONG_WAIT_S = 30.0  # waits longer than this are logged (WARNING), naming the call

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})


class NoBatchApi(UserError):
    """The endpoint answers 404 to the Files or Batch API."""


def gave_up(err: RetryableError, attempts: int) -> JobCannotSucceed:
    """The one line a job stops with when the provider keeps refusing a call."""
    return JobCannotSucceed(
        f"batch API: {err} (still failing after {attempts} attempts); nothing is lost: run "
        "the same command again later to continue")


class BatchProvider:
    """Files and batches of one endpoint; use as ``async with BatchProvider(...) as p``.

    The OpenAI implementation of ``batch.clients.BatchClient``; ``batch/anthropic.py``
    is Anthropic's, built on this class's calls, retries and error table."""

    _api_paths: tuple[str, ...] = ("/v1/batches", "/v1/files")  # a 404 there: no Batch API

    def __init__(self, endpoint: EndpointSpec, api_key: str | None, retry: RetrySpec,
                 rng: random.Random | None = None, *, kind: RequestKind | None = None,
                 api: Provider | None = None):
        self._base = endpoint.base_url
        self._key = api_key
        self._api = api or OpenAIProvider()
        self._url = "/v1" + (kind or ChatKind()).path  # what the batch's lines ask for
        self._headers = self._api.auth_headers(api_key)
        self._policy = retry
        self._rng = rng or random.Random()
        self._timeout = aiohttp.ClientTimeout(total=endpoint.read_timeout_s,
                                              sock_connect=endpoint.connect_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> BatchProvider:
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def _full_url(self, path: str) -> str:
        """``path`` (from /v1) below the endpoint's base URL, which ends in /v1."""
        return self._base + path.removeprefix("/v1")

    def _raise_for(self, method: str, path: str, status: int, body: bytes,
                   headers: Any) -> None:
        what = f"{method} {self._full_url(path)}: HTTP {status}"
        # masked before the provider's text is cut short, as online mode does
        detail = self._api.message(redact(body.decode("utf-8", "replace"), self._key).encode())
        if status == 404 and path.startswith(self._api_paths):
            raise NoBatchApi(
                f"endpoint {self._base} has no Batch API (404 on {path}); use mode: online "
                "or batch.fallback: online")
        if status in (401, 403):  # the key is refused: every later call would be too
            raise JobCannotSucceed(f"batch API: {what}: {detail}; check the key in "
                                   "endpoint.api_key_env, then run the same command again")
        raise self._api.status_error(status, f"{method} {self._full_url(path)}: {detail}",
                                     retry_after_s(headers))

    def pause(self, err: RetryableError, attempt: int) -> float:
        """Seconds to wait after ``err`` on ``attempt``: the policy's, Retry-After capped at
        ``MAX_RETRY_AFTER_S``; a long wait is logged with the call it is for."""
        wait = pause_s(err, attempt, self._policy, self._rng, cap_s=MAX_RETRY_AFTER_S)
        if wait > LONG_WAIT_S:
            log.warning("batch API: %s; waiting %.0f s before attempt %d", err, wait,
                        attempt + 1)
        return wait

    async def _retrying(self, call: Callable[[], Awaitable[T]],
                        find: Callable[[], Awaitable[T | None]] | None = None) -> T:
        """``call`` under the job's retry policy; ``JobCannotSucceed`` once it is spent.
        ``find``, if given, runs after each failure: what it returns (not None) is what
        the failed call did after all, and is returned instead of retrying."""
        attempt = 1
        while True:
            try:
                return await call()
            except RetryableError as e:
                if find is not None and (found := await find()) is not None:
                    return found
                if attempt >= self._policy.max_attempts:
                    raise gave_up(e, attempt) from None
                await asyncio.sleep(self.pause(e, attempt))
                attempt += 1

    async def _request(self, method: str, path: str, **kw: Any) -> bytes:
        """One attempt."""
        assert self._session is not None, "use BatchProvider as an async context manager"
        url = self._full_url(path)
        try:
            async with self._session.request(method, url, headers=self._headers, **kw) as r:
                body = await r.read()
                status, headers = r.status, r.headers
        except TimeoutError:
            raise RetryableError(f"{method} {url}: timed out", error_type="timeout") from None
        except aiohttp.ClientError as e:  # refused, reset, cut off mid-body, bad redirect
            raise RetryableError(f"{method} {url}: connection failed: {type(e).__name__}",
                                 error_type="connection") from None
        if status >= 400:
            self._raise_for(method, path, status, body, headers)
        return body

    async def _json(self, method: str, path: str, *, need_id: bool = False,
                    **kw: Any) -> dict[str, Any]:
        """One attempt; the answer must be a JSON object (with a string ``id`` if asked)."""
        body = await self._request(method, path, **kw)
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or (need_id and not isinstance(doc.get("id"), str)):
            raise RetryableError(f"{method} {path}: answer is not a JSON object"
                                 + (" with an id" if need_id else ""),
                                 error_type="malformed_body")
        return doc

    async def probe(self) -> None:
        """GET /v1/batches?limit=1: finds an endpoint without a Batch API by a cheap 404
        before any upload (a server may answer a large POST's 404 by dropping the
        connection mid-body, which looks like a network fault, not a missing API)."""
        await self._retrying(lambda: self._json("GET", "/v1/batches", params={"limit": 1}))

    async def upload(self, path: Path) -> dict[str, Any]:
        """POST /v1/files (multipart, purpose=batch), streaming the file from disk; a retry
        re-reads the file (an upload that failed half-way only leaves an unused file)."""
        async def once() -> dict[str, Any]:
            try:
                f = open(path, "rb")  # noqa: SIM115 - closed below, after the upload
            except OSError as e:
                raise output_error(path, e, verb="read") from None
            with f:
                form = aiohttp.FormData()
                form.add_field("purpose", "batch")
                form.add_field("file", f, filename=path.name, content_type="application/jsonl")
                return await self._json("POST", "/v1/files", data=form, need_id=True)
        return await self._retrying(once)

    async def content(self, file_id: str) -> bytes:
        return await self._retrying(lambda: self._request("GET", f"/v1/files/{file_id}/content"))

    async def results(self, batch: dict[str, Any]) -> list[bytes]:
        """The JSONL result files of an ended batch: its output and error files."""
        return [await self.content(str(batch[k]))
                for k in ("output_file_id", "error_file_id") if batch.get(k)]

    async def find_created(self, waiting: list[ChunkState], metadata: MetadataFn,
                           folder: str | Path,
                           taken: set[str]) -> dict[int, dict[str, Any]]:
        """The batches created for ``waiting`` chunks but never recorded (a crash between
        create and record): by the metadata each create carried. Chunk seq -> batch."""
        by_chunk = {str(c.seq): c for c in waiting}
        found: dict[int, dict[str, Any]] = {}
        async for b in self.list_batches():
            meta, bid = b.get("metadata"), b.get("id")
            if not isinstance(meta, dict) or not isinstance(bid, str) or bid in taken:
                continue  # not one of ours (or not a batch object at all)
            c = by_chunk.get(str(meta.get("chunk")))
            if c is not None and c.seq not in found and all(
                    meta.get(k) == v for k, v in metadata(c).items() if k != "attempt"):
                found[c.seq] = b
        return found

    async def create(self, file_id: str, window: str, metadata: dict[str, str],
                     find: Callable[[], Awaitable[dict[str, Any] | None]]) -> dict[str, Any]:
        """POST /v1/batches; after a failure ``find`` looks for the batch the failed call
        may have made (by its ``metadata``) before it is tried again (see the module docs)."""
        body = {"input_file_id": file_id, "endpoint": self._url,
                "completion_window": window, "metadata": metadata}
        return await self._retrying(
            lambda: self._json("POST", "/v1/batches", json=body, need_id=True), find)

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        return await self._retrying(lambda: self._json("GET", f"/v1/batches/{batch_id}"))

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        async def once() -> dict[str, Any]:
            try:
                return await self._json("POST", f"/v1/batches/{batch_id}/cancel")
            except RetryableError as e:
                if e.status == 409:  # already ending (or an earlier try went through)
                    return {"id": batch_id}
                raise
        return await self._retrying(once)

    async def list_batches(self, page_size: int = 100) -> AsyncIterator[dict[str, Any]]:
        """Every batch of the account, page by page (``after`` = the last id seen)."""
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": page_size}
            if after:
                params["after"] = after
            page = await self._retrying(
                functools.partial(self._json, "GET", "/v1/batches", params=params))
            data = [b for b in page.get("data") or [] if isinstance(b, dict)]
            for batch in data:
                yield batch
            last = data[-1].get("id") if data else None
            if not page.get("has_more") or not isinstance(last, str):
                return
            after = last
