"""A meter reported current (not stale) has tables that equal a from-scratch run under its definition.

`_state/meters.json` must not claim a definition built a meter's tables when another definition (or no
definition at all) built part of them: a meter removed and added back, a definition changed and changed
back, a billing block changed and fully backfilled, a first run killed right after its commit.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

from flows import pipeline
from meters import MeterSet

from reference import assert_tables_match
from support import all_tables, event, jsonl, land, local_root, meterset, run

BOTH = meterset(
    """
meters:
  - {slug: tokens, eventType: prompt, aggregation: SUM, valueProperty: $.v}
  - {slug: prompts, eventType: prompt, aggregation: COUNT}
"""
)
ONLY_PROMPTS = meterset("meters:\n  - {slug: prompts, eventType: prompt, aggregation: COUNT}\n")
TOKENS_MAX = meterset(
    """
meters:
  - {slug: tokens, eventType: prompt, aggregation: MAX, valueProperty: $.v}
  - {slug: prompts, eventType: prompt, aggregation: COUNT}
"""
)


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # durability against power loss is not tested here
    monkeypatch.setattr(os, "sync", lambda: None)


def _ev(i: int, day: int) -> dict:
    return event(f"e{i}", f"2024-01-{day:02d}T10:00:00Z", data={"v": i})


BATCHES = [
    ("1.jsonl", jsonl([_ev(1, 3), _ev(2, 4)])),
    ("2.jsonl", jsonl([_ev(3, 3), _ev(4, 5)])),  # lands while the middle definition is in use
    ("3.jsonl", jsonl([_ev(5, 6)])),
]


def _from_scratch(tmp_path: Path, meters: MeterSet) -> dict:
    root = local_root(tmp_path, "scratch")
    for i, (name, content) in enumerate(BATCHES):
        land(root, name, content, mtime=1_700_000_000 + 10 * i)
    run(root, meters)
    return all_tables(root, meters)


def _backfill(storage, meters: MeterSet, start: str = "2024-01-01", end: str = "2024-02-01", **kw) -> dict:
    s, e = dt.date.fromisoformat(start), dt.date.fromisoformat(end)
    return pipeline.backfill(storage, meters, s, e, log=lambda _: None, **kw)


def _differs(got: dict, expected: dict) -> list[str]:
    bad = []
    for key, table in expected.items():
        try:
            assert_tables_match(got[key], table, key)
        except AssertionError:
            bad.append(key)
    return bad


@pytest.mark.parametrize("middle", ["removed", "changed"])
def test_going_back_to_a_definition_after_a_detour_reports_the_meter_stale(tmp_path: Path, middle: str) -> None:
    """tokens is removed (or made a MAX) for one run that stores events, then restored: the events stored
    meanwhile are missing from its tables (or counted with MAX), so it is stale until a backfill."""
    storage = local_root(tmp_path)
    mid = ONLY_PROMPTS if middle == "removed" else TOKENS_MAX
    for i, ((name, content), meters) in enumerate(zip(BATCHES, [BOTH, mid, BOTH], strict=True)):
        land(storage, name, content, mtime=1_700_000_000 + 10 * i)
        summary = run(storage, meters)
    expected = _from_scratch(tmp_path, BOTH)
    wrong = _differs(all_tables(storage, BOTH), expected)
    assert wrong, "the detour should have left tables that differ from a from-scratch run"
    assert summary["stale_meters"] == ["tokens"], f"tokens/{wrong} are wrong but reported current"
    full = _backfill(storage, BOTH, slugs=["tokens"])
    assert full["stale_meters"] == []
    assert not _differs(all_tables(storage, BOTH), expected)


def test_a_stale_meter_partly_backfilled_stays_stale_after_going_back(tmp_path: Path) -> None:
    storage = local_root(tmp_path)
    for i, (name, content) in enumerate(BATCHES):
        land(storage, name, content, mtime=1_700_000_000 + 10 * i)
    run(storage, BOTH)
    _backfill(storage, TOKENS_MAX, "2024-01-05", "2024-01-06", slugs=["tokens"])  # day 5 hourly now MAX
    assert run(storage, BOTH)["stale_meters"] == ["tokens"]


def test_a_billing_change_fully_backfilled_leaves_no_period_of_the_old_billing(tmp_path: Path) -> None:
    meters = "meters:\n  - {slug: tokens, eventType: prompt, aggregation: SUM, valueProperty: $.v}\n"
    old = meterset("billing: {period: MONTH, anchor_day: 1}\n" + meters)
    new = meterset("billing: {period: MONTH, anchor_day: 15}\n" + meters)
    events = [event(f"e{i}", f"2024-0{1 + i % 3}-{1 + i % 27:02d}T10:00:00Z", data={"v": i}) for i in range(30)]
    storage = local_root(tmp_path)
    land(storage, "a.jsonl", jsonl(events), mtime=1_700_000_000)
    run(storage, old)
    assert run(storage, new)["stale_meters"] == ["tokens"]
    full = _backfill(storage, new, "2024-01-01", "2024-04-01")
    assert full["stale_meters"] == []
    scratch = local_root(tmp_path, "scratch")
    land(scratch, "a.jsonl", jsonl(events), mtime=1_700_000_000)
    run(scratch, new)
    assert storage.list_dirs("usage/tokens/period") == scratch.list_dirs("usage/tokens/period")
    assert not _differs(all_tables(storage, new), all_tables(scratch, new))


@pytest.mark.parametrize(
    ("after", "days"),
    [("DAY", [20, 21, 22, 23, 24]), ("WEEK", [15, 16, 17])],  # 2024-01-01, a Monday: a month start, a week start
    ids=["month-to-day", "month-to-week"],
)
def test_an_old_period_whose_key_is_also_a_new_period_start_is_dropped(
    tmp_path: Path, after: str, days: list[int]
) -> None:
    """MONTH to DAY (or WEEK): the old month's key `period_start=<first day>` is also a period start under the new
    block, with another window. A backfill over every event must not keep it beside the new periods."""
    meters = "meters:\n  - {slug: tokens, eventType: prompt, aggregation: SUM, valueProperty: $.v}\n"
    old = meterset("billing: {period: MONTH}\n" + meters)
    new = meterset(f"billing: {{period: {after}}}\n" + meters)
    month = "2023-12" if after == "DAY" else "2024-01"
    events = [event(f"e{d}", f"{month}-{d:02d}T10:00:00Z", data={"v": d}) for d in days]
    storage = local_root(tmp_path)
    land(storage, "a.jsonl", jsonl(events), mtime=1_700_000_000)
    run(storage, old)
    start, end = ("2023-12-15", "2024-01-01") if after == "DAY" else ("2024-01-15", "2024-01-20")
    assert _backfill(storage, new, start, end)["stale_meters"] == []  # the range holds every event
    scratch = local_root(tmp_path, "scratch")
    land(scratch, "a.jsonl", jsonl(events), mtime=1_700_000_000)
    run(scratch, new)
    assert storage.list_dirs("usage/tokens/period") == scratch.list_dirs("usage/tokens/period")
    assert not _differs(all_tables(storage, new), all_tables(scratch, new))


def test_a_billing_change_backfilled_in_part_drops_only_old_periods_overlapping_the_range(tmp_path: Path) -> None:
    meters = "meters:\n  - {slug: tokens, eventType: prompt, aggregation: SUM, valueProperty: $.v}\n"
    old = meterset("billing: {period: WEEK}\n" + meters)
    new = meterset("billing: {period: MONTH, anchor_day: 15}\n" + meters)
    events = [event(f"e{i}", f"2024-0{1 + i % 3}-{1 + i % 27:02d}T10:00:00Z", data={"v": i}) for i in range(30)]
    storage = local_root(tmp_path)
    land(storage, "a.jsonl", jsonl(events), mtime=1_700_000_000)
    run(storage, old)
    weeks = storage.list_dirs("usage/tokens/period")
    _backfill(storage, new, "2024-02-01", "2024-02-10")
    left = set(storage.list_dirs("usage/tokens/period"))
    # ISO weeks overlapping Feb 1..9 (from Jan 29 to Feb 5) are gone; the others stay, stale, until backfilled
    assert {w for w in weeks if w not in left} == {"period_start=2024-01-29", "period_start=2024-02-05"}
    assert "period_start=2024-01-15" in left


def test_a_first_run_killed_after_its_commit_still_records_its_definitions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = local_root(tmp_path)
    land(storage, BATCHES[0][0], BATCHES[0][1], mtime=1_700_000_000)
    real = pipeline.state.commit_manifest

    def killed_after(*args) -> None:  # the commit point is written, then the process dies
        real(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.state, "commit_manifest", killed_after)
    with pytest.raises(KeyboardInterrupt):
        run(storage, BOTH)
    monkeypatch.setattr(pipeline.state, "commit_manifest", real)
    assert run(storage, BOTH)["stale_meters"] == [], "nothing changed, yet every meter is reported stale"


def test_a_reingest_killed_right_after_its_commit_still_leaves_a_removed_meter_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-ingest without `tokens` stores the events of a batch no run had read: added back, `tokens` misses them
    and must be reported stale, even when the backfill died right after the re-ingest's commit."""
    storage = local_root(tmp_path)
    land(storage, BATCHES[0][0], BATCHES[0][1], mtime=1_700_000_000)
    run(storage, BOTH)
    land(storage, BATCHES[1][0], BATCHES[1][1], mtime=1_700_000_010)  # no run reads it before the re-ingest
    real = pipeline.reingest

    def killed_after(*args):  # the re-ingest commits, then the process dies
        real(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "reingest", killed_after)
    with pytest.raises(KeyboardInterrupt):
        _backfill(storage, ONLY_PROMPTS, "2024-01-01", "2024-01-04", reingest_landing=True)
    monkeypatch.setattr(pipeline, "reingest", real)
    run(storage, ONLY_PROMPTS)
    assert run(storage, BOTH)["stale_meters"] == ["tokens"]


def test_a_meter_moved_to_another_event_type_misses_the_events_of_its_old_type_stored_meanwhile(
    tmp_path: Path,
) -> None:
    """tokens counts `api` events for one run that stores only `prompt` events, so it is not recomputed: put back
    on `prompt`, its tables miss that run's events and it must be reported stale, not current."""
    storage = local_root(tmp_path)
    on_api = meterset(
        "meters:\n  - {slug: tokens, eventType: api, aggregation: SUM, valueProperty: $.v}\n"
        "  - {slug: prompts, eventType: prompt, aggregation: COUNT}\n"
    )
    for i, ((name, content), meters) in enumerate(zip(BATCHES, [BOTH, on_api, BOTH], strict=True)):
        land(storage, name, content, mtime=1_700_000_000 + 10 * i)
        summary = run(storage, meters)
    wrong = _differs(all_tables(storage, BOTH), _from_scratch(tmp_path, BOTH))
    assert wrong, "the detour should have left tables that differ from a from-scratch run"
    assert summary["stale_meters"] == ["tokens"], f"tokens/{wrong} are wrong but reported current"


def test_a_backfill_over_every_event_date_does_not_rebuild_days_whose_events_a_reingest_took_away(
    tmp_path: Path,
) -> None:
    """1.jsonl is re-landed without its Jan 3 event; a re-ingest while tokens is absent takes that day's events away
    and leaves tokens' Jan 3 hourly partition and day partial. Added back, tokens is rebuilt only by a backfill that
    covers Jan 3 too: one over the stored event dates alone (Jan 4..5) leaves that day in its tables."""
    storage = local_root(tmp_path)
    land(storage, BATCHES[0][0], BATCHES[0][1], mtime=1_700_000_000)
    run(storage, BOTH)
    relanded = jsonl([_ev(2, 4), _ev(4, 5)])  # e1 (Jan 3) gone, a new Jan 5 event
    land(storage, BATCHES[0][0], relanded, mtime=1_700_000_010)
    _backfill(storage, ONLY_PROMPTS, reingest_landing=True)
    assert run(storage, BOTH)["stale_meters"] == ["tokens"]
    assert sorted(pipeline.event_files_by_date(storage)) == ["2024-01-04", "2024-01-05"]
    partial = _backfill(storage, BOTH, "2024-01-04", "2024-01-06", slugs=["tokens"])
    scratch = local_root(tmp_path, "scratch")
    land(scratch, BATCHES[0][0], relanded, mtime=1_700_000_010)
    run(scratch, BOTH)
    wrong = _differs(all_tables(storage, BOTH), all_tables(scratch, BOTH))
    assert wrong == ["tokens/period", "tokens/hourly"], "Jan 3 should still be in tokens' tables"
    assert partial["stale_meters"] == ["tokens"], "tokens still counts Jan 3, yet is reported current"
    import shlex

    from flows.cli import _rebuild_words  # what `meterlake status` prints

    assert "--from 2024-01-03 --to 2024-01-06 --meter tokens" in shlex.join(
        _rebuild_words(storage, "r", "m", BOTH.select(["tokens"]))
    )
    assert _backfill(storage, BOTH, "2024-01-03", "2024-01-06", slugs=["tokens"])["stale_meters"] == []
    assert not _differs(all_tables(storage, BOTH), all_tables(scratch, BOTH))


def test_a_meter_absent_while_a_reingest_emptied_events_is_stale_when_added_back(tmp_path: Path) -> None:
    """`tokens` is left out of the meters file while a re-ingest empties events/ (its file left landing/): its
    tables and day partials of Jan 3 stay as they were. Added back, the next run (the first with events again) must
    not record it as built by its definition: it is stale, and the backfill that rebuilds it gives the from-scratch
    tables. Recorded as current, its Jan period kept counting the gone event (3 instead of 2) with nothing stale."""
    storage = local_root(tmp_path)
    land(storage, "1.jsonl", jsonl([_ev(1, 3)]), mtime=1_700_000_000)
    run(storage, BOTH)
    storage.delete(["landing/1.jsonl"])
    _backfill(storage, ONLY_PROMPTS, reingest_landing=True)
    assert not storage.list_files("events")
    later = [("2.jsonl", jsonl([_ev(2, 5)]))]
    land(storage, *later[0], mtime=1_700_000_010)
    assert run(storage, BOTH)["stale_meters"] == ["tokens"]
    _backfill(storage, BOTH, slugs=["tokens"])
    assert run(storage, BOTH)["stale_meters"] == []
    scratch = local_root(tmp_path, "scratch")
    land(scratch, *later[0], mtime=1_700_000_010)
    run(scratch, BOTH)
    expected = all_tables(scratch, BOTH)
    assert expected["tokens/period"]["value"].to_list() == [2.0]
    assert not _differs(all_tables(storage, BOTH), expected)


class _Crash(Exception):
    """Stands for a kill right after a re-ingest's commit, before it deleted the old event files."""


@pytest.mark.parametrize("recovered_by", ["run", "backfill"])
def test_a_meter_absent_while_a_crashed_reingest_is_finished_is_stale_when_added_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recovered_by: str
) -> None:
    """A re-ingest without 1.jsonl (deleted from landing/) commits and dies before deleting e1's event file and
    recomputing. The next run or backfill, with `tokens` left out of the meters file, finishes it: e1 leaves
    events/, `prompts` is rebuilt, `tokens`' tables still count e1. Added back, `tokens` must be stale, as after a
    re-ingest it was absent from; recorded as current, its Jan period stayed 3 (e1 + e2) with nothing stale."""
    storage = local_root(tmp_path)
    land(storage, "1.jsonl", jsonl([_ev(1, 3)]), mtime=1_700_000_000)
    land(storage, "2.jsonl", jsonl([_ev(2, 5)]), mtime=1_700_000_010)
    run(storage, BOTH)
    storage.delete(["landing/1.jsonl"])
    commit = pipeline.state.commit_manifest

    def commit_then_die(*args, **kwargs) -> None:
        commit(*args, **kwargs)
        raise _Crash

    monkeypatch.setattr(pipeline.state, "commit_manifest", commit_then_die)
    with pytest.raises(_Crash):
        _backfill(storage, BOTH, reingest_landing=True)
    monkeypatch.setattr(pipeline.state, "commit_manifest", commit)
    if recovered_by == "run":
        run(storage, ONLY_PROMPTS)
    else:
        _backfill(storage, ONLY_PROMPTS, "2024-03-01", "2024-04-01")
    assert not storage.list_files("_state/pending")
    assert run(storage, BOTH)["stale_meters"] == ["tokens"]
    _backfill(storage, BOTH, slugs=["tokens"])
    scratch = local_root(tmp_path, "scratch")
    land(scratch, "2.jsonl", jsonl([_ev(2, 5)]), mtime=1_700_000_010)
    run(scratch, BOTH)
    expected = all_tables(scratch, BOTH)
    assert expected["tokens/period"]["value"].to_list() == [2.0]
    assert not _differs(all_tables(storage, BOTH), expected)


TOKENS_OF_CALLS = meterset(
    """
meters:
  - {slug: tokens, eventType: call, aggregation: SUM, valueProperty: $.v}
  - {slug: prompts, eventType: prompt, aggregation: COUNT}
"""
)


@pytest.mark.parametrize(
    ("then", "landed", "stale"),
    [
        (TOKENS_MAX, True, []),  # the run rebuilds every period the killed one published: current
        (TOKENS_MAX, False, []),  # its batch left landing/: the periods are emptied, nothing is left to rebuild
        (TOKENS_OF_CALLS, True, ["tokens"]),  # another event type: the killed run's tables are not rebuilt
    ],
    ids=["rebuilt", "batch-gone", "other-event-type"],
)
def test_a_first_run_killed_before_its_commit_then_a_changed_meter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, then: MeterSet, landed: bool, stale: list[str]
) -> None:
    """The first run publishes `tokens` and dies before its commit; the meter is changed before the next run, which
    rolls the killed run back and rebuilds the periods it published (its pending record). Those tables are not a
    history another definition built: with the same event type the meter is current (it was reported stale, with a
    backfill to run, since runs on an empty events/ recorded only meters without tables)."""
    storage = local_root(tmp_path)
    land(storage, "1.jsonl", jsonl([_ev(1, 3), _ev(2, 4)]), mtime=1_700_000_000)
    commit = pipeline.state.commit_manifest

    def killed(*args, **kwargs) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.state, "commit_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(storage, BOTH, log=lambda _: None, lock_ttl=0)
    monkeypatch.setattr(pipeline.state, "commit_manifest", commit)
    assert storage.list_files("usage/tokens/period")
    if not landed:
        storage.delete(["landing/1.jsonl"])
    assert run(storage, then)["stale_meters"] == stale
    if not stale:
        scratch = local_root(tmp_path, "scratch")
        if landed:
            land(scratch, "1.jsonl", jsonl([_ev(1, 3), _ev(2, 4)]), mtime=1_700_000_000)
        run(scratch, then)
        assert not _differs(all_tables(storage, then), all_tables(scratch, then))
