"""What a job will cost and how long it will take, computed WITHOUT sending anything.

Rows come from Parquet footers (sum of shard sizes). Prompt tokens are counted with
the request kind's ``prompt_tokens`` on every row, or on a uniform random sample of rows that is
extrapolated to the whole input (with a 95% interval) when ``sample_rows`` is set;
the CLI counts exactly up to ``EXACT_ROW_LIMIT`` rows and samples above.

Two costs are shown, online and batch side by side:
  * worst case: every row's prompt plus ``max_tokens`` of output (the bound the
    budget reserves; a provider never bills more output than ``max_tokens``);
  * expected: the prompt plus ``expected_output_ratio`` x ``max_tokens`` of output.
    0.5 is the default because answers usually stop well before the cap; set it from
    a previous run's summary (mean completion tokens / max_tokens) for a better figure.
The duration is for online mode at the job's limits: the larger of rows / rpm and
(prompt + max_tokens per row) / tpm, since the rate limiter charges tpm with the
max_tokens bound. Latency and max_concurrency are not modelled. Batch jobs finish
within the provider's completion window instead. Structured-output schemas add a
few prompt tokens per request that are not counted here.

This module computes; the rich tables (``render_estimate``, ``render_compare``) live in
``batchrun.money.estimate_render`` and are re-exported here.
"""

from __future__ import annotations

import json
import math
import random
import sys
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field
from rich.console import Console

from batchrun.api.protocols import RequestKind, inputs_per_request, output_tokens
from batchrun.api.registry import kind_for
from batchrun.api.tokens import encoding_name_for
from batchrun.errors import UserError
from batchrun.io import stores
from batchrun.io.shards import Shard, iter_shard_rows, plan_shards
from batchrun.money.estimate_render import NIGHTS_PER_MONTH, render_compare, render_estimate
from batchrun.money.pricing import (
    ModelPrice,
    cost_usd,
    load_price_table,
    lookup,
    price_for,
    price_of_entry,
)
from batchrun.money.selfhosted import SelfHosted, render_self_hosted, self_hosted
from batchrun.spec import JobSpec, load_spec

__all__ = [
    "DEFAULT_EXPECTED_OUTPUT_RATIO",
    "DEFAULT_SAMPLE_ROWS",
    "EXACT_ROW_LIMIT",
    "CompareRow",
    "CostLine",
    "Estimate",
    "compare",
    "default_sample_rows",
    "estimate",
    "estimate_command",
    "estimate_job",
    "render_compare",
    "render_estimate",
]

Bound = Literal["rpm", "tpm", "input_tpm", "output_tpm"]

EXACT_ROW_LIMIT = 200_000
DEFAULT_SAMPLE_ROWS = 20_000
DEFAULT_EXPECTED_OUTPUT_RATIO = 0.5
_SEED = 0  # a fixed seed: the same input gives the same estimate on every run


class CostLine(BaseModel):
    worst_usd: float = Field(..., description="Every row's prompt + max_tokens of output.")
    expected_usd: float = Field(..., description="Prompt + expected_output_ratio x max_tokens.")


class Estimate(BaseModel):
    """A job's rows, prompt tokens, worst-case and expected cost (online and batch) and
    online duration at its limits, computed without sending anything."""

    job: str = Field(..., description="Job name.")
    model: str = Field(..., description="Model of the job.")
    mode: Literal["online", "batch"] = Field(..., description="The job's mode.")
    rows: int = Field(..., description="Input rows (Parquet metadata).")
    requests: int = Field(..., description="Rows that will be sent (bad rows are not).")
    bad_rows: int = Field(..., description="Rows without a usable prompt (estimated if sampled).")
    method: Literal["exact", "sampled"] = Field(..., description="How prompts were counted.")
    sampled_rows: int = Field(..., description="Rows tokenized (all rows when exact).")
    prompt_tokens: int = Field(..., description="Prompt tokens of all requests.")
    prompt_tokens_ci95: int = Field(..., description="Half-width of a 95% interval; 0 if exact.")
    max_tokens: int = Field(..., description="generation.max_tokens.")
    expected_output_ratio: float = Field(..., description="Expected share of max_tokens used.")
    worst_output_tokens: int = Field(..., description="requests x max_tokens.")
    expected_output_tokens: int = Field(..., description="worst_output_tokens x ratio.")
    price: ModelPrice = Field(..., description="The price used.")
    online: CostLine = Field(..., description="Cost through the online API.")
    batch: CostLine | None = Field(..., description="Cost through a Batch API; None if none.")
    rpm: int = Field(..., description="limits.rpm.")
    tpm: int | None = Field(..., description="limits.tpm.")
    duration_minutes: float = Field(..., description="Online duration at the job's limits.")
    duration_bound: Bound = Field(..., description="The limit that binds.")


class CompareRow(BaseModel):
    model: str = Field(..., description="Table name (or the job's own model).")
    encoding: str = Field(..., description="Tokenizer used to count the prompts.")
    prompt_tokens: int = Field(..., description="Prompt tokens with that model's tokenizer.")
    online: CostLine = Field(..., description="Online cost.")
    batch: CostLine | None = Field(..., description="Batch cost; None = no batch API.")
    basis: Literal["online", "batch"] = Field(..., description="Mode the ranking uses.")
    expected_usd: float = Field(..., description="Expected cost of one run in that mode.")
    monthly_usd: float = Field(..., description="expected_usd x 30 (run nightly).")
    is_job_model: bool = Field(..., description="This row is the job's own model.")


@dataclass
class _Stats:
    """Prompt-token totals for one encoding, extrapolated when sampled."""

    rows: int
    seen: int = 0
    valid: int = 0
    total: int = 0
    sumsq: int = 0

    def requests(self) -> int:
        return self.valid if self.seen >= self.rows else round(self.rows * self.valid / self.seen)

    def tokens(self) -> int:
        return self.total if self.seen >= self.rows else round(self.rows * self.total / self.seen)

    def ci95(self) -> int:
        # Simple random sample without replacement; bad rows count as 0 tokens.
        n, big_n = self.seen, self.rows
        if n >= big_n or n < 2:
            return 0
        mean = self.total / n
        var = max(0.0, (self.sumsq - n * mean * mean) / (n - 1))
        return math.ceil(1.96 * big_n * math.sqrt(var / n * (1 - n / big_n)))


def default_sample_rows(rows: int) -> int | None:
    """The CLI's rule: count every row up to EXACT_ROW_LIMIT, sample above it."""
    return None if rows <= EXACT_ROW_LIMIT else DEFAULT_SAMPLE_ROWS


def _picks(rows: int, sample_rows: int | None) -> set[int] | None:
    if sample_rows is None or sample_rows >= rows:
        return None
    if sample_rows < 1:
        raise UserError("--sample must be at least 1 row")
    return set(random.Random(_SEED).sample(range(rows), sample_rows))


def _count(
    spec: JobSpec, shards: list[Shard], models: Iterable[str], sample_rows: int | None
) -> dict[str, _Stats]:
    """One pass over the input, counting prompts once per distinct encoding."""
    rows = sum(s.num_rows for s in shards)
    reps: dict[str, str] = {}
    for m in models:
        reps.setdefault(encoding_name_for(m), m)
    stats = {enc: _Stats(rows) for enc in reps}
    kind = kind_for(spec)
    picks = _picks(rows, sample_rows)
    ordered = sorted(picks) if picks is not None else []
    offset = 0
    for shard in shards:
        base, offset = offset, offset + shard.num_rows
        if picks is not None and bisect_left(ordered, base) == bisect_left(ordered, offset):
            continue  # no sampled row in this shard: do not even read it
        pos = base
        for batch in iter_shard_rows(spec, shard):
            for row in batch:
                if picks is None or pos in picks:
                    _add(stats, reps, row.messages, kind)
                pos += 1
    return stats


def _add(stats: dict[str, _Stats], reps: dict[str, str], messages: list | None,
         kind: RequestKind) -> None:
    for enc, model in reps.items():
        st = stats[enc]
        st.seen += 1
        if messages is not None:
            n = kind.prompt_tokens(messages, model)
            st.valid += 1
            st.total += n
            st.sumsq += n * n


def _costs(
    price: ModelPrice, prompt: int, requests: int, max_tokens: int, ratio: float, batch: bool
) -> CostLine | None:
    """Worst and expected cost; None for batch when the model has no batch price."""
    if batch and not price.has_batch:
        return None
    worst_out = requests * max_tokens
    return CostLine(
        worst_usd=cost_usd(price, prompt, worst_out, batch),
        expected_usd=cost_usd(price, prompt, round(worst_out * ratio), batch),
    )


def _duration(spec: JobSpec, rows: int, prompt: int) -> tuple[float, Bound]:
    """Minutes at the binding limit. Output is counted at its worst case (max_tokens; the
    limiter gives unused output back, so an output_tpm-bound job often runs faster)."""
    kind = kind_for(spec)  # embeddings: many rows a request, no output tokens
    lim, out = spec.limits, rows * output_tokens(kind, spec)
    # an engine: job has no rpm (its replicas' capacity is the limit): no rpm bound
    requests = -(-rows // inputs_per_request(kind, spec))
    bounds: list[tuple[float, Bound]] = [(requests / lim.rpm if lim.rpm else 0.0, "rpm")]
    for limit, tokens, name in ((lim.tpm, prompt + out, "tpm"), (lim.input_tpm, prompt,
                                "input_tpm"), (lim.output_tpm, out, "output_tpm")):
        if limit:
            bounds.append((tokens / limit, name))  # type: ignore[arg-type]
    return max(bounds, key=lambda b: b[0])


def _check_ratio(ratio: float) -> None:
    if not 0 <= ratio <= 1:
        raise UserError("expected_output_ratio must be between 0 and 1 (share of max_tokens)")


def _build(spec: JobSpec, st: _Stats, price: ModelPrice, ratio: float) -> Estimate:
    requests, prompt, mt = st.requests(), st.tokens(), output_tokens(kind_for(spec), spec)
    minutes, bound = _duration(spec, requests, prompt)
    online = _costs(price, prompt, requests, mt, ratio, batch=False)
    assert online is not None  # online prices always exist
    return Estimate(
        job=spec.name,
        model=spec.model,
        mode=spec.mode,
        rows=st.rows,
        requests=requests,
        bad_rows=st.rows - requests,
        method="exact" if st.seen >= st.rows else "sampled",
        sampled_rows=st.seen,
        prompt_tokens=prompt,
        prompt_tokens_ci95=st.ci95(),
        max_tokens=mt,
        expected_output_ratio=ratio,
        worst_output_tokens=requests * mt,
        expected_output_tokens=round(requests * mt * ratio),
        price=price,
        online=online,
        batch=_costs(price, prompt, requests, mt, ratio, batch=True),
        rpm=spec.limits.rpm or 0,
        tpm=spec.limits.tpm,
        duration_minutes=minutes,
        duration_bound=bound,
    )


def estimate(
    spec: JobSpec,
    sample_rows: int | None = None,
    expected_output_ratio: float = DEFAULT_EXPECTED_OUTPUT_RATIO,
) -> Estimate:
    """Cost and duration of ``spec``; exact unless ``sample_rows`` is below the row count."""
    _check_ratio(expected_output_ratio)
    price = price_for(spec)
    shards = plan_shards(spec)
    stats = _count(spec, shards, [spec.model], sample_rows)
    return _build(spec, stats[encoding_name_for(spec.model)], price, expected_output_ratio)


def _compare_rows(
    spec: JobSpec, stats: dict[str, _Stats], ratio: float, job_price: ModelPrice | None
) -> list[CompareRow]:
    # The job's own model is ranked at the job's price (its override, or 0 if self-hosted).
    job_row = None if job_price is None else (job_price.table_name or spec.model)
    priced = [
        (name, job_price if name == job_row and job_price else price_of_entry(name, name, e))
        for name, e in load_price_table().models.items()
        if e.task == ("embeddings" if spec.task == "embeddings" else "chat")  # like for like
    ]
    if job_price is not None and job_price.table_name is None:
        priced.append((spec.model, job_price))
    out = []
    for name, price in priced:
        st = stats[encoding_name_for(name)]
        requests, prompt, mt = st.requests(), st.tokens(), spec.generation.max_tokens
        online = _costs(price, prompt, requests, mt, ratio, batch=False)
        batch = _costs(price, prompt, requests, mt, ratio, batch=True)
        assert online is not None
        basis: Literal["online", "batch"] = "batch" if spec.mode == "batch" and batch else "online"
        expected = (batch if basis == "batch" and batch else online).expected_usd
        out.append(
            CompareRow(
                model=name,
                encoding=encoding_name_for(name),
                prompt_tokens=prompt,
                online=online,
                batch=batch,
                basis=basis,
                expected_usd=expected,
                monthly_usd=expected * NIGHTS_PER_MONTH,
                is_job_model=name == job_row,
            )
        )
    return sorted(out, key=lambda r: (r.expected_usd, r.model))


def _job_price_or_none(spec: JobSpec) -> ModelPrice | None:
    try:
        return price_for(spec)
    except UserError:
        return None  # a model outside the table is simply not ranked


def compare(
    spec: JobSpec,
    sample_rows: int | None = None,
    expected_output_ratio: float = DEFAULT_EXPECTED_OUTPUT_RATIO,
) -> list[CompareRow]:
    """The same job priced on every model of the table (and the job's own), cheapest first.

    Ranked by the expected cost in the job's mode (batch where the model has a batch
    API and the job runs in batch mode); ``monthly_usd`` is that x30 (run nightly).
    """
    _check_ratio(expected_output_ratio)
    job_price = _job_price_or_none(spec)
    models = [*load_price_table().models, spec.model]
    stats = _count(spec, plan_shards(spec), models, sample_rows)
    return _compare_rows(spec, stats, expected_output_ratio, job_price)


def estimate_job(
    spec: JobSpec,
    compare: bool = False,
    sample_rows: int | Literal["auto"] | None = "auto",
    expected_output_ratio: float = DEFAULT_EXPECTED_OUTPUT_RATIO,
    throughput: float | None = None,
) -> tuple[Estimate, list[CompareRow] | None, SelfHosted | None]:
    """What ``batchrun estimate`` prints (and ``batchrun.estimate`` returns): the job's
    estimate and, with ``compare``, every model ranked and (an ``engine:`` job) the
    self-hosted line. ``sample_rows="auto"``: the CLI's rule (exact up to
    EXACT_ROW_LIMIT rows, a sample above); None: exact."""
    stores.configure(spec.storage)  # an input in a store: its endpoint
    _check_ratio(expected_output_ratio)
    shards = plan_shards(spec)
    rows = sum(s.num_rows for s in shards)
    sample = default_sample_rows(rows) if sample_rows == "auto" else sample_rows
    price = price_for(spec)
    models = [spec.model, *(load_price_table().models if compare else [])]
    stats = _count(spec, shards, models, sample)
    est = _build(spec, stats[encoding_name_for(spec.model)], price, expected_output_ratio)
    ranked = _compare_rows(spec, stats, expected_output_ratio, price) if compare else None
    hosted = (_self_hosted(spec, stats, expected_output_ratio, throughput)
              if compare and spec.engine is not None else None)
    return est, ranked, hosted


def estimate_command(
    spec_path: str,
    compare: bool,
    as_json: bool,
    *,
    ds: str | None = None,
    sample_rows: int | Literal["auto"] | None = "auto",
    expected_output_ratio: float = DEFAULT_EXPECTED_OUTPUT_RATIO,
    throughput: float | None = None,
) -> int:
    """``batchrun estimate JOB.yaml [--compare] [--json]``: print, return the exit code.

    ``sample_rows="auto"`` is the default rule (exact up to EXACT_ROW_LIMIT rows, a
    sample of DEFAULT_SAMPLE_ROWS above); None forces an exact count.
    """
    try:
        spec = load_spec(spec_path, ds=ds)
        est, ranked, hosted = estimate_job(spec, compare, sample_rows, expected_output_ratio,
                                           throughput)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if as_json:
        doc: dict[str, object] = {"estimate": est.model_dump(mode="json")}
        if ranked is not None:
            doc["compare"] = [r.model_dump(mode="json") for r in ranked]
        if hosted is not None:
            doc["self_hosted"] = hosted.model_dump(mode="json")
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return 0
    console = Console()
    console.print(render_estimate(est))
    if ranked is not None:
        console.print(render_compare(ranked))
    if hosted is not None:
        console.print(render_self_hosted(hosted))
    return 0


def _self_hosted(spec: JobSpec, stats: dict[str, _Stats], ratio: float,
                 throughput: float | None) -> SelfHosted:
    """An engine job at its model's API price (the table's) next to its GPU time."""
    found = lookup(spec.model)
    st = stats[encoding_name_for(spec.model)]
    api = (_build(spec, st, price_of_entry(spec.model, *found), ratio).online.expected_usd
           if found else None)
    return self_hosted(spec, st.requests(), throughput, api)
