"""A row's columns -> its request payload (or its own error): templates, images, the kind.

The reader (``shards.iter_shard_rows``) reads the columns ``RowBuilder.columns`` names
and asks ``payload`` per row: the prompt is the prompt column's text or the rendered
``prompt_template``; the request kind builds its messages (``system_prompt`` first,
rendered per row when it is a template); ``image_column`` adds an image part to the
last user message. Rendered text is what the kind counts, so TPM and budgets count it.
"""

from __future__ import annotations

from typing import Any

import orjson

from batchrun.api.images import image_part
from batchrun.api.rawbody import RawBody, is_raw_input
from batchrun.api.registry import kind_for
from batchrun.api.templates import Templates
from batchrun.errors import InputDataError
from batchrun.io.formats import BATCH_FILE_SCHEMA, ERROR_COLUMN
from batchrun.spec import JobSpec

__all__ = ["RowBuilder", "check_batch_file", "first_url"]


def first_url(pf: Any) -> str | None:
    """The url of a batch file's first line (None if it has none)."""
    if pf.schema_arrow.names != BATCH_FILE_SCHEMA.names:
        return None
    for batch in pf.iter_batches(batch_size=1, columns=["url"]):
        return str(batch.column(0)[0].as_py()) if batch.num_rows else None
    return None


def check_batch_file(spec: JobSpec, path: str, schema: Any, first_url: str | None) -> None:
    """A spec with no prompt source runs OpenAI batch input files: ``path`` must be one,
    asking for the task's endpoint (checked on its first line; every line is checked
    again when read, as that row's error)."""
    if schema.names != BATCH_FILE_SCHEMA.names:
        raise InputDataError(f"input: {path}: not an OpenAI batch input file ({{custom_id, "
                             "method, url, body}} lines); or name the prompt with "
                             "prompt_column, messages_column or prompt_template")
    want = "/v1" + kind_for(spec).path
    if first_url is not None and first_url != want:
        raise InputDataError(f"input: {path}: its lines ask for {first_url}, and task: "
                             f"{spec.task} sends {want}; set the task that matches the file")


class RowBuilder:
    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.kind = kind_for(spec)
        self.templates = Templates.of(spec)
        self.source = spec.prompt_column or spec.messages_column
        named = [self.source, spec.image_column, *(self.templates.columns
                                                   if self.templates else [])]
        self.raw = is_raw_input(spec)  # the lines of an OpenAI batch input file
        if self.raw:
            named = ["custom_id", "method", "url", "body"]
        self.columns = list(dict.fromkeys(c for c in named if c is not None))
        # a batch file's custom_id is the row's id
        self.id_column = spec.id_column or ("custom_id" if self.raw else None)
        self._url = "/v1" + self.kind.path

    def row_id(self, data: dict[str, list[Any]], j: int, default: str) -> str:
        """The row's id: its id column's value, else ``default`` (file#position); a batch
        file line without a custom_id (not JSON) gets the default."""
        if self.id_column is None:
            return default
        value = data[self.id_column][j]
        return default if value is None and self.raw else str(value)

    def payload(self, data: dict[str, list[Any]], j: int) -> tuple[Any, str | None]:
        bad = data.get(ERROR_COLUMN)
        if bad is not None and bad[j] is not None:  # a JSONL line that is no row (formats.py)
            return None, bad[j]
        if self.raw:
            return self._raw(data, j)
        t = self.templates
        if t is None and self.spec.image_column is None:  # the plain path: as before
            assert self.source is not None
            return self.kind.payload(self.spec, data[self.source][j])
        row = {c: data[c][j] for c in self.columns} if t else {}
        if t is not None and t.has_prompt:
            value, err = t.prompt(row)
            if err is not None:
                return None, err
        else:
            assert self.source is not None
            value = data[self.source][j]
        msgs, err = self.kind.payload(self.spec, value)
        if msgs is None:
            return None, err
        if t is not None and t.has_system:
            system, err = t.system(row)
            if err is not None:
                return None, err
            msgs = [{**m, "content": system} if m.get("role") == "system" else m for m in msgs]
        if self.spec.image_column is not None:
            return self._with_image(msgs, data[self.spec.image_column][j])
        return msgs, None

    def _raw(self, data: dict[str, list[Any]], j: int) -> tuple[Any, str | None]:
        url, method, body = data["url"][j], data["method"][j], data["body"][j]
        if url != self._url:
            return None, (f"url {url} does not match task: {self.spec.task} ({self._url})")
        if method not in (None, "POST"):
            return None, f"method {method}: only POST lines can be sent"
        doc = orjson.loads(body) if body is not None else None
        if not isinstance(doc, dict):
            return None, "body is not a JSON object"
        return RawBody(doc), None

    def _with_image(self, msgs: list[dict[str, Any]], value: Any
                    ) -> tuple[Any, str | None]:
        part, err = image_part(value)
        if part is None:
            return None, err
        users = [i for i, m in enumerate(msgs) if m.get("role") == "user"]
        if not users:
            return None, "image_column: no user message to add the image to"
        i = users[-1]
        content = msgs[i]["content"]
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        msgs = list(msgs)
        msgs[i] = {**msgs[i], "content": [*parts, part]}
        return msgs, None
