"""A row's columns -> its request payload (or its own error): templates, images, the kind.

The reader (``shards.iter_shard_rows``) reads the columns ``RowBuilder.columns`` names
and asks ``payload`` per row: the prompt is the prompt column's text or the rendered
``prompt_template``; the request kind builds its messages (``system_prompt`` first,
rendered per row when it is a template); ``image_column`` adds an image part to the
last user message. Rendered text is what the kind counts, so TPM and budgets count it.
"""

from __future__ import annotations

from typing import Any

from batchrun.api.images import image_part
from batchrun.api.registry import kind_for
from batchrun.api.templates import Templates
from batchrun.io.formats import ERROR_COLUMN
from batchrun.spec import JobSpec

__all__ = ["RowBuilder"]


class RowBuilder:
    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.kind = kind_for(spec)
        self.templates = Templates.of(spec)
        self.source = spec.prompt_column or spec.messages_column
        named = [self.source, spec.image_column, *(self.templates.columns
                                                   if self.templates else [])]
        self.columns = list(dict.fromkeys(c for c in named if c is not None))

    def payload(self, data: dict[str, list[Any]], j: int) -> tuple[Any, str | None]:
        bad = data.get(ERROR_COLUMN)
        if bad is not None and bad[j] is not None:  # a JSONL line that is no row (formats.py)
            return None, bad[j]
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
