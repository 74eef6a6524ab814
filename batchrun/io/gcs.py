"""GCS conditional writes through the JSON API's generation preconditions.

The ``gs://`` side of ``conditional.py``'s seam; pyarrow's ``GcsFileSystem`` has no
conditional put, so these few requests go straight to the JSON API:

- create: ``POST /upload/storage/v1/b/B/o?uploadType=media&ifGenerationMatch=0``;
- read: the object's metadata (its ``generation``), then the media of exactly that
  generation (``?alt=media&generation=G``), so content and version always agree;
- replace: the same upload with ``ifGenerationMatch=G``. 412 means another writer
  changed (or created) it first.

Credentials are ``google.auth.default()`` (``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's
application-default login, or a VM's service account); with ``STORAGE_EMULATOR_HOST``
the emulator there is used, anonymously. ``google-auth`` and ``requests`` are imported
here only (the ``gcs`` extra).

429, 5xx and connection errors are retried with backoff (``stores.RETRY_ATTEMPTS``
tries). A retried write whose first attempt did land meets 412 from its own earlier
success: the object is then read back, and equal bytes mean the write was ours.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any
from urllib.parse import quote

from batchrun.io import stores

__all__ = ["RETRY_STATUS", "GCSConditional"]

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"


def _session() -> tuple[Any, str]:
    """An authorized ``requests`` session and the API's base URL."""
    from google.auth.transport.requests import AuthorizedSession

    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        from google.auth.credentials import AnonymousCredentials

        base = emulator if "://" in emulator else f"http://{emulator}"
        return AuthorizedSession(AnonymousCredentials()), base.rstrip("/")  # type: ignore[no-untyped-call]
    import google.auth

    creds, _ = google.auth.default(scopes=[_SCOPE])  # type: ignore[no-untyped-call]
    return AuthorizedSession(creds), "https://storage.googleapis.com"


class GCSConditional:
    """``ConditionalStore`` for ``gs://``; paths are ``bucket/name``."""

    def __init__(self, attempts: int = stores.RETRY_ATTEMPTS, timeout_s: float = 60.0):
        self._http, self._base = _session()
        self._attempts, self._timeout = max(1, attempts), timeout_s

    def _call(self, method: str, url: str, **kw: Any) -> Any:
        """One request, retried on 429/5xx and connection errors; the last answer or
        error is returned or raised as ``OSError`` naming the object."""
        import requests

        for attempt in range(self._attempts):
            try:
                r = self._http.request(method, url, timeout=self._timeout, **kw)
            except requests.RequestException as e:
                if attempt + 1 == self._attempts:
                    raise OSError(f"gs: {method} {url.split('?')[0]}: {type(e).__name__}") from e
            else:
                if r.status_code not in RETRY_STATUS or attempt + 1 == self._attempts:
                    return r
            time.sleep(random.uniform(0, min(5.0, 0.1 * 2 ** attempt)))
        raise AssertionError("unreachable")

    def _object_url(self, path: str) -> str:
        bucket, _, name = path.partition("/")
        return f"{self._base}/storage/v1/b/{bucket}/o/{quote(name, safe='')}"

    @staticmethod
    def _fail(path: str, r: Any) -> OSError:
        return OSError(f"gs://{path}: HTTP {r.status_code}")

    def _upload(self, path: str, data: bytes, generation: str) -> bool:
        bucket, _, name = path.partition("/")
        url = f"{self._base}/upload/storage/v1/b/{bucket}/o"
        r = self._call("POST", url, data=data,
                       params={"uploadType": "media", "name": name,
                               "ifGenerationMatch": generation},
                       headers={"Content-Type": "application/octet-stream"})
        if r.status_code == 200:
            return True
        if r.status_code not in (409, 412):
            raise self._fail(path, r)
        got = self.read_with_version(path)  # ours, if a retry met its own earlier success
        return got is not None and got[0] == data

    def put_if_absent(self, path: str, data: bytes) -> bool:
        return self._upload(path, data, "0")

    def read_with_version(self, path: str) -> tuple[bytes, str] | None:
        url = self._object_url(path)
        for _ in range(5):  # replaced between the two requests: look again
            meta = self._call("GET", url)
            if meta.status_code == 404:
                return None
            if meta.status_code != 200:
                raise self._fail(path, meta)
            gen = str(meta.json()["generation"])
            media = self._call("GET", url, params={"alt": "media", "generation": gen})
            if media.status_code == 200:
                return bytes(media.content), gen
            if media.status_code != 404:
                raise self._fail(path, media)
        raise OSError(f"gs://{path}: the object keeps changing while it is read")

    def put_if_version(self, path: str, data: bytes, version: str) -> bool:
        return self._upload(path, data, version)

    def delete(self, path: str) -> None:
        r = self._call("DELETE", self._object_url(path))
        if r.status_code not in (200, 204, 404):
            raise self._fail(path, r)
