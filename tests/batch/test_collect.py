"""Batch output to result records (batch/collect.collect_chunk) over real shard files and
the output lines the simulated provider's Batch API writes on loopback: ok answers,
retryable and fatal line errors, an expired batch, bad rows, and answers the structured
check refuses, which keep their text and cost. The provider's ledger says what was billed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from batchrun.api.structured import Structured
from batchrun.batch.collect import ChunkResults, collect_chunk, parse_lines
from batchrun.batch.plan import Planner
from batchrun.batch.provider import BatchProvider
from batchrun.batch.requests import custom_id, iter_selected
from batchrun.batch.state import BatchJobState, ChunkState
from batchrun.io.shards import RequestRow, Shard, carry_schema, plan_shards
from batchrun.io.writer import ResultsStore, result_schema
from batchrun.money.pricing import cost_usd, price_for
from batchrun.sim import MockConfig, RunningServer, prompt_key, start_in_thread
from batchrun.spec import JobSpec, load_spec
from tests.conftest import make_prompts, write_spec

pytestmark = pytest.mark.timeout(120)
FINAL = ("completed", "failed", "expired", "cancelled")
SCHEMA = {"type": "object", "properties": {"label": {"type": "string"}},
          "required": ["label"], "additionalProperties": False}


@dataclass
class Batch:
    """One chunk sent through the simulated Batch API and collected back as lines."""

    spec: JobSpec
    shards: dict[int, Shard]
    chunk: ChunkState  # with its batch id and creation time
    status: str
    lines: dict[str, dict[str, Any]]
    ledger: list[dict[str, Any]]

    def collect(self, *, can_retry: bool, check: Any = None) -> ChunkResults:
        return collect_chunk(self.spec, self.chunk, self.shards, self.lines, self.status,
                             price=price_for(self.spec), check=check, can_retry=can_retry)

    def rows(self) -> list[tuple[int, int, RequestRow]]:
        return [(s, p, r) for s, runs in sorted(self.chunk.rows.items())
                for p, r in iter_selected(self.spec, self.shards[s], runs)]

    def billed(self) -> dict[str, dict[str, Any]]:
        """Prompt key -> the ledger's record of a line answered 200 (billed)."""
        return {r["key"]: r for r in self.ledger if r["outcome"] == "ok"}


def send(tmp_path: Path, server: RunningServer, values: list[Any], *,
         select: Any = None, extra_body: dict[str, Any] | None = None) -> Batch:
    """Write the job's rows (those ``select(shard, pos)`` keeps) into one chunk, run it as a
    batch on ``server``, and read its output and error files back."""
    make_prompts(tmp_path / "in.parquet", len(values), row_group=10, extra={"prompt": values})
    spec = load_spec(str(write_spec(tmp_path, mode="batch",
                                    endpoint={"base_url": server.base_url})))
    shards = {s.index: s for s in plan_shards(spec)}
    state = BatchJobState(job=spec.name, fingerprint="t")
    store = ResultsStore(spec.output, result_schema(carry_schema(spec, list(shards.values()))))
    folder = Path(spec.output) / "batch"
    planner = Planner(spec, shards, store, state, folder, extra_body=extra_body,
                      worst=lambda r: 0.0, save=lambda: None)
    keep = select or (lambda s, p: True)
    planner.new_chunks(((s, p, r) for s in sorted(shards)
                        for p, r in iter_selected(spec, shards[s], [(0, shards[s].num_rows)])
                        if keep(s, p)), attempt=1)
    assert len(state.chunks) == 1
    chunk = state.chunks[0]
    server.reset()
    batch, contents = asyncio.run(_run(spec, folder / chunk.file))
    chunk = chunk.model_copy(update={"batch_id": batch["id"], "step": "completed",
                                     "created_at": float(batch["created_at"]),
                                     "batch_status": batch["status"]})
    return Batch(spec, shards, chunk, batch["status"], parse_lines(*contents),
                 server.records())


async def _run(spec: JobSpec, path: Path) -> tuple[dict[str, Any], list[bytes]]:
    async def nothing() -> None:
        return None

    async with BatchProvider(spec.endpoint, None, spec.retry) as p:
        f = await p.upload(path)
        b = await p.create(f["id"], "24h", {"test": "collect"}, nothing)
        for _ in range(600):
            if b["status"] in FINAL:
                break
            await asyncio.sleep(0.05)
            b = await p.retrieve(b["id"])
        assert b["status"] in FINAL, b
        return b, [await p.content(b[k]) for k in ("output_file_id", "error_file_id")
                   if b.get(k)]


@pytest.fixture
def sim(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    config = getattr(request, "param", {})
    with start_in_thread(MockConfig(batch_delay_s=0.3, **config)) as srv:
        yield srv


def prompts(n: int) -> list[Any]:
    return [f"Say something short about item {i}." for i in range(n)]


def test_ok_lines_become_ok_records_at_the_batch_price(tmp_path: Path,
                                                       sim: RunningServer) -> None:
    values = prompts(30)
    values[3], values[17] = "", None  # bad rows: no line, an error record without attempts
    # a retry chunk's shape: scattered positions in several shards
    b = send(tmp_path, sim, values, select=lambda s, p: p not in (0, 5))
    assert b.status == "completed" and len(b.chunk.rows) > 1
    res = b.collect(can_retry=True)
    price = price_for(b.spec)
    assert price is not None
    rows = b.rows()
    recs = {r["id"]: r for rr in res.records.values() for r in rr}
    assert sorted(recs) == sorted(r.id for _, _, r in rows)  # exactly the chunk's rows
    assert not res.retry and res.ok == len(rows) - 2 and res.errors == 2
    billed = b.billed()
    assert len(billed) == res.ok  # one billed answer per good row, once; nothing else:
    assert sorted(r["outcome"] for r in b.ledger) == ["batch_created"] + ["ok"] * res.ok
    for sidx, pos, row in rows:
        rec = recs[row.id]
        assert rec["batch_id"] == b.chunk.batch_id and rec["model"] == b.spec.model
        assert rec["topic"] == row.carry["topic"]
        if row.messages is None:
            assert (rec["status"], rec["error_type"], rec["attempts"]) == ("error", "bad_row", 0)
            assert rec["error_message"] in ("empty prompt", "null prompt")
            continue
        assert rec["attempts"] == b.chunk.attempt == 1
        seen = billed[prompt_key(row.messages)]
        line = b.lines[custom_id(sidx, pos)]
        body = line["response"]["body"]
        assert rec["status"] == "ok" and rec["response"] == body["choices"][0]["message"][
            "content"] and rec["response"]
        assert (rec["prompt_tokens"], rec["completion_tokens"]) == (
            seen["prompt_tokens"], seen["completion_tokens"])
        assert rec["cost_usd"] == pytest.approx(
            cost_usd(price, seen["prompt_tokens"], seen["completion_tokens"], batch=True))
    assert res.paid_usd == pytest.approx(sum(r.get("cost_usd") or 0.0 for r in recs.values()))


@pytest.mark.parametrize("sim", [{"batch_line_error_rate": 0.5}], indirect=True)
def test_retryable_line_errors_are_retried_or_recorded(tmp_path: Path,
                                                       sim: RunningServer) -> None:
    b = send(tmp_path, sim, prompts(40))
    failed = {r["key"] for r in b.ledger if r["outcome"] == "server_error"}
    shapes = {("error" if b.lines[custom_id(s, p)]["response"] is None else "status")
              for s, p, r in b.rows() if prompt_key(r.messages) in failed}
    assert failed and shapes == {"error", "status"}  # both forms OpenAI writes
    res = b.collect(can_retry=True)
    assert sorted(prompt_key(r.messages) for _, _, r in res.retry) == sorted(failed)
    assert {(s, p) for s, p, _ in res.retry} <= {(s, p) for s, p, _ in b.rows()}
    assert res.ok == 40 - len(failed) and res.errors == 0
    final = b.collect(can_retry=False)  # no attempts left: each one an error record
    errs = [r for rr in final.records.values() for r in rr if r["status"] == "error"]
    assert len(errs) == len(failed) and not final.retry
    assert {r["error_type"] for r in errs} == {"http_500", "server_error"}
    assert all(r.get("cost_usd") is None and r.get("response") is None for r in errs)
    assert res.paid_usd == pytest.approx(final.paid_usd)  # the ok answers only


@pytest.mark.parametrize("sim", [{"batch_expire_every": 1}], indirect=True)
def test_an_expired_batch_retries_its_unrun_rows(tmp_path: Path, sim: RunningServer) -> None:
    b = send(tmp_path, sim, prompts(20))
    assert b.status == "expired"
    res = b.collect(can_retry=True)
    assert res.ok == len(b.billed()) == 10 and len(res.retry) == 10  # half ran
    # a row whose line is missing altogether (a cut output file) is retried the same way
    dropped = custom_id(*b.rows()[0][:2])
    b.lines.pop(dropped)
    res = b.collect(can_retry=True)
    assert res.ok + len(res.retry) == 20 and res.errors == 0
    final = b.collect(can_retry=False)
    types = [r["error_type"] for rr in final.records.values() for r in rr
             if r["status"] == "error"]
    assert types == ["batch_expired"] * len(res.retry)


def test_fatal_line_errors_are_recorded_even_with_attempts_left(tmp_path: Path,
                                                                sim: RunningServer) -> None:
    # every line asks for a response_format the provider refuses: 400 on each line
    b = send(tmp_path, sim, prompts(8), extra_body={"response_format": {"type": "bogus"}})
    rows = b.rows()
    # two provider-shaped lines of other kinds: a non-retryable code, and a garbled line
    b.lines[custom_id(*rows[0][:2])] = {"custom_id": custom_id(*rows[0][:2]), "response": None,
                                        "error": {"code": "invalid_prompt", "message": "no"}}
    b.lines[custom_id(*rows[1][:2])] = {"custom_id": custom_id(*rows[1][:2]),
                                        "response": {"body": {}}, "error": None}
    res = b.collect(can_retry=True)
    recs = {r["id"]: r for rr in res.records.values() for r in rr}
    assert [r.id for _, _, r in res.retry] == [rows[1][2].id]  # only the garbled one
    assert recs[rows[0][2].id]["error_type"] == "invalid_prompt"
    rest = [recs[r.id] for _, _, r in rows[2:]]
    assert {(r["status"], r["error_type"]) for r in rest} == {("error", "http_400")}
    assert all("response_format" in r["error_message"] for r in rest)  # the provider's text
    assert res.errors == 7 and res.ok == 0 and res.paid_usd == 0.0


@pytest.mark.parametrize("sim", [{"invalid_json_rate": 1.0}], indirect=True)
def test_refused_structured_answers_keep_their_text_tokens_and_cost(
        tmp_path: Path, sim: RunningServer) -> None:
    structured = Structured(SCHEMA)
    b = send(tmp_path, sim, prompts(12), extra_body=structured.request_fields())
    billed = b.billed()
    assert len(billed) == 12  # every answer was paid for, valid or not
    res = b.collect(can_retry=False, check=structured.check)
    recs = {r["id"]: r for rr in res.records.values() for r in rr}
    price = price_for(b.spec)
    assert price is not None and res.errors == 12
    for sidx, pos, row in b.rows():
        rec, seen = recs[row.id], billed[prompt_key(row.messages)]
        text = b.lines[custom_id(sidx, pos)]["response"]["body"]["choices"][0]["message"][
            "content"]
        assert (rec["status"], rec["error_type"]) == ("error", "invalid_output")
        assert rec["response"] == text and rec["finish_reason"] == "stop"
        assert rec["prompt_tokens"] == seen["prompt_tokens"] > 0
        assert rec["completion_tokens"] == seen["completion_tokens"]
        assert rec["cost_usd"] == pytest.approx(cost_usd(
            price, seen["prompt_tokens"], seen["completion_tokens"], batch=True))
        try:  # the answer is not JSON, or JSON the schema refuses
            value = json.loads(text)
        except ValueError:
            continue
        assert list(structured.validator.iter_errors(value)), text
    paid = sum(r["cost_usd"] for r in recs.values())
    assert res.paid_usd == pytest.approx(paid) and paid > 0
    again = b.collect(can_retry=True, check=structured.check)  # retried: no record yet,
    assert len(again.retry) == 12 and again.paid_usd == pytest.approx(paid)  # still paid
