"""The worker's side of the global rate limit: lease send slots in batches.

Requests that want to go out queue here with their token cost. One leasing task
asks the limiter for slots for everyone waiting, in one round trip, and wakes
each waiter at its slot. The limiter's slots are in its own clock; this side
maps them to the local clock with the round trip's bounds, so clock skew
between nodes cannot break the limit:

    limiter's "now" happened somewhere in [t_sent, t_received] (local clock)
    slot [start, start + validity]  ->  send no earlier than t_received + offset
                                        and no later than t_sent + offset + validity

A waiter that wakes too late for its slot (a slow event loop, a long round
trip) gives the slot up and queues again: a slot is never stretched.

Each lease also asks for *spare* slots, about as many as requests arrive here in
one slot's validity. Requests that come before the next lease (and those queued
while it was in flight) take a spare instead of a round trip. The limiter grants
spares only far from every limit, and counts them whether used or not, so the
limit stays exact; near a binding limit there are none and every request leases.

Where input and output tokens are limited apart (Anthropic), a cost is the pair
(input, max_tokens); ``acquire_slot`` returns the slot's key, and ``release(key, n)``
hands back the ``n`` output tokens the answer did not use (with the next lease).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from batchrun.errors import BudgetExhausted
from batchrun.limits.ratelimit import Cost, cost_covers, cost_max

__all__ = ["LeaseAnswer", "PermitPool", "PermitTooLarge"]

log = logging.getLogger("batchrun")
_SENT_KEEP_S = 61.0  # the longest window (60 s) and a margin: what a limiter restart needs


class PermitTooLarge(Exception):
    """The request's token cost is larger than the whole TPM limit: it can never be sent."""


def _tokens_text(cost: Cost) -> str:
    if isinstance(cost, tuple):
        return f"{cost[0]:.0f} input + {cost[1]:.0f} output tokens"
    return f"{cost:.0f} tokens"


@dataclass(frozen=True)
class LeaseAnswer:
    """What the limiter actor returns for one lease (plain data, cheap to serialize)."""

    now: float
    starts: list[float | None]
    retry_at: float | None
    paused_until: float
    exhausted: bool = False  # the budget refused the first request left without a slot
    spares: list[float] = field(default_factory=list)  # extra slots, for any request ...
    spare_cost: Cost = 0.0  # ... that costs no more than this


# lease(token costs, worst-case USD per request or None, settlements (reserved, actual),
#       spare slots wanted (how many, cost of each)[, output tokens released
#       (slot key, tokens): passed only when there are some])
LeaseFn = Callable[..., Awaitable[LeaseAnswer]]
_Slot = tuple[float, float, float]  # (earliest, latest) local send time, the limiter's key
_Waiter = tuple[Cost, float | None, "asyncio.Future[_Slot]"]
_RATE_EVERY_S = 0.2  # the arrival rate (which sizes the spares) is re-measured this often,
# or after 16 arrivals if sooner


class PermitPool:
    """Waiters queue with a cost; ``acquire`` returns when the caller may send at once."""

    def __init__(self, lease: LeaseFn, *, validity: float, max_batch: int = 256,
                 clock: Callable[[], float] = time.monotonic):
        self._lease = lease
        self._validity = validity
        self._max_batch = max_batch
        self._clock = clock
        self._waiting: deque[_Waiter] = deque()
        self._settle: list[tuple[float, float]] = []
        self._release: list[tuple[float, float]] = []  # (slot key, output tokens unused)
        self._sent: deque[tuple[float, Cost]] = deque()  # (local time, cost) of recent sends
        self._held: dict[object, tuple[float, Cost]] = {}  # (latest send time, cost)
        # (earliest, latest, cost, the limiter's key)
        self._spares: deque[tuple[float, float, Cost, float]] = deque()
        self._arrivals, self._rate, self._rate_since = 0, 0.0, clock()
        self.exhausted = False
        self._leaser: asyncio.Task[None] | None = None
        self._local_pause = 0.0
        self.round_trips = 0
        self.slots_dropped = 0
        self.spares_used = 0
        self.spares_expired = 0

    def pause(self, seconds: float) -> None:
        """Hold this worker's own sends too, without waiting for the next lease."""
        self._local_pause = max(self._local_pause, self._clock() + seconds)

    def recent_sends(self, window: float = _SENT_KEEP_S) -> list[tuple[float, Cost]]:
        """(age in seconds, cost) of this pool's sends in the last ``window``, and of the
        slots it holds but has not used yet (negative ages: the latest they may go out):
        what a restarted limiter needs to rebuild its log. Ages, not times: clocks differ."""
        now = self._clock()
        while self._sent and self._sent[0][0] < now - window:
            self._sent.popleft()
        held = [(now - latest, c) for latest, c in self._held.values()]
        held += [(now - latest, c) for _, latest, c, _ in self._spares]
        return [(now - t, c) for t, c in self._sent] + held

    def settle(self, reserved: float, actual: float) -> None:
        """Report what a reserved request cost; sent with the next lease (or ``flush``)."""
        self._settle.append((reserved, actual))

    def release(self, key: float, tokens: float) -> None:
        """``tokens`` of the output reserved under slot ``key`` were not used: the limiter
        frees them (sent with the next lease, or ``flush``)."""
        if tokens > 0:
            self._release.append((key, tokens))

    def _call(self, costs: list[Cost], usd: list[float] | None,
              settle: list[tuple[float, float]], spare: tuple[int, Cost]
              ) -> Awaitable[LeaseAnswer]:
        released, self._release = self._release, []
        if released:
            return self._lease(costs, usd, settle, spare, released)
        return self._lease(costs, usd, settle, spare)

    async def flush(self) -> None:
        """Send pending settlements now (at the end of a shard)."""
        if self._settle or self._release:
            pending, self._settle = self._settle, []
            await self._call([], [], pending, (0, 0.0))

    async def acquire(self, cost: Cost, usd: float | None = None) -> float:
        """Wait for a send slot (and a budget reservation of ``usd``); returns seconds waited.

        Raises ``BudgetExhausted`` when the budget refuses the reservation.
        """
        return (await self.acquire_slot(cost, usd))[0]

    async def acquire_slot(self, cost: Cost, usd: float | None = None) -> tuple[float, float]:
        """As ``acquire``, and the slot's key, for ``release``."""
        t0 = self._clock()
        self._arrivals += 1
        while True:
            if self.exhausted:
                raise BudgetExhausted("the job's budget is exhausted")
            held: object = object()
            slot = self._take_spare(cost) if usd is None else None
            if slot is None:
                fut: asyncio.Future[_Slot] = asyncio.get_running_loop().create_future()
                self._waiting.append((cost, usd, fut))
                if self._leaser is None or self._leaser.done():
                    self._leaser = asyncio.create_task(self._lease_loop())
                held = fut  # _grant holds the slot under this key as it hands it over
                try:
                    slot = await fut
                except BaseException:
                    self._held.pop(held, None)
                    raise
            earliest, latest, key = slot
            self._held[held] = (latest, cost)  # granted, not yet used: a restart must know
            try:
                now = self._clock()
                if earliest > now:
                    await asyncio.sleep(earliest - now)
                    now = self._clock()
            finally:
                self._held.pop(held, None)
            if now <= latest and now >= self._local_pause:
                self._sent.append((now, cost))
                while self._sent[0][0] < now - _SENT_KEEP_S:  # keep one window, not the job
                    self._sent.popleft()
                return now - t0, key
            self.slots_dropped += 1  # too late for the slot, or paused: ask again
            if self.slots_dropped in (100, 10_000):
                log.warning("%d send slots dropped unused: the limiter's round trip or this "
                            "event loop is slower than a slot (%.0f ms)", self.slots_dropped,
                            self._validity * 1e3)
            if usd is not None:
                self.settle(usd, 0.0)  # that slot's reservation is returned

    def _take_spare(self, cost: Cost) -> _Slot | None:
        now = self._clock()
        while self._spares and self._spares[0][1] < now:
            self._spares.popleft()
            self.spares_expired += 1
        if self._spares and cost_covers(self._spares[0][2], cost):
            earliest, latest, _, key = self._spares.popleft()
            self.spares_used += 1
            return earliest, latest, key
        return None

    def _spares_wanted(self, batch: list[_Waiter]) -> tuple[int, Cost]:
        """About the requests expected here within one slot's validity, less spares held."""
        if batch[0][1] is not None:
            return 0, 0.0  # a budget reserves per request: no spares
        now = self._clock()
        if now - self._rate_since >= _RATE_EVERY_S or (self._arrivals >= 16
                                                       and now > self._rate_since):
            self._rate = self._arrivals / (now - self._rate_since)
            self._arrivals, self._rate_since = 0, now
        n = min(self._max_batch, int(self._rate * self._validity)) - len(self._spares)
        return max(0, n), cost_max([w[0] for w in batch])

    def _keep_spares(self, answer: LeaseAnswer, t_sent: float, t_recv: float) -> None:
        """Map the spares to the local clock; the waiters queued meanwhile take them first."""
        for start in answer.spares:
            offset = start - answer.now
            self._spares.append((t_recv + offset, t_sent + offset + self._validity,
                                 answer.spare_cost, start))
        while self._waiting and self._spares:
            cost, usd, fut = self._waiting[0]
            if fut.done():
                self._waiting.popleft()
                continue
            slot = self._take_spare(cost) if usd is None else None
            if slot is None:
                return
            self._waiting.popleft()
            self._grant(fut, slot, cost)

    async def _lease_loop(self) -> None:
        while self._waiting:
            n = min(len(self._waiting), self._max_batch)
            batch = [self._waiting.popleft() for _ in range(n)]
            batch = [w for w in batch if not w[2].done()]  # cancelled waiters
            if not batch:
                continue
            usd = [w[1] or 0.0 for w in batch] if batch[0][1] is not None else None
            pending, self._settle = self._settle, []
            try:
                t_sent = self._clock()
                answer = await self._call([w[0] for w in batch], usd, pending,
                                          self._spares_wanted(batch))
                t_recv = self._clock()
            except BaseException as e:  # the limiter is unreachable: fail these waiters
                for _, _, f in batch:
                    if not f.done():
                        f.set_exception(e if isinstance(e, Exception) else RuntimeError(e))
                raise
            self.round_trips += 1
            self._hand_out(batch, answer, t_sent, t_recv)
            self._keep_spares(answer, t_sent, t_recv)
            if answer.exhausted:
                self._refuse_all()
                return
            if answer.retry_at is not None and self._waiting:
                await asyncio.sleep(max(0.0, answer.retry_at - answer.now))

    def _refuse_all(self) -> None:
        self.exhausted = True
        while self._waiting:
            _, _, fut = self._waiting.popleft()
            if not fut.done():
                fut.set_exception(BudgetExhausted("the job's budget is exhausted"))

    def _grant(self, fut: asyncio.Future[_Slot], slot: _Slot, cost: Cost) -> None:
        """Wake a waiter with its slot, held from now on: the waiter runs later, and a
        restarted limiter asking for ``recent_sends`` in between must see the slot."""
        self._held[fut] = (slot[1], cost)
        fut.set_result(slot)

    def _hand_out(self, batch: list[_Waiter], answer: LeaseAnswer,
                  t_sent: float, t_recv: float) -> None:
        for (cost, _, fut), start in zip(batch, answer.starts):
            if fut.done():
                continue
            if start is None:
                fut.set_exception(PermitTooLarge(
                    f"request of {_tokens_text(cost)} exceeds a token-per-minute limit"))
                continue
            offset = start - answer.now
            self._grant(fut, (t_recv + offset, t_sent + offset + self._validity, start), cost)
        # the waiters the limiter had no slot for go back to the front, in order
        for waiter in reversed(batch[len(answer.starts):]):
            self._waiting.appendleft(waiter)
