"""Shared fixtures: one real local Ray per test session, job specs written to tmp folders."""

from __future__ import annotations

import os
from collections.abc import Iterator
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
