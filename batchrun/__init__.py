"""batchrun: batch inference over OpenAI-compatible APIs on Ray, under one global rate limit.

The public Python API is the short list in ``__all__`` (docs/python-api.md)::

    import batchrun

    spec = batchrun.JobSpec.from_yaml("jobs/nightly.yaml")
    est = batchrun.estimate(spec)            # the figures of `batchrun estimate`
    summary = batchrun.run(spec)             # the job of `batchrun run`: a Summary
    table = batchrun.read_results(spec)      # the committed results: a pyarrow.Table
    out = batchrun.ray_data.complete(ds, spec)   # a Ray Data Dataset, answers added

Everything else (the modules under ``batchrun.*``) is private and may change.

Kept import-light on purpose: the names are imported on first use, so
``batchrun.commcheck`` still runs on GPU machines that have torch but not the rest
of batchrun's dependencies.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy names below resolve to
    from batchrun import ray_data
    from batchrun.errors import (
        BatchrunError,
        BudgetExhausted,
        ClusterError,
        JobCannotSucceed,
        OutputError,
        SpecError,
        UserError,
    )
    from batchrun.io.summary import Summary
    from batchrun.money.estimate import Estimate
    from batchrun.public import estimate, read_results, run
    from batchrun.spec import JobSpec

__all__ = [
    "BatchrunError",
    "BudgetExhausted",
    "ClusterError",
    "Estimate",
    "JobCannotSucceed",
    "JobSpec",
    "OutputError",
    "SpecError",
    "Summary",
    "UserError",
    "__version__",
    "estimate",
    "ray_data",
    "read_results",
    "run",
]
__version__ = "0.1.0"

# public name -> the module that defines it (imported on first use: PEP 562)
_LAZY = {
    "BatchrunError": "batchrun.errors", "BudgetExhausted": "batchrun.errors",
    "ClusterError": "batchrun.errors", "JobCannotSucceed": "batchrun.errors",
    "OutputError": "batchrun.errors", "SpecError": "batchrun.errors",
    "UserError": "batchrun.errors", "Estimate": "batchrun.money.estimate",
    "JobSpec": "batchrun.spec", "Summary": "batchrun.io.summary",
    "estimate": "batchrun.public", "read_results": "batchrun.public", "run": "batchrun.public",
}


def __getattr__(name: str) -> Any:
    if name == "ray_data":  # a module: needs Ray Data (pip install 'batchrun[data]')
        return importlib.import_module("batchrun.ray_data")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # resolved once
        return value
    raise AttributeError(f"module 'batchrun' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
