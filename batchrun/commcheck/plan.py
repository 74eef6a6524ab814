"""What one commcheck run will do, with defaults suited to the backend.

gloo runs on CPUs: its defaults stop at 64 MiB, where a 2-rank all_reduce
takes ~60 ms on a 2-core machine (1 GiB took ~0.9 s per call, and a 25-call
sweep of it did not fit the 120 s budget). nccl keeps nccl-tests' 1 GiB.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BACKEND_DEFAULTS", "PREFLIGHT", "BadInput", "CommCheckError", "Plan",
           "collect_nccl_env"]

BACKEND_DEFAULTS: dict[str, dict[str, str]] = {
    "nccl": {"min_bytes": "1M", "max_bytes": "1G", "rank_bytes": "256M", "tolerance": "0.25"},
    # CPU ranks share cores with everything else on the host: only a large gap names a rank
    "gloo": {"min_bytes": "1M", "max_bytes": "64M", "rank_bytes": "1M", "tolerance": "0.5"},
}
# --preflight: every collective on a short sweep, health and the rank check; sized to
# stay under two minutes on an 8-GPU node (an estimate: not yet timed on one).
PREFLIGHT: dict[str, dict[str, str | int]] = {
    "nccl": {"min_bytes": "1M", "max_bytes": "256M", "iters": 10, "warmup": 3},
    "gloo": {"min_bytes": "1K", "max_bytes": "1M", "iters": 10, "warmup": 3},
}


class BadInput(ValueError):
    """Invalid request (exit code 2)."""


class CommCheckError(RuntimeError):
    """The check could not complete: missing resources, a rank's error."""


@dataclass
class Plan:
    world: int
    sizes: list[int]
    backend: str = "gloo"
    dtype: str = "float32"
    ops: list[str] = field(default_factory=lambda: ["all_reduce"])
    iters: int = 20
    warmup: int = 5
    check_iters: int = 2
    timeout_s: float = 120.0  # for the bundles, then for each size of each group
    strategy: str = "PACK"
    cpus_per_rank: float = 1.0
    nccl_env: dict[str, str] = field(default_factory=dict)
    copy_baseline: bool | None = None  # None: on for one rank, where copy speed is the ceiling
    pairwise: bool = False
    min_busbw: float | None = None
    fault: str | None = None  # test hook: "wrong:RANK", "hang:RANK" or "slow:RANK:MS"
    health: bool = False
    rank_check: bool | None = None  # None: on with 3 ranks or more
    rank_bytes: int = 1 << 20
    tolerance: float = 0.25  # how far below the median a rank or node must be to be named
    gpus_per_node: int | None = None  # expected GPU count per node (health)
    health_opts: dict[str, Any] = field(default_factory=dict)
    autoscale: bool = False  # the cluster adds nodes on demand: no capacity check up front
    reserve_timeout_s: float | None = None  # wait for the bundles (default: timeout_s)

    @property
    def reserve_s(self) -> float:
        return self.timeout_s if self.reserve_timeout_s is None else self.reserve_timeout_s

    @property
    def op(self) -> str:
        return self.ops[0]

    @property
    def do_rank_check(self) -> bool:
        return self.world >= 3 if self.rank_check is None else self.rank_check

    def bench_plan(self) -> dict[str, Any]:
        copy = self.world == 1 if self.copy_baseline is None else self.copy_baseline
        return {"dtype": self.dtype, "iters": self.iters, "warmup": self.warmup,
                "check_iters": self.check_iters, "copy_baseline": copy}


def collect_nccl_env(explicit: dict[str, str]) -> dict[str, str]:
    """NCCL_* from the driver's environment, overridden by --nccl-env values."""
    env = {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}
    env.update(explicit)
    return env
