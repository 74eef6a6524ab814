"""Deterministic fault injection: which request fails how, and when 429 storms rage.

Every draw is a pure function of (seed, request sequence number, salt), via the
splitmix64 finaliser, instead of a shared ``random.Random``: the same request number
always gets the same fate, whatever else happened before, so tests are reproducible.
"""

from __future__ import annotations

import math

from batchrun.sim.config import MockConfig

__all__ = [
    "BAD_GATEWAY_HTML",
    "FAULTS",
    "draw_fault",
    "error_status",
    "latency_s",
    "storm_remaining",
    "unit",
]

# Fault outcomes in the order their shares are laid out on [0, 1).
FAULTS: tuple[str, ...] = ("server_error", "reset", "malformed", "nonjson", "oversize")

_MASK64 = (1 << 64) - 1

BAD_GATEWAY_HTML = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)


def unit(seed: int, seq: int, salt: int = 0) -> float:
    """A uniform number in [0, 1) for request ``seq`` (splitmix64 of the mixed inputs)."""
    z = (seed * 0x9E3779B97F4A7C15 + seq * 0xBF58476D1CE4E5B9 + salt * 0x94D049BB133111EB
         + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 11) / float(1 << 53)


def draw_fault(config: MockConfig, seq: int) -> str | None:
    """The fault (one of ``FAULTS``) request ``seq`` suffers, or None for a clean answer."""
    u = unit(config.seed, seq)
    rates = (config.fail_rate, config.reset_rate, config.malformed_rate,
             config.nonjson_rate, config.oversize_rate)
    for name, rate in zip(FAULTS, rates, strict=True):
        if u < rate:
            return name
        u -= rate
    return None


def error_status(config: MockConfig, seq: int) -> int:
    """The 5xx of a "server_error": 500 half the time, else 502 or 503."""
    u = unit(config.seed, seq, salt=1)
    return 500 if u < 0.5 else (502 if u < 0.75 else 503)


def latency_s(config: MockConfig, seq: int) -> float:
    """Delay before answering request ``seq``: latency_ms plus a uniform jitter."""
    ms = config.latency_ms
    if config.latency_jitter_ms:
        ms += config.latency_jitter_ms * unit(config.seed, seq, salt=2)
    return ms / 1000.0


def storm_remaining(config: MockConfig, t: float) -> float:
    """Seconds left of the 429 storm at server time ``t`` (0.0: no storm).

    Storms start at every multiple of ``storm_every`` after start-up (not at 0, so a
    fresh server first answers normally) and last ``storm_seconds``.
    """
    every, length = config.storm_every, config.storm_seconds
    if not every or not length or t < every:
        return 0.0
    phase = math.fmod(t, every)
    return length - phase if phase < length else 0.0
