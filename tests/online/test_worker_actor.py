"""The worker actor (online/worker.Worker) alone, its stream consumed by the test as the
driver would: real Ray, the simulated provider on loopback, its ledger the judge."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import ray

from batchrun.io.shards import Shard, carry_schema, iter_shard_rows
from batchrun.io.writer import result_schema
from batchrun.limits.limiter import RateLimiter, limiter_name
from batchrun.online.worker import Worker, worker_name
from batchrun.sim import MockConfig, RunningServer, prompt_key, start_in_thread
from batchrun.spec import JobSpec, load_spec
from tests.conftest import make_prompts, write_spec

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(120)]
FLUSH, CONCURRENCY = 10, 4
ROOM = 2 * FLUSH + CONCURRENCY  # rows a worker takes and holds until they are written


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with start_in_thread(MockConfig(latency_ms=5)) as srv:
        yield srv


class Setup:
    """One worker and the limiter it leases from, over one input file of ``n`` rows."""

    def __init__(self, tmp_path: Path, server: RunningServer, name: str, n: int):
        server.reset()
        self.server = server
        path = make_prompts(tmp_path / "in.parquet", n, row_group=50)
        self.spec: JobSpec = load_spec(str(write_spec(
            tmp_path, name=name, endpoint={"base_url": server.base_url}, workers=1,
            flush_rows=FLUSH, limits={"rpm": 1_000_000, "max_concurrency": CONCURRENCY})))
        self.shard = Shard(0, str(path), 0, n, "in.parquet")
        self.schema = result_schema(carry_schema(self.spec, [self.shard]))
        self.limiter = RateLimiter.options(  # type: ignore[attr-defined]
            name=limiter_name(name)).remote(name, 1_000_000, None)
        self.worker = Worker.options(  # type: ignore[attr-defined]
            name=worker_name(name, 0), num_cpus=0).remote(self.spec, CONCURRENCY, self.schema)

    def part(self, start: int, stop: int) -> Shard:
        return Shard(self.shard.index, self.shard.path, start, stop, self.shard.id_prefix)

    def keys(self, shard: Shard | None = None) -> dict[str, str]:
        return {r.id: prompt_key(r.messages)
                for rows in iter_shard_rows(self.spec, shard or self.shard) for r in rows}

    def total(self) -> int:
        return int(self.server.stats()["total_requests"])

    def close(self) -> None:
        for a in (self.limiter, self.worker):
            ray.kill(a, no_restart=True)


@pytest.fixture
def make(tmp_path: Path, server: RunningServer) -> Iterator[Callable[..., Setup]]:
    made: list[Setup] = []

    def build(name: str, n: int) -> Setup:
        made.append(Setup(tmp_path / name, server, name, n))
        return made[-1]

    yield build
    for s in made:
        s.close()


class Stream:
    """One run_shard, consumed as the driver does; acknowledged only when ``auto_ack``."""

    def __init__(self, worker: Any, shard: Shard, skip: set[str] | None = None,
                 name: str = "shard#0", auto_ack: bool = True, ack_until: int | None = None):
        self.worker, self.name, self.auto_ack = worker, name, auto_ack
        self.ack_until = ack_until  # auto_ack stops once this many rows were acknowledged
        self.acked = 0
        self.tables: list[pa.Table] = []
        self.gen = worker.run_shard.options(
            num_returns="streaming", _generator_backpressure_num_objects=1).remote(
            shard, skip or set(), [None], None, name)

    async def consume(self) -> list[pa.Table]:
        async for ref in self.gen:
            table: pa.Table = await ref
            self.tables.append(table)
            if self.auto_ack and table.num_rows:
                self.ack(table.num_rows)
                if self.ack_until is not None and self.acked >= self.ack_until:
                    self.auto_ack = False
        return self.tables

    def ack(self, rows: int) -> None:
        self.acked += rows
        self.worker.written.remote(self.name, rows)

    @property
    def rows(self) -> int:
        return sum(t.num_rows for t in self.tables)

    def ids(self) -> list[str]:
        return [i for t in self.tables for i in t["id"].to_pylist()]


async def until(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(cond):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def test_run_shard_streams_tables_of_flush_rows_leaving_out_skip(
        make: Callable[..., Setup]) -> None:
    s = make("t-wk-stream", 100)
    keys = s.keys()
    skip = {rid for i, rid in enumerate(sorted(keys)) if i % 3 == 0}  # 34 answered before
    stream = Stream(s.worker, s.shard, skip)
    tables = asyncio.run(stream.consume())
    want = sorted(set(keys) - skip)
    assert sorted(stream.ids()) == want  # each row once, none of skip
    sent = Counter(r["key"] for r in s.server.records())
    assert sorted(sent) == sorted(keys[i] for i in want) and set(sent.values()) == {1}
    sizes = [t.num_rows for t in tables if t.num_rows]
    assert all(t.schema == s.schema for t in tables)
    # a table every flush_rows rows, streamed as they finish (never more than the room)
    assert len(sizes) >= len(want) // ROOM + 1 and max(sizes) <= ROOM, sizes
    assert all(n >= FLUSH for n in sizes[:-1]), sizes
    recs = pa.concat_tables(tables).to_pylist()
    assert {(r["status"], r["attempts"]) for r in recs} == {("ok", 1)}
    assert all(r["topic"] == f"t{int(r['id'][1:]) % 7}" for r in recs)  # carried


def test_sends_stop_at_the_room_until_tables_are_written(make: Callable[..., Setup]) -> None:
    """Tables handed over but not acknowledged hold room: the worker sends exactly
    ``2 x flush_rows + concurrency`` rows, then one more per row acknowledged."""
    s = make("t-wk-room", 200)

    async def main() -> None:
        first, second = s.part(0, 150), s.part(150, 200)
        stream = Stream(s.worker, first, auto_ack=False)
        task = asyncio.create_task(stream.consume())
        await until(lambda: s.total() >= ROOM, "the room to fill")
        await asyncio.sleep(2.5)  # past a heartbeat: a handed table is not a written one
        assert s.total() == ROOM
        stream.ack(7)
        await until(lambda: s.total() >= ROOM + 7, "7 more sends")
        await asyncio.sleep(1.0)
        assert s.total() == ROOM + 7
        stream.auto_ack = True
        stream.ack(stream.rows - 7)  # the rest of what came so far; later tables as they come
        await asyncio.wait_for(task, 60)
        assert stream.rows == first.num_rows and s.total() == first.num_rows
        # every row of the ended stream was acknowledged: the next shard has the whole room
        nxt = Stream(s.worker, second, name="shard#1", auto_ack=False)
        task = asyncio.create_task(nxt.consume())
        await until(lambda: s.total() >= first.num_rows + ROOM, "the next shard's room")
        await asyncio.sleep(1.0)
        assert s.total() == first.num_rows + ROOM
        nxt.auto_ack = True
        nxt.ack(nxt.rows)
        await asyncio.wait_for(task, 60)
        assert s.total() == s.shard.num_rows

    asyncio.run(main())


def test_halt_stops_sending_and_keeps_the_first_reason(make: Callable[..., Setup]) -> None:
    s = make("t-wk-halt", 300)
    early = make("t-wk-halt-early", 20)
    # halted before its first shard: nothing is read or sent
    ray.get(early.worker.halt.remote("stopped before it began"), timeout=60)
    assert sum(t.num_rows for t in asyncio.run(Stream(early.worker, early.shard).consume())) == 0
    assert s.total() == 0
    assert ray.get(early.worker.halted.remote(), timeout=30) == "stopped before it began"

    async def main() -> Stream:
        # past 30 rows written the driver stops acknowledging: the worker cannot finish
        # the shard before the halt reaches it, however slow the machine
        stream = Stream(s.worker, s.shard, ack_until=30)
        task = asyncio.create_task(stream.consume())
        await until(lambda: not stream.auto_ack, "the first tables")
        # one after the other: an async actor may run one caller's calls out of order
        await s.worker.halt.remote("max_error_rate exceeded")
        await s.worker.halt.remote("a later reason")
        stream.auto_ack = True
        stream.ack(stream.rows - stream.acked)
        await asyncio.wait_for(task, 60)
        return stream

    stream = asyncio.run(main())
    assert ray.get(s.worker.halted.remote(), timeout=30) == "max_error_rate exceeded"
    assert 30 <= stream.rows < s.shard.num_rows, stream.rows  # it stopped short ...
    # ... and every request it sent came back as a record
    assert s.total() == stream.rows, (s.total(), stream.rows)
    assert len(set(stream.ids())) == stream.rows


def test_progress_counts_what_it_streamed(make: Callable[..., Setup]) -> None:
    t0 = time.time()
    s = make("t-wk-progress", 60)
    tables = asyncio.run(Stream(s.worker, s.shard).consume())
    p = ray.get(s.worker.progress.remote(), timeout=30)
    cost = sum(c or 0.0 for t in tables for c in t["cost_usd"].to_pylist())
    assert (p["done"], p["ok"], p["in_flight"]) == (60, 60, 0)
    assert cost > 0 and p["cost_usd"] == pytest.approx(cost)
    assert t0 <= p["started_at"] <= p["now"]
