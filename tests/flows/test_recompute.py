"""Publishing table partitions (flows/recompute.py): replaced whole, and deleted when left without rows."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl

from flows import pipeline
from flows.recompute import hourly_file, period_file, publish

from support import event, jsonl, land, local_root, meterset, run

METERS = meterset(
    """
meters:
  - {slug: tokens_total, eventType: prompt, aggregation: SUM, valueProperty: $.tokens}
"""
)


def test_publish_deletes_an_existing_partition_left_without_rows(tmp_path: Path) -> None:
    storage = local_root(tmp_path)
    old = period_file("m", "2024-01-01")
    storage.write_parquet(old, pl.DataFrame({"period_start": ["2024-01-01"], "value": [1.0]}))
    rows = pl.DataFrame({"period_start": ["2024-02-01"], "value": [2.0]})  # nothing for January any more
    written = publish(storage, rows, "period_start", ["2024-01-01", "2024-02-01"], lambda v: period_file("m", v), {old})
    assert written == 1
    assert not storage.exists(old)
    assert storage.read_parquet([period_file("m", "2024-02-01")])["value"].to_list() == [2.0]


def test_a_reingest_that_empties_a_published_month_deletes_its_partitions(tmp_path: Path) -> None:
    """February's only event disappears from a re-landed batch: its period and hourly files must go, or
    readers would keep billing it."""
    storage = local_root(tmp_path)
    january = event("jan", "2024-01-05T10:00:00Z", data={"tokens": 1})
    land(storage, "a.jsonl", jsonl([january, event("feb", "2024-02-05T10:00:00Z", data={"tokens": 2})]))
    run(storage, METERS)
    assert storage.exists(period_file("tokens_total", "2024-02-01"))  # the test starts from a published February
    assert storage.exists(hourly_file("tokens_total", "2024-02-05"))

    land(storage, "a.jsonl", jsonl([january, event("jan2", "2024-01-05T11:00:00Z", data={"tokens": 4})]))
    # what `meterlake backfill --reingest --from 2024-01-01 --to 2024-03-01` calls
    pipeline.backfill(
        storage, METERS, dt.date(2024, 1, 1), dt.date(2024, 3, 1), reingest_landing=True, log=lambda _: None
    )

    assert storage.list_dirs("usage/tokens_total/period") == ["period_start=2024-01-01"]
    assert storage.list_dirs("usage/tokens_total/hourly") == ["date=2024-01-05"]
    period = pl.scan_parquet(f"{storage.root}/usage/tokens_total/period/**/*.parquet").collect()
    assert period.select("window_start", "value").rows() == [(dt.datetime(2024, 1, 1, tzinfo=dt.UTC), 5.0)]
    hourly = pl.scan_parquet(f"{storage.root}/usage/tokens_total/hourly/**/*.parquet").collect()
    assert hourly["window_start"].dt.month().unique().to_list() == [1]
