"""Structured outputs: schema loading, the answer check, typed columns, the simulated
provider's schema instances, and a real loopback run through RowRunner and openai."""

from __future__ import annotations

import asyncio
import json
import pickle
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pyarrow as pa
import pytest
from pydantic import BaseModel

from batchrun.api.client import ApiClient, open_session
from batchrun.api.protocols import Completion
from batchrun.api.structured import Structured
from batchrun.errors import RetryableError, SpecError
from batchrun.io.shards import RequestRow
from batchrun.io.writer import result_schema
from batchrun.limits.permits import LeaseAnswer, PermitPool
from batchrun.online.engine import RowRunner
from batchrun.sim import MockConfig, start_in_thread
from batchrun.sim.protocol import (
    BadRequest,
    ChatRequest,
    answer_request,
    parse_chat_request,
)
from batchrun.sim.schema_answers import (
    broken_json,
    draw_fate,
    instance_for,
    invalid_instance,
    structured_answer,
)
from batchrun.spec import EndpointSpec, JobSpec

MODEL = "gpt-4.1-mini"

PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 3},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "member": {"type": "boolean"},
        "mood": {"enum": ["happy", "sad", "calm"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "address": {"type": "object", "properties": {"city": {"type": "string"}},
                    "required": ["city"], "additionalProperties": False},
        "nickname": {"type": ["string", "null"]},
    },
    "required": ["name", "age", "score", "member", "mood", "tags", "address", "nickname"],
    "additionalProperties": False,
}


def job(rf: dict[str, Any], **kw: Any) -> JobSpec:
    raw: dict[str, Any] = {
        "name": "t", "input": "in.parquet", "prompt_column": "prompt", "model": MODEL,
        "generation": {"max_tokens": 400}, "limits": {"rpm": 100_000}, "output": "out",
        "response_format": rf, **kw,
    }
    return JobSpec.model_validate(raw)


def load(rf: dict[str, Any], base: Path | str = ".", **kw: Any) -> Structured:
    s = Structured.from_spec(job(rf, **kw), base)
    assert s is not None
    return s


def answer(text: str | None, finish: str = "stop") -> Completion:
    return Completion(text=text, finish_reason=finish, prompt_tokens=1, completion_tokens=1,
                      total_tokens=2)


def spec_error(rf: dict[str, Any], base: Path | str = ".", **kw: Any) -> str:
    with pytest.raises(SpecError) as info:
        Structured.from_spec(job(rf, **kw), base)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- loading ------------------------------------------------------------------------------


def test_no_response_format_is_none() -> None:
    spec = job({"json_schema": PERSON}).model_copy(update={"response_format": None})
    assert Structured.from_spec(spec, ".") is None


def test_inline_schema_request_fields_have_openais_shape() -> None:
    s = load({"json_schema": PERSON, "name": "person", "strict": True})
    assert s.request_fields() == {"response_format": {"type": "json_schema", "json_schema": {
        "name": "person", "schema": PERSON, "strict": True}}}
    assert s.strict_problems() == []


def test_schema_files_json_and_yaml_relative_to_base(tmp_path: Path) -> None:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "p.json").write_text(json.dumps(PERSON))
    (tmp_path / "schemas" / "p.yaml").write_text(
        "type: object\nproperties:\n  a: {type: integer}\nrequired: [a]\n")
    assert load({"json_schema": "schemas/p.json"}, tmp_path).schema == PERSON
    assert load({"json_schema": "schemas/p.yaml"}, tmp_path).schema["required"] == ["a"]


class Address(BaseModel):
    city: str


class Person(BaseModel):
    name: str
    age: int
    tags: list[str]
    address: Address
    nickname: str | None = None


def test_pydantic_model_by_import_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = f"br_models_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(
        "from pydantic import BaseModel\n"
        "class Tag(BaseModel):\n    label: str\n"
        "class Answer(BaseModel):\n    tag: Tag\n    count: int\n    ratio: float | None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    s = load({"pydantic": f"{module}:Answer", "expand": True})
    assert s.schema == sys.modules[module].Answer.model_json_schema()
    assert "$defs" in s.schema  # the nested model is a $ref the validator must resolve
    fields = {f.name: f.type for f in s.result_fields()}
    assert fields == {"parsed": pa.string(), "tag": pa.string(), "count": pa.int64(),
                      "ratio": pa.float64()}
    out = s.check(answer('{"tag": {"label": "x"}, "count": 2, "ratio": null}'))
    assert out == {"parsed": '{"tag":{"label":"x"},"count":2,"ratio":null}',
                   "tag": '{"label":"x"}', "count": 2, "ratio": None}
    with pytest.raises(RetryableError, match=r"\$\.tag"):
        s.check(answer('{"tag": {"name": "x"}, "count": 2, "ratio": 1.0}'))


def test_bad_inputs_are_one_line_spec_errors(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    where = "response_format.json_schema"
    assert "no such file" in spec_error({"json_schema": "missing.json"}, tmp_path)
    assert "not valid JSON/YAML" in spec_error({"json_schema": "broken.json"}, tmp_path)
    assert "is a mapping" in spec_error({"json_schema": "list.yaml"}, tmp_path)
    bad = spec_error({"json_schema": {"type": "strnig"}})
    assert bad.startswith(f"{where}: not a valid JSON Schema at $.type")
    assert "$ref" in spec_error({"json_schema": {"$ref": "#/$defs/Nope"}})
    assert "$ref" in spec_error({"json_schema": {"$ref": "https://example.com/s.json"}})
    for ref, why in (("no_colon", "package.module:Model"),
                     ("no_such_module_xyz:Model", "cannot import"),
                     ("json:Model", "no pydantic model")):
        msg = spec_error({"pydantic": ref})
        assert msg.startswith("response_format.pydantic: ") and why in msg


def test_expand_refuses_to_overwrite_result_columns() -> None:
    schema = {"type": "object", "properties": {"status": {"type": "string"}}}
    assert "'status'" in spec_error({"json_schema": schema, "expand": True})
    carry = {"type": "object", "properties": {"topic": {"type": "string"}}}
    assert "'topic'" in spec_error({"json_schema": carry, "expand": True},
                                   carry_columns=["topic"])
    assert load({"json_schema": schema}).result_fields() == [pa.field("parsed", pa.string())]


def test_strict_problems_are_reported_not_rewritten() -> None:
    loose = {"type": "object", "properties": {"a": {"type": "string"}}}
    s = load({"json_schema": loose})
    assert len(s.strict_problems()) == 2 and s.request_fields()[
        "response_format"]["json_schema"]["schema"] == loose
    assert load({"json_schema": loose, "strict": False}).strict_problems() == []


# --- the answer check -----------------------------------------------------------------------


def test_check_valid_truncated_not_json_and_schema_violation() -> None:
    s = load({"json_schema": PERSON})
    good = instance_for(PERSON, 7)
    assert s.check(answer(json.dumps(good, indent=2))) == {
        "parsed": json.dumps(good, separators=(",", ":"))}
    cases = [
        (answer(json.dumps(good), "length"), "truncated answer (finish_reason: length)"),
        (answer('{"name": "abc", '), "answer is not JSON"),
        (answer(None), "no answer text"),
        (answer(json.dumps({**good, "age": "old"})), "breaks the schema at $.age"),
        (answer(json.dumps({k: v for k, v in good.items() if k != "tags"})), "'tags'"),
        (answer(json.dumps({**good, "address": {"town": "x"}})), "$.address"),
    ]
    for completion, text in cases:
        with pytest.raises(RetryableError) as info:
            s.check(completion)
        assert info.value.error_type == "invalid_output"
        assert text in str(info.value)


def test_expanded_columns_are_typed_and_values_fit() -> None:
    s = load({"json_schema": PERSON, "expand": True})
    types = {f.name: f.type for f in s.result_fields()}
    assert types == {
        "parsed": pa.string(), "name": pa.string(), "age": pa.int64(), "score": pa.float64(),
        "member": pa.bool_(), "mood": pa.string(), "tags": pa.list_(pa.string()),
        "address": pa.string(), "nickname": pa.string()}
    rows = [s.check(answer(json.dumps(instance_for(PERSON, seed)))) for seed in range(50)]
    rows.append(s.check(answer(json.dumps({**instance_for(PERSON, 1), "score": 1}))))
    table = pa.Table.from_pylist(rows, schema=pa.schema(s.result_fields()))
    assert table.num_rows == 51 and table.column("score").to_pylist()[-1] == 1.0
    assert json.loads(table.column("address")[0].as_py())["city"]
    full = result_schema(None, extra=s.result_fields())
    assert full.field("age").type == pa.int64() and full.names[-1] == "nickname"


def test_expand_maps_arrays_enums_and_unions() -> None:
    schema = {"type": "object", "properties": {
        "ints": {"type": "array", "items": {"type": "integer"}},
        "objs": {"type": "array", "items": {"type": "object"}},
        "level": {"enum": [1, 2, 3]},
        "mixed": {"enum": ["a", 1]},
        "either": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
        "maybe": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
        "anything": {}}}
    s = load({"json_schema": schema, "expand": True})
    types = {f.name: f.type for f in s.result_fields()}
    assert types["ints"] == pa.list_(pa.int64()) and types["objs"] == pa.string()
    assert types["level"] == pa.int64() and types["mixed"] == pa.string()
    assert types["either"] == pa.string() and types["maybe"] == pa.bool_()
    row = s.check(answer('{"ints": [1, 2.0], "objs": [{}], "mixed": 1, "either": 3,'
                         ' "anything": [1]}'))
    assert row["ints"] == [1, 2] and row["objs"] == "[{}]" and row["either"] == "3"
    assert row["maybe"] is None and row["anything"] == "[1]"
    pa.Table.from_pylist([row], schema=pa.schema(s.result_fields()))


def test_structured_survives_pickling_for_ray_workers() -> None:
    s = load({"json_schema": PERSON, "expand": True})
    s.check(answer(json.dumps(instance_for(PERSON, 1))))  # builds the validator
    copy = pickle.loads(pickle.dumps(s))
    with pytest.raises(RetryableError):
        copy.check(answer('{"name": 1}'))
    assert copy.result_fields() == s.result_fields()


# --- the simulated provider's instances -----------------------------------------------------

SCHEMAS: list[dict[str, Any]] = [
    PERSON,
    {"type": "string", "minLength": 5, "maxLength": 8},
    {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 13},
    {"type": "integer", "minimum": -50, "multipleOf": 7},
    {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.25},
    {"type": "array", "items": {"enum": ["a", "b", "c", "d"]}, "minItems": 2, "maxItems": 4,
     "uniqueItems": True},
    {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "boolean"}],
     "items": False},
    {"type": "object", "properties": {"x": {"const": 3}, "y": {"type": "null"}},
     "minProperties": 2},
    {"type": "object", "properties": {"when": {"type": "string", "format": "date-time"},
                                      "id": {"type": "string", "format": "uuid"}},
     "required": ["when", "id"]},
    {"$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}},
        "required": ["v", "next"]}}, "$ref": "#/$defs/node"},
    {"allOf": [{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
               {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}]},
    {"type": "object", "properties": {"deep": {"type": "object", "properties": {
        "deeper": {"type": "array", "items": {"type": "object", "properties": {
            "n": {"type": "number", "maximum": -1}}, "required": ["n"]}, "minItems": 1}},
        "required": ["deeper"]}}, "required": ["deep"]},
    Person.model_json_schema(),
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=[str(i) for i in range(len(SCHEMAS))])
def test_generated_instances_validate(schema: dict[str, Any]) -> None:
    v = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    seen = set()
    for seed in range(300):
        value = instance_for(schema, seed)
        errors = [e.message for e in v.iter_errors(value)]
        assert not errors, (seed, value, errors)
        assert instance_for(schema, seed) == value  # deterministic
        seen.add(json.dumps(value, sort_keys=True))
        bad = invalid_instance(schema, seed)
        if bad is not None:
            assert not v.is_valid(bad), (seed, bad)
        with pytest.raises(ValueError):
            json.loads(broken_json(json.dumps(value)))
    assert len(seen) > 1 or "const" in json.dumps(schema)


def test_invalid_instances_exist_for_objects_and_scalars() -> None:
    for schema in (PERSON, SCHEMAS[1], SCHEMAS[2], Person.model_json_schema()):
        assert all(invalid_instance(schema, seed) is not None for seed in range(50))


def test_draw_fate_shares() -> None:
    rng = random.Random(1)
    fates = [draw_fate(rng.random(), 0.2, 0.1) for _ in range(20_000)]
    for fate, share in (("broken_json", 0.1), ("schema_violation", 0.1), ("truncated", 0.1)):
        assert abs(fates.count(fate) / len(fates) - share) < 0.01


def test_structured_answer_fates_and_token_cap() -> None:
    def count(text: str) -> int:
        return len(text)  # one token per character: easy to check the cap

    v = jsonschema.Draft202012Validator(PERSON)
    text, n, finish = structured_answer(PERSON, 3, "ok", 10_000, count)
    assert v.is_valid(json.loads(text)) and n == len(text) and finish == "stop"
    bad, _, finish = structured_answer(PERSON, 3, "schema_violation", 10_000, count)
    assert not v.is_valid(json.loads(bad)) and finish == "stop"
    with pytest.raises(ValueError):
        json.loads(structured_answer(PERSON, 3, "broken_json", 10_000, count)[0])
    cut, n, finish = structured_answer(PERSON, 3, "truncated", 10_000, count)
    assert finish == "length" and text.startswith(cut) and len(cut) < len(text)
    capped, n, finish = structured_answer(PERSON, 3, "ok", 20, count)
    assert (capped, n, finish) == (text[:20], 20, "length")


def test_protocol_parses_response_format_like_openai() -> None:
    messages = [{"role": "user", "content": "x"}]
    base = {"model": MODEL, "messages": messages, "max_tokens": 9}
    rf = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    chat = parse_chat_request({**base, "response_format": rf})
    assert chat.json_schema() == PERSON
    assert parse_chat_request(base).json_schema() is None
    for bad in ({"type": "xml"}, {"type": "json_schema"},
                {"type": "json_schema", "json_schema": {"name": "p", "schema": [1]}}):
        with pytest.raises(BadRequest):
            parse_chat_request({**base, "response_format": bad})
    plain = ChatRequest(MODEL, messages, 9)
    assert answer_request(plain)[0].split()[0].isalpha()  # plain words, as before
    text, _, _ = answer_request(ChatRequest(MODEL, messages, 400, rf))
    assert jsonschema.Draft202012Validator(PERSON).is_valid(json.loads(text))


def test_config_flags_round_trip() -> None:
    cfg = MockConfig(invalid_json_rate=0.05, truncate_rate=0.01)
    assert MockConfig.from_argv(cfg.to_argv()) == cfg
    assert "--invalid-json-rate" in cfg.to_argv()
    with pytest.raises(ValueError):
        MockConfig(invalid_json_rate=0.8, truncate_rate=0.5)


# --- end to end over loopback HTTP -----------------------------------------------------------


async def _grant_all(costs: list[float], *_budget: Any) -> LeaseAnswer:
    # Grants every slot at once. *_budget absorbs the budget arguments (USD reservations,
    # settlements) that newer PermitPool versions pass along; this test needs none.
    now = time.monotonic()
    return LeaseAnswer(now=now, starts=[now] * len(costs), retry_at=None, paused_until=0.0)


async def _run_rows(base_url: str, s: Structured, n: int, attempts: int) -> list[dict[str, Any]]:
    spec = job({"json_schema": s.schema}, retry={"max_attempts": attempts,
               "backoff_base_s": 0.001, "backoff_cap_s": 0.01})
    endpoint = EndpointSpec(base_url=base_url)  # type: ignore[call-arg]
    async with open_session(endpoint, 32) as session:
        permits = PermitPool(_grant_all, validity=60.0)
        runner = RowRunner(spec, ApiClient(session, endpoint, None), permits,
                           pause_all=permits.pause, structured=s)
        rows = [RequestRow(f"r{i}", [{"role": "user", "content": f"item {i}"}])
                for i in range(n)]
        records = await asyncio.gather(*(runner.run(r) for r in rows))
    # None would mean "left unsent" (a budget refusal); without a budget no row may be
    done = [r for r in records if r is not None]
    assert len(done) == n
    return done


def test_row_runner_end_to_end_with_invalid_answers() -> None:
    s = load({"json_schema": PERSON, "expand": True})
    v = jsonschema.Draft202012Validator(PERSON)
    config = MockConfig(invalid_json_rate=0.05, truncate_rate=0.02, seed=3)
    with start_in_thread(config) as server:
        records = asyncio.run(_run_rows(server.base_url, s, 200, attempts=4))
        stats = server.stats()
    assert sorted(r["id"] for r in records) == sorted(f"r{i}" for i in range(200))
    for r in records:
        if r["status"] == "ok":
            parsed = json.loads(r["parsed"])
            assert v.is_valid(parsed) and r["age"] == parsed["age"]
        else:
            assert (r["error_type"], r["attempts"]) == ("invalid_output", 4), r
    retried = sum(r["attempts"] for r in records) - len(records)
    assert retried >= 5  # ~7% of 200 answers were spoiled; each was retried
    assert stats["total_requests"] == sum(r["attempts"] for r in records)
    ok = [r for r in records if r["status"] == "ok"]
    pa.Table.from_pylist(ok, schema=result_schema(None, extra=s.result_fields()))


def test_rows_end_invalid_output_when_every_answer_is_bad() -> None:
    s = load({"json_schema": PERSON})
    with start_in_thread(MockConfig(invalid_json_rate=0.5, truncate_rate=0.5)) as server:
        records = asyncio.run(_run_rows(server.base_url, s, 20, attempts=3))
    assert {(r["status"], r["error_type"], r["attempts"]) for r in records} == {
        ("error", "invalid_output", 3)}


def test_official_openai_client_accepts_json_schema_answers() -> None:
    with start_in_thread(MockConfig()) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0, timeout=10)
        rf = load({"json_schema": PERSON}).request_fields()["response_format"]
        result = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "who?"}],
            response_format=rf, max_tokens=400)
        assert jsonschema.Draft202012Validator(PERSON).is_valid(
            json.loads(result.choices[0].message.content or ""))
        parsed = client.chat.completions.parse(
            model=MODEL, messages=[{"role": "user", "content": "who?"}],
            response_format=Address, max_tokens=400)
        assert isinstance(parsed.choices[0].message.parsed, Address)


def test_invalid_output_row_keeps_the_last_answer_it_paid_for() -> None:
    s = load({"json_schema": PERSON})
    v = jsonschema.Draft202012Validator(PERSON)
    with start_in_thread(MockConfig(invalid_json_rate=0.5, truncate_rate=0.5, seed=5)) as server:
        records = asyncio.run(_run_rows(server.base_url, s, 30, attempts=2))
    assert {(r["status"], r["error_type"]) for r in records} == {("error", "invalid_output")}
    kinds = set()
    for r in records:
        text = r["response"]
        assert text, r  # the refused answer is kept, beside the reason it was refused
        assert r["completion_tokens"] > 0 and r["finish_reason"] is not None
        if r["finish_reason"] == "length":
            kinds.add("truncated")
            assert "truncated" in r["error_message"]
            continue
        try:
            value = json.loads(text)
        except ValueError:
            kinds.add("not json")
            assert "not JSON" in r["error_message"]
            continue
        kinds.add("breaks schema")
        assert not v.is_valid(value) and "breaks the schema" in r["error_message"]
    assert kinds == {"truncated", "not json", "breaks schema"}
    # and it fits the results schema (response is a column of every row)
    pa.Table.from_pylist(records, schema=result_schema(None, extra=s.result_fields()))
