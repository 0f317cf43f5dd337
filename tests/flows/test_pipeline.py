"""flows.pipeline pieces below a whole run: deduplication against the curated store."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from flows import pipeline
from transforms.dedupe import dedupe
from transforms.schema import EVENT, conform

from support import local_root


def _events(rows: list[tuple[str, str, str]], batch: str) -> pl.DataFrame:
    """(id, source, date) rows as curated events, in landing order."""
    return conform(
        pl.DataFrame(
            {
                "id": [r[0] for r in rows],
                "source": [r[1] for r in rows],
                "date": [r[2] for r in rows],
                "type": "prompt",
                "subject": "customer-1",
                "batch": batch,
                "line": list(range(1, len(rows) + 1)),
            }
        ),
        EVENT,
    )


def test_dedupe_against_store_matches_the_whole_key_across_files_and_dates(tmp_path: Path) -> None:
    storage = local_root(tmp_path)
    pipeline.write_events(storage, _events([("a", "app", "2024-01-01"), ("b", "app", "2024-01-02")], "b1"), "run1")
    pipeline.write_events(storage, _events([("c", "app", "2024-01-01"), ("d", "web", "2024-01-03")], "b2"), "run2")
    new = _events(
        [
            ("x", "app", "2024-01-01"),  # new id
            ("a", "app", "2024-01-01"),  # stored in run1's file
            ("a", "web", "2024-01-01"),  # same id, another source: another event
            ("b", "app", "2024-01-03"),  # same id and source on another date: outside the horizon
            ("c", "app", "2024-01-01"),  # stored in run2's file
            ("d", "web", "2024-01-03"),  # stored, on a date only run2 touched
            ("x", "app", "2024-01-01"),  # an earlier copy in this chunk
            ("y", "app", "2024-01-05"),  # a date with nothing stored
        ],
        "b3",
    )

    kept, dups = pipeline.dedupe_against_store(storage, new)

    assert kept.select("id", "source", "date").rows() == [
        ("x", "app", "2024-01-01"),
        ("a", "web", "2024-01-01"),
        ("b", "app", "2024-01-03"),
        ("y", "app", "2024-01-05"),
    ]
    assert dups.select("id", "source", "line", "_dup").rows() == [
        ("a", "app", 2, "already in the curated store"),
        ("c", "app", 5, "already in the curated store"),
        ("d", "web", 6, "already in the curated store"),
        ("x", "app", 7, "an earlier copy in this run"),
    ]


def test_dedupe_against_store_equals_dedupe_with_every_stored_key(tmp_path: Path) -> None:
    """The hash filter in the scan only narrows the stored keys: the result is the same as with all of them."""
    storage = local_root(tmp_path)
    days = [f"2024-01-{d:02d}" for d in range(1, 6)]
    for r in range(3):
        rows = [(str(i), f"s{i % 3}", days[(i + r) % 5]) for i in range(r * 300, r * 300 + 600)]
        pipeline.write_events(storage, _events(rows, f"b{r}"), f"run{r}")
    new = _events([(str(i), f"s{i % 4}", days[i % 5]) for i in range(0, 1500, 2)], "new")
    stored = pl.read_parquet(storage.path("events/**/*.parquet")).select("date", "source", "id")

    kept, dups = pipeline.dedupe_against_store(storage, new)
    want_kept, want_dups = dedupe(new, stored)

    assert dups.height > 50 and kept.height > 50  # both outcomes occur
    assert kept.equals(want_kept) and dups.equals(want_dups)
