"""Bad engine input: one line, exit 2, nothing started (no Ray: these fail before it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from batchrun.cli import app
from batchrun.errors import SpecError, UserError
from batchrun.runner import RunOptions, run_job
from batchrun.spec import load_spec
from tests.conftest import make_prompts, write_spec

CMD = "serve --port {port} --model {model_path}"


def _spec(tmp_path: Path, engine: dict[str, Any] | None, **over: Any) -> Path:
    make_prompts(tmp_path / "in.parquet", 10)
    base: dict[str, Any] = {"limits": None}
    if engine is not None:
        base["engine"] = {"command": CMD, "resources": {"CPU": 1}, **engine}
    base.update(over)
    return write_spec(tmp_path, **base)


def _cli_error(path: Path, *args: str) -> str:
    res = CliRunner().invoke(app, ["run", str(path), "--no-progress", *args])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert "Traceback" not in res.output
    return " ".join(lines)


def test_engine_makes_endpoint_and_rpm_optional(tmp_path: Path):
    spec = load_spec(_spec(tmp_path, {}, price={"gpu_hour_usd": 2.49}))
    assert spec.engine is not None and spec.limits.rpm is None
    assert spec.price.gpu_hour_usd == 2.49  # type: ignore[union-attr]


def test_without_engine_rpm_is_still_required(tmp_path: Path):
    with pytest.raises(SpecError, match=r"limits\.rpm: required field is missing"):
        load_spec(_spec(tmp_path, None))


def test_a_command_without_port_placeholder(tmp_path: Path):
    msg = _cli_error(_spec(tmp_path, {"command": "serve --port 8000"}))
    assert "engine.command: has no {port} placeholder" in msg


def test_engine_with_batch_mode(tmp_path: Path):
    assert "cannot be used with mode: batch" in _cli_error(_spec(tmp_path, {}, mode="batch"))
    # the --mode override is refused too, before Ray starts
    with pytest.raises(UserError, match="engine: cannot run in batch mode"):
        run_job(str(_spec(tmp_path, {})), RunOptions(mode="batch", progress=False))


def test_a_model_path_that_does_not_exist(tmp_path: Path):
    msg = _cli_error(_spec(tmp_path, {"model_path": str(tmp_path / "no-such-model")}))
    assert "engine.model_path:" in msg and "does not exist" in msg
    assert not (tmp_path / "out" / "results").exists()


def test_an_unknown_placeholder(tmp_path: Path):
    msg = _cli_error(_spec(tmp_path, {"command": "serve --port {port} --gpu {gpu}"}))
    assert "unknown placeholder 'gpu'" in msg


def test_preflight_needs_gpus_in_resources(tmp_path: Path):
    msg = _cli_error(_spec(tmp_path, {"preflight": True}))
    assert "preflight: true checks GPUs" in msg


def test_engine_with_simulate(tmp_path: Path):
    assert "engine: and simulate: cannot both be set" in _cli_error(
        _spec(tmp_path, {}, simulate={"latency_ms": 1}))


def test_gpu_hour_price_without_engine(tmp_path: Path):
    msg = _cli_error(_spec(tmp_path, None, limits={"rpm": 60}, price={"gpu_hour_usd": 2.0}))
    assert "price.gpu_hour_usd prices an engine: job" in msg


def test_health_timeout_must_be_positive(tmp_path: Path):
    assert load_spec(_spec(tmp_path, {})).engine.health_timeout_s == 5.0  # type: ignore[union-attr]
    assert "engine.health_timeout_s" in _cli_error(_spec(tmp_path, {"health_timeout_s": 0}))
