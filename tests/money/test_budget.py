"""BudgetBook arithmetic and the file ledger shared by concurrent jobs."""

from __future__ import annotations

import json
import multiprocessing as mp
import random
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from batchrun.errors import SpecError
from batchrun.money.budget import BudgetBook, DailyLedger
from batchrun.money.pricing import ModelPrice, cost_usd, worst_case_usd

PRICE = ModelPrice(
    model="m", input_per_1m=0.15, output_per_1m=0.60, batch_input_per_1m=0.075,
    batch_output_per_1m=0.30, source="test",
)  # fmt: skip


def test_cap_is_exact_with_decimal_amounts() -> None:
    book = BudgetBook(1.0)
    # 0.1 is not a binary fraction; a float sum of ten of them is 0.9999999999999999.
    assert all(book.try_reserve(0.1) for _ in range(10))
    assert not book.try_reserve(1e-12)
    assert book.remaining == 0.0 and book.reserved == 1.0
    book.release(0.1)
    assert book.try_reserve(0.1) and not book.try_reserve(0.1)


def test_settle_moves_reservation_to_spent() -> None:
    book = BudgetBook(1.0)
    assert book.try_reserve(0.3)
    book.settle(0.3, 0.2)
    assert (book.spent, book.reserved, book.remaining) == (0.2, 0.0, 0.8)
    assert book.overruns == 0


def test_many_in_flight_never_overshoot_and_sum_exactly() -> None:
    rng = random.Random(7)
    cap = 2.5
    book = BudgetBook(cap)
    in_flight: list[tuple[int, int, float]] = []
    spent_pico = 0  # what the bills really add up to, in exact integers
    refused = 0
    for _ in range(20_000):
        if in_flight and (rng.random() < 0.5 or len(in_flight) > 500):
            prompt, max_tok, reserved = in_flight.pop(rng.randrange(len(in_flight)))
            if rng.random() < 0.05:
                book.release(reserved)
                continue
            done = rng.randint(0, max_tok)
            book.settle(reserved, cost_usd(PRICE, prompt, done))
            spent_pico += prompt * 150_000 + done * 600_000
        else:
            prompt, max_tok = rng.randint(5, 3000), rng.choice([16, 256, 1024])
            reserved = worst_case_usd(PRICE, prompt, max_tok)
            if book.try_reserve(reserved):
                in_flight.append((prompt, max_tok, reserved))
            else:
                refused += 1
        assert book.spent + book.reserved <= cap
    assert refused > 0, "the cap was never reached: the test proves nothing"
    for _, _, reserved in in_flight:
        book.release(reserved)
    assert book.reserved == 0.0
    assert book.spent == spent_pico / 10**12 and book.spent <= cap


def test_threads_cannot_overshoot() -> None:
    book = BudgetBook(0.05)
    barrier = threading.Barrier(8)

    def hammer() -> None:
        barrier.wait()
        for _ in range(2000):
            if book.try_reserve(0.0001):
                book.settle(0.0001, 0.0001)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert book.spent == 0.05 and book.reserved == 0.0


def test_overrun_is_recorded_and_blocks_new_reservations() -> None:
    book = BudgetBook(1.0)
    assert book.try_reserve(0.9)
    book.settle(0.9, 1.05)  # the provider billed more than our worst case
    assert book.spent == 1.05 and book.overruns == 1
    assert book.overrun_usd == pytest.approx(0.15)
    assert book.remaining == 0.0 and not book.try_reserve(1e-9)


def test_margin_absorbs_a_tokenizer_that_counts_more() -> None:
    prompt_estimate, max_tokens = 1000, 200
    reserved = worst_case_usd(PRICE, prompt_estimate, max_tokens, margin=0.02)
    billed = cost_usd(PRICE, 1020, max_tokens)  # provider counts 2% more prompt tokens
    book = BudgetBook(1.0)
    assert book.try_reserve(reserved)
    book.settle(reserved, billed)
    assert book.overruns == 0


def test_double_release_and_bad_amounts_are_errors() -> None:
    book = BudgetBook(None)
    assert book.try_reserve(5.0) and book.remaining == float("inf")
    book.release(5.0)
    with pytest.raises(ValueError):
        book.release(5.0)
    with pytest.raises(ValueError):
        book.try_reserve(float("nan"))
    with pytest.raises(ValueError):
        book.try_reserve(-1.0)


# -- DailyLedger -------------------------------------------------------------------


class Clock:
    def __init__(self, t: datetime) -> None:
        self.t = t

    def __call__(self) -> datetime:
        return self.t


def test_day_key_is_counted_in_the_ledger_zone(tmp_path: Path) -> None:
    t = datetime(2025, 3, 1, 18, 30, tzinfo=UTC)
    assert DailyLedger(tmp_path, "Asia/Ho_Chi_Minh", 1.0, clock=Clock(t)).day_key() == "2025-03-02"
    assert DailyLedger(tmp_path, "America/Los_Angeles", 1.0).day_key(t) == "2025-03-01"
    assert DailyLedger(tmp_path, "UTC", 1.0).day_key(t) == "2025-03-01"
    with pytest.raises(ValueError):
        DailyLedger(tmp_path, "UTC", 1.0).day_key(datetime(2025, 3, 1))
    with pytest.raises(SpecError, match=r"budget\.timezone"):
        DailyLedger(tmp_path, "Mars/Olympus", 1.0)


def test_chunks_are_shared_between_jobs(tmp_path: Path) -> None:
    clock = Clock(datetime(2025, 6, 1, 12, tzinfo=UTC))
    a = DailyLedger(tmp_path, "UTC", 10.0, clock=clock)
    b = DailyLedger(tmp_path, "UTC", 10.0, clock=clock)
    assert a.reserve_chunk("job-a", 6.0) == 6.0
    assert b.reserve_chunk("job-b", 6.0) == 4.0  # only what is left
    assert b.reserve_chunk("job-b", 1.0) == 0.0
    a.settle("job-a", 6.0, 2.5)
    assert a.totals() == {"spent": 2.5, "reserved": 4.0, "remaining": 3.5}
    assert b.release_all("job-b") == 4.0
    assert a.reserve_chunk("job-a", 100.0) == 7.5
    doc = json.loads((tmp_path / "2025-06-01.json").read_text())
    assert doc["jobs"]["job-a"] == {"spent_nusd": 2_500_000_000, "reserved_nusd": 7_500_000_000}


def test_settle_after_midnight_counts_on_the_chunk_day(tmp_path: Path) -> None:
    clock = Clock(datetime(2025, 6, 1, 23, 59, tzinfo=UTC))
    led = DailyLedger(tmp_path, "UTC", 5.0, clock=clock)
    assert led.reserve_chunk("j", 5.0) == 5.0
    clock.t += timedelta(minutes=2)
    led.settle("j", 2.0, 1.5)
    assert led.totals("2025-06-01") == {"spent": 1.5, "reserved": 3.0, "remaining": 0.5}
    assert led.totals() == {"spent": 0.0, "reserved": 0.0, "remaining": 5.0}
    assert led.reserve_chunk("j", 5.0) == 5.0  # a new day, a new allowance


def test_crash_recovery_releases_every_day(tmp_path: Path) -> None:
    clock = Clock(datetime(2025, 6, 1, 23, 0, tzinfo=UTC))
    led = DailyLedger(tmp_path, "UTC", 5.0, clock=clock)
    led.reserve_chunk("j", 2.0)
    clock.t += timedelta(hours=2)
    led.reserve_chunk("j", 1.0)
    # A new process (the old one crashed) knows nothing of the chunks it held.
    fresh = DailyLedger(tmp_path, "UTC", 5.0, clock=clock)
    assert fresh.release_all("j") == 3.0
    assert fresh.totals("2025-06-01")["reserved"] == 0.0 and fresh.totals()["reserved"] == 0.0


_NOON = datetime(2025, 6, 1, 12, tzinfo=UTC)


def _hammer(folder: str, job: str, seed: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
    rng = random.Random(seed)
    # A fixed clock: a real one could cross midnight mid-test and split the day files.
    led = DailyLedger(folder, "Europe/Berlin", 3.0, clock=lambda: _NOON)
    spent_nusd = 0
    iterations = 0
    while True:
        granted = led.reserve_chunk(job, rng.choice([0.01, 0.03, 0.05]))
        if granted == 0:
            break
        actual_nusd = rng.randint(0, round(granted * 10**9))  # a chunk spends <= its grant
        led.settle(job, granted, actual_nusd / 10**9)
        spent_nusd += actual_nusd
        iterations += 1
    led.release_all(job)
    out.put((spent_nusd, iterations))


def test_processes_hammering_one_ledger_never_break_the_daily_cap(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [
        ctx.Process(target=_hammer, args=(str(tmp_path), f"job-{i}", i, out)) for i in range(4)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    spent = [s for s, _ in results]
    iterations = [n for _, n in results]
    assert sum(iterations) >= 100, f"too little contention to prove anything: {iterations}"
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # Lost updates (a read-modify-write without the lock) would hand out more than the
    # cap: the processes' own spending would then add up to more than 3 USD.
    assert sum(spent) <= 3 * 10**9
    assert sum(spent) > 2 * 10**9, "the cap was hardly used: the test proves nothing"
    (day_file,) = tmp_path.glob("????-??-??.json")
    jobs = json.loads(day_file.read_text())["jobs"]
    assert sorted(j["spent_nusd"] for j in jobs.values()) == sorted(spent)
    assert all(j["reserved_nusd"] == 0 for j in jobs.values())
