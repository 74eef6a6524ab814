"""The result record: the columns every row's result has, in online and batch mode alike.

A request kind fills ``response``, ``finish_reason`` and the token counts from its
answer (``protocols.Completion``); the modes add status, attempts, timings and cost.
Mode-specific fields (``batch_id``, structured outputs' ``parsed``) and the carried input
columns follow the fixed ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["RESULT_FIELDS", "records_table", "result_schema", "warm_arrow"]

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


def records_table(recs: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """The Arrow table of result records (keys not in ``schema`` are left out).

    A vector column (an embedding: ``fixed_size_list<float32>``) is built from its rows'
    arrays in one copy: row by row through ``from_pylist`` it would cost more than all
    the rest of a worker's work on the row (embeddings move tens of thousands a second).
    """
    fixed = {f.name for f in schema if pa.types.is_fixed_size_list(f.type)}
    if not fixed:
        return pa.Table.from_pylist(recs, schema=schema)
    bulk = {f.name: col for f in schema if f.name in fixed
            if (col := _vector_column([r.get(f.name) for r in recs], f.type)) is not None}
    # a vector of another shape or type: as a variable list, then cast (which names it)
    loose = pa.schema([f.with_type(pa.list_(f.type.value_type)) if f.name in fixed else f
                       for f in schema if f.name not in bulk])
    table = pa.Table.from_pylist(recs, schema=loose)
    return pa.Table.from_arrays(
        [bulk[f.name] if f.name in bulk else
         table.column(f.name).cast(f.type) if f.name in fixed else table.column(f.name)
         for f in schema], schema=schema)


def _vector_column(values: list[Any], typ: pa.FixedSizeListType) -> pa.Array | None:
    """``values`` (float arrays of the list size, or None) as one column; None when some
    value is of another shape or type (then ``from_pylist`` decides, and names it)."""
    if not pa.types.is_floating(typ.value_type):
        return None
    size = typ.list_size
    missing = np.fromiter((v is None for v in values), dtype=bool, count=len(values))
    present = [v for v in values if v is not None]
    if not all(isinstance(v, np.ndarray) and v.shape == (size,) for v in present):
        return None
    # not to_pandas_dtype(): it imports pandas, a second or two of a worker's CPU
    dense = np.zeros((len(values), size), dtype=f"<f{typ.value_type.bit_width // 8}")
    if present:
        dense[~missing] = np.stack(present)
    return pa.FixedSizeListArray.from_arrays(pa.array(dense.reshape(-1)), size,
                                             mask=pa.array(missing) if missing.any() else None)


def warm_arrow() -> None:
    """Pay at set-up what pyarrow pays at its first array from Python objects: it imports
    pandas when installed (a fraction of a second of CPU, seconds on a busy node), which
    would otherwise stall the first table of results."""
    pa.array([])
