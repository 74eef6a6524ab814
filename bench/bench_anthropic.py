"""Benchmark: an online Anthropic job against the strict simulator's three limits.

    python -m bench.bench_anthropic [--rows 4000] [--rpm 3000] [--input-tpm 120000]
                                    [--output-tpm 60000] [--latency-ms 100]

The simulator enforces requests (60 s, and rpm/6 per 10 s), input tokens and output
tokens per minute as Anthropic does: output admitted when ``max_tokens`` fits, then
counted at the answer's actual length. The job has the same ``limits`` and runs as
``batchrun run SPEC`` in a subprocess. Reported per limit: the most the ledger holds in
any 60 s window (must not exceed the limit) and the rate achieved over the run, as a
share of the limit; and the 429s. Answers are 5-60 tokens (``max_tokens`` 64), so output
is the binding limit, and only settling each answer's output at its actual count can
use more than output_tpm / max_tokens requests a minute.

Baseline, same run, same rows: the same job on the OpenAI shape, ``limits.tpm`` =
input_tpm + output_tpm, where a request reserves its prompt + ``max_tokens`` against the
one tpm and keeps it (OpenAI's own rule).
"""

from __future__ import annotations

import argparse
from typing import Any

from batchrun.sim.ledger import max_in_window
from bench.common import emit, provider, results, run_cli, write_spec

MODEL = "claude-haiku-4-5"
SYSTEM = "Answer in one short sentence."


def _max_sum(records: list[dict[str, Any]], key: str, window: float = 60.0) -> int:
    """The largest sum of ``key`` over records inside any ``window`` seconds."""
    best, lo, total = 0, 0, 0
    for r in records:
        total += r[key]
        while r["t"] - records[lo]["t"] >= window:
            total -= records[lo][key]
            lo += 1
        best = max(best, total)
    return best


def _figures(name: str, records: list[dict[str, Any]], limits: dict[str, int], rows: int,
             rc: int, ok: int) -> dict[str, Any]:
    counted = [r for r in records if r["counted"]]
    span = counted[-1]["t"] - counted[0]["t"] if len(counted) > 1 else 0.0
    per_min = 60.0 / span if span else 0.0
    achieved = {"requests": len(counted) * per_min,
                "input_tokens": sum(r["prompt_tokens"] for r in counted) * per_min,
                "output_tokens": sum(r["completion_tokens"] for r in counted) * per_min}
    peaks = {"requests": max_in_window([r["t"] for r in counted], 60.0),
             "input_tokens": _max_sum(counted, "prompt_tokens"),
             "output_tokens": _max_sum(counted, "completion_tokens")}
    out: dict[str, Any] = {"job": name, "rows": rows, "rows_ok": ok, "exit_code": rc,
                           "http_429": sum(r["status"] == 429 for r in records),
                           "span_s": round(span, 1)}
    for k, limit in limits.items():
        out[k] = {"limit": limit, "achieved_per_min": round(achieved[k]),
                  "share": round(achieved[k] / limit, 4), "peak_60s": peaks[k],
                  "within": peaks[k] <= limit}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--rpm", type=int, default=3000)
    ap.add_argument("--input-tpm", type=int, default=120_000)
    ap.add_argument("--output-tpm", type=int, default=60_000)
    ap.add_argument("--latency-ms", type=float, default=100.0)
    a = ap.parse_args()
    common = {"system_prompt": SYSTEM, "model": MODEL, "shard_rows": 1000,
              "retry": {"max_attempts": 8}}
    runs = []
    with provider(rpm=a.rpm, input_tpm=a.input_tpm, output_tpm=a.output_tpm,
                  latency_ms=a.latency_ms) as srv:
        spec = write_spec("anthropic", a.rows, srv.url, **common,
                          endpoint={"api": "anthropic", "base_url": srv.url},
                          limits={"rpm": a.rpm, "input_tpm": a.input_tpm,
                                  "output_tpm": a.output_tpm, "max_concurrency": 128})
        _, _, rc = run_cli(spec)
        runs.append(_figures("anthropic (input_tpm + output_tpm, settled)", srv.records(),
                             {"requests": a.rpm, "input_tokens": a.input_tpm,
                              "output_tokens": a.output_tpm}, a.rows, rc, results(spec)["ok"]))
    tpm = a.input_tpm + a.output_tpm
    with provider(rpm=a.rpm, tpm=tpm, latency_ms=a.latency_ms) as srv:
        spec = write_spec("anthropic-baseline", a.rows, srv.base_url, **common,
                          limits={"rpm": a.rpm, "tpm": tpm, "max_concurrency": 128})
        _, _, rc = run_cli(spec)
        recs = srv.records()
        fig = _figures("openai shape (one tpm, max_tokens reserved)", recs,
                       {"requests": a.rpm}, a.rows, rc, results(spec)["ok"])
        counted = [r for r in recs if r["counted"]]
        # what the one window charged: prompt + max_tokens per request
        fig["tpm"] = {"limit": tpm, "charged_peak_60s": _max_sum(
            [{**r, "w": r["prompt_tokens"] + 64} for r in counted], "w")}
        fig["output_tokens_per_min"] = round(sum(r["completion_tokens"] for r in counted)
                                             * 60.0 / max(fig["span_s"], 1e-9))
        runs.append(fig)
    for r in runs:
        emit("anthropic", r)


if __name__ == "__main__":
    main()
