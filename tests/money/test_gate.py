"""money/gate.Gate alone (no Ray): the job cap and the daily ledger on a real folder."""

from __future__ import annotations

import json
import multiprocessing as mp
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from batchrun.money.budget import DailyLedger
from batchrun.money.gate import Gate, config_for, ledger_id
from batchrun.money.pricing import ModelPrice, cost_usd, worst_case_usd
from batchrun.spec import load_spec
from tests.conftest import write_spec

pytestmark = pytest.mark.timeout(120)
PRICE = ModelPrice(
    model="m", input_per_1m=150.0, output_per_1m=600.0, batch_input_per_1m=75.0,
    batch_output_per_1m=300.0, source="test",
)  # fmt: skip  (a token costs a multiple of 150 nano-USD: the sums are exact)
NANO = 10**9


def _until(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _ledger(folder: Path, daily: float) -> DailyLedger:
    return DailyLedger(folder, "UTC", daily)


def _jobs(folder: Path) -> dict[str, dict[str, int]]:
    """Every job's figures in the ledger, summed over its day files."""
    out: dict[str, dict[str, int]] = {}
    for path in folder.glob("????-??-??.json"):
        for job, fig in json.loads(path.read_text())["jobs"].items():
            acc = out.setdefault(job, {"spent_nusd": 0, "reserved_nusd": 0})
            for k in acc:
                acc[k] += fig[k]
    return out


def test_cap_and_day_are_exact_under_interleaved_reserve_settle_release(tmp_path: Path) -> None:
    rng = random.Random(11)
    cap, daily = 2.5, 1.0  # the day binds first; the job cap is checked as well
    gate = Gate(cap, _ledger(tmp_path, daily), "j", block_usd=0.05, flush_every_s=0.001)
    gate.start()
    in_flight: list[float] = []
    spent_pico = refused = 0
    for _ in range(6000):
        if in_flight and (rng.random() < 0.5 or len(in_flight) > 200):
            reserved = in_flight.pop(rng.randrange(len(in_flight)))
            if rng.random() < 0.1:
                gate.release(reserved)
                continue
            prompt, done = rng.randint(5, 3000), rng.randint(0, 256)
            gate.settle(reserved, min(reserved, cost_usd(PRICE, prompt, done)))
            spent_pico += min(round(reserved * 10**12), prompt * 150_000_000 + done * 600_000_000)
        else:
            reserved = worst_case_usd(PRICE, rng.randint(5, 3000), rng.choice([16, 256]))
            if gate.reserve(reserved):
                in_flight.append(reserved)
            else:
                refused += 1
        assert gate.book.spent + gate.book.reserved <= min(cap, daily)
    assert refused > 0 and gate.exhausted, "the day was never spent: the test proves nothing"
    for reserved in in_flight:
        gate.release(reserved)
    gate.close(release_all=True)
    (job,) = _jobs(tmp_path).values()
    assert job["reserved_nusd"] == 0
    assert job["spent_nusd"] == round(gate.book.spent * NANO) <= daily * NANO
    assert gate.book.spent == spent_pico / 10**12 > 0.5 * daily  # in flight when it shut: unspent


def test_the_block_is_drawn_ahead_topped_up_and_handed_back(tmp_path: Path) -> None:
    led = _ledger(tmp_path, 1.0)
    gate = Gate(None, led, "j", block_usd=0.05, flush_every_s=0.01)
    gate.start()
    assert gate.draws == 1 and led.totals()["reserved"] == 0.05
    assert gate.reserve(0.02) and gate.draws == 1  # from the block: no ledger call
    assert gate.reserve(0.01)  # under half a block left: topped up in the background
    _until(lambda: gate.draws == 2, "the top-up")
    _until(lambda: led.totals()["reserved"] == 0.08, "the top-up in the ledger")
    assert gate.reserve(0.2) and gate.draws >= 3  # more than the block: drawn for it
    gate.settle(0.02, 0.015)
    _until(lambda: led.totals()["spent"] == 0.015, "the settlement written")
    gate.release(0.01)
    gate.close()  # batch: the unused block goes back, the open reservation (0.2) stays
    assert led.totals() == {"spent": 0.015, "reserved": 0.2, "remaining": 0.785}


def test_the_day_spent_shuts_the_gate_and_it_stays_shut(tmp_path: Path) -> None:
    led = _ledger(tmp_path, 0.3)
    other = Gate(None, _ledger(tmp_path, 0.3), "other")
    assert other.reserve(0.2)  # another job holds most of the day
    gate = Gate(None, led, "j", block_usd=0.05)
    gate.start()
    assert gate.reserve(0.05)
    assert gate.reserve(0.04)  # a top-up takes the last of the day
    assert not gate.reserve(0.02) and gate.exhausted  # a draw after the miss came back short
    other.close(release_all=True)  # allowance comes back, but the run stays shut: in order
    assert not gate.reserve(0.001)
    gate.close(release_all=True)
    assert led.totals()["reserved"] == 0.0


def test_the_job_cap_shuts_the_gate_without_a_ledger() -> None:
    gate = Gate(0.3, None)
    assert all(gate.reserve(0.1) for _ in range(3))
    assert not gate.reserve(1e-9) and gate.exhausted
    gate.settle(0.1, 0.05)
    assert not gate.reserve(1e-9), "once refused, no later request jumps the queue"
    assert gate.book.spent == 0.05


def test_chunks_are_admitted_in_order_and_settled_once(tmp_path: Path) -> None:
    led = _ledger(tmp_path, 1.0)
    gate = Gate(2.0, led, "j")  # batch: no block, each chunk draws what it needs
    assert gate.admit(0, 0.6) and gate.admit(0, 0.6)  # a chunk is reserved once
    assert not gate.admit(1, 0.6) and gate.refused(1)
    assert not gate.admit(2, 0.1) and gate.refused(2), "a later chunk jumped the queue"
    assert not gate.refused(0)
    gate.settle_chunk(0, 0.4)
    gate.settle_chunk(0, 0.4)  # collected twice: settled once
    gate.close()
    assert led.totals() == {"spent": 0.4, "reserved": 0.0, "remaining": 0.6}
    assert Gate(None, None).admit(5, 1e9), "no budget: every chunk goes"


def _job_in_process(folder: str, job: str, seed: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
    rng = random.Random(seed)
    gate = Gate(None, _ledger(Path(folder), 3.0), job, block_usd=0.05, flush_every_s=0.002)
    gate.start()
    spent_nusd = 0
    while gate.reserve(usd := rng.choice([0.001, 0.003, 0.02, 0.07])):
        if rng.random() < 0.1:
            gate.release(usd)
            continue
        actual = rng.randint(0, round(usd * NANO))
        gate.settle(usd, actual / NANO)
        spent_nusd += actual
    gate.close(release_all=True)
    out.put((job, spent_nusd, gate.draws))


def test_two_processes_sharing_a_ledger_never_overspend_it(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [ctx.Process(target=_job_in_process, args=(str(tmp_path), f"job-{i}", i, out))
             for i in range(2)]
    for p in procs:
        p.start()
    results = {job: (spent, draws) for job, spent, draws in (out.get(timeout=90) for _ in procs)}
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert sum(d for _, d in results.values()) >= 20, f"too few draws to prove anything: {results}"
    total = sum(s for s, _ in results.values())
    assert 2 * NANO < total <= 3 * NANO  # the day was used, and never more
    jobs = _jobs(tmp_path)
    assert {j: f["spent_nusd"] for j, f in jobs.items()} == {j: s for j, (s, _) in results.items()}
    assert all(f["reserved_nusd"] == 0 for f in jobs.values())


def test_threads_sharing_one_gate_never_overspend_the_day(tmp_path: Path) -> None:
    gate = Gate(None, _ledger(tmp_path, 0.5), "j", block_usd=0.01, flush_every_s=0.001)
    gate.start()
    barrier = threading.Barrier(6)

    def hammer() -> None:
        barrier.wait()
        while gate.reserve(0.0007):
            gate.settle(0.0007, 0.0007)

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    gate.close(release_all=True)
    assert gate.draws > 20
    (job,) = _jobs(tmp_path).values()
    assert job == {"spent_nusd": round(gate.book.spent * NANO), "reserved_nusd": 0}
    assert 0.49 < gate.book.spent <= 0.5


def test_a_crashed_run_is_charged_by_the_next(tmp_path: Path) -> None:
    gate = Gate(None, _ledger(tmp_path, 1.0), "j", block_usd=0.05, flush_every_s=3600)
    gate.start()
    assert gate.reserve(0.02)  # the block stays over half full: no top-up
    gate.settle(0.02, 0.01)  # not yet written when the process dies
    # the next run of the job (either mode) charges what is left reserved, as spent
    assert Gate(None, _ledger(tmp_path, 1.0), "j").charge_crashed_run() == 0.05
    assert _jobs(tmp_path) == {"j": {"spent_nusd": 50_000_000, "reserved_nusd": 0}}


def test_a_restarted_limiter_gate_refuses_but_records_settlements(tmp_path: Path) -> None:
    led = _ledger(tmp_path, 1.0)
    assert led.reserve_chunk("j", 0.05) == 0.05  # the limiter's first life drew a block
    gate = Gate(1.0, _ledger(tmp_path, 1.0), "j", block_usd=0.05, restarted=True)
    gate.start()
    assert not gate.reserve(0.001) and gate.exhausted
    gate.settle(0.03, 0.02)  # a request its first life reserved came back
    gate.close(release_all=True)
    assert gate.book.spent == 0.02
    assert led.totals() == {"spent": 0.02, "reserved": 0.0, "remaining": 0.98}


def test_one_ledger_id_for_both_modes(tmp_path: Path) -> None:
    budget = {"daily_usd": 5.0, "ledger_dir": str(tmp_path / "ledger"), "max_cost_usd": 2.0}
    online = load_spec(str(write_spec(tmp_path, budget=budget)))
    batch = load_spec(str(write_spec(tmp_path, budget=budget, mode="batch")))
    a, b = config_for(online, 0.5), config_for(batch)
    assert a is not None and b is not None
    assert a.job_id == b.job_id == ledger_id(online) and a.job_cap_usd == 1.5
    elsewhere = load_spec(str(write_spec(tmp_path, budget=budget, output=str(tmp_path / "o2"))))
    assert ledger_id(elsewhere) != ledger_id(online)
    assert config_for(load_spec(str(write_spec(tmp_path)))) is None
