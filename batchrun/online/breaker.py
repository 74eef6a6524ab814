"""When to give up on a job: the circuit breaker and the rolling error rate.

Plain Python, no Ray, no I/O: the row runner feeds ``Breaker`` every request's outcome,
and the driver feeds ``ErrorRate`` every finished row.

``Breaker`` (per worker) answers "is every request failing the same job-wide way?".
Until a request succeeds it is *armed*: ``threshold`` consecutive failures of one
job-wide cause (HTTP 401, 403, 404, connection refused, DNS failure: a wrong key, a
wrong URL, a dead host) trip it, and the job stops. One success anywhere before that
*disarms* it for good: the endpoint works, so later 401s/404s are row errors, and only
``ErrorRate`` applies. Any other failure (429, 5xx, a 400 of one row) breaks the streak
without disarming. Causes are classified by status code and error class, never by text.

``ErrorRate`` (job-wide, in the driver) keeps the last ``window`` sent rows as runs of
(error_type or None, count), so a table of 500 ok rows costs one run, not 500 entries.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

from batchrun.errors import FatalRequestError, RequestError

__all__ = ["JOB_WIDE_STATUSES", "Breaker", "ErrorRate", "job_wide_cause", "safe_url"]

# Answers that no retry and no other row can fix: the key, the permission, the URL.
JOB_WIDE_STATUSES = frozenset({401, 403, 404})
# error_type of a request that never reached a server (set by client.py by exception class)
_UNREACHABLE = frozenset({"connect_refused", "dns"})


def job_wide_cause(e: RequestError) -> str | None:
    """The breaker's name for ``e`` when it is a job-wide cause, else None."""
    if isinstance(e, FatalRequestError) and e.status in JOB_WIDE_STATUSES:
        return f"http_{e.status}"
    if e.error_type in _UNREACHABLE:
        return e.error_type
    return None


def safe_url(url: str) -> str:
    """``url`` without user info, query or fragment: where a key could hide in a URL."""
    u = urlsplit(url)
    host = u.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    netloc = f"{host}:{u.port}" if u.port else host
    return urlunsplit((u.scheme, netloc, u.path, "", ""))


class Breaker:
    """Trips after ``threshold`` consecutive failures of one job-wide cause, unless a
    request succeeded first. ``threshold`` 0: never trips (switched off)."""

    def __init__(self, threshold: int = 20):
        self.threshold = threshold
        self.state = "armed" if threshold > 0 else "disarmed"  # -> "disarmed" | "tripped"
        self.reason: str | None = None  # why it tripped: the cause's first message
        self._cause: str | None = None
        self._streak = 0
        self._first = ""

    @property
    def armed(self) -> bool:
        return self.state == "armed"

    @property
    def tripped(self) -> bool:
        return self.state == "tripped"

    def success(self) -> None:
        """A request got an answer (a 200, valid or not): the endpoint works."""
        if self.state == "armed":
            self.state = "disarmed"

    def failure(self, cause: str | None, detail: str = "") -> bool:
        """A request failed; ``cause`` from ``job_wide_cause``. True when this call trips it."""
        if self.state != "armed":
            return False
        if cause is None:
            self._cause, self._streak = None, 0  # not the same way: start counting again
            return False
        if cause != self._cause:
            self._cause, self._streak, self._first = cause, 0, detail
        self._streak += 1
        if self._streak < self.threshold:
            return False
        self.state = "tripped"
        self.reason = (f"the first {self._streak} requests all failed the same way "
                       f"({self._first or cause})")
        return True


class ErrorRate:
    """Share of status=error among the last ``window`` sent rows, checked against ``limit``."""

    def __init__(self, limit: float, window: int):
        self.limit = limit
        self.window = window
        self._runs: deque[tuple[str | None, int]] = deque()  # (error_type or None, count)
        self._size = 0
        self._types: Counter[str] = Counter()  # error rows in the window, by type
        self._sample: dict[str, str] = {}  # the latest message of each error type

    @property
    def errors(self) -> int:
        return sum(self._types.values())

    def add_ok(self, n: int) -> None:
        """``n`` rows answered ok: the common case, in one run."""
        if n > 0:
            self._push(None, n)

    def add(self, outcomes: Iterable[tuple[str | None, str | None]]) -> str | None:
        """Push (error_type or None for ok, error_message) of finished rows, oldest first.

        Returns why the job must stop once the window is full and its error share is
        above the limit, else None.
        """
        for etype, message in outcomes:
            key = None if etype is None else etype or "unknown"
            if key is not None and message:
                self._sample[key] = message
            self._push(key, 1)
        return self.verdict()

    def _push(self, key: str | None, n: int) -> None:
        if key is not None:
            self._types[key] += n
        if self._runs and self._runs[-1][0] == key:
            self._runs[-1] = (key, self._runs[-1][1] + n)
        else:
            self._runs.append((key, n))
        self._size += n
        while self._size > self.window:  # the oldest rows leave the window
            old, count = self._runs[0]
            drop = min(count, self._size - self.window)
            self._size -= drop
            if old is not None:
                self._types[old] -= drop
            if drop == count:
                self._runs.popleft()
            else:
                self._runs[0] = (old, count - drop)

    def verdict(self) -> str | None:
        """Why the job must stop, or None (also while the window is not full yet)."""
        errors = self.errors
        if self._size < self.window or errors <= self.limit * self.window:
            return None
        top, count = max(self._types.items(), key=lambda kv: kv[1])
        sample = self._sample.get(top)
        return (f"{errors} of the last {self.window} rows ended in error "
                f"({errors / self.window:.0%}, above max_error_rate {self.limit:.0%}); "
                f"most common: {top} ({count} rows" + (f", e.g. {sample})" if sample else ")"))
