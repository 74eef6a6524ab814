"""Online and batch mode share one resume truth: a row with a result is never sent again.

Each test runs ``batchrun run`` in-process (the CLI, for its exit codes and lines) against
a real loopback provider whose ledger judges what was sent; online runs use the session's
real local Ray.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from click.testing import Result
from typer.testing import CliRunner

from batchrun.cli import app
from batchrun.io.shards import iter_shard_rows, plan_shards
from batchrun.money.gate import row_worst_usd
from batchrun.money.pricing import price_for
from batchrun.sim import MockConfig, RunningServer, prompt_key, start_in_thread
from batchrun.sim.batches import BATCHES
from batchrun.spec import load_spec
from tests.conftest import error_server, make_prompts, write_spec

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(240)]

KEY_ENV = "BATCHRUN_TEST_SWITCH_KEY"
KEY = "sk-switch-secret-456"
N = 90  # chunks of 30 requests; shards as the job plans them


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


@pytest.fixture
def server() -> Iterator[RunningServer]:
    with start_in_thread(MockConfig(batch_delay_s=1.0, api_key=KEY)) as srv:
        yield srv


@pytest.fixture
def no_batch_api() -> Iterator[str]:
    """An endpoint without a Batch API (a plain OpenAI-compatible server)."""
    with error_server(404) as (url, _):
        yield url


def _job(folder: Path, base_url: str, **over: Any) -> Path:
    if not (folder / "in.parquet").exists():
        make_prompts(folder / "in.parquet", N, row_group=50)
    return write_spec(folder, shard_rows=40, endpoint={"base_url": base_url,
                                                       "api_key_env": KEY_ENV},
                      batch={"max_requests_per_file": 30, "poll_interval_s": 0.2}, **over)


def _run(spec: Path, *args: str) -> Result:
    return CliRunner().invoke(app, ["run", str(spec), "--no-progress", *args])


def _results(folder: Path) -> list[dict[str, Any]]:
    """Every result row; file by file, as online and batch files differ in columns."""
    files = sorted((folder / "out" / "results").glob("shard-*.parquet"))
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def _one_ok_per_row(folder: Path) -> list[dict[str, Any]]:
    rows = _results(folder)
    assert sorted(r["id"] for r in rows) == [f"r{i:06d}" for i in range(N)]
    assert {r["status"] for r in rows} == {"ok"}
    return rows


def _key_of(i: int) -> str:
    return prompt_key([{"role": "user", "content": f"Say something short about item {i}."}])


def _chunk_lines(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for f in sorted((folder / "out" / "batch").glob("chunk-*.jsonl"))
            for line in f.read_text().splitlines()]


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns)
            for p in (folder / "out" / "results").glob("*.parquet")}


def test_online_then_batch_sends_nothing(tmp_path: Path, server: RunningServer) -> None:
    spec = _job(tmp_path, server.base_url)
    first = _run(spec)
    assert first.exit_code == 0, first.output
    before, results = server.stats(), _snapshot(tmp_path)
    assert before["ok"] == N and results

    again = _run(spec, "--mode", "batch")
    assert again.exit_code == 0, again.output
    assert "already complete" in again.output
    assert server.stats() == before  # no row answered, no batch created
    assert server.app[BATCHES].calls == 0 and not server.app[BATCHES].files  # not even asked
    assert _snapshot(tmp_path) == results  # the online results are not rewritten
    assert _chunk_lines(tmp_path) == []
    _one_ok_per_row(tmp_path)


def test_batch_then_online_and_open_batches_refuse_online(tmp_path: Path,
                                                          server: RunningServer) -> None:
    spec = _job(tmp_path, server.base_url)
    submitted = _run(spec, "--mode", "batch", "--no-wait")
    assert submitted.exit_code == 10, submitted.output

    online = _run(spec)  # the open batches will answer (and bill) these rows
    assert online.exit_code == 2, online.output
    err = [line for line in online.output.splitlines() if "error" in line]
    assert len(err) == 1 and "still open" in err[0] and "--mode batch" in err[0]
    assert "Traceback" not in online.output and KEY not in online.output
    assert server.stats()["by_outcome"].get("ok", 0) in range(N + 1)  # only batch lines

    collected = _run(spec, "--mode", "batch")
    assert collected.exit_code == 0, collected.output
    _one_ok_per_row(tmp_path)
    done = server.stats()
    assert done["ok"] == N and done["duplicate_ok_prompts"] == 0
    assert done["by_outcome"]["batch_created"] == 3

    online = _run(spec)  # complete: online sends nothing either
    assert online.exit_code == 0, online.output
    assert "already complete" in online.output and server.stats() == done


def _item(line: dict[str, Any]) -> int:
    """The input row of a request line: its prompt ends in "item <i>."."""
    return int(line["body"]["messages"][-1]["content"].rsplit(" ", 1)[1].rstrip("."))


def test_partial_online_job_finished_in_batch_mode(tmp_path: Path,
                                                   server: RunningServer) -> None:
    spec = _job(tmp_path, server.base_url)
    assert _run(spec).exit_code == 0
    out = tmp_path / "out"
    finals = sorted((out / "results").glob("shard-*.parquet"))
    assert len(finals) >= 3
    # What a killed online run leaves: the first shard final, the second only a
    # checkpoint part with half its rows, the last nothing.
    half = pq.read_table(finals[1]).sort_by("id")
    half = half.slice(0, half.num_rows // 2)
    part = out / "parts" / finals[1].stem / "part-00000000000000000001-abcdef.parquet"
    part.parent.mkdir(parents=True)
    pq.write_table(half, part)
    lost = set(pq.read_table(finals[1])["id"].to_pylist()) - set(half["id"].to_pylist())
    lost |= set(pq.read_table(finals[-1])["id"].to_pylist())
    finals[1].unlink()
    finals[-1].unlink()
    kept = _snapshot(tmp_path)
    missing = sorted(int(i[1:]) for i in lost)
    seen = len(server.records())

    finished = _run(spec, "--mode", "batch")
    assert finished.exit_code == 0, finished.output
    assert sorted(_item(line) for line in _chunk_lines(tmp_path)) == missing  # only those
    new_ok = [r["key"] for r in server.records(seen) if r["outcome"] == "ok"]
    assert sorted(new_ok) == sorted(_key_of(i) for i in missing)
    rows = _one_ok_per_row(tmp_path)
    assert {r["id"] for r in rows if r.get("batch_id")} == lost
    assert _snapshot(tmp_path)[finals[0].name] == kept[finals[0].name]  # untouched


def _first_chunk_worst(spec_path: Path) -> float:
    spec = load_spec(str(spec_path))
    rows = [r for shard in plan_shards(spec) for batch in iter_shard_rows(spec, shard)
            for r in batch]
    return sum(row_worst_usd(spec, price_for(spec), r) for r in rows[:30])


def test_unfinished_batch_job_finished_online(tmp_path: Path) -> None:
    cfg = MockConfig(batch_delay_s=0.3, batch_line_error_rate=0.2, api_key=KEY, seed=3)
    with start_in_thread(cfg) as srv:
        retry = {"max_attempts": 1, "backoff_base_s": 0.05, "backoff_cap_s": 0.5}
        spec = _job(tmp_path, srv.base_url, retry=retry)
        cap = 1.5 * _first_chunk_worst(spec)  # admits the first chunk of 30, not the second
        spec = _job(tmp_path, srv.base_url, retry=retry, budget={"max_cost_usd": cap})
        cut = _run(spec, "--mode", "batch")
        assert cut.exit_code == 4, cut.output
        failed = [r for r in _results(tmp_path) if r["status"] == "error"]
        assert failed and len(_results(tmp_path)) == 30  # line errors, no attempts left

        spec = _job(tmp_path, srv.base_url, retry=retry)  # the budget raised
        online = _run(spec, "--retry-errors")
        assert online.exit_code == 0, online.output
        _one_ok_per_row(tmp_path)
        seen, calls = srv.stats(), srv.app[BATCHES].calls

        again = _run(spec, "--mode", "batch")  # its unsent chunks are answered now
        assert again.exit_code == 0, again.output
        assert srv.stats() == seen and srv.app[BATCHES].calls == calls
        assert seen["ok"] == N and seen["duplicate_ok_prompts"] == 0
    _one_ok_per_row(tmp_path)


def test_batch_resume_uses_online_check_and_force(tmp_path: Path, server: RunningServer,
                                                  no_batch_api: str) -> None:
    # The input touched, same content: online mode resumes, and so must batch mode.
    a = tmp_path / "a"
    spec = _job(a, server.base_url)
    assert _run(spec, "--mode", "batch", "--no-wait").exit_code == 10
    t = (a / "in.parquet").stat().st_mtime + 60
    os.utime(a / "in.parquet", (t, t))
    resumed = _run(spec, "--mode", "batch")
    assert resumed.exit_code == 0, resumed.output
    _one_ok_per_row(a)

    # Request fields changed: refused without --force; with it, the unsent chunks are
    # written again with the new fields.
    b = tmp_path / "b"
    spec = _job(b, no_batch_api)
    assert _run(spec, "--mode", "batch").exit_code == 2  # no Batch API: chunks written only
    assert {line["body"]["max_tokens"] for line in _chunk_lines(b)} == {32}
    spec = _job(b, server.base_url, generation={"max_tokens": 24})
    refused = _run(spec, "--mode", "batch")
    assert refused.exit_code == 2 and "--force" in refused.output
    seen = server.stats()["ok"]
    forced = _run(spec, "--mode", "batch", "--force")
    assert forced.exit_code == 0, forced.output
    assert {line["body"]["max_tokens"] for line in _chunk_lines(b)} == {24}
    _one_ok_per_row(b)
    assert server.stats()["ok"] == seen + N


def _items_of(final: Path) -> list[int]:
    return sorted(int(i[1:]) for i in pq.read_table(final)["id"].to_pylist())


def test_rows_whose_result_vanished_are_sent_again_in_batch_mode(
        tmp_path: Path, server: RunningServer) -> None:
    spec = _job(tmp_path, server.base_url)
    done = _run(spec, "--mode", "batch")
    assert done.exit_code == 0, done.output
    finals = sorted((tmp_path / "out" / "results").glob("shard-*.parquet"))
    assert len(finals) >= 3
    # A final file deleted, then one corrupted (quarantined on read): batch mode must
    # send exactly those rows again (it used to send nothing and exit 0).
    resent = 0
    for damage, final in (("delete", finals[1]), ("corrupt", finals[-1])):
        lost = _items_of(final)
        resent += len(lost)
        if damage == "delete":
            final.unlink()
        else:
            final.write_bytes(b"not parquet")
        seen = len(server.records())
        again = _run(spec, "--mode", "batch")
        assert again.exit_code == 0, again.output
        new_ok = [r["key"] for r in server.records(seen) if r["outcome"] == "ok"]
        assert sorted(new_ok) == sorted(_key_of(i) for i in lost), damage
        _one_ok_per_row(tmp_path)
    assert server.stats()["duplicate_ok_prompts"] == resent  # those rows, nothing else


_CLI = "from batchrun.cli import main; main()"


def test_batch_killed_while_creating_refuses_online_then_batch_adopts(
        tmp_path: Path, server: RunningServer) -> None:
    spec = _job(tmp_path, server.base_url)
    store = server.app[BATCHES]
    store.create_answer_delay_s = 60.0  # the batch exists; its answer is held back
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", _CLI, "run", str(spec), "--mode", "batch",
                             "--no-progress"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if any(r["outcome"] == "batch_created" for r in server.records()):
            proc.send_signal(signal.SIGKILL)  # between the create and recording it
            break
        time.sleep(0.01)
    proc.wait(10)
    store.create_answer_delay_s = 0.0
    assert proc.returncode == -9, proc.stderr.read() if proc.stderr else ""
    state = json.loads((tmp_path / "out" / "batch" / "state.json").read_text())
    assert [c["step"] for c in state["chunks"]][:1] == ["uploaded"]
    while any(b.obj["status"] not in ("completed", "failed") for b in store.batches.values()):
        time.sleep(0.05)  # the unrecorded batch answers its rows (and bills them)
    before = server.stats()

    online = _run(spec)  # would send, and pay again, the rows that batch answers
    assert online.exit_code == 2, online.output
    err = [line for line in online.output.splitlines() if "error" in line]
    assert len(err) == 1 and "run --mode batch once to adopt or clear" in err[0]
    assert server.stats() == before  # nothing sent

    adopted = _run(spec, "--mode", "batch")
    assert adopted.exit_code == 0, adopted.output
    _one_ok_per_row(tmp_path)
    done = server.stats()
    assert done["by_outcome"]["batch_created"] == 3  # one batch per chunk: adopted, not made
    assert done["ok"] == N and done["duplicate_ok_prompts"] == 0  # every row once
