"""The job's spending gate: its own cap plus the shared daily ledger, in one place.

Lives inside the limiter actor, so a reservation rides on the same round trip
as the send slot it pays for. Every request reserves its worst case (prompt
estimate + 2% + ``max_tokens``) before it may be sent, and settles with what it
really cost when the answer comes back; the cap holds with any number of
requests in flight because the sum of reservations and spend never exceeds it.

The daily allowance is drawn from the file ledger in chunks, so the ledger's
file lock is taken once per chunk, not per request. Once a reservation fails
the gate stays shut for the rest of the run: dispatch stops, the rows left are
unsent (a later run with a new day or a raised cap resumes them).
"""

from __future__ import annotations

from batchrun.money.budget import BudgetBook, DailyLedger

__all__ = ["Spending"]


class Spending:
    def __init__(self, job_cap: float | None, ledger: DailyLedger | None = None,
                 job_id: str = "", chunk_usd: float = 0.05):
        self.book = BudgetBook(job_cap)
        self._ledger = ledger
        self._job_id = job_id
        self._chunk = chunk_usd
        self._daily_free = 0.0  # drawn from the ledger, not yet reserved by a request
        self._pending: list[tuple[float, float]] = []
        self.exhausted = False

    def _draw_daily(self, usd: float) -> bool:
        if self._ledger is None:
            return True
        if self._daily_free < usd:
            self._daily_free += self._ledger.reserve_chunk(self._job_id, max(usd, self._chunk))
        if self._daily_free < usd:
            return False
        self._daily_free -= usd
        return True

    def try_reserve(self, usd: float) -> bool:
        if self.exhausted:
            return False
        if self.book.try_reserve(usd):
            if self._draw_daily(usd):
                return True
            self.book.release(usd)
        self.exhausted = True
        return False

    def release(self, usd: float) -> None:
        """A reservation whose request was never sent."""
        self.book.release(usd)
        self._daily_free += usd

    def settle(self, reserved: float, actual: float) -> None:
        self.book.settle(reserved, actual)
        if self._ledger is not None:
            self._pending.append((reserved, actual))

    def flush(self) -> None:
        """Write settled spend to the shared ledger (once per lease, not per request)."""
        if self._ledger is not None and self._pending:
            reserved = sum(r for r, _ in self._pending)
            actual = sum(a for _, a in self._pending)
            self._ledger.settle(self._job_id, reserved, actual)
            self._pending.clear()

    def close(self) -> None:
        """Settle what is pending and hand unused daily allowance back to other jobs."""
        self.flush()
        if self._ledger is not None:
            self._ledger.release_all(self._job_id)
            self._daily_free = 0.0
