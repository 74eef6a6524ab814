"""A worker's room to send (online/feed.py), plain asyncio: it reopens only when the driver
acknowledges a written table, never because a table was handed over or taken."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from batchrun.io.shards import RequestRow
from batchrun.online.feed import Feed, Room


def _rows(n: int, batch: int = 10) -> Iterator[list[RequestRow]]:
    rows = [RequestRow(f"r{i}", [{"role": "user", "content": str(i)}]) for i in range(n)]
    for i in range(0, n, batch):
        yield rows[i:i + batch]


async def _take_all(feed: Feed, lanes: int) -> int:
    """Lanes that answer every row at once; returns how many rows they got before the
    room closed (they are still waiting then)."""
    taken = 0

    async def lane() -> None:
        nonlocal taken
        while (row := await feed.next_row()) is not None:
            taken += 1
            feed.put({"id": row.id})

    tasks = [asyncio.create_task(lane()) for _ in range(lanes)]
    await asyncio.sleep(0.05)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return taken


def test_room_reopens_only_on_the_written_acknowledgement() -> None:
    async def main() -> None:
        room = Room(cap=25)
        feed = Feed(_rows(100), set(), flush_rows=10, room=room, stop=lambda: False)
        assert await _take_all(feed, lanes=4) == 25  # the cap: taken and not written
        table = feed.take()
        assert len(table) == 25 and feed.ready.is_set()
        # handed over (the stream's yield returned: also what a dead driver looks like)
        assert await _take_all(feed, lanes=4) == 0
        assert not feed.written(10)  # the driver wrote 10 of them: room for 10 more
        assert await _take_all(feed, lanes=4) == 10
        assert room.open == 25

    asyncio.run(main())


def test_close_frees_rows_never_handed_and_keeps_the_handed_until_written() -> None:
    async def main() -> None:
        room = Room(cap=30)
        feed = Feed(_rows(100), {"r0", "r1"}, flush_rows=10, room=room, stop=lambda: False)
        assert await _take_all(feed, lanes=2) == 30
        handed = feed.take()
        assert handed[0]["id"] == "r2"  # skip holds ids already written
        feed.written(20)
        await _take_all(feed, lanes=2)  # 20 more, not handed
        assert not feed.close()  # 10 handed rows still wait for their acknowledgement
        assert room.open == 10
        assert feed.written(10) and room.open == 0
        feed.drop()  # a lane cancelled after close: its row was freed already
        assert room.open == 0

    asyncio.run(main())


def test_dropped_rows_and_the_end_of_the_shard_give_room_back() -> None:
    async def main() -> None:
        room = Room(cap=5)
        feed = Feed(_rows(12, batch=5), set(), flush_rows=5, room=room, stop=lambda: False)
        seen = 0
        while (row := await feed.next_row()) is not None:
            seen += 1
            feed.drop()  # the budget refused it: no record
            assert row.id == f"r{seen - 1}"
        assert seen == 12 and room.open == 0 and feed.close()

    asyncio.run(main())
