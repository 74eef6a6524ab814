"""io/storage as the seam: reads, listings and deletions take a path or URI plus a
``pyarrow.fs`` filesystem, so the results store works on any filesystem it is handed
(here a ``SubTreeFileSystem``, whose paths mean nothing to the local disk), and a streamed
file (a batch chunk) is committed whole or not at all."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from batchrun.io import storage
from batchrun.io.summary import summarize
from batchrun.io.writer import ResultsStore, result_schema

pytestmark = pytest.mark.timeout(60)


def test_reads_listings_and_deletes_through_a_path_a_uri_or_a_filesystem(
        tmp_path: Path) -> None:
    storage.commit_bytes(tmp_path / "a" / "x.json", b"1")
    storage.commit_table(tmp_path / "a" / "b" / "t.parquet", pa.table({"n": [1, 2]}))
    (tmp_path / "a" / ".x.json.1234.tmp").write_bytes(b"half")  # a commit in progress
    sub = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    for where, fs, prefix in ((str(tmp_path / "a"), None, str(tmp_path / "a")),
                              (f"file://{tmp_path}/a", None, f"{tmp_path}/a"),
                              ("a", sub, "a")):
        assert storage.read_bytes(storage.join(where, "x.json"), fs=fs) == b"1"
        assert storage.read_table(storage.join(where, "b", "t.parquet"), fs=fs)["n"].to_pylist() \
            == [1, 2]
        assert storage.read_footer(storage.join(where, "b", "t.parquet"), fs=fs).num_rows == 2
        assert storage.list_files(where, fs=fs) == [f"{prefix}/x.json"]
        assert storage.list_files(where, fs=fs, recursive=True) == [f"{prefix}/b/t.parquet",
                                                                    f"{prefix}/x.json"]
        assert storage.list_files(storage.join(where, "none"), fs=fs) == []
        assert storage.exists(storage.join(where, "x.json"), fs=fs)
        assert storage.size(storage.join(where, "x.json"), fs=fs) == 1
        with pytest.raises(FileNotFoundError):
            storage.read_bytes(storage.join(where, "gone.json"), fs=fs)
    storage.delete("a/x.json", fs=sub)
    storage.delete("a/x.json", fs=sub)  # already gone: fine
    assert not (tmp_path / "a" / "x.json").exists()


def test_a_staged_file_is_committed_whole_or_discarded(tmp_path: Path) -> None:
    target = tmp_path / "batch" / "chunk-000000.jsonl"
    staged = storage.Staged(target)
    staged.write(b'{"a":1}\n')
    assert not target.exists()  # nobody sees a chunk while it is written
    staged.commit()
    assert target.read_bytes() == b'{"a":1}\n'
    other = storage.Staged(target)
    other.write(b"half")
    other.discard()
    assert target.read_bytes() == b'{"a":1}\n'
    assert [p.name for p in target.parent.iterdir()] == [target.name]
    sub = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    up = storage.Staged("batch/x.jsonl", fs=sub)  # issue 14: staged here, uploaded whole
    up.write(b"x")
    assert not (tmp_path / "batch" / "x.jsonl").exists()
    up.commit()
    assert (tmp_path / "batch" / "x.jsonl").read_bytes() == b"x"


def _rows(ids: list[str], cost: float) -> pa.Table:
    return pa.Table.from_pylist([{"id": i, "status": "ok", "cost_usd": cost, "model": "m",
                                  "attempts": 1, "latency_ms": 5.0} for i in ids],
                                schema=result_schema())


def test_the_results_store_reads_through_the_filesystem_it_is_given(tmp_path: Path) -> None:
    out = tmp_path / "out"
    local = ResultsStore(f"file://{out}", result_schema())  # a URI names the filesystem
    local.write_part("shard-000000", _rows(["a", "b"], 0.5))
    local.write_part("shard-000001", _rows(["c"], 0.25))
    assert local.finalize("shard-000000") == 2

    sub = pafs.SubTreeFileSystem(str(out), pafs.LocalFileSystem())
    store = ResultsStore("", result_schema(), fs=sub)  # paths inside it: results/..., parts/...
    assert store.result_files() == ["results/shard-000000.parquet"]
    assert store.final_rows("shard-000000") == 2
    assert store.final_rows("shard-000001") is None
    assert store.answered_ids("shard-000001", redo_errors=False) == {"c"}
    assert store.spent_usd() == pytest.approx(1.25)
    s = summarize(store.result_files(), job="j", wall_s=1.0, total_rows=3,
                  run_started=datetime(2000, 1, 1, tzinfo=UTC), fs=sub)
    assert (s.rows, s.ok, s.unsent, s.cost_usd) == (2, 2, 1, pytest.approx(1.0))
