"""Budget arithmetic (pure) and the daily ledger shared by jobs (a JSON document per day).

Both count money in integers (pico-USD in ``BudgetBook``, nano-USD in the ledger's
files) so that hundreds of reserve/settle/release calls add up exactly: a float sum
drifts, and a cap compared against a drifting sum can be overshot by the drift.

Guarantee of ``BudgetBook``: ``spent + reserved <= cap`` after every ``try_reserve``,
as long as each request settles at most what it reserved. A provider that bills a
few more prompt tokens than we estimated breaks that premise; ``settle`` then records
the real cost anyway (the money is gone) and counts the excess in ``overrun_usd``.
Reserving ``worst_case_usd(..., margin=0.02)`` (1.02x the prompt estimate) absorbs
tokenizer differences of up to 2% so that overruns do not occur in practice.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from batchrun.errors import SpecError
from batchrun.money.ledger_store import DayStore, day_store

__all__ = ["DEFAULT_MARGIN", "NANO", "BudgetBook", "DailyLedger", "nano_usd"]

DEFAULT_MARGIN = 0.02  # suggested prompt-estimate margin for non-OpenAI tokenizers
_PICO = 10**12
_NANO = NANO = 10**9  # the ledger's unit: nano-USD per USD
_UTC = UTC


def _units(usd: float, unit: int, *, up: bool = True) -> int:
    """USD to integer units, rounded up (a cost is never under-counted) or down (a cap).

    A float within a few ulps of an integer count is that integer, so that an amount
    that came out of these units (``cost_usd``, a ledger grant) converts back to
    exactly the units it came from, and reserve/release always agree.
    """
    if not usd >= 0:  # also rejects NaN
        raise ValueError(f"amount must be a non-negative number of USD, got {usd!r}")
    scaled = usd * unit
    near = round(scaled)
    if abs(scaled - near) <= 4 * math.ulp(scaled):
        return near
    return math.ceil(scaled) if up else math.floor(scaled)


def nano_usd(usd: float) -> int:
    """USD in the ledger's integer unit (nano-USD), rounded up: what a gate holds."""
    return _units(usd, _NANO)


class BudgetBook:
    """Reservations against one job's cap, in exact integer pico-USD.

    Not tied to any I/O: the runner calls it from one place (a coordinator or one
    event loop); a lock makes it safe from threads too. ``max_cost_usd=None`` means
    no cap (everything is still counted, for the report).
    """

    def __init__(self, max_cost_usd: float | None) -> None:
        self._cap = None if max_cost_usd is None else _units(max_cost_usd, _PICO, up=False)
        self._spent = 0
        self._reserved = 0
        self._overrun = 0
        self._overruns = 0
        self._lock = threading.Lock()

    def try_reserve(self, usd: float) -> bool:
        """Reserve the worst case of one request; False when it would break the cap."""
        units = _units(usd, _PICO)
        with self._lock:
            if self._cap is not None and self._spent + self._reserved + units > self._cap:
                return False
            self._reserved += units
            return True

    def settle(self, reserved_usd: float, actual_usd: float) -> None:
        """A request came back: release its reservation and add what it really cost."""
        res, act = _units(reserved_usd, _PICO), _units(actual_usd, _PICO)
        with self._lock:
            self._take_back(res)
            self._spent += act
            if act > res:
                self._overrun += act - res
                self._overruns += 1

    def record(self, actual_usd: float) -> None:
        """Spend that was reserved elsewhere (by a limiter's first life, before it was
        restarted): counted, with no reservation to release."""
        act = _units(actual_usd, _PICO)
        with self._lock:
            self._spent += act

    def release(self, reserved_usd: float) -> None:
        """A request was not sent, or failed without being billed."""
        res = _units(reserved_usd, _PICO)
        with self._lock:
            self._take_back(res)

    def _take_back(self, units: int) -> None:
        if units > self._reserved:
            # More than is reserved means a double release/settle (a caller bug);
            # going on would understate what is in flight and let the cap be overshot.
            raise ValueError("release/settle of more than is reserved")
        self._reserved -= units

    @property
    def cap(self) -> float | None:
        return None if self._cap is None else self._cap / _PICO

    @property
    def spent(self) -> float:
        return self._spent / _PICO

    @property
    def reserved(self) -> float:
        return self._reserved / _PICO

    @property
    def remaining(self) -> float:
        """What can still be reserved (infinite without a cap)."""
        if self._cap is None:
            return math.inf
        return max(0, self._cap - self._spent - self._reserved) / _PICO

    @property
    def overrun_usd(self) -> float:
        """Total billed above the reservations (provider counted more than estimated)."""
        return self._overrun / _PICO

    @property
    def overruns(self) -> int:
        return self._overruns


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise SpecError(
            f"budget.timezone: unknown time zone {name!r}; use an IANA name like Europe/Berlin"
        ) from None


class DailyLedger:
    """A per-day spending cap shared by every job writing to the same folder or prefix.

    Layout: ``<folder>/<YYYY-MM-DD>.json`` per day, the date counted in ``timezone``:
    ``{"date", "timezone", "jobs": {job_id: {"spent_nusd", "reserved_nusd"}}}`` (integers,
    nano-USD). Every change is a read-modify-write of one day's document, made atomic by
    ``ledger_store``: under ``flock`` in a local folder, by compare-and-swap on an object
    store URI (``s3://bucket/ledger/``), so jobs on different machines never overspend.
    Jobs reserve in chunks (``reserve_chunk``) and spend them from a local ``BudgetBook``,
    so the hot path takes no lock and makes no store request per request.

    A settle is charged to the day its chunk was reserved on: a chunk taken at 23:59
    counts against that day's allowance, so neither day can exceed ``daily_usd``.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        timezone: str,
        daily_usd: float | None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.folder = os.fspath(folder)
        self.tz = _zone(timezone)
        self._days: DayStore = day_store(folder, str(self.tz))
        self._cap = None if daily_usd is None else _units(daily_usd, _NANO, up=False)
        self._clock = clock or (lambda: datetime.now(tz=_UTC))
        self._open_days: dict[str, set[str]] = {}

    def day_key(self, now: datetime | None = None) -> str:
        """The ledger day of ``now`` (default: the injected clock) in the ledger's zone."""
        t = now if now is not None else self._clock()
        if t.tzinfo is None:
            raise ValueError("day_key needs an aware datetime (naive times are ambiguous)")
        return t.astimezone(self.tz).date().isoformat()

    def reserve_chunk(self, job_id: str, usd: float) -> float:
        """Reserve up to ``usd`` of today's remaining allowance; returns what was granted."""
        want = _units(usd, _NANO)
        day = self.day_key()

        def change(doc: dict[str, Any]) -> tuple[int, bool]:
            rem = want if self._cap is None else max(0, self._cap - _total(doc))
            grant = min(want, rem)
            if grant:
                self._job(doc, job_id)["reserved_nusd"] += grant
            return grant, bool(grant)

        grant = self._days.update(day, change)
        if grant:
            self._open_days.setdefault(job_id, set()).add(day)
        return grant / _NANO

    def settle(self, job_id: str, reserved: float, actual: float) -> None:
        """Move ``reserved`` of the job's chunk to spent, as ``actual`` (the real cost)."""
        res, act = _units(reserved, _NANO), _units(actual, _NANO)

        def change(doc: dict[str, Any]) -> tuple[None, bool]:
            job = self._job(doc, job_id)
            job["reserved_nusd"] = max(0, job["reserved_nusd"] - res)
            job["spent_nusd"] += act
            return None, True

        self._days.update(self._settle_day(job_id), change)

    def release_all(self, job_id: str) -> float:
        """Return every unused reservation of ``job_id`` (job end). Returns the USD released."""
        released = self._clear_reserved(job_id, to_spent=False)
        self._open_days.pop(job_id, None)
        return released

    def charge_stale(self, job_id: str) -> float:
        """A crashed run of ``job_id`` left reservations: count them as spent, since the
        requests they covered may have been billed. Called when the job starts again."""
        return self._clear_reserved(job_id, to_spent=True)

    def _clear_reserved(self, job_id: str, *, to_spent: bool) -> float:
        def change(doc: dict[str, Any]) -> tuple[int, bool]:
            job = doc["jobs"].get(job_id)
            if not (job and job["reserved_nusd"]):
                return 0, False
            cleared = int(job["reserved_nusd"])
            if to_spent:
                job["spent_nusd"] += cleared
            job["reserved_nusd"] = 0
            return cleared, True

        # every day: a crash may be days old
        return sum(self._days.update(day, change) for day in self._days.days()) / _NANO

    def totals(self, day: str | None = None) -> dict[str, float]:
        """``{"spent", "reserved", "remaining"}`` of a day (default today), USD."""
        doc = self._days.read(day or self.day_key())
        spent = sum(j["spent_nusd"] for j in doc["jobs"].values())
        reserved = sum(j["reserved_nusd"] for j in doc["jobs"].values())
        remaining = math.inf if self._cap is None else max(0, self._cap - spent - reserved) / _NANO
        return {"spent": spent / _NANO, "reserved": reserved / _NANO, "remaining": remaining}

    def _settle_day(self, job_id: str) -> str:
        # The oldest day this process reserved on and still holds a reservation for;
        # else today (a settle without a known chunk is still recorded, never lost).
        for day in sorted(self._open_days.get(job_id, ())):
            job = self._days.read(day)["jobs"].get(job_id)
            if job and job["reserved_nusd"] > 0:
                return day
        return self.day_key()

    @staticmethod
    def _job(doc: dict[str, Any], job_id: str) -> dict[str, int]:
        job: dict[str, int] = doc["jobs"].setdefault(job_id, {"spent_nusd": 0, "reserved_nusd": 0})
        return job


def _total(doc: dict[str, Any]) -> int:
    return sum(j["spent_nusd"] + j["reserved_nusd"] for j in doc["jobs"].values())
