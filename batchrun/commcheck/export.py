"""Machine-readable outputs: JSON (everything), Parquet (rows), Prometheus textfile.

The Prometheus file is for node-exporter's textfile collector: it is written
to a temporary name and renamed, so the collector never reads half a file.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict
from typing import Any

from batchrun.commcheck.report import Report

__all__ = ["prometheus_text", "write_json", "write_parquet", "write_prometheus"]

_P = "batchrun_commcheck_"


def write_json(report: Report, path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(report.to_dict(), fh, indent=2, default=str)
        fh.write("\n")


def write_parquet(report: Report, path: str) -> None:
    """One row per (group, op, size) with run-level columns repeated, for nightly charts."""
    import pyarrow as pa  # lazy: pyarrow is only needed for --out
    import pyarrow.parquet as pq

    run = {
        "timestamp": report.settings.get("timestamp"), "world_size": report.world_size,
        "backend": report.settings.get("backend"), "launcher": report.settings.get("launcher"),
        "nodes": report.topology.get("nodes"), "avg_busbw": report.avg_busbw,
        "passed": report.passed, "status": report.status,
        "env": json.dumps(report.env, sort_keys=True),
        "topology": json.dumps(report.topology, sort_keys=True, default=str),
    }
    records = [{**asdict(r), **run} for r in report.rows + report.groups + report.pairwise]
    pq.write_table(pa.Table.from_pylist(records), path)


def _labels(**labels: Any) -> str:
    def esc(value: Any) -> str:
        return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    inner = ",".join(f'{k}="{esc(v)}"' for k, v in labels.items() if v is not None)
    return "{" + inner + "}" if inner else ""


def _metric(out: list[str], name: str, help_text: str,
            samples: list[tuple[dict[str, Any], float]]) -> None:
    out += [f"# HELP {_P}{name} {help_text}", f"# TYPE {_P}{name} gauge"]
    for labels, value in samples:
        text = "NaN" if value is None or math.isnan(value) else repr(float(value))
        out.append(f"{_P}{name}{_labels(**labels)} {text}")


def prometheus_text(report: Report, exit_code: int | None = None) -> str:
    """Gauges: verdict, per-op bandwidth, #wrong, per-rank and per-GPU figures."""
    out: list[str] = []
    _metric(out, "passed", "1 when every check passed", [({}, float(report.passed))])
    _metric(out, "exit_code", "0 pass, 1 unhealthy, 2 bad input, 3 could not run",
            [({}, float(report.exit_code if exit_code is None else exit_code))])
    _metric(out, "failures", "failed checks by kind", [
        ({"kind": k}, float(sum(1 for f in report.all_failures() if f.kind == k)))
        for k in ("unhealthy", "could_not_run")])
    _metric(out, "avg_busbw_gbps", "average bus bandwidth of the whole group",
            [({"op": op}, report.avg_busbw_of(op)) for op in report.ops])
    _metric(out, "busbw_gbps", "bus bandwidth per size (out-of-place)", [
        ({"op": r.op, "size": r.size, "group": r.group}, r.oop_busbw or 0.0)
        for r in report.rows + report.groups if r.status == "ok"])
    _metric(out, "wrong_total", "wrong values over all rows", [({}, float(report.wrong))])
    _metric(out, "timeouts", "sizes that timed out", [
        ({}, float(sum(1 for r in report.rows + report.groups if r.status == "timeout")))])
    rc = report.rank_check or {}
    scores = rc["passes"][0]["scores"] if rc.get("passes") else {}
    _metric(out, "rank_busbw_gbps", "rank check: median busbw of the rank's pairs", [
        ({"rank": r, "node": _node(report, r)}, v) for r, v in sorted(scores.items())])
    _metric(out, "rank_named", "1 for a rank the rank check named as slow", [
        ({"rank": r, "node": _node(report, r)}, float(r in rc.get("named", [])))
        for r in sorted(scores)])
    for key, name, help_text in (("copy_gbps", "gpu_copy_gbps", "device-to-device copy"),
                                 ("bf16_tflops", "gpu_bf16_tflops", "bf16 matmul throughput"),
                                 ("temperature_c", "gpu_temperature_celsius", "GPU temperature"),
                                 ("power_w", "gpu_power_watts", "GPU power draw")):
        _metric(out, name, help_text, [(_gpu_labels(g), g[key]) for g in report.health
                                       if g.get(key) is not None])
    _metric(out, "gpu_healthy", "1 when every health check of the GPU passed", [
        (_gpu_labels(g), float(bool(g.get("healthy")))) for g in report.health])
    _metric(out, "timestamp_seconds", "when the run ended (unix time)",
            [({}, float(report.settings.get("ended", 0.0) or 0.0))])
    return "\n".join(out) + "\n"


def _node(report: Report, rank: int) -> str:
    return next((str(i.get("node")) for i in report.ranks if i.get("rank") == rank), "?")


def _gpu_labels(g: dict[str, Any]) -> dict[str, Any]:
    return {"node": g["node"], "gpu": g["gpu"], "uuid": g["uuid"], "model": g["model"]}


def write_prometheus(report: Report, path: str, exit_code: int | None = None) -> None:
    """Atomically replace ``path`` (the collector reads *.prom files whole)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".commcheck-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(prometheus_text(report, exit_code))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
