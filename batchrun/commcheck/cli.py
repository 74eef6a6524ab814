"""``batchrun commcheck``: typer command; exit 0 PASS, 1 FAIL, 2 bad input."""

from __future__ import annotations

import re
import sys
from typing import Annotated

import typer

from batchrun.commcheck.bench import parse_fault
from batchrun.commcheck.report import (
    DTYPES,
    Report,
    check_is_exact,
    format_table,
    parse_size,
    size_list,
    write_json,
    write_parquet,
)

__all__ = ["app", "build_plan", "commcheck"]

app = typer.Typer(add_completion=False, help="All-reduce bandwidth and correctness check.")

STRATEGIES = ("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD")
_ENV_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.DOTALL)


def _fail_input(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        match = _ENV_RE.match(item)
        if not match:
            raise ValueError(f"--nccl-env wants KEY=VALUE, got {item!r}")
        env[match.group(1)] = match.group(2)
    return env


def _check_choices(backend: str, dtype: str, op: str, strategy: str, launcher: str) -> None:
    for name, value, allowed in (("--backend", backend, ("nccl", "gloo")),
                                 ("--dtype", dtype, tuple(DTYPES)),
                                 ("--op", op, ("all_reduce",)),
                                 ("--strategy", strategy, STRATEGIES),
                                 ("--launcher", launcher, ("ray", "local"))):
        if value not in allowed:
            raise ValueError(f"{name} {value!r} is not one of {', '.join(allowed)}")


def build_plan(gpus: int, *, min_bytes: str = "1M", max_bytes: str = "1G", factor: int = 2,
               dtype: str = "float32", backend: str = "nccl", op: str = "all_reduce",
               strategy: str = "PACK", launcher: str = "ray", **kw: object) -> object:
    """Validate the inputs into a launch.Plan; ValueError means bad input (exit 2)."""
    from batchrun.commcheck.launch import Plan, collect_nccl_env

    _check_choices(backend, dtype, op, strategy.upper(), launcher)
    if gpus < 1 or int(kw.get("iters", 1)) < 1 or int(kw.get("warmup", 0)) < 0:  # type: ignore[call-overload]
        raise ValueError("--gpus and --iters must be >= 1, --warmup >= 0")
    parse_fault(kw.get("fault"))  # type: ignore[arg-type]
    if float(kw.get("timeout_s", 1)) <= 0:  # type: ignore[arg-type]
        raise ValueError("--timeout must be > 0")
    sizes = size_list(parse_size(min_bytes), parse_size(max_bytes), factor, DTYPES[dtype][0])
    env = collect_nccl_env(_parse_env(list(kw.pop("nccl_env", None) or [])))  # type: ignore[call-overload]
    return Plan(world=gpus, sizes=sizes, backend=backend, dtype=dtype, op=op,
                strategy=strategy.upper(), nccl_env=env, **kw)  # type: ignore[arg-type]


def _emit(report: Report, json_path: str | None, out_path: str | None) -> None:
    typer.echo(format_table(report))
    if json_path:
        write_json(report, json_path)
    if out_path:
        write_parquet(report, out_path)


@app.command("commcheck")
def commcheck(
    gpus: Annotated[int, typer.Option(help="Ranks (one per GPU; CPU bundles with gloo).")],
    strategy: Annotated[str, typer.Option(help="PACK|STRICT_PACK|SPREAD|STRICT_SPREAD")] = "PACK",
    min_bytes: Annotated[str, typer.Option(help="Smallest size (K/M/G = 1024^n).")] = "1M",
    max_bytes: Annotated[str, typer.Option(help="Largest size.")] = "1G",
    factor: Annotated[int, typer.Option(help="Size multiplier between steps.")] = 2,
    iters: Annotated[int, typer.Option(help="Timed iterations per size.")] = 20,
    warmup: Annotated[int, typer.Option(help="Untimed iterations per size.")] = 5,
    dtype: Annotated[str, typer.Option(help="float32|bfloat16")] = "float32",
    op: Annotated[str, typer.Option(help="Collective (all_reduce).")] = "all_reduce",
    backend: Annotated[str, typer.Option(help="nccl (GPUs) or gloo (CPU).")] = "nccl",
    timeout: Annotated[float, typer.Option(help="Seconds for the bundles, then the run.")] = 120.0,
    min_busbw: Annotated[float | None, typer.Option(help="FAIL below this avg GB/s.")] = None,
    json_path: Annotated[str | None, typer.Option("--json", help="Write JSON here.")] = None,
    out: Annotated[str | None, typer.Option(help="Write Parquet here.")] = None,
    pairwise: Annotated[bool, typer.Option(help="Also check every pair of nodes.")] = False,
    launcher: Annotated[str, typer.Option(help="ray|local")] = "ray",
    nccl_env: Annotated[list[str] | None, typer.Option(help="KEY=VALUE, repeatable.")] = None,
    address: Annotated[str | None, typer.Option(help="Existing Ray cluster.")] = None,
    cpus_per_rank: Annotated[float, typer.Option(help="CPUs in each bundle.")] = 1.0,
    copy_baseline: Annotated[bool | None, typer.Option(
        "--copy-baseline/--no-copy-baseline", help="Time tensor.copy_ too (default: 1 rank).")
    ] = None,
    fault: Annotated[str | None, typer.Option(hidden=True)] = None,
) -> None:
    """Run an nccl-tests-style all_reduce check over N ranks and print PASS/FAIL."""
    try:
        plan = build_plan(gpus, min_bytes=min_bytes, max_bytes=max_bytes, factor=factor,
                          dtype=dtype, backend=backend, op=op, strategy=strategy,
                          launcher=launcher, iters=iters, warmup=warmup, timeout_s=timeout,
                          cpus_per_rank=cpus_per_rank, nccl_env=nccl_env or [],
                          copy_baseline=copy_baseline, pairwise=pairwise,
                          min_busbw=min_busbw, fault=fault)
    except ValueError as exc:
        raise _fail_input(str(exc)) from None
    raise typer.Exit(_run(plan, launcher, address, json_path, out))


def _run(plan: object, launcher: str, address: str | None, json_path: str | None,
         out: str | None) -> int:
    from batchrun.commcheck.launch import BadInput, Plan, run_local, run_ray

    assert isinstance(plan, Plan)
    try:
        report = run_local(plan) if launcher == "local" else run_ray(plan, address)
    except BadInput as exc:
        raise _fail_input(str(exc)) from None
    if not check_is_exact(plan.dtype, plan.world):
        report.notes.append(f"{plan.dtype} cannot hold {plan.world}*({plan.world}+1)/2 "
                            "exactly: #wrong may count rounding, use float32")
    _emit(report, json_path, out)
    if report.error:
        typer.echo(f"error: {report.error}", err=True)
    return 0 if report.passed else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
