"""One attempt of a request kind at a provider, over a long-lived aiohttp session.

This is the one boundary where aiohttp errors become batchrun errors, classified
by status code and exception class, never by message text:

    200 + valid JSON          -> Completion (the kind's parser)
    200 + bad/partial JSON    -> RetryableError(malformed_body), maybe billed
    any other status          -> the provider's one table (api/openai.py: 429 with its
                                 Retry-After, 408/409/5xx retried, other 4xx fatal)
    timeout                   -> RetryableError(timeout), maybe billed
    connection refused        -> RetryableError(connect_refused)   nothing was sent
    host name unresolvable    -> RetryableError(dns)               nothing was sent
    reset / disconnect        -> RetryableError(connection), maybe billed
    body over the size cap    -> FatalRequestError(response_too_large), billed if a 200

Error messages carry the status and the provider's error text, never request
headers, and that text has the key masked (``secrets.redact``: a proxy may echo it), so
the API key cannot leak through an exception.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson  # several times faster than json both ways: a worker's main CPU cost per row

from batchrun.api.chat import ChatKind
from batchrun.api.openai import OpenAIProvider
from batchrun.api.protocols import Completion, Provider, RequestKind
from batchrun.api.retry import retry_after_s
from batchrun.api.secrets import redact
from batchrun.errors import FatalRequestError, RetryableError
from batchrun.spec import EndpointSpec

__all__ = ["ApiClient", "Completion", "open_session"]


def open_session(endpoint: EndpointSpec, concurrency: int) -> aiohttp.ClientSession:
    """The worker's one session: a connection per request in flight, reused across rows."""
    connector = aiohttp.TCPConnector(limit=concurrency + 8, ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(
        total=endpoint.read_timeout_s, sock_connect=endpoint.connect_timeout_s
    )
    return aiohttp.ClientSession(connector=connector, timeout=timeout, raise_for_status=False)


class ApiClient:
    """Sends one request kind to one provider, with the key in a header, nowhere else."""

    def __init__(self, session: aiohttp.ClientSession, endpoint: EndpointSpec,
                 api_key: str | None, kind: RequestKind | None = None,
                 provider: Provider | None = None):
        self._session = session
        self._kind = kind or ChatKind()
        self._provider = provider or OpenAIProvider()
        self._url = self._provider.url(endpoint.base_url, self._kind)
        self._max_bytes = endpoint.max_response_bytes
        self._headers = {"Content-Type": "application/json",
                         **self._provider.auth_headers(api_key)}
        self._key = api_key  # to mask it in every message built from the provider's answer

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        if (resp.content_length or 0) > self._max_bytes:
            raise FatalRequestError(
                f"response of {resp.content_length} bytes exceeds the "
                f"{self._max_bytes}-byte cap", status=resp.status, error_type="response_too_large",
                maybe_billed=resp.status == 200)
        if resp.content_length is not None and resp.headers.get(
                "Content-Encoding", "identity").lower() == "identity":
            return await resp.read()  # declared, within the cap, not inflated: one read
        chunks, size = [], 0
        async for chunk in resp.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > self._max_bytes:
                raise FatalRequestError(
                    f"response exceeds the {self._max_bytes}-byte cap",
                    status=resp.status, error_type="response_too_large",
                    maybe_billed=resp.status == 200)
            chunks.append(chunk)
        return b"".join(chunks)

    async def complete(self, body: dict[str, Any], base_url: str | None = None) -> Completion:
        """One attempt; raises a ``RequestError`` subclass on any failure. ``base_url``:
        another server of the same API (an engine replica, engine/routes.py)."""
        try:
            data = orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS)  # logit_bias: {50256: -100}
        except TypeError as e:  # a value JSON cannot hold (from the spec's extra fields)
            raise FatalRequestError(f"request body is not JSON: {e}", error_type="bad_request"
                                    ) from None
        try:
            url = (self._url if base_url is None
                   else self._provider.url(base_url, self._kind))  # the provider's own rule
            async with self._session.post(url, data=data, headers=self._headers) as resp:
                raw = await self._read_capped(resp)
                status = resp.status
                headers = resp.headers
        except TimeoutError:  # it may have been processed: the budget assumes so
            raise RetryableError("request timed out", error_type="timeout",
                                 maybe_billed=True) from None
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
            raise RetryableError(f"connection failed: {type(e).__name__}",
                                 error_type="connection", maybe_billed=True) from None
        except aiohttp.ClientError as e:  # redirects and the like; `from None`: its
            # request_info holds our headers, the key among them
            raise FatalRequestError(f"request failed: {type(e).__name__}",
                                    error_type="client_error") from None
        if status == 200:
            try:
                doc = orjson.loads(raw)
            except ValueError:
                doc = None  # the kind's parser calls it malformed, billed
            return self._kind.parse(doc)
        # masked here, once, before it is cut short: the row's error_message, the
        # error-rate verdict, the limiter's halt reason, logs and the summary come from it
        detail = self._provider.message(redact(raw.decode("utf-8", "replace"), self._key).encode())
        raise self._provider.status_error(status, detail, retry_after_s(headers))
