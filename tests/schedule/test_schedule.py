"""The pure schedule core: slots, DST, catch-up policies, run dates, validation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from batchrun.errors import SpecError, UserError
from batchrun.schedule.cron import (
    due_slots,
    latest_slot,
    next_slots,
    parse_now,
    parse_zone,
    slot_ds,
    slot_key,
    validate_cron,
)

BERLIN = ZoneInfo("Europe/Berlin")
HCM = ZoneInfo("Asia/Ho_Chi_Minh")
UTC = UTC


def test_next_slots_daily_in_zone_are_local_wall_times() -> None:
    after = datetime(2026, 1, 1, 12, 0, tzinfo=HCM)
    slots = next_slots("0 2 * * *", "Asia/Ho_Chi_Minh", after, 3)
    assert [s.isoformat() for s in slots] == [
        "2026-01-02T02:00:00+07:00",
        "2026-01-03T02:00:00+07:00",
        "2026-01-04T02:00:00+07:00",
    ]
    # UTC 19:00 the day before: the slot is an instant, whatever zone "after" was given in.
    assert slot_key(slots[0]) == "2026-01-01T19:00:00Z"
    assert next_slots("0 2 * * *", HCM, after.astimezone(UTC), 1) == slots[:1]


def test_next_slots_is_strictly_after() -> None:
    at_slot = datetime(2026, 1, 2, 2, 0, tzinfo=HCM)
    assert next_slots("0 2 * * *", HCM, at_slot, 1)[0].day == 3


def test_spring_forward_missing_wall_time_runs_once_after_the_gap() -> None:
    # Europe/Berlin 2026-03-29: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist.
    slots = next_slots("30 2 * * *", BERLIN, datetime(2026, 3, 28, 12, tzinfo=BERLIN), 3)
    assert [s.isoformat() for s in slots] == [
        "2026-03-29T03:00:00+02:00",
        "2026-03-30T02:30:00+02:00",
        "2026-03-31T02:30:00+02:00",
    ]
    assert [slot_ds(s, BERLIN) for s in slots] == ["2026-03-29", "2026-03-30", "2026-03-31"]


def test_fall_back_repeated_wall_time_is_one_slot() -> None:
    # 2026-10-25: 03:00 CEST falls back to 02:00 CET; 02:30 happens twice, runs once.
    slots = next_slots("30 2 * * *", BERLIN, datetime(2026, 10, 24, 12, tzinfo=BERLIN), 3)
    assert [s.isoformat() for s in slots] == [
        "2026-10-25T02:30:00+02:00",
        "2026-10-26T02:30:00+01:00",
        "2026-10-27T02:30:00+01:00",
    ]
    # Real elapsed time (in UTC; same-zone subtraction is wall-clock) is 25 h.
    assert slots[1].astimezone(UTC) - slots[0].astimezone(UTC) == timedelta(hours=25)


def test_fall_back_after_first_occurrence_does_not_rerun_the_repeat() -> None:
    first = datetime(2026, 10, 25, 2, 30, tzinfo=BERLIN)  # fold=0: the CEST one
    later = first.astimezone(UTC) + timedelta(minutes=90)  # 02:00 CET, in the repeat
    assert due_slots("30 2 * * *", BERLIN, later, first, catch_up="all") == []
    assert latest_slot("30 2 * * *", BERLIN, later) == first


def test_ds_is_the_slot_date_in_the_schedule_zone() -> None:
    slot = datetime(2026, 1, 2, 2, 0, tzinfo=HCM)
    assert slot_ds(slot, "Asia/Ho_Chi_Minh") == "2026-01-02"
    # Same instant, UTC calendar says Jan 1: the schedule's zone decides.
    assert slot_ds(slot.astimezone(UTC), "Asia/Ho_Chi_Minh") == "2026-01-02"
    assert slot_ds(slot, "UTC") == "2026-01-01"


def test_slot_due_exactly_now_under_every_policy() -> None:
    now = datetime(2026, 1, 2, 2, 0, tzinfo=HCM)
    after = now - timedelta(days=1)
    for policy in ("latest", "all", "none"):
        assert due_slots("0 2 * * *", HCM, now, after, catch_up=policy) == [now]  # type: ignore[arg-type]


def _missed_three() -> tuple[datetime, datetime]:
    last = datetime(2026, 1, 1, 2, 0, tzinfo=HCM)
    now = datetime(2026, 1, 4, 9, 30, tzinfo=HCM)  # slots Jan 2, 3, 4 missed
    return last, now


def test_catch_up_latest_runs_only_the_newest_missed_slot() -> None:
    last, now = _missed_three()
    assert due_slots("0 2 * * *", HCM, now, last) == [datetime(2026, 1, 4, 2, tzinfo=HCM)]


def test_catch_up_all_runs_each_missed_slot_oldest_first() -> None:
    last, now = _missed_three()
    due = due_slots("0 2 * * *", HCM, now, last, catch_up="all")
    assert [slot_ds(s, HCM) for s in due] == ["2026-01-02", "2026-01-03", "2026-01-04"]
    capped = due_slots("0 2 * * *", HCM, now, last, catch_up="all", limit=2)
    assert [slot_ds(s, HCM) for s in capped] == ["2026-01-03", "2026-01-04"]


def test_catch_up_none_runs_only_within_grace() -> None:
    last, now = _missed_three()
    assert due_slots("0 2 * * *", HCM, now, last, catch_up="none") == []
    slot = datetime(2026, 1, 4, 2, 0, tzinfo=HCM)
    late = slot + timedelta(minutes=4)
    assert due_slots("0 2 * * *", HCM, late, last, catch_up="none") == [slot]
    too_late = slot + timedelta(minutes=6)
    assert due_slots("0 2 * * *", HCM, too_late, last, catch_up="none") == []


def test_nothing_due_when_last_slot_is_the_newest() -> None:
    last, now = _missed_three()
    newest = datetime(2026, 1, 4, 2, 0, tzinfo=HCM)
    assert due_slots("0 2 * * *", HCM, now, newest, catch_up="all") == []
    assert due_slots("0 2 * * *", HCM, newest - timedelta(seconds=1), last) == [
        datetime(2026, 1, 3, 2, tzinfo=HCM)
    ]


@pytest.mark.parametrize(
    ("cron", "needle"),
    [
        ("61 * * * *", "out of range"),
        ("* * *", "5 fields"),
        ("0 2 * * * 30", "5 fields"),
        ("every night", "5 fields"),
        ("0 0 31 2 *", "never matches"),
    ],
)
def test_bad_cron_is_a_spec_error(cron: str, needle: str) -> None:
    with pytest.raises(SpecError, match=needle) as info:
        validate_cron(cron)
    assert "\n" not in str(info.value)


def test_cron_is_normalised_and_macros_accepted() -> None:
    assert validate_cron("  0  2 * * * ") == "0 2 * * *"
    assert validate_cron("@daily") == "@daily"


@pytest.mark.parametrize("name", ["Mars/Olympus", "", "../etc/passwd", "Europe/Berln"])
def test_unknown_time_zone_is_a_spec_error(name: str) -> None:
    with pytest.raises(SpecError, match="unknown time zone"):
        parse_zone(name)


def test_parse_now() -> None:
    assert parse_now("2026-01-02T02:00+07:00") == datetime(2026, 1, 2, 2, tzinfo=HCM)
    assert parse_now("2026-01-01T19:00Z") == datetime(2026, 1, 1, 19, tzinfo=UTC)
    with pytest.raises(UserError, match="UTC offset"):
        parse_now("2026-01-02T02:00")
    with pytest.raises(UserError, match="ISO"):
        parse_now("tomorrow")


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        next_slots("0 2 * * *", HCM, datetime(2026, 1, 1), 1)
