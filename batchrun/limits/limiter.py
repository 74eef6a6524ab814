"""The global rate-limiter actor: a thin Ray shell around ``ratelimit.SlotScheduler``
and, with a budget, the job's ``money.gate.Gate``.

One per job, named ``batchrun:<job>:rate-limiter``. It takes no CPU, answers a
lease in microseconds, and is restarted by Ray if it dies. A lease does no file I/O:
the gate reserves from daily allowance drawn ahead, and a thread of the gate's own
writes the ledger (a lease waits only when that allowance is used up, until the next
draw comes back). A restarted limiter has lost its log of recent grants, so it starts
with every window full: the limit still holds, at the price of one window's pause (see
``block_all``). It asks the workers for their recent sends, and for the halt, if the
job was stopping.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import ray

from batchrun.limits.permits import LeaseAnswer
from batchrun.limits.ratelimit import Cost, SlotScheduler, windows_for
from batchrun.money.gate import BLOCK_USD, BudgetConfig, Gate

__all__ = ["BudgetConfig", "RateLimiter", "limiter_name"]

# Shared by the scheduler and the workers' permit pools: a slot's width, seconds.
SLOT_VALIDITY_S = 0.05


def limiter_name(job: str) -> str:
    return f"batchrun:{job}:rate-limiter"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class RateLimiter:
    def __init__(self, job: str, rpm: int, tpm: int | None, budget: BudgetConfig | None = None,
                 horizon_s: float = 0.5, input_tpm: int | None = None,
                 output_tpm: int | None = None):
        self._sched = SlotScheduler(
            windows_for(rpm, tpm, input_tpm, output_tpm), time.monotonic,
            validity=SLOT_VALIDITY_S, horizon=horizon_s)
        self._halted: str | None = None  # why the job stops (breaker, error rate), if it does
        self._spent_out = False  # exhaust(): a cost the gate does not see (engine GPU time)
        with warnings.catch_warnings():  # deprecated in 2.60 with no replacement for this
            warnings.simplefilter("ignore")
            self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        if self.restarted:
            self._recover(job)
        # A restarted limiter has lost its reservations: it refuses all spending
        # (the run stops as budget-exhausted; a rerun recomputes from the results).
        self._gate: Gate | None = None
        if budget is not None:
            self._gate = Gate.open(budget, block_usd=BLOCK_USD, restarted=self.restarted)
            if not self.restarted:
                self._gate.charge_crashed_run()
                self._gate.start()
        self._leases = 0
        self._closed = False

    def _recover(self, job: str) -> None:
        """Rebuild the window log from the workers' own record of their recent sends, and
        the halt, if the job was stopping: every worker keeps its reason (worker.halt).

        Each worker reports ages; an age taken from our clock *after* its answer
        arrived maps every send later than it happened, which only makes the windows
        stricter. If any worker fails to answer, every window starts full instead.
        """
        prefix = f"batchrun:{job}:worker-"
        try:
            workers = [ray.get_actor(n) for n in ray.util.list_named_actors()
                       if n.startswith(prefix)]
            refs = [w.recent_sends.remote() for w in workers]
            halts = [w.halted.remote() for w in workers]
            answers: list[list[tuple[float, Cost]]] = ray.get(refs, timeout=10)
            reasons: list[str | None] = ray.get(halts, timeout=10)
            self._halted = next((h for h in reasons if h), None)
        except (ray.exceptions.RayError, ValueError, TimeoutError):
            self._sched.block_all(time.monotonic())
            return
        now = time.monotonic()
        self._sched.restore([(now - age, cost) for sends in answers for age, cost in sends])

    def lease(self, costs: list[Cost], usd: list[float] | None = None,
              settle: list[tuple[float, float]] | None = None,
              spare: tuple[int, Cost] = (0, 0.0),
              released: list[tuple[float, float]] | None = None) -> LeaseAnswer:
        """Send slots for a prefix of ``costs``; with ``usd``, each one's worst case reserved.

        ``spare`` = (n, cost): also up to n slots for requests not asked for yet
        (see ``SlotScheduler.spare``); never with a budget, which must reserve first.
        ``released``: (slot, output tokens unused) of answered requests, given back.
        """
        self._leases += 1
        if released:
            self._sched.release(released)
        gate = self._gate
        if gate is not None:
            for reserved, actual in settle or ():
                gate.settle(reserved, actual)
        if self._halted is not None or self._spent_out:  # stopping: no more slots for anyone
            return LeaseAnswer(time.monotonic(), [], None, 0.0, exhausted=True)
        n = len(costs)
        if gate is not None and usd is not None:
            n = gate.reserve_prefix(usd)
        g = self._sched.grant(costs[:n])
        if gate is not None and usd is not None:
            for i in range(n):  # reservations of requests that got no slot this time
                if i >= len(g.starts) or g.starts[i] is None:
                    gate.release(usd[i])
        exhausted = gate is not None and gate.exhausted and len(g.starts) == n
        spares: list[float] = []
        if spare[0] > 0 and usd is None and g.retry_at is None and len(g.starts) == n:
            spares = self._sched.spare(spare[1], spare[0])
        return LeaseAnswer(g.now, g.starts, g.retry_at, g.paused_until, exhausted,
                           spares, spare[1])

    def halt(self, reason: str) -> None:
        """Stop the job: every worker's next lease is refused (its rows stay unsent)."""
        if self._halted is None:
            self._halted = reason

    def halted(self) -> str | None:
        """Why the job was stopped (the first reason given), or None."""
        return self._halted

    def exhausted(self) -> bool:
        return self._spent_out or (self._gate is not None and self._gate.exhausted)

    def exhaust(self) -> None:
        """The budget is spent elsewhere (an engine's GPU time, engine/fleet.py): refuse
        every lease from now on; the job ends as budget-exhausted (exit 4)."""
        self._spent_out = True

    def close(self) -> dict[str, Any]:
        """Write what was settled and hand unused daily allowance back (every request has
        come back by now); returns the final figures. Once: a later call only reports."""
        if self._gate is not None and not self._closed:
            self._closed = True
            self._gate.close(release_all=True)
        return self.stats()

    def __ray_shutdown__(self) -> None:
        """Ray calls this when the actor ends because its last handle is gone (a Ray Data
        pipeline's limiter, ``batchrun.ray_data``, when its plan is dropped): the unused
        allowance goes back then, not charged to the next run. Not after ``ray.kill``."""
        self.close()

    def pause(self, seconds: float) -> None:
        self._sched.pause_until(time.monotonic() + seconds)

    def stats(self) -> dict[str, Any]:
        gate = self._gate
        return {"granted": self._sched.granted, "leases": self._leases,
                "restarted": self.restarted, "halted": self._halted,
                "spent_usd": gate.book.spent if gate else None,
                "reserved_usd": gate.book.reserved if gate else None,
                "budget_exhausted": bool(gate and gate.exhausted),
                "ledger_draws": gate.draws if gate else None}
