"""Storage: where a job's files live, how they are read, and the one way one is committed.

A place is a path or a URI plus a ``pyarrow.fs`` filesystem (``locate``): a plain path is
on the local disk as written; a URI names its filesystem; a caller holding a filesystem
passes it as ``fs=`` and paths inside it. Every read, listing and deletion of results,
checkpoint parts, state files and summaries goes through the functions below, so another
filesystem (an object store) plugs in here and nowhere else.

Every file batchrun keeps is written by ``commit`` (or, when it is streamed, ``Staged``):
the new content goes to a temporary name in the same folder, is fsynced, replaces the old
file with one ``os.replace``, and the folder is fsynced, so a reader (or a resumed job, or
a machine that lost power) sees the old content or the new one, never a torn file. Only
the local filesystem can commit today; an object store needs a conditional put instead
(a rename there is a copy), which plugs in at ``Staged``. Nothing relies on renaming a
folder. ``output_error`` is the one wording of "the output cannot be written" (exit 3).

Reads raise ``OSError`` as the filesystem does (``FileNotFoundError`` for a missing file)
and ``pyarrow.ArrowInvalid`` for a file that is not Parquet: each caller knows what a
missing or broken file means to it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import posixpath
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeAlias

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from batchrun.errors import OutputError
from batchrun.io import stores

__all__ = ["Staged", "Where", "check_writable", "commit", "commit_bytes", "commit_table",
           "delete", "exists", "is_dir", "join", "list_files", "local_copy", "locate", "move",
           "output_error",
           "parquet_file", "read_bytes", "read_footer", "read_table", "reason", "relative",
           "remove_empty_dir", "size", "write_parquet"]

Where = str | os.PathLike[str]
FS: TypeAlias = "pafs.FileSystem | None"


def reason(e: OSError) -> str:
    """What went wrong, in the system's words ("Permission denied"): pyarrow's own text
    repeats the path, which the message names already."""
    if e.errno:
        return os.strerror(e.errno)
    return e.strerror or str(e)


def output_error(path: Where, why: OSError | str, *, verb: str = "write") -> OutputError:
    """The one message for an output that cannot be written (or read back)."""
    text = why if isinstance(why, str) else reason(why)
    return OutputError(f"output: cannot {verb} {os.fspath(path)}: {text}; fix the folder's "
                       "permissions and run the same command again (it resumes), or choose "
                       "another output")


def locate(where: Where, fs: FS = None) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it: ``fs`` if given, else from the URI's scheme;
    a plain path (relative ones too) is on the local disk, exactly as written."""
    text = os.fspath(where)
    if fs is not None:
        return fs, text
    if stores.is_store(text):  # s3://, gs://: configured by stores.py, path = bucket/key
        scheme, path = stores.split(text)
        try:
            return stores.filesystem(scheme), path
        except (pa.ArrowInvalid, OSError) as e:
            raise output_error(text, str(e)) from None
    if "://" in text:
        try:
            return pafs.FileSystem.from_uri(text)
        except (pa.ArrowInvalid, OSError) as e:
            raise output_error(text, str(e)) from None
    return pafs.LocalFileSystem(), text


def join(base: str, *names: str) -> str:
    """A path inside a filesystem: '/' separated on every one (local paths too)."""
    return posixpath.join(base, *names)


# -- reads -------------------------------------------------------------------------------

def read_bytes(where: Where, *, fs: FS = None) -> bytes:
    fs, path = locate(where, fs)
    with fs.open_input_stream(path) as f:
        return bytes(f.read())


@contextlib.contextmanager
def local_copy(where: Where, *, fs: FS = None) -> Iterator[Path]:
    """A local file holding ``where``: the file itself on disk; an object is streamed
    into a temporary file of the same name (8 MiB at a time: chunk files can be large),
    removed afterwards."""
    fs, path = locate(where, fs)
    if isinstance(fs, pafs.LocalFileSystem):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="batchrun-") as tmp:
        local = Path(tmp) / Path(path).name
        with fs.open_input_stream(path) as src, open(local, "wb") as dst:
            while chunk := src.read(8 * 2**20):
                dst.write(chunk)
        yield local


def parquet_file(where: Where, *, fs: FS = None) -> pq.ParquetFile:
    """A Parquet file opened for lazy reads (footer now, row groups on demand)."""
    fs, path = locate(where, fs)
    if isinstance(fs, pafs.LocalFileSystem):
        return pq.ParquetFile(path)  # memory-mapped reads, as before
    return pq.ParquetFile(fs.open_input_file(path))


def relative(path: str, root: str) -> str:
    """``path`` relative to the folder (or prefix) ``root``, '/' separated."""
    if stores.is_store(path) or stores.is_store(root):
        return posixpath.relpath(path.split("://", 1)[-1], root.split("://", 1)[-1].rstrip("/"))
    return Path(os.path.relpath(path, root)).as_posix()


def is_dir(where: Where, *, fs: FS = None) -> bool:
    """A folder, or on a store a prefix holding objects."""
    fs, path = locate(where, fs)
    return bool(fs.get_file_info(path).type == pafs.FileType.Directory)


def read_table(where: Where, *, fs: FS = None, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file, its key-value metadata kept in the schema."""
    fs, path = locate(where, fs)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).read(columns=columns)


def read_footer(where: Where, *, fs: FS = None) -> pq.FileMetaData:
    """A Parquet file's footer only: rows, schema, row groups, key-value metadata."""
    fs, path = locate(where, fs)
    with fs.open_input_file(path) as f:
        return pq.read_metadata(f)


def exists(where: Where, *, fs: FS = None) -> bool:
    fs, path = locate(where, fs)
    return bool(fs.get_file_info(path).type != pafs.FileType.NotFound)


def size(where: Where, *, fs: FS = None) -> int:
    fs, path = locate(where, fs)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(errno.ENOENT, "no such file", path)
    return int(info.size)


def list_files(prefix: Where, *, fs: FS = None, recursive: bool = False) -> list[str]:
    """The files under ``prefix`` (paths inside the filesystem), sorted; none if it is
    absent. Temporary names being committed (``.name.tmp``) are never listed."""
    fs, path = locate(prefix, fs)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True,
                                               recursive=recursive))
    return sorted(i.path for i in infos
                  if i.type == pafs.FileType.File and not i.base_name.startswith("."))


# -- changes -----------------------------------------------------------------------------

def delete(where: Where, *, fs: FS = None) -> None:
    """Remove one file; a file already gone is not an error."""
    fs, path = locate(where, fs)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def move(src: Where, dst: Where, *, fs: FS = None) -> None:
    """Move a file aside (quarantine); not a commit: an object store copies it."""
    fs, path = locate(src, fs)
    target = os.fspath(dst)
    fs.create_dir(posixpath.dirname(target) or ".", recursive=True)
    fs.move(path, target)


def remove_empty_dir(where: Where, *, fs: FS = None) -> None:
    """Tidy a folder left empty; on an object store, the folder marker pyarrow leaves
    when it deletes a folder's last object (only once nothing is left under it)."""
    fs, path = locate(where, fs)
    if isinstance(fs, pafs.LocalFileSystem):
        with contextlib.suppress(OSError):
            os.rmdir(path)
    elif not list_files(path, fs=fs, recursive=True):
        with contextlib.suppress(OSError):
            fs.delete_dir(path)


# -- the one commit ----------------------------------------------------------------------

def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:  # a filesystem that cannot sync folders (some FUSE)
            raise
    finally:
        os.close(fd)


_SPOOL_BYTES = 64 * 2**20  # a staged object is kept in memory up to this, then on disk


class Staged:
    """A file written under a temporary name next to its target: ``commit`` puts it in
    place atomically (see above), ``discard`` drops it. Every failure is ``OutputError``
    naming the target, and leaves the old content in place.

    On an object store the content is staged in this process (memory, then a temporary
    file) and ``commit`` uploads it as one object: a PUT (or a multipart upload, completed
    last) makes the whole object visible at once or not at all, with no rename."""

    def __init__(self, where: Where, *, fs: FS = None):
        fs, path = locate(where, fs)
        self._fs: pafs.FileSystem | None = None
        if not isinstance(fs, pafs.LocalFileSystem):
            self._fs, self.path = fs, Path(path)
            scheme = {"s3": "s3", "gcs": "gs"}.get(fs.type_name)
            self.where = f"{scheme}://{path}" if scheme and "://" not in path else path
            self.file: BinaryIO = tempfile.SpooledTemporaryFile(_SPOOL_BYTES)  # type: ignore[assignment]  # noqa: SIM115
            return
        self.path = Path(path)
        self.where = os.fspath(self.path)
        self._tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self._tmp, "wb")  # noqa: SIM115 - closed by commit
        except OSError as e:
            raise output_error(self.where, e) from None

    def write(self, data: bytes) -> None:
        try:
            self.file.write(data)
        except OSError as e:
            self.discard()
            raise output_error(self.where, e) from None

    def commit(self) -> None:
        if self._fs is not None:
            self._upload(self._fs)
            return
        try:
            with self.file:
                self.file.flush()
                os.fsync(self.file.fileno())  # the content is on disk before the name
            os.replace(self._tmp, self.path)
            _fsync_dir(self.path.parent)  # and the rename itself survives a power cut
        except OSError as e:
            self.discard()
            raise output_error(self.where, e) from None

    def _upload(self, fs: pafs.FileSystem) -> None:
        try:
            with self.file:
                if self._put_small(fs):
                    return
                self.file.seek(0)
                with fs.open_output_stream(self.path.as_posix()) as out:
                    while chunk := self.file.read(8 * 2**20):
                        out.write(chunk)
        except OSError as e:  # the SDK's retries are spent: the store stays down
            raise OutputError(
                f"output: cannot write {self.where}: {stores.short(e)}; the store failed "
                f"{stores.RETRY_ATTEMPTS} tries: check it (endpoint, permissions, outage), "
                "then run the same command again (it resumes)") from None

    def _put_small(self, fs: pafs.FileSystem) -> bool:
        """An object that fits in memory goes to S3 in one PUT (boto3, the s3 extra)."""
        size = self.file.seek(0, os.SEEK_END)
        if fs.type_name != "s3" or size > _SPOOL_BYTES or not self.where.startswith("s3://"):
            return False
        from batchrun.io.conditional import S3Conditional, conditional_for

        cond, path = conditional_for(self.where)
        if not isinstance(cond, S3Conditional):
            return False
        self.file.seek(0)
        cond.put(path, self.file.read())
        return True

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        if self._fs is None:
            with contextlib.suppress(OSError):  # the folder may be the unwritable thing
                self._tmp.unlink(missing_ok=True)


def commit(where: Where, write: Callable[[BinaryIO], None], *, fs: FS = None) -> None:
    """Write what ``write`` puts into a binary file to ``where``, atomically (see above);
    any failure is ``OutputError`` and leaves the old content in place."""
    staged = Staged(where, fs=fs)
    try:
        write(staged.file)
    except OSError as e:
        staged.discard()
        raise output_error(staged.where, e) from None
    except BaseException:
        staged.discard()
        raise
    staged.commit()


def commit_bytes(where: Where, data: bytes, *, fs: FS = None) -> None:
    def write(f: BinaryIO) -> None:
        f.write(data)
    commit(where, write, fs=fs)


def commit_table(where: Where, table: pa.Table, *, fs: FS = None) -> None:
    """One Parquet file holding ``table`` (its schema's key-value metadata too)."""
    commit(where, lambda f: write_parquet(table, f), fs=fs)


def write_parquet(table: pa.Table, sink: Any) -> None:
    """The one way results are written as Parquet: float vectors (embeddings) get no
    dictionary (10x the cost, and larger) and no compression (snappy gains a few percent
    on float mantissas, for about as much CPU as the rest of the file); every other
    column keeps pyarrow's defaults (dictionary, snappy)."""
    dictionary, compression = _encodings(table.schema)
    pq.write_table(table, sink, use_dictionary=dictionary, compression=compression)


@functools.lru_cache(maxsize=32)
def _encodings(schema: pa.Schema) -> tuple[bool | list[str], str | dict[str, str]]:
    """``use_dictionary`` and ``compression`` for ``schema``. Both name Parquet's leaf
    columns (``embedding.list.element``, a struct's ``s.k``), and a column a dict leaves
    out is left uncompressed: so every leaf is named, top-level field by field."""
    vectors = [_is_vector(f.type) for f in schema]
    if not any(vectors):
        return True, "snappy"
    buf = pa.BufferOutputStream()  # the leaves' names as the writer gives them
    pq.write_table(schema.empty_table(), buf)
    leaves = pq.ParquetFile(pa.BufferReader(buf.getvalue())).schema
    paths = iter(leaves.column(i).path for i in range(len(leaves)))
    plain: list[str] = []
    codecs: dict[str, str] = {}
    for f, vector in zip(schema, vectors, strict=True):
        for path in (next(paths) for _ in range(_leaf_count(f.type))):
            codecs[path] = "none" if vector else "snappy"
            if not vector:
                plain.append(path)
    return plain, codecs


def _leaf_count(typ: pa.DataType) -> int:
    if pa.types.is_struct(typ):
        return sum(_leaf_count(typ.field(i).type) for i in range(typ.num_fields))
    if pa.types.is_map(typ):
        return _leaf_count(typ.key_type) + _leaf_count(typ.item_type)
    if pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ):
        return _leaf_count(typ.value_type)
    return 1


def _is_vector(typ: pa.DataType) -> bool:
    return (pa.types.is_list(typ) or pa.types.is_fixed_size_list(typ)) and (
        pa.types.is_floating(typ.value_type))


def check_writable(folder: Where, *, fs: FS = None) -> None:
    """Fail before any request is sent, not after paying for the first answers."""
    if fs is None and stores.is_store(os.fspath(folder)):
        stores.preflight(os.fspath(folder), "output")
        return
    fs, root = locate(folder, fs)
    if not isinstance(fs, pafs.LocalFileSystem):
        return  # a store reached by its filesystem object: checked where it was named
    probe = Path(root) / f".write-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise output_error(root, e) from None
