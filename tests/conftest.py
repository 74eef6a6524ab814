"""Shared fixtures: one real local Ray per test session, job specs written to tmp folders."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import yaml

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A real local Ray, started once (ray.init costs seconds), metrics reported each second."""
    if not ray.is_initialized():
        # address="local": a Ray of the tests' own, never a `ray start` cluster on the machine
        ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="batchrun",
                 _system_config={"metrics_report_interval_ms": 1000},
                 log_to_driver=False)
    yield
    ray.shutdown()


# Helpers' test files were written against this name; keep it pointing at the same Ray.
ray_local = ray_session


def make_prompts(path: Path, n: int, *, row_group: int = 100, start: int = 0,
                 extra: dict[str, list[Any]] | None = None) -> Path:
    """A prompts file with columns id, prompt, topic; row groups of ``row_group`` rows."""
    cols: dict[str, list[Any]] = {
        "id": [f"r{i:06d}" for i in range(start, start + n)],
        "prompt": [f"Say something short about item {i}." for i in range(start, start + n)],
        "topic": [f"t{i % 7}" for i in range(start, start + n)],
    }
    cols.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path, row_group_size=row_group)
    return path


def write_spec(folder: Path, **overrides: Any) -> Path:
    """A valid job spec YAML in ``folder``, with top-level keys replaced by ``overrides``."""
    spec: dict[str, Any] = {
        "name": "t-job",
        "input": str(folder / "in.parquet"),
        "prompt_column": "prompt",
        "id_column": "id",
        "carry_columns": ["topic"],
        "model": "gpt-4.1-mini",
        "generation": {"max_tokens": 32},
        "limits": {"rpm": 100_000, "max_concurrency": 32},
        "retry": {"max_attempts": 6, "backoff_base_s": 0.05, "backoff_cap_s": 0.5},
        "workers": 2,
        "shard_rows": 200,
        "output": str(folder / "out"),
    }
    for k, v in overrides.items():
        if v is None:
            spec.pop(k, None)
        else:
            spec[k] = v
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def batch_spec(folder: Path, api: str, base_url: str, key_env: str, model: str,
               n: int = 90, **batch: Any) -> Any:
    """A batch-mode job of ``n`` prompts on ``api``: 30 requests a file, shards of 40."""
    from batchrun.spec import load_spec

    make_prompts(folder / "in.parquet", n, row_group=50)
    settings = {"max_requests_per_file": 30, "poll_interval_s": 0.2, **batch}
    return load_spec(write_spec(folder, mode="batch", batch=settings, shard_rows=40,
                                model=model, system_prompt="Be brief.",
                                endpoint={"api": api, "base_url": base_url,
                                          "api_key_env": key_env}))


def result_rows(spec: Any) -> list[dict[str, Any]]:
    """Every row of the job's final results files (none yet: empty)."""
    files = sorted((Path(spec.output) / "results").glob("shard-*.parquet"))
    return pq.read_table(files).to_pylist() if files else []


class _Stub(BaseHTTPRequestHandler):
    """Answers every GET and POST with one status and an OpenAI-shaped error body."""

    status = 404
    message: Callable[[str], str] = staticmethod(lambda auth: "Not Found")  # type: ignore[assignment]
    calls: list[str]

    def _answer(self) -> None:
        self.calls.append(self.command)
        auth = self.headers.get("Authorization", "")
        body = json.dumps({"error": {"message": self.message(auth)}}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def error_server(status: int, message: Callable[[str], str] = lambda auth: "Not Found"
                 ) -> Iterator[tuple[str, list[str]]]:
    """A loopback provider that refuses every call with ``status`` (``message(auth)`` as
    its error text); yields its base URL and the methods of the calls it received."""
    calls: list[str] = []
    handler = type("Stub", (_Stub,), {"status": status, "message": staticmethod(message),
                                      "calls": calls})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/v1", calls
    finally:
        srv.shutdown()
