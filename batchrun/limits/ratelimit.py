"""Pure rate-limit arithmetic: the schedule the global limiter hands out.

The limiter grants *send slots*: permit i may be sent only inside
``[start_i, start_i + validity]`` (limiter clock). A worker that cannot send in
time drops the permit and asks again. Slots are granted in non-decreasing start
order, and a new slot x for a window of W seconds and limit L is admitted only if

    #{ i : start_i > x - W - validity - margin } < L          (requests)
    sum{ cost_i : start_i > x - W - validity - margin } + c <= L   (tokens)

Why that is exact: take any W-second window holding sends, and j the one of them
with the latest start. Every other send i in it has s_i <= start_i + validity and
s_i > s_j - W >= start_j - W, so start_i > start_j - W - validity: it was counted
when j was granted. So no W-second window ever holds more than L sends, whatever
the clocks of the nodes say, as long as a worker only sends inside its slot (the
worker checks that against its own clock using the lease's round-trip bounds).
``margin`` absorbs the client-to-server delay between a send and its arrival.

The cost of exactness is ``validity + margin`` per window: with the defaults
(0.05 s + 0.12 s) a 10-second window admits 98.3% of its nominal rate.

Slots are also paced: consecutive starts are at least ``reach / limit`` apart
for the tightest window (and ``cost * reach / limit`` for tokens). Without
pacing, a window opens with a burst of L requests, the provider takes a
while to accept them all, and the tail of the burst lands in the next window;
evenly spaced sends turn the same arrival jitter into a request or two.

Anthropic limits input and output tokens apart: a request's cost is then a pair
(input, output), ``Window.part`` says which side a token window counts, and the output
side (reserved as ``max_tokens``) is ``release``d down to the actual count once the answer
is in. Lowering a count already granted keeps the proof above: every window still held
at most ``L`` when each later slot was granted, and the actual sends hold no more.

Workers lease slots in batches (one round trip for up to ``max_batch`` requests)
and only up to ``horizon`` seconds ahead, so no worker hoards the future. A 429
anywhere pauses every grant until its Retry-After has passed.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Cost", "Grant", "SlotScheduler", "Window", "cost_covers", "cost_max", "units",
           "windows_for"]

# A request's cost: tokens (one figure), or (input, output) where those are limited apart.
Cost = float | tuple[float, float]


@dataclass(frozen=True)
class Window:
    """At most ``limit`` units (requests or tokens) in any ``seconds``-long window."""

    seconds: float
    limit: float
    tokens: bool = False
    part: str = "all"  # of a token window: "all" (input + output), "input" or "output"


def units(window: Window, cost: Cost) -> float:
    """What one request of ``cost`` counts in ``window`` (a bare figure is all input)."""
    if not window.tokens:
        return 1.0
    if isinstance(cost, tuple):
        inp, out = cost
        return inp + out if window.part == "all" else inp if window.part == "input" else out
    return 0.0 if window.part == "output" else float(cost)


def cost_covers(a: Cost, b: Cost) -> bool:
    """Whether a slot granted for ``a`` may carry a request of ``b`` (each side no less)."""
    if isinstance(a, tuple) or isinstance(b, tuple):
        a2 = a if isinstance(a, tuple) else (a, 0.0)
        b2 = b if isinstance(b, tuple) else (b, 0.0)
        return a2[0] >= b2[0] and a2[1] >= b2[1]
    return a >= b


def cost_max(costs: Sequence[Cost]) -> Cost:
    """The least cost that covers each of ``costs``."""
    if any(isinstance(c, tuple) for c in costs):
        pairs = [c if isinstance(c, tuple) else (c, 0.0) for c in costs]
        return max(p[0] for p in pairs), max(p[1] for p in pairs)
    return max(costs)  # type: ignore[type-var]


def windows_for(rpm: int, tpm: int | None, input_tpm: int | None = None,
                output_tpm: int | None = None) -> list[Window]:
    """RPM over 60 s, RPM/6 over 10 s (no bursts of a whole minute), and TPM, input TPM
    and output TPM over 60 s, each where given."""
    out = [Window(60.0, rpm), Window(10.0, max(1, math.floor(rpm / 6)))]
    for limit, part in ((tpm, "all"), (input_tpm, "input"), (output_tpm, "output")):
        if limit:
            out.append(Window(60.0, limit, tokens=True, part=part))
    return out


@dataclass(frozen=True)
class Grant:
    """The answer to one lease: a start time per granted cost (limiter clock).

    ``starts`` covers a prefix of the costs asked for, None where a cost is larger
    than a token window's whole limit (it can never be sent); ``retry_at`` is when
    the next slot comes inside the horizon (wait until then before asking again).
    """

    now: float
    starts: list[float | None]
    retry_at: float | None
    paused_until: float


class _WindowLog:
    """The starts (and costs) granted within the last window, oldest first."""

    def __init__(self, window: Window, reach: float):
        self.window = window
        self.reach = reach  # W + validity + margin: how long a grant keeps counting
        self.log: deque[list[float]] = deque()  # [start, units]: release lowers units
        self.total = 0.0
        # where output tokens count, the entries by start, so a release finds its own
        self.by_start: dict[float, list[list[float]]] | None = (
            {} if window.tokens and window.part != "input" else None)

    def forget_before(self, t: float) -> None:
        while self.log and self.log[0][0] <= t - self.reach:
            entry = self.log.popleft()
            self.total -= entry[1]
            if self.by_start is not None:
                same = self.by_start.get(entry[0])
                if same is not None:
                    same.remove(entry)
                    if not same:
                        del self.by_start[entry[0]]

    def release(self, start: float, amount: float) -> None:
        """Lower the entry granted at ``start`` by ``amount`` (never below zero)."""
        if self.by_start is None:
            return
        for entry in self.by_start.get(start, ())[:1]:
            cut = min(amount, entry[1])
            entry[1] -= cut
            self.total -= cut

    def earliest(self, x: float, cost: float) -> float:
        """The earliest start >= x at which one more unit of ``cost`` fits."""
        need = self.total + cost - self.window.limit
        if need <= 1e-9:
            return x
        for start, c in self.log:  # drop the oldest until enough has left the window
            need -= c
            if need <= 1e-9:
                return max(x, start + self.reach)
        return math.inf  # only when cost alone exceeds the limit; callers reject it first

    def add(self, start: float, cost: float) -> None:
        entry = [start, cost]
        self.log.append(entry)
        self.total += cost
        if self.by_start is not None:
            self.by_start.setdefault(start, []).append(entry)


class SlotScheduler:
    """Grants send slots under several sliding windows; single-threaded, clock injected."""

    def __init__(
        self,
        windows: Sequence[Window],
        clock: Callable[[], float],
        *,
        validity: float = 0.05,
        margin: float = 0.12,
        horizon: float = 0.5,
    ):
        self.clock = clock
        self.validity = validity
        self.horizon = horizon
        self._logs = [_WindowLog(w, w.seconds + validity + margin) for w in windows]
        self._last = -math.inf
        self._next_paced = -math.inf  # earliest start the pacing allows for the next slot
        self.paused_until = -math.inf
        self.granted = 0

    def pause_until(self, t: float) -> None:
        """No slot may start before ``t`` (a provider's Retry-After, for everyone)."""
        self.paused_until = max(self.paused_until, t)

    def block_all(self, now: float) -> None:
        """Treat every window as full as of ``now``: the safe state after a lost log."""
        for log in self._logs:
            log.log.clear()
            log.total = 0.0
            if log.by_start is not None:
                log.by_start.clear()
            log.add(now, log.window.limit)
        self._last = max(self._last, now)

    def release(self, settled: Sequence[tuple[float, float]]) -> None:
        """(start, output tokens not used) of answered requests: the output side of each
        one's slot, reserved as ``max_tokens``, comes down to the actual count."""
        for start, amount in settled:
            for lg in self._logs:
                lg.release(start, amount)

    def restore(self, sends: Sequence[tuple[float, Cost]]) -> None:
        """Rebuild the log from (start, cost) of recent sends, e.g. after a restart.

        Starts must not be earlier than the real sends (callers map them late), so
        the windows count them at least as long as they should.
        """
        for start, cost in sorted(sends):
            for lg in self._logs:
                lg.add(start, units(lg.window, cost))
            self._last = max(self._last, start)

    def _fits(self, cost: Cost) -> bool:
        return all(units(lg.window, cost) <= lg.window.limit for lg in self._logs)

    def _spacing(self, cost: Cost) -> float:
        # Not paced by an output window: a slot reserves max_tokens there, but answers use
        # far less and give the rest back; pacing by the reservation would cap the rate
        # at output_tpm / max_tokens whatever the answers use.
        return max(lg.reach * units(lg.window, cost) / lg.window.limit for lg in self._logs
                   if lg.window.part != "output" or not lg.window.tokens)

    def _next_start(self, cost: Cost, now: float) -> float:
        x = max(now, self._last, self._next_paced, self.paused_until)
        while True:  # each window may push x later; repeat until all agree
            y = x
            for lg in self._logs:
                y = max(y, lg.earliest(y, units(lg.window, cost)))
            if y == x:
                return x
            x = y

    def grant(self, costs: Sequence[Cost]) -> Grant:
        """Slots for a prefix of ``costs`` (tokens per request) within the horizon."""
        now = self.clock()
        for lg in self._logs:
            lg.forget_before(now)
        starts: list[float | None] = []
        retry_at = None
        for cost in costs:
            if not self._fits(cost):
                starts.append(None)
                continue
            x = self._next_start(cost, now)
            if x > now + self.horizon:
                retry_at = x - self.horizon
                break
            for lg in self._logs:
                lg.add(x, units(lg.window, cost))
            self._last = x
            self._next_paced = x + self._spacing(cost)
            starts.append(x)
        self.granted += sum(s is not None for s in starts)
        return Grant(now, starts, retry_at, self.paused_until)

    def spare(self, cost: Cost, n: int, *, fill: float = 0.5, within: float = 0.01
              ) -> list[float]:
        """Up to ``n`` extra slots of ``cost``, starting within ``within`` s of now.

        A worker holds them for requests that come before its next lease, which
        saves that lease's round trip. They are granted like any slot, so an unused
        one still counts in every window (that keeps the limit exact), and only while
        every window stays under ``fill`` of its limit: near a binding limit, none.
        """
        now = self.clock()
        if n <= 0 or not self._fits(cost) or self.paused_until > now:
            return []
        for lg in self._logs:
            lg.forget_before(now)
        x0 = self._next_start(cost, now)
        if x0 > now + within:
            return []
        # How many fit: under `fill` in every window, and paced within `within` of now.
        # Below `fill` (< 1) each window admits them at once, so the starts need no search.
        k = n
        for lg in self._logs:
            unit = units(lg.window, cost)
            if unit > 0:
                k = min(k, math.floor((fill * lg.window.limit - lg.total) / unit + 1e-9))
        gap = self._spacing(cost)
        if gap > 0:
            k = min(k, math.floor((now + within - x0) / gap) + 1)
        starts = [x0 + i * gap for i in range(max(0, k))]
        for lg in self._logs:
            unit = units(lg.window, cost)
            for x in starts:
                lg.add(x, unit)
        if starts:
            self._last = starts[-1]
            self._next_paced = starts[-1] + gap
        self.granted += len(starts)
        return starts
