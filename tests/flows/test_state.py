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
