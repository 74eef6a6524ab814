"""Provider-style rate limits: sliding windows over accepted requests, with no I/O.

A window of length ``span`` holds the (time, weight) of every accepted request whose
age is below ``span``; a new request fits when the weights still inside plus its own
stay within the limit. Rejected requests are not recorded, as providers do not count
them. Time is passed in (or read from an injected clock) so tests need no sleeping.

RPM uses a 60 s window and, in strict mode, also a 10 s window of RPM/6: providers
enforce per-minute limits over shorter slices, so a burst of a full minute's quota is
refused even when the minute is fresh. TPM weighs a request as prompt tokens plus
``max_tokens``, the figure OpenAI reserves against the limit before generating.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Decision", "RateLimiter", "SlidingWindow", "format_duration"]


class SlidingWindow:
    """Weighted sliding window: an entry at time t counts while ``now - t < span``."""

    def __init__(self, limit: int, span: float) -> None:
        if limit <= 0 or span <= 0:
            raise ValueError("limit and span must be > 0")
        self.limit = limit
        self.span = span
        self._entries: deque[tuple[float, int]] = deque()
        self._total = 0

    def _prune(self, now: float) -> None:
        entries = self._entries
        while entries and now - entries[0][0] >= self.span:
            self._total -= entries.popleft()[1]

    def used(self, now: float) -> int:
        """Weight counted at ``now``."""
        self._prune(now)
        return self._total

    def wait_for(self, now: float, weight: int = 1) -> float:
        """Seconds until ``weight`` more fits (0.0: fits now; inf: larger than the limit)."""
        self._prune(now)
        if self._total + weight <= self.limit:
            return 0.0
        if weight > self.limit:
            return math.inf
        # Entries leave oldest first; find the one whose expiry frees enough room.
        excess = self._total + weight - self.limit
        for t, w in self._entries:
            excess -= w
            if excess <= 0:
                return t + self.span - now
        return self.span  # unreachable: the whole window frees at least `weight`

    def add(self, now: float, weight: int = 1) -> None:
        self._entries.append((now, weight))
        self._total += weight

    def reset_in(self, now: float) -> float:
        """Seconds until the window is empty again (OpenAI's x-ratelimit-reset-*)."""
        self._prune(now)
        return self._entries[-1][0] + self.span - now if self._entries else 0.0

    def clear(self) -> None:
        self._entries.clear()
        self._total = 0


@dataclass(frozen=True)
class Decision:
    """Outcome of one admission check.

    ``kind`` names the binding limit ("requests" or "tokens") when refused;
    ``too_large`` means the request alone exceeds the TPM limit and never fits.
    """

    allowed: bool
    kind: str | None = None
    retry_after: float = 0.0
    too_large: bool = False

    @property
    def retry_after_s(self) -> int:
        """Whole seconds for the Retry-After header: rounded up, at least 1."""
        return max(1, math.ceil(self.retry_after - 1e-9))

    @property
    def retry_after_ms(self) -> int:
        return max(1, math.ceil(self.retry_after * 1000 - 1e-6))


_ALLOWED = Decision(True)


class RateLimiter:
    """RPM and TPM limits of one provider account (0 disables a limit)."""

    def __init__(self, rpm: int = 0, tpm: int = 0, *, strict: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rpm, self.tpm, self.strict = rpm, tpm, strict
        self._clock = clock
        self._requests = SlidingWindow(rpm, 60.0) if rpm else None
        self._burst = SlidingWindow(max(1, rpm // 6), 10.0) if rpm and strict else None
        self._tokens = SlidingWindow(tpm, 60.0) if tpm else None

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    def try_acquire(self, tokens: int, now: float | None = None) -> Decision:
        """Admit and record one request of ``tokens`` weight, or say how long to wait."""
        if now is None:
            now = self._clock()
        waits: list[tuple[float, str]] = []
        for window, kind, weight in self._windows(tokens):
            wait = window.wait_for(now, weight)
            if wait > 0:
                waits.append((wait, kind))
        if not waits:
            for window, _, weight in self._windows(tokens):
                window.add(now, weight)
            return _ALLOWED
        wait, kind = max(waits)
        if math.isinf(wait):
            assert self._tokens is not None
            return Decision(False, "tokens", self._tokens.span, too_large=True)
        return Decision(False, kind, wait)

    def _windows(self, tokens: int) -> list[tuple[SlidingWindow, str, int]]:
        out: list[tuple[SlidingWindow, str, int]] = []
        if self._requests is not None:
            out.append((self._requests, "requests", 1))
        if self._burst is not None:
            out.append((self._burst, "requests", 1))
        if self._tokens is not None:
            out.append((self._tokens, "tokens", tokens))
        return out

    def headers(self, now: float | None = None) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for the configured limits, as of ``now``."""
        if now is None:
            now = self._clock()
        out: dict[str, str] = {}
        for window, kind in ((self._requests, "requests"), (self._tokens, "tokens")):
            if window is None:
                continue
            out[f"x-ratelimit-limit-{kind}"] = str(window.limit)
            out[f"x-ratelimit-remaining-{kind}"] = str(max(0, window.limit - window.used(now)))
            out[f"x-ratelimit-reset-{kind}"] = format_duration(window.reset_in(now))
        return out

    def clear(self) -> None:
        for window in (self._requests, self._burst, self._tokens):
            if window is not None:
                window.clear()


def format_duration(seconds: float) -> str:
    """Go-style durations as OpenAI sends them: "0s", "17ms", "1.5s", "6m0s", "1h2m3s"."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    seconds = round(seconds, 3)  # so 59.9996 prints as "1m0s", not "60s"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    sec_text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{int(hours)}h{int(minutes)}m{sec_text}"
    if minutes:
        return f"{int(minutes)}m{sec_text}"
    return sec_text
