"""Operating jobs on a cluster: ``submit``, ``status``, ``logs``, ``stop``, ``list``.

Plain functions; the main CLI mounts them (``app.command("submit")(submit_command)``).
Two kinds of target:

* a submission id (``batchrun-<job>-...``): the Ray job server over HTTP
  (``--address http://HEAD:8265``, token auth handled by ``submit.job_client``);
* a job spec (``JOB.yaml``): this process joins the cluster as a Ray driver
  (``--address auto`` or RAY_ADDRESS) and talks to the job's named actors,
  ``batchrun:<job>:worker-N`` and ``batchrun:<job>:rate-limiter``.

Every ``ray.get`` here has a timeout: a busy or dying actor must not hang ``status``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Column, Table

from batchrun.cli.common import clean_errors, err_console
from batchrun.errors import ClusterError, UserError
from batchrun.io import stores
from batchrun.online.ray_cluster import NoClusterError
from batchrun.spec import JobSpec, load_spec

__all__ = [
    "actor_progress",
    "disk_progress",
    "list_command",
    "logs_command",
    "ops_app",
    "status_command",
    "stop_command",
    "submit_command",
]

ACTOR_TIMEOUT_S = 5.0
out = Console(highlight=False, soft_wrap=True)


def _is_spec(target: str) -> bool:
    return target.endswith((".yaml", ".yml")) or os.path.isfile(target)


@clean_errors
def submit_command(
    spec: str = typer.Argument(..., help="Job spec YAML."),
    address: str = typer.Option(None, "--address", help="Dashboard URL, http://HEAD:8265."),
    wait: bool = typer.Option(False, "--wait", help="Follow the logs; exit with the result."),
    ds: str = typer.Option(None, "--ds", help="Run date substituted for {ds} in paths."),
    no_dashboard_url: bool = typer.Option(False, "--no-dashboard-url",
                                          help="Do not print the dashboard link."),
    python: str = typer.Option("python", "--python", help="Python on the cluster's head."),
    retry_errors: bool = typer.Option(False, "--retry-errors",
                                      help="Re-send the rows whose result is an error."),
    force: bool = typer.Option(False, "--force",
                               help="Resume although the inputs or request fields changed."),
) -> None:
    """Submit a job to a Ray cluster (the API key travels outside Ray's job records)."""
    from batchrun.ops.submit import dashboard_address, submit_job, wait_for_job

    sid, pkg, client = submit_job(spec, address=address, ds=ds, python=python,
                                  retry_errors=retry_errors, force=force)
    for note in pkg.notes:
        err_console.print(note, highlight=False)
    out.print(sid)
    if not no_dashboard_url:
        out.print(f"{dashboard_address(address)}/#/jobs/{sid}")
    if wait:
        status = wait_for_job(client, sid)
        err_console.print(f"job {sid}: {status}", highlight=False)
        raise typer.Exit(0 if status == "SUCCEEDED" else 1)


def _fmt_ts(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _job_status(sid: str, address: str | None) -> None:
    from batchrun.ops.submit import job_client

    client = job_client(address)
    try:
        info = client.get_job_info(sid)
    except RuntimeError as e:
        raise UserError(f"no job {sid} on this cluster ({e})") from None
    out.print(f"job {sid}: {str(info.status).split('.')[-1]}")
    out.print(f"  message: {info.message or '-'}")
    out.print(f"  start:   {_fmt_ts(info.start_time)}")
    out.print(f"  end:     {_fmt_ts(info.end_time)}")


def disk_progress(spec: JobSpec) -> dict[str, Any]:
    """Rows in the input (Parquet footers) and rows with a result in the output folder."""
    from batchrun.errors import InputDataError
    from batchrun.io.shards import plan_shards
    from batchrun.io.storage import exists, join
    from batchrun.io.writer import ResultsStore, result_schema

    try:
        total: int | None = sum(s.num_rows for s in plan_shards(spec))
    except InputDataError:  # the input is not visible from here
        total = None
    store = ResultsStore(spec.output, result_schema())  # parts a final holds count once
    return {"total": total, "on_disk": store.rows_on_disk(),
            "summary": exists(join(store.root, "summary.json"), fs=store.fs)}


def _token_mode() -> None:
    """Make this driver send the cluster's auth token (Ray 2.60 does only in token mode).

    Ray reads RAY_AUTH_MODE when it is imported; when something imported it already,
    its config is re-read, as Ray's own test helpers do.
    """
    from batchrun.ops.submit import auth_headers

    if os.environ.get("RAY_AUTH_MODE") or not auth_headers():
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    if "ray" in sys.modules:
        from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def _cluster_address(address: str | None, spec: JobSpec) -> str:
    """Where to join: --address, else the cluster the job's running driver recorded, else
    RAY_ADDRESS, else the one cluster on this machine. Never "auto" (Ray would join any of
    several local clusters by chance), never a fresh local Ray."""
    from batchrun.online.ray_cluster import local_cluster, recorded_cluster

    if address and address != "auto":
        return address
    return recorded_cluster(spec.output) or os.environ.get("RAY_ADDRESS") or local_cluster()


def _connect(address: str | None, spec: JobSpec) -> None:
    """Join the job's Ray cluster as a driver and print its address."""
    addr = _cluster_address(address, spec)
    if "://" in addr and not addr.startswith("ray://"):
        raise UserError(f"--address {addr}: status/stop of a spec join the cluster as a driver; "
                        "give auto or HEAD:6379, not the dashboard URL")
    if "ray" not in sys.modules or not sys.modules["ray"].is_initialized():
        _token_mode()
        import ray

        try:
            ray.init(address=addr, namespace="batchrun", log_to_driver=False,
                     logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ClusterError(f"cannot join the Ray cluster at {addr}: {e}") from e
    import ray

    out.print(f"ray cluster: {ray.get_runtime_context().gcs_address}")


def _named_actors(spec: JobSpec) -> dict[str, Any]:
    """The job's live named actors, by name (workers first, then the limiter)."""
    import ray

    from batchrun.limits.limiter import limiter_name
    from batchrun.online.worker import worker_name

    names = [worker_name(spec.name, i) for i in range(spec.workers)]
    found = {}
    for name in [*names, limiter_name(spec.name)]:
        try:
            found[name] = ray.get_actor(name, namespace="batchrun")
        except ValueError:  # no such actor: not running (or already gone)
            continue
    return found


def actor_progress(spec: JobSpec) -> dict[str, Any] | None:
    """Live figures summed over the job's workers; None when none is running."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    actors = _named_actors(spec)
    workers = {n: a for n, a in actors.items() if ":worker-" in n}
    if not workers:
        return None
    acc: dict[str, Any] = {"workers": len(workers), "unresponsive": 0, "in_flight": 0,
                           "done": 0, "ok": 0, "cost_usd": 0.0, "started_at": time.time()}
    for actor in workers.values():
        try:
            p = ray.get(actor.progress.remote(), timeout=ACTOR_TIMEOUT_S)
        except (GetTimeoutError, RayActorError):
            acc["unresponsive"] += 1
            continue
        for k in ("in_flight", "done", "ok", "cost_usd"):
            acc[k] += p[k]
        acc["started_at"] = min(acc["started_at"], p["started_at"])
    elapsed = max(time.time() - acc["started_at"], 1e-9)
    acc["rows_per_s"] = acc["done"] / elapsed
    return acc


def _print_live(spec: JobSpec, disk: dict[str, Any], live: dict[str, Any]) -> None:
    total, done = disk["total"], disk["on_disk"]
    rate = live["rows_per_s"]
    eta = "-"
    if total is not None and rate > 0:
        eta = f"{max(total - done, 0) / rate:,.0f} s"
    stuck = f", {live['unresponsive']} unresponsive" if live["unresponsive"] else ""
    out.print(f"job {spec.name}: RUNNING ({live['workers']} workers{stuck})")
    out.print(f"  rows:      {done:,} / {total if total is None else f'{total:,}'} on disk "
              f"({live['done']:,} finished by this run, {live['in_flight']} in flight)")
    out.print(f"  rate:      {rate:,.1f} rows/s   ETA {eta}")
    out.print(f"  spend:     ${live['cost_usd']:.4f} this run")


def _disk_line(spec: JobSpec, disk: dict[str, Any]) -> str:
    total = disk["total"]
    return (f"{disk['on_disk']:,} / {'?' if total is None else f'{total:,}'} rows on disk "
            f"in {spec.output}")


def _print_idle(spec: JobSpec, disk: dict[str, Any]) -> None:
    total = disk["total"]
    state = "COMPLETE" if total is not None and disk["on_disk"] >= total else "NOT RUNNING"
    out.print(f"job {spec.name}: {state} (no live actors)")
    out.print(f"  rows:      {disk['on_disk']:,} / {'?' if total is None else f'{total:,}'} "
              f"on disk in {spec.output}")
    if disk["summary"]:
        out.print(f"  summary:   {Path(spec.output) / 'summary.json'}")
    if spec.mode == "batch":
        try:
            from batchrun.batch.run import batch_status  # type: ignore[import-not-found]
        except ImportError:
            out.print("  batch:     (batch mode support is not installed here)")
            return
        chunks = batch_status(spec)
        out.print(f"  batch:     {len(chunks)} chunk(s)")
        for chunk in chunks:
            out.print("    " + "  ".join(f"{k}={v}" for k, v in chunk.items()))


@clean_errors
def status_command(
    target: str = typer.Argument(None, help="A submission id, or a job spec YAML."),
    address: str = typer.Option(None, "--address",
                                help="Dashboard URL for an id; auto or HEAD:6379 for a spec."),
    ds: str = typer.Option(None, "--ds", help="Run date substituted for {ds} in paths."),
) -> None:
    """A submitted job's status, or a spec's live progress (rows, rows/s, ETA, spend)."""
    if target is None:
        return list_command(address=address)
    if not _is_spec(target):
        return _job_status(target, address)
    spec = load_spec(target, ds=ds)
    stores.configure(spec.storage)  # an output in a store: its endpoint
    disk = disk_progress(spec)
    try:
        _connect(address, spec)
    except NoClusterError as e:  # one line: the job cannot be running
        raise NoClusterError(f"job {spec.name} is not running: {e}; {_disk_line(spec, disk)}"
                             ) from None
    live = actor_progress(spec)
    if live is None:
        _print_idle(spec, disk)
    else:
        _print_live(spec, disk, live)


@clean_errors
def logs_command(
    sid: str = typer.Argument(..., help="Submission id."),
    address: str = typer.Option(None, "--address", help="Dashboard URL, http://HEAD:8265."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends."),
) -> None:
    """A submitted job's logs (its driver's stdout and stderr)."""
    from batchrun.ops.submit import job_client, wait_for_job

    client = job_client(address)
    if follow:
        status = wait_for_job(client, sid)
        raise typer.Exit(0 if status == "SUCCEEDED" else 1)
    try:
        print(client.get_job_logs(sid), end="")
    except RuntimeError as e:
        raise UserError(f"no job {sid} on this cluster ({e})") from None


def _stop_spec(spec: JobSpec, address: str | None) -> None:
    import ray

    try:
        _connect(address, spec)
    except NoClusterError as e:
        raise NoClusterError(f"job {spec.name}: nothing to stop: {e}") from None
    actors = _named_actors(spec)
    for actor in actors.values():
        ray.kill(actor, no_restart=True)  # no restart: the driver then fails, actors lost
    out.print(f"job {spec.name}: killed {len(actors)} actor(s)"
              + ("" if actors else " (none was running)"))
    if spec.mode == "batch":
        try:
            from batchrun.batch.run import cancel_batches  # type: ignore[import-not-found]
        except ImportError:
            out.print("batch mode support is not installed here: provider batches not cancelled")
            return
        out.print(f"provider batches asked to cancel: {cancel_batches(spec)}")


@clean_errors
def stop_command(
    target: str = typer.Argument(..., help="A submission id, or a job spec YAML."),
    address: str = typer.Option(None, "--address",
                                help="Dashboard URL for an id; auto or HEAD:6379 for a spec."),
    ds: str = typer.Option(None, "--ds", help="Run date substituted for {ds} in paths."),
) -> None:
    """Stop a submitted job, or kill a spec's actors on the cluster (resume by rerunning)."""
    if _is_spec(target):
        return _stop_spec(load_spec(target, ds=ds), address)
    from batchrun.ops.submit import job_client

    try:
        stopped = job_client(address).stop_job(target)
    except RuntimeError as e:
        raise UserError(f"no job {target} on this cluster ({e})") from None
    out.print(f"job {target}: {'stop requested' if stopped else 'was not running'}")


@clean_errors
def list_command(
    address: str = typer.Option(None, "--address", help="Dashboard URL, http://HEAD:8265."),
) -> None:
    """Jobs known to the cluster's job server, newest first."""
    from batchrun.ops.submit import job_client

    jobs = sorted(job_client(address).list_jobs(), key=lambda j: j.start_time or 0, reverse=True)
    table = Table(Column("submission id", no_wrap=True), "job", "status", "start", "end")
    for j in jobs:
        meta = j.metadata or {}
        table.add_row(j.submission_id or j.job_id or "-", meta.get("batchrun_job", "-"),
                      str(j.status).split(".")[-1], _fmt_ts(j.start_time), _fmt_ts(j.end_time))
    out.print(table)


# For trying the commands before the main CLI mounts them: python -m batchrun.cli.ops ...
ops_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
for _name, _fn in (("submit", submit_command), ("status", status_command),
                   ("logs", logs_command), ("stop", stop_command), ("list", list_command)):
    ops_app.command(_name)(_fn)

if __name__ == "__main__":
    ops_app()
