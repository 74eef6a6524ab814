"""The OpenAI-shaped simulator's batch queue quota: enqueued input tokens per model.

With ``batch_queue_tokens`` set, a batch whose prompt tokens, added to those of the
account's other open batches (validating, in progress, finalizing) of the same model,
exceed it fails at validation with ``token_limit_exceeded``, as OpenAI's per-model
enqueued-token limit does. Its tokens stop counting once it completes, fails, expires
or is cancelled.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from batchrun.sim.kinds import ROUTES
from batchrun.sim.protocol import BadRequest

__all__ = ["OPEN", "batch_tokens", "over_quota"]

OPEN = frozenset({"validating", "in_progress", "finalizing"})


def batch_tokens(lines: list[dict[str, Any]]) -> tuple[str, int]:
    """(model, prompt tokens) of a batch's request lines, counted as each endpoint bills
    them (chat messages, embedding inputs, Responses input); a line its endpoint would
    refuse counts nothing (it fails alone, when the batch runs)."""
    model, total = "", 0
    for doc in lines:
        body: dict[str, Any] = doc["body"] if isinstance(doc.get("body"), dict) else {}
        model = str(body.get("model") or model)
        url = doc.get("url")
        route = ROUTES.get(url) if isinstance(url, str) else None
        if route is None:
            continue
        try:
            total += route.prompt_tokens(route.parse(body))
        except BadRequest:
            continue
    return model, total


def over_quota(quota: int, batch: Any, others: Iterable[Any]) -> str | None:
    """The failure message when ``batch`` (its lines parsed) exceeds ``quota``, else None.
    Records the batch's model and tokens on it (``queue_model``, ``queue_tokens``)."""
    batch.queue_model, batch.queue_tokens = batch_tokens(batch.lines)
    if not quota:
        return None
    queued = sum(getattr(o, "queue_tokens", 0) for o in others if o is not batch
                 and o.obj["status"] in OPEN and getattr(o, "queue_model", "") ==
                 batch.queue_model)
    if queued + batch.queue_tokens <= quota:
        return None
    return (f"Enqueued token limit reached for {batch.queue_model} in organization "
            f"org-sim. Limit: {quota:,} enqueued tokens. Please try again once some "
            "in_progress batches have been completed.")
