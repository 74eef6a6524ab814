"""Conditional writes: put an object only if it is absent, or only if it is unchanged.

``pyarrow.fs`` has no conditional put, and object stores have no atomic rename, so the
few writes where two writers can race (a shard's final file, the output's lease, the
daily ledger) go through this seam:

- ``put_if_absent(path, data)``: create; False if something is there (S3
  ``If-None-Match: *``, GCS ``ifGenerationMatch=0``, locally ``os.link`` of a temporary file,
  which fails on an existing name);
- ``read_with_version(path)``: the content and an opaque version (S3 ETag, GCS
  generation, locally a content hash), or None;
- ``put_if_version(path, data, version)``: replace; False if the object changed since
  (S3 ``If-Match``, GCS ``ifGenerationMatch``, locally under an exclusive lock).

A store write is retried on throttling, 5xx and resets (botocore's standard retry mode).
A retried write whose first attempt did land gets 412 from its own earlier success: the
S3 seam then compares the object's ETag (the MD5 of a single PUT) with the data's, so a
writer never mistakes its own write for a rival's.

Paths are inside the store's filesystem (``bucket/key``), as ``storage.locate`` gives.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import uuid
from pathlib import Path
from typing import Any, Protocol

from batchrun.io import stores

__all__ = ["ConditionalStore", "LocalConditional", "S3Conditional", "conditional_for"]


class ConditionalStore(Protocol):
    def put_if_absent(self, path: str, data: bytes) -> bool: ...
    def read_with_version(self, path: str) -> tuple[bytes, str] | None: ...
    def put_if_version(self, path: str, data: bytes, version: str) -> bool: ...
    def delete(self, path: str) -> None: ...


class LocalConditional:
    """The local disk: create with ``os.link`` (atomic, fails if the name exists); replace
    under an exclusive ``flock`` of a lock file beside the target."""

    def _tmp(self, path: str, data: bytes) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def put_if_absent(self, path: str, data: bytes) -> bool:
        tmp = self._tmp(path, data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def read_with_version(self, path: str) -> tuple[bytes, str] | None:
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def put_if_version(self, path: str, data: bytes, version: str) -> bool:
        lock = Path(path).with_name(f".{Path(path).name}.lock")
        with open(lock, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            got = self.read_with_version(path)
            if got is None or got[1] != version:
                return False
            tmp = self._tmp(path, data)
            os.replace(tmp, path)
            return True

    def delete(self, path: str) -> None:
        Path(path).unlink(missing_ok=True)


def _status(e: Exception) -> int:
    resp = getattr(e, "response", None) or {}
    return int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


class S3Conditional:
    """S3 (and S3-compatible stores that honour ``If-None-Match``/``If-Match``) through
    boto3's signed requests; boto3 is imported here only (the ``s3`` extra)."""

    def __init__(self, cfg: stores.StoreConfig):
        import boto3
        from botocore.config import Config

        stores.quiet_sdk()
        retries: Any = {"max_attempts": stores.RETRY_ATTEMPTS, "mode": "standard"}
        self._client = boto3.session.Session().client(
            "s3", endpoint_url=cfg.endpoint_url or None, region_name=cfg.region or None,
            config=Config(retries=retries, connect_timeout=10, read_timeout=60))

    @staticmethod
    def _key(path: str) -> tuple[str, str]:
        bucket, _, key = path.partition("/")
        return bucket, key

    def _etag(self, path: str) -> str | None:
        bucket, key = self._key(path)
        try:
            return str(self._client.head_object(Bucket=bucket, Key=key)["ETag"])
        except Exception as e:
            if _status(e) == 404:
                return None
            raise

    def _put(self, path: str, data: bytes, **cond: str) -> bool:
        bucket, key = self._key(path)
        try:
            self._client.put_object(Bucket=bucket, Key=key, Body=data, **cond)
            return True
        except Exception as e:
            if _status(e) not in (409, 412):  # 409: a concurrent conditional write won
                raise OSError(f"s3://{path}: {e}") from e
        # ours, if a retried attempt met its own earlier success: compare the bytes (an
        # ETag is the MD5 only for single-part objects without SSE-KMS)
        got = self.read_with_version(path)
        return got is not None and got[0] == data

    def put(self, path: str, data: bytes) -> None:
        """An unconditional PUT: one request, where pyarrow's stream makes a multipart
        upload of three even for a small object."""
        bucket, key = self._key(path)
        try:
            self._client.put_object(Bucket=bucket, Key=key, Body=data)
        except Exception as e:
            raise OSError(f"s3://{path}: {e}") from e

    def put_if_absent(self, path: str, data: bytes) -> bool:
        return self._put(path, data, IfNoneMatch="*")

    def read_with_version(self, path: str) -> tuple[bytes, str] | None:
        bucket, key = self._key(path)
        try:
            got = self._client.get_object(Bucket=bucket, Key=key)
        except Exception as e:
            if _status(e) == 404:
                return None
            raise OSError(f"s3://{path}: {e}") from e
        return got["Body"].read(), str(got["ETag"])

    def put_if_version(self, path: str, data: bytes, version: str) -> bool:
        if version == f'"{hashlib.md5(data).hexdigest()}"':
            return self._etag(path) == version  # the same bytes: nothing to write
        return self._put(path, data, IfMatch=version)

    def delete(self, path: str) -> None:
        bucket, key = self._key(path)
        with contextlib.suppress(Exception):
            self._client.delete_object(Bucket=bucket, Key=key)


_cache: dict[tuple[str, stores.StoreConfig], ConditionalStore] = {}


def conditional_for(where: str) -> tuple[ConditionalStore, str]:
    """The seam for ``where`` (a local path or a store URI) and the path inside it."""
    if not stores.is_store(where):
        return LocalConditional(), where
    scheme, path = stores.split(where)
    scheme = "gs" if scheme == "gcs" else scheme
    key = (scheme, stores.config())
    if key not in _cache:
        if scheme == "gs":
            from batchrun.io.gcs import GCSConditional  # google-auth: the gcs extra

            _cache[key] = GCSConditional()
        else:
            _cache[key] = S3Conditional(key[1])
    return _cache[key], path
