"""The collectives nccl-tests measures: buffer layout, bus-bandwidth factor, checkable values.

Pure (no torch): kernels.py runs them. Every convention here is nccl-tests' own
(src/*.cu and doc/PERFORMANCE.md of NVIDIA/nccl-tests):

- the ``size`` column is the larger of the send and receive buffers of one rank,
  so all_gather reports its gathered output and reduce_scatter its full input;
- algbw = size / time (1e9 bytes per GB); busbw = algbw * factor(n), with factor
  2(n-1)/n for all_reduce, (n-1)/n for all_gather, reduce_scatter and alltoall,
  1 for broadcast, reduce and sendrecv;
- in-place alltoall and sendrecv are not checked by nccl-tests (#wrong N/A);
  commcheck does not time them either (NCCL has no in-place form of them).

Checkable values are small integers, exact in float32 and, up to a rank count
given by :func:`is_exact`, in bfloat16; each chunk carries its source and
destination, so data that lands in the wrong place is counted as wrong too.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "OPS",
    "OP_NAMES",
    "Layout",
    "OpSpec",
    "expected_chunk",
    "is_exact",
    "parse_ops",
    "send_chunk",
]

OP_NAMES = ("all_reduce", "all_gather", "reduce_scatter", "alltoall", "broadcast", "reduce",
            "sendrecv")
ROOT = 0  # nccl-tests' default root for broadcast and reduce


@dataclass(frozen=True)
class Layout:
    """One rank's buffers for one row: element counts, and the size column in bytes."""

    size: int
    count: int
    send_count: int
    recv_count: int


@dataclass(frozen=True)
class OpSpec:
    name: str
    redop: str  # nccl-tests' redop column: "sum" for reductions, "none" otherwise
    rooted: bool  # broadcast and reduce print their root; the others print nothing
    in_place: bool  # False: in-place columns are N/A (alltoall, sendrecv)
    chunked: bool  # buffers split in n chunks (all_gather, reduce_scatter, alltoall)

    def factor(self, n: int) -> float:
        """nccl-tests' bus-bandwidth factor for n ranks (doc/PERFORMANCE.md)."""
        if n < 1:
            raise ValueError(f"world size must be >= 1, got {n}")
        if self.name == "all_reduce":
            return 2.0 * (n - 1) / n
        if self.chunked:
            return (n - 1) / n
        return 1.0

    def layout(self, size: int, n: int, elem: int) -> Layout:
        """Buffers for a requested size (bytes), rounded down as nccl-tests rounds them."""
        count = size // elem
        if not self.chunked:
            return Layout(count * elem, count, count, count)
        per = count // n
        full = per * n
        if self.name == "all_gather":
            return Layout(full * elem, full, per, full)
        if self.name == "reduce_scatter":
            return Layout(full * elem, full, full, per)
        return Layout(full * elem, full, full, full)  # alltoall

    def min_ranks(self) -> int:
        return 2 if self.name == "sendrecv" else 1  # a rank cannot send to itself (gloo)

    def max_value(self, n: int) -> int:
        """Largest value any buffer holds (partial sums included), for exactness."""
        tri = n * (n + 1) // 2
        return {"all_reduce": tri, "reduce": tri, "reduce_scatter": tri + n * (n - 1),
                "alltoall": n * n, "all_gather": n, "sendrecv": n, "broadcast": 1}[self.name]


OPS: dict[str, OpSpec] = {
    "all_reduce": OpSpec("all_reduce", "sum", False, True, False),
    "all_gather": OpSpec("all_gather", "none", False, True, True),
    "reduce_scatter": OpSpec("reduce_scatter", "sum", False, True, True),
    "alltoall": OpSpec("alltoall", "none", False, False, True),
    "broadcast": OpSpec("broadcast", "none", True, True, False),
    "reduce": OpSpec("reduce", "sum", True, True, False),
    "sendrecv": OpSpec("sendrecv", "none", False, False, False),
}


def parse_ops(text: str) -> list[str]:
    """'all', one name, or a comma list -> op names in nccl-tests order; ValueError if unknown."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(OP_NAMES)
    unknown = [n for n in names if n not in OPS]
    if unknown or not names:
        raise ValueError(f"--op {text!r}: use all or one or more of {', '.join(OP_NAMES)}")
    return [n for n in OP_NAMES if n in names]


def is_exact(op: str, mantissa_bits: int, n: int) -> bool:
    """Whether every value of the check fits the mantissa, so #wrong counts only real errors."""
    return OPS[op].max_value(n) <= 2**mantissa_bits


def send_chunk(op: str, rank: int, chunk: int, n: int) -> int:
    """Value rank ``rank`` puts in chunk ``chunk`` of its input (whole buffer: chunk 0)."""
    if op == "reduce_scatter":
        return rank + 1 + chunk  # chunk k reduces to n(n+1)/2 + n*k: the k-th rank's own sum
    if op == "alltoall":
        return rank * n + chunk + 1  # names both the sender and the destination
    if op == "broadcast":
        return 1 if rank == ROOT else -1
    return rank + 1


def expected_chunk(op: str, rank: int, chunk: int, n: int) -> int | None:
    """Value chunk ``chunk`` of rank ``rank``'s output must hold; None: not checked there."""
    tri = n * (n + 1) // 2
    if op == "all_reduce":
        return tri
    if op == "reduce":
        return tri if rank == ROOT else None
    if op == "all_gather":
        return chunk + 1
    if op == "reduce_scatter":
        return tri + n * rank
    if op == "alltoall":
        return chunk * n + rank + 1
    if op == "broadcast":
        return 1
    if op == "sendrecv":
        return (rank - 1) % n + 1
    raise ValueError(f"unknown op {op!r}")
