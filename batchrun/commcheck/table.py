"""The printed report: nccl-tests' columns and footer per collective, then health,
the rank check, localisation, and the verdict with every failure's reason."""

from __future__ import annotations

from typing import Any

from batchrun.commcheck.report import Report, Row, avg_busbw

__all__ = ["OOP_NOTE", "format_table"]

OOP_NOTE = (
    "all_reduce and reduce out-of-place are timed as recv.copy_(send) + the collective on "
    "recv: torch's all_reduce and reduce are in-place only, so the copy is part of their "
    "out-of-place time (nccl-tests reads sendbuff and writes recvbuff inside the collective)"
)
_NA = "N/A"


def _rank_lines(report: Report) -> list[str]:
    lines = []
    for info in report.ranks:
        device = info.get("gpu_name") or "cpu"
        gpus = ",".join(str(g) for g in info.get("gpu_ids", [])) or "-"
        node = info.get("node", info.get("node_ip", "?"))
        lines.append(f"#  Rank {info['rank']:3d} Pid {info.get('pid', 0):7d} on "
                     f"{info.get('hostname', '?')} ({node}) gpu {gpus} [{device}]")
    return lines


def _columns(copy: bool) -> list[str]:
    extra = "     copy" if copy else ""
    return [
        f"#{'':63s}out-of-place{'':26s}in-place",
        f"#{'size':>11s}  {'count':>12s}  {'type':>8s}  {'redop':>6s}  {'root':>6s}"
        f"  {'time':>8s}  {'algbw':>7s}  {'busbw':>7s}  {'#wrong':>6s}"
        f"  {'time':>8s}  {'algbw':>7s}  {'busbw':>7s}  {'#wrong':>6s}{extra}",
        f"#{'(B)':>11s}  {'(elements)':>12s}  {'':26s}{'(us)':>8s}  {'(GB/s)':>7s}  "
        f"{'(GB/s)':>7s}  {'':6s}  {'(us)':>8s}  {'(GB/s)':>7s}  {'(GB/s)':>7s}  {'':6s}"
        f"{'   (GB/s)' if copy else ''}",
    ]


def _mode(time_us: float | None, alg: float | None, bus: float | None,
          wrong: int | None) -> str:
    if time_us is None:
        return f"  {_NA:>8s}  {_NA:>7s}  {_NA:>7s}  {_NA:>6s}"
    return (f"  {time_us:8.1f}  {alg or 0:7.2f}  {bus or 0:7.2f}  "
            f"{_NA if wrong is None else str(wrong):>6s}")


def _row_line(r: Row, copy: bool) -> str:
    head = (f"{r.size:12d}  {r.count:12d}  {r.type:>8s}  {r.redop:>6s}  {r.root:6d}")
    if r.status != "ok":
        return f"{head}  {r.status}"
    line = head + _mode(r.oop_time_us, r.oop_algbw, r.oop_busbw, r.oop_wrong)
    line += _mode(r.ip_time_us, r.ip_algbw, r.ip_busbw, r.ip_wrong)
    if copy:
        line += f"  {r.copy_gbps:7.1f}" if r.copy_gbps is not None else f"  {'-':>7s}"
    return line


def _op_section(rows: list[Row], title: str) -> list[str]:
    copy = any(r.copy_gbps is not None for r in rows)
    wrong = sum(r.wrong for r in rows)
    return [f"# {title}", *_columns(copy), *(_row_line(r, copy) for r in rows),
            f"# Out of bounds values : {wrong} {'OK' if not wrong else 'FAILED'}",
            f"# Avg bus bandwidth    : {avg_busbw(rows):.3f}", "#"]


def _sections(rows: list[Row], prefix: str) -> list[str]:
    lines: list[str] = []
    keys = list(dict.fromkeys((r.group, r.op) for r in rows))
    for group, op in keys:
        part = [r for r in rows if (r.group, r.op) == (group, op)]
        lines += _op_section(part, f"{prefix}{op}" + ("" if group == "all" else
                                                       f" — group {group}"))
    return lines


def _pct(value: Any, ref: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" + (f" ({value / ref:.0%})" if ref else "")


def _health_row(g: dict[str, Any]) -> str:
    verdict = "ok" if g.get("healthy") else "FAIL"
    notes = "; ".join(f["message"] for f in g["findings"])
    cells = [f"{g['rank']:4d}", f"{g['node']!s:>15s}", f"{g['gpu']!s:>3s}",
             f"{g['model'] or g['name']!s:>15s}", f"{g['temperature_c']!s:>5s}",
             f"{g['power_w']!s:>6s}", f"{g['nvlink_active']!s:>6s}",
             f"{_pct(g['copy_gbps'], g['copy_ref_gbps']):>14s}",
             f"{_pct(g['bf16_tflops'], g['bf16_ref_tflops']):>14s}", f" {verdict}"]
    return "# " + " ".join(cells) + (f" — {notes}" if notes else "")


def _health_lines(report: Report) -> list[str]:
    if not report.health:
        return []
    lines = ["# GPU health (figure, % of the model's reference)",
             f"# {'rank':>4s} {'node':>15s} {'gpu':>3s} {'model':>15s} {'temp':>5s} "
             f"{'power':>6s} {'nvlink':>6s} {'copy GB/s':>14s} {'bf16 TFLOPS':>14s}  verdict"]
    for g in report.health:
        lines.append(_health_row(g))
    for c in report.node_gpus:
        lines.append(f"# node {c['node']}: {c['nvml']} GPUs seen by NVML, {c['expected']} "
                     f"expected, {c['ranks']} ranks")
    return [*lines, "#"]


def _rank_check_lines(report: Report) -> list[str]:
    rc = report.rank_check
    if not rc:
        return []
    lines = [f"# rank check: 2-rank {rc['op']} of {rc['size']} B between every pair; a rank's "
             f"score is the median busbw of its pairs (median of scores {rc['median_busbw']:.3g}"
             f" GB/s, tolerance {rc['tolerance']:.0%})"]
    for i, p in enumerate(rc["passes"]):
        scores = ", ".join(f"{r}: {v:.3g}" for r, v in sorted(p["scores"].items()))
        lines.append(f"#   pass {i + 1} scores (GB/s) {scores}; named {p['named'] or 'none'}")
    times: dict[int, list[str]] = {}
    for row in rc["rows"]:
        for rank, t in zip(row.ranks, row.rank_oop_us):
            times.setdefault(rank, []).append(f"{t:.0f}")
    for rank in sorted(times):
        lines.append(f"#   rank {rank} own time per pair (us): {' '.join(times[rank])}")
    return [*lines, f"# rank check names: {rc['named'] or 'no one'}", "#"]


def _footer(report: Report) -> list[str]:
    lines = []
    if report.world_size == 1:
        lines.append("# one rank: all_reduce, all_gather, reduce_scatter and alltoall have "
                     "busbw 0 by definition; a single GPU/rank checks set-up and correctness "
                     "only, never link speed")
    if any(r.op in ("all_reduce", "reduce") for r in report.rows):
        lines.append(f"# note: {OOP_NOTE}")
    lines.extend(f"# note: {n}" for n in report.notes)
    lines.extend(f"# localisation: {n}" for n in report.localisation)
    if report.env:
        lines.append("# env: " + " ".join(f"{k}={v}" for k, v in sorted(report.env.items())))
    failures = report.all_failures()
    for f in failures:
        lines.append(f"# {f.kind}: [{f.check}] {f.reason}")
    threshold = "" if report.min_busbw is None else f" (min busbw {report.min_busbw:.3f} GB/s)"
    status = "PASS" if report.passed else f"FAIL ({report.status.replace('_', ' ')})"
    lines.append(f"# {status}{threshold}")
    return lines


def format_table(report: Report) -> str:
    s = report.settings
    lines = [f"# commcheck: ops {','.join(report.ops)} backend {s.get('backend')} launcher "
             f"{s.get('launcher')} ranks {report.world_size} dtype {s.get('dtype')} iters "
             f"{s.get('iters')} warmup {s.get('warmup')}", *_rank_lines(report), "#"]
    lines += _health_lines(report)
    lines += _sections(report.rows, "Collective test: ")
    lines += _sections(report.groups, "")
    if report.pairwise:
        lines += _sections(report.pairwise, "pairwise (2 ranks, one per node): ")
    lines += _rank_check_lines(report)
    return "\n".join(lines + _footer(report))
