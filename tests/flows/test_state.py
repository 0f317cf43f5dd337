"""The run lock (flows/state.py): a run only ever releases or extends its own lock."""

from __future__ import annotations

import datetime as dt
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import pipeline, recompute, state, tools

from support import event, jsonl, land, local_root, meterset


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


def _lock_in_a_child(root: str, then: str) -> subprocess.Popen:
    """A process that takes the lock with the real code, then `then`: 'die' (SIGKILL itself) or 'sleep'."""
    code = (
        "import os, signal, sys, time\n"
        "from flows import state\n"
        "from flows.storage import Storage\n"
        f"state.acquire_lock(Storage({root!r}), 'child', ttl_seconds=3600)\n"
        "print('locked', flush=True)\n"
        f"os.kill(os.getpid(), signal.SIGKILL) if {then!r} == 'die' else time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "locked"
    return child


@pytest.mark.skipif(not Path("/proc/self/ns/pid").exists(), reason="needs Linux's /proc to tell a process is gone")
def test_the_lock_of_a_killed_run_on_this_machine_is_taken_over_at_once(tmp_path: Path) -> None:
    """SIGKILL or the OOM killer leaves the lock behind: the next run must not fail for two hours."""
    storage = local_root(tmp_path)
    child = _lock_in_a_child(storage.root, "die")
    assert child.wait(timeout=30) == -signal.SIGKILL
    assert storage.read_json(state.LOCK)["pid"] == child.pid  # left behind, unexpired
    holder = tools.lock_holder(storage)  # what `meterlake status` shows
    assert (holder["expired"], holder["gone"]) == (False, True)
    state.acquire_lock(storage, "next", ttl_seconds=3600)
    assert storage.read_json(state.LOCK)["run_id"] == "next"


@pytest.mark.skipif(not Path("/proc/self/ns/pid").exists(), reason="needs Linux's /proc to tell a process is gone")
def test_a_live_holder_or_one_that_cannot_be_checked_keeps_its_lock(tmp_path: Path) -> None:
    storage = local_root(tmp_path)
    child = _lock_in_a_child(storage.root, "sleep")
    try:
        with pytest.raises(state.LockHeld, match="child"):
            state.acquire_lock(storage, "next", ttl_seconds=3600)
    finally:
        child.kill()
        child.wait(timeout=30)
    held = storage.read_json(state.LOCK)
    assert held["run_id"] == "child" and state.holder_gone(held)  # now gone: the same lock would be taken over
    # the same dead pid seen from another boot, another pid namespace (a container) or written without them
    # (another system): nothing tells whether that process lives, so the lock waits for its expiry
    for changed in ({"boot_id": "another-boot"}, {"pid_ns": "pid:[1]"}, {"boot_id": None, "pid_ns": None}):
        storage.write_json(state.LOCK, {**held, **changed})
        with pytest.raises(state.LockHeld, match="child"):
            state.acquire_lock(storage, "next", ttl_seconds=3600)
    storage.write_json(state.LOCK, {**held, "host": "another-host"})
    with pytest.raises(state.LockHeld, match="child"):
        state.acquire_lock(storage, "next", ttl_seconds=3600)


def test_only_one_of_two_runs_that_read_the_same_dead_lock_takes_it_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B reads the crashed run's lock; A takes it over and creates its own; B must not delete A's lock."""
    storage = local_root(tmp_path)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=3)
    state.acquire_lock(storage, "crashed", ttl_seconds=3600, now=past)
    real_read = state.read_lock
    calls = {"n": 0}

    def read_then_pause(s):  # B's read of the dead lock; A runs its whole takeover before B goes on
        got = real_read(s)
        calls["n"] += 1
        if calls["n"] == 1:
            monkeypatch.setattr(state, "read_lock", real_read)
            state.acquire_lock(storage, "A", ttl_seconds=3600)
        return got

    monkeypatch.setattr(state, "read_lock", read_then_pause)
    with pytest.raises(state.LockHeld, match="taking over the lock of the crashed run crashed"):
        state.acquire_lock(storage, "B", ttl_seconds=3600)
    assert storage.read_json(state.LOCK)["run_id"] == "A"
    state.release_lock(storage, "A")
    state.acquire_lock(storage, "C", ttl_seconds=3600)  # a free lock is taken as before
    assert storage.read_json(state.LOCK)["run_id"] == "C"


def test_a_takeover_whose_taker_died_midway_does_not_block_for_good(tmp_path: Path) -> None:
    storage = local_root(tmp_path)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=3)
    state.acquire_lock(storage, "crashed", ttl_seconds=3600, now=past)
    held = state.read_lock(storage)[0]
    digest = state.hashlib.sha256(state.json.dumps(held, sort_keys=True, default=str).encode()).hexdigest()[:32]
    marker = f"{state.TAKEOVERS}/{digest}.json"
    at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=state.TAKEOVER_STALE_SECONDS + 1)
    storage.write_json(marker, {"run_id": "died-midway", "at": at.isoformat()})  # won, then died before the delete
    with pytest.raises(state.LockHeld, match="taking over"):
        state.acquire_lock(storage, "next", ttl_seconds=3600)
    state.acquire_lock(storage, "next", ttl_seconds=3600)  # the stale marker is gone: this attempt takes over
    assert storage.read_json(state.LOCK)["run_id"] == "next"


def test_run_records_of_the_same_second_come_in_the_order_they_finished(tmp_path: Path) -> None:
    """Run ids sort by start second, then a random suffix: `status` must not list a later run first."""
    storage = local_root(tmp_path)
    records = [
        ("20240101T000000Z-ffffff", "2024-01-01T00:00:05+00:00"),  # started first in that second, finished first
        ("20240101T000000Z-000000", "2024-01-01T00:00:09+00:00"),
        ("20240101T000001Z-aaaaaa", "2024-01-01T00:00:10+00:00"),
    ]
    for run_id, finished in records:
        state.write_run_record(storage, run_id, {"run_id": run_id, "finished_at": finished})
    assert [r["run_id"] for r in state.read_run_records(storage, last=3)] == [r for r, _ in records]
    # the last two: the window reaches back over the whole second, then keeps the two that finished last
    assert [r["run_id"] for r in state.read_run_records(storage, last=2)] == [r for r, _ in records[1:]]
    assert state.read_run_records(storage, last=0) == []


def _manifest_row(i: int, run_id: str) -> dict:
    return {"path": f"landing/b{i}.jsonl", "size": i, "mtime": float(i), "etag": "", "batch": f"b{i}", "run_id": run_id}


def test_the_manifest_is_compacted_past_its_file_limit_without_losing_a_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state, "COMPACT_AFTER", 3)
    storage = local_root(tmp_path)
    for i in range(3):
        state.commit_manifest(storage, f"r{i}", [_manifest_row(i, f"r{i}")])
    assert len(storage.list_files(state.MANIFEST)) == 3  # at the limit: left as they are
    state.commit_manifest(storage, "r3", [])  # a run without batches commits too
    assert len(storage.list_files(state.MANIFEST)) == 1
    state.commit_manifest(storage, "r4", [_manifest_row(4, "r4")])
    assert state.committed_runs(storage) == {"r0", "r1", "r2", "r3", "r4"}
    paths = set(state.read_manifest(storage)["path"].to_list()) - {""}
    assert paths == {f"landing/b{i}.jsonl" for i in (0, 1, 2, 4)}


def test_a_run_that_records_a_batch_again_is_committed(tmp_path: Path) -> None:
    # a re-ingest records batches already in the manifest: its rows must still show it committed
    storage = local_root(tmp_path)
    state.commit_manifest(storage, "first", [_manifest_row(1, "first")])
    state.commit_manifest(storage, "reingest", [_manifest_row(1, "reingest")])
    assert state.committed_runs(storage) == {"first", "reingest"}
    assert state.read_manifest(storage).height == 1


def test_a_re_landed_file_with_new_content_is_a_second_manifest_row(tmp_path: Path) -> None:
    storage = local_root(tmp_path)
    state.commit_manifest(storage, "r1", [_manifest_row(1, "r1")])
    state.commit_manifest(storage, "r2", [{**_manifest_row(1, "r2"), "size": 9, "mtime": 9.0, "batch": "b1-again"}])
    assert sorted(state.read_manifest(storage)["batch"].to_list()) == ["b1", "b1-again"]


def test_refreshing_the_lock_extends_its_expiry(tmp_path: Path) -> None:
    storage = local_root(tmp_path)
    now = dt.datetime.now(dt.UTC)
    state.acquire_lock(storage, "mine", ttl_seconds=3600, now=now - dt.timedelta(minutes=50))  # 10 minutes left
    state.refresh_lock(storage, "mine", ttl_seconds=3600)
    _, expires = state.read_lock(storage)
    assert expires >= now + dt.timedelta(minutes=59)


def test_a_create_that_reports_success_but_holds_another_runs_lock_is_not_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # on an S3 endpoint without conditional writes, a create is check-then-put: another run's PUT can land
    # right after ours; the read-back must find the lock is not ours
    storage = local_root(tmp_path)
    state.acquire_lock(storage, "other", ttl_seconds=3600)
    monkeypatch.setattr(storage, "create_exclusive", lambda rel, data: True)
    with pytest.raises(state.LockHeld, match="other"):
        state.acquire_lock(storage, "mine", ttl_seconds=3600)
    assert storage.read_json(state.LOCK)["run_id"] == "other"


@pytest.mark.parametrize("op", ["run", "backfill"])
def test_a_run_longer_than_its_lock_ttl_keeps_the_lock(tmp_path: Path, monkeypatch, op: str) -> None:
    # The lock was refreshed only between a run's phases, and never in a backfill: one longer than the TTL (two
    # hours: a large backfill) let the next scheduled run take the lock over as a crashed run's and work beside it.
    storage = local_root(tmp_path)
    meters = meterset("meters:\n  - slug: c\n    eventType: t\n    aggregation: COUNT\n")
    land(storage, "b.jsonl", jsonl([event("e1", "2024-01-10T10:00:00Z", type="t")]))
    pipeline.run(storage, meters, log=lambda _: None)
    module, name = (pipeline, "find_new_batches") if op == "run" else (recompute, "range_scope")
    slow_step, seen = getattr(module, name), []

    def slow(*args):
        # the TTL below, 1.2 s, three times over; the keeper refreshes every 0.3 s, so only a stall of over a
        # second on a loaded machine could let the lock expire (with a TTL of 0.4 s, 0.3 s was enough)
        time.sleep(3.6)
        try:
            state.acquire_lock(storage, "another-run", 60)
            seen.append("taken over")
        except state.LockHeld:
            seen.append("held")
        return slow_step(*args)

    monkeypatch.setattr(module, name, slow)
    if op == "run":
        pipeline.run(storage, meters, log=lambda _: None, lock_ttl=1.2)
    else:
        pipeline.backfill(storage, meters, dt.date(2024, 1, 1), dt.date(2024, 2, 1), log=lambda _: None, lock_ttl=1.2)
    assert seen == ["held"]
    assert not storage.exists(state.LOCK)  # released, and no refresh in flight brought it back
    time.sleep(0.3)
    assert not storage.exists(state.LOCK)
