"""Results: checkpoint parts, one final Parquet file per shard, committed without renames.

Layout of the output (a local folder, or later a prefix in an object store):

    results/shard-000012.parquet      final: exactly one row per input row of the shard
    parts/shard-000012/part-*.parquet checkpoints written while the shard runs
    summary.json                      written by summary.py at the end

Each file is committed whole by ``storage`` (a reader sees all of it or none). Parts are
immutable and uniquely named (time first, so names sort oldest first). ``finalize``
merges a shard's final file and parts into a new final file whose Parquet key-value
metadata names the parts it merged (``batchrun.merged_parts``), commits it, and only
then deletes those parts, best effort: a reader or a later merge ignores a part the
final names, so a crash while deleting can neither double-count a row nor let an old
part outvote the final. A final written before that metadata existed names none: its
parts all count, as they always did. No folder is ever renamed (an object store cannot).

The driver is the only writer; workers hand it Arrow tables. A crash loses at most the
rows not yet flushed to a part; a resume reads parts and finals to skip the rows
already answered.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from batchrun.api.records import RESULT_FIELDS, result_schema
from batchrun.errors import OutputError
from batchrun.io import storage, stores
from batchrun.io.conditional import ConditionalStore, conditional_for
from batchrun.io.storage import Where, join, output_error

log = logging.getLogger("batchrun")

# the schema is the API seam's (api/records.py); re-exported for the store's callers
__all__ = ["MERGED_KEY", "RESULT_FIELDS", "ResultsStore", "merged_parts", "result_schema"]

MERGED_KEY = b"batchrun.merged_parts"  # final file metadata: names of the parts it holds


def merged_parts(metadata: dict[bytes, bytes] | None) -> frozenset[str]:
    """The part names a final file holds, from its key-value metadata (none if older)."""
    raw = (metadata or {}).get(MERGED_KEY)
    if raw is None:
        return frozenset()
    try:
        return frozenset(str(n) for n in json.loads(raw))
    except (ValueError, TypeError):
        return frozenset()  # unreadable: count every part, as an older final does


def _is_part(path: str) -> bool:
    name = posixpath.basename(path)
    return name.startswith("part-") and name.endswith(".parquet")


class ResultsStore:
    """The output of one job, as seen by the driver."""

    def __init__(self, output: Where, schema: pa.Schema, *, fs: pafs.FileSystem | None = None):
        self.fs, self.root = storage.locate(output, fs)
        self.schema = schema
        # an object store named by its URI: finals are committed by a conditional write
        scheme = stores.scheme_of(os.fspath(output)) if fs is None else ""
        scheme = scheme if scheme in stores.SCHEMES else ""
        self.cond_scheme = scheme
        self.cond: ConditionalStore | None = (
            conditional_for(stores.uri(scheme, self.root))[0] if scheme else None)
        self._versions: dict[str, str | None] = {}  # final file versions read by _gather
        # called before every write: the output lease's check (io/lease.py) in a store
        self.guard: Callable[[], None] = lambda: None

    def final_path(self, shard_name: str) -> str:
        return join(self.root, "results", f"{shard_name}.parquet")

    def _parts_dir(self, shard_name: str) -> str:
        return join(self.root, "parts", shard_name)

    def _parts(self, shard_name: str) -> list[str]:
        """The shard's parts on disk, oldest first."""
        return [p for p in storage.list_files(self._parts_dir(shard_name), fs=self.fs)
                if _is_part(p)]

    def write_part(self, shard_name: str, table: pa.Table) -> None:
        """Checkpoint some finished rows of a running shard."""
        self.guard()
        if table.num_rows:
            # time first, so names sort oldest first: the newest result of an id wins
            name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:6]}.parquet"
            storage.commit_table(join(self._parts_dir(shard_name), name),
                                 table.cast(self.schema), fs=self.fs)

    def check_writable(self) -> None:
        """Fail before any request is sent, not after paying for the first batch."""
        if self.cond_scheme:  # a store: credentials, bucket and a probe object (stores.py)
            storage.check_writable(stores.uri(self.cond_scheme, self.root))
        else:
            storage.check_writable(self.root, fs=self.fs)

    def _conform(self, table: pa.Table) -> pa.Table:
        """By column name: a file from a run with other optional columns (batch_id,
        carried or structured ones) still reads; missing columns are null."""
        cols = [table[f.name].cast(f.type) if f.name in table.column_names
                else pa.nulls(table.num_rows, f.type) for f in self.schema]
        return pa.Table.from_arrays(cols, schema=self.schema)

    def _read(self, path: str) -> pa.Table | None:
        """One results file as written (None if absent); a corrupt one is moved to
        quarantine/ and its rows redone.

        Only a file Arrow cannot parse is corrupt; an I/O error (a flaky network disk)
        stops the job instead, so a whole shard is never paid for again by mistake.
        """
        try:
            return storage.read_table(path, fs=self.fs)
        except FileNotFoundError:
            return None
        except pa.ArrowInvalid as e:
            parent, name = posixpath.split(path)
            dest = join(self.root, "quarantine",
                        f"{posixpath.basename(parent)}-{uuid.uuid4().hex[:6]}-{name}")
            try:
                storage.move(path, dest, fs=self.fs)
            except OSError as err:
                raise output_error(path, err, verb="move aside") from None
            log.warning("corrupt results file %s (%s): moved to %s; its rows will be sent again",
                        path, e, dest)
            return None
        except OSError as e:
            raise output_error(path, e, verb="read") from None

    def _gather(self, shard_name: str) -> tuple[list[pa.Table], set[str]]:
        """The shard's results, oldest first (the final, then the parts it does not
        hold), and the names of every part on disk whose rows they include."""
        tables: list[pa.Table] = []
        merged: frozenset[str] = frozenset()
        final = self._read_final(shard_name)
        if final is not None:
            merged = merged_parts(final.schema.metadata)
            tables.append(self._conform(final))
        held: set[str] = set()
        for path in self._parts(shard_name):
            name = posixpath.basename(path)
            if name in merged:  # a crash stopped its deletion: the final holds its rows
                held.add(name)
            elif (t := self._read(path)) is not None:
                tables.append(self._conform(t))
                held.add(name)
        return tables, held

    def _read_final(self, shard_name: str) -> pa.Table | None:
        """The final file; on a store also its version, the condition of the next commit."""
        path = self.final_path(shard_name)
        if self.cond is None:
            return self._read(path)
        try:
            got = self.cond.read_with_version(path)
        except OSError as e:
            raise output_error(path, e, verb="read") from None
        self._versions[shard_name] = got[1] if got else None
        if got is None:
            return None
        try:
            return pq.read_table(pa.BufferReader(got[0]))
        except pa.ArrowInvalid:
            return self._read(path)  # quarantines it: the next commit creates the file anew

    def _commit_final(self, shard_name: str, table: pa.Table) -> None:
        """Commit the final file: on a store by one conditional write, so that of two
        drivers of one output only one can commit a shard (the other stops)."""
        path = self.final_path(shard_name)
        if self.cond is None:
            storage.commit_table(path, table, fs=self.fs)
            return
        sink = pa.BufferOutputStream()
        storage.write_parquet(table, sink)
        data = sink.getvalue().to_pybytes()
        version = self._versions.pop(shard_name, None)
        try:
            ok = (self.cond.put_if_absent(path, data) if version is None
                  else self.cond.put_if_version(path, data, version))
        except OSError as e:
            raise output_error(path, e) from None
        if not ok:
            raise OutputError(f"output: {stores.uri(self.cond_scheme, path)}: {shard_name} was "
                              "committed by another run of this job meanwhile (two drivers on "
                              "one output); stop the other run, then run again (it resumes)")

    def read_shard(self, shard_name: str) -> pa.Table | None:
        """Every result recorded for the shard, oldest first (duplicates not yet removed)."""
        tables, _ = self._gather(shard_name)
        return pa.concat_tables(tables) if tables else None

    def answered_ids(self, shard_name: str, *, redo_errors: bool) -> set[str]:
        """Ids that must not be sent again: those with a result (only ``ok`` ones if redoing)."""
        table = self.read_shard(shard_name)
        if table is None:
            return set()
        if redo_errors:
            table = table.filter(pc.equal(table["status"], "ok"))
        else:  # a row the budget cut short was never finished: always send it again
            table = table.filter(pc.invert(pc.equal(
                pc.fill_null(table["error_type"], ""), "budget_exhausted")))
        return set(table["id"].to_pylist())

    def finalize(self, shard_name: str) -> int:
        """Merge parts (and an older final) into one file, the latest result per id wins;
        the file names the parts it holds, then they are deleted (see the module docs)."""
        self.guard()
        tables, held = self._gather(shard_name)
        table = pa.concat_tables(tables) if tables else self.schema.empty_table()
        ids = table["id"].to_pylist()
        last = {rid: i for i, rid in enumerate(ids)}  # later rows are newer attempts
        if len(last) != len(ids):
            table = table.take(sorted(last.values()))
        meta = {**(table.schema.metadata or {}), MERGED_KEY: json.dumps(sorted(held)).encode()}
        self._commit_final(shard_name, table.replace_schema_metadata(meta))
        self._delete_parts(shard_name, held)
        return table.num_rows

    def _delete_parts(self, shard_name: str, names: set[str] | frozenset[str]) -> None:
        """Best effort: a part left behind is ignored (the final names it), and removed by
        the next ``finalize`` or ``final_rows``."""
        folder = self._parts_dir(shard_name)
        for name in sorted(names):
            with contextlib.suppress(OSError):
                if self.cond is not None:  # one DELETE; pyarrow's adds a folder marker
                    self.cond.delete(join(folder, name))
                else:
                    storage.delete(join(folder, name), fs=self.fs)
        storage.remove_empty_dir(folder, fs=self.fs)

    def final_rows(self, shard_name: str) -> int | None:
        """Rows of the shard's final file, if it is whole and no parts wait to be merged.
        Parts it already holds (a crash stopped their deletion) are deleted now."""
        path = self.final_path(shard_name)
        try:
            meta = storage.read_footer(path, fs=self.fs)
        except FileNotFoundError:
            return None
        except pa.ArrowInvalid:
            self._read(path)  # quarantines it
            return None
        except OSError as e:
            raise output_error(path, e, verb="read") from None
        merged = merged_parts(meta.metadata)
        names = {posixpath.basename(p) for p in self._parts(shard_name)}
        if names - merged:
            return None
        if names:
            self._delete_parts(shard_name, names)
        return int(meta.num_rows)

    def _finals(self) -> dict[str, pq.FileMetaData]:
        """Footers of the final files that can be read, by shard name."""
        out = {}
        for f in self.result_files():
            with contextlib.suppress(pa.ArrowInvalid, OSError):  # quarantined on resume
                out[posixpath.basename(f)[:-len(".parquet")]] = storage.read_footer(
                    f, fs=self.fs)
        return out

    def _unmerged(self, finals: dict[str, pq.FileMetaData]) -> list[tuple[str, str]]:
        """(shard name, path) of every part that no final file holds."""
        found = []
        for p in storage.list_files(join(self.root, "parts"), fs=self.fs, recursive=True):
            shard = posixpath.basename(posixpath.dirname(p))
            if not shard.startswith("shard-") or not _is_part(p):
                continue  # a temporary name, or a folder an older batchrun retired
            meta = finals.get(shard)
            if meta is None or posixpath.basename(p) not in merged_parts(meta.metadata):
                found.append((shard, p))
        return found

    def spent_usd(self) -> float:
        """What the rows already stored cost (finals and the parts they do not hold), for
        the budget of a resume."""
        finals = self._finals()
        total = 0.0
        paths = [self.final_path(s) for s in finals] + [p for _, p in self._unmerged(finals)]
        for f in paths:
            with contextlib.suppress(pa.ArrowInvalid, OSError, KeyError):
                col = storage.read_table(f, fs=self.fs, columns=["cost_usd"])["cost_usd"]
                total += float(pc.sum(col).as_py() or 0.0)
        return total

    def rows_on_disk(self) -> int:
        """Rows with a result, for ``status``: the final files' rows, plus the distinct
        ids of each shard's parts not merged yet (a retried id may be in two parts)."""
        finals = self._finals()
        ids: dict[str, set[str]] = {}
        for shard, p in self._unmerged(finals):
            with contextlib.suppress(FileNotFoundError):  # merged and deleted meanwhile
                t = storage.read_table(p, fs=self.fs, columns=["id"])
                ids.setdefault(shard, set()).update(t["id"].to_pylist())
        return sum(m.num_rows for m in finals.values()) + sum(len(s) for s in ids.values())

    def result_files(self) -> list[str]:
        """The final files, the only files a reader of the results needs."""
        return [f for f in storage.list_files(join(self.root, "results"), fs=self.fs)
                if posixpath.basename(f).startswith("shard-") and f.endswith(".parquet")]
