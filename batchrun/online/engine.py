"""One row in, exactly one result record out: permits, attempts, backoff.

Plain asyncio, no Ray: the worker actor wraps it, and tests drive it against a
real loopback server. Every path through ``RowRunner.run`` returns a record (or None
for a row left unsent); nothing but cancellation escapes it, so a bad row can never
crash a shard.

Each attempt's outcome feeds the worker's circuit breaker (``breaker.py``): when the
first requests all fail the same job-wide way (wrong key, wrong URL, dead host), it
trips, the job stops, and the rows it touched stay unsent rather than becoming error
rows, so the rerun after the fix sends them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from batchrun.api.client import ApiClient
from batchrun.api.protocols import Completion
from batchrun.api.registry import kind_for, provider_for
from batchrun.api.retry import MAX_RETRY_AFTER_S, backoff_s
from batchrun.api.structured import Structured
from batchrun.errors import (
    BudgetExhausted,
    FatalRequestError,
    RateLimited,
    RequestError,
    RetryableError,
)
from batchrun.io.shards import RequestRow
from batchrun.limits.permits import PermitPool, PermitTooLarge
from batchrun.limits.ratelimit import Cost
from batchrun.money.budget import DEFAULT_MARGIN
from batchrun.money.pricing import ModelPrice, cost_usd, worst_case_usd
from batchrun.online.breaker import Breaker, job_wide_cause, safe_url
from batchrun.spec import JobSpec

__all__ = ["ARMED_RETRY_S", "RowRunner"]

log = logging.getLogger("batchrun")

# While the breaker is armed, a job-wide failure (401/403/404/refused/DNS) is retried after
# this fixed pause, not the growing backoff: the breaker must see its streak in seconds
# even with one request in flight (20 backoffs of up to 30 s would take minutes).
ARMED_RETRY_S = 0.2


@dataclass
class _Bill:
    """Tokens and cost of every billed attempt of one row (invalid answers are billed too)."""

    prompt: int = 0
    completion: int = 0
    usd: float = 0.0
    billed: bool = False
    cache_write: int = 0
    cache_read: int = 0

    def add(self, c: Completion, usd: float) -> None:
        self.prompt += c.prompt_tokens
        self.completion += c.completion_tokens
        self.cache_write += c.cache_creation_tokens
        self.cache_read += c.cache_read_tokens
        self.usd += usd
        self.billed = True

    def fields(self) -> dict[str, Any]:
        if not self.billed:
            return {}
        # the cache columns exist only where the provider reports them (result_fields)
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "total_tokens": self.prompt + self.completion, "cost_usd": self.usd,
                "cache_creation_tokens": self.cache_write, "cache_read_tokens": self.cache_read}


@dataclass
class _Try:
    """One row's attempts so far."""

    attempt: int = 0
    wait: float = 0.0  # seconds spent waiting for send slots
    bill: _Bill = field(default_factory=_Bill)
    last: RequestError | None = None
    rejected: Completion | None = None  # the last answer the check refused (it was paid)

    def answer_fields(self) -> dict[str, Any]:
        """The refused answer, kept on the error record: what a user needs to fix the
        schema or the prompt."""
        c = self.rejected
        return {} if c is None else {"response": c.text, "finish_reason": c.finish_reason}


def _now() -> datetime:
    return datetime.now(UTC)


class RowRunner:
    """Sends rows of one job through one client under the shared permits."""

    def __init__(
        self,
        spec: JobSpec,
        client: ApiClient,
        permits: PermitPool,
        *,
        pause_all: Callable[[float], None],
        on_trip: Callable[[str], None] | None = None,
        price: ModelPrice | None = None,
        budgeted: bool = False,
        structured: Structured | None = None,
        rng: random.Random | None = None,
    ):
        self._spec = spec
        self._client = client
        self._permits = permits
        self._pause_all = pause_all  # a 429: every worker holds its sends
        self._price = price
        self._budgeted = budgeted  # reserve each attempt's worst case before it is sent
        # structured outputs: check validates an answer and returns extra result fields;
        # it raises RetryableError(error_type="invalid_output") to retry
        self._check = structured.check if structured else None
        self._rng = rng or random.Random()
        self._fields = {**spec.generation.request_fields(),
                        **(structured.request_fields() if structured else {})}
        self._kind = kind_for(spec)
        # input and output tokens limited apart: reserve max_tokens, give back the unused
        self._io_windows = bool(spec.limits.input_tpm or spec.limits.output_tpm)
        # One breaker per worker (its rows share this runner). on_trip(reason) stops the
        # job: the worker tells the limiter, which refuses every worker's next lease.
        self.breaker = Breaker(spec.retry.breaker_requests)
        self._on_trip = on_trip
        self._url = safe_url(provider_for(spec).url(spec.endpoint.base_url, self._kind))

    def _reservation(self, payload: Any) -> tuple[Cost, float | None]:
        """What each attempt of a row reserves: send-slot cost (its tokens when TPM is
        limited, the pair (input, max_tokens) when input and output are limited apart,
        else one request) and, with a budget, its worst-case USD."""
        spec = self._spec
        need_tokens = bool(spec.limits.tpm) or self._io_windows or self._budgeted
        prompt = self._kind.prompt_tokens(payload, spec.model) if need_tokens else 0
        cost: Cost = float(prompt + spec.generation.max_tokens) if spec.limits.tpm else 1.0
        if self._io_windows:
            cost = (float(prompt), float(spec.generation.max_tokens))
        usd = (worst_case_usd(self._price, prompt, spec.generation.max_tokens,
                              margin=DEFAULT_MARGIN)
               if self._budgeted and self._price is not None else None)
        return cost, usd

    def _record(self, row: RequestRow, started: datetime, **kw: Any) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "id": row.id, "model": self._spec.model, "status": "ok", "attempts": 0,
            "started_at": started, "finished_at": _now(), "wait_ms": 0.0, **row.carry,
        }
        rec.update(kw)
        return rec

    def _billed(self, c: Completion) -> float:
        if not self._price:
            return 0.0
        return cost_usd(self._price, c.prompt_tokens, c.completion_tokens,
                        cache_write=c.cache_creation_tokens, cache_read=c.cache_read_tokens)

    def _give_back(self, key: float, used: int | None) -> None:
        """The output tokens the slot reserved and the answer did not use (``used`` None:
        no answer, and none billed) go back to the output-TPM window."""
        if self._io_windows:
            self._permits.release(key, self._spec.generation.max_tokens - min(
                used or 0, self._spec.generation.max_tokens))

    def _settle_failure(self, usd: float | None, e: RequestError) -> None:
        # The error says whether the provider may have billed it (a timeout, a cut
        # connection, a 200 we refused): then assume the worst. 429/5xx/4xx: not billed.
        if usd is not None:
            self._permits.settle(usd, usd if e.maybe_billed else 0.0)

    async def run(self, row: RequestRow) -> dict[str, Any] | None:
        """Attempts until success, a fatal error or ``max_attempts``.

        Returns the row's one result record, or None when the budget refused to pay
        for it or the job is stopping: the row stays unsent, for a later run. An
        unexpected exception becomes the row's error record: one bad row must not
        cancel the requests beside it.
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
        body = self._kind.body(self._spec, row.messages, self._fields)
        cost, usd = self._reservation(row.messages)
        t = _Try()
        while True:
            if self.breaker.tripped:  # the job is stopping: send nothing more
                return self._unsent(row, started, t)
            t.attempt += 1
            try:
                waited, key = await self._permits.acquire_slot(cost, usd)
                t.wait += waited
            except PermitTooLarge as e:
                return self._record(row, started, status="error", error_type="too_many_tokens",
                                    error_message=str(e), wait_ms=t.wait * 1e3,
                                    **t.bill.fields())
            except BudgetExhausted:  # the budget is spent, or the limiter stopped the job
                t.attempt -= 1
                return self._unsent(row, started, t)
            if self.breaker.tripped:  # tripped while this row waited for its slot
                if usd is not None:
                    self._permits.settle(usd, 0.0)
                t.attempt -= 1
                return self._unsent(row, started, t)
            t0 = time.perf_counter()
            try:
                c = await self._client.complete(body)
            except RequestError as e:
                self._settle_failure(usd, e)
                if not e.maybe_billed:
                    self._give_back(key, None)
                t.last = e
                action = self._after_failure(e, t.attempt)
            else:
                self._give_back(key, c.completion_tokens)
                answer = self._answered(row, started, t, c, usd, t0)
                if not isinstance(answer, str):
                    return answer
                action = answer
            if action == "drop":
                return self._unsent(row, started, t)
            if action == "record":
                break
            await asyncio.sleep(self._delay(t.last, t.attempt))
        assert t.last is not None
        return self._record(
            row, started, status="error", error_type=t.last.error_type,
            error_message=str(t.last), attempts=t.attempt, wait_ms=t.wait * 1e3,
            **t.bill.fields(), **t.answer_fields())

    def _answered(self, row: RequestRow, started: datetime, t: _Try, c: Completion,
                  usd: float | None, t0: float) -> dict[str, Any] | str:
        """The ok record of an answer, or "retry"/"record" when the check refused it."""
        t.bill.add(c, self._billed(c))
        if usd is not None:
            self._permits.settle(usd, self._billed(c))
        self.breaker.success()  # an answer, valid or not: the endpoint works
        try:
            extra = self._check(c) if self._check else {}
        except RetryableError as e:  # invalid_output: paid for, kept if it is the last
            t.last, t.rejected = e, c
            return "retry" if t.attempt < self._spec.retry.max_attempts else "record"
        if len(c.extra) == 1:  # a kind's own result fields (an embedding line of a batch file)
            extra = {**c.extra[0], **extra}
        return self._record(
            row, started, response=c.text, finish_reason=c.finish_reason, attempts=t.attempt,
            wait_ms=t.wait * 1e3, **t.bill.fields(),
            latency_ms=(time.perf_counter() - t0) * 1e3, **extra)

    def _after_failure(self, e: RequestError, attempt: int) -> str:
        """What a failed attempt leads to: "retry", "record" (the row's error) or "drop"
        (the breaker tripped: the row stays unsent, for the rerun after the fix)."""
        cause = job_wide_cause(e)
        armed = self.breaker.armed
        if self.breaker.failure(cause, str(e)) and self._on_trip is not None:
            self._on_trip(f"{self.breaker.reason} at {self._url}")
        if self.breaker.tripped:
            return "drop"
        limit = self._spec.retry.max_attempts
        if cause is not None and armed:
            # Before any request succeeded, a 401/404/refused is likely the job's fault,
            # not the row's: retry it (unbilled) until the breaker decides, so a job the
            # breaker stops leaves unsent rows behind, not error rows a rerun would skip.
            limit = max(limit, self.breaker.threshold)
        elif isinstance(e, FatalRequestError):
            return "record"
        return "retry" if attempt < limit else "record"

    def _unsent(self, row: RequestRow, started: datetime, t: _Try) -> dict[str, Any] | None:
        """None (the row stays unsent), or, if earlier attempts were billed, a record
        that keeps the bill and that a rerun sends again (budget_exhausted)."""
        if not t.bill.billed:
            return None
        return self._record(row, started, status="error", error_type="budget_exhausted",
                            error_message="the job stopped (budget exhausted or halted) "
                            "before a valid answer", attempts=t.attempt, wait_ms=t.wait * 1e3,
                            **t.bill.fields(), **t.answer_fields())

    def _delay(self, e: RequestError | None, attempt: int) -> float:
        if e is not None and self.breaker.armed and job_wide_cause(e) is not None:
            return ARMED_RETRY_S  # the breaker is deciding: see ARMED_RETRY_S
        delay = backoff_s(attempt, self._spec.retry, self._rng)
        if isinstance(e, RateLimited):
            pause = min(e.retry_after, MAX_RETRY_AFTER_S) if e.retry_after is not None else delay
            self._pause_all(pause)  # every worker holds its sends, not only this one
            delay = max(delay, pause)
        return delay
