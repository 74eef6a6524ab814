"""Batch output: output/error file lines back to rows, as result records like online mode's.

A finished batch has an output file (lines answered 200) and an error file (lines
answered otherwise, or never run: expired, cancelled). Lines are matched to rows by
``custom_id``; the rows themselves (id, carried columns, prompt for a retry) are read
again from their shard. Each row of a chunk ends in exactly one of:

    a record, status ok          the answer, billed at the batch price
    a record, status error       a fatal error, a bad row, or no attempts left; an answer
                                 the check refused keeps its text, tokens and cost (paid)
    a retry                      a retryable error with attempts left (new batch or online)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from batchrun.api.protocols import Completion
from batchrun.api.registry import kind_for, provider_for
from batchrun.batch.requests import custom_id, iter_selected
from batchrun.batch.state import ChunkState
from batchrun.errors import RequestError, RetryableError
from batchrun.io.shards import RequestRow, Shard
from batchrun.money.pricing import ModelPrice, cost_usd
from batchrun.spec import JobSpec

__all__ = ["ChunkResults", "collect_chunk", "parse_lines"]

Check = Callable[[Completion], dict[str, Any]]


@dataclass
class ChunkResults:
    records: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # by shard index
    retry: list[tuple[int, int, RequestRow]] = field(default_factory=list)  # shard, pos, row
    ok: int = 0
    errors: int = 0
    paid_usd: float = 0.0  # every answer billed, retried ones included (for the budget)


def parse_lines(*contents: bytes) -> dict[str, dict[str, Any]]:
    """custom_id -> line of the given JSONL files; unreadable lines are skipped."""
    out: dict[str, dict[str, Any]] = {}
    for content in contents:
        for raw in content.splitlines():
            try:
                doc = json.loads(raw)
            except ValueError:
                continue  # a truncated line: its row gets no answer and is retried
            if isinstance(doc, dict) and isinstance(doc.get("custom_id"), str):
                out[doc["custom_id"]] = doc
    return out


class _Recorder:
    """Builds result records of one chunk (same columns as online mode, plus batch_id)."""

    def __init__(self, spec: JobSpec, chunk: ChunkState, price: ModelPrice | None):
        self.spec, self.chunk, self.price = spec, chunk, price
        self.now = datetime.now(UTC)
        self.started = (datetime.fromtimestamp(chunk.created_at, UTC)
                        if chunk.created_at else self.now)
        # Batch latency is the turnaround of the whole batch, as the driver saw it.
        self.latency_ms = (self.now - self.started).total_seconds() * 1e3

    def base(self, row: RequestRow, **kw: Any) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "id": row.id, "model": self.spec.model, "attempts": self.chunk.attempt,
            "wait_ms": 0.0, "started_at": self.started, "finished_at": self.now,
            "batch_id": self.chunk.batch_id, **row.carry,
        }
        rec.update(kw)
        return rec

    def cost(self, c: Completion) -> float | None:
        return (cost_usd(self.price, c.prompt_tokens, c.completion_tokens, batch=True,
                         cache_write=c.cache_creation_tokens, cache_read=c.cache_read_tokens)
                if self.price else None)

    def answer(self, c: Completion) -> dict[str, Any]:
        """The billed answer's fields: on ok records, and on the error record of an
        answer the check refused (it was paid, and it shows what to fix)."""
        return {"response": c.text, "finish_reason": c.finish_reason,
                "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                "total_tokens": c.total_tokens, "cost_usd": self.cost(c),
                # columns only where the provider has them (its result_fields)
                "cache_creation_tokens": c.cache_creation_tokens,
                "cache_read_tokens": c.cache_read_tokens,
                **(c.extra[0] if len(c.extra) == 1 else {})}  # a kind's own (embedding)

    def ok(self, row: RequestRow, c: Completion, extra: dict[str, Any]) -> dict[str, Any]:
        return self.base(row, status="ok", latency_ms=self.latency_ms, **self.answer(c),
                         **extra)

    def error(self, row: RequestRow, error_type: str, message: str | None,
              **kw: Any) -> dict[str, Any]:
        return self.base(row, status="error", error_type=error_type, error_message=message, **kw)


def _judge(outcome: Completion | RequestError, check: Check | None
           ) -> tuple[Completion | None, dict[str, Any], RequestError | None]:
    """(the answer, check's columns, the error): an answer the check refuses comes back
    with its error, since it was billed all the same."""
    if isinstance(outcome, RequestError):
        return None, {}, outcome
    try:
        return outcome, (check(outcome) if check else {}), None
    except RequestError as e:  # invalid structured output: like a per-line error
        return outcome, {}, e


def collect_chunk(spec: JobSpec, chunk: ChunkState, shards: dict[int, Shard],
                  lines: dict[str, dict[str, Any]], batch_status: str, *,
                  price: ModelPrice | None, check: Check | None,
                  can_retry: bool) -> ChunkResults:
    """Every row of ``chunk`` to a record or a retry (retries only when ``can_retry``)."""
    rec, out = _Recorder(spec, chunk, price), ChunkResults()
    kind, provider = kind_for(spec), provider_for(spec)
    for sidx, runs in sorted(chunk.rows.items()):
        records = out.records.setdefault(sidx, [])
        for pos, row in iter_selected(spec, shards[sidx], runs):
            if row.messages is None:
                records.append(rec.error(row, "bad_row", row.error, attempts=0))
                out.errors += 1
                continue
            line = lines.get(custom_id(sidx, pos))
            completion, extra, err = _judge(
                provider.line_outcome(line, batch_status, kind), check)
            paid = rec.answer(completion) if completion is not None else {}
            out.paid_usd += paid.get("cost_usd") or 0.0
            if err is None:
                assert completion is not None
                records.append(rec.ok(row, completion, extra))
                out.ok += 1
            elif isinstance(err, RetryableError) and can_retry:
                out.retry.append((sidx, pos, row))
            else:
                records.append(rec.error(row, err.error_type, str(err), **paid))
                out.errors += 1
    return out
