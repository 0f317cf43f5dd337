"""meterlake against an awkward S3 (moto on loopback): what a real bucket does to a billing job mid-run.

- A landed object deleted between the listing and its read is skipped with a warning, in a run and in a
  re-ingesting backfill, instead of failing the whole run; if it is landed again, the next run reads it.
- `meterlake query` reads each event once while a re-ingest replaces event files (or was killed doing so).
- What Polars' own S3 reader (the lazy scans of the manifest, events and quarantine) still fails with after its
  retries ends a command as every other storage failure does: one line, exit 3, naming the object.
- A bucket in another region than the requests are signed for, or behind another endpoint, is one line naming
  the settings to check, exit 3 (it was `unexpected OSError`, exit 1).
"""

from __future__ import annotations

import datetime as dt
import logging
import urllib.parse

import pytest

import flows.storage as storage_module
from flows import pipeline, state, tools
from flows.cli import main
from flows.storage import RetryPolicy, Storage

import fixtures_s3
from fixtures_s3 import FaultProxy
from support import all_tables, event, jsonl, land, meterset

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
    assert summary["events_stored"] == 1
    assert "landing/b.jsonl was listed but is gone" in caplog.text
    assert tokens(storage) == 10  # b.jsonl is no longer landed: a from-scratch computation has only a.jsonl
    if reingest:
        return
    assert state.read_manifest(storage)["path"].to_list() == ["landing/a.jsonl"]  # b.jsonl was not read
    monkeypatch.setattr(pipeline, "read_batches", real)
    land(storage, "b.jsonl", jsonl([prompt(2, 5)]))  # landed again: read by the next run
    assert run(storage)["events_stored"] == 1
    assert tokens(storage) == 15


# --- failures of Polars' native reader ---------------------------------------------------------------------
UNAVAILABLE = "error: storage unavailable: read {uri} still failing after 3 attempts (SlowDown: "
DENIED = "error: access denied: cannot read {uri} (AccessDenied: "


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
