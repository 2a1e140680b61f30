"""Calendar moments: the day of each shopping or lunar festival in a given year.

Shopping festivals are fixed Gregorian days (618 = 18 June, Double 11 = 11 November, Double 12
= 12 December). Lunar festivals move every year: Spring Festival (1st of the 1st lunar month),
Lantern (15/1), Dragon Boat (5/5), Qixi (7/7), Mid-Autumn (15/8). They come from ``lunardate``,
a pure-Python table of the Chinese calendar for 1900–2099 that works offline (tests check it
against published dates). The brand anniversary is the founding date's anniversary (29 February
falls on 28 February in other years).
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from lunardate import LunarDate

from closedloop.core.definitions.campaigns import CalendarTrigger, Moment

FIXED = {Moment.M618: (6, 18), Moment.DOUBLE_11: (11, 11), Moment.DOUBLE_12: (12, 12)}
LUNAR = {
    Moment.SPRING_FESTIVAL: (1, 1),
    Moment.LANTERN: (1, 15),
    Moment.DRAGON_BOAT: (5, 5),
    Moment.QIXI: (7, 7),
    Moment.MID_AUTUMN: (8, 15),
}


def anniversary(d: date, year: int) -> date:
    """``d``'s anniversary in ``year`` (29 February → 28 February in a common year)."""
    try:
        return d.replace(year=year)
    except ValueError:
        return date(year, 2, 28)


def moment_day(moment: Moment, year: int, founded: date | None = None) -> date:
    """The Gregorian day of ``moment`` in ``year``."""
    if moment in FIXED:
        month, day = FIXED[moment]
        return date(year, month, day)
    if moment in LUNAR:
        month, day = LUNAR[moment]
        solar: date = LunarDate(year, month, day).to_solar_date()
        return solar
    if founded is None:
        raise ValueError("brand_anniversary needs the founding date")
    return anniversary(founded, year)


def local_fire(day: date, at: time, tz: ZoneInfo) -> datetime:
    """``at`` o'clock on ``day`` in zone ``tz``, as an aware datetime (compare in any zone)."""
    return datetime.combine(day, at, tzinfo=tz)


def phase_times(trigger: CalendarTrigger, year: int, tz: ZoneInfo) -> dict[str, datetime]:
    """When each phase of ``year``'s occasion starts, in zone ``tz``."""
    day = moment_day(trigger.calendar, year, trigger.date)
    return {
        p.name: local_fire(day + timedelta(days=p.offset_days), trigger.at, tz)
        for p in trigger.phases
    }
