"""Pure schedule arithmetic: cron slots, catch-up and run dates. No I/O, no clock.

"Now" is always an argument, so the scheduler and its tests inject time. A *slot* is an
aware datetime, in the schedule's time zone, at which one run of a job is due.

Cron is read in the schedule's zone with croniter on aware datetimes, so a daily
``0 2 * * *`` job stays at 02:00 local time across DST changes. Two DST rules follow
classic cron (vixie) behaviour:

- spring forward: a wall time that does not exist that day (02:30 in Europe/Berlin on
  the last Sunday of March) runs at the end of the gap (03:00 local), once;
- fall back: a wall time that occurs twice (02:30 on the last Sunday of October) is one
  slot, at its first occurrence. Otherwise a nightly job would run twice for the same
  ``ds``; the price is that an hourly job has no run in the repeated hour.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, CroniterError, croniter

from batchrun.errors import SpecError, UserError

__all__ = [
    "DEFAULT_GRACE",
    "MAX_CATCH_UP",
    "CatchUp",
    "due_slots",
    "latest_slot",
    "next_slots",
    "parse_now",
    "parse_zone",
    "slot_ds",
    "slot_key",
    "validate_cron",
]

CatchUp = Literal["latest", "all", "none"]

# How late a slot may still start under catch_up "none", and how far back a job the
# scheduler has only just seen may look: the loop wakes within seconds of a slot, so
# minutes cover a slow wakeup without turning "none" into a catch-up policy.
DEFAULT_GRACE = timedelta(minutes=5)
# Upper bound of slots replayed under catch_up "all" (the newest ones win): a
# minute-level cron after a week down must not queue 10,000 runs.
MAX_CATCH_UP = 100

_MACROS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
_CRON_HINT = "write 5 fields 'minute hour day-of-month month day-of-week', e.g. '0 2 * * *'"


def validate_cron(cron: str) -> str:
    """The cron expression, whitespace-normalised; ``SpecError`` if it is not valid.

    Only standard 5-field cron (or a macro like ``@daily``) is accepted: croniter would
    read a 6th field as seconds, which a nightly-batch user never means.
    """
    expr = " ".join(str(cron).split())
    fields = expr.split(" ")
    if not (len(fields) == 5 or (len(fields) == 1 and expr.lower() in _MACROS)):
        raise SpecError(f"schedule.cron {cron!r}: {_CRON_HINT} (daily at 02:00)")
    try:
        # One get_next proves the expression can match a real date ("0 0 31 2 *" cannot).
        croniter(expr, datetime(2000, 1, 1, tzinfo=UTC)).get_next(datetime)
    except CroniterBadDateError:
        raise SpecError(f"schedule.cron {cron!r}: never matches a real date") from None
    except (CroniterError, ValueError, KeyError) as e:
        raise SpecError(f"schedule.cron {cron!r}: {e}; {_CRON_HINT}") from None
    return expr


def parse_zone(name: str | ZoneInfo) -> ZoneInfo:
    """The IANA time zone ``name``; ``SpecError`` naming the fix if it is unknown."""
    if isinstance(name, ZoneInfo):
        return name
    try:
        return ZoneInfo(str(name))
    except (ZoneInfoNotFoundError, ValueError):
        # ValueError: names like "../x" or "" that zoneinfo refuses to look up at all.
        raise SpecError(
            f"schedule.timezone {name!r}: unknown time zone; use an IANA name such as "
            "UTC, Europe/Berlin or Asia/Ho_Chi_Minh"
        ) from None


def parse_now(text: str) -> datetime:
    """An aware datetime from ISO text (``2026-01-02T02:00+07:00``, ``...Z``)."""
    raw = text.strip()
    if raw.endswith(("Z", "z")):  # fromisoformat accepts "Z" only from Python 3.11
        raw = raw[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(raw)
    except ValueError:
        hint = "not an ISO date-time; e.g. 2026-01-02T02:00+07:00"
        raise UserError(f"--now {text!r}: {hint}") from None
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise UserError(f"--now {text!r}: give a UTC offset, e.g. 2026-01-02T02:00+07:00")
    return dt


def _aware(dt: datetime, what: str) -> datetime:
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"{what} must be an aware datetime, got {dt!r}")
    return dt


def _local(dt: datetime, zone: ZoneInfo) -> datetime:
    # Through UTC, so that `fold` is computed by zoneinfo from the instant: croniter's
    # own fold flag is not reliable on the datetimes it returns.
    return dt.astimezone(UTC).astimezone(zone)


def _is_repeat(local: datetime) -> bool:
    """True for the second occurrence of a wall time that happens twice (fall back)."""
    return local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()


def next_slots(cron: str, tz: str | ZoneInfo, after: datetime, n: int) -> list[datetime]:
    """The ``n`` slots strictly after ``after``, oldest first, in the zone ``tz``."""
    zone = parse_zone(tz)
    expr = validate_cron(cron)
    it = croniter(expr, _local(_aware(after, "after"), zone))
    out: list[datetime] = []
    while len(out) < n:
        slot = _local(it.get_next(datetime), zone)
        if not _is_repeat(slot):
            out.append(slot)
    return out


def _slots_back(
    expr: str, zone: ZoneInfo, now: datetime, after: datetime, k: int
) -> list[datetime]:
    """Up to ``k`` slots in ``(after, now]``, newest first."""
    # get_prev is strict: start one minute past `now` floored to the minute so that a
    # slot exactly at `now` (cron has minute resolution) is included.
    start = _local(now, zone).replace(second=0, microsecond=0) + timedelta(minutes=1)
    it = croniter(expr, start)
    out: list[datetime] = []
    while len(out) < k:
        slot = _local(it.get_prev(datetime), zone)
        if _is_repeat(slot):
            continue  # its first occurrence, one hour earlier, comes next
        if slot <= after:
            break
        if slot <= now:
            out.append(slot)
    return out


def latest_slot(cron: str, tz: str | ZoneInfo, now: datetime) -> datetime | None:
    """The newest slot at or before ``now`` within the last ~5 years, or None."""
    zone = parse_zone(tz)
    floor = _aware(now, "now") - timedelta(days=5 * 366)
    found = _slots_back(validate_cron(cron), zone, now, floor, 1)
    return found[0] if found else None


def due_slots(
    cron: str,
    tz: str | ZoneInfo,
    now: datetime,
    after: datetime,
    *,
    catch_up: CatchUp = "latest",
    grace: timedelta = DEFAULT_GRACE,
    limit: int = MAX_CATCH_UP,
) -> list[datetime]:
    """Slots due at ``now``, oldest first, given that every slot up to ``after`` is handled.

    ``after`` is the newest slot already recorded for the job (exclusive). Policies:
    ``latest`` runs only the newest missed slot; ``all`` every missed slot (the newest
    ``limit``), oldest first; ``none`` only a slot due within ``grace`` before ``now``.
    """
    zone = parse_zone(tz)
    expr = validate_cron(cron)
    _aware(now, "now")
    _aware(after, "after")
    if catch_up == "none":
        after = max(after, now - grace)
    elif catch_up not in ("latest", "all"):
        raise SpecError(f"schedule.catch_up {catch_up!r}: use latest, all or none")
    k = limit if catch_up == "all" else 1
    return list(reversed(_slots_back(expr, zone, now, after, k)))


def slot_ds(slot: datetime, tz: str | ZoneInfo) -> str:
    """The run date of a slot: its calendar date in the schedule's zone, ISO format."""
    return _local(_aware(slot, "slot"), parse_zone(tz)).date().isoformat()


def slot_key(slot: datetime) -> str:
    """The slot as UTC ISO text, second resolution: the key stored in the state DB."""
    utc = _aware(slot, "slot").astimezone(UTC).replace(microsecond=0)
    return utc.strftime("%Y-%m-%dT%H:%M:%SZ")
