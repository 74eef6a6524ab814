"""The slot scheduler, pure: injected clock, no Ray, no HTTP."""

from __future__ import annotations

import bisect
import random

import pytest

from batchrun.limits.ratelimit import SlotScheduler, Window, windows_for


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def max_in_window(times: list[float], window: float) -> int:
    times = sorted(times)
    return max((bisect.bisect_left(times, t + window) - i for i, t in enumerate(times)), default=0)


def simulate(
    rpm: int, tpm: int | None, seconds: float, seed: int, costs: tuple[int, int] = (1, 1),
    spares: int = 0,
) -> tuple[list[float], list[tuple[float, int]], SlotScheduler]:
    """Workers lease at random moments and send at a random point inside each slot;
    with ``spares``, each lease also takes spare slots, and most of them are used."""
    rng = random.Random(seed)
    clock = Clock()
    s = SlotScheduler(windows_for(rpm, tpm), clock, validity=0.1, margin=0.0, horizon=0.5)
    sends: list[float] = []
    weighted: list[tuple[float, int]] = []
    end = clock.t + seconds
    while clock.t < end:
        batch = [rng.randint(*costs) for _ in range(rng.randint(1, 40))]
        g = s.grant(batch)
        for start, cost in zip(g.starts, batch):
            assert start is not None
            at = start + rng.uniform(0, 0.1)  # anywhere in [start, start + validity]
            sends.append(at)
            weighted.append((at, cost))
        spare_cost = max(batch)
        for start in s.spare(spare_cost, spares):
            if rng.random() < 0.8:  # some spares go unused
                at = start + rng.uniform(0, 0.1)
                sends.append(at)
                weighted.append((at, spare_cost))
        clock.t += rng.expovariate(20.0)
    return sends, weighted, s


@pytest.mark.parametrize("seed", range(5))
def test_no_window_ever_exceeds_rpm_or_its_sixth(seed: int) -> None:
    sends, _, _ = simulate(rpm=600, tpm=None, seconds=180, seed=seed)
    assert max_in_window(sends, 60.0) <= 600
    assert max_in_window(sends, 10.0) <= 100


@pytest.mark.parametrize("seed", range(3))
def test_spare_slots_keep_every_window_exact(seed: int) -> None:
    sends, weighted, _ = simulate(rpm=6000, tpm=60_000, seconds=150, seed=seed,
                                  costs=(5, 40), spares=30)
    assert max_in_window(sends, 60.0) <= 6000 and max_in_window(sends, 10.0) <= 1000
    weighted.sort()
    times = [t for t, _ in weighted]
    for i, (t, _) in enumerate(weighted):
        assert sum(c for _, c in weighted[i:bisect.bisect_left(times, t + 60.0)]) <= 60_000


def test_spares_come_far_from_the_limit_and_stop_near_it() -> None:
    clock = Clock()
    far = SlotScheduler(windows_for(10_000_000, None), clock)
    assert len(far.spare(1.0, 100)) == 100  # unlimited in practice: every spare asked
    near = SlotScheduler(windows_for(3000, None), clock, validity=0.05, margin=0.12)
    assert len(near.spare(1.0, 100)) == 1  # pacing: one slot per 20 ms at this rate
    for _ in range(260):  # past half of the 10 s window (500)
        near.grant([1.0])
        clock.t += 0.02
    assert near.spare(1.0, 100) == []
    near.pause_until(clock.t + 1)
    assert far.spare(1.0, 5) and not near.spare(1.0, 5)


def test_steady_rate_reaches_98_percent_of_the_limit() -> None:
    sends, _, _ = simulate(rpm=3000, tpm=None, seconds=240, seed=7)
    # after the first window, the 10 s window admits 500 per (10 + validity) s
    steady = [t for t in sends if 1000 + 60 <= t < 1000 + 240]
    rate_per_min = len(steady) / 180 * 60
    assert rate_per_min >= 0.98 * 3000, rate_per_min
    assert max_in_window(sends, 60.0) <= 3000


def test_tpm_window_holds_with_varied_costs() -> None:
    _, weighted, _ = simulate(rpm=100_000, tpm=20_000, seconds=150, seed=3, costs=(50, 900))
    weighted.sort()
    times = [t for t, _ in weighted]
    for i, (t, _) in enumerate(weighted):
        j = bisect.bisect_left(times, t + 60.0)
        assert sum(c for _, c in weighted[i:j]) <= 20_000


def test_cost_larger_than_tpm_is_rejected_not_queued() -> None:
    s = SlotScheduler([Window(60, 100), Window(60, 1000, tokens=True)], Clock(), horizon=5.0)
    g = s.grant([10, 5000, 10])
    assert g.starts[1] is None and g.starts[0] is not None and g.starts[2] is not None


def test_slots_are_paced_evenly_not_burst() -> None:
    clock = Clock()
    s = SlotScheduler([Window(10, 50)], clock, validity=0.1, margin=0.0, horizon=1.0)
    g = s.grant([1] * 20)
    gaps = [b - a for a, b in zip(g.starts, g.starts[1:])]
    assert len(g.starts) == 5 and all(gap == pytest.approx(10.1 / 50) for gap in gaps)


def test_horizon_caps_a_lease_and_says_when_to_return() -> None:
    clock = Clock()
    s = SlotScheduler([Window(10, 5)], clock, validity=0.1, margin=0.0, horizon=0.5)
    g = s.grant([1] * 8)
    assert len(g.starts) == 1
    assert g.retry_at == pytest.approx(clock.t + 10.1 / 5 - 0.5)


def test_pause_delays_every_later_grant() -> None:
    clock = Clock()
    s = SlotScheduler([Window(60, 1000)], clock, horizon=0.5)
    s.pause_until(clock.t + 3)
    g = s.grant([1])
    assert g.starts == [] and g.retry_at == pytest.approx(clock.t + 2.5)
    clock.t += 2.6
    assert s.grant([1]).starts[0] == pytest.approx(clock.t + 0.4)


def test_block_all_after_a_restart_keeps_the_limit() -> None:
    clock = Clock()
    s = SlotScheduler(windows_for(60, None), clock, validity=0.1, margin=0.0)
    s.block_all(clock.t)
    assert s.grant([1]).starts == []
    clock.t += 60.15
    assert len(s.grant([1]).starts) == 1


def test_restore_from_recent_sends_keeps_the_window_full() -> None:
    clock = Clock()
    s = SlotScheduler(windows_for(60, None), clock, validity=0.1, margin=0.0, horizon=0.5)
    # a restarted limiter learns that 10 requests went out in the last 5 seconds
    s.restore([(clock.t - 5 + i * 0.5, 1.0) for i in range(10)])
    assert s.grant([1]).starts == []  # the 10-second window (limit 10) is full
    clock.t += 5.2  # the oldest restored send leaves the window
    assert len(s.grant([1]).starts) == 1


def test_permit_pool_keeps_one_window_of_sends_not_the_whole_job() -> None:
    import asyncio

    from batchrun.limits.permits import LeaseAnswer, PermitPool

    clock = Clock()

    async def lease(costs, usd, settle, spare):
        return LeaseAnswer(clock.t, [clock.t] * len(costs), None, 0.0)

    async def main() -> int:
        pool = PermitPool(lease, validity=0.05, clock=clock)
        for _ in range(300):
            await pool.acquire(1.0)
            clock.t += 1.0  # one send a second for five minutes
        return len(pool._sent)  # what it holds between restarts, not what it reports

    assert asyncio.run(main()) <= 62


def test_permit_pool_serves_requests_from_spares_between_leases() -> None:
    import asyncio

    from batchrun.limits.permits import LeaseAnswer, PermitPool

    clock = Clock()
    asked: list[tuple[int, float]] = []

    async def lease(costs, usd, settle, spare):
        asked.append(spare)
        return LeaseAnswer(clock.t, [clock.t] * len(costs), None, 0.0,
                           spares=[clock.t] * spare[0], spare_cost=spare[1])

    async def main() -> PermitPool:
        pool = PermitPool(lease, validity=0.05, clock=clock)
        for _ in range(2000):  # 10,000 requests a second: 500 per slot validity
            await pool.acquire(1.0)
            clock.t += 0.0001
        held = pool.recent_sends(window=0.0)  # spares held count as held slots
        assert len(held) == len(pool._spares) > 0 and all(age < 0 for age, _ in held)
        clock.t += 1.0
        await pool.acquire(2.0)  # costlier than the spares: leases; expired ones dropped
        return pool

    pool = asyncio.run(main())
    assert pool.spares_used >= 1900 and pool.round_trips <= 30
    assert pool.spares_expired > 0 and asked[-1][1] == 2.0
    assert all(n <= 256 for n, _ in asked)


def test_a_slot_handed_to_a_waiter_counts_as_held_before_the_waiter_runs() -> None:
    import asyncio

    from batchrun.limits.permits import LeaseAnswer, PermitPool

    clock = Clock()
    seen: list[list[tuple[float, float]]] = []
    pool: PermitPool

    async def lease(costs, usd, settle, spare):
        # The second call comes straight after the first one's hand-out, before the
        # first waiter has resumed: what would a restarted limiter learn now?
        seen.append(pool.recent_sends())
        return LeaseAnswer(clock.t, [clock.t], None, 0.0)  # one slot per lease

    async def main() -> None:
        nonlocal pool
        pool = PermitPool(lease, validity=0.05, clock=clock)
        await asyncio.gather(pool.acquire(7.0), pool.acquire(7.0))

    asyncio.run(main())
    assert seen[0] == [] and seen[1] == [(pytest.approx(-0.05), 7.0)]  # held, not yet sent
    assert not pool._held and len(pool._sent) == 2
