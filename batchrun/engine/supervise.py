"""``python supervise.py GRACE_S -- CMD ...``: one engine's process tree (standard library
only: the replica runs this file by its path).

The replica actor starts this in a session (process group) of its own, with a pipe as
stdin that only the actor holds. This starts the engine in the same group and ends the
whole group (the engine and whatever it forked: vLLM starts worker processes) when

- the pipe closes: the actor is gone, stopped or killed, even by SIGKILL, or its node's
  raylet died; nothing else could notice that, and a GPU must not stay held;
- it gets SIGTERM or SIGINT (the actor's ``stop``);
- the engine exits by itself (its children must not outlive it).

SIGTERM first, SIGKILL after GRACE_S. Exits with the engine's code.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

__all__ = ["main"]


def _end_group(child: subprocess.Popen[bytes], grace_s: float) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group's SIGTERM is not for us
    try:
        os.killpg(0, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    # the engine's own children may ignore SIGTERM: SIGKILL the group, ourselves last
    os.killpg(0, signal.SIGKILL)


def main(argv: list[str]) -> int:
    grace_s = float(argv[0])
    cmd = argv[2:] if argv[1:2] == ["--"] else argv[1:]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def watch_lifeline() -> None:
        sys.stdin.buffer.read()  # returns when the actor's end closes
        stop.set()

    try:
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    except OSError as e:
        print(f"[batchrun] cannot start {cmd[0]!r}: {e}", flush=True)
        return 127
    threading.Thread(target=watch_lifeline, daemon=True).start()
    while not stop.is_set() and child.poll() is None:
        stop.wait(0.2)
    code = child.poll()
    what = "stopped" if code is None else f"exited with code {code}"
    with contextlib.suppress(OSError):  # the actor's log; gone (the lifeline closed): none
        print(f"[batchrun] engine {what}", flush=True)
    _end_group(child, grace_s)
    return code if code is not None else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
