"""Run state under `_state/`: the manifest of processed batches, the run lock, the pending-run log and run records.

Commit protocol of a run (see docs/design.md):
1. take the lock; 2. roll back any pending run that never committed (delete the files it listed);
3. write `_state/pending/<run>.json` naming every file the run will add; 4. write events and quarantine;
5. publish the touched table partitions; 6. write `_state/manifest/<run>.parquet` (the commit point);
7. delete the pending record and release the lock.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import polars as pl

from flows.storage import Storage

MANIFEST = "_state/manifest"
PENDING = "_state/pending"
RUNS = "_state/runs"
LOCK = "_state/lock.json"
TAKEOVERS = "_state/lock-takeovers"  # one marker per crashed run's lock taken over (see `_take_over`)
TAKEOVER_STALE_SECONDS = 300  # a takeover takes milliseconds; a marker this old lost its taker mid-way
METERS = "_state/meters.json"

MANIFEST_SCHEMA = {
    "path": pl.String,
    "size": pl.Int64,
    "mtime": pl.Float64,
    "etag": pl.String,
    "batch": pl.String,
    "run_id": pl.String,
}
COMPACT_AFTER = 64  # manifest files; merged into one so reading state stays cheap
LOCK_POLL_SECONDS = 15.0  # how often a run that waits for the lock looks again


class LockHeld(RuntimeError):
    pass


class LockUnreadable(LockHeld):
    """`_state/lock.json` exists but holds no lock meterlake could have written (empty, truncated, edited)."""


def new_run_id(now: dt.datetime | None = None) -> str:
    now = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


# --- manifest --------------------------------------------------------------------------------
def _scan_manifest(storage: Storage) -> pl.LazyFrame:
    files = [f.path for f in storage.list_files(MANIFEST, (".parquet",))]
    return storage.scan_parquet(files) if files else pl.LazyFrame(schema=MANIFEST_SCHEMA)


def read_manifest(storage: Storage) -> pl.DataFrame:
    # listed and read again when a file is gone meanwhile: `status` reads it outside the lock, while a run compacts it
    manifest = storage.collect_listed(lambda: _scan_manifest(storage))
    return manifest.unique(subset=["path", "batch", "size", "mtime"], keep="first")


def committed_runs(storage: Storage) -> set[str]:
    # Not read_manifest(): its de-duplication drops the rows of a run (a re-ingest) that re-records batches
    # already in the manifest, and that run would then look uncommitted and be rolled back after a crash.
    return set(storage.collect_listed(lambda: _scan_manifest(storage).select("run_id"))["run_id"].to_list())


def commit_manifest(storage: Storage, run_id: str, rows: list[dict]) -> None:
    """The commit point of a run: one object, written atomically. Written even with no rows."""
    df = pl.DataFrame(rows, schema=MANIFEST_SCHEMA) if rows else pl.DataFrame(schema=MANIFEST_SCHEMA)
    if df.is_empty():
        df = pl.DataFrame(
            [{"path": "", "size": 0, "mtime": 0.0, "etag": "", "batch": "", "run_id": run_id}], schema=MANIFEST_SCHEMA
        )
    storage.sync()  # everything the run wrote is durable before the commit point is
    storage.write_parquet(f"{MANIFEST}/{run_id}.parquet", df)
    compact_manifest(storage)


def forget_batches(storage: Storage, landed: set[str]) -> None:
    """Drop the manifest rows of batches that are not `landed` any more: a re-ingest stores the events of the landed
    batches only, so the same file landed again must be read again (and deduplicated against the store), not taken
    for a batch already stored. Each run keeps a row (its commit record: `committed_runs`).

    Called before the re-ingest's commit: forgetting only ever makes a later run read a file again, so a crash
    anywhere leaves a manifest whose every batch has its events stored (the rule the run's skip relies on)."""
    files = [f.path for f in storage.list_files(MANIFEST, (".parquet",))]
    if not files:
        return
    merged = storage.collect(storage.scan_parquet(files))
    gone = (pl.col("batch") != "") & ~pl.col("batch").is_in(sorted(landed))
    if not merged.filter(gone).height:
        return
    kept = merged.filter(~gone)
    emptied = sorted(set(merged["run_id"].to_list()) - set(kept["run_id"].to_list()))
    markers = [{"path": "", "size": 0, "mtime": 0.0, "etag": "", "batch": "", "run_id": r} for r in emptied]
    kept = pl.concat([kept, pl.DataFrame(markers, schema=MANIFEST_SCHEMA)]) if markers else kept
    _replace_manifest(storage, files, kept)


def compact_manifest(storage: Storage) -> None:
    files = [f.path for f in storage.list_files(MANIFEST, (".parquet",))]
    if len(files) <= COMPACT_AFTER:
        return
    _replace_manifest(storage, files, storage.collect(storage.scan_parquet(files)))


def _replace_manifest(storage: Storage, files: list[str], rows: pl.DataFrame) -> None:
    """The manifest's `files` replaced by one file of `rows`: written before they are deleted, so that a crash in
    between leaves every row readable (some twice: `read_manifest` keeps one of each)."""
    storage.write_parquet(f"{MANIFEST}/compact-{new_run_id()}.parquet", rows)
    storage.delete(files)


# --- pending runs (write-ahead log) ------------------------------------------------------------
@dataclass
class Pending:
    run_id: str
    files: list[str] = field(default_factory=list)
    # slug -> {"dates": [...UTC dates...], "periods": [...period starts...]} to recompute on recovery
    touched: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    deletes: list[str] = field(default_factory=list)  # files to delete once committed (re-ingest)


def write_pending(storage: Storage, pending: Pending) -> None:
    storage.write_json(f"{PENDING}/{pending.run_id}.json", asdict(pending))


def read_pendings(storage: Storage) -> list[Pending]:
    out = []
    for f in storage.list_files(PENDING, (".json",)):
        with contextlib.suppress(FileNotFoundError):  # cleared since the listing (a reader outside the lock)
            out.append(Pending(**storage.read_json(f.path)))
    return out


def clear_pending(storage: Storage, run_id: str) -> None:
    storage.delete([f"{PENDING}/{run_id}.json"])


# --- lock --------------------------------------------------------------------------------------
def read_lock(storage: Storage) -> tuple[dict, dt.datetime] | None:
    """The lock's content and its expiry, None without a lock; LockUnreadable if the file is damaged.

    A damaged lock is never taken over: whether a run still holds it cannot be told, so the user decides.
    """
    try:
        data = storage.read_bytes(LOCK)
    except FileNotFoundError:
        return None
    try:
        held = json.loads(data)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        held, problem = None, "not JSON" if data.strip() else "empty file"
    else:
        problem = "not a JSON object" if not isinstance(held, dict) else ""
    if not problem:
        value = held.get("expires_at")
        try:
            expires = dt.datetime.fromisoformat(value)
        except (TypeError, ValueError):
            problem = "no expires_at" if value is None else f"expires_at {value!r} is not a time"
        else:
            if expires.tzinfo is None:
                problem = f"expires_at {value!r} has no UTC offset"
    if problem:
        raise LockUnreadable(
            f"the run lock {storage.uri(LOCK)} is unreadable ({problem}); if no run is active, delete it and run again"
        )
    return held, expires


def acquire_lock(storage: Storage, run_id: str, ttl_seconds: int, now: dt.datetime | None = None) -> None:
    """Take the run lock or raise LockHeld; a lock past its expiry is taken over."""
    now = now or dt.datetime.now(dt.UTC)
    body = {
        "run_id": run_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        **_process_space(),
        "acquired_at": now.isoformat(),
        "expires_at": (now + dt.timedelta(seconds=ttl_seconds)).isoformat(),
    }
    data = json.dumps(body).encode()
    for _ in range(2):
        if storage.create_exclusive(LOCK, data) and storage.read_json(LOCK).get("run_id") == run_id:
            return
        lock = read_lock(storage)
        if lock is None:
            continue
        held, expires = lock
        if expires > now and not holder_gone(held):
            raise LockHeld(
                f"another run ({held.get('run_id')} on {held.get('host')}, pid {held.get('pid')}) holds the lock "
                f"until {held['expires_at']}; try again later"
            )
        _take_over(storage, held, run_id)  # expired, or its process is gone: a crashed run's lock
    raise LockHeld("could not take the run lock (another run is starting); try again")


def _take_over(storage: Storage, held: dict, run_id: str) -> None:
    """Delete a crashed run's lock, as the one run allowed to: an exclusive marker named after the lock's content.

    Without it, two runs that both read the dead lock could each delete it, the second deleting the lock the
    first had just created, and both would run. The marker stays (a later contender that read the same dead lock
    must still lose); one whose taker died before deleting the lock (older than TAKEOVER_STALE_SECONDS) is
    removed so that the next attempt can take over. Markers older than a day are cleared by each takeover.
    """
    digest = hashlib.sha256(json.dumps(held, sort_keys=True, default=str).encode()).hexdigest()[:32]
    marker = f"{TAKEOVERS}/{digest}.json"
    now = dt.datetime.now(dt.UTC)
    if not storage.create_exclusive(marker, json.dumps({"run_id": run_id, "at": now.isoformat()}).encode()):
        try:
            at = dt.datetime.fromisoformat(storage.read_json(marker)["at"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            at = now
        if (now - at).total_seconds() > TAKEOVER_STALE_SECONDS:
            storage.delete([marker])
        raise LockHeld(f"another run is taking over the lock of the crashed run {held.get('run_id')}; try again")
    storage.delete([LOCK])
    old = now - dt.timedelta(days=1)
    storage.delete([f.path for f in storage.list_files(TAKEOVERS, (".json",)) if f.mtime < old.timestamp()])


def _process_space() -> dict[str, str]:
    """What names the space the lock's pid lives in: this boot of this kernel and this pid namespace (Linux).

    Empty elsewhere, and then a lock is only ever taken over once it has expired.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            boot = fh.read().strip()
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return {}
    return {"boot_id": boot, "pid_ns": pid_ns}


def holder_gone(held: dict) -> bool:
    """True when the lock's run was a process of this very boot and pid namespace that no longer exists.

    A run killed with SIGKILL (or by the OOM killer) cannot release its lock; without this, every run on the
    same machine would fail until the lock expires two hours later. Only a process in the same boot and pid
    namespace can be checked: a lock from another machine, container or boot (the same host name proves
    nothing: a restarted pod keeps it) waits for its expiry. A pid reused since is taken as alive: the safe side.
    """
    space = _process_space()
    pid = held.get("pid")
    if not space or held.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    if held.get("boot_id") != space["boot_id"] or held.get("pid_ns") != space["pid_ns"]:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists, under another user
        return False
    return False


def wait_for_lock(
    storage: Storage,
    run_id: str,
    ttl_seconds: int,
    wait_seconds: float,
    log: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """`acquire_lock`, looking again every LOCK_POLL_SECONDS for up to `wait_seconds` while another run holds it.

    A scheduled run that fires during a backfill (each deployment has its own concurrency limit) waits for it
    instead of failing. A damaged lock is never waited for: no run will release it.
    """
    deadline = time.monotonic() + wait_seconds
    told = False
    while True:
        try:
            acquire_lock(storage, run_id, ttl_seconds)
            return
        except LockUnreadable:
            raise
        except LockHeld as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            if not told:
                log(f"waiting up to {wait_seconds:.0f} s for the run lock: {exc}")
                told = True
            sleep(min(LOCK_POLL_SECONDS, left))


def refresh_lock(storage: Storage, run_id: str, ttl_seconds: float) -> None:
    lock = read_lock(storage)  # damaged mid-run: LockUnreadable, exit 4, as at the start
    if lock is None:
        raise LockHeld("lost the run lock: its file is gone")
    held, _ = lock
    if held.get("run_id") != run_id:
        raise LockHeld(f"lost the run lock to {held.get('run_id')}")
    now = dt.datetime.now(dt.UTC)
    held["expires_at"] = (now + dt.timedelta(seconds=ttl_seconds)).isoformat()
    storage.write_json(LOCK, held)


class LockKeeper:
    """Refreshes the run lock every quarter of its TTL while a run or backfill holds it.

    Without it the lock was refreshed only between a run's phases, and never in a backfill: one phase or one
    backfill longer than the TTL (two hours: a large backfill) let the next scheduled run take the lock over as a
    crashed run's and work beside it. A crashed run's lock still expires: the thread dies with its process.
    A refresh that finds the lock lost stops the keeping; the run's next `refresh_lock` raises LockHeld. One
    that fails on storage is tried again at the next beat (the lock is still valid for most of its TTL).
    """

    def __init__(self, storage: Storage, run_id: str, ttl_seconds: float) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if ttl_seconds <= 0:  # a lock expired at once (tests of killed runs): nothing to keep
            return
        interval = ttl_seconds / 4

        def beat() -> None:
            while not self._stop.wait(interval):
                try:
                    refresh_lock(storage, run_id, ttl_seconds)
                except LockHeld:
                    return
                except Exception:  # noqa: BLE001 - storage trouble: the next beat tries again
                    continue

        self._thread = threading.Thread(target=beat, name="meterlake-lock-keeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop refreshing, and wait for a refresh in flight: one landing after the release would bring the lock
        back and block the next run until it expired."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def release_lock(storage: Storage, run_id: str) -> None:
    """Delete the lock if it is this run's; a missing or damaged one is left to the user (see `read_lock`)."""
    try:
        lock = read_lock(storage)
    except LockUnreadable:
        return
    if lock is not None and lock[0].get("run_id") == run_id:
        storage.delete([LOCK])


# --- run records and meter fingerprints ---------------------------------------------------------
def write_run_record(storage: Storage, run_id: str, record: dict) -> None:
    storage.write_json(f"{RUNS}/{run_id}.json", record)


def read_run_records(storage: Storage, last: int = 20) -> list[dict]:
    """The last `last` run records in the order they finished.

    Run ids sort by their start second only (then a random suffix), so records of runs started in the same
    second are read together and put in the order of their `finished_at`.
    """
    files = storage.list_files(RUNS, (".json",))
    if last <= 0 or not files:
        return []
    first = max(len(files) - last, 0)
    second = os.path.basename(files[first].path)[:16]  # the start second: 20240101T000000Z
    while first > 0 and os.path.basename(files[first - 1].path).startswith(second):
        first -= 1
    records = [storage.read_json(f.path) for f in files[first:]]
    records.sort(key=lambda r: (str(r.get("run_id", ""))[:16], str(r.get("finished_at") or "")))
    return records[-last:]


def read_fingerprints(storage: Storage) -> dict[str, str]:
    return storage.read_json(METERS) if storage.exists(METERS) else {}


def write_fingerprints(storage: Storage, fingerprints: dict[str, str]) -> None:
    storage.write_json(METERS, fingerprints)
