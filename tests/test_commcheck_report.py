"""Pure parts of commcheck: sizes, busbw math, table, JSON/Parquet, CLI input errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from batchrun.commcheck.cli import app
from batchrun.commcheck.report import (
    Report,
    Row,
    algbw_gbps,
    avg_busbw,
    busbw_factor,
    busbw_gbps,
    check_is_exact,
    describe_lag,
    format_table,
    node_pairs,
    parse_size,
    size_list,
    write_json,
    write_parquet,
)


def _report(world: int = 2, wrong: int = 0, **kw: object) -> Report:
    rows = [Row.from_times(s, "float32", world, 1e-3, 2e-3, (wrong, 0)) for s in (1024, 4096)]
    return Report(settings={"op": "all_reduce", "backend": "gloo", "launcher": "ray"},
                  world_size=world, rows=rows, **kw)  # type: ignore[arg-type]


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
    assert size_list(1 << 20, 1 << 30, 2, 4)[-1] == 1 << 30
    assert size_list(6, 54, 3, 4) == [4, 16, 52]  # 6, 18, 54 rounded down to float32s
    with pytest.raises(ValueError, match="larger than"):
        size_list(2048, 1024, 2, 4)
    with pytest.raises(ValueError, match="factor"):
        size_list(1024, 2048, 1, 4)
    with pytest.raises(ValueError, match="element"):
        size_list(1, 2048, 2, 4)


@pytest.mark.parametrize(("world", "factor"), [(1, 0.0), (2, 1.0), (4, 1.5), (8, 1.75)])
def test_busbw_factor_is_2_n_minus_1_over_n(world: int, factor: float) -> None:
    assert busbw_factor(world) == pytest.approx(factor)
    assert busbw_gbps(10.0, world) == pytest.approx(10.0 * factor)


def test_algbw_uses_1e9_and_one_rank_has_no_bus() -> None:
    assert algbw_gbps(1_000_000_000, 0.5) == pytest.approx(2.0)
    row = Row.from_times(1 << 30, "float32", 1, 1e-3, 1e-3, (0, 0))
    assert row.count == (1 << 28)
    assert row.oop_algbw == pytest.approx((1 << 30) / 1e-3 / 1e9)
    assert row.oop_busbw == 0.0 and row.ip_busbw == 0.0
    with pytest.raises(ValueError):
        busbw_factor(0)


def test_bfloat16_rows_and_exactness() -> None:
    row = Row.from_times(2048, "bfloat16", 4, 1e-3, 1e-3, (0, 0))
    assert (row.count, row.type) == (1024, "bfloat16")
    assert check_is_exact("bfloat16", 22) and not check_is_exact("bfloat16", 23)
    assert check_is_exact("float32", 1024)


def test_node_pairs() -> None:
    assert node_pairs(["a", "a"]) == []
    assert node_pairs(["a", "b", "a", "c"]) == [("a", "b"), ("a", "c"), ("b", "c")]


def test_describe_lag_names_the_laggard() -> None:
    where = {0: "10.0.0.1", 1: "10.0.0.2", 2: "10.0.0.3"}
    text = describe_lag({0: {"seq": 4, "phase": "barrier"}, 1: {"seq": 3, "phase": "hung"},
                         2: None}, where)
    assert "rank 2 (10.0.0.3) gave no status" in text
    assert "behind: rank 1 (10.0.0.2) at step 3 [hung]" in text
    assert "waiting: rank 0 at step 4 [barrier]" in text
    same = describe_lag({0: {"seq": 2, "phase": "x"}, 1: {"seq": 2, "phase": "x"}}, where)
    assert "behind" not in same and "rank 0 at step 2" in same and "rank 1 at step 2" in same


def test_pass_fail_rules() -> None:
    assert _report().passed
    assert not _report(wrong=3).passed and _report(wrong=3).wrong == 6
    assert not _report(error="hang").passed
    assert not Report(settings={}, world_size=2).passed  # no rows measured is not a pass
    ok = _report(min_busbw=0.001)
    assert ok.avg_busbw > 0.001 and ok.passed
    assert not _report(min_busbw=ok.avg_busbw * 2).passed


def test_table_layout_and_footer() -> None:
    report = _report(world=4)
    text = format_table(report)
    lines = text.splitlines()
    header = next(line for line in lines if "redop" in line)
    for col in ("size", "count", "type", "redop", "time", "algbw", "busbw", "#wrong"):
        assert col in header
    assert header.count("busbw") == 2 and header.count("#wrong") == 2
    data = [line for line in lines if not line.startswith("#")]
    assert [int(line.split()[0]) for line in data] == [1024, 4096]
    assert data[0].split()[2:4] == ["float", "sum"]
    expected = avg_busbw(report.rows)
    assert f"# Avg bus bandwidth    : {expected:.3f}" in lines
    assert lines[-1] == "# PASS"
    assert "copy_(send) + all_reduce(recv)" in text
    assert "no bus" not in text


def test_one_rank_table_says_no_bus_and_fail_line() -> None:
    text = format_table(_report(world=1, wrong=1))
    assert "# Avg bus bandwidth    : 0.000" in text
    assert "never link speed" in text
    assert text.splitlines()[-1] == "# FAIL"


def test_min_busbw_threshold_line() -> None:
    report = _report(min_busbw=1e6)
    assert format_table(report).splitlines()[-1] == "# FAIL (min busbw 1000000.000 GB/s)"


def test_json_and_parquet(tmp_path: pytest.TempPathFactory) -> None:
    import pyarrow.parquet as pq

    report = _report(env={"NCCL_DEBUG": "INFO"}, topology={"nodes": 1})
    write_json(report, str(tmp_path / "r.json"))  # type: ignore[operator]
    data = json.loads((tmp_path / "r.json").read_text())  # type: ignore[operator]
    assert data["passed"] is True and data["env"] == {"NCCL_DEBUG": "INFO"}
    assert [r["size"] for r in data["rows"]] == [1024, 4096]
    write_parquet(report, str(tmp_path / "r.parquet"))  # type: ignore[operator]
    table = pq.read_table(tmp_path / "r.parquet").to_pylist()  # type: ignore[operator]
    assert [r["size"] for r in table] == [1024, 4096]
    assert table[0]["nodes"] == 1 and table[0]["passed"] is True


@pytest.mark.parametrize(("args", "needle"), [
    (["--min-bytes", "1M", "--max-bytes", "1K"], "larger than"),
    (["--dtype", "float64"], "--dtype"),
    (["--backend", "mpi"], "--backend"),
    (["--op", "all_gather"], "--op"),
    (["--strategy", "RANDOM"], "--strategy"),
    (["--nccl-env", "NOEQUALS"], "KEY=VALUE"),
    (["--max-bytes", "lots"], "not a size"),
    (["--fault", "explode:1"], "bad fault"),
])
def test_cli_bad_input_exits_2_with_one_line(args: list[str], needle: str) -> None:
    result = CliRunner().invoke(app, ["--gpus", "2", "--backend", "gloo", *args])
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1


def test_import_and_help_do_not_import_torch_or_ray() -> None:
    code = ("import sys, batchrun.commcheck\n"
            "from typer.testing import CliRunner\n"
            "from batchrun.commcheck.cli import app\n"
            "r = CliRunner().invoke(app, ['--help'])\n"
            "assert r.exit_code == 0 and '--min-busbw' in r.output, r.output\n"
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"
