"""Custom Ray metrics, exported on every node's Prometheus endpoint.

Names as Prometheus shows them (Ray prefixes ``ray_`` and suffixes counters
with ``_total``): ``ray_batchrun_requests_total{job,status,error_type}``,
``ray_batchrun_input_tokens_total``, ``ray_batchrun_output_tokens_total``,
``ray_batchrun_cost_usd_total``, ``ray_batchrun_latency_ms`` (histogram),
``ray_batchrun_limiter_wait_ms_total``, ``ray_batchrun_in_flight`` and
``ray_batchrun_rows_remaining`` (gauges). Every series carries the ``job`` tag.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ray.util import metrics

__all__ = ["JobMetrics", "request_latencies"]

_LATENCY_BOUNDS_MS = [50.0, 100.0, 250.0, 500.0, 1e3, 2.5e3, 5e3, 1e4, 3e4, 6e4]


def request_latencies(recs: list[dict[str, Any]]) -> list[float]:
    """The latency of each successful request among ``recs``. The rows one request
    answered (embeddings: up to 2,048) share its latency and sit side by side: it counts
    once, as the one request it was, not once per row."""
    out: list[float] = []
    for rec in recs:  # an error row inside a request (a bad row) has no latency: skipped
        latency = rec.get("latency_ms")
        if latency is not None and rec.get("status") == "ok" and (
                not out or latency != out[-1]):
            out.append(latency)
    return out


class JobMetrics:
    """The metrics of one job as seen by one process (a worker or the driver)."""

    def __init__(self, job: str):
        self._tags = {"job": job}
        self.requests = metrics.Counter(
            "batchrun_requests", "Rows finished, by status and error type.",
            tag_keys=("job", "status", "error_type"))
        self.input_tokens = metrics.Counter(
            "batchrun_input_tokens", "Prompt tokens billed.", tag_keys=("job",))
        self.output_tokens = metrics.Counter(
            "batchrun_output_tokens", "Completion tokens billed.", tag_keys=("job",))
        self.cost = metrics.Counter("batchrun_cost_usd", "Spend in USD.", tag_keys=("job",))
        self.latency = metrics.Histogram(
            "batchrun_latency_ms", "Latency of successful requests, ms.",
            boundaries=_LATENCY_BOUNDS_MS, tag_keys=("job",))
        self.wait = metrics.Counter(
            "batchrun_limiter_wait_ms", "Time spent waiting on the rate limiter, ms.",
            tag_keys=("job",))
        self.in_flight = metrics.Gauge(
            "batchrun_in_flight", "Requests in flight in this worker.", tag_keys=("job",))
        self.remaining = metrics.Gauge(
            "batchrun_rows_remaining", "Rows of the job without a result yet.", tag_keys=("job",))

    def observe(self, recs: list[dict[str, Any]]) -> None:
        """Account a batch of finished rows: a few calls per batch, not per row."""
        tags = self._tags
        by_status = Counter((r.get("status") or "error", r.get("error_type") or "")
                            for r in recs)
        for latency in request_latencies(recs):
            self.latency.observe(latency, tags)
        for (status, etype), n in by_status.items():
            self.requests.inc(n, {**tags, "status": status, "error_type": etype})
        for key, counter in (("prompt_tokens", self.input_tokens),
                             ("completion_tokens", self.output_tokens),
                             ("cost_usd", self.cost), ("wait_ms", self.wait)):
            if (total := sum(r.get(key) or 0 for r in recs)) > 0:
                counter.inc(total, tags)

    def set_in_flight(self, n: int) -> None:
        self.in_flight.set(n, self._tags)

    def set_remaining(self, n: int) -> None:
        self.remaining.set(n, self._tags)
