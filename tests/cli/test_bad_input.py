"""Bad input: one line naming the file, field or column and the fix; exit 2; no traceback.

Each case runs the real CLI in a subprocess, as a user would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import make_prompts, write_spec

pytestmark = pytest.mark.timeout(60)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "batchrun", *args], capture_output=True,
                          text=True, env=e, timeout=60)


def assert_clean_error(p: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    make_prompts(tmp_path / "in.parquet", 10)
    return tmp_path


def spec_with(folder: Path, **kw) -> str:
    kw.setdefault("endpoint", {"base_url": "http://127.0.0.1:9/v1"})
    return str(write_spec(folder, **kw))


CASES = {
    "input missing": ({"input": "nope/missing.parquet"}, ["input", "no such file"]),
    "column missing": ({"prompt_column": "question"}, ["'question'", "column"]),
    "max_tokens missing": ({"generation": {"temperature": 0.1}}, ["generation.max_tokens"]),
    "max_tokens zero": ({"generation": {"max_tokens": 0}}, ["generation.max_tokens"]),
    "rpm zero": ({"limits": {"rpm": 0}}, ["limits.rpm"]),
    "unknown key": ({"limits": {"rpm": 10, "rmp": 5}}, ["limits.rmp", "unknown key"]),
    "bad base_url": ({"endpoint": {"base_url": "api.openai.com/v1"}}, ["endpoint.base_url"]),
    "insecure http": ({"endpoint": {"base_url": "http://api.example.com/v1"}},
                      ["endpoint", "allow_insecure_http"]),
    "key unset": ({"endpoint": {"base_url": "http://127.0.0.1:9/v1",
                                "api_key_env": "BATCHRUN_TEST_UNSET_KEY"}},
                  ["endpoint.api_key_env", "BATCHRUN_TEST_UNSET_KEY"]),
    "unpriced model": ({"model": "my-private-model"}, ["price", "my-private-model"]),
    # the carried value would overwrite the row's own id in its result
    "carry a result column": ({"carry_columns": ["topic", "id"]}, ["carry_columns", "'id'"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_spec_errors_are_one_line_exit_2(folder: Path, case: str) -> None:
    overrides, needles = CASES[case]
    env = {"BATCHRUN_TEST_UNSET_KEY": ""}  # empty counts as unset
    assert_clean_error(run_cli("run", spec_with(folder, **overrides), "--no-dashboard", env=env),
                       *needles)


def test_invalid_yaml(tmp_path: Path) -> None:
    p = tmp_path / "job.yaml"
    p.write_text("name: x\nlimits: {rpm: 10\n")
    assert_clean_error(run_cli("run", str(p)), "job.yaml", "invalid YAML")


def test_folder_without_parquet(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert_clean_error(run_cli("run", spec_with(tmp_path, input=str(tmp_path / "empty"))),
                       "holds no Parquet")


def test_prompt_column_of_wrong_type(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": ["a"], "prompt": [3]}), tmp_path / "in.parquet")
    assert_clean_error(run_cli("run", spec_with(tmp_path)), "'prompt'", "not text")


def test_messages_column_of_wrong_type(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": ["a"], "msgs": ["hello"]}), tmp_path / "in.parquet")
    p = spec_with(tmp_path, prompt_column=None, messages_column="msgs")
    assert_clean_error(run_cli("run", p), "'msgs'", "role and content")


def test_duplicate_ids_named_before_anything_is_sent(tmp_path: Path) -> None:
    ids = [f"x{i}" for i in range(50)] + ["x3", "x7"]
    pq.write_table(pa.table({"id": ids, "prompt": ["p"] * len(ids), "topic": ["t"] * len(ids)}),
                   tmp_path / "in.parquet")
    assert_clean_error(run_cli("run", spec_with(tmp_path)), "duplicate ids", "x3", "x7")
    assert not (tmp_path / "out" / "results").exists()


def test_changed_input_refuses_resume_unless_forced(tmp_path: Path) -> None:
    from batchrun.io.resume import check_fingerprint
    from batchrun.spec import load_spec

    make_prompts(tmp_path / "in.parquet", 10)
    spec_path = spec_with(tmp_path)
    spec = load_spec(spec_path)
    check_fingerprint(spec, [spec.input], force=False)
    make_prompts(tmp_path / "in.parquet", 12)  # the input changed
    assert_clean_error(run_cli("run", spec_path), "different job", "--force")
    write_spec(tmp_path, endpoint={"base_url": "http://127.0.0.1:9/v1"},
               generation={"max_tokens": 99})
    assert_clean_error(run_cli("run", spec_path), "request fields changed", "generation")
