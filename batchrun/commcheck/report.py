"""The report of one commcheck run: sizes, bandwidth math, rows, failures and the verdict.

Nothing here imports torch or Ray, so the CLI's ``--help`` and the report
tests stay fast and run on machines without either.

Exit codes (the verdict): 0 every check passed; 1 unhealthy (a check ran and
found a fault: #wrong, a timeout, bandwidth below a threshold, a slow rank, a
GPU health finding); 2 bad input; 3 could not run (no resources, a rank that
failed to start or raised, a check that could not be made).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from batchrun.commcheck.collectives import OPS, ROOT

__all__ = [
    "DTYPES",
    "EXIT_BAD_INPUT",
    "EXIT_COULD_NOT_RUN",
    "EXIT_PASS",
    "EXIT_UNHEALTHY",
    "Failure",
    "Report",
    "Row",
    "algbw_gbps",
    "avg_busbw",
    "parse_size",
    "size_list",
]

EXIT_PASS, EXIT_UNHEALTHY, EXIT_BAD_INPUT, EXIT_COULD_NOT_RUN = 0, 1, 2, 3
UNHEALTHY, COULD_NOT_RUN = "unhealthy", "could_not_run"

# name -> (bytes per element, nccl-tests type name, mantissa bits incl. implicit one)
DTYPES: dict[str, tuple[int, str, int]] = {
    "float32": (4, "float", 24),
    "bfloat16": (2, "bfloat16", 8),
}

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


@dataclass
class Row:
    """One (op, size) of one group, reduced over its ranks (max time, summed #wrong)."""

    op: str
    size: int
    count: int
    type: str
    redop: str
    root: int
    oop_time_us: float | None = None
    oop_algbw: float | None = None
    oop_busbw: float | None = None
    oop_wrong: int | None = None
    ip_time_us: float | None = None  # None: N/A (alltoall, sendrecv) or not measured
    ip_algbw: float | None = None
    ip_busbw: float | None = None
    ip_wrong: int | None = None
    copy_gbps: float | None = None
    group: str = "all"
    status: str = "ok"  # ok | timeout | not run
    oop_med_us: float | None = None  # median iteration
    oop_min_us: float | None = None  # fastest iteration (the rank check ranks by it)
    ranks: list[int] = field(default_factory=list)  # global ranks of the group, in order
    rank_oop_us: list[float] = field(default_factory=list)  # each rank's own mean time

    @classmethod
    def empty(cls, op: str, size: int, dtype: str, world: int, status: str,
              group: str = "all", ranks: list[int] | None = None) -> Row:
        """A row with no figures: a size that timed out, or one never reached."""
        elem = DTYPES[dtype][0]
        layout = OPS[op].layout(size, world, elem)
        return cls(op=op, size=layout.size, count=layout.count, type=DTYPES[dtype][1],
                   redop=OPS[op].redop, root=ROOT if OPS[op].rooted else -1, group=group,
                   status=status, ranks=list(ranks or []))

    @classmethod
    def measured(cls, result: dict[str, Any], dtype: str, world: int, group: str = "all",
                 ranks: list[int] | None = None, rank_times: list[float] | None = None) -> Row:
        """From a rank's reduced run_size answer (every rank of a group returns the same)."""
        op, size = result["op"], int(result["size"])
        row = cls.empty(op, size, dtype, world, "ok", group, ranks)
        factor = OPS[op].factor(world)
        row.oop_time_us, row.oop_med_us = result["oop_s"] * 1e6, result["oop_med_s"] * 1e6
        row.oop_min_us = result["oop_min_s"] * 1e6
        row.oop_algbw = algbw_gbps(row.size, result["oop_s"])
        row.oop_busbw, row.oop_wrong = row.oop_algbw * factor, int(result["oop_wrong"])
        if result.get("ip_s") is not None:
            row.ip_time_us = result["ip_s"] * 1e6
            row.ip_algbw = algbw_gbps(row.size, result["ip_s"])
            row.ip_busbw, row.ip_wrong = row.ip_algbw * factor, result["ip_wrong"]
        if result.get("copy_s"):
            row.copy_gbps = algbw_gbps(row.size, result["copy_s"])
        row.rank_oop_us = [t * 1e6 for t in rank_times or []]
        return row

    @property
    def wrong(self) -> int:
        return (self.oop_wrong or 0) + (self.ip_wrong or 0)


def avg_busbw(rows: list[Row]) -> float:
    """Mean of the out-of-place and in-place busbw over measured sizes, like nccl-tests."""
    values = [v for r in rows if r.status == "ok" for v in (r.oop_busbw, r.ip_busbw)
              if v is not None]
    return sum(values) / len(values) if values else 0.0


@dataclass
class Failure:
    check: str  # wrong, timeout, min_busbw, reference_busbw, rank_outlier, gpu_health, ...
    kind: str  # unhealthy | could_not_run
    reason: str


@dataclass
class Report:
    settings: dict[str, Any]
    world_size: int
    ops: list[str] = field(default_factory=lambda: ["all_reduce"])
    rows: list[Row] = field(default_factory=list)  # the whole group
    groups: list[Row] = field(default_factory=list)  # ring, per node, without a rank
    pairwise: list[Row] = field(default_factory=list)  # node pairs
    ranks: list[dict[str, Any]] = field(default_factory=list)
    topology: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    health: list[dict[str, Any]] = field(default_factory=list)  # one evaluation per GPU
    node_gpus: list[dict[str, Any]] = field(default_factory=list)  # count per node
    rank_check: dict[str, Any] | None = None
    localisation: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    min_busbw: float | None = None

    def fail(self, check: str, reason: str, kind: str = UNHEALTHY) -> None:
        self.failures.append(Failure(check, kind, reason))

    def op_rows(self, op: str) -> list[Row]:
        return [r for r in self.rows if r.op == op]

    def avg_busbw_of(self, op: str) -> float:
        return avg_busbw(self.op_rows(op))

    @property
    def avg_busbw(self) -> float:
        """Average busbw of the first op (the only one unless --op names several)."""
        return self.avg_busbw_of(self.ops[0]) if self.ops else 0.0

    @property
    def wrong(self) -> int:
        return sum(r.wrong for r in self.rows + self.groups + self.pairwise)

    def all_failures(self) -> list[Failure]:
        """Failures recorded during the run plus those the rows imply."""
        found = list(self.failures)
        for r in self.rows + self.groups + self.pairwise:
            if r.wrong:
                found.append(Failure("wrong", UNHEALTHY, f"{r.op} {r.size} B (group {r.group}): "
                                     f"{r.wrong} wrong values"))
        if self.min_busbw is not None:
            for op in self.ops:
                avg = self.avg_busbw_of(op)
                if self.op_rows(op) and avg < self.min_busbw:
                    found.append(Failure("min_busbw", UNHEALTHY, f"{op}: avg busbw "
                                         f"{avg:.3f} GB/s is below --min-busbw {self.min_busbw:g}"))
        if not any(r.status == "ok" for r in self.rows):
            found.append(Failure("no_rows", COULD_NOT_RUN, "no size was measured"))
        return found

    @property
    def status(self) -> str:
        """pass, unhealthy (a fault was found) or could_not_run; a found fault wins."""
        kinds = {f.kind for f in self.all_failures()}
        if UNHEALTHY in kinds:
            return UNHEALTHY
        return COULD_NOT_RUN if kinds else "pass"

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    @property
    def exit_code(self) -> int:
        return {"pass": EXIT_PASS, UNHEALTHY: EXIT_UNHEALTHY}.get(self.status, EXIT_COULD_NOT_RUN)

    @property
    def error(self) -> str | None:
        """The could-not-run and timeout reasons in one line (None when there are none)."""
        found = [f.reason for f in self.failures if f.kind == COULD_NOT_RUN or
                 f.check == "timeout"]
        return "; ".join(found) if found else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["failures"] = [asdict(f) for f in self.all_failures()]
        data.update(avg_busbw={op: self.avg_busbw_of(op) for op in self.ops},
                    wrong=self.wrong, passed=self.passed, status=self.status,
                    exit_code=self.exit_code)
        return data
