"""Shared helpers of the benchmarks: provider, spec, job runs, bare loop, memory, output.

The simulated provider always runs in its own process (``start_subprocess``) so that it
never shares an event loop with the code under test. Every benchmark measures its own
baseline in the same run: these machines are noisy, so figures from different runs are
not comparable.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from batchrun.sim import MockConfig, MockProcess, start_subprocess

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / "data"
WORK = ROOT / "out" / "bench"  # out/ is git-ignored
MODEL = "gpt-4.1-mini"
MAX_TOKENS = 64


def provider(**cfg: Any) -> MockProcess:
    """The simulated provider in a child process."""
    return start_subprocess(MockConfig(**cfg))


def prompts_file(rows: int) -> Path:
    """``bench/data/p<rows>.parquet``, made by make_prompts.py if it is missing."""
    path = DATA / f"p{rows}.parquet"
    if not path.exists():
        DATA.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(ROOT / "bench" / "make_prompts.py"), str(path),
                        "--rows", str(rows)], check=True)
    return path


def write_spec(name: str, rows: int, base_url: str, *, fresh: bool = True,
               **over: Any) -> Path:
    """A job spec YAML under out/bench/<name>/; ``over`` replaces top-level keys."""
    job_dir = WORK / name
    if fresh and job_dir.exists():
        shutil.rmtree(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    spec: dict[str, Any] = {
        "name": name, "input": str(prompts_file(rows)), "prompt_column": "prompt",
        "id_column": "id", "model": MODEL,
        "generation": {"max_tokens": MAX_TOKENS, "temperature": 0.2},
        "endpoint": {"base_url": base_url},
        "limits": {"rpm": 100_000_000, "max_concurrency": 128},
        "workers": 2, "shard_rows": 10_000, "output": str(job_dir / "out"),
    }
    spec.update(over)
    path = job_dir / "job.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cli_cmd(spec: Path, *extra: str) -> list[str]:
    """``batchrun run SPEC --json --no-progress --no-dashboard [extra]`` as argv."""
    return [sys.executable, "-m", "batchrun", "run", str(spec), "--json", "--no-progress",
            "--no-dashboard", *extra]


def parse_summary(stdout: str) -> dict[str, Any]:
    """The JSON summary printed by ``batchrun run --json`` (the last JSON object)."""
    start = stdout.find("{")
    return dict(json.loads(stdout[start:])) if start >= 0 else {}


def run_cli(spec: Path, *extra: str) -> tuple[dict[str, Any], float, int]:
    """Run the job as a subprocess; returns (summary, wall seconds, exit code)."""
    t0 = time.monotonic()
    p = subprocess.run(cli_cmd(spec, *extra), capture_output=True, text=True)
    wall = time.monotonic() - t0
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-3000:])
    return parse_summary(p.stdout), wall, p.returncode


def results(spec: Path) -> dict[str, Any]:
    """From the results files: rows, ok, distinct ids, first start and last finish."""
    out = Path(yaml.safe_load(spec.read_text())["output"]) / "results"
    files = sorted(out.glob("shard-*.parquet"))
    if not files:
        return {"rows": 0, "ok": 0, "ids": set(), "span_s": None}
    t = pq.ParquetDataset([str(f) for f in files]).read(
        columns=["id", "status", "started_at", "finished_at"])
    first, last = pc.min(t["started_at"]).as_py(), pc.max(t["finished_at"]).as_py()
    ok = pc.sum(pc.equal(t["status"], "ok")).as_py() or 0
    return {"rows": t.num_rows, "ok": ok, "ids": set(t["id"].to_pylist()),
            "span_s": (last - first).total_seconds()}


def bodies(rows: int, n: int | None = None) -> list[bytes]:
    """The request bodies batchrun sends for the first ``n`` rows (JSON, encoded once)."""
    t = pq.read_table(prompts_file(rows), columns=["prompt"])
    prompts = t["prompt"].to_pylist()[:n]
    return [json.dumps({"model": MODEL, "messages": [{"role": "user", "content": p}],
                        "max_tokens": MAX_TOKENS, "temperature": 0.2}).encode()
            for p in prompts]


async def _bare(url: str, payloads: list[bytes], concurrency: int) -> tuple[int, float]:
    sem = asyncio.Semaphore(concurrency)
    ok = 0
    conn = aiohttp.TCPConnector(limit=concurrency + 8)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=conn) as s:

        async def one(b: bytes) -> None:
            nonlocal ok
            try:
                async with s.post(url, data=b, headers=headers) as r:
                    await r.read()
                    ok += r.status == 200
            finally:
                sem.release()

        t0 = time.monotonic()
        async with asyncio.TaskGroup() as tg:
            for b in payloads:
                await sem.acquire()
                tg.create_task(one(b))
        return ok, time.monotonic() - t0


def bare_loop(base_url: str, payloads: list[bytes], concurrency: int, *,
              uvloop: bool = False, path: str = "/chat/completions") -> dict[str, float]:
    """One process, one ClientSession, a semaphore: POST every body, count the 200s.

    ``uvloop``: on uvloop's event loop, as batchrun's workers run (Ray picks uvloop for
    async actors when it is installed), instead of asyncio's own.
    """
    main = _bare(base_url + path, payloads, concurrency)
    if uvloop:
        import uvloop as uv
        ok, secs = uv.run(main)
    else:
        ok, secs = asyncio.run(main)
    return {"requests": len(payloads), "ok": ok, "seconds": secs, "rows_per_s": ok / secs}


# -- memory -----------------------------------------------------------------------------

def classify(proc: psutil.Process) -> str:
    """'actor' for the job's actors, 'ray' for Ray's own processes (daemons, idle workers)."""
    cmd = " ".join(proc.cmdline())
    if "ray::Worker" in cmd or "ray::RateLimiter" in cmd:
        return "actor"
    return "ray"


def pss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_full_info().pss)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return 0


def sample_tree(driver: psutil.Process) -> dict[str, Any]:
    """PSS in bytes: the driver, the job's actors, Ray's processes (the driver's descendants).

    Only descendants of this driver are counted: other Ray instances on the machine are
    someone else's. A local ``ray.init`` makes gcs_server, raylet and the rest its children.
    """
    out: dict[str, Any] = {"driver": pss(driver), "actor": 0, "ray": 0, "by_name": {}}
    try:
        kids = driver.children(recursive=True)
    except psutil.NoSuchProcess:
        return out
    for p in kids:
        try:
            kind, name = classify(p), p.name()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        m = pss(p)
        out[kind] += m
        out["by_name"][name] = out["by_name"].get(name, 0) + m
    out["job"] = out["driver"] + out["actor"]
    out["all"] = out["job"] + out["ray"]
    return out


def mib(n: float) -> float:
    return round(n / 2**20, 1)


def machine() -> dict[str, Any]:
    import ray

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), "?")
    return {"nproc": os.cpu_count(), "cpu": cpu,
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "ray": ray.__version__,
            "aiohttp": aiohttp.__version__}


def code_version() -> str:
    """HEAD, plus a hash of uncommitted changes under batchrun/ (the tree is shared)."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    diff = subprocess.run([*git, "diff", "HEAD", "--", "batchrun"], capture_output=True).stdout
    return head + (f"+dirty:{hashlib.sha1(diff).hexdigest()[:8]}" if diff else "")


CODE = code_version()  # at start: workers import batchrun when the job starts


def emit(bench: str, figures: dict[str, Any]) -> None:
    """Print the figures, one per line, then one JSON line (``BENCH_JSON {...}``)."""
    figures = {**figures, "code_at_start": CODE, "load_avg_1m": os.getloadavg()[0]}
    for k, v in figures.items():
        print(f"  {k}: {v}")
    print("BENCH_JSON " + json.dumps({"bench": bench, **figures}, default=str), flush=True)
