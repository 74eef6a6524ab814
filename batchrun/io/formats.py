"""Input files other than Parquet: JSONL (``.jsonl``, ``.jsonl.gz``) and CSV (``.csv``).

``RowFile`` reads one such file through ``open_stream`` (a callable returning an opened
binary stream: a ``pyarrow.NativeFile`` from ``pyarrow.input_stream`` here, one from a
``pyarrow.fs`` filesystem for object storage) and looks like a ``pyarrow.parquet.ParquetFile``
to the shard planner and reader (``shards.py``): ``schema_arrow``, ``metadata.num_rows``,
``metadata.row_group(i).num_rows`` and ``iter_batches``. Its "row groups" are runs of
``GROUP_ROWS`` rows, so shards cut it as they cut Parquet, and a shard's read streams the
file from the top, skipping (without parsing, for JSONL) the rows before its first group:
no process holds a whole input.

JSONL: one object per line (blank lines are not rows); the columns and their types are
inferred from the first ``SAMPLE_LINES`` objects. A line that is not a JSON object, or
whose values do not fit those types, is still a row: its ``ERROR_COLUMN`` says why, and it
becomes that row's error (``io/rows.py``), never a failed shard. CSV: a header line, then
rows; every column is read as text (no type guessing between blocks); an empty field is
the empty string. Row counts are found by one pass over the file and kept per process.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from batchrun.errors import InputDataError, OutputError
from batchrun.io import storage

__all__ = ["BATCH_FILE_SCHEMA", "ERROR_COLUMN", "GROUP_ROWS", "ROW_SUFFIXES", "RowFile",
           "content_sha256",
           "is_row_file", "open_input"]

ROW_SUFFIXES = (".jsonl", ".jsonl.gz", ".csv")
ERROR_COLUMN = "_batchrun_line_error"  # set on a row whose line could not be read
GROUP_ROWS = 10_000
SAMPLE_LINES = 1000
_CHUNK = 1 << 20
# An OpenAI batch input file's lines, as columns: the body stays JSON text, sent as written
BATCH_FILE_SCHEMA = pa.schema([pa.field(n, pa.string())
                               for n in ("custom_id", "method", "url", "body")])
# (path, size, mtime) -> (rows, byte offset of each group's first row), kept per process
_COUNTS: dict[tuple[str, int, float], tuple[int, list[int]]] = {}

Opener = Callable[[], Any]


def is_row_file(name: str) -> bool:
    return name.lower().endswith(ROW_SUFFIXES)


def open_input(path: str) -> pq.ParquetFile | RowFile:
    """The reader of one input file (a path or a store URI, through the storage seam), by
    its name's ending: Parquet unless it is a row file."""
    if not is_row_file(path):
        return storage.parquet_file(path)
    return RowFile(path, row_stream(path), seekable=not path.lower().endswith(".gz"))


def row_stream(path: str) -> Opener:
    """Opens the file for reading: random access, or (gzip: no seeking, a shard reads from
    the top) a decompressed stream."""
    fs, inside = storage.locate(path)
    if path.lower().endswith(".gz"):
        return lambda: fs.open_input_stream(inside, compression="gzip")
    return lambda: fs.open_input_file(inside)


def content_sha256(open_stream: Opener) -> str:
    """The hash of a file's whole content (a row file has no footer to stand for it)."""
    digest = hashlib.sha256()
    with open_stream() as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _lines(open_stream: Opener, start: int = 0) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of the non-blank lines of a stream from byte ``start`` on."""
    with open_stream() as f:
        if start:
            f.seek(start)
        rest, pos = b"", start
        while chunk := f.read(_CHUNK):
            *full, rest = (rest + chunk).split(b"\n")
            for ln in full:
                if ln.strip():
                    yield pos, ln
                pos += len(ln) + 1
        if rest.strip():
            yield pos, rest


@dataclass(frozen=True)
class _Group:
    num_rows: int


class _Meta:
    def __init__(self, rows: int):
        self.num_rows = rows
        self.num_row_groups = -(-rows // GROUP_ROWS)

    def row_group(self, i: int) -> _Group:
        return _Group(min(GROUP_ROWS, self.num_rows - i * GROUP_ROWS))


class RowFile:
    """A JSONL or CSV file, read like a ParquetFile (see the module's docs)."""

    def __init__(self, name: str, open_stream: Opener, *, seekable: bool = False):
        self.name = name
        self._open = open_stream
        self._seekable = seekable  # JSONL: a shard seeks to its first group's offset
        self._offsets: list[int] = []
        self._csv = name.lower().endswith(".csv")
        self._schema: pa.Schema | None = None
        self._meta: _Meta | None = None

    # -- what the planner reads ------------------------------------------------------

    @property
    def schema_arrow(self) -> pa.Schema:
        if self._schema is None:
            self._schema = self._csv_schema() if self._csv else self._jsonl_schema()
        return self._schema

    @property
    def metadata(self) -> _Meta:
        if self._meta is None:
            key = self._cache_key()
            counted = _COUNTS.get(key) if key is not None else None
            if counted is None:
                counted = self._count()
                if key is not None:
                    _COUNTS[key] = counted
            self._meta = _Meta(counted[0])
            self._offsets = counted[1]
        return self._meta

    def _count(self) -> tuple[int, list[int]]:
        """One pass: the rows, and where each group of GROUP_ROWS starts (JSONL)."""
        if self._csv:
            return sum(b.num_rows for b in self._csv_batches(None)), []
        rows, offsets = 0, []
        for offset, _ in _lines(self._open):
            if rows % GROUP_ROWS == 0:
                offsets.append(offset)
            rows += 1
        return rows, offsets

    def _cache_key(self) -> tuple[str, int, float] | None:
        """The file's name, size and modification time (an object in a store too: each
        shard's reader would otherwise download the whole object again to count it)."""
        try:
            fs, inside = storage.locate(self.name)
            info = fs.get_file_info(inside)
        except (OSError, OutputError):
            return None
        if info.size is None or info.mtime_ns is None:
            return None
        return (self.name, info.size, float(info.mtime_ns))

    # -- JSONL -----------------------------------------------------------------------

    def _jsonl_schema(self) -> pa.Schema:
        sample = []
        for _, line in _lines(self._open):
            doc = _loads(line)
            if isinstance(doc, dict):
                sample.append(doc)
            if len(sample) >= SAMPLE_LINES:
                break
        if not sample:
            raise InputDataError(f"input: {self.name}: holds no JSON object lines")
        if all("custom_id" in d and "body" in d for d in sample):  # an OpenAI batch file
            return BATCH_FILE_SCHEMA
        names = list(dict.fromkeys(k for doc in sample for k in doc))
        return pa.schema([pa.field(n, _column_type(self.name, n, [d.get(n) for d in sample]))
                          for n in names])

    def _jsonl_batch(self, lines: list[bytes], schema: pa.Schema, first: int) -> pa.RecordBatch:
        docs: list[dict[str, Any]] = []
        for i, line in enumerate(lines):
            doc = _loads(line)
            if isinstance(doc, dict) and self.schema_arrow is BATCH_FILE_SCHEMA:
                body = doc.get("body")
                cols = {"custom_id": _text(doc.get("custom_id")), "method":
                        _text(doc.get("method")), "url": _text(doc.get("url")),
                        "body": orjson.dumps(body).decode() if body is not None else None}
                docs.append({n: cols[n] for n in schema.names})
            elif isinstance(doc, dict):
                docs.append({f.name: doc.get(f.name) for f in schema})
            else:
                docs.append({ERROR_COLUMN: f"row {first + i + 1} of {self.name}: not a JSON "
                             "object"})
        full = schema.append(pa.field(ERROR_COLUMN, pa.string()))
        try:
            return pa.RecordBatch.from_pylist(docs, schema=full)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # one row of another type: find it
            return pa.RecordBatch.from_pylist([self._fit(d, full, first + i)
                                               for i, d in enumerate(docs)], schema=full)

    def _fit(self, doc: dict[str, Any], schema: pa.Schema, index: int) -> dict[str, Any]:
        try:
            pa.RecordBatch.from_pylist([doc], schema=schema)
            return doc
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return {ERROR_COLUMN: f"row {index + 1} of {self.name}: a value of another type "
                    "than the column's (from the first lines)"}

    # -- CSV -------------------------------------------------------------------------

    def _header(self) -> list[str]:
        with self._open() as f:
            head = f.read(1 << 16).decode("utf-8", "replace")
        row = next(csv.reader(io.StringIO(head)), None)
        if not row:
            raise InputDataError(f"input: {self.name}: no header line (column names)")
        return row

    def _csv_schema(self) -> pa.Schema:
        return pa.schema([pa.field(n, pa.string()) for n in self._header()])

    def _csv_batches(self, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
        types = {n: pa.string() for n in self._header()}
        opts = pacsv.ConvertOptions(column_types=types, include_columns=columns,
                                    strings_can_be_null=False)
        try:
            with self._open() as f:
                yield from pacsv.open_csv(f, convert_options=opts)
        except pa.ArrowInvalid as e:
            raise InputDataError(f"input: {self.name}: not a readable CSV file ({e})") from e

    # -- what the shard reader reads -------------------------------------------------

    def iter_batches(self, batch_size: int = 65536, row_groups: list[int] | None = None,
                     columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Rows from the first of ``row_groups`` to the file's end (the caller stops)."""
        skip = row_groups[0] * GROUP_ROWS if row_groups else 0
        if self._csv:
            yield from _skipped(self._csv_batches(columns), skip)
            return
        schema = self.schema_arrow
        if columns is not None:
            schema = pa.schema([schema.field(c) for c in columns])
        lines: list[bytes] = []
        pos, start = 0, 0
        if skip and row_groups and self._seekable:
            _ = self.metadata  # counted once per process: the groups' offsets with it
            if row_groups[0] < len(self._offsets):
                pos, start = skip, self._offsets[row_groups[0]]
        for _, line in _lines(self._open, start):
            if pos >= skip:
                lines.append(line)
                if len(lines) == batch_size:
                    yield self._jsonl_batch(lines, schema, pos - len(lines) + 1)
                    lines = []
            pos += 1
        if lines:
            yield self._jsonl_batch(lines, schema, pos - len(lines))


def _column_type(name: str, column: str, values: list[Any]) -> pa.DataType:
    """The type of a column in the first lines; where they disagree, the first value's
    (the lines of another type then become their rows' errors)."""
    try:
        typ = pa.array(values).type
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        first = next(v for v in values if v is not None)
        try:
            typ = pa.array([first]).type
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise InputDataError(f"input: {name}: column {column!r} holds a value Arrow "
                                 f"cannot type ({e})") from None
    return pa.string() if pa.types.is_null(typ) else typ


def _skipped(batches: Iterator[pa.RecordBatch], skip: int) -> Iterator[pa.RecordBatch]:
    for b in batches:
        if skip >= b.num_rows:
            skip -= b.num_rows
            continue
        yield b.slice(skip) if skip else b
        skip = 0


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _loads(line: bytes) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
