"""Input: find the Parquet files, check their columns, plan shards, read rows lazily.

A shard is a row range ``[start, stop)`` of one file, aligned to row groups where
they are small enough. Planning reads only Parquet footers, and reading a shard
streams record batches of the row groups it overlaps, so no process ever holds
a whole input: a 10-million-row job plans in a footer read per file. A job of fewer
rows than ``workers x 2 x shard_rows`` gets smaller shards, two for each worker, so
its concurrency follows the work; an output's first run records the size it planned
with (``OUTPUT/plan.json``), and every later run of that output plans with it.

This module is the one boundary where pyarrow errors about the input become
``InputDataError`` naming the file and the column.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchrun.api.protocols import kind_result_fields
from batchrun.api.rawbody import is_raw_input
from batchrun.api.records import RESULT_FIELDS
from batchrun.api.registry import kind_for
from batchrun.api.templates import template_columns
from batchrun.errors import InputDataError, ResumeRefused, SpecError
from batchrun.io import storage, stores
from batchrun.io.formats import RowFile, is_row_file, open_input
from batchrun.io.rows import RowBuilder, check_batch_file, first_url
from batchrun.io.storage import commit_bytes, join
from batchrun.spec import JobSpec

__all__ = [
    "PLAN_FILE",
    "SHARDS_PER_WORKER",
    "RequestRow",
    "Shard",
    "carry_schema",
    "input_files",
    "input_root",
    "iter_shard_rows",
    "plan_shards",
    "record_plan",
    "shard_size",
    "validate_input",
]


SHARDS_PER_WORKER = 2  # shards a worker runs at once (dispatch.py)
PLAN_FILE = "plan.json"  # OUTPUT/plan.json: the shard size every run of the output uses


@dataclass(frozen=True)
class Shard:
    """Rows ``[start, stop)`` of one Parquet file; ``index`` names its results file."""

    index: int
    path: str
    start: int
    stop: int
    id_prefix: str  # the file's name relative to the input root, for default row ids

    @property
    def num_rows(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        return f"shard-{self.index:06d}"


@dataclass
class RequestRow:
    """One input row, ready to send: ``messages`` is None when the row itself is bad."""

    id: str
    messages: list[dict[str, Any]] | None
    error: str | None = None
    carry: dict[str, Any] = field(default_factory=dict)


def carry_schema(spec: JobSpec, shards: list[Shard]) -> pa.Schema | None:
    """The types of the carried columns, from the first input file (all were checked)."""
    if not spec.carry_columns:
        return None
    # an empty input has no shards, but its files still have the columns' types
    schema = _open(shards[0].path if shards else input_files(spec)[0]).schema_arrow
    return pa.schema([schema.field(c) for c in spec.carry_columns])


def _store_files(src: str) -> list[str]:
    """The Parquet objects a store URI names (one object, a prefix or a glob), as URIs.
    A glob is matched with ``fnmatch`` on the whole key: ``*`` also matches ``/``."""
    stores.preflight(src, "input")
    scheme = stores.scheme_of(src)
    fs, path = storage.locate(src)
    if any(ch in path for ch in "*?["):
        base = path[:min(path.index(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
        found = [p for p in storage.list_files(base, fs=fs, recursive=True)
                 if fnmatch.fnmatchcase(p, path)]
    elif storage.exists(path, fs=fs) and not storage.is_dir(path, fs=fs):
        found = [path]
    else:
        listed = storage.list_files(path.rstrip("/"), fs=fs, recursive=True)
        found = ([p for p in listed if p.endswith(".parquet")]  # no Parquet: JSONL/CSV
                 or [p for p in listed if is_row_file(p)])
    if not found:
        raise InputDataError(f"input: {src}: holds no Parquet objects (*.parquet), nor JSONL "
                             "or CSV ones; check the prefix, or upload the input there")
    return [stores.uri(scheme, p) for p in found]


def input_files(spec: JobSpec) -> list[str]:
    """The Parquet files named by ``spec.input`` (a file, a folder or a glob), sorted."""
    src = spec.input
    if stores.is_store(src):
        return _store_files(src)
    if any(ch in src for ch in "*?["):
        files = sorted(f for f in glob.glob(src, recursive=True) if os.path.isfile(f))
    elif os.path.isdir(src):
        files = sorted(str(p) for p in Path(src).rglob("*.parquet") if p.is_file())
        files = files or sorted(str(p) for p in Path(src).rglob("*")  # no Parquet: JSONL/CSV
                                if p.is_file() and is_row_file(p.name))
    elif os.path.isfile(src):
        files = [src]
    else:
        raise InputDataError(f"input: {src}: no such file or folder; check the path in the spec")
    if not files:
        raise InputDataError(f"input: {src}: holds no Parquet files (*.parquet), nor JSONL "
                             "or CSV files (*.jsonl, *.jsonl.gz, *.csv)")
    return files


def input_root(spec: JobSpec) -> str:
    """The folder the input's file names are relative to (row ids, the fingerprint)."""
    src = spec.input
    if stores.is_store(src) and not any(ch in src for ch in "*?["):
        return src.rstrip("/") if src.endswith("/") or storage.is_dir(src) else (
            src.rsplit("/", 1)[0])
    if os.path.isdir(src):
        return src
    return os.path.dirname(src.split("*")[0].split("?")[0].split("[")[0]) or "."


_root_of = input_root  # the name ops/submit.py imports


def _open(path: str) -> pq.ParquetFile | RowFile:
    try:  # Parquet, or a JSONL/CSV file read alike (formats.py), by the name's ending
        return open_input(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise InputDataError(f"input: {path}: not a readable Parquet file ({e})") from e


def _check_type(path: str, name: str, typ: pa.DataType, want: str) -> None:
    if want == "text" and not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise InputDataError(
            f"input: {path}: column {name!r} is {typ}, not text; "
            "use a string column for prompt_column or set messages_column"
        )
    if want == "messages":
        inner = typ.value_type if pa.types.is_list(typ) or pa.types.is_large_list(typ) else None
        names = {inner.field(i).name for i in range(inner.num_fields)} if (
            inner is not None and pa.types.is_struct(inner)) else set()
        if not {"role", "content"} <= names:
            raise InputDataError(
                f"input: {path}: column {name!r} is {typ}; messages_column must be "
                "a list of structs with fields role and content"
            )


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _output_is_input(spec: JobSpec) -> bool:
    """Whether the results would be read back as input by the next run."""
    if stores.is_store(spec.input) or stores.is_store(spec.output):
        out, src = spec.output.rstrip("/"), spec.input
        if any(ch in src for ch in "*?["):
            return any(fnmatch.fnmatchcase(f"{out}/{sample}", src) for sample in (
                "results/shard-000000.parquet", "parts/shard-000000/part-0.parquet"))
        return f"{out}/".startswith(src.rstrip("/") + "/")
    out = os.path.realpath(spec.output)
    src = spec.input
    if not any(ch in src for ch in "*?["):
        return os.path.isdir(src) and _inside(out, os.path.realpath(src))
    root = input_root(spec)
    if not _inside(out, os.path.realpath(root)):
        return False
    if "**" in src:
        return True
    # a glob without ** matches files at one depth only: does it match a results file?
    pattern = Path(os.path.realpath(root), src[len(root):].lstrip(os.sep)).parts
    for sample in ("results/shard-000000.parquet", "parts/shard-000000/part-0.parquet"):
        parts = Path(out, sample).parts
        if len(parts) == len(pattern) and all(map(fnmatch.fnmatchcase, parts, pattern)):
            return True
    return False


def validate_input(spec: JobSpec) -> list[str]:
    """Check every input file has the columns the spec names, of the right types."""
    if _output_is_input(spec):
        raise SpecError(f"output: {spec.output} is inside the input {spec.input}: the next run "
                        "would read its results as input; choose an output folder outside it")
    _check_carry_names(spec)
    files = input_files(spec)
    for path in files:
        pf = _open(path)
        schema = pf.schema_arrow
        if is_raw_input(spec):  # no prompt source: OpenAI batch input files
            check_batch_file(spec, path, schema, first_url(pf))
        wanted = [(spec.prompt_column, "text"), (spec.messages_column, "messages")]
        wanted += [(spec.id_column, "any")] + [(c, "any") for c in spec.carry_columns]
        wanted += [(c, "any") for c in template_columns(spec)] + [(spec.image_column, "any")]
        for name, kind in wanted:
            if name is None:
                continue
            idx = schema.get_field_index(name)
            if idx < 0:
                have = ", ".join(schema.names[:12])
                raise InputDataError(
                    f"input: {path}: no column {name!r} (columns: {have}); fix the column name"
                )
            _check_type(path, name, schema.field(idx).type, kind)
    return files


def _check_carry_names(spec: JobSpec) -> None:
    """A carried column named like a result column would overwrite the row's result."""
    taken = {f.name for f in RESULT_FIELDS} | {
        f.name for f in kind_result_fields(kind_for(spec), spec)}
    if clash := [c for c in spec.carry_columns if c in taken]:
        raise SpecError(f"carry_columns: {clash[0]!r} is a result column already; remove it "
                        "from carry_columns (or rename the input column)")


def _file_shards(pf: pq.ParquetFile | RowFile, shard_rows: int) -> Iterator[tuple[int, int]]:
    """Row ranges of one file: whole row groups packed up to ``shard_rows``, big ones split."""
    start = pos = 0
    for i in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(i).num_rows
        if pos > start and pos + n - start > shard_rows:
            yield start, pos
            start = pos
        pos += n
        while pos - start > shard_rows:
            yield start, start + shard_rows
            start += shard_rows
    if pos > start:
        yield start, pos


def shard_size(spec: JobSpec, files: list[str]) -> int:
    """Rows per shard for a new output: ``shard_rows``, or fewer when the job is small,
    so that every worker has shards to run (8,000 rows with 2 workers and the default
    10,000 were one shard: one worker ran at half the job's concurrency, one idled)."""
    rows = sum(_open(f).metadata.num_rows for f in files)
    return max(1, min(spec.shard_rows, -(-rows // (spec.workers * SHARDS_PER_WORKER))))


def _has_rows(out: str) -> bool:
    """Whether a run has written results, checkpoints or batches into ``out``."""
    return (any(f.endswith(".parquet") for f in storage.list_files(join(out, "results")))
            or bool(storage.list_files(join(out, "parts"), recursive=True))
            or storage.exists(join(out, "batch", "state.json")))


def _planned_size(spec: JobSpec, files: list[str]) -> tuple[int, bool]:
    """(rows per shard, whether OUTPUT/plan.json holds it).

    Results, parts and open batches name rows by shard and position, so every run of an
    output must find the same shards, whatever ``workers`` or ``shard_rows`` say now: the
    first run records its size. An output with rows but no plan file was written by a
    version that planned by ``shard_rows`` alone.
    """
    out = spec.output
    try:
        return int(json.loads(storage.read_bytes(join(out, PLAN_FILE)))["shard_rows"]), True
    except FileNotFoundError:
        return (spec.shard_rows if _has_rows(out) else shard_size(spec, files)), False
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ResumeRefused(f"{join(out, PLAN_FILE)}: unreadable ({e}); restore it, or use "
                            "another output folder") from e


def record_plan(spec: JobSpec, files: list[str]) -> None:
    """Write the shard size of this output's plan, once, before a run writes any row."""
    size, recorded = _planned_size(spec, files)
    if recorded:
        return
    commit_bytes(join(spec.output, PLAN_FILE), (json.dumps({"shard_rows": size}) + "\n").encode())


def plan_shards(spec: JobSpec, files: list[str] | None = None) -> list[Shard]:
    """All shards of the job, in a stable order (file name, then row): the plan recorded
    in the output (``record_plan``), else the one a first run would record."""
    files = files if files is not None else validate_input(spec)
    size, _ = _planned_size(spec, files)
    root = input_root(spec)
    shards: list[Shard] = []
    for path in files:
        prefix = storage.relative(path, root)
        for a, b in _file_shards(_open(path), size):
            shards.append(Shard(len(shards), path, a, b, prefix))
    return shards


def _batches(pf: pq.ParquetFile | RowFile, shard: Shard, cols: list[str], n: int
             ) -> Iterator[pa.RecordBatch]:
    """Record batches covering exactly the shard's rows, reading only the row groups it spans."""
    groups, first, pos = [], None, 0
    for i in range(pf.metadata.num_row_groups):
        rows = pf.metadata.row_group(i).num_rows
        if pos + rows > shard.start and pos < shard.stop:
            groups.append(i)
            first = pos if first is None else first
        pos += rows
    pos = first or 0
    for batch in pf.iter_batches(batch_size=n, row_groups=groups, columns=cols):
        lo, hi = max(shard.start - pos, 0), min(shard.stop - pos, batch.num_rows)
        if hi > lo:
            yield batch.slice(lo, hi - lo)
        pos += batch.num_rows
        if pos >= shard.stop:
            return


def iter_shard_rows(
    spec: JobSpec, shard: Shard, batch_rows: int = 1024
) -> Iterator[list[RequestRow]]:
    """The shard's rows as ``RequestRow`` lists of at most ``batch_rows``, read lazily."""
    builder = RowBuilder(spec)  # a row's columns -> its request payload, or its error
    idc = builder.id_column  # spec.id_column, or a batch file's custom_id
    cols = list(dict.fromkeys([*builder.columns, *([idc] if idc else []),
                               *spec.carry_columns]))
    pos = shard.start
    for batch in _batches(_open(shard.path), shard, cols, batch_rows):
        data = batch.to_pydict()
        out = []
        for j in range(batch.num_rows):
            rid = builder.row_id(data, j, f"{shard.id_prefix}#{pos + j}")
            msgs, err = builder.payload(data, j)
            carry = {c: data[c][j] for c in spec.carry_columns}
            out.append(RequestRow(rid, msgs, err, carry))
        pos += batch.num_rows
        yield out
