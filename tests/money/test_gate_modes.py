"""Both modes name a job the same way in the daily ledger: what a crashed online run
left reserved is charged by the next run, here a batch run (simulated provider)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchrun.money.budget import DailyLedger
from batchrun.money.gate import ledger_id
from batchrun.runner import RunOptions, run_job
from batchrun.spec import load_spec
from tests.conftest import make_prompts, write_spec

pytestmark = pytest.mark.timeout(120)


def test_a_batch_run_charges_what_a_crashed_online_run_left(tmp_path: Path) -> None:
    make_prompts(tmp_path / "in.parquet", 60, row_group=30)
    folder = tmp_path / "ledger"
    path = write_spec(tmp_path, mode="batch", shard_rows=30,
                      price={"input_per_1m": 2000.0, "output_per_1m": 2000.0,
                             "batch_input_per_1m": 1000.0, "batch_output_per_1m": 1000.0},
                      batch={"max_requests_per_file": 30, "poll_interval_s": 0.5},
                      simulate={"batch_delay_s": 0.2},
                      budget={"daily_usd": 10.0, "ledger_dir": str(folder)})
    job = ledger_id(load_spec(str(path)))
    # an online run of this job died holding $1.50 of today's allowance
    assert DailyLedger(folder, "UTC", 10.0).reserve_chunk(job, 1.5) == 1.5
    summary = run_job(str(path), RunOptions(progress=False))
    assert summary.ok == 60 and not summary.budget_exhausted
    jobs: dict[str, list[int]] = {}
    for day in folder.glob("????-??-??.json"):  # one, unless the run crossed midnight
        for name, fig in json.loads(day.read_text())["jobs"].items():
            acc = jobs.setdefault(name, [0, 0])
            acc[0] += fig["spent_nusd"]
            acc[1] += fig["reserved_nusd"]
    assert list(jobs) == [job], "the batch run named the job otherwise in the ledger"
    spent, reserved = jobs[job]
    assert reserved == 0  # charged, and every chunk settled
    assert spent / 1e9 == pytest.approx(1.5 + summary.cost_usd, abs=1e-6)
