"""The global rate-limiter actor: a thin Ray shell around ``ratelimit.SlotScheduler``.

One per job, named ``batchrun:<job>:rate-limiter``. It takes no CPU, answers a
lease in microseconds, and is restarted by Ray if it dies. A restarted limiter
has lost its log of recent grants, so it starts with every window full: the
limit still holds, at the price of one window's pause (see ``block_all``). It asks
the workers for their recent sends, and for the halt, if the job was stopping.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import ray

from batchrun.limits.permits import LeaseAnswer
from batchrun.limits.ratelimit import SlotScheduler, windows_for
from batchrun.money.budget import DailyLedger
from batchrun.money.spending import Spending

__all__ = ["BudgetConfig", "RateLimiter", "limiter_name"]

# Shared by the scheduler and the workers' permit pools: a slot's width, seconds.
SLOT_VALIDITY_S = 0.05


def limiter_name(job: str) -> str:
    return f"batchrun:{job}:rate-limiter"


@dataclass(frozen=True)
class BudgetConfig:
    """What the limiter's spending gate needs (plain data: it is an actor argument)."""

    job_cap_usd: float | None
    daily_usd: float | None = None
    ledger_dir: str | None = None
    timezone: str = "UTC"
    job_id: str = ""


def _spending(cfg: BudgetConfig | None) -> Spending | None:
    if cfg is None or (cfg.job_cap_usd is None and cfg.daily_usd is None):
        return None
    ledger = None
    if cfg.daily_usd is not None and cfg.ledger_dir:
        ledger = DailyLedger(cfg.ledger_dir, cfg.timezone, cfg.daily_usd)
    return Spending(cfg.job_cap_usd, ledger, cfg.job_id)


def _charge_crashed_run(cfg: BudgetConfig | None) -> None:
    if cfg is not None and cfg.daily_usd is not None and cfg.ledger_dir:
        DailyLedger(cfg.ledger_dir, cfg.timezone, cfg.daily_usd).charge_stale(cfg.job_id)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class RateLimiter:
    def __init__(self, job: str, rpm: int, tpm: int | None, budget: BudgetConfig | None = None,
                 horizon_s: float = 0.5):
        self._sched = SlotScheduler(
            windows_for(rpm, tpm), time.monotonic, validity=SLOT_VALIDITY_S, horizon=horizon_s
        )
        self._halted: str | None = None  # why the job stops (breaker, error rate), if it does
        with warnings.catch_warnings():  # deprecated in 2.60 with no replacement for this
            warnings.simplefilter("ignore")
            self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        if self.restarted:
            self._recover(job)
        # A restarted limiter has lost its reservations: it refuses all spending
        # (the run stops as budget-exhausted; a rerun recomputes from the results).
        if not self.restarted:
            _charge_crashed_run(budget)
        self._spending = _spending(budget)
        if self.restarted and self._spending is not None:
            self._spending.exhausted = True
        self._leases = 0

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
            answers: list[list[tuple[float, float]]] = ray.get(refs, timeout=10)
            reasons: list[str | None] = ray.get(halts, timeout=10)
            self._halted = next((h for h in reasons if h), None)
        except (ray.exceptions.RayError, ValueError, TimeoutError):
            self._sched.block_all(time.monotonic())
            return
        now = time.monotonic()
        self._sched.restore([(now - age, cost) for sends in answers for age, cost in sends])

    def lease(self, costs: list[float], usd: list[float] | None = None,
              settle: list[tuple[float, float]] | None = None,
              spare: tuple[int, float] = (0, 0.0)) -> LeaseAnswer:
        """Send slots for a prefix of ``costs``; with ``usd``, each one's worst case reserved.

        ``spare`` = (n, cost): also up to n slots for requests not asked for yet
        (see ``SlotScheduler.spare``); never with a budget, which must reserve first.
        """
        self._leases += 1
        sp = self._spending
        if sp is not None:
            for reserved, actual in settle or ():
                sp.settle(reserved, actual)
        if self._halted is not None:  # the job is stopping: no more slots for anyone
            if sp is not None:
                sp.flush()
            return LeaseAnswer(time.monotonic(), [], None, 0.0, exhausted=True)
        n = len(costs)
        if sp is not None and usd is not None:
            n = next((i for i, u in enumerate(usd) if not sp.try_reserve(u)), n)
        g = self._sched.grant(costs[:n])
        if sp is not None and usd is not None:
            for i in range(n):  # reservations of requests that got no slot this time
                if i >= len(g.starts) or g.starts[i] is None:
                    sp.release(usd[i])
            sp.flush()
        exhausted = sp is not None and sp.exhausted and len(g.starts) == n
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
        return self._spending is not None and self._spending.exhausted

    def close(self) -> dict[str, Any]:
        """Hand unused daily allowance back; returns the final figures."""
        if self._spending is not None:
            self._spending.close()
        return self.stats()

    def pause(self, seconds: float) -> None:
        self._sched.pause_until(time.monotonic() + seconds)

    def stats(self) -> dict[str, Any]:
        sp = self._spending
        return {"granted": self._sched.granted, "leases": self._leases,
                "restarted": self.restarted, "halted": self._halted,
                "spent_usd": sp.book.spent if sp else None,
                "reserved_usd": sp.book.reserved if sp else None,
                "budget_exhausted": bool(sp and sp.exhausted)}
