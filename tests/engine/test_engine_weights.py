"""``engine.model_path`` on S3 (moto, loopback): copied to each node once.

The pure part (``weights.py``) against the S3 server directly: replicas racing on one
node copy once, a copy cut short is redone, an unreachable bucket fails naming the URI;
an empty prefix is bad input before anything starts (exit 2); and a job whose two
replicas share one node, whose command only serves if ``{model_path}/config.json``
exists, succeeds with one copy.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from enginekit import engine_command, engine_job, processes_with, run_driver, summary_of
from ray.cluster_utils import Cluster
from typer.testing import CliRunner

from batchrun.cli import app
from batchrun.engine import weights
from batchrun.engine.plan import command_args
from batchrun.spec import EngineSpec
from tests.storage import conftest as s3kit
from tests.storage.conftest import s3_client

pytestmark = pytest.mark.timeout(300)
s3_server, bucket = s3kit.s3_server, s3kit.bucket  # the S3 tests' fixtures (moto, loopback)

FILES = {"config.json": b'{"model_type": "llama"}', "weights/part-0.safetensors": b"x" * 70_000}


def _upload(bucket: str, prefix: str = "models/tiny") -> str:
    for name, data in FILES.items():
        s3_client().put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)
    return f"s3://{bucket}/{prefix}/"


def _same_files(folder: Path) -> bool:
    return all((folder / n).read_bytes() == d for n, d in FILES.items())


def test_replicas_racing_on_one_node_copy_once(bucket: str, tmp_path: Path) -> None:
    uri = _upload(bucket)
    results: list[tuple[Path, bool]] = []
    threads = [threading.Thread(target=lambda: results.append(weights.ensure_local(uri, tmp_path)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len({p for p, _ in results}) == 1
    assert [copied for _, copied in results].count(True) == 1
    folder = results[0][0]
    assert folder.parent == tmp_path and _same_files(folder)
    assert weights.marker_of(folder).read_text().strip() == uri
    # the marker is not among the model's files: the engine sees only those
    assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == [
        "config.json", "part-0.safetensors"]
    # the copy is found without the store: the objects are gone, the folder is used
    for name in FILES:
        s3_client().delete_object(Bucket=bucket, Key=f"models/tiny/{name}")
    assert weights.ensure_local(uri, tmp_path) == (folder, False)
    args = command_args(EngineSpec(command="serve {model_path} --port {port}", model_path=uri),
                        model="m", host="h", port=1, model_path=str(folder))
    assert args == ["serve", str(folder), "--port", "1"]


def test_a_copy_cut_short_is_redone(bucket: str, tmp_path: Path) -> None:
    uri = _upload(bucket, "models/b")
    folder = weights.cache_dir(uri, tmp_path)
    (folder / "weights").mkdir(parents=True)
    (folder / "weights" / "part-0.safetensors").write_bytes(b"half")  # no marker
    assert weights.ensure_local(uri, tmp_path) == (folder, True)
    assert _same_files(folder)


def test_a_copy_that_fails_names_the_uri(s3_server: str, tmp_path: Path) -> None:
    uri = "s3://no-such-bucket-here/models/x/"
    with pytest.raises(weights.ModelCopyError, match=r"engine\.model_path: .*no-such-bucket-here"):
        weights.ensure_local(uri, tmp_path)
    assert not weights.marker_of(weights.cache_dir(uri, tmp_path)).exists()


def test_an_empty_prefix_is_bad_input_before_anything_starts(bucket: str, tmp_path: Path):
    _upload(bucket)  # objects elsewhere in the bucket: the prefix itself is empty
    uri = f"s3://{bucket}/models/tin/"
    spec = engine_job(tmp_path, 10, {"command": "serve --port {port} --model {model_path}",
                                     "model_path": uri})
    res = CliRunner().invoke(app, ["run", str(spec), "--no-progress"])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and uri in lines[0] and "lists no objects" in lines[0], res.output
    assert not (tmp_path / "out" / "results").exists()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Path]]:
    """One node, so both replicas share it (and its cache: the raylet's environment)."""
    cache = tmp_path_factory.mktemp("model-cache")
    old = os.environ.get(weights.CACHE_ENV)
    os.environ[weights.CACHE_ENV] = str(cache)
    c = Cluster(initialize_head=True, connect=False,
                head_node_args={"num_cpus": 4, "include_dashboard": False})
    try:
        c.wait_for_nodes()
        yield c, cache
    finally:
        c.shutdown()
        if old is None:
            os.environ.pop(weights.CACHE_ENV, None)
        else:
            os.environ[weights.CACHE_ENV] = old


def test_two_replicas_on_one_node_serve_one_copy(cluster: tuple[Cluster, Path], bucket: str,
                                                 tmp_path: Path) -> None:
    c, cache = cluster
    uri = _upload(bucket)
    # no shell runs the command: bash -c makes the server start only if the copy is there
    command = f"bash -c 'test -f {{model_path}}/config.json && exec {engine_command(tmp_path)}'"
    spec = engine_job(tmp_path, 60, {"command": command, "model_path": uri})
    rc, out, err = run_driver(spec, c.address)
    assert rc == 0, err[-3000:]
    assert summary_of(tmp_path)["ok"] == 60
    log = out + err
    assert log.count(f"copied {uri} to") == 1, log[-3000:]
    assert log.count(f"using the copy of {uri} at") == 1, log[-3000:]
    folder = weights.cache_dir(uri, cache)
    assert _same_files(folder) and weights.marker_of(folder).exists()
    assert processes_with(str(tmp_path)) == []
