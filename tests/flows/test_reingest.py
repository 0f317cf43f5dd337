"""`backfill --reingest` keeps every table, events/ and quarantine equal to a from-scratch run.

It rebuilds events/ for a range from the landed batches, so it must not lose the events of a batch
landed since the last run, must move every meter whose events it re-read (not only the `--meter` ones),
and must keep the dropped copies in quarantine.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import polars as pl
import pytest

from flows import pipeline
from flows.storage import Storage

from reference import assert_tables_match
from support import all_tables, event, jsonl, land, local_root, meterset, run

METERS = meterset(
    """
meters:
  - {slug: tokens, eventType: prompt, aggregation: SUM, valueProperty: $.v}
  - {slug: prompts, eventType: prompt, aggregation: COUNT}
"""
)


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # durability against power loss is not tested here
    monkeypatch.setattr(os, "sync", lambda: None)


def _ev(i: int, day: int) -> dict:
    return event(f"e{i}", f"2024-01-{day:02d}T10:00:00Z", data={"v": i})


def _reingest(storage: Storage, start: str, end: str, **kw) -> dict:
    s, e = dt.date.fromisoformat(start), dt.date.fromisoformat(end)
    return pipeline.backfill(storage, METERS, s, e, reingest_landing=True, log=lambda _: None, **kw)


def _ids(storage: Storage) -> list[str]:
    files = [f.path for f in storage.list_files("events", (".parquet",))]
    return sorted(storage.scan_parquet(files).collect()["id"].to_list())


def _quarantine(storage: Storage) -> list[tuple]:
    files = [f.path for f in storage.list_files("quarantine/records", (".parquet",))]
    return sorted(storage.read_parquet(files).select("stage", "reason", "file", "line").rows()) if files else []


def _scratch(tmp_path: Path, batches: list[tuple[str, bytes]]) -> Storage:
    root = local_root(tmp_path, "scratch")
    for i, (name, content) in enumerate(batches):
        land(root, name, content, mtime=1_700_000_000 + 10 * i)
    run(root, METERS)
    return root


def test_a_batch_landed_since_the_last_run_keeps_its_events_outside_the_range(tmp_path: Path) -> None:
    batches = [("1.jsonl", jsonl([_ev(1, 3)])), ("2.jsonl", jsonl([_ev(2, 3), _ev(3, 20)]))]
    storage = local_root(tmp_path)
    land(storage, *batches[0], mtime=1_700_000_000)
    run(storage, METERS)
    land(storage, *batches[1], mtime=1_700_000_010)  # not run yet; one event inside the range, one after it
    _reingest(storage, "2024-01-01", "2024-01-10")
    run(storage, METERS)
    scratch = _scratch(tmp_path, batches)
    assert _ids(storage) == _ids(scratch) == ["e1", "e2", "e3"]
    for key, table in all_tables(scratch, METERS).items():
        assert_tables_match(all_tables(storage, METERS)[key], table, key)
    assert _quarantine(storage) == _quarantine(scratch)


def test_reingest_for_one_meter_moves_every_meter_of_the_events_it_changed(tmp_path: Path) -> None:
    storage = local_root(tmp_path)
    land(storage, "1.jsonl", jsonl([_ev(1, 3), _ev(2, 4)]), mtime=1_700_000_000)
    run(storage, METERS)
    land(storage, "1.jsonl", jsonl([_ev(7, 3)]), mtime=1_700_000_010)  # re-landed: e1 and e2 leave landing/
    run(storage, METERS)
    _reingest(storage, "2024-01-01", "2024-02-01", slugs=["tokens"])
    assert _ids(storage) == ["e7"]
    tables = all_tables(storage, METERS)
    assert tables["tokens/period"]["value"].to_list() == [7.0]
    assert tables["prompts/period"]["value"].to_list() == [1.0], "prompts still counts events no longer stored"
    assert tables["prompts/hourly"].select(pl.col("value").sum()).item() == 1.0


def test_reingest_keeps_the_dropped_copies_in_quarantine(tmp_path: Path) -> None:
    batches = [
        ("1.jsonl", jsonl([_ev(1, 3), _ev(2, 4)])),
        ("2.jsonl", jsonl([_ev(1, 3), _ev(5, 20), "not json"])),  # a copy of e1 and a rejected line
    ]
    storage = _scratch(tmp_path, batches)
    before = _quarantine(storage)
    assert ("dedupe", "duplicate", "landing/2.jsonl", 1) in before
    _reingest(storage, "2024-01-01", "2024-02-01")
    assert _quarantine(storage) == before
    _reingest(storage, "2024-01-10", "2024-01-25")  # a range without the copy's date
    assert _quarantine(storage) == before


def test_reingest_counts_the_dropped_copies_of_an_unread_batch_as_a_run_would(tmp_path: Path) -> None:
    """The summary's `duplicates_dropped` matches the `duplicate` rows the re-ingest leaves in quarantine."""
    storage = local_root(tmp_path)
    land(storage, "1.jsonl", jsonl([_ev(1, 20)]), mtime=1_700_000_000)
    run(storage, METERS)
    land(storage, "2.jsonl", jsonl([_ev(1, 20), _ev(2, 3)]), mtime=1_700_000_010)  # a copy outside the range
    out = _reingest(storage, "2024-01-01", "2024-01-10")
    assert out["duplicates_dropped"] == 1
    assert [r[1] for r in _quarantine(storage)] == ["duplicate"]


def test_a_reingest_leaves_the_events_of_its_end_date_as_they_are(tmp_path: Path) -> None:
    """[Jan 3, Jan 4) re-reads Jan 3 only: Jan 4's stored event is neither stored again nor deleted."""
    storage = _scratch(tmp_path, [("1.jsonl", jsonl([_ev(1, 3), _ev(2, 4)]))])
    before = all_tables(storage, METERS)
    _reingest(storage, "2024-01-03", "2024-01-04")
    assert _ids(storage) == ["e1", "e2"]
    for key, table in before.items():
        assert_tables_match(all_tables(storage, METERS)[key], table, key)


def test_reingest_says_how_many_stored_events_no_landed_batch_holds_any_more(tmp_path: Path) -> None:
    """A batch deleted from landing/ (and a re-landed one without an event) takes its events out of the range."""
    storage = local_root(tmp_path)
    land(storage, "1.jsonl", jsonl([_ev(1, 3), _ev(2, 4)]), mtime=1_700_000_000)
    land(storage, "2.jsonl", jsonl([_ev(3, 5), _ev(4, 20)]), mtime=1_700_000_010)
    land(storage, "3.jsonl", jsonl([_ev(5, 6)]), mtime=1_700_000_020)
    run(storage, METERS)
    storage.delete(["landing/2.jsonl"])
    land(storage, "1.jsonl", jsonl([_ev(1, 3)]), mtime=1_700_000_030)  # e2 is gone from its new version
    land(storage, "4.jsonl", jsonl([_ev(6, 7)]), mtime=1_700_000_040)  # new: stored, not removed
    lines: list[str] = []
    out = pipeline.backfill(
        storage, METERS, dt.date(2024, 1, 1), dt.date(2024, 1, 10), reingest_landing=True, log=lines.append
    )
    assert out["events_removed"] == 2  # e2 and e3; e4 lies outside the range and stays
    assert "removed from events/: 2 events of the range" in lines[-1]
    assert _ids(storage) == ["e1", "e4", "e5", "e6"]
    again = _reingest(storage, "2024-01-01", "2024-01-10")
    assert again["events_removed"] == 0
    assert run(storage, METERS)["events_removed"] == 0


@pytest.mark.parametrize("gone", ["deleted", "replaced"])
def test_a_batch_landed_again_after_a_reingest_dropped_its_events_is_read_again(tmp_path: Path, gone: str) -> None:
    """1.jsonl is read, then leaves landing/ (deleted, or re-landed with other content), and a re-ingest drops its
    events. The producer lands the very same bytes again: its events are landed, so they count (a from-scratch run
    over the landed files stores them); it is not a touched file whose events are already stored."""
    original = jsonl([_ev(1, 3), _ev(2, 4)])
    other = jsonl([_ev(7, 3)])
    storage = local_root(tmp_path)
    land(storage, "1.jsonl", original, mtime=1_700_000_000)
    land(storage, "keep.jsonl", jsonl([_ev(9, 20)]), mtime=1_700_000_001)
    run(storage, METERS)
    if gone == "deleted":
        storage.delete(["landing/1.jsonl"])
    else:
        land(storage, "1.jsonl", other, mtime=1_700_000_010)
        run(storage, METERS)
    _reingest(storage, "2024-01-01", "2024-02-01")
    assert "e1" not in _ids(storage)
    land(storage, "1.jsonl", original, mtime=1_700_000_020)  # the same path and bytes as the first time
    run(storage, METERS)
    scratch = _scratch(
        tmp_path,
        [
            ("keep.jsonl", jsonl([_ev(9, 20)])),
            *([("v2/1.jsonl", other)] if gone == "replaced" else []),
            ("1.jsonl", original),
        ],
    )
    assert _ids(storage) == _ids(scratch) == sorted(["e1", "e2", "e9", *(["e7"] if gone == "replaced" else [])])
    for key, table in all_tables(scratch, METERS).items():
        assert_tables_match(all_tables(storage, METERS)[key], table, key)


def test_a_batch_restored_with_its_old_mtime_after_a_reingest_dropped_its_events_is_read_again(tmp_path: Path) -> None:
    """`cp -p` or `rsync -t` bring back the file's path, size and modification time: the listing alone must not
    take it for the batch the manifest once read."""
    original = jsonl([_ev(1, 3), _ev(2, 4)])
    storage = local_root(tmp_path)
    land(storage, "1.jsonl", original, mtime=1_700_000_000)
    run(storage, METERS)
    storage.delete(["landing/1.jsonl"])
    _reingest(storage, "2024-01-01", "2024-02-01")
    assert not storage.list_files("events", (".parquet",))
    land(storage, "1.jsonl", original, mtime=1_700_000_000)
    assert run(storage, METERS)["events_stored"] == 2
    assert _ids(storage) == ["e1", "e2"]
    assert run(storage, METERS)["batches"] == 0  # read once, then known again


def test_a_reingest_killed_after_forgetting_a_batch_leaves_every_known_batch_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between forgetting and its commit: the re-ingest is rolled back, its events stay, and the batch it
    forgot is merely read again when it lands again (deduplicated), never skipped with its events gone."""
    original = jsonl([_ev(1, 3)])
    storage = local_root(tmp_path)
    land(storage, "1.jsonl", original, mtime=1_700_000_000)
    land(storage, "2.jsonl", jsonl([_ev(2, 5)]), mtime=1_700_000_001)
    run(storage, METERS)
    storage.delete(["landing/1.jsonl"])

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(pipeline.state, "commit_manifest", killed)
        with pytest.raises(KeyboardInterrupt):
            _reingest(storage, "2024-01-01", "2024-02-01")
    run(storage, METERS)  # rolls the re-ingest back: e1 is still stored
    assert _ids(storage) == ["e1", "e2"]
    land(storage, "1.jsonl", original, mtime=1_700_000_050)
    out = run(storage, METERS)
    assert (out["events_stored"], out["duplicates_dropped"]) == (0, 1)
    assert _ids(storage) == ["e1", "e2"]
