"""Per-rank measurement code: runs in a plain process or inside a Ray actor.

torch is imported inside the methods, never at module level, because the
driver (and ``batchrun commcheck --help``) must not pay for it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

__all__ = ["CommWorker", "free_port", "parse_fault"]


def free_port() -> int:
    """A TCP port free right now on this host (the rendezvous port, as Ray Train picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def parse_fault(fault: str | None) -> tuple[str, int] | None:
    """'wrong:RANK' or 'hang:RANK' -> (kind, rank); test-only fault injection."""
    if not fault:
        return None
    kind, _, rank = fault.partition(":")
    if kind not in ("wrong", "hang") or not rank.isdigit():
        raise ValueError(f"bad fault {fault!r}: use wrong:RANK or hang:RANK")
    return kind, int(rank)


def _node_ip() -> str:
    try:
        import ray  # only inside a Ray worker; the local launcher has no Ray

        if ray.is_initialized():
            return str(ray.util.get_node_ip_address())
    except ImportError:
        pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class CommWorker:
    """One rank. Methods are called in order: probe, setup, run (repeatable), teardown."""

    def __init__(self, backend: str, env: dict[str, str] | None = None,
                 fault: str | None = None, device_index: int = 0) -> None:
        self.backend = backend
        self.env = dict(env or {})
        # NCCL reads its settings at communicator creation; set them before anything else.
        os.environ.update(self.env)
        self.fault = parse_fault(fault)
        # Ray sets CUDA_VISIBLE_DEVICES per actor (device 0); the local launcher uses the rank.
        self.device_index = device_index
        self.rank = -1
        self.world = 0
        self.seq = 0
        self.phase = "created"
        self.on_progress: Callable[[int, str], None] | None = None

    # ---- identity and group set-up -------------------------------------------------
    def probe(self) -> dict[str, Any]:
        import torch

        info: dict[str, Any] = {
            "hostname": socket.gethostname(), "node_ip": _node_ip(), "pid": os.getpid(),
            "torch": torch.__version__, "gpu_ids": [], "gpu_name": None, "nccl": None,
            "env": {k: os.environ.get(k, "") for k in self.env},  # proof the passthrough landed
        }
        try:
            import ray

            if ray.is_initialized():
                ctx = ray.get_runtime_context()
                info["node_id"] = ctx.get_node_id()
                info["gpu_ids"] = [str(g) for g in ray.get_gpu_ids()]
        except ImportError:
            pass
        if self.backend == "nccl" and torch.cuda.is_available():
            info["gpu_name"] = torch.cuda.get_device_name(self.device_index)
            info["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
            if not info["gpu_ids"]:
                info["gpu_ids"] = [str(self.device_index)]
        return info

    def free_port(self) -> int:
        return free_port()

    def setup(self, rank: int, world: int, addr: str, port: int, timeout_s: float) -> None:
        import torch
        import torch.distributed as dist

        self.rank, self.world = rank, world
        if self.backend == "nccl":
            torch.cuda.set_device(self.device_index)
        self._step("init_process_group", collective=False)
        dist.init_process_group(self.backend, init_method=f"tcp://{addr}:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=timeout_s))

    def session(self, rank: int, world: int, addr: str, port: int, timeout_s: float,
                plan: dict[str, Any]) -> list[list[float]]:
        """setup + run + teardown in one call, so a failed setup never leaves a run queued."""
        self.setup(rank, world, addr, port, timeout_s)
        try:
            return self.run(plan)
        finally:
            self.teardown()

    def teardown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        self.phase = "done"

    def status(self) -> dict[str, Any]:
        """Answered from a second thread while run() blocks, to tell laggards from waiters."""
        return {"rank": self.rank, "seq": self.seq, "phase": self.phase}

    # ---- measurement ---------------------------------------------------------------
    def run(self, plan: dict[str, Any]) -> list[list[float]]:
        """Per size: [size, oop_s, ip_s, copy_s, oop_wrong, ip_wrong], reduced over ranks."""
        import torch

        if self.backend == "nccl":
            torch.cuda.set_device(self.device_index)  # current device is per thread
        return [self._one_size(int(size), plan) for size in plan["sizes"]]

    def _step(self, phase: str, collective: bool = True) -> None:
        """Mark entry into a collective; the hang fault stops a rank just before one."""
        if collective and self.fault == ("hang", self.rank):
            self.phase = f"hung before {phase} (injected fault)"
            while True:  # killed by the driver's timeout handling
                time.sleep(3600)
        self.seq += 1
        self.phase = phase
        if self.on_progress is not None:
            self.on_progress(self.seq, phase)

    def _device(self) -> Any:
        import torch

        if self.backend == "nccl":
            return torch.device("cuda", self.device_index)
        return torch.device("cpu")

    def _one_size(self, size: int, plan: dict[str, Any]) -> list[float]:
        import torch
        import torch.distributed as dist

        dtype = getattr(torch, plan["dtype"])
        count = size // torch.tensor([], dtype=dtype).element_size()
        send = torch.full((count,), float(self.rank + 1), dtype=dtype, device=self._device())
        recv = torch.empty_like(send)
        self._barrier(f"barrier {size}")
        iters, warmup = int(plan["iters"]), int(plan["warmup"])

        def oop() -> None:
            recv.copy_(send)
            dist.all_reduce(recv)

        oop_s = self._timed(oop, iters, warmup, f"out-of-place {size}")
        recv.zero_()  # zeros stay zero under repeated in-place sums: no overflow while timing
        ip_s = self._timed(lambda: dist.all_reduce(recv), iters, warmup, f"in-place {size}")
        copy_s = 0.0
        if plan.get("copy_baseline"):
            copy_s = self._timed(lambda: recv.copy_(send), iters, warmup, None)
        wrong = self._check(send, recv, int(plan.get("check_iters", 2)))
        return self._reduce(size, [oop_s, ip_s, copy_s], wrong)

    def _barrier(self, phase: str) -> None:
        # A one-element all_reduce, not dist.barrier(): NCCL's barrier guesses a device.
        import torch
        import torch.distributed as dist

        self._step(phase)
        dist.all_reduce(torch.zeros(1, device=self._device()))
        self._sync()

    def _sync(self) -> None:
        if self.backend == "nccl":
            import torch

            torch.cuda.synchronize(self.device_index)

    def _timed(self, fn: Callable[[], object], iters: int, warmup: int,
               phase: str | None) -> float:
        """Seconds per iteration on this rank; CUDA events on GPU, perf_counter on CPU."""
        import torch

        if phase is not None:
            self._step(phase)
        for _ in range(warmup):
            fn()
        self._sync()
        if self.backend != "nccl":
            start = time.perf_counter()  # gloo CPU collectives return when complete
            for _ in range(iters):
                fn()
            return (time.perf_counter() - start) / iters
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return float(begin.elapsed_time(end)) / 1e3 / iters

    def _check(self, send: Any, recv: Any, check_iters: int) -> tuple[int, int]:
        """Count wrong elements with exactly checkable values: rank r sends r+1."""
        import torch.distributed as dist

        expected = float(self.world * (self.world + 1) // 2)
        wrong = [0, 0]
        for _ in range(check_iters):
            # Refilled every iteration so repeated reductions never grow or overflow.
            send.fill_(self.rank + 1)
            recv.fill_(-1)
            self._step("check out-of-place")
            recv.copy_(send)
            dist.all_reduce(recv)
            wrong[0] += self._count_wrong(recv, expected)
            recv.fill_(self.rank + 1)
            self._step("check in-place")
            dist.all_reduce(recv)
            wrong[1] += self._count_wrong(recv, expected)
        return wrong[0], wrong[1]

    def _count_wrong(self, out: Any, expected: float) -> int:
        if self.fault == ("wrong", self.rank):
            out.view(-1)[0] = -expected  # injected corruption for tests
        return int((out != expected).sum().item())

    def _reduce(self, size: int, times: list[float], wrong: tuple[int, int]) -> list[float]:
        """The slowest rank counts (MAX of times); #wrong is summed over ranks."""
        import torch
        import torch.distributed as dist

        self._step(f"reduce results {size}")
        t = torch.tensor(times, dtype=torch.float64, device=self._device())
        w = torch.tensor(list(wrong), dtype=torch.int64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        dist.all_reduce(w, op=dist.ReduceOp.SUM)
        return [float(size), *t.tolist(), *(float(x) for x in w.tolist())]
