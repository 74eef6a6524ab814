"""Ways to run the simulated provider.

* ``start_in_thread``: an event loop in a daemon thread of the calling process, for tests;
  the ledger is read directly (on the server's loop, so reads never race writes).
* ``start_subprocess``: ``python -m batchrun.sim`` in its own process (and core),
  for the job runner's demo and benchmarks; the ledger is read over HTTP.
* ``serve_forever`` / ``main``: the foreground server behind the CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from batchrun.sim.app import STATE, build_app
from batchrun.sim.config import API_KEY_ENV, MockConfig, add_arguments

__all__ = ["ListenError", "MockProcess", "RunningServer", "main", "serve_forever",
           "start_in_thread", "start_subprocess"]

T = TypeVar("T")
_BACKLOG = 2048  # benchmarks open hundreds of connections at once
_SHUTDOWN_TIMEOUT_S = 1.0  # in-flight (slow) answers are cut after this on stop


async def _start_site(config: MockConfig, host: str, port: int
                      ) -> tuple[web.AppRunner, web.Application, int]:
    app = build_app(config)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=_BACKLOG)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, app, int(runner.addresses[0][1])


class RunningServer:
    """A server on an event loop in a background thread; a context manager."""

    def __init__(self, config: MockConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config, self.host = config, host
        self.port = port
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._app: web.Application | None = None
        self._thread = threading.Thread(target=self._run, name="mock-provider", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as ``base_url`` (ends in ``/v1``)."""
        return f"{self.url}/v1"

    def start(self, timeout: float = 15.0) -> RunningServer:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"mock server did not start within {timeout} s")
        if self._error is not None:
            raise RuntimeError(f"mock server failed to start: {self._error}") from self._error
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start(); the thread must not die silently
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        runner, self._app, self.port = await _start_site(self.config, self.host, self.port)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the server's loop: ledger arrays are only touched from there."""
        if self._loop is None or not self._thread.is_alive():
            raise RuntimeError("mock server is not running")

        async def call() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout=60)

    @property
    def app(self) -> web.Application:
        assert self._app is not None, "server not started"
        return self._app

    def stats(self) -> dict[str, Any]:
        return self._call(lambda: self.app[STATE].ledger.stats())

    def records(self, since: int = 0) -> list[dict[str, Any]]:
        return self._call(lambda: self.app[STATE].ledger.records(since))

    def reset(self) -> None:
        """Forget all requests: ledger, rate-limit windows, sequence numbers."""
        self._call(lambda: self.app[STATE].reset())

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_in_thread(config: MockConfig | None = None, host: str = "127.0.0.1",
                    port: int = 0) -> RunningServer:
    """Start a server in a background thread; returns once it is listening."""
    return RunningServer(config or MockConfig(), host, port).start()


def _get_json(url: str, method: str = "GET") -> Any:
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=60) as resp:
        return json.loads(resp.read())


class MockProcess:
    """A server in a child process; a context manager that terminates it."""

    def __init__(self, proc: subprocess.Popen[bytes], host: str, port: int,
                 tmpdir: str, lifeline: int | None = None) -> None:
        self.proc, self.host, self.port = proc, host, port
        self._tmpdir = tmpdir  # holds the child's stderr; removed on terminate
        self._lifeline = lifeline  # write end of the pipe the child watches

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stats(self) -> dict[str, Any]:
        return dict(_get_json(f"{self.url}/_ledger/stats"))

    def records(self, since: int = 0) -> list[dict[str, Any]]:
        return list(_get_json(f"{self.url}/_ledger?since={since}")["records"])

    def reset(self) -> None:
        _get_json(f"{self.url}/_ledger/reset", method="POST")

    def terminate(self, timeout: float = 10.0) -> int:
        """Close the lifeline (the child's clean stop), else SIGTERM, then SIGKILL after
        ``timeout``; returns the exit code. No SIGTERM while the child is already shutting
        down: asyncio drops its handler on the way out, and the signal would kill it."""
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        for stop in (self.proc.terminate, self.proc.kill):
            if self.proc.poll() is not None:
                break
            stop()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        shutil.rmtree(self._tmpdir, ignore_errors=True)
        return int(self.proc.returncode)

    def __enter__(self) -> MockProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()


def _child_env() -> dict[str, str]:
    # The child must import this very batchrun even when it is not installed.
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def start_subprocess(config: MockConfig | None = None, host: str = "127.0.0.1",
                     *, deadline_s: float = 15.0) -> MockProcess:
    """Spawn ``python -m batchrun.sim`` on a free port; returns once it listens."""
    config = config or MockConfig()
    tmpdir = tempfile.mkdtemp(prefix="batchrun-mock-")
    port_file = os.path.join(tmpdir, "port")
    stderr_path = os.path.join(tmpdir, "stderr")
    # the key goes through the child's environment, not its command line (`ps` shows that)
    # The child dies with this process, even by kill -9: it stops when the pipe's write
    # end, held only here (os.pipe fds are not inherited), closes.
    watch, lifeline = os.pipe()
    argv = [sys.executable, "-m", "batchrun.sim",
            *dataclasses.replace(config, api_key=None).to_argv(),
            "--host", host, "--port", "0", "--port-file", port_file,
            "--parent-pipe", str(watch)]
    env = _child_env()
    env.pop(API_KEY_ENV, None)
    if config.api_key:
        env[API_KEY_ENV] = config.api_key
    try:
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, env=env, pass_fds=(watch,))
    except BaseException:
        os.close(lifeline)
        raise
    finally:
        os.close(watch)
    deadline = time.monotonic() + deadline_s
    while not os.path.exists(port_file):  # written atomically once the socket listens
        if proc.poll() is not None or time.monotonic() > deadline:
            os.close(lifeline)
            proc.kill()
            proc.wait()
            tail = Path(stderr_path).read_text(errors="replace")[-2000:]
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise RuntimeError(f"mock server subprocess did not come up: {tail}")
        time.sleep(0.02)
    port = int(Path(port_file).read_text())
    os.unlink(port_file)
    return MockProcess(proc, host, port, tmpdir, lifeline)


def _write_port_file(path: str, port: int) -> None:
    tmp = f"{path}.tmp"
    Path(tmp).write_text(str(port))
    os.replace(tmp, path)  # atomic: readers never see a half-written number


class ListenError(Exception):
    """The server could not listen on the address asked for (port in use, no such host)."""


async def _serve_until_signalled(config: MockConfig, host: str, port: int,
                                 port_file: str | None, parent_pipe: int | None = None) -> None:
    try:
        runner, _, bound = await _start_site(config, host, port)
    except OSError as e:  # classified by errno, not by the message
        why = ("the port is already in use; pick another with --port (0 picks a free one)"
               if e.errno == errno.EADDRINUSE else (e.strerror or str(e)))
        raise ListenError(f"cannot listen on {host}:{port}: {why}") from e
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    if parent_pipe is not None:  # readable (EOF) once the parent is gone, however it died
        loop.add_reader(parent_pipe, stop.set)
    if port_file:
        _write_port_file(port_file, bound)
    print(f"mock provider listening on http://{host}:{bound}/v1", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def serve_forever(config: MockConfig, host: str = "127.0.0.1", port: int = 0,
                  port_file: str | None = None, parent_pipe: int | None = None) -> None:
    """Serve in the foreground until SIGTERM/SIGINT, or until ``parent_pipe`` (a pipe's
    read end) reaches EOF; writes the bound port to ``port_file``."""
    asyncio.run(_serve_until_signalled(config, host, port, port_file, parent_pipe))


def main(argv: list[str] | None = None) -> int:
    """``python -m batchrun.sim [--host H] [--port P] [--port-file F] [limits...]``."""
    parser = argparse.ArgumentParser(prog="batchrun mock-server",
                                     description="Simulated OpenAI-compatible provider.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--port-file", default=None, help="write the bound port here")
    parser.add_argument("--parent-pipe", type=int, default=None, help=argparse.SUPPRESS)
    add_arguments(parser)
    ns = parser.parse_args(argv)
    try:
        config = MockConfig.from_namespace(ns)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        serve_forever(config, ns.host, ns.port, ns.port_file, ns.parent_pipe)
    except ListenError as e:
        print(f"batchrun mock-server: error: {e}", file=sys.stderr)
        return 2
    return 0
