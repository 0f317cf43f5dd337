"""Ingest in bounded chunks gives exactly the tables and quarantine of one big chunk."""

from __future__ import annotations

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
