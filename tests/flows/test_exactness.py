"""Exactness (SPEC §5): after any sequence of runs, every table equals a from-scratch run over all landed batches.

Seeded random sequences land batches in random order (late batches for old periods, the same batch twice
under another name, a re-landed file with new content, a touched but unchanged file, batches that straddle
billing-period boundaries) and after each run compare every table with a run on a fresh root that gets
every batch version ever landed at once. The final state is also checked against the DuckDB reference.
Backfills: idempotent, rebuild a changed meter like a from-scratch run, and `reingest` changes nothing.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pytest

from flows import pipeline
from flows.storage import Storage
from meters import MeterSet, parse_meters

from reference import Batch, assert_tables_match, compute
from support import all_tables, land, local_root

BILLING = "billing: {period: MONTH, timezone: Europe/Berlin, anchor_day: 15}\n"
METERS = """
meters:
  - slug: tokens
    eventType: prompt
    aggregation: SUM
    valueProperty: $.tokens
    groupBy: {model: $.model}
  - slug: prompts
    eventType: prompt
    aggregation: COUNT
  - slug: last_tokens
    eventType: prompt
    aggregation: LATEST
    valueProperty: $.tokens
  - slug: users
    eventType: api
    aggregation: UNIQUE_COUNT
    valueProperty: $.user
    groupBy: {route: $.route}
  - slug: peak_ms
    eventType: api
    aggregation: MAX
    valueProperty: $.ms
"""
# The same meters with `tokens` grouped differently (a key added, a path changed) and `peak_ms` reading another field.
METERS_CHANGED = METERS.replace("groupBy: {model: $.model}", "groupBy: {model: $.kind, region: $.region}").replace(
    "valueProperty: $.ms", "valueProperty: $.bytes"
)

# UTC days on both sides of Berlin anchor-15 period starts (local midnight = 23:00Z the day before),
# plus a leap day and the EU DST change; a batch draws its events from one pair, so it straddles a boundary.
DAY_PAIRS = [
    (dt.date(2024, 1, 14), dt.date(2024, 1, 15)),
    (dt.date(2024, 2, 14), dt.date(2024, 2, 15)),
    (dt.date(2024, 2, 29), dt.date(2024, 3, 1)),
    (dt.date(2024, 3, 14), dt.date(2024, 3, 15)),
    (dt.date(2024, 3, 30), dt.date(2024, 3, 31)),
    (dt.date(2024, 4, 14), dt.date(2024, 4, 15)),
]
FULL_RANGE = (dt.date(2024, 1, 1), dt.date(2024, 5, 1))


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync only matters for power loss, which no test here simulates; skipping it halves the runtime."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


def quiet_run(storage: Storage, meters: MeterSet) -> dict:
    return pipeline.run(storage, meters, log=lambda _: None)


def quiet_backfill(storage: Storage, meters: MeterSet, **kw) -> dict:
    return pipeline.backfill(storage, meters, *kw.pop("range", FULL_RANGE), log=lambda _: None, **kw)


# --- a landing history ---------------------------------------------------------------------------------
@dataclass
class Version:
    path: str
    records: list[dict]
    mtime: float
    seen: bool = False  # current when a run looked at landing/ (a version replaced before any run never existed)

    def content(self) -> bytes:
        text = "".join(json.dumps(r) + "\n" for r in self.records).encode()
        return gzip.compress(text, mtime=0) if self.path.endswith(".gz") else text


@dataclass
class History:
    rng: random.Random
    versions: list[Version] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    clock: float = 1_700_000_000.0
    counter: int = 0

    def current(self) -> dict[str, Version]:
        return {v.path: v for v in self.versions}

    def event(self, day: dt.date) -> dict:
        rng = self.rng
        self.counter += 1
        ns = rng.randint(0, 24 * 3600 * 10**9 - 1)
        t = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC) + dt.timedelta(microseconds=ns // 1000)
        frac = f"{ns % 10**9:09d}"
        if rng.random() < 0.5:
            time = t.strftime("%Y-%m-%dT%H:%M:%S.") + frac + "Z"
        else:  # the same instant written at +02:00
            time = (t + dt.timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%S.") + frac + "+02:00"
        kind = rng.choice(("prompt", "prompt", "api", "other"))
        if kind == "prompt":
            data = {
                "tokens": rng.choice((rng.randint(1, 500), str(rng.randint(1, 500)), "x", None)),
                "model": rng.choice(("a", "b", None)),
                "kind": rng.choice(("in", "out")),
                "region": rng.choice(("eu", "us", None)),
            }
        else:
            data = {
                "user": rng.choice((f"u{rng.randint(1, 9)}", rng.randint(1, 9))),
                "route": rng.choice(("/a", "/b")),
                "ms": rng.randint(1, 999),
                "bytes": str(rng.randint(1, 10**6)),
            }
        e = {
            "specversion": "1.0",
            "id": f"e{self.counter}",
            "source": rng.choice(("s1", "s2")),
            "type": kind,
            "subject": rng.choice(("c1", "c2", "c3")),
            "time": time,
            "data": data,
        }
        self.events.append(e)
        return e

    def records(self, pairs: list[tuple[dt.date, dt.date]]) -> list[dict]:
        rng = self.rng
        old = list(self.events)
        out = [self.event(rng.choice(rng.choice(pairs))) for _ in range(rng.randint(10, 35))]
        out += [dict(rng.choice(old)) for _ in range(rng.randint(0, 4)) if old]  # exact re-sends
        rng.shuffle(out)
        return out

    def land(self, storage: Storage, path: str, records: list[dict]) -> None:
        self.clock += 10
        version = Version(path, records, self.clock)
        self.versions.append(version)
        land(storage, path, version.content(), mtime=version.mtime)

    def step(self, storage: Storage, op: str, k: int) -> None:
        rng, current = self.rng, self.current()
        if op == "new":
            self.land(storage, f"{rng.choice(('', 'x/', 'x/y/'))}b{k}.jsonl", self.records(DAY_PAIRS[2:]))
        elif op == "edge":  # one or two events in the last UTC hours before a Berlin period start
            day = rng.choice([d for d, _ in DAY_PAIRS if d.day == 14])
            records = [self.event(day) for _ in range(rng.randint(1, 2))]
            hour = 22 if day.month >= 4 else 23  # Berlin midnight is 22:00Z in summer, 23:00Z in winter
            for r in records:
                r["time"] = f"{day.isoformat()}T{hour}:{rng.randint(0, 59):02d}:00.{rng.randint(0, 10**9 - 1):09d}Z"
            self.land(storage, f"edge/b{k}.jsonl", records)
        elif op == "late":  # old periods, after newer ones were published
            self.land(storage, f"late/b{k}.jsonl.gz", self.records(DAY_PAIRS[:2]))
        elif op == "copy":  # the same batch again under another name
            self.land(storage, f"copies/b{k}.jsonl", list(rng.choice(list(current.values())).records))
        elif op == "reland":  # same path, new content: some old lines kept, some dropped, new ones added
            v = rng.choice(list(current.values()))
            kept = [r for r in v.records if rng.random() < 0.6]
            self.land(storage, v.path, kept + self.records(DAY_PAIRS))
        elif op == "touch":  # same path, same bytes, new mtime: nothing new
            v = rng.choice(list(current.values()))
            self.land(storage, v.path, v.records)
        else:
            raise AssertionError(op)

    def ran(self) -> None:
        for v in self.current().values():
            v.seen = True

    def visible(self) -> list[Version]:
        """Every version a run could have read, in landing order."""
        current = self.current()
        return [v for v in self.versions if v.seen or current[v.path] is v]

    def from_scratch(self, tmp: Path, meters: MeterSet, name: str) -> Storage:
        """A fresh root with every version ever landed (superseded ones under another name), run once."""
        root = local_root(tmp, name)
        current = self.current()
        for i, v in enumerate(self.visible()):
            path = v.path if current[v.path] is v else f"superseded/{i}/{v.path}"
            land(root, path, v.content(), mtime=v.mtime)
        quiet_run(root, meters)
        return root

    def reference_batches(self) -> list[Batch]:
        return [Batch(v.path, v.records) for v in self.visible()]


def assert_same_tables(actual: dict[str, pl.DataFrame], expected: dict[str, pl.DataFrame], where: str) -> None:
    """Same tables, extra columns (period_start, date, event_count) included; values within 1e-9 relative."""
    assert actual.keys() == expected.keys()
    for key in expected:
        assert_tables_match(actual[key], expected[key], f"{where} {key}")


def event_rows(storage: Storage) -> int:
    files = [f.path for f in storage.list_files("events", (".parquet",))]
    return storage.scan_parquet(files).select(pl.len()).collect().item() if files else 0


# --- the property ----------------------------------------------------------------------------------------
OPS = ["new", "new", "new", "late", "late", "edge", "edge", "copy", "reland", "touch"]


@pytest.mark.parametrize("seed", [1, 2])
def test_every_run_equals_a_from_scratch_run(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    meters = parse_meters(BILLING + METERS)
    history = History(rng)
    storage = local_root(tmp_path, "incremental")
    ops_done = []
    for k in range(7):
        ops = ["new"] if k == 0 else [rng.choice(OPS) for _ in range(rng.randint(1, 2))]
        for j, op in enumerate(ops):
            history.step(storage, op, 10 * k + j)
        ops_done += ops
        quiet_run(storage, meters)
        history.ran()
        fresh = history.from_scratch(tmp_path, meters, f"scratch-{k}")
        assert_same_tables(all_tables(storage, meters), all_tables(fresh, meters), f"after run {k} ({ops_done})")
        assert event_rows(storage) == event_rows(fresh), f"after run {k}: events/ differs"
    assert {"new", "late"} <= set(ops_done)

    expected = compute(history.reference_batches(), BILLING + METERS)
    for slug_kind, exp in expected.tables.items():
        assert not exp.is_empty(), slug_kind
        slug, kind = slug_kind.split("/")
        assert_tables_match(all_tables(storage, meters)[slug_kind], exp, f"reference {slug} {kind}")
    assert event_rows(storage) == expected.events


def test_a_run_per_batch_in_any_order_equals_one_run(tmp_path: Path) -> None:
    """Late, copied and straddling batches landed one per run, the order shuffled, then one big run."""
    rng = random.Random(7)
    meters = parse_meters(BILLING + METERS)
    history = History(rng)
    scratch = local_root(tmp_path, "scratch")
    for k in range(6):
        history.step(scratch, rng.choice(["new", "late", "copy"]) if k else "new", k)
    one_run_each = local_root(tmp_path, "incremental")
    for v in history.versions:  # already in mtime order: land one by one, running after each
        land(one_run_each, v.path, v.content(), mtime=v.mtime)
        quiet_run(one_run_each, meters)
    quiet_run(scratch, meters)
    assert_same_tables(all_tables(one_run_each, meters), all_tables(scratch, meters), "run per batch")


def test_late_event_in_the_utc_hour_before_a_local_period_start(tmp_path: Path) -> None:
    """23:30Z on Feb 14 is 00:30 on Feb 15 in Berlin: it belongs to the anchor-15 period that starts then,
    whose table already exists; the run must recompute that period, not the UTC date's one."""
    meters = parse_meters(BILLING + METERS)
    storage = local_root(tmp_path)
    first = [
        {"specversion": "1.0", "id": "a", "source": "s", "type": "prompt", "subject": "c",
         "time": "2024-02-20T10:00:00Z", "data": {"tokens": 1}},
        {"specversion": "1.0", "id": "b", "source": "s", "type": "prompt", "subject": "c",
         "time": "2024-02-10T10:00:00Z", "data": {"tokens": 10}},
    ]  # fmt: skip
    land(storage, "a.jsonl", "".join(json.dumps(r) + "\n" for r in first).encode(), mtime=1_700_000_000)
    quiet_run(storage, meters)
    late = {**first[0], "id": "late", "time": "2024-02-14T23:30:00Z", "data": {"tokens": 100}}
    land(storage, "late.jsonl", (json.dumps(late) + "\n").encode(), mtime=1_700_000_010)
    quiet_run(storage, meters)
    period = all_tables(storage, meters)["tokens/period"]
    got = {r["window_start"].isoformat(): r["value"] for r in period.iter_rows(named=True)}
    assert got == {"2024-01-14T23:00:00+00:00": 10.0, "2024-02-14T23:00:00+00:00": 101.0}


# --- backfills ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def landed(tmp_path_factory: pytest.TempPathFactory) -> tuple[History, Path]:
    """A root built by a run after each landing; no re-landed files, so `reingest` sees every batch."""
    tmp = tmp_path_factory.mktemp("backfill")
    history = History(random.Random(11))
    storage = local_root(tmp, "template")
    meters = parse_meters(BILLING + METERS)
    for k, op in enumerate(["new", "late", "new", "copy", "late", "new"]):
        history.step(storage, op, k)
        quiet_run(storage, meters)
        history.ran()
    return history, Path(storage.root)


def _copy_root(template: Path, tmp: Path) -> Storage:
    """A private copy of the template root (copytree keeps mtimes, so the manifest still matches landing/)."""
    shutil.copytree(template, tmp / "root")
    return Storage(str(tmp / "root"))


def _usage_bytes(storage: Storage) -> dict[str, bytes]:
    return {f.path: storage.read_bytes(f.path) for f in storage.list_files("usage")}


def test_backfill_twice_changes_nothing(landed: tuple[History, Path], tmp_path: Path) -> None:
    _history, template = landed
    meters = parse_meters(BILLING + METERS)
    storage = _copy_root(template, tmp_path)
    before = all_tables(storage, meters)
    quiet_backfill(storage, meters)
    first, first_bytes = all_tables(storage, meters), _usage_bytes(storage)
    assert_same_tables(first, before, "first backfill")
    quiet_backfill(storage, meters)
    assert_same_tables(all_tables(storage, meters), first, "second backfill")
    assert _usage_bytes(storage) == first_bytes, "a second identical backfill rewrote different bytes"
    # a backfill of a narrower range and of one meter is a no-op too
    quiet_backfill(storage, meters, range=(dt.date(2024, 2, 10), dt.date(2024, 3, 2)), slugs=["tokens"])
    assert _usage_bytes(storage) == first_bytes


def test_backfill_after_meter_change_equals_from_scratch(landed: tuple[History, Path], tmp_path: Path) -> None:
    history, template = landed
    _old, new = parse_meters(BILLING + METERS), parse_meters(BILLING + METERS_CHANGED)
    storage = _copy_root(template, tmp_path)
    summary = quiet_run(storage, new)  # nothing new landed: the changed meters are only reported stale
    assert summary["stale_meters"] == ["peak_ms", "tokens"]
    quiet_backfill(storage, new, slugs=["tokens", "peak_ms"])
    scratch = history.from_scratch(tmp_path, new, "scratch")
    assert_same_tables(all_tables(storage, new), all_tables(scratch, new), "backfill after change")
    assert "region" in all_tables(storage, new)["tokens/period"].columns
    assert quiet_run(storage, new)["stale_meters"] == []


def test_partial_backfill_rebuilds_exactly_its_range(landed: tuple[History, Path], tmp_path: Path) -> None:
    """A changed valueProperty, backfilled for [Mar 1, Mar 16): hourly days in range and the periods that hold
    them are rebuilt with the new meter, everything else still has the old numbers."""
    history, template = landed
    old, new = parse_meters(BILLING + METERS), parse_meters(BILLING + METERS_CHANGED)
    storage = _copy_root(template, tmp_path)
    old_tables = all_tables(storage, old)
    start, end = dt.date(2024, 3, 1), dt.date(2024, 3, 16)
    quiet_backfill(storage, new, slugs=["peak_ms"], range=(start, end))
    new_tables = all_tables(history.from_scratch(tmp_path, new, "scratch"), new)
    got = all_tables(storage, new)
    lo = dt.datetime(2024, 3, 1, tzinfo=dt.UTC)
    hi = dt.datetime(2024, 3, 16, tzinfo=dt.UTC)
    in_range = (pl.col("window_start") >= lo) & (pl.col("window_start") < hi)
    hourly = got["peak_ms/hourly"]
    assert_tables_match(hourly.filter(in_range), new_tables["peak_ms/hourly"].filter(in_range), "hourly in range")
    assert_tables_match(hourly.filter(~in_range), old_tables["peak_ms/hourly"].filter(~in_range), "hourly outside")
    # Berlin anchor-15 periods holding Mar 1..15: [Feb 15, Mar 15) and [Mar 15, Apr 15)
    touched = (pl.col("window_end") > lo) & (pl.col("window_start") < hi)
    period = got["peak_ms/period"]
    assert_tables_match(period.filter(touched), new_tables["peak_ms/period"].filter(touched), "periods in range")
    assert_tables_match(period.filter(~touched), old_tables["peak_ms/period"].filter(~touched), "periods outside")
    assert not period.filter(~touched).is_empty() and not period.filter(touched).is_empty()
    for slug in ("tokens", "prompts", "last_tokens", "users"):  # unselected meters are untouched
        for kind in ("period", "hourly"):
            assert got[f"{slug}/{kind}"].equals(old_tables[f"{slug}/{kind}"]), f"{slug}/{kind} changed"


def test_reingest_backfill_gives_the_same_tables(landed: tuple[History, Path], tmp_path: Path) -> None:
    _history, template = landed
    meters = parse_meters(BILLING + METERS)
    storage = _copy_root(template, tmp_path)
    before, rows = all_tables(storage, meters), event_rows(storage)
    out = quiet_backfill(storage, meters, reingest_landing=True)
    assert out["events_stored"] == rows
    assert_same_tables(all_tables(storage, meters), before, "reingest")
    assert event_rows(storage) == rows, "reingest left old event files behind or lost some"
    quiet_backfill(storage, meters, reingest_landing=True)
    assert_same_tables(all_tables(storage, meters), before, "second reingest")
    assert event_rows(storage) == rows
    assert not storage.list_files("_state/pending") and not storage.list_files("_state/tmp")


ROUNDING = parse_meters(
    """
billing: {period: MONTH, timezone: Europe/Berlin}
meters:
  - {slug: tokens_total, eventType: prompt, aggregation: SUM, valueProperty: $.tokens, groupBy: {model: $.model}}
  - {slug: tokens_avg, eventType: prompt, aggregation: AVG, valueProperty: $.tokens, groupBy: {model: $.model}}
"""
)


def _two_runs_and_one_run(tmp_path: Path) -> tuple[dict[str, pl.DataFrame], dict[str, pl.DataFrame]]:
    """The tables after two runs (one batch each) and after one run over both batches, of sums whose rounding
    depends on the order their rows are added in."""
    from support import jsonl, rounding_events, run

    lines = rounding_events(40_000, subjects=500)
    first, second = jsonl(lines[:25_000]), jsonl(lines[25_000:])
    two_runs, one_run = local_root(tmp_path / "two"), local_root(tmp_path / "one")
    land(two_runs, "1.jsonl", first, mtime=1_700_000_000)
    run(two_runs, ROUNDING)
    land(two_runs, "2.jsonl", second, mtime=1_700_000_100)
    run(two_runs, ROUNDING)
    land(one_run, "1.jsonl", first, mtime=1_700_000_000)
    land(one_run, "2.jsonl", second, mtime=1_700_000_100)
    run(one_run, ROUNDING)
    return all_tables(two_runs, ROUNDING), all_tables(one_run, ROUNDING)


def test_incremental_equals_from_scratch_to_the_last_bit(tmp_path: Path) -> None:
    """Two runs equal one run exactly, not within a tolerance (Polars' streaming engine broke this; the tables
    are collected on the in-memory engine)."""
    got, expected = _two_runs_and_one_run(tmp_path)
    for name, table in expected.items():
        assert table.height >= 500 and table.equals(got[name]), name


def test_tables_do_not_depend_on_how_event_files_sort(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs in the same second get run ids that sort by their random suffix, and a run started for an
    earlier scheduled time gets an earlier id than the run before it: a day's event files then sort in
    another order than they were stored in. The tables must still equal one run's to the last bit."""
    from flows import state

    ids = iter(["20240301T000000Z-ffffff", "20240301T000000Z-000000"])  # the second run's files sort first
    real = state.new_run_id
    monkeypatch.setattr(state, "new_run_id", lambda now=None: next(ids, None) or real(now))
    got, expected = _two_runs_and_one_run(tmp_path)
    events = sorted(f.path for f in local_root(tmp_path / "two").list_files("events", (".parquet",)))
    assert events[0].endswith("-000000-0000.parquet")  # the second run's file comes first
    for name, table in expected.items():
        assert table.height >= 500 and table.equals(got[name]), name
