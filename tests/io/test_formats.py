"""JSONL and CSV inputs: planned and read in shards like Parquet, bad lines are row errors."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun.errors import InputDataError
from batchrun.io import formats
from batchrun.io.formats import ERROR_COLUMN, RowFile, open_input
from batchrun.io.shards import iter_shard_rows, plan_shards
from batchrun.runner import RunOptions, run_job
from batchrun.sim import MockConfig, start_in_thread
from batchrun.spec import load_spec
from tests.conftest import write_spec


def _rows(n: int) -> list[dict[str, Any]]:
    return [{"id": f"r{i:04d}", "prompt": f"Say something about {i}.", "stars": i % 5}
            for i in range(n)]


def _jsonl(path: Path, rows: list[dict[str, Any]], broken: set[int] = frozenset()  # type: ignore[assignment]
           ) -> Path:
    text = "".join(("{not json\n" if i in broken else json.dumps(r) + "\n") + ("\n" if i % 9
                   == 0 else "") for i, r in enumerate(rows))
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def _csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture
def small_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(formats, "GROUP_ROWS", 7)  # many groups in a small file
    monkeypatch.setattr(formats, "_COUNTS", {})


@pytest.mark.usefixtures("small_groups")
@pytest.mark.parametrize("name", ["in.jsonl", "in.jsonl.gz", "in.csv"])
def test_shards_read_every_row_once_in_order(tmp_path: Path, name: str) -> None:
    rows = _rows(100)
    path = (_csv if name.endswith(".csv") else _jsonl)(tmp_path / name, rows)
    spec = load_spec(write_spec(tmp_path, input=str(path), carry_columns=["stars"],
                                shard_rows=15))
    shards = plan_shards(spec)
    assert sum(s.num_rows for s in shards) == 100 and len(shards) > 4
    got = [r for s in shards for batch in iter_shard_rows(spec, s, batch_rows=4)
           for r in batch]
    assert [r.id for r in got] == [r["id"] for r in rows]
    assert got[42].messages == [{"role": "user", "content": "Say something about 42."}]
    stars = got[42].carry["stars"]
    assert stars == (42 % 5 if not name.endswith(".csv") else "2")  # CSV columns are text


def test_a_broken_line_is_that_rows_error(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "in.jsonl", _rows(20), broken={3})
    lines = path.read_text().splitlines()
    lines[5] = json.dumps({"id": "r0005", "prompt": "x", "stars": "five"})  # another type
    path.write_text("\n".join(lines) + "\n")
    rf = open_input(str(path))
    assert isinstance(rf, RowFile) and rf.metadata.num_rows == 20
    assert rf.schema_arrow.field("stars").type == pa.int64()
    batch = next(rf.iter_batches(batch_size=100))
    errors = batch.column(ERROR_COLUMN).to_pylist()
    assert [i for i, e in enumerate(errors) if e] == [3, 4]  # the 4th and 5th object lines
    assert "not a JSON object" in errors[3] and "another type" in errors[4]


def test_a_file_with_no_objects_or_no_header_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text("[1, 2]\n")
    spec = load_spec(write_spec(tmp_path, input=str(tmp_path / "in.jsonl")))
    with pytest.raises(InputDataError, match="holds no JSON object lines"):
        plan_shards(spec)
    (tmp_path / "empty").mkdir()
    spec = load_spec(write_spec(tmp_path, input=str(tmp_path / "empty")))
    with pytest.raises(InputDataError, match=r"nor JSONL or CSV files"):
        plan_shards(spec)


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(180)
def test_a_jsonl_folder_runs_and_resumes(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    _jsonl(folder / "a.jsonl", _rows(50), broken={7})
    _jsonl(folder / "b.jsonl.gz", _rows(30))
    with start_in_thread(MockConfig()) as server:
        spec = write_spec(tmp_path, input=str(folder), id_column=None,
                          endpoint={"base_url": server.base_url}, carry_columns=["stars"])
        summary = run_job(str(spec), RunOptions(progress=False))
        again = run_job(str(spec), RunOptions(progress=False))  # resume: nothing to send
        stats = server.stats()
    t = pq.read_table(tmp_path / "out" / "results")
    assert t.num_rows == 80 and summary.ok == 79 and summary.errors == 1
    bad = [r for r in t.to_pylist() if r["status"] == "error"]
    assert bad[0]["id"] == "a.jsonl#7" and bad[0]["error_type"] == "bad_row"
    assert stats["ok"] == 79 and again.rows_this_run == 0


def _batch_file(path: Path, url: str, bodies: list[dict[str, Any]]) -> Path:
    lines = [json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": b})
             for i, b in enumerate(bodies)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_batch_file_for_another_endpoint_fails_before_ray(tmp_path: Path) -> None:
    path = _batch_file(tmp_path / "b.jsonl", "/v1/embeddings", [{"input": "x"}])
    spec = write_spec(tmp_path, input=str(path), prompt_column=None, id_column=None,
                      carry_columns=[])
    with pytest.raises(InputDataError, match=r"ask for /v1/embeddings, and task: chat") as e:
        run_job(str(spec), RunOptions(progress=False))
    assert e.value.exit_code == 2
    _jsonl(tmp_path / "plain.jsonl", _rows(3))
    spec = write_spec(tmp_path, input=str(tmp_path / "plain.jsonl"), prompt_column=None,
                      id_column=None, carry_columns=[])
    with pytest.raises(InputDataError, match="not an OpenAI batch input file"):
        run_job(str(spec), RunOptions(progress=False))


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(180)
def test_an_openai_batch_file_runs_online(tmp_path: Path) -> None:
    bodies = [{"model": "gpt-4o", "messages": [{"role": "user", "content": f"hi {i}"}],
               "max_tokens": 500, "temperature": 0} for i in range(20)]
    path = _batch_file(tmp_path / "b.jsonl", "/v1/chat/completions", bodies)
    with path.open("a") as f:
        f.write(json.dumps({"custom_id": "odd", "method": "POST", "url": "/v1/embeddings",
                            "body": {"input": "x"}}) + "\n{broken\n")
    with start_in_thread(MockConfig()) as server:
        spec = write_spec(tmp_path, input=str(path), prompt_column=None, id_column=None,
                          carry_columns=[], endpoint={"base_url": server.base_url})
        run_job(str(spec), RunOptions(progress=False))
        stats = server.stats()
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "results").to_pylist()}
    assert len(rows) == 22 and stats["ok"] == 20
    assert all(rows[f"req-{i}"]["status"] == "ok" for i in range(20))
    assert rows["req-3"]["model"] == "gpt-4.1-mini"  # the spec's model, priced as such
    assert max(r["completion_tokens"] for r in rows.values() if r["status"] == "ok") <= 32
    assert "does not match task: chat" in rows["odd"]["error_message"]
    assert rows["b.jsonl#21"]["error_type"] == "bad_row"  # no custom_id: file#position


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(180)
def test_an_embeddings_batch_file_runs_in_batch_mode(tmp_path: Path) -> None:
    bodies = [{"model": "text-embedding-3-small", "input": f"text {i}", "dimensions": 8}
              for i in range(10)]
    path = _batch_file(tmp_path / "b.jsonl", "/v1/embeddings", bodies)
    with start_in_thread(MockConfig(batch_delay_s=0.2)) as server:
        spec = write_spec(tmp_path, input=str(path), prompt_column=None, id_column=None,
                          carry_columns=[], task="embeddings", generation=None,
                          model="text-embedding-3-small", mode="batch",
                          batch={"poll_interval_s": 0.2},
                          endpoint={"base_url": server.base_url})
        run_job(str(spec), RunOptions(progress=False))
    t = pq.read_table(tmp_path / "out" / "results")
    assert t.num_rows == 10 and set(t["status"].to_pylist()) == {"ok"}
    assert all(len(v) == 8 for v in t["embedding"].to_pylist())
