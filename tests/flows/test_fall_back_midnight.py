"""A billing zone whose clocks fall back across midnight (00:01 back to 23:01 of the day before: Labrador,
New Brunswick and Newfoundland 1987-2011): the hour after the first midnight belongs to the new day's period,
in the published table and in the run's choice of periods to rebuild."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from support import event, jsonl, land, local_root, meterset, run, table

METERS = """
billing: {period: MONTH, timezone: America/Goose_Bay}
meters:
  - {slug: tokens, eventType: prompt, aggregation: SUM, valueProperty: $.tokens}
"""


def test_an_event_after_a_repeated_midnight_is_in_the_period_whose_window_holds_it(tmp_path: Path) -> None:
    storage = local_root(tmp_path)
    # 2009-11-01 00:00 ADT is 03:00Z; at 00:01 ADT the clocks went back to 23:01 AST of October 31
    land(storage, "a.jsonl", jsonl([event("1", "2009-10-15T12:00:00Z", data={"tokens": 1})]))
    run(storage, meterset(METERS))
    land(storage, "b.jsonl", jsonl([event("2", "2009-11-01T03:30:00Z", data={"tokens": 5})]))
    run(storage, meterset(METERS))
    got = table(storage, "tokens").sort("window_start")
    assert got["value"].to_list() == [1, 5], got
    when = pl.Series(["2009-10-15T12:00:00Z", "2009-11-01T03:30:00Z"]).str.to_datetime(time_unit="us", time_zone="UTC")
    for t, start, end in zip(when, got["window_start"], got["window_end"], strict=True):
        assert start <= t < end, f"{t} counted in [{start}, {end})"
    assert got["period_start"].to_list() == ["2009-10-01", "2009-11-01"]
