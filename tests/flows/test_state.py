"""The run lock (flows/state.py): a run only ever releases or extends its own lock."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from flows import state

from support import local_root


def test_releasing_leaves_another_runs_lock_in_place(tmp_path: Path) -> None:
    """A run whose lock was taken over after expiry must not free the new holder's lock on its way out."""
    storage = local_root(tmp_path)
    state.acquire_lock(storage, "other", ttl_seconds=3600)
    state.release_lock(storage, "mine")
    assert storage.read_json(state.LOCK)["run_id"] == "other"


def test_a_run_that_lost_its_lock_cannot_refresh_it(tmp_path: Path) -> None:
    """Refreshing is where a slow run learns its expired lock was taken over: it must stop, not extend it."""
    storage = local_root(tmp_path)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=3)
    state.acquire_lock(storage, "mine", ttl_seconds=3600, now=past)  # expired two hours ago
    state.acquire_lock(storage, "other", ttl_seconds=3600)  # takes it over
    held = storage.read_bytes(state.LOCK)
    with pytest.raises(state.LockHeld, match="other"):
        state.refresh_lock(storage, "mine", ttl_seconds=3600)
    assert storage.read_bytes(state.LOCK) == held  # still other's, with other's expiry


def test_a_lock_damaged_mid_run_stops_the_refresh_and_is_left_for_the_user(tmp_path: Path) -> None:
    storage = local_root(tmp_path)
    state.acquire_lock(storage, "mine", ttl_seconds=3600)
    storage.write_bytes(state.LOCK, b"")  # emptied by hand, or a torn write of some other tool
    with pytest.raises(state.LockUnreadable, match="empty file"):
        state.refresh_lock(storage, "mine", ttl_seconds=3600)
    state.release_lock(storage, "mine")  # no crash on the way out, and no guess about whose it was
    assert storage.read_bytes(state.LOCK) == b""


def test_a_waiting_run_takes_the_lock_once_the_holder_releases_it(tmp_path: Path) -> None:
    storage = local_root(tmp_path)
    state.acquire_lock(storage, "backfill", ttl_seconds=3600)
    sleeps: list[float] = []
    said: list[str] = []

    def sleep(seconds: float) -> None:  # the holder finishes during the second wait
        sleeps.append(seconds)
        if len(sleeps) == 2:
            state.release_lock(storage, "backfill")

    state.wait_for_lock(storage, "hourly", 3600, wait_seconds=600, log=said.append, sleep=sleep)
    assert storage.read_json(state.LOCK)["run_id"] == "hourly"
    assert sleeps == [state.LOCK_POLL_SECONDS] * 2
    assert len(said) == 1 and "waiting up to 600 s" in said[0] and "backfill" in said[0]  # said once, not per look


def test_waiting_for_the_lock_ends_with_the_holders_name_when_time_runs_out(tmp_path: Path) -> None:
    storage = local_root(tmp_path)
    state.acquire_lock(storage, "backfill", ttl_seconds=3600)
    sleeps: list[float] = []
    with pytest.raises(state.LockHeld, match="backfill"):
        state.wait_for_lock(storage, "hourly", 3600, wait_seconds=0.2, log=lambda _: None, sleep=sleeps.append)
    assert sleeps and all(s <= 0.2 for s in sleeps)  # never sleeps past the deadline
    with pytest.raises(state.LockHeld, match="backfill"):  # no wait: fails at once, as the command line does
        state.wait_for_lock(storage, "hourly", 3600, wait_seconds=0, sleep=lambda _: pytest.fail("slept"))
    assert storage.read_json(state.LOCK)["run_id"] == "backfill"


def test_a_damaged_lock_is_never_waited_for(tmp_path: Path) -> None:
    storage = local_root(tmp_path)
    storage.write_bytes(state.LOCK, b"{not json")
    with pytest.raises(state.LockUnreadable):
        state.wait_for_lock(storage, "hourly", 3600, wait_seconds=600, sleep=lambda _: pytest.fail("slept"))
