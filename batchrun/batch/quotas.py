"""Batch queue quotas as back-pressure, not failure.

Providers cap what open batches may hold per model: OpenAI's enqueued-token limit (a
batch over it fails ``token_limit_exceeded``), Anthropic's processing queue (a create
over it is answered 429). With ``batch.max_enqueued_tokens`` / ``max_enqueued_requests``
the driver keeps its open batches under the quota (``may_create``): the next chunk is
created as earlier ones complete, so a job larger than the quota runs in waves. A
refusal anyway (another job shares the quota) sends the chunk back to ``written`` with
its file kept, to be created again after a growing wait (``requeue``), never failing it;
the refused batch's id is remembered so that crash recovery never adopts it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from batchrun.batch.state import ChunkState
from batchrun.spec import JobSpec

__all__ = ["QUOTA_CODES", "QueueFull", "may_create", "quota_refused", "requeue"]

# failed-batch error codes that mean "the queue is full", not "this batch is bad"
QUOTA_CODES = frozenset({"token_limit_exceeded", "request_limit_exceeded"})
MAX_WAIT_S = 600.0
QUEUED_STEPS = ("uploaded", "created")  # a batch may be in the provider's queue
log = logging.getLogger("batchrun")


class QueueFull(Exception):
    """The provider refused a create for its batch queue (Anthropic's 429): not retried
    by the call's own policy, but by ``requeue``'s longer waits."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def may_create(spec: JobSpec, chunks: list[ChunkState], c: ChunkState,
               now: float | None = None) -> bool:
    """Whether ``c`` may be created now: its wait after a refusal is over, and the open
    batches plus ``c`` stay within the quotas (always, with none open: a chunk is cut to
    fit the quota, and must not wait for nothing)."""
    if c.not_before is not None and (now or time.time()) < c.not_before:
        return False
    b = spec.batch
    if b.max_enqueued_tokens is None and b.max_enqueued_requests is None:
        return True
    queued = [x for x in chunks if x.step in QUEUED_STEPS and x.seq != c.seq]
    if not queued:
        return True
    tokens = sum(x.n_tokens for x in queued) + c.n_tokens
    requests = sum(x.n_requests for x in queued) + c.n_requests
    return ((b.max_enqueued_tokens is None or tokens <= b.max_enqueued_tokens)
            and (b.max_enqueued_requests is None or requests <= b.max_enqueued_requests))


def quota_refused(batch: dict[str, Any]) -> bool:
    """Whether a failed OpenAI batch failed for the queue quota (by its error code)."""
    if batch.get("status") != "failed":
        return False
    errors = batch.get("errors")
    data = errors.get("data") if isinstance(errors, dict) else None
    return any(isinstance(e, dict) and e.get("code") in QUOTA_CODES for e in data or [])


def requeue(spec: JobSpec, c: ChunkState, refused_id: str | None,
            retry_after: float | None = None, now: float | None = None) -> float:
    """Send a refused chunk back to ``written`` (its upload kept) after a wait that doubles
    with each refusal, from ``poll_interval_s`` up to 10 minutes; returns the wait."""
    c.refusals += 1
    wait = min(MAX_WAIT_S, spec.batch.poll_interval_s * 2 ** min(c.refusals - 1, 12))
    wait = max(wait, min(retry_after or 0.0, MAX_WAIT_S))
    if refused_id:
        c.refused_ids.append(refused_id)
    c.step, c.batch_id, c.batch_status, c.created_at = "written", None, None, None
    c.not_before = (now or time.time()) + wait
    log.info("batch: chunk %d refused by the provider's batch queue quota; creating it again "
             "in %.0f s", c.seq, wait)
    return wait
