"""Finding 4(b): a provider that quotes the API key in its errors. The client masks it
where the message is made, so a job stopped by max_error_rate (or by the breaker) shows
it nowhere: not on screen, not in the rows' error_message, not in summary.json, not in
the workers' logs, not in any file of the output folder."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from batchrun.sim import MockConfig, start_subprocess
from tests.conftest import make_prompts, write_spec

pytestmark = pytest.mark.timeout(240)

ENV = "BATCHRUN_TEST_ECHOED_KEY"


def _run(spec: Path, key: str) -> subprocess.CompletedProcess[str]:
    address = ray.get_runtime_context().gcs_address
    return subprocess.run([sys.executable, "-m", "batchrun", "run", str(spec), "--address",
                           address, "--no-progress"], capture_output=True, text=True,
                          timeout=200, env={**os.environ, ENV: key, "COLUMNS": "200"})


def _strings(table: pa.Table) -> list[str]:
    return [str(v) for col in table.columns if pa.types.is_string(col.type)
            for v in col.to_pylist() if v is not None]


def _files_holding(folder: Path, key: str) -> list[str]:
    """Files under ``folder`` whose bytes (or, for Parquet, whose decoded strings, since
    pages may be compressed) contain ``key``."""
    hits = []
    for f in folder.rglob("*"):
        if not f.is_file():
            continue
        try:
            raw = f.read_bytes()
        except OSError:
            continue
        text = " ".join(_strings(pq.read_table(f))) if f.suffix == ".parquet" else ""
        if key.encode() in raw or key in text:
            hits.append(str(f))
    return hits


def _logs_dir() -> Path:
    return Path(ray._private.worker._global_node.get_logs_dir_path())


@pytest.mark.parametrize("case", ["error-rate", "breaker"])
def test_a_key_echoed_by_the_provider_is_shown_nowhere(ray_session: None, tmp_path: Path,
                                                       case: str) -> None:
    key = "sk-proj-" + secrets.token_urlsafe(24)  # unique: any hit comes from this run
    server_key = key if case == "error-rate" else "sk-the-right-one-" + secrets.token_hex(8)
    n = 1200 if case == "error-rate" else 300
    make_prompts(tmp_path / "in.parquet", n)
    # error-rate: 70% of rows answered 400 "Request rejected for key <key>" (fatal, one
    # row's fault) until max_error_rate stops the job; breaker: every request 401
    # "Incorrect API key provided: <key>" until the breaker trips
    cfg = MockConfig(api_key=server_key, echo_key_in_errors=0.7, seed=1, latency_ms=20)
    with start_subprocess(cfg) as server:
        spec = write_spec(tmp_path, endpoint={"base_url": server.base_url, "api_key_env": ENV},
                          retry={"max_attempts": 1, "max_error_rate": 0.5}, flush_rows=50,
                          limits={"rpm": 100_000, "max_concurrency": 16})
        done = _run(spec, key)
    out = tmp_path / "out"
    assert done.returncode == 7, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    assert key not in done.stdout + done.stderr and key[:12] not in done.stdout + done.stderr
    assert "<api key>" in done.stderr, done.stderr  # the provider's text is shown, masked
    if case == "error-rate":
        assert "max_error_rate 50%" in done.stderr and "HTTP 400" in done.stderr, done.stderr
        rows = pa.concat_tables([pq.read_table(f) for f in out.rglob("*.parquet")])
        errors = [m for m in rows["error_message"].to_pylist() if m]
        assert errors and all("<api key>" in m for m in errors), errors[:3]
    else:
        assert "HTTP 401" in done.stderr, done.stderr
    assert _files_holding(out, key) == []  # results, parts, summary.json, job.json, ...
    assert _files_holding(_logs_dir(), key) == []
