"""A job whose input and output are on a real S3 protocol server (moto, loopback)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from batchrun.runner import RunOptions, run_job
from tests.conftest import make_prompts, write_spec
from tests.storage.conftest import keys, upload

pytestmark = pytest.mark.timeout(180)


def _s3() -> pafs.S3FileSystem:
    import os

    return pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"],
                             region="us-east-1")


def test_a_job_reads_and_writes_s3_end_to_end(tmp_path: Path, ray_session: None,
                                             bucket: str) -> None:
    for i in range(2):  # a prefix holding two files and something that is not Parquet
        upload(make_prompts(tmp_path / f"in{i}.parquet", 300, start=300 * i, row_group=50),
               bucket, f"in/dt=2026-11-27/part-{i}.parquet")
    (tmp_path / "README").write_text("not data")
    upload(tmp_path / "README", bucket, "in/dt=2026-11-27/README")
    spec = write_spec(tmp_path, input=f"s3://{bucket}/in/dt={{ds}}/",
                      output=f"s3://{bucket}/out/{{ds}}/", simulate={"latency_ms": 0},
                      shard_rows=100,
                      budget={"daily_usd": 50, "ledger_dir": f"s3://{bucket}/ledger/"})
    summary = run_job(str(spec), RunOptions(ds="2026-11-27", progress=False))
    assert summary.ok == 600
    out = keys(bucket, "out/2026-11-27/")
    finals = [k for k in out if k.startswith("out/2026-11-27/results/shard-")]
    assert len(finals) == 6
    assert not [k for k in out if "/parts/" in k or "lease" in k]  # merged, released
    assert {"out/2026-11-27/job.json", "out/2026-11-27/plan.json",
            "out/2026-11-27/summary.json"} <= set(out)
    table = pq.read_table([f"{bucket}/{k}" for k in finals], filesystem=_s3())
    assert sorted(table["id"].to_pylist()) == [f"r{i:06d}" for i in range(600)]
    saved = json.loads(_s3().open_input_stream(
        f"{bucket}/out/2026-11-27/summary.json").read())
    assert saved["ok"] == 600
    day = keys(bucket, "ledger/")
    assert len(day) == 1  # the daily ledger is an object in the store, its spend recorded
    doc = json.loads(_s3().open_input_stream(f"{bucket}/{day[0]}").read())
    (job,) = doc["jobs"].values()
    assert job["spent_nusd"] > 0 and job["reserved_nusd"] == 0
    # a rerun finds every row answered and sends nothing
    again = run_job(str(spec), RunOptions(ds="2026-11-27", progress=False))
    assert again.ok == 600 and again.rows_this_run == 0


def test_submit_uploads_nothing_for_an_input_in_a_store(tmp_path: Path) -> None:
    from batchrun.ops.submit import _copy_input
    from batchrun.spec import load_spec

    spec = load_spec(write_spec(tmp_path, input="s3://acme-prompts/nightly/",
                                output="s3://acme-results/out/"))
    assert spec.input == "s3://acme-prompts/nightly/"  # not made a local path
    new, note = _copy_input(spec, tmp_path / "pkg")
    assert new is None and "nothing uploaded" in note
    assert not (tmp_path / "pkg").exists()
