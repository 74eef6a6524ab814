"""The online engine's wait after a 429: the provider's Retry-After, for every worker, capped."""

from __future__ import annotations

import random

from batchrun.api.retry import MAX_RETRY_AFTER_S
from batchrun.errors import RateLimited
from batchrun.online.engine import RowRunner
from batchrun.spec import JobSpec


def _runner(pauses: list[float]) -> RowRunner:
    spec = JobSpec.model_validate({
        "name": "t", "input": "in.parquet", "prompt_column": "p", "model": "gpt-4.1-mini",
        "generation": {"max_tokens": 4}, "limits": {"rpm": 60}, "output": "o",
        "retry": {"max_attempts": 3, "backoff_base_s": 0.1, "backoff_cap_s": 1.0},
        "endpoint": {"base_url": "http://127.0.0.1:9/v1"}})
    return RowRunner(spec, None, None, pause_all=pauses.append,  # type: ignore[arg-type]
                     rng=random.Random(1))


def test_a_429_pauses_every_worker_for_its_retry_after():
    pauses: list[float] = []
    assert _runner(pauses)._delay(RateLimited("HTTP 429", retry_after=7.0), 1) == 7.0
    assert pauses == [7.0]


def test_a_retry_after_of_a_day_is_cut_to_the_cap():
    pauses: list[float] = []
    wait = _runner(pauses)._delay(RateLimited("HTTP 429", retry_after=86_400.0), 1)
    assert wait == MAX_RETRY_AFTER_S == 600.0 and pauses == [600.0]
