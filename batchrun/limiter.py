"""The global rate-limiter actor: a thin Ray shell around ``ratelimit.SlotScheduler``.

One per job, named ``batchrun:<job>:rate-limiter``. It takes no CPU, answers a
lease in microseconds, and is restarted by Ray if it dies. A restarted limiter
has lost its log of recent grants, so it starts with every window full: the
limit still holds, at the price of one window's pause (see ``block_all``).
"""

from __future__ import annotations

import time
from typing import Any

import ray

from batchrun.permits import LeaseAnswer
from batchrun.ratelimit import SlotScheduler, windows_for

__all__ = ["RateLimiter", "limiter_name"]

# Shared by the scheduler and the workers' permit pools: a slot's width, seconds.
SLOT_VALIDITY_S = 0.05


def limiter_name(job: str) -> str:
    return f"batchrun:{job}:rate-limiter"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class RateLimiter:
    def __init__(self, rpm: int, tpm: int | None, horizon_s: float = 0.5):
        self._sched = SlotScheduler(
            windows_for(rpm, tpm), time.monotonic, validity=SLOT_VALIDITY_S, horizon=horizon_s
        )
        self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        if self.restarted:
            self._sched.block_all(time.monotonic())
        self._leases = 0

    def lease(self, costs: list[float]) -> LeaseAnswer:
        self._leases += 1
        g = self._sched.grant(costs)
        return LeaseAnswer(g.now, g.starts, g.retry_at, g.paused_until)

    def pause(self, seconds: float) -> None:
        self._sched.pause_until(time.monotonic() + seconds)

    def stats(self) -> dict[str, Any]:
        return {"granted": self._sched.granted, "leases": self._leases, "restarted": self.restarted}
