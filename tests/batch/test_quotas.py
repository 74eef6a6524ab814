"""Batch queue quotas are back-pressure: a job larger than the quota finishes in waves,
and a refusal (OpenAI's token_limit_exceeded, Anthropic's queue 429) waits and retries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from batchrun.api.tokens import count_chat_tokens, count_text_tokens
from batchrun.batch import run_batch_job
from batchrun.batch.quotas import may_create, quota_refused, requeue
from batchrun.batch.requests import ChunkWriter
from batchrun.batch.state import ChunkState
from batchrun.sim import MockConfig, RunningServer, start_in_thread
from batchrun.sim.quotas import batch_tokens
from batchrun.spec import JobSpec, load_spec
from tests.conftest import make_prompts, write_spec

KEY_ENV = "BATCHRUN_TEST_QUOTA_KEY"
KEY = "sk-quota-secret-123"


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


def _spec(tmp_path: Path, base_url: str, api: str = "openai", **batch: Any) -> JobSpec:
    make_prompts(tmp_path / "in.parquet", 90, row_group=50)
    settings = {"max_requests_per_file": 30, "poll_interval_s": 0.2, **batch}
    model = "claude-haiku-4-5" if api == "anthropic" else "gpt-4.1-mini"
    path = write_spec(tmp_path, mode="batch", batch=settings, shard_rows=40, model=model,
                      endpoint={"api": api, "base_url": base_url, "api_key_env": KEY_ENV})
    return load_spec(path)


def _all_ok_once(spec: JobSpec, srv: RunningServer) -> None:
    files = sorted((Path(spec.output) / "results").glob("shard-*.parquet"))
    rows = pq.read_table(files).to_pylist()
    assert sorted(r["id"] for r in rows) == [f"r{i:06d}" for i in range(90)]
    assert all(r["status"] == "ok" for r in rows)
    stats = srv.stats()
    assert stats["ok"] == 90 and stats["duplicate_ok_prompts"] == 0  # one bill per row


def _waves(srv: RunningServer) -> int:
    """Runs of batch creations in the ledger with answered lines between them."""
    waves, last = 0, None
    for r in srv.records():
        if r["outcome"] == "batch_created" and last != "batch_created":
            waves += 1
        if r["outcome"] in ("batch_created", "ok"):
            last = r["outcome"]
    return waves


def test_a_job_larger_than_the_quota_runs_in_waves(tmp_path: Path) -> None:
    # each chunk is 30 prompts of ~16 tokens: 600 enqueued tokens hold one chunk, not two
    with start_in_thread(MockConfig(batch_delay_s=0.6, api_key=KEY,
                                    batch_queue_tokens=600)) as srv:
        spec = _spec(tmp_path, srv.base_url, max_enqueued_tokens=600)
        out = run_batch_job(spec, wait=True, initial_poll_s=0.05)
        assert out.pending == 0 and len(out.batches) == 3
        assert {b["status"] for b in out.batches} == {"completed"}  # none refused
        assert _waves(srv) == 3  # each chunk created once the one before was answered
        _all_ok_once(spec, srv)


def test_without_the_setting_all_chunks_go_at_once(tmp_path: Path) -> None:
    with start_in_thread(MockConfig(batch_delay_s=0.6, api_key=KEY)) as srv:
        run_batch_job(_spec(tmp_path, srv.base_url), wait=True, initial_poll_s=0.05)
        assert _waves(srv) == 1  # the baseline the test above is judged against


def test_token_limit_exceeded_waits_and_retries_instead_of_failing(tmp_path: Path) -> None:
    # the quota is shared with "another job": batchrun does not know it, the provider
    # refuses the second and third batch, and the driver creates them again later
    with start_in_thread(MockConfig(batch_delay_s=0.6, api_key=KEY,
                                    batch_queue_tokens=600)) as srv:
        spec = _spec(tmp_path, srv.base_url)
        out = run_batch_job(spec, wait=True, initial_poll_s=0.05)
        created = srv.stats()["by_outcome"]["batch_created"]
        _all_ok_once(spec, srv)
    assert out.pending == 0 and created > 3  # refused batches were created again
    assert all(b["attempt"] == 1 for b in out.batches)  # not a row retry: the same chunk


def test_anthropic_queue_429_waits_and_retries(tmp_path: Path) -> None:
    with start_in_thread(MockConfig(batch_delay_s=0.6, api_key=KEY,
                                    batch_queue_requests=40)) as srv:
        spec = _spec(tmp_path, srv.url, api="anthropic")
        out = run_batch_job(spec, wait=True, initial_poll_s=0.05)
        refused = srv.stats()["by_outcome"].get("rate_limited", 0)
        _all_ok_once(spec, srv)
    assert out.pending == 0 and len(out.batches) == 3 and refused > 0


def test_anthropic_max_enqueued_requests_avoids_the_429s(tmp_path: Path) -> None:
    with start_in_thread(MockConfig(batch_delay_s=0.6, api_key=KEY,
                                    batch_queue_requests=40)) as srv:
        spec = _spec(tmp_path, srv.url, api="anthropic", max_enqueued_requests=40)
        run_batch_job(spec, wait=True, initial_poll_s=0.05)
        assert "rate_limited" not in srv.stats()["by_outcome"] and _waves(srv) == 3
        _all_ok_once(spec, srv)


# -- pure ------------------------------------------------------------------------------


def _chunk(seq: int, step: str, tokens: int, requests: int = 10) -> ChunkState:
    return ChunkState(seq=seq, step=step, rows={0: [(0, requests)]}, n_rows=requests,  # type: ignore[arg-type]
                      n_requests=requests, n_tokens=tokens, file=f"c{seq}.jsonl")


def test_may_create_requeue_and_refusal_codes(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "http://127.0.0.1:9/v1", max_enqueued_tokens=100)
    a, b = _chunk(0, "created", 60), _chunk(1, "written", 50)
    assert not may_create(spec, [a, b], b) and may_create(spec, [b], b)
    a.step = "collected"
    assert may_create(spec, [a, b], b)
    assert requeue(spec, b, "batch_1", None, now=1000.0) == pytest.approx(0.2)
    assert requeue(spec, b, "batch_2", 5.0, now=1000.0) == 5.0  # Retry-After wins
    assert b.step == "written" and b.refused_ids == ["batch_1", "batch_2"] and b.refusals == 2
    assert not may_create(spec, [b], b, now=1004.0) and may_create(spec, [b], b, now=1005.0)
    failed = {"status": "failed", "errors": {"data": [{"code": "token_limit_exceeded"}]}}
    assert quota_refused(failed)
    assert not quota_refused({"status": "failed", "errors": {"data": [{"code": "invalid_file"}]}})
    w = ChunkWriter(tmp_path, 9)
    w.add(0, 0, b"x\n", tokens=90)
    assert not w.fits(spec, b"y\n", tokens=20) and w.fits(spec, b"y\n", tokens=10)
    w.discard()


def test_the_simulated_queue_counts_every_endpoints_input_tokens() -> None:
    """Embeddings and Responses lines fill OpenAI's enqueued-token quota as chat lines do
    (before, only chat ``messages`` counted: an embeddings batch never hit the quota)."""
    texts = ["the first text to embed", "a second, somewhat longer text to embed here"]
    emb = [{"url": "/v1/embeddings", "body": {"model": "text-embedding-3-small", "input": t}}
           for t in texts]
    assert batch_tokens(emb) == ("text-embedding-3-small", sum(
        count_text_tokens(t, "text-embedding-3-small") for t in texts))
    msgs = [{"role": "user", "content": texts[0]}]
    chat = {"url": "/v1/chat/completions",
            "body": {"model": "gpt-4.1-mini", "messages": msgs, "max_tokens": 5}}
    resp = {"url": "/v1/responses", "body": {"model": "gpt-4.1-mini", "input": texts[0],
                                              "max_output_tokens": 5}}
    assert batch_tokens([chat])[1] == count_chat_tokens(msgs, "gpt-4.1-mini")
    assert batch_tokens([resp])[1] > 0
    bad = {"url": "/v1/embeddings", "body": {"model": "text-embedding-3-small", "input": ""}}
    assert batch_tokens([bad, chat])[1] == batch_tokens([chat])[1]  # it fails alone, later
