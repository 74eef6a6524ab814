"""A worker's lifeline to its driver: has the process that asked for this shard died?

Every request a worker sends after its driver died is paid for and never written, so
the rerun pays for it again. When a driver that started its own Ray is killed with its
process group (``kill -9`` of a terminal's job), GCS and the raylet die with it, but Ray
puts workers in process groups of their own: they learn of it only when they notice
the raylet is gone, 1.5 s later, in which two workers sent 1,000 requests (measured at
600 rows/s). A worker on the driver's node therefore watches the driver's process
itself, through a pidfd, so the kernel tells it the moment the driver exits. A worker
on another node has Ray end it when its owner dies; until then it takes rows only while
the driver keeps confirming its writes (``feed.py``), so a dead driver stops it within
``concurrency`` + 2 × ``flush_rows`` rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass

import psutil

__all__ = ["DriverId", "driver_exit", "process_alive", "start_time", "this_driver"]

POLL_S = 0.1  # where there is no pidfd (not Linux 5.3+)


@dataclass(frozen=True)
class DriverId:
    """The driver process: its node, pid, and start time (a reused pid is another process)."""

    node_id: str
    pid: int
    started: float


def start_time(pid: int | None = None) -> float:
    """When process ``pid`` (this one by default) started: with its pid, its identity."""
    return float(psutil.Process(pid).create_time())


def process_alive(pid: int, started: float) -> bool:
    """The one liveness check: ``pid`` runs and is the process that started at ``started``
    (the kernel reuses pids, so a bare ``kill(pid, 0)`` can answer for a stranger)."""
    try:
        return start_time(pid) == started
    except psutil.Error:  # gone, a zombie, or not ours to see
        return False


def this_driver() -> DriverId:
    import ray  # here, not at the top: ray_cluster (imported by the CLI) shares process_alive

    return DriverId(ray.get_runtime_context().get_node_id(), os.getpid(), start_time())


def _alive(driver: DriverId) -> bool:
    return process_alive(driver.pid, driver.started)


async def _forever() -> None:
    await asyncio.Event().wait()


async def driver_exit(driver: DriverId) -> None:
    """Return once ``driver`` has exited; never, if this process cannot see it.

    A driver on another node, or in another pid namespace, is not visible here: only a
    driver seen alive at the start is watched, so an invisible one never reads as dead.
    """
    import ray

    if driver.node_id != ray.get_runtime_context().get_node_id() or not _alive(driver):
        await _forever()
    try:
        fd = os.pidfd_open(driver.pid)
    except (AttributeError, OSError):
        while _alive(driver):
            await asyncio.sleep(POLL_S)
        return
    try:
        if not _alive(driver):  # it exited, and its pid may be another's, before the open
            return
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await exited  # a pidfd reads as ready when its process exits
        finally:
            loop.remove_reader(fd)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
