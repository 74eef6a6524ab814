"""Structured outputs: ask for JSON matching a JSON Schema, validate each answer, retry.

``Structured.from_spec`` loads the schema named by ``response_format`` (inline, a JSON
or YAML file next to the job spec, or a pydantic model's ``model_json_schema()``) and
checks that it is a valid JSON Schema with the validator of its ``$schema`` (Draft
2020-12 by default), so a broken schema fails before anything is sent.

Per row, ``request_fields()`` is added to the request body and ``check(completion)``
judges the answer: a cut-off answer (finish_reason "length"), text that is not JSON,
or JSON that breaks the schema raises ``RetryableError(error_type="invalid_output")``,
so the engine retries it like a 5xx and records ``invalid_output`` when attempts run
out. A valid answer adds ``parsed`` (compact JSON) and, with ``expand``, one typed
column per top-level property.

OpenAI's strict mode (``strict: true``, the default) only accepts a subset of JSON
Schema: every object needs ``additionalProperties: false`` and must list all its
properties in ``required`` (an optional field is written as ``"type": [T, "null"]``).
The schema is sent as written, never rewritten, because a silent rewrite would change
what "valid" means; ``strict_problems()`` lists what such a provider will reject, so
the caller can warn. ``format`` is an annotation, not checked (JSON Schema's default).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import jsonschema
import pyarrow as pa
import yaml
from jsonschema.exceptions import best_match
from jsonschema.validators import validator_for

from batchrun.api.protocols import Completion
from batchrun.api.records import RESULT_FIELDS
from batchrun.errors import RetryableError, SpecError
from batchrun.spec import JobSpec, ResponseFormatSpec

__all__ = ["INVALID_OUTPUT", "Structured", "arrow_type"]

INVALID_OUTPUT = "invalid_output"
_MAX_MESSAGE = 400  # a validator message quotes the instance; keep error_message short
_SCALARS: dict[str, pa.DataType] = {
    "string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_(),
}


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# --- loading ------------------------------------------------------------------------


def _read_schema_file(ref: str, base_dir: Path) -> Any:
    path = Path(ref).expanduser()
    path = path if path.is_absolute() else base_dir / path
    where = "response_format.json_schema"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"{where}: no such file {path}; give a path relative to the job "
                        "spec's folder, or the schema inline") from None
    except OSError as e:
        raise SpecError(f"{where}: cannot read {path} ({e.strerror}); fix its permissions") from e
    try:
        # JSON first for .json files: YAML rejects tabs that JSON allows
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise SpecError(f"{where}: {path} is not valid JSON/YAML "
                        f"({_one_line(str(e))[:200]}); fix the file") from None


def _import_model_schema(ref: str) -> Any:
    where = "response_format.pydantic"
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise SpecError(f"{where}: {ref!r} is not of the form package.module:Model; "
                        "write it like myproject.schemas:Answer")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any error raised by the user's module on import
        raise SpecError(f"{where}: cannot import {module_name} ({type(e).__name__}: "
                        f"{_one_line(str(e))[:200]}); install it or fix PYTHONPATH") from None
    model = getattr(module, attr, None)
    if not hasattr(model, "model_json_schema"):
        raise SpecError(f"{where}: {module_name} has no pydantic model {attr!r}; "
                        "name a pydantic.BaseModel subclass")
    try:
        return model.model_json_schema()  # type: ignore[union-attr]
    except Exception as e:  # pydantic cannot express some types in JSON Schema
        raise SpecError(f"{where}: {ref}.model_json_schema() failed ({type(e).__name__}: "
                        f"{_one_line(str(e))[:200]}); use JSON-compatible field types") from None


def _load_schema(rf: ResponseFormatSpec, base_dir: Path) -> tuple[dict[str, Any], str]:
    """The schema and the spec field it came from (for error messages)."""
    if rf.pydantic is not None:
        schema, where = _import_model_schema(rf.pydantic), "response_format.pydantic"
    elif isinstance(rf.json_schema, str):
        schema = _read_schema_file(rf.json_schema, base_dir)
        where = "response_format.json_schema"
    else:
        schema, where = rf.json_schema, "response_format.json_schema"
    if not isinstance(schema, dict):
        raise SpecError(f"{where}: a JSON Schema is a mapping (type:, properties:, ...), "
                        f"not {type(schema).__name__}; fix the schema")
    cls = validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise SpecError(f"{where}: not a valid JSON Schema at {e.json_path}: "
                        f"{_one_line(e.message)[:200]}; fix the schema") from None
    _check_refs(schema, schema, where)
    return schema, where


def _check_refs(node: Any, root: dict[str, Any], where: str) -> None:
    """Every ``$ref`` must point inside the schema: one that cannot be resolved would
    otherwise fail on the first answer, in a worker, instead of here."""
    if isinstance(node, list):
        for item in node:
            _check_refs(item, root, where)
        return
    if not isinstance(node, dict):
        return
    ref = node.get("$ref")
    if isinstance(ref, str):
        target: Any = root
        for part in filter(None, ref[1:].split("/")) if ref.startswith("#") else [None]:
            key = part.replace("~1", "/").replace("~0", "~") if part else None
            if not isinstance(target, dict) or key not in target:
                raise SpecError(f"{where}: $ref {ref!r} does not point inside the schema; "
                                "put the definition under $defs and refer to #/$defs/<name>")
            target = target[key]
    for value in node.values():
        _check_refs(value, root, where)


# --- Arrow columns for expand ---------------------------------------------------------


def _resolve(schema: Any, root: dict[str, Any]) -> Any:
    """Follow a local ``$ref`` and unwrap ``anyOf``/``oneOf`` of one type plus null."""
    for _ in range(16):  # a chain of refs, bounded so a cycle cannot hang us
        if not isinstance(schema, dict):
            return schema
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            node: Any = root
            for part in filter(None, ref[1:].split("/")):
                node = node.get(part.replace("~1", "/").replace("~0", "~"), {}) \
                    if isinstance(node, dict) else {}
            schema = node
            continue
        branches = schema.get("anyOf") or schema.get("oneOf")
        if isinstance(branches, list):
            real = [b for b in branches if not (isinstance(b, dict) and b.get("type") == "null")]
            if len(real) == 1:
                schema = real[0]
                continue
        return schema
    return schema


def _scalar_kind(schema: Any) -> str | None:
    """"string" | "integer" | "number" | "boolean" when the schema admits only that type."""
    if not isinstance(schema, dict):
        return None
    values = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if values is not None:
        kinds = {_json_kind(v) for v in values if v is not None}
        kind = kinds.pop() if len(kinds) == 1 else None
        return kind if kind in _SCALARS else None
    t = schema.get("type")
    types = [t] if isinstance(t, str) else [x for x in t or [] if x != "null"]
    return types[0] if len(types) == 1 and types[0] in _SCALARS else None


def _json_kind(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    return {float: "number", str: "string"}.get(type(v), "json")


def _column_kind(prop: Any, root: dict[str, Any]) -> str:
    """How a property is stored: a scalar kind, "list:<scalar kind>", or "json" text."""
    prop = _resolve(prop, root)
    kind = _scalar_kind(prop)
    if kind is not None:
        return kind
    t = prop.get("type") if isinstance(prop, dict) else None
    types = [t] if isinstance(t, str) else [x for x in t or [] if x != "null"]
    if types == ["array"] and "prefixItems" not in prop:
        item = _scalar_kind(_resolve(prop.get("items"), root))
        if item is not None:
            return f"list:{item}"
    return "json"


def arrow_type(kind: str) -> pa.DataType:
    """The Arrow type of a column kind made by ``_column_kind``."""
    if kind.startswith("list:"):
        return pa.list_(_SCALARS[kind[5:]])
    return _SCALARS.get(kind, pa.string())


def _convert(value: Any, kind: str) -> Any:
    """A validated JSON value as the Python value its Arrow column holds."""
    if value is None:
        return None
    if kind == "json":
        return _compact(value)
    if kind.startswith("list:"):
        return [_convert(v, kind[5:]) for v in value]
    if kind == "integer":
        return int(value)  # JSON Schema counts 3.0 as an integer
    if kind == "number":
        return float(value)
    return value


# --- the object the worker uses ---------------------------------------------------------


class Structured:
    """One job's structured-output settings: request fields, answer check, result columns."""

    def __init__(self, schema: dict[str, Any], *, name: str = "answer", strict: bool = True,
                 expand: bool = False, reserved: frozenset[str] = frozenset()):
        self.schema = schema
        self.name = name
        self.strict = strict
        self.columns: dict[str, str] = {}  # property -> column kind, in schema order
        root = _resolve(schema, schema)
        props = root.get("properties") if isinstance(root, dict) else None
        if expand and isinstance(props, dict):
            for prop, sub in props.items():
                if prop in reserved:
                    raise SpecError(
                        f"response_format.expand: property {prop!r} would overwrite the "
                        f"result column {prop!r}; rename the property or set expand: false")
                self.columns[prop] = _column_kind(sub, schema)
        self._validator: Any = None

    @classmethod
    def from_spec(cls, spec: JobSpec, base_dir: str | Path) -> Structured | None:
        """The job's structured-output settings, or None without ``response_format``."""
        rf = spec.response_format
        if rf is None:
            return None
        schema, _ = _load_schema(rf, Path(base_dir))
        reserved = {f.name for f in RESULT_FIELDS} | {"parsed"} | set(spec.carry_columns)
        return cls(schema, name=rf.name, strict=rf.strict, expand=rf.expand,
                   reserved=frozenset(reserved))

    def __getstate__(self) -> dict[str, Any]:
        # The compiled validator stays behind when shipped to a Ray worker; it is rebuilt.
        return {**self.__dict__, "_validator": None}

    @property
    def validator(self) -> Any:
        """The schema's validator, built once (compiling refs is not free per row)."""
        if self._validator is None:
            cls = validator_for(self.schema, default=jsonschema.Draft202012Validator)
            self._validator = cls(self.schema)
        return self._validator

    def request_fields(self) -> dict[str, Any]:
        """Body fields for every request: OpenAI's ``response_format`` of type json_schema."""
        return {"response_format": {"type": "json_schema", "json_schema": {
            "name": self.name, "schema": self.schema, "strict": self.strict}}}

    def check(self, completion: Completion) -> dict[str, Any]:
        """Extra result fields of a valid answer; raises ``RetryableError`` otherwise."""
        if completion.finish_reason == "length":
            raise RetryableError("truncated answer (finish_reason: length)",
                                 error_type=INVALID_OUTPUT)
        if completion.text is None:
            raise RetryableError(f"no answer text (finish_reason: {completion.finish_reason})",
                                 error_type=INVALID_OUTPUT)
        try:
            value = json.loads(completion.text)
        except ValueError as e:
            raise RetryableError(f"answer is not JSON: {e}", error_type=INVALID_OUTPUT) from None
        error = best_match(self.validator.iter_errors(value))
        if error is not None:
            message = f"answer breaks the schema at {error.json_path}: {_one_line(error.message)}"
            raise RetryableError(message[:_MAX_MESSAGE], error_type=INVALID_OUTPUT)
        fields: dict[str, Any] = {"parsed": _compact(value)}
        if self.columns:
            # a schema with properties but no "type: object" also admits non-objects
            obj = value if isinstance(value, dict) else {}
            fields.update({prop: _convert(obj.get(prop), kind)
                           for prop, kind in self.columns.items()})
        return fields

    def result_fields(self) -> list[pa.Field]:
        """``parsed`` and the expanded columns, for ``writer.result_schema(extra=...)``."""
        return [pa.field("parsed", pa.string())] + [
            pa.field(prop, arrow_type(kind)) for prop, kind in self.columns.items()]

    def strict_problems(self) -> list[str]:
        """Where the schema breaks OpenAI's strict-mode rules (empty when not strict)."""
        if not self.strict:
            return []
        problems: list[str] = []
        _strict_walk(self.schema, "$", problems)
        return problems


def _strict_walk(node: Any, path: str, out: list[str]) -> None:
    if isinstance(node, list):
        for i, item in enumerate(node):
            _strict_walk(item, f"{path}[{i}]", out)
        return
    if not isinstance(node, dict):
        return
    props = node.get("properties")
    if isinstance(props, dict):
        if node.get("additionalProperties") is not False:
            out.append(f"{path}: strict mode needs additionalProperties: false")
        missing = [p for p in props if p not in node.get("required", [])]
        if missing:
            out.append(f"{path}: strict mode needs every property required, not {missing}")
    for key, sub in node.items():
        if key in ("properties", "$defs", "definitions") and isinstance(sub, dict):
            for name, child in sub.items():
                _strict_walk(child, f"{path}.{key}.{name}", out)
        elif key in ("items", "anyOf", "oneOf", "allOf", "prefixItems"):
            _strict_walk(sub, f"{path}.{key}", out)
