"""End-to-end behaviours of one run (SPEC §1, §2, §4, §5), with expectations computed by hand."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

from flows import pipeline
from flows.storage import Storage
from meters import parse_meters
from transforms.extract import EXCLUSION_MESSAGES

from support import event, jsonl, land, local_root, parquet_bytes, rounding_events, table

METERS = parse_meters(
    """
billing: {period: MONTH, timezone: Europe/Berlin}
meters:
  - slug: tokens_total
    eventType: prompt
    aggregation: SUM
    valueProperty: $.tokens
    groupBy: {model: $.model, region: $.region}
  - slug: prompts
    eventType: prompt
    aggregation: COUNT
"""
)
UTC = dt.UTC


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync only matters for power loss, which no test here simulates."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


def quiet_run(storage: Storage) -> dict:
    return pipeline.run(storage, METERS, log=lambda _: None)


def quarantine(storage: Storage) -> pl.DataFrame:
    files = [f.path for f in storage.list_files("quarantine", (".parquet",))]
    return storage.scan_parquet(files).collect() if files else pl.DataFrame()


def events(storage: Storage) -> pl.DataFrame:
    files = [f.path for f in storage.list_files("events", (".parquet",))]
    return storage.scan_parquet(files).collect() if files else pl.DataFrame()


def values(df: pl.DataFrame, *keys: str) -> dict:
    """{(key values...): value} of a table, so assertions ignore row order."""
    return {tuple(r[k] for k in keys): r["value"] for r in df.iter_rows(named=True)}


def all_files(storage: Storage) -> dict[str, bytes]:
    base = Path(storage.root)
    return {str(p.relative_to(base)): p.read_bytes() for p in base.rglob("*") if p.is_file()}


# --- idempotence ------------------------------------------------------------------------------------------------
def test_a_second_run_with_nothing_new_changes_nothing(tmp_path: Path) -> None:
    storage = local_root(tmp_path)
    land(storage, "a.jsonl", jsonl([event(str(i), f"2024-01-31T2{i}:30:00Z", data={"tokens": i}) for i in range(4)]))
    land(storage, "b.jsonl", jsonl([event("9", "2024-02-01T00:00:00+02:00", data={"tokens": 9}), "bad line"]))
    quiet_run(storage)
    before = all_files(storage)
    summary = quiet_run(storage)
    assert summary["batches"] == 0 and summary["events_read"] == 0
    after = all_files(storage)
    new = set(after) - set(before)
    assert len(new) == 1 and next(iter(new)).startswith("_state/runs/"), f"unexpected new files {new}"
    assert set(before) - set(after) == set(), "a run with nothing new deleted files"
    changed = [k for k in before if before[k] != after[k]]
    assert changed == [], f"a run with nothing new rewrote {changed}"

    # a touched file (new mtime, same bytes) is recognised as already processed: outputs stay byte-identical
    land(storage, "a.jsonl", (tmp_path / "root/landing/a.jsonl").read_bytes(), mtime=2_000_000_000)
    summary = quiet_run(storage)
    assert summary["batches_unchanged"] == 1 and summary["events_stored"] == 0
    touched = all_files(storage)
    for prefix in ("usage/", "events/", "quarantine/"):
        assert {k: v for k, v in touched.items() if k.startswith(prefix)} == {
            k: v for k, v in before.items() if k.startswith(prefix)
        }
    # and recorded in the manifest: the next run does not read it again
    assert quiet_run(storage)["batches"] == 0


def test_a_backfill_run_twice_writes_the_same_bytes(tmp_path: Path) -> None:
    """Idempotent to the last bit: many groups whose sums round differently if their rows are added in
    another order (Polars' streaming engine did that from one computation to the next)."""
    storage = local_root(tmp_path)
    land(storage, "a.jsonl", jsonl(rounding_events(40_000, subjects=2000)))
    quiet_run(storage)
    snapshots = [all_files(storage)]
    for _ in range(2):
        pipeline.backfill(storage, METERS, dt.date(2024, 1, 1), dt.date(2024, 2, 1), log=lambda _: None)
        snapshots.append(all_files(storage))

    def under(files: dict[str, bytes], prefix: str) -> dict[str, bytes]:
        return {k: v for k, v in files.items() if k.startswith(prefix)}

    run, once, twice = snapshots
    assert under(run, "usage/") and under(run, "usage/") == under(once, "usage/")  # the run's tables, exactly
    for prefix in ("usage/", "_state/partials/"):  # (the backfill marks every day it did)
        assert under(once, prefix) and under(once, prefix) == under(twice, prefix), prefix


# --- bad input ---------------------------------------------------------------------------------------------------
def test_a_malformed_line_quarantines_only_that_line(tmp_path: Path) -> None:
    storage = local_root(tmp_path)
    lines = [
        event("1", "2024-01-10T10:00:00Z", data={"tokens": 1}),
        event("2", "2024-01-10T10:00:00Z", data={"tokens": 2}),
        '{"id": "3", "source": "app", oops',  # line 3
        event("4", "2024-01-10T10:00:00Z", data={"tokens": 4}),
        "",  # line 5: blank, ignored
        "[1, 2, 3]",  # line 6: JSON, but not an object
        event("7", "2024-01-10T10:00:00Z", data={"tokens": 7}),
    ]
    land(storage, "x/b.jsonl", jsonl(lines))
    summary = quiet_run(storage)
    assert summary["quarantined"] == {"malformed_json": 2}
    q = quarantine(storage).filter(pl.col("reason") == "malformed_json").sort("line")
    assert q["line"].to_list() == [3, 6]
    assert q["raw"].to_list() == ['{"id": "3", "source": "app", oops', "[1, 2, 3]"]
    assert q["file"].to_list() == ["landing/x/b.jsonl"] * 2
    assert sorted(events(storage)["id"].to_list()) == ["1", "2", "4", "7"]
    assert table(storage, "tokens_total")["value"].to_list() == [14.0]


def test_unreadable_files_are_quarantined_whole_and_the_run_goes_on(tmp_path: Path) -> None:
    storage = local_root(tmp_path)
    good = pl.DataFrame(
        {"specversion": ["1.0"], "id": ["p1"], "source": ["app"], "type": ["prompt"], "subject": ["c"],
         "time": ["2024-01-10T10:00:00Z"], "data": ['{"tokens": 5}']}
    )  # fmt: skip
    raw = parquet_bytes(good)
    land(storage, "t/truncated.parquet", raw[: len(raw) // 2], mtime=1_700_000_000)
    land(storage, "t/bad.jsonl.gz", b"\x1f\x8b\x08\x00garbage", mtime=1_700_000_010)
    land(storage, "t/ok.jsonl", jsonl([event("j1", "2024-01-10T11:00:00Z", data={"tokens": 3})]), mtime=1_700_000_020)
    land(storage, "t/ok.parquet", raw, mtime=1_700_000_030)
    summary = quiet_run(storage)
    q = quarantine(storage).sort("file")
    assert q.select("stage", "reason", "file").rows() == [
        ("file", "unreadable_file", "landing/t/bad.jsonl.gz"),
        ("file", "unreadable_file", "landing/t/truncated.parquet"),
    ]
    assert all(q["message"].str.len_chars() > 0)
    assert summary["events_stored"] == 2
    assert summary["events_read"] == 2  # an unreadable file is counted under its reason, not as an event
    # `date` is the run's UTC day, YYYY-MM-DD as in quarantine/meter/: one glob reads both with one format
    run_id = summary["run_id"]  # YYYYMMDDTHHMMSSZ-...
    assert q["date"].to_list() == [f"{run_id[:4]}-{run_id[4:6]}-{run_id[6:8]}"] * 2
    assert summary["quarantined"] == {"unreadable_file": 2}
    # The counts add up: events read = valid + records quarantined; the files are counted apart, and the
    # printed summary says which is which (it read "events read 2, valid 2 ... quarantined 2").
    assert (summary["records_quarantined"], summary["files_unreadable"]) == (0, 2)
    assert summary["events_read"] == summary["events_valid"] + summary["records_quarantined"]
    assert "quarantined 2 (0 records, 2 unreadable files): unreadable_file 2" in pipeline.format_summary(summary)
    assert values(table(storage, "tokens_total"), "subject") == {("c",): 5.0, ("customer-1",): 3.0}
    # quarantined files are recorded as processed: the next run does not retry them forever
    assert quiet_run(storage)["batches"] == 0
    # a re-ingest reads them again and counts them the same way
    again = pipeline.backfill(
        storage, METERS, dt.date(2024, 1, 1), dt.date(2024, 2, 1), reingest_landing=True, log=lambda _: None
    )
    assert (again["events_read"], again["quarantined"]) == (2, {"unreadable_file": 2})


def test_the_summary_counts_each_record_read_once_a_dropped_copy_included(tmp_path: Path) -> None:
    """A dropped copy is a record read (and valid); its `dedupe` quarantine row is not another record."""
    storage = local_root(tmp_path)
    a = event("a", "2024-01-10T10:00:00Z", data={"tokens": 1})
    land(storage, "1.jsonl", jsonl([a, a, "not json"]), mtime=1_700_000_000)
    land(storage, "2.jsonl", jsonl([a, event("b", "2024-01-10T11:00:00Z")]), mtime=1_700_000_010)
    summary = quiet_run(storage)
    assert (summary["events_read"], summary["events_valid"]) == (5, 4)
    assert (summary["duplicates_dropped"], summary["events_stored"]) == (2, 2)
    assert summary["quarantined"] == {"malformed_json": 1}


def test_a_key_first_seen_after_ten_thousand_events_is_extracted(tmp_path: Path) -> None:
    storage = local_root(tmp_path)
    base = "2024-01-10T10:{:02d}:00Z"
    first = [event(f"n{i}", base.format(i % 60)) for i in range(10_000)]  # data: null
    first += [event(f"d{i}", base.format(i % 60), data={"tokens": 1}) for i in range(10_000)]  # no model/region
    late = event("late", "2024-01-10T10:30:00Z", data={"tokens": 5, "model": "m", "region": "eu"}, dataschema="x")
    land(storage, "big.jsonl", jsonl([*first, late]))
    quiet_run(storage)
    got = values(table(storage, "tokens_total", "hourly"), "model", "region")
    assert got == {(None, None): 10_000.0, ("m", "eu"): 5.0}
    assert table(storage, "prompts", "hourly")["value"].to_list() == [20_001.0]


def test_parquet_data_as_struct_and_as_string_in_one_run(tmp_path: Path) -> None:
    storage = local_root(tmp_path)
    envelope = {"specversion": "1.0", "source": "pq", "type": "prompt", "subject": "c"}
    struct_df = pl.DataFrame(
        [
            {**envelope, "id": "s1", "time": dt.datetime(2024, 1, 10, 10, tzinfo=UTC), "data": {"tokens": 4, "model": "a"}},
            {**envelope, "id": "s2", "time": dt.datetime(2024, 1, 10, 11, tzinfo=UTC), "data": {"tokens": 6, "model": None}},
            {**envelope, "id": "s3", "time": dt.datetime(2024, 1, 10, 12, tzinfo=UTC), "data": None},
        ],
        schema={**dict.fromkeys(envelope, pl.String), "id": pl.String, "time": pl.Datetime("ns", "UTC"),
                "data": pl.Struct({"tokens": pl.Int64, "model": pl.String})},
    )  # fmt: skip
    string_df = pl.DataFrame(
        [
            {**envelope, "id": "t1", "time": "2024-01-10T10:00:00+01:00", "data": '{"tokens": "10", "model": "a"}'},
            {**envelope, "id": "t2", "time": "2024-01-10T10:00:00Z", "data": '{"tokens": 1.5, "region": "eu"}'},
            {**envelope, "id": "t3", "time": "2024-01-10T10:00:00Z", "data": "null"},
        ]
    )
    land(storage, "p/struct.parquet", parquet_bytes(struct_df))
    land(storage, "p/string.parquet", parquet_bytes(string_df))
    summary = quiet_run(storage)
    assert summary["events_stored"] == 6 and summary["quarantined"] == {}
    assert values(table(storage, "tokens_total"), "model", "region") == {
        ("a", None): 14.0,
        (None, None): 6.0,
        (None, "eu"): 1.5,
    }
    assert table(storage, "prompts")["value"].to_list() == [6.0]
    hourly = values(table(storage, "tokens_total", "hourly"), "window_start", "model")
    assert hourly[(dt.datetime(2024, 1, 10, 9, tzinfo=UTC), "a")] == 10.0  # 10:00+01:00 is 09:00 UTC
    assert hourly[(dt.datetime(2024, 1, 10, 10, tzinfo=UTC), "a")] == 4.0


# --- readers ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Storage:
    """Two billing periods and three UTC dates, with null group values."""
    storage = local_root(tmp_path_factory.mktemp("readers"))
    land(
        storage,
        "r.jsonl",
        jsonl(
            [
                event("1", "2024-01-15T10:00:00Z", data={"tokens": 1, "model": "a"}),
                event("2", "2024-01-31T23:30:00Z", data={"tokens": 2, "model": "a"}),  # Feb 1 in Berlin
                event("3", "2024-02-02T10:00:00Z", data={"tokens": 4}),
                event("4", "2024-02-02T10:00:00Z", subject="other", data={"tokens": 8, "region": "eu"}),
            ]
        ),
    )
    quiet_run(storage)
    return storage


EXPECTED_PERIOD = {
    ("customer-1", "a", None, dt.datetime(2023, 12, 31, 23, tzinfo=UTC)): 1.0,
    ("customer-1", "a", None, dt.datetime(2024, 1, 31, 23, tzinfo=UTC)): 2.0,
    ("customer-1", None, None, dt.datetime(2024, 1, 31, 23, tzinfo=UTC)): 4.0,
    ("other", None, "eu", dt.datetime(2024, 1, 31, 23, tzinfo=UTC)): 8.0,
}
EXPECTED_HOURLY_ROWS = 4


def _as_utc(value: object) -> dt.datetime:
    assert isinstance(value, dt.datetime) and value.tzinfo is not None, f"{value!r} is not a zoned timestamp"
    return value.astimezone(UTC)


def _check_rows(rows: list[dict], kind: str) -> None:
    if kind == "period":
        got = {(r["subject"], r["model"], r["region"], _as_utc(r["window_start"])): r["value"] for r in rows}
        assert got == EXPECTED_PERIOD
    else:
        assert len(rows) == EXPECTED_HOURLY_ROWS
        assert sum(r["value"] for r in rows) == 15.0


@pytest.mark.parametrize("kind", ["period", "hourly"])
def test_tables_readable_by_polars_duckdb_and_pyarrow(published: Storage, kind: str) -> None:
    folder = f"{published.root}/usage/tokens_total/{kind}"
    lf = pl.scan_parquet(f"{folder}/**/*.parquet")
    df = lf.collect()
    assert df.schema["subject"] == pl.String and df.schema["window_start"] == pl.Datetime("us", "UTC")
    assert df.schema["value"] == pl.Float64
    _check_rows(df.to_dicts(), kind)

    rel = duckdb.read_parquet(f"{folder}/**/*.parquet", hive_partitioning=True)
    columns = rel.columns
    _check_rows([dict(zip(columns, row, strict=True)) for row in rel.fetchall()], kind)

    table_ = pads.dataset(folder, format="parquet", partitioning="hive").to_table()
    assert pa.types.is_timestamp(table_.schema.field("window_start").type)
    _check_rows(table_.to_pylist(), kind)


def test_events_files_keep_dictionaries_for_repeated_values_only(published: Storage) -> None:
    path = next(Path(published.root, "events").rglob("*.parquet"))
    meta = pq.read_metadata(path)
    columns = [meta.row_group(0).column(i) for i in range(meta.num_columns)]
    with_dictionary = {c.path_in_schema for c in columns if c.has_dictionary_page}
    assert with_dictionary == set(pipeline.EVENT_DICTIONARY)  # not id, time, data, line


def test_no_temporary_or_hidden_files_in_published_prefixes(published: Storage) -> None:
    for path in Path(published.root, "usage").rglob("*"):
        if path.is_file():
            assert path.suffix == ".parquet" and not path.name.startswith((".", "_")), path


# --- meters and quarantine ---------------------------------------------------------------------------------------
def test_an_invalid_value_excludes_the_event_from_that_meter_only(tmp_path: Path) -> None:
    storage = local_root(tmp_path)
    land(
        storage,
        "v.jsonl",
        jsonl(
            [
                event("ok", "2024-01-10T10:00:00Z", data={"tokens": "12.5"}),
                event("bad", "2024-01-10T10:00:00Z", data={"tokens": "twelve"}),
                event("nan", "2024-01-10T10:00:00Z", data={"tokens": "NaN"}),
                event("object", "2024-01-10T10:00:00Z", data={"tokens": {"n": 3}}),  # defeats the decoder
                event("null", "2024-01-10T10:00:00Z", data={"tokens": None}),
                event("none", "2024-01-10T10:00:00Z", data={"model": "a"}),
                event("nodata", "2024-01-10T10:00:00Z"),
                event("other-type", "2024-01-10T10:00:00Z", type="nometer", data={"tokens": 1}),
            ]
        ),
    )
    quiet_run(storage)
    assert table(storage, "tokens_total")["value"].to_list() == [12.5]
    assert table(storage, "prompts")["value"].to_list() == [7.0]  # every prompt event counts
    q = quarantine(storage).filter(pl.col("stage") == "meter").sort("event_id")
    assert q.select("event_id", "meter", "reason").rows() == [
        ("bad", "tokens_total", "bad_value"),
        ("nan", "tokens_total", "bad_value"),
        ("nodata", "tokens_total", "missing_value"),
        ("none", "tokens_total", "missing_value"),
        ("null", "tokens_total", "missing_value"),
        ("object", "tokens_total", "bad_value"),
    ]
    assert q.filter(pl.col("event_id") == "bad")["line"].to_list() == [2]
    for row in q.iter_rows(named=True):
        assert row["message"] == EXCLUSION_MESSAGES[row["reason"]], row
    # each message says what its reason means: a swap of the two must not pass
    missing, bad = EXCLUSION_MESSAGES["missing_value"], EXCLUSION_MESSAGES["bad_value"]
    assert missing != bad
    assert "missing" in missing and "missing" not in bad
    assert "number" in bad and "number" not in missing
    assert "nometer" in events(storage)["type"].to_list()  # kept, moves no meter


def test_quarantine_rows_carry_reason_message_file_line_event_id_and_raw(tmp_path: Path) -> None:
    storage = local_root(tmp_path)
    no_subject = event("e2", "2024-01-10T10:00:00Z", data={"tokens": 1})
    del no_subject["subject"]
    lines = [
        event("e1", "2024-01-10T10:00:00Z", data={"tokens": 1}),
        no_subject,
        event("e3", "2024-01-10", data={"tokens": 1}),
        event("e1", "2024-01-10T11:00:00Z", data={"tokens": 99}),  # a duplicate of line 1 (same UTC date)
        "{nope",
    ]
    land(storage, "q/b.jsonl", jsonl(lines))
    pq_rows = pl.DataFrame(
        {"specversion": ["1.0"], "id": ["p1"], "source": ["app"], "type": ["prompt"], "subject": [None],
         "time": ["2024-01-10T10:00:00Z"], "data": ['{"tokens": 1}']},
        schema_overrides={"subject": pl.String},
    )  # fmt: skip
    land(storage, "q/p.parquet", parquet_bytes(pq_rows))
    quiet_run(storage)
    q = quarantine(storage)
    for column in ("stage", "reason", "message", "file", "line", "event_id", "raw"):
        assert column in q.columns
    by_reason = {r["reason"]: r for r in q.filter(pl.col("file") == "landing/q/b.jsonl").iter_rows(named=True)}
    text = jsonl(lines).decode().splitlines()

    row = by_reason["missing_subject"]
    assert row["file"] == "landing/q/b.jsonl" and row["line"] == 2 and row["event_id"] == "e2"
    assert row["raw"] == text[1] and row["message"]
    row = by_reason["bad_time"]
    assert (row["line"], row["event_id"], row["raw"]) == (3, "e3", text[2]) and row["message"]
    row = by_reason["malformed_json"]
    assert (row["line"], row["event_id"], row["raw"]) == (5, None, "{nope") and row["message"]
    row = by_reason["duplicate"]
    assert (row["line"], row["event_id"], row["file"]) == (4, "e1", "landing/q/b.jsonl")
    assert json.loads(row["raw"])["id"] == "e1" and "99" in row["raw"]  # the dropped copy, not the kept one
    pq_row = q.filter(pl.col("file") == "landing/q/p.parquet").row(0, named=True)
    assert (pq_row["reason"], pq_row["line"], pq_row["event_id"]) == ("missing_subject", 1, "p1")
    assert json.loads(pq_row["raw"])["id"] == "p1"
    assert table(storage, "tokens_total")["value"].to_list() == [1.0]  # e1's first copy only


def test_gzip_and_ndjson_batches(tmp_path: Path) -> None:
    storage = local_root(tmp_path)
    land(storage, "g/a.jsonl.gz", gzip.compress(jsonl([event("g1", "2024-01-10T10:00:00Z", data={"tokens": 2})])))
    land(storage, "g/b.ndjson", jsonl([event("n1", "2024-01-10T10:00:00Z", data={"tokens": 3})]))
    land(storage, "g/ignored.txt", b"not a batch")
    quiet_run(storage)
    assert table(storage, "tokens_total")["value"].to_list() == [5.0]


def test_escaped_characters_in_data_do_not_hide_its_values(tmp_path: Path) -> None:
    """A backslash, tab or control character anywhere in `data` (a Windows path, say) leaves the JSON readable."""
    storage = local_root(tmp_path)
    notes = ["C:\\Users\\x", "tab\there", "bell\u0007", "back\\nslash-n", 'q"uote', "plain"]
    land(
        storage,
        "e.jsonl",
        jsonl(
            [
                event(f"e{i}", "2024-01-10T10:00:00Z", data={"tokens": i + 1, "note": note, "model": note})
                for i, note in enumerate(notes)
            ]
        ),
    )
    summary = quiet_run(storage)
    assert summary["excluded_by_meter"] == {}
    assert values(table(storage, "tokens_total"), "model") == {(note,): float(i + 1) for i, note in enumerate(notes)}


def test_files_with_unknown_suffixes_are_reported_not_silently_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = local_root(tmp_path)
    land(storage, "ok.jsonl", jsonl([event("1", "2024-01-01T00:00:00Z", data={"tokens": 1})]))
    land(storage, "wrong.json", b"{}\n")
    with caplog.at_level("WARNING", logger="flows.pipeline"):
        batches = pipeline.find_new_batches(storage)
    assert [b.path for b in batches] == ["landing/ok.jsonl"]
    assert "landing/wrong.json" in caplog.text and "does not read" in caplog.text


def test_a_linked_file_is_read_once_and_the_totals_are_those_without_the_link(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A link to a batch (landing/latest.jsonl -> 2024/01/a.jsonl, two links to one file outside landing/) made the
    run read the batch under both paths: counted once, but every event of the second read quarantined as a
    duplicate and the summary counting it twice. The run must be the run without the links."""
    a = jsonl([event(str(i), f"2024-01-31T2{i}:30:00Z", data={"tokens": i + 1, "model": "m"}) for i in range(4)])
    x = jsonl([event(f"x{i}", "2024-02-01T10:00:00Z", data={"tokens": 10 * i, "model": "n"}) for i in range(3)])
    outside = tmp_path / "outside.jsonl"
    outside.write_bytes(x)
    plain, linked = local_root(tmp_path, "plain"), local_root(tmp_path, "linked")
    for storage in (plain, linked):
        land(storage, "2024/01/a.jsonl", a)
    land(plain, "p1.jsonl", x)
    os.symlink("2024/01/a.jsonl", linked.path("landing/latest.jsonl"))
    os.symlink(outside, linked.path("landing/p1.jsonl"))
    os.symlink(outside, linked.path("landing/p2.jsonl"))
    counts = {"batches": 2, "events_read": 7, "duplicates_dropped": 0, "events_stored": 7, "quarantined_total": 0}
    expected = quiet_run(plain)
    with caplog.at_level("WARNING", logger="meterlake.storage"):
        summary = quiet_run(linked)
    assert {k: expected[k] for k in counts} == counts
    assert {k: summary[k] for k in counts} == counts
    assert quarantine(linked).height == 0
    for meter in ("tokens_total", "prompts"):
        for kind in ("period", "hourly"):
            assert_frame_equal(table(linked, meter, kind), table(plain, meter, kind))
    assert [r.getMessage() for r in caplog.records] == [
        "landing/latest.jsonl is a link to the file listed as landing/2024/01/a.jsonl: skipped, so that its batch is "
        "read once",
        "landing/p2.jsonl is a link to the file listed as landing/p1.jsonl: skipped, so that its batch is read once",
    ]
    # and a link made after its target was read is no new batch
    os.symlink("a.jsonl", linked.path("landing/2024/01/b.jsonl"))
    assert quiet_run(linked)["batches"] == 0


def test_a_root_with_nothing_landed_and_no_history_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A mistyped --root that exists (`.` or the project folder instead of `data`) must not pass silently."""
    storage = local_root(tmp_path)
    with caplog.at_level("WARNING", logger="flows.pipeline"):
        assert pipeline.find_new_batches(storage) == []
    assert "landing/" in caplog.text and "--root" in caplog.text
    # once batches were read, an empty landing/ is normal (producers may clean up): no warning
    land(storage, "ok.jsonl", jsonl([event("1", "2024-01-01T00:00:00Z", data={"tokens": 1})]))
    quiet_run(storage)
    os.remove(storage.path("landing/ok.jsonl"))
    caplog.clear()
    with caplog.at_level("WARNING", logger="flows.pipeline"):
        assert pipeline.find_new_batches(storage) == []
    assert "--root" not in caplog.text


def test_latest_period_of_each_meter_is_one_it_has_rows_in(tmp_path: Path) -> None:
    """A run touching a later period for one event type only must not name that period for other meters
    (the Prefect flow's top tables read each meter's latest period and failed on a missing one)."""
    meters = parse_meters(
        """
meters:
  - {slug: tokens_total, eventType: prompt, aggregation: SUM, valueProperty: $.tokens}
  - {slug: pages_total, eventType: translate, aggregation: SUM, valueProperty: $.pages}
"""
    )
    storage = local_root(tmp_path)
    batch = [
        event("p1", "2024-01-10T10:00:00Z", data={"tokens": 5}),
        event("t1", "2024-01-10T10:00:00Z", type="translate", data={"pages": 1}),
        event("t2", "2025-02-18T10:00:00Z", type="translate", data={"pages": 2}),
    ]
    land(storage, "b.jsonl", jsonl(batch))
    summary = pipeline.run(storage, meters, log=lambda _: None)
    assert summary["latest_periods"] == {"tokens_total": "2024-01-01", "pages_total": "2025-02-01"}


def _records(storage: Storage) -> pl.DataFrame:
    """quarantine/records/ without the run's date, in a fixed order."""
    files = [f.path for f in storage.list_files("quarantine/records", (".parquet",))]
    df = storage.scan_parquet(files).collect().drop("date")
    return df.sort(df.columns, nulls_last=True)


def test_a_reingest_keeps_the_quarantine_of_a_from_scratch_run(tmp_path: Path) -> None:
    """Duplicates are quarantined (stage dedupe) by a re-ingest as by a run, also in batches that have nothing else
    rejected, and a batch that no longer has a rejected record keeps no quarantine file."""
    storage = local_root(tmp_path)
    a = event("a", "2024-01-10T10:00:00Z", data={"tokens": 1})
    b = event("b", "2024-01-10T11:00:00Z", data={"tokens": 2})
    land(storage, "1.jsonl", jsonl([a, b, "not json"]), mtime=1_700_000_000)
    c = event("c", "2024-01-11T10:00:00Z", data={"tokens": 3})
    land(storage, "2.jsonl", jsonl([a, c, event("", "2024-01-11T10:00:00Z")]), mtime=1_700_000_100)
    land(storage, "3.jsonl", jsonl([b]), mtime=1_700_000_200)  # nothing in it but a duplicate
    land(storage, "4.jsonl", jsonl([event("d", "2024-01-12T10:00:00Z")]), mtime=1_700_000_300)  # all fine
    first = quiet_run(storage)
    before = _records(storage)
    assert sorted(before["reason"].to_list()) == ["duplicate", "duplicate", "malformed_json", "missing_id"]
    # what an earlier version (a parsing bug) might have rejected in batch 4: a re-ingest must not keep it
    manifest = storage.scan_parquet([f.path for f in storage.list_files("_state/manifest")]).collect()
    clean = manifest.filter(pl.col("path") == "landing/4.jsonl")["batch"].item()
    storage.write_bytes(
        pipeline.batch_quarantine_file(clean), storage.read_bytes(pipeline.batch_quarantine_file(before["batch"][0]))
    )
    again = pipeline.backfill(
        storage, METERS, dt.date(2024, 1, 1), dt.date(2024, 2, 1), reingest_landing=True, log=lambda _: None
    )
    assert _records(storage).equals(before)
    assert (again["duplicates_dropped"], again["quarantined"], again["events_read"]) == (
        first["duplicates_dropped"],
        first["quarantined"],
        first["events_read"],
    )
    # a re-ingest of one day still quarantines the duplicates of the others (their batch files are rewritten whole)
    pipeline.backfill(
        storage, METERS, dt.date(2024, 1, 11), dt.date(2024, 1, 12), reingest_landing=True, log=lambda _: None
    )
    assert _records(storage).equals(before)


def test_number_text_of_group_values_in_each_format(tmp_path: Path) -> None:
    # README, "Text of numbers": a whole number is written as an integer (`7.0`, `7e0`, `70E-1` are "7") and
    # every number reads the same in every format: one payload, one group-by value, whichever format landed it.
    storage = local_root(tmp_path)
    numbers = ["7.0", "7e0", "7", "70E-1", "2.50", "1e-7", "1e21"]
    meters = parse_meters(
        "meters:\n  - slug: by_v\n    eventType: t\n    aggregation: COUNT\n    groupBy:\n      v: $.v\n"
    )
    time = "2024-01-10T10:00:00Z"
    lines = [json.dumps(event(f"j{i}", time, type="t")).replace('"data": null', '"data": {"v": ' + n + "}")
             for i, n in enumerate(numbers)]  # fmt: skip
    land(storage, "a.jsonl", "\n".join(lines).encode())
    text = pl.DataFrame([{**event(f"t{i}", time, type="t"), "data": '{"v": ' + n + "}"} for i, n in enumerate(numbers)])
    land(storage, "text.parquet", parquet_bytes(text))
    struct = pl.DataFrame(
        [{**event(f"s{i}", time, type="t"), "data": {"v": float(n)}} for i, n in enumerate(numbers)],
        schema={**dict.fromkeys(event("x", time), pl.String), "data": pl.Struct({"v": pl.Float64})},
    )
    land(storage, "struct.parquet", parquet_bytes(struct))
    pipeline.run(storage, meters, log=lambda _: None)
    got = dict(table(storage, "by_v").select("v", "value").iter_rows())
    assert got == {"7": 4 * 3, "2.5": 3, "1e-7": 3, "1e+21": 3}


def test_event_from_leaves_earlier_events_out_of_tables_and_quarantine(tmp_path) -> None:
    """OpenMeter's `eventFrom`: earlier events move no table of that meter and are not reported as bad values;
    the other meters of the type still count them."""
    storage = local_root(tmp_path)
    meters = parse_meters(
        """
meters:
  - {slug: tokens_total, eventType: prompt, aggregation: SUM, valueProperty: $.tokens, eventFrom: 2024-01-01T10:30:00Z}
  - {slug: prompts, eventType: prompt, aggregation: COUNT}
"""
    )
    land(
        storage,
        "b.jsonl",
        jsonl(
            [
                event("1", "2024-01-01T10:00:00Z", data={"tokens": "not a number"}),
                event("2", "2024-01-01T10:30:00Z", data={"tokens": 5}),
                event("3", "2024-01-01T11:00:00Z", data={"tokens": 7}),
            ]
        ),
    )
    pipeline.run(storage, meters, log=lambda _: None)
    assert table(storage, "tokens_total")["value"].to_list() == [12.0]
    assert table(storage, "tokens_total", "hourly")["value"].to_list() == [5.0, 7.0]
    assert table(storage, "prompts")["value"].to_list() == [3.0]
    assert quarantine(storage).is_empty()


@pytest.mark.parametrize(("target", "read", "later"), [("file", "p1.jsonl", "p0.jsonl"), ("folder", "b", "a")])
def test_a_link_made_after_its_target_was_read_under_another_link_is_no_new_batch(
    tmp_path: Path, target: str, read: str, later: str
) -> None:
    """Two links to one file outside landing/ are listed once, under the one that sorts first; two links to one folder
    side by side are walked once, the first that sorts. A second link made after the run read through the first,
    sorting before it (landing/p0.jsonl beside the landing/p1.jsonl that was read; landing/a beside landing/b, both
    to a producer's folder), took its place: paths the manifest had never seen, so the batch was read again, every
    event a duplicate. The path, or the folder holding paths, the manifest has is kept."""
    x = jsonl([event(f"x{i}", "2024-02-01T10:00:00Z", data={"tokens": 10 * i, "model": "n"}) for i in range(3)])
    if target == "file":
        outside = tmp_path / "outside.jsonl"
        outside.write_bytes(x)
    else:
        outside = tmp_path / "producer"
        outside.mkdir()
        (outside / "x.jsonl").write_bytes(x)
    linked = local_root(tmp_path, "linked")
    os.makedirs(linked.path("landing"), exist_ok=True)
    os.symlink(outside, linked.path(f"landing/{read}"))
    assert quiet_run(linked)["batches"] == 1
    os.symlink(outside, linked.path(f"landing/{later}"))
    summary = quiet_run(linked)
    assert (summary["batches"], summary["duplicates_dropped"]) == (0, 0)
    assert [f.path for f in pipeline.find_new_batches(linked)] == []
