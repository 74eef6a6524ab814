"""One rank: runs in a plain process or inside a Ray actor.

Methods are called by the driver in order: probe, (gpu_health), then per group
setup, run_size for each (op, size), teardown; status answers from a second
thread while a collective blocks. One call per size lets the driver keep every
finished size when a later one times out.

torch is imported inside the methods, never at module level, because the
driver (and ``batchrun commcheck --help``) must not pay for it.
"""

from __future__ import annotations

import itertools
import os
import socket
import statistics
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from batchrun.commcheck.collectives import OPS
from batchrun.commcheck.kernels import Buffers, count_wrong, fill_for_check, op_call

__all__ = ["CommWorker", "Fault", "free_port", "parse_fault"]

Fault = tuple[str, int, float]  # (kind, rank, milliseconds for slow or bytes for hang)
INSTALL_HINT = "pip install torch==2.13.0 'batchrun[gpu]'"
FAULT_HELP = "use wrong:RANK, hang:RANK[:BYTES] or slow:RANK:MS (MS > 0)"


def free_port() -> int:
    """A TCP port free right now on this host (the rendezvous port, as Ray Train picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def parse_fault(fault: str | None) -> Fault | None:
    """Test hooks: 'wrong:RANK', 'hang:RANK[:BYTES]' or 'slow:RANK:MS' -> (kind, rank, value).

    wrong corrupts one element of the rank's output at every check; hang stops the
    rank before its first collective of a size >= BYTES (default: the first); slow
    makes it sleep MS milliseconds inside every timed collective (the fire drill).
    """
    if not fault:
        return None
    parts = fault.split(":")
    kind, numbers = parts[0], parts[1:]
    arity = {"wrong": (1,), "hang": (1, 2), "slow": (2,)}.get(kind, ())
    if len(numbers) not in arity or not all(n.isdigit() for n in numbers) or (
            kind == "slow" and int(numbers[1]) == 0):
        raise ValueError(f"--fault {fault!r} is malformed: {FAULT_HELP}")
    return kind, int(numbers[0]), float(numbers[1]) if len(numbers) > 1 else 0.0


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
    """One rank; its global rank is fixed, its rank inside a group changes per group."""

    def __init__(self, backend: str, env: dict[str, str] | None = None,
                 fault: str | None = None, device_index: int = 0) -> None:
        self.backend = backend
        self.env = dict(env or {})
        # NCCL reads its settings at communicator creation; set them before anything else.
        os.environ.update(self.env)
        # the node's own NCCL_* settings too: a group's extras are undone back to these
        self.base_env = {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}
        self.fault = parse_fault(fault)
        self.global_rank = -1
        # Ray sets CUDA_VISIBLE_DEVICES per actor (device 0); the local launcher uses the rank.
        self.device_index = device_index
        self.rank = -1
        self.world = 0
        self.seq = 0
        self.size = 0  # bytes of the size being measured
        self.phase = "created"
        self.on_progress: Callable[[int, str], None] | None = None

    # ---- identity -------------------------------------------------------------------
    def probe(self, global_rank: int) -> dict[str, Any]:
        self.global_rank = global_rank
        info: dict[str, Any] = {
            "hostname": socket.gethostname(), "node_ip": _node_ip(), "pid": os.getpid(),
            "torch": None, "gpu_ids": [], "gpu_name": None, "nccl": None,
            "env": {k: os.environ.get(k, "") for k in self.env},  # proof the passthrough landed
        }
        try:
            import torch
        except ImportError:  # said by the driver in one line, with the install command
            return info
        info["torch"] = torch.__version__
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

    def gpu_health(self, opts: dict[str, Any]) -> dict[str, Any]:
        """NVML readings, device copy and bf16 matmul of this rank's GPU (nccl only)."""
        from batchrun.commcheck.gpu_probe import collect

        self._step("gpu health", collective=False)
        return collect(self.device_index, **opts)

    def free_port(self) -> int:
        return free_port()

    # ---- group set-up ---------------------------------------------------------------
    def setup(self, rank: int, world: int, addr: str, port: int, timeout_s: float,
              env: dict[str, str] | None = None) -> None:
        import torch
        import torch.distributed as dist

        for key in [k for k in os.environ if k.startswith("NCCL_")]:
            del os.environ[key]  # a group's extra settings (NCCL_ALGO=Ring) end with it
        os.environ.update(self.base_env)
        os.environ.update(env or {})
        self.rank, self.world = rank, world
        if self.backend == "nccl":
            torch.cuda.set_device(self.device_index)
        self._step("init_process_group", collective=False)
        # Longer than the driver's deadline for one call: the driver, which can ask every
        # rank where it is, must notice a hang before torch turns it into an error.
        dist.init_process_group(self.backend, init_method=f"tcp://{addr}:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=2 * timeout_s + 10))

    def teardown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        self.phase = "done"

    def status(self) -> dict[str, Any]:
        """Answered from a second thread while run_size blocks, to tell laggards from waiters."""
        return {"rank": self.global_rank, "seq": self.seq, "phase": self.phase}

    # ---- measurement ----------------------------------------------------------------
    def run_size(self, op: str, size: int, plan: dict[str, Any]) -> dict[str, Any]:
        """Time one (op, size) out-of-place and in-place, check it, reduce over the group."""
        import torch

        if self.backend == "nccl":
            torch.cuda.set_device(self.device_index)  # current device is per thread
        self.size = size
        dtype = getattr(torch, plan["dtype"])
        elem = torch.tensor([], dtype=dtype).element_size()
        bufs = Buffers(op, OPS[op].layout(size, self.world, elem), self.rank, self.world,
                       dtype, self._device())
        self._barrier(f"barrier {op} {size}")
        iters, warmup = int(plan["iters"]), int(plan["warmup"])
        oop = self._timed(op_call(bufs, False), iters, warmup, f"{op} out-of-place {size}")
        ip_fn = op_call(bufs, True)
        ip = self._timed(ip_fn, iters, warmup, f"{op} in-place {size}") if ip_fn else None
        copy = None
        if plan.get("copy_baseline") and bufs.send.numel() == bufs.recv.numel():
            copy = self._timed(lambda: bufs.recv.copy_(bufs.send), iters, warmup, None)
        wrong = self._check(bufs, int(plan.get("check_iters", 2)), ip_fn is not None)
        return self._reduce(op, bufs.layout.size, oop, ip, copy, wrong)

    def _step(self, phase: str, collective: bool = True) -> None:
        """Mark entry into a collective; the hang fault stops a rank just before one."""
        if collective and self.fault and self.fault[:2] == ("hang", self.global_rank) and (
                self.size >= self.fault[2]):
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

    def _slow(self) -> None:
        """The slow:RANK:MS fire-drill fault: this rank is late to every timed collective."""
        if self.fault and self.fault[0] == "slow" and self.fault[1] == self.global_rank:
            time.sleep(self.fault[2] / 1e3)

    def _timed(self, fn: Callable[[], object] | None, iters: int, warmup: int,
               phase: str | None) -> tuple[float, float, float]:
        """(mean, median, min) seconds per iteration; CUDA events on GPU, perf_counter on CPU."""
        import torch

        assert fn is not None
        if phase is not None:
            self._step(phase)
        for _ in range(warmup):
            fn()
        self._sync()
        if self.backend != "nccl":  # gloo CPU collectives return when complete
            marks = [time.perf_counter()]
            for _ in range(iters):
                self._slow()
                fn()
                marks.append(time.perf_counter())
            laps = [b - a for a, b in itertools.pairwise(marks)]
        else:
            events = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
            events[0].record()
            for i in range(iters):
                self._slow()
                fn()
                events[i + 1].record()
            events[-1].synchronize()
            laps = [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(events)]
        return sum(laps) / iters, statistics.median(laps), min(laps)

    def _check(self, bufs: Buffers, check_iters: int, in_place: bool) -> tuple[int, int]:
        """Count wrong elements, refilling the inputs every time so values never grow."""
        wrong = [0, -1 if not in_place else 0]
        inject = bool(self.fault and self.fault[:2] == ("wrong", self.global_rank))
        for _ in range(check_iters):
            for mode in (0, 1) if in_place else (0,):
                out = fill_for_check(bufs, bool(mode))
                call = op_call(bufs, bool(mode))
                assert call is not None
                self._step(f"check {bufs.op} {'in-place' if mode else 'out-of-place'}")
                call()
                self._sync()
                wrong[mode] += count_wrong(bufs, out, inject)
        return wrong[0], wrong[1]

    def _reduce(self, op: str, size: int, oop: tuple[float, float, float],
                ip: tuple[float, float, float] | None, copy: tuple[float, float, float] | None,
                wrong: tuple[int, int]) -> dict[str, Any]:
        """The slowest rank counts (MAX of times); #wrong is summed over the group."""
        import torch
        import torch.distributed as dist

        self._step(f"reduce results {op} {size}")
        own = [oop[0], oop[1], ip[0] if ip else -1.0, copy[0] if copy else -1.0, oop[2]]
        t = torch.tensor(own, dtype=torch.float64, device=self._device())
        w = torch.tensor(list(wrong), dtype=torch.int64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        dist.all_reduce(w, op=dist.ReduceOp.SUM)
        times, wrongs = t.tolist(), w.tolist()
        return {"op": op, "size": size, "oop_s": times[0], "oop_med_s": times[1],
                "oop_min_s": times[4],
                "ip_s": times[2] if ip else None, "copy_s": times[3] if copy else None,
                "oop_wrong": int(wrongs[0]), "ip_wrong": int(wrongs[1]) if ip else None,
                "own_oop_s": oop[0], "own_oop_med_s": oop[1]}
