"""The output's lease: one driver at a time writes an output in an object store.

A rerun started while a crashed driver's cluster still runs would otherwise commit the
same shards as the old one. ``OUTPUT/lease.json`` (``{"run", "host", "pid", "expires"}``)
is created by a conditional write (``put_if_absent``) and renewed every ``ttl/3`` seconds
by a conditional replace (``put_if_version``); a second driver finds a live lease and
refuses with one line. A lease is taken over when it expired (its driver stopped renewing
it), or at once when its driver ran on this host and its process is gone (``kill -9``
then a rerun on the same machine). Each final shard file is itself committed by a
conditional write (``writer.py``), so even a driver that lost its lease unawares cannot
overwrite a shard committed by the other.

A local output needs none of this: the job's named Ray actors already refuse a second
driver on the same cluster, and a local folder is seen by one machine.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from batchrun.errors import OutputError, UserError
from batchrun.io import stores
from batchrun.io.conditional import conditional_for
from batchrun.io.storage import join, output_error

__all__ = ["LEASE_FILE", "Lease", "acquire"]

log = logging.getLogger("batchrun")
LEASE_FILE = "lease.json"
TTL_S = float(os.environ.get("BATCHRUN_LEASE_TTL_S", "120"))


def _alive_here(doc: dict[str, Any]) -> bool:
    """Whether the lease's driver is a live process of this host (False elsewhere)."""
    if doc.get("host") != socket.gethostname():
        return True  # another machine: only the expiry can tell
    try:
        os.kill(int(doc.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


class Lease:
    """A held lease; ``release`` at the end of the run (a crash leaves it to expire)."""

    def __init__(self, uri: str, ttl_s: float = TTL_S):
        self.uri = join(uri.rstrip("/"), LEASE_FILE)
        self.cond, self.path = conditional_for(self.uri)
        self.run = uuid.uuid4().hex
        self.ttl_s = ttl_s
        self.version: str | None = None
        self.lost: str | None = None
        self._renewed = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _doc(self) -> bytes:
        return json.dumps({"run": self.run, "host": socket.gethostname(), "pid": os.getpid(),
                           "expires": time.time() + self.ttl_s}).encode()

    def take(self) -> None:
        for _ in range(5):  # a rival may take it between our read and write: look again
            got = self.cond.read_with_version(self.path)
            if got is None:
                if self.cond.put_if_absent(self.path, data := self._doc()):
                    self.version = self._version_of(data)
                    return
                continue
            doc = json.loads(got[0] or b"{}")
            if doc.get("expires", 0) > time.time() and _alive_here(doc):
                left = int(doc["expires"] - time.time())
                raise UserError(
                    f"output: {self.uri.rsplit('/', 1)[0]}: another driver of this job holds "
                    f"it (run {str(doc.get('run'))[:8]} on {doc.get('host')}, pid "
                    f"{doc.get('pid')}); wait for it to finish or stop it; a crashed driver's "
                    f"lease expires in {left} s")
            if self.cond.put_if_version(self.path, data := self._doc(), got[1]):
                self.version = self._version_of(data)
                return
        raise UserError(f"output: {self.uri}: the lease keeps changing hands; is another "
                        "driver starting this job in a loop?")

    def _version_of(self, data: bytes) -> str:
        got = self.cond.read_with_version(self.path)
        if got is None or got[0] != data:
            raise OutputError(f"output: {self.uri}: the lease was taken by another driver "
                              "while this one took it; run again")
        return got[1]

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                data = self._doc()
                if self.version is None or not self.cond.put_if_version(
                        self.path, data, self.version):
                    self.lost = "another driver took over this output's lease"
                    return
                self.version = self._version_of(data)
                self._renewed = time.monotonic()
            except OutputError as e:
                self.lost = str(e)
                return
            except OSError:  # the store is down: try again next round, until the lease ends
                if time.monotonic() - self._renewed > self.ttl_s * 0.9:
                    self.lost = (f"the lease could not be renewed for {self.ttl_s:.0f} s (the "
                                 "store does not answer); another driver may take it over")
                    return

    def check(self) -> None:
        """Raise ``OutputError`` once the lease is lost: this driver must not write on."""
        if self.lost is not None:
            raise OutputError(f"output: {self.uri.rsplit('/', 1)[0]}: {self.lost}; this "
                              "driver stops; run the same command again to resume")

    def start(self) -> Lease:
        self._thread = threading.Thread(target=self._renew, name="batchrun-lease",
                                        daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            got = self.cond.read_with_version(self.path)
            if got is not None and got[1] == self.version:
                self.cond.delete(self.path)
        except OSError:  # the store is down: the lease expires by itself (TTL_S)
            log.warning("could not release the output's lease %s; it expires in %.0f s",
                        self.uri, self.ttl_s)


def acquire(output: str) -> Lease | None:
    """The output's lease for this run, if the output is in an object store."""
    if not stores.is_store(output):
        return None
    lease = Lease(output)
    try:
        lease.take()
    except OSError as e:
        raise output_error(lease.uri, e) from None
    return lease.start()
