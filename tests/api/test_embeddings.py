"""task: embeddings, end to end on the simulated provider (online and batch) and in parts."""

from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun.api.embeddings import EmbeddingsKind, share_tokens
from batchrun.api.protocols import inputs_per_request, output_tokens
from batchrun.api.registry import kind_for
from batchrun.api.tokens import count_text_tokens
from batchrun.errors import RetryableError, SpecError
from batchrun.io.shards import plan_shards
from batchrun.money.pricing import cost_usd, price_for
from batchrun.online.grouped import GroupRunner
from batchrun.runner import RunOptions, run_job
from batchrun.sim import MockConfig, start_in_thread
from batchrun.sim.kinds import embedding_vector
from batchrun.spec import JobSpec, load_spec
from tests.conftest import make_prompts, write_spec

MODEL = "text-embedding-3-small"
LONG = "word " * 9000  # over the embedding models' 8191-token input limit


def _spec_dict(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"name": "e", "input": "in.parquet", "prompt_column": "p",
                         "task": "embeddings", "model": MODEL, "limits": {"rpm": 60},
                         "output": "o"}
    d.update(over)
    return d


def _spec_error(tmp_path: Path, **over: Any) -> str:
    """The one line ``batchrun run`` fails with, before Ray or any request."""
    make_prompts(tmp_path / "in.parquet", 3)
    spec = write_spec(tmp_path, task="embeddings", model=MODEL, generation=None, **over)
    with pytest.raises(SpecError) as info:
        run_job(str(spec), RunOptions(progress=False))
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
    return str(info.value)


def test_spec_needs_no_max_tokens_and_refuses_chat_only_fields(tmp_path: Path) -> None:
    spec = JobSpec.model_validate(_spec_dict())
    assert spec.embedding.inputs_per_request == 128
    assert spec.embedding.encoding_format == "base64"
    assert "2048" in _spec_error(tmp_path, embedding={"inputs_per_request": 2049})
    msg = _spec_error(tmp_path, response_format={"json_schema": {"type": "object"}})
    assert "embeddings takes no response_format" in msg
    assert "image_column" in _spec_error(tmp_path, image_column="photo")
    # an embedding's input is one text: a system prompt has nowhere to go
    assert "takes no system_prompt" in _spec_error(tmp_path, system_prompt="Be {{ x }}.")
    assert "encoding_format" in _spec_error(tmp_path, embedding={"encoding_format": "hex"})


def test_kind_body_parse_and_token_shares() -> None:
    spec = JobSpec.model_validate(_spec_dict(embedding={"dimensions": 4}))
    kind = kind_for(spec)
    assert isinstance(kind, EmbeddingsKind) and inputs_per_request(kind, spec) == 128
    assert output_tokens(kind, spec) == 0
    assert kind.body(spec, ["a", "b"], {"max_tokens": 1}) == {
        "model": MODEL, "input": ["a", "b"], "encoding_format": "base64", "dimensions": 4}
    v = np.arange(4, dtype="<f4")
    doc = {"data": [{"index": 1, "embedding": [9.0, 9.0, 9.0, 9.0]},
                    {"index": 0, "embedding": base64.b64encode(v.tobytes()).decode()}],
           "usage": {"prompt_tokens": 7, "total_tokens": 7}}
    c = kind.parse(doc)
    assert c.prompt_tokens == 7 and c.completion_tokens == 0
    np.testing.assert_array_equal(c.extra[0]["embedding"], v)  # ordered by index
    assert list(c.extra[1]["embedding"]) == [9.0] * 4
    with pytest.raises(RetryableError):
        kind.parse({"data": [{"index": 0, "embedding": "not base64!"}]})
    assert kind.payload(spec, "  ") == (None, "empty input")
    assert kind.payload(spec, None) == (None, "null input")
    assert "over" in str(kind.payload(spec, LONG)[1])
    assert share_tokens([3, 1], 8) == [6, 2] and sum(share_tokens([1, 1, 1], 10)) == 10


def test_a_request_reserves_every_rows_input_and_one_request() -> None:
    spec = JobSpec.model_validate(_spec_dict(limits={"rpm": 60, "tpm": 10_000},
                                             budget={"max_cost_usd": 1.0}))
    runner = GroupRunner(spec, None, None, pause_all=lambda s: None,  # type: ignore[arg-type]
                         price=price_for(spec), budgeted=True)
    cost, usd = runner._group_reservation(1000)
    assert cost == 1000.0  # TPM: the inputs' tokens, no output
    assert usd is not None and usd >= cost_usd(price_for(spec), 1000, 0)
    plain = GroupRunner(JobSpec.model_validate(_spec_dict()), None, None,  # type: ignore[arg-type]
                        pause_all=lambda s: None)
    assert plain._group_reservation(1000) == (1.0, None)  # RPM only: one request


def _job(tmp_path: Path, texts: list[str], server_url: str, **over: Any) -> pa.Table:
    make_prompts(tmp_path / "in.parquet", len(texts), extra={"prompt": texts}, row_group=50)
    spec = write_spec(tmp_path, **{"task": "embeddings", "model": MODEL, "generation": None,
                                    "endpoint": {"base_url": server_url}, **over})
    run_job(str(spec), RunOptions(progress=False))
    return pq.read_table(tmp_path / "out" / "results")


def _texts(n: int) -> list[str]:
    texts = [f"review number {i} of a product" for i in range(n)]
    texts[3], texts[10] = "", LONG  # this row's errors: empty, over the input limit
    return texts


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(180)
def test_online_embeddings_many_rows_per_request(tmp_path: Path) -> None:
    n, per = 300, 40
    texts = _texts(n)
    with start_in_thread(MockConfig()) as server:
        t = _job(tmp_path, texts, server.base_url,
                 embedding={"dimensions": 32, "inputs_per_request": per},
                 limits={"rpm": 100_000, "max_concurrency": 4})
        stats = server.stats()
    assert t.num_rows == n and len(set(t.column("id").to_pylist())) == n
    assert t.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    rows = {r["id"]: r for r in t.to_pylist()}
    assert rows["r000003"]["status"] == "error" and rows["r000003"]["error_type"] == "bad_row"
    assert "over" in rows["r000010"]["error_message"]
    ok = [r for r in t.to_pylist() if r["status"] == "ok"]
    assert len(ok) == n - 2
    for r in ok[:20]:
        text = texts[int(r["id"][1:])]
        np.testing.assert_allclose(r["embedding"], embedding_vector(text, 32), rtol=1e-6)
        assert r["prompt_tokens"] == count_text_tokens(text, MODEL)
    # each shard's rows go out in full requests of 40, the last one holding the rest
    shards = plan_shards(load_spec(tmp_path / "job.yaml"))
    assert stats["ok"] == sum(math.ceil(s.num_rows / per) for s in shards) < n / 10
    assert stats["prompt_tokens_billed"] == sum(r["prompt_tokens"] for r in ok)
    price = price_for(load_spec(tmp_path / "job.yaml"))
    assert sum(r["cost_usd"] for r in ok) == pytest.approx(
        cost_usd(price, stats["prompt_tokens_billed"], 0))


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(180)
def test_a_row_the_provider_refuses_is_split_off(tmp_path: Path) -> None:
    """A model with no input limit known here: the provider refuses the whole request
    (400), the request is halved until the one row is alone, the rest succeed."""
    texts = [f"text {i}" for i in range(60)]
    texts[17] = LONG
    with start_in_thread(MockConfig()) as server:
        t = _job(tmp_path, texts, server.base_url, model="my-embedder",
                 price={"input_per_1m": 0.02, "output_per_1m": 0.0},
                 embedding={"dimensions": 8, "inputs_per_request": 64}, workers=1,
                 limits={"rpm": 100_000, "max_concurrency": 2})
        stats = server.stats()
    by_id = {r["id"]: r for r in t.to_pylist()}
    assert t.num_rows == 60
    assert by_id["r000017"]["status"] == "error"
    assert by_id["r000017"]["error_type"] == "http_400"
    assert sum(r["status"] == "ok" for r in by_id.values()) == 59
    assert t.schema.field("embedding").type == pa.list_(pa.float32(), 8)
    assert stats["by_outcome"]["bad_request"] >= 2  # the whole, then halves, down to one


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(180)
def test_batch_mode_embeddings(tmp_path: Path) -> None:
    texts = _texts(40)
    with start_in_thread(MockConfig(batch_delay_s=0.2)) as server:
        t = _job(tmp_path, texts, server.base_url, mode="batch",
                 embedding={"encoding_format": "float"},
                 batch={"poll_interval_s": 0.2})
    assert t.num_rows == 40 and t.schema.field("embedding").type == pa.list_(pa.float32(), 1536)
    ok = [r for r in t.to_pylist() if r["status"] == "ok"]
    assert len(ok) == 38 and all(r["batch_id"] for r in ok)
    text = texts[int(ok[0]["id"][1:])]
    np.testing.assert_allclose(ok[0]["embedding"], embedding_vector(text, 1536), rtol=1e-6)
    price = price_for(load_spec(tmp_path / "job.yaml"))
    assert ok[0]["cost_usd"] == cost_usd(price, ok[0]["prompt_tokens"], 0, batch=True)


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(180)
def test_vectors_of_another_size_are_row_errors_not_a_lost_table(tmp_path: Path) -> None:
    """The column is fixed at the model's 1536; a body field asks the provider for 8."""
    with start_in_thread(MockConfig()) as server:
        t = _job(tmp_path, [f"t {i}" for i in range(30)], server.base_url,
                 generation={"max_tokens": 1, "extra_body": {"dimensions": 8}})
    assert t.num_rows == 30 and set(t["error_type"].to_pylist()) == {"malformed_body"}
    assert "8 values, not 1536" in t["error_message"][0].as_py()
    assert t["cost_usd"][0].as_py() > 0  # answered, so billed


def test_estimate_counts_requests_of_many_rows_and_no_output(tmp_path: Path) -> None:
    from batchrun.money.estimate import estimate

    texts = [f"text number {i}" for i in range(300)]
    make_prompts(tmp_path / "in.parquet", 300, extra={"prompt": texts})
    spec = load_spec(write_spec(tmp_path, task="embeddings", model=MODEL, generation=None,
                                embedding={"inputs_per_request": 100},
                                limits={"rpm": 6, "tpm": 10_000_000}))
    est = estimate(spec)
    prompt = sum(count_text_tokens(t, MODEL) for t in texts)
    assert est.prompt_tokens == prompt and est.worst_output_tokens == 0
    assert est.online.worst_usd == pytest.approx(cost_usd(price_for(spec), prompt, 0))
    assert est.duration_minutes == pytest.approx(3 / 6)  # 3 requests of 100 rows at 6 rpm
