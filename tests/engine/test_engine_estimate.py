"""`batchrun estimate --compare` on an engine: job: the API price next to the GPU time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from batchrun.cli import app
from tests.conftest import make_prompts, write_spec


def _job(tmp_path: Path) -> Path:
    make_prompts(tmp_path / "in.parquet", 400)
    return write_spec(tmp_path, limits=None, price={"gpu_hour_usd": 2.0},
                      engine={"command": "serve --port {port}", "replicas": 2,
                              "resources": {"GPU": 1, "CPU": 4}})


def _hosted(*args: str) -> dict[str, Any]:
    res = CliRunner().invoke(app, ["estimate", *args, "--compare", "--json"])
    assert res.exit_code == 0, res.output
    return dict(json.loads(res.output)["self_hosted"])


def test_with_a_given_throughput(tmp_path: Path):
    h = _hosted(str(_job(tmp_path)), "--throughput", "100")
    assert h["rows"] == 400 and h["gpus"] == 2.0 and h["throughput_source"] == "--throughput"
    assert h["self_hosted_usd"] == pytest.approx(400 / 100 / 3600 * 2 * 2.0)
    assert h["api_model"] == "gpt-4.1-mini" and h["api_expected_usd"] > 0


def test_with_the_previous_runs_throughput_or_none(tmp_path: Path):
    spec = _job(tmp_path)
    assert _hosted(str(spec))["self_hosted_usd"] is None  # nothing known yet: said, not guessed
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "summary.json").write_text(json.dumps(
        {"rows_per_s": 40.0, "rows_this_run": 400}))
    h = _hosted(str(spec))
    assert h["throughput_rows_s"] == 40.0 and "summary" in h["throughput_source"]
    assert h["self_hosted_usd"] == pytest.approx(400 / 40 / 3600 * 2 * 2.0)
