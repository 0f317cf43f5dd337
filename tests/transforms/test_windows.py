"""Windows (SPEC §3 billing, §4): UTC hours and billing periods at local midnights, DST-aware."""

from __future__ import annotations

import datetime as dt

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from transforms.schema import WINDOW
from transforms.windows import (
    falls_back_across_midnight,
    hour_start,
    local_date,
    local_midnight,
    local_midnights,
    period_dates,
    period_table,
    periods_between,
)

UTC = dt.UTC
D = dt.date


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


@pytest.fixture(params=["streaming", "in-memory"])
def engine(request) -> str:
    return request.param


# --- period_dates ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("day", "expected"),
    [
        (D(2024, 1, 1), (D(2024, 1, 1), D(2024, 2, 1))),
        (D(2024, 1, 31), (D(2024, 1, 1), D(2024, 2, 1))),
        (D(2024, 2, 29), (D(2024, 2, 1), D(2024, 3, 1))),
        (D(2024, 12, 31), (D(2024, 12, 1), D(2025, 1, 1))),
    ],
)
def test_month_anchor_1(day: dt.date, expected: tuple[dt.date, dt.date]) -> None:
    assert period_dates(day, "MONTH", 1) == expected
    assert period_dates(day, "MONTH") == expected  # anchor 1 is the default


@pytest.mark.parametrize(
    ("day", "expected"),
    [
        # Leap year: the period anchored on the 31st starts on Jan 31, Feb 29 (clamped), then Mar 31 again.
        (D(2024, 1, 31), (D(2024, 1, 31), D(2024, 2, 29))),
        (D(2024, 2, 1), (D(2024, 1, 31), D(2024, 2, 29))),
        (D(2024, 2, 28), (D(2024, 1, 31), D(2024, 2, 29))),
        (D(2024, 2, 29), (D(2024, 2, 29), D(2024, 3, 31))),
        (D(2024, 3, 30), (D(2024, 2, 29), D(2024, 3, 31))),
        (D(2024, 3, 31), (D(2024, 3, 31), D(2024, 4, 30))),
        (D(2024, 4, 30), (D(2024, 4, 30), D(2024, 5, 31))),
        # Not a leap year: clamped to the 28th.
        (D(2023, 2, 27), (D(2023, 1, 31), D(2023, 2, 28))),
        (D(2023, 2, 28), (D(2023, 2, 28), D(2023, 3, 31))),
        # Across the year end.
        (D(2024, 1, 30), (D(2023, 12, 31), D(2024, 1, 31))),
        (D(2023, 12, 31), (D(2023, 12, 31), D(2024, 1, 31))),
    ],
)
def test_month_anchor_31_clamps_to_month_length(day: dt.date, expected: tuple[dt.date, dt.date]) -> None:
    assert period_dates(day, "MONTH", 31) == expected


@pytest.mark.parametrize(
    ("day", "expected"),
    [
        (D(2024, 1, 10), (D(2023, 12, 15), D(2024, 1, 15))),
        (D(2024, 1, 15), (D(2024, 1, 15), D(2024, 2, 15))),
        (D(2024, 2, 14), (D(2024, 1, 15), D(2024, 2, 15))),
    ],
)
def test_month_anchor_15(day: dt.date, expected: tuple[dt.date, dt.date]) -> None:
    assert period_dates(day, "MONTH", 15) == expected


@pytest.mark.parametrize(
    ("day", "monday"),
    [
        (D(2024, 3, 4), D(2024, 3, 4)),  # a Monday
        (D(2024, 3, 3), D(2024, 2, 26)),  # a Sunday belongs to the week before
        (D(2024, 3, 6), D(2024, 3, 4)),
        (D(2025, 1, 1), D(2024, 12, 30)),  # ISO week 1 of 2025 starts in 2024
        (D(2024, 2, 29), D(2024, 2, 26)),
    ],
)
def test_week_is_iso_monday_to_monday(day: dt.date, monday: dt.date) -> None:
    assert period_dates(day, "WEEK") == (monday, monday + dt.timedelta(days=7))
    assert monday.isoweekday() == 1


@pytest.mark.parametrize("day", [D(2024, 2, 29), D(2024, 12, 31), D(2024, 3, 31)])
def test_day(day: dt.date) -> None:
    assert period_dates(day, "DAY") == (day, day + dt.timedelta(days=1))


def test_unknown_period() -> None:
    with pytest.raises(ValueError, match="YEAR"):
        period_dates(D(2024, 1, 1), "YEAR")


def test_periods_tile_the_calendar_without_gaps() -> None:
    """Every day falls in exactly one period, and consecutive periods touch (anchor 31 over two years)."""
    day, end = D(2023, 1, 1), D(2025, 1, 1)
    previous = None
    while day < end:
        first, after = period_dates(day, "MONTH", 31)
        assert first <= day < after
        if previous is not None and previous != (first, after):
            assert previous[1] == first
        previous = (first, after)
        day += dt.timedelta(days=1)


def test_periods_between() -> None:
    assert periods_between(D(2024, 1, 15), D(2024, 3, 2), "MONTH", 1) == [D(2024, 1, 1), D(2024, 2, 1), D(2024, 3, 1)]
    assert periods_between(D(2024, 2, 1), D(2024, 4, 1), "MONTH", 31) == [
        D(2024, 1, 31),
        D(2024, 2, 29),
        D(2024, 3, 31),
    ]
    assert periods_between(D(2024, 3, 3), D(2024, 3, 12), "WEEK") == [D(2024, 2, 26), D(2024, 3, 4), D(2024, 3, 11)]
    assert periods_between(D(2024, 3, 1), D(2024, 3, 1), "DAY") == []


# --- local midnights and period_table ------------------------------------------------------------------


def test_period_table_berlin_across_dst() -> None:
    table = period_table([D(2024, 3, 15), D(2024, 2, 29), D(2024, 10, 31), D(2024, 3, 31)], "MONTH", "Europe/Berlin")
    expected = pl.DataFrame(
        {
            "local_date": [D(2024, 2, 29), D(2024, 3, 15), D(2024, 3, 31), D(2024, 10, 31)],
            # 2024-03-01T00:00+01:00 is 2024-02-29T23:00Z; April starts in summer time (+02:00).
            "window_start": [utc(2024, 1, 31, 23), utc(2024, 2, 29, 23), utc(2024, 2, 29, 23), utc(2024, 9, 30, 22)],
            "window_end": [utc(2024, 2, 29, 23), utc(2024, 3, 31, 22), utc(2024, 3, 31, 22), utc(2024, 10, 31, 23)],
            "period_start": ["2024-02-01", "2024-03-01", "2024-03-01", "2024-10-01"],
        },
        schema={"local_date": pl.Date, "window_start": WINDOW, "window_end": WINDOW, "period_start": pl.String},
    )
    assert_frame_equal(table, expected)
    lengths = table.select((pl.col("window_end") - pl.col("window_start")).alias("len"))["len"].to_list()
    assert lengths == [
        dt.timedelta(days=29),
        dt.timedelta(days=31) - dt.timedelta(hours=1),  # the March period loses the DST hour
        dt.timedelta(days=31) - dt.timedelta(hours=1),
        dt.timedelta(days=31) + dt.timedelta(hours=1),  # October gains it back
    ]


def test_period_table_deduplicates_days() -> None:
    table = period_table([D(2024, 5, 2)] * 3 + [D(2024, 5, 1)], "DAY", "UTC")
    assert table["local_date"].to_list() == [D(2024, 5, 1), D(2024, 5, 2)]
    assert table["window_start"].to_list() == [utc(2024, 5, 1), utc(2024, 5, 2)]


def test_period_table_empty() -> None:
    table = period_table([], "MONTH", "UTC")
    assert table.is_empty()
    assert table.schema["window_start"] == WINDOW


def test_week_period_in_berlin_starts_at_local_monday_midnight() -> None:
    row = period_table([D(2024, 3, 31)], "WEEK", "Europe/Berlin").row(0, named=True)
    # Monday 2024-03-25 00:00+01:00 to Monday 2024-04-01 00:00+02:00 (DST began on Sunday the 31st).
    assert (row["window_start"], row["window_end"]) == (utc(2024, 3, 24, 23), utc(2024, 3, 31, 22))


@pytest.mark.parametrize(
    ("day", "tz", "instant"),
    [
        (D(2024, 3, 1), "Asia/Kolkata", utc(2024, 2, 29, 18, 30)),
        (D(2024, 3, 31), "Europe/Berlin", utc(2024, 3, 30, 23)),  # DST starts at 02:00 that day
        (D(2024, 4, 1), "Europe/Berlin", utc(2024, 3, 31, 22)),
        (D(2024, 1, 1), "UTC", utc(2024, 1, 1)),
        (D(2024, 1, 1), "Pacific/Kiritimati", utc(2023, 12, 31, 10)),  # UTC+14
        # Midnight does not exist (clocks jump 00:00 -> 01:00): the day starts at the first real instant.
        (D(2022, 9, 11), "America/Santiago", utc(2022, 9, 11, 4)),
        (D(2024, 3, 10), "America/Havana", utc(2024, 3, 10, 5)),
    ],
)
def test_local_midnight(day: dt.date, tz: str, instant: dt.datetime) -> None:
    assert local_midnight(day, tz) == instant


# --- hour_start and local_date on frames ---------------------------------------------------------------


def times(*texts: str) -> pl.LazyFrame:
    return pl.LazyFrame({"time": list(texts)}).select(
        pl.col("time").str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%#z", time_unit="ns", time_zone="UTC")
    )


def test_hour_start_truncates(engine: str) -> None:
    frame = times(
        "2024-01-31T23:59:59.999999999Z",
        "2024-01-31T23:59:59.999Z",
        "2024-02-01T00:00:00Z",
        "2024-02-29T23:30:00Z",
        "2024-12-31T23:00:00.000000001Z",
    )
    got = frame.select(hour_start(pl.col("time")).alias("h")).collect(engine=engine)
    assert got.schema["h"] == WINDOW
    assert got["h"].to_list() == [
        utc(2024, 1, 31, 23),
        utc(2024, 1, 31, 23),  # never rounded up into February
        utc(2024, 2, 1, 0),
        utc(2024, 2, 29, 23),
        utc(2024, 12, 31, 23),
    ]


def test_local_date(engine: str) -> None:
    frame = times("2024-02-29T23:30:00Z", "2024-02-29T18:29:59Z", "2024-02-29T18:30:00Z")
    got = frame.select(
        local_date(pl.col("time"), "Europe/Berlin").alias("berlin"),
        local_date(pl.col("time"), "Asia/Kolkata").alias("kolkata"),
        local_date(pl.col("time"), "UTC").alias("utc"),
    ).collect(engine=engine)
    assert got.rows() == [
        (D(2024, 3, 1), D(2024, 3, 1), D(2024, 2, 29)),
        (D(2024, 2, 29), D(2024, 2, 29), D(2024, 2, 29)),
        (D(2024, 2, 29), D(2024, 3, 1), D(2024, 2, 29)),
    ]


def assign_periods(frame: pl.LazyFrame, period: str, tz: str, engine: str, anchor_day: int = 1) -> pl.DataFrame:
    """Events to their billing periods, the way the pipeline composes the pieces."""
    with_dates = frame.with_columns(local_date=local_date(pl.col("time"), tz))
    days = with_dates.select("local_date").unique().collect(engine=engine)["local_date"].to_list()
    periods = period_table(days, period, tz, anchor_day).lazy()
    return (
        with_dates.join(periods, on="local_date", how="left")
        .select("time", "window_start", "window_end", "period_start")
        .collect(engine=engine)
        .sort("time")
    )


def test_event_with_negative_offset_lands_in_the_next_utc_month(engine: str) -> None:
    from transforms.parse import parse_jsonl
    from transforms.validate import validate

    raw = (
        b'{"id":"1","source":"s","type":"t","subject":"c","time":"2024-01-31T23:30:00-02:00","data":{}}\n'
        b'{"id":"2","source":"s","type":"t","subject":"c","time":"2024-01-31T23:30:00Z","data":{}}\n'
    )
    valid, _ = validate(parse_jsonl(raw).records)
    got = assign_periods(valid.lazy().select("time"), "MONTH", "UTC", engine)
    assert got.select("window_start", "window_end", "period_start").rows() == [
        (utc(2024, 1, 1), utc(2024, 2, 1), "2024-01-01"),  # 2024-01-31T23:30Z
        (utc(2024, 2, 1), utc(2024, 3, 1), "2024-02-01"),  # 2024-02-01T01:30Z
    ]
    assert got["time"].to_list() == [utc(2024, 1, 31, 23, 30), utc(2024, 2, 1, 1, 30)]


def test_kolkata_period_boundary_at_1830_utc(engine: str) -> None:
    frame = times(
        "2024-02-29T18:29:59.999999999Z",
        "2024-02-29T18:30:00Z",
        "2024-03-31T18:29:59Z",
        "2024-03-31T18:30:00Z",
    )
    got = assign_periods(frame, "MONTH", "Asia/Kolkata", engine)
    assert got.select("window_start", "window_end", "period_start").rows() == [
        (utc(2024, 1, 31, 18, 30), utc(2024, 2, 29, 18, 30), "2024-02-01"),
        (utc(2024, 2, 29, 18, 30), utc(2024, 3, 31, 18, 30), "2024-03-01"),
        (utc(2024, 2, 29, 18, 30), utc(2024, 3, 31, 18, 30), "2024-03-01"),
        (utc(2024, 3, 31, 18, 30), utc(2024, 4, 30, 18, 30), "2024-04-01"),
    ]
    # Every event lies in [window_start, window_end).
    assert got.filter((pl.col("time") < pl.col("window_start")) | (pl.col("time") >= pl.col("window_end"))).is_empty()


def test_berlin_events_around_the_march_boundary(engine: str) -> None:
    frame = times("2024-02-29T22:59:59Z", "2024-02-29T23:00:00Z", "2024-03-31T21:59:59Z", "2024-03-31T22:00:00Z")
    got = assign_periods(frame, "MONTH", "Europe/Berlin", engine)
    assert got["period_start"].to_list() == ["2024-02-01", "2024-03-01", "2024-03-01", "2024-04-01"]
    assert got.filter((pl.col("time") < pl.col("window_start")) | (pl.col("time") >= pl.col("window_end"))).is_empty()


# --- one time-zone database for local dates and period bounds ------------------------------------------
# Local dates come from Polars (chrono-tz, built into Polars); period bounds came from Python's zoneinfo,
# which reads the host's tz database or the `tzdata` package, a different version. Where the two disagree,
# an event was counted in a period whose [window_start, window_end) does not hold it.


def test_period_bounds_do_not_depend_on_pythons_zoneinfo(monkeypatch: pytest.MonkeyPatch, engine: str) -> None:
    import types
    import zoneinfo

    import transforms.windows

    # A host whose tz database says Vancouver stays on UTC-7 all year (as the `tzdata` package 2026f does from
    # November 2026), while Polars' own rules put 2026-11-30 on UTC-8. Only the windows module sees it (Polars
    # itself checks for zoneinfo.ZoneInfo), and it must not matter to it.
    def other_database(key: str) -> dt.tzinfo:
        return dt.timezone(dt.timedelta(hours=-7)) if key == "America/Vancouver" else zoneinfo.ZoneInfo(key)

    fake = types.SimpleNamespace(ZoneInfo=other_database)
    monkeypatch.setattr(transforms.windows, "zoneinfo", fake, raising=False)
    frame = times("2026-12-01T07:30:00Z", "2026-11-30T12:00:00Z")
    got = assign_periods(frame, "MONTH", "America/Vancouver", engine)
    for when, start, end in got.select("time", "window_start", "window_end").rows():
        assert start <= when < end, f"{when} counted in [{start}, {end})"
    # Both in November by Polars' rules (UTC-8 in winter), which ends at Polars' December midnight.
    local = pl.Series([dt.datetime(2026, 12, 1)]).dt.replace_time_zone("America/Vancouver")
    assert got["window_end"].to_list() == local.dt.convert_time_zone("UTC").to_list() * 2


@pytest.mark.parametrize(
    ("tz", "instants"),
    [
        # zones whose older rules differ between tz database builds (links and pre-1970 local mean time)
        ("Africa/Accra", ["1900-01-01T00:10:00Z", "1918-01-01T00:05:00Z", "1936-09-01T00:10:00Z"]),
        ("Africa/Dar_es_Salaam", ["1900-12-31T21:30:00Z", "1930-12-31T21:20:00Z"]),
        ("Europe/Berlin", ["2024-03-30T23:00:00Z", "2024-10-26T22:00:00Z"]),
        ("America/Santiago", ["2022-09-11T03:59:59Z", "2022-09-11T04:00:00Z"]),
        # a fall-back at 00:01 to 23:01 of the day before: midnight occurs twice, and the local date goes back
        # for an hour after the first one (November 1st, a month's first day, in 2009)
        ("America/Goose_Bay", ["2009-11-01T03:00:00Z", "2009-11-01T04:00:00Z"]),
        ("America/Moncton", ["2005-10-30T03:00:00Z", "2005-10-30T04:00:00Z"]),
        ("America/Creston", ["1944-01-01T06:00:00Z"]),
    ],
)
def test_every_event_lies_in_its_period_window(tz: str, instants: list[str], engine: str) -> None:
    around = [
        (dt.datetime.fromisoformat(t) + dt.timedelta(minutes=m)).strftime("%Y-%m-%dT%H:%M:%SZ")
        for t in instants
        for m in range(-40, 41, 5)
    ]
    for period in ("DAY", "MONTH"):
        got = assign_periods(times(*around), period, tz, engine)
        outside = got.filter((pl.col("time") < pl.col("window_start")) | (pl.col("time") >= pl.col("window_end")))
        assert outside.is_empty(), f"{period} {tz}: events outside their window:\n{outside}"


@pytest.mark.parametrize("day, tz", [(dt.date(1, 1, 1), "Asia/Tokyo"), (dt.date(1, 1, 1), "Australia/Sydney")])
def test_a_local_midnight_past_pythons_dates_is_an_overflow(day: dt.date, tz: str) -> None:
    """Callers (query bounds) turn an OverflowError into 'outside the years event times can hold'."""
    with pytest.raises(OverflowError):
        local_midnight(day, tz)


@pytest.mark.parametrize(
    "tz, crosses",
    [
        ("America/St_Johns", True),  # 00:01 back to 23:01, 1987-2011
        ("America/Goose_Bay", True),
        ("US/Alaska", True),  # 1867: the date line moved
        ("Europe/Berlin", False),
        ("America/Havana", False),  # 01:00 back to 00:00: the repeated hour keeps its date
        ("Asia/Tokyo", False),
        ("UTC", False),
    ],
)
def test_the_zones_whose_clock_went_back_across_midnight(tz: str, crosses: bool) -> None:
    assert falls_back_across_midnight(tz) is crosses


@pytest.mark.parametrize(
    "tz", ["Europe/Berlin", "America/Havana", "America/Santiago", "Asia/Tokyo", "Australia/Lord_Howe"]
)
def test_the_clock_date_is_the_billing_date_where_the_clock_never_went_back_across_midnight(tz: str) -> None:
    """The fast path (the date the clock shows) agrees with the first instants of the days, minute by minute for
    three hours around each of the zone's changes of offset from 1900 to 2030."""
    hours = pl.DataFrame(
        {"time": pl.datetime_range(dt.datetime(1900, 1, 1), dt.datetime(2030, 1, 1), "1h", time_zone="UTC", eager=True)}
    )
    local = pl.col("time").dt.convert_time_zone(tz).dt.replace_time_zone(None)
    offset = local - pl.col("time").dt.replace_time_zone(None)
    changes = hours.filter(offset != offset.shift(1))["time"].to_list()[1:]
    assert changes, tz
    minutes = pl.concat(
        pl.datetime_range(c - dt.timedelta(hours=3), c + dt.timedelta(hours=3), "1m", time_zone="UTC", eager=True)
        for c in changes
    )
    frame = pl.DataFrame({"time": minutes}).with_columns(day=local_date(pl.col("time"), tz))
    days = frame["day"].unique().to_list()
    starts = local_midnights(days + [d + dt.timedelta(days=1) for d in days], tz)
    for t, d in frame.iter_rows():
        assert starts[d] <= t < starts[d + dt.timedelta(days=1)], (t, d)
