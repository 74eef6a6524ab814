"""The job summary, computed from the results files themselves.

Reading the figures back from disk (not from counters kept on the side) is
what makes them agree with the results: rows, statuses, tokens and cost are
sums over the final files. Rates cover this run only: the rows whose
``finished_at`` falls after it started, over its wall time.

Percentiles are linear interpolation between order statistics (numpy's
default, Hyndman-Fan type 7), not ``sorted[int(n * q)]``.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field
from rich.table import Table

__all__ = ["Summary", "percentile", "render_summary", "save_summary", "summarize"]

_COLS = ["model", "status", "error_type", "latency_ms", "attempts", "prompt_tokens",
         "completion_tokens", "total_tokens", "cost_usd", "wait_ms", "finished_at"]


class Summary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job: str = Field(description="Job name.")
    rows: int = Field(description="Rows with a result in the output folder.")
    ok: int = Field(description="Rows answered successfully.")
    errors: int = Field(description="Rows that ended in an error after their attempts.")
    errors_by_type: dict[str, int] = Field(description="Error rows by error_type.")
    unsent: int = Field(0, description="Input rows left unsent (budget exhausted, stopped).")
    success_rate: float = Field(description="ok / rows.")
    wall_s: float = Field(description="Wall time of this run without Ray's start-up: actor "
                          "start, dispatch, writes.")
    rows_this_run: int = Field(description="Rows finished during this run.")
    requests_this_run: int = Field(description="HTTP attempts made during this run.")
    rows_per_s: float = Field(description="rows_this_run / wall_s.")
    requests_per_s: float = Field(description="requests_this_run / wall_s.")
    tokens_per_s: float = Field(description="Total tokens of this run's rows / wall_s.")
    latency_ms: dict[str, float | None] = Field(description="p50, p95, p99, mean of ok rows.")
    retries: int = Field(description="Attempts beyond the first, over all rows.")
    limiter_wait_s: float = Field(description="Seconds rows spent waiting for send slots.")
    prompt_tokens: int = Field(description="Prompt tokens billed.")
    completion_tokens: int = Field(description="Completion tokens billed.")
    total_tokens: int = Field(description="All tokens billed.")
    cost_usd: float = Field(description="Spend, USD.")
    by_model: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Per model: rows, input_tokens, output_tokens, cost_usd.")
    ray_startup_s: float | None = Field(None, description="Seconds to start or join Ray.")
    pending_batches: int = Field(0, description="Batch mode: batches not finished yet "
                                 "(--no-wait); run the same command later to collect them.")
    budget_exhausted: bool = Field(False, description="The budget stopped dispatch; rerun "
                                   "with a raised cap or on a new day to send the rest.")


def percentile(values: pa.Array, qs: list[float]) -> list[float | None]:
    """Linear-interpolated quantiles (type 7); None for an empty array."""
    if len(values) == 0:
        return [None for _ in qs]
    return [float(x) for x in pc.quantile(values, q=qs, interpolation="linear").to_pylist()]


def _read(files: list[Path]) -> pa.Table:
    tables = [pq.read_table(f, columns=_COLS) for f in files]
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in _COLS})


def _sum(col: pa.ChunkedArray | pa.Array) -> float:
    return float(pc.sum(col).as_py() or 0) if len(col) else 0.0


def _by_model(t: pa.Table) -> dict[str, dict[str, float]]:
    if t.num_rows == 0:
        return {}
    g = t.group_by("model").aggregate([("status", "count"), ("prompt_tokens", "sum"),
                                       ("completion_tokens", "sum"), ("cost_usd", "sum")])
    return {row["model"]: {"rows": row["status_count"],
                           "input_tokens": row["prompt_tokens_sum"] or 0,
                           "output_tokens": row["completion_tokens_sum"] or 0,
                           "cost_usd": row["cost_usd_sum"] or 0.0}
            for row in g.to_pylist()}


def summarize(files: list[Path], *, job: str, wall_s: float, run_started: datetime,
              total_rows: int, ray_startup_s: float | None = None,
              budget_exhausted: bool = False, pending_batches: int = 0) -> Summary:
    t = _read(files)
    status = t["status"]
    ok_mask = pc.equal(status, "ok")
    n, ok = t.num_rows, int(pc.sum(ok_mask).as_py() or 0)
    errs = t.filter(pc.invert(ok_mask))["error_type"].to_pylist()
    by_type: dict[str, int] = {}
    for e in errs:
        by_type[e or "unknown"] = by_type.get(e or "unknown", 0) + 1
    lat = t.filter(ok_mask)["latency_ms"].combine_chunks() if n else pa.array([], pa.float64())
    p50, p95, p99 = percentile(lat, [0.5, 0.95, 0.99])
    if n:
        since = pa.scalar(run_started, t["finished_at"].type)
        this = t.filter(pc.greater_equal(t["finished_at"], since))
    else:
        this = t
    wall = max(wall_s, 1e-9)
    attempts = _sum(t["attempts"])
    return Summary(
        job=job, rows=n, ok=ok, errors=n - ok, errors_by_type=dict(sorted(by_type.items())),
        unsent=max(0, total_rows - n), success_rate=ok / n if n else 0.0, wall_s=wall_s,
        rows_this_run=this.num_rows, requests_this_run=int(_sum(this["attempts"])),
        rows_per_s=this.num_rows / wall, requests_per_s=_sum(this["attempts"]) / wall,
        tokens_per_s=_sum(this["total_tokens"]) / wall,
        latency_ms={"p50": p50, "p95": p95, "p99": p99,
                    "mean": float(pc.mean(lat).as_py()) if len(lat) else None},
        retries=int(attempts - pc.sum(pc.greater(t["attempts"], 0)).as_py()) if n else 0,
        limiter_wait_s=_sum(t["wait_ms"]) / 1e3,
        prompt_tokens=int(_sum(t["prompt_tokens"])),
        completion_tokens=int(_sum(t["completion_tokens"])),
        total_tokens=int(_sum(t["total_tokens"])), cost_usd=_sum(t["cost_usd"]),
        by_model=_by_model(t),
        ray_startup_s=ray_startup_s, budget_exhausted=budget_exhausted,
        pending_batches=pending_batches,
    )


def save_summary(summary: Summary, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary.model_dump(), indent=2) + "\n")
    tmp.replace(path)


def _fmt(x: float | None, unit: str = "") -> str:
    return "-" if x is None else f"{x:,.1f}{unit}"


def render_summary(s: Summary) -> Table:
    t = Table(title=f"batchrun: {s.job}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(justify="right")
    rows: list[tuple[str, str]] = [
        ("rows", f"{s.rows:,}"), ("ok", f"{s.ok:,}"), ("errors", f"{s.errors:,}"),
        *[(f"  {k}", f"{v:,}") for k, v in s.errors_by_type.items()],
        ("unsent", f"{s.unsent:,}"), ("success rate", f"{s.success_rate:.2%}"),
        ("wall time", f"{s.wall_s:,.1f} s"), ("rows/s (this run)", _fmt(s.rows_per_s)),
        ("requests/s (this run)", _fmt(s.requests_per_s)), ("tokens/s", _fmt(s.tokens_per_s)),
        ("latency p50 / p95 / p99", " / ".join(_fmt(s.latency_ms[k]) for k in ("p50", "p95", "p99"))
         + " ms"),
        ("retries", f"{s.retries:,}"), ("rate-limiter wait", f"{s.limiter_wait_s:,.1f} s"),
        ("tokens in / out", f"{s.prompt_tokens:,} / {s.completion_tokens:,}"),
        ("cost", f"${s.cost_usd:,.4f}"),
    ]
    for model, m in s.by_model.items():
        rows.append((f"  {model}", f"{m['input_tokens']:,.0f} in / {m['output_tokens']:,.0f} out"
                                   f" / ${m['cost_usd']:,.4f}"))
    for k, v in rows:
        t.add_row(k, v)
    return t
