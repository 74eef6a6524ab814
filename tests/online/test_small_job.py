"""A job with fewer rows than ``workers x shard_rows`` still uses every worker, and every
run of an output finds the shards its first run planned."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from batchrun.io.shards import PLAN_FILE, plan_shards, record_plan
from batchrun.online.dispatch import split_concurrency
from batchrun.runner import RunOptions, run_job
from batchrun.sim import MockConfig, start_subprocess
from batchrun.spec import load_spec
from tests.conftest import make_prompts, write_spec


def _spec(tmp_path: Path, **over: Any):  # type: ignore[no-untyped-def]
    return load_spec(str(write_spec(tmp_path, **over)))


def _sizes(spec) -> list[int]:  # type: ignore[no-untyped-def]
    return [s.num_rows for s in plan_shards(spec)]


def test_few_rows_give_every_worker_shards(tmp_path: Path) -> None:
    make_prompts(tmp_path / "in.parquet", 8000, row_group=1000)
    assert _sizes(_spec(tmp_path, shard_rows=None)) == [2000] * 4  # 2 workers x 2 shards
    assert _sizes(_spec(tmp_path, shard_rows=None, workers=3)) == [1000] * 8  # whole groups
    assert _sizes(_spec(tmp_path, shard_rows=1000)) == [1000] * 8  # shard_rows still caps


def test_recorded_plan_survives_a_change_of_workers(tmp_path: Path) -> None:
    make_prompts(tmp_path / "in.parquet", 1000, row_group=25)
    spec = _spec(tmp_path, shard_rows=None)
    record_plan(spec, [spec.input])
    assert json.loads((Path(spec.output) / PLAN_FILE).read_text()) == {"shard_rows": 250}
    # a resume with more workers (or another shard_rows) must find the same shards
    assert _sizes(_spec(tmp_path, shard_rows=None, workers=4)) == [250] * 4
    assert _sizes(_spec(tmp_path, shard_rows=100, workers=4)) == [250] * 4
    (Path(spec.output) / PLAN_FILE).unlink()
    assert _sizes(_spec(tmp_path, shard_rows=None, workers=4)) == [125] * 8


def test_output_of_an_earlier_version_keeps_its_shards(tmp_path: Path) -> None:
    """Written before plan.json existed, so planned by shard_rows alone: keep that."""
    make_prompts(tmp_path / "in.parquet", 1000, row_group=50)
    spec = _spec(tmp_path, shard_rows=None)
    results = Path(spec.output) / "results"
    results.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["r000000"]}), results / "shard-000000.parquet")
    assert _sizes(spec) == [1000]
    record_plan(spec, [spec.input])
    assert json.loads((Path(spec.output) / PLAN_FILE).read_text()) == {"shard_rows": 10_000}


def test_concurrency_split_is_the_whole_and_never_more() -> None:
    assert split_concurrency(200, 2) == [100, 100]
    assert split_concurrency(200, 3) == [67, 67, 66]
    assert split_concurrency(1, 2) == [1]  # one worker: two would send 2 at once


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(180)
def test_small_job_keeps_both_workers_busy(tmp_path: Path) -> None:
    n = 600  # fewer than shard_rows (10,000): one shard, one worker, before
    make_prompts(tmp_path / "in.parquet", n, row_group=50)
    with start_subprocess(MockConfig(latency_ms=100)) as server:
        spec = write_spec(tmp_path, name="t-small", endpoint={"base_url": server.base_url},
                          shard_rows=None, limits={"rpm": 1_000_000, "max_concurrency": 8})
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["summary"] = run_job(str(spec), RunOptions(progress=False))
            except BaseException as e:
                box["error"] = e

        th = threading.Thread(target=target, daemon=True)
        th.start()
        done = {0: 0.0, 1: 0.0}  # rows each worker answered, as it reports them live
        while th.is_alive() and min(done.values()) == 0:
            for i in done:
                try:
                    w = ray.get_actor(f"batchrun:t-small:worker-{i}", namespace="batchrun")
                    done[i] = max(done[i], ray.get(w.progress.remote(), timeout=10)["done"])
                except (ValueError, ray.exceptions.RayError):
                    pass  # not started yet, or already removed
            time.sleep(0.1)
        th.join(timeout=150)
        stats = server.stats()
    assert "error" not in box, box.get("error")
    assert box["summary"].ok == n and stats["distinct_ok_prompts"] == n
    assert min(done.values()) > 0, f"rows answered per worker: {done}"
    assert len(list((tmp_path / "out" / "results").glob("shard-*.parquet"))) == 4
