"""D5: one pid-liveness check (lifeline's: the pid AND its start time), used by the
cluster record that ``status``/``stop`` read, so a reused pid never reads as the driver."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from batchrun.online.lifeline import process_alive, start_time
from batchrun.online.ray_cluster import RECORD, NoClusterError, record_cluster, recorded_cluster

pytestmark = pytest.mark.timeout(120)


def test_process_alive_needs_the_same_start_time() -> None:
    me = os.getpid()
    assert process_alive(me, start_time())
    assert not process_alive(me, start_time() - 5.0)  # same pid, another process
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    assert not process_alive(int(done.stdout), 0.0)  # ended


def _record(out: Path, **fields: object) -> None:
    data = {"address": ray.get_runtime_context().gcs_address, "pid": os.getpid(),
            "pid_started": start_time(), "host": socket.gethostname(),
            "started_by_driver": True, **fields}
    (out / RECORD).write_text(json.dumps(data))


def test_a_reused_pid_does_not_make_an_ended_run_look_alive(ray_session: None,
                                                            tmp_path: Path) -> None:
    # the record's pid runs (this very process), on a live local Ray, but it is not the
    # process that wrote the record: it started at another time, so the run has ended
    _record(tmp_path, pid_started=start_time() - 100.0)
    with pytest.raises(NoClusterError, match="has ended"):
        recorded_cluster(tmp_path)


def test_the_record_written_by_a_live_driver_is_found(ray_session: None,
                                                      tmp_path: Path) -> None:
    record_cluster(tmp_path, started=True)
    assert recorded_cluster(tmp_path) == ray.get_runtime_context().gcs_address
    assert [p.name for p in tmp_path.iterdir()] == [RECORD]  # committed, no temp left


def test_a_record_without_a_start_time_reads_as_no_record(ray_session: None,
                                                          tmp_path: Path) -> None:
    _record(tmp_path)
    data = json.loads((tmp_path / RECORD).read_text())
    del data["pid_started"]  # written by an older version: status then finds the cluster
    (tmp_path / RECORD).write_text(json.dumps(data))
    assert recorded_cluster(tmp_path) is None
