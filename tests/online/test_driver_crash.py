"""``kill -9`` of a driver that started its own local Ray, then a rerun: the provider's
ledger counts the answers paid twice, which must stay within what the README promises.

The driver runs as ``batchrun run`` in its own process group with its own ``RAY_TMPDIR``,
as a user's terminal would run it; its whole group is killed (the driver, GCS, raylet),
while the workers, which Ray puts in process groups of their own, live on until they
notice. Cleanup ends only the processes that carry that ``RAY_TMPDIR`` (never ``ray stop``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from batchrun.sim import MockConfig, start_subprocess
from tests.conftest import make_prompts, write_spec

pytestmark = pytest.mark.timeout(180)

N = 4000
CONCURRENCY = 16
FLUSH_ROWS = 20
SHARD_ROWS = 500  # 8 shards: all 4 lanes of the 2 workers run one when the driver dies


def _checkpointed(out: Path) -> int:
    n = 0
    for f in [*(out / "parts").glob("*/part-*.parquet"), *(out / "results").glob("*.parquet")]:
        with contextlib.suppress(OSError):  # renamed away while we looked
            n += pq.read_metadata(f).num_rows
    return n


def _ours(folder: str) -> list[psutil.Process]:
    """Processes of the Ray that ``folder`` holds: by command line, or by environment (a
    worker's title replaces its command line, but it inherits the driver's RAY_TMPDIR)."""
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if folder in " ".join(p.cmdline()) or p.environ().get("RAY_TMPDIR") == folder:
                found.append(p)
    return found


@contextlib.contextmanager
def own_ray_tmpdir() -> Iterator[str]:
    # short: Ray's socket paths under it must fit in 107 bytes
    folder = tempfile.mkdtemp(prefix="brk-", dir="/tmp")
    try:
        yield folder
    finally:
        for p in _ours(folder):
            with contextlib.suppress(psutil.Error):
                p.kill()
        shutil.rmtree(folder, ignore_errors=True)


def _wait(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _settled(server, quiet_s: float = 3.0, limit_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """Wait until the provider has seen no request for ``quiet_s``."""
    last, since, t0 = server.stats()["total_requests"], time.monotonic(), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() - t0 < limit_s:
        time.sleep(0.1)
        now = server.stats()["total_requests"]
        if now != last:
            last, since = now, time.monotonic()


def test_kill_9_of_driver_group_resends_at_most_the_promised_rows(tmp_path: Path) -> None:
    make_prompts(tmp_path / "in.parquet", N, row_group=SHARD_ROWS)
    out = tmp_path / "out"
    with own_ray_tmpdir() as raytmp, start_subprocess(MockConfig(latency_ms=20)) as server:
        spec = write_spec(tmp_path, endpoint={"base_url": server.base_url},
                          flush_rows=FLUSH_ROWS, shard_rows=SHARD_ROWS,
                          limits={"rpm": 1_000_000, "max_concurrency": CONCURRENCY})
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = raytmp
        cmd = [sys.executable, "-m", "batchrun", "run", str(spec), "--no-progress",
               "--no-dashboard"]
        proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(lambda: _checkpointed(out) >= 800 or proc.poll() is not None, 120, "checkpoints")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        _settled(server)
        paid = server.stats()["ok"]
        assert paid < N, "the job finished before the kill: the test proves nothing"
        for p in _ours(raytmp):  # anything left of the killed run
            with contextlib.suppress(psutil.Error):
                p.kill()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
        assert done.returncode == 0, done.stderr[-2000:]
        stats = server.stats()
    ids = pq.read_table(sorted((out / "results").glob("shard-*.parquet")))["id"].to_pylist()
    assert sorted(ids) == [f"r{i:06d}" for i in range(N)]
    assert stats["distinct_ok_prompts"] == N
    # the rows a worker may hold unwritten (feed.py): its share of the concurrency, in
    # flight, and two tables of flush_rows not yet acknowledged as written
    bound = CONCURRENCY + 2 * (2 * FLUSH_ROWS)
    assert stats["duplicate_ok_prompts"] <= bound, (
        f"{stats['duplicate_ok_prompts']} answers paid twice; the promise is at most {bound} "
        f"({paid} answered before the workers stopped)")


# --- a driver on another node: no lifeline, only the written acknowledgements stop them ---

CLUSTER = r"""
import sys
from ray.cluster_utils import Cluster

# the head has no CPU for workers: both go to the second node, away from their driver
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0,
                                                        "include_dashboard": False})
try:
    cluster.add_node(num_cpus=2, resources={"node2": 2})
    cluster.wait_for_nodes()
    gcs = cluster.head_node.all_processes["gcs_server"][0].process.pid
    print(f"ADDRESS {cluster.address} {gcs}", flush=True)
    sys.stdin.read()  # until the test closes it (or dies)
finally:
    cluster.shutdown()
"""

REMOTE_WORKERS = 2
REMOTE_CONCURRENCY = 16  # 8 per worker


@contextlib.contextmanager
def two_node_cluster() -> Iterator[tuple[str, int]]:
    """A head and a second node, in a process of their own (this test session may hold its
    own local Ray); yields its address and the pid of its GCS. Ended by the Cluster's
    own shutdown, never `ray stop`."""
    host = subprocess.Popen([sys.executable, "-c", CLUSTER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert host.stdout is not None
        line = host.stdout.readline()
        assert line.startswith("ADDRESS "), f"the cluster did not start: {line!r}"
        yield line.split()[1], int(line.split()[2])
    finally:
        assert host.stdin is not None
        host.stdin.close()
        try:
            host.wait(timeout=60)
        except subprocess.TimeoutExpired:
            host.kill()


def test_workers_on_another_node_stop_when_their_driver_is_killed(tmp_path: Path) -> None:
    """The driver (on the head) is killed with -9 while its workers run on the second node,
    where no lifeline can see it. The GCS is frozen first, as an overloaded or unreachable
    one would be: Ray cannot end the actors the dead driver owned (a healthy GCS ends them
    within milliseconds here, and the test would prove nothing), while each worker's
    stream learns that its owner is gone, which is what used to reopen its sending. The
    provider's ledger counts the requests that arrived after the kill: at most, per
    worker, its share of max_concurrency and two tables of flush_rows (feed.py's room:
    rows taken and not yet acknowledged as written). Measured here: 44 with the
    acknowledgement, 1,549 without it (bound 96)."""
    make_prompts(tmp_path / "in.parquet", N, row_group=SHARD_ROWS)
    out = tmp_path / "out"
    with two_node_cluster() as (address, gcs), \
            start_subprocess(MockConfig(latency_ms=20)) as server:
        spec = write_spec(tmp_path, endpoint={"base_url": server.base_url},
                          flush_rows=FLUSH_ROWS, shard_rows=SHARD_ROWS, workers=REMOTE_WORKERS,
                          limits={"rpm": 1_000_000, "max_concurrency": REMOTE_CONCURRENCY})
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        proc = subprocess.Popen([sys.executable, "-m", "batchrun", "run", str(spec),
                                 "--address", address, "--no-progress"], env=env,
                                start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        _wait(lambda: _checkpointed(out) >= 400 or proc.poll() is not None, 150, "checkpoints")
        os.kill(gcs, signal.SIGSTOP)
        try:
            os.kill(proc.pid, signal.SIGKILL)
            at_kill = server.stats()["total_requests"]
            proc.wait(timeout=10)
            _settled(server)
            stats = server.stats()
        finally:
            os.kill(gcs, signal.SIGCONT)  # for the Cluster's own shutdown
    after = stats["total_requests"] - at_kill
    assert stats["ok"] < N, "the job finished before the kill: the test proves nothing"
    bound = REMOTE_CONCURRENCY + REMOTE_WORKERS * 2 * FLUSH_ROWS
    assert after <= bound, f"{after} requests arrived after the driver was killed (bound {bound})"
