"""A changed meter is reported stale, with its published periods, until a backfill rebuilds its history."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from flows import pipeline

from support import event, jsonl, land, local_root, meterset, run

BEFORE = """
meters:
  - {slug: tokens_total, eventType: prompt, aggregation: SUM, valueProperty: $.tokens}
  - {slug: prompts, eventType: prompt, aggregation: COUNT}
"""
AFTER = """
meters:
  - {slug: tokens_total, eventType: prompt, aggregation: SUM, valueProperty: $.tokens, groupBy: {model: $.model}}
  - {slug: prompts, eventType: prompt, aggregation: COUNT}
"""


def test_changed_meter_is_stale_until_backfilled(tmp_path: Path) -> None:
    storage = local_root(tmp_path)
    land(storage, "a.jsonl", jsonl([event("1", "2024-01-05T00:00:00Z", data={"tokens": 1, "model": "m"})]))
    land(storage, "b.jsonl", jsonl([event("2", "2024-02-05T00:00:00Z", data={"tokens": 2, "model": "m"})]))
    first = run(storage, meterset(BEFORE))
    assert first["stale_meters"] == []

    land(storage, "c.jsonl", jsonl([event("3", "2024-02-06T00:00:00Z", data={"tokens": 3, "model": "n"})]))
    second = run(storage, meterset(AFTER))
    assert second["stale_meters"] == ["tokens_total"]
    assert second["stale_periods"] == {"tokens_total": ["2024-01-01", "2024-02-01"]}
    assert "stale periods of tokens_total: 2024-01-01, 2024-02-01" in pipeline.format_summary(second)

    partial = pipeline.backfill(
        storage, meterset(AFTER), dt.date(2024, 2, 1), dt.date(2024, 3, 1), slugs=["tokens_total"], log=lambda _: None
    )
    assert partial["stale_meters"] == ["tokens_total"]  # January was not rebuilt yet
    full = pipeline.backfill(
        storage, meterset(AFTER), dt.date(2024, 1, 1), dt.date(2024, 3, 1), slugs=["tokens_total"], log=lambda _: None
    )
    assert full["stale_meters"] == [] and full["stale_periods"] == {}
    assert run(storage, meterset(AFTER))["stale_meters"] == []
