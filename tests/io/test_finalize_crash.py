"""io/writer: a shard is committed without renaming a folder. The final file names the
parts it merged, so ``kill -9`` at any point of ``finalize`` (before the final is
committed, after it, in the middle of deleting parts) leaves a store that resumes with
every row exactly once and nothing counted twice: results, spent_usd and the rows
``status`` counts alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun.cli.ops import disk_progress
from batchrun.io.writer import MERGED_KEY, ResultsStore, merged_parts, result_schema
from batchrun.spec import load_spec
from tests.conftest import make_prompts, write_spec

pytestmark = pytest.mark.timeout(120)

SHARD = "shard-000003"
N_PARTS, PER_PART = 4, 5
SCHEMA = result_schema()


def _rows(start: int, n: int, *, status: str = "ok", cost: float = 0.01) -> pa.Table:
    recs = [{"id": f"r{i:03d}", "status": status, "cost_usd": cost,
             "error_type": None if status == "ok" else "http_500"}
            for i in range(start, start + n)]
    return pa.Table.from_pylist(recs, schema=SCHEMA)


def _checkpointed(out: Path) -> ResultsStore:
    """A running shard: 4 parts of 5 rows, and row r000 answered twice (an error, then ok
    in a later part), each answer billed."""
    store = ResultsStore(out, SCHEMA)
    for k in range(N_PARTS):
        store.write_part(SHARD, _rows(k * PER_PART, PER_PART))
    store.write_part(SHARD, _rows(0, 1, status="error", cost=0.002))
    store.write_part(SHARD, _rows(0, 1, cost=0.03))  # the retry wins
    return store


# Runs finalize in a throwaway process and kills it with SIGKILL at one point.
_FINALIZE = """
import os, signal, sys
from batchrun.io import storage, writer
out, when = sys.argv[1], sys.argv[2]
deleted = 0
real_delete, real_commit = storage.delete, storage.commit_table
def die():
    os.kill(os.getpid(), signal.SIGKILL)
def delete(where, *, fs=None):
    global deleted
    if when == "after-commit" or (when == "mid-delete" and deleted == 2):
        die()
    real_delete(where, fs=fs)
    deleted += 1
def commit_table(where, table, *, fs=None):
    if when == "before-commit":
        die()
    real_commit(where, table, fs=fs)
storage.delete, storage.commit_table = delete, commit_table
writer.ResultsStore(out, writer.result_schema()).finalize("shard-000003")
"""


def _finalize_killed(out: Path, when: str) -> None:
    p = subprocess.run([sys.executable, "-c", _FINALIZE, str(out), when],
                       capture_output=True, timeout=60)
    assert p.returncode == -9, (p.returncode, p.stderr.decode()[-2000:])


def _parts(out: Path) -> list[Path]:
    return sorted((out / "parts" / SHARD).glob("part-*.parquet"))


def _assert_once(store: ResultsStore, spent: float, *, committed: bool) -> None:
    table = store.read_shard(SHARD)
    assert table is not None
    ids = table["id"].to_pylist()
    every = [f"r{i:03d}" for i in range(N_PARTS * PER_PART)]
    if committed:  # the final holds each row once; the parts it merged are not read
        assert sorted(ids) == every
    else:  # only parts: r000's three answers, merged by the next finalize
        assert sorted(set(ids)) == every and len(ids) == len(every) + 2
    assert store.spent_usd() == pytest.approx(spent)
    assert store.answered_ids(SHARD, redo_errors=True) == set(ids)
    assert store.rows_on_disk() == len(every)  # what `status` shows


@pytest.mark.parametrize(("when", "parts_left"), [("before-commit", 6), ("after-commit", 6),
                                                  ("mid-delete", 4)])
def test_kill_9_during_finalize_then_resume_counts_every_row_once(
        tmp_path: Path, when: str, parts_left: int) -> None:
    out = tmp_path / "out"
    store = _checkpointed(out)
    spent = store.spent_usd()  # every answer billed, the error's included
    assert spent == pytest.approx(20 * 0.01 + 0.002 + 0.03)

    _finalize_killed(out, when)
    assert len(_parts(out)) == parts_left
    final = out / "results" / f"{SHARD}.parquet"
    assert final.exists() == (when != "before-commit")
    if when == "before-commit":
        assert store.final_rows(SHARD) is None  # its parts still wait to be merged
    else:
        held = merged_parts(pq.read_metadata(final).metadata)
        assert {p.name for p in _parts(out)} <= held and len(held) == 6
        # the final already dropped the superseded answer: resumes count what it holds
        spent = 19 * 0.01 + 0.03
    _assert_once(store, spent, committed=when != "before-commit")
    # and the resumed run's own new work merges in, leftovers ignored
    store.write_part(SHARD, _rows(20, 2))
    assert store.final_rows(SHARD) is None
    assert store.finalize(SHARD) == 22
    assert store.final_rows(SHARD) == 22
    t = pq.read_table(final)
    assert sorted(t["id"].to_pylist()) == [f"r{i:03d}" for i in range(22)]
    r0 = t.filter(pa.compute.equal(t["id"], "r000")).to_pylist()
    assert [(r["status"], r["cost_usd"]) for r in r0] == [("ok", 0.03)]  # the newest
    assert not (out / "parts" / SHARD).exists()  # parts deleted, their folder too
    assert store.spent_usd() == pytest.approx(21 * 0.01 + 0.03)


def test_leftover_merged_parts_are_deleted_when_the_shard_is_seen_complete(
        tmp_path: Path) -> None:
    out = tmp_path / "out"
    store = _checkpointed(out)
    _finalize_killed(out, "after-commit")
    assert len(_parts(out)) == 6
    assert store.final_rows(SHARD) == N_PARTS * PER_PART  # complete: nothing to merge
    assert not (out / "parts" / SHARD).exists()
    assert store.result_files() == [str(out / "results" / f"{SHARD}.parquet")]


def test_an_output_of_the_old_layout_still_resumes(tmp_path: Path) -> None:
    """A final file without the metadata, and parts beside it: all of them count."""
    out = tmp_path / "out"
    (out / "results").mkdir(parents=True)
    pq.write_table(_rows(0, 10), out / "results" / f"{SHARD}.parquet")
    old_part = out / "parts" / SHARD / "part-00000000000000000001-abcdef.parquet"
    old_part.parent.mkdir(parents=True)
    pq.write_table(_rows(10, 3), old_part)
    retired = out / "parts" / f".retired-{SHARD}-123456"  # an old crash's leftover
    retired.mkdir()
    pq.write_table(_rows(0, 10), retired / "part-00000000000000000000-000000.parquet")
    store = ResultsStore(out, SCHEMA)
    assert store.final_rows(SHARD) is None
    assert store.spent_usd() == pytest.approx(13 * 0.01)
    assert len(store.answered_ids(SHARD, redo_errors=False)) == 13
    assert store.finalize(SHARD) == 13
    meta = pq.read_metadata(out / "results" / f"{SHARD}.parquet").metadata
    assert json.loads(meta[MERGED_KEY]) == [old_part.name]
    assert not old_part.exists() and store.final_rows(SHARD) == 13


def test_parts_are_unique_immutable_files_and_finals_the_only_results(tmp_path: Path) -> None:
    out = tmp_path / "out"
    store = _checkpointed(out)
    names = [p.name for p in _parts(out)]
    assert len(set(names)) == len(names) == 6
    assert store.result_files() == []  # a reader sees no result before the commit
    store.finalize(SHARD)
    assert [os.path.basename(f) for f in store.result_files()] == [f"{SHARD}.parquet"]
    assert sorted(p.name for p in out.rglob("*")) == ["parts", "results", f"{SHARD}.parquet"]


def test_status_counts_the_rows_of_a_crashed_finalize_once(tmp_path: Path) -> None:
    make_prompts(tmp_path / "in.parquet", 40)
    spec = load_spec(write_spec(tmp_path))
    out = Path(spec.output)
    _checkpointed(out)
    _finalize_killed(out, "after-commit")
    assert disk_progress(spec) == {"total": 40, "on_disk": 20, "summary": False}
