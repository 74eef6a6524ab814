"""io/storage: the one atomic commit (old or new content, never torn, fsynced file and
folder) and the one "cannot write" message, used by every state file and results file."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from batchrun.errors import OutputError
from batchrun.io import storage
from batchrun.io.resume import check_fingerprint
from batchrun.io.shards import record_plan
from batchrun.io.summary import Summary, save_summary
from batchrun.io.writer import ResultsStore, result_schema
from batchrun.spec import load_spec
from tests.conftest import make_prompts, write_spec

pytestmark = pytest.mark.timeout(120)

WORDING = ("; fix the folder's permissions and run the same command again (it resumes), "
           "or choose another output")


def test_commit_replaces_bytes_and_tables_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "state.json"
    storage.commit_bytes(target, b"old")
    storage.commit_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    table = pa.table({"id": ["a", "b"], "n": [1, 2]})
    storage.commit_table(tmp_path / "t.parquet", table)
    assert pq.read_table(tmp_path / "t.parquet").equals(table)
    storage.commit_bytes(f"file://{tmp_path}/uri.json", b"by uri")  # a URI names the fs
    assert (tmp_path / "uri.json").read_bytes() == b"by uri"
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]


def test_commit_fsyncs_the_file_then_renames_then_fsyncs_the_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, Any]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        events.append(("fsync", ("dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino)))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(("replace", None))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "job.json"
    storage.commit_bytes(target, b"{}")
    monkeypatch.undo()
    assert events == [("fsync", ("file", target.stat().st_ino)), ("replace", None),
                      ("fsync", ("dir", tmp_path.stat().st_ino))]


_CRASH = """
import os, sys
from batchrun.io import storage
path, content, when = sys.argv[1], sys.argv[2].encode(), sys.argv[3]
real_replace, real_fsync = os.replace, os.fsync
def replace(a, b):  # the test's own crash point, in this throwaway process only
    if when == "before-replace":
        os._exit(9)
    real_replace(a, b)
def fsync(fd):
    real_fsync(fd)
    if when == "after-replace" and os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
        os._exit(9)
os.replace, os.fsync = replace, fsync
storage.commit_bytes(path, content)
"""


@pytest.mark.parametrize(("when", "expected"), [("before-replace", b"old"),
                                                ("after-replace", b"new")])
def test_a_crash_around_the_rename_leaves_old_or_new(tmp_path: Path, when: str,
                                                     expected: bytes) -> None:
    target = tmp_path / "plan.json"
    storage.commit_bytes(target, b"old")
    p = subprocess.run([sys.executable, "-c", _CRASH, str(target), "new", when],
                       capture_output=True, timeout=60)
    assert p.returncode == 9, p.stderr
    assert target.read_bytes() == expected


_LOOP = """
import sys
from batchrun.io import storage
path, size = sys.argv[1], int(sys.argv[2])
blobs = [b"a" * size, b"b" * size]
i = 0
while True:
    storage.commit_bytes(path, blobs[i % 2])
    if i == 0:
        print("first", flush=True)
    i += 1
"""


def test_kill_9_in_the_middle_of_commits_never_leaves_a_torn_file(tmp_path: Path) -> None:
    size = 4 << 20  # large enough that a kill often lands inside a write
    target = tmp_path / "summary.json"
    seen = set()
    for delay in (0.0, 0.03, 0.07, 0.11, 0.2, 0.35):
        proc = subprocess.Popen([sys.executable, "-c", _LOOP, str(target), str(size)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline() == "first\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        data = target.read_bytes()
        whole = data in (b"a" * size, b"b" * size)
        assert whole, (len(data), data[:1], data[-1:])
        seen.add(data[:1])
    assert seen  # the file was readable whole after every kill


def test_other_filesystems_commit_by_one_whole_upload(tmp_path: Path) -> None:
    """A filesystem other than the local one (an object store) gets the content staged in
    the process and uploaded whole at commit; a failed write leaves nothing behind."""
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    staged = storage.Staged("x.json", fs=fs)
    staged.write(b"{}")
    assert not (tmp_path / "x.json").exists()  # nothing visible before the commit
    staged.commit()
    assert (tmp_path / "x.json").read_bytes() == b"{}"
    with pytest.raises(RuntimeError):
        storage.commit("y.json", lambda f: (_ for _ in ()).throw(RuntimeError("x")), fs=fs)
    assert not (tmp_path / "y.json").exists()


# -- D4: one wording, whoever writes ------------------------------------------------------

def _set_writable(d: Path, writable: bool) -> None:
    """Permission bits do not stop root; the immutable attribute does."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i" if writable else "+i", str(d)], check=True)
    else:
        d.chmod(stat.S_IRWXU if writable else stat.S_IRUSR | stat.S_IXUSR)


@pytest.fixture
def blocked(tmp_path: Path) -> Iterator[Path]:
    """An output folder that exists and can be read, but not written."""
    out = tmp_path / "out"
    out.mkdir()
    _set_writable(out, False)
    yield out
    _set_writable(out, True)


def _callers(tmp_path: Path, out: Path) -> dict[str, Any]:
    make_prompts(tmp_path / "in.parquet", 20)
    spec = load_spec(write_spec(tmp_path, output=str(out)))
    files = [str(tmp_path / "in.parquet")]
    store = ResultsStore(out, result_schema())
    summary = Summary.model_construct()
    return {
        "check_writable": lambda: store.check_writable(),
        "write_part": lambda: store.write_part("shard-000000", _one_row()),
        "check_fingerprint": lambda: check_fingerprint(spec, files, force=False),
        "record_plan": lambda: record_plan(spec, files),
        "save_summary": lambda: save_summary(summary, out / "summary.json"),
    }


def _one_row() -> pa.Table:
    schema = result_schema()
    return pa.Table.from_pylist([{"id": "r1", "status": "ok"}], schema=schema)


@pytest.mark.parametrize("caller", ["check_writable", "write_part", "check_fingerprint",
                                    "record_plan", "save_summary"])
def test_every_writer_says_the_one_message(tmp_path: Path, blocked: Path, caller: str) -> None:
    out = blocked
    with pytest.raises(OutputError) as e:
        _callers(tmp_path, out)[caller]()
    text = str(e.value)
    assert text.startswith(f"output: cannot write {out}"), text
    assert text.endswith(WORDING) and "\n" not in text, text
    assert e.value.exit_code == 3


def test_output_error_wording() -> None:
    err = storage.output_error("/o/job.json", PermissionError(13, "Permission denied"))
    assert str(err) == f"output: cannot write /o/job.json: Permission denied{WORDING}"
    assert str(storage.output_error("/o/x", "disk gone", verb="read")).startswith(
        "output: cannot read /o/x: disk gone;")
