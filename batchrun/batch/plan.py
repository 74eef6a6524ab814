"""Which rows go into batches: those without a result on disk, whichever mode wrote it.

The results folder (final files and checkpoint parts) is the one resume truth of both
modes; the chunk state only records what is with the provider. So before anything is
sent, the state is brought into agreement with the results:

* ``refresh``: after a forced change of inputs or request fields (``--force``), chunks
  not yet sent hold requests of the old spec: they are dropped and planned again.
* ``reconcile``: an unsent chunk some of whose rows got a result since it was written
  (an online run finished them) is dropped, and its other rows planned again.
* ``plan``: rows with no result, in no open chunk and not left for the online path,
  go into new chunks; an online run's rows are never sent again.

Chunks that a batch already exists for (created, completed) are never touched: they
are paid for, and collecting them is the only way to get what was paid for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from batchrun.api.registry import kind_for
from batchrun.batch.requests import ChunkWriter, iter_selected, line_for
from batchrun.batch.state import (
    OPEN_STEPS,
    UNSENT_STEPS,
    BatchJobState,
    ChunkState,
    chunk_path,
)
from batchrun.io import storage
from batchrun.io.shards import RequestRow, Shard
from batchrun.io.writer import ResultsStore
from batchrun.spec import JobSpec

__all__ = ["Planner", "Row"]

Row = tuple[int, int, RequestRow]  # shard index, position in the shard, the row


class Planner:
    """Chunks of one job's state, kept in agreement with its results on disk."""

    def __init__(self, spec: JobSpec, shards: dict[int, Shard], store: ResultsStore,
                 state: BatchJobState, folder: str | Path, *, extra_body: dict[str, Any] | None,
                 worst: Callable[[RequestRow], float], save: Callable[[], None]):
        self.spec, self.shards, self.store, self.state = spec, shards, store, state
        self.folder, self.extra_body, self.worst, self.save = folder, extra_body, worst, save

    def new_chunks(self, rows: Iterable[Row], attempt: int, redo: bool = False, *,
                   save: bool = True) -> None:
        """``rows`` (streamed) into new JSONL chunks, each saved once it is on disk; with
        ``save=False`` the caller saves them together with its own change."""
        writer: ChunkWriter | None = None
        try:
            for sidx, pos, row in rows:
                line = line_for(self.spec, self.shards[sidx], pos, row, self.extra_body)
                tokens = self._tokens(row)
                if writer is not None and not writer.fits(self.spec, line, tokens):
                    self._record(writer.close(), redo, save)
                    writer = None
                if writer is None:
                    writer = ChunkWriter(self.folder, self.state.next_seq, attempt)
                    self.state.next_seq += 1
                writer.add(sidx, pos, line, self.worst(row), tokens)
            if writer is not None:
                self._record(writer.close(), redo, save)
        except BaseException:
            if writer is not None:
                writer.discard()
            raise

    def _tokens(self, row: RequestRow) -> int:
        """A row's prompt tokens, where a batch queue quota counts them."""
        if self.spec.batch.max_enqueued_tokens is None or row.messages is None:
            return 0
        return kind_for(self.spec).prompt_tokens(row.messages, self.spec.model)

    def _record(self, chunk: ChunkState, redo: bool, save: bool) -> None:
        chunk.redo = redo
        self.state.chunks.append(chunk)
        if save:
            self.save()

    def _drop(self, chunks: list[ChunkState]) -> None:
        """Forget unsent chunks; their rows are planned again. One save does both, so a
        crash leaves each row either in its old chunk or waiting to be planned."""
        gone = {c.seq for c in chunks}
        self.state.chunks = [c for c in self.state.chunks if c.seq not in gone]
        self.save()
        for c in chunks:
            with contextlib.suppress(OSError):  # a leftover file is only untidy
                storage.delete(chunk_path(self.folder, c.file))

    # -- what the results say ----------------------------------------------------------

    def _covered(self, sidx: int) -> list[tuple[int, int]]:
        """Positions of the shard in open chunks or left for the online path, merged."""
        runs = [r for c in self.state.chunks if c.step in OPEN_STEPS
                for r in c.rows.get(sidx, [])]
        runs += self.state.fallback.get(sidx, [])
        merged: list[tuple[int, int]] = []
        for a, b in sorted(runs):
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        return merged

    # -- the three steps ---------------------------------------------------------------

    def refresh(self, job_sha: str) -> None:
        """Chunks written for other inputs or request fields (``--force``, or a state of
        an older batchrun) are dropped if unsent; their rows are planned again."""
        if self.state.job_sha256 == job_sha:
            return
        stale = [c for c in self.state.chunks if c.step in UNSENT_STEPS]
        if stale:
            self._drop(stale)
        self.state.job_sha256 = job_sha
        self.save()

    def reconcile(self) -> None:
        """Unsent chunks holding rows that have a result now (an online run answered
        them), or whose file is gone, are dropped; ``plan`` takes their other rows."""
        unsent = [c for c in self.state.chunks if c.step in UNSENT_STEPS]
        dirty = {c.seq for c in unsent
                 if c.step == "written" and not storage.exists(chunk_path(self.folder, c.file))}
        for sidx, shard in self.shards.items():
            done: dict[bool, set[str]] = {}  # redo chunk -> only ok results make rows done
            for c in unsent:
                if sidx not in c.rows or c.seq in dirty:
                    continue
                if c.redo not in done:
                    done[c.redo] = self.store.answered_ids(shard.name, redo_errors=c.redo)
                ids = done[c.redo]
                if ids and any(row.id in ids for _, row in
                               iter_selected(self.spec, shard, c.rows[sidx])):
                    dirty.add(c.seq)
        if dirty:
            self._drop([c for c in unsent if c.seq in dirty])

    def plan(self) -> None:
        """Rows with no result, in no open chunk, not left for online: into new chunks.
        Asked every run, never remembered: a result can vanish after its chunk was
        collected (a final file deleted, a corrupt one quarantined, ``--force``)."""
        self.new_chunks(self._unplanned(), attempt=1)

    def _unplanned(self) -> Iterator[Row]:
        for sidx in sorted(self.shards):
            shard = self.shards[sidx]
            answered = self.store.answered_ids(shard.name, redo_errors=False)
            covered = self._covered(sidx)
            if len(answered) >= shard.num_rows or covered == [(0, shard.num_rows)]:
                continue
            i = 0
            for pos, row in iter_selected(self.spec, shard, [(0, shard.num_rows)]):
                while i < len(covered) and pos >= covered[i][1]:
                    i += 1
                if (i < len(covered) and pos >= covered[i][0]) or row.id in answered:
                    continue
                yield sidx, pos, row

    def requeue_errors(self) -> None:
        """``--retry-errors``: rows whose result is an error go into new chunks (attempt 1)."""
        if any(c.step in OPEN_STEPS for c in self.state.chunks):
            return  # the interrupted run's chunks come first
        for sidx, shard in self.shards.items():
            table = self.store.read_shard(shard.name)
            if table is None:
                continue
            bad = pc.and_(pc.equal(table["status"], "error"),
                          pc.not_equal(table["error_type"], "bad_row"))
            ok = pc.equal(table["status"], "ok")  # a later attempt may have made it ok
            ids = set(table.filter(bad)["id"].to_pylist()) - set(
                table.filter(ok)["id"].to_pylist())
            if ids:
                self.new_chunks(((sidx, pos, row) for pos, row in
                                 iter_selected(self.spec, shard, [(0, shard.num_rows)])
                                 if row.id in ids), attempt=1, redo=True)
