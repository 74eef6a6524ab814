"""Pure helpers for commcheck: sizes, bandwidth math, tables, JSON/Parquet.

Nothing here imports torch or Ray, so the CLI's ``--help`` and the report
tests stay fast and run on machines without either.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "DTYPES",
    "OOP_NOTE",
    "Report",
    "Row",
    "algbw_gbps",
    "avg_busbw",
    "busbw_factor",
    "busbw_gbps",
    "check_is_exact",
    "describe_lag",
    "format_table",
    "node_pairs",
    "parse_size",
    "size_list",
    "write_json",
    "write_parquet",
]

# name -> (bytes per element, nccl-tests type name, mantissa bits incl. implicit one)
DTYPES: dict[str, tuple[int, str, int]] = {
    "float32": (4, "float", 24),
    "bfloat16": (2, "bfloat16", 8),
}

OOP_NOTE = (
    "out-of-place is timed as recv.copy_(send) + all_reduce(recv): torch's all_reduce is "
    "in-place only, so the copy is part of the out-of-place time (nccl-tests reads sendbuff "
    "and writes recvbuff inside the collective)"
)

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parse '1K', '64M', '1G', '1GiB' or '4096' into bytes (binary units, like nccl-tests)."""
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 1K, 64M, 1G)")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def size_list(min_bytes: int, max_bytes: int, factor: int, elem_size: int) -> list[int]:
    """Sizes from min to max multiplying by factor, rounded down to whole elements."""
    if min_bytes < elem_size:
        raise ValueError(f"--min-bytes {min_bytes} is smaller than one element ({elem_size} B)")
    if min_bytes > max_bytes:
        raise ValueError(f"--min-bytes {min_bytes} is larger than --max-bytes {max_bytes}")
    if factor < 2:
        raise ValueError(f"--factor must be at least 2, got {factor}")
    sizes: list[int] = []
    size = min_bytes
    while size <= max_bytes:
        rounded = size - size % elem_size
        if not sizes or sizes[-1] != rounded:
            sizes.append(rounded)
        size *= factor
    return sizes


def algbw_gbps(size_bytes: int, seconds: float) -> float:
    """Algorithm bandwidth in GB/s (1e9, as nccl-tests)."""
    return size_bytes / seconds / 1e9 if seconds > 0 else 0.0


def busbw_factor(world_size: int) -> float:
    """all_reduce bus factor 2(n-1)/n; 0 for one rank (there is no bus)."""
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    return 2.0 * (world_size - 1) / world_size


def busbw_gbps(algbw: float, world_size: int) -> float:
    return algbw * busbw_factor(world_size)


def check_is_exact(dtype: str, world_size: int) -> bool:
    """Whether the sum 1+2+..+n is exactly representable (so #wrong is meaningful)."""
    mantissa = DTYPES[dtype][2]
    return world_size * (world_size + 1) // 2 <= 2**mantissa


def node_pairs(nodes: list[str]) -> list[tuple[str, str]]:
    """All pairs of distinct nodes, in order; empty for one node."""
    return list(itertools.combinations(list(dict.fromkeys(nodes)), 2))


def describe_lag(statuses: dict[int, dict[str, Any] | None], where: dict[int, str]) -> str:
    """Name ranks that are behind the others (a hung rank never reaches the collective)."""
    seen = {r: s for r, s in statuses.items() if s is not None}
    parts = [f"rank {r} ({where.get(r, '?')}) gave no status"
             for r, s in statuses.items() if s is None]
    if seen:
        low = min(s["seq"] for s in seen.values())
        behind = sorted(r for r, s in seen.items() if s["seq"] == low)
        if low < max(s["seq"] for s in seen.values()):
            parts.append("behind: " + ", ".join(
                f"rank {r} ({where.get(r, '?')}) at step {low} [{seen[r]['phase']}]"
                for r in behind))
        waiting = sorted(r for r in seen if r not in behind or len(behind) == len(seen))
        parts.append("waiting: " + ", ".join(
            f"rank {r} at step {seen[r]['seq']} [{seen[r]['phase']}]" for r in waiting))
    return "; ".join(parts)


@dataclass
class Row:
    """One size's result, already reduced over ranks (max time, summed #wrong)."""

    size: int
    count: int
    type: str
    redop: str
    oop_time_us: float
    oop_algbw: float
    oop_busbw: float
    oop_wrong: int
    ip_time_us: float
    ip_algbw: float
    ip_busbw: float
    ip_wrong: int
    copy_gbps: float | None = None
    group: str = "all"

    @classmethod
    def from_times(cls, size: int, dtype: str, world: int, oop_s: float, ip_s: float,
                   wrong: tuple[int, int], copy_s: float | None = None,
                   group: str = "all") -> Row:
        oop_alg, ip_alg = algbw_gbps(size, oop_s), algbw_gbps(size, ip_s)
        return cls(
            size=size, count=size // DTYPES[dtype][0], type=DTYPES[dtype][1], redop="sum",
            oop_time_us=oop_s * 1e6, oop_algbw=oop_alg, oop_busbw=busbw_gbps(oop_alg, world),
            oop_wrong=wrong[0], ip_time_us=ip_s * 1e6, ip_algbw=ip_alg,
            ip_busbw=busbw_gbps(ip_alg, world), ip_wrong=wrong[1],
            copy_gbps=algbw_gbps(size, copy_s) if copy_s else None, group=group,
        )


def avg_busbw(rows: list[Row]) -> float:
    """Mean of the out-of-place and in-place busbw over all sizes, like nccl-tests."""
    values = [v for r in rows for v in (r.oop_busbw, r.ip_busbw)]
    return sum(values) / len(values) if values else 0.0


@dataclass
class Report:
    settings: dict[str, Any]
    world_size: int
    rows: list[Row] = field(default_factory=list)
    pairwise: list[Row] = field(default_factory=list)
    ranks: list[dict[str, Any]] = field(default_factory=list)
    topology: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    min_busbw: float | None = None

    @property
    def avg_busbw(self) -> float:
        return avg_busbw(self.rows)

    @property
    def wrong(self) -> int:
        return sum(r.oop_wrong + r.ip_wrong for r in self.rows + self.pairwise)

    @property
    def passed(self) -> bool:
        if self.error is not None or self.wrong or not self.rows:
            return False
        return self.min_busbw is None or self.avg_busbw >= self.min_busbw

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(avg_busbw=self.avg_busbw, wrong=self.wrong, passed=self.passed)
        return data


def _rank_lines(report: Report) -> list[str]:
    lines = []
    for info in report.ranks:
        device = info.get("gpu_name") or "cpu"
        gpus = ",".join(str(g) for g in info.get("gpu_ids", [])) or "-"
        node = info.get("node", info.get("node_ip", "?"))
        lines.append(f"#  Rank {info['rank']:3d} Pid {info.get('pid', 0):7d} on "
                     f"{info.get('hostname', '?')} ({node}) "
                     f"gpu {gpus} [{device}]")
    return lines


def _header(report: Report, copy: bool) -> list[str]:
    s = report.settings
    extra = "   copy" if copy else ""
    return [
        f"# commcheck: op {s.get('op')} backend {s.get('backend')} launcher "
        f"{s.get('launcher')} ranks {report.world_size} iters {s.get('iters')} "
        f"warmup {s.get('warmup')}",
        *_rank_lines(report),
        "#",
        f"#{'':50s}out-of-place{'':24s}in-place",
        f"#{'size':>11s}{'count':>13s}{'type':>10s}{'redop':>7s}"
        f"{'time':>9s}{'algbw':>8s}{'busbw':>8s}{'#wrong':>7s}"
        f"{'time':>9s}{'algbw':>8s}{'busbw':>8s}{'#wrong':>7s}{extra}",
        f"#{'(B)':>11s}{'(elements)':>13s}{'':17s}"
        f"{'(us)':>9s}{'(GB/s)':>8s}{'(GB/s)':>8s}{'':7s}"
        f"{'(us)':>9s}{'(GB/s)':>8s}{'(GB/s)':>8s}{'':7s}{'(GB/s)' if copy else ''}",
    ]


def _row_line(r: Row, copy: bool) -> str:
    line = (f"{r.size:12d}{r.count:13d}{r.type:>10s}{r.redop:>7s}"
            f"{r.oop_time_us:9.1f}{r.oop_algbw:8.2f}{r.oop_busbw:8.2f}{r.oop_wrong:7d}"
            f"{r.ip_time_us:9.1f}{r.ip_algbw:8.2f}{r.ip_busbw:8.2f}{r.ip_wrong:7d}")
    if copy:
        line += f"{r.copy_gbps:8.1f}" if r.copy_gbps is not None else "       -"
    return line


def _table_rows(rows: list[Row], copy: bool) -> list[str]:
    lines: list[str] = []
    group = None
    for r in rows:
        if r.group != group and r.group != "all":
            lines.append(f"# pair {r.group}")
        group = r.group
        lines.append(_row_line(r, copy))
    return lines


def _footer(report: Report) -> list[str]:
    lines = [f"# Out of bounds values : {report.wrong} {'OK' if not report.wrong else 'FAILED'}",
             f"# Avg bus bandwidth    : {report.avg_busbw:.3f}"]
    if report.world_size == 1:
        lines.append("# one rank: there is no bus, busbw is 0 by definition; a single GPU/rank "
                     "checks set-up and correctness only, never link speed")
    lines.append(f"# note: {OOP_NOTE}")
    lines.extend(f"# note: {n}" for n in report.notes)
    if report.env:
        lines.append("# env: " + " ".join(f"{k}={v}" for k, v in sorted(report.env.items())))
    if report.error:
        lines.append(f"# error: {report.error}")
    threshold = ("" if report.min_busbw is None
                 else f" (min busbw {report.min_busbw:.3f} GB/s)")
    lines.append(f"# {'PASS' if report.passed else 'FAIL'}{threshold}")
    return lines


def format_table(report: Report) -> str:
    """nccl-tests-style table with header, per-size rows, and the summary footer."""
    copy = any(r.copy_gbps is not None for r in report.rows)
    lines = _header(report, copy) + _table_rows(report.rows, copy)
    if report.pairwise:
        lines.append("# pairwise (2 ranks, one per node)")
        lines.extend(_table_rows(report.pairwise, copy=False))
    return "\n".join(lines + _footer(report))


def write_json(report: Report, path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(report.to_dict(), fh, indent=2, default=str)
        fh.write("\n")


def write_parquet(report: Report, path: str) -> None:
    """One row per (group, size) with run-level columns repeated, for nightly charts."""
    import pyarrow as pa  # lazy: pyarrow is only needed for --out
    import pyarrow.parquet as pq

    run = {
        "timestamp": report.settings.get("timestamp"), "world_size": report.world_size,
        "backend": report.settings.get("backend"), "launcher": report.settings.get("launcher"),
        "nodes": report.topology.get("nodes"), "avg_busbw": report.avg_busbw,
        "passed": report.passed, "env": json.dumps(report.env, sort_keys=True),
        "topology": json.dumps(report.topology, sort_keys=True, default=str),
    }
    records = [{**asdict(r), **run} for r in report.rows + report.pairwise]
    pq.write_table(pa.Table.from_pylist(records), path)
