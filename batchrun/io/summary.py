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
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field
from rich.table import Table

from batchrun.errors import EXIT_PENDING, EXIT_ROW_ERRORS, BudgetExhausted, JobCannotSucceed
from batchrun.io.storage import Where, commit_bytes, read_table

__all__ = ["Summary", "errors_line", "exit_code", "percentile", "render_summary", "save_summary",
           "summarize"]

_COLS = ["model", "status", "error_type", "latency_ms", "attempts", "prompt_tokens",
         "completion_tokens", "total_tokens", "cost_usd", "wait_ms", "finished_at"]


class Summary(BaseModel):
    """What a run of a job did, read back from its results files (``OUTPUT/summary.json``):
    rows, statuses, errors by type, tokens, cost, latency percentiles and rates."""

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
    limiter_wait_s: float = Field(description="Seconds rows spent waiting for send slots, "
                                  "summed over rows (they wait side by side).")
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
    output: str | None = Field(None, description="The output folder: results/ and this file.")
    engine: dict[str, float | None] | None = Field(
        None, description="Self-hosted engine (engine:): replicas, reserved_s, gpu_hours, "
        "gpu_hour_usd, cost_usd, usd_per_1k_rows, usd_per_1m_output_tokens (this run).")


def percentile(values: pa.Array, qs: list[float]) -> list[float | None]:
    """Linear-interpolated quantiles (type 7); None for an empty array."""
    if len(values) == 0:
        return [None for _ in qs]
    return [float(x) for x in pc.quantile(values, q=qs, interpolation="linear").to_pylist()]


def _sum(col: pa.ChunkedArray | pa.Array) -> float:
    return float(pc.sum(col).as_py() or 0) if len(col) else 0.0


@dataclass
class _Tally:
    """Sums over the results files, one file at a time: a 10M-row job's summary holds
    one column (ok latencies, for the percentiles) in memory, not the whole results."""

    rows: int = 0
    ok: int = 0
    by_type: Counter[str] = field(default_factory=Counter)
    latencies: list[pa.Array] = field(default_factory=list)
    sums: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    by_model: dict[str, Counter[str]] = field(default_factory=dict)

    def add(self, t: pa.Table, since: datetime) -> None:
        ok_mask = pc.equal(t["status"], "ok")
        self.rows += t.num_rows
        self.ok += int(pc.sum(ok_mask).as_py() or 0)
        self.by_type.update(e or "unknown" for e in
                            t.filter(pc.invert(ok_mask))["error_type"].to_pylist())
        self.latencies.append(t.filter(ok_mask)["latency_ms"].combine_chunks())
        this = t.filter(pc.greater_equal(t["finished_at"],
                                         pa.scalar(since, t["finished_at"].type)))
        for key, table, col in (("attempts", t, "attempts"), ("wait_ms", t, "wait_ms"),
                                ("prompt_tokens", t, "prompt_tokens"),
                                ("completion_tokens", t, "completion_tokens"),
                                ("total_tokens", t, "total_tokens"), ("cost_usd", t, "cost_usd"),
                                ("this_attempts", this, "attempts"),
                                ("this_tokens", this, "total_tokens")):
            self.sums[key] += _sum(table[col])
        self.sums["this_rows"] += this.num_rows
        self.sums["sent_rows"] += int(pc.sum(pc.greater(t["attempts"], 0)).as_py() or 0)
        g = t.group_by("model").aggregate([("status", "count"), ("prompt_tokens", "sum"),
                                           ("completion_tokens", "sum"), ("cost_usd", "sum")])
        for row in g.to_pylist():
            m = self.by_model.setdefault(row["model"], Counter())
            m.update({"rows": row["status_count"], "input_tokens": row["prompt_tokens_sum"] or 0,
                      "output_tokens": row["completion_tokens_sum"] or 0,
                      "cost_usd": row["cost_usd_sum"] or 0.0})


def summarize(files: Sequence[Where], *, job: str, wall_s: float, run_started: datetime,
              total_rows: int, ray_startup_s: float | None = None,
              budget_exhausted: bool = False, pending_batches: int = 0,
              output: str | None = None, fs: pafs.FileSystem | None = None) -> Summary:
    """The summary of the final results ``files`` (on ``fs``: ``ResultsStore.fs``)."""
    tally = _Tally()
    for f in files:
        tally.add(read_table(f, fs=fs, columns=_COLS), run_started)
    n, ok, s = tally.rows, tally.ok, tally.sums
    lat = (pa.concat_arrays(tally.latencies) if tally.latencies
           else pa.array([], pa.float64()))
    p50, p95, p99 = percentile(lat, [0.5, 0.95, 0.99])
    wall = max(wall_s, 1e-9)
    return Summary(
        job=job, rows=n, ok=ok, errors=n - ok, errors_by_type=dict(sorted(tally.by_type.items())),
        unsent=max(0, total_rows - n), success_rate=ok / n if n else 0.0, wall_s=wall_s,
        rows_this_run=int(s["this_rows"]), requests_this_run=int(s["this_attempts"]),
        rows_per_s=s["this_rows"] / wall, requests_per_s=s["this_attempts"] / wall,
        tokens_per_s=s["this_tokens"] / wall,
        latency_ms={"p50": p50, "p95": p95, "p99": p99,
                    "mean": float(pc.mean(lat).as_py()) if len(lat) else None},
        retries=int(s["attempts"] - s["sent_rows"]),
        limiter_wait_s=s["wait_ms"] / 1e3,
        prompt_tokens=int(s["prompt_tokens"]), completion_tokens=int(s["completion_tokens"]),
        total_tokens=int(s["total_tokens"]), cost_usd=s["cost_usd"],
        by_model={m: dict(c) for m, c in tally.by_model.items()},
        ray_startup_s=ray_startup_s, budget_exhausted=budget_exhausted,
        pending_batches=pending_batches, output=output, engine=None,
    )


def exit_code(s: Summary) -> int:
    """``batchrun run``'s exit code for a finished run: batches pending (10), budget
    exhausted (4), rows left unsent for no reason the run gave (7: never a success),
    some rows status=error (6), else 0. The CLI, the submitted job's entrypoint and so
    the scheduler read the same answer."""
    if s.pending_batches:
        return EXIT_PENDING
    if s.budget_exhausted:
        return BudgetExhausted.exit_code
    if s.unsent:
        return JobCannotSucceed.exit_code
    return EXIT_ROW_ERRORS if s.errors else 0


def errors_line(s: Summary, rerun: str = "batchrun run JOB.yaml") -> str | None:
    """One line on the rows in error and how to re-send them; None when there are none."""
    if not s.errors:
        return None
    kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(s.errors_by_type.items(),
                                                      key=lambda kv: -kv[1]))
    return (f"{s.errors:,} of {s.rows:,} rows ended in error ({kinds}); "
            f"`{rerun} --retry-errors` re-sends them")


def save_summary(summary: Summary, path: Where, *, fs: pafs.FileSystem | None = None) -> None:
    commit_bytes(path, (json.dumps(summary.model_dump(), indent=2) + "\n").encode(), fs=fs)


def _fmt(x: float | None, unit: str = "") -> str:
    return "-" if x is None else f"{x:,.1f}{unit}"


def _usd(x: float | None) -> str:
    return "-" if x is None else f"${x:,.4f}"


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
        ("retries", f"{s.retries:,}"),
        # a sum over rows that waited side by side: per row is what a user can compare
        ("rate-limiter wait per row (mean)", f"{1e3 * s.limiter_wait_s / max(s.rows, 1):,.0f} ms"),
        ("tokens in / out", f"{s.prompt_tokens:,} / {s.completion_tokens:,}"),
        ("cost", f"${s.cost_usd:,.4f}"),
    ]
    for model, m in s.by_model.items():
        rows.append((f"  {model}", f"{m['input_tokens']:,.0f} in / {m['output_tokens']:,.0f} out"
                                   f" / ${m['cost_usd']:,.4f}"))
    if s.engine is not None:
        e = s.engine
        rows.append(("engine GPU hours", f"{e['gpu_hours'] or 0:,.4f} ({e['replicas']:.0f} "
                     f"replicas, {e['reserved_s'] or 0:,.1f} s reserved)"))
        if e.get("cost_usd") is not None:
            rows.append(("engine cost", f"${e['cost_usd']:,.4f}; per 1k rows "
                         f"{_usd(e.get('usd_per_1k_rows'))}; per 1M output tokens "
                         f"{_usd(e.get('usd_per_1m_output_tokens'))}"))
    for k, v in rows:
        t.add_row(k, v)
    return t
