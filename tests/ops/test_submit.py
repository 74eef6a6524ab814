"""``batchrun submit`` against a REAL local Ray head started with ``ray start --head``.

The head gets its own ``--temp-dir`` and ports, and is torn down by killing the
process trees whose command lines name that temp dir: ``ray stop --force`` would
also kill the session's own Ray (conftest's ``ray_session``) and any other local
instance, so it is not used. This file never touches ``ray_session``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq
import pytest

from batchrun.ops.submit import auth_headers, entrypoint, job_client, submit_job, wait_for_job
from batchrun.ops.submit_entry import parser
from batchrun.sim import MockConfig, start_in_thread
from tests.conftest import make_prompts, write_spec

FAKE_KEY = "sk-batchrun-TEST-" + "7f3a9c" * 6  # distinctive: grep-able anywhere
ROWS = 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _is_ours(cmdline: list[str], temp_dir: str, gcs_port: int) -> bool:
    # most daemons name the temp dir; the Ray client server only names the GCS address
    return any(temp_dir in part or (part.startswith(("--address=", "--gcs-address="))
                                    and part.endswith(f":{gcs_port}")) for part in cmdline)


def _head_processes(temp_dir: str, gcs_port: int) -> list[psutil.Process]:
    """Every process of this head: those naming its temp dir or GCS, and descendants."""
    roots = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if _is_ours(p.info["cmdline"] or [], temp_dir, gcs_port):
                roots.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    procs = {p.pid: p for p in roots}
    for p in roots:
        try:
            procs.update((c.pid, c) for c in p.children(recursive=True))
        except psutil.NoSuchProcess:
            continue
    return list(procs.values())


def _stop_head(temp_dir: str, gcs_port: int) -> None:
    procs = _head_processes(temp_dir, gcs_port)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture(scope="module")
def head() -> Iterator[str]:
    """A local Ray head with the dashboard (job server) on a free loopback port."""
    temp_dir = tempfile.mkdtemp(prefix="brh-", dir="/tmp")  # short: unix socket paths
    dash, gcs_port = _free_port(), _free_port()
    env = dict(os.environ)
    # the job's entrypoint runs `python`: make it this interpreter (the venv)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).parent / "ray")
    cmd = [ray_bin, "start", "--head", "--num-cpus=2", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--port={gcs_port}", "--include-dashboard=true",
           f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
           f"--ray-client-server-port={_free_port()}",
           f"--dashboard-agent-listen-port={_free_port()}"]
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=60)
        os.environ["_BATCHRUN_TEST_GCS"] = f"127.0.0.1:{gcs_port}"  # for the ops test
        yield f"http://127.0.0.1:{dash}"
    finally:
        _stop_head(temp_dir, gcs_port)
        assert not _head_processes(temp_dir, gcs_port), "the test head left processes"
        shutil.rmtree(temp_dir, ignore_errors=True)


def _all_text(folder: Path) -> str:
    """Every file under ``folder``, Parquet decoded to text too, as one string."""
    out = []
    for p in folder.rglob("*"):
        if not p.is_file():
            continue
        out.append(p.read_bytes().decode("latin-1"))
        if p.suffix == ".parquet":
            out.append(str(pq.read_table(p).to_pylist()))
    return "\n".join(out)


def _dashboard_jobs(address: str) -> str:
    req = urllib.request.Request(f"{address}/api/jobs/", headers=auth_headers())
    with urllib.request.urlopen(req, timeout=10) as r:
        return str(r.read().decode())


def _run_submitted(head: str, spec_path: Path) -> tuple[str, Any, str]:
    """Submit, wait for the end; returns (submission id, client, every log line)."""
    t0 = time.monotonic()
    sid, pkg, client = submit_job(str(spec_path), address=head)
    assert not pkg.folder.exists()  # the local copy (key file included) is gone after upload
    logs: list[str] = []
    status = wait_for_job(client, sid, emit=logs.append, timeout_s=120)
    all_logs = "".join(logs) + client.get_job_logs(sid)
    assert status == "SUCCEEDED", all_logs[-3000:]
    print(f"{sid}: submit -> SUCCEEDED in {time.monotonic() - t0:.1f} s")
    return sid, client, all_logs


def _check_outputs(out: Path, rows: int) -> dict[str, Any]:
    results = sorted((out / "results").glob("shard-*.parquet"))
    ids = [i for f in results for i in pq.read_table(f, columns=["id"])["id"].to_pylist()]
    assert sorted(ids) == [f"r{i:06d}" for i in range(rows)]
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == rows
    return summary


def test_submit_demo_like_job(head: str, tmp_path: Path) -> None:
    """A simulated provider started inside the job; a made-up key; every row answered."""
    make_prompts(tmp_path / "data" / "in.parquet", ROWS, row_group=50)
    spec_path = write_spec(
        tmp_path, name="sub-demo", shard_rows=100, input="data/in.parquet", output="out",
        endpoint={"api_key_env": "BATCHRUN_SUBMIT_DEMO_KEY"},
        simulate={"rpm": 100_000, "latency_ms": 5, "fail_rate": 0.02},
    )
    _run_submitted(head, spec_path)
    summary = _check_outputs(tmp_path / "out", ROWS)
    assert summary["ok"] >= ROWS * 0.9, summary


def test_submit_key_reaches_job_but_shows_nowhere(head: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A provider (here, in this process) that accepts only FAKE_KEY: all rows ok proves
    the key reached the job; then look for it everywhere Ray shows a job."""
    make_prompts(tmp_path / "in.parquet", ROWS, row_group=50)
    with start_in_thread(MockConfig(api_key=FAKE_KEY)) as provider:
        spec_path = write_spec(tmp_path, name="sub-secret", shard_rows=100, endpoint={
            "api_key_env": "BATCHRUN_SUBMIT_TEST_KEY", "base_url": provider.base_url})
        monkeypatch.setenv("BATCHRUN_SUBMIT_TEST_KEY", FAKE_KEY)
        sid, client, all_logs = _run_submitted(head, spec_path)
    summary = _check_outputs(tmp_path / "out", ROWS)
    assert summary["ok"] == ROWS, summary  # a wrong or missing key: 401 on every row
    info: Any = client.get_job_info(sid)
    seen = {
        "job info": repr(info) + json.dumps(info.runtime_env or {}) + str(info.metadata),
        "entrypoint": info.entrypoint,
        "list_jobs": repr(client.list_jobs()),
        "GET /api/jobs/": _dashboard_jobs(head),
        "job logs": all_logs,
        "output folder": _all_text(tmp_path / "out"),
    }
    assert "submit_entry" in seen["entrypoint"]
    assert "sub-secret" in seen["GET /api/jobs/"]  # the search below looks at the right job
    for where, text in seen.items():
        assert FAKE_KEY not in text, f"the API key shows in {where}"
        assert FAKE_KEY[-12:] not in text, f"part of the API key shows in {where}"


def test_submit_fails_cleanly_on_missing_key(head: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """No simulated provider and no key here: refused before anything is uploaded."""
    from batchrun.errors import SecretError

    make_prompts(tmp_path / "in.parquet", 10)
    spec_path = write_spec(tmp_path, endpoint={"api_key_env": "BATCHRUN_NOPE_KEY"})
    monkeypatch.delenv("BATCHRUN_NOPE_KEY", raising=False)
    n_before = len(job_client(head).list_jobs())
    with pytest.raises(SecretError):
        submit_job(str(spec_path), address=head)
    assert len(job_client(head).list_jobs()) == n_before


def _ops(*args: str) -> str:
    """``python -m batchrun.cli.ops ARGS`` (a separate driver: this process may run Ray)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-m", "batchrun.cli.ops", *args], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_ops_status_list_stop_on_a_running_job(head: str, tmp_path: Path) -> None:
    """status JOB.yaml reads live progress from the actors; stop ID stops the job."""
    make_prompts(tmp_path / "in.parquet", 300, row_group=50)
    spec_path = write_spec(tmp_path, name="sub-live", shard_rows=100, workers=2,
                           limits={"rpm": 100_000, "max_concurrency": 2},
                           simulate={"latency_ms": 150})  # ~25 s of work: stopped before
    sid, _, client = submit_job(str(spec_path), address=head)
    gcs = os.environ["_BATCHRUN_TEST_GCS"]
    deadline, text = time.monotonic() + 40, ""
    while time.monotonic() < deadline and ": RUNNING" not in text:
        text = _ops("status", str(spec_path), "--address", gcs)
        time.sleep(0.5)
    assert "job sub-live: RUNNING (2 workers)" in text, text
    assert re.search(r"rows: +[\d,]+ / 300 on disk", text), text
    assert "rows/s" in text and "ETA" in text and "spend" in text, text

    assert sid in _ops("list", "--address", head)
    assert "RUNNING" in _ops("status", sid, "--address", head)
    assert "stop requested" in _ops("stop", sid, "--address", head)
    assert wait_for_job(client, sid, follow=False, timeout_s=30) == "STOPPED"
    text = _ops("status", str(spec_path), "--address", gcs)
    assert "job sub-live: NOT RUNNING (no live actors)" in text, text


def test_entrypoint_carries_run_flags_to_the_cluster() -> None:
    import shlex

    cmd = entrypoint("conda run -n 'py 3' python", "2026-11-24", retry_errors=True,
                     force=True)
    argv = shlex.split(cmd)
    assert argv[:6] == ["conda", "run", "-n", "py 3", "python", "-m"]
    args = parser().parse_args(argv[7:])
    assert (args.ds, args.retry_errors, args.force) == ("2026-11-24", True, True)
    plain = parser().parse_args(shlex.split(entrypoint("python"))[3:])
    assert (plain.ds, plain.retry_errors, plain.force) == (None, False, False)
