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


def test_a_meter_added_back_over_tables_of_gone_events_is_stale_with_events_empty(tmp_path: Path) -> None:
    """`tokens_total` is left out of the meters file while a re-ingest takes the only event away (its file left
    landing/): events/ is empty, but its tables still count that event. Added back, `status` must report it stale
    (the backfill it prints deletes them); it reported no stale meter because no event was stored."""
    from flows import tools

    storage = local_root(tmp_path)
    land(storage, "a.jsonl", jsonl([event("1", "2024-01-05T00:00:00Z", data={"tokens": 1})]))
    run(storage, meterset(BEFORE))
    storage.delete(["landing/a.jsonl"])
    only_prompts = meterset("meters:\n  - {slug: prompts, eventType: prompt, aggregation: COUNT}\n")
    pipeline.backfill(
        storage, only_prompts, dt.date(2024, 1, 1), dt.date(2024, 2, 1), reingest_landing=True, log=lambda _: None
    )
    assert not storage.list_files("events") and storage.list_files("usage/tokens_total/period")
    status = tools.status(storage, meterset(BEFORE))
    assert dict(zip(status["slug"], status["stale"], strict=True)) == {"tokens_total": True, "prompts": False}
    pipeline.backfill(
        storage, meterset(BEFORE), dt.date(2024, 1, 5), dt.date(2024, 1, 6), slugs=["tokens_total"], log=lambda _: None
    )
    assert not storage.list_files("usage/tokens_total")
    assert not tools.status(storage, meterset(BEFORE))["stale"].any()


def test_a_meter_added_back_over_excluded_values_of_gone_events_is_stale_in_status_as_in_a_run(
    tmp_path: Path,
) -> None:
    """`tokens_total` excluded its only event (a bad value: no table row, but day partials and an excluded-value
    record) and was left out of the meters file while a re-ingest took that event away. Added back, the next run
    reports it stale (its partials are a history, `pipeline.unbuilt_meters`); `status` said not stale, so the
    excluded value of the gone event stayed in quarantine with no backfill shown."""
    from flows import tools

    storage = local_root(tmp_path)
    land(storage, "a.jsonl", jsonl([event("1", "2024-01-05T00:00:00Z", data={"tokens": "abc"})]))
    run(storage, meterset(BEFORE))
    assert not storage.list_files("usage/tokens_total")
    storage.delete(["landing/a.jsonl"])
    only_prompts = meterset("meters:\n  - {slug: prompts, eventType: prompt, aggregation: COUNT}\n")
    pipeline.backfill(
        storage, only_prompts, dt.date(2024, 1, 1), dt.date(2024, 2, 1), reingest_landing=True, log=lambda _: None
    )
    status = tools.status(storage, meterset(BEFORE))
    assert dict(zip(status["slug"], status["stale"], strict=True)) == {"tokens_total": True, "prompts": False}
    assert tools.quarantine(storage, meter="tokens_total").height == 1
    pipeline.backfill(
        storage, meterset(BEFORE), dt.date(2024, 1, 5), dt.date(2024, 1, 6), slugs=["tokens_total"], log=lambda _: None
    )
    assert not tools.status(storage, meterset(BEFORE))["stale"].any()
    assert tools.quarantine(storage, meter="tokens_total").is_empty()
