"""The torch.distributed calls behind each collective, and the exact check of their output.

Runs inside a rank (Ray actor or local process); torch is imported in the
functions so that importing this module stays free.

torch's all_reduce and reduce are in-place only: their out-of-place form is
``recv.copy_(send)`` then the collective on ``recv`` (the copy is timed, and the
report says so). The other out-of-place forms are torch's own two-buffer calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from batchrun.commcheck.collectives import OPS, ROOT, Layout, expected_chunk, send_chunk

__all__ = ["Buffers", "count_wrong", "fill_for_check", "make_buffers", "op_call"]

_INJECTED = -7.0  # the value the wrong:RANK fault writes; never a valid expected value


class Buffers:
    """Send and receive tensors of one rank for one (op, size)."""

    def __init__(self, op: str, layout: Layout, rank: int, world: int, dtype: Any,
                 device: Any) -> None:
        import torch

        self.op, self.layout, self.rank, self.world = op, layout, rank, world
        self.send = torch.zeros(layout.send_count, dtype=dtype, device=device)
        self.recv = torch.zeros(layout.recv_count, dtype=dtype, device=device)

    def chunk(self, tensor: Any, index: int) -> Any:
        per = tensor.numel() // self.world
        return tensor.narrow(0, index * per, per)

    def in_place_io(self) -> tuple[Any, Any]:
        """(input, output) of the in-place form: views of one buffer, as nccl-tests sets them."""
        if self.op == "all_gather":
            return self.chunk(self.recv, self.rank), self.recv
        if self.op == "reduce_scatter":
            return self.send, self.chunk(self.send, self.rank)
        return self.recv, self.recv

    def out_place_output(self) -> Any:
        if self.op == "broadcast" and self.rank == ROOT:
            return self.send  # the root's source: it must come through unchanged
        return self.recv


def make_buffers(op: str, layout: Layout, rank: int, world: int, dtype: Any,
                 device: Any) -> Buffers:
    return Buffers(op, layout, rank, world, dtype, device)


def _dist_fn(name: str, fallback: str) -> Callable[..., Any]:
    # torch 2.13 renamed all_gather_into_tensor/reduce_scatter_tensor to *_single
    # (the old names warn); 2.11 has only the old names.
    import torch.distributed as dist

    return getattr(dist, name, None) or getattr(dist, fallback)


def _sendrecv(send: Any, recv: Any, rank: int, world: int) -> None:
    import torch.distributed as dist

    ops = [dist.P2POp(dist.isend, send, (rank + 1) % world),
           dist.P2POp(dist.irecv, recv, (rank - 1) % world)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()


def _reduction(op: str, send: Any, dst: Any, in_place: bool) -> Callable[[], None]:
    import torch.distributed as dist

    def run() -> None:
        if not in_place:
            dst.copy_(send)  # torch has no two-buffer all_reduce/reduce: the copy is timed
        if op == "all_reduce":
            dist.all_reduce(dst)
        else:
            dist.reduce(dst, ROOT)

    return run


def op_call(bufs: Buffers, in_place: bool) -> Callable[[], None] | None:
    """The call to time; None where the op has no in-place form (alltoall, sendrecv)."""
    import torch.distributed as dist

    op, rank, world = bufs.op, bufs.rank, bufs.world
    send, recv = bufs.send, bufs.recv
    if in_place and not OPS[op].in_place:
        return None
    if in_place:
        src, dst = bufs.in_place_io()
    else:
        src, dst = send, recv
    if op in ("all_reduce", "reduce"):
        return _reduction(op, send, dst, in_place)
    if op == "all_gather":
        gather = _dist_fn("all_gather_single", "all_gather_into_tensor")
        return lambda: gather(dst, src)
    if op == "reduce_scatter":
        scatter = _dist_fn("reduce_scatter_single", "reduce_scatter_tensor")
        return lambda: scatter(dst, src)
    if op == "alltoall":
        return lambda: dist.all_to_all_single(recv, send)
    if op == "broadcast":
        tensor = recv if in_place or rank != ROOT else send
        return lambda: dist.broadcast(tensor, ROOT)
    if op == "sendrecv":
        return lambda: _sendrecv(send, recv, rank, world)
    raise ValueError(f"unknown op {op!r}")


def _fill_chunks(bufs: Buffers, tensor: Any, chunked: bool) -> None:
    if not chunked:
        tensor.fill_(float(send_chunk(bufs.op, bufs.rank, 0, bufs.world)))
        return
    for j in range(bufs.world):
        bufs.chunk(tensor, j).fill_(float(send_chunk(bufs.op, bufs.rank, j, bufs.world)))


def fill_for_check(bufs: Buffers, in_place: bool) -> Any:
    """Write the checkable input; return the tensor that will hold the output."""
    bufs.recv.fill_(-1.0)  # stale data never passes for a result
    if not in_place:
        _fill_chunks(bufs, bufs.send, bufs.op in ("reduce_scatter", "alltoall"))
        return bufs.out_place_output()
    src, dst = bufs.in_place_io()
    if bufs.op == "reduce_scatter":
        _fill_chunks(bufs, src, True)
    else:
        src.fill_(float(send_chunk(bufs.op, bufs.rank, 0, bufs.world)))
    return dst


def count_wrong(bufs: Buffers, out: Any, inject: bool) -> int:
    """Elements of ``out`` that differ from the exact expected values."""
    import torch

    op, rank, world = bufs.op, bufs.rank, bufs.world
    if expected_chunk(op, rank, 0, world) is None:
        return 0  # reduce: only the root holds a result
    if inject and out.numel():
        out.view(-1)[0] = _INJECTED  # the wrong:RANK test hook
    if op in ("all_gather", "alltoall"):
        want = torch.tensor([float(expected_chunk(op, rank, j, world) or 0)
                             for j in range(world)], dtype=out.dtype, device=out.device)
        return int((out.view(world, -1) != want.view(world, 1)).sum().item())
    return int((out != float(expected_chunk(op, rank, 0, world) or 0)).sum().item())
