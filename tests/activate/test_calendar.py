"""Calendar moments against published dates, and anniversaries."""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from zoneinfo import ZoneInfo

import pytest

from closedloop.activate.calendar import anniversary, moment_day, phase_times
from closedloop.core.definitions.campaigns import CalendarTrigger, Moment

# Published dates of the lunar festivals (State Council holiday notices / almanacs).
KNOWN = [
    (Moment.SPRING_FESTIVAL, 2024, date(2024, 2, 10)),
    (Moment.SPRING_FESTIVAL, 2025, date(2025, 1, 29)),
    (Moment.SPRING_FESTIVAL, 2026, date(2026, 2, 17)),
    (Moment.SPRING_FESTIVAL, 2027, date(2027, 2, 6)),
    (Moment.LANTERN, 2025, date(2025, 2, 12)),
    (Moment.DRAGON_BOAT, 2024, date(2024, 6, 10)),
    (Moment.DRAGON_BOAT, 2025, date(2025, 5, 31)),
    (Moment.DRAGON_BOAT, 2026, date(2026, 6, 19)),
    (Moment.QIXI, 2025, date(2025, 8, 29)),
    (Moment.MID_AUTUMN, 2024, date(2024, 9, 17)),
    (Moment.MID_AUTUMN, 2025, date(2025, 10, 6)),
    (Moment.MID_AUTUMN, 2026, date(2026, 9, 25)),
    (Moment.M618, 2026, date(2026, 6, 18)),
    (Moment.DOUBLE_11, 2026, date(2026, 11, 11)),
    (Moment.DOUBLE_12, 2026, date(2026, 12, 12)),
]


@pytest.mark.parametrize(("moment", "year", "day"), KNOWN)
def test_moments_fall_on_their_published_days(moment: Moment, year: int, day: date) -> None:
    assert moment_day(moment, year) == day


def test_brand_anniversary_and_leap_days() -> None:
    assert moment_day(Moment.BRAND_ANNIVERSARY, 2026, date(2015, 5, 20)) == date(2026, 5, 20)
    assert anniversary(date(2000, 2, 29), 2026) == date(2026, 2, 28)
    assert anniversary(date(2000, 2, 29), 2028) == date(2028, 2, 29)
    with pytest.raises(ValueError, match="founding date"):
        moment_day(Moment.BRAND_ANNIVERSARY, 2026)


def test_phases_start_at_local_hours_in_each_zone() -> None:
    t = CalendarTrigger.model_validate(
        {
            "calendar": "double_11",
            "at": "20:00",
            "phases": [
                {"name": "pre_heat", "offset_days": -11},
                {"name": "deposit", "offset_days": -10},
                {"name": "final_payment", "offset_days": 0},
            ],
        }
    )
    sh = phase_times(t, 2026, ZoneInfo("Asia/Shanghai"))
    assert sh["pre_heat"] == datetime(2026, 10, 31, 12, 0, tzinfo=UTC)
    assert sh["final_payment"].astimezone(ZoneInfo("Asia/Shanghai")).time() == time(20, 0)
    ny = phase_times(t, 2026, ZoneInfo("America/New_York"))
    assert ny["final_payment"] - sh["final_payment"] == datetime(
        2026, 11, 12, 1, tzinfo=UTC
    ) - datetime(2026, 11, 11, 12, tzinfo=UTC)


def test_bad_calendar_triggers_are_refused() -> None:
    with pytest.raises(ValueError, match="brand_anniversary"):
        CalendarTrigger.model_validate({"calendar": "brand_anniversary"})
    with pytest.raises(ValueError, match="time order"):
        CalendarTrigger.model_validate(
            {
                "calendar": 618,
                "phases": [{"name": "b", "offset_days": 0}, {"name": "a", "offset_days": -3}],
            }
        )
    with pytest.raises(ValueError):
        CalendarTrigger.model_validate({"calendar": "black_friday"})
