"""flows.tools (query, quarantine, status, preview, top_table) and flows.report on a tiny landed root.

Expected values are worked out by hand from the events below.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
from pathlib import Path

import polars as pl
import pytest

from flows import state, tools
from flows.storage import Storage, StorageError
from transforms.query import QueryError

from support import event, jsonl, land, local_root, meterset, parquet_bytes, run, table

UTC = dt.UTC
METERS_YAML = """
meters:
  - slug: tokens_total
    eventType: prompt
    aggregation: SUM
    valueProperty: $.tokens
    groupBy: {model: $.model}
  - slug: users
    eventType: prompt
    aggregation: UNIQUE_COUNT
    valueProperty: $.user
  - slug: avg_tokens
    eventType: prompt
    aggregation: AVG
    valueProperty: $.tokens
  - slug: calls
    eventType: prompt
    aggregation: COUNT
  - slug: pages
    eventType: print
    aggregation: SUM
    valueProperty: $.pages
"""
METERS = meterset(METERS_YAML)


def prompt(id: str, time: str, subject: str, tokens, model: str, user: str) -> dict:
    return event(id, time, subject=subject, data={"tokens": tokens, "model": model, "user": user})


BATCH_1 = [
    prompt("e1", "2024-01-01T10:00:00Z", "customer-1", 100, "a", "u1"),  # line 1
    prompt("e2", "2024-01-02T10:00:00Z", "customer-1", 200, "b", "u1"),
    prompt("e3", "2024-01-02T23:30:00Z", "customer-2", "300", "a", "u2"),
    prompt("e4", "2024-01-31T23:59:59Z", "customer-1", 400, "a", "u1"),
    prompt("e5", "2024-02-01T00:00:00Z", "customer-1", 50, "a", "u3"),
    prompt("e6", "2024-01-05T00:00:00Z", "customer-3", "abc", "a", "u4"),  # line 6: bad value for SUM/AVG
    event("p1", "2024-01-03T00:00:00Z", type="print", data={"pages": 3}),
    "{oops",  # line 8
    event("bt", "yesterday"),  # line 9
    prompt("e1", "2024-01-01T10:00:00Z", "customer-1", 100, "a", "u1"),  # line 10: duplicate of e1
]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Storage:
    storage = local_root(tmp_path_factory.mktemp("tools"))
    land(storage, "2024/b1.jsonl", jsonl(BATCH_1), mtime=1_700_000_000)
    run(storage, METERS)
    land(storage, "2024/b2.jsonl", jsonl([prompt("late", "2024-01-10T00:00:00Z", "c", 1, "a", "u")]))
    return storage


# --- query --------------------------------------------------------------------------------------------
def test_query_by_hand(root):
    jan = ("2024-01-01", "2024-02-01")
    assert tools.query(root, METERS, "tokens_total", *jan)["value"].to_list() == [1000.0]
    by_model = tools.query(root, METERS, "tokens_total", *jan, group_by=["model"])
    assert by_model.select("model", "value").rows() == [("a", 800.0), ("b", 200.0)]
    daily = tools.query(root, METERS, "tokens_total", "2024-01-01", "2024-01-03", window="DAY")
    assert daily["value"].to_list() == [100.0, 500.0]
    assert tools.query(root, METERS, "users", *jan)["value"].to_list() == [3.0]  # u1, u2, u4
    assert tools.query(root, METERS, "users", "2024-01-01", "2024-01-03", window="DAY")["value"].to_list() == [1, 2]
    assert tools.query(root, METERS, "avg_tokens", *jan)["value"].to_list() == [250.0]
    assert tools.query(root, METERS, "calls", *jan)["value"].to_list() == [5.0]
    subjects = tools.query(root, METERS, "calls", *jan, subjects=["customer-2", "customer-3"])
    assert subjects.select("subject", "value").rows() == [("customer-2", 1.0), ("customer-3", 1.0)]


def test_query_months_in_a_zone(root):
    # e4 (2024-01-31T23:59:59Z) is on 1 February in Berlin
    df = tools.query(root, METERS, "tokens_total", "2024-01-01", "2024-03-01", window="MONTH", tz="Europe/Berlin")
    assert df["value"].to_list() == [600.0, 450.0]
    assert df["window_start"][1].isoformat() == "2024-02-01T00:00:00+01:00"


def test_query_is_exact_against_the_published_period_tables(root):
    """UNIQUE_COUNT and AVG included: every published period row equals the query over its window."""
    for meter in METERS.meters:
        published = table(root, meter.slug)
        keys = ["subject", *meter.group_paths]
        for (start, end), part in published.group_by(["window_start", "window_end"]):
            got = tools.query(root, METERS, meter.slug, start, end, group_by=keys)
            expected = part.select(*keys, "value").sort(keys, nulls_last=True)
            assert got.select(*keys, "value").sort(keys, nulls_last=True).equals(expected), meter.slug


def test_avg_over_a_range_is_not_the_average_of_published_rows(root):
    rows = table(root, "avg_tokens").filter(pl.col("window_start") == dt.datetime(2024, 1, 1, tzinfo=UTC))
    assert sorted(rows["value"].to_list()) == [pytest.approx(700 / 3), 300.0]  # mean of these: 266.67
    assert tools.query(root, METERS, "avg_tokens", "2024-01-01", "2024-02-01")["value"][0] == 250.0


def test_query_reads_only_the_overlapping_event_partitions(root, monkeypatch):
    read: list[str] = []
    original = Storage.scan_parquet

    def spy(self, rels):
        read.extend(rels)
        return original(self, rels)

    monkeypatch.setattr(Storage, "scan_parquet", spy)
    tools.query(root, METERS, "tokens_total", "2024-01-02T12:00:00Z", "2024-01-03T00:00:00Z")
    assert read and all("/date=2024-01-02/" in p for p in read)


def test_query_mistakes(root):
    with pytest.raises(tools.ToolError, match="unknown meter 'nope'"):
        tools.query(root, METERS, "nope", "2024-01-01", "2024-01-02")
    with pytest.raises(QueryError, match="invalid group by: 'colour'"):
        tools.query(root, METERS, "tokens_total", "2024-01-01", "2024-01-02", group_by=["colour"])
    with pytest.raises(QueryError, match="from must be before to"):
        tools.query(root, METERS, "tokens_total", "2024-01-02", "2024-01-01")
    # `to` may be the first instant after the years event times can hold, and no later
    assert tools.query(root, METERS, "calls", "2024-01-01", "2262-01-01")["value"].to_list() == [6.0]
    with pytest.raises(tools.ToolError, match="outside the years event times can hold"):
        tools.query(root, METERS, "calls", "2024-01-01", "2262-01-02")
    with pytest.raises(tools.ToolError, match="outside the years event times can hold"):
        tools.query(root, METERS, "calls", "1677-12-31", "2024-01-01")


# --- quarantine ---------------------------------------------------------------------------------------
def test_quarantine_counts_and_records(root):
    counts = tools.quarantine_counts(root)
    got = {(r["stage"], r["reason"], r["meter"]): r["count"] for r in counts.iter_rows(named=True)}
    assert got == {
        ("envelope", "malformed_json", None): 1,
        ("envelope", "bad_time", None): 1,
        ("dedupe", "duplicate", None): 1,
        ("meter", "bad_value", "tokens_total"): 1,
        ("meter", "bad_value", "avg_tokens"): 1,
    }
    bad_time = tools.quarantine(root, reason="bad_time")
    assert bad_time.select("file", "line", "event_id").rows() == [("landing/2024/b1.jsonl", 9, "bt")]
    mine = tools.quarantine(root, meter="tokens_total")
    assert mine.select("stage", "reason", "line", "event_id", "date").rows() == [
        ("meter", "bad_value", 6, "e6", "2024-01-05")
    ]
    assert tools.quarantine(root, limit=2).height == 2
    today = dt.datetime.now(UTC).date()
    recent = tools.quarantine(root, since=today - dt.timedelta(days=1))  # records: quarantined today
    assert set(recent["stage"]) == {"envelope", "dedupe"}
    assert tools.quarantine(root, stage="dedupe")["line"].to_list() == [10]


def test_quarantine_since_keeps_the_day_itself(root):
    # meter exclusions are dated by their event's day (e6: 2024-01-05), records by the day they were quarantined
    on_the_day = tools.quarantine(root, since="2024-01-05", stage="meter")
    assert sorted(on_the_day["meter"].to_list()) == ["avg_tokens", "tokens_total"]
    assert tools.quarantine(root, since="2024-01-06", stage="meter").is_empty()
    run_day = tools.quarantine(root, stage="dedupe")["date"].item()
    assert set(tools.quarantine(root, since=run_day)["stage"]) == {"envelope", "dedupe"}
    with pytest.raises(tools.ToolError, match="outside the years event times can hold"):
        tools.quarantine(root, since="2262-01-01")  # a start, so the first day past them is refused


def test_quarantine_mistakes(root):
    with pytest.raises(tools.ToolError, match="unknown reason 'bad_tme'"):
        tools.quarantine(root, reason="bad_tme")
    with pytest.raises(tools.ToolError, match="not a date"):
        tools.quarantine(root, since="last week")


def test_a_root_that_does_not_exist_is_an_error_not_an_empty_root(tmp_path):
    # `meterlake query --root dta` exits 3; the same mistake from Python must not answer a COUNT of 0.
    missing = str(tmp_path / "dta")
    calls = [
        lambda: tools.query(missing, METERS, "calls", "2024-01-01", "2024-02-01"),
        lambda: tools.quarantine(missing),
        lambda: tools.quarantine_counts(missing),
        lambda: tools.runs(missing),
        lambda: tools.waiting_batches(missing),
        lambda: tools.newest_event_time(missing),
        lambda: tools.lock_holder(missing),
        lambda: tools.status(missing, METERS),
    ]
    for call in calls:
        with pytest.raises(StorageError, match="does not exist"):
            call()
    assert not os.path.exists(missing)


@pytest.mark.parametrize("counts", [False, True])
def test_quarantine_lists_again_when_a_file_vanishes_mid_read(any_root, monkeypatch, counts):
    # A run deletes the quarantine file of a batch that has nothing rejected any more (a re-ingest), or of a
    # day without exclusions, while `meterlake quarantine` is between its listing and its read.
    storage = any_root
    land(storage, "a.jsonl", b"not json\n")
    land(storage, "b.jsonl", b"{also not json\n")
    run(storage, METERS)
    real, calls = tools._quarantine_frame, []

    def racing(storage_, *args):
        frame = real(storage_, *args)
        if not calls:
            storage_.delete([storage_.list_files("quarantine/records", (".parquet",))[0].path])
        calls.append(1)
        return frame

    monkeypatch.setattr(tools, "_quarantine_frame", racing)
    if counts:
        got = tools.quarantine_counts(storage)["count"].to_list()
        assert got == [1]
    else:
        assert tools.quarantine(storage)["reason"].to_list() == ["malformed_json"]
    assert len(calls) == 2


# --- status -------------------------------------------------------------------------------------------
def test_status(root):
    runs = tools.runs(root)
    assert runs.height == 1 and runs["status"][0] == "ok" and runs["events_stored"][0] == 7
    waiting = tools.waiting_batches(root)
    assert waiting["path"].to_list() == ["landing/2024/b2.jsonl"]
    assert tools.newest_event_time(root) == dt.datetime(2024, 2, 1, tzinfo=UTC)
    st = tools.status(root, METERS)
    row = st.filter(pl.col("slug") == "tokens_total").row(0, named=True)
    assert row["periods"] == 2 and row["first_period"] == "2024-01-01" and row["last_period"] == "2024-02-01"
    assert row["definition"] == "unchanged" and row["stale"] is False
    assert tools.lock_holder(root) is None
    without_meters = tools.status(root)
    assert sorted(without_meters["slug"]) == sorted(m.slug for m in METERS.meters)


def test_runs_tell_an_interrupted_run_from_a_committed_one_left_to_clean_up(tmp_path):
    storage = local_root(tmp_path)
    state.write_pending(storage, state.Pending("20240101T000000Z-aaaaaa"))  # died before its commit point
    state.write_pending(storage, state.Pending("20240101T000001Z-bbbbbb"))
    state.commit_manifest(storage, "20240101T000001Z-bbbbbb", [])  # died after it, before its record
    got = dict(tools.runs(storage).select("run_id", "status").iter_rows())
    assert got == {"20240101T000000Z-aaaaaa": "interrupted", "20240101T000001Z-bbbbbb": "committed, cleanup pending"}


def test_a_new_meter_on_a_root_without_events_is_not_stale(tmp_path):
    st = tools.status(local_root(tmp_path), METERS)
    assert set(st["definition"]) == {"new"} and set(st["stale"]) == {False}


def test_status_flags_changed_and_new_meters(root):
    changed = meterset(
        METERS_YAML.replace("valueProperty: $.pages", "valueProperty: $.sheets")
        + "  - slug: extra\n    eventType: prompt\n    aggregation: COUNT\n"
    )
    st = {r["slug"]: r for r in tools.status(root, changed).iter_rows(named=True)}
    assert (st["pages"]["definition"], st["pages"]["stale"]) == ("changed", True)
    assert (st["extra"]["definition"], st["extra"]["stale"]) == ("new", True)
    assert st["calls"]["stale"] is False


def test_status_shows_the_lock_holder(root):
    state.acquire_lock(root, "run-x", ttl_seconds=60)
    try:
        holder = tools.lock_holder(root)
        assert holder["run_id"] == "run-x" and holder["expired"] is False and holder["gone"] is False
    finally:
        state.release_lock(root, "run-x")


# --- preview ------------------------------------------------------------------------------------------
def _listing(storage: Storage) -> list[tuple[str, int, float]]:
    return [(f.path, f.size, f.mtime) for f in storage.list_files("")]


def test_preview_dry_runs_a_meters_file_without_touching_storage(root, tmp_path):
    sample = tmp_path / "sample.jsonl"
    sample.write_bytes(jsonl(BATCH_1))
    extra = tmp_path / "extra.parquet"
    extra.write_bytes(
        parquet_bytes(
            pl.DataFrame(
                [
                    {
                        "specversion": "1.0",
                        "id": "q1",
                        "source": "app",
                        "type": "print",
                        "subject": "c",
                        "time": "2024-01-04T00:00:00Z",
                        "data": '{"pages": 4}',
                    }
                ]
            )
        )
    )
    changed = meterset(METERS_YAML.replace("$.pages", "$.sheets").replace("slug: calls", "slug: calls_v2"))
    before = _listing(root)
    result = tools.preview(changed, [str(sample), str(extra)], root=root)
    assert _listing(root) == before
    totals = {r["slug"]: r for r in result.totals.iter_rows(named=True)}
    assert result.events == 8  # 10 lines - malformed - bad time - duplicate + 1 Parquet row
    assert totals["tokens_total"]["total"] == 1050.0 and totals["tokens_total"]["excluded"] == 1
    assert totals["tokens_total"]["definition"] == "unchanged"
    assert totals["pages"]["definition"] == "changed" and totals["pages"]["excluded"] == 2  # no $.sheets
    assert totals["calls_v2"]["definition"] == "new" and totals["calls_v2"]["total"] == 6.0
    assert result.removed == ["calls"]
    rows = result.rows["tokens_total"]
    assert rows.filter(pl.col("period_start") == "2024-01-01").select("subject", "model", "value").rows() == [
        ("customer-1", "a", 500.0),
        ("customer-1", "b", 200.0),
        ("customer-2", "a", 300.0),
    ]
    assert sorted(result.rejected["reason"]) == ["bad_time", "duplicate", "malformed_json"]
    assert result.rejected.filter(pl.col("reason") == "bad_time")["line"].to_list() == [9]
    excluded = result.excluded.filter(pl.col("meter") == "tokens_total")
    assert excluded.select("reason", "file", "line").rows() == [("bad_value", str(sample), 6)]


def test_preview_without_root_and_mistakes(tmp_path):
    sample = tmp_path / "s.jsonl"
    sample.write_bytes(jsonl(BATCH_1[:2]))
    result = tools.preview(METERS, [str(sample)])
    assert result.totals["definition"].is_null().all()
    with pytest.raises(tools.ToolError, match="file not found"):
        tools.preview(METERS, [str(tmp_path / "missing.jsonl")])
    with pytest.raises(tools.ToolError, match="not an event file"):
        tools.preview(METERS, [str(tmp_path / "notes.txt")])


def test_preview_does_not_count_events_before_event_from(tmp_path):
    # The period table left them out, but `counted` (events of the type minus excluded ones) counted them.
    sample = tmp_path / "s.jsonl"
    sample.write_bytes(
        jsonl(
            [
                event("1", "2024-01-01T00:00:00Z", type="t", data={"v": "x"}),
                event("2", "2024-01-03T00:00:00Z", type="t", data={"v": 2}),
                event("3", "2024-01-04T00:00:00Z", type="t", data={"v": "x"}),
            ]
        )
    )
    meters = meterset(
        "meters:\n  - {slug: m, eventType: t, aggregation: SUM, valueProperty: $.v, eventFrom: '2024-01-02T00:00:00Z'}\n"
    )
    totals = tools.preview(meters, [str(sample)]).totals.row(0, named=True)
    assert (totals["events"], totals["counted"], totals["excluded"], totals["total"]) == (3, 1, 1, 2.0)


# --- top table and report -----------------------------------------------------------------------------
def test_top_table(root):
    top = tools.top_table(root, "tokens_total", "2024-01")
    assert [(r["rank"], r["subject"], r["model"], r["value"], r["event_count"]) for r in top] == [
        (1, "customer-1", "a", 500.0, 2),
        (2, "customer-2", "a", 300.0, 1),
        (3, "customer-1", "b", 200.0, 1),
    ]
    assert tools.top_table(root, "tokens_total", "2024-01-01", n=1)[0]["value"] == 500.0
    with pytest.raises(tools.ToolError, match="no published period '2023-12'"):
        tools.top_table(root, "tokens_total", "2023-12")
    with pytest.raises(tools.ToolError, match="not a month or a day"):
        tools.top_table(root, "tokens_total", "January")
    with pytest.raises(tools.ToolError, match="no published periods"):
        tools.top_table(root, "nope", "2024-01")


def test_report_is_self_contained(root, tmp_path):
    pytest.importorskip("plotly")
    from flows.report import build, render

    data = build(root, METERS, "tokens_total", "2024-01")
    assert data["total"] == 1000.0
    assert [(d.date().isoformat(), v) for d, v in data["daily"].select("window_start", "value").rows()] == [
        ("2024-01-01", 100.0),
        ("2024-01-02", 500.0),
        ("2024-01-31", 400.0),
    ]
    assert [(s["subject"], s["value"]) for s in data["subjects"]] == [("customer-1", 700.0), ("customer-2", 300.0)]
    assert [(g["model"], g["value"]) for g in data["groups"]["model"]] == [("a", 800.0), ("b", 200.0)]
    page = render(root, METERS, "tokens_total", "2024-01")
    assert page.startswith("<!DOCTYPE html>") and 'id="daily-usage"' in page
    assert "<script src=" not in page and "cdn.plot.ly" not in page.split("<body>", 1)[1][:2000]
    assert len(page) > 1_000_000  # plotly.js is inline


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI: apt-get install -y chromium)")
def test_report_renders_in_a_headless_browser(root, tmp_path):
    pytest.importorskip("plotly")
    from flows.report import render

    page = tmp_path / "report.html"
    page.write_text(render(root, METERS, "tokens_total", "2024-01"), encoding="utf-8")
    profile = tmp_path / "profile"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--dump-dom",
        Path(page).as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    chart = dom[dom.index('id="daily-usage"') :]
    assert 'class="main-svg"' in chart[:20000], "the daily chart did not render to SVG"


def test_report_top_counts_and_cells(root):
    pytest.importorskip("plotly")
    import polars as pl

    from flows.report import _ranked, build, fmt, html_table

    data = build(root, METERS, "tokens_total", "2024-01", top=1)
    assert [(s["rank"], s["subject"], s["value"]) for s in data["subjects"]] == [(1, "customer-1", 700.0)]
    assert data["subject_count"] == 2  # how many there are, not how many are shown
    assert [(g["model"], g["value"]) for g in data["groups"]["model"]] == [("a", 800.0)]
    assert [(r["rank"], r["subject"], r["value"]) for r in data["top_rows"]] == [(1, "customer-1", 500.0)]
    # equal values keep the order of their names; ranks count from 1; null values come last
    tied = pl.DataFrame({"subject": ["b", None, "c", "a"], "value": [5.0, 9.0, 5.0, None]})
    assert [(r["rank"], r["subject"]) for r in _ranked(tied, "subject", 4)] == [(1, None), (2, "b"), (3, "c"), (4, "a")]
    assert [fmt(v) for v in (1234.0, 0.125, 1234567.5, None, -3.0)] == ["1,234", "0.125", "1,234,567.5", "null", "-3"]
    # subjects and group values are data from producers: shown as text, never as markup
    cell = html_table([{"subject": "<script>alert(1)</script>", "value": 1.0}])
    assert "<script>" not in cell and "&lt;script&gt;alert(1)&lt;/script&gt;" in cell


def test_report_days_are_billing_zone_days_and_its_text_is_escaped(tmp_path):
    pytest.importorskip("plotly")
    from flows.report import build, render

    meters = """
billing: {period: MONTH, timezone: Europe/Berlin}
meters:
  - slug: prompts
    eventType: prompt
    aggregation: COUNT
    description: "<b>counted</b> prompts"
"""
    storage = local_root(tmp_path)
    # 12:00 UTC is 1 January in Berlin, 23:30 UTC on the same UTC day is 2 January there
    land(storage, "b1.jsonl", jsonl([event("1", "2024-01-01T12:00:00Z"), event("2", "2024-01-01T23:30:00Z")]))
    run(storage, meterset(meters))
    daily = build(storage, meterset(meters), "prompts", "2024-01")["daily"]
    assert [(d.isoformat(), v) for d, v in daily.select("window_start", "value").rows()] == [
        ("2024-01-01T00:00:00+01:00", 1.0),
        ("2024-01-02T00:00:00+01:00", 1.0),
    ]
    page = render(storage, meterset(meters), "prompts", "2024-01")
    assert "&lt;b&gt;counted&lt;/b&gt; prompts" in page and "<b>counted</b>" not in page
    assert "period [2024-01-01T00:00:00+01:00,\n2024-02-01T00:00:00+01:00) (MONTH, Europe/Berlin)" in page


def test_newest_event_time_while_a_re_ingest_replaces_the_newest_event_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`status` reads the newest event time outside the run lock; a re-ingest (or a run rolling one back) deletes
    event files meanwhile. A listed file gone by the time it is read is listed again, as the manifest's and the
    query's reads are: it ended `meterlake status` with 'unexpected FileNotFoundError', exit 1."""
    storage = local_root(tmp_path)
    land(storage, "a.jsonl", jsonl([event("e1", "2024-01-05T10:00:00Z"), event("e2", "2024-01-06T11:30:00Z")]))
    run(storage, meterset("meters:\n  - {slug: calls, eventType: prompt, aggregation: COUNT}\n"))
    real = Storage.scan_parquet
    replaced: list[str] = []

    def scan_parquet(self: Storage, rels: list[str]):  # the re-ingest replaces the files right after the listing
        if not replaced and rels and all(r.startswith("events/") for r in rels):
            for rel in rels:
                self.write_parquet(rel.replace(".parquet", "-new.parquet"), real(self, [rel]).collect())
            self.delete(rels)
            replaced.extend(rels)
        return real(self, rels)

    monkeypatch.setattr(Storage, "scan_parquet", scan_parquet)
    assert tools.newest_event_time(storage) == dt.datetime(2024, 1, 6, 11, 30, tzinfo=dt.UTC)
    assert replaced
