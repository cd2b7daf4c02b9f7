"""Time windows in a named time zone, with an injected clock (aware datetimes)."""

from __future__ import annotations

from datetime import UTC, datetime, time
from zoneinfo import ZoneInfo

import pytest

from gateway_guard.dispatch.windows import Schedule, Window

BERLIN = ZoneInfo("Europe/Berlin")
DAY = Window(name="day", start=time(8), end=time(20), target=1)
NIGHT = Window(name="night", start=time(20), end=time(8), target=6)


def at(hh: int, mm: int = 0, *, tz: ZoneInfo = BERLIN, day: int = 23) -> datetime:
    return datetime(2026, 11, day, hh, mm, tzinfo=tz)


@pytest.mark.parametrize(
    ("moment", "label", "target"),
    [
        (at(8), "day", 1),
        (at(12, 30), "day", 1),
        (at(19, 59), "day", 1),
        (at(20), "night", 6),  # a window's end is exclusive, the next one's start inclusive
        (at(23, 59), "night", 6),
        (at(0), "night", 6),  # crosses midnight
        (at(7, 59), "night", 6),
    ],
)
def test_day_and_night_windows(moment: datetime, label: str, target: int) -> None:
    t = Schedule(default_target=3, timezone=BERLIN, windows=(DAY, NIGHT)).target_at(moment)
    assert (t.label, t.value) == (label, target)


def test_clock_in_another_zone_is_converted_to_the_schedule_zone() -> None:
    schedule = Schedule(default_target=3, timezone=BERLIN, windows=(DAY, NIGHT))
    assert schedule.target_at(datetime(2026, 11, 23, 7, 30, tzinfo=UTC)).label == "day"  # 08:30 Berlin (CET)
    assert schedule.target_at(datetime(2026, 7, 1, 18, 30, tzinfo=UTC)).label == "night"  # 20:30 Berlin (CEST)
    assert schedule.target_at(datetime(2026, 7, 1, 17, 30, tzinfo=UTC)).label == "day"


def test_outside_every_window_the_default_target_applies() -> None:
    schedule = Schedule(default_target=2, timezone=BERLIN, windows=(DAY,))
    t = schedule.target_at(at(21))
    assert (t.label, t.value, t.window) == ("default", 2, None)


def test_first_matching_window_wins_and_equal_start_end_means_all_day() -> None:
    always = Window(name="always", start=time(0), end=time(0), target=4)
    assert Schedule(default_target=0, windows=(always, DAY)).target_at(at(12, tz=ZoneInfo("UTC"))).value == 4
    assert Schedule(default_target=0, windows=(DAY, always)).target_at(at(12, tz=ZoneInfo("UTC"))).value == 1


def test_a_naive_clock_is_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        Schedule(default_target=1).target_at(datetime(2026, 11, 23, 12))


def test_fixed_target_drops_the_windows_but_keeps_the_zone() -> None:
    fixed = Schedule(default_target=3, timezone=BERLIN, windows=(DAY, NIGHT)).with_default(5)
    assert (fixed.target_at(at(12)).value, fixed.timezone) == (5, BERLIN)
