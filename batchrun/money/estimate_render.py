"""Rich rendering of ``batchrun estimate``: the estimate table and the ``--compare`` table.

``render_estimate`` shows one job's cost (online and batch side by side) and duration;
``render_compare`` shows the same job priced on every model of the table. The figures are
computed in ``batchrun.money.estimate``, which re-exports both functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

NIGHTS_PER_MONTH = 30  # a nightly job's month, for the --compare table's monthly column

if TYPE_CHECKING:
    from batchrun.money.estimate import CompareRow, Estimate

__all__ = ["NIGHTS_PER_MONTH", "render_compare", "render_estimate"]


def _usd(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"${x:,.2f}" if x >= 1 else f"${x:,.4f}"


def _tokens_line(est: Estimate) -> str:
    if est.method == "exact":
        return f"{est.prompt_tokens:,} (exact, every row counted)"
    return (
        f"{est.prompt_tokens:,} ± {est.prompt_tokens_ci95:,} "
        f"(sampled {est.sampled_rows:,} of {est.rows:,} rows, 95%)"
    )


def render_estimate(est: Estimate) -> Table:
    """The estimate as a rich table: online and batch side by side."""
    t = Table(title=f"Estimate: {est.job} · {est.model} · mode {est.mode}", title_justify="left")
    t.add_column("")
    t.add_column("online", justify="right")
    t.add_column("batch", justify="right")
    p, b = est.price, est.batch
    t.add_row(
        "price in / out per 1M",
        f"{_usd(p.input_per_1m)} / {_usd(p.output_per_1m)}",
        f"{_usd(p.batch_input_per_1m)} / {_usd(p.batch_output_per_1m)}" if p.has_batch else "n/a",
    )
    t.add_row("worst-case cost", _usd(est.online.worst_usd), _usd(b.worst_usd if b else None))
    t.add_row(
        f"expected cost (output {est.expected_output_ratio:.0%} of max_tokens)",
        _usd(est.online.expected_usd),
        _usd(b.expected_usd if b else None),
    )
    limits = f"rpm {est.rpm:,}" + (f", tpm {est.tpm:,}" if est.tpm else "")
    t.add_row(
        f"duration ({limits})",
        f"{_minutes(est.duration_minutes)} ({est.duration_bound}-bound)",
        "within the completion window" if b else "n/a",
    )
    t.caption = (
        f"{est.rows:,} rows, {est.requests:,} requests ({est.bad_rows:,} bad rows); "
        f"prompt tokens {_tokens_line(est)}; output ≤ {est.worst_output_tokens:,} tokens "
        f"(max_tokens {est.max_tokens:,}); price: {p.source}"
    )
    return t


def _minutes(m: float) -> str:
    return f"{m:,.1f} min" if m < 120 else f"{m / 60:,.1f} h"


def render_compare(rows: list[CompareRow]) -> Table:
    """The compare rows as a rich table, cheapest first (as given)."""

    t = Table(title="Same job on every priced model (cheapest first)", title_justify="left")
    t.add_column("model")
    for name in ["prompt tokens", "online expected", "batch expected", "worst case"]:
        t.add_column(name, justify="right")
    t.add_column(f"monthly (nightly ×{NIGHTS_PER_MONTH})", justify="right")
    for r in rows:
        worst = r.batch.worst_usd if r.basis == "batch" and r.batch else r.online.worst_usd
        t.add_row(
            f"[bold]{r.model} ◀ job[/bold]" if r.is_job_model else r.model,
            f"{r.prompt_tokens:,}",
            _usd(r.online.expected_usd),
            _usd(r.batch.expected_usd if r.batch else None),
            _usd(worst),
            _usd(r.monthly_usd),
        )
    return t
