"""Gemini natively: generateContent online (pure and against the simulator) and its Batch
API (inline requests) in batch mode: errors, expiry, cancel, batch prices, and exactly
once across a crash between create and record (found by the display_name)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from batchrun.api.client import ApiClient, open_session
from batchrun.api.gemini import GenerateContentKind
from batchrun.api.registry import kind_for, provider_for
from batchrun.api.structured import Structured
from batchrun.batch import run_batch_job
from batchrun.batch.clients import require_batch_api
from batchrun.batch.run import cancel_batches
from batchrun.errors import FatalRequestError, RetryableError, SpecError
from batchrun.money.pricing import cost_usd, price_for
from batchrun.sim import MockConfig, start_in_thread
from batchrun.sim.gemini import GEMINI_BATCHES
from batchrun.spec import GenerationSpec, JobSpec
from tests.conftest import batch_spec, result_rows

KEY_ENV = "BATCHRUN_TEST_GEMINI_KEY"
KEY = "AIza-test-gemini-secret"
ROOT = Path(__file__).resolve().parents[2]
MODEL = "gemini-2.5-flash"
SCHEMA = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


def _spec(tmp_path: Path, base_url: str, n: int = 90, **batch: Any) -> JobSpec:
    return batch_spec(tmp_path, "gemini", base_url, KEY_ENV, MODEL, n, **batch)


def test_body_and_parse(tmp_path: Path) -> None:
    gen = GenerationSpec(max_tokens=50, stop=["END"], temperature=0.3)
    spec = _spec(tmp_path, "http://127.0.0.1:9", n=1).model_copy(update={"generation": gen})
    kind = kind_for(spec)
    assert isinstance(kind, GenerateContentKind)
    assert provider_for(spec).url("https://generativelanguage.googleapis.com/v1beta", kind) == (
        "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash"
        ":generateContent")
    fields = {**spec.generation.request_fields(), **Structured(SCHEMA).request_fields()}
    body = kind.body(spec, kind.payload(spec, "Tag it.")[0], fields)
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert body["contents"] == [{"role": "user", "parts": [{"text": "Tag it."}]}]
    assert body["generationConfig"] == {"maxOutputTokens": 50, "stopSequences": ["END"],
                                        "temperature": 0.3, "responseMimeType":
                                        "application/json", "responseJsonSchema": SCHEMA}
    c = kind.parse({"candidates": [{"content": {"parts": [{"text": '{"label":"x"}'}]},
                                    "finishReason": "MAX_TOKENS"}],
                    "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 4,
                                      "thoughtsTokenCount": 2}})
    assert (c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens) == (
        '{"label":"x"}', "length", 9, 6)
    p = provider_for(spec)
    assert type(p.line_outcome({"error": {"code": 13}}, "completed", kind)) is RetryableError
    assert type(p.line_outcome({"error": {"code": 3}}, "completed", kind)) is FatalRequestError


def test_online_against_the_simulator(tmp_path: Path) -> None:
    with start_in_thread(MockConfig(api_key=KEY)) as srv:
        spec = _spec(tmp_path, srv.url + "/v1beta", n=1)
        kind, structured = kind_for(spec), Structured(SCHEMA)

        async def go() -> Any:
            async with open_session(spec.endpoint, 2) as s:
                client = ApiClient(s, spec.endpoint, KEY, kind, provider_for(spec))
                fields = {**spec.generation.request_fields(), **structured.request_fields()}
                return await client.complete(kind.body(spec, kind.payload(spec, "Tag")[0],
                                                       fields))

        c = asyncio.run(go())
        assert json.loads(structured.check(c)["parsed"])["label"]
        assert srv.records()[-1]["completion_tokens"] == c.completion_tokens


def test_batches_errors_expiry_and_batch_prices(tmp_path: Path) -> None:
    cfg = MockConfig(batch_delay_s=0.2, api_key=KEY, batch_line_error_rate=0.15,
                     batch_expire_every=2, seed=5)
    with start_in_thread(cfg) as srv:
        spec = _spec(tmp_path, srv.url)
        out = run_batch_job(spec, wait=True, initial_poll_s=0.05)
        stats = srv.stats()
    assert out.pending == 0 and len(out.batches) > 3  # expired and failed rows went again
    rows = result_rows(spec)
    assert sorted(r["id"] for r in rows) == [f"r{i:06d}" for i in range(90)]
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["error_type"] for r in rows if r["status"] != "ok"} <= {"rpc_3"}
    assert stats["ok"] == len(ok) > 60 and stats["duplicate_ok_prompts"] == 0
    price = price_for(spec)
    assert all(r["cost_usd"] == pytest.approx(cost_usd(
        price, r["prompt_tokens"], r["completion_tokens"], batch=True)) for r in ok)


def test_stop_cancels_and_rerun_resends(tmp_path: Path) -> None:
    with start_in_thread(MockConfig(batch_delay_s=3.0, api_key=KEY)) as srv:
        spec = _spec(tmp_path, srv.url)
        assert run_batch_job(spec, wait=False, initial_poll_s=0.05).pending == 3
        assert cancel_batches(spec) == 3
        out = run_batch_job(spec, wait=True, initial_poll_s=0.05)
        stats = srv.stats()
    assert {b["status"] for b in out.batches if b["attempt"] == 1} == {"cancelled"}
    assert stats["ok"] == 90 and stats["duplicate_ok_prompts"] == 0


_DRIVER = ("import sys; from batchrun.spec import load_spec; "
           "from batchrun.batch.run import run_batch_job; "
           "run_batch_job(load_spec(sys.argv[1]), wait=True, initial_poll_s=0.05)")


def test_crash_between_create_and_record_makes_no_second_batch(tmp_path: Path) -> None:
    with start_in_thread(MockConfig(batch_delay_s=0.6, api_key=KEY)) as srv:
        spec = _spec(tmp_path, srv.url)
        srv.app[GEMINI_BATCHES].create_answer_delay_s = 60.0
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
        srv.app[GEMINI_BATCHES].create_answer_delay_s = 0.0
        assert proc.returncode == -9
        state = json.loads((Path(spec.output) / "batch" / "state.json").read_text())
        assert "uploaded" in [c["step"] for c in state["chunks"]]
        out = run_batch_job(spec, wait=True, initial_poll_s=0.05)
        stats = srv.stats()
    assert out.pending == 0 and stats["by_outcome"] == {"batch_created": 3, "ok": 90}
    assert stats["duplicate_ok_prompts"] == 0 and len(result_rows(spec)) == 90


def test_chunks_fit_the_inline_cap(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "http://127.0.0.1:9", n=1, max_requests_per_file=30)
    assert require_batch_api(spec).batch.max_bytes_per_file == 20_000_000  # default cut
    with pytest.raises(SpecError, match="at most 20,000,000 per batch"):
        require_batch_api(_spec(tmp_path / "b", "http://127.0.0.1:9", n=1,
                                max_bytes_per_file=50_000_000))
