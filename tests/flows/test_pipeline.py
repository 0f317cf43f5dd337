"""flows.pipeline: deduplication against the curated store, and the order in which a run writes."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from flows import pipeline, state
from flows.storage import Storage
from transforms.dedupe import dedupe
from transforms.schema import EVENT, conform

from support import event, jsonl, land, local_root, meterset, run


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


def test_the_manifest_is_written_after_every_data_file_of_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest is the commit point: a crash before it must leave batches unrecorded, so the next run
    rolls back and redoes them. A data file written after it could be lost with the batch marked done."""
    storage = local_root(tmp_path)
    lines = [
        event("1", "2024-01-10T10:00:00Z", data={"tokens": 1}),
        event("2", "2024-02-10T10:00:00Z", data={"tokens": "many"}),  # excluded: quarantine/meter
        "not json",  # quarantine/records
    ]
    land(storage, "a.jsonl", jsonl(lines))
    writes: list[str] = []
    write_bytes = Storage.write_bytes

    def spy(self: Storage, rel: str, data: bytes) -> None:  # every write ends here, write_parquet_many's too
        writes.append(rel)
        write_bytes(self, rel, data)

    monkeypatch.setattr(Storage, "write_bytes", spy)
    run(storage, meterset("meters: [{slug: t, eventType: prompt, aggregation: SUM, valueProperty: $.tokens}]"))

    manifests = [i for i, rel in enumerate(writes) if rel.startswith(f"{state.MANIFEST}/")]
    assert len(manifests) == 1, writes
    data = [rel for rel in writes if rel.startswith(("events/", "usage/", "quarantine/"))]
    for prefix in ("events/", "usage/t/period/", "usage/t/hourly/", "quarantine/records/", "quarantine/meter/"):
        assert any(rel.startswith(prefix) for rel in data), f"the run wrote nothing under {prefix}: {writes}"
    late = [rel for rel in writes[manifests[0] :] if rel in data]
    assert late == [], f"written after the manifest: {late}"
    records = [i for i, rel in enumerate(writes) if rel.startswith(f"{state.RUNS}/")]
    assert records and records[0] > manifests[0], "the run record describes a committed run: it comes after"


def test_data_text_that_is_not_json_is_quarantined_not_counted(tmp_path: Path) -> None:
    """A payload sent as text (a JSON string in JSONL, a Parquet text column) is checked as JSON: a broken one
    is `bad_data` in quarantine, not an event that COUNT bills and every other meter excludes."""
    from support import parquet_bytes

    storage = local_root(tmp_path)
    meters = meterset("meters:\n  - {slug: requests, eventType: prompt, aggregation: COUNT}\n")
    t = "2024-01-01T00:00:00Z"
    jsonl_data = [{"v": 1}, '{"v": 1,', ' {"v": 2}']
    land(storage, "a.jsonl", jsonl([event(f"j{i + 1}", t, data=d) for i, d in enumerate(jsonl_data)]))
    # A file without any backslash, where a payload sent as a string cannot hold a quote.
    land(storage, "c.jsonl", jsonl([event("k1", t, data={"v": 1}), event("k2", t, data="{not json}")]))
    # Arrays that hold a quote, in a file without a backslash: not objects either.
    land(storage, "d.jsonl", jsonl([event("m1", t, data=["x"]), event("m2", t, data=[{"v": 1}])]))
    texts = ['{"v": 1}', "{not json}", '{"v": NaN}', '{"v": 4} trailing']
    rows = [event(f"p{i}", t, data=text) for i, text in enumerate(texts)]
    land(storage, "b.parquet", parquet_bytes(pl.DataFrame(rows)))
    summary = run(storage, meters)
    assert summary["events_stored"] == 4
    quarantine = pl.read_parquet(f"{storage.root}/quarantine/records/*.parquet")
    assert sorted(quarantine.select("event_id", "reason").rows()) == [
        ("j2", "bad_data"),
        ("k2", "bad_data"),
        ("m1", "bad_data"),
        ("m2", "bad_data"),
        ("p1", "bad_data"),
        ("p2", "bad_data"),
        ("p3", "bad_data"),
    ]
    stored = pl.read_parquet(f"{storage.root}/events/**/*.parquet")["id"].sort().to_list()
    assert stored == ["j1", "j3", "k1", "p0"]
    assert pl.read_parquet(f"{storage.root}/usage/requests/period/**/*.parquet")["value"].to_list() == [4.0]


def test_a_run_killed_before_its_commit_has_its_tables_redone_even_if_the_batch_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The killed run published January 5 and then died before the manifest: its events are rolled back. The
    batch is re-landed meanwhile without that event, so the next run's own events do not touch January 5: only
    the rolled-back run's pending record says that day's tables must be rebuilt (here: deleted)."""
    storage = local_root(tmp_path)
    meters = meterset("meters: [{slug: t, eventType: prompt, aggregation: SUM, valueProperty: $.tokens}]")
    land(storage, "a.jsonl", jsonl([event("1", "2024-01-05T10:00:00Z", data={"tokens": 1})]))

    def killed(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(state, "commit_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        run(storage, meters)
    monkeypatch.undo()
    assert storage.exists(pipeline.hourly_file("t", "2024-01-05"))  # published before the kill
    land(storage, "a.jsonl", jsonl([event("2", "2024-02-07T10:00:00Z", data={"tokens": 2})]))

    run(storage, meters)

    assert storage.list_dirs("usage/t/hourly") == ["date=2024-02-07"]
    assert storage.list_dirs("usage/t/period") == ["period_start=2024-02-01"]
