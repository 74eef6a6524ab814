"""The one retry policy of online and batch mode: full-jitter backoff, never shorter than
the provider's Retry-After. Pure arithmetic over the spec's ``retry`` block."""

from __future__ import annotations

import random
from typing import Any

from batchrun.errors import RetryableError
from batchrun.spec import RetrySpec

__all__ = ["MAX_RETRY_AFTER_S", "backoff_s", "pause_s", "retry_after_s"]

# A Retry-After longer than this is cut to it, online and in batch mode: a proxy asking
# for a day would otherwise park the job silently; retrying sooner costs a refused call.
MAX_RETRY_AFTER_S = 600.0


def backoff_s(attempt: int, policy: RetrySpec, rng: random.Random) -> float:
    """Full jitter (AWS): uniform in [0, min(cap, base * 2^(attempt-1))]."""
    ceiling = min(policy.backoff_cap_s, policy.backoff_base_s * 2 ** (attempt - 1))
    return rng.uniform(0.0, ceiling)


def retry_after_s(headers: Any) -> float | None:
    """The provider's wait, from ``retry-after-ms`` (OpenAI) or ``Retry-After`` in seconds."""
    for name, scale in (("retry-after-ms", 1e-3), ("Retry-After", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            continue  # an HTTP date: rare from LLM APIs; fall back to our own backoff
    return None


def pause_s(err: RetryableError, attempt: int, policy: RetrySpec, rng: random.Random,
            cap_s: float | None = None) -> float:
    """The wait before attempt ``attempt + 1``: the backoff, but never shorter than the
    Retry-After the provider asked for (429, and 5xx where it sends one), and never
    longer than ``cap_s`` if given (a proxy may ask for a day)."""
    asked = getattr(err, "retry_after", None)
    wait = max(backoff_s(attempt, policy, rng), asked or 0.0)
    return wait if cap_s is None else min(wait, cap_s)
