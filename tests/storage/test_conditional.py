"""The conditional-write seam (S3 on moto, and the local disk), the commit of a shard's
final file by one conditional write, and the output's lease."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from batchrun.errors import OutputError, UserError
from batchrun.io import stores
from batchrun.io.conditional import ConditionalStore, LocalConditional, conditional_for
from batchrun.io.lease import Lease
from batchrun.io.writer import ResultsStore, result_schema
from tests.storage.conftest import keys, s3_client

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["local", "s3"])
def seam(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[ConditionalStore, str]:
    if request.param == "local":
        return LocalConditional(), str(tmp_path / "x")
    bucket = request.getfixturevalue("bucket")
    stores.configure(None)
    cond, path = conditional_for(f"s3://{bucket}/x")
    return cond, path


def test_put_if_absent_and_if_version(seam: tuple[ConditionalStore, str]) -> None:
    cond, base = seam
    path = f"{base}/obj.json"
    assert cond.read_with_version(path) is None
    assert cond.put_if_absent(path, b"one")
    assert not cond.put_if_absent(path, b"two")  # another writer was first
    data, v1 = cond.read_with_version(path) or (b"", "")
    assert data == b"one"
    assert cond.put_if_version(path, b"three", v1)
    assert not cond.put_if_version(path, b"four", v1)  # stale version: refused
    assert cond.read_with_version(path)[0] == b"three"  # type: ignore[index]
    # a retried put that meets its own earlier success is still a success
    assert cond.put_if_absent(f"{base}/same", b"x") and cond.put_if_absent(f"{base}/same", b"x") \
        is (not isinstance(cond, LocalConditional))


def _rows(ids: list[str]) -> pa.Table:
    return pa.Table.from_pylist([{"id": i, "status": "ok", "cost_usd": 0.0, "model": "m",
                                  "attempts": 1, "latency_ms": 1.0} for i in ids],
                                schema=result_schema())


def test_two_drivers_cannot_both_commit_a_shard(bucket: str) -> None:
    stores.configure(None)
    out = f"s3://{bucket}/out/"
    a, b = ResultsStore(out, result_schema()), ResultsStore(out, result_schema())
    a.write_part("shard-000000", _rows(["1", "2"]))
    b.read_shard("shard-000000")  # b saw no final yet
    assert a.finalize("shard-000000") == 2
    b.write_part("shard-000000", _rows(["3"]))
    with pytest.raises(OutputError, match="committed by another run"):
        b._commit_final("shard-000000", _rows(["9"]))  # its view is stale: refused
    assert keys(bucket, "out/results/") == ["out/results/shard-000000.parquet"]
    assert a.read_shard("shard-000000")["id"].to_pylist() == ["1", "2", "3"]  # type: ignore[index]
    assert a.finalize("shard-000000") == 3  # a fresh view commits over its version


def test_the_lease_refuses_a_second_driver_and_passes_on(bucket: str) -> None:
    stores.configure(None)
    out = f"s3://{bucket}/job"
    first = Lease(out, ttl_s=30)
    first.take()
    with pytest.raises(UserError, match="another driver of this job holds it"):
        Lease(out, ttl_s=30).take()
    first.release()
    assert keys(bucket, "job/") == []
    # a lease whose driver (on this host) is gone is taken over at once
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    Lease(out, ttl_s=30).take()
    doc = json.loads(s3_client().get_object(Bucket=bucket, Key="job/lease.json")["Body"].read())
    doc["pid"] = int(dead)
    s3_client().put_object(Bucket=bucket, Key="job/lease.json", Body=json.dumps(doc).encode())
    Lease(out, ttl_s=30).take()
    # another host's lease only when it expired
    doc["host"], doc["expires"] = "elsewhere", time.time() + 30
    s3_client().put_object(Bucket=bucket, Key="job/lease.json", Body=json.dumps(doc).encode())
    with pytest.raises(UserError, match="on elsewhere"):
        Lease(out, ttl_s=30).take()
    doc["expires"] = time.time() - 1
    s3_client().put_object(Bucket=bucket, Key="job/lease.json", Body=json.dumps(doc).encode())
    renewed = Lease(out, ttl_s=0.3)
    renewed.take()
    renewed.start()
    time.sleep(0.5)  # renewed at least once, by a conditional replace
    assert renewed.lost is None
    assert json.loads(s3_client().get_object(Bucket=bucket, Key="job/lease.json")["Body"]
                      .read())["run"] == renewed.run
    renewed.release()


def test_a_lease_taken_over_stops_every_later_write(bucket: str) -> None:
    out = f"s3://{bucket}/job2"
    lease = Lease(out, ttl_s=0.6)  # renewed every 0.2 s
    lease.take()
    lease.start()
    try:
        lease.check()  # held: writes go on
        # another driver overwrites it (as after this one's store outage past the TTL)
        s3_client().put_object(Bucket=bucket, Key="job2/lease.json", Body=b'{"run": "other"}')
        deadline = time.monotonic() + 10
        while lease.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(OutputError, match="another driver took over"):
            lease.check()
        store = ResultsStore(out, result_schema())
        store.guard = lease.check  # as runner.py wires it
        with pytest.raises(OutputError, match="another driver took over"):
            store.write_part("shard-000000", result_schema().empty_table())
    finally:
        lease.release()
