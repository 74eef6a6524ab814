"""The driver's loop (online/dispatch.Dispatcher) driven directly: real worker and limiter
actors on the session's Ray, the simulated provider on loopback. The provider's ledger
is the judge: which prompts it was sent, and how many times."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from batchrun.errors import ClusterError
from batchrun.io.shards import Shard, carry_schema, iter_shard_rows, plan_shards
from batchrun.io.writer import ResultsStore, result_schema
from batchrun.limits.limiter import RateLimiter, limiter_name
from batchrun.online import dispatch
from batchrun.online.dispatch import MAX_SHARD_TRIES, Dispatcher, ShardPlan
from batchrun.online.lifeline import process_alive, start_time
from batchrun.online.worker import Worker, worker_name
from batchrun.sim import MockConfig, RunningServer, prompt_key, start_in_thread
from batchrun.spec import load_spec
from tests.conftest import make_prompts, write_spec

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(120)]
RUN_TIMEOUT_S = 60.0  # a dispatch that hangs fails the test instead of the session


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with start_in_thread(MockConfig(latency_ms=5)) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _fresh_ledger(server: RunningServer) -> None:
    server.reset()


class Job:
    """One job's actors and output, as runner._start_actors makes them, without the runner."""

    def __init__(self, tmp_path: Path, server: RunningServer, name: str, n: int, *,
                 workers: int = 1, concurrency: int = 4, flush_rows: int = 10,
                 ids: list[str] | None = None, store_cls: type[ResultsStore] = ResultsStore):
        make_prompts(tmp_path / "in.parquet", n, row_group=10,
                     extra={"id": ids} if ids is not None else None)
        self.spec = load_spec(str(write_spec(
            tmp_path, name=name, endpoint={"base_url": server.base_url}, workers=workers,
            flush_rows=flush_rows, limits={"rpm": 1_000_000,
                                           "max_concurrency": concurrency * workers})))
        self.shards = plan_shards(self.spec)
        schema = result_schema(carry_schema(self.spec, self.shards))
        self.store = store_cls(self.spec.output, schema)
        self.room = 2 * flush_rows + concurrency  # rows a worker takes before an ack
        self.limiter = RateLimiter.options(  # type: ignore[attr-defined]
            name=limiter_name(name)).remote(name, self.spec.limits.rpm, None)
        self.workers = [Worker.options(  # type: ignore[attr-defined]
            name=worker_name(name, i), num_cpus=0).remote(self.spec, concurrency, schema)
            for i in range(workers)]

    def dispatcher(self, on_rows: Callable[[int], None] = lambda n: None) -> Dispatcher:
        return Dispatcher(self.limiter, self.workers, self.store, on_rows, [None])

    def run(self, d: Dispatcher, shards: list[Shard] | None = None) -> None:
        plans = [ShardPlan(s) for s in (self.shards if shards is None else shards)]
        asyncio.run(asyncio.wait_for(d.run(plans), RUN_TIMEOUT_S))

    def keys(self, shards: list[Shard] | None = None) -> dict[str, str]:
        """Row id -> the ledger's key of its prompt."""
        return {row.id: prompt_key(row.messages)
                for s in (self.shards if shards is None else shards)
                for rows in iter_shard_rows(self.spec, s) for row in rows}

    def written_ids(self) -> set[str]:
        ids: set[str] = set()
        for s in self.shards:
            t = self.store.read_shard(s.name)
            if t is not None:
                ids.update(t["id"].to_pylist())
        return ids

    def final_ids(self) -> list[str]:
        files = sorted((Path(self.spec.output) / "results").glob("shard-*.parquet"))
        return sorted(pq.read_table(files, columns=["id"])["id"].to_pylist())

    def close(self) -> None:
        for a in [self.limiter, *self.workers]:
            ray.kill(a, no_restart=True)


@contextlib.contextmanager
def job(*args: Any, **kw: Any) -> Iterator[Job]:
    j = Job(*args, **kw)
    try:
        yield j
    finally:
        j.close()


def sent(server: RunningServer) -> Counter[str]:
    """How many times each prompt reached the provider."""
    return Counter(r["key"] for r in server.records())


def test_first_shards_go_one_to_each_worker(tmp_path: Path, server: RunningServer) -> None:
    with job(tmp_path, server, "t-disp-rr", 100, workers=2) as j:
        first_two = j.shards[:2]  # two shards for two workers: one each, never both to one
        j.run(j.dispatcher(), first_two)
        done = [ray.get(w.progress.remote(), timeout=30)["done"] for w in j.workers]
        assert done == [first_two[0].num_rows, first_two[1].num_rows], done
        assert sorted(sent(server).values()) == [1] * sum(s.num_rows for s in first_two)


def test_worker_killed_mid_shard_resends_only_unanswered_rows(
        tmp_path: Path, server: RunningServer) -> None:
    n = 400
    with job(tmp_path, server, "t-disp-kill", n) as j:
        before: set[str] = set()
        count = 0

        def on_rows(rows: int) -> None:  # called after each table is written
            nonlocal count, before
            count += rows
            if count >= 60 and not before:
                before = j.written_ids()  # on disk now, so never to be sent again
                ray.kill(j.workers[0], no_restart=False)  # Ray restarts it

        d = j.dispatcher(on_rows)
        j.run(d)
        assert before and d.worker_restarts >= 1
        assert j.final_ids() == sorted(j.keys())  # every row once in the results
        counts, keys = sent(server), j.keys()
        assert [i for i in before if counts[keys[i]] != 1] == []  # written rows: sent once
        assert all(counts[k] >= 1 for k in keys.values())
        # only what the dead worker had taken and not seen written is sent again
        assert n <= sum(counts.values()) <= n + j.room, sum(counts.values())


def test_stalled_worker_is_killed_and_its_shard_resent(
        tmp_path: Path, server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that stops answering (SIGSTOP: no table, not even a heartbeat) for
    STALL_S is killed; Ray restarts it and the shard is re-sent minus what was written."""
    monkeypatch.setattr(dispatch, "STALL_S", 8.0)  # heartbeats come every 2 s
    n = 200
    with job(tmp_path, server, "t-disp-stall", n) as j:
        pid = ray.get(j.workers[0].__ray_call__.remote(lambda self: os.getpid()), timeout=60)
        born = start_time(pid)
        before: set[str] = set()
        count = 0

        def on_rows(rows: int) -> None:
            nonlocal count, before
            count += rows
            if count >= 40 and not before:
                before = j.written_ids()
                os.kill(pid, signal.SIGSTOP)

        d = j.dispatcher(on_rows)
        try:
            j.run(d)
        finally:
            if process_alive(pid, born):  # never leave a stopped process behind
                os.kill(pid, signal.SIGCONT)
        assert before and d.worker_restarts >= 1
        assert not process_alive(pid, born)  # the stalled process was ended, not waited on
        assert j.final_ids() == sorted(j.keys())
        counts, keys = sent(server), j.keys()
        assert [i for i in before if counts[keys[i]] != 1] == []
        # each of the worker's two streams times out and kills it on its own: the second
        # kill may end the restarted worker too, with a room of its rows unwritten
        assert n <= sum(counts.values()) <= n + 2 * j.room


class GatedStore(ResultsStore):
    """The real store, whose writes wait until the test opens the gate (a slow disk)."""

    gate = threading.Event()

    def write_part(self, shard_name: str, table: pa.Table) -> None:
        assert self.gate.wait(RUN_TIMEOUT_S), "the gate was never opened"
        super().write_part(shard_name, table)


def test_sends_wait_for_write_acknowledgements(tmp_path: Path, server: RunningServer) -> None:
    """While no table is written the worker sends exactly its room; each write the
    dispatcher acknowledges opens room again, so the whole job (8x the room) finishes."""
    n = 200
    GatedStore.gate.clear()
    with job(tmp_path, server, "t-disp-ack", n, store_cls=GatedStore) as j:
        d = j.dispatcher()

        async def main() -> int:
            task = asyncio.create_task(d.run([ShardPlan(s) for s in j.shards]))
            try:
                for _ in range(300):  # the room fills in well under a second, unloaded
                    if server.stats()["total_requests"] >= j.room or task.done():
                        break
                    await asyncio.sleep(0.1)
                await asyncio.sleep(1.0)  # time to overrun the room, if it could
                held = int(server.stats()["total_requests"])
            finally:
                GatedStore.gate.set()
            await asyncio.wait_for(task, RUN_TIMEOUT_S)
            return held

        held = asyncio.run(main())
        assert held == j.room, (held, j.room)
        assert j.final_ids() == sorted(j.keys())
        assert sum(sent(server).values()) == n


def test_a_shard_that_never_completes_gives_up_with_cluster_error(
        tmp_path: Path, server: RunningServer) -> None:
    """Two rows of shard 0 share an id, so its final file can never hold a row per input
    row: it is run MAX_SHARD_TRIES times, and the retries send nothing already written."""
    n = 40
    ids = [f"r{i:06d}" for i in range(n)]
    ids[5] = ids[0]
    with job(tmp_path, server, "t-disp-giveup", n, ids=ids) as j:
        shard0 = j.shards[0]
        assert shard0.num_rows > 5
        with pytest.raises(ClusterError, match=f"{shard0.name}: gave up after "
                                               f"{MAX_SHARD_TRIES} tries"):
            j.run(j.dispatcher(), [shard0])
        counts = sent(server)
        assert sorted(counts.values()) == [1] * shard0.num_rows  # tries 2-5 sent nothing
        final = pq.read_table(j.store.final_path(shard0.name))
        assert final.num_rows == shard0.num_rows - 1
