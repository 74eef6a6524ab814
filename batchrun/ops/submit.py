"""``batchrun submit``: package a job and hand it to a Ray cluster's job server.

What travels (a ``runtime_env`` uploaded by ``JobSubmissionClient``):

* ``working_dir``: a fresh temp folder holding ``job.yaml`` (the spec with ``{ds}``
  substituted and paths made absolute), a copy of the input when it is local and at
  most ``SMALL_INPUT_BYTES`` (``input/``, same relative layout, so default row ids do
  not change), and the key file (below). A larger input is not copied: its path must
  exist on the cluster's head node (shared storage or an object store mount) and the
  command says so. ``output:`` is written by the job's driver, on the head node.
* ``py_modules``: the ``batchrun`` package itself, from this checkout. That works on a
  local head and on a remote cluster alike without publishing a wheel; the cluster
  only needs batchrun's dependencies (Ray, aiohttp, pyarrow, pydantic, ...) installed,
  which a batchrun cluster image has. ``pip: [batchrun]`` would also install them but
  needs a package index reachable from every node, which a local head here has not.

The entrypoint is ``python -m batchrun.ops.submit_entry job.yaml [--ds D] [--retry-errors]
[--force]``.

The API key: route and threat model
-----------------------------------
Ray shows ``entrypoint``, ``metadata`` and ``runtime_env`` (``env_vars`` included) in
plain text to anyone who can read the dashboard, ``list_jobs`` or ``get_job_info``. So
the key goes in none of them. It is written to ``.batchrun-key`` (mode 0600, in a
0700 temp folder) inside the ``working_dir`` package; ``submit_entry`` reads it,
deletes it, and sets the variable named by ``endpoint.api_key_env`` in its own
process only, before calling ``run_job`` (which passes it to the workers through the
object store, as ``batchrun run`` does). The local temp folder is removed after the
upload.

Protected against: readers of the job list, job info, dashboard, job logs and the
output folder (nothing there holds the key; the test checks all of them).
A random nonce file goes into the package too, so its content-addressed name
(``gcs://_ray_pkg_<hash>.zip``, shown in job info) cannot confirm a guessed key.

Not protected against (all of them can already run code on the cluster, i.e. read
the driver's environment or the object store anyway): holders of the cluster's auth
token who fetch the package from the GCS before Ray garbage-collects it; root or the
Ray user on the head node while the job runs. In transit the package goes over the
dashboard's HTTP port, like the auth token itself: use an https address or an SSH
tunnel to a remote head. A Ray job is never restarted by Ray, so the deleted file
is not needed again; a re-submission uploads a new one.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from batchrun.errors import ClusterError, UserError
from batchrun.spec import JobSpec, load_spec, resolve_api_key

__all__ = [
    "DEFAULT_DASHBOARD",
    "KEY_FILE",
    "SMALL_INPUT_BYTES",
    "TERMINAL",
    "Package",
    "auth_headers",
    "dashboard_address",
    "entrypoint",
    "job_client",
    "package_job",
    "submit_job",
    "wait_for_job",
]

KEY_FILE = ".batchrun-key"
SPEC_FILE = "job.yaml"
SMALL_INPUT_BYTES = 64 * 1024 * 1024  # Ray's package limit is larger, but uploads are slow
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def auth_headers() -> dict[str, str]:
    """The ``Authorization`` header of Ray token auth, or none when no token is set up.

    Ray 2.60 reads the token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token (first found); a plain JobSubmissionClient does not send it.
    """
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = path.read_text().strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def dashboard_address(address: str | None) -> str:
    """The job server's URL: --address, else RAY_ADDRESS when it is a URL, else local."""
    addr = address or os.environ.get("RAY_ADDRESS") or DEFAULT_DASHBOARD
    if addr == "auto":
        addr = DEFAULT_DASHBOARD
    if "://" not in addr:
        raise UserError(f"--address {addr}: give the dashboard URL, e.g. http://HEAD:8265")
    return addr.rstrip("/")


def job_client(address: str | None) -> Any:
    """A JobSubmissionClient for the cluster, with the auth token when there is one."""
    from ray.job_submission import JobSubmissionClient

    addr = dashboard_address(address)
    try:
        return JobSubmissionClient(addr, headers=auth_headers())
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ClusterError(f"cannot reach the Ray job server at {addr}: {e}") from e


@dataclass
class Package:
    """A job ready to submit: its spec, runtime_env, and notes for the user."""

    spec: JobSpec
    folder: Path
    runtime_env: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def _copy_input(spec: JobSpec, dest: Path) -> tuple[str | None, str]:
    """Copy a small local input into ``dest/input``; returns (new input, note)."""
    from batchrun.io.shards import _root_of, input_files
    from batchrun.io.stores import is_store

    if is_store(spec.input):  # the cluster's workers read it from the store themselves
        return None, f"input {spec.input} is read from the store: nothing uploaded"
    files = input_files(spec)  # raises InputDataError when the path is not here
    size = sum(os.path.getsize(f) for f in files)
    if size > SMALL_INPUT_BYTES or not all(f.endswith(".parquet") for f in files):
        return None, (f"input {spec.input} ({size / 2**20:.0f} MiB) is not uploaded: "
                      "the same path must exist on the cluster's head node")
    root = _root_of(spec)
    for f in files:  # keep paths relative to the input root: default row ids stay the same
        target = dest / "input" / os.path.relpath(f, root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
    single = len(files) == 1 and os.path.isfile(spec.input)
    new = f"input/{os.path.relpath(files[0], root)}" if single else "input"
    return new, f"input uploaded with the job ({len(files)} file(s), {size / 2**20:.1f} MiB)"


def _write_key(spec: JobSpec, dest: Path, spec_path: str) -> None:
    """The key file (0600) the entrypoint reads and deletes; nothing when no key is needed."""
    if spec.endpoint.api_key_env is None:
        return
    if spec.simulate is not None and not os.environ.get(spec.endpoint.api_key_env):
        return  # the simulated provider makes one up on the cluster
    key = resolve_api_key(spec, spec_path=spec_path)
    assert key is not None
    path = dest / KEY_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)


def package_job(spec_path: str, ds: str | None, dest: Path) -> Package:
    """Write the job's working_dir into ``dest`` (an empty private folder)."""
    spec = load_spec(spec_path, ds=ds)
    notes: list[str] = []
    try:
        new_input, note = _copy_input(spec, dest)
    except UserError:  # not here: maybe it is on the cluster (s3 mount, shared disk)
        new_input, note = None, f"input {spec.input} is not on this machine: it must exist " \
                                "on the cluster's head node"
    notes.append(note)
    raw = spec.model_dump(mode="json", exclude_defaults=True)
    raw.update(name=spec.name, input=new_input or spec.input, output=spec.output)
    (dest / SPEC_FILE).write_text(yaml.safe_dump(raw, sort_keys=False))
    _write_key(spec, dest, spec_path)
    # a nonce, so the package's content hash (shown in job info) reveals nothing of the key
    (dest / ".nonce").write_text(secrets.token_hex(16))
    import batchrun

    runtime_env = {
        "working_dir": str(dest),
        "py_modules": [str(Path(batchrun.__file__).parent)],
        "excludes": ["__pycache__", "*.pyc"],
    }
    return Package(spec, dest, runtime_env, notes)


def _submission_id(spec: JobSpec, ds: str | None) -> str:
    stamp = ds or time.strftime("%Y%m%dT%H%M%S")
    return f"batchrun-{spec.name}-{stamp}-{secrets.token_hex(3)}"


def entrypoint(python: str, ds: str | None = None, *, retry_errors: bool = False,
               force: bool = False) -> str:
    """The command the cluster runs: ``submit_entry`` with the flags ``batchrun run`` takes."""
    parts = [*shlex.split(python), "-m", "batchrun.ops.submit_entry", SPEC_FILE]  # "conda run .."
    if ds:
        parts += ["--ds", ds]
    if retry_errors:
        parts.append("--retry-errors")
    if force:
        parts.append("--force")
    return shlex.join(parts)


def submit_job(spec_path: str, *, address: str | None = None, ds: str | None = None,
               python: str = "python", retry_errors: bool = False, force: bool = False
               ) -> tuple[str, Package, Any]:
    """Package and submit the job; returns (submission id, package, client)."""
    client = job_client(address)
    with tempfile.TemporaryDirectory(prefix="batchrun-submit-") as tmp:  # 0700
        pkg = package_job(spec_path, ds, Path(tmp))
        sid = _submission_id(pkg.spec, ds)
        metadata = {"batchrun_job": pkg.spec.name, "batchrun_spec": os.path.basename(spec_path),
                    "ds": ds or ""}
        try:
            client.submit_job(entrypoint=entrypoint(python, ds, retry_errors=retry_errors,
                                                    force=force),
                              runtime_env=pkg.runtime_env, metadata=metadata,
                              submission_id=sid)
        except RuntimeError as e:
            raise ClusterError(f"the job server refused the job: {e}") from e
    return sid, pkg, client


async def _tail(client: Any, sid: str, emit: Callable[[str], None]) -> None:
    async for chunk in client.tail_job_logs(sid):
        emit(chunk)


def wait_for_job(client: Any, sid: str, *, follow: bool = True, timeout_s: float | None = None,
                 emit: Callable[[str], None] = lambda s: print(s, end="", flush=True)) -> str:
    """Follow the job's logs (or just poll) until it ends; returns its final status."""
    if follow:
        try:
            asyncio.run(_tail(client, sid, emit))
        except Exception as e:  # the log stream is a convenience: fall back to polling
            emit(f"(log stream ended: {e}; polling the job status)\n")
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(sid)).split(".")[-1]
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise ClusterError(f"job {sid} still {status} after {timeout_s:.0f} s")
        time.sleep(1.0)
