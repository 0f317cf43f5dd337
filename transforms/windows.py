"""Window assignment: UTC hours, and billing periods that start at local midnights (DST-aware).

Billing periods are computed per distinct local date in Python: there are only as many dates as days of
history, and it keeps DST gaps, anchor-day clamping and ISO weeks exact and readable. Every time-zone rule
comes from Polars (the tz database built into it), for local dates and period bounds alike: Python's
zoneinfo reads the host's database or the `tzdata` package, another version, and where two versions
disagree an event was counted in a period whose window does not hold it.
"""

from __future__ import annotations

import calendar
import datetime as dt
import functools

import polars as pl

from transforms.schema import WINDOW

UTC = dt.UTC


def hour_start(time: pl.Expr) -> pl.Expr:
    return time.dt.truncate("1h").cast(WINDOW)


def local_date(time: pl.Expr, tz: str) -> pl.Expr:
    """The billing-zone date of each instant: the day whose first instant (`local_midnights`) it follows last.

    Not simply the date the local clock shows: a fall-back across midnight (00:01 back to 23:01 of the day before,
    as in Newfoundland, Labrador and New Brunswick 1987-2011) shows the day before again for an hour after the day
    began, and an event there was counted in that day's period but lay after its window's end. Only zones that
    ever did so (`falls_back_across_midnight`) pay for the check: it doubles the cost of the date per event."""
    day = time.dt.convert_time_zone(tz).dt.date()
    if not falls_back_across_midnight(tz):
        return day
    after = day.dt.offset_by("1d")
    midnight = (
        after.cast(pl.Datetime("us"))
        .dt.replace_time_zone(tz, ambiguous="earliest", non_existent="null")
        .dt.convert_time_zone("UTC")
    )
    return pl.when(time.cast(pl.Datetime("us", "UTC")) >= midnight).then(after).otherwise(day)


@functools.cache
def falls_back_across_midnight(tz: str) -> bool:
    """Whether the zone's clock ever went back from a day to the day before (1678-2261, Polars' rules): then both the
    day's midnight and the last second before it occur twice. 21 of the ~600 zone names (Newfoundland, Alaska,
    Arizona and their aliases, Guam, ...); not a fall-back that starts at midnight (Havana, Tokyo 1948-51), whose
    repeated hour keeps its date."""
    days = pl.date_range(dt.date(1678, 1, 2), dt.date(2261, 12, 31), "1d", eager=True).cast(pl.Datetime("us"))

    def twice(naive: pl.Series) -> pl.Series:
        unique = naive.dt.replace_time_zone(tz, ambiguous="null", non_existent="null")
        earliest = naive.dt.replace_time_zone(tz, ambiguous="earliest", non_existent="null")
        return unique.is_null() & earliest.is_not_null()

    return bool((twice(days) & twice(days.dt.offset_by("-1s"))).any())


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


@functools.lru_cache(maxsize=65536)
def local_midnight(day: dt.date, tz: str) -> dt.datetime:
    """The first instant of a local day, in UTC (see `local_midnights`). Cached: one Polars call costs ~0.5 ms, and
    callers look up the same few period bounds for every date they plan (zoneinfo took ~1 µs)."""
    return local_midnights([day], tz)[day]


def local_midnights(days: list[dt.date], tz: str) -> dict[dt.date, dt.datetime]:
    """The first instant of each local day, in UTC: the first instant whose local date (by Polars' rules, as in
    `local_date`) is that day. A midnight that occurs twice is the earlier one; one skipped by a DST jump maps
    to the first instant of the day that exists. One Polars call for all the days; a skipped midnight (a
    few days a year in a few zones) is then searched for on its own."""
    wanted = sorted(set(days))
    naive = pl.Series([dt.datetime(d.year, d.month, d.day) for d in wanted], dtype=pl.Datetime("us"))
    aware = naive.dt.replace_time_zone(tz, ambiguous="earliest", non_existent="null")
    try:
        utc = aware.dt.convert_time_zone("UTC").dt.replace_time_zone(None).to_list()
    except ValueError as exc:  # a day near year 1 or 9999 moved past Python's dates: as datetime.astimezone says it
        raise OverflowError(f"a local midnight in {tz} is outside the years Python's dates hold: {exc}") from None
    return {
        d: (t if t is not None else _first_instant(d, tz)).replace(tzinfo=UTC) for d, t in zip(wanted, utc, strict=True)
    }


def _first_instant(day: dt.date, tz: str) -> dt.datetime:
    """Naive UTC of the first second whose local date is `day` (zone offsets are whole seconds): the minute
    it falls in, then the second."""
    start = dt.datetime(day.year, day.month, day.day) - dt.timedelta(hours=16)  # UTC+14 and a day's gap fit
    for step, span in (("1m", dt.timedelta(hours=48)), ("1s", dt.timedelta(minutes=1))):
        grid = pl.datetime_range(start, start + span, step, time_unit="us", eager=True)
        local = grid.dt.replace_time_zone("UTC").dt.convert_time_zone(tz).dt.date()
        at = (local >= day).arg_true()[0]
        start = grid[at] - dt.timedelta(minutes=1) if step == "1m" else grid[at]
    return start


def period_table(days: list[dt.date], period: str, tz: str, anchor_day: int = 1) -> pl.DataFrame:
    """Map each local date to its period: local_date, window_start, window_end, period_start (text)."""
    bounds = {day: period_dates(day, period, anchor_day) for day in sorted(set(days))}
    midnight = local_midnights([d for pair in bounds.values() for d in pair], tz)
    rows = [
        {
            "local_date": day,
            "window_start": midnight[first],
            "window_end": midnight[after],
            "period_start": first.isoformat(),
        }
        for day, (first, after) in bounds.items()
    ]
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
