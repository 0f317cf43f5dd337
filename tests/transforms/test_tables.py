"""Table queries give the same numbers to the last bit however often they are computed."""

from __future__ import annotations

import datetime as dt
import random

import polars as pl

from meters import parse_meters
from transforms.aggregate import pack_partials
from transforms.extract import extract
from transforms.tables import collect_tables, hourly_table, period_from_partials, period_partials, with_windows
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
