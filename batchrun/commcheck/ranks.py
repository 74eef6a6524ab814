"""What the driver needs from a launcher: call methods on ranks, with a deadline.

Ray actors (launch.py) and spawned processes (local.py) both implement
:class:`Ranks`; the checks in driver.py run unchanged on either.
"""

from __future__ import annotations

from typing import Any, Protocol

from batchrun.commcheck.localize import describe_lag
from batchrun.commcheck.plan import CommCheckError

__all__ = ["Calls", "RankFailed", "RankTimeout", "Ranks", "raise_for"]

Calls = dict[int, tuple[str, tuple[Any, ...]]]  # global rank -> (method, args)


class RankTimeout(CommCheckError):
    """Some ranks did not answer in time; they may be stuck in a collective for good."""


class RankFailed(CommCheckError):
    """A rank raised (the message names it and its node)."""


class Ranks(Protocol):
    def call(self, calls: Calls, timeout_s: float) -> dict[int, Any]:
        """Run the calls at once; every answer, or RankTimeout / RankFailed."""


def raise_for(timeout_s: float, missing: list[int], errors: dict[int, str],
              statuses: dict[int, dict[str, Any] | None], where: dict[int, str]) -> None:
    """One message naming every rank that failed or did not answer (and who lags)."""
    msgs = [f"rank {r} ({where.get(r, '?')}) failed: {e}" for r, e in sorted(errors.items())]
    if missing:
        msgs.insert(0, f"no answer within {timeout_s:g}s from " + ", ".join(
            f"rank {r} (node {where.get(r, '?')})" for r in missing)
            + " — " + describe_lag(statuses, where))
        raise RankTimeout("; ".join(msgs))
    if msgs:
        raise RankFailed("; ".join(msgs))
