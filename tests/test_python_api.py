"""The public Python API: a pinned list of names, the CLI's code path, one-line errors,
re-entrant runs (one after another, and inside a Ray the caller started)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest
import ray
import yaml
from typer.testing import CliRunner

import batchrun
from batchrun.sim import MockConfig, start_in_thread
from tests.conftest import error_server, make_prompts, write_spec

ROOT = Path(__file__).resolve().parents[1]

EXPORTED = [
    "BatchrunError", "BudgetExhausted", "ClusterError", "Estimate", "JobCannotSucceed",
    "JobSpec", "OutputError", "SpecError", "Summary", "UserError", "__version__", "estimate",
    "ray_data", "read_results", "run",
]


def test_exported_members() -> None:
    # as httpx's test_exported_members: the public API is exactly this list, in order
    assert batchrun.__all__ == EXPORTED
    for name in batchrun.__all__:
        value = getattr(batchrun, name)
        if name != "__version__":
            assert (value.__doc__ or "").strip(), f"batchrun.{name} has no docstring"
    assert set(batchrun.__all__) <= set(dir(batchrun))
    with pytest.raises(AttributeError):
        batchrun.RowRunner  # noqa: B018  (private names are not reachable from the top)


def test_import_batchrun_stays_light() -> None:
    # commcheck runs where pydantic and ray may be missing: `import batchrun` loads neither
    code = "import sys, batchrun; print(sorted(m for m in ('ray', 'pydantic') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout
    assert out.strip() == "[]"


def _raw(tmp_path: Path) -> dict:
    return yaml.safe_load(write_spec(tmp_path).read_text())


@pytest.mark.parametrize("change, where", [
    ({"limits": {"rpm": 0}}, "limits.rpm"),
    ({"limtis": {"rpm": 5}}, "limtis"),
    ({"model": None}, "model"),
    ({"endpoint": {"api_key_env": "sk-proj-abcdefghijklmnopqrstuvwxyz"}}, "endpoint.api_key_env"),
])
def test_yaml_and_constructor_give_the_same_one_line_error(tmp_path: Path, change: dict,
                                                           where: str) -> None:
    raw = {k: v for k, v in {**_raw(tmp_path), **change}.items() if v is not None}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(batchrun.SpecError) as from_yaml:
        batchrun.JobSpec.from_yaml(path)
    with pytest.raises(batchrun.SpecError) as from_python:
        batchrun.JobSpec(**raw)
    y, p = str(from_yaml.value), str(from_python.value)
    assert y.startswith(f"{path}: {where}: ") and p.startswith(f"JobSpec: {where}: ")
    assert y.removeprefix(f"{path}: ") == p.removeprefix("JobSpec: ")
    assert "\n" not in p and "sk-proj" not in p


def test_run_with_bad_input_raises_one_line_user_error(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)  # its input file does not exist
    before = ray.is_initialized()
    with pytest.raises(batchrun.UserError) as e:
        batchrun.run(spec)
    assert "in.parquet" in str(e.value) and "\n" not in str(e.value)
    assert ray.is_initialized() == before  # refused before Ray was touched


def test_estimate_gives_the_cli_figures(tmp_path: Path) -> None:
    make_prompts(tmp_path / "in.parquet", 300)
    spec = write_spec(tmp_path)
    from batchrun.cli import app

    res = CliRunner().invoke(app, ["estimate", str(spec), "--json"])
    assert res.exit_code == 0, res.output
    cli = json.loads(res.stdout)["estimate"]
    assert batchrun.estimate(spec).model_dump(mode="json") == cli
    assert batchrun.estimate(batchrun.JobSpec.from_yaml(spec)).model_dump(mode="json") == cli
    assert cli["rows"] == 300


def test_runs_inside_the_callers_ray_twice_and_leaves_it_running(tmp_path: Path,
                                                                 ray_session: None) -> None:
    make_prompts(tmp_path / "a" / "in.parquet", 120)
    make_prompts(tmp_path / "b" / "in.parquet", 80)
    with start_in_thread(MockConfig()) as srv:
        a = batchrun.JobSpec.from_yaml(write_spec(tmp_path / "a", name="api-a",
                                                  endpoint={"base_url": srv.base_url}))
        first = batchrun.run(a)
        assert ray.is_initialized()  # the caller's Ray: not shut down
        b = batchrun.JobSpec(**{**a.model_dump(), "name": "api-b",
                                "input": str(tmp_path / "b" / "in.parquet"),
                                "output": str(tmp_path / "b" / "out")})
        second = batchrun.run(b)
        assert ray.is_initialized()
    assert isinstance(first, batchrun.Summary) and (first.rows, first.ok) == (120, 120)
    assert (second.rows, second.ok) == (80, 80)
    table = batchrun.read_results(a)
    assert isinstance(table, pa.Table) and table.num_rows == 120
    assert sorted(table["id"].to_pylist()) == [f"r{i:06d}" for i in range(120)]
    assert set(table["status"].to_pylist()) == {"ok"}
    # a second run of a finished job sends nothing and says so in its summary
    assert batchrun.run(a).rows_this_run == 0


def test_two_runs_in_one_process_each_with_its_own_ray(tmp_path: Path) -> None:
    # a fresh interpreter: the first run starts a Ray and stops it, the second starts another
    for name in ("one", "two"):
        make_prompts(tmp_path / name / "in.parquet", 40)
        write_spec(tmp_path / name, name=f"api-{name}", workers=1,
                   simulate={"latency_ms": 1})
    code = textwrap.dedent(f"""
        import ray, batchrun
        for name in ("one", "two"):
            s = batchrun.run({str(tmp_path)!r} + f"/{{name}}/job.yaml", include_dashboard=False)
            assert (s.rows, s.ok) == (40, 40), s
            assert not ray.is_initialized()  # the Ray it started is stopped again
        print("OK")
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=240)
    assert p.stdout.strip().endswith("OK"), p.stderr[-3000:]


def test_a_stopped_job_raises_its_error_not_an_exit_code(tmp_path: Path,
                                                         ray_session: None) -> None:
    make_prompts(tmp_path / "in.parquet", 200)
    with error_server(401, lambda auth: "Incorrect API key provided") as (url, _):
        spec = write_spec(tmp_path, name="api-401", endpoint={"base_url": url})
        with pytest.raises(batchrun.JobCannotSucceed) as e:
            batchrun.run(spec)
    assert "HTTP 401" in str(e.value) and "\n" not in str(e.value)
    assert not isinstance(e.value, ray.exceptions.RayError)  # batchrun's own, unwrapped
