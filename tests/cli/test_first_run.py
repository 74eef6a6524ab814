"""What a new user meets first: the install, --version, --limit, the final screen, any cwd."""

from __future__ import annotations

import ast
import logging
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from importlib.metadata import packages_distributions, version
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchrun.runner import RunOptions, _prepare, run_job
from batchrun.sim import MockConfig, start_subprocess
from tests.conftest import make_prompts, write_spec

ROOT = Path(__file__).resolve().parents[2]
BATCHRUN = str(Path(sys.executable).with_name("batchrun"))


def _module_level_imports(path: Path) -> set[str]:
    """Top-level names imported when the module loads (not the lazy ones in functions)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _requirement_name(req: str) -> str:
    return re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_every_import_of_the_core_is_a_declared_dependency():
    """`pip install -e .` alone must run the demo: a module the core imports at load time
    must come from `dependencies`, not from an extra (numpy once came only with [gpu])."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {_requirement_name(d) for d in deps}
    dist_of = packages_distributions()
    missing = {}
    for path in (ROOT / "batchrun").rglob("*.py"):
        if "commcheck" in path.parts:  # its own optional extra; imports torch lazily
            continue
        for name in _module_level_imports(path):
            if name in sys.stdlib_module_names or name == "batchrun":
                continue
            dists = {d.lower().replace("_", "-") for d in dist_of.get(name, [name])}
            if not dists & declared:
                missing[name] = str(path.relative_to(ROOT))
    assert not missing, f"imported at load time but not in dependencies: {missing}"


def test_version_flag():
    out = subprocess.run([BATCHRUN, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert out.stdout.startswith(f"batchrun {version('batchrun')} (ray {version('ray')}")


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(180)
def test_limit_is_a_smoke_test_a_full_run_continues(tmp_path):
    make_prompts(tmp_path / "in.parquet", 500)
    with start_subprocess(MockConfig(seed=3)) as server:
        spec = write_spec(tmp_path, endpoint={"base_url": server.base_url})
        smoke = run_job(str(spec), RunOptions(progress=False, limit=120))
        first = pq.read_table(sorted((tmp_path / "out" / "results").glob("*.parquet")))
        full = run_job(str(spec), RunOptions(progress=False))
        stats = server.stats()
    # exactly the input's first 120 rows, in the same output a full run uses
    assert sorted(first["id"].to_pylist()) == [f"r{i:06d}" for i in range(120)]
    assert smoke.rows == 120 and smoke.unsent == 0
    assert full.rows == 500 and full.ok == 500 and full.rows_this_run == 380
    assert stats["ok"] == 500 and stats["duplicate_ok_prompts"] == 0  # none sent twice


def test_limit_refused_with_batch_mode(tmp_path):
    from batchrun.errors import UserError

    make_prompts(tmp_path / "in.parquet", 10)
    spec = write_spec(tmp_path, endpoint={"base_url": "http://127.0.0.1:9/v1"})
    with pytest.raises(UserError, match=r"--limit.*instead of --mode batch"):
        _prepare(str(spec), RunOptions(mode="batch", limit=5))


def test_limit_with_batch_mode_in_the_spec_says_to_add_mode_online(tmp_path):
    from batchrun.errors import UserError

    make_prompts(tmp_path / "in.parquet", 10)
    spec = write_spec(tmp_path, endpoint={"base_url": "http://127.0.0.1:9/v1"}, mode="batch")
    with pytest.raises(UserError) as refused:
        _prepare(str(spec), RunOptions(limit=5))  # the user never passed --mode batch
    assert "add --mode online" in str(refused.value)
    assert "drop" not in str(refused.value)
    assert _prepare(str(spec), RunOptions(limit=5, mode="online")).total == 5


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(180)
def test_a_repeated_limit_run_says_the_first_rows_have_results_not_complete(tmp_path):
    from typer.testing import CliRunner

    from batchrun.cli import app

    make_prompts(tmp_path / "in.parquet", 300)
    with start_subprocess(MockConfig()) as server:
        spec = write_spec(tmp_path, endpoint={"base_url": server.base_url})
        run_job(str(spec), RunOptions(progress=False, limit=50))
        again = CliRunner().invoke(app, ["run", str(spec), "--no-progress", "--limit", "50"])
        assert server.stats()["total_requests"] == 50
    assert again.exit_code == 0, again.output
    assert "the first 50 rows already have results; run without --limit to send the rest" in (
        again.output)
    assert "already complete" not in again.output


def test_no_wait_with_simulate_is_refused_for_every_caller(tmp_path):
    """Refused in run_job itself (the CLI, a submitted job and Python all pass there),
    before the simulated provider starts: its batches would die with this process."""
    from batchrun.errors import UserError

    make_prompts(tmp_path / "in.parquet", 10)
    spec = write_spec(tmp_path, mode="batch", simulate={"seed": 1})
    with pytest.raises(UserError, match="--no-wait cannot be used with simulate:"):
        run_job(str(spec), RunOptions(progress=False, wait=False))
    assert not (tmp_path / "out" / "batches").exists()


def test_huge_max_tokens_is_warned_with_its_worst_case(tmp_path, caplog):
    make_prompts(tmp_path / "in.parquet", 10)
    spec = write_spec(tmp_path, endpoint={"base_url": "http://127.0.0.1:9/v1"},
                      generation={"max_tokens": 1_000_000_000})
    with caplog.at_level(logging.WARNING, logger="batchrun"):
        _prepare(str(spec), RunOptions())
    text = caplog.text
    assert "max_tokens=1,000,000,000" in text and "$1,600.00" in text  # gpt-4.1-mini: $1.6/1M


@pytest.mark.timeout(240)
def test_runs_from_a_folder_holding_a_batchrun_directory(tmp_path):
    """A checkout's parent folder holds a directory named batchrun (the checkout): Ray puts
    the current folder first on its workers' path, where it used to shadow the package."""
    make_prompts(tmp_path / "in.parquet", 60)
    spec = write_spec(tmp_path, simulate={"rpm": 100_000}, endpoint={"api_key_env": "SIM_K"})
    cwd = tmp_path / "parent"
    (cwd / "batchrun" / "batchrun").mkdir(parents=True)  # a checkout: no __init__.py on top
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    out = subprocess.run([BATCHRUN, "run", str(spec), "--no-dashboard", "--no-progress"],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=220)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    results = pq.read_table(sorted((tmp_path / "out" / "results").glob("*.parquet")))
    assert results.num_rows == 60 and set(results["status"].to_pylist()) == {"ok"}
    # the final screen says where the results are
    assert f"results: {tmp_path / 'out'}/results/" in out.stderr.replace("\n", "")


@pytest.mark.timeout(240)
def test_ctrl_c_is_one_line_and_a_rerun_finishes(tmp_path):
    make_prompts(tmp_path / "in.parquet", 800)
    spec = write_spec(tmp_path, simulate={"rpm": 100_000, "latency_ms": 100},
                      endpoint={"api_key_env": "SIM_K"},
                      limits={"rpm": 100_000, "max_concurrency": 16}, flush_rows=20)
    cmd = [BATCHRUN, "run", str(spec), "--no-dashboard", "--no-progress"]
    # a background job of a shell may inherit SIGINT ignored: restore the default
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list((tmp_path / "out").glob("parts/*/*.parquet")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=200)
    assert again.returncode == 0, again.stderr[-2000:]
    results = pq.read_table(sorted((tmp_path / "out" / "results").glob("*.parquet")))
    assert sorted(results["id"].to_pylist()) == [f"r{i:06d}" for i in range(800)]
