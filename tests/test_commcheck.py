"""commcheck end to end on the local Ray (gloo, CPU bundles) and local processes.

Real Ray and real torch.distributed: nothing is mocked. Sizes stay small
(1K..64K) so the file runs in well under a minute on 2 cores. ``ray_local`` is
the shared session Ray from tests/conftest.py (4 logical CPUs, so four
half-CPU ranks fit on 2 cores).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from typer.testing import CliRunner

from batchrun.commcheck.cli import app
from batchrun.commcheck.launch import Plan, run_local, run_ray
from batchrun.commcheck.report import format_table, size_list

SIZES = size_list(1024, 65536, 2, 4)
SMALL = ["--backend", "gloo", "--min-bytes", "1K", "--max-bytes", "8K", "--iters", "3",
         "--warmup", "1"]


def _plan(world: int, **kw: object) -> Plan:
    opts: dict[str, object] = {"backend": "gloo", "cpus_per_rank": 0.5, "iters": 3,
                               "warmup": 1, "timeout_s": 30.0}
    opts.update(kw)
    sizes = opts.pop("sizes", SIZES)
    return Plan(world=world, sizes=sizes, **opts)  # type: ignore[arg-type]


def _assert_released() -> None:
    """No commcheck placement group alive and no commcheck actor left."""
    groups = [g for g in ray.util.placement_group_table().values()
              if g["name"] == "batchrun:commcheck"]
    assert groups, "expected at least one commcheck placement group in the table"
    assert {g["state"] for g in groups} == {"REMOVED"}
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    assert not [n for n in names if n.startswith("batchrun:commcheck")]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world", [2, 4])
def test_gloo_ranks_report(ray_local: None, world: int) -> None:
    report = run_ray(_plan(world))
    assert report.error is None and report.passed, format_table(report)
    assert [r.size for r in report.rows] == SIZES
    assert [r.count for r in report.rows] == [s // 4 for s in SIZES]
    factor = 2 * (world - 1) / world
    for row in report.rows:
        assert (row.oop_wrong, row.ip_wrong) == (0, 0)
        assert row.oop_time_us > 0 and row.ip_time_us > 0
        assert row.oop_busbw == pytest.approx(row.oop_algbw * factor)
        assert row.ip_busbw == pytest.approx(row.ip_algbw * factor)
    assert [i["rank"] for i in report.ranks] == list(range(world))
    assert len({i["pid"] for i in report.ranks}) == world  # one actor process per rank
    assert report.topology["nodes"] == 1
    assert report.avg_busbw > 0
    _assert_released()


@pytest.mark.timeout(60)
def test_wrong_values_fail_the_run_via_cli(ray_local: None, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["--gpus", "2", "--cpus-per-rank", "0.5", *SMALL,
                                      "--fault", "wrong:1", "--json", str(out),
                                      "--nccl-env", "NCCL_DEBUG=WARN"])
    assert result.exit_code == 1, result.output
    data = json.loads(out.read_text())
    assert data["passed"] is False and data["wrong"] > 0
    # rank 1 corrupts one element per check iteration (2) in each mode, at every size
    assert all(r["oop_wrong"] == 2 and r["ip_wrong"] == 2 for r in data["rows"])
    assert data["env"]["NCCL_DEBUG"] == "WARN"
    assert [r["env"]["NCCL_DEBUG"] for r in data["ranks"]] == ["WARN", "WARN"]  # in the actors
    assert "FAILED" in result.output and "# FAIL" in result.output
    _assert_released()


@pytest.mark.timeout(60)
def test_hang_becomes_timely_error_naming_rank(ray_local: None) -> None:
    start = time.monotonic()
    # 15 s, not less: on a loaded 2-core machine importing torch alone takes seconds,
    # and the ranks must reach the collective before one of them can be "behind"
    report = run_ray(_plan(2, sizes=[1024], timeout_s=15.0, fault="hang:1"))
    elapsed = time.monotonic() - start
    assert not report.passed and report.error is not None
    assert "no answer within 15s" in report.error
    assert "behind: rank 1" in report.error  # the laggard, not just everyone waiting on it
    assert "injected fault" in report.error
    assert elapsed < 15.0 + 30.0  # start-up + timeout + kill, not torch's 30-minute default
    _assert_released()


@pytest.mark.timeout(60)
def test_missing_resources_are_named(ray_local: None) -> None:
    report = run_ray(_plan(2, cpus_per_rank=64.0, timeout_s=1.0))
    assert report.error is not None and "not ready after 1s" in report.error
    assert "CPU: requested 128" in report.error and "short of CPU" in report.error
    _assert_released()


@pytest.mark.timeout(60)
def test_nccl_without_gpus_is_bad_input(ray_local: None) -> None:
    result = CliRunner().invoke(app, ["--gpus", "1", "--backend", "nccl"])
    assert result.exit_code == 2
    assert "needs GPUs" in result.output and "Traceback" not in result.output


@pytest.mark.timeout(60)
def test_local_launcher_two_gloo_processes_and_one_rank() -> None:
    report = run_local(_plan(2, sizes=SIZES[:3]))
    assert report.passed, format_table(report)
    assert report.settings["launcher"] == "local" and len(report.ranks) == 2
    assert report.rows[0].oop_busbw == pytest.approx(report.rows[0].oop_algbw)
    single = run_local(_plan(1, sizes=SIZES[:2], pairwise=True))
    assert single.passed and single.avg_busbw == 0.0
    assert all(r.copy_gbps is not None and r.copy_gbps > 0 for r in single.rows)
    text = format_table(single)
    assert "never link speed" in text and "pairwise: one node" in text


@pytest.mark.timeout(60)
def test_local_launcher_hang_names_laggard() -> None:
    report = run_local(_plan(2, sizes=[1024], timeout_s=15.0, fault="hang:0"))
    assert report.error is not None and "behind: rank 0" in report.error


@pytest.mark.timeout(60)
def test_cli_subprocess_exit_code_0(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "batchrun.commcheck", "--launcher", "local", "--gpus", "2",
            *SMALL, "--timeout", "30"]
    ok = subprocess.run([*base, "--out", str(tmp_path / "r.parquet")], capture_output=True,
                        text=True, timeout=50)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "# Avg bus bandwidth    :" in ok.stdout and ok.stdout.rstrip().endswith("# PASS")
    assert (tmp_path / "r.parquet").stat().st_size > 0
