"""The driver's event loop: hand shards to workers, write what they stream back.

Each worker runs two shards at a time, so its requests keep flowing across a
shard boundary. Every table a worker yields is written as a checkpoint part
as soon as it arrives, and then acknowledged to the worker (``written``): only that
makes room for its further sends (feed.py), so a driver that dies (or cannot write)
leaves at most ``2 x flush_rows`` answers per worker unwritten, besides those in
flight, and these are the only ones sent again; when the stream ends the shard's parts
are merged into its final file, which must then hold one row per input row, or the shard
runs again for the rows it lacks. A worker that dies (Ray restarts it) or goes
silent past ``STALL_S`` costs only its in-flight rows: the shard is re-sent
minus every id already written.

A job that cannot succeed stops early (``JobCannotSucceed``, exit 7): a worker's circuit
breaker, or the rolling error rate watched here over the tables as they arrive, halts
the limiter, which refuses every worker's next lease, and every worker; the shards end
short, what was answered is written, and the rest stays unsent for the rerun. The
workers keep the reason, so a limiter that Ray restarts learns it again from them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.exceptions import RayActorError

from batchrun.errors import BatchrunError, ClusterError, JobCannotSucceed
from batchrun.io.shards import SHARDS_PER_WORKER, Shard
from batchrun.io.writer import ResultsStore
from batchrun.online.breaker import ErrorRate
from batchrun.online.lifeline import this_driver

__all__ = ["SHARDS_PER_WORKER", "Dispatcher", "ShardPlan", "split_concurrency"]

log = logging.getLogger("batchrun")

STALL_S = 120.0  # a worker heartbeats every flush interval; this long silent is a hang
MAX_SHARD_TRIES = 5


def split_concurrency(total: int, workers: int) -> list[int]:
    """Each worker's share of the job's ``max_concurrency``: all of it, none over, none
    idle (so at most ``total`` workers; planning gives each of them shards, shards.py)."""
    n = max(1, min(workers, total))
    return [total // n + (i < total % n) for i in range(n)]


@dataclass
class ShardPlan:
    """A shard still to run, and the ids a previous run already answered."""

    shard: Shard
    skip: set[str] = field(default_factory=set)


def _first_cause(eg: BaseExceptionGroup) -> BaseException:
    """The first of our own errors in a (nested) group, else the first error at all."""
    leaves: list[BaseException] = []
    stack: list[BaseException] = [eg]
    while stack:
        e = stack.pop(0)
        if isinstance(e, BaseExceptionGroup):
            stack[:0] = list(e.exceptions)
        else:
            leaves.append(e)
    return next((e for e in leaves if isinstance(e, BatchrunError)), leaves[0])


class Dispatcher:
    def __init__(self, limiter: Any, workers: list[Any], store: ResultsStore,
                 on_rows: Callable[[int], None], key_box: list[Any],
                 error_rate: ErrorRate | None = None):
        self._limiter = limiter
        self._key_box = key_box  # the API key's reference, never the key (see worker.py)
        self._driver = this_driver()  # workers on this node stop the moment it exits
        self._workers = workers
        self._store = store
        self._on_rows = on_rows
        self.worker_restarts = 0
        self.budget_exhausted = False
        self._error_rate = error_rate
        self.halted: str | None = None  # why the job stops early (breaker, error rate)
        self.stopped_early = False  # a shard was left with rows unsent because of it
        self._streams = itertools.count()  # names each run_shard for its acknowledgements

    async def run(self, plans: list[ShardPlan]) -> None:
        queue = deque(plans)

        async def lane(worker: Any) -> None:
            while queue and not self.budget_exhausted and self.halted is None:
                await self._run_shard(worker, queue.popleft())

        try:
            async with asyncio.TaskGroup() as tg:
                # round robin: the first shards go one to each worker, not two to the first
                for _ in range(SHARDS_PER_WORKER):
                    for w in self._workers:
                        tg.create_task(lane(w))
        except ExceptionGroup as eg:
            # one lane failing cancels the others; report the cause, not the group
            raise _first_cause(eg) from eg
        # answered rows are written; shards never started, or cut short, are not
        if self.halted is not None and (queue or self.stopped_early):
            raise JobCannotSucceed(f"job stopped early: {self.halted}; rows without a result "
                                   "stay unsent: fix the cause and run the same command again")

    def _watch(self, table: pa.Table) -> None:
        """Feed the rolling error rate; past max_error_rate, stop every worker."""
        if self._error_rate is None or self.halted is not None:
            return
        table = table.select(["attempts", "status", "error_type", "error_message"])  # no vectors
        sent = table.filter(pc.greater(pc.fill_null(table["attempts"], 0), 0))  # not bad_row
        n_err = int(pc.sum(pc.equal(sent["status"], "error")).as_py() or 0)
        if n_err == 0:
            self._error_rate.add_ok(sent.num_rows)
            reason = self._error_rate.verdict()
        else:
            reason = self._error_rate.add(
                (None if st == "ok" else et or "unknown", msg) for st, et, msg in zip(
                    sent["status"].to_pylist(), sent["error_type"].to_pylist(),
                    sent["error_message"].to_pylist(), strict=True))
        if reason is not None:
            self._halt(reason)

    def _halt(self, reason: str) -> None:
        """Stop every worker now, and the limiter's leases; each worker keeps the reason,
        which a restarted limiter asks them for (its own copy is lost with it)."""
        self.halted = reason
        self._limiter.halt.remote(reason)
        for w in self._workers:
            w.halt.remote(reason)

    async def _stream(self, worker: Any, plan: ShardPlan) -> None:
        name = plan.shard.name
        stream = f"{name}#{next(self._streams)}"
        # A worker sends only as far ahead of the written tables as feed.py allows: each
        # write is acknowledged below. Backpressure on the stream itself keeps at most one
        # table waiting in the object store.
        gen = worker.run_shard.options(
            num_returns="streaming", _generator_backpressure_num_objects=1).remote(
            plan.shard, plan.skip, self._key_box, self._driver, stream)
        it = gen.__aiter__()
        while True:
            try:
                ref = await asyncio.wait_for(it.__anext__(), STALL_S)
            except StopAsyncIteration:
                return
            table: pa.Table = await asyncio.wait_for(ref, STALL_S)
            if table.num_rows:
                await asyncio.to_thread(self._store.write_part, name, table)
                worker.written.remote(stream, table.num_rows)  # room for as many more
                plan.skip.update(table["id"].to_pylist())
                self._on_rows(table.num_rows)
                self._watch(table)

    async def _run_shard(self, worker: Any, plan: ShardPlan) -> None:
        for _ in range(MAX_SHARD_TRIES):
            try:
                await self._stream(worker, plan)
            except (TimeoutError, RayActorError) as e:
                # Ray restarts the actor; the same handle reaches the new one
                self.worker_restarts += 1
                log.warning("worker lost on %s (%s); re-sending its unanswered rows",
                            plan.shard.name, type(e).__name__)
                if isinstance(e, asyncio.TimeoutError):
                    ray.kill(worker, no_restart=False)
                continue
            rows = await asyncio.to_thread(self._store.finalize, plan.shard.name)
            if rows >= plan.shard.num_rows:
                plan.skip = set()  # only a rerun of this shard needs them: free them now
                return
            if self.halted is None:  # a worker's breaker may have stopped the job
                reason = await asyncio.wait_for(self._limiter.halted.remote(), STALL_S)
                if reason is not None:
                    self._halt(reason)
            if self.halted is not None:
                self.stopped_early = True  # the rest stays unsent, for the rerun
                plan.skip = set()
                return
            if await asyncio.wait_for(self._limiter.exhausted.remote(), STALL_S):
                self.budget_exhausted = True  # the rest stays unsent, for a later run
                plan.skip = set()
                return
            log.warning("%s has %d of %d rows; running it again for the rest",
                        plan.shard.name, rows, plan.shard.num_rows)
        raise ClusterError(f"{plan.shard.name}: gave up after {MAX_SHARD_TRIES} tries; "
                           "rerun the same command to resume")
