"""Mistakes a new user makes at the command line: one line, exit 2, no traceback.

Each case runs the real CLI in a subprocess (``python -m batchrun``), as a user would.
None of them starts Ray.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.cli.test_bad_input import assert_clean_error, run_cli
from tests.conftest import make_prompts, write_spec

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
JOBS = REPO / "jobs"


# -- item 6: tracebacks instead of one line -----------------------------------------------

def test_schedule_list_of_the_readme_jobs_folder() -> None:
    """The README's own `batchrun schedule list jobs/`: its specs have no schedule."""
    p = run_cli("schedule", "list", f"{JOBS}/")
    assert_clean_error(p, "demo.yaml", "has a schedule", "schedule: {cron:")


@pytest.mark.parametrize(("schedule", "needle"), [
    ({"cron": "0 25 * * *"}, "schedule.cron"),
    ({"cron": "0 2 * *"}, "5 fields"),
    ({"cron": "0 2 * * *", "timezone": "Mars/Base"}, "unknown time zone"),
])
def test_schedule_list_with_a_bad_schedule(tmp_path: Path, schedule: dict[str, str],
                                           needle: str) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    write_spec(jobs, schedule=schedule)
    p = run_cli("schedule", "list", str(jobs), "--state", str(tmp_path / "state"))
    assert_clean_error(p, "job.yaml", needle)
    p = run_cli("scheduler", str(jobs), "--once", "--state", str(tmp_path / "state"))
    assert_clean_error(p, "job.yaml", needle)


@pytest.mark.parametrize("command", ["run", "estimate"])
def test_a_folder_given_as_the_spec(command: str) -> None:
    p = run_cli(command, f"{JOBS}/")
    assert_clean_error(p, "is a folder, not a job spec", "demo.yaml")


@pytest.mark.parametrize("command", ["run", "estimate"])
def test_a_data_file_given_as_the_spec(command: str) -> None:
    p = run_cli(command, str(JOBS / "data" / "demo.parquet"))
    assert_clean_error(p, "demo.parquet", "is Parquet data, not a job spec")


def test_a_binary_file_given_as_the_spec(tmp_path: Path) -> None:
    blob = tmp_path / "job.yaml"
    blob.write_bytes(bytes(range(256)) * 4)
    assert_clean_error(run_cli("run", str(blob)), "job.yaml", "binary file, not a job spec")


def test_mock_server_on_a_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = run_cli("mock-server", "--port", str(port))
    assert_clean_error(p, f"127.0.0.1:{port}", "already in use", "--port")


# -- item 4: --no-wait with simulate: -------------------------------------------------------

def test_no_wait_with_a_simulated_provider_is_refused(tmp_path: Path) -> None:
    make_prompts(tmp_path / "in.parquet", 10)
    spec = write_spec(tmp_path, simulate={"latency_ms": 0}, mode="batch")
    p = run_cli("run", str(spec), "--no-wait", "--no-dashboard")
    assert_clean_error(p, "--no-wait", "simulate")
    assert not (tmp_path / "out").exists()  # refused before anything started
    p = run_cli("run", str(spec), "--no-wait", "--mode", "online", "--no-dashboard")
    assert_clean_error(p, "--no-wait", "simulate")


# -- item 9: output inside input, a key in api_key_env, an empty input ----------------------

@pytest.mark.parametrize("where", ["inside", "equal"])
def test_output_inside_the_input_folder_is_refused(tmp_path: Path, where: str) -> None:
    data = tmp_path / "data"
    make_prompts(data / "part-0.parquet", 10)
    out = data / "out" if where == "inside" else data
    spec = write_spec(tmp_path, input=str(data), output=str(out),
                      endpoint={"base_url": "http://127.0.0.1:9/v1"})
    p = run_cli("run", str(spec), "--no-dashboard")
    assert_clean_error(p, f"output: {out}", f"input {data}")
    assert not (data / "out").exists()


def test_output_matched_by_the_input_glob_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_prompts(data / "a" / "part-0.parquet", 10)
    spec = write_spec(tmp_path, input=str(data / "**" / "*.parquet"), output=str(data / "out"),
                      endpoint={"base_url": "http://127.0.0.1:9/v1"})
    assert_clean_error(run_cli("run", str(spec)), "output:", "inside the input")


def test_output_beside_a_single_input_file_is_fine(tmp_path: Path) -> None:
    from batchrun.io.shards import validate_input
    from batchrun.spec import load_spec

    make_prompts(tmp_path / "in.parquet", 10)
    spec = load_spec(write_spec(tmp_path, output=str(tmp_path / "out")))
    assert validate_input(spec) == [str(tmp_path / "in.parquet")]


@pytest.mark.parametrize("value", [
    "sk-proj-Zq8" + "x7Kp2" * 8,  # an OpenAI-style key
    "sk_live_" + "a1B2c3D4" * 4,  # a valid variable name, but a key's prefix
    "Zq8x7Kp2Lm4nB6vC1xZ9" * 2,  # a bare token
    "c" + "0f3a9e1b" * 7 + "d2e4b6a",  # openssl rand -hex 32 (vLLM --api-key): a legal name
    "9" + "0f3a9e1b" * 7 + "d2e4b6a",  # the same, starting with a digit
])
def test_a_key_pasted_into_api_key_env_is_never_echoed(tmp_path: Path, value: str) -> None:
    make_prompts(tmp_path / "in.parquet", 10)
    spec = write_spec(tmp_path, endpoint={"base_url": "http://127.0.0.1:9/v1",
                                          "api_key_env": value})
    for command in ("run", "estimate"):
        p = run_cli(command, str(spec))
        assert value not in p.stdout + p.stderr
        assert value[:12] not in p.stdout + p.stderr
        assert_clean_error(p, "endpoint.api_key_env", "environment variable", "OPENAI_API_KEY")


def test_a_key_like_name_is_not_repeated_when_its_variable_is_unset(tmp_path: Path) -> None:
    """A short key with a prefix is a legal variable name, so loading accepts it; the
    "is unset" line must then not repeat it (it did: "environment variable fw_... is
    unset")."""
    value = "fw_3ZabcdEFGH12345678"
    make_prompts(tmp_path / "in.parquet", 10)
    spec = write_spec(tmp_path, endpoint={"base_url": "http://127.0.0.1:9/v1",
                                          "api_key_env": value})
    p = run_cli("run", str(spec), "--no-dashboard", env={value: ""})
    assert value not in p.stdout + p.stderr and "3ZabcdEFGH" not in p.stdout + p.stderr
    assert_clean_error(p, "endpoint.api_key_env must name an environment variable",
                       "value is not shown", "OPENAI_API_KEY")


def test_an_unset_variable_is_named_when_it_reads_as_a_name(tmp_path: Path) -> None:
    make_prompts(tmp_path / "in.parquet", 10)
    for name in ("BATCHRUN_TEST_UNSET_KEY", "my_key"):  # lower case is a legal name too
        spec = write_spec(tmp_path, endpoint={"base_url": "http://127.0.0.1:9/v1",
                                              "api_key_env": name})
        p = run_cli("run", str(spec), env={name: ""})
        assert_clean_error(p, f"environment variable {name} is unset", f"export {name}=")


def test_api_key_env_naming_a_variable_is_accepted(tmp_path: Path) -> None:
    from batchrun.spec import load_spec

    for name in ("OPENAI_API_KEY", "hf_token", "AZURE_OPENAI_KEY_2"):
        spec = write_spec(tmp_path, endpoint={"api_key_env": name})
        assert load_spec(spec).endpoint.api_key_env == name


def test_an_empty_input_says_it_has_no_rows(tmp_path: Path) -> None:
    empty = pa.table({"id": pa.array([], pa.string()), "prompt": pa.array([], pa.string()),
                      "topic": pa.array([], pa.string())})
    pq.write_table(empty, tmp_path / "in.parquet")
    spec = write_spec(tmp_path, endpoint={"base_url": "http://127.0.0.1:9/v1"})
    p = run_cli("run", str(spec), "--no-dashboard")
    assert p.returncode == 0, p.stderr
    assert "input has 0 rows: nothing to send" in p.stderr
    assert "already complete" not in p.stdout + p.stderr
    assert "Traceback" not in p.stderr
