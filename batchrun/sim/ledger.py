"""The request ledger: what the simulated provider saw and answered, the judge of tests.

One record per request, stored in parallel compact arrays (a benchmark sends 100,000
requests; a dict per request would cost ~10x the memory). Records are appended at the
moment the server decides the answer, with no ``await`` between reading the clock and
appending, so arrival times are non-decreasing in sequence order.

With ``path`` set, every record is also appended to a JSON-lines file, line-buffered,
so the ledger of a killed server survives for inspection.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections import Counter
from typing import Any, TextIO

__all__ = ["OUTCOMES", "Ledger", "max_in_window", "prompt_key"]

# Index order is part of the compact storage; append new outcomes at the end.
OUTCOMES: tuple[str, ...] = (
    "ok", "rate_limited", "too_large", "storm", "server_error", "reset", "malformed",
    "nonjson", "oversize", "bad_request", "unauthorized", "model_not_found", "batch_created",
)
_OUTCOME_INDEX = {name: i for i, name in enumerate(OUTCOMES)}


def prompt_key(messages: Any) -> str:
    """16 hex chars of the sha1 of the canonical JSON of ``messages`` (sorted keys,
    no spaces, UTF-8): equal prompts get equal keys whatever their key order."""
    canonical = json.dumps(messages, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha1(canonical.encode("utf-8")).hexdigest()[:16]


def max_in_window(times: list[float], window: float) -> int:
    """Most entries of sorted ``times`` inside any half-open interval ``[t, t + window)``.

    Matches the rate limiter's rule (an entry counts while ``now - t < window``), so for
    accepted arrivals it must never exceed the configured limit.
    """
    best = 0
    lo = 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


class Ledger:
    """Append-only request records; ``seq`` is the index in arrival order."""

    def __init__(self, path: str | None = None) -> None:
        self._file: TextIO | None = open(path, "a", buffering=1) if path else None  # noqa: SIM115
        self._models: list[str] = []
        self._model_index: dict[str, int] = {}
        self.clear()

    def clear(self) -> None:
        self._t = array("d")
        self._status = array("H")
        self._outcome = array("B")
        self._counted = array("B")
        self._key: list[str] = []
        self._ptok = array("q")
        self._ctok = array("q")
        self._model = array("I")
        if self._file is not None:
            self._file.write('{"reset": true}\n')

    def __len__(self) -> int:
        return len(self._t)

    def record(self, t: float, status: int, outcome: str, key: str, prompt_tokens: int,
               completion_tokens: int, model: str, counted: bool) -> int:
        """Append one record and return its sequence number.

        ``counted`` says whether the request was charged against the rate limits
        (passed admission); ``completion_tokens`` is what the answer billed.
        """
        seq = len(self._t)
        model_i = self._model_index.get(model)
        if model_i is None:
            model_i = self._model_index[model] = len(self._models)
            self._models.append(model)
        self._t.append(t)
        self._status.append(status)
        self._outcome.append(_OUTCOME_INDEX[outcome])
        self._counted.append(counted)
        self._key.append(key)
        self._ptok.append(prompt_tokens)
        self._ctok.append(completion_tokens)
        self._model.append(model_i)
        if self._file is not None:
            self._file.write(json.dumps(self._one(seq)) + "\n")
        return seq

    def _one(self, i: int) -> dict[str, Any]:
        return {
            "seq": i, "t": self._t[i], "status": self._status[i],
            "outcome": OUTCOMES[self._outcome[i]], "key": self._key[i],
            "prompt_tokens": self._ptok[i], "completion_tokens": self._ctok[i],
            "model": self._models[self._model[i]], "counted": bool(self._counted[i]),
        }

    def records(self, since: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        """Records with ``seq >= since`` (at most ``limit`` of them), as dicts."""
        end = len(self._t) if limit is None else min(len(self._t), since + limit)
        return [self._one(i) for i in range(max(0, since), end)]

    def stats(self) -> dict[str, Any]:
        """Aggregates tests assert on; see the module docs of ``batchrun.sim``."""
        ok = _OUTCOME_INDEX["ok"]
        by_outcome = Counter(OUTCOMES[o] for o in self._outcome)
        ok_keys = Counter(k for k, o in zip(self._key, self._outcome, strict=True) if o == ok)
        # Already sorted by construction; sorting again is a cheap safeguard.
        all_times = sorted(self._t)
        counted_times = sorted(t for t, c in zip(self._t, self._counted, strict=True) if c)
        return {
            "total_requests": len(self._t),
            "by_outcome": dict(by_outcome),
            "ok": by_outcome.get("ok", 0),
            "accepted": len(counted_times),
            "distinct_ok_prompts": len(ok_keys),
            "duplicate_ok_prompts": sum(1 for n in ok_keys.values() if n > 1),
            "max_in_window_60s": max_in_window(counted_times, 60.0),
            "max_in_window_10s": max_in_window(counted_times, 10.0),
            "max_arrivals_60s": max_in_window(all_times, 60.0),
            "max_arrivals_10s": max_in_window(all_times, 10.0),
            "prompt_tokens_billed": sum(
                p for p, o in zip(self._ptok, self._outcome, strict=True) if o == ok),
            "completion_tokens_billed": sum(
                c for c, o in zip(self._ctok, self._outcome, strict=True) if o == ok),
            "first_arrival": self._t[0] if self._t else None,
            "last_arrival": self._t[-1] if self._t else None,
        }

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
