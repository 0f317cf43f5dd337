"""Window assignment: UTC hours, and billing periods that start at local midnights (DST-aware).

Billing periods are computed per distinct local date in Python with zoneinfo: there are only as many
dates as days of history, and it keeps DST gaps, anchor-day clamping and ISO weeks exact and readable.
"""

from __future__ import annotations

import calendar
import datetime as dt
import zoneinfo

import polars as pl

from transforms.schema import WINDOW

UTC = dt.UTC


def hour_start(time: pl.Expr) -> pl.Expr:
    return time.dt.truncate("1h").cast(WINDOW)


def local_date(time: pl.Expr, tz: str) -> pl.Expr:
    return time.dt.convert_time_zone(tz).dt.date()


def _clamp(year: int, month: int, day: int) -> dt.date:
    return dt.date(year, month, min(day, calendar.monthrange(year, month)[1]))


def _add_months(year: int, month: int, n: int) -> tuple[int, int]:
    index = year * 12 + (month - 1) + n
    return index // 12, index % 12 + 1


def period_dates(day: dt.date, period: str, anchor_day: int = 1) -> tuple[dt.date, dt.date]:
    """The local [first day, first day of next period) of the billing period holding `day`."""
    if period == "DAY":
        return day, day + dt.timedelta(days=1)
    if period == "WEEK":  # ISO weeks: Monday to Monday
        start = day - dt.timedelta(days=day.weekday())
        return start, start + dt.timedelta(days=7)
    if period != "MONTH":
        raise ValueError(f"unknown billing period {period!r}")
    start = _clamp(day.year, day.month, anchor_day)
    if day < start:
        y, m = _add_months(day.year, day.month, -1)
        start = _clamp(y, m, anchor_day)
    y, m = _add_months(start.year, start.month, 1)
    return start, _clamp(y, m, anchor_day)


def local_midnight(day: dt.date, tz: str) -> dt.datetime:
    """The first instant of a local day, in UTC (a skipped midnight maps to the first real instant)."""
    zone = zoneinfo.ZoneInfo(tz)
    naive = dt.datetime(day.year, day.month, day.day)
    aware = naive.replace(tzinfo=zone)
    # A midnight inside a DST gap does not exist; fold=0 resolves it to the moment after the gap.
    return aware.astimezone(UTC)


def period_table(days: list[dt.date], period: str, tz: str, anchor_day: int = 1) -> pl.DataFrame:
    """Map each local date to its period: local_date, window_start, window_end, period_start (text)."""
    rows = []
    for day in sorted(set(days)):
        first, after = period_dates(day, period, anchor_day)
        rows.append(
            {
                "local_date": day,
                "window_start": local_midnight(first, tz),
                "window_end": local_midnight(after, tz),
                "period_start": first.isoformat(),
            }
        )
    schema = {"local_date": pl.Date, "window_start": WINDOW, "window_end": WINDOW, "period_start": pl.String}
    return pl.DataFrame(rows, schema=schema)


def periods_between(start: dt.date, end: dt.date, period: str, anchor_day: int = 1) -> list[dt.date]:
    """First days of every period overlapping the local dates [start, end)."""
    out: list[dt.date] = []
    day = start
    while day < end:
        first, after = period_dates(day, period, anchor_day)
        out.append(first)
        day = after
    return out
