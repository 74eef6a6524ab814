"""Batch input: the job's rows as JSONL request files, streamed from the shards.

Each line is ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}``
with the same body online mode sends. ``custom_id`` is ``s<shard>-<position>``: unique
in the job, and enough to find the row again (with its id and carried columns) by
re-reading its shard, so no row data has to be kept anywhere else.

Chunks respect ``batch.max_requests_per_file`` and ``batch.max_bytes_per_file``; rows
are read a record batch at a time and lines go straight to a staged file (committed
whole by ``storage.Staged``), so no process holds the whole input. Bad rows (no usable
prompt) take no line, but belong to a chunk so that collecting it records their error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from batchrun.api.registry import kind_for, provider_for
from batchrun.batch.state import ChunkState, Ranges, chunk_path, count_rows, to_ranges
from batchrun.errors import InputDataError
from batchrun.io.shards import RequestRow, Shard, iter_shard_rows
from batchrun.io.storage import Staged
from batchrun.spec import JobSpec

__all__ = [
    "ChunkWriter",
    "custom_id",
    "iter_selected",
    "line_for",
    "request_line",
]



def custom_id(shard_index: int, pos: int) -> str:
    return f"s{shard_index}-{pos}"


def request_line(spec: JobSpec, cid: str, payload: Any,
                 extra_body: dict[str, Any] | None = None) -> bytes:
    """One line of a batch input file, in the provider's form, for the spec's request kind."""
    kind = kind_for(spec)
    body = kind.body(spec, payload, {**spec.generation.request_fields(), **(extra_body or {})})
    doc = provider_for(spec).batch_line(cid, kind, body)
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def iter_selected(spec: JobSpec, shard: Shard,
                  runs: list[tuple[int, int]]) -> Iterator[tuple[int, RequestRow]]:
    """(position, row) of the shard's rows inside ``runs`` (sorted [start, stop) ranges)."""
    pos, i = 0, 0
    for rows in iter_shard_rows(spec, shard):
        for row in rows:
            while i < len(runs) and pos >= runs[i][1]:
                i += 1
            if i == len(runs):
                return
            if pos >= runs[i][0]:
                yield pos, row
            pos += 1


class ChunkWriter:
    """One JSONL chunk being written: lines go to a staged file, committed when closed;
    a file that cannot be written is an output error (exit 3), not a traceback."""

    def __init__(self, folder: str | Path, seq: int, attempt: int = 1):
        self.seq, self.attempt = seq, attempt
        self.name = f"chunk-{seq:06d}.jsonl"
        self.path = chunk_path(folder, self.name)  # a store object, staged then committed
        self._f: Staged | None = Staged(self.path)
        self._positions: dict[int, list[int]] = {}
        self.n_requests = 0
        self.n_bytes = 0
        self.n_tokens = 0
        self.worst_usd = 0.0

    def fits(self, spec: JobSpec, line: bytes | None, tokens: int = 0) -> bool:
        """Whether the line fits the file's limits, and a chunk alone fits the batch queue
        quotas (a chunk over a quota could never be created)."""
        if line is None:
            return True
        b = spec.batch
        quota_ok = self.n_requests == 0 or (
            (b.max_enqueued_tokens is None or self.n_tokens + tokens <= b.max_enqueued_tokens)
            and (b.max_enqueued_requests is None or self.n_requests < b.max_enqueued_requests))
        return (self.n_requests < b.max_requests_per_file and quota_ok
                and self.n_bytes + len(line) <= b.max_bytes_per_file)

    def add(self, shard_index: int, pos: int, line: bytes | None, worst_usd: float = 0.0,
            tokens: int = 0) -> None:
        """Add a row; ``line`` None for a bad row (recorded as an error when collected)."""
        assert self._f is not None
        self.worst_usd += worst_usd
        self.n_tokens += tokens
        self._positions.setdefault(shard_index, []).append(pos)
        if line is not None:
            self._f.write(line)
            self.n_requests += 1
            self.n_bytes += len(line)

    @property
    def empty(self) -> bool:
        return not self._positions

    def close(self) -> ChunkState:
        """Commit the file; the chunk's state at step ``written``."""
        assert self._f is not None
        self._f.commit()
        self._f = None
        ranges: Ranges = {s: to_ranges(p) for s, p in self._positions.items()}
        return ChunkState(seq=self.seq, attempt=self.attempt, rows=ranges,
                          n_rows=count_rows(ranges), n_requests=self.n_requests,
                          n_tokens=self.n_tokens, file=self.name, worst_usd=self.worst_usd)

    def discard(self) -> None:
        if self._f is not None:
            self._f.discard()
            self._f = None


def line_for(spec: JobSpec, shard: Shard, pos: int, row: RequestRow,
             extra_body: dict[str, Any] | None) -> bytes | None:
    """The request line of a row, None for a bad row; a row too big alone is an input error."""
    if row.messages is None:
        return None
    line = request_line(spec, custom_id(shard.index, pos), row.messages, extra_body)
    if len(line) > spec.batch.max_bytes_per_file:
        raise InputDataError(
            f"input: {shard.path}: row {row.id} makes a {len(line)}-byte request, over "
            f"batch.max_bytes_per_file ({spec.batch.max_bytes_per_file}); raise it or shorten "
            "the prompt")
    return line
