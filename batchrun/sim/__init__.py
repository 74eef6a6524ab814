"""A simulated OpenAI-compatible provider: rate limits, faults, and a ledger to judge by.

``build_app(config)`` makes the aiohttp application; ``start_in_thread`` (tests),
``start_subprocess`` (the job runner's demo) and ``serve_forever`` (the CLI) run it.

``GET /_ledger/stats`` (and ``RunningServer.stats()``) returns::

    total_requests, by_outcome {outcome: count}, ok, accepted,
    distinct_ok_prompts, duplicate_ok_prompts,
    max_in_window_60s, max_in_window_10s   (accepted = counted by the limiter)
    max_arrivals_60s, max_arrivals_10s     (all arrivals)
    prompt_tokens_billed, completion_tokens_billed   (ok answers only)
    first_arrival, last_arrival            (seconds since server start)

Outcomes are listed in ``OUTCOMES``.
"""

from batchrun.sim.app import STATE, MockState, build_app
from batchrun.sim.config import MockConfig
from batchrun.sim.ledger import OUTCOMES, Ledger, max_in_window, prompt_key
from batchrun.sim.limits import Decision, RateLimiter, SlidingWindow, format_duration
from batchrun.sim.protocol import answer_for
from batchrun.sim.run import (
    MockProcess,
    RunningServer,
    main,
    serve_forever,
    start_in_thread,
    start_subprocess,
)

__all__ = [
    "OUTCOMES",
    "STATE",
    "Decision",
    "Ledger",
    "MockConfig",
    "MockProcess",
    "MockState",
    "RateLimiter",
    "RunningServer",
    "SlidingWindow",
    "answer_for",
    "build_app",
    "format_duration",
    "main",
    "max_in_window",
    "prompt_key",
    "serve_forever",
    "start_in_thread",
    "start_subprocess",
]
