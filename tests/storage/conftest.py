"""A real S3 protocol server on loopback (moto's ThreadedMotoServer) for the store tests.

The endpoint and fake keys go into the environment when this file is imported, before
the session's Ray starts, so Ray's workers inherit them as a cloud node would have its
own; the server itself starts once per session on a free port.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# one port however often this file is imported (by pytest, and by the tests' helpers)
S3_PORT = int(os.environ.get("BATCHRUN_TEST_S3_PORT") or free_port())
os.environ["BATCHRUN_TEST_S3_PORT"] = str(S3_PORT)
S3_URL = f"http://127.0.0.1:{S3_PORT}"
os.environ.update(AWS_ENDPOINT_URL=S3_URL, AWS_ACCESS_KEY_ID="testing",
                  AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1",
                  AWS_EC2_METADATA_DISABLED="true")


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    if _listening(S3_PORT):  # another module's copy of this fixture started it (tests/engine)
        yield S3_URL
        return
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    server.start()
    try:
        yield S3_URL
    finally:
        server.stop()


def s3_client(endpoint: str = S3_URL) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


@pytest.fixture
def bucket(s3_server: str) -> str:
    """A new, empty bucket for one test."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=name)
    return name


def upload(local: Path, bucket: str, key: str) -> str:
    s3_client().upload_file(str(local), bucket, key)
    return f"s3://{bucket}/{key}"


def keys(bucket: str, prefix: str = "") -> list[str]:
    """The objects under ``prefix``, without the empty folder markers pyarrow writes."""
    out: list[str] = []
    for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                       Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
    return sorted(out)
