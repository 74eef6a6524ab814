"""Processes of a local run, seen from other terminals: status/stop, and the provider.

* ``batchrun run JOB.yaml`` with a local Ray (no --address), in a subprocess; then
  ``batchrun status JOB.yaml`` and ``batchrun stop JOB.yaml`` as other subprocesses must
  join that very cluster although another one runs on the machine (this session's own
  ``ray_session``), and say which cluster they joined.
* the simulated provider a driver starts dies with that driver, even by ``kill -9``.

The run gets its own RAY_TMPDIR; whatever it leaves is ended by pid (never ``ray stop``,
which would end every Ray on the machine).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import make_prompts, write_spec

pytestmark = pytest.mark.timeout(240)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "COLUMNS": "200", **extra}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batchrun", *args], capture_output=True,
                          text=True, env=_env(), cwd=cwd, timeout=120)


def _procs_naming(folder: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(folder in part for part in p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _gcs_of(ray_tmp: str) -> str | None:
    """The GCS address of the Ray whose raylet runs under ``ray_tmp`` (from its cmdline)."""
    for p in _procs_naming(ray_tmp):
        with_gcs = [a for a in p.info["cmdline"] if a.startswith("--gcs-address=")]
        if with_gcs:
            return with_gcs[0].split("=", 1)[1]
    return None


@pytest.fixture
def ray_tmp() -> Iterator[str]:
    """A short RAY_TMPDIR of its own (socket paths are length-limited); every process
    left naming it is ended by pid afterwards."""
    folder = tempfile.mkdtemp(prefix="br-ops-")
    yield folder
    for p in _procs_naming(folder):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            continue
    shutil.rmtree(folder, ignore_errors=True)


def _wait_running(spec: Path, run: subprocess.Popen[str], ray_tmp: str,
                  deadline_s: float) -> str:
    deadline, text = time.monotonic() + deadline_s, ""
    while time.monotonic() < deadline and run.poll() is None:
        if _gcs_of(ray_tmp) is not None:  # the run's Ray is up
            p = _cli("status", str(spec), cwd=spec.parent)
            text = p.stdout + p.stderr
            if ": RUNNING" in text:
                return text
        time.sleep(1)
    raise AssertionError(f"the run never showed as RUNNING: {text!r} (run rc={run.poll()})")


def test_status_and_stop_find_a_local_run_from_another_process(
        ray_session: None, tmp_path: Path, ray_tmp: str) -> None:
    # ray_session: a second local Ray on this machine, so that joining "any" cluster
    # (Ray's address="auto") can pick the wrong one
    make_prompts(tmp_path / "in.parquet", 400)
    spec = write_spec(tmp_path, name="ops-local", workers=1, shard_rows=400,
                      limits={"rpm": 100_000, "max_concurrency": 2},
                      simulate={"latency_ms": 1000})  # ~200 s of work: stopped long before
    run = subprocess.Popen(
        [sys.executable, "-m", "batchrun", "run", str(spec), "--no-dashboard", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        env=_env(RAY_TMPDIR=ray_tmp), start_new_session=True)
    try:
        status = _wait_running(spec, run, ray_tmp, deadline_s=120)
        gcs = _gcs_of(ray_tmp)
        assert gcs is not None
        assert f"ray cluster: {gcs}\n" in status, status
        assert "job ops-local: RUNNING (1 workers)" in status, status

        stop = _cli("stop", str(spec), cwd=tmp_path)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert f"ray cluster: {gcs}\n" in stop.stdout, stop.stdout
        killed = re.search(r"job ops-local: killed (\d+) actor", stop.stdout)
        assert killed and int(killed.group(1)) > 0, stop.stdout
        log, _ = run.communicate(timeout=90)
        assert run.returncode not in (0, None), log
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()

    # the run is over and its Ray with it: neither command starts or joins another one
    for command in ("status", "stop"):
        p = _cli(command, str(spec), cwd=tmp_path)
        assert p.returncode not in (0, 2), p.stdout + p.stderr
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
        assert "has ended" in lines[0] and "ray cluster:" not in p.stdout, p.stdout + p.stderr
    assert "/ 400 rows on disk" in p.stderr or "nothing to stop" in p.stderr


_DRIVER = """
import sys, time
from batchrun.sim.for_spec import simulated_provider
from batchrun.spec import load_spec
import psutil
with simulated_provider(load_spec(sys.argv[1])) as spec:
    kids = psutil.Process().children()
    print(kids[0].pid, spec.endpoint.base_url, flush=True)
    time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_simulated_provider_dies_with_a_killed_driver(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, simulate={"latency_ms": 0})
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, str(spec)], text=True,
                              stdout=subprocess.PIPE, env=_env())
    provider = None
    try:
        assert driver.stdout is not None
        provider, url = driver.stdout.readline().split()
        provider_pid = int(provider)
        assert "127.0.0.1" in url and not _gone(provider_pid)
        driver.kill()  # SIGKILL: no finally, no atexit in the driver
        driver.wait()
        deadline = time.monotonic() + 15
        while not _gone(provider_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(provider_pid), "the simulated provider outlived its driver"
    finally:
        driver.kill()
        if provider is not None and not _gone(int(provider)):
            psutil.Process(int(provider)).kill()
