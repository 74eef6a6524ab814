"""The ``engine:`` block of a job spec: a self-hosted server batchrun starts (docs/engines.md).

Its own module so that ``spec/__init__.py`` stays readable; it re-exports ``EngineSpec``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from batchrun.spec.parts import _Model  # its one-line SpecError in Python too

__all__ = ["EngineSpec", "engine_problem"]


class EngineSpec(_Model):
    """A self-hosted engine batchrun starts on the cluster (docs/engines.md)."""

    command: str = Field(..., description="The server's command line; {model}, {model_path}, "
                         "{port} (required) and {host} are filled in per replica.")
    model_path: str | None = Field(None, description="Local folder of the weights, or an s3:// "
                                   "or gs:// prefix copied to each node once ({model_path}).")
    replicas: int = Field(1, ge=1, description="Servers to start, one per placement-group bundle.")
    resources: dict[str, float] = Field(
        default_factory=lambda: {"GPU": 1.0}, description="Per replica, e.g. {GPU: 1, CPU: 8}.")
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Placement-group strategy of the replicas' bundles.")
    max_concurrency_per_replica: int = Field(128, gt=0, description="Requests in flight per "
                                             "replica, over all workers.")
    startup_timeout_s: float = Field(900.0, gt=0, description="Seconds a replica may take to "
                                     "become ready.")
    health_path: str = Field("/health", description="GET path that answers 200 when ready.")
    health_timeout_s: float = Field(5.0, gt=0, description="Seconds one health check (or the "
                                    "readiness completion) may take before it counts as failed.")
    preflight: bool = Field(False, description="Check the reserved GPUs (commcheck's per-GPU "
                            "health) before any model loads.")

    @field_validator("command")
    @classmethod
    def _needs_port(cls, v: str) -> str:
        if "{port}" not in v:
            raise ValueError("has no {port} placeholder; batchrun picks a free port per replica: "
                             "add e.g. --port {port}")
        return v

    @field_validator("resources")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        if not v or any(x < 0 for x in v.values()) or not any(x > 0 for x in v.values()):
            raise ValueError("give each replica's resources, e.g. {GPU: 1, CPU: 8}")
        return v

    @model_validator(mode="after")
    def _preflight_needs_gpus(self) -> EngineSpec:
        if self.preflight and not self.resources.get("GPU"):
            raise ValueError("preflight: true checks GPUs, and resources asks for none; add "
                             "GPU to resources or remove preflight")
        return self


def engine_problem(job: Any) -> str | None:
    """What is wrong with a ``JobSpec``'s engine (or its lack): one line, or None."""
    engine, mode, rpm, price = job.engine, job.mode, job.limits.rpm, job.price
    if engine is not None and job.simulate is not None:
        return ("engine: and simulate: cannot both be set (the engine is the server); "
                "remove one")
    if engine is None and rpm is None:
        return "limits.rpm: required field is missing; add it (only a job with engine: may " \
               "leave it out)"
    if engine is not None and mode == "batch":
        return ("engine: cannot be used with mode: batch (a self-hosted engine has no Batch "
                "API); use mode: online")
    if engine is None and getattr(price, "gpu_hour_usd", None) is not None \
            and getattr(price, "input_per_1m", 0) is None:
        return ("price.gpu_hour_usd prices an engine: job; give input_per_1m and "
                "output_per_1m for an endpoint")
    return None
