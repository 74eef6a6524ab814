"""commcheck end to end on the local Ray (gloo, CPU bundles) and local processes.

Real Ray and real torch.distributed: nothing is mocked. Sizes stay small so the
file runs in about a minute on 2 cores. ``ray_local`` is the shared session Ray
from tests/conftest.py (4 logical CPUs, so four half-CPU ranks fit on 2 cores).
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

from batchrun.commcheck.cli import app, build_plan
from batchrun.commcheck.collectives import OP_NAMES, OPS
from batchrun.commcheck.launch import run_ray
from batchrun.commcheck.local import run_local
from batchrun.commcheck.plan import Plan
from batchrun.commcheck.report import size_list
from batchrun.commcheck.table import format_table

SIZES = size_list(1024, 65536, 4, 4)
SMALL = ["--backend", "gloo", "--min-bytes", "1K", "--max-bytes", "8K", "--iters", "3",
         "--warmup", "1", "--no-rank-check"]


def _plan(world: int, **kw: object) -> Plan:
    opts: dict[str, object] = {"backend": "gloo", "cpus_per_rank": 0.5, "iters": 3,
                               "warmup": 1, "timeout_s": 30.0, "rank_check": False}
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


@pytest.mark.timeout(90)
def test_every_collective_exact_on_three_gloo_ranks(ray_local: None) -> None:
    report = run_ray(_plan(3, ops=list(OP_NAMES)))
    assert report.passed, format_table(report)
    assert [r.op for r in report.rows] == [op for op in OP_NAMES for _ in SIZES]
    for row in report.rows:
        assert row.status == "ok" and row.oop_wrong == 0, row
        factor = OPS[row.op].factor(3)
        assert row.oop_busbw == pytest.approx(row.oop_algbw * factor)  # type: ignore[operator]
        if OPS[row.op].in_place:
            assert row.ip_wrong == 0 and row.ip_time_us and row.ip_time_us > 0
        else:  # alltoall and sendrecv: in-place N/A, as in nccl-tests
            assert row.ip_time_us is None and row.ip_wrong is None
    gather = [r for r in report.rows if r.op == "all_gather"]
    assert [r.size for r in gather] == [s // 12 * 12 for s in SIZES]  # whole chunks of 3
    assert [i["rank"] for i in report.ranks] == [0, 1, 2]
    assert len({i["pid"] for i in report.ranks}) == 3  # one actor process per rank
    _assert_released()


@pytest.mark.timeout(90)
def test_fire_drill_slow_rank_is_named_and_healthy_group_passes(ray_local: None,
                                                                 tmp_path: Path) -> None:
    """docs/commcheck.md's drill: 4 gloo ranks on a placement group, rank 2 late by 20 ms."""
    base = ["--gpus", "4", "--backend", "gloo", "--cpus-per-rank", "0.5", "--min-bytes", "1K",
            "--max-bytes", "64K", "--factor", "8", "--iters", "5", "--warmup", "1",
            "--rank-bytes", "64K", "--timeout", "30"]
    runs = {}
    for name, extra in (("healthy", []), ("drill", ["--fault", "slow:2:20"])):
        out = tmp_path / f"{name}.json"
        start = time.monotonic()
        result = CliRunner().invoke(app, [*base, *extra, "--json", str(out)])
        runs[name] = (result, json.loads(out.read_text()), time.monotonic() - start)
    result, data, _ = runs["healthy"]
    assert result.exit_code == 0, result.output
    assert data["rank_check"]["named"] == [] and "rank check names: no one" in result.output
    result, data, elapsed = runs["drill"]
    assert result.exit_code == 1, result.output
    assert data["rank_check"]["named"] == [2]
    assert [p["named"] for p in data["rank_check"]["passes"]] == [[2], [2]]
    outliers = [f for f in data["failures"] if f["check"] == "rank_outlier"]
    assert len(outliers) == 1 and outliers[0]["reason"].startswith("rank 2 (node ")
    assert "without it the group reaches" in outliers[0]["reason"]
    assert data["status"] == "unhealthy" and "# FAIL (unhealthy)" in result.output
    assert elapsed < 60
    _assert_released()


@pytest.mark.timeout(90)
def test_size_that_times_out_is_a_row_beside_the_finished_ones(ray_local: None) -> None:
    # rank 1 stops before its first collective of 8 KiB or more: 1K and 4K finish
    report = run_ray(_plan(2, sizes=[1024, 4096, 8192, 16384], timeout_s=15.0,
                           fault="hang:1:8192"))
    assert [(r.size, r.status) for r in report.rows] == [
        (1024, "ok"), (4096, "ok"), (8192, "timeout"), (16384, "not run")]
    assert report.rows[0].oop_time_us and report.rows[1].oop_wrong == 0
    assert report.exit_code == 1 and report.status == "unhealthy"
    assert report.error is not None and "behind: rank 1" in report.error
    text = format_table(report)
    assert "        8192" in text and text.count("timeout") >= 1 and "not run" in text
    _assert_released()


@pytest.mark.timeout(200)
def test_gloo_defaults_pass_on_two_cores(ray_local: None, tmp_path: Path) -> None:
    """Issue 12 item 7: `batchrun commcheck --backend gloo --gpus 2`, nothing else."""
    out = tmp_path / "r.json"
    start = time.monotonic()
    result = CliRunner().invoke(app, ["--backend", "gloo", "--gpus", "2", "--json", str(out)])
    elapsed = time.monotonic() - start
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [r["size"] for r in data["rows"]] == [(1 << 20) << i for i in range(7)]
    assert all(r["status"] == "ok" and r["oop_wrong"] == 0 for r in data["rows"])
    print(f"gloo defaults, 2 ranks: {elapsed:.1f} s")


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
    assert "FAILED" in result.output and "# FAIL (unhealthy)" in result.output
    _assert_released()


@pytest.mark.timeout(60)
def test_hang_becomes_timely_error_naming_rank(ray_local: None) -> None:
    start = time.monotonic()
    # 15 s, not less: on a loaded 2-core machine importing torch alone takes seconds
    report = run_ray(_plan(2, sizes=[1024], timeout_s=15.0, fault="hang:1"))
    elapsed = time.monotonic() - start
    assert not report.passed and report.error is not None
    assert "no answer within 15s" in report.error
    assert "behind: rank 1" in report.error and "injected fault" in report.error
    assert elapsed < 15.0 + 30.0  # start-up + timeout + kill, not torch's 30-minute default
    _assert_released()


@pytest.mark.timeout(60)
def test_placement_group_not_ready_is_could_not_run(ray_local: None) -> None:
    holder = ray.util.placement_group([{"CPU": 3}])  # the cluster has 4: 1 left
    try:
        ray.get(holder.ready(), timeout=30)
        report = run_ray(_plan(2, cpus_per_rank=1.0, timeout_s=1.0))
    finally:
        ray.util.remove_placement_group(holder)
    assert report.exit_code == 3 and report.error is not None
    assert "not ready after 1s" in report.error and "short of CPU" in report.error
    _assert_released()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("args", "needle"), [
    (["--gpus", "1", "--backend", "nccl"], "needs GPUs and the Ray cluster has none"),
    (["--gpus", "9", "--backend", "gloo"], "needs 9 CPUs; the Ray cluster has 4"),
])
def test_more_ranks_than_the_cluster_has_is_bad_input(ray_local: None, args: list[str],
                                                      needle: str) -> None:
    before = len(ray.util.placement_group_table())
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output
    assert len(ray.util.placement_group_table()) == before  # nothing was reserved


@pytest.mark.timeout(60)
def test_autoscale_skips_the_capacity_check_and_waits_for_the_bundles(ray_local: None) -> None:
    result = CliRunner().invoke(app, ["--gpus", "9", "--backend", "gloo", "--autoscale",
                                      "--reserve-timeout", "1"])
    assert result.exit_code == 3, result.output  # could not run: no autoscaler here
    assert "placement group not ready after 1s" in result.output
    assert "CPU: requested 9, cluster has 4" in result.output
    _assert_released()


@pytest.mark.timeout(60)
def test_health_with_gloo_says_no_gpu_and_runs_the_rest(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["--launcher", "local", "--gpus", "2", *SMALL,
                                      "--health", "--json", str(out)])
    assert result.exit_code == 2, result.output
    assert "there is no GPU to check; running the rest" in result.output
    data = json.loads(out.read_text())
    assert data["passed"] and len(data["rows"]) == 4 and data["health"] == []


@pytest.mark.timeout(60)
def test_local_launcher_two_gloo_processes_and_one_rank() -> None:
    report = run_local(_plan(2, sizes=SIZES[:2], ops=["all_reduce", "sendrecv"]))
    assert report.passed, format_table(report)
    assert report.settings["launcher"] == "local" and len(report.ranks) == 2
    assert report.rows[0].oop_busbw == pytest.approx(report.rows[0].oop_algbw)
    single = run_local(_plan(1, sizes=SIZES[:2], pairwise=True, ops=["all_reduce",
                                                                     "sendrecv"]))
    tiny = run_local(_plan(2, sizes=[4, 1024], ops=["all_gather"]))
    assert [r.size for r in tiny.rows] == [1024] and tiny.passed, format_table(tiny)
    assert "all_gather: 4 B is less than one element per rank for 2 ranks" in tiny.notes[0]
    assert single.passed and single.avg_busbw == 0.0
    assert [r.op for r in single.rows] == ["all_reduce", "all_reduce"]
    assert all(r.copy_gbps is not None and r.copy_gbps > 0 for r in single.rows)
    text = format_table(single)
    assert "never link speed" in text and "pairwise: one node" in text
    assert "sendrecv needs 2 ranks" in text


@pytest.mark.timeout(60)
def test_local_launcher_hang_names_laggard() -> None:
    report = run_local(_plan(2, sizes=[1024], timeout_s=15.0, fault="hang:0"))
    assert report.error is not None and "behind: rank 0" in report.error
    assert report.exit_code == 1


@pytest.mark.timeout(60)
def test_cli_subprocess_exit_code_0_and_prometheus(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "batchrun.commcheck", "--launcher", "local", "--gpus", "2",
            *SMALL, "--timeout", "30"]
    prom = tmp_path / "commcheck.prom"
    ok = subprocess.run([*base, "--out", str(tmp_path / "r.parquet"), "--prometheus",
                         str(prom)], capture_output=True, text=True, timeout=50)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "# Avg bus bandwidth    :" in ok.stdout and ok.stdout.rstrip().endswith("# PASS")
    assert (tmp_path / "r.parquet").stat().st_size > 0
    text = prom.read_text()
    assert "batchrun_commcheck_passed 1.0" in text and "batchrun_commcheck_exit_code 0.0" in text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".commcheck-")] == []


@pytest.mark.timeout(120)
def test_without_torch_one_line_says_install_the_gpu_extra() -> None:
    """Issue 12 item 1: `batchrun commcheck` where torch is not installed."""
    code = ("import sys\n"
            "sys.modules['torch'] = None  # as if torch were not installed\n"
            "sys.argv = ['batchrun', 'commcheck', '--gpus', '2', '--backend', 'gloo',\n"
            "            '--launcher', 'local', '--max-bytes', '1M', '--iters', '1']\n"
            "from batchrun.cli import main\n"
            "main()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=110)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and done.stdout == "", done.stderr
    assert "pip install torch==2.13.0 'batchrun[gpu]'" in lines[0]


def test_plan_with_preflight_on_gloo_keeps_health_off() -> None:
    plan = build_plan(4, backend="gloo", preflight=True)
    assert plan.ops == list(OP_NAMES) and not plan.health and plan.do_rank_check
