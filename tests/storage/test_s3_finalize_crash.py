"""``kill -9`` of the driver mid-commit of a shard's final file on S3 (before the
conditional write, after it, and while deleting the merged parts), then a resume: every
row counts once, the spend is not counted twice, and the next merge completes the shard."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from batchrun.io import stores
from batchrun.io.writer import ResultsStore, merged_parts
from tests.io.test_finalize_crash import SCHEMA, SHARD, _checkpointed, _rows
from tests.storage.conftest import S3_URL, keys

pytestmark = pytest.mark.timeout(120)

_FINALIZE = """
import os, signal, sys
from batchrun.io import conditional, writer
out, when = sys.argv[1], sys.argv[2]
calls = {"delete": 0}
real_commit, real_delete = writer.ResultsStore._commit_final, conditional.S3Conditional.delete
def die():
    os.kill(os.getpid(), signal.SIGKILL)
def commit(self, shard, table):
    if when == "before-commit":
        die()
    real_commit(self, shard, table)
def delete(self, path):
    if when == "after-commit" or (when == "mid-delete" and calls["delete"] == 2):
        die()
    real_delete(self, path)
    calls["delete"] += 1
writer.ResultsStore._commit_final = commit
conditional.S3Conditional.delete = delete
writer.ResultsStore(out, writer.result_schema()).finalize("shard-000003")
"""


@pytest.mark.parametrize(("when", "parts_left"), [("before-commit", 6), ("after-commit", 6),
                                                  ("mid-delete", 4)])
def test_kill_9_mid_commit_on_s3_then_resume(bucket: str, when: str, parts_left: int) -> None:
    stores.configure(None)
    out = f"s3://{bucket}/out"
    store = _checkpointed(out)  # type: ignore[arg-type]
    p = subprocess.run([sys.executable, "-c", _FINALIZE, out, when], capture_output=True,
                       timeout=60)
    assert p.returncode == -9, (p.returncode, p.stderr.decode()[-2000:])
    parts = [k for k in keys(bucket, f"out/parts/{SHARD}/") if "/part-" in k]
    assert len(parts) == parts_left
    final = f"out/results/{SHARD}.parquet"
    assert (final in keys(bucket, "out/results/")) == (when != "before-commit")
    fs = pafs.S3FileSystem(endpoint_override=S3_URL, region="us-east-1")
    if when != "before-commit":
        held = merged_parts(pq.read_metadata(f"{bucket}/{final}", filesystem=fs).metadata)
        assert {k.rsplit("/", 1)[1] for k in parts} <= held and len(held) == 6
    resumed = ResultsStore(out, SCHEMA)
    assert resumed.rows_on_disk() == 20  # each row once, whatever the crash left
    resumed.write_part(SHARD, _rows(20, 2))  # the resumed run's own new work
    assert resumed.finalize(SHARD) == 22
    assert resumed.final_rows(SHARD) == 22
    t = pq.read_table(f"{bucket}/{final}", filesystem=fs)
    assert sorted(t["id"].to_pylist()) == [f"r{i:03d}" for i in range(22)]
    assert not [k for k in keys(bucket, "out/parts/") if "/part-" in k]
    assert resumed.spent_usd() == pytest.approx(21 * 0.01 + 0.03)
    del store
