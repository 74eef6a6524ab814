"""``engine.preflight``: commcheck's per-GPU health checks on a replica's reserved GPUs.

Runs inside the replica actor, on its bundle, before the server starts: NVML readings,
a device copy and a bf16 matmul per GPU (``commcheck.gpu_probe.collect``), judged against
the GPU model's reference (``commcheck.health.evaluate_gpu``). A GPU with a "fail" or
"error" finding fails the replica, and so the job, naming the node and the GPU.
"""

from __future__ import annotations

__all__ = ["check_gpus"]

PREFLIGHT_COPY_BYTES = 256 << 20  # a quarter of commcheck's default: a check, not a benchmark
PREFLIGHT_MATMUL_N = 4096


def check_gpus(replica: str, host: str, gpu_ids: list[str]) -> str | None:
    """None when every GPU is healthy, else one line naming the first sick one."""
    if not gpu_ids:
        return (f"replica {replica} on {host}: preflight: Ray gave it no GPU (the spec asks "
                "for GPU in engine.resources)")
    try:
        import torch

        from batchrun.commcheck.gpu_probe import collect
        from batchrun.commcheck.health import evaluate_gpu, find_model
    except ImportError as e:
        return f"replica {replica} on {host}: preflight needs torch on that node ({e})"
    if not torch.cuda.is_available():
        return (f"replica {replica} on {host}: preflight: Ray reserved GPU {','.join(gpu_ids)} "
                "but CUDA sees no GPU there (driver, or CUDA_VISIBLE_DEVICES)")
    for local, gpu in enumerate(gpu_ids):
        raw = collect(local, copy_bytes=PREFLIGHT_COPY_BYTES, matmul_n=PREFLIGHT_MATMUL_N)
        bad = [f for f in evaluate_gpu(raw, find_model(raw.get("name")))
               if f["level"] in ("fail", "error")]
        if bad:
            what = "; ".join(f"{f['check']}: {f['message']}" for f in bad)
            return (f"replica {replica}: GPU {gpu} ({raw.get('name')}) on {host} is unhealthy: "
                    f"{what}")
    return None
