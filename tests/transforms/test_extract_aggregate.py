"""Per-meter extraction, the seven aggregations, group-by values (SPEC §3-4), and deduplication (SPEC §2)."""

from __future__ import annotations

import datetime as dt
import json
import random

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from meters import Meter, parse_meters
from transforms.aggregate import (
    aggregate,
    combine_partials,
    output_columns,
    pack_partials,
    partial_aggregate,
    unpack_partials,
)
from transforms.dedupe import dedupe
from transforms.extract import extract
from transforms.parse import parse_jsonl
from transforms.schema import WINDOW
from transforms.validate import validate
from transforms.windows import hour_start

ABSENT = object()
T0 = "2024-01-01T10:00:00Z"
H10 = dt.datetime(2024, 1, 1, 10, tzinfo=dt.UTC)
H11 = dt.datetime(2024, 1, 1, 11, tzinfo=dt.UTC)


@pytest.fixture(params=["streaming", "in-memory"])
def engine(request) -> str:
    return request.param


def events(*specs: dict) -> pl.LazyFrame:
    """Valid events as the pipeline sees them: JSONL text through parse and validate."""
    lines = []
    for i, spec in enumerate(specs):
        rec = {"specversion": "1.0", "id": f"e{i}", "source": "src", "type": "t", "subject": "c1", "time": T0}
        rec.update(spec)
        lines.append(json.dumps({k: v for k, v in rec.items() if v is not ABSENT}))
    valid, rejected = validate(parse_jsonl("\n".join(lines).encode()).records)
    assert rejected.is_empty(), rejected
    return valid.lazy()


def with_value(value) -> dict:
    """An event whose data is {"v": value}, or {} when the value is ABSENT."""
    return {"data": {} if value is ABSENT else {"v": value}}


def make_meter(aggregation: str, value: str | None = "$.v", group_by: dict | None = None, slug: str = "m") -> Meter:
    body = {"slug": slug, "eventType": "t", "aggregation": aggregation}
    if value is not None:
        body["valueProperty"] = value
    if group_by:
        body["groupBy"] = group_by
    return parse_meters(json.dumps({"meters": [body]})).meters[0]  # JSON is YAML


def hourly(frame: pl.LazyFrame, meter: Meter, engine: str) -> pl.DataFrame:
    extracted = extract(frame.filter(pl.col("type") == meter.event_type), meter)
    windowed = extracted.with_columns(window_start=hour_start(pl.col("time"))).with_columns(
        window_end=pl.col("window_start").dt.offset_by("1h")
    )
    return aggregate(windowed, meter).collect(engine=engine)


def table(meter: Meter, rows: list[tuple]) -> pl.DataFrame:
    """The expected output table, from (subject, *groups, window_start, value, event_count) tuples."""
    keys = list(meter.group_paths)
    schema = {"subject": pl.String, **dict.fromkeys(keys, pl.String), "window_start": WINDOW, "value": pl.Float64}
    schema["event_count"] = pl.Int64
    df = pl.DataFrame(rows, schema=schema, orient="row")
    return df.with_columns(window_end=pl.col("window_start").dt.offset_by("1h")).select(output_columns(meter))


# --- value extraction ---------------------------------------------------------------------------------


def test_sum_skips_missing_and_bad_values(engine: str) -> None:
    values = [100, "100", None, ABSENT, "NaN", "Inf", "abc"]
    frame = events(*(with_value(v) for v in values))
    meter = make_meter("SUM")
    extracted = extract(frame, meter).select("id", "value", "excluded").collect(engine=engine).sort("id")
    assert extracted.rows() == [
        ("e0", 100.0, None),
        ("e1", 100.0, None),
        ("e2", None, "missing_value"),
        ("e3", None, "missing_value"),
        ("e4", None, "bad_value"),
        ("e5", None, "bad_value"),
        ("e6", None, "bad_value"),
    ]
    assert_frame_equal(hourly(frame, meter, engine), table(meter, [("c1", H10, 200.0, 2)]))


@pytest.mark.parametrize(
    ("value", "number"),
    [
        (12.5, 12.5),
        ("12.5", 12.5),
        ("1e3", 1000.0),
        ("1E-2", 0.01),
        ("-.5", -0.5),
        ("+7", 7.0),
        ("5.", 5.0),
        (-3, -3.0),
        (0, 0.0),
        ("0", 0.0),
    ],
)
def test_numeric_values(value, number: float, engine: str) -> None:
    got = extract(events(with_value(value)), make_meter("SUM")).select("value", "excluded").collect(engine=engine)
    assert got.row(0) == (number, None)


@pytest.mark.parametrize(
    "value",
    [
        "",
        " 5",
        "5 ",
        "0x10",
        "1_000",
        "1,5",
        "Infinity",
        "-inf",
        "nan",
        "12abc",
        "١٢",
        True,
        False,
        {"a": 1},
        [1],
        "1e999",
    ],
)
def test_bad_values(value, engine: str) -> None:
    got = extract(events(with_value(value)), make_meter("SUM")).select("value", "excluded").collect(engine=engine)
    assert got.row(0) == (None, "bad_value")


@pytest.mark.parametrize(
    "data", [None, ABSENT, {}, {"other": 1}, {"v": None}], ids=["null", "absent", "empty", "other", "v_null"]
)
def test_missing_values(data, engine: str) -> None:
    got = extract(events({"data": data}), make_meter("MAX")).select("value", "excluded").collect(engine=engine)
    assert got.row(0) == (None, "missing_value")


def test_count_counts_events_whatever_their_data(engine: str) -> None:
    frame = events({"data": {}}, {"data": None}, {"data": ABSENT}, {"data": {"v": "abc"}}, {"data": {"v": 1}})
    meter = make_meter("COUNT", value=None)
    extracted = extract(frame, meter).collect(engine=engine)
    assert extracted["excluded"].null_count() == 5
    assert_frame_equal(hourly(frame, meter, engine), table(meter, [("c1", H10, 5.0, 5)]))


def test_avg_divides_by_valid_values_only(engine: str) -> None:
    frame = events(*(with_value(v) for v in [10, "20", "x", None, ABSENT, 30.5]))
    meter = make_meter("AVG")
    # (10 + 20 + 30.5) / 3, not / 6
    assert_frame_equal(hourly(frame, meter, engine), table(meter, [("c1", H10, 60.5 / 3, 3)]))


@pytest.mark.parametrize(("aggregation", "expected"), [("MIN", -3.0), ("MAX", 7.25)])
def test_min_max(engine: str, aggregation: str, expected: float) -> None:
    frame = events(*(with_value(v) for v in [5, "-3", "7.25", "abc", None, "-1e9x"]))
    meter = make_meter(aggregation)
    assert_frame_equal(hourly(frame, meter, engine), table(meter, [("c1", H10, expected, 3)]))


def test_unique_count_compares_as_text_and_ignores_missing(engine: str) -> None:
    values = [123, "123", "abc", "abc", None, ABSENT, 124, True, "true", ""]
    frame = events(*(with_value(v) for v in values))
    meter = make_meter("UNIQUE_COUNT")
    extracted = extract(frame, meter).select("id", "excluded").collect(engine=engine).sort("id")
    assert extracted.filter(pl.col("excluded").is_not_null())["id"].to_list() == ["e4", "e5"]
    # Distinct texts: "123", "abc", "124", "true", "" -> 5 values from 8 contributing events.
    assert_frame_equal(hourly(frame, meter, engine), table(meter, [("c1", H10, 5.0, 8)]))


def test_latest_takes_greatest_time_then_id_then_source(engine: str) -> None:
    frame = events(
        # subject a: the latest time wins, the order of arrival does not matter
        {"subject": "a", "time": "2024-01-01T10:30:00Z", "data": {"v": 3}},
        {"subject": "a", "time": "2024-01-01T10:10:00Z", "data": {"v": 1}},
        {"subject": "a", "time": "2024-01-01T10:20:00.000000001Z", "data": {"v": 2}},
        {"subject": "a", "time": "2024-01-01T10:20:00Z", "data": {"v": 9}},
        # subjects b1, b2: same time, the greatest id wins ("id-b" > "id-a"), whichever landed first
        {"subject": "b1", "id": "id-b", "time": "2024-01-01T10:40:00Z", "data": {"v": 20}},
        {"subject": "b1", "id": "id-a", "time": "2024-01-01T10:40:00Z", "data": {"v": 10}},
        {"subject": "b2", "id": "id-a", "time": "2024-01-01T10:40:00Z", "data": {"v": 10}},
        {"subject": "b2", "id": "id-b", "time": "2024-01-01T10:40:00Z", "data": {"v": 20}},
        # subjects c1, c2: same time and id, the greatest source wins, whichever landed first
        {"subject": "c1", "id": "same", "source": "src-z", "time": "2024-01-01T10:40:00Z", "data": {"v": 200}},
        {"subject": "c1", "id": "same", "source": "src-a", "time": "2024-01-01T10:40:00Z", "data": {"v": 100}},
        {"subject": "c2", "id": "same", "source": "src-a", "time": "2024-01-01T10:40:00Z", "data": {"v": 100}},
        {"subject": "c2", "id": "same", "source": "src-z", "time": "2024-01-01T10:40:00Z", "data": {"v": 200}},
        # subjects e1, e2: id decides before source
        {"subject": "e1", "id": "id-b", "source": "src-a", "time": "2024-01-01T10:40:00Z", "data": {"v": 1}},
        {"subject": "e1", "id": "id-a", "source": "src-z", "time": "2024-01-01T10:40:00Z", "data": {"v": 2}},
        {"subject": "e2", "id": "id-a", "source": "src-z", "time": "2024-01-01T10:40:00Z", "data": {"v": 2}},
        {"subject": "e2", "id": "id-b", "source": "src-a", "time": "2024-01-01T10:40:00Z", "data": {"v": 1}},
        # subject d: the latest event has a bad value and is skipped; so is a missing one
        {"subject": "d", "time": "2024-01-01T10:05:00Z", "data": {"v": "4.5"}},
        {"subject": "d", "time": "2024-01-01T10:50:00Z", "data": {"v": "n/a"}},
        {"subject": "d", "time": "2024-01-01T10:55:00Z", "data": {}},
    )
    meter = make_meter("LATEST")
    expected = table(
        meter,
        [
            ("a", H10, 3.0, 4),
            ("b1", H10, 20.0, 2),
            ("b2", H10, 20.0, 2),
            ("c1", H10, 200.0, 2),
            ("c2", H10, 200.0, 2),
            ("d", H10, 4.5, 1),
            ("e1", H10, 1.0, 2),
            ("e2", H10, 1.0, 2),
        ],
    )
    assert_frame_equal(hourly(frame, meter, engine), expected, check_row_order=False)


# --- partial states combine exactly, however the events are split ------------------------------------
AGGREGATIONS = ["SUM", "COUNT", "AVG", "MIN", "MAX", "LATEST", "UNIQUE_COUNT"]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_partials_of_any_split_combine_to_the_aggregate_at_once(aggregation: str, seed: int) -> None:
    """A run splits a period by UTC date, so across parts LATEST never meets a tie on time and a later part's
    times are all later; the partial states must still combine exactly when parts overlap in time: each part
    keeps its winner's own time, id and source, and the combine breaks ties on them."""
    rng = random.Random(seed)
    n = 120
    times = [dt.datetime(2024, 1, 1, 10, m, tzinfo=dt.UTC) for m in (0, 20, 40)]
    frame = pl.DataFrame(
        {
            "subject": [rng.choice(["c1", "c2", "c3", "c4"]) for _ in range(n)],
            "time": [rng.choice(times) for _ in range(n)],
            "id": [f"e{i // 2}" for i in range(n)],  # each id twice, from two sources: ties reach the source
            "source": ["rs"[i % 2] for i in range(n)],
            "value": [float(rng.randrange(10)) for _ in range(n)],
            "chunk": [rng.randrange(3) for _ in range(n)],  # parts that overlap in time
        }
    ).sample(fraction=1.0, shuffle=True, seed=seed)
    meter = make_meter(aggregation, None if aggregation == "COUNT" else "$.v")
    if aggregation == "UNIQUE_COUNT":
        frame = frame.with_columns(pl.col("value").cast(pl.Int64).cast(pl.String))
    rows = frame.lazy().with_columns(
        pl.col("time").cast(pl.Datetime("ns", "UTC")),
        window_start=pl.lit(H10, WINDOW),
        window_end=pl.lit(H11, WINDOW),
        excluded=pl.lit(None, pl.String),
    )
    at_once = aggregate(rows, meter).collect()
    partials = partial_aggregate(rows, meter, ("chunk",)).collect()
    assert partials.height == 12  # three parts of each of four subjects: every group combines several states
    stored = pack_partials(partials, meter)  # through the stored form, as a run keeps them
    combined = combine_partials(unpack_partials(stored.lazy(), meter), meter).collect()
    assert at_once.height == 4
    assert_frame_equal(combined, at_once, check_row_order=False)


def test_group_with_only_excluded_values_has_no_row(engine: str) -> None:
    frame = events({"subject": "a", "data": {"v": 1}}, {"subject": "b", "data": {"v": "bad"}}, {"subject": "c"})
    meter = make_meter("SUM")
    assert_frame_equal(hourly(frame, meter, engine), table(meter, [("a", H10, 1.0, 1)]))


def test_subjects_and_hours_are_separate_windows(engine: str) -> None:
    frame = events(
        {"subject": "a", "time": "2024-01-01T10:00:00Z", "data": {"v": 1}},
        {"subject": "a", "time": "2024-01-01T10:59:59.999999999Z", "data": {"v": 2}},
        {"subject": "a", "time": "2024-01-01T11:00:00Z", "data": {"v": 4}},
        {"subject": "b", "time": "2024-01-01T10:15:00+00:00", "data": {"v": 8}},
        {"subject": "b", "time": "2024-01-01T12:15:00+01:00", "data": {"v": 16}},  # 11:15Z
    )
    meter = make_meter("SUM")
    expected = table(meter, [("a", H10, 3.0, 2), ("a", H11, 4.0, 1), ("b", H10, 8.0, 1), ("b", H11, 16.0, 1)])
    assert_frame_equal(hourly(frame, meter, engine), expected, check_row_order=False)


def test_other_event_types_do_not_move_the_meter(engine: str) -> None:
    frame = events({"type": "t", "data": {"v": 1}}, {"type": "other", "data": {"v": 100}})
    meter = make_meter("SUM")
    assert_frame_equal(hourly(frame, meter, engine), table(meter, [("c1", H10, 1.0, 1)]))


def test_output_schema(engine: str) -> None:
    meter = make_meter("SUM", group_by={"zeta": "$.z", "alpha": "$.a"})
    got = hourly(events({"data": {"v": 1, "z": "x", "a": "y"}}), meter, engine)
    assert got.schema == pl.Schema(
        {
            "subject": pl.String,
            "zeta": pl.String,  # groupBy keys in definition order, not sorted
            "alpha": pl.String,
            "window_start": WINDOW,
            "window_end": WINDOW,
            "value": pl.Float64,
            "event_count": pl.Int64,
        }
    )


# --- group-by values ---------------------------------------------------------------------------------


def test_group_by_values(engine: str) -> None:
    frame = events(
        {"data": {}},  # missing -> null
        {"data": {"g": None}},  # null -> null (the same group as missing)
        {"data": {"g": 5}},
        {"data": {"g": 2.5}},
        {"data": {"g": "5"}},  # the string "5" and the number 5 are the same text
        {"data": {"g": True}},
        {"data": {"g": False}},
        {"data": {"g": "plain"}},
        {"data": {"g": ""}},  # an empty string stays a string, it is not null
        {"data": {"g": 'quote " and é'}},
        {"data": {"g": {"b": [1, 2], "a": {"c": None}}}},
        {"data": {"g": [1, "x", None]}},
        {"data": None},  # no data at all -> null
    )
    meter = make_meter("COUNT", value=None, group_by={"g": "$.g"})
    expected = table(
        meter,
        [
            ("c1", None, H10, 3.0, 3),
            ("c1", "5", H10, 2.0, 2),
            ("c1", "2.5", H10, 1.0, 1),
            ("c1", "true", H10, 1.0, 1),
            ("c1", "false", H10, 1.0, 1),
            ("c1", "plain", H10, 1.0, 1),
            ("c1", "", H10, 1.0, 1),
            ("c1", 'quote " and é', H10, 1.0, 1),
            ("c1", '{"b":[1,2],"a":{"c":null}}', H10, 1.0, 1),
            ("c1", '[1,"x",null]', H10, 1.0, 1),
        ],
    )
    assert_frame_equal(hourly(frame, meter, engine), expected, check_row_order=False)


def test_group_by_paths_with_brackets_and_indexes(engine: str) -> None:
    frame = events(
        {"data": {"weird key": "w1", "items": [{"qty": 2}, {"qty": 100}], "usage": {"in": 1}}},
        {"data": {"weird key": "w1", "items": [{"qty": "3"}], "usage": {"in": 1}}},
        {"data": {"weird key": "w2", "items": [], "usage": {"in": 2}}},
    )
    meter = make_meter("SUM", value="$.items[0].qty", group_by={"w": "$['weird key']", "u": "$.usage.in"})
    expected = table(meter, [("c1", "w1", "1", H10, 5.0, 2)])
    assert_frame_equal(hourly(frame, meter, engine), expected)
    excluded = extract(frame, meter).collect(engine=engine)["excluded"].to_list()
    assert excluded == [None, None, "missing_value"]


def test_group_by_multiple_keys_and_subjects(engine: str) -> None:
    frame = events(
        {"subject": "a", "data": {"tokens": 10, "model": "gpt4", "type": "input"}},
        {"subject": "a", "data": {"tokens": "5", "model": "gpt4", "type": "input"}},
        {"subject": "a", "data": {"tokens": 7, "model": "gpt4", "type": "output"}},
        {"subject": "a", "data": {"tokens": 1, "model": None, "type": "output"}},
        {"subject": "b", "data": {"tokens": 100, "model": "gpt4", "type": "input"}},
    )
    meter = make_meter("SUM", value="$.tokens", group_by={"model": "$.model", "type": "$.type"})
    expected = table(
        meter,
        [
            ("a", "gpt4", "input", H10, 15.0, 2),
            ("a", "gpt4", "output", H10, 7.0, 1),
            ("a", None, "output", H10, 1.0, 1),
            ("b", "gpt4", "input", H10, 100.0, 1),
        ],
    )
    assert_frame_equal(hourly(frame, meter, engine), expected, check_row_order=False)


# --- several meters on one event type ----------------------------------------------------------------


def test_event_excluded_for_one_meter_still_counts_for_the_others(engine: str) -> None:
    meter_set = parse_meters(
        """
meters:
  - slug: requests
    eventType: t
    aggregation: COUNT
  - slug: duration
    eventType: t
    aggregation: SUM
    valueProperty: $.duration
  - slug: ingress
    eventType: t
    aggregation: SUM
    valueProperty: $.bytes
"""
    )
    frame = events(
        {"data": {"duration": 1.5, "bytes": "x"}},  # bad for ingress only
        {"data": {"duration": "2", "bytes": 100}},
        {"data": {"bytes": 50}},  # missing for duration only
        {"data": None},  # missing for both, still a request
    )
    requests, duration, ingress = meter_set.meters
    assert_frame_equal(hourly(frame, requests, engine), table(requests, [("c1", H10, 4.0, 4)]))
    assert_frame_equal(hourly(frame, duration, engine), table(duration, [("c1", H10, 3.5, 2)]))
    assert_frame_equal(hourly(frame, ingress, engine), table(ingress, [("c1", H10, 150.0, 2)]))
    excluded = {m.slug: extract(frame, m).collect(engine=engine)["excluded"].to_list() for m in meter_set.meters}
    assert excluded == {
        "requests": [None, None, None, None],
        "duration": [None, None, "missing_value", "missing_value"],
        "ingress": ["bad_value", None, None, "missing_value"],
    }


# --- deduplication -------------------------------------------------------------------------------------


def landed(*rows: tuple[str, str, str, str]) -> pl.DataFrame:
    """(date, source, id, payload) rows in landing order."""
    return pl.DataFrame(
        rows, schema={"date": pl.String, "source": pl.String, "id": pl.String, "payload": pl.String}, orient="row"
    )


def test_dedupe_same_date_keeps_the_first_landed_copy() -> None:
    new = landed(
        ("2024-01-01", "s", "1", "first"),
        ("2024-01-01", "s", "2", "other"),
        ("2024-01-01", "s", "1", "second"),
        ("2024-01-01", "s", "1", "third"),
    )
    kept, dups = dedupe(new)
    assert kept["payload"].to_list() == ["first", "other"]
    assert dups["payload"].to_list() == ["second", "third"]
    assert set(kept.columns) == set(new.columns)  # no helper columns leak out


def test_dedupe_first_copy_wins_even_if_it_sorts_later() -> None:
    new = landed(("2024-01-01", "s", "b", "landed first"), ("2024-01-01", "s", "b", "a landed second"))
    kept, dups = dedupe(new)
    assert kept["payload"].to_list() == ["landed first"]
    assert dups["payload"].to_list() == ["a landed second"]


def test_dedupe_key_is_source_and_id_within_a_date() -> None:
    new = landed(
        ("2024-01-01", "s", "1", "a"),
        ("2024-01-02", "s", "1", "b"),  # other date: kept (the documented horizon)
        ("2024-01-01", "t", "1", "c"),  # other source: a different event
        ("2024-01-01", "s", "10", "d"),
    )
    kept, dups = dedupe(new)
    assert kept["payload"].to_list() == ["a", "b", "c", "d"]
    assert dups.is_empty()


def test_dedupe_against_existing_keys() -> None:
    new = landed(
        ("2024-01-01", "s", "1", "already stored"),
        ("2024-01-01", "s", "2", "new"),
        ("2024-01-02", "s", "3", "stored on another date"),
        ("2024-01-01", "s", "1", "stored, and a copy in this run"),
    )
    existing = landed(
        ("2024-01-01", "s", "1", "old"),
        ("2024-01-01", "s", "1", "old again"),  # duplicate keys in the store must not multiply rows
        ("2024-01-03", "s", "3", "old"),
        ("2024-01-01", "other", "2", "old"),
    ).select("date", "source", "id")
    kept, dups = dedupe(new, existing)
    assert kept["payload"].to_list() == ["new", "stored on another date"]
    assert sorted(dups["payload"].to_list()) == ["already stored", "stored, and a copy in this run"]
    assert kept.columns == new.columns


def test_dedupe_with_empty_existing_keys() -> None:
    new = landed(("2024-01-01", "s", "1", "a"), ("2024-01-01", "s", "1", "b"))
    kept, dups = dedupe(new, landed().select("date", "source", "id"))
    assert kept["payload"].to_list() == ["a"]
    assert dups["payload"].to_list() == ["b"]


def test_dedupe_of_validated_events_uses_the_utc_date() -> None:
    # The same event sent twice with different offsets is the same instant and the same UTC date.
    frame = events(
        {"id": "x", "time": "2024-01-01T23:30:00Z", "data": {"v": 1}},
        {"id": "x", "time": "2024-01-02T01:30:00+02:00", "data": {"v": 2}},
        {"id": "y", "time": "2024-01-01T23:30:00Z"},
        {"id": "y", "time": "2024-01-02T00:30:00Z"},  # next UTC date: outside the horizon, kept
    ).collect()
    kept, dups = dedupe(frame)
    assert kept.select("id", "date").rows() == [("x", "2024-01-01"), ("y", "2024-01-01"), ("y", "2024-01-02")]
    assert json.loads(kept["data"][0]) == {"v": 1}
    assert dups.select("id", "line").rows() == [("x", 2)]


# --- one JSON parse per event for numeric value paths (extract_paths(decode=True)) ---------------------
TRICKY_VALUES = [
    1,
    -12,
    0,
    3.0,
    1.5,
    -0.0,
    0.1,
    1e3,
    1e-7,
    2.5e-7,
    1e20,
    1.7976931348623157e308,
    5e-324,
    12345678901234567890,
    123456789012345678901234567890,
    "12",
    " 12",
    "1e3",
    "-.5",
    "0x10",
    "",
    "abc",
    True,
    False,
    None,
    ABSENT,
    "NaN",
    "Infinity",
    "\u00e9",
    "1,5",
]


@pytest.mark.parametrize("aggregation", ["SUM", "MAX", "LATEST"])
@pytest.mark.parametrize("path", ["$.v", "$.n.v", "$['v']"])
def test_decoded_value_paths_give_the_same_values_and_exclusions(aggregation: str, path: str) -> None:
    from transforms.extract import extract_paths

    def doc(value):
        inner = {} if value is ABSENT else {"v": value}
        return {"data": {**inner, "n": inner, "g": "x"}}

    meter = make_meter(aggregation, path, group_by={"g": "$.g"})
    undecodable = []
    for value in TRICKY_VALUES:
        frame = events(doc(value))
        out = {}
        for decode in (True, False):
            try:
                paths = extract_paths(frame, [meter], decode=decode).collect()
            except pl.exceptions.ComputeError:  # callers collect again with decode=False
                undecodable.append(value)
                break
            out[decode] = extract(paths.lazy(), meter).select("id", "value", "excluded", "g").collect()
        else:
            assert_frame_equal(out[True], out[False])
    # only a number whose canonical text is hundreds of digits long defeats the decoder (seen: the largest double)
    assert undecodable == [1.7976931348623157e308]


@pytest.mark.parametrize("value", [{"x": 1}, [1, 2]])
def test_decoding_an_object_where_a_value_is_expected_fails_so_callers_fall_back(value) -> None:
    from transforms.extract import extract_paths

    frame = events(with_value(1), with_value(value))
    meter = make_meter("SUM", group_by={"g": "$.g"})  # two paths: one alone is never decoded
    with pytest.raises(pl.exceptions.PolarsError):
        extract_paths(frame, [meter], decode=True).collect()
    paths = extract_paths(frame, [meter], decode=False).collect()
    assert extract(paths.lazy(), meter).collect()["excluded"].to_list() == [None, "bad_value"]


def test_group_and_unique_count_paths_keep_their_exact_text() -> None:
    from transforms.extract import extract_paths, path_column

    meters = [make_meter("SUM", "$.v", {"k": "$.k"}), make_meter("UNIQUE_COUNT", "$.u", slug="u")]
    doc = '{"v": 1e3, "k": 3.0, "u": 2.5e-7}'  # e.g. Parquet struct data, not canonicalised by the JSONL reader
    paths = extract_paths(pl.LazyFrame({"data": [doc]}), meters, decode=True).collect()
    assert paths[path_column("$.k")].to_list() == ["3.0"]  # json_path_match text, not the decoder's "3"
    assert paths[path_column("$.u")].to_list() == ["2.5e-7"]
    assert paths[path_column("$.v")].cast(pl.Float64).to_list() == [1000.0]  # decoded: same number


# --- decoded paths against json_path_match, the reference, on generated JSON text -----------------------
def _random_doc(rng) -> str:
    """JSON text of a `data` object (written by hand: duplicate keys, escaped keys, odd numbers)."""
    atoms = [
        '"GET"',
        '"x y"',
        '"12"',
        '"-5"',
        '"3.0"',
        '""',
        '"\\u00e9t\\u00e9"',
        '"a\\"b"',
        "3.0",
        "3",
        "-0.0",
        "1e3",
        "2.5e-7",
        "12345678901234567890",
        "true",
        "false",
        "null",
        '"\\n"',
        '"k"',
        '"\\u006b"',
    ]
    keys = ['"k"', '"v"', '"n"', '"\\u006b"', '"K"', '"v "', '"g"']
    parts = []
    for _ in range(rng.randint(0, 5)):
        key = rng.choice(keys)
        if key == '"n"' and rng.random() < 0.97:
            inner = ", ".join(f"{rng.choice(keys)}: {rng.choice(atoms)}" for _ in range(rng.randint(0, 3)))
            parts.append(f"{key}: {{{inner}}}")
        else:
            parts.append(f"{key}: {rng.choice(atoms)}")
    return "{" + ", ".join(parts) + "}"


@pytest.mark.parametrize("seed", range(6))
def test_decoded_paths_equal_json_path_match_on_generated_text(seed: int) -> None:
    import random

    from transforms.extract import extract_paths

    rng = random.Random(seed)
    meters = [
        make_meter("SUM", "$.v", {"k": "$.k", "nk": "$.n.k"}, slug="s"),
        make_meter("LATEST", "$.n.v", {"g": "$.g"}, slug="l"),
        make_meter("UNIQUE_COUNT", "$.k", slug="u"),
    ]
    frame = pl.LazyFrame({"data": [_random_doc(rng) for _ in range(400)]})
    reference = extract_paths(frame, meters, decode=False).collect()
    decoded = 0
    for at in range(0, reference.height, 10):
        part = reference.slice(at, 10)
        try:
            got = extract_paths(part.lazy().select("data"), meters, decode=True).collect()
        except pl.exceptions.ComputeError:  # an object where text is expected: callers fall back to matching
            continue
        decoded += 1
        for meter in meters:  # numeric text may be written differently ("1e3", "1000"): compare what meters use
            columns = ["value", "excluded", *meter.group_paths]
            assert_frame_equal(
                extract(got.lazy(), meter).select(columns).collect(),
                extract(part.lazy(), meter).select(columns).collect(),
            )
    assert decoded >= 10  # the decoder did run on many slices


def test_a_duplicate_key_takes_the_last_value_whether_decoded_or_matched() -> None:
    from transforms.extract import extract_paths, path_column

    frame = pl.LazyFrame({"data": ['{"v": 1, "v": 5, "k": "a", "k": "b"}', '{"v": 2, "k": "c"}']})
    meters = [make_meter("SUM", "$.v", {"k": "$.k"})]
    for decode in (True, False):
        paths = extract_paths(frame, meters, decode=decode).collect()
        assert paths[path_column("$.v")].to_list() == ["5", "2"]
        assert paths[path_column("$.k")].to_list() == ["b", "c"]


def test_a_duplicate_key_spelled_with_an_escape_takes_the_last_value_too() -> None:
    from transforms.extract import extract_paths, path_column

    frame = pl.LazyFrame({"data": ['{"a\\/b": 1, "a/b": 5, "g": "x"}', '{"a/b": 2, "g": "y"}']})
    meters = [make_meter("SUM", "$['a/b']", {"g": "$.g"})]
    got = {
        d: extract_paths(frame, meters, decode=d).collect()[path_column("$['a/b']")].to_list() for d in (True, False)
    }
    assert got[True] == got[False] == ["5", "2"]


@pytest.mark.parametrize("key", ["^a.*$", "^$"])
def test_a_key_shaped_like_a_regular_expression_is_read_literally(key: str) -> None:
    # Polars' struct.field takes `^...$` as a regular expression: decoding must not read other keys.
    from transforms.extract import extract_paths, path_column

    path = f"$['{key}']"
    frame = pl.LazyFrame(
        {"data": [json.dumps({key: 5, "a.*": 3, "a$": 4, "g": "x"}), json.dumps({"a.*": 1, "g": "y"})]}
    )
    meters = [make_meter("SUM", path, {"g": "$.g"})]
    for decode in (True, False):
        assert extract_paths(frame, meters, decode=decode).collect()[path_column(path)].to_list() == ["5", None]


@pytest.mark.parametrize("aggregation", ["COUNT", "SUM", "UNIQUE_COUNT", "LATEST"])
def test_events_before_event_from_are_ignored_not_excluded(aggregation: str, engine: str) -> None:
    """OpenMeter's `eventFrom`: the meter ignores earlier events; they are not bad values to report."""
    body = {"slug": "m", "eventType": "t", "aggregation": aggregation, "eventFrom": "2024-01-01T10:30:00Z"}
    if aggregation != "COUNT":
        body["valueProperty"] = "$.v"
    meter = parse_meters(json.dumps({"meters": [body]})).meters[0]
    frame = events(
        {"time": "2024-01-01T10:29:59.999Z", "data": {"v": 100}},
        {"time": "2024-01-01T10:00:00Z", "data": {"v": "bad"}},  # before: not reported either
        {"time": "2024-01-01T10:30:00Z", "data": {"v": 2}},  # eventFrom itself counts
        {"time": "2024-01-01T10:45:00+00:00", "data": {"v": 3}},
    )
    extracted = extract(frame, meter).collect(engine=engine)
    assert extracted["excluded"].drop_nulls().to_list() == []
    expected = {"COUNT": 2.0, "SUM": 5.0, "UNIQUE_COUNT": 2.0, "LATEST": 3.0}[aggregation]
    assert hourly(frame, meter, engine)["value"].to_list() == [expected]
