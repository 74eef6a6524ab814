"""Batch input chunking (batch/requests.ChunkWriter and line_for, packed by
batch/plan.Planner.new_chunks) over a real input file: chunks respect
max_requests_per_file and max_bytes_per_file, bad rows take no line but belong to a
chunk, and a row too big alone is an input error that leaves no half-written chunk."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchrun.batch.plan import Planner, Row
from batchrun.batch.requests import custom_id, iter_selected, line_for
from batchrun.batch.state import BatchJobState, ChunkState
from batchrun.errors import InputDataError
from batchrun.io.shards import RequestRow, carry_schema, plan_shards
from batchrun.io.writer import ResultsStore, result_schema
from batchrun.spec import JobSpec, load_spec
from tests.conftest import make_prompts, write_spec

WORST = 0.01  # the worst case of one good row, in this test's money


def prompts(n: int, bad: dict[int, Any] | None = None,
            long: dict[int, int] | None = None) -> list[Any]:
    out: list[Any] = [f"Say something short about item {i}." for i in range(n)]
    for i, v in (bad or {}).items():
        out[i] = v
    for i, size in (long or {}).items():
        out[i] = "x" * size
    return out


def job(tmp_path: Path, values: list[Any], **batch: int) -> JobSpec:
    make_prompts(tmp_path / "in.parquet", len(values), row_group=10,
                 extra={"prompt": values})
    return load_spec(str(write_spec(tmp_path, mode="batch", batch=batch or None)))


class Chunker:
    """The planner's chunking of every row of the job, into OUTPUT/batch."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.shards = {s.index: s for s in plan_shards(spec)}
        self.folder = Path(spec.output) / "batch"
        self.state = BatchJobState(job=spec.name, fingerprint="t")
        self.saves: list[int] = []
        store = ResultsStore(spec.output, result_schema(carry_schema(spec, list(
            self.shards.values()))))
        self.planner = Planner(spec, self.shards, store, self.state, self.folder,
                               extra_body=None, worst=self._worst,
                               save=lambda: self.saves.append(len(self.state.chunks)))

    @staticmethod
    def _worst(row: RequestRow) -> float:
        return 0.0 if row.messages is None else WORST

    def rows(self) -> Iterator[Row]:
        for sidx, shard in sorted(self.shards.items()):
            for pos, row in iter_selected(self.spec, shard, [(0, shard.num_rows)]):
                yield sidx, pos, row

    def lines(self, chunk: ChunkState) -> list[bytes]:
        return (self.folder / chunk.file).read_bytes().splitlines(keepends=True)

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.folder.iterdir() if p.name.startswith("."))


def covered(chunks: list[ChunkState]) -> list[tuple[int, int]]:
    """(shard, position) of every row the chunks name, in chunk order."""
    return [(s, p) for c in chunks for s, runs in sorted(c.rows.items())
            for a, b in runs for p in range(a, b)]


def test_chunks_hold_at_most_max_requests_and_bad_rows_take_no_line(tmp_path: Path) -> None:
    n = 30
    spec = job(tmp_path, prompts(n, bad={4: "", 11: "   ", 20: None}), max_requests_per_file=7)
    ch = Chunker(spec)
    assert len(ch.shards) > 1  # chunks cross shard boundaries
    ch.planner.new_chunks(ch.rows(), attempt=1)
    chunks = ch.state.chunks
    every = [(s, p) for s, p, _ in ch.rows()]
    assert covered(chunks) == every  # each row in exactly one chunk, in order
    good = [custom_id(s, p) for s, p, r in ch.rows() if r.messages is not None]
    assert len(good) == n - 3
    sent: list[str] = []
    for c in chunks:
        lines = ch.lines(c)
        assert len(lines) == c.n_requests <= 7
        assert c.worst_usd == pytest.approx(WORST * c.n_requests)
        docs = [json.loads(x) for x in lines]
        assert {(d["method"], d["url"]) for d in docs} == {("POST", "/v1/chat/completions")}
        assert all(d["body"]["model"] == spec.model and d["body"]["max_tokens"] == 32
                   for d in docs)
        sent += [d["custom_id"] for d in docs]
    assert sent == good  # the bad rows' positions are in chunks, their lines nowhere
    assert [c.n_requests for c in chunks] == [7, 7, 7, 6]
    assert sum(c.n_rows for c in chunks) == n
    assert [c.seq for c in chunks] == list(range(4)) and ch.state.next_seq == 4
    assert [c.file for c in chunks] == [f"chunk-{i:06d}.jsonl" for i in range(4)]
    assert ch.saves == [1, 2, 3, 4] and ch.leftovers() == []  # saved as each one closed


def test_chunks_hold_at_most_max_bytes_an_exact_fit_included(tmp_path: Path) -> None:
    values = prompts(24)
    ch0 = Chunker(job(tmp_path, values))
    sizes = [len(line_for(ch0.spec, ch0.shards[s], p, r, None) or b"")
             for s, p, r in ch0.rows()]
    limit = sum(sizes[:3])  # the first chunk is exactly full with three lines
    ch = Chunker(job(tmp_path, values, max_bytes_per_file=limit))
    ch.planner.new_chunks(ch.rows(), attempt=1)
    expected: list[list[int]] = [[]]  # greedy packing of the line sizes, by hand
    for size in sizes:
        if sum(expected[-1]) + size > limit:
            expected.append([])
        expected[-1].append(size)
    got = [[len(x) for x in ch.lines(c)] for c in ch.state.chunks]
    assert got == expected and got[0] == sizes[:3] and len(got) > 3
    assert all((ch.folder / c.file).stat().st_size <= limit for c in ch.state.chunks)
    assert covered(ch.state.chunks) == [(s, p) for s, p, _ in ch.rows()]


def test_a_row_too_big_alone_is_an_input_error_leaving_no_partial_chunk(
        tmp_path: Path) -> None:
    values = prompts(20, long={10: 3000})
    ch0 = Chunker(job(tmp_path, values))
    sizes = [len(line_for(ch0.spec, ch0.shards[s], p, r, None) or b"")
             for s, p, r in ch0.rows()]
    big = sizes[10]
    # exactly the limit: it fits, alone in its chunk
    ch = Chunker(job(tmp_path, values, max_bytes_per_file=big, max_requests_per_file=4))
    ch.planner.new_chunks(ch.rows(), attempt=1)
    alone = [c for c in ch.state.chunks if any(len(x) == big for x in ch.lines(c))]
    assert len(alone) == 1 and alone[0].n_requests == 1
    # one byte less: the row can fit no chunk; the chunks closed before it stay recorded,
    # the one being written is discarded
    out = tmp_path / "out2"
    spec = job(tmp_path, values, max_bytes_per_file=big - 1, max_requests_per_file=4)
    ch = Chunker(spec.model_copy(update={"output": str(out)}))
    with pytest.raises(InputDataError) as e:
        ch.planner.new_chunks(ch.rows(), attempt=1)
    msg = str(e.value)
    assert "row r000010" in msg and f"{big}-byte request" in msg
    assert "batch.max_bytes_per_file" in msg and "\n" not in msg
    assert [c.n_requests for c in ch.state.chunks] == [4, 4]  # rows 0-7; 8 and 9 dropped
    assert ch.saves == [1, 2] and ch.leftovers() == []
    assert sorted(p.name for p in ch.folder.iterdir()) == [c.file for c in ch.state.chunks]
