"""The batch-mode driver: chunks -> upload -> create -> poll -> collect -> results.

It runs in the driver process (no Ray: the provider does the work) and survives being
killed anywhere: every step is recorded in ``OUTPUT/batch/state.json`` before the next
one starts, and a batch created but not yet recorded is found again on the rerun by
listing the provider's batches and matching their metadata ``{job, chunk,
fingerprint}`` (Anthropic's have none: ``batch/anthropic.py`` matches time, size and
``custom_id``s), so no chunk is ever created (or billed) twice.

Rows answered with a retryable error, or never run (expired, failed, cancelled batch),
go into a new chunk with the next attempt number, up to ``retry.max_attempts``; with
``batch.fallback: online`` they are left for the online path instead. Results go
through ``ResultsStore`` as parts, and a shard is finalized once none of its rows is
still in flight, so ``summary.summarize`` reads batch results like online ones.

Only rows without a result go into chunks (``plan``), whichever mode wrote the result,
and the resume check is online mode's (``resume.check_fingerprint``, with --force). A
provider that keeps refusing a call, or refuses it for good, stops the job with
``JobCannotSucceed`` (exit 7) and the state intact.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyarrow as pa

from batchrun.api.protocols import kind_result_fields
from batchrun.api.records import records_table
from batchrun.api.registry import kind_for, provider_for
from batchrun.batch.clients import BatchClient, batch_client, require_batch_api
from batchrun.batch.collect import Check, collect_chunk, parse_lines
from batchrun.batch.plan import Planner
from batchrun.batch.provider import TERMINAL, NoBatchApi
from batchrun.batch.quotas import QueueFull, may_create, quota_refused, requeue
from batchrun.batch.state import (
    OPEN_STEPS,
    BatchJobState,
    ChunkState,
    StateFile,
    batch_tag,
    chunk_path,
    count_rows,
    fingerprint_sha,
    to_ranges,
)
from batchrun.errors import JobCannotSucceed, RequestError
from batchrun.io.resume import check_fingerprint
from batchrun.io.shards import (
    RequestRow,
    Shard,
    carry_schema,
    input_files,
    plan_shards,
    record_plan,
)
from batchrun.io.storage import local_copy
from batchrun.io.writer import ResultsStore, result_schema
from batchrun.money.gate import Gate, config_for, row_worst_usd
from batchrun.money.pricing import ModelPrice, price_for, worst_case_usd
from batchrun.spec import JobSpec, resolve_api_key

__all__ = ["BatchOutcome", "batch_status", "cancel_batches", "run_batch_job"]

log = logging.getLogger("batchrun")
T = TypeVar("T")


@dataclass
class BatchOutcome:
    pending: int  # chunks still open with the provider (wait=False)
    fallback_rows: int  # rows left without a result for the online path
    batches: list[dict[str, Any]] = field(default_factory=list)  # one per chunk
    budget_exhausted: bool = False  # chunks left unsent because the cap could not cover them

    @property
    def done(self) -> bool:
        return self.pending == 0


def _chunk_info(c: ChunkState) -> dict[str, Any]:
    return {"chunk": c.seq, "attempt": c.attempt, "step": c.step, "batch_id": c.batch_id,
            "status": c.batch_status, "rows": c.n_rows, "requests": c.n_requests}


class _Driver:
    """One run of the loop over one job's chunks; all provider I/O goes through ``p``."""

    def __init__(self, spec: JobSpec, shards: list[Shard], store: ResultsStore,
                 provider: BatchClient, *, price: ModelPrice | None, check: Check | None,
                 extra_body: dict[str, Any] | None, initial_poll_s: float, tag: str):
        self.spec, self.store, self.p = spec, store, provider
        self.shards = {s.index: s for s in shards}
        self.price, self.check, self.extra_body = price, check, extra_body
        self.initial_poll_s = initial_poll_s
        self.sf = StateFile(spec.output)
        self.state: BatchJobState = self.sf.load(spec, tag)
        self.fingerprint = self.state.fingerprint  # the metadata tag, fixed for the state
        self.planner = Planner(spec, self.shards, store, self.state, self.sf.dir,
                               extra_body=extra_body, worst=self._worst, save=self.save)
        self.gate = self.new_gate()
        self.gate.charge_crashed_run()  # what a crashed run of either mode left reserved

    def new_gate(self) -> Gate:
        """The budget left: the cap less what is on disk and what open batches may cost."""
        committed = self.store.spent_usd() + sum(
            c.worst_usd for c in self.state.chunks if c.step in ("created", "completed"))
        return Gate.open(config_for(self.spec, committed))

    def save(self) -> None:
        self.sf.save(self.state)

    def open_chunks(self) -> list[ChunkState]:
        return [c for c in self.state.chunks if c.step in OPEN_STEPS]

    def active_chunks(self) -> list[ChunkState]:
        """Open chunks, less those the budget refused (unsent, not pending)."""
        return [c for c in self.open_chunks()
                if not (c.step in ("written", "uploaded") and self.gate.refused(c.seq))]

    def _worst(self, row: RequestRow) -> float:
        return row_worst_usd(self.spec, self.price, row)

    # -- provider steps ----------------------------------------------------------------

    def _metadata(self, c: ChunkState) -> dict[str, str]:
        return {"job": self.spec.name, "chunk": str(c.seq), "fingerprint": self.fingerprint,
                "attempt": str(c.attempt)}

    async def recover_unrecorded(self, *, clear: bool = True) -> int:
        """Adopt batches created for ``uploaded`` chunks just before a crash; with
        ``clear``, a chunk the provider has no batch for goes back to ``written`` (its
        upload kept), so it no longer holds online runs back (``refuse_open_batches``).
        Returns how many were adopted."""
        waiting = [c for c in self.state.chunks if c.step == "uploaded" and c.batch_id is None]
        if not waiting:
            return 0
        taken = {i for c in self.state.chunks for i in (c.batch_id, *c.refused_ids) if i}
        found = await self.p.find_created(waiting, self._metadata, self.sf.dir, taken)
        for c in waiting:
            if c.seq in found:
                self._mark_created(c, found[c.seq])
            elif clear:
                c.step = "written"
        self.save()
        return sum(c.step == "created" for c in waiting)

    def _mark_created(self, c: ChunkState, b: dict[str, Any]) -> None:
        c.batch_id, c.batch_status, c.step = str(b["id"]), str(b.get("status")), "created"
        at = b.get("created_at")
        c.created_at = float(at) if isinstance(at, int | float) and at > 0 else time.time()

    async def submit(self, c: ChunkState) -> None:
        """Upload and create one chunk's batch, recording each step."""
        if c.n_requests == 0:  # only bad rows: nothing to send, collect right away
            c.step, c.batch_status = "completed", "completed"
            self.save()
            return
        if not may_create(self.spec, self.state.chunks, c):
            return  # the batch queue is full: created once earlier batches complete
        if not self.gate.admit(c.seq, c.worst_usd):
            return  # over the budget: the chunk stays unsent for a later run
        if c.step == "written":
            if c.file_id is None:  # a chunk sent back from uploaded keeps its file
                with local_copy(chunk_path(self.sf.dir, c.file)) as path:  # a store's too
                    f = await self.p.upload(path)
                c.file_id = str(f["id"])
            c.step = "uploaded"  # from here a batch may exist: online runs are refused
            self.save()
        if c.step == "uploaded":
            c.intent_at = time.time()  # the intent, on disk before the call: see find_created
            self.save()
            try:
                b = await self.p.create(c.file_id or "", self.spec.batch.completion_window,
                                        self._metadata(c), find=lambda: self._find(c))
            except QueueFull as e:  # nothing was made: the chunk waits, then goes again
                self._requeue(c, None, e.retry_after)
                return
            if c.step != "created":  # made by this call, not found after a failed one
                self._mark_created(c, b)
                c.created_at = time.time()
            self.save()

    def _requeue(self, c: ChunkState, refused: str | None, retry_after: float | None) -> None:
        requeue(self.spec, c, refused, retry_after)
        self.gate.settle_chunk(c.seq, 0.0)  # a refused batch bills nothing
        self.save()

    async def _find(self, c: ChunkState) -> dict[str, Any] | None:
        """After a failed create: the batch it made after all (a timeout, a 5xx after the
        fact), looked up by metadata; None if there is none and it must be tried again."""
        await self.recover_unrecorded(clear=False)  # a retry is coming: still uploaded
        return {"id": c.batch_id} if c.step == "created" else None

    async def poll(self, c: ChunkState) -> bool:
        """Ask for a created batch's status; collect it if it ended. True if it ended."""
        if c.step == "created":
            assert c.batch_id is not None
            bid = c.batch_id
            b = await self.p.retrieve(bid)
            c.batch_status = str(b.get("status"))
            if quota_refused(b):  # back-pressure, not failure: created again later
                self._requeue(c, bid, None)
                return True
            if c.batch_status not in TERMINAL:
                return False
            c.step = "completed"
            self.save()
        await self.collect(c)
        return True

    async def _download(self, c: ChunkState) -> dict[str, dict[str, Any]]:
        if c.batch_id is None:
            return {}
        b = await self.p.retrieve(c.batch_id)
        return parse_lines(*await self.p.results(b))

    async def collect(self, c: ChunkState) -> None:
        """Results to parts, retries to a new chunk, then the chunk marked collected."""
        lines = await self._download(c)
        online = self.spec.batch.fallback == "online"
        res = collect_chunk(self.spec, c, self.shards, lines, c.batch_status or "completed",
                            price=self.price, check=self.check,
                            can_retry=online or c.attempt < self.spec.retry.max_attempts)
        self.gate.settle_chunk(c.seq, res.paid_usd)  # refused answers were billed too
        for sidx, records in res.records.items():
            if records:
                table = records_table(records, self.store.schema)
                self.store.write_part(self.shards[sidx].name, table)
        if online:
            for sidx, pos, _ in res.retry:
                runs = self.state.fallback.setdefault(sidx, [])
                runs[:] = to_ranges([p for a, b in runs for p in range(a, b)] + [pos])
        else:  # one save: the chunk collected and its retries, or neither
            self.planner.new_chunks(res.retry, attempt=c.attempt + 1, save=False)
        c.step = "collected"
        self.save()

    # -- the loop ------------------------------------------------------------------------

    async def submit_all(self) -> None:
        for c in self.open_chunks():
            if c.step in ("written", "uploaded"):
                await self.submit(c)

    async def poll_round(self) -> bool:
        """One status check of every open chunk; True if any ended."""
        ended = False
        for c in self.open_chunks():
            if c.step in ("created", "completed"):
                ended = await self.poll(c) or ended
        await self.submit_all()  # retries made by collecting
        return ended

    async def wait_all(self) -> None:
        delay = self.initial_poll_s
        while self.active_chunks():
            if await self.poll_round():
                delay = self.initial_poll_s
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.spec.batch.poll_interval_s)  # capped exponential

    def finalize(self) -> None:
        """One final file per shard, except shards with rows left for the online path."""
        for idx, shard in self.shards.items():
            if idx not in self.state.fallback and self.store.final_rows(shard.name) is None:
                self.store.finalize(shard.name)

    def outcome(self) -> BatchOutcome:
        return BatchOutcome(pending=len(self.active_chunks()),
                            budget_exhausted=self.gate.exhausted,
                            fallback_rows=count_rows(self.state.fallback),
                            batches=[_chunk_info(c) for c in self.state.chunks])


async def _run(d: _Driver, job_sha: str, wait: bool, retry_errors: bool) -> BatchOutcome:
    # The state agrees with the results on disk before anything is sent: a batch created
    # but not recorded is adopted first (asks the provider only if such a chunk exists).
    if await d.recover_unrecorded():
        d.gate = d.new_gate()  # an adopted batch is paid for: the budget counts it
    d.planner.refresh(job_sha)
    d.planner.reconcile()
    if retry_errors:
        d.planner.requeue_errors()
    d.planner.plan()
    if not d.open_chunks():
        log.info("batch: every row of %s has a result in %s; nothing to send",
                 d.spec.name, d.spec.output)
    elif not any(c.batch_id or c.file_id for c in d.state.chunks):
        # Before the first upload only: once a batch exists the API is known to be there
        # (and a provider that cannot list batches must not turn a resume into a re-send).
        await d.p.probe()
    await d.submit_all()
    if wait:
        await d.wait_all()
    else:
        await d.poll_round()
    if not d.active_chunks():
        d.finalize()
    return d.outcome()


def _unanswered(store: ResultsStore, shards: list[Shard]) -> int:
    return sum(s.num_rows - len(store.answered_ids(s.name, redo_errors=False)) for s in shards)


def _stopped(e: RequestError) -> JobCannotSucceed:
    """A call the provider refused for good (a 4xx other than 401/403/404): one line."""
    return JobCannotSucceed(f"batch API: {e}; the provider refused it: fix the cause, then "
                            "run the same command again to continue")


def run_batch_job(spec: JobSpec, *, wait: bool = True, retry_errors: bool = False,
                  check: Check | None = None, extra_body: dict[str, Any] | None = None,
                  extra_fields: list[pa.Field] | None = None, initial_poll_s: float = 1.0,
                  force: bool = False, schema: dict[str, Any] | None = None) -> BatchOutcome:
    """Run (or resume) ``spec`` through the provider's Batch API.

    ``wait=False`` submits and returns (``pending`` > 0 while batches are open); a later
    call collects. ``check`` validates answers (raise ``RetryableError(error_type=
    "invalid_output")`` to retry the row); ``extra_body`` adds request fields (e.g.
    ``response_format``) and ``extra_fields`` the result columns ``check`` returns.
    ``force`` and ``schema`` (the resolved response schema) are online mode's resume
    check's: the output folder must hold results of this job, or ``force`` says keep them.
    """
    spec = require_batch_api(spec)  # chunks within the provider's caps
    price = price_for(spec)
    worst_case_usd(price, 0, 0, batch=True)  # no batch price: one clear line, before sending
    key = resolve_api_key(spec)
    files = input_files(spec)
    fp = check_fingerprint(spec, files, force=force, schema=schema)
    record_plan(spec, files)  # chunks name rows by shard: every later run must see the same
    shards = plan_shards(spec, files)
    extra = [pa.field("batch_id", pa.string()), *(extra_fields or []),
             *provider_for(spec).result_fields(),
             *kind_result_fields(kind_for(spec), spec)]  # embeddings: the vector
    store = ResultsStore(spec.output, result_schema(carry_schema(spec, shards), extra=extra))

    async def main() -> BatchOutcome:
        async with batch_client(spec, key, StateFile(spec.output).dir) as p:
            d = _Driver(spec, shards, store, p, price=price, check=check,
                        extra_body=extra_body, initial_poll_s=initial_poll_s,
                        tag=batch_tag(fp, spec.output))
            try:
                return await _run(d, fingerprint_sha(fp), wait, retry_errors)
            finally:  # settled chunks written; created ones stay reserved until collected
                d.gate.close()

    try:
        return asyncio.run(main())
    except NoBatchApi:
        if spec.batch.fallback != "online":
            raise
        return BatchOutcome(pending=0, fallback_rows=_unanswered(store, shards))
    except RequestError as e:
        raise _stopped(e) from None


def _with_state(spec: JobSpec, fn: Callable[[BatchClient, BatchJobState], Awaitable[T]]) -> T:
    sf = StateFile(spec.output)
    state = sf.load(spec)

    async def main() -> T:
        async with batch_client(spec, resolve_api_key(spec), sf.dir) as p:
            return await fn(p, state)

    try:
        return asyncio.run(main())
    except RequestError as e:
        raise _stopped(e) from None


def batch_status(spec: JobSpec) -> list[dict[str, Any]]:
    """Each chunk's step, and its batch's status and request counts from the provider."""
    async def ask(p: BatchClient, state: BatchJobState) -> list[dict[str, Any]]:
        out = []
        for c in state.chunks:
            info = _chunk_info(c)
            if c.batch_id is not None:
                b = await p.retrieve(c.batch_id)
                info.update(status=b.get("status"), request_counts=b.get("request_counts"))
            out.append(info)
        return out

    return _with_state(spec, ask)


def cancel_batches(spec: JobSpec) -> int:
    """Cancel the job's open batches; returns how many were asked to cancel. A rerun
    collects what they answered and sends the rest again."""
    async def cancel(p: BatchClient, state: BatchJobState) -> int:
        n = 0
        for c in state.chunks:
            if c.step == "created" and c.batch_id is not None:
                b = await p.retrieve(c.batch_id)
                if b.get("status") not in TERMINAL | {"cancelling"}:
                    await p.cancel(c.batch_id)
                    n += 1
        return n

    return _with_state(spec, cancel)
