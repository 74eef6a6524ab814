"""Helpers of the engine tests: a job whose engine is batchrun's own simulated provider,
run by a driver subprocess against a ``ray.cluster_utils.Cluster``.

The test process never connects to this cluster (another test's session Ray may live in
it): drivers are subprocesses (`batchrun run --address`), which is also what a Ctrl-C
test needs. Every process an engine job starts has the test's folder in its command
line, so the process table tells whether any is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.conftest import make_prompts, write_spec

REPO = Path(__file__).resolve().parents[2]


def engine_command(folder: Path, *args: str) -> str:
    return (f"env PYTHONPATH={REPO} {sys.executable} -m batchrun mock-server --host {{host}} "
            f"--port {{port}} --ledger-file {folder}/ledger-{{port}}.jsonl " + " ".join(args))


def engine_job(folder: Path, rows: int, engine: dict[str, Any], **over: Any) -> Path:
    make_prompts(folder / "in.parquet", rows)
    spec = {"limits": None, "workers": 2, "shard_rows": 100, "flush_rows": 50,
            "retry": {"max_attempts": 8, "backoff_base_s": 0.05, "backoff_cap_s": 0.5},
            "engine": {"replicas": 2, "resources": {"CPU": 1}, "startup_timeout_s": 60,
                       "max_concurrency_per_replica": 8, **engine}}
    spec.update(over)
    return write_spec(folder, **spec)


def start_driver(spec: Path, address: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "0"}
    return subprocess.Popen(
        [sys.executable, "-m", "batchrun", "run", str(spec), "--address", address,
         "--no-progress"], cwd=REPO, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def run_driver(spec: Path, address: str, timeout: float = 180) -> tuple[int, str, str]:
    p = start_driver(spec, address)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    return p.returncode, out, err


def summary_of(folder: Path) -> dict[str, Any]:
    return dict(json.loads((folder / "out" / "summary.json").read_text()))


def ledgers(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Each engine server's request ledger, by file (one per port: a restart adds one)."""
    out = {}
    for f in sorted(folder.glob("ledger-*.jsonl")):
        out[f.name] = [r for line in f.read_text().splitlines()
                       if (r := json.loads(line)) and "reset" not in r]
    return out


def processes_with(text: str) -> list[tuple[int, str]]:
    """Live processes (not zombies) whose command line holds ``text``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmd and state != "Z":
            found.append((int(pid), cmd))
    return found


def wait_for(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
