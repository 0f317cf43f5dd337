"""meterlake against an awkward S3 (moto on loopback): what a real bucket does to a billing job mid-run.

- A landed object deleted between the listing and its read is skipped with a warning, in a run and in a
  re-ingesting backfill, instead of failing the whole run; if it is landed again, the next run reads it.
"""

from __future__ import annotations

import datetime as dt
import logging

import pytest

import flows.storage as storage_module
from flows import pipeline, state
from flows.storage import RetryPolicy, Storage

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
