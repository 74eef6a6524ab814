"""The result record: the columns every row's result has, in online and batch mode alike.

A request kind fills ``response``, ``finish_reason`` and the token counts from its
answer (``protocols.Completion``); the modes add status, attempts, timings and cost.
Mode-specific fields (``batch_id``, structured outputs' ``parsed``) and the carried input
columns follow the fixed ones.
"""

from __future__ import annotations

import pyarrow as pa

__all__ = ["RESULT_FIELDS", "result_schema"]

RESULT_FIELDS: list[pa.Field] = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("model", pa.string()),
    pa.field("response", pa.string()),
    pa.field("finish_reason", pa.string()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
    pa.field("total_tokens", pa.int64()),
    pa.field("cost_usd", pa.float64()),
    pa.field("latency_ms", pa.float64()),
    pa.field("wait_ms", pa.float64()),  # time spent waiting on the rate limiter
    pa.field("attempts", pa.int32()),
    pa.field("status", pa.string()),  # ok | error
    pa.field("error_type", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("started_at", pa.timestamp("ms", tz="UTC")),
    pa.field("finished_at", pa.timestamp("ms", tz="UTC")),
]


def result_schema(carry: pa.Schema | None = None,
                  extra: list[pa.Field] | None = None) -> pa.Schema:
    """The fixed fields, then mode-specific ones (``parsed``, ``batch_id``), then carried ones."""
    fields = list(RESULT_FIELDS) + list(extra or [])
    if carry is not None:
        taken = {x.name for x in fields}
        fields += [pa.field(f.name, f.type) for f in carry if f.name not in taken]
    return pa.schema(fields)
