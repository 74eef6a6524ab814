"""Storage: where a job's files live, and the one way a file is committed.

Every small state file (``job.json``, ``plan.json``, ``summary.json``, the batch state,
the cluster record) and every results file is written by ``commit``: the new content
goes to a temporary name in the same folder, is fsynced, replaces the old file with one
``os.replace``, and the folder is fsynced, so a reader (or a resumed job, or a machine
that lost power) sees the old content or the new one, never a torn file.

A place is a path or a URI plus a ``pyarrow.fs`` filesystem (``locate``). Only the local
filesystem can commit today; an object store needs another commit (a conditional put,
since a rename there is a copy), which plugs in at ``commit``. ``output_error`` is the
one wording of "the output cannot be written" (exit 3).
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from batchrun.errors import OutputError

__all__ = ["Where", "check_writable", "commit", "commit_bytes", "commit_table", "locate",
           "output_error"]

Where = str | os.PathLike[str]


def output_error(path: Where, why: OSError | str, *, verb: str = "write") -> OutputError:
    """The one message for an output that cannot be written (or read back)."""
    reason = why if isinstance(why, str) else (why.strerror or str(why))
    return OutputError(f"output: cannot {verb} {os.fspath(path)}: {reason}; fix the folder's "
                       "permissions and run the same command again (it resumes), or choose "
                       "another output")


def locate(where: Where, fs: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it: ``fs`` if given, else from the URI's scheme;
    a plain path (relative ones too) is on the local disk, exactly as written."""
    text = os.fspath(where)
    if fs is not None:
        return fs, text
    if "://" in text:
        try:
            return pafs.FileSystem.from_uri(text)
        except (pa.ArrowInvalid, OSError) as e:
            raise output_error(text, str(e)) from None
    return pafs.LocalFileSystem(), text


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:  # a filesystem that cannot sync folders (some FUSE)
            raise
    finally:
        os.close(fd)


def _commit_local(path: Path, write: Callable[[BinaryIO], None]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the content is on disk before the name points at it
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # and the rename itself survives a power cut
    except OSError:
        with contextlib.suppress(OSError):  # the folder may be the unwritable thing
            tmp.unlink(missing_ok=True)
        raise


def _local(fs: pafs.FileSystem, where: Where) -> None:
    # An object store renames by copying: it needs a conditional put, added here later.
    if not isinstance(fs, pafs.LocalFileSystem):
        raise output_error(where, f"{fs.type_name} storage has no atomic commit yet; "
                           "use a local folder")


def commit(where: Where, write: Callable[[BinaryIO], None], *,
           fs: pafs.FileSystem | None = None) -> None:
    """Write what ``write`` puts into a binary file to ``where``, atomically (see above);
    any failure is ``OutputError`` and leaves the old content in place."""
    fs, path = locate(where, fs)
    _local(fs, where)
    try:
        _commit_local(Path(path), write)
    except OSError as e:
        raise output_error(path, e) from None


def commit_bytes(where: Where, data: bytes, *, fs: pafs.FileSystem | None = None) -> None:
    def write(f: BinaryIO) -> None:
        f.write(data)
    commit(where, write, fs=fs)


def commit_table(where: Where, table: pa.Table, *, fs: pafs.FileSystem | None = None) -> None:
    """One Parquet file holding ``table``."""
    def write(f: BinaryIO) -> None:
        pq.write_table(table, f)
    commit(where, write, fs=fs)


def check_writable(folder: Where, *, fs: pafs.FileSystem | None = None) -> None:
    """Fail before any request is sent, not after paying for the first answers."""
    fs, root = locate(folder, fs)
    _local(fs, folder)
    probe = Path(root) / f".write-probe-{uuid.uuid4().hex[:8]}"
    try:
        _commit_local(probe, lambda f: None)
        probe.unlink()
    except OSError as e:
        raise output_error(root, e) from None
