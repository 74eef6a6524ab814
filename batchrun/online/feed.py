"""What a worker's lanes share: one shard's rows in, its records out, and the room to send.

A worker takes a row to send only while it has *room*: the rows it has taken and the
driver has not yet acknowledged as written (being sent, answered, or handed over in a
table) stay under ``2 x flush_rows + concurrency``. Room opens again only when the driver
says it has written a table (``Worker.written``, sent by the driver after each
``write_part``), never because the stream moved on: Ray sets a streaming generator's
"consumed" event also when its owner dies (the docstring of _raylet's
``_async_wait_for_object_consumed``), so a yield that returns proves nothing. A dead
driver never acknowledges, so a worker on any node stops after at most that many answers
past the last table written: ``concurrency`` in flight and two tables of ``flush_rows``.

Plain asyncio, no Ray: the worker actor wraps it, and tests drive it directly.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from batchrun.io.shards import RequestRow

__all__ = ["Feed", "Room"]


class Room:
    """The worker's rows taken and not yet written, against ``cap``."""

    def __init__(self, cap: int):
        self.cap = cap
        self.open = 0
        self._free = asyncio.Event()
        self._free.set()

    async def take(self) -> None:
        while self.open >= self.cap:
            self._free.clear()
            await self._free.wait()
        self.open += 1

    def give_back(self, n: int) -> None:
        self.open -= n
        if self.open < self.cap:
            self._free.set()


class Feed:
    """One shard's run on a worker: rows in (minus ``skip``), records out in tables.

    ``stop``: read no further (the budget is spent or the job halted). Rows this feed
    took hold the worker's ``room`` until the driver acknowledges them (``written``) or
    the stream ends with them unanswered (``close``).
    """

    def __init__(self, rows: Iterator[list[RequestRow]], skip: set[str], flush_rows: int,
                 room: Room, stop: Callable[[], bool]):
        self._rows = rows
        self._skip = skip
        self._stop = stop
        self._room = room
        self._queue: deque[RequestRow] = deque()
        self._eof = False
        self._reading = asyncio.Lock()
        self._flush_rows = flush_rows
        self._open = 0  # rows of this feed holding room
        self._handed = 0  # of which in tables handed to the driver, not acknowledged yet
        self.closed = False
        self.recs: list[dict[str, Any]] = []
        self.ready = asyncio.Event()

    async def next_row(self) -> RequestRow | None:
        """The next row to send, once there is room; None at the shard's end."""
        if self._eof and not self._queue:
            return None
        await self._room.take()
        self._open += 1
        try:
            row = await self._read()
        except BaseException:
            self.drop()
            raise
        if row is None:
            self.drop()
        return row

    async def _read(self) -> RequestRow | None:
        while not self._queue:
            if self._eof or self._stop():
                return None
            async with self._reading:  # one lane reads; the others wait for its batch
                if self._queue or self._eof:
                    continue
                # Parquet reads block: do them off the event loop that serves requests
                batch = await asyncio.to_thread(next, self._rows, None)
                if batch is None:
                    self._eof = True
                else:
                    self._queue.extend(r for r in batch if r.id not in self._skip)
        return self._queue.popleft()

    def drop(self) -> None:
        """A taken row produced no record (left unsent): its room is free again."""
        if self.closed:  # a lane cancelled after ``close``, which freed its row already
            return
        self._open -= 1
        self._room.give_back(1)

    def put(self, rec: dict[str, Any]) -> None:
        self.recs.append(rec)
        if len(self.recs) >= self._flush_rows:
            self.ready.set()

    def take(self) -> list[dict[str, Any]]:
        """The records done so far, for a table: they hold room until ``written``."""
        recs, self.recs = self.recs, []
        self._handed += len(recs)
        return recs

    def written(self, n: int) -> bool:
        """The driver wrote a table of ``n`` rows; True once the feed has nothing left open."""
        n = min(n, self._handed)
        self._handed -= n
        self._open -= n
        self._room.give_back(n)
        return self.closed and self._open == 0

    def close(self) -> bool:
        """The stream ended: free the rows that never reached a table (cancelled, or the
        shard failed); those handed over wait for their acknowledgement. True when none do."""
        self.closed = True
        unhanded = self._open - self._handed - len(self.recs)
        self._open -= unhanded + len(self.recs)
        self._room.give_back(unhanded + len(self.recs))
        self.recs = []
        return self._open == 0
