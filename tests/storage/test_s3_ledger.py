"""The daily ledger on an S3 URI: compare-and-swap on the day object, never a lock."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from batchrun.io import stores
from batchrun.money.budget import NANO, DailyLedger
from tests.storage.conftest import keys, s3_client

pytestmark = pytest.mark.timeout(120)

# one job on "another machine": reserves chunks until the day's allowance is gone
_JOB = r"""
import sys
from batchrun.money.budget import DailyLedger, nano_usd
ledger = DailyLedger(sys.argv[1], "UTC", 1.0)
got = saved = n = 0
while True:
    g = ledger.reserve_chunk(sys.argv[2], 0.013)
    if not g:
        break
    got += nano_usd(g)
    n += 1
    if n % 3 == 0:  # spend some of it, as a running job settles
        ledger.settle(sys.argv[2], g, 0.004)
        saved += nano_usd(g) - nano_usd(0.004)
print(got, saved)
"""


def test_concurrent_jobs_on_an_s3_ledger_never_overspend(bucket: str) -> None:
    uri = f"s3://{bucket}/ledger/"
    procs = [subprocess.Popen([sys.executable, "-c", _JOB, uri, f"job-{i}"],
                              stdout=subprocess.PIPE, text=True) for i in range(4)]
    out = [p.communicate(timeout=100)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    granted, saved = [int(o[0]) for o in out], [int(o[1]) for o in out]
    assert all(g > 0 for g in granted), granted  # every job drew while the others did
    day = datetime.now(UTC).date().isoformat()
    body = s3_client().get_object(Bucket=bucket, Key=f"ledger/{day}.json")["Body"].read()
    doc = json.loads(body)
    # every grant is in the document once: none lost to a race, none granted twice
    held = sum(j["reserved_nusd"] + j["spent_nusd"] for j in doc["jobs"].values())
    assert sum(j["spent_nusd"] for j in doc["jobs"].values()) > 0
    assert held == sum(granted) - sum(saved)  # no update lost, none applied twice
    assert held <= 1 * NANO  # never overspent
    assert DailyLedger(uri, "UTC", 1.0).totals(day)["remaining"] == 0
    assert keys(bucket, "ledger/") == [f"ledger/{day}.json"]  # no lock object, no temp


def test_release_and_stale_charges_on_s3(bucket: str) -> None:
    stores.configure(None)
    uri = f"s3://{bucket}/ledger"
    ledger = DailyLedger(uri, "UTC", 2.0)
    assert ledger.reserve_chunk("a", 0.5) == 0.5
    assert ledger.reserve_chunk("b", 0.25) == 0.25
    ledger.settle("a", 0.5, 0.1)
    assert ledger.release_all("b") == 0.25
    assert ledger.reserve_chunk("a", 0.3) == 0.3
    # a crashed run of "a" left 0.3 reserved: the next run counts it as spent
    again = DailyLedger(uri, "UTC", 2.0)
    assert again.charge_stale("a") == pytest.approx(0.3)
    t = again.totals()
    assert t["spent"] == pytest.approx(0.4) and t["reserved"] == 0
    assert t["remaining"] == pytest.approx(1.6)
