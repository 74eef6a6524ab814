"""The worker actor: one aiohttp session, many requests in flight, results streamed back.

Named ``batchrun:<job>:worker-N``. ``run_shard`` is a streaming generator: it
yields an Arrow table of finished rows every ``flush_rows`` rows or
``FLUSH_INTERVAL_S`` seconds; the driver writes each one as a checkpoint and
acknowledges it (``written``), and only that makes room for more sends (feed.py).
So a worker killed mid-shard loses only the requests it had in flight; the driver
re-runs the shard minus the rows it has.

The API key is read here, at the worker: from the named environment variable if
this node has it, else from the object store, where the driver put it. It is
never a task argument (the argument is a list holding the object's reference).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import pyarrow as pa
import ray

from batchrun.api.client import ApiClient, open_session
from batchrun.api.protocols import inputs_per_request
from batchrun.api.records import records_table, warm_arrow
from batchrun.api.registry import kind_for, provider_for
from batchrun.api.secrets import redact
from batchrun.api.structured import Structured
from batchrun.engine.routes import engine_client
from batchrun.errors import ClusterError
from batchrun.io import stores
from batchrun.io.shards import RequestRow, Shard, iter_shard_rows
from batchrun.limits.limiter import SLOT_VALIDITY_S, limiter_name
from batchrun.limits.permits import LeaseAnswer, PermitPool
from batchrun.money.pricing import price_for
from batchrun.online.engine import RowRunner
from batchrun.online.feed import Feed, Room
from batchrun.online.grouped import GroupRunner
from batchrun.online.lifeline import DriverId, driver_exit
from batchrun.online.metrics import JobMetrics
from batchrun.spec import JobSpec

__all__ = ["FLUSH_INTERVAL_S", "Worker", "worker_name"]

FLUSH_INTERVAL_S = 2.0
LEASE_TIMEOUT_S = 120.0  # covers a limiter restart (its recovery asks workers, 10 s at most)


def worker_name(job: str, index: int) -> str:
    return f"batchrun:{job}:worker-{index}"


@ray.remote(max_restarts=-1, max_task_retries=0)
class Worker:
    def __init__(self, spec: JobSpec, concurrency: int, schema: pa.Schema,
                 budgeted: bool = False, structured: Structured | None = None):
        self._spec = spec
        stores.configure(spec.storage)  # the driver's resolved endpoint; keys from this node
        self._budgeted = budgeted
        # built by the driver: a `pydantic:` model may not import on this node
        self._structured = structured
        self._concurrency = concurrency
        self._key_box: list[Any] = [None]  # from run_shard: see _api_key
        self._schema = schema
        self._runner: RowRunner | None = None
        self._halted: str | None = None  # why the job stops, once it does
        # rows taken and not yet written by the driver: see feed.py
        # a kind whose requests carry several rows (embeddings) has lanes that hold as many
        self._per_request = inputs_per_request(kind_for(spec), spec)
        self._room = Room(2 * spec.flush_rows + concurrency * self._per_request)
        self._feeds: dict[str, Feed] = {}  # by stream name, until their tables are written
        self._in_flight = 0
        self._done = 0
        self._ok = 0
        self._cost = 0.0
        self._started = time.time()

    async def _api_key(self) -> str | None:
        name = self._spec.endpoint.api_key_env
        if name is None:
            return None
        return os.environ.get(name) or await self._key_box[0]

    async def _setup(self) -> RowRunner:
        if self._runner is None:
            key = await self._api_key()  # the only await: two shards may both get here,
            if self._runner is None:     # so build once, after it, with no await inside
                self._runner = self._build(key)
        return self._runner

    def _build(self, key: str | None) -> RowRunner:
        """The worker's one session, permit pool and semaphore, shared by its shards."""
        spec = self._spec
        self._limiter = ray.get_actor(limiter_name(spec.name))
        self._sem = asyncio.Semaphore(self._concurrency)
        self._session = open_session(spec.endpoint, self._concurrency)
        self._permits = PermitPool(self._lease, validity=SLOT_VALIDITY_S)
        self._permits.exhausted = self._halted is not None  # halted before its first shard
        self._metrics = JobMetrics(spec.name)
        price = self._price = price_for(spec)
        self._kind = kind_for(spec)
        client = ApiClient(self._session, spec.endpoint, key, self._kind, provider_for(spec))
        if spec.engine is not None:  # self-hosted: each attempt goes to a replica
            client = engine_client(spec, self._session, key, self._kind, provider_for(spec))

        def on_trip(reason: str) -> None:  # a provider may echo the key in its message
            self._halt(redact(reason, key))

        warm_arrow()
        cls = GroupRunner if hasattr(self._kind, "inputs_per_request") else RowRunner
        return cls(spec, client, self._permits, pause_all=self._pause_all, price=price,
                   on_trip=on_trip, budgeted=self._budgeted, structured=self._structured)

    async def _lease(self, costs: list[Any], usd: list[float] | None,
                     settle: list[tuple[float, float]], spare: tuple[int, Any],
                     released: list[tuple[float, float]] | None = None) -> LeaseAnswer:
        try:  # a limiter that never comes back must not hang the job silently
            return await asyncio.wait_for(
                self._limiter.lease.remote(costs, usd, settle, spare, released),
                LEASE_TIMEOUT_S)
        except TimeoutError:
            raise ClusterError(f"the rate limiter did not answer within {LEASE_TIMEOUT_S:.0f} s"
                               ) from None

    def _halt(self, reason: str) -> None:
        """The breaker tripped: stop this worker's sends and reads now (as a spent budget
        does), and the others' at their next lease; the driver reads the reason."""
        self._limiter.halt.remote(reason)
        self.halt(reason)

    def _pause_all(self, seconds: float) -> None:
        self._permits.pause(seconds)
        self._limiter.pause.remote(seconds)  # fire and forget: the others learn on next lease

    async def _lane(self, runner: RowRunner, feed: Feed) -> None:
        """One request at a time, row after row: ``concurrency`` lanes share the worker's
        semaphore, so there is no task per row (a lane is cheaper than a task a row). A
        lane takes its row holding a slot, so no row waits unsent while it holds room."""
        while True:
            async with self._sem:
                if (row := await feed.next_row()) is None:
                    return
                self._in_flight += 1
                try:
                    rec = await runner.run(row)
                finally:
                    self._in_flight -= 1
            if rec is None:  # the budget refused it or the job halted: the row stays unsent
                feed.drop()
            else:
                feed.put(rec)

    async def _group_lane(self, runner: GroupRunner, feed: Feed, gather: asyncio.Lock
                          ) -> None:
        """A lane of a kind whose request carries several rows: it gathers up to that many
        (fewer at the shard's end; one lane at a time, so requests go out full), sends
        them as one request, and puts a record per row."""
        while True:
            async with self._sem:
                rows: list[RequestRow] = []
                async with gather:
                    while len(rows) < self._per_request:
                        if (row := await feed.next_row()) is None:
                            break
                        rows.append(row)
                if not rows:
                    return
                self._in_flight += 1
                try:
                    recs = await runner.run_group(rows)
                finally:
                    self._in_flight -= 1
            for rec in recs:
                if rec is None:
                    feed.drop()
                else:
                    feed.put(rec)

    async def _feed(self, feed: Feed) -> None:
        runner = await self._setup()
        gather = asyncio.Lock()
        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(self._concurrency):
                    tg.create_task(self._group_lane(runner, feed, gather)
                                   if isinstance(runner, GroupRunner) else
                                   self._lane(runner, feed))
            await self._permits.flush()  # the shard's last settlements
        finally:
            feed.ready.set()

    def _table(self, recs: list[dict[str, Any]]) -> pa.Table:
        self._done += len(recs)
        self._ok += sum(r["status"] == "ok" for r in recs)
        self._cost += sum(r.get("cost_usd") or 0.0 for r in recs)
        self._metrics.observe(recs)
        self._metrics.set_in_flight(self._in_flight)
        return records_table(recs, self._schema)

    async def run_shard(self, shard: Shard, skip: set[str], key_box: list[Any],
                        driver: DriverId | None = None, stream: str = ""
                        ) -> AsyncIterator[pa.Table]:
        """Yield tables of finished rows of ``shard``, leaving out the ids in ``skip``.

        ``key_box`` holds the reference to the API key, with every shard rather than once
        in the constructor: Ray warns that a restarted actor whose constructor arguments
        are in the object store may fail to start (ray#53727), and this way it cannot.
        ``driver``: the process consuming this stream; once it exits, nothing is sent.
        ``stream``: this run's name in the driver's acknowledgements (``written``).
        """
        self._key_box = key_box
        feed = Feed(iter_shard_rows(self._spec, shard), skip, self._spec.flush_rows,
                    self._room, lambda: self._permits.exhausted)
        self._feeds[stream] = feed
        task = asyncio.create_task(self._feed(feed))
        # answers sent to a dead driver are paid for and never written: stop at once (the
        # driver's own node; elsewhere the missing acknowledgements stop it, feed.py)
        lifeline = asyncio.create_task(driver_exit(driver)) if driver else None
        if lifeline is not None:
            lifeline.add_done_callback(lambda _: task.cancel())
        try:
            while not task.done():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FLUSH_INTERVAL_S):
                        await feed.ready.wait()  # flush_rows done, or the shard's end
                feed.ready.clear()
                if task.done():
                    break
                yield self._table(feed.take())  # empty when idle: the driver's heartbeat
            if recs := feed.take():  # answered (and paid for) even if the shard then failed
                yield self._table(recs)
            await task  # re-raises a read error of the shard
        finally:
            task.cancel()
            if lifeline is not None:
                lifeline.cancel()
            if feed.close() and self._feeds.get(stream) is feed:
                del self._feeds[stream]

    def written(self, stream: str, rows: int) -> None:
        """The driver wrote a table of ``rows`` rows of ``stream``: room for as many more."""
        feed = self._feeds.get(stream)
        if feed is not None and feed.written(rows):
            del self._feeds[stream]

    def halt(self, reason: str) -> None:
        """The job stops (the driver's error rate, or another worker's breaker): send no
        more, and keep the reason for a restarted limiter (``RateLimiter._recover``)."""
        self._halted = self._halted or reason
        if self._runner is not None:
            self._permits.exhausted = True

    def halted(self) -> str | None:
        return self._halted

    def recent_sends(self) -> list[tuple[float, Any]]:
        return self._permits.recent_sends() if self._runner is not None else []

    def progress(self) -> dict[str, float]:
        """Live figures of this worker since it started (``batchrun status`` reads them)."""
        return {"in_flight": self._in_flight, "done": self._done, "ok": self._ok,
                "cost_usd": self._cost, "started_at": self._started, "now": time.time()}
