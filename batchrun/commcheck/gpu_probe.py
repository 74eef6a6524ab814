"""Readings of one GPU, taken inside its rank: NVML state, device copy, bf16 matmul.

NVML comes from ``nvidia-ml-py`` (module ``pynvml``, in the ``gpu`` extra),
imported here only, so nothing else pays for it. Every NVML call that a GPU
does not support (NotSupported: no NVLink on a PCIe card, no row remapping
before A100) leaves its reading as None; health.py judges the readings.

NOT RUN ON REAL HARDWARE YET: no GPU was lent to the session that wrote this.
tests/test_commcheck_gpu.py runs it where a GPU exists.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

__all__ = ["bf16_matmul_tflops", "collect", "copy_gbps", "nvml_readings"]

_MAX_LINKS = 18  # NVLink links on an H100/H200 SXM (A100: 12); NVML reports the rest absent


def _try(fn: Callable[[], Any]) -> Any:
    """An NVML reading, or None where this GPU does not support it."""
    import pynvml

    try:
        return fn()
    except pynvml.NVMLError:
        return None


def _handle(pynvml: Any, device_index: int) -> Any:
    """The NVML handle of torch's device: by UUID (NVML ignores CUDA_VISIBLE_DEVICES)."""
    import torch

    uuid = getattr(torch.cuda.get_device_properties(device_index), "uuid", None)
    if uuid is not None:
        text = str(uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(text if text.startswith("GPU-")
                                                else f"GPU-{text}")
    return pynvml.nvmlDeviceGetHandleByIndex(device_index)


def _nvlink(pynvml: Any, handle: Any) -> dict[str, Any] | None:
    states = {}
    for link in range(_MAX_LINKS):
        state = _try(partial(pynvml.nvmlDeviceGetNvLinkState, handle, link))
        if state is not None:
            states[link] = state
    if not states:
        return None
    return {"present": len(states), "active": sum(1 for s in states.values() if s),
            "inactive": sorted(k for k, s in states.items() if not s)}


def _throttle(pynvml: Any, handle: Any) -> int | None:
    reader = (getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
              or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons)
    return _try(lambda: int(reader(handle)))


def _remapped(pynvml: Any, handle: Any) -> dict[str, Any] | None:
    got = _try(lambda: pynvml.nvmlDeviceGetRemappedRows(handle))
    if got is None:
        return None
    corr, unc, pending, failure = got
    return {"correctable": corr, "uncorrectable": unc, "pending": bool(pending),
            "failure": bool(failure)}


def _milliwatts(value: Any) -> float | None:
    return None if value is None else float(value) / 1e3


def nvml_readings(device_index: int) -> dict[str, Any]:
    """Everything NVML says about one GPU's health; {'nvml_error': ...} if NVML is missing."""
    try:
        import pynvml
    except ImportError:
        return {"nvml_error": "nvidia-ml-py is not installed (pip install 'batchrun[gpu]')"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return {"nvml_error": f"nvmlInit failed: {exc}"}
    try:
        h = _handle(pynvml, device_index)
        uncorrected, volatile, aggregate = (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                                            pynvml.NVML_VOLATILE_ECC, pynvml.NVML_AGGREGATE_ECC)
        return {
            "name": _try(lambda: str(pynvml.nvmlDeviceGetName(h))),
            "uuid": _try(lambda: str(pynvml.nvmlDeviceGetUUID(h))),
            "index": _try(lambda: int(pynvml.nvmlDeviceGetIndex(h))),
            "device_count": _try(lambda: int(pynvml.nvmlDeviceGetCount())),
            "ecc": {
                "uncorrected_volatile": _try(lambda: int(pynvml.nvmlDeviceGetTotalEccErrors(
                    h, uncorrected, volatile))),
                "uncorrected_aggregate": _try(lambda: int(pynvml.nvmlDeviceGetTotalEccErrors(
                    h, uncorrected, aggregate))),
            },
            "remapped_rows": _remapped(pynvml, h),
            "retired_pages_pending": _try(lambda: bool(
                pynvml.nvmlDeviceGetRetiredPagesPendingStatus(h))),
            "throttle_reasons": _throttle(pynvml, h),
            "temperature_c": _try(lambda: int(pynvml.nvmlDeviceGetTemperature(
                h, pynvml.NVML_TEMPERATURE_GPU))),
            "slowdown_temp_c": _try(lambda: int(pynvml.nvmlDeviceGetTemperatureThreshold(
                h, pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN))),
            "power_w": _milliwatts(_try(lambda: pynvml.nvmlDeviceGetPowerUsage(h))),
            "power_limit_w": _milliwatts(_try(lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(h))),
            "default_power_limit_w": _milliwatts(_try(
                lambda: pynvml.nvmlDeviceGetPowerManagementDefaultLimit(h))),
            "nvlink": _nvlink(pynvml, h),
        }
    except pynvml.NVMLError as exc:
        return {"nvml_error": f"{type(exc).__name__}: {exc}"}
    finally:
        _try(pynvml.nvmlShutdown)


def _cuda_seconds(fn: Callable[[], object], iters: int, warmup: int, device: Any) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return float(begin.elapsed_time(end)) / 1e3 / iters


def copy_gbps(device_index: int, nbytes: int = 1 << 30, iters: int = 20) -> float:
    """One-way device-to-device copy rate (bytes / time, 1e9), as nccl-tests counts algbw."""
    import torch

    device = torch.device("cuda", device_index)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = _cuda_seconds(lambda: dst.copy_(src), iters, 3, device)
    return nbytes / seconds / 1e9


def bf16_matmul_tflops(device_index: int, n: int = 8192, iters: int = 20) -> float:
    """Dense bf16 matmul throughput (2 n^3 flops per product), TFLOPS."""
    import torch

    device = torch.device("cuda", device_index)
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    out = torch.empty(n, n, dtype=torch.bfloat16, device=device)
    seconds = _cuda_seconds(lambda: torch.matmul(a, b, out=out), iters, 5, device)
    return 2 * n**3 / seconds / 1e12


def collect(device_index: int, copy_bytes: int = 1 << 30, matmul_n: int = 8192,
            iters: int = 20) -> dict[str, Any]:
    """NVML readings, then the copy and the matmul; NVML's throttle state read after the burn."""
    import torch

    raw: dict[str, Any] = {"name": torch.cuda.get_device_name(device_index)}
    try:
        torch.cuda.set_device(device_index)
        raw["copy_gbps"] = copy_gbps(device_index, copy_bytes, iters)
        raw["bf16_tflops"] = bf16_matmul_tflops(device_index, matmul_n, iters)
    except RuntimeError as exc:  # CUDA errors (an Xid, out of memory) surface as RuntimeError
        raw["measure_error"] = f"CUDA: {str(exc).splitlines()[0][:200]}"
    readings = nvml_readings(device_index)  # right after the burn: hot, clocks under load
    raw.update({k: v for k, v in readings.items() if v is not None or k not in raw})
    return raw
