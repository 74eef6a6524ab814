"""Bad store URIs: one line naming the URI and the fix, exit 2 (3: an unwritable output),
before any request reaches the provider."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import error_server, make_prompts, write_spec
from tests.storage.conftest import S3_URL, upload
from tests.storage.faultproxy import fault_proxy

pytestmark = pytest.mark.timeout(120)


def _run(spec: Path, **env: str | None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for k, v in env.items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    return subprocess.run([sys.executable, "-m", "batchrun", "run", str(spec), "--no-progress"],
                          env=full, capture_output=True, text=True, timeout=90)


def _one_line(done: subprocess.CompletedProcess[str], code: int, *parts: str) -> str:
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert done.returncode == code, done.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    for p in parts:
        assert p in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def provider() -> object:
    with error_server(500) as (url, calls):
        yield url, calls


def test_no_credentials(tmp_path: Path, bucket: str, provider: tuple[str, list[str]]) -> None:
    url, calls = provider
    src = upload(make_prompts(tmp_path / "in.parquet", 10), bucket, "in/a.parquet")
    spec = write_spec(tmp_path, input=src, output=f"s3://{bucket}/out/",
                      endpoint={"base_url": url, "api_key_env": None})
    done = _run(spec, AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None, AWS_PROFILE=None,
                AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
                AWS_CONFIG_FILE=str(tmp_path / "none"))
    _one_line(done, 2, src, "no AWS credentials", "AWS_ACCESS_KEY_ID")
    assert calls == []


def test_missing_bucket_and_empty_prefix(tmp_path: Path, bucket: str,
                                         provider: tuple[str, list[str]]) -> None:
    url, calls = provider
    ep = {"base_url": url, "api_key_env": None}
    spec = write_spec(tmp_path, input="s3://no-such-bucket-x/in/", output=f"s3://{bucket}/o/",
                      endpoint=ep)
    _one_line(_run(spec), 2, "s3://no-such-bucket-x/in/", "does not exist", "create it")
    upload(tmp_path / "job.yaml", bucket, "in/notes.yaml")  # a prefix with no Parquet
    spec = write_spec(tmp_path, input=f"s3://{bucket}/in/", output=f"s3://{bucket}/o/",
                      endpoint=ep)
    _one_line(_run(spec), 2, f"s3://{bucket}/in/", "no Parquet objects")
    src = upload(make_prompts(tmp_path / "in.parquet", 10), bucket, "in/a.parquet")
    spec = write_spec(tmp_path, input=src, output="s3://no-such-bucket-y/out/", endpoint=ep)
    _one_line(_run(spec), 2, "s3://no-such-bucket-y/out/", "does not exist")
    assert calls == []


def test_output_the_credentials_cannot_write(tmp_path: Path, bucket: str, s3_server: str,
                                             provider: tuple[str, list[str]]) -> None:
    url, calls = provider
    src = upload(make_prompts(tmp_path / "in.parquet", 10), bucket, "in/a.parquet")
    with fault_proxy(S3_URL) as proxy:
        proxy.plan = lambda method, path, n: "deny" if method in ("PUT", "POST") else None
        spec = write_spec(tmp_path, input=src, output=f"s3://{bucket}/out/",
                          endpoint={"base_url": url, "api_key_env": None},
                          storage={"endpoint_url": proxy.url})
        line = _one_line(_run(spec), 3, f"cannot write s3://{bucket}/out/", "Access Denied",
                         "write access")
        assert proxy.injected["deny"] >= 1
    assert "testing" not in line  # no key in the message
    assert calls == []
