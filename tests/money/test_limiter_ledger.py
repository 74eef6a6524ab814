"""The limiter actor never waits on the daily ledger's file inside a lease: with the
ledger's lock held by another process, leases covered by the drawn block are granted;
one that needs more waits for a draw, which comes once the lock is free."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from batchrun.limits.limiter import RateLimiter, limiter_name
from batchrun.money.budget import DailyLedger
from batchrun.money.gate import BLOCK_USD, BudgetConfig

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(120)]

# Takes the ledger's lock, says so, and keeps it until told (or 60 s: never forever).
_HOLD = """
import fcntl, select, sys
fh = open(sys.argv[1], "a+b")
fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
print("held", flush=True)
select.select([sys.stdin], [], [], 60)
"""


@pytest.fixture
def limiter(tmp_path: Path) -> Iterator[tuple[Any, Path]]:
    folder = tmp_path / "ledger"
    cfg = BudgetConfig(job_cap_usd=None, daily_usd=1.0, ledger_dir=str(folder), job_id="j")
    actor = RateLimiter.options(name=limiter_name("t-gate-lock")).remote(  # type: ignore[attr-defined]
        "t-gate-lock", 1_000_000, None, cfg)
    try:
        yield actor, folder
    finally:
        ray.kill(actor, no_restart=True)


def _lease(actor: Any, n: int, usd: float, settle: list[tuple[float, float]]) -> int:
    """Slots granted for ``n`` requests of ``usd`` each (and the settlements sent along)."""
    answer = ray.get(actor.lease.remote([1.0] * n, [usd] * n, settle, (0, 0.0)), timeout=30)
    return sum(s is not None for s in answer.starts)


def test_leases_are_granted_while_another_process_holds_the_ledger(
        limiter: tuple[Any, Path]) -> None:
    actor, folder = limiter
    stats = ray.get(actor.stats.remote(), timeout=60)
    assert stats["ledger_draws"] == 1  # the first block, drawn when the limiter started
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder / "ledger.lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        # 4 x 10 requests of $0.001 = $0.04 of the $0.05 block: under half left after the
        # third, so a top-up starts and waits for the lock, and the leases go on.
        settle: list[tuple[float, float]] = []
        for _ in range(4):
            assert _lease(actor, 10, 0.001, settle) == 10
            settle = [(0.001, 0.0005)] * 10
        assert holder.poll() is None, "the lock was let go before the leases were answered"
        # $0.02 is more than the block has left: this lease waits for a draw, which
        # cannot happen while the lock is held.
        waiting = actor.lease.remote([1.0], [0.02], settle, (0, 0.0))
        ready, _ = ray.wait([waiting], timeout=1.0)
        assert not ready, "a lease beyond the block was granted with no draw from the ledger"
        assert holder.stdin is not None
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.wait(timeout=30) == 0
        assert sum(s is not None for s in ray.get(waiting, timeout=30).starts) == 1
    finally:
        holder.kill()
        holder.wait()
    final = ray.get(actor.close.remote(), timeout=30)
    assert final["ledger_draws"] >= 2 and not final["budget_exhausted"]
    totals = DailyLedger(folder, "UTC", 1.0).totals()
    # the 40 settled at half their reservation; the last one's reservation is released
    assert totals["spent"] == pytest.approx(0.02) and totals["reserved"] == 0.0
    assert BLOCK_USD == 0.05  # the figures above assume it


def _reserved(folder: Path) -> float:
    return DailyLedger(folder, "UTC", 1.0).totals()["reserved"]


def test_a_limiter_whose_last_handle_goes_hands_the_allowance_back(tmp_path: Path) -> None:
    """A Ray Data pipeline's limiter is never closed by a driver: it ends when its plan is
    dropped, and its __ray_shutdown__ gives back the block it drew (not charged later)."""
    import gc
    import time

    folder = tmp_path / "ledger"
    cfg = BudgetConfig(job_cap_usd=None, daily_usd=1.0, ledger_dir=str(folder), job_id="j2")
    actor = RateLimiter.options(name=limiter_name("t-gate-scope")).remote(  # type: ignore[attr-defined]
        "t-gate-scope", 1_000_000, None, cfg)
    assert _lease(actor, 2, 0.001, []) == 2
    assert _reserved(folder) == pytest.approx(BLOCK_USD)  # the block drawn at start
    del actor
    gc.collect()
    deadline = time.monotonic() + 30
    while _reserved(folder) and time.monotonic() < deadline:
        time.sleep(0.2)
    # the two unsettled requests are released with the rest: nothing stays reserved
    assert _reserved(folder) == 0.0


def test_a_pipelines_limiter_is_closed_by_name_at_exit(tmp_path: Path) -> None:
    from batchrun.ray_data import _close_limiter

    folder = tmp_path / "ledger"
    cfg = BudgetConfig(job_cap_usd=None, daily_usd=1.0, ledger_dir=str(folder), job_id="j3")
    name = limiter_name("t-gate-exit")
    actor = RateLimiter.options(name=name).remote("t-gate-exit", 1_000_000, None, cfg)  # type: ignore[attr-defined]
    try:
        assert ray.get(actor.stats.remote(), timeout=60)["ledger_draws"] == 1
        assert _reserved(folder) == pytest.approx(BLOCK_USD)
        _close_limiter(name)
        assert _reserved(folder) == 0.0
        _close_limiter(name)  # closed once: a second close only reports
        _close_limiter(limiter_name("t-gate-never-made"))  # gone already: nothing to do
    finally:
        ray.kill(actor, no_restart=True)
