"""Crash safety (SPEC §5 atomicity and exactness): SIGKILL a run at a storage write, then restart it.

A helper process imports meterlake once and forks one child per kill point (a fresh process per attempt,
without paying the imports each time). The child patches the storage layer so that its Nth write or delete
kills it with SIGKILL: `before` kills on entering the Nth `Storage.write_bytes`/`Storage.delete`, `tmp`
between writing the temporary file and renaming it into place, `rm` before the Nth single-file removal.
Kill points are an even sample of all the calls (METERLAKE_CRASH_ALL=1 tries every one). After each kill,
every published file is readable (no half-written table); then a normal run restarts, and the tables,
events/ and quarantine must equal those of an uninterrupted run, with nothing left in `_state/tmp` or
`_state/pending` and no event stored twice.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from flows import pipeline, state
from flows.storage import TMP, Storage
from meters import parse_meters

from reference import assert_tables_match
from support import all_tables, event, jsonl, land, local_root

REPO = Path(__file__).resolve().parents[2]

METERS_YAML = """
billing: {period: MONTH, timezone: Europe/Berlin, anchor_day: 1}
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
METERS = parse_meters(METERS_YAML)

# The helper: imports once, then for each command forks a child that runs one operation with a kill hook.
ZYGOTE = textwrap.dedent(
    r"""
    import datetime as dt, json, os, signal, sys
    sys.path.insert(0, sys.argv[1])
    import fsspec.implementations.local as local
    import flows.storage as storage_mod
    from flows import pipeline
    from flows.storage import Storage
    from meters import parse_meters

    os.fsync = lambda fd: None  # durability against power loss is not what these kills test

    def child(cmd):
        calls = [0]
        def tick():
            calls[0] += 1
            if calls[0] == cmd["n"]:
                os.kill(os.getpid(), signal.SIGKILL)
        def wrap(orig):
            def inner(*args, **kwargs):
                tick()
                return orig(*args, **kwargs)
            return inner
        if cmd["mode"] == "before":
            Storage.write_bytes = wrap(Storage.write_bytes)
            Storage.delete = wrap(Storage.delete)
        elif cmd["mode"] == "tmp":  # the temporary file is complete, the rename has not happened
            storage_mod.os.replace = wrap(os.replace)
        elif cmd["mode"] == "rm":
            local.LocalFileSystem.rm_file = wrap(local.LocalFileSystem.rm_file)
        meters = parse_meters(open(cmd["meters"]).read())
        storage = Storage(cmd["root"])
        quiet = lambda _: None
        ttl = cmd.get("lock_ttl", 0)  # 0: a killed run's lock is expired at once
        if cmd["op"] == "run":
            pipeline.run(storage, meters, log=quiet, lock_ttl=ttl)
        else:
            start, end = (dt.date.fromisoformat(d) for d in cmd["range"])
            pipeline.backfill(storage, meters, start, end, reingest_landing=cmd["op"] == "reingest", log=quiet,
                              lock_ttl=ttl)
        with open(cmd["out"], "w") as fh:
            json.dump({"calls": calls[0]}, fh)

    for line in sys.stdin:
        cmd = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                child(cmd)
                os._exit(0)
            except BaseException as exc:  # report, never fall back into the loop
                with open(cmd["out"], "w") as fh:
                    json.dump({"error": repr(exc)}, fh)
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        killed = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        print(json.dumps({"signal": killed, "code": os.WEXITSTATUS(status) if not killed else None}), flush=True)
    """
)


class Killer:
    """Talks to the helper process: `attempt(...)` runs one operation in a fresh child, killed at call `n`."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.meters = tmp / "meters.yaml"
        self.meters.write_text(METERS_YAML)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE, str(REPO)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "POLARS_MAX_THREADS": "2"},
        )

    def attempt(
        self, root: Path | str, n: int, mode: str = "before", op: str = "run", range_: tuple = (), lock_ttl: int = 0
    ) -> dict:
        out = self.tmp / "child.json"
        out.unlink(missing_ok=True)
        cmd = {"root": str(root), "n": n, "mode": mode, "op": op, "meters": str(self.meters), "out": str(out)}
        cmd["lock_ttl"] = lock_ttl
        cmd["range"] = [d.isoformat() for d in range_]
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        status = json.loads(self.proc.stdout.readline())
        result = json.loads(out.read_text()) if out.exists() else {}
        assert "error" not in result, f"the child failed instead of being killed: {result['error']}"
        return {**status, **result}

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGKILL keeps the page cache: fsync (power-loss durability) only slows these tests down."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


@pytest.fixture(scope="module")
def killer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Killer]:
    k = Killer(tmp_path_factory.mktemp("killer"))
    yield k
    k.close()


# --- data --------------------------------------------------------------------------------------------------
def first_batches() -> list[tuple[str, bytes]]:
    a = [
        event(
            f"a{i}",
            f"2024-01-{30 + i % 3:02d}T{(7 * i) % 24:02d}:15:00.123456789+02:00",
            data={"tokens": i, "model": "m" + str(i % 2)},
        )
        for i in range(1, 25)
        if 30 + i % 3 <= 31
    ]
    b = [event(f"b{i}", f"2024-02-01T{i % 24:02d}:00:00Z", data={"tokens": str(i)}) for i in range(12)]
    api = [event(f"c{i}", f"2024-01-31T2{i % 4}:00:00Z", type="api", data={"user": f"u{i % 5}"}) for i in range(10)]
    return [
        ("2024/01/a.jsonl", jsonl([*a, "not json", a[0]])),
        ("2024/02/b.jsonl", jsonl([*b, *api, event("bad", "yesterday"), a[1]])),
    ]


def second_batches() -> list[tuple[str, bytes]]:
    late = [
        event(f"l{i}", f"2024-01-0{1 + i % 5}T10:00:00Z", data={"tokens": 100 + i, "model": "m0"}) for i in range(8)
    ]
    new = [event(f"n{i}", f"2024-02-0{2 + i % 3}T03:00:00-05:00", data={"tokens": i, "model": "m1"}) for i in range(9)]
    again = [event("b3", "2024-02-01T03:00:00Z", data={"tokens": "3"})]  # already stored: dropped
    return [("late/l.jsonl", jsonl(late)), ("2024/02/c.jsonl", jsonl([*new, *again, "{broken"]))]


def land_all(storage: Storage, batches: list[tuple[str, bytes]], t0: float) -> None:
    for i, (name, content) in enumerate(batches):
        land(storage, name, content, mtime=t0 + 10 * i)


def clone(src: Path, dst: Path) -> Storage:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return Storage(str(dst))


def quiet_run(storage: Storage) -> dict:
    return pipeline.run(storage, METERS, log=lambda _: None)


def event_frame(storage: Storage) -> pl.DataFrame:
    files = [f.path for f in storage.list_files("events", (".parquet",))]
    if not files:
        return pl.DataFrame()
    return storage.scan_parquet(files).select("source", "id", "date", "data").collect().sort("source", "id", "date")


def quarantine_rows(storage: Storage) -> list[tuple]:
    files = [f.path for f in storage.list_files("quarantine", (".parquet",))]
    if not files:
        return []
    df = storage.scan_parquet(files).collect()
    return sorted(df.select("stage", "reason", "file", "line", "event_id", "meter").rows(), key=repr)


def snapshot(storage: Storage) -> dict:
    return {
        "tables": all_tables(storage, METERS),
        "events": event_frame(storage),
        "quarantine": quarantine_rows(storage),
    }


def assert_published_files_readable(storage: Storage) -> None:
    """What a reader may see right after the kill: complete Parquet files only, nothing hidden or temporary."""
    for prefix in ("usage", "events", "quarantine"):
        base = Path(storage.path(prefix))
        if not base.exists():
            continue
        for path in base.rglob("*"):
            if path.is_file():
                assert path.suffix == ".parquet" and not path.name.startswith((".", "_")), f"stray file {path}"
                pq.read_metadata(path)  # raises on a truncated file


def assert_recovered(storage: Storage, expected: dict, where: str) -> None:
    got = snapshot(storage)
    for key, exp in expected["tables"].items():
        assert_tables_match(got["tables"][key], exp, f"{where}: {key}")
    assert got["events"].height == expected["events"].height, f"{where}: events/ has {got['events'].height} rows"
    assert got["events"].equals(expected["events"]), f"{where}: events/ differs"
    assert got["quarantine"] == expected["quarantine"], f"{where}: quarantine differs"
    assert not storage.list_files(TMP), f"{where}: leftovers in _state/tmp"
    assert not storage.list_files(state.PENDING), f"{where}: leftovers in _state/pending"
    assert not storage.exists(state.LOCK), f"{where}: lock not released"


# Every kill point with METERLAKE_CRASH_ALL=1; by default an even sample (first, last and spread between).
EXHAUSTIVE = os.environ.get("METERLAKE_CRASH_ALL") == "1"


def kill_points(total: int, limit: int) -> list[int]:
    if total <= limit or EXHAUSTIVE:
        return list(range(1, total + 1))
    step = (total - 1) / (limit - 1)
    return sorted({1 + round(i * step) for i in range(limit)})


# --- the tests -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Template roots: `landed` (batches, never run), `committed` (one run, then new and late batches landed)."""
    tmp = tmp_path_factory.mktemp("bases")
    landed = local_root(tmp, "landed")
    land_all(landed, first_batches(), 1_700_000_000)
    committed = clone(Path(landed.root), tmp / "committed")
    quiet_run(committed)
    land_all(committed, second_batches(), 1_700_000_100)
    return {"landed": Path(landed.root), "committed": Path(committed.root)}


def uninterrupted(base: Path, tmp: Path) -> dict:
    storage = clone(base, tmp / "uninterrupted")
    quiet_run(storage)
    return snapshot(storage)


@pytest.mark.parametrize(
    ("base", "mode", "limit"),
    [("landed", "before", 9), ("landed", "tmp", 3), ("committed", "before", 9), ("committed", "tmp", 3)],
)
def test_kill_anywhere_then_restart(
    killer: Killer, bases: dict[str, Path], tmp_path: Path, base: str, mode: str, limit: int
) -> None:
    expected = uninterrupted(bases[base], tmp_path)
    assert expected["events"].height > 30
    clone(bases[base], tmp_path / "probe")
    probe = killer.attempt(tmp_path / "probe", n=0, mode=mode)
    total = probe["calls"]
    assert probe["signal"] is None and total > 5, probe
    points = kill_points(total, limit)
    for n in points:
        root = tmp_path / f"kill-{n}"
        storage = clone(bases[base], root)
        result = killer.attempt(root, n=n, mode=mode)
        assert result["signal"] == 9, f"call {n} of {total} did not kill the run: {result}"
        if mode == "tmp":
            assert storage.list_files(TMP), "the kill should leave a complete temporary file behind"
        assert_published_files_readable(storage)
        quiet_run(storage)
        assert_recovered(storage, expected, f"{base}, killed at {mode} call {n}/{total}")
        if n == points[len(points) // 2]:  # and a recovered root is stable
            before = {f.path: storage.read_bytes(f.path) for f in storage.list_files("usage")}
            quiet_run(storage)
            assert {f.path: storage.read_bytes(f.path) for f in storage.list_files("usage")} == before
        shutil.rmtree(root)


def test_killed_twice_in_a_row(killer: Killer, bases: dict[str, Path], tmp_path: Path) -> None:
    """A restarted run killed again (during its own recovery) still ends exact."""
    expected = uninterrupted(bases["committed"], tmp_path)
    storage = clone(bases["committed"], tmp_path / "root")
    assert killer.attempt(tmp_path / "root", n=12)["signal"] == 9
    assert killer.attempt(tmp_path / "root", n=3)["signal"] == 9
    assert killer.attempt(tmp_path / "root", n=7)["signal"] == 9
    quiet_run(storage)
    assert_recovered(storage, expected, "killed three times")


def test_kill_during_reingest_backfill(killer: Killer, tmp_path: Path) -> None:
    """A re-ingest after a file was re-landed with other content changes events/. Killed anywhere, then a normal
    run: events/ is the old store or the new one (never a mix or a loss), and the tables are exactly those of
    that store (the old root's tables, or those of an uninterrupted re-ingest)."""
    base = local_root(tmp_path, "base")
    land_all(base, first_batches(), 1_700_000_000)
    quiet_run(base)
    first_events = event_frame(base)
    replaced = [event(f"r{i}", f"2024-01-31T0{i}:00:00Z", data={"tokens": 1000 + i, "model": "m9"}) for i in range(5)]
    land(base, "2024/01/a.jsonl", jsonl(replaced), mtime=1_700_000_500)  # a.jsonl's old events leave landing/
    quiet_run(base)
    old_events = event_frame(base)
    assert old_events.height == first_events.height + 5
    window = (dt.date(2024, 1, 29), dt.date(2024, 2, 3))  # every event date

    done = clone(Path(base.root), tmp_path / "done")
    pipeline.backfill(done, METERS, *window, reingest_landing=True, log=lambda _: None)
    new_events = event_frame(done)
    assert new_events.height < first_events.height, "the re-ingest should drop the replaced file's old events"
    states = {"old": (old_events, all_tables(base, METERS)), "new": (new_events, all_tables(done, METERS))}

    clone(Path(base.root), tmp_path / "probe")
    probe = killer.attempt(tmp_path / "probe", 0, op="reingest", range_=window)
    total = probe["calls"]
    seen = set()
    for mode, points in (("before", kill_points(total, 7)), ("rm", [1, 2])):
        for n in points:
            root = tmp_path / f"kill-{mode}-{n}"
            storage = clone(Path(base.root), root)
            result = killer.attempt(root, n, mode=mode, op="reingest", range_=window)
            assert result["signal"] == 9, f"{mode} call {n} did not kill the re-ingest: {result}"
            assert_published_files_readable(storage)
            quiet_run(storage)
            where = f"reingest killed at {mode} call {n}/{total}"
            events = event_frame(storage)
            which = [name for name, (ev, _) in states.items() if events.equals(ev)]
            assert which, f"{where}: events/ is neither the old nor the new store ({events.height} rows)"
            seen.add(which[0])
            for key, table in states[which[0]][1].items():  # tables agree with that store
                assert_tables_match(all_tables(storage, METERS)[key], table, f"{where}: {key}")
            assert not storage.list_files(TMP) and not storage.list_files(state.PENDING), where
            shutil.rmtree(root)
    assert seen == {"old", "new"}, "kill points should fall both before and after the re-ingest commits"


def test_kill_during_backfill_then_restart_and_land_more(
    killer: Killer, bases: dict[str, Path], tmp_path: Path
) -> None:
    """A backfill (events/ unchanged) killed anywhere; then a run, a newly landed batch and another run: the
    same as never having backfilled."""
    more = [event(f"m{i}", f"2024-01-31T2{i}:30:00.5-05:00", data={"tokens": i, "model": "m0"}) for i in range(4)]
    extra = [("more/m.jsonl", jsonl([*more, event("b5", "2024-02-01T05:00:00Z", data={"tokens": "5"})]))]
    expected_root = clone(bases["committed"], tmp_path / "expected")
    quiet_run(expected_root)
    land_all(expected_root, extra, 1_700_000_500)
    quiet_run(expected_root)
    expected = snapshot(expected_root)
    window = (dt.date(2024, 1, 1), dt.date(2024, 2, 10))
    clone(bases["committed"], tmp_path / "probe")
    probe = killer.attempt(tmp_path / "probe", 0, op="backfill", range_=window)
    total = probe["calls"]
    assert probe["signal"] is None and total > 5, probe  # the kill points below are real
    for n in kill_points(total, 5):
        root = tmp_path / f"kill-{n}"
        storage = clone(bases["committed"], root)
        result = killer.attempt(root, n, op="backfill", range_=window)
        assert result["signal"] == 9, f"call {n} of {total} did not kill the backfill: {result}"
        assert_published_files_readable(storage)
        quiet_run(storage)
        land_all(storage, extra, 1_700_000_500)
        quiet_run(storage)
        assert_recovered(storage, expected, f"backfill killed at call {n}/{total}")
        shutil.rmtree(root)


# --- the lock --------------------------------------------------------------------------------------------------
def test_expired_lock_is_taken_over(bases: dict[str, Path], tmp_path: Path) -> None:
    storage = clone(bases["landed"], tmp_path / "root")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=3)
    state.acquire_lock(storage, "crashed-run", ttl_seconds=3600, now=past)  # expired two hours ago
    summary = quiet_run(storage)
    assert summary["events_stored"] > 0
    assert not storage.exists(state.LOCK)


def test_live_lock_makes_a_second_run_fail(bases: dict[str, Path], tmp_path: Path) -> None:
    storage = clone(bases["landed"], tmp_path / "root")
    state.acquire_lock(storage, "running-elsewhere", ttl_seconds=3600)
    with pytest.raises(state.LockHeld, match="running-elsewhere"):
        quiet_run(storage)
    with pytest.raises(state.LockHeld):
        pipeline.backfill(storage, METERS, dt.date(2024, 1, 1), dt.date(2024, 2, 1), log=lambda _: None)
    assert not storage.list_files("events") and not storage.list_files("usage"), "a locked-out run wrote data"
    assert storage.read_json(state.LOCK)["run_id"] == "running-elsewhere", "the live lock was stolen"
    state.release_lock(storage, "running-elsewhere")
    assert quiet_run(storage)["events_stored"] > 0


def test_concurrent_runs_one_wins(bases: dict[str, Path], tmp_path: Path) -> None:
    """Two processes started together: each runs or gets LockHeld (never both at once); the result equals one run."""
    expected = uninterrupted(bases["landed"], tmp_path)
    root = tmp_path / "root"
    storage = clone(bases["landed"], root)
    script = textwrap.dedent(
        f"""
        import sys; sys.path.insert(0, {str(REPO)!r})
        from flows import pipeline, state
        from flows.storage import Storage
        from meters import parse_meters
        try:
            pipeline.run(Storage({str(root)!r}), parse_meters({METERS_YAML!r}), log=lambda _: None)
            print("ran")
        except state.LockHeld:
            print("locked")
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert "ran" in outcomes and all(o in ("ran", "locked") for o in outcomes), outcomes
    assert_recovered(storage, expected, "concurrent runs")


# --- on S3 -------------------------------------------------------------------------------------------------
def assert_published_objects_readable(storage: Storage) -> None:
    """`assert_published_files_readable` for an S3 root: complete Parquet objects only, nothing hidden."""
    for prefix in ("usage", "events", "quarantine"):
        for f in storage.list_files(prefix):
            name = f.path.rsplit("/", 1)[-1]
            assert name.endswith(".parquet") and not name.startswith((".", "_")), f"stray object {f.path}"
            pq.read_metadata(io.BytesIO(storage.read_bytes(f.path)))  # raises on a truncated object


def clone_s3(src: Storage, root: str) -> Storage:
    """A copy of an S3 root, each object put straight into the in-process moto server's store (copying ~50
    objects over HTTP takes seconds) with its LastModified kept: the manifest's (path, size, mtime, etag) of
    each landed batch still match, as in a root that was never copied."""
    from moto.s3.models import s3_backends

    target = Storage(root)
    backend = s3_backends["123456789012"]["aws"]
    prefix = src._key("") + "/"
    for name in [k for k in backend.get_bucket(src.bucket).keys if k.startswith(prefix)]:
        key = backend.get_object(src.bucket, name)
        copy = backend.put_object(target.bucket, target._key(name[len(prefix) :]), key.value)
        copy.last_modified = key.last_modified
    return target


@pytest.mark.s3
@pytest.mark.slow
def test_kill_anywhere_on_s3_then_restart(
    s3_root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The `committed` case of test_kill_anywhere_then_restart (one run, then new and late batches) on an S3
    root, killed at a sample of the run's storage writes and deletes. The kills keep the default two-hour lock:
    the restart takes it over because the killed process is gone (state.holder_gone), as a run restarted on the
    same machine would."""
    import flows.storage as storage_module

    monkeypatch.setattr(storage_module, "DEFAULT_RETRY", storage_module.RetryPolicy(3, 0.02, 0.2))
    caplog.set_level(logging.WARNING, logger="werkzeug")  # moto's request log: a record per request
    s3_killer = Killer(tmp_path)  # started here: it inherits the AWS variables aimed at moto
    try:
        base = Storage(f"{s3_root}/base")
        land_all(base, first_batches(), 0)
        quiet_run(base)
        land_all(base, second_batches(), 0)
        expected_root = clone_s3(base, f"{s3_root}/uninterrupted")
        assert len(pipeline.find_new_batches(expected_root)) == len(second_batches())
        probe = s3_killer.attempt(expected_root.root, n=0)  # an uninterrupted run, counting its calls
        total = probe["calls"]
        assert probe["signal"] is None and total > 5, probe
        expected = snapshot(expected_root)
        assert expected["events"].height > 30
        for n in kill_points(total, 3):  # before the first write, mid-way, at the last one (after the commit)
            storage = clone_s3(base, f"{s3_root}/kill-{n}")
            result = s3_killer.attempt(storage.root, n=n, lock_ttl=pipeline.LOCK_TTL)
            assert result["signal"] == 9, f"call {n} of {total} did not kill the run: {result}"
            held = storage.read_json(state.LOCK)  # the killed run could not release its lock
            assert held["expires_at"] > dt.datetime.now(dt.UTC).isoformat() and state.holder_gone(held)
            assert_published_objects_readable(storage)
            quiet_run(storage)
            assert_recovered(storage, expected, f"S3, killed at call {n}/{total}")
    finally:
        s3_killer.close()
