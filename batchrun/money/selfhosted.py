"""``batchrun estimate --compare`` for an ``engine:`` job: the same job at the model's API
price next to the self-hosted estimate, once a throughput figure is known.

Self-hosted cost = rows / throughput (rows per second) x replicas x GPUs per replica x
``price.gpu_hour_usd``. The throughput comes from ``--throughput`` or the previous run's
``summary.json`` in the job's output folder (its ``rows_per_s``). Replica start-up time is
not in it (a previous run's summary reports ``engine.reserved_s`` for that).
"""

from __future__ import annotations

import json

from pydantic import BaseModel, Field
from rich.table import Table

from batchrun.io.storage import exists, join, read_bytes
from batchrun.spec import JobSpec

__all__ = ["SelfHosted", "previous_throughput", "render_self_hosted", "self_hosted"]


class SelfHosted(BaseModel):
    rows: int = Field(..., description="Rows the job sends.")
    throughput_rows_s: float | None = Field(..., description="Rows per second of the engine.")
    throughput_source: str = Field(..., description="--throughput, or the previous summary.")
    gpus: float = Field(..., description="replicas x GPUs per replica.")
    gpu_hour_usd: float | None = Field(..., description="price.gpu_hour_usd.")
    hours: float | None = Field(..., description="rows / throughput, in hours.")
    self_hosted_usd: float | None = Field(..., description="GPU hours x gpu_hour_usd.")
    api_model: str = Field(..., description="The model priced through its API.")
    api_expected_usd: float | None = Field(..., description="Expected online API cost; None "
                                           "when the model has no price in the table.")


def previous_throughput(spec: JobSpec) -> float | None:
    """``rows_per_s`` of the last run recorded in the output folder, if it sent rows."""
    path = join(spec.output, "summary.json")
    try:
        if not exists(path):
            return None
        doc = json.loads(read_bytes(path))
    except (OSError, ValueError):
        return None
    rate = doc.get("rows_per_s")
    return float(rate) if doc.get("rows_this_run") and rate else None


def self_hosted(spec: JobSpec, rows: int, throughput: float | None,
                api_expected_usd: float | None) -> SelfHosted:
    assert spec.engine is not None
    source = "--throughput"
    if throughput is None:
        throughput, source = previous_throughput(spec), "previous run's summary.json"
    e = spec.engine
    gpus = e.replicas * e.resources.get("GPU", 0.0)
    rate = getattr(spec.price, "gpu_hour_usd", None)
    hours = rows / throughput / 3600.0 if throughput else None
    cost = hours * gpus * rate if hours is not None and rate is not None else None
    return SelfHosted(rows=rows, throughput_rows_s=throughput,
                      throughput_source=source if throughput else "none known",
                      gpus=gpus, gpu_hour_usd=rate, hours=hours, self_hosted_usd=cost,
                      api_model=spec.model, api_expected_usd=api_expected_usd)


def _usd(x: float | None) -> str:
    return "n/a" if x is None else f"${x:,.4f}"


def render_self_hosted(s: SelfHosted) -> Table:
    t = Table(title="Self-hosted engine vs the model's API", title_justify="left")
    t.add_column("")
    t.add_column("expected cost", justify="right")
    t.add_column("basis")
    t.add_row(f"API ({s.api_model})", _usd(s.api_expected_usd),
              "price table, online" if s.api_expected_usd is not None
              else "no price for this model in the table")
    if s.throughput_rows_s is None:
        basis = "no throughput known: run the job once, or give --throughput ROWS_PER_S"
    else:
        basis = (f"{s.rows:,} rows at {s.throughput_rows_s:,.1f} rows/s "
                 f"({s.throughput_source}) = {s.hours or 0:,.2f} h x {s.gpus:g} GPUs x "
                 f"{_usd(s.gpu_hour_usd)}/GPU-hour")
    t.add_row("self-hosted (engine:)", _usd(s.self_hosted_usd), basis)
    return t
