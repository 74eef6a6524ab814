"""io/resume: one fingerprint for both modes, by content and by the name relative to the
input root, so the same files read from another absolute path (a moved checkout, another
mount) resume, a changed file is refused unless --force, and a job.json written with
absolute names by an older batchrun still resumes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from batchrun.batch import run_batch_job
from batchrun.errors import ResumeRefused
from batchrun.io.resume import check_fingerprint
from batchrun.io.shards import validate_input
from batchrun.runner import RunOptions, run_job
from batchrun.sim import MockConfig, start_in_thread
from batchrun.spec import JobSpec, load_spec
from tests.conftest import make_prompts, write_spec

pytestmark = pytest.mark.timeout(120)

KEY_ENV = "BATCHRUN_TEST_MOVE_KEY"
KEY = "sk-move-secret-1"


def _spec(tmp_path: Path, data: Path, **extra: Any) -> JobSpec:
    """The job reading ``data`` (a folder), always into tmp_path/out."""
    folder = tmp_path / f"spec-{data.parent.name}"
    folder.mkdir(exist_ok=True)
    return load_spec(write_spec(folder, input=str(data), output=str(tmp_path / "out"), **extra))


def _inputs(tmp_path: Path) -> Path:
    data = tmp_path / "a" / "data"
    make_prompts(data / "in.parquet", 30, row_group=10)
    make_prompts(data / "more" / "x.parquet", 10, start=30)
    return data


def _moved(tmp_path: Path, data: Path) -> Path:
    """The same files under another absolute path, with other mtimes."""
    dest = tmp_path / "b" / "data"
    shutil.copytree(data, dest)
    for f in dest.rglob("*.parquet"):
        os.utime(f, (1_000_000, 1_000_000))
    return dest


def _check(spec: JobSpec, *, force: bool = False) -> None:
    check_fingerprint(spec, validate_input(spec), force=force)


def _job_json(tmp_path: Path) -> dict[str, Any]:
    return dict(json.loads((tmp_path / "out" / "job.json").read_text()))


def test_same_files_from_another_path_resume_a_changed_one_is_refused(tmp_path: Path) -> None:
    data = _inputs(tmp_path)
    _check(_spec(tmp_path, data))
    assert [i["name"] for i in _job_json(tmp_path)["inputs"]] == ["in.parquet", "more/x.parquet"]
    moved = _moved(tmp_path, data)
    _check(_spec(tmp_path, moved))  # same content, other place and mtimes: resumes

    make_prompts(moved / "more" / "x.parquet", 11, start=30)  # one more row
    with pytest.raises(ResumeRefused, match=r"input more/x\.parquet changed"):
        _check(_spec(tmp_path, moved))
    _check(_spec(tmp_path, moved), force=True)  # --force keeps the old results
    _check(_spec(tmp_path, moved))  # and records the new input

    (moved / "more" / "x.parquet").rename(moved / "more" / "y.parquet")  # default ids move
    with pytest.raises(ResumeRefused, match="the set of input files changed"):
        _check(_spec(tmp_path, moved))


def _old_style(tmp_path: Path, names: list[str]) -> None:
    """job.json as batchrun wrote it before: names as the spec gave them, no ``names``."""
    doc = _job_json(tmp_path)
    doc.pop("names", None)
    for entry, name in zip(doc["inputs"], names, strict=True):
        entry["name"] = name
    (tmp_path / "out" / "job.json").write_text(json.dumps(doc))


def test_an_old_job_json_with_absolute_names_resumes(tmp_path: Path) -> None:
    data = _inputs(tmp_path)
    _check(_spec(tmp_path, data))
    _old_style(tmp_path, [str(data / "in.parquet"), str(data / "more" / "x.parquet")])
    moved = _moved(tmp_path, data)
    _check(_spec(tmp_path, moved))  # the checkout moved since the old run
    doc = _job_json(tmp_path)
    assert doc["names"] == "relative" and doc["inputs"][0]["name"] == "in.parquet"

    _old_style(tmp_path, [str(data / "in.parquet"), str(data / "more" / "x.parquet")])
    make_prompts(moved / "in.parquet", 30, row_group=15)  # same rows, other content
    with pytest.raises(ResumeRefused, match=r"input in\.parquet changed"):
        _check(_spec(tmp_path, moved))
    # names the spec gave relative to the old working folder match by their ending too
    _old_style(tmp_path, ["a/data/in.parquet", "a/data/more/x.parquet"])
    make_prompts(moved / "in.parquet", 30, row_group=10)
    _check(_spec(tmp_path, moved))
    _old_style(tmp_path, [str(data / "in.parquet"), str(data / "other" / "x.parquet")])
    with pytest.raises(ResumeRefused, match="the set of input files changed"):
        _check(_spec(tmp_path, moved))


def test_both_modes_resume_a_moved_input_and_refuse_a_changed_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    data = _inputs(tmp_path)
    with start_in_thread(MockConfig(api_key=KEY)) as srv:
        settings = {"mode": "batch", "shard_rows": 20,
                    "batch": {"max_requests_per_file": 20, "poll_interval_s": 0.2},
                    "endpoint": {"base_url": srv.base_url, "api_key_env": KEY_ENV}}
        out = run_batch_job(_spec(tmp_path, data, **settings), initial_poll_s=0.1)
        assert out.done and len(out.batches) == 2
        sent = len(srv.records())
        moved = _moved(tmp_path, data)
        again = run_batch_job(_spec(tmp_path, moved, **settings), initial_poll_s=0.1)
        assert again.done and again.batches == out.batches  # nothing new planned
        spec_path = tmp_path / f"spec-{moved.parent.name}" / "job.yaml"
        summary = run_job(str(spec_path), RunOptions(progress=False, mode="online"))
        assert summary.rows == summary.ok == 40 and summary.rows_this_run == 0
        assert len(srv.records()) == sent  # neither mode sent a request again

        make_prompts(moved / "in.parquet", 30, row_group=15)  # other content
        with pytest.raises(ResumeRefused, match=r"input in\.parquet changed"):
            run_batch_job(_spec(tmp_path, moved, **settings), initial_poll_s=0.1)
        with pytest.raises(ResumeRefused, match=r"input in\.parquet changed"):
            run_job(str(spec_path), RunOptions(progress=False, mode="online"))
        assert len(srv.records()) == sent
