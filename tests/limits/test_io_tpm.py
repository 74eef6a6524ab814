"""Input and output TPM windows (Anthropic): pure arithmetic, injected clock, no Ray."""

from __future__ import annotations

import asyncio
import bisect
import random

import pytest

from batchrun.limits.permits import LeaseAnswer, PermitPool, PermitTooLarge
from batchrun.limits.ratelimit import (
    SlotScheduler,
    Window,
    cost_covers,
    cost_max,
    units,
    windows_for,
)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def max_weight_in(sends: list[tuple[float, float]], window: float) -> float:
    """Most weight of ``sends`` (time, weight) inside any half-open ``window``."""
    sends = sorted(sends)
    times = [t for t, _ in sends]
    prefix = [0.0]
    for _, w in sends:
        prefix.append(prefix[-1] + w)
    return max((prefix[bisect.bisect_left(times, t + window)] - prefix[i]
                for i, t in enumerate(times)), default=0.0)


def test_units_and_covers() -> None:
    inp, out, tok = (Window(60, 10, tokens=True, part=p) for p in ("input", "output", "all"))
    assert [units(w, (30.0, 8.0)) for w in (inp, out, tok)] == [30.0, 8.0, 38.0]
    assert units(Window(60, 10), (30.0, 8.0)) == 1.0
    assert units(out, 30.0) == 0.0 and units(inp, 30.0) == 30.0  # a bare figure is input
    assert cost_covers((10.0, 5.0), (10.0, 4.0)) and not cost_covers((10.0, 5.0), (11.0, 1.0))
    assert cost_max([(1.0, 9.0), (5.0, 2.0)]) == (5.0, 9.0)
    assert [w.part for w in windows_for(60, None, 1000, 500)[2:]] == ["input", "output"]


def _run(seed: int, release: bool, seconds: float = 240
         ) -> tuple[list[tuple[float, float]], list[tuple[float, float]], int]:
    """Workers lease (input, max_tokens) slots; each answer uses less output than reserved
    and, with ``release``, gives the rest back at once."""
    rng = random.Random(seed)
    clock = Clock()
    s = SlotScheduler(windows_for(6000, None, 20_000, 4_000), clock, validity=0.1,
                      margin=0.0, horizon=0.5)
    ins, outs = [], []
    end = clock.t + seconds
    while clock.t < end:
        batch = [(float(rng.randint(50, 150)), 100.0) for _ in range(rng.randint(1, 20))]
        g = s.grant(batch)
        done = []
        for start, (inp, _) in zip(g.starts, batch):
            assert start is not None
            at = start + rng.uniform(0, 0.1)
            used = float(rng.randint(5, 60))  # far below max_tokens, as answers are
            ins.append((at, inp))
            outs.append((at, used))
            done.append((start, 100.0 - used))
        if release:
            s.release(done)
        clock.t += rng.expovariate(20.0)
    return ins, outs, len(ins)


@pytest.mark.parametrize("seed", range(4))
def test_input_and_output_windows_hold_with_release(seed: int) -> None:
    ins, outs, _ = _run(seed, release=True)
    assert max_weight_in(ins, 60.0) <= 20_000
    assert max_weight_in(outs, 60.0) <= 4_000


def test_release_lets_the_actual_output_through() -> None:
    _, _, n_kept = _run(7, release=False)
    _, outs_given, n_given = _run(7, release=True)
    # reserving max_tokens alone: 4,000 / 100 = 40 requests a minute; settling on the
    # actual count (~32 on average) lets about three times as many through
    assert n_given > 2 * n_kept
    assert max_weight_in(outs_given, 60.0) > 0.8 * 4_000  # the output limit is reached


def test_release_is_never_below_zero_and_unknown_slots_are_ignored() -> None:
    clock = Clock()
    s = SlotScheduler(windows_for(600, None, None, 100), clock, horizon=0.5)
    g = s.grant([(1.0, 100.0)])
    assert g.starts[0] is not None
    s.release([(g.starts[0], 500.0), (12345.0, 10.0)])  # more than reserved; a stranger
    clock.t += 1.0
    assert s.grant([(1.0, 100.0)]).starts[0] is not None  # the window is empty again
    assert s.grant([(1.0, 101.0)]).starts == [None]  # max_tokens above output_tpm: never


def test_permit_pool_sends_releases_with_the_next_lease() -> None:
    clock = Clock()
    sched = SlotScheduler(windows_for(6000, None, None, 200), clock, horizon=0.5)
    seen: list[list[tuple[float, float]]] = []

    async def lease(costs, usd, settle, spare, released=None):  # type: ignore[no-untyped-def]
        if released:
            seen.append(released)
            sched.release(released)
        g = sched.grant(costs)
        return LeaseAnswer(g.now, g.starts, g.retry_at, g.paused_until)

    async def main() -> None:
        pool = PermitPool(lease, validity=0.05, clock=clock)
        _, key = await pool.acquire_slot((10.0, 150.0))
        pool.release(key, 140.0)  # the answer used 10 of its 150
        _, key2 = await pool.acquire_slot((10.0, 150.0))  # fits only after the release
        assert seen == [[(key, 140.0)]] and key2 > 0
        with pytest.raises(PermitTooLarge, match="output tokens"):
            await pool.acquire((10.0, 201.0))

    asyncio.run(main())
