"""transforms.query: OpenMeter query semantics over an in-memory events frame, expected values by hand."""

from __future__ import annotations

import datetime as dt
import json
import zoneinfo

import polars as pl
import pytest

from meters import parse_meters
from transforms.query import QueryError, make_query, parse_bound, run_query, to_openmeter, utc_dates

METERS = parse_meters(
    """
meters:
  - slug: duration
    eventType: request
    aggregation: SUM
    valueProperty: $.duration_ms
    groupBy: {method: $.method, path: $.path}
  - slug: calls
    eventType: request
    aggregation: COUNT
    groupBy: {method: $.method}
  - slug: traces
    eventType: request
    aggregation: UNIQUE_COUNT
    valueProperty: $.trace_id
  - slug: avg_ms
    eventType: request
    aggregation: AVG
    valueProperty: $.duration_ms
  - slug: latest_ms
    eventType: request
    aggregation: LATEST
    valueProperty: $.duration_ms
  - slug: max_ms
    eventType: request
    aggregation: MAX
    valueProperty: $.duration_ms
"""
)
UTC = dt.UTC
LA = zoneinfo.ZoneInfo("America/Los_Angeles")


def events(rows: list[tuple]) -> pl.DataFrame:
    """rows: (subject, aware datetime, data dict | None[, id])."""
    out = []
    for i, row in enumerate(rows):
        subject, time, data = row[:3]
        out.append(
            {
                "id": row[3] if len(row) > 3 else f"e{i}",
                "source": "app",
                "type": "request",
                "subject": subject,
                "time": time,
                "data": None if data is None else json.dumps(data),
            }
        )
    schema = {
        "id": pl.String,
        "source": pl.String,
        "type": pl.String,
        "subject": pl.String,
        "time": pl.Datetime("ns", "UTC"),
        "data": pl.String,
    }
    return pl.DataFrame(out, schema=schema)


def q(slug: str, start, end, **kw) -> pl.DataFrame:
    meter = METERS.get(slug)
    return run_query(EVENTS if "frame" not in kw else kw.pop("frame"), meter, make_query(meter, start, end, **kw))


# OpenMeter's e2e vector: 5 subjects x T, T+1m, T+1h, T+1d, each "100".
T = dt.datetime(2024, 3, 5, tzinfo=UTC)
OFFSETS = [dt.timedelta(0), dt.timedelta(minutes=1), dt.timedelta(hours=1), dt.timedelta(days=1)]
EVENTS = events(
    [(f"customer-{s}", T + off, {"duration_ms": "100", "method": "GET"}) for s in range(1, 6) for off in OFFSETS]
)
FROM, TO = "2024-03-05T00:00:00Z", "2024-03-07T00:00:00Z"


def test_openmeter_vector_without_window_is_one_row_labelled_with_the_range():
    df = q("duration", FROM, TO)
    assert df["value"].to_list() == [2000.0]
    assert df.columns == ["window_start", "window_end", "value"]  # no subject unless asked
    assert df["window_start"][0] == T and df["window_end"][0] == T + dt.timedelta(days=2)


@pytest.mark.parametrize(
    ("window", "values"),
    [("MINUTE", [500.0] * 4), ("HOUR", [1000.0, 500.0, 500.0]), ("DAY", [1500.0, 500.0])],
)
def test_openmeter_vector_windows(window, values):
    df = q("duration", FROM, TO, window=window)
    assert df["value"].to_list() == values


def test_openmeter_vector_window_bounds():
    minute = q("duration", FROM, TO, window="MINUTE")
    assert minute["window_start"].to_list() == [T + off for off in OFFSETS]
    assert minute["window_end"].to_list() == [T + off + dt.timedelta(minutes=1) for off in OFFSETS]
    month = q("duration", FROM, TO, window="MONTH")
    assert month.rows() == [(T.replace(day=1), dt.datetime(2024, 4, 1, tzinfo=UTC), 2000.0)]


def test_subject_filter_groups_by_subject():
    df = q("duration", FROM, TO, subjects=["customer-1", "customer-2"])
    assert df.select("subject", "value").rows() == [("customer-1", 400.0), ("customer-2", 400.0)]


def test_group_by_only_what_is_asked():
    df = q("duration", FROM, TO, group_by=["method"])
    assert df.columns == ["window_start", "window_end", "method", "value"]
    assert df.select("method", "value").rows() == [("GET", 2000.0)]
    by_both = q("duration", FROM, TO, group_by=["method", "subject"], window="DAY")
    assert by_both.columns == ["window_start", "window_end", "subject", "method", "value"]
    assert by_both.height == 10 and set(by_both["value"]) == {300.0, 100.0}


def test_json_rows_are_shaped_like_openmeter_v1():
    meter = METERS.get("duration")
    query = make_query(meter, FROM, TO, window="DAY", group_by=["path"], subjects=["customer-1"])
    body = to_openmeter(run_query(EVENTS, meter, query), query)
    assert body["from"] == "2024-03-05T00:00:00Z" and body["windowSize"] == "DAY"
    assert body["data"][0] == {
        "value": 300.0,
        "windowStart": "2024-03-05T00:00:00Z",
        "windowEnd": "2024-03-06T00:00:00Z",
        "subject": "customer-1",
        "groupBy": {"path": None},  # missing group value: null
    }
    plain = make_query(meter, FROM, TO)
    plain_body = to_openmeter(run_query(EVENTS, meter, plain), plain)
    assert plain_body["data"][0]["subject"] is None
    assert "windowSize" not in plain_body  # OpenMeter leaves it out without a window


def test_json_times_keep_the_sub_second_part_of_unaligned_bounds():
    meter = METERS.get("calls")
    query = make_query(meter, "2024-03-05T00:00:00.25Z", "2024-03-05T12:00:00.5+01:00")
    body = to_openmeter(run_query(EVENTS, meter, query), query)
    assert (body["from"], body["to"]) == ("2024-03-05T00:00:00.250000Z", "2024-03-05T11:00:00.500000Z")
    assert (body["data"][0]["windowStart"], body["data"][0]["windowEnd"]) == (body["from"], body["to"])


def test_json_value_beyond_float64_is_null_not_infinity():
    # two events of 1.7e308 sum past Float64: the table holds inf, and JSON has no number for it
    meter = METERS.get("duration")
    query = make_query(meter, FROM, TO, group_by=["subject"])
    big = EVENTS.with_columns(
        data=pl.when(pl.col("subject") == "customer-1")
        .then(pl.col("data").str.replace(r'"duration_ms": *"?[0-9.]+"?', '"duration_ms": 1.7e308'))
        .otherwise(pl.col("data"))
    )
    df = run_query(big, meter, query)
    assert df.filter(pl.col("subject") == "customer-1")["value"].to_list() == [float("inf")]
    body = to_openmeter(df, query)
    values = {row["subject"]: row["value"] for row in body["data"]}
    assert values["customer-1"] is None and values["customer-2"] == 400.0
    json.loads(json.dumps(body), parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))


# --- time zones ---------------------------------------------------------------------------------------
def _daily_at_10_local(first: dt.date, days: int) -> pl.DataFrame:
    rows = []
    for i in range(days):
        day = first + dt.timedelta(days=i)
        local = dt.datetime(day.year, day.month, day.day, 10, tzinfo=LA)
        rows.append(("customer-1", local.astimezone(UTC), {"duration_ms": 1}))
    return events(rows)


@pytest.mark.parametrize(
    ("first", "dst_day", "hours"),
    [(dt.date(2025, 3, 6), dt.date(2025, 3, 9), 23), (dt.date(2025, 10, 30), dt.date(2025, 11, 2), 25)],
)
def test_dst_days_in_los_angeles_are_23_or_25_hours(first, dst_day, hours):
    frame = _daily_at_10_local(first, 7)
    end = first + dt.timedelta(days=7)
    df = q("duration", first.isoformat(), end.isoformat(), window="DAY", tz="America/Los_Angeles", frame=frame)
    assert df.height == 7 and df["value"].to_list() == [1.0] * 7
    starts, ends = df["window_start"].to_list(), df["window_end"].to_list()
    assert all((s.hour, s.minute) == (0, 0) for s in starts)  # local midnights
    assert starts[1:] == ends[:-1]  # contiguous
    # (subtract in UTC: Python subtracts two datetimes of one zone by wall clock)
    lengths = {
        s.date(): (e.astimezone(UTC) - s.astimezone(UTC)).total_seconds() / 3600
        for s, e in zip(starts, ends, strict=True)
    }
    assert lengths[dst_day] == hours
    assert all(h == 24 for d, h in lengths.items() if d != dst_day)
    assert str(df.schema["window_start"].time_zone) == "America/Los_Angeles"


def test_hour_windows_in_a_half_hour_zone():
    frame = events([("c", dt.datetime(2024, 1, 1, 0, 10, tzinfo=UTC), {"duration_ms": 5})])
    df = q("duration", "2023-12-31", "2024-01-02", window="HOUR", tz="Asia/Kolkata", frame=frame)
    start = df["window_start"][0]
    assert start.astimezone(UTC) == dt.datetime(2023, 12, 31, 23, 30, tzinfo=UTC)  # 05:00 IST
    assert (start.hour, start.minute) == (5, 0)
    assert df["window_end"][0] - start == dt.timedelta(hours=1)


def test_hour_windows_across_fall_back_are_real_hours():
    # 2025-11-02 01:30 PDT (08:30Z) and 01:30 PST (09:30Z): the same wall clock, two different hours.
    frame = events(
        [
            ("c", dt.datetime(2025, 11, 2, 8, 30, tzinfo=UTC), {"duration_ms": 1}),
            ("c", dt.datetime(2025, 11, 2, 9, 30, tzinfo=UTC), {"duration_ms": 2}),
        ]
    )
    df = q("duration", "2025-11-02", "2025-11-03", window="HOUR", tz="America/Los_Angeles", frame=frame)
    assert df["value"].to_list() == [1.0, 2.0]
    assert [s.astimezone(UTC).hour for s in df["window_start"]] == [8, 9]


@pytest.mark.parametrize(
    ("day", "times", "windows"),
    [
        # Lord Howe falls back half an hour: 02:00 +11:00 (15:00Z) becomes 01:30 +10:30. The local hour 01:00 +11:00
        # is [14:00Z, 15:00Z), the repeated half hour 01:30-02:00 +10:30 is [15:00Z, 15:30Z), 02:00 +10:30 is 15:30Z.
        ("2024-04-06", ("14:45", "15:15", "15:45"), (("14:00", "15:00"), ("15:00", "15:30"), ("15:30", "16:30"))),
        # and springs forward: 02:00 +10:30 (15:30Z) becomes 02:30 +11:00; 03:00 +11:00 is 16:00Z.
        ("2024-10-05", ("15:10", "15:45", "16:10"), (("14:30", "15:30"), ("15:30", "16:00"), ("16:00", "17:00"))),
    ],
)
def test_hour_windows_across_a_half_hour_dst_change_do_not_overlap(day, times, windows):
    """A row's window holds exactly the events it counts: [window_start, window_end) of the rows partition time.
    The local wall-clock hour is cut at the offset change (found by the DuckDB query reference): 02:30 +11:00 was
    put in [02:00 +11:00, 03:00 +11:00) = [15:00Z, 16:00Z), overlapping [01:00 +10:30, 02:00 +10:30), whose
    events it did not count."""
    at = [dt.datetime.fromisoformat(f"{day}T{t}:00+00:00") for t in times]
    frame = events([("c", t, {"duration_ms": i + 1}) for i, t in enumerate(at)])
    df = q("duration", f"{day}T12:00:00Z", f"{day}T18:00:00Z", window="HOUR", tz="Australia/Lord_Howe", frame=frame)
    got = [
        (s.astimezone(UTC).strftime("%H:%M"), e.astimezone(UTC).strftime("%H:%M"))
        for s, e in zip(df["window_start"], df["window_end"], strict=True)
    ]
    assert got == list(windows)
    assert df["value"].to_list() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize(("time", "window"), [("15:40", ("15:30", "16:00")), ("15:20", ("14:30", "15:30"))])
def test_one_event_beside_a_half_hour_dst_change_has_its_window_cut(time, window):
    """One event (a single UTC offset among the events) still has its window cut at a change inside its hour: the
    query's shortcut for ranges without a change looks an hour either side of the events, not at their offsets."""
    frame = events([("c", dt.datetime.fromisoformat(f"2024-10-05T{time}:00+00:00"), {"duration_ms": 1})])
    df = q(
        "duration", "2024-10-05T12:00:00Z", "2024-10-05T18:00:00Z", window="HOUR", tz="Australia/Lord_Howe", frame=frame
    )
    got = [
        (s.astimezone(UTC).strftime("%H:%M"), e.astimezone(UTC).strftime("%H:%M"))
        for s, e in zip(df["window_start"], df["window_end"], strict=True)
    ]
    assert got == [window]


def test_month_windows_follow_the_zone():
    frame = events([("c", dt.datetime(2024, 1, 31, 23, 30, tzinfo=UTC), {"duration_ms": 5})])  # Feb 1 local
    df = q("duration", "2024-01-01", "2024-03-01", window="MONTH", tz="Europe/Berlin", frame=frame)
    assert df["window_start"][0].isoformat() == "2024-02-01T00:00:00+01:00"
    assert df["window_end"][0].isoformat() == "2024-03-01T00:00:00+01:00"


def test_unaligned_range_keeps_full_window_labels_but_only_events_inside():
    # [00:00:30, 01:00:30): T (00:00) is out, T+1m and T+1h in; T+1h's window is labelled [01:00, 02:00).
    df = q("duration", "2024-03-05T00:00:30Z", "2024-03-05T01:00:30Z", window="HOUR")
    assert df["value"].to_list() == [500.0, 500.0]
    assert df["window_start"].to_list() == [T, T + dt.timedelta(hours=1)]
    assert df["window_end"][1] == T + dt.timedelta(hours=2)


def test_range_is_half_open_at_full_precision():
    edge = dt.datetime(2024, 1, 1, 12, tzinfo=UTC)
    frame = events([("c", edge, {"duration_ms": 1}), ("c", edge - dt.timedelta(microseconds=1), {"duration_ms": 2})])
    assert q("duration", "2024-01-01T11:00:00Z", "2024-01-01T12:00:00Z", frame=frame)["value"].to_list() == [2.0]
    assert q("duration", "2024-01-01T12:00:00Z", "2024-01-01T13:00:00Z", frame=frame)["value"].to_list() == [1.0]


# --- exactness ----------------------------------------------------------------------------------------
EXACT = events(
    [
        ("a", dt.datetime(2024, 1, 1, 1, tzinfo=UTC), {"duration_ms": 10, "trace_id": "t1"}),
        ("a", dt.datetime(2024, 1, 1, 2, tzinfo=UTC), {"duration_ms": 20, "trace_id": "t2"}),
        ("a", dt.datetime(2024, 1, 2, 1, tzinfo=UTC), {"duration_ms": 60, "trace_id": "t1"}),
        ("b", dt.datetime(2024, 1, 2, 3, tzinfo=UTC), {"duration_ms": "oops", "trace_id": 1}),
        ("b", dt.datetime(2024, 1, 3, 3, tzinfo=UTC), {"trace_id": "1"}),
    ]
)


def test_unique_count_across_days_is_exact():
    assert q("traces", "2024-01-01", "2024-01-04", frame=EXACT)["value"].to_list() == [3.0]  # t1, t2, 1 ("1" == 1)
    assert q("traces", "2024-01-01", "2024-01-04", window="DAY", frame=EXACT)["value"].to_list() == [2.0, 2.0, 1.0]


def test_avg_across_days_is_the_average_of_events_not_of_days():
    # days: 15 (10, 20) and 60: the average of the three events is 30, of daily averages 37.5
    assert q("avg_ms", "2024-01-01", "2024-01-04", frame=EXACT)["value"].to_list() == [30.0]


def test_latest_and_max():
    assert q("latest_ms", "2024-01-01", "2024-01-04", frame=EXACT)["value"].to_list() == [60.0]
    assert q("max_ms", "2024-01-01", "2024-01-02", frame=EXACT)["value"].to_list() == [20.0]


def test_window_whose_events_are_all_invalid_disappears_for_sum_not_for_count():
    assert q("duration", "2024-01-03", "2024-01-04", window="DAY", frame=EXACT).is_empty()
    assert q("calls", "2024-01-03", "2024-01-04", window="DAY", frame=EXACT)["value"].to_list() == [1.0]


def test_empty_results_follow_openmeter():
    empty_range = ("2030-01-01", "2030-01-02")
    assert q("calls", *empty_range, frame=EXACT)["value"].to_list() == [0.0]
    assert q("traces", *empty_range, frame=EXACT)["value"].to_list() == [0.0]
    for slug in ("duration", "avg_ms", "max_ms", "latest_ms"):
        assert q(slug, *empty_range, frame=EXACT).is_empty()
    assert q("calls", *empty_range, window="DAY", frame=EXACT).is_empty()
    assert q("calls", *empty_range, group_by=["subject"], frame=EXACT).is_empty()


def test_filters_on_group_values():
    frame = events(
        [
            ("a", T, {"duration_ms": 1, "method": "GET"}),
            ("a", T, {"duration_ms": 2, "method": "POST"}),
            ("a", T, {"duration_ms": 4, "method": "PUT"}),
            ("a", T, {"duration_ms": 8}),
        ]
    )
    assert q("duration", FROM, TO, filters={"method": "GET"}, frame=frame)["value"].to_list() == [1.0]
    assert q("duration", FROM, TO, filters={"method": ["GET", "PUT"]}, frame=frame)["value"].to_list() == [5.0]
    grouped = q("duration", FROM, TO, group_by=["method"], frame=frame)
    assert grouped.select("method", "value").rows() == [("GET", 1.0), ("POST", 2.0), ("PUT", 4.0), (None, 8.0)]
    twice = q("duration", FROM, TO, group_by=["method", "subject", "method"], frame=frame)
    assert twice.columns == ["window_start", "window_end", "subject", "method", "value"]
    assert twice.select("method", "value").rows() == grouped.select("method", "value").rows()


# --- parameters ---------------------------------------------------------------------------------------
def test_bounds():
    assert parse_bound("2024-01-01", "Europe/Berlin") == dt.datetime(2023, 12, 31, 23, tzinfo=UTC)
    assert parse_bound("2024-01-01T01:00:00+01:00") == dt.datetime(2024, 1, 1, tzinfo=UTC)
    assert parse_bound("2024-01-01t00:00:00.1234567z") == dt.datetime(2024, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)
    assert parse_bound(dt.date(2024, 1, 1), "UTC") == dt.datetime(2024, 1, 1, tzinfo=UTC)
    # a date object is local midnight in the query zone, as the same date written as text is
    assert parse_bound(dt.date(2024, 1, 1), "Europe/Berlin") == dt.datetime(2023, 12, 31, 23, tzinfo=UTC)
    assert utc_dates(make_query(METERS.get("calls"), "2024-01-01T23:00:00Z", "2024-01-03")) == [
        "2024-01-01",
        "2024-01-02",
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start": "2024-01-02", "end": "2024-01-01"}, "from must be before to"),
        ({"start": "2024-01-01", "end": "2024-01-01T00:00:00Z"}, "from and to cannot be equal"),
        ({"start": "yesterday"}, "not RFC 3339"),
        ({"start": "2024-01-01T00:00:00"}, "not RFC 3339 with an offset"),
        ({"start": "2024-02-30"}, "not a valid date"),
        ({"tz": "Mars/Olympus"}, "invalid time zone"),
        ({"tz": "localtime"}, "invalid time zone"),
        ({"tz": "Factory"}, "invalid time zone"),
        ({"tz": "right/UTC"}, "invalid time zone"),
        ({"tz": "posix/Europe/Berlin"}, "invalid time zone"),
        ({"window": "WEEK"}, "invalid window size"),
        ({"group_by": ["model"]}, "invalid group by: 'model'"),
        ({"filters": {"model": "x"}}, "invalid group by filter: 'model'"),
        ({"filters": {"subject": "x"}}, "--subject"),
        ({"subjects": ["customer-1", ""]}, "a subject cannot be empty"),
    ],
)
def test_bad_parameters_raise_one_clear_line(kwargs, message):
    args = {"start": "2024-01-01", "end": "2024-01-02", **kwargs}
    with pytest.raises(QueryError, match=message) as info:
        make_query(METERS.get("duration"), args.pop("start"), args.pop("end"), **args)
    assert "\n" not in str(info.value)


def test_event_from_floors_the_query_range() -> None:
    """OpenMeter: the effective lower bound is max(from, the meter's eventFrom) (research §5.1)."""
    meter = parse_meters(
        "meters:\n  - {slug: calls, eventType: request, aggregation: COUNT, eventFrom: '2024-01-02T00:00:00Z'}\n"
    ).meters[0]
    df = events(
        [
            ("c1", dt.datetime(2024, 1, 1, 12, tzinfo=UTC), {}),
            ("c1", dt.datetime(2024, 1, 2, 0, tzinfo=UTC), {}),
            ("c1", dt.datetime(2024, 1, 2, 12, tzinfo=UTC), {}),
        ]
    )
    whole = run_query(df, meter, make_query(meter, "2024-01-01", "2024-01-03", window="DAY"))
    assert whole["value"].to_list() == [2.0]
    before = run_query(df, meter, make_query(meter, "2024-01-01", "2024-01-02"))
    assert before["value"].to_list() == [0.0]  # an unwindowed, ungrouped COUNT: one row of 0


def test_an_hour_window_is_cut_at_a_change_in_its_last_half_hour_past_the_sampled_range():
    """America/Chihuahua left its LMT (-07:04:20) for -07:00 at 1922-01-01T07:00:00Z, 23:55:40 on the old wall
    clock: the hour of an event at 06:10Z is [06:04:20Z, 07:04:20Z) before the cut, 07:00Z after it. The shortcut
    sampled every 30 min from an hour before the first event (05:41Z) and its last sample (06:41Z) came before the
    change it had to see, so the window was not cut and overlapped the next hour's [07:00Z, 08:00Z)."""
    at = [dt.datetime(1922, 1, 1, 5, 41, tzinfo=UTC), dt.datetime(1922, 1, 1, 6, 10, tzinfo=UTC)]
    frame = events([("c", t, {"duration_ms": i + 1}) for i, t in enumerate(at)])
    df = q(
        "duration", "1922-01-01T04:00:00Z", "1922-01-01T09:00:00Z", window="HOUR", tz="America/Chihuahua", frame=frame
    )
    assert [e.astimezone(UTC).time().isoformat() for e in df["window_end"]] == ["06:04:20", "07:00:00"]
