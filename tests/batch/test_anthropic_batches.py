"""Batch mode on Anthropic's Message Batches (simulated): chunks, retries, batch prices,
cancel, and exactly once across a crash between create and record, without metadata."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from batchrun.api import registry
from batchrun.api.openai import OpenAIProvider
from batchrun.batch import run_batch_job
from batchrun.batch.clients import require_batch_api
from batchrun.batch.run import cancel_batches
from batchrun.errors import SpecError
from batchrun.money.pricing import cost_usd, price_for
from batchrun.sim import MockConfig, RunningServer, start_in_thread
from batchrun.sim.anthropic_batches import MESSAGE_BATCHES
from batchrun.spec import JobSpec, load_spec
from tests.conftest import batch_spec, result_rows, write_spec

KEY_ENV = "BATCHRUN_TEST_ANTHROPIC_KEY"
KEY = "sk-ant-batch-secret-123"
ROOT = Path(__file__).resolve().parents[2]
MODEL = "claude-haiku-4-5"


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


def _spec(tmp_path: Path, base_url: str, n: int = 90, **batch: Any) -> JobSpec:
    return batch_spec(tmp_path, "anthropic", base_url, KEY_ENV, MODEL, n, **batch)


def _one_ok_result_per_row(spec: JobSpec, n: int) -> list[dict[str, Any]]:
    rows = result_rows(spec)
    assert sorted(r["id"] for r in rows) == [f"r{i:06d}" for i in range(n)]
    assert all(r["status"] == "ok" and r["response"] and r["batch_id"].startswith("msgbatch_")
               for r in rows)
    return rows


def _outcomes(srv: RunningServer) -> dict[str, int]:
    return srv.stats()["by_outcome"]


def test_chunks_errors_expired_requests_and_batch_prices(tmp_path: Path) -> None:
    cfg = MockConfig(batch_delay_s=0.2, api_key=KEY, batch_line_error_rate=0.15,
                     batch_expire_every=2, seed=3)
    with start_in_thread(cfg) as srv:
        spec = _spec(tmp_path, srv.url)
        out = run_batch_job(spec, wait=True, initial_poll_s=0.05)
        stats = srv.stats()
    assert out.pending == 0 and len(out.batches) > 3  # the failed and expired went again
    rows = result_rows(spec)
    assert sorted(r["id"] for r in rows) == [f"r{i:06d}" for i in range(90)]
    ok = [r for r in rows if r["status"] == "ok"]
    # an invalid_request_error is the row's own: recorded, not retried; api_error is retried
    assert {r["error_type"] for r in rows if r["status"] != "ok"} == {"invalid_request_error"}
    assert 60 < len(ok) < 90 and all(r["attempts"] == 1 for r in rows if r["status"] != "ok")
    assert any(r["attempts"] > 1 for r in ok)  # expired and api_error rows went again
    assert stats["ok"] == len(ok) and stats["duplicate_ok_prompts"] == 0  # one bill per row
    price = price_for(spec)
    for r in ok:  # billed at the batch price (half), as the table says
        assert r["cost_usd"] == pytest.approx(cost_usd(price, r["prompt_tokens"],
                                                       r["completion_tokens"], batch=True))
        assert r["cost_usd"] < cost_usd(price, r["prompt_tokens"], r["completion_tokens"])
        assert r["cache_read_tokens"] == 0


def test_stop_cancels_and_rerun_resends(tmp_path: Path) -> None:
    with start_in_thread(MockConfig(batch_delay_s=3.0, api_key=KEY)) as srv:
        spec = _spec(tmp_path, srv.base_url)  # base_url with /v1 works as well
        assert run_batch_job(spec, wait=False, initial_poll_s=0.05).pending == 3
        assert cancel_batches(spec) == 3
        out = run_batch_job(spec, wait=True, initial_poll_s=0.05)
        stats = srv.stats()
    assert {b["status"] for b in out.batches if b["attempt"] == 1} == {"cancelled"}
    _one_ok_result_per_row(spec, 90)
    assert stats["ok"] == 90 and stats["duplicate_ok_prompts"] == 0


# -- the crash window: created, not recorded -------------------------------------------

_DRIVER = ("import sys; from batchrun.spec import load_spec; "
           "from batchrun.batch.run import run_batch_job; "
           "run_batch_job(load_spec(sys.argv[1]), wait=True, initial_poll_s=0.05)")


def _state(spec: JobSpec) -> dict[str, Any]:
    path = Path(spec.output) / "batch" / "state.json"
    return json.loads(path.read_text()) if path.exists() else {"chunks": []}


def _kill_while_create_is_answered(tmp_path: Path, srv: RunningServer) -> None:
    """Kill -9 the driver while the provider holds back the answer to a batch it has
    made (the ledger shows it): the state says ``uploaded``, with its intent."""
    srv.app[MESSAGE_BATCHES].create_answer_delay_s = 60.0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(tmp_path / "job.yaml")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        if any(r["outcome"] == "batch_created" for r in srv.records()):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(10)
    srv.app[MESSAGE_BATCHES].create_answer_delay_s = 0.0
    assert proc.returncode == -9, proc.stderr.read() if proc.stderr else ""


def _decoy(srv: RunningServer, n: int) -> None:
    """Another job of the same account makes a batch of the same size meanwhile."""
    import httpx2 as httpx

    reqs = [{"custom_id": f"other-{i}", "params": {
        "model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": f"o{i}"}]}}
        for i in range(n)]
    r = httpx.post(srv.url + "/v1/messages/batches", json={"requests": reqs},
                   headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"})
    assert r.status_code == 200


@pytest.mark.parametrize("ended_first", [False, True])
def test_crash_between_create_and_record_makes_no_second_batch(tmp_path: Path,
                                                               ended_first: bool) -> None:
    with start_in_thread(MockConfig(batch_delay_s=0.6, api_key=KEY)) as srv:
        spec = _spec(tmp_path, srv.url)
        _kill_while_create_is_answered(tmp_path, srv)
        steps = [c["step"] for c in _state(spec)["chunks"]]
        assert "uploaded" in steps and result_rows(spec) == []
        intent = next(c for c in _state(spec)["chunks"] if c["step"] == "uploaded")
        assert intent["intent_at"] and intent["batch_id"] is None
        _decoy(srv, intent["n_requests"])  # same size, newer: only custom_ids tell it apart
        if ended_first:
            time.sleep(1.0)  # both batches ended: matched by their results' custom_ids
        out = run_batch_job(spec, wait=True, initial_poll_s=0.05)
        records = srv.records()
        ours = [r["key"] for r in records if r["outcome"] == "batch_created"]
    assert out.pending == 0 and len(out.batches) == 3
    _one_ok_result_per_row(spec, 90)
    assert len(ours) == 4  # three chunks, each created once, and the decoy
    decoy = ours[1]  # created right after the killed driver's batch
    assert decoy not in {b["batch_id"] for b in out.batches}
    ok_keys = [r["key"] for r in records if r["outcome"] == "ok"]
    assert len(ok_keys) == 90 + intent["n_requests"]  # ours, once each, and the decoy's
    assert len(set(ok_keys)) == len(ok_keys)


# -- bad input -----------------------------------------------------------------------


def test_batch_against_a_provider_without_batch_api(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    class NoBatch(OpenAIProvider):
        api = "nobatch"

    monkeypatch.setitem(registry.PROVIDERS, "nobatch", NoBatch())
    spec = _spec(tmp_path, "http://127.0.0.1:9").model_copy(update={"endpoint": load_spec(
        write_spec(tmp_path, endpoint={"api": "nobatch"})).endpoint})
    with pytest.raises(SpecError, match=r"mode: batch: endpoint\.api nobatch has no batch API"):
        require_batch_api(spec)
    too_big = _spec(tmp_path / "b", "http://127.0.0.1:9", max_requests_per_file=200_000)
    with pytest.raises(SpecError, match="at most 100,000 per batch"):
        require_batch_api(too_big)
