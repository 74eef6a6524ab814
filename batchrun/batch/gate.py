"""The job's budget in batch mode: a chunk's worst case is reserved before its batch exists.

A batch is paid for once it is created, so the gate sits in front of creation:
each chunk carries the worst case of its requests at the batch price (prompt
estimate + 2% + ``max_tokens``); a chunk the cap cannot cover is not created and
stays unsent (not pending) until a later run with a raised cap. Chunks that an
earlier run already created count as committed; a collected chunk settles at
what its results really cost.
"""

from __future__ import annotations

from batchrun.api.registry import kind_for
from batchrun.io.shards import RequestRow
from batchrun.money.budget import DEFAULT_MARGIN, BudgetBook, DailyLedger
from batchrun.money.pricing import ModelPrice, worst_case_usd
from batchrun.spec import JobSpec

__all__ = ["ChunkBudget", "row_worst_usd"]


def row_worst_usd(spec: JobSpec, price: ModelPrice | None, row: RequestRow) -> float:
    if price is None or row.messages is None:
        return 0.0
    prompt = kind_for(spec).prompt_tokens(row.messages, spec.model)
    return worst_case_usd(price, prompt, spec.generation.max_tokens, batch=True,
                          margin=DEFAULT_MARGIN)


class ChunkBudget:
    def __init__(self, cap_usd: float | None, committed_usd: float,
                 ledger: DailyLedger | None = None, job_id: str = ""):
        self._book = BudgetBook(None if cap_usd is None else max(0.0, cap_usd - committed_usd))
        self._ledger, self._job_id = ledger, job_id
        self._limited = cap_usd is not None or ledger is not None
        self._reserved: dict[int, float] = {}
        self.exhausted = False

    def _draw_daily(self, usd: float) -> bool:
        if self._ledger is None:
            return True
        got = self._ledger.reserve_chunk(self._job_id, usd)
        if got + 1e-12 >= usd:
            return True
        self._ledger.settle(self._job_id, got, 0.0)  # a part is no use: hand it back
        return False

    def admit(self, seq: int, worst_usd: float) -> bool:
        """Reserve a chunk's worst case before its batch is created; False: leave it unsent."""
        if not self._limited or seq in self._reserved:
            return True
        if not self.exhausted and self._book.try_reserve(worst_usd):
            if self._draw_daily(worst_usd):
                self._reserved[seq] = worst_usd
                return True
            self._book.release(worst_usd)
        self.exhausted = True  # in order: no later chunk may jump the queue
        return False

    def refused(self, seq: int) -> bool:
        return self._limited and self.exhausted and seq not in self._reserved

    def settle(self, seq: int, actual_usd: float) -> None:
        if seq in self._reserved:
            worst = self._reserved.pop(seq)
            self._book.settle(worst, actual_usd)
            if self._ledger is not None:
                self._ledger.settle(self._job_id, worst, actual_usd)
