"""Results on disk: checkpoint parts, one final Parquet file per shard, atomically.

Layout of the output folder:

    results/shard-000012.parquet      final: exactly one row per input row of the shard
    parts/shard-000012/part-*.parquet checkpoints written while the shard runs
    summary.json                      written by summary.py at the end

Every file is committed by ``storage.commit`` (a temporary name in the same folder,
fsynced, then renamed), so a reader (or a resumed job) sees a whole file or none. The driver
is the only writer; workers hand it Arrow tables. A crash loses at most the
rows not yet flushed to a part; a resume reads parts and finals to skip the
rows already answered.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchrun.api.records import RESULT_FIELDS, result_schema
from batchrun.io.storage import check_writable, commit_table, output_error

log = logging.getLogger("batchrun")

# the schema is the API seam's (api/records.py); re-exported for the store's callers
__all__ = ["RESULT_FIELDS", "ResultsStore", "result_schema"]


class ResultsStore:
    """The output folder of one job, as seen by the driver."""

    def __init__(self, output: str | Path, schema: pa.Schema):
        self.root = Path(output)
        self.schema = schema

    def final_path(self, shard_name: str) -> Path:
        return self.root / "results" / f"{shard_name}.parquet"

    def _parts_dir(self, shard_name: str) -> Path:
        return self.root / "parts" / shard_name

    def write_part(self, shard_name: str, table: pa.Table) -> None:
        """Checkpoint some finished rows of a running shard."""
        if table.num_rows:
            # time first, so names sort oldest first: the newest result of an id wins
            name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:6]}.parquet"
            commit_table(self._parts_dir(shard_name) / name, table.cast(self.schema))

    def _existing(self, shard_name: str) -> Iterator[Path]:
        final = self.final_path(shard_name)
        if final.exists():
            yield final
        parts = self._parts_dir(shard_name)
        if parts.is_dir():
            yield from sorted(parts.glob("part-*.parquet"))

    def check_writable(self) -> None:
        """Fail before any request is sent, not after paying for the first batch."""
        check_writable(self.root)

    def _conform(self, table: pa.Table) -> pa.Table:
        """By column name: a file from a run with other optional columns (batch_id,
        carried or structured ones) still reads; missing columns are null."""
        cols = [table[f.name].cast(f.type) if f.name in table.column_names
                else pa.nulls(table.num_rows, f.type) for f in self.schema]
        return pa.Table.from_arrays(cols, schema=self.schema)

    def _read(self, path: Path) -> pa.Table | None:
        """One results file; a corrupt one is moved to quarantine/ and its rows redone.

        Only a file Arrow cannot parse is corrupt; an I/O error (a flaky network disk)
        stops the job instead, so a whole shard is never paid for again by mistake.
        """
        try:
            return self._conform(pq.read_table(path))
        except pa.ArrowInvalid as e:
            name = f"{path.parent.name}-{uuid.uuid4().hex[:6]}-{path.name}"
            dest = self.root / "quarantine" / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, dest)
            log.warning("corrupt results file %s (%s): moved to %s; its rows will be sent again",
                        path, e, dest)
            return None
        except OSError as e:
            raise output_error(path, e, verb="read") from None

    def read_shard(self, shard_name: str) -> pa.Table | None:
        """Every result recorded for the shard, oldest first (duplicates not yet removed)."""
        tables = [t for p in self._existing(shard_name) if (t := self._read(p)) is not None]
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
        """Merge parts (and an older final) into one file, the latest result per id wins."""
        table = self.read_shard(shard_name)
        if table is None:
            table = self.schema.empty_table()
        ids = table["id"].to_pylist()
        last = {rid: i for i, rid in enumerate(ids)}  # later rows are newer attempts
        if len(last) != len(ids):
            table = table.take(sorted(last.values()))
        commit_table(self.final_path(shard_name), table)
        # one rename retires every part at once: a crash while deleting cannot leave old
        # parts behind to outvote the final file on the next merge
        parts = self._parts_dir(shard_name)
        if parts.is_dir():
            retired = parts.with_name(f".retired-{shard_name}-{uuid.uuid4().hex[:6]}")
            os.replace(parts, retired)
            shutil.rmtree(retired, ignore_errors=True)
        return table.num_rows

    def final_rows(self, shard_name: str) -> int | None:
        """Rows of the shard's final file, if it is whole and no parts wait to be merged."""
        path = self.final_path(shard_name)
        if not path.exists() or self._parts_dir(shard_name).is_dir():
            return None
        try:
            return int(pq.read_metadata(path).num_rows)
        except pa.ArrowInvalid:
            self._read(path)  # quarantines it
            return None

    def spent_usd(self) -> float:
        """What the rows already on disk cost (finals and parts), for the budget of a resume."""
        files = list((self.root / "results").glob("shard-*.parquet"))
        files += list((self.root / "parts").glob("shard-*/part-*.parquet"))
        total = 0.0
        for f in files:
            with contextlib.suppress(pa.ArrowInvalid, OSError, KeyError):
                col = pq.read_table(f, columns=["cost_usd"])["cost_usd"]
                total += float(pc.sum(col).as_py() or 0.0)
        return total

    def result_files(self) -> list[Path]:
        return sorted((self.root / "results").glob("shard-*.parquet"))
