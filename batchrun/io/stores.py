"""Object stores (``s3://``, ``gs://``): their filesystems, configuration and preflight checks.

A URI with a store scheme is resolved here to a ``pyarrow.fs`` filesystem built from the
spec's ``storage:`` block (endpoint and region, never secrets) and the ecosystem's own
configuration: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION``,
``AWS_PROFILE`` and the keys in the environment or the credentials file for S3;
``GOOGLE_APPLICATION_CREDENTIALS`` for GCS. Credentials are found by the SDKs on each
machine, so they never travel in a spec, a Ray argument or a log line: the driver hands
the actors only URIs and the resolved ``storage:`` block (``resolved``).

Throttling (``503 SlowDown``), 500s and connection resets are retried by the SDKs'
standard retry strategies with backoff (``RETRY_ATTEMPTS`` tries).

``preflight`` checks a URI before any request is sent to the model provider: no
credentials or a missing bucket is bad input (exit 2), an output the credentials cannot
write is ``OutputError`` (exit 3), each one line naming the URI and the fix.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pyarrow.fs as pafs

from batchrun.errors import OutputError, UserError
from batchrun.spec import JobSpec, StorageSpec

__all__ = [
    "RETRY_ATTEMPTS",
    "SCHEMES",
    "StoreConfig",
    "bucket_of",
    "config",
    "configure",
    "filesystem",
    "is_store",
    "preflight",
    "resolved",
    "scheme_of", "short",
    "split",
    "uri",
]

SCHEMES = ("s3", "gs", "gcs")
# tries of one store request (throttling, 5xx, resets), with backoff; the env var is for tests
RETRY_ATTEMPTS = int(os.environ.get("BATCHRUN_STORE_ATTEMPTS", "8"))


@dataclass(frozen=True)
class StoreConfig:
    """The non-secret settings of the stores: the spec's ``storage:`` block, resolved."""

    endpoint_url: str | None = None
    region: str | None = None


_lock = threading.Lock()
_config: StoreConfig | None = None  # None: from this process's environment, on first use
_filesystems: dict[tuple[str, StoreConfig], pafs.FileSystem] = {}


def resolved(endpoint_url: str | None = None, region: str | None = None) -> StoreConfig:
    """The spec's values, else the standard environment variables of S3-compatible stores:
    what the driver passes to actors on other nodes, whose environment may lack them."""
    env = os.environ
    return StoreConfig(
        endpoint_url=endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        or None,
        region=region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None)


def configure(cfg: StoreConfig | Any | None) -> None:
    """Use ``cfg`` (a ``StoreConfig`` or the spec's ``storage:`` block) in this process."""
    global _config
    if cfg is None:
        new = resolved()
    elif isinstance(cfg, StoreConfig):
        new = cfg
    else:
        new = resolved(getattr(cfg, "endpoint_url", None), getattr(cfg, "region", None))
    with _lock:
        _config = new


def config() -> StoreConfig:
    global _config
    with _lock:
        if _config is None:
            _config = resolved()
        return _config


def scheme_of(where: str) -> str:
    return where.split("://", 1)[0].lower() if "://" in where else ""


def is_store(where: str | os.PathLike[str]) -> bool:
    return scheme_of(os.fspath(where)) in SCHEMES


def split(where: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (``s3``, ``bucket/key``): the path inside the filesystem."""
    scheme, rest = where.split("://", 1)
    return scheme.lower(), rest.lstrip("/")


def uri(scheme: str, path: str) -> str:
    return f"{scheme}://{path}"


def bucket_of(path: str) -> str:
    return path.split("/", 1)[0]


def _s3(cfg: StoreConfig) -> pafs.FileSystem:
    kwargs: dict[str, Any] = {
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=RETRY_ATTEMPTS),
        "connect_timeout": 10, "request_timeout": 60}
    if cfg.endpoint_url:
        kwargs["endpoint_override"] = cfg.endpoint_url
    if cfg.region:
        kwargs["region"] = cfg.region
    profile = os.environ.get("AWS_PROFILE")
    if profile and not os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs["profile"] = profile  # type: ignore[unused-ignore]
    try:
        return pafs.S3FileSystem(**kwargs)
    except TypeError:  # an older pyarrow without the profile argument: the SDK reads it
        kwargs.pop("profile", None)
        return pafs.S3FileSystem(**kwargs)


def _gcs(cfg: StoreConfig) -> pafs.FileSystem:
    # (pyarrow's argument is a timedelta named retry_time_limit)
    kwargs: dict[str, Any] = {"retry_time_limit": timedelta(seconds=60)}
    endpoint = os.environ.get("STORAGE_EMULATOR_HOST") or None
    if endpoint:  # a local emulator: plain http, no credentials
        scheme, _, host = endpoint.rpartition("://")
        kwargs.update(endpoint_override=host, scheme=scheme or "http", anonymous=True)
    return pafs.GcsFileSystem(**kwargs)


def filesystem(scheme: str) -> pafs.FileSystem:
    """The (cached) filesystem of a store scheme under this process's configuration."""
    cfg = config()
    with _lock:
        fs = _filesystems.get((scheme, cfg))
        if fs is None:
            fs = _filesystems[(scheme, cfg)] = _s3(cfg) if scheme == "s3" else _gcs(cfg)
        return fs


# -- preflight ----------------------------------------------------------------------------

def quiet_sdk() -> None:
    """botocore logs where it found the keys at INFO: not a line a user needs per run."""
    for name in ("botocore", "boto3", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _s3_credentials(where: str) -> None:
    """Credentials found by the standard AWS chain, else one line saying how to set them."""
    quiet_sdk()
    try:
        import boto3
    except ImportError:
        raise UserError(f"{where}: s3:// needs the s3 extra; pip install 'batchrun[s3]'") from None
    try:
        creds = boto3.Session().get_credentials()
    except Exception as e:  # a profile named in AWS_PROFILE that does not exist, ...
        raise UserError(f"{where}: AWS credentials cannot be loaded ({type(e).__name__}); "
                        "check AWS_PROFILE and ~/.aws/credentials") from None
    if creds is None:
        raise UserError(f"{where}: no AWS credentials found; export AWS_ACCESS_KEY_ID and "
                        "AWS_SECRET_ACCESS_KEY, or set AWS_PROFILE, or run where an "
                        "instance role is attached")


def preflight(where: str, role: str) -> None:
    """Check a store URI before anything is sent: credentials, the bucket, and for
    ``role == "output"`` (or ``"ledger"``) that an object can be written there."""
    scheme, path = split(where)
    if scheme == "s3":
        _s3_credentials(where)
    fs = filesystem(scheme)
    bucket = bucket_of(path)
    try:
        info = fs.get_file_info(bucket)
    except OSError as e:
        raise UserError(f"{role}: {where}: the store cannot be reached or refuses access "
                        f"({short(e)}); check the endpoint, the credentials and the "
                        "bucket's permissions") from None
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"{role}: {where}: bucket {bucket!r} does not exist; create it or fix "
                        "the URI")
    if role != "input":
        _probe(fs, where, path)


def _probe(fs: pafs.FileSystem, where: str, path: str) -> None:
    probe = f"{path.rstrip('/')}/.write-probe-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(probe) as f:
            f.write(b"")
        fs.delete_file(probe)
    except OSError as e:
        raise OutputError(f"output: cannot write {where}: {short(e)}; grant the credentials "
                          "write access to it (s3:PutObject, s3:DeleteObject) or choose another "
                          "output") from None


def short(e: OSError) -> str:
    """The first line of an SDK error, without the request ids that follow it."""
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def prepare(spec: JobSpec) -> JobSpec:
    """The spec with its ``storage:`` block resolved (endpoint and region from the
    environment where the spec gives none), configured in this process; a ledger in a store
    is checked here (the input and output are checked where they are read and written)."""
    uris = [spec.input, spec.output, spec.budget.ledger_dir or ""]
    weights = spec.engine.model_path if spec.engine is not None else None
    if not any(is_store(u) for u in [*uris, weights or ""]):
        return spec
    given = spec.storage
    cfg = resolved(getattr(given, "endpoint_url", None), getattr(given, "region", None))
    block = StorageSpec(endpoint_url=cfg.endpoint_url, region=cfg.region)
    spec = spec.model_copy(update={"storage": block})
    configure(cfg)
    if is_store(uris[2]):
        preflight(uris[2], "ledger")
    return spec
