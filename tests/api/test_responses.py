"""task: responses, in parts and end to end on the simulated provider (online and batch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from batchrun.api.registry import kind_for
from batchrun.api.responses import ResponsesKind
from batchrun.api.structured import Structured
from batchrun.api.tokens import count_chat_tokens
from batchrun.errors import RetryableError, SpecError
from batchrun.runner import RunOptions, run_job
from batchrun.sim import MockConfig, answer_for, start_in_thread
from batchrun.spec import JobSpec
from tests.conftest import make_prompts, write_spec

SCHEMA = {"type": "object", "properties": {"label": {"type": "string"}},
          "required": ["label"], "additionalProperties": False}


def _spec(**over: Any) -> JobSpec:
    d: dict[str, Any] = {"name": "r", "input": "in.parquet", "prompt_column": "p",
                         "task": "responses", "model": "gpt-4.1-mini", "limits": {"rpm": 60},
                         "generation": {"max_tokens": 50, "temperature": 0.2},
                         "system_prompt": "Be brief.", "output": "o"}
    d.update(over)
    return JobSpec.model_validate(d)


def test_body_carries_instructions_input_and_max_output_tokens() -> None:
    spec = _spec()
    kind = kind_for(spec)
    msgs, err = kind.payload(spec, "Hello")
    assert err is None
    fields = {**spec.generation.request_fields(),
              **Structured(SCHEMA, name="tag").request_fields()}
    body = kind.body(spec, msgs, fields)
    assert body == {"model": "gpt-4.1-mini", "instructions": "Be brief.",
                    "input": [{"role": "user", "content": "Hello"}], "max_output_tokens": 50,
                    "temperature": 0.2, "text": {"format": {
                        "type": "json_schema", "name": "tag", "schema": SCHEMA,
                        "strict": True}}}
    assert kind.prompt_tokens(msgs, spec.model) == count_chat_tokens(msgs, spec.model)


def test_parse_joins_output_text_and_maps_incomplete_to_length() -> None:
    kind = ResponsesKind()
    doc = {"status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"},
           "output": [{"type": "reasoning", "summary": []},
                      {"type": "message", "content": [
                          {"type": "output_text", "text": "ab"},
                          {"type": "refusal", "refusal": "no"},
                          {"type": "output_text", "text": "cd"}]}],
           "usage": {"input_tokens": 9, "output_tokens": 4, "total_tokens": 13}}
    c = kind.parse(doc)
    assert (c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens) == (
        "abcd", "length", 9, 4)
    assert kind.parse({**doc, "status": "completed"}).finish_reason == "stop"
    with pytest.raises(RetryableError):
        kind.parse({"status": "completed"})


def test_generation_fields_the_responses_api_lacks_are_spec_errors() -> None:
    with pytest.raises(SpecError, match=r"responses takes no generation\.stop"):
        kind_for(_spec(generation={"max_tokens": 5, "stop": ["\n"]}))
    with pytest.raises(Exception, match="max_tokens"):
        _spec(generation={"temperature": 0.1})  # still mandatory


def _run(tmp_path: Path, server_url: str, **over: Any) -> list[dict[str, Any]]:
    make_prompts(tmp_path / "in.parquet", 60)
    spec = write_spec(tmp_path, **{"task": "responses", "system_prompt": "Be brief.",
                                   "endpoint": {"base_url": server_url}, **over})
    run_job(str(spec), RunOptions(progress=False))
    return sorted(pq.read_table(tmp_path / "out" / "results").to_pylist(),
                  key=lambda r: r["id"])


def _messages(i: int) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Say something short about item {i}."}]


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["online", "batch"])
def test_responses_job(tmp_path: Path, mode: str) -> None:
    with start_in_thread(MockConfig(batch_delay_s=0.2)) as server:
        rows = _run(tmp_path, server.base_url, generation={"max_tokens": 20}, mode=mode,
                    batch={"poll_interval_s": 0.2})
        stats = server.stats()
    assert len(rows) == 60 and all(r["status"] == "ok" for r in rows)
    for r in rows[:10]:
        i = int(r["id"][1:])
        text, ntok, finish = answer_for(_messages(i), 20)
        assert (r["response"], r["completion_tokens"], r["finish_reason"]) == (
            text, ntok, finish)
        assert r["prompt_tokens"] == count_chat_tokens(_messages(i), "gpt-4.1-mini")
    assert {r["finish_reason"] for r in rows} == {"stop", "length"}  # cut ones: incomplete
    assert stats["ok"] == 60


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(180)
def test_responses_structured_outputs_are_validated(tmp_path: Path) -> None:
    with start_in_thread(MockConfig(invalid_json_rate=0.3, seed=3)) as server:
        rows = _run(tmp_path, server.base_url, generation={"max_tokens": 200},
                    response_format={"json_schema": SCHEMA})
        stats = server.stats()
    assert all(r["status"] == "ok" for r in rows) and len(rows) == 60
    assert all(r["parsed"].startswith('{"label":') for r in rows)
    assert stats["ok"] > 60  # broken answers were refused and asked again


def test_image_parts_become_input_image() -> None:
    spec = _spec(image_column="img")
    kind = kind_for(spec)
    msgs = [{"role": "user", "content": [
        {"type": "text", "text": "What is it?"},
        {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}}]}]
    assert kind.body(spec, msgs, {"max_tokens": 5})["input"] == [{"role": "user", "content": [
        {"type": "input_text", "text": "What is it?"},
        {"type": "input_image", "image_url": "https://x/y.png", "detail": "low"}]}]
    assert kind.prompt_tokens(msgs, spec.model) > 85
