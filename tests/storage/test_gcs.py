"""gs:// through the conditional-write seam, against a local GCS emulator
(``gcp-storage-emulator``, in this process, on loopback).

What the emulator can show: the seam's create / read-with-generation / replace /
delete, the requests it sends (``ifGenerationMatch=0`` to create, ``=<generation>`` to
replace, the media read pinned to the generation read), retries of 503/500/resets, and
the daily ledger's compare-and-swap loop on a ``gs://`` prefix. What it cannot: this
emulator ignores generation preconditions (it answers 200 where GCS answers 412), so
a lost race on GCS is not exercised here (the 412 path is S3's, tested on moto); nor
are Parquet reads through pyarrow's GcsFileSystem (they hang on this emulator), so no
whole job runs on gs:// in these tests.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import requests

from batchrun.io import conditional, stores
from batchrun.io.conditional import conditional_for
from batchrun.io.gcs import GCSConditional
from batchrun.money.budget import DailyLedger
from tests.storage.conftest import free_port
from tests.storage.faultproxy import fault_proxy

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def emulator() -> Iterator[str]:
    from gcp_storage_emulator.server import create_server

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def _use(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Point this process's gs:// at ``url`` (the seam and pyarrow cache per process)."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    for cache in (conditional._cache, stores._filesystems):
        for key in [k for k in cache if k[0] in ("gs", "gcs")]:
            del cache[key]


@pytest.fixture
def gbucket(emulator: str, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"g-{uuid.uuid4().hex[:12]}"
    r = requests.post(f"{emulator}/storage/v1/b", params={"project": "test"},
                      json={"name": name}, timeout=10)
    assert r.status_code == 200, r.text
    _use(monkeypatch, emulator)
    return name


def test_create_read_replace_delete_by_generation(gbucket: str) -> None:
    cond, path = conditional_for(f"gs://{gbucket}/out/lease.json")
    assert isinstance(cond, GCSConditional) and path == f"{gbucket}/out/lease.json"
    assert cond.read_with_version(path) is None
    assert cond.put_if_absent(path, b'{"v": 1}')
    data, gen = cond.read_with_version(path) or (b"", "")
    assert data == b'{"v": 1}' and gen.isdigit() and int(gen) > 0
    assert cond.put_if_version(path, b'{"v": 2}', gen)
    data2, gen2 = cond.read_with_version(path) or (b"", "")
    assert data2 == b'{"v": 2}' and gen2 != gen
    cond.delete(path)
    assert cond.read_with_version(path) is None
    cond.delete(path)  # already gone: not an error


def test_the_seam_sends_generation_preconditions(gbucket: str, emulator: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, str]] = []
    with fault_proxy(emulator) as proxy:
        proxy.plan = lambda method, path, n: seen.append((method, path)) and None
        _use(monkeypatch, proxy.url)
        cond, path = conditional_for(f"gs://{gbucket}/ledger/day.json")
        assert cond.put_if_absent(path, b"a")
        _, gen = cond.read_with_version(path) or (b"", "")
        assert cond.put_if_version(path, b"b", gen)
    posts = [p for m, p in seen if m == "POST"]
    assert len(posts) == 2 and all("/upload/storage/v1/b/" in p for p in posts)
    assert "ifGenerationMatch=0" in posts[0]
    assert f"ifGenerationMatch={gen}" in posts[1]
    media = [p for m, p in seen if m == "GET" and "alt=media" in p]
    assert media and all(re.search(r"generation=\d+", p) for p in media)


def test_throttling_500s_and_resets_are_retried(gbucket: str, emulator: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    faults = {0: "slowdown", 1: "500", 2: "reset", 4: "slowdown"}
    with fault_proxy(emulator) as proxy:
        proxy.plan = lambda method, path, n: faults.get(n)
        _use(monkeypatch, proxy.url)
        cond, path = conditional_for(f"gs://{gbucket}/x/state.json")
        assert cond.put_if_absent(path, b"state")
        assert (cond.read_with_version(path) or (b"",))[0] == b"state"
    assert proxy.injected == {"slowdown": 2, "500": 1, "reset": 1}


def test_a_store_that_stays_down_is_one_oserror(gbucket: str, emulator: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    with fault_proxy(emulator) as proxy:
        proxy.plan = lambda method, path, n: "500"
        _use(monkeypatch, proxy.url)
        cond = GCSConditional(attempts=3)
        with pytest.raises(OSError, match=rf"gs://{gbucket}/y.json: HTTP 500"):
            cond.put_if_absent(f"{gbucket}/y.json", b"y")
    assert proxy.injected == {"500": 3}


def test_the_daily_ledger_on_gs(gbucket: str) -> None:
    uri = f"gs://{gbucket}/ledger"
    ledger = DailyLedger(uri, "UTC", 2.0)
    assert ledger.reserve_chunk("a", 0.5) == 0.5
    assert ledger.reserve_chunk("b", 0.25) == 0.25
    ledger.settle("a", 0.5, 0.1)
    assert ledger.release_all("b") == 0.25
    assert ledger.reserve_chunk("a", 0.3) == 0.3
    again = DailyLedger(uri, "UTC", 2.0)  # a crashed run of "a" left 0.3 reserved
    assert again.charge_stale("a") == pytest.approx(0.3)
    t = again.totals()
    assert t["spent"] == pytest.approx(0.4) and t["reserved"] == 0
    assert t["remaining"] == pytest.approx(1.6)
    while again.reserve_chunk("c", 0.5):  # the allowance runs out, never past it
        pass
    assert again.totals()["remaining"] == 0
    day = datetime.now(UTC).date().isoformat()
    cond, path = conditional_for(f"{uri}/{day}.json")
    doc = json.loads((cond.read_with_version(path) or (b"{}",))[0])
    held = sum(j["reserved_nusd"] + j["spent_nusd"] for j in doc["jobs"].values())
    assert held == 2 * 10**9
