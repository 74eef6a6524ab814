"""Where the daily ledger's day documents live, and how one is changed without a race.

``DailyLedger`` (budget.py) changes a day's document by a function ``change(doc)`` that
returns ``(result, changed)``; a store applies it to the latest document atomically:

- ``FileDays``, a local folder: ``fcntl.flock`` on ``ledger.lock`` around read, change
  and write-then-rename (jobs on one machine, or on a shared POSIX mount);
- ``StoreDays``, an object-store prefix (``s3://bucket/ledger/``): compare-and-swap, never
  a lock. Read the document and its version (ETag), apply the change, write it back
  only if the version is unchanged (``If-Match``, or ``If-None-Match: *`` for a new day);
  on 412 another job wrote first: read again and reapply. ``change`` must therefore be
  a pure function of the document, and jobs on different machines sharing the ledger
  never overspend it: every grant is computed from the document it is written over.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

from batchrun.io import storage, stores
from batchrun.io.conditional import conditional_for

__all__ = ["CAS_TRIES", "DayStore", "FileDays", "StoreDays", "day_store"]

T = TypeVar("T")
Change = Callable[[dict[str, Any]], tuple[T, bool]]
CAS_TRIES = 200  # compare-and-swap rounds before a contended write gives up


class DayStore(Protocol):
    def days(self) -> list[str]: ...
    def read(self, day: str) -> dict[str, Any]: ...
    def update(self, day: str, change: Change[T]) -> T: ...


def _new(day: str, tz: str) -> dict[str, Any]:
    return {"date": day, "timezone": tz, "jobs": {}}


class FileDays:
    """Day files in a local folder, changed under one ``flock``."""

    def __init__(self, folder: str | os.PathLike[str], tz: str):
        self.folder, self.tz = Path(folder), tz
        self.folder.mkdir(parents=True, exist_ok=True)

    def days(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("????-??-??.json"))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.folder / "ledger.lock", "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _read(self, day: str) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads((self.folder / f"{day}.json").read_text())
        except FileNotFoundError:
            doc = _new(day, self.tz)
        return doc

    def read(self, day: str) -> dict[str, Any]:
        with self._locked():
            return self._read(day)

    def update(self, day: str, change: Change[T]) -> T:
        with self._locked():
            doc = self._read(day)
            result, changed = change(doc)
            if changed:
                self._write(day, doc)
            return result

    def _write(self, day: str, doc: dict[str, Any]) -> None:
        # Write-then-rename: a crash mid-write leaves the previous day file intact.
        path = self.folder / f"{day}.json"
        tmp = path.with_suffix(f".json.tmp{os.getpid()}")
        with open(tmp, "w") as fh:
            json.dump(doc, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


class StoreDays:
    """Day objects under a store prefix, changed by compare-and-swap (see above)."""

    def __init__(self, uri: str, tz: str):
        self.uri, self.tz = uri.rstrip("/"), tz
        self.cond, self.base = conditional_for(self.uri)

    def days(self) -> list[str]:
        names = (p.rsplit("/", 1)[-1] for p in storage.list_files(self.uri))
        return sorted(n[:-5] for n in names if len(n) == 15 and n.endswith(".json"))

    def read(self, day: str) -> dict[str, Any]:
        got = self.cond.read_with_version(f"{self.base}/{day}.json")
        return json.loads(got[0]) if got else _new(day, self.tz)

    def update(self, day: str, change: Change[T]) -> T:
        path = f"{self.base}/{day}.json"
        for attempt in range(CAS_TRIES):
            got = self.cond.read_with_version(path)
            doc = json.loads(got[0]) if got else _new(day, self.tz)
            result, changed = change(doc)
            if not changed:
                return result
            data = json.dumps(doc, indent=1, sort_keys=True).encode()
            if (self.cond.put_if_absent(path, data) if got is None
                    else self.cond.put_if_version(path, data, got[1])):
                return result
            time.sleep(random.uniform(0, min(0.5, 0.005 * 2 ** min(attempt, 7))))
        raise OSError(f"{self.uri}/{day}.json: {CAS_TRIES} conflicting writes in a row; "
                      "too many jobs share this ledger at once")


def day_store(folder: str | os.PathLike[str], tz: str) -> DayStore:
    text = os.fspath(folder)
    return StoreDays(text, tz) if stores.is_store(text) else FileDays(text, tz)
