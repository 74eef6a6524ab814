"""Pure parts of commcheck: sizes, nccl-tests' bandwidth math per collective, checkable
values, the rank-check scoring, the table, JSON/Parquet/Prometheus, CLI input errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from batchrun.commcheck.cli import app, build_plan
from batchrun.commcheck.collectives import (
    OP_NAMES,
    OPS,
    ROOT,
    Layout,
    expected_chunk,
    is_exact,
    parse_ops,
    send_chunk,
)
from batchrun.commcheck.export import prometheus_text, write_json, write_parquet
from batchrun.commcheck.launch import check_capacity
from batchrun.commcheck.localize import (
    describe_lag,
    node_pairs,
    outliers,
    pair_scores,
    round_robin,
)
from batchrun.commcheck.plan import BadInput
from batchrun.commcheck.report import (
    Report,
    Row,
    algbw_gbps,
    avg_busbw,
    parse_size,
    size_list,
)
from batchrun.commcheck.table import format_table


def _result(op: str, size: int, oop_s: float = 1e-3, ip_s: float | None = 2e-3,
            wrong: int = 0) -> dict[str, object]:
    return {"op": op, "size": size, "oop_s": oop_s, "oop_med_s": oop_s, "oop_min_s": oop_s,
            "ip_s": ip_s if OPS[op].in_place else None, "copy_s": None, "oop_wrong": wrong,
            "ip_wrong": 0 if OPS[op].in_place else None, "own_oop_s": oop_s}


def _report(world: int = 2, wrong: int = 0, ops: tuple[str, ...] = ("all_reduce",),
            **kw: object) -> Report:
    rows = [Row.measured(_result(op, s, wrong=wrong), "float32", world)
            for op in ops for s in (1024, 4096)]
    return Report(settings={"backend": "gloo", "launcher": "ray", "dtype": "float32"},
                  world_size=world, ops=list(ops), rows=rows, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "expected"), [
    ("1K", 1024), ("64M", 64 << 20), ("1G", 1 << 30), ("1GiB", 1 << 30), ("4096", 4096),
    ("2kb", 2048), (512, 512),
])
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "1X", "-1K", "1.5M", "K"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_size_list_doubles_and_rounds_to_elements() -> None:
    assert size_list(1024, 65536, 2, 4) == [1024 << i for i in range(7)]
    assert size_list(6, 54, 3, 4) == [4, 16, 52]  # 6, 18, 54 rounded down to float32s
    with pytest.raises(ValueError, match="larger than"):
        size_list(2048, 1024, 2, 4)
    with pytest.raises(ValueError, match="factor"):
        size_list(1024, 2048, 1, 4)


@pytest.mark.parametrize(("op", "factors"), [
    ("all_reduce", {1: 0.0, 2: 1.0, 4: 1.5, 8: 1.75}),
    ("all_gather", {1: 0.0, 2: 0.5, 4: 0.75, 8: 0.875}),
    ("reduce_scatter", {1: 0.0, 2: 0.5, 4: 0.75, 8: 0.875}),
    ("alltoall", {1: 0.0, 2: 0.5, 4: 0.75, 8: 0.875}),
    ("broadcast", {1: 1.0, 2: 1.0, 8: 1.0}),
    ("reduce", {1: 1.0, 2: 1.0, 8: 1.0}),
    ("sendrecv", {2: 1.0, 8: 1.0}),
])
def test_bus_bandwidth_factors_are_nccl_tests(op: str, factors: dict[int, float]) -> None:
    for n, factor in factors.items():
        assert OPS[op].factor(n) == pytest.approx(factor)
        row = Row.measured(_result(op, 1 << 20), "float32", n)
        assert row.oop_busbw == pytest.approx(row.oop_algbw * factor)  # type: ignore[operator]


def test_layouts_follow_nccl_tests_size_column() -> None:
    # size = the larger buffer: all_gather's output, reduce_scatter's input, rounded to n
    assert OPS["all_gather"].layout(1024, 3, 4) == Layout(1020, 255, 85, 255)
    assert OPS["reduce_scatter"].layout(1024, 3, 4) == Layout(1020, 255, 255, 85)
    assert OPS["alltoall"].layout(1024, 3, 4) == Layout(1020, 255, 255, 255)
    assert OPS["all_reduce"].layout(1024, 3, 4) == Layout(1024, 256, 256, 256)
    assert algbw_gbps(1_000_000_000, 0.5) == pytest.approx(2.0)
    row = Row.measured(_result("all_gather", 1024), "float32", 3)
    assert (row.size, row.count, row.redop, row.root) == (1020, 255, "none", -1)
    assert Row.measured(_result("reduce", 1024), "float32", 3).root == ROOT


def _simulate(op: str, n: int) -> dict[tuple[int, int], int]:
    """What each rank's output chunk holds if the collective is correct."""
    out = {}
    for r in range(n):
        for j in range(n):
            if op in ("all_reduce", "reduce"):
                value = sum(send_chunk(op, i, 0, n) for i in range(n))
            elif op == "all_gather":
                value = send_chunk(op, j, 0, n)
            elif op == "reduce_scatter":
                value = sum(send_chunk(op, i, r, n) for i in range(n))
            elif op == "alltoall":
                value = send_chunk(op, j, r, n)
            elif op == "broadcast":
                value = send_chunk(op, ROOT, 0, n)
            else:
                value = send_chunk(op, (r - 1) % n, 0, n)
            out[(r, j)] = value
    return out


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_expected_values_are_what_a_correct_collective_produces(op: str, n: int) -> None:
    for (r, j), value in _simulate(op, n).items():
        want = expected_chunk(op, r, j, n)
        assert want is None or want == value, (op, n, r, j)
    # a misrouted chunk is caught: chunks differ wherever the op moves data between ranks
    if op in ("all_gather", "alltoall") and n > 1:
        assert expected_chunk(op, 0, 0, n) != expected_chunk(op, 0, 1, n)


def test_exactness_per_op_in_bfloat16() -> None:
    assert is_exact("all_reduce", 8, 22) and not is_exact("all_reduce", 8, 23)
    assert is_exact("alltoall", 8, 16) and not is_exact("alltoall", 8, 17)
    assert all(is_exact(op, 24, 1024) for op in OP_NAMES)


def test_parse_ops() -> None:
    assert parse_ops("all") == list(OP_NAMES)
    assert parse_ops("sendrecv,all_reduce") == ["all_reduce", "sendrecv"]
    with pytest.raises(ValueError, match="--op 'allreduce'"):
        parse_ops("allreduce")


def test_round_robin_covers_every_pair_once_in_disjoint_rounds() -> None:
    for n in range(2, 10):
        rounds = round_robin(list(range(n)))
        assert len(rounds) == (n - 1 if n % 2 == 0 else n)
        seen = [p for rnd in rounds for p in rnd]
        assert sorted(seen) == sorted(node_pairs(list(range(n))))
        for rnd in rounds:
            members = [m for p in rnd for m in p]
            assert len(members) == len(set(members))
    assert round_robin([0]) == []


def test_pair_scores_name_the_slow_rank_not_its_peers() -> None:
    # 4 ranks, rank 2 slow: every pair with rank 2 is slow, the others are not
    figures = {(a, b): (0.003 if 2 in (a, b) else 0.2) for a, b in node_pairs([0, 1, 2, 3])}
    scores = pair_scores(figures)
    named, median = outliers(scores, 0.5)
    assert named == [2] and median == pytest.approx(0.2)
    healthy = {k: 0.2 * (1 + 0.1 * i) for i, k in enumerate(figures)}
    assert outliers(pair_scores(healthy), 0.25)[0] == []
    assert outliers({0: 1.0, 1: 0.1}, 0.25)[0] == []  # two ranks: no median to stand out from


def test_describe_lag_names_the_laggard() -> None:
    where = {0: "10.0.0.1", 1: "10.0.0.2", 2: "10.0.0.3"}
    text = describe_lag({0: {"seq": 4, "phase": "barrier"}, 1: {"seq": 3, "phase": "hung"},
                         2: None}, where)
    assert "rank 2 (10.0.0.3) gave no status" in text
    assert "behind: rank 1 (10.0.0.2) at step 3 [hung]" in text
    assert "waiting: rank 0 at step 4 [barrier]" in text


def test_verdict_and_exit_codes() -> None:
    assert _report().passed and _report().exit_code == 0
    bad = _report(wrong=3)
    assert bad.status == "unhealthy" and bad.exit_code == 1 and bad.wrong == 6
    assert Report(settings={}, world_size=2).exit_code == 3  # nothing measured
    ok = _report(min_busbw=0.001)
    assert ok.passed
    low = _report(min_busbw=ok.avg_busbw * 2)
    assert low.exit_code == 1 and "below --min-busbw" in low.all_failures()[0].reason
    mixed = _report()
    mixed.fail("setup", "no GPU", "could_not_run")
    assert mixed.exit_code == 3
    mixed.fail("rank_outlier", "rank 5 is slow")
    assert mixed.exit_code == 1  # a found fault wins over a check that could not run


def test_table_has_nccl_tests_columns_footer_and_na() -> None:
    report = _report(world=4, ops=("all_reduce", "alltoall"))
    report.rows.append(Row.empty("all_reduce", 65536, "float32", 4, "timeout"))
    text = format_table(report)
    lines = text.splitlines()
    header = next(line for line in lines if "redop" in line)
    for col in ("size", "count", "type", "redop", "root", "time", "algbw", "busbw", "#wrong"):
        assert col in header
    assert header.count("busbw") == 2 and header.count("#wrong") == 2
    assert lines.count("# Out of bounds values : 0 OK") == 2
    assert f"# Avg bus bandwidth    : {avg_busbw(report.op_rows('alltoall')):.3f}" in lines
    a2a = [line for line in lines if not line.startswith("#") and " none " in line]
    assert a2a and all(line.split()[-4:] == ["N/A"] * 4 for line in a2a)
    timeout = next(line for line in lines if line.endswith("timeout"))
    assert timeout.split()[0] == "65536"
    assert lines[-1] == "# PASS"
    assert "copy_(send)" in text


def test_failures_are_listed_with_reasons() -> None:
    report = _report(wrong=1, min_busbw=1e6)
    lines = format_table(report).splitlines()
    assert lines[-1] == "# FAIL (unhealthy) (min busbw 1000000.000 GB/s)"
    assert any(line.startswith("# unhealthy: [wrong] all_reduce 1024 B") for line in lines)
    assert any("[min_busbw]" in line for line in lines)


def test_json_parquet_and_prometheus(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    report = _report(env={"NCCL_DEBUG": "INFO"}, topology={"nodes": 1})
    report.rank_check = {"passes": [{"scores": {0: 0.2, 1: 0.003}}], "named": [1]}
    report.ranks = [{"rank": 0, "node": "10.0.0.1"}, {"rank": 1, "node": "10.0.0.2"}]
    write_json(report, str(tmp_path / "r.json"))
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passed"] is True and data["exit_code"] == 0 and data["status"] == "pass"
    assert [r["size"] for r in data["rows"]] == [1024, 4096]
    write_parquet(report, str(tmp_path / "r.parquet"))
    table = pq.read_table(tmp_path / "r.parquet").to_pylist()
    assert [r["size"] for r in table] == [1024, 4096] and table[0]["op"] == "all_reduce"
    families = {f.name: f for f in text_string_to_metric_families(prometheus_text(report))}
    assert families["batchrun_commcheck_passed"].samples[0].value == 1.0
    named = {s.labels["rank"]: s.value for s in families["batchrun_commcheck_rank_named"].samples}
    assert named == {"0": 0.0, "1": 1.0}
    sizes = [s.labels["size"] for s in families["batchrun_commcheck_busbw_gbps"].samples]
    assert sizes == ["1024", "4096"]


def test_backend_defaults() -> None:
    gloo, nccl = build_plan(2, backend="gloo"), build_plan(2, backend="nccl")
    assert max(gloo.sizes) == 64 << 20 and max(nccl.sizes) == 1 << 30
    assert nccl.health and not gloo.health
    assert gloo.tolerance == 0.5 and nccl.tolerance == 0.25
    pre = build_plan(8, backend="nccl", preflight=True)
    assert pre.ops == list(OP_NAMES) and pre.health and pre.do_rank_check
    assert max(pre.sizes) == 256 << 20 and pre.iters == 10


def test_capacity_check_says_how_many_exist() -> None:
    nccl = build_plan(9, backend="nccl")
    with pytest.raises(BadInput, match=r"--gpus 9: the Ray cluster has 8 GPU\(s\); ask for at "
                       r"most 8"):
        check_capacity(nccl, {"GPU": 8.0, "CPU": 64.0})
    with pytest.raises(BadInput, match="needs GPUs and the Ray cluster has none"):
        check_capacity(nccl, {"CPU": 64.0})
    check_capacity(build_plan(8, backend="nccl"), {"GPU": 8.0, "CPU": 64.0})  # fits: no error


@pytest.mark.parametrize(("args", "needle"), [
    (["--min-bytes", "1M", "--max-bytes", "1K"], "larger than"),
    (["--dtype", "float64"], "--dtype"),
    (["--backend", "mpi"], "--backend"),
    (["--op", "all_gatherx"], "--op 'all_gatherx'"),
    (["--strategy", "RANDOM"], "--strategy"),
    (["--nccl-env", "NOEQUALS"], "KEY=VALUE"),
    (["--max-bytes", "lots"], "not a size"),
    (["--fault", "explode:1"], "malformed"),
    (["--fault", "slow:2"], "malformed"),
    (["--fault", "slow:x:20"], "malformed"),
    (["--fault", "slow:2:0"], "malformed"),
    (["--tolerance", "1.5"], "--tolerance"),
    (["--reserve-timeout", "0"], "--reserve-timeout"),
])
def test_cli_bad_input_exits_2_with_one_line(args: list[str], needle: str) -> None:
    result = CliRunner().invoke(app, ["--gpus", "2", "--backend", "gloo", *args])
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1


def test_import_and_help_do_not_import_torch_ray_or_nvml() -> None:
    code = ("import sys, batchrun.commcheck\n"
            "from typer.testing import CliRunner\n"
            "from batchrun.commcheck.cli import app\n"
            "r = CliRunner().invoke(app, ['--help'])\n"
            "assert r.exit_code == 0 and '--preflight' in r.output, r.output\n"
            "print(sorted(m for m in ('torch', 'ray', 'pynvml') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"
