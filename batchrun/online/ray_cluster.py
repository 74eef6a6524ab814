"""Which Ray cluster a job runs on, so that ``status`` and ``stop`` join that one.

A local Ray started by ``ray.init()`` (``batchrun run`` without ``--address``) records its
address nowhere: Ray 2.60 writes ``/tmp/ray/ray_current_cluster`` only for ``ray start``,
and ``ray.init(address="auto")`` then joins *any* GCS found by scanning the process list
(``next(iter(frozenset))``, whose order changes from process to process with the string
hash seed). With two Rays on a machine, ``status`` could find a job's actors and ``stop``
then miss them. So the job's driver writes the address of its cluster into the job's
output folder, and ``status``/``stop`` of a spec read it back from there.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

from batchrun.errors import ClusterError, OutputError
from batchrun.io.storage import commit_bytes, join, read_bytes
from batchrun.online.lifeline import process_alive, start_time

__all__ = ["RECORD", "NoClusterError", "local_cluster", "record_cluster", "recorded_cluster"]

RECORD = ".ray-cluster.json"


class NoClusterError(ClusterError):
    """No Ray cluster runs on this machine (status and stop never start one)."""


def _live_local_addresses() -> list[str]:
    from ray._private import services

    services.find_gcs_addresses.cache_clear()  # type: ignore[attr-defined]  # a fresh scan
    return sorted(services.find_gcs_addresses())


def record_cluster(output: str | Path, *, started: bool) -> None:
    """Write where this process's Ray cluster is (call once connected; best effort)."""
    import ray

    data = {"address": ray.get_runtime_context().gcs_address, "pid": os.getpid(),
            "pid_started": start_time(), "host": socket.gethostname(),
            "started_by_driver": started}
    with contextlib.suppress(OutputError):  # status then finds the cluster itself
        commit_bytes(join(os.fspath(output), RECORD), json.dumps(data).encode())


def recorded_cluster(output: str | Path) -> str | None:
    """The cluster recorded by the job's last driver; None when there is no record.

    ``NoClusterError`` when that driver started a local Ray and has ended (its Ray went
    with it): the job is not running, whatever other clusters run here."""
    try:
        data = json.loads(read_bytes(join(os.fspath(output), RECORD)))
        address, pid, host = str(data["address"]), int(data["pid"]), data["host"]
        started = float(data["pid_started"])  # an older record has none: read as no record
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname() or not data.get("started_by_driver"):
        return address  # a cluster it joined outlives the driver
    if process_alive(pid, started) and address in _live_local_addresses():
        return address
    raise NoClusterError(f"its last run (pid {pid}) has ended, and the local Ray it started "
                         f"at {address} with it")


def local_cluster() -> str:
    """The one Ray cluster running on this machine; ``NoClusterError`` or ``ClusterError``
    (naming them) when there is none or several, so nothing is joined by chance."""
    from ray._private import utils

    live = _live_local_addresses()
    current = utils.read_ray_address()  # written by `ray start`
    if current and current in live:
        return current
    if len(live) == 1:
        return live[0]
    if not live:
        raise NoClusterError("no Ray cluster is running on this machine; give --address "
                             "HEAD:6379 for a remote one")
    raise ClusterError(f"{len(live)} Ray clusters run on this machine ({', '.join(live)}) "
                       "and the job's output folder names none that is running; give "
                       "--address with one of them")
