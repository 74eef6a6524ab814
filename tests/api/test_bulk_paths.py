"""The bulk paths that carry embeddings at tens of thousands of rows a second give the
same results as the row-by-row ones they replace (their speed is in bench_embeddings)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun.api.embeddings import EmbeddingsKind
from batchrun.api.records import records_table
from batchrun.api.tokens import _encoding_for_model, count_chat_tokens, count_text_tokens
from batchrun.errors import RetryableError
from batchrun.io import storage
from batchrun.online.metrics import request_latencies
from batchrun.sim.kinds import embedding_vector, embedding_vectors
from batchrun.spec import EMBEDDINGS_FLUSH_ROWS, JobSpec

VEC = pa.list_(pa.float32(), 3)
SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("embedding", VEC),
                    pa.field("n", pa.int64())])


def _rows(*vectors: Any) -> list[dict[str, Any]]:
    return [{"id": str(i), "embedding": v, "n": i, "ignored": "x"}
            for i, v in enumerate(vectors)]


def test_records_table_builds_the_vector_column_in_bulk_with_nulls() -> None:
    a, b = np.array([1, 2, 3], "<f4"), np.array([4, 5, 6], "<f4")
    t = records_table(_rows(a, None, b), SCHEMA)
    assert t.schema == SCHEMA
    assert t.to_pylist() == [{"id": "0", "embedding": [1.0, 2.0, 3.0], "n": 0},
                             {"id": "1", "embedding": None, "n": 1},
                             {"id": "2", "embedding": [4.0, 5.0, 6.0], "n": 2}]
    assert t.column("embedding").null_count == 1
    assert records_table(_rows(None, None), SCHEMA).column("embedding").null_count == 2


def test_records_table_other_values_take_the_row_path() -> None:
    # lists (a float answer) still convert; a vector of another size is refused by name
    assert records_table(_rows([1.0, 2.0, 3.0]), SCHEMA)["embedding"].to_pylist() == [
        [1.0, 2.0, 3.0]]
    with pytest.raises(pa.ArrowInvalid):
        records_table(_rows(np.ones(4, "<f4")), SCHEMA)
    ints = pa.schema([pa.field("embedding", pa.list_(pa.int32(), 2))])
    assert records_table([{"embedding": [1, 2]}], ints)["embedding"].to_pylist() == [[1, 2]]


def test_parse_decodes_base64_answers_at_once_in_index_order() -> None:
    vectors = np.arange(12, dtype="<f4").reshape(3, 4)
    doc = {"data": [{"index": i, "embedding": base64.b64encode(vectors[i].tobytes()).decode()}
                    for i in (2, 0, 1)], "usage": {"prompt_tokens": 3}}
    got = EmbeddingsKind().parse(doc).extra
    for i in range(3):
        np.testing.assert_array_equal(got[i]["embedding"], vectors[i])
    # answers of two sizes are each decoded alone (the worker then names the wrong one)
    doc["data"][0]["embedding"] = base64.b64encode(vectors[0, :2].tobytes()).decode()
    assert [len(x["embedding"]) for x in EmbeddingsKind().parse(doc).extra] == [4, 4, 2]
    doc["data"][0]["embedding"] = "AAA"  # not a whole number of floats
    with pytest.raises(RetryableError):
        EmbeddingsKind().parse(doc)


@pytest.mark.parametrize("text", ["hello <|endoftext|> world", "a\ud800b", "", " x " * 500,
                                  "日本語のテキストです", "def f(x):\n    return x ** 2\n"])
def test_token_count_fast_path_equals_the_encoding(text: str) -> None:
    for model in ("gpt-4.1", "text-embedding-3-small", "claude-sonnet-4-5"):
        assert count_text_tokens(text, model) == len(
            _encoding_for_model(model).encode_ordinary(text))


def test_chat_counts_and_a_text_past_the_encoders_chunk_limit() -> None:
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "日本語 and code: f(x)"}]}]
    enc = _encoding_for_model("gpt-4.1")
    framing = 3 + 3 * len(msgs) + sum(len(enc.encode_ordinary(m["role"])) for m in msgs)
    assert count_chat_tokens(msgs, "gpt-4.1") == framing + len(enc.encode_ordinary(
        "Be brief.")) + len(enc.encode_ordinary("日本語 and code: f(x)"))
    long = "a" + " a" * 300_000  # 300,001 tokens in 600,001 characters
    with pytest.raises(Exception, match="chunk limit"):  # the encoder refuses it whole
        enc.encode_ordinary(long)
    assert count_text_tokens(long, "gpt-4.1") == 300_001


def test_vector_columns_are_written_without_dictionary_or_compression(tmp_path: Path) -> None:
    t = records_table(_rows(np.ones(3, "<f4"), np.zeros(3, "<f4")), SCHEMA)
    # nested columns that are not vectors (structured outputs' lists, carried structs)
    t = t.append_column("tags", pa.array([["a", "b"], ["a"]])).append_column(
        "s", pa.array([{"k": 1, "m": [1.5]}, {"k": 2, "m": [2.5]}]))
    storage.commit_table(tmp_path / "t.parquet", t)
    meta = pq.ParquetFile(tmp_path / "t.parquet").metadata.row_group(0)
    cols = [meta.column(i) for i in range(meta.num_columns)]
    assert {c.path_in_schema: c.compression for c in cols} == {
        "id": "SNAPPY", "embedding.list.element": "UNCOMPRESSED", "n": "SNAPPY",
        "tags.list.element": "SNAPPY", "s.k": "SNAPPY", "s.m.list.element": "SNAPPY"}
    assert [c.path_in_schema for c in cols if c.has_dictionary_page] == [
        "id", "n", "tags.list.element", "s.k", "s.m.list.element"]
    assert pq.read_table(tmp_path / "t.parquet").equals(t)
    plain = pa.table({"id": ["a"], "tags": [["x"]]})  # no vector: pyarrow's defaults
    storage.commit_table(tmp_path / "p.parquet", plain)
    meta = pq.ParquetFile(tmp_path / "p.parquet").metadata.row_group(0)
    assert {meta.column(i).compression for i in range(meta.num_columns)} == {"SNAPPY"}


def test_a_request_latency_counts_once_for_all_the_rows_it_answered() -> None:
    group = [{"status": "ok", "latency_ms": 12.5}] * 3  # one request of three rows
    recs = [*group, {"status": "ok", "latency_ms": 7.0}, {"status": "error", "latency_ms": 3.0},
            {"status": "ok", "latency_ms": None}, *[{"status": "ok", "latency_ms": 12.5}] * 2]
    assert request_latencies(recs) == [12.5, 7.0, 12.5]
    bad = {"status": "error", "error_type": "bad_row", "latency_ms": None}
    assert request_latencies([group[0], bad, group[0]]) == [12.5]  # one request, a bad row


def test_simulated_vectors_in_bulk_equal_one_by_one() -> None:
    texts = ["a", "hello world", "日本"]
    bulk = embedding_vectors(texts, 64)
    assert bulk.shape == (3, 64) and bulk.dtype == np.float32
    for text, row in zip(texts, bulk, strict=True):
        np.testing.assert_array_equal(row, embedding_vector(text, 64))
        assert abs(float(np.dot(row, row)) - 1.0) < 1e-5


def test_embeddings_checkpoint_every_2048_rows_unless_set() -> None:
    d = {"name": "e", "input": "in.parquet", "prompt_column": "p", "model": "m",
         "limits": {"rpm": 60}, "output": "o"}
    assert JobSpec(task="embeddings", **d).flush_rows == EMBEDDINGS_FLUSH_ROWS == 2048
    assert JobSpec(task="embeddings", flush_rows=100, **d).flush_rows == 100
    assert JobSpec(generation={"max_tokens": 5}, **d).flush_rows == 500
