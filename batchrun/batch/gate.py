"""The job's budget in batch mode: a chunk's worst case is reserved before its batch exists.

A batch is paid for once it is created, so the gate sits in front of creation:
each chunk carries the worst case of its requests at the batch price (prompt
estimate + 2% + ``max_tokens``); a chunk the cap cannot cover is not created and
stays unsent (not pending) until a later run with a raised cap. Chunks that an
earlier run already created count as committed; a collected chunk settles at
what its results really cost.
"""

from __future__ import annotations

from batchrun.budget import DEFAULT_MARGIN, BudgetBook
from batchrun.pricing import ModelPrice, worst_case_usd
from batchrun.shards import RequestRow
from batchrun.spec import JobSpec
from batchrun.tokens import count_chat_tokens

__all__ = ["ChunkBudget", "row_worst_usd"]


def row_worst_usd(spec: JobSpec, price: ModelPrice | None, row: RequestRow) -> float:
    if price is None or row.messages is None:
        return 0.0
    prompt = count_chat_tokens(row.messages, spec.model)
    return worst_case_usd(price, prompt, spec.generation.max_tokens, batch=True,
                          margin=DEFAULT_MARGIN)


class ChunkBudget:
    def __init__(self, cap_usd: float | None, committed_usd: float):
        self._book = None if cap_usd is None else BudgetBook(max(0.0, cap_usd - committed_usd))
        self._reserved: dict[int, float] = {}
        self.exhausted = False

    def admit(self, seq: int, worst_usd: float) -> bool:
        """Reserve a chunk's worst case before its batch is created; False: leave it unsent."""
        if self._book is None or seq in self._reserved:
            return True
        if not self.exhausted and self._book.try_reserve(worst_usd):
            self._reserved[seq] = worst_usd
            return True
        self.exhausted = True  # in order: no later chunk may jump the queue
        return False

    def refused(self, seq: int) -> bool:
        return self._book is not None and self.exhausted and seq not in self._reserved

    def settle(self, seq: int, actual_usd: float) -> None:
        if self._book is not None and seq in self._reserved:
            self._book.settle(self._reserved.pop(seq), actual_usd)
