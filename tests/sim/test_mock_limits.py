"""Pure tests of the simulated provider's parts: limits, ledger maths, config, answers, faults."""

from __future__ import annotations

import math

import pytest

from batchrun.api.tokens import count_text_tokens
from batchrun.sim import faults
from batchrun.sim.config import MockConfig
from batchrun.sim.ledger import Ledger, max_in_window, prompt_key
from batchrun.sim.limits import Decision, RateLimiter, SlidingWindow, format_duration
from batchrun.sim.protocol import BadRequest, answer_for, parse_chat_request


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_rpm_sliding_window_without_strict() -> None:
    clock = FakeClock(100.0)
    limiter = RateLimiter(rpm=60, strict=False, clock=clock)
    for i in range(60):
        clock.t = 100.0 + i * 0.5  # 60 requests spread over 29.5 s
        assert limiter.try_acquire(1).allowed
    clock.t = 130.0
    refused = limiter.try_acquire(1)
    assert not refused.allowed and refused.kind == "requests"
    assert refused.retry_after == pytest.approx(30.0)  # the first entry leaves at 160
    clock.t = 159.999
    assert not limiter.try_acquire(1).allowed
    clock.t = 160.0  # an entry at t counts while now - t < 60
    assert limiter.try_acquire(1).allowed
    assert not limiter.try_acquire(1).allowed  # the slot freed at 160 is taken again


def test_strict_mode_adds_a_10s_window_of_rpm_over_6() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=60, clock=clock)
    accepted = sum(limiter.try_acquire(1).allowed for _ in range(30))
    assert accepted == 10
    clock.t = 4.0
    refused = limiter.try_acquire(1)
    assert refused.kind == "requests" and refused.retry_after == pytest.approx(6.0)
    assert refused.retry_after_s == 6 and refused.retry_after_ms == 6000
    clock.t = 10.0
    assert sum(limiter.try_acquire(1).allowed for _ in range(30)) == 10


def test_strict_window_never_drops_below_one_request() -> None:
    limiter = RateLimiter(rpm=3, clock=FakeClock())
    assert [limiter.try_acquire(1).allowed for _ in range(3)] == [True, False, False]


def test_tpm_window_weighs_tokens_and_waits_for_enough_room() -> None:
    clock = FakeClock()
    limiter = RateLimiter(tpm=1000, clock=clock)
    assert limiter.try_acquire(400).allowed
    clock.t = 10.0
    assert limiter.try_acquire(400).allowed
    clock.t = 20.0
    refused = limiter.try_acquire(300)
    assert not refused.allowed and refused.kind == "tokens"
    assert refused.retry_after == pytest.approx(40.0)  # the 400 of t=0 must leave first
    assert limiter.try_acquire(200).allowed  # fits exactly: 1000
    clock.t = 60.0
    assert limiter.try_acquire(300).allowed


def test_request_larger_than_tpm_is_too_large() -> None:
    limiter = RateLimiter(tpm=100, clock=FakeClock())
    decision = limiter.try_acquire(101)
    assert not decision.allowed and decision.too_large and decision.kind == "tokens"


def test_binding_limit_is_the_longest_wait() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=600, tpm=100, clock=clock)
    assert limiter.try_acquire(100).allowed
    clock.t = 1.0
    decision = limiter.try_acquire(10)
    assert decision.kind == "tokens" and decision.retry_after == pytest.approx(59.0)


def test_rejected_requests_are_not_counted() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=6, strict=False, clock=clock)
    for _ in range(6):
        limiter.try_acquire(1)
    for _ in range(100):
        assert not limiter.try_acquire(1).allowed
    clock.t = 60.0
    assert sum(limiter.try_acquire(1).allowed for _ in range(10)) == 6


def test_headers_report_limit_remaining_and_reset() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=60, tpm=1000, clock=clock)
    limiter.try_acquire(250)
    clock.t = 30.0
    headers = limiter.headers()
    assert headers["x-ratelimit-limit-requests"] == "60"
    assert headers["x-ratelimit-remaining-requests"] == "59"
    assert headers["x-ratelimit-reset-requests"] == "30s"
    assert headers["x-ratelimit-remaining-tokens"] == "750"
    assert RateLimiter(clock=clock).headers() == {}


def test_retry_after_rounds_up_to_whole_seconds() -> None:
    assert Decision(False, "requests", 0.2).retry_after_s == 1
    assert Decision(False, "requests", 1.0).retry_after_s == 1
    assert Decision(False, "requests", 1.01).retry_after_s == 2
    assert Decision(False, "requests", 0.0123).retry_after_ms == 13


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (0.017, "17ms"), (1, "1s"), (1.5, "1.5s"), (59.018, "59.018s"),
    (360, "6m0s"), (59.9996, "1m0s"), (3723, "1h2m3s"),
])
def test_format_duration_is_go_style(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_sliding_window_validates_arguments() -> None:
    with pytest.raises(ValueError):
        SlidingWindow(0, 60)
    assert SlidingWindow(1, 60).wait_for(0, 2) == math.inf


def test_max_in_window_two_pointer() -> None:
    assert max_in_window([], 10) == 0
    assert max_in_window([0.0], 10) == 1
    assert max_in_window([0.0, 10.0], 10) == 1  # half-open: [0, 10)
    assert max_in_window([0.0, 9.99], 10) == 2
    times = [0, 1, 2, 3, 11, 11.5, 12, 12.5, 13, 40]
    assert max_in_window(times, 10) == 5  # 3..12.5 or 11..13 (13 - 3 is not < 10)
    assert max_in_window(times, 60) == 10


def test_prompt_key_ignores_dict_key_order() -> None:
    a = [{"role": "user", "content": "hé"}]
    b = [{"content": "hé", "role": "user"}]
    assert prompt_key(a) == prompt_key(b) and len(prompt_key(a)) == 16
    assert prompt_key(a) != prompt_key([{"role": "user", "content": "he"}])


def test_ledger_stats_and_paging() -> None:
    ledger = Ledger()
    ledger.record(0.0, 200, "ok", "k1", 10, 5, "m", True)
    ledger.record(1.0, 429, "rate_limited", "k2", 7, 0, "m", False)
    ledger.record(2.0, 200, "ok", "k1", 10, 5, "m", True)
    ledger.record(3.0, 500, "server_error", "k3", 8, 0, "m", True)
    stats = ledger.stats()
    assert stats["total_requests"] == 4 and stats["ok"] == 2 and stats["accepted"] == 3
    assert stats["by_outcome"] == {"ok": 2, "rate_limited": 1, "server_error": 1}
    assert stats["distinct_ok_prompts"] == 1 and stats["duplicate_ok_prompts"] == 1
    assert stats["prompt_tokens_billed"] == 20 and stats["completion_tokens_billed"] == 10
    assert stats["max_in_window_10s"] == 3 and stats["max_arrivals_10s"] == 4
    assert [r["seq"] for r in ledger.records(since=2)] == [2, 3]
    assert ledger.records(1, limit=1)[0]["outcome"] == "rate_limited"
    ledger.clear()
    assert len(ledger) == 0 and ledger.stats()["max_in_window_60s"] == 0


def test_config_round_trips_through_argv() -> None:
    config = MockConfig(rpm=60, tpm=5000, strict=False, latency_ms=2.5, fail_rate=0.1,
                        reset_rate=0.05, api_key="sk-x", seed=7, models=("a", "b"),
                        unknown_models=("gone",), storm_every=30, storm_seconds=2)
    assert MockConfig.from_argv(config.to_argv()) == config
    assert MockConfig().to_argv() == []
    assert MockConfig.from_argv([]) == MockConfig()


@pytest.mark.parametrize("kwargs", [
    {"fail_rate": 1.5}, {"fail_rate": 0.6, "reset_rate": 0.6}, {"rpm": -1},
    {"storm_every": 5, "storm_seconds": 5},
])
def test_config_rejects_bad_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        MockConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("model", ["gpt-4.1-mini", "gpt-4", "claude-sonnet-4"])
def test_answer_tokens_match_the_tokenizer(model: str) -> None:
    for i in range(50):
        messages = [{"role": "user", "content": f"question number {i}"}]
        content, n, finish = answer_for(messages, max_tokens=1000)
        assert 5 <= n <= 60 and finish == "stop"
        assert count_text_tokens(content, model) == n
        assert answer_for(messages, 1000) == (content, n, finish)  # deterministic
        short, capped, why = answer_for(messages, max_tokens=3)
        assert capped == 3 and why == "length" and content.startswith(short)


def test_parse_chat_request_validates_like_openai() -> None:
    ok = parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "x"}],
                             "max_completion_tokens": 5})
    assert ok.max_tokens == 5
    bad_bodies = [
        ([], None), ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        ({"model": "m", "messages": [{"role": "u", "content": "x"}], "max_tokens": 0},
         "max_tokens"),
        ({"model": "m", "messages": [{"role": "u", "content": "x"}], "max_tokens": True},
         "max_tokens"),
    ]
    for body, param in bad_bodies:
        with pytest.raises(BadRequest) as info:
            parse_chat_request(body)
        assert info.value.param == param


def test_fault_draw_is_deterministic_and_roughly_proportional() -> None:
    config = MockConfig(fail_rate=0.1, reset_rate=0.2, malformed_rate=0.05, seed=3)
    draws = [faults.draw_fault(config, seq) for seq in range(20000)]
    assert draws == [faults.draw_fault(config, seq) for seq in range(20000)]
    share = {name: draws.count(name) / len(draws) for name in faults.FAULTS}
    assert share["server_error"] == pytest.approx(0.1, abs=0.01)
    assert share["reset"] == pytest.approx(0.2, abs=0.01)
    assert share["malformed"] == pytest.approx(0.05, abs=0.01)
    assert share["nonjson"] == share["oversize"] == 0
    other_seed = MockConfig(fail_rate=0.1, reset_rate=0.2, malformed_rate=0.05, seed=4)
    assert draws != [faults.draw_fault(other_seed, seq) for seq in range(20000)]
    assert {faults.error_status(config, s) for s in range(200)} == {500, 502, 503}


def test_storm_schedule() -> None:
    config = MockConfig(storm_every=10, storm_seconds=2)
    assert faults.storm_remaining(config, 0.5) == 0  # no storm right after start-up
    assert faults.storm_remaining(config, 10.5) == pytest.approx(1.5)
    assert faults.storm_remaining(config, 12.0) == 0
    assert faults.storm_remaining(config, 31.0) == pytest.approx(1.0)
    assert faults.storm_remaining(MockConfig(), 10.5) == 0


def test_latency_jitter_stays_in_range() -> None:
    config = MockConfig(latency_ms=10, latency_jitter_ms=5, seed=1)
    delays = [faults.latency_s(config, s) for s in range(1000)]
    assert min(delays) >= 0.010 and max(delays) < 0.015 and len(set(delays)) > 900
