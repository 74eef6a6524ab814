"""prompt_template, a templated system_prompt, image_column and content parts."""

from __future__ import annotations

import base64
import struct
import zlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun.api.images import MAX_IMAGE_TOKENS, image_part, image_tokens, part_tokens
from batchrun.api.templates import Templates
from batchrun.api.tokens import count_chat_tokens
from batchrun.errors import InputDataError, SpecError
from batchrun.io.rows import RowBuilder
from batchrun.runner import RunOptions, run_job
from batchrun.sim import MockConfig, answer_for, start_in_thread
from batchrun.spec import JobSpec
from tests.conftest import make_prompts, write_spec


def _spec(**over: Any) -> JobSpec:
    d: dict[str, Any] = {"name": "t", "input": "in.parquet", "model": "gpt-4.1-mini",
                         "generation": {"max_tokens": 8}, "limits": {"rpm": 60}, "output": "o"}
    d.update(over)
    return JobSpec.model_validate(d)


def _png(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)))


def test_templates_render_columns_and_refuse_what_is_unsafe() -> None:
    spec = _spec(prompt_template="Review: {{ text }} ({{ stars }}*)",
                 system_prompt="You label reviews for {{ shop|upper }}.")
    b = RowBuilder(spec)
    assert set(b.columns) == {"text", "stars", "shop"}
    data = {"text": ["good", "bad"], "stars": [5, 1], "shop": ["acme", "zed"]}
    msgs, err = b.payload(data, 1)
    assert err is None and msgs == [
        {"role": "system", "content": "You label reviews for ZED."},
        {"role": "user", "content": "Review: bad (1*)"}]
    evil = RowBuilder(_spec(prompt_template="{{ text.__class__.__mro__ }}"))
    msgs, err = evil.payload({"text": ["x"]}, 0)
    assert msgs is None and err is not None and err.startswith("template: SecurityError")
    # a plain system prompt is not a template: braces of other kinds pass as written
    assert Templates.of(_spec(prompt_column="p", system_prompt="Answer in {json}.")) is None


def test_a_template_syntax_error_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match=r"prompt_template: template syntax error at line 1"):
        Templates.of(_spec(prompt_template="Hi {{ name "))


def test_a_template_naming_a_missing_column_fails_before_ray(tmp_path: Path) -> None:
    make_prompts(tmp_path / "in.parquet", 5)
    spec = write_spec(tmp_path, prompt_column=None,
                      prompt_template="{{ prompt }} for {{ shop }}")
    with pytest.raises(InputDataError) as info:
        run_job(str(spec), RunOptions(progress=False))
    assert "no column 'shop'" in str(info.value) and info.value.exit_code == 2


def test_image_parts_and_their_tokens() -> None:
    url = "https://example.com/cat.png"
    assert image_part(url) == ({"type": "image_url", "image_url": {"url": url}}, None)
    png = _png(1024, 1024)
    part, _ = image_part(png)
    assert part is not None
    assert part["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(png).decode()
    assert image_part(b"plain text")[1] is not None and image_part(42)[1] is not None
    # OpenAI's published examples
    assert image_tokens(1024, 1024) == 765 and image_tokens(2048, 4096) == 1105
    assert image_tokens(4096, 8192, "low") == 85
    assert part_tokens(part) == 765
    assert part_tokens({"type": "image_url", "image_url": {"url": url}}) == MAX_IMAGE_TOKENS
    assert part_tokens({"type": "image_url", "image_url": {"url": url, "detail": "low"}}) == 85
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}]
    assert count_chat_tokens(msgs) == count_chat_tokens([{"role": "user", "content": "hi"}]) + 765


def test_image_column_adds_a_part_or_is_the_rows_error() -> None:
    b = RowBuilder(_spec(prompt_column="p", image_column="img"))
    data = {"p": ["What is it?", "And this?"], "img": ["https://x/y.jpg", None]}
    msgs, err = b.payload(data, 0)
    assert err is None and msgs == [{"role": "user", "content": [
        {"type": "text", "text": "What is it?"},
        {"type": "image_url", "image_url": {"url": "https://x/y.jpg"}}]}]
    assert b.payload(data, 1) == (None, "image_column: neither an image URL nor image bytes")


def test_messages_content_parts_pass_through_less_nulls() -> None:
    b = RowBuilder(_spec(messages_column="m"))
    parts = [{"type": "text", "text": "hi", "image_url": None},
             {"type": "image_url", "text": None, "image_url": {"url": "https://x", "detail": None}}]
    msgs, err = b.payload({"m": [[{"role": "user", "content": parts}]]}, 0)
    assert err is None and msgs == [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "https://x"}}]}]


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(180)
def test_templated_job_sends_and_counts_the_rendered_prompt(tmp_path: Path) -> None:
    n = 40
    make_prompts(tmp_path / "in.parquet", n, extra={"shop": [f"s{i % 3}" for i in range(n)]})
    with start_in_thread(MockConfig()) as server:
        spec = write_spec(tmp_path, prompt_column=None, endpoint={"base_url": server.base_url},
                          prompt_template="{{ prompt }} [{{ topic }}]",
                          system_prompt="You write for {{ shop }}.",
                          limits={"rpm": 100_000, "tpm": 10_000_000, "max_concurrency": 8})
        run_job(str(spec), RunOptions(progress=False))
        stats = server.stats()
    rows = pq.read_table(tmp_path / "out" / "results").to_pylist()
    assert len(rows) == n and all(r["status"] == "ok" for r in rows)
    for r in rows:
        i = int(r["id"][1:])
        msgs = [{"role": "system", "content": f"You write for s{i % 3}."},
                {"role": "user", "content": f"Say something short about item {i}. [t{i % 7}]"}]
        assert r["response"] == answer_for(msgs, 32)[0]  # the sim answers what it was sent
        assert r["prompt_tokens"] == count_chat_tokens(msgs, "gpt-4.1-mini")
    assert stats["prompt_tokens_billed"] == sum(r["prompt_tokens"] for r in rows)


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(180)
def test_image_job_records_bad_images_and_sends_the_rest(tmp_path: Path) -> None:
    imgs = [_png(64, 64), b"not an image", None, _png(2000, 500)]
    make_prompts(tmp_path / "in.parquet", 4)
    t = pq.read_table(tmp_path / "in.parquet").append_column("img", pa.array(imgs, pa.binary()))
    pq.write_table(t, tmp_path / "in.parquet")
    with start_in_thread(MockConfig()) as server:
        spec = write_spec(tmp_path, image_column="img", endpoint={"base_url": server.base_url})
        run_job(str(spec), RunOptions(progress=False))
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "results").to_pylist()}
    assert [rows[f"r00000{i}"]["status"] for i in range(4)] == ["ok", "error", "error", "ok"]
    assert rows["r000001"]["error_type"] == "bad_row"
    assert rows["r000003"]["prompt_tokens"] > rows["r000000"]["prompt_tokens"] > 85
