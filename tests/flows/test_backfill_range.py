"""A backfill over a range far wider than the history ("to be safe") does the work of the history, not of the calendar.

`recompute.range_scope` leaves out the range's dates and billing periods that hold nothing; these tests pin what it
must keep: the same tables as a narrow backfill, periods that still have tables but no events, idempotence.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

import pytest
from polars.testing import assert_frame_equal

from flows import pipeline, recompute, state
from flows.recompute import hourly_file, period_file
from flows.storage import Storage
from meters import MeterSet
from transforms.validate import END_EVENT_DAY, FIRST_EVENT_DAY

from support import all_tables, event, jsonl, land, local_root, meterset, run

BOTH = meterset(
    """
meters:
  - {slug: tokens, eventType: prompt, aggregation: SUM, valueProperty: $.v, groupBy: {model: $.model}}
  - {slug: prompts, eventType: prompt, aggregation: COUNT}
"""
)
ONLY_PROMPTS = meterset("meters:\n  - {slug: prompts, eventType: prompt, aggregation: COUNT}\n")
# another definition and another billing block (zone 3.5 h behind UTC, periods from the last day of a month)
CHANGED = meterset(
    """
billing: {period: MONTH, timezone: America/St_Johns, anchor_day: 31}
meters:
  - {slug: tokens, eventType: prompt, aggregation: MAX, valueProperty: $.v, groupBy: {model: $.model}}
  - {slug: prompts, eventType: prompt, aggregation: COUNT}
"""
)
EVENTS = [
    event("a", "2024-01-05T10:00:00Z", data={"v": 1, "model": "x"}),
    event("b", "2024-01-31T01:00:00Z", data={"v": 2, "model": "y"}),  # Jan 30 in St John's
    event("c", "2024-02-05T10:00:00Z", data={"v": 4, "model": "x"}),
]
WHOLE_HISTORY = (dt.date(2024, 1, 1), dt.date(2024, 3, 1))
WIDEST = (FIRST_EVENT_DAY, END_EVENT_DAY)  # 1678-01-01 .. 2262-01-01: every date an event can fall on


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # durability against power loss is not tested here
    monkeypatch.setattr(os, "sync", lambda: None)


def _backfill(storage: Storage, meters: MeterSet, span: tuple[dt.date, dt.date], **kw) -> dict:
    return pipeline.backfill(storage, meters, *span, log=lambda _: None, **kw)


def _published(tmp_path: Path, name: str = "root", meters: MeterSet = BOTH) -> Storage:
    storage = local_root(tmp_path, name)
    land(storage, "a.jsonl", jsonl(EVENTS), mtime=1_700_000_000)
    run(storage, meters)
    return storage


def _copy(storage: Storage, tmp_path: Path, name: str) -> Storage:
    shutil.copytree(storage.root, tmp_path / name)
    return Storage(str(tmp_path / name))


def _files(storage: Storage) -> dict[str, bytes]:
    base = Path(storage.root)
    return {
        str(p.relative_to(base)): p.read_bytes() for p in base.rglob("*") if p.is_file() and "_state" not in p.parts
    }


def _assert_same_tables(got: Storage, expected: Storage, meters: MeterSet) -> None:
    """Equal tables, whatever the order of files and rows (`support.table` sorts on every key column)."""
    theirs = all_tables(expected, meters)
    for key, table in all_tables(got, meters).items():
        try:
            assert_frame_equal(table, theirs[key], check_exact=True)
        except AssertionError as exc:
            raise AssertionError(f"{key}: {exc}") from None


def test_a_backfill_of_every_possible_date_visits_only_the_dates_and_periods_the_root_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before range_scope, this backfill handed 213,000 dates to the plan and to the pending record and 7,010 month
    starts (1677-12 to 2262-01) to `recompute_periods`, which read, combined and published each one, empty: about a
    minute on the sample data. The three event dates and their two months are all that can change."""
    storage = _published(tmp_path)
    seen: dict[str, list] = {"days": [], "periods": [], "pending": []}

    def spy(name: str, fn):
        def wrapper(*args):
            seen[name].append(args)
            return fn(*args)

        return wrapper

    monkeypatch.setattr(recompute, "recompute_days", spy("days", recompute.recompute_days))
    monkeypatch.setattr(recompute, "recompute_periods", spy("periods", recompute.recompute_periods))
    monkeypatch.setattr(state, "write_pending", spy("pending", state.write_pending))

    summary = _backfill(storage, BOTH, WIDEST)

    assert [d for args in seen["days"] for d in args[3]] == ["2024-01-05", "2024-01-31", "2024-02-05"]
    assert [args[3] for args in seen["periods"]] == [["2024-01-01", "2024-02-01"]]
    for _, pending in seen["pending"]:
        assert all(len(t["dates"]) <= 3 and len(t["local_dates"]) <= 2 for t in pending.touched.values())
    assert summary["periods_recomputed"] == 2 * len(BOTH.meters)  # what was rebuilt, not what the range spans
    assert summary["hourly_partitions_recomputed"] == 3 * len(BOTH.meters)


@pytest.mark.parametrize("reingest", [False, True])
def test_a_wide_backfill_gives_the_tables_of_a_narrow_one_and_a_second_one_changes_nothing(
    tmp_path: Path, reingest: bool
) -> None:
    """After a change of definition and of billing block (other zone, other anchor: every published period is
    replaced by another): a backfill over every possible date rebuilds what one over the history does, and what a
    from-scratch run under the new definition publishes."""
    narrow = _published(tmp_path, "narrow")
    wide = _copy(narrow, tmp_path, "wide")
    scratch = _published(tmp_path, "scratch", CHANGED)

    narrow_summary = _backfill(narrow, CHANGED, WHOLE_HISTORY, reingest_landing=reingest)
    wide_summary = _backfill(wide, CHANGED, WIDEST, reingest_landing=reingest)

    _assert_same_tables(wide, narrow, CHANGED)
    _assert_same_tables(wide, scratch, CHANGED)
    assert wide.list_dirs("usage/tokens/period") == ["period_start=2023-12-31", "period_start=2024-01-31"]
    for key in ("periods_recomputed", "hourly_partitions_recomputed", "rows_written", "stale_meters"):
        assert wide_summary[key] == narrow_summary[key], key
    before = _files(wide)
    _backfill(wide, CHANGED, WIDEST, reingest_landing=reingest)
    after = _files(wide)
    if reingest:  # the event and quarantine files are rewritten under the new run's name, with the same rows
        before, after = ({k: v for k, v in files.items() if k.startswith("usage/")} for files in (before, after))
    assert after == before


def test_a_month_whose_events_a_reingest_took_away_is_emptied_by_a_wide_backfill(tmp_path: Path) -> None:
    """February's only event is gone from the re-landed batch while `tokens` is absent from the meters file: the
    re-ingest deletes `prompts`' February but leaves `tokens`' hourly partition, day partial and period. Added back,
    `tokens` is rebuilt by a backfill over every possible date: February has no events but tables, so it is
    emptied (its files deleted) as the narrow backfill does."""
    storage = _published(tmp_path)
    land(storage, "a.jsonl", jsonl(EVENTS[:2]), mtime=1_700_000_010)
    _backfill(storage, ONLY_PROMPTS, WIDEST, reingest_landing=True)
    assert not storage.exists(period_file("prompts", "2024-02-01"))
    assert storage.exists(period_file("tokens", "2024-02-01"))  # the test starts from tables without events
    assert storage.exists(hourly_file("tokens", "2024-02-05"))
    assert "2024-02-05" not in pipeline.event_files_by_date(storage)

    summary = _backfill(storage, BOTH, WIDEST, slugs=["tokens"])

    assert storage.list_dirs("usage/tokens/period") == ["period_start=2024-01-01"]
    assert "date=2024-02-05" not in storage.list_dirs("usage/tokens/hourly")
    assert summary["periods_recomputed"] == 2  # January rebuilt, February emptied
    assert summary["stale_meters"] == []
    scratch = local_root(tmp_path, "scratch")
    land(scratch, "a.jsonl", jsonl(EVENTS[:2]))
    run(scratch, BOTH)
    _assert_same_tables(storage, scratch, BOTH)


def test_a_published_period_whose_days_hold_nothing_at_all_is_deleted_by_a_wide_backfill(tmp_path: Path) -> None:
    """Only the period file of February is left (its events, hourly partitions, day partials and excluded values
    removed by hand): no stored day points at it, its partition does, and it is deleted."""
    storage = _published(tmp_path)
    february = [
        f.path
        for prefix in ("events", "usage/tokens/hourly", "usage/prompts/hourly", "_state/partials", "quarantine/meter")
        for f in storage.list_files(prefix)
        if "date=2024-02-" in f.path
    ]
    storage.delete(february)
    assert storage.exists(period_file("tokens", "2024-02-01"))

    summary = _backfill(storage, BOTH, WIDEST)

    assert storage.list_dirs("usage/tokens/period") == ["period_start=2024-01-01"]
    assert storage.list_dirs("usage/prompts/period") == ["period_start=2024-01-01"]
    assert summary["periods_recomputed"] == 2 * len(BOTH.meters)


def test_a_reingest_killed_after_its_commit_is_finished_exactly_by_the_next_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The re-ingest commits (its events replace the range's old ones), then the backfill stops before writing
    its own pending record: the next run finishes it from the re-ingest's record alone. February loses every
    event, `prompt`'s and `api`'s (no landed event of that type is left): its hourly partitions, day partials and
    periods must go, as in a from-scratch run."""
    meters = meterset(
        """
meters:
  - {slug: tokens, eventType: prompt, aggregation: SUM, valueProperty: $.v, groupBy: {model: $.model}}
  - {slug: prompts, eventType: prompt, aggregation: COUNT}
  - {slug: calls, eventType: api, aggregation: COUNT}
"""
    )
    storage = local_root(tmp_path, "root")
    land(storage, "a.jsonl", jsonl([*EVENTS, event("d", "2024-02-06T10:00:00Z", type="api")]), mtime=1_700_000_000)
    run(storage, meters)
    land(storage, "a.jsonl", jsonl(EVENTS[:2]), mtime=1_700_000_010)
    write_pending = state.write_pending

    class Killed(Exception):
        pass

    def killed_at_the_backfills_own_record(storage: Storage, pending: state.Pending) -> None:
        if not pending.files and not pending.deletes:  # the re-ingest's record lists its files
            raise Killed
        write_pending(storage, pending)

    monkeypatch.setattr(state, "write_pending", killed_at_the_backfills_own_record)
    with pytest.raises(Killed):
        _backfill(storage, meters, WHOLE_HISTORY, reingest_landing=True)
    monkeypatch.setattr(state, "write_pending", write_pending)
    assert "2024-02-05" not in pipeline.event_files_by_date(storage)  # the re-ingest committed

    run(storage, meters)

    scratch = local_root(tmp_path, "scratch")
    land(scratch, "a.jsonl", jsonl(EVENTS[:2]))
    run(scratch, meters)
    _assert_same_tables(storage, scratch, meters)
    for slug in ("tokens", "prompts", "calls"):
        assert storage.list_dirs(f"usage/{slug}/period") == scratch.list_dirs(f"usage/{slug}/period"), slug


def test_a_backfill_rebuilds_neither_its_end_date_nor_the_period_that_ends_where_it_starts(tmp_path: Path) -> None:
    """[Feb 1, Feb 2) under a changed valueProperty: Feb 1 and February are rebuilt; Feb 2 (the end, excluded)
    keeps the old numbers, and January, which ends at the range's first instant, is not recomputed."""
    storage = local_root(tmp_path)
    days = [event("feb1", "2024-02-01T10:00:00Z", data={"v": 1, "w": 10}), event("feb2", "2024-02-02T10:00:00Z")]
    days[1]["data"] = {"v": 5, "w": 50}
    land(storage, "a.jsonl", jsonl(days))
    run(storage, BOTH)
    reading_w = meterset(
        "meters:\n  - {slug: tokens, eventType: prompt, aggregation: SUM, valueProperty: $.w, groupBy: {model: $.model}}"
    )

    summary = _backfill(storage, reading_w, (dt.date(2024, 2, 1), dt.date(2024, 2, 2)))

    hourly = all_tables(storage, reading_w)["tokens/hourly"]
    assert dict(hourly.select("date", "value").iter_rows()) == {"2024-02-01": 10.0, "2024-02-02": 5.0}
    assert summary["hourly_partitions_recomputed"] == 1
    assert summary["periods_recomputed"] == 1  # February only


@pytest.mark.parametrize(
    ("zone", "time", "span"),
    [
        # 02:00Z on Feb 1 is Jan 31 in New York: a range from Feb 1 (UTC) overlaps January's local period
        ("America/New_York", "2024-02-01T02:00:00Z", (dt.date(2024, 2, 1), dt.date(2024, 2, 2))),
        # 23:30Z on Jan 31 is Feb 1 in Berlin: a range up to Feb 1 (UTC) overlaps February's local period
        ("Europe/Berlin", "2024-01-31T23:30:00Z", (dt.date(2024, 1, 31), dt.date(2024, 2, 1))),
    ],
)
def test_a_backfill_rebuilds_the_local_period_its_utc_range_reaches_across_midnight(
    tmp_path: Path, zone: str, time: str, span: tuple[dt.date, dt.date]
) -> None:
    def meters(path: str) -> MeterSet:
        return meterset(
            f"billing: {{timezone: {zone}}}\n"
            f"meters:\n  - {{slug: tokens, eventType: prompt, aggregation: SUM, valueProperty: {path}}}\n"
        )

    storage = local_root(tmp_path)
    land(storage, "a.jsonl", jsonl([event("e", time, data={"v": 1, "w": 10})]))
    run(storage, meters("$.v"))

    _backfill(storage, meters("$.w"), span)

    period = all_tables(storage, meters("$.w"))["tokens/period"]
    assert period.select("value").to_series().to_list() == [10.0]  # the other day's period, rebuilt
