"""Rows that are the lines of an OpenAI batch input file: ``{custom_id, method, url, body}``.

A spec with no prompt source (no ``prompt_column``, ``messages_column`` or
``prompt_template``) runs such a file (``io/formats.py`` reads it; ``io/rows.py`` turns a
line into a ``RawBody``): each body is sent as written, to the job's task's endpoint,
with two exceptions that keep the job's guarantees: ``model`` is the spec's (the job is
priced, limited and budgeted as that model), and an output limit above
``generation.max_tokens`` is lowered to it (the bound TPM and the budget reserve).
``custom_id`` is the row's id. ``RawBodyKind`` wraps the task's kind: its path, answer
parser and result columns, with the body and the token count of a raw body.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa

from batchrun.api.protocols import Completion, RequestKind, kind_result_fields
from batchrun.api.tokens import count_text_tokens
from batchrun.errors import SpecError
from batchrun.spec import JobSpec

__all__ = ["OUTPUT_LIMITS", "RawBody", "RawBodyKind", "is_raw_input"]

# the body fields that bound output tokens, by API
OUTPUT_LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def is_raw_input(spec: JobSpec) -> bool:
    """Whether the spec runs an OpenAI batch input file (it names no prompt source)."""
    return spec.prompt_column is None and spec.messages_column is None and (
        spec.prompt_template is None)


@dataclass(frozen=True)
class RawBody:
    """A batch file line's body, parsed."""

    body: dict[str, Any]


class RawBodyKind:
    """The task's kind, sending batch-file bodies as written (see the module's docs)."""

    def __init__(self, inner: RequestKind):
        self.inner = inner
        self.task = inner.task
        self.path = inner.path

    def check_spec(self, spec: JobSpec) -> None:
        check = getattr(self.inner, "check_spec", None)
        if check is not None:
            check(spec)
        if spec.image_column is not None:
            raise SpecError("image_column needs a prompt source (prompt_column, "
                            "messages_column or prompt_template), not a batch input file")

    def result_fields(self, spec: JobSpec) -> list[pa.Field]:
        # each body asks for its own vector size: a list, not a fixed-size list
        return [f.with_type(pa.list_(f.type.value_type))
                if pa.types.is_fixed_size_list(f.type) else f
                for f in kind_result_fields(self.inner, spec)]

    def payload(self, spec: JobSpec, value: Any) -> tuple[RawBody | None, str | None]:
        if not isinstance(value, RawBody):
            return None, "not a batch line"
        inputs = value.body.get("input")
        if self.task == "embeddings" and isinstance(inputs, list) and len(inputs) > 1:
            # one line is one row and one result row: N vectors would have nowhere to go
            return None, (f"an embeddings line holds {len(inputs)} inputs; give one input "
                          "per line (its custom_id names its vector)")
        return value, None

    def body(self, spec: JobSpec, payload: RawBody, fields: dict[str, Any]) -> dict[str, Any]:
        body = {**payload.body, "model": spec.model}
        for name in OUTPUT_LIMITS:
            value = body.get(name)
            if isinstance(value, int) and value > spec.generation.max_tokens:
                body[name] = spec.generation.max_tokens
        return body

    def parse(self, doc: Any) -> Completion:
        return self.inner.parse(doc)

    def prompt_tokens(self, payload: RawBody, model: str) -> int:
        # the body's JSON text: more than its prompt's tokens, so a safe bound for TPM
        # and the budget, whatever the API's body looks like
        return count_text_tokens(orjson.dumps(payload.body).decode(), model)
