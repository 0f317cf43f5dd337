"""meterlake on S3 (moto on loopback): the same scenarios as on a local folder, atomic publishing, faults.

- End to end: JSONL, Parquet and .jsonl.gz batches; run, rerun, late batch, re-landed batch, backfill,
  re-ingest; every table identical to the same scenario on a local root.
- Publishing: one object per table partition, written once per run; readers that read a partition while
  it is republished over and over see one whole version each time.
- Faults: an endpoint failing every n-th request or going away for a while (retries ride it out), or
  failing for good (the run fails cleanly, a rerun gives exact results); a missing bucket, rejected
  credentials and access denied end the CLI with one line and exit code 3; secrets never show.
- Listing: finding new batches reads no landed object; `start_after` skips the listing of old keys.
"""

from __future__ import annotations

import datetime as dt
import gzip
import io
import json
import logging
import os
import re
import threading
import time
import urllib.request

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import flows.storage as storage_module
from flows import pipeline
from flows.cli import main
from flows.storage import RetryPolicy, Storage, StorageError

from fixtures_s3 import FAKE_KEY, FAKE_SECRET, FaultProxy, s3_client
from support import all_tables, event, jsonl, land, local_root, meterset, parquet_bytes

pytestmark = pytest.mark.s3

METERS = """
billing: {period: MONTH, timezone: UTC}
meters:
  - slug: tokens
    eventType: prompt
    aggregation: SUM
    valueProperty: $.tokens
    groupBy: {model: $.model}
  - slug: prompts
    eventType: prompt
    aggregation: COUNT
  - slug: users
    eventType: api
    aggregation: UNIQUE_COUNT
    valueProperty: $.user
"""
SUMMARY_KEYS = (
    "batches",
    "batches_unchanged",
    "events_read",
    "events_valid",
    "duplicates_dropped",
    "events_stored",
    "quarantined",
    "meters_recomputed",
    "periods_recomputed",
    "hourly_partitions_recomputed",
    "rows_written",
)
FAST = RetryPolicy(attempts=10, first_delay=0.02, max_delay=0.4)


@pytest.fixture(autouse=True)
def _fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short retry backoff (the default rides out ~20 s of trouble), and no fsync (no power loss here)."""
    monkeypatch.setattr(storage_module, "DEFAULT_RETRY", FAST)
    monkeypatch.setattr(os, "fsync", lambda fd: None)


# --- data -----------------------------------------------------------------------------------------
def prompt(i: int, at: str, tokens, model: str = "gpt", subject: str = "cust-1") -> dict:
    return event(f"p{i}", at, "prompt", subject, data={"tokens": tokens, "model": model})


def api(i: int, at: str, user: str, subject: str = "cust-2") -> dict:
    return event(f"a{i}", at, "api", subject, data={"user": user})


def parquet_batch(events: list[dict]) -> bytes:
    df = pl.DataFrame(
        {
            "specversion": [e["specversion"] for e in events],
            "id": [e["id"] for e in events],
            "source": [e["source"] for e in events],
            "type": [e["type"] for e in events],
            "subject": [e["subject"] for e in events],
            "time": [dt.datetime.fromisoformat(e["time"]) for e in events],
            "data": [json.dumps(e["data"]) for e in events],
        }
    )
    return parquet_bytes(df)


FIRST = [prompt(1, "2024-01-10T08:00:00Z", 10), prompt(2, "2024-01-10T09:30:00Z", "25", "claude")]
FIRST += [api(1, "2024-01-10T10:00:00Z", "u1"), api(2, "2024-01-11T10:00:00Z", "u2", "cust-3")]
SECOND = [prompt(3, "2024-01-20T12:00:00.123456Z", 7.5), prompt(4, "2024-02-02T00:00:00Z", 100, "claude")]
SECOND += [api(3, "2024-02-02T01:00:00Z", "u1")]
THIRD = [prompt(5, "2024-02-05T05:05:05+02:00", 3), FIRST[0], api(4, "2024-02-05T06:00:00Z", "u9")]
LATE = [prompt(6, "2024-01-03T23:59:59.999Z", 1000, "gpt", "cust-9"), api(5, "2024-01-31T23:00:00Z", "u7")]
RELANDED_EXTRA = [prompt(7, "2024-01-12T00:00:00Z", 1, "tiny")]


def read_tables(storage: Storage, meters) -> dict[str, pl.DataFrame]:
    """Like support.all_tables, but each file in one GET (half the requests of a lazy scan)."""
    out = {}
    for meter in meters.meters:
        for kind in ("period", "hourly"):
            files = [f.path for f in storage.list_files(f"usage/{meter.slug}/{kind}", (".parquet",))]
            df = storage.read_parquet(files)
            keys = [c for c in df.columns if c not in ("value", "event_count")]
            out[f"{meter.slug}/{kind}"] = df.sort(keys, nulls_last=True) if keys else df
    return out


def scenario(storage: Storage) -> list[tuple[dict, dict, list[str]]]:
    """Land, run, rerun, late batch, re-landed batch, backfill, re-ingest; a snapshot after each step."""
    meters = meterset(METERS)
    snapshots = []

    def snap(summary: dict) -> None:
        tables = read_tables(storage, meters)
        layout = sorted(f.path for f in storage.list_files("usage"))
        snapshots.append((tables, {k: summary[k] for k in SUMMARY_KEYS}, layout))

    def run() -> None:
        snap(pipeline.run(storage, meters, log=lambda _: None))

    land(storage, "2024/01/10/a.jsonl", jsonl(FIRST))
    land(storage, "2024/01/20/b.parquet", parquet_batch(SECOND))
    land(storage, "2024/02/05/c.jsonl.gz", gzip.compress(jsonl([*THIRD, "{not json", {"id": "x"}])))
    run()
    run()  # nothing new
    land(storage, "2024/02/06/late.jsonl", jsonl(LATE))
    run()
    land(storage, "2024/01/10/a.jsonl", jsonl(FIRST + RELANDED_EXTRA))  # re-landed with new content
    run()
    start, end = dt.date(2024, 1, 1), dt.date(2024, 3, 1)
    snap(pipeline.backfill(storage, meters, start, end, log=lambda _: None))
    snap(pipeline.backfill(storage, meters, start, end, reingest_landing=True, log=lambda _: None))
    return snapshots


def assert_equal(actual: pl.DataFrame, expected: pl.DataFrame, what: str) -> None:
    try:
        assert_frame_equal(actual, expected)
    except AssertionError as exc:
        raise AssertionError(f"{what}: {exc}") from None


def assert_same_snapshots(expected: list, actual: list) -> None:
    assert len(expected) == len(actual)
    for step, ((tables_e, summary_e, layout_e), (tables_a, summary_a, layout_a)) in enumerate(
        zip(expected, actual, strict=True)
    ):
        assert summary_a == summary_e, f"step {step}"
        assert layout_a == layout_e, f"step {step}"
        for name, frame in tables_e.items():
            assert_equal(tables_a[name], frame, f"step {step} {name}")


@pytest.fixture(scope="module")
def local_snapshots(tmp_path_factory: pytest.TempPathFactory) -> list:
    return scenario(local_root(tmp_path_factory.mktemp("local")))


# --- end to end, and atomic publishing -------------------------------------------------------------
def test_scenario_gives_identical_results_on_s3_and_local(
    s3_root: str, local_snapshots: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole scenario on S3 equals the local one, step by step; and every run writes each published
    partition as exactly one object, once (one PUT: readers see the old or the new partition)."""
    storage = Storage(s3_root)
    published: list[list[str]] = [[]]
    real_write, real_run, real_backfill = Storage.write_bytes, pipeline.run, pipeline.backfill

    def counting_write(self: Storage, rel: str, data: bytes) -> None:
        if rel.startswith("usage/"):
            published[-1].append(rel)
        real_write(self, rel, data)

    def step(real):
        def wrapped(*args, **kwargs):
            published.append([])
            return real(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(Storage, "write_bytes", counting_write)
    monkeypatch.setattr(pipeline, "run", step(real_run))
    monkeypatch.setattr(pipeline, "backfill", step(real_backfill))
    remote = scenario(storage)
    assert_same_snapshots(local_snapshots, remote)

    runs = published[1:]  # run, rerun, late batch, re-landed batch, backfill, re-ingest
    assert len(runs) == 6 and runs[1] == [] and all(runs[i] for i in (0, 2, 3, 4, 5))
    for writes in runs:
        assert len(writes) == len(set(writes)), "a partition was written twice in one run"
    for path in remote[-1][2]:
        assert path.endswith("/data.parquet")  # one object per partition folder
    final_tables = local_snapshots[-1][0]
    assert final_tables["tokens/period"]["value"].sum() == 10 + 25 + 7.5 + 100 + 3 + 1000 + 1
    assert final_tables["users/period"].height == 3  # January: cust-2, cust-3; February: cust-2
    assert local_snapshots[1][1]["batches"] == 0  # the rerun found nothing new

    # readers need nothing special: a plain glob, or the folder, with the usual S3 options
    expected = final_tables["tokens/period"]
    opts = storage.polars_options()
    by_glob = pl.scan_parquet(f"{s3_root}/usage/tokens/period/**/*.parquet", storage_options=opts).collect()
    by_folder = pl.scan_parquet(f"{s3_root}/usage/tokens/period/", storage_options=opts).collect()
    for frame in (by_glob, by_folder):
        assert_frame_equal(frame.select(expected.columns), expected, check_row_order=False)


def _version(k: int, rows: int) -> pl.DataFrame:
    """A period partition whose every row says which version it belongs to."""
    return pl.DataFrame(
        {
            "subject": [f"customer-{i:05d}" for i in range(rows)],
            "window_start": [dt.datetime(2024, 1, 1, tzinfo=dt.UTC)] * rows,
            "version": [k] * rows,
            "value": [float(k * 100_000 + i) for i in range(rows)],
        }
    )


def _rows(k: int) -> int:
    return 200 + 7 * k  # every version its own size: a footer of one and data of another cannot fit


def _whole(df: pl.DataFrame) -> bool:
    if df.is_empty():
        return False
    k = df["version"][0]
    df = df.sort("subject")
    return (
        df.height == _rows(k)
        and bool((df["version"] == k).all())
        and df["value"].to_list() == [float(k * 100_000 + i) for i in range(df.height)]
    )


def test_readers_never_see_a_mixed_partition_while_it_is_republished(any_root: Storage) -> None:
    """A writer republishes one period partition over and over (at least 40 times, and until the
    reader has read 10 times) while a reader reads it with a plain glob.

    Whole-object reads (one GET, or one open) always return exactly one whole version. Polars' lazy
    glob scan opens each file twice (footer, then data): a scan straddling a swap fails loudly
    ("File out of specification") and is simply re-run; it never returns a mix of two versions.
    """
    rel = "usage/tokens/period/period_start=2024-01-01/data.parquet"
    any_root.write_parquet(rel, _version(0, _rows(0)))
    done = threading.Event()
    reads = [0]
    last = [0]

    def republish() -> None:
        writer = Storage(any_root.root, any_root.s3)
        k = 0
        while k < 40 or (reads[0] < 10 and k < 400):
            k += 1
            writer.write_parquet(rel, _version(k, _rows(k)))
        last[0] = k
        done.set()

    thread = threading.Thread(target=republish)
    thread.start()
    one_get = {"ok": 0, "mixed": 0}
    ranged = {"ok": 0, "mixed": 0, "failed": 0}
    glob = any_root.uri("usage/tokens/period/**/*.parquet")
    try:
        while not done.is_set():
            files = [f.path for f in any_root.list_files("usage/tokens/period", (".parquet",))]
            one_get["ok" if _whole(any_root.read_parquet(files)) else "mixed"] += 1
            try:
                frame = pl.scan_parquet(glob, storage_options=any_root.polars_options()).collect()
            except Exception:  # noqa: BLE001 - a ranged read across a swap fails; see docs/storage.md
                ranged["failed"] += 1
                continue
            finally:
                reads[0] += 1
            ranged["ok" if _whole(frame) else "mixed"] += 1
    finally:
        thread.join()
    assert one_get["mixed"] == 0 and ranged["mixed"] == 0, (one_get, ranged)
    assert one_get["ok"] >= 5, one_get
    # after the last swap every reader agrees on the final version
    final = pl.scan_parquet(glob, storage_options=any_root.polars_options()).collect()
    assert _whole(final) and final["version"][0] == last[0]
    assert _whole(any_root.read_parquet([rel])) and any_root.read_parquet([rel])["version"][0] == last[0]


# --- listing --------------------------------------------------------------------------------------
def test_finding_new_batches_opens_no_landed_object(s3_root: str, s3_faults: FaultProxy) -> None:
    storage = Storage(s3_root)
    meters = meterset(METERS)
    for day in range(8, 11):
        land(storage, f"2024/01/{day:02d}/batch.jsonl", jsonl([prompt(day, f"2024-01-{day:02d}T10:00:00Z", day)]))
    pipeline.run(storage, meters, log=lambda _: None)
    land(storage, "2024/01/11/batch.jsonl", jsonl([prompt(11, "2024-01-11T10:00:00Z", 11)]))
    seen: list[tuple[str, str]] = []
    s3_faults.on_request = lambda method, path, headers: seen.append((method, path))
    new = pipeline.find_new_batches(storage)
    assert [f.path for f in new] == ["landing/2024/01/11/batch.jsonl"]
    assert not [p for m, p in seen if "/landing/" in p.split("?")[0]], seen  # listings only, no GET/HEAD
    seen.clear()
    summary = pipeline.run(storage, meters, log=lambda _: None)
    landed_reads = {p.split("?")[0] for m, p in seen if m == "GET" and "/landing/" in p}
    assert summary["batches"] == 1
    assert landed_reads == {f"/{storage.bucket}/prefix/landing/2024/01/11/batch.jsonl"}
    seen.clear()
    listed = storage.list_files("landing", start_after="landing/2024/01/09/")
    assert [f.path for f in listed] == ["landing/2024/01/09/batch.jsonl", "landing/2024/01/10/batch.jsonl",
                                        "landing/2024/01/11/batch.jsonl"]  # fmt: skip
    assert any("start-after=" in p for _, p in seen)


@pytest.mark.slow
def test_a_landing_zone_of_more_than_one_listing_page(
    s3_root: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """1,050 objects under landing/ (S3 lists 1,000 keys a page): 50 batches on the first page, 950 objects a
    producer is still writing (`_spool/`, listed but never read), 50 batches on the second page. The first run
    takes all 100 batches; a later run, with one more batch that moves the page boundary, takes exactly that one.

    (1,001 batches would take ~22 s here: moto serves a GET in ~15 ms on two cores, and every batch is read.)
    """
    caplog.set_level(logging.WARNING, logger="werkzeug")  # moto's request log: a record per request
    storage = Storage(s3_root)
    meters = meterset(METERS)
    # straight into the in-process moto server's store: 1,050 PUTs over HTTP take ~12 s on two cores
    from moto.s3.models import s3_backends

    backend = s3_backends["123456789012"]["aws"]

    def put(rel: str, i: int) -> None:
        body = jsonl([prompt(i, f"2024-01-{1 + i % 28:02d}T10:00:00Z", i)])
        backend.put_object(storage.bucket, storage._key(f"landing/{rel}"), body)

    for i in range(50):
        put(f"0/b{i:04d}.jsonl", i)  # '0' < '_' < 'z': page one starts with these
    for i in range(950):
        put(f"_spool/part-{i:04d}.jsonl", 10_000 + i)
    for i in range(50, 100):
        put(f"z/b{i:04d}.jsonl", i)  # page two
    assert len(backend.get_bucket(storage.bucket).keys) == 1050
    pages: list[dict] = []
    real_call = storage.fs.call_s3

    def call_s3(method: str, *args, **kwargs):
        if method == "list_objects_v2" and kwargs.get("Prefix", "").endswith("/landing/"):
            pages.append(kwargs)
        return real_call(method, *args, **kwargs)

    monkeypatch.setattr(storage.fs, "call_s3", call_s3)
    summary = pipeline.run(storage, meters, log=lambda _: None)
    assert (summary["batches"], summary["events_stored"]) == (100, 100)
    assert any("ContinuationToken" in p for p in pages), "the listing of landing/ never went past its first page"
    put("0/a-late.jsonl", 100)  # sorts first: the last batch of page one moves to page two
    summary = pipeline.run(storage, meters, log=lambda _: None)
    assert (summary["batches"], summary["events_stored"]) == (1, 1)
    tables = read_tables(storage, meters)
    assert tables["prompts/period"]["value"].sum() == 101
    assert tables["tokens/period"]["value"].sum() == sum(range(101))


ODD_NAMES = [
    "with space/a file.jsonl",
    "ünïcødé/日本 €.jsonl",
    "k=v/a=b.jsonl",
    "hash#/x#1.jsonl",
    "plus+/a+b.jsonl",
    "pct%20/a%20b.jsonl",
    "br[ack]/[x].jsonl",
    "q?/what?.jsonl",
    "star*/a*.jsonl",
    "type=x/part-0.parquet",  # looks like a Hive partition: `type` is also an event column
]


def odd_names_run(storage: Storage) -> dict:
    meters = meterset(METERS)
    for i, name in enumerate(ODD_NAMES):
        events = [
            prompt(100 + i, f"2024-01-{10 + i:02d}T08:00:00Z", i + 1, f"m{i}"),
            api(100 + i, f"2024-01-{10 + i:02d}T09:00:00Z", f"u{i}"),
        ]
        land(storage, name, parquet_batch(events) if name.endswith(".parquet") else jsonl([*events, "{broken"]))
    first = pipeline.run(storage, meters, log=lambda _: None)
    again = pipeline.run(storage, meters, log=lambda _: None)
    files = [f.path for f in storage.list_files("quarantine", (".parquet",))]
    quarantined = sorted(storage.read_parquet(files)["file"].to_list())
    stored = storage.read_parquet([f.path for f in storage.list_files("events", (".parquet",))])
    return {
        "first": first,
        "again": again,
        "quarantined": quarantined,
        "stored": sorted(stored["file"].unique().to_list()),
        "tables": read_tables(storage, meters),
    }


@pytest.mark.slow
def test_odd_landed_names_are_ingested_alike_on_s3_and_local(s3_root: str, tmp_path) -> None:
    """Spaces, unicode, '=', '#', '+', '%20', '[', ']', '?', '*' in folder and file names, and Parquet under a
    Hive-looking `type=x/` folder: every batch is read once, on both roots, with the same results."""
    local = odd_names_run(local_root(tmp_path))
    remote = odd_names_run(Storage(s3_root))
    landed = sorted(f"landing/{name}" for name in ODD_NAMES)
    for got in (local, remote):
        assert (got["first"]["batches"], got["first"]["events_stored"]) == (len(ODD_NAMES), 2 * len(ODD_NAMES))
        assert got["first"]["quarantined"] == {"malformed_json": len(ODD_NAMES) - 1}
        assert got["again"]["batches"] == 0, "a batch with an odd name was read again"
        assert got["stored"] == landed
        assert got["quarantined"] == [n for n in landed if not n.endswith(".parquet")]
    for name, frame in local["tables"].items():
        assert_equal(remote["tables"][name], frame, name)
    assert local["tables"]["tokens/period"]["value"].sum() == sum(range(1, len(ODD_NAMES) + 1))
    assert local["tables"]["tokens/period"]["model"].to_list() == sorted(f"m{i}" for i in range(len(ODD_NAMES)))


# --- faults ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clean_tables(tmp_path_factory: pytest.TempPathFactory) -> dict:
    storage = local_root(tmp_path_factory.mktemp("clean"))
    land_fault_batches(storage)
    pipeline.run(storage, meterset(METERS), log=lambda _: None)
    return all_tables(storage, meterset(METERS))


def land_fault_batches(storage: Storage) -> None:
    land(storage, "1/a.jsonl", jsonl(FIRST))
    land(storage, "2/b.parquet", parquet_batch(SECOND))
    land(storage, "3/c.jsonl.gz", gzip.compress(jsonl(THIRD + LATE)))


def assert_tables(storage: Storage, expected: dict) -> None:
    actual = all_tables(storage, meterset(METERS))
    for name, frame in expected.items():
        assert_equal(actual[name], frame, name)


def test_run_rides_out_an_endpoint_failing_every_fifth_request(
    s3_root: str, s3_faults: FaultProxy, clean_tables: dict, caplog: pytest.LogCaptureFixture
) -> None:
    storage = Storage(s3_root)
    land_fault_batches(storage)
    s3_faults.fail_every(5, status=500)  # InternalError: our retries (s3fs's own are off: one retry layer)
    with caplog.at_level(logging.WARNING, logger="meterlake.storage"):
        summary = pipeline.run(storage, meterset(METERS), log=lambda _: None)
    assert s3_faults.failed >= 10
    assert summary["batches"] == 3
    assert any("retry" in r.getMessage() for r in caplog.records)
    assert not any(FAKE_SECRET in r.getMessage() for r in caplog.records)
    s3_faults.heal()
    assert_tables(storage, clean_tables)


def test_run_rides_out_an_endpoint_restart(s3_root: str, s3_faults: FaultProxy, clean_tables: dict) -> None:
    """The endpoint drops every connection and refuses new ones for 0.3 s, partway through the run."""
    storage = Storage(s3_root)
    land_fault_batches(storage)
    start = s3_faults.requests

    def outage(method: str, path: str, headers: dict) -> None:
        if s3_faults.requests - start == 25 and not s3_faults.restarts:
            threading.Thread(target=s3_faults.restart, args=(0.3,)).start()

    s3_faults.on_request = outage
    started = time.monotonic()
    pipeline.run(storage, meterset(METERS), log=lambda _: None)
    assert s3_faults.restarts == 1
    (down, up), finished = s3_faults.outages[0], time.monotonic()
    assert started < down and up < finished  # the outage fell inside the run
    assert_tables(storage, clean_tables)


@pytest.mark.parametrize("status", [500, 503, 400])  # InternalError, SlowDown, XAmzContentSHA256Mismatch
@pytest.mark.parametrize("fail_fast", [False, True])
def test_the_root_check_rides_out_errors_of_an_endpoint_that_answers(
    s3_root: str, s3_faults: FaultProxy, status: int, fail_fast: bool
) -> None:
    """Only an endpoint that cannot be connected to fails the first check at once: answers such as 5xx, throttling
    and a body damaged in transit are retried there too, so a run does not die of one throttled request. Our retry
    loop is the only one (s3fs's and botocore's are off), so each failure is one request."""
    storage = Storage(s3_root, retry=RetryPolicy(attempts=4, first_delay=0.01, max_delay=0.02))
    s3_faults.fail_next(3, status=status)
    storage.check_root(fail_fast=fail_fast)
    assert s3_faults.failed == 3 and s3_faults.requests == 4


@pytest.mark.parametrize("after", [12, 60])  # early (finding batches) / late (publishing)
def test_run_failing_for_good_fails_cleanly_and_a_rerun_is_exact(
    s3_root: str, s3_faults: FaultProxy, clean_tables: dict, after: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the `after`-th request on, every request fails: the run stops with a StorageError (or the
    reader's own error), and once the endpoint is back a rerun produces exactly the clean tables."""
    monkeypatch.setattr(storage_module, "DEFAULT_RETRY", RetryPolicy(attempts=3, first_delay=0.01, max_delay=0.02))
    storage = Storage(s3_root)
    land_fault_batches(storage)
    start = s3_faults.requests
    s3_faults.fail_when(lambda method, path: s3_faults.requests - start > after, status=500)
    with pytest.raises(Exception) as failure:  # which step fails depends on `after`
        # lock_ttl=0: the failed run cannot release its lock either (the endpoint is down); with the
        # default the rerun would wait for the lock to expire (2 h), as a scheduled run would
        pipeline.run(storage, meterset(METERS), log=lambda _: None, lock_ttl=0)
    assert isinstance(failure.value, StorageError) or "500" in str(failure.value), failure.value
    assert FAKE_SECRET not in str(failure.value)
    s3_faults.heal()
    pipeline.run(storage, meterset(METERS), log=lambda _: None)
    assert_tables(storage, clean_tables)


# --- user errors through the CLI ------------------------------------------------------------------
@pytest.fixture
def meters_file(tmp_path) -> str:
    path = tmp_path / "meters.yaml"
    path.write_text(METERS)
    return str(path)


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_cli_missing_bucket(s3_env: str, meters_file: str, capsys: pytest.CaptureFixture) -> None:
    code, output = cli(capsys, "run", "--root", "s3://no-such-bucket-here/prefix", "--meters", meters_file)
    assert code == 3
    assert output.strip().splitlines() == [
        "error: bucket 'no-such-bucket-here' does not exist (root s3://no-such-bucket-here/prefix)"
    ]


@pytest.mark.parametrize("setup", ["no credentials", "unknown profile"])
def test_cli_missing_credentials(
    s3_root: str, meters_file: str, setup: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    if setup == "unknown profile":
        monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    code, output = cli(capsys, "run", "--root", s3_root, "--meters", meters_file)
    assert code == 3
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no usable S3 credentials for s3://"), output


@pytest.fixture
def moto_auth(s3_env: str):
    """Turns moto's IAM checks on for one test (they are off by default), and off again afterwards."""

    def post(count: bytes) -> None:
        url = f"{s3_env}/moto-api/reset-auth"
        headers = {"Content-Type": "text/plain"}  # a form content type would hide the body from moto
        urllib.request.urlopen(urllib.request.Request(url, data=count, headers=headers, method="POST")).read()

    yield lambda: post(b"0")
    post(b"inf")


def test_cli_wrong_credentials(
    s3_root: str, meters_file: str, moto_auth, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    moto_auth()
    code, output = cli(capsys, "run", "--root", s3_root, "--meters", meters_file)
    assert code == 3
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: S3 rejected the credentials"), output
    assert "InvalidAccessKeyId" in lines[0]
    assert FAKE_SECRET not in output


def test_cli_access_denied(
    s3_env: str, s3_root: str, meters_file: str, moto_auth, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A user that may list and read the bucket but not write to it."""
    import boto3

    bucket = s3_root.split("/")[2]
    iam = boto3.client("iam", endpoint_url=s3_env, region_name="us-east-1")
    iam.create_user(UserName="reader")
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetObject"], "Resource": "*"}],
    }
    iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    s3_client(s3_env).put_object(Bucket=bucket, Key="prefix/landing/a.jsonl", Body=jsonl(FIRST))
    moto_auth()
    code, output = cli(capsys, "run", "--root", s3_root, "--meters", meters_file)
    assert code == 3
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: access denied: cannot create"), output
    assert "_state/lock.json" in lines[0]
    assert key["SecretAccessKey"] not in output


def test_cli_run_on_s3_keeps_secrets_out_of_output_and_records(
    s3_root: str, meters_file: str, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    storage = Storage(s3_root)
    land(storage, "a.jsonl", jsonl(FIRST))
    with caplog.at_level(logging.INFO), caplog.at_level(logging.DEBUG, logger="meterlake"):
        code, output = cli(capsys, "run", "--root", s3_root, "--meters", meters_file)
    assert code == 0, output
    records = [storage.read_bytes(f.path).decode() for f in storage.list_files("_state/runs")]
    assert records and "events_read" in records[0]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(("meterlake", "flows")))
    for text in (output, logged, *records, repr(storage)):
        assert FAKE_SECRET not in text
    for text in (output, ours, *records, repr(storage)):
        assert FAKE_KEY not in text  # the key id is no secret, but meterlake does not show it either


def test_no_secret_in_errors_or_debug_logs(s3_root: str, moto_auth, caplog: pytest.LogCaptureFixture) -> None:
    storage = Storage(s3_root)
    with caplog.at_level(logging.DEBUG):  # every logger, botocore's and s3fs's request logs included
        storage.write_bytes("x.json", b"{}")
        assert storage.read_json("x.json") == {}
        moto_auth()
        with pytest.raises(StorageError) as failure:
            storage.read_bytes("x.json")
    assert "InvalidAccessKeyId" in str(failure.value)
    assert FAKE_SECRET not in str(failure.value) and FAKE_SECRET not in repr(failure.value)
    assert caplog.records and not [r for r in caplog.records if FAKE_SECRET in r.getMessage()]


def test_stored_objects_are_plain_for_other_s3_clients(s3_env: str, s3_root: str) -> None:
    """What meterlake writes is ordinary S3 objects another client (boto3) lists and reads."""
    storage = Storage(s3_root)
    storage.write_bytes("usage/x/period/period_start=2024-01-01/data.parquet", parquet_bytes(pl.DataFrame({"v": [1]})))
    bucket = s3_root.split("/")[2]
    keys = [o["Key"] for o in s3_client(s3_env).list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["prefix/usage/x/period/period_start=2024-01-01/data.parquet"]
    body = s3_client(s3_env).get_object(Bucket=bucket, Key=keys[0])["Body"].read()
    assert pl.read_parquet(io.BytesIO(body))["v"].to_list() == [1]


# --- the command line on an S3 root ------------------------------------------------------------------
RUN_ID = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}")


def masked(text: str) -> str:
    """Command output without what differs between two roots or two runs: run ids, timings, report time."""
    text = RUN_ID.sub("<run>", text)
    text = re.sub(r"\): \d+\.\d+s$", "): <secs>", text, flags=re.M)  # the run summary's first line
    text = re.sub(r"generated \d{4}-\d\d-\d\d \d\d:\d\d UTC", "generated <time>", text)
    return text


def status_masked(text: str) -> str:
    """`status` output without its table of runs (run ids and seconds, folded to fit 80 columns: `runs_of`
    compares the runs themselves)."""
    lines, skipping = [], False
    for line in masked(text).splitlines():
        skipping = (skipping or line.startswith("last runs")) and not line.startswith("landing:")
        if not skipping:
            lines.append(line.rstrip())
    return "\n".join(lines)


def runs_of(storage: Storage) -> list[dict]:
    from flows import tools

    # sorted by finish time: records are named by run id, whose order within one second is random
    return tools.runs(storage).sort("finished_at").drop("run_id", "finished_at", "seconds").to_dicts()


def cli_session(root: str, meters_file: str, out_dir, storage: Storage, capsys: pytest.CaptureFixture) -> dict:
    """Every operator command on `root`, in order; each must exit 0. Returns their (masked) output and the tables."""
    meters = meterset(METERS)
    outputs: dict[str, str] = {}
    tables: dict[str, dict] = {}

    def call(name: str, *args: str) -> str:
        code, output = cli(capsys, *args)
        assert code == 0, f"{name} on {root}: exit {code}\n{output}"
        outputs[name] = output
        return output

    where = ("--root", root, "--meters", meters_file)
    land(storage, "2024/01/10/a.jsonl", jsonl(FIRST))
    land(storage, "2024/01/20/b.parquet", parquet_batch(SECOND))
    land(storage, "2024/02/05/c.jsonl.gz", gzip.compress(jsonl([*THIRD, "{not json", {"id": "x"}])))
    land(storage, "2024/02/06/late.jsonl", jsonl(LATE))
    call("run", "run", "--no-prefect", *where)
    tables["run"] = read_tables(storage, meters)
    span = ("--from", "2024-01-01", "--to", "2024-03-01")
    call("backfill", "backfill", *span, "--no-prefect", *where)
    tables["backfill"] = read_tables(storage, meters)
    land(storage, "2024/01/10/a.jsonl", jsonl(FIRST + RELANDED_EXTRA))  # re-landed with new content
    call("reingest", "backfill", *span, "--reingest", "--no-prefect", *where)
    tables["reingest"] = read_tables(storage, meters)
    for fmt in ("table", "json"):
        call(f"query {fmt}", "query", "tokens", *span, "-w", "DAY", "-g", "model", "-g", "subject", "-f", fmt, *where)
    call("query users", "query", "users", *span, "-w", "MONTH", "--tz", "Europe/Berlin", *where)
    call("quarantine", "quarantine", "--root", root, "--limit", "50")
    status = call("status", "status", *where)
    report = out_dir / "report.html"
    call("report", "report", "tokens", "--period", "2024-01", "--out", str(report), *where)
    outputs["report"] = masked(outputs["report"].replace(str(report), "<out>"))
    outputs["report.html"] = masked(report.read_text())
    outputs["status"] = status_masked(status)
    return {"outputs": {k: masked(v) for k, v in outputs.items()}, "tables": tables, "runs": runs_of(storage)}


@pytest.mark.slow
def test_cli_commands_on_s3_match_a_local_root(
    s3_root: str, meters_file: str, tmp_path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """run, backfill, backfill --reingest, query, quarantine, status and report through `main`, on an S3
    root and on a local root with the same batches: each exits 0, and tables and printed output are the same."""
    caplog.set_level(logging.WARNING, logger="werkzeug")  # moto's request log: a record per request
    local = local_root(tmp_path, "local")
    (tmp_path / "out-local").mkdir()
    (tmp_path / "out-s3").mkdir()
    expected = cli_session(local.root, meters_file, tmp_path / "out-local", local, capsys)
    got = cli_session(s3_root, meters_file, tmp_path / "out-s3", Storage(s3_root), capsys)
    assert got["outputs"].keys() == expected["outputs"].keys()
    assert got["runs"] == expected["runs"] and len(expected["runs"]) == 3
    for name, text in expected["outputs"].items():
        assert got["outputs"][name] == text, f"{name}: S3 output differs from local"
    for step, tables in expected["tables"].items():
        for name, frame in tables.items():
            assert_equal(got["tables"][step][name], frame, f"after {step}: {name}")
    # the outputs say something (an empty query or quarantine on both roots would compare equal)
    assert "rejected record(s)" in expected["outputs"]["quarantine"]
    assert "malformed_json" in expected["outputs"]["quarantine"]
    assert json.loads(expected["outputs"]["query json"])["data"]
    assert "lock: free" in expected["outputs"]["status"]
    assert re.search(r"\n tokens +2 +2024-01-01", expected["outputs"]["status"])  # 2 periods, from January
    assert "billing period 2024-01-01" in expected["outputs"]["report.html"]
    assert expected["tables"]["reingest"]["tokens/period"]["value"].sum() == 10 + 25 + 7.5 + 100 + 3 + 1000 + 1


def test_a_batch_re_landed_in_the_same_second_with_as_many_bytes_is_read_again(s3_root: str) -> None:
    """S3's LastModified has one-second resolution: a batch rewritten within that second with the same size is
    told apart by its ETag alone."""
    from moto.s3.models import s3_backends

    storage = Storage(s3_root)
    meters = meterset(METERS)
    land(storage, "a.jsonl", jsonl([prompt(1, "2024-01-10T10:00:00Z", 1)]))
    pipeline.run(storage, meters, log=lambda _: None)
    keys = s3_backends["123456789012"]["aws"].get_bucket(storage.bucket).keys
    first = storage.list_files("landing")
    stamp = keys[storage._key("landing/a.jsonl")].last_modified
    land(storage, "a.jsonl", jsonl([prompt(2, "2024-01-10T10:00:00Z", 2)]))  # one digit for another
    keys[storage._key("landing/a.jsonl")].last_modified = stamp  # as if within the same second
    again = storage.list_files("landing")
    assert [(f.size, f.mtime) for f in again] == [(f.size, f.mtime) for f in first]
    assert again[0].etag != first[0].etag

    summary = pipeline.run(storage, meters, log=lambda _: None)

    assert (summary["batches"], summary["events_stored"]) == (1, 1)
    assert read_tables(storage, meters)["tokens/period"]["value"].to_list() == [3.0]
