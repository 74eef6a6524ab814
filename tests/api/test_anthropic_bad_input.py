"""Bad input of issue 16, through the real CLI: one line, exit 2, nothing sent (the
simulator's ledger stays empty)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from batchrun.sim import MockConfig, RunningServer, start_in_thread
from tests.conftest import make_prompts, write_spec

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]
# a provider registered without a batch API, then the CLI as a user runs it
_NO_BATCH = ("from batchrun.api import registry\n"
             "from batchrun.api.openai import OpenAIProvider\n"
             "class P(OpenAIProvider):\n    api = 'nobatch'\n"
             "registry.PROVIDERS['nobatch'] = P()\n"
             "import sys\nfrom batchrun.cli import main\nsys.argv[0] = 'batchrun'\nmain()\n")


@pytest.fixture(scope="module")
def server() -> Any:
    with start_in_thread(MockConfig()) as srv:
        yield srv


def _cli(spec: Path, code: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(ROOT), "T16_KEY": "k"}
    head = ["-c", code] if code else ["-m", "batchrun"]
    return subprocess.run([sys.executable, *head, "run", str(spec), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=100)


@pytest.mark.parametrize(("over", "needle"), [
    ({"generation": {"temperature": 0.2}}, "generation.max_tokens: required"),
    ({"endpoint": {"api": "openai"}, "limits": {"rpm": 60, "output_tpm": 9000}},
     "limits.output_tpm"),
    ({"model": "claude-unreleased-9", "budget": {"max_cost_usd": 5}}, "has no price"),
    ({"mode": "batch", "batch": {"max_requests_per_file": 150_000}}, "at most 100,000 per batch"),
    ({"mode": "batch", "endpoint": {"api": "nobatch"}}, "nobatch has no batch API"),
])
def test_one_line_exit_2_nothing_sent(tmp_path: Path, server: RunningServer,
                                      over: dict[str, Any], needle: str) -> None:
    make_prompts(tmp_path / "in.parquet", 5)
    endpoint = {"api": "anthropic", **over.pop("endpoint", {}), "api_key_env": "T16_KEY"}
    endpoint["base_url"] = server.url + ("/v1" if endpoint["api"] != "anthropic" else "")
    spec = write_spec(tmp_path, endpoint=endpoint, **{"model": "claude-sonnet-4-5", **over})
    before = len(server.records())
    p = _cli(spec, _NO_BATCH if endpoint["api"] == "nobatch" else None)
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert needle in lines[0], lines[0]
    assert len(server.records()) == before  # nothing was sent
