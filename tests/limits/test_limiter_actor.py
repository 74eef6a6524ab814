"""The rate-limiter actor (limits/limiter.RateLimiter) on the session's Ray: leases under
a workload of concurrent callers, a pause reaching every caller (and a real worker's 429
reaching it), and a restart that recovers the workers' sends, held slots and halt.
The budget gate inside it is money/'s to test."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from batchrun.io.shards import Shard, carry_schema
from batchrun.io.writer import result_schema
from batchrun.limits.limiter import RateLimiter, limiter_name
from batchrun.limits.ratelimit import SlotScheduler, windows_for
from batchrun.online.worker import Worker, worker_name
from batchrun.sim import MockConfig, max_in_window, start_in_thread
from batchrun.spec import load_spec
from tests.conftest import make_prompts, write_spec

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(120)]
HORIZON_S = 0.5  # the limiter's default: no slot is granted further ahead than this


@pytest.fixture
def actors() -> Iterator[list[Any]]:
    """Actors a test starts, killed (for good) at its end."""
    made: list[Any] = []
    yield made
    for a in made:
        ray.kill(a, no_restart=True)


def limiter(actors: list[Any], job: str, rpm: int, tpm: int | None = None) -> Any:
    a = RateLimiter.options(name=limiter_name(job)).remote(job, rpm, tpm)  # type: ignore[attr-defined]
    actors.append(a)
    return a


def lease(lim: Any, costs: list[float]) -> Any:
    return ray.get(lim.lease.remote(costs), timeout=30)


def restart(lim: Any) -> dict[str, Any]:
    """Kill the limiter; Ray restarts it. Returns its stats once it answers again."""
    ray.get(lim.stats.remote(), timeout=60)  # it was up (and asked its workers nothing)
    ray.kill(lim, no_restart=False)
    deadline = time.monotonic() + 60
    while True:
        # ray.kill returns before the actor is gone: a call right after it may still be
        # answered by the old instance, so wait for the restarted one's own answer
        with contextlib.suppress(ray.exceptions.RayActorError):
            stats: dict[str, Any] = ray.get(lim.stats.remote(), timeout=30)
            if stats["restarted"]:
                return stats
        assert time.monotonic() < deadline, "the limiter did not come back"
        time.sleep(0.2)


def test_concurrent_leases_are_paced_within_the_rpm_windows(actors: list[Any]) -> None:
    """Four callers lease batches as fast as the answers let them, for 3 s. Every start
    the limiter hands out is at least one paced interval after the previous one (so no
    window can hold more than its limit), within the horizon of its lease."""
    rpm = 1200
    lim = limiter(actors, "t-lim-pace", rpm)
    spacing = max(SlotScheduler(windows_for(rpm, None), time.monotonic)._spacing(1.0),
                  60.0 / rpm)
    starts: list[float] = []
    calls = 0

    async def caller() -> None:
        nonlocal calls
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            a = await lim.lease.remote([1.0] * 4)
            calls += 1
            assert all(s is not None and a.now - 1e-6 <= s <= a.now + HORIZON_S
                       for s in a.starts), (a.now, a.starts)
            starts.extend(a.starts)
            if a.retry_at is not None:
                await asyncio.sleep(max(0.0, a.retry_at - a.now))

    async def main() -> None:
        await asyncio.gather(*(caller() for _ in range(4)))

    asyncio.run(main())
    starts.sort()
    assert len(starts) >= 20, len(starts)  # ~3.5 s / 51 ms when unloaded
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= spacing - 1e-9, (min(gaps), spacing)
    assert max_in_window(starts, 10.0) <= rpm // 6 and max_in_window(starts, 60.0) <= rpm
    stats = ray.get(lim.stats.remote(), timeout=30)
    assert (stats["granted"], stats["leases"]) == (len(starts), calls)
    # a request larger than the whole TPM limit never gets a slot
    big = limiter(actors, "t-lim-tpm", rpm, tpm=1000)
    assert lease(big, [1500.0]).starts == [None]


def test_a_pause_reaches_every_callers_next_lease(actors: list[Any]) -> None:
    lim = limiter(actors, "t-lim-pause", 1_000_000)
    assert lease(lim, [1.0]).starts  # slots at once before the pause
    t0 = time.monotonic()  # the limiter's clock is this machine's monotonic clock
    ray.get(lim.pause.remote(3.0), timeout=30)  # what a worker does on a 429
    ray.get(lim.pause.remote(0.1), timeout=30)  # a shorter pause never shortens it
    other = lease(lim, [1.0, 1.0])  # another worker's next lease
    assert other.paused_until >= t0 + 3.0
    assert other.starts == [] and other.retry_at is not None
    assert other.retry_at >= other.paused_until - HORIZON_S - 1e-6
    time.sleep(max(0.0, other.paused_until - time.monotonic()))
    after = lease(lim, [1.0, 1.0])
    assert len(after.starts) == 2 and all(s >= other.paused_until for s in after.starts)


def test_a_workers_429_pauses_the_limiter_for_everyone(tmp_path: Path,
                                                       actors: list[Any]) -> None:
    """The provider allows 10 requests per 10 s; the worker's 11th gets a 429 with a
    Retry-After of seconds, and the limiter holds every other worker's slots as long."""
    job = "t-lim-429"
    path = make_prompts(tmp_path / "in.parquet", 40)
    with start_in_thread(MockConfig(rpm=60)) as server:
        spec = load_spec(str(write_spec(tmp_path, name=job, endpoint={
            "base_url": server.base_url}, limits={"rpm": 1_000_000, "max_concurrency": 4})))
        shard = Shard(0, str(path), 0, 40, "in.parquet")
        schema = result_schema(carry_schema(spec, [shard]))
        lim = limiter(actors, job, 1_000_000)
        worker = Worker.options(name=worker_name(job, 0), num_cpus=0).remote(  # type: ignore[attr-defined]
            spec, 4, schema)
        actors.append(worker)
        gen = worker.run_shard.options(num_returns="streaming").remote(shard, set(), [None])
        deadline = time.monotonic() + 60
        while server.stats()["by_outcome"].get("rate_limited", 0) == 0:
            assert time.monotonic() < deadline, "no 429 came"
            time.sleep(0.1)
        answer = None
        while time.monotonic() < deadline:  # the worker's pause call follows its 429
            answer = lease(lim, [1.0])
            if answer.paused_until > answer.now:
                break
            time.sleep(0.05)
        del gen
    assert answer is not None and answer.paused_until - answer.now > 3.0, answer
    assert answer.starts == []


@ray.remote(num_cpus=0)
class FakeWorker:
    """What a restarted limiter asks each worker: its recent sends as (age s, cost), held
    slots at negative ages (the latest they may go out), and the job's halt reason."""

    def __init__(self, sends: list[tuple[float, float]], halted: str | None = None,
                 broken: bool = False):
        self._sends, self._halted, self._broken = sends, halted, broken

    def recent_sends(self) -> list[tuple[float, float]]:
        if self._broken:
            raise RuntimeError("this worker cannot answer")
        return self._sends

    def halted(self) -> str | None:
        return self._halted


def fake_workers(actors: list[Any], job: str, *specs: dict[str, Any]) -> None:
    for i, kw in enumerate(specs):
        w = FakeWorker.options(name=worker_name(job, i)).remote(**kw)  # type: ignore[attr-defined]
        ray.get(w.halted.remote(), timeout=60)  # up, and listed as a named actor
        actors.append(w)


def test_a_restart_counts_the_workers_sends_and_held_slots(actors: list[Any]) -> None:
    """rpm 60 allows 10 sends per 10 s. The workers report 9 sends in the last 3 s and
    one slot held, not yet used: the restarted limiter's 10-s window is full, so its next
    slot is 7 s or more away. Forgetting the held slot would grant one at once."""
    job = "t-lim-restart"
    fake_workers(actors, job, {"sends": [(0.5 + 0.5 * i, 1.0) for i in range(6)]},
                 {"sends": [(0.2, 1.0), (1.2, 1.0), (2.2, 1.0), (-0.3, 1.0)]})
    lim = limiter(actors, job, 60)
    stats = restart(lim)
    assert stats["restarted"] is True and stats["halted"] is None
    a = lease(lim, [1.0])
    assert a.starts == [] and a.retry_at is not None
    assert a.retry_at - a.now > 3.0, a  # ~6.7 s unless the machine stalled for seconds
    # one send fewer and the same window has room: the slot comes at once
    job2 = "t-lim-restart-room"
    fake_workers(actors, job2, {"sends": [(0.5 + 0.5 * i, 1.0) for i in range(6)]},
                 {"sends": [(0.2, 1.0), (1.2, 1.0), (2.2, 1.0)]})
    lim2 = limiter(actors, job2, 60)
    restart(lim2)
    b = lease(lim2, [1.0])
    assert len(b.starts) == 1 and b.starts[0] is not None and b.starts[0] - b.now <= HORIZON_S


def test_a_restart_learns_the_halt_from_the_workers(actors: list[Any]) -> None:
    job = "t-lim-halt"
    reason = "breaker: 20 requests in a row failed with HTTP 401"
    fake_workers(actors, job, {"sends": []}, {"sends": [(1.0, 1.0)], "halted": reason})
    lim = limiter(actors, job, 600)
    assert lease(lim, [1.0]).starts  # not halted before: its own copy is lost with it
    stats = restart(lim)
    assert stats["halted"] == reason
    a = lease(lim, [1.0, 1.0])
    assert a.exhausted and a.starts == []


def test_a_worker_that_cannot_answer_makes_every_window_start_full(
        actors: list[Any]) -> None:
    job = "t-lim-blind"
    fake_workers(actors, job, {"sends": []}, {"sends": [], "broken": True})
    lim = limiter(actors, job, 600)
    restart(lim)
    a = lease(lim, [1.0])
    # the 60-s window is full as of the restart: no slot for a whole window
    assert a.starts == [] and a.retry_at is not None and a.retry_at - a.now > 50.0, a
