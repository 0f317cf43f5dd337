"""meterlake against an awkward S3 (moto on loopback): what a real bucket does to a billing job mid-run.

- A landed object deleted between the listing and its read is skipped with a warning, in a run and in a
  re-ingesting backfill, instead of failing the whole run; if it is landed again, the next run reads it.
- `meterlake query` reads each event once while a re-ingest replaces event files (or was killed doing so).
- `meterlake status` (the manifest, read outside the run lock) while a run compacts the manifest lists it again.
- What Polars' own S3 reader (the lazy scans of the manifest, events and quarantine) still fails with after its
  retries ends a command as every other storage failure does: one line, exit 3, naming the object.
- A bucket in another region than the requests are signed for, or behind another endpoint, is one line naming
  the settings to check, exit 3 (it was `unexpected OSError`, exit 1).
- A request S3 refuses (a 4xx answer of no known kind: InvalidRequest, InvalidArgument...) is one line naming the
  operation, the object and S3's code and message, exit 3, without retries (it was `unexpected OSError`, exit 1);
  throttling, 5xx and RequestTimeout are still retried.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import logging
import urllib.parse

import polars as pl
import pytest

import flows.storage as storage_module
from flows import pipeline, state, tools
from flows.cli import main
from flows.storage import RetryPolicy, Storage

import fixtures_s3
from fixtures_s3 import FaultProxy
from support import all_tables, event, jsonl, land, meterset, parquet_bytes

pytestmark = pytest.mark.s3

METERS = """
meters:
  - slug: tokens
    eventType: prompt
    aggregation: SUM
    valueProperty: $.tokens
"""


@pytest.fixture(autouse=True)
def _fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage_module, "DEFAULT_RETRY", RetryPolicy(attempts=3, first_delay=0.01, max_delay=0.02))


def prompt(i: int, tokens: float) -> dict:
    return event(f"p{i}", f"2024-01-{1 + i % 28:02d}T10:00:00Z", data={"tokens": tokens})


def run(storage: Storage) -> dict:
    return pipeline.run(storage, meterset(METERS), log=lambda _: None)


def tokens(storage: Storage) -> float:
    return all_tables(storage, meterset(METERS))["tokens/period"]["value"].sum()


# --- landed objects that change under the run -----------------------------------------------------------
@pytest.mark.parametrize("reingest", [False, True], ids=["run", "backfill-reingest"])
def test_a_batch_deleted_between_listing_and_reading_is_skipped(
    any_root: Storage, reingest: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    storage = any_root
    land(storage, "a.jsonl", jsonl([prompt(1, 10)]))
    land(storage, "b.jsonl", jsonl([prompt(2, 5)]))
    if reingest:
        run(storage)
    real = pipeline.read_batches

    def read_batches(storage: Storage, batches, known):  # the producer removes b.jsonl after the listing
        storage.delete(["landing/b.jsonl"])
        return real(storage, batches, known)

    monkeypatch.setattr(pipeline, "read_batches", read_batches)
    caplog.set_level(logging.WARNING, logger="flows.pipeline")
    if reingest:
        summary = pipeline.backfill(
            storage,
            meterset(METERS),
            dt.date(2024, 1, 1),
            dt.date(2024, 2, 1),
            reingest_landing=True,
            log=lambda _: None,
        )
    else:
        summary = run(storage)
    assert (summary["events_stored"], summary["batches"]) == (1, 1)  # b.jsonl was not read
    assert "landing/b.jsonl was listed but is gone" in caplog.text
    assert tokens(storage) == 10  # b.jsonl is no longer landed: a from-scratch computation has only a.jsonl
    if reingest:
        return
    assert state.read_manifest(storage)["path"].to_list() == ["landing/a.jsonl"]  # b.jsonl was not read
    monkeypatch.setattr(pipeline, "read_batches", real)
    land(storage, "b.jsonl", jsonl([prompt(2, 5)]))  # landed again: read by the next run
    assert run(storage)["events_stored"] == 1
    assert tokens(storage) == 15


@pytest.mark.s3
@pytest.mark.parametrize("name", ["a.jsonl", "a.parquet"])
def test_an_object_uploaded_with_content_encoding_gzip_is_read(s3_root: str, s3_env: str, name: str) -> None:
    """`aws s3 cp --content-encoding gzip`: S3 stores the compressed bytes under the plain name and serves them
    as they are. A Parquet batch was unreadable; a JSONL one was read by Polars (which decompresses), but a
    rejected line was quoted from the compressed bytes, and one line that is not JSON made every line
    malformed_json."""
    events = [prompt(1, 10), prompt(2, 5), {**prompt(3, 1), "subject": ""}]
    if name.endswith(".jsonl"):
        body = jsonl(events) + b"not json\n"
        rejected = {("missing_subject", 3, json.dumps(events[2])), ("malformed_json", 4, "not json")}
    else:
        body, rejected = parquet_bytes(pl.DataFrame(events)), {("missing_subject", 3, "p3")}
    bucket, prefix = s3_root.removeprefix("s3://").split("/", 1)
    fixtures_s3.s3_client(s3_env).put_object(
        Bucket=bucket, Key=f"{prefix}/landing/{name}", Body=gzip.compress(body), ContentEncoding="gzip"
    )
    storage = Storage(s3_root)
    assert run(storage)["events_stored"] == 2
    assert tokens(storage) == 15
    quarantine = storage.read_parquet([f.path for f in storage.list_files("quarantine/records", (".parquet",))])
    quoted = pl.col("raw") if name.endswith(".jsonl") else pl.col("event_id")  # a Parquet row has no text of its own
    assert set(quarantine.select("reason", "line", quoted).rows()) == rejected


@pytest.mark.parametrize("same_range", [True, False], ids=["its-dates", "other-dates"])
def test_a_batch_landed_again_after_a_re_ingest_without_it_is_counted_again(
    any_root: Storage, same_range: bool
) -> None:
    """b.jsonl is deleted from landing/ (a retention rule, an operator), a re-ingest takes its events out of the store,
    and then the very same file is landed again: the next run must count it, as a from-scratch run would."""
    storage = any_root
    land(storage, "a.jsonl", jsonl([prompt(1, 10)]))
    b = jsonl([prompt(2, 5), prompt(30, 7)])  # 2024-01-03 and 2024-01-03 + 28 days: 2024-01-03, 2024-01-31
    land(storage, "b.jsonl", b)
    run(storage)
    storage.delete(["landing/b.jsonl"])
    end = dt.date(2024, 2, 1) if same_range else dt.date(2024, 1, 2)
    pipeline.backfill(storage, meterset(METERS), dt.date(2024, 1, 1), end, reingest_landing=True, log=lambda _: None)
    assert tokens(storage) == (10 if same_range else 22)
    land(storage, "b.jsonl", b)  # the same content at the same path, landed again
    summary = run(storage)
    assert summary["events_stored"] == (2 if same_range else 0)  # its events outside the range were never taken out
    assert tokens(storage) == 22


class Killed(Exception):
    pass


@pytest.mark.parametrize("killed", ["before-commit", "after-commit"])
def test_a_query_counts_each_event_once_while_a_re_ingest_replaces_the_event_files(
    any_root: Storage, killed: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-ingest writes new event files, commits, then deletes the old ones one by one (seconds on S3); killed in
    between, both stay until the next run. A query in that window read both and counted every event twice."""
    storage = any_root
    meters = meterset(METERS)
    land(storage, "a.jsonl", jsonl([prompt(1, 10), prompt(2, 5)]))
    run(storage)

    def query() -> float:
        return tools.query(storage, meters, "tokens", "2024-01-01", "2024-02-01")["value"].sum()

    assert query() == 15
    real_delete = storage.delete

    def delete(rels: list[str]) -> None:  # killed after the commit, before the old event files are deleted
        if any(r.startswith("events/") for r in rels):
            raise Killed
        real_delete(rels)

    with monkeypatch.context() as patch:
        if killed == "before-commit":
            patch.setattr(state, "commit_manifest", lambda *args: (_ for _ in ()).throw(Killed()))
        else:
            patch.setattr(storage, "delete", delete)
        with pytest.raises(Killed):
            pipeline.backfill(
                storage, meters, dt.date(2024, 1, 1), dt.date(2024, 2, 1), reingest_landing=True, log=lambda _: None
            )
    assert len(storage.list_files("events")) == 4  # the old and the new file of each of the two dates
    assert query() == 15
    run(storage)  # finishes (after-commit) or rolls back (before-commit) the re-ingest
    assert len(storage.list_files("events")) == 2
    assert query() == 15 == tokens(storage)


def test_status_while_a_run_compacts_the_manifest(
    s3_root: str, tmp_path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run merges the manifest's files into one every 64 runs, then deletes them; `status` reads the manifest
    without the lock, and a file it listed was gone when it read it: 'unexpected FileNotFoundError', exit 1."""
    meters = tmp_path / "meters.yaml"
    meters.write_text(METERS)
    storage = Storage(s3_root)
    land(storage, "a.jsonl", jsonl([prompt(1, 10)]))
    assert main(["run", "--root", s3_root, "--meters", str(meters)]) == 0
    land(storage, "b.jsonl", jsonl([prompt(2, 5)]))
    real = Storage.scan_parquet

    def scan_parquet(self: Storage, rels: list[str]):  # the concurrent run compacts right after the listing
        if rels and all(r.startswith(f"{state.MANIFEST}/") for r in rels):
            monkeypatch.setattr(Storage, "scan_parquet", real)
            self.write_parquet(f"{state.MANIFEST}/compact-x.parquet", real(self, rels).collect())
            self.delete(rels)
        return real(self, rels)

    monkeypatch.setattr(Storage, "scan_parquet", scan_parquet)
    capsys.readouterr()
    code = main(["status", "--root", s3_root, "--meters", str(meters)])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "landing: 1 batch" in out.out, out.out


# --- failures of Polars' native reader ---------------------------------------------------------------------
UNAVAILABLE = "error: storage unavailable: read {uri} still failing after 3 attempts (SlowDown: "
DENIED = "error: access denied: cannot read {uri} (AccessDenied: "


def test_a_failing_scan_of_the_replaced_events_ends_a_re_ingest_with_one_line_and_exit_3(
    s3_root: str, s3_faults: FaultProxy, tmp_path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The re-ingest's count of the events no landed batch holds any more (`_gone`, events_removed) scans the event
    files it replaces with Polars' reader: its failure ended `backfill --reingest` as 'unexpected OSError', exit 1."""
    meters = tmp_path / "meters.yaml"
    meters.write_text(METERS)
    storage = Storage(s3_root)
    land(storage, "a.jsonl", jsonl([prompt(1, 10)]))
    assert main(["run", "--root", s3_root, "--meters", str(meters)]) == 0
    real, failed = pipeline._gone, []

    def fail(method: str, path: str) -> bool:
        if method == "GET" and "/events/" in path.split("?")[0]:
            failed.append(path.split("?")[0])
            return True
        return False

    def gone(*args):  # the event files start failing when the re-ingest counts what it removes
        s3_faults.fail_when(fail, status=503)
        return real(*args)

    monkeypatch.setattr(pipeline, "_gone", gone)
    capsys.readouterr()
    args = ["backfill", "--from", "2024-01-01", "--to", "2024-02-01", "--reingest", "--meters", str(meters)]
    code = main([*args, "--root", s3_root])
    out = capsys.readouterr()
    lines = (out.out + out.err).strip().splitlines()
    assert failed, "the replaced event files were not scanned"
    assert (code, len(lines)) == (3, 1), lines
    uri = "s3:/" + urllib.parse.unquote(failed[-1])
    assert lines[0].startswith(UNAVAILABLE.format(uri=uri)), lines


@pytest.mark.parametrize(
    ("command", "status", "expected"),
    [("run", 503, UNAVAILABLE), ("query", 403, DENIED), ("quarantine", 503, UNAVAILABLE)],
    ids=["run-503", "query-403", "quarantine-503"],
)
def test_a_failing_lazy_scan_ends_the_command_with_one_line_and_exit_3(
    s3_root: str,
    s3_faults: FaultProxy,
    tmp_path,
    capsys: pytest.CaptureFixture,
    status: int,
    expected: str,
    command: str,
) -> None:
    meters = tmp_path / "meters.yaml"
    meters.write_text(METERS)
    storage = Storage(s3_root)
    land(storage, "a.jsonl", jsonl([prompt(1, 10), "{not json"]))
    assert main(["run", "--root", s3_root, "--meters", str(meters)]) == 0
    land(storage, "b.jsonl", jsonl([prompt(2, 5)]))
    # what each command scans lazily, with Polars' reader: the manifest, the events, the quarantine records
    scanned = {"run": "/_state/manifest/", "query": "/events/", "quarantine": "/quarantine/records/"}[command]
    failed: list[str] = []

    def fail(method: str, path: str) -> bool:
        if method == "GET" and scanned in path.split("?")[0]:
            failed.append(path.split("?")[0])
            return True
        return False

    s3_faults.fail_when(fail, status=status)
    capsys.readouterr()
    args = {
        "run": ["run", "--meters", str(meters)],
        "query": ["query", "tokens", "--from", "2024-01-01", "--to", "2024-02-01", "--meters", str(meters)],
        "quarantine": ["quarantine"],
    }[command]
    code = main([*args, "--root", s3_root])
    out = capsys.readouterr()
    lines = (out.out + out.err).strip().splitlines()
    assert failed, "no lazy scan was made"
    uri = "s3:/" + urllib.parse.unquote(failed[-1])  # path-style requests: /bucket/key
    assert (code, len(lines)) == (3, 1), lines
    assert lines[0].startswith(expected.format(uri=uri)), lines


# --- region and endpoint mistakes ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "code", "message", "request_of"),
    [
        (400, "AuthorizationHeaderMalformed", "the region 'us-east-1' is wrong; expecting 'eu-west-1'", "list"),
        (
            301,
            "PermanentRedirect",
            "The bucket you are attempting to access must be addressed using the specified endpoint.",
            "landed",
        ),
        (
            301,
            "PermanentRedirect",
            "The bucket you are attempting to access must be addressed using the specified endpoint.",
            "events",
        ),
    ],
    ids=["wrong-region-first-request", "redirect-s3fs-read", "redirect-polars-scan"],
)
def test_a_bucket_in_another_region_or_behind_another_endpoint_is_one_line_and_exit_3(
    s3_root: str,
    s3_faults: FaultProxy,
    tmp_path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    code: str,
    message: str,
    request_of: str,
) -> None:
    """What an S3-compatible service set to another region (or AWS through a regional endpoint) answers."""
    meters = tmp_path / "meters.yaml"
    meters.write_text(METERS)
    storage = Storage(s3_root)
    land(storage, "a.jsonl", jsonl([prompt(1, 10)]))
    if request_of == "events":
        assert main(["run", "--root", s3_root, "--meters", str(meters)]) == 0
        land(storage, "b.jsonl", jsonl([prompt(2, 5)]))
    monkeypatch.setitem(fixtures_s3._ERRORS, status, (code, message))
    match = {"list": "list-type=2", "landed": "/landing/a.jsonl", "events": "/events/"}[request_of]
    s3_faults.fail_when(lambda method, path: method == "GET" and match in path, status=status)
    capsys.readouterr()
    exit_code = main(["run", "--root", s3_root, "--meters", str(meters)])
    out = capsys.readouterr()
    lines = (out.out + out.err).strip().splitlines()
    assert s3_faults.failed, "the answer was never given"
    assert (exit_code, len(lines)) == (3, 1), lines
    # Polars' reader shows no code for a redirect without a Location header: "Received redirect without LOCATION, this
    # normally indicates an incorrectly configured region"
    shown = "Received redirect without LOCATION" if request_of == "events" else f"{code}: {message}"
    assert lines[0].startswith(f"error: wrong S3 region or endpoint for {s3_root} ({shown}")
    assert lines[0].endswith("); check AWS_REGION or AWS_DEFAULT_REGION, and AWS_ENDPOINT_URL")


# --- requests S3 refuses -----------------------------------------------------------------------------------
# What AWS answers to a PUT into a bucket with Object Lock on, and to a GET of a KMS-encrypted object signed otherwise
OBJECT_LOCK = (
    "Content-MD5 OR x-amz-checksum- HTTP header is required for Put Object requests with Object Lock parameters"
)
KMS = "Requests specifying Server Side Encryption with AWS KMS managed keys require AWS Signature Version 4."


@pytest.mark.parametrize(("code", "status"), [("RequestTimeout", 400), ("OperationAborted", 409)])
def test_a_scan_answered_a_transient_4xx_is_storage_unavailable_not_refused(
    s3_root: str,
    s3_faults: FaultProxy,
    tmp_path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    code: str,
    status: int,
) -> None:
    """S3 sends RequestTimeout and OperationAborted with a 4xx status; our own requests retry them (`_classify`), and
    Polars' reader, which retried them too, said "S3 refused to read": the same failure now reads the same way from
    both, `storage unavailable`, exit 3."""
    meters = tmp_path / "meters.yaml"
    meters.write_text(METERS)
    storage = Storage(s3_root)
    land(storage, "a.jsonl", jsonl([prompt(1, 10)]))
    assert main(["run", "--root", s3_root, "--meters", str(meters)]) == 0
    land(storage, "b.jsonl", jsonl([prompt(2, 5), prompt(29, 1)]))  # the next run scans the stored events of b's date
    monkeypatch.setitem(fixtures_s3._ERRORS, status, (code, "try again"))
    s3_faults.fail_when(lambda method, path: method == "GET" and "/events/" in path.split("?")[0], status=status)
    capsys.readouterr()
    exit_code = main(["run", "--root", s3_root, "--meters", str(meters)])
    out = capsys.readouterr()
    lines = (out.out + out.err).strip().splitlines()
    assert exit_code == 3 and len(lines) == 1, lines
    assert lines[0].startswith("error: storage unavailable: read s3://") and f"({code}: try again)" in lines[0], lines


@pytest.mark.parametrize(
    ("method", "match", "op", "code", "message"),
    [
        ("PUT", "/_state/lock.json", "create", "InvalidRequest", OBJECT_LOCK),
        ("PUT", "/events/", "write", "InvalidRequest", OBJECT_LOCK),
        ("GET", "/landing/a.jsonl", "read", "InvalidArgument", KMS),
        ("GET", "/events/", "read", "InvalidArgument", KMS),  # Polars' reader: one line already, the same one
    ],
    ids=["lock-put", "events-put", "s3fs-read", "polars-scan"],
)
def test_a_request_s3_refuses_ends_the_command_with_one_line_and_exit_3(
    s3_root: str,
    s3_faults: FaultProxy,
    tmp_path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    match: str,
    op: str,
    code: str,
    message: str,
) -> None:
    """A 4xx answer of no known kind (not credentials, access, region, a missing bucket or object) would be given to
    the same request again: it is not retried, and the command ends with one line naming the operation, the object
    and S3's code and message, exit 3. It ended as 'unexpected OSError: <message>', exit 1, naming neither."""
    meters = tmp_path / "meters.yaml"
    meters.write_text(METERS)
    storage = Storage(s3_root)
    land(storage, "a.jsonl", jsonl([prompt(1, 10)]))
    if match == "/events/" and method == "GET":  # the next run reads the stored events of b's date
        assert main(["run", "--root", s3_root, "--meters", str(meters)]) == 0
        land(storage, "b.jsonl", jsonl([prompt(2, 5), prompt(29, 1)]))
    monkeypatch.setitem(fixtures_s3._ERRORS, 400, (code, message))
    failed: list[str] = []

    def refuse(request_method: str, path: str) -> bool:
        if request_method == method and match in path.split("?")[0]:
            failed.append(path.split("?")[0])
            return True
        return False

    s3_faults.fail_when(refuse, status=400)
    capsys.readouterr()
    exit_code = main(["run", "--root", s3_root, "--meters", str(meters)])
    out = capsys.readouterr()
    lines = (out.out + out.err).strip().splitlines()
    assert failed, "the request was never made"
    uri = "s3:/" + urllib.parse.unquote(failed[-1])  # path-style requests: /bucket/key
    assert (exit_code, lines) == (3, [f"error: S3 refused to {op} {uri} ({code}: {message})"])
    if op != "read" or match != "/events/":  # our requests: one attempt (Polars' reader makes its own)
        assert len(failed) == 1, failed
    assert fixtures_s3.FAKE_SECRET not in out.out + out.err
    s3_faults.heal()  # the failed run leaves nothing behind that a rerun would not undo
    assert main(["run", "--root", s3_root, "--meters", str(meters)]) == 0
    assert tokens(storage) == (16 if match == "/events/" and method == "GET" else 10)


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (500, "InternalError"),
        (503, "SlowDown"),
        (429, "TooManyRequests"),
        (408, "RequestTimeout"),
        (400, "RequestTimeout"),
    ],
)
def test_transient_answers_are_still_retried(
    s3_root: str, s3_faults: FaultProxy, monkeypatch: pytest.MonkeyPatch, status: int, code: str
) -> None:
    """Throttling, server errors and S3's RequestTimeout (sent with 400 as well as 408) are retried, a PUT, a GET and
    a HEAD alike; a HEAD's answer has no body, so its status alone (408, 429, 5xx) must tell. (S3 answers
    RequestTimeout to a request whose body stalls, never to a HEAD: a HEAD answered 400 is refused.)"""
    monkeypatch.setitem(fixtures_s3._ERRORS, status, (code, "injected"))
    storage = Storage(s3_root)  # the _fast retry policy: 3 attempts
    calls = [lambda: storage.write_bytes("x.json", b"{}"), lambda: storage.read_bytes("x.json")]
    if status != 400:
        calls.append(lambda: storage.exists("x.json"))
    for call in calls:
        before = len(s3_faults.log)
        s3_faults.fail_next(2, status=status)
        call()
        assert [answer for _, _, answer in s3_faults.log[before:]] == [status, status, 200]
