"""An engine's plan, checked before anything is reserved: pure, no Ray.

``command_args`` fills the placeholders; ``check_fits`` compares what the replicas ask
for with what the cluster has (so a job asking for 8 GPUs on a 4-GPU cluster says so
in one line instead of waiting forever for a placement group); ``gpu_cost`` is the
arithmetic of the summary and of the budget's GPU-time cap.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from batchrun.engine.weights import check_listed, is_uri
from batchrun.errors import SpecError
from batchrun.spec import EngineSpec, JobSpec

__all__ = ["GpuUsage", "check_fits", "check_model_path", "command_args", "cost_cap_reached",
           "engine_name", "gpu_cost", "placement_bundles"]


def engine_name(job: str, index: int) -> str:
    return f"batchrun:{job}:engine-{index}"


def command_args(engine: EngineSpec, *, model: str, host: str, port: int,
                 model_path: str | None = None) -> list[str]:
    """The replica's argv: placeholders filled, then split like a shell would (no shell
    runs it, so a model name cannot inject a command). ``model_path``: the node's local
    copy of a URI's weights (``weights.py``), else ``engine.model_path`` as written."""
    path = engine.model_path if model_path is None else model_path
    fields = {"model": shlex.quote(model), "model_path": shlex.quote(path or ""),
              "port": str(port), "host": shlex.quote(host)}
    return shlex.split(engine.command.format_map(fields))


def check_model_path(spec: JobSpec, where: str = "job spec") -> None:
    """Refuse, before anything starts, an unknown placeholder in ``engine.command`` and a
    local ``model_path`` that does not exist on this machine, or a store URI (s3://,
    gs://: each node copies it, ``weights.py``) that lists no objects. Other URIs are the
    engine's own business."""
    e = spec.engine
    if e is None:
        return
    try:
        e.command.format_map({"model": "", "model_path": "", "port": "", "host": ""})
    except (KeyError, IndexError, ValueError) as err:
        raise SpecError(f"{where}: engine.command: unknown placeholder {err}; use only {{model}}, "
                        "{model_path}, {port}, {host} (double a literal brace: {{ }})") from None
    if is_uri(e.model_path):
        check_listed(e.model_path or "", where)
    elif e.model_path and "://" not in e.model_path and not Path(e.model_path).exists():
        raise SpecError(f"{where}: engine.model_path: {e.model_path} does not exist; give the "
                        "folder holding the model's weights")


def placement_bundles(engine: EngineSpec) -> list[dict[str, float]]:
    return [dict(engine.resources) for _ in range(engine.replicas)]


def _fmt(x: float) -> str:
    return f"{x:g}"


def check_fits(engine: EngineSpec, total: dict[str, float],
               nodes: list[dict[str, float]], worker_cpus: float = 0.0) -> str | None:
    """Why the replicas cannot fit this cluster (``total``: its resources, ``nodes``: each
    alive node's), or None. One line, naming what exists. ``worker_cpus``: what the job's
    workers need besides (else they would wait forever behind the engine's bundles)."""
    for res, per in engine.resources.items():
        need = per * engine.replicas
        have = total.get(res, 0.0)
        if need > have:
            return (f"engine.resources asks for {_fmt(need)} {res} ({engine.replicas} replicas x "
                    f"{_fmt(per)}) and the cluster has {_fmt(have)}; lower engine.replicas or "
                    f"engine.resources.{res}")
        if res == "CPU" and need + worker_cpus > have:
            return (f"engine.resources asks for {_fmt(need)} CPU ({engine.replicas} replicas x "
                    f"{_fmt(per)}) and the job's workers {_fmt(worker_cpus)} more; the cluster "
                    f"has {_fmt(have)}; lower engine.resources.CPU, engine.replicas or workers")
        biggest = max((n.get(res, 0.0) for n in nodes), default=0.0)
        if per > biggest:
            return (f"engine.resources.{res}: one replica asks for {_fmt(per)} and the largest "
                    f"node has {_fmt(biggest)}; a replica runs on one node")
    return None


@dataclass(frozen=True)
class GpuUsage:
    """The replicas' GPU time, from reservation to release."""

    replicas: int
    gpus_per_replica: float
    seconds: float

    @property
    def gpu_hours(self) -> float:
        return self.replicas * self.gpus_per_replica * self.seconds / 3600.0


def gpu_cost(usage: GpuUsage, gpu_hour_usd: float | None, rows: int,
             output_tokens: int) -> dict[str, float | None]:
    """The summary's engine figures: GPU hours, cost, cost per 1,000 rows and per 1M
    output tokens (None where there is no price or nothing to divide by)."""
    cost = None if gpu_hour_usd is None else usage.gpu_hours * gpu_hour_usd
    return {
        "replicas": float(usage.replicas), "reserved_s": usage.seconds,
        "gpu_hours": usage.gpu_hours, "gpu_hour_usd": gpu_hour_usd, "cost_usd": cost,
        "usd_per_1k_rows": cost * 1000 / rows if cost is not None and rows else None,
        "usd_per_1m_output_tokens": (cost * 1e6 / output_tokens
                                     if cost is not None and output_tokens else None),
    }


def cost_cap_reached(replicas: int, gpus_per_replica: float, gpu_hour_usd: float,
                     elapsed_s: float, cap_usd: float, ahead_s: float) -> bool:
    """Whether the reservation would exceed ``cap_usd`` within ``ahead_s`` (the time
    until the next check, plus the time it takes to stop): stop now, not after."""
    rate_per_s = replicas * gpus_per_replica * gpu_hour_usd / 3600.0
    return rate_per_s > 0 and (elapsed_s + ahead_s) * rate_per_s >= cap_usd
