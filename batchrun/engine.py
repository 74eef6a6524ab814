"""One row in, exactly one result record out: permits, attempts, backoff.

Plain asyncio, no Ray: the worker actor wraps it, and tests drive it against a
real loopback server. Every path through ``RowRunner.run`` returns a record;
nothing but cancellation escapes it, so a bad row can never crash a shard.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from batchrun.client import ChatClient, Completion
from batchrun.errors import (
    BudgetExhausted,
    FatalRequestError,
    RateLimited,
    RequestError,
    RetryableError,
)
from batchrun.permits import PermitPool, PermitTooLarge
from batchrun.pricing import ModelPrice, cost_usd
from batchrun.shards import RequestRow
from batchrun.spec import JobSpec, RetrySpec

__all__ = ["RowRunner", "backoff_s"]

log = logging.getLogger("batchrun")


@dataclass
class _Bill:
    """Tokens and cost of every billed attempt of one row (invalid answers are billed too)."""

    prompt: int = 0
    completion: int = 0
    usd: float = 0.0
    billed: bool = False

    def add(self, c: Completion, usd: float) -> None:
        self.prompt += c.prompt_tokens
        self.completion += c.completion_tokens
        self.usd += usd
        self.billed = True

    def fields(self) -> dict[str, Any]:
        if not self.billed:
            return {}
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "total_tokens": self.prompt + self.completion, "cost_usd": self.usd}


def backoff_s(attempt: int, policy: RetrySpec, rng: random.Random) -> float:
    """Full jitter (AWS): uniform in [0, min(cap, base * 2^(attempt-1))]."""
    ceiling = min(policy.backoff_cap_s, policy.backoff_base_s * 2 ** (attempt - 1))
    return rng.uniform(0.0, ceiling)


def _now() -> datetime:
    return datetime.now(UTC)


class RowRunner:
    """Sends rows of one job through one client under the shared permits."""

    def __init__(
        self,
        spec: JobSpec,
        client: ChatClient,
        permits: PermitPool,
        *,
        pause_all: Callable[[float], None],
        token_cost: Callable[[list[dict[str, Any]]], float] | None = None,
        usd_cost: Callable[[list[dict[str, Any]]], float] | None = None,
        price: ModelPrice | None = None,
        check: Callable[[Completion], dict[str, Any]] | None = None,
        extra_body: dict[str, Any] | None = None,
        rng: random.Random | None = None,
    ):
        self._spec = spec
        self._client = client
        self._permits = permits
        self._pause_all = pause_all
        self._token_cost = token_cost
        self._usd_cost = usd_cost  # worst case of one attempt, reserved before it is sent
        self._price = price
        # check: validates an answer (structured outputs) and returns extra result
        # fields; it raises RetryableError(error_type="invalid_output") to retry.
        self._check = check
        self._rng = rng or random.Random()
        self._fields = {**spec.generation.request_fields(), **(extra_body or {})}

    def _record(self, row: RequestRow, started: datetime, **kw: Any) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "id": row.id, "model": self._spec.model, "status": "ok", "attempts": 0,
            "started_at": started, "finished_at": _now(), "wait_ms": 0.0, **row.carry,
        }
        rec.update(kw)
        return rec

    def _billed(self, c: Completion) -> float:
        return cost_usd(self._price, c.prompt_tokens, c.completion_tokens) if self._price else 0.0

    def _settle_failure(self, usd: float | None, e: RequestError) -> None:
        # A timed-out or cut request may have been processed, and an HTTP 200 whose body
        # we rejected (malformed, too large) was: assume the worst. 429/5xx/4xx: not billed.
        if usd is not None:
            maybe_billed = e.error_type in ("timeout", "connection") or e.status == 200
            self._permits.settle(usd, usd if maybe_billed else 0.0)

    async def run(self, row: RequestRow) -> dict[str, Any] | None:
        """Attempts until success, a fatal error or ``max_attempts``.

        Returns the row's one result record, or None when the budget refused to pay
        for it: the row stays unsent, for a later run. An unexpected exception becomes
        the row's error record: one bad row must not cancel the requests beside it.
        """
        started = _now()
        try:
            return await self._run(row, started)
        except Exception as e:
            log.exception("row %s: unexpected %s", row.id, type(e).__name__)
            return self._record(row, started, status="error", error_type="internal",
                                error_message=f"{type(e).__name__}: {e}"[:500])

    async def _run(self, row: RequestRow, started: datetime) -> dict[str, Any] | None:
        if row.messages is None:
            return self._record(row, started, status="error", error_type="bad_row",
                                error_message=row.error)
        body = {"model": self._spec.model, "messages": row.messages, **self._fields}
        cost = self._token_cost(row.messages) if self._token_cost else 1.0
        usd = self._usd_cost(row.messages) if self._usd_cost else None
        wait, bill = 0.0, _Bill()
        last: RequestError | None = None
        for attempt in range(1, self._spec.retry.max_attempts + 1):
            try:
                wait += await self._permits.acquire(cost, usd)
            except PermitTooLarge as e:
                return self._record(row, started, status="error", error_type="too_many_tokens",
                                    error_message=str(e), wait_ms=wait * 1e3, **bill.fields())
            except BudgetExhausted:
                if not bill.billed:
                    return None  # unsent: a later run sends it
                # earlier attempts were billed: keep the bill (resume sends the row again)
                return self._record(row, started, status="error", error_type="budget_exhausted",
                                    error_message="budget exhausted before a valid answer",
                                    attempts=attempt - 1, wait_ms=wait * 1e3, **bill.fields())
            t0 = time.perf_counter()
            try:
                c = await self._client.complete(body)
                bill.add(c, self._billed(c))
                if usd is not None:
                    self._permits.settle(usd, self._billed(c))
                extra = self._check(c) if self._check else {}
                return self._record(
                    row, started, response=c.text, finish_reason=c.finish_reason,
                    attempts=attempt, wait_ms=wait * 1e3, **bill.fields(),
                    latency_ms=(time.perf_counter() - t0) * 1e3, **extra)
            except FatalRequestError as e:
                self._settle_failure(usd, e)
                last = e
                break
            except RetryableError as e:
                if e.error_type != "invalid_output":  # an invalid answer was settled above
                    self._settle_failure(usd, e)
                last = e
                if attempt < self._spec.retry.max_attempts:
                    await asyncio.sleep(self._delay(e, attempt))
        assert last is not None
        return self._record(
            row, started, status="error", error_type=last.error_type, error_message=str(last),
            attempts=attempt, wait_ms=wait * 1e3, **bill.fields(),
        )

    def _delay(self, e: RetryableError, attempt: int) -> float:
        delay = backoff_s(attempt, self._spec.retry, self._rng)
        if isinstance(e, RateLimited):
            pause = e.retry_after if e.retry_after is not None else delay
            self._pause_all(pause)  # every worker holds its sends, not only this one
            delay = max(delay, pause)
        return delay
