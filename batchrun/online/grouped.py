"""Rows in, one request for many of them, exactly one result record per row out.

For kinds whose request carries several rows (embeddings: ``inputs_per_request``). The
worker's lane gathers up to that many rows and hands them here; they share one send
slot (RPM counts requests), one reservation of their summed tokens (TPM and budget count
every row's input), attempts and backoff, exactly as ``engine.RowRunner`` does for a row.

A request refused as a whole with 400 or 413 (one input the provider will not take, a
limit this side could not know) is split in halves, each sent again, down to the row
that is refused alone: that row gets the error, the others their answers.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

import pyarrow as pa

from batchrun.api.embeddings import share_tokens
from batchrun.api.protocols import Completion, kind_result_fields, output_tokens
from batchrun.api.tokens import count_text_tokens
from batchrun.errors import BudgetExhausted, FatalRequestError, RequestError
from batchrun.io.shards import RequestRow
from batchrun.limits.permits import PermitTooLarge
from batchrun.limits.ratelimit import Cost
from batchrun.money.budget import DEFAULT_MARGIN
from batchrun.money.pricing import cost_usd, worst_case_usd
from batchrun.online.engine import RowRunner, _now, _Try

__all__ = ["SPLIT_STATUS", "GroupRunner"]

SPLIT_STATUS = frozenset({400, 413})  # the request as a whole refused: split it


class GroupRunner(RowRunner):
    """A ``RowRunner`` that sends rows in groups (one request each)."""

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        # a fixed-size column (embedding with known dimensions) takes vectors of that size
        # only: another size is that row's error, not a table that cannot be written
        self._sizes = {f.name: f.type.list_size for f in kind_result_fields(self._kind, self._spec)
                       if pa.types.is_fixed_size_list(f.type)}
        # every row's tokens are counted (each row's share of the bill): load the BPE table
        # now, at the worker's setup, not in the first request (a second or two of CPU)
        count_text_tokens("", self._spec.model)

    async def run_group(self, rows: list[RequestRow]) -> list[dict[str, Any] | None]:
        """One record (or None: left unsent) per row, in the rows' order."""
        started = _now()
        out: dict[str, dict[str, Any] | None] = {}
        good = []
        for row in rows:
            if row.messages is None:
                out[row.id] = self._record(row, started, status="error", error_type="bad_row",
                                           error_message=row.error)
            else:
                good.append(row)
        try:
            for row, rec in zip(good, await self._send(good, started), strict=True):
                out[row.id] = rec
        except Exception as e:  # one bad group must not cancel the lanes beside it
            for row in good:
                out[row.id] = self._record(row, started, status="error", error_type="internal",
                                           error_message=f"{type(e).__name__}: {e}"[:500])
        return [out[r.id] for r in rows]

    def _counts(self, rows: list[RequestRow]) -> list[int]:
        return [count_text_tokens(r.messages, self._spec.model)  # type: ignore[arg-type]
                for r in rows]

    def _group_reservation(self, tokens: int) -> tuple[Cost, float | None]:
        spec = self._spec
        out = output_tokens(self._kind, spec)
        cost: Cost = float(tokens + out) if spec.limits.tpm else 1.0
        if self._io_windows:  # input_tpm: every input token of the request counts
            cost = (float(tokens), float(out))
        usd = (worst_case_usd(self._price, tokens, out, margin=DEFAULT_MARGIN)
               if self._budgeted and self._price is not None else None)
        return cost, usd

    async def _send(self, rows: list[RequestRow], started: datetime
                    ) -> list[dict[str, Any] | None]:
        if not rows:
            return []
        counts = self._counts(rows)
        body = self._kind.body(self._spec, [r.messages for r in rows], self._fields)
        cost, usd = self._group_reservation(sum(counts))
        t = _Try()
        while True:
            if self.breaker.tripped:
                return [None] * len(rows)
            t.attempt += 1
            try:
                t.wait += await self._permits.acquire(cost, usd)
            except PermitTooLarge as e:
                if len(rows) > 1:  # the group alone is over the TPM limit: halve it
                    return await self._split(rows, started)
                return [self._record(rows[0], started, status="error",
                                     error_type="too_many_tokens", error_message=str(e))]
            except BudgetExhausted:
                return [None] * len(rows)
            if self.breaker.tripped:
                if usd is not None:
                    self._permits.settle(usd, 0.0)
                return [None] * len(rows)
            t0 = time.perf_counter()
            try:
                c = await self._client.complete(body)
                if len(c.extra) != len(rows):
                    raise FatalRequestError(f"{len(c.extra)} answers to {len(rows)} inputs",
                                            status=200, error_type="malformed_body",
                                            maybe_billed=True)
            except RequestError as e:
                self._settle_failure(usd, e)
                t.last = e
                action = self._after_failure(e, t.attempt)
                if (action == "record" and len(rows) > 1 and isinstance(e, FatalRequestError)
                        and e.status in SPLIT_STATUS):
                    return await self._split(rows, started)
            else:
                return self._answered_rows(rows, counts, started, t, c, usd, t0)
            if action == "drop":
                return [None] * len(rows)
            if action == "record":
                break
            await asyncio.sleep(self._delay(t.last, t.attempt))
        assert t.last is not None
        return [self._record(r, started, status="error", error_type=t.last.error_type,
                             error_message=str(t.last), attempts=t.attempt,
                             wait_ms=t.wait * 1e3) for r in rows]

    def _wrong_size(self, fields: dict[str, Any]) -> str | None:
        for name, size in self._sizes.items():
            value = fields.get(name)
            if value is not None and len(value) != size:
                return f"{name} of {len(value)} values, not {size} (embedding.dimensions)"
        return None

    async def _split(self, rows: list[RequestRow], started: datetime
                     ) -> list[dict[str, Any] | None]:
        half = len(rows) // 2
        first, second = await asyncio.gather(self._send(rows[:half], started),
                                             self._send(rows[half:], started))
        return first + second

    def _answered_rows(self, rows: list[RequestRow], counts: list[int], started: datetime,
                       t: _Try, c: Completion, usd: float | None, t0: float
                       ) -> list[dict[str, Any] | None]:
        """Every row's ok record: its share of the bill, its own result fields."""
        billed = self._billed(c)
        if usd is not None:
            self._permits.settle(usd, billed)
        self.breaker.success()
        # what the rows share, built once: a request carries up to 2,048 of them
        shared = {"model": self._spec.model, "status": "ok", "attempts": t.attempt,
                  "started_at": started, "finished_at": _now(), "wait_ms": t.wait * 1e3,
                  "latency_ms": (time.perf_counter() - t0) * 1e3, "completion_tokens": 0}
        row_usd: dict[int, float] = {}  # by token count: rows repeat a few counts
        out: list[dict[str, Any] | None] = []
        for row, tokens, fields in zip(rows, share_tokens(counts, c.prompt_tokens), c.extra,
                                       strict=True):
            if (usd_row := row_usd.get(tokens)) is None:
                usd_row = row_usd[tokens] = (cost_usd(self._price, tokens, 0)
                                             if self._price else 0.0)
            # carried columns first: a result field of the same name is not theirs to set
            rec = {**row.carry, **shared, "id": row.id, "prompt_tokens": tokens,
                   "total_tokens": tokens, "cost_usd": usd_row}
            if wrong := self._wrong_size(fields):
                rec.update(status="error", error_type="malformed_body", error_message=wrong,
                           wait_ms=0.0, latency_ms=None)
            else:
                rec.update(fields)
            out.append(rec)
        return out
