"""``batchrun commcheck``: exit 0 pass, 1 unhealthy, 2 bad input, 3 could not run."""

from __future__ import annotations

import importlib.util
import re
import sys
import time
from typing import Annotated, Any

import typer

from batchrun.commcheck.bench import INSTALL_HINT, parse_fault
from batchrun.commcheck.collectives import parse_ops
from batchrun.commcheck.plan import BACKEND_DEFAULTS, PREFLIGHT, Plan, collect_nccl_env
from batchrun.commcheck.report import (
    DTYPES,
    EXIT_BAD_INPUT,
    EXIT_COULD_NOT_RUN,
    Report,
    parse_size,
    size_list,
)

__all__ = ["app", "build_plan", "commcheck"]

app = typer.Typer(add_completion=False, help="Collective bandwidth, correctness and GPU health.")

STRATEGIES = ("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD")
_ENV_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.DOTALL)
NO_GPU_TO_CHECK = ("--health needs --backend nccl: gloo runs on CPUs, there is no GPU to "
                   "check; running the rest (exit 2 if the rest passes)")


def _fail_input(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(EXIT_BAD_INPUT)


def _parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        match = _ENV_RE.match(item)
        if not match:
            raise ValueError(f"--nccl-env wants KEY=VALUE, got {item!r}")
        env[match.group(1)] = match.group(2)
    return env


def _check_choices(backend: str, dtype: str, strategy: str, launcher: str) -> None:
    for name, value, allowed in (("--backend", backend, ("nccl", "gloo")),
                                 ("--dtype", dtype, tuple(DTYPES)),
                                 ("--strategy", strategy, STRATEGIES),
                                 ("--launcher", launcher, ("ray", "local"))):
        if value not in allowed:
            raise ValueError(f"{name} {value!r} is not one of {', '.join(allowed)}")


def build_plan(gpus: int, *, min_bytes: str | None = None, max_bytes: str | None = None,
               factor: int = 2, dtype: str = "float32", backend: str = "nccl",
               op: str | None = None, strategy: str = "PACK", launcher: str = "ray",
               preflight: bool = False, rank_bytes: str | None = None,
               **kw: Any) -> Plan:
    """Validate the inputs into a Plan with the backend's defaults; ValueError = bad input."""
    _check_choices(backend, dtype, strategy.upper(), launcher)
    ops = parse_ops(op or ("all" if preflight else "all_reduce"))
    base: dict[str, Any] = {**BACKEND_DEFAULTS[backend],
                            **(PREFLIGHT[backend] if preflight else {})}
    for key in ("iters", "warmup"):
        if kw.get(key) is None:
            kw[key] = int(base.get(key, 20 if key == "iters" else 5))
    if gpus < 1 or kw["iters"] < 1 or kw["warmup"] < 0:
        raise ValueError("--gpus and --iters must be >= 1, --warmup >= 0")
    parse_fault(kw.get("fault"))
    reserve = kw.get("reserve_timeout_s")
    if float(kw.get("timeout_s", 1)) <= 0 or (reserve is not None and float(reserve) <= 0):
        raise ValueError("--timeout and --reserve-timeout must be > 0")
    if kw.get("tolerance") is None:
        kw["tolerance"] = float(base["tolerance"])
    if not 0 < float(kw["tolerance"]) < 1:
        raise ValueError("--tolerance must be between 0 and 1 (0.25 = 25% below the median)")
    elem = DTYPES[dtype][0]
    sizes = size_list(parse_size(min_bytes or str(base["min_bytes"])),
                      parse_size(max_bytes or str(base["max_bytes"])), factor, elem)
    rank_size = min(parse_size(rank_bytes or str(base["rank_bytes"])), max(sizes))
    env = collect_nccl_env(_parse_env(list(kw.pop("nccl_env", None) or [])))
    if kw.get("health") is None:
        kw["health"] = backend == "nccl"
    return Plan(world=gpus, sizes=sizes, backend=backend, dtype=dtype, ops=ops,
                strategy=strategy.upper(), nccl_env=env,
                rank_bytes=max(elem, rank_size - rank_size % elem), **kw)


def _emit(report: Report, json_path: str | None, out_path: str | None,
          prom_path: str | None, exit_code: int) -> None:
    from batchrun.commcheck.export import write_json, write_parquet, write_prometheus
    from batchrun.commcheck.table import format_table

    typer.echo(format_table(report))
    if json_path:
        write_json(report, json_path)
    if out_path:
        write_parquet(report, out_path)
    if prom_path:
        write_prometheus(report, prom_path, exit_code)


@app.command("commcheck")
def commcheck(
    gpus: Annotated[int, typer.Option(help="Ranks (one per GPU; CPU bundles with gloo).")],
    op: Annotated[str | None, typer.Option(help="all_reduce (default), all_gather, "
                  "reduce_scatter, alltoall, broadcast, reduce, sendrecv, a comma list, "
                  "or all.")] = None,
    backend: Annotated[str, typer.Option(help="nccl (GPUs) or gloo (CPU).")] = "nccl",
    preflight: Annotated[bool, typer.Option(help="Health, every collective on a short sweep "
                         "and the rank check: the check before a big job.")] = False,
    health: Annotated[bool | None, typer.Option("--health/--no-health", help="Per-GPU "
                      "health before the collectives (default: on with nccl).")] = None,
    gpus_per_node: Annotated[int | None, typer.Option(help="GPUs each node should have "
                             "(default: the most any node has).")] = None,
    rank_check: Annotated[bool | None, typer.Option("--rank-check/--no-rank-check",
                          help="Rank every rank by 2-rank runs (default: 3+ ranks).")] = None,
    rank_bytes: Annotated[str | None, typer.Option(help="Size of the rank check "
                          "(default 256M nccl, 1M gloo).")] = None,
    tolerance: Annotated[float | None, typer.Option(help="Name a rank or node this far below "
                         "the median (default 0.25 nccl, 0.5 gloo).")] = None,
    min_busbw: Annotated[float | None, typer.Option(help="FAIL below this avg GB/s.")] = None,
    strategy: Annotated[str, typer.Option(help="PACK|STRICT_PACK|SPREAD|STRICT_SPREAD")] = "PACK",
    min_bytes: Annotated[str | None, typer.Option(help="Smallest size (K/M/G = 1024^n; "
                         "default 1M).")] = None,
    max_bytes: Annotated[str | None, typer.Option(help="Largest size (default 1G nccl, "
                         "64M gloo).")] = None,
    factor: Annotated[int, typer.Option(help="Size multiplier between steps.")] = 2,
    iters: Annotated[int | None, typer.Option(help="Timed iterations per size (20).")] = None,
    warmup: Annotated[int | None, typer.Option(help="Untimed iterations per size (5).")] = None,
    dtype: Annotated[str, typer.Option(help="float32|bfloat16")] = "float32",
    timeout: Annotated[float, typer.Option(help="Seconds for each size (and the bundles).")
                       ] = 120.0,
    reserve_timeout: Annotated[float | None, typer.Option(help="Seconds to wait for the "
                               "bundles (default: --timeout; minutes with --autoscale).")
                               ] = None,
    json_path: Annotated[str | None, typer.Option("--json", help="Write JSON here.")] = None,
    out: Annotated[str | None, typer.Option(help="Write Parquet here.")] = None,
    prometheus: Annotated[str | None, typer.Option(help="Write a Prometheus textfile here "
                          "(node-exporter's textfile collector).")] = None,
    pairwise: Annotated[bool, typer.Option(help="Also check every pair of nodes.")] = False,
    launcher: Annotated[str, typer.Option(help="ray|local")] = "ray",
    nccl_env: Annotated[list[str] | None, typer.Option(help="KEY=VALUE, repeatable.")] = None,
    address: Annotated[str | None, typer.Option(help="Existing Ray cluster.")] = None,
    autoscale: Annotated[bool, typer.Option(help="The cluster adds nodes on demand: skip "
                         "the capacity check; the reservation starts them (see "
                         "--reserve-timeout).")] = False,
    cpus_per_rank: Annotated[float, typer.Option(help="CPUs in each bundle.")] = 1.0,
    copy_baseline: Annotated[bool | None, typer.Option(
        "--copy-baseline/--no-copy-baseline", help="Time tensor.copy_ too (default: 1 rank).")
    ] = None,
    fault: Annotated[str | None, typer.Option(hidden=True)] = None,
) -> None:
    """nccl-tests-style collectives, per-GPU health and the slow rank named; PASS/FAIL."""
    gloo_health = bool(health) and backend == "gloo"
    try:
        plan = build_plan(gpus, min_bytes=min_bytes, max_bytes=max_bytes, factor=factor,
                          dtype=dtype, backend=backend, op=op, strategy=strategy,
                          launcher=launcher, preflight=preflight, rank_bytes=rank_bytes,
                          iters=iters, warmup=warmup, timeout_s=timeout,
                          cpus_per_rank=cpus_per_rank, nccl_env=nccl_env or [],
                          copy_baseline=copy_baseline, pairwise=pairwise, min_busbw=min_busbw,
                          fault=fault, health=False if gloo_health else health,
                          rank_check=rank_check, tolerance=tolerance,
                          gpus_per_node=gpus_per_node, autoscale=autoscale,
                          reserve_timeout_s=reserve_timeout)
    except ValueError as exc:
        raise _fail_input(str(exc)) from None
    if importlib.util.find_spec("torch") is None:
        raise _fail_input(f"commcheck needs torch, which is not installed: {INSTALL_HINT}")
    if gloo_health:
        typer.echo(f"error: {NO_GPU_TO_CHECK}", err=True)
    code = _run(plan, launcher, address, json_path, out, prometheus)
    raise typer.Exit(EXIT_BAD_INPUT if gloo_health and code == 0 else code)


def _run(plan: Plan, launcher: str, address: str | None, json_path: str | None,
         out: str | None, prom: str | None) -> int:
    from batchrun.commcheck.launch import BadInput, run_ray
    from batchrun.commcheck.local import run_local

    try:
        report = run_local(plan) if launcher == "local" else run_ray(plan, address)
    except BadInput as exc:
        raise _fail_input(str(exc)) from None
    report.settings["ended"] = time.time()
    _note_inexact(plan, report)
    try:
        _emit(report, json_path, out, prom, report.exit_code)
    except OSError as exc:
        typer.echo(f"error: could not write the report: {exc}", err=True)
        return EXIT_COULD_NOT_RUN
    if report.error:
        typer.echo(f"error: {report.error}", err=True)
    return report.exit_code


def _note_inexact(plan: Plan, report: Report) -> None:
    from batchrun.commcheck.collectives import is_exact

    mantissa = DTYPES[plan.dtype][2]
    for op in plan.ops:
        if not is_exact(op, mantissa, plan.world):
            report.notes.append(f"{op}: {plan.dtype} cannot hold every check value of "
                                f"{plan.world} ranks exactly: #wrong may count rounding, "
                                "use float32")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
