"""Table queries give the same numbers to the last bit however often they are computed."""

from __future__ import annotations

import datetime as dt
import json
import random

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from meters import parse_meters
from transforms.aggregate import pack_partials, unpack_partials
from transforms.extract import extract
from transforms.tables import collect_tables, hourly_table, period_from_partials, period_partials, with_windows
from transforms.tables import period_table as tables_period_table
from transforms.windows import period_table

METERS = parse_meters(
    """
meters:
  - {slug: tokens_total, eventType: prompt, aggregation: SUM, valueProperty: $.tokens, groupBy: {model: $.model}}
  - {slug: tokens_avg, eventType: prompt, aggregation: AVG, valueProperty: $.tokens, groupBy: {model: $.model}}
"""
)


def _events(n: int, subjects: int, seed: int = 0) -> pl.DataFrame:
    """One UTC day of events with many groups and values of very different sizes (sums that round)."""
    rng = random.Random(seed)
    start = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    values = [rng.uniform(0, 1000) * rng.choice([1e-3, 1.0, 1e3]) for _ in range(n)]
    return pl.DataFrame(
        {
            "id": [str(i) for i in range(n)],
            "source": ["app"] * n,
            "subject": [f"customer-{i * 7919 % subjects}" for i in range(n)],
            "time": [start + dt.timedelta(microseconds=i * 86_399_000_000 // n) for i in range(n)],
            "data": [f'{{"tokens": {v!r}, "model": "m{i % 10}"}}' for i, v in enumerate(values)],
            "file": ["landing/a.jsonl"] * n,
            "line": list(range(1, n + 1)),
            "batch": ["b"] * n,
            "date": ["2024-01-01"] * n,
        }
    ).with_columns(pl.col("time").cast(pl.Datetime("ns", "UTC")))


def test_collected_tables_are_the_same_to_the_last_bit_every_time() -> None:
    """Polars' streaming engine (2.1's default) gave different last bits on every repeat of these queries;
    a backfill run twice must not change a table, nor an incremental run differ from a from-scratch one."""
    billing = METERS.billing
    periods = period_table([dt.date(2024, 1, 1)], "MONTH", "UTC", 1)
    events = with_windows(_events(100_000, subjects=2_000).lazy(), billing, periods)
    extracted = {m.slug: extract(events, m).collect() for m in METERS.meters}

    def compute() -> list[pl.DataFrame]:
        queries = []
        for meter in METERS.meters:
            rows = extracted[meter.slug].lazy()
            queries += [hourly_table(rows, meter), period_partials(rows, meter, billing, periods, ("date",))]
        tables = collect_tables(queries)
        partials = [pack_partials(p, m) for p, m in zip(tables[1::2], METERS.meters, strict=True)]
        combined = collect_tables(
            [period_from_partials(p.lazy(), m, billing) for p, m in zip(tables[1::2], METERS.meters, strict=True)]
        )
        return [*tables, *partials, *combined]

    first = compute()
    assert first[0].height > 20_000  # many groups, each summed from rows spread over the whole input
    for _ in range(3):
        again = compute()
        for a, b in zip(first, again, strict=True):
            assert a.equals(b)  # exact: values bit for bit, rows in the same order


# --- a billing period from day partials equals the period aggregated at once ---------------------------
BERLIN = parse_meters(
    """
billing: {period: MONTH, timezone: Europe/Berlin}
meters:
  - {slug: m_sum, eventType: t, aggregation: SUM, valueProperty: $.v, groupBy: {g: $.g}}
  - {slug: m_count, eventType: t, aggregation: COUNT, groupBy: {g: $.g}}
  - {slug: m_avg, eventType: t, aggregation: AVG, valueProperty: $.v, groupBy: {g: $.g}}
  - {slug: m_min, eventType: t, aggregation: MIN, valueProperty: $.v}
  - {slug: m_max, eventType: t, aggregation: MAX, valueProperty: $.v}
  - {slug: m_latest, eventType: t, aggregation: LATEST, valueProperty: $.v, groupBy: {g: $.g}}
  - {slug: m_unique, eventType: t, aggregation: UNIQUE_COUNT, valueProperty: $.u}
"""
)

# (id, source, subject, UTC time, data): four UTC days of January in Berlin, and one UTC-January event that
# is February in Berlin. Excluded values (AVG must divide by the valid ones only), LATEST ties on time broken
# by id and then source across days, UNIQUE_COUNT values repeated across days and as number and text.
PERIOD_EVENTS = [
    ("a1", "s", "c1", "2024-01-01T00:30:00Z", {"v": 10, "g": "x", "u": 1}),
    ("a2", "s", "c1", "2024-01-01T05:00:00Z", {"v": "bad", "g": "x", "u": "1"}),
    ("a3", "s", "c1", "2024-01-02T07:00:00Z", {"v": 2.5, "g": "x", "u": 2}),
    ("a4", "s", "c1", "2024-01-02T07:00:00Z", {"g": "y", "u": None}),
    # A tie on time whose winner is neither first nor last: "b9" > "b10" as text, then source "s" > "r".
    ("b10", "s", "c1", "2024-01-03T12:00:00Z", {"v": 99, "g": "x", "u": 3}),
    ("b9", "s", "c1", "2024-01-03T12:00:00Z", {"v": 7, "g": "x", "u": 2}),
    ("b9", "r", "c1", "2024-01-03T12:00:00Z", {"v": 5, "g": "x", "u": 4}),
    ("c1", "s", "c2", "2024-01-04T09:00:00Z", {"v": -3, "g": None, "u": 1}),
    ("c2", "s", "c2", "2024-01-04T10:00:00Z", {"v": 4, "u": 1}),
    ("d1", "s", "c1", "2024-01-31T23:30:00Z", {"v": 1000, "g": "x", "u": 9}),  # 00:30 on 1 Feb in Berlin
]


def _period_events() -> pl.DataFrame:
    rows = [
        {
            "id": i,
            "source": src,
            "subject": subject,
            "time": dt.datetime.fromisoformat(t),
            "data": json.dumps(data),
            "file": "landing/a.jsonl",
            "line": n,
            "batch": "b",
            "date": t[:10],
        }
        for n, (i, src, subject, t, data) in enumerate(PERIOD_EVENTS, start=1)
    ]
    return pl.DataFrame(rows).with_columns(pl.col("time").cast(pl.Datetime("ns", "UTC")))


# January's values, worked out by hand from PERIOD_EVENTS: (subject, group value or None) -> value.
JANUARY = {
    "m_sum": {("c1", "x"): 123.5, ("c2", None): 1.0},  # "bad" and a4's missing value are excluded
    "m_count": {("c1", "x"): 6.0, ("c1", "y"): 1.0, ("c2", None): 2.0},
    "m_avg": {("c1", "x"): 24.7, ("c2", None): 0.5},
    "m_min": {("c1",): 2.5, ("c2",): -3.0},
    "m_max": {("c1",): 99.0, ("c2",): 4.0},
    "m_latest": {("c1", "x"): 7.0, ("c2", None): 4.0},
    "m_unique": {("c1",): 4.0, ("c2",): 1.0},  # 1 and "1" are one value; null is ignored
}


@pytest.mark.parametrize("meter", BERLIN.meters, ids=[m.slug for m in BERLIN.meters])
def test_a_period_combined_from_day_partials_equals_the_period_aggregated_at_once(meter) -> None:
    billing = BERLIN.billing
    periods = period_table(
        [dt.date(2024, 1, 1) + dt.timedelta(days=d) for d in range(60)], "MONTH", billing.timezone, 1
    )
    extracted = extract(_period_events().lazy(), meter)
    at_once = tables_period_table(extracted, meter, billing, periods).collect()
    partials = period_partials(extracted, meter, billing, periods, ("date",)).collect()
    assert partials["date"].n_unique() == 5  # one partial state per UTC day at least
    stored = pack_partials(partials, meter)  # through the stored form, as a run keeps them
    combined = period_from_partials(unpack_partials(stored.lazy(), meter), meter, billing).collect()
    assert at_once.height == combined.height > 0
    assert_frame_equal(combined, at_once, check_row_order=False)
    # Two periods: January (local) and February, which holds only the event of 31 January 23:30 UTC.
    assert sorted(at_once["period_start"].unique().to_list()) == ["2024-01-01", "2024-02-01"]
    january = combined.filter(pl.col("period_start") == "2024-01-01")
    keys = ["subject", *meter.group_paths]
    got = {tuple(row[:-1]): row[-1] for row in january.select(*keys, "value").iter_rows()}
    assert got.keys() == JANUARY[meter.slug].keys()
    for key, value in JANUARY[meter.slug].items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
