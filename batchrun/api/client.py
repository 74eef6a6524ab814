"""One chat-completion attempt over a long-lived aiohttp session.

This is the one boundary where aiohttp errors become batchrun errors, classified
by status code and exception class, never by message text:

    200 + valid JSON          -> Completion
    200 + bad/partial JSON    -> RetryableError(malformed_body)
    429                       -> RateLimited(retry_after from Retry-After / retry-after-ms)
    408, 409, 5xx             -> RetryableError(http_<code>)
    other 4xx                 -> FatalRequestError(http_<code>)
    timeout                   -> RetryableError(timeout)
    connection refused        -> RetryableError(connect_refused)   nothing was sent
    host name unresolvable    -> RetryableError(dns)               nothing was sent
    reset / disconnect        -> RetryableError(connection)
    body over the size cap    -> FatalRequestError(response_too_large)

Error messages carry the status and the provider's error text, never request
headers, and that text has the key masked (``secrets.redact``: a proxy may echo it), so
the API key cannot leak through an exception.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson  # several times faster than json both ways: a worker's main CPU cost per row

from batchrun.api.retry import retry_after_s
from batchrun.api.secrets import redact
from batchrun.errors import FatalRequestError, RateLimited, RetryableError
from batchrun.spec import EndpointSpec

__all__ = ["ChatClient", "Completion", "open_session"]

_RETRYABLE_4XX = {408, 409}


@dataclass(frozen=True)
class Completion:
    text: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def open_session(endpoint: EndpointSpec, concurrency: int) -> aiohttp.ClientSession:
    """The worker's one session: a connection per request in flight, reused across rows."""
    connector = aiohttp.TCPConnector(limit=concurrency + 8, ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(
        total=endpoint.read_timeout_s, sock_connect=endpoint.connect_timeout_s
    )
    return aiohttp.ClientSession(connector=connector, timeout=timeout, raise_for_status=False)


def _provider_message(body: bytes, key: str | None) -> str:
    """The provider's error text, the key masked before it is cut short (a cut key would
    leave a prefix that no longer matches it)."""
    try:
        err = orjson.loads(body).get("error", {})
        msg = err.get("message") if isinstance(err, dict) else str(err)
        if msg:
            return redact(str(msg), key)[:300]
    except (ValueError, AttributeError):
        pass
    return redact(body.decode("utf-8", "replace"), key)[:200]


def _parse(body: bytes) -> Completion:
    try:
        doc = orjson.loads(body)
        choice = doc["choices"][0]
        usage = doc.get("usage") or {}
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        return Completion(
            text=choice["message"].get("content"),
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=int(usage.get("total_tokens") or prompt + completion),
        )
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise RetryableError(
            f"malformed response body ({type(e).__name__})", status=200, error_type="malformed_body"
        ) from None


class ChatClient:
    """Sends chat completions to ``base_url`` with the key in a header, nowhere else."""

    def __init__(self, session: aiohttp.ClientSession, endpoint: EndpointSpec, api_key: str | None):
        self._session = session
        self._url = endpoint.base_url + "/chat/completions"
        self._max_bytes = endpoint.max_response_bytes
        self._headers = {"Content-Type": "application/json"}
        self._key = api_key  # to mask it in every message built from the provider's answer
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        if (resp.content_length or 0) > self._max_bytes:
            raise FatalRequestError(
                f"response of {resp.content_length} bytes exceeds the "
                f"{self._max_bytes}-byte cap", status=resp.status, error_type="response_too_large")
        if resp.content_length is not None and resp.headers.get(
                "Content-Encoding", "identity").lower() == "identity":
            return await resp.read()  # declared, within the cap, not inflated: one read
        chunks, size = [], 0
        async for chunk in resp.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > self._max_bytes:
                raise FatalRequestError(
                    f"response exceeds the {self._max_bytes}-byte cap",
                    status=resp.status, error_type="response_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def complete(self, body: dict[str, Any]) -> Completion:
        """One attempt; raises a ``RequestError`` subclass on any failure."""
        try:
            data = orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS)  # logit_bias: {50256: -100}
        except TypeError as e:  # a value JSON cannot hold (from the spec's extra fields)
            raise FatalRequestError(f"request body is not JSON: {e}", error_type="bad_request"
                                    ) from None
        try:
            async with self._session.post(self._url, data=data, headers=self._headers) as resp:
                raw = await self._read_capped(resp)
                status = resp.status
                headers = resp.headers
        except TimeoutError:
            raise RetryableError("request timed out", error_type="timeout") from None
        except aiohttp.ClientConnectorDNSError as e:  # nothing was sent (the breaker's cause)
            raise RetryableError(f"DNS failure: cannot resolve {e.host}", error_type="dns"
                                 ) from None
        except aiohttp.ClientConnectorError as e:
            if isinstance(e.os_error, ConnectionRefusedError):  # nothing listens there
                raise RetryableError(f"connection refused by {e.host}:{e.port}",
                                     error_type="connect_refused") from None
            raise RetryableError(f"connection failed: {type(e).__name__}",
                                 error_type="connection") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            raise RetryableError(
                f"connection failed: {type(e).__name__}", error_type="connection") from None
        except aiohttp.ClientError as e:  # redirects and the like; `from None`: its
            # request_info holds our headers, the key among them
            raise FatalRequestError(f"request failed: {type(e).__name__}",
                                    error_type="client_error") from None
        if status == 200:
            return _parse(raw)
        # masked here, once: the row's error_message, the error-rate verdict, the limiter's
        # halt reason, logs and the summary are all made from this text
        message = f"HTTP {status}: {_provider_message(raw, self._key)}"
        if status == 429:
            raise RateLimited(message, retry_after=retry_after_s(headers))
        if status >= 500 or status in _RETRYABLE_4XX:
            raise RetryableError(message, status=status, error_type=f"http_{status}")
        raise FatalRequestError(message, status=status, error_type=f"http_{status}")
