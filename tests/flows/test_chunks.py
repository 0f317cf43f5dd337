"""Ingest in bounded chunks gives exactly the tables and quarantine of one big chunk."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import pytest

from flows import pipeline
from flows.storage import FileInfo, Storage

from support import all_tables, event, jsonl, land, meterset, run

METERS = """
meters:
  - {slug: tokens_total, eventType: prompt, aggregation: SUM, valueProperty: $.tokens, groupBy: {model: $.model}}
  - {slug: latest_tokens, eventType: prompt, aggregation: LATEST, valueProperty: $.tokens}
"""


def test_chunk_batches_keeps_order_and_bounds_size() -> None:
    files = [FileInfo(f"f{i}", size, float(i)) for i, size in enumerate([5, 5, 5, 20, 1, 1])]
    chunks = pipeline.chunk_batches(files, max_bytes=10)
    assert [[f.path for f in c] for c in chunks] == [["f0", "f1"], ["f2"], ["f3"], ["f4", "f5"]]


def test_chunks_weigh_compressed_batches_by_the_text_they_hold() -> None:
    files = [FileInfo("a.parquet", 10, 0.0), FileInfo("b.jsonl", 10, 1.0), FileInfo("c.jsonl.gz", 10, 2.0)]
    assert [pipeline.json_bytes(f) for f in files] == [100, 10, 80]
    chunks = pipeline.chunk_batches(files, max_bytes=100)
    assert [[f.path for f in c] for c in chunks] == [["a.parquet"], ["b.jsonl", "c.jsonl.gz"]]


def _land(storage: Storage) -> None:
    for b in range(6):
        events = [
            event(
                f"e{i}", f"2024-01-{1 + i % 28:02d}T00:00:{b:02d}Z", data={"tokens": i * (b + 1), "model": "ab"[i % 2]}
            )
            for i in range(40)
        ]  # the same ids in every batch: later copies (same date) are duplicates, first landed wins
        land(storage, f"b{b}.jsonl", jsonl([*events, "garbage"]), mtime=1_700_000_000 + b)


def test_small_chunks_equal_one_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    meters = meterset(METERS)
    one, many = Storage(str(tmp_path / "one")), Storage(str(tmp_path / "many"))
    _land(one)
    _land(many)
    first = run(one, meters)
    monkeypatch.setattr(pipeline, "CHUNK_BYTES", 1)  # one batch per chunk
    second = run(many, meters)
    for key in ("events_read", "events_valid", "duplicates_dropped", "events_stored", "quarantined"):
        assert first[key] == second[key], key
    assert first["events_stored"] == 40 and first["duplicates_dropped"] == 200
    expected, got = all_tables(one, meters), all_tables(many, meters)
    assert expected.keys() == got.keys()
    for name, table in expected.items():
        assert not table.is_empty() and table.equals(got[name]), name
    # the first landed copy won: batch 0's values (tokens = i)
    total = pl.read_parquet(f"{one.root}/usage/tokens_total/period/**/*.parquet")["value"].sum()
    assert total == sum(range(40))


def test_one_day_slices_equal_one_slice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recompute slices own their days' shared files: many slices give the tables of one."""
    from flows import recompute

    meters = meterset(METERS)
    one, many = Storage(str(tmp_path / "one")), Storage(str(tmp_path / "many"))
    _land(one)
    _land(many)
    run(one, meters)
    monkeypatch.setattr(recompute, "SLICE_BYTES", 1)  # every day its own slice
    run(many, meters)
    expected, got = all_tables(one, meters), all_tables(many, meters)
    for name, table in expected.items():
        assert not table.is_empty() and table.equals(got[name]), name


BAD_VALUE = jsonl([event("bad", "2024-01-05T01:00:00Z", data={"tokens": "many", "model": "a"})])


def test_backfill_of_one_meter_keeps_the_other_meters_state(tmp_path: Path) -> None:
    """Day partials and exclusions are shared per day: rebuilding one meter must not drop another's."""
    meters = meterset(METERS)
    storage = Storage(str(tmp_path / "root"))
    _land(storage)
    land(storage, "bad.jsonl", BAD_VALUE)
    run(storage, meters)
    before = all_tables(storage, meters)
    state_before = _state_rows(storage)
    pipeline.backfill(storage, meters, dt.date(2024, 1, 1), dt.date(2024, 2, 1), slugs=["latest_tokens"], log=str)
    assert _state_rows(storage) == state_before  # same rows per (kind, meter) in the shared day files
    # a late event for January: its period is combined from stored partials of every January day
    land(storage, "late.jsonl", jsonl([event("late", "2024-01-20T05:00:00Z", data={"tokens": 1000, "model": "a"})]))
    run(storage, meters)
    after = all_tables(storage, meters)
    fresh = Storage(str(tmp_path / "fresh"))
    _land(fresh)
    land(fresh, "bad.jsonl", BAD_VALUE)
    land(fresh, "late.jsonl", jsonl([event("late", "2024-01-20T05:00:00Z", data={"tokens": 1000, "model": "a"})]))
    run(fresh, meters)
    expected = all_tables(fresh, meters)
    for name, table in expected.items():
        assert table.equals(after[name]), name
    assert not before["tokens_total/period"].equals(after["tokens_total/period"])


def _state_rows(storage: Storage) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for prefix in ("_state/partials", "quarantine/meter"):
        files = [f.path for f in storage.list_files(prefix, (".parquet",))]
        rows = storage.read_parquet(files)
        if "window_start" in rows.columns:  # partial states, without the per-day sentinels of empty days
            rows = rows.filter(pl.col("window_start").is_not_null())
        counts = rows.group_by("meter").len().rows()
        out.update({(prefix, meter): n for meter, n in counts})
    assert {m for _, m in out} == {"tokens_total", "latest_tokens"}
    return out


def test_periods_combined_meter_by_meter_equal_all_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large periods are combined one meter at a time (bounded memory): same tables."""
    from flows import recompute

    meters = meterset(METERS)
    one, many = Storage(str(tmp_path / "one")), Storage(str(tmp_path / "many"))
    for storage in (one, many):
        _land(storage)
        land(storage, "bad.jsonl", BAD_VALUE)
    run(one, meters)
    monkeypatch.setattr(recompute, "PERIOD_READ_BYTES", 0)
    run(many, meters)
    expected, got = all_tables(one, meters), all_tables(many, meters)
    for name, table in expected.items():
        assert not table.is_empty() and table.equals(got[name]), name


def test_a_backfill_over_decades_writes_files_only_for_days_with_events(tmp_path: Path) -> None:
    """Days without events have nothing to compute: no day files, no state, whatever the range."""
    meters = meterset(METERS)
    storage = Storage(str(tmp_path / "root"))
    _land(storage)
    run(storage, meters)
    before = all_tables(storage, meters)
    event_days = {p.name for p in (tmp_path / "root" / "events").iterdir()}
    assert len(event_days) == 28

    summary = pipeline.backfill(storage, meters, dt.date(2000, 1, 1), dt.date(2030, 1, 1), log=str)

    for prefix in ("_state/partials", "usage/tokens_total/hourly", "usage/latest_tokens/hourly"):
        assert {p.name for p in (tmp_path / "root" / prefix).iterdir()} == event_days, prefix
    assert summary["hourly_partitions_recomputed"] == 2 * 28  # two meters, the days with events
    got = all_tables(storage, meters)
    for name, table in before.items():
        assert table.equals(got[name]), name


@pytest.mark.parametrize(("start", "end"), [((1677, 12, 31), (2024, 1, 1)), ((2024, 1, 1), (2262, 1, 2))])
def test_a_backfill_beyond_the_years_of_event_times_is_refused_before_anything_is_touched(
    tmp_path: Path, start: tuple, end: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deployment's backfill reaches pipeline.backfill without the command line's date check."""
    from flows import state

    storage = Storage(str(tmp_path / "root"))
    _land(storage)
    locked = []
    monkeypatch.setattr(state, "acquire_lock", lambda *a, **k: locked.append(a))
    with pytest.raises(ValueError, match=r"1678-01-01\.\.2262-01-01"):
        pipeline.backfill(storage, meterset(METERS), dt.date(*start), dt.date(*end), log=str)
    assert locked == []  # refused before the lock, not after it
    assert {p.name for p in (tmp_path / "root").iterdir()} == {"landing", "_state"}  # landed, nothing run
