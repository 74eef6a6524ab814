"""One engine replica: a Ray actor that owns one server process tree on its bundle.

Named ``batchrun:<job>:engine-N`` and placed on bundle N of the job's placement group,
holding all of that bundle's resources, so Ray hands it the bundle's GPUs
(``CUDA_VISIBLE_DEVICES``) and the server inherits them. The server runs under
``supervise.py`` in a process group of its own, tied to this actor by a pipe: however
this actor ends, the server's whole tree ends with it.

The actor looks after its server by itself (``_life``): start on a free port, ready once
``health_path`` answers 200 and one tiny completion succeeds, then a health check every
``CHECK_S``; a server that exits or fails ``HEALTH_FAILURES`` checks in a row is ended and
started again (``generation`` + 1). Workers and the driver read ``state()``. A server
that never became ready is not retried (the same command would fail the same way): its
error names the replica and ends with the tail of its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Any

import aiohttp
import ray

from batchrun.engine import supervise, weights
from batchrun.engine.plan import command_args
from batchrun.errors import UserError
from batchrun.io import stores
from batchrun.spec import EngineSpec

__all__ = ["CHECK_S", "HEALTH_FAILURES", "EngineReplica", "free_port"]

CHECK_S = 1.0
HEALTH_FAILURES = 3
MAX_RESTART_FAILURES = 3  # restarts in a row that never got ready: the replica gives up
STOP_GRACE_S = 10.0
TAIL_LINES = 30


def free_port(host: str) -> int:
    """A port free on this node now (the server binds it a moment later; if another
    process takes it first, the start fails and the next start picks another)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@ray.remote(max_restarts=-1, max_task_retries=0)
class EngineReplica:
    def __init__(self, job: str, index: int, engine: EngineSpec, model: str,
                 storage: Any = None):
        self._job, self._index, self._engine, self._model = job, index, engine, model
        stores.configure(storage)  # the spec's storage: block; keys from this node
        self._model_path: str | None = None  # the node's copy of a URI's weights
        self._name = f"engine-{index}"
        self._node = ray.get_runtime_context().get_node_id()
        self._host = ray.util.get_node_ip_address()
        self._state = "starting"
        self._url: str | None = None
        self._error: str | None = None
        self._generation = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    async def state(self) -> dict[str, Any]:
        """What workers route by (``routing.ReplicaView``); the first call starts the
        server, in a restarted actor too."""
        if self._task is None and not self._stopped:
            self._task = asyncio.get_running_loop().create_task(self._life())
        return {"index": self._index, "state": self._state, "url": self._url,
                "node_id": self._node, "generation": self._generation, "error": self._error,
                "pid": self._proc.pid if self._proc else None}

    def _log(self, line: str, tail: bool = True) -> None:
        if tail:  # the tail quoted in errors holds the server's own lines
            self._tail.append(line)
        # the actor's Ray log: stderr, which the driver shows on its stderr, so that
        # `batchrun run --json` keeps stdout for the summary
        print(f"[{self._name}] {line}", file=sys.stderr, flush=True)

    def _tail_text(self) -> str:
        return " | ".join(self._tail) or "(no output)"

    async def _life(self) -> None:
        if self._engine.preflight:
            problem = await asyncio.to_thread(self._preflight)
            if problem:
                self._fail(problem)
                return
        if weights.is_uri(self._engine.model_path) and not await self._fetch_weights():
            return
        timeout = aiohttp.ClientTimeout(total=self._engine.health_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            misses = 0
            while not self._stopped:
                if await self._start_once(http):
                    misses = 0
                    await self._watch(http)
                elif self._generation == 0 or misses + 1 >= MAX_RESTART_FAILURES:
                    await asyncio.to_thread(self._kill)
                    self._state = "failed"
                    self._log(self._error or "failed")
                    return
                else:
                    misses += 1
                if self._stopped:
                    return
                self._kill()
                self._generation += 1
                self._state, self._url = "restarting", None
                self._log(f"restarting the server (generation {self._generation})")

    async def _fetch_weights(self) -> bool:
        """The node's copy of ``model_path`` (made once per node); False: failed."""
        uri = self._engine.model_path or ""
        try:
            folder, copied = await asyncio.to_thread(weights.ensure_local, uri)
        except (UserError, OSError) as e:  # OSError: the cache folder (disk full, rights)
            self._fail(f"replica {self._name} on {self._host}: {e}")
            return False
        self._model_path = str(folder)
        self._log(f"{'copied' if copied else 'using the copy of'} {uri} "
                  f"{'to' if copied else 'at'} {folder}", tail=False)
        return True

    def _fail(self, message: str) -> None:
        self._state, self._error = "failed", message
        self._log(message)

    def _spawn(self, port: int) -> None:
        argv = command_args(self._engine, model=self._model, host=self._host, port=port,
                            model_path=self._model_path)
        self._tail.clear()
        self._log(f"starting on {self._host}:{port}: {' '.join(argv)}", tail=False)
        self._proc = subprocess.Popen(
            # by file, not -m: the script needs only the standard library, and the node's
            # python may import another batchrun (or none) than this actor's
            [sys.executable, supervise.__file__, str(STOP_GRACE_S), "--", *argv],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        out = self._proc.stdout
        assert out is not None

        def pump() -> None:  # the server's log, line by line, into this actor's log
            for raw in iter(out.readline, b""):
                self._log(raw.decode("utf-8", "replace").rstrip())

        threading.Thread(target=pump, daemon=True).start()

    async def _start_once(self, http: aiohttp.ClientSession) -> bool:
        """Start the server and wait until it is ready; False (with ``_error``) if it
        exits first or ``startup_timeout_s`` passes."""
        port = free_port(self._host)
        self._spawn(port)
        root = f"http://{self._host}:{port}"
        deadline = time.monotonic() + self._engine.startup_timeout_s
        while time.monotonic() < deadline and not self._stopped:
            assert self._proc is not None
            if self._proc.poll() is not None:
                await asyncio.sleep(0.2)  # the pump's last lines
                self._error = (f"replica {self._name} on {self._host}: the server exited during "
                               f"start-up; last log lines: {self._tail_text()}")
                return False
            if await self._probe(http, root, completion=True):
                self._url, self._state, self._error = f"{root}/v1", "ready", None
                self._log(f"ready at {root}")
                return True
            await asyncio.sleep(0.5)
        self._error = (f"replica {self._name} on {self._host}: not ready within "
                       f"{self._engine.startup_timeout_s:g} s (GET {self._engine.health_path} "
                       f"and a 1-token completion); last log lines: {self._tail_text()}")
        return False

    async def _probe(self, http: aiohttp.ClientSession, root: str, completion: bool) -> bool:
        try:
            async with http.get(root + self._engine.health_path) as r:
                if r.status != 200:
                    return False
            if not completion:
                return True
            body = {"model": self._model, "max_tokens": 1,
                    "messages": [{"role": "user", "content": "ping"}]}
            async with http.post(f"{root}/v1/chat/completions", json=body) as r:
                await r.read()
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def _watch(self, http: aiohttp.ClientSession) -> None:
        """Returns when the ready server exits or stops answering its health checks."""
        assert self._url is not None and self._proc is not None
        root, misses = self._url.removesuffix("/v1"), 0
        while not self._stopped:
            await asyncio.sleep(CHECK_S)
            if self._proc.poll() is not None:
                self._log("the server exited; starting it again")
                return
            misses = 0 if await self._probe(http, root, completion=False) else misses + 1
            if misses >= HEALTH_FAILURES:
                self._log(f"{HEALTH_FAILURES} health checks failed in a row; restarting")
                return

    def _kill(self) -> None:
        """End the server's whole process group: SIGTERM, then SIGKILL after the grace."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
            os.killpg(proc.pid, signal.SIGCONT)  # a hung (stopped) server handles it too
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_GRACE_S + 2)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    async def stop(self) -> None:
        """Stop watching and end the server's process tree (the driver's ``finally``)."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
        await asyncio.to_thread(self._kill)
        self._state = "stopped"

    def _preflight(self) -> str | None:
        """commcheck's per-GPU health on this bundle's GPUs, before any model loads."""
        from batchrun.engine.preflight import check_gpus

        return check_gpus(self._name, self._host, [str(g) for g in ray.get_gpu_ids()])
