"""Exactness scenarios (SPEC §5): a seeded fuzzer that mixes what the other exactness tests exercise one by one.

Each step lands 0-3 batches: new ones (JSONL, NDJSON, gzip or Parquet, in nested folders), the same content under
another name, a re-landed file with changed content (lines dropped, events moved to another time, often another UTC
day, values changed), a deleted landed file, an older version's very bytes landed again at its path (most often one
a re-ingest dropped events of), a touched file. Then one operation: a run; a run or backfill SIGKILLed at a random
storage write or delete (sometimes its restart killed too; landings may follow each kill), restarted by a run, a
backfill or a re-ingest, sometimes with the meters file changed first; a backfill over a random range, for all or
named meters; a re-ingest; a change of the meters file (a definition changed, a meter added or removed, the billing
period, zone or anchor day changed) followed by a run or the backfill `meterlake status` recommends. Half the seeds
use tiny ingest chunks, recompute slices and period reads (one batch, one day, one meter at a time). Events fall on
billing-period, UTC hour and day boundaries (to the nanosecond), DST transitions of the billing zone (Lord Howe's
half-hour one included), the first and last representable years, share (source, id) across batches and dates, and
tie on time for LATEST; values and group-by values are numbers, numeric strings, non-numbers, null, missing,
booleans and objects; every aggregation, with and without groupBy. A second random stream (`extra`: a seed plays the
operations it played before that stream existed until a kill at the n-th storage write lands elsewhere, the extra
meters adding writes) adds: 0-2 meters fixed for the whole scenario (more meters on one type, nested paths, an array
index, a key with a space, `eventFrom` on DST instants with events 1 ns either side, UNIQUE_COUNT and group-by over
floats, booleans, "", escaped and non-ASCII text, missing keys), float values, Parquet batches whose `time` is a
timestamp column, and JSONL lines written unescaped in UTF-8, some with a key of `data` written twice.

After every operation, each table of every meter `status` reports current equals a from-scratch run (on a fresh
root, default limits) over every batch version a run has read, and events/ holds as many rows; at the end, after the
recommended backfills, every table also equals the DuckDB reference, and `meterlake query` (computed from the
curated events) gives each meter's hourly table (UTC HOUR windows in 2024), its period table (DAY or MONTH windows
in the billing zone, when periods are days or months from the 1st) and a few of its billing periods (unwindowed,
grouped by subject and every key). A re-ingest rebuilds its range's dates from the files landed at that moment, so
the model drops the events in that range of versions no longer landed.

The committed seeds each met a real defect before the `extra` stream (a batch landed again after a re-ingest was
skipped). Explore more with METERLAKE_FUZZ_SEEDS=1-200 (or 3,7,9) and METERLAKE_FUZZ_STEPS=20. The DAY/MONTH query
check needs a seed that ends on DAY billing or months from the 1st (401 does; 1, 4 and 7 do not). On 2026-11-28
seeds 1, 4, 7 and 406-436 passed as committed; with up to five extra meters and HOUR queries over every year
(slower), seeds 400-460 and 600-640 (8 steps), 500-511 (20), 800-807 (25) and 700-703 (40) passed too.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from random import Random

import polars as pl
import pytest

from flows import pipeline, recompute, state, tools
from flows.storage import TMP, Storage
from meters import MeterSet, parse_meters

from reference import Batch, assert_tables_match, compute
from support import land, local_root, parquet_bytes, table

REPO = Path(__file__).resolve().parents[2]
NS = 10**9


def _seeds() -> list[int]:
    spec = os.environ.get("METERLAKE_FUZZ_SEEDS", "")
    if not spec:
        return [1, 4, 7]
    if "-" in spec:
        lo, hi = spec.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in spec.split(",")]


STEPS = int(os.environ.get("METERLAKE_FUZZ_STEPS", "8"))

# --- meters -------------------------------------------------------------------------------------------------
BILLINGS = [
    "billing: {period: MONTH, timezone: Europe/Berlin, anchor_day: 15}\n",
    "billing: {period: MONTH, timezone: America/New_York, anchor_day: 31}\n",
    "billing: {period: WEEK, timezone: Australia/Lord_Howe}\n",
    "billing: {period: DAY, timezone: Europe/Berlin}\n",
    "",  # the defaults: MONTH, UTC, anchor 1
]
METER_LINES = {
    "tokens": "{slug: tokens, eventType: prompt, aggregation: SUM, valueProperty: $.tokens, groupBy: {model: $.model}}",
    "prompts": "{slug: prompts, eventType: prompt, aggregation: COUNT, groupBy: {region: $.region}}",
    "avg_tokens": "{slug: avg_tokens, eventType: prompt, aggregation: AVG, valueProperty: $.tokens}",
    "min_ms": "{slug: min_ms, eventType: api, aggregation: MIN, valueProperty: $.ms, groupBy: {route: $.route}}",
    "max_ms": "{slug: max_ms, eventType: api, aggregation: MAX, valueProperty: $.ms}",
    "users": "{slug: users, eventType: api, aggregation: UNIQUE_COUNT, valueProperty: $.user, groupBy: {route: $.route}}",
    "last_tokens": "{slug: last_tokens, eventType: prompt, aggregation: LATEST, valueProperty: $.tokens, "
    "groupBy: {model: $.model}}",
}
# Changed definitions of some of them (another path, another grouping, another type or aggregation), and new ones.
VARIANTS = {
    "tokens": "{slug: tokens, eventType: prompt, aggregation: SUM, valueProperty: $.tokens, "
    "groupBy: {model: $.kind, region: $.region}}",
    "max_ms": "{slug: max_ms, eventType: api, aggregation: MAX, valueProperty: $.bytes}",
    "users": "{slug: users, eventType: prompt, aggregation: UNIQUE_COUNT, valueProperty: $.model}",
    "prompts": "{slug: prompts, eventType: api, aggregation: COUNT, groupBy: {region: $.route}}",
    "last_ms": "{slug: last_ms, eventType: api, aggregation: LATEST, valueProperty: $.ms, groupBy: {user: $.user}}",
    "all_count": "{slug: all_count, eventType: other, aggregation: COUNT}",
}

# Meters some seeds also have, for the whole scenario (drawn from the `extra` stream, never changed): more meters on
# one type, nested paths, a key with a space, an array index, an `eventFrom` on a DST instant (events 1 ns either
# side), UNIQUE_COUNT and group-by over values that are floats, booleans, objects, "" or missing.
EXTRA_LINES = {
    "sizes": "{slug: sizes, eventType: api, aggregation: SUM, valueProperty: $.sizes.in, "
    "groupBy: {tag: '$.tags[1]', flag: \"$['fl ag']\"}}",
    "since": "{slug: since, eventType: prompt, aggregation: COUNT, eventFrom: '2024-03-10T07:00:00Z', "
    "groupBy: {model: $.model}}",
    "since_sum": "{slug: since_sum, eventType: prompt, aggregation: SUM, valueProperty: $.tokens, "
    "eventFrom: '2024-10-27T01:00:00.000001+00:00'}",
    "models": "{slug: models, eventType: prompt, aggregation: UNIQUE_COUNT, valueProperty: $.model, "
    "groupBy: {region: $.region}}",
    "peak_tokens": "{slug: peak_tokens, eventType: prompt, aggregation: MAX, valueProperty: $.tokens, "
    "groupBy: {kind: $.kind, user: $.user}}",
}


def meters_yaml(billing: str, lines: dict[str, str], extra: dict[str, str] | None = None) -> str:
    every = {**(extra or {}), **lines}
    return billing + "meters:\n" + "".join(f"  - {line}\n" for line in every.values())


def changed_meters(rng: Random, billing: str, lines: dict[str, str]) -> tuple[str, dict[str, str]]:
    lines = dict(lines)
    what = rng.choice(["definition", "definition", "add", "remove", "billing"])
    if what == "definition":
        slug = rng.choice([s for s in VARIANTS if s in METER_LINES])
        lines[slug] = VARIANTS[slug] if lines.get(slug) != VARIANTS[slug] else METER_LINES[slug]
    elif what == "add":
        missing = [s for s in [*METER_LINES, "last_ms", "all_count"] if s not in lines]
        if missing:
            slug = rng.choice(missing)
            lines[slug] = METER_LINES.get(slug) or VARIANTS[slug]
    elif what == "remove" and len(lines) > 3:
        del lines[rng.choice(sorted(lines))]
    else:
        billing = rng.choice([b for b in BILLINGS if b != billing])
    return billing, lines


# --- event times ----------------------------------------------------------------------------------------------
def _ns(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> int:
    return (
        int((dt.datetime(y, mo, d, h, mi, s, tzinfo=dt.UTC) - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)).total_seconds())
        * NS
    )


INSTANTS = [
    _ns(2024, 1, 14, 23),  # Berlin anchor-15 period start (winter)
    _ns(2024, 3, 14, 23),
    _ns(2024, 4, 14, 22),  # (summer)
    _ns(2024, 3, 31, 1),  # Berlin DST starts
    _ns(2024, 10, 27, 1),  # Berlin DST ends
    _ns(2024, 3, 10, 7),  # New York DST starts
    _ns(2024, 11, 3, 6),  # New York DST ends
    _ns(2024, 2, 29, 5),  # New York local midnight, anchor 31 clamped to Feb 29
    _ns(2024, 3, 31, 4),  # New York anchor 31, March
    _ns(2024, 4, 30, 4),  # New York anchor 31 clamped to Apr 30
    _ns(2024, 4, 6, 15),  # Lord Howe: +11 -> +10:30
    _ns(2024, 10, 5, 15, 30),  # Lord Howe: +10:30 -> +11
    _ns(2024, 4, 7, 13, 30),  # Lord Howe Monday midnight after the change
    _ns(2024, 3, 1),  # UTC day and month boundary
    _ns(2024, 1, 1),  # year boundary
    _ns(2024, 2, 29, 12),  # leap day
    _ns(1970, 1, 1),
    _ns(1900, 1, 1, 0, 30),
    _ns(1678, 1, 1),  # the first representable year
    _ns(2261, 12, 31, 23, 59, 59),  # the last
]
JITTER = [0, 0, -1, 1, 1000, -1000, 37 * 60 * NS + 123_456_789, -NS, 3599 * NS + 999_999_999]
OFFSETS = [0, 0, 0, 2 * 60, -5 * 60, 5 * 60 + 45, 14 * 60, -12 * 60]
FIRST_NS, LAST_NS = _ns(1678, 1, 1), _ns(2262, 1, 1) - 1


def rfc3339(ns: int, offset_min: int) -> str:
    local = ns + offset_min * 60 * NS
    secs, frac = divmod(local, NS)
    text = (dt.datetime(1970, 1, 1) + dt.timedelta(seconds=secs)).strftime("%Y-%m-%dT%H:%M:%S")
    text += f".{frac:09d}" if frac or offset_min % 2 else ""
    if offset_min == 0:
        return text + "Z"
    sign = "+" if offset_min > 0 else "-"
    return text + f"{sign}{abs(offset_min) // 60:02d}:{abs(offset_min) % 60:02d}"


_TIME = re.compile(r"^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$")


def utc_day(record: object) -> str | None:
    """The UTC date of a generated record's time (None for records that are not valid events)."""
    if isinstance(record, str):  # a raw JSONL line
        try:
            record = json.loads(record)
        except ValueError:
            return None
    if not isinstance(record, dict) or not isinstance(record.get("time"), str):
        return None
    m = _TIME.match(record["time"])
    if not m:
        return None
    y, mo, d, h, mi, s = (int(g) for g in m.groups()[:6])
    when = dt.datetime(y, mo, d, h, mi, s)
    if m.group(8) != "Z":
        sign = 1 if m.group(8)[0] == "+" else -1
        when -= sign * dt.timedelta(hours=int(m.group(8)[1:3]), minutes=int(m.group(8)[4:6]))
    return when.date().isoformat()


def utc_ns(text: str) -> int:
    m = _TIME.match(text)
    assert m, text
    y, mo, d, h, mi, sec = (int(g) for g in m.groups()[:6])
    ns = _ns(y, mo, d, h, mi, sec) + int((m.group(7) or "").ljust(9, "0"))
    if m.group(8) != "Z":
        sign = 1 if m.group(8)[0] == "+" else -1
        ns -= sign * (int(m.group(8)[1:3]) * 60 + int(m.group(8)[4:6])) * 60 * NS
    return ns


# --- landing history and the model ----------------------------------------------------------------------------
@dataclass
class Version:
    path: str
    records: list
    mtime: float
    ingested: bool = False
    dropped: list[tuple[str, str]] = field(default_factory=list)  # UTC date ranges a re-ingest rebuilt without it
    timestamps: bool = False  # Parquet: `time` as a timestamp column, not RFC 3339 text

    def kept(self) -> list:
        return [r for r in self.records if not any(lo <= (utc_day(r) or "") < hi for lo, hi in self.dropped)]

    def content(self, records: list | None = None) -> bytes:
        records = self.records if records is None else records
        if self.path.endswith(".parquet"):
            return parquet_bytes(parquet_frame(records, self.timestamps))
        text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()
        return gzip.compress(text, mtime=0) if self.path.endswith(".gz") else text


ENVELOPE = ("specversion", "id", "source", "type", "subject", "time")


def parquet_frame(records: list, timestamps: bool = False) -> pl.DataFrame:
    rows = [r for r in records if isinstance(r, dict)]
    cols = {k: pl.Series(k, [r.get(k) for r in rows], pl.String) for k in ENVELOPE}
    if timestamps:  # the same instants, to the nanosecond (Parquet rows hold only valid times)
        cols["time"] = pl.Series("time", [utc_ns(r["time"]) for r in rows], pl.Int64).cast(pl.Datetime("ns", "UTC"))
    data = [None if r.get("data") is None else json.dumps(r["data"]) for r in rows]
    return pl.DataFrame([*cols.values(), pl.Series("data", data, pl.String)])


@dataclass
class World:
    rng: Random
    storage: Storage
    extra: Random = field(default_factory=lambda: Random(0))  # content the first fuzzer did not generate
    versions: list[Version] = field(default_factory=list)
    current: dict[str, Version] = field(default_factory=dict)
    sent: list[dict] = field(default_factory=list)
    clock: float = 1_700_000_000.0
    counter: int = 0

    # events
    def event(self, like: dict | None = None) -> dict:
        rng = self.rng
        self.counter += 1
        ns = min(max(rng.choice(INSTANTS) + rng.choice(JITTER), FIRST_NS), LAST_NS)
        offset = rng.choice(OFFSETS) if FIRST_NS + NS * 86400 < ns < LAST_NS - NS * 86400 else 0
        kind = rng.choice(("prompt", "prompt", "api", "api", "other"))
        if kind == "prompt":
            data: dict = {
                "tokens": rng.choice((rng.randint(1, 500), str(rng.randint(1, 50)), "1e3", "12.5", "x", None, True)),
                "model": rng.choice(("a", "b", None, 7, {"m": 1})),
                "kind": rng.choice(("in", "out")),
                "region": rng.choice(("eu", "us", None)),
            }
            if rng.random() < 0.1:
                del data["tokens"]
        else:
            data = {
                "user": rng.choice((f"u{rng.randint(1, 6)}", rng.randint(1, 6), None)),
                "route": rng.choice(("/a", "/b", None)),
                "ms": rng.choice((rng.randint(1, 999), -rng.randint(1, 9), "2.5", "bad")),
                "bytes": str(rng.randint(1, 10**6)),
            }
        self.more(data)
        e = {
            "specversion": "1.0",
            "id": f"e{self.counter}" if rng.random() < 0.8 else f"e{rng.randint(1, 6)}",  # ids shared across batches
            "source": rng.choice(("s1", "s2")),
            "type": kind,
            "subject": rng.choice(("c1", "c2")),
            "time": rfc3339(ns, offset),
            "data": data,
        }
        if like is not None and rng.random() < 0.5:  # a LATEST tie: same instant, another id or source
            e["time"] = like["time"]
        self.sent.append(e)
        return e

    def more(self, data: dict) -> None:
        """Values the first fuzzer never sent (from the `extra` stream, so the seeds' operations stay the same):
        floats (text `1` for `1.0`), booleans, "", non-ASCII and escaped text, missing keys, nested objects and
        arrays for the extra meters' paths."""
        x = self.extra
        if x.random() < 0.3:
            odd = (2.5, 1.0, 1000.0, 0.125, True, False, "", "é", 'a"b', "a\\b", "tab\t", "🙂", 3.0, "3", 3)
            for key in ("model", "region", "user", "route"):
                if key in data and x.random() < 0.5:
                    data[key] = x.choice(odd)
            if "tokens" in data and x.random() < 0.5:
                data["tokens"] = x.choice((12.5, 0.1, 1000.0, -2.25, 1e-7, 3e20, "0.5", "-1e-3"))
            for key in ("model", "region", "user", "route", "kind"):
                if key in data and x.random() < 0.1:
                    del data[key]
        if x.random() < 0.5:
            data["sizes"] = x.choice(({"in": x.randint(1, 99)}, {"in": str(x.randint(1, 9))}, {"out": 1}, {}, None, 7))
            data["tags"] = x.choice((["t0", "t1"], ["t0", 1.5], ["t0"], [], [None, False], "t"))
            data["fl ag"] = x.choice(("on", "off", True, 0, None))
            if "user" not in data and x.random() < 0.5:  # peak_tokens groups prompts by user too
                data["user"] = x.choice(("u1", 2, 2.0))

    def raw(self, record: dict) -> str:
        """A JSONL line as a producer may write it: UTF-8 unescaped, sometimes a key of `data` written twice
        (the last one counts, as in OpenMeter)."""
        line = json.dumps(record, ensure_ascii=False)
        data = record.get("data")
        if isinstance(data, dict) and data and self.extra.random() < 0.5:
            key = self.extra.choice(sorted(data))
            text = json.dumps(data, ensure_ascii=False)
            twice = "{" + json.dumps(key) + ": 999999, " + text[1:]
            line = line.replace('"data": ' + text, '"data": ' + twice)
        return line

    def records(self, n: int, malformed: bool) -> list:
        rng = self.rng
        out: list = []
        for _ in range(n):
            out.append(self.event(out[-1] if out and isinstance(out[-1], dict) else None))
        out += [dict(rng.choice(self.sent[:-n])) for _ in range(rng.randint(0, 3)) if len(self.sent) > n]  # re-sends
        if malformed:
            out += rng.sample(['{"broken', "", '{"specversion": "1.0", "id": "q", "source": "s1"}'], 2)
            bad = dict(self.event())
            bad["time"] = "yesterday"
            out.append(bad)
            out = [self.raw(r) if isinstance(r, dict) and self.extra.random() < 0.15 else r for r in out]
        rng.shuffle(out)
        return out

    # landing operations
    def _land(self, path: str, records: list, like: Version | None = None) -> None:
        self.clock += 10
        v = Version(path, records, self.clock)
        v.timestamps = like.timestamps if like is not None else self.extra.random() < 0.5
        self.versions.append(v)
        self.current[path] = v
        land(self.storage, path, v.content(), mtime=v.mtime)

    def op_new(self, k: int) -> None:
        ext = self.rng.choice((".jsonl", ".jsonl", ".jsonl.gz", ".parquet", ".ndjson"))
        path = f"{self.rng.choice(('', 'x/', 'x/y/'))}b{k}{ext}"
        self._land(path, self.records(self.rng.randint(4, 18), malformed=not ext.endswith(".parquet")))

    def op_copy(self, k: int) -> None:
        if self.current:
            v = self.rng.choice(list(self.current.values()))
            ext = "." + v.path.split(".", 1)[1]
            self._land(f"copies/c{k}{ext}", list(v.records))

    def op_reland(self, k: int) -> None:
        if not self.current:
            return
        rng = self.rng
        v = rng.choice(list(self.current.values()))
        out = []
        for r in v.records:
            if rng.random() < 0.3:
                continue
            if isinstance(r, dict) and rng.random() < 0.3:  # the same (source, id), another time (often another day)
                r = {**r, "time": self.event()["time"], "data": dict(r["data"] or {}, tokens=rng.randint(1, 9))}
            out.append(r)
        self._land(v.path, out + self.records(rng.randint(1, 6), malformed=False))

    def op_touch(self, k: int) -> None:
        if self.current:
            v = self.rng.choice(list(self.current.values()))
            self._land(v.path, v.records, like=v)

    def op_restore(self, k: int) -> None:  # an older version's very bytes landed again at its path
        old = [v for v in self.versions if self.current.get(v.path) is not v]
        dropped = [v for v in old if v.dropped]  # most often one a re-ingest dropped events of
        old = dropped if dropped and self.rng.random() < 0.7 else old
        if old:
            v = self.rng.choice(old)
            self._land(v.path, v.records, like=v)

    def op_delete(self, k: int) -> None:
        if self.current:
            path = self.rng.choice(sorted(self.current))
            del self.current[path]
            self.storage.delete([f"landing/{path}"])

    # what processing did, in the model
    def ran(self) -> None:
        for v in self.current.values():
            v.ingested = True

    def reingested(self, start: dt.date, end: dt.date) -> None:
        live = {id(v) for v in self.current.values()}
        for v in self.versions:
            if v.ingested and id(v) not in live:
                v.dropped.append((start.isoformat(), end.isoformat()))
        self.ran()

    def read(self) -> list[Version]:
        return [v for v in self.versions if v.ingested]

    def from_scratch(self, tmp: Path, meters: MeterSet, name: str) -> Storage:
        root = local_root(tmp, name)
        for i, v in enumerate(self.read()):
            path = v.path if self.current.get(v.path) is v else f"superseded/{i}/{v.path}"
            land(root, path, v.content(v.kept()), mtime=v.mtime)
        pipeline.run(root, meters, log=lambda _: None)
        return root

    def reference_batches(self) -> list[Batch]:
        out = []
        for v in self.read():
            kind = "parquet" if v.path.endswith(".parquet") else "jsonl"
            records = [r for r in v.kept() if kind == "jsonl" or isinstance(r, dict)]
            out.append(Batch(f"landing/{v.path}", records, kind))
        return out


# --- killing a run or backfill: a helper process forks one child per attempt -----------------------------------
ZYGOTE = textwrap.dedent(
    r"""
    import datetime as dt, json, os, signal, sys
    sys.path.insert(0, sys.argv[1])
    import fsspec.implementations.local as local
    from flows import pipeline, recompute, state
    from flows.storage import Storage
    from meters import parse_meters

    os.fsync = lambda fd: None
    os.sync = lambda: None

    def child(cmd):
        calls = [0]
        def wrap(orig):
            def inner(*args, **kwargs):
                calls[0] += 1
                if calls[0] == cmd["n"]:
                    os.kill(os.getpid(), signal.SIGKILL)
                return orig(*args, **kwargs)
            return inner
        Storage.write_bytes = wrap(Storage.write_bytes)
        local.LocalFileSystem.rm_file = wrap(local.LocalFileSystem.rm_file)
        modules = {"CHUNK_BYTES": pipeline, "SLICE_BYTES": recompute, "PERIOD_READ_BYTES": recompute}
        for name, value in cmd["limits"].items():
            setattr(modules[name], name, value)
        meters = parse_meters(cmd["meters"])
        storage = Storage(cmd["root"])
        quiet = lambda _: None
        state.TAKEOVER_STALE_SECONDS = 0  # see `tuned`
        for attempt in range(2):
            try:
                if cmd["op"] == "run":
                    pipeline.run(storage, meters, log=quiet, lock_ttl=0)
                else:
                    start, end = (dt.date.fromisoformat(d) for d in cmd["range"])
                    pipeline.backfill(storage, meters, start, end, slugs=cmd["slugs"],
                                      reingest_landing=cmd["op"] == "reingest", log=quiet, lock_ttl=0)
                return
            except state.LockHeld:
                if attempt:
                    raise

    for line in sys.stdin:
        cmd = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                child(cmd)
                os._exit(0)
            except BaseException as exc:
                sys.stderr.write(repr(exc) + "\n")
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        killed = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        print(json.dumps({"signal": killed, "code": None if killed else os.WEXITSTATUS(status)}), flush=True)
    """
)


class Killer:
    def __init__(self) -> None:
        env = {**os.environ, "POLARS_MAX_THREADS": "2"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE, str(REPO)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def attempt(self, root: str, meters: str, n: int, op: str, range_: tuple, slugs: list | None, limits: dict) -> dict:
        cmd = {"root": root, "meters": meters, "n": n, "op": op, "range": [d.isoformat() for d in range_]}
        cmd["slugs"], cmd["limits"] = slugs, limits
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        status = json.loads(self.proc.stdout.readline())
        assert status["signal"] == 9 or status["code"] == 0, f"the child failed instead of being killed: {status}"
        return status

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def killer() -> Iterator[Killer]:
    k = Killer()
    yield k
    k.close()


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # power loss is not simulated here
    monkeypatch.setattr(os, "sync", lambda: None)


# --- the scenario -------------------------------------------------------------------------------------------------
RANGE_DAYS = [
    dt.date(1678, 1, 1),
    dt.date(1900, 1, 1),
    dt.date(1970, 1, 1),
    dt.date(2024, 1, 1),
    dt.date(2024, 1, 15),
    dt.date(2024, 2, 29),
    dt.date(2024, 3, 1),
    dt.date(2024, 3, 15),
    dt.date(2024, 3, 31),
    dt.date(2024, 4, 7),
    dt.date(2024, 10, 6),
    dt.date(2024, 11, 4),
    dt.date(2261, 12, 31),
    dt.date(2262, 1, 1),
]


def random_range(rng: Random) -> tuple[dt.date, dt.date]:
    a, b = sorted(rng.sample(RANGE_DAYS, 2))
    return a, b


def tables_of(storage: Storage, meters: MeterSet, slugs: list[str]) -> dict[str, pl.DataFrame]:
    return {f"{s}/{k}": table(storage, s, k) for s in slugs for k in ("period", "hourly")}


def event_rows(storage: Storage) -> int:
    files = [f.path for f in storage.list_files("events", (".parquet",))]
    return storage.scan_parquet(files).select(pl.len()).collect().item() if files else 0


def current_slugs(storage: Storage, meters: MeterSet) -> list[str]:
    st = tools.status(storage, meters)
    return st.filter(~pl.col("stale").fill_null(False))["slug"].to_list()


def check(world: World, tmp: Path, meters: MeterSet, where: str, n: int) -> None:
    storage = world.storage
    assert not storage.list_files(TMP) and not storage.list_files(state.PENDING), f"{where}: leftovers"
    fresh = world.from_scratch(tmp, meters, f"scratch-{n}")
    slugs = current_slugs(storage, meters)
    got, expected = tables_of(storage, meters, slugs), tables_of(fresh, meters, slugs)
    for key, exp in expected.items():
        assert_tables_match(got[key], exp, f"{where}: {key}")
    assert event_rows(storage) == event_rows(fresh), f"{where}: events/ differs"


def query_matches_tables(storage: Storage, meters: MeterSet, rng: Random, where: str) -> None:
    """`meterlake query` (from the curated events) against the published tables: UTC HOUR windows over every
    event give the hourly table; DAY or MONTH windows in the billing zone give the period table when periods are
    days or months from the 1st; an unwindowed query over a billing period, grouped by subject and every key,
    gives that period's rows (a few periods per meter: each is a query)."""
    for meter in meters.meters:
        keys = ["subject", *meter.group_paths]
        columns = [*keys, "window_start", "window_end", "value"]
        hourly = table(storage, meter.slug, "hourly")
        # 2024, where most events fall: a query's cost follows the days of its range (1678-2262 took 0.3 s a meter)
        got = tools.query(storage, meters, meter.slug, "2023-12-01", "2024-12-01", window="HOUR", group_by=keys)
        inside = pl.col("window_start").is_between(dt.datetime(2023, 12, 1, tzinfo=dt.UTC),
                                                   dt.datetime(2024, 12, 1, tzinfo=dt.UTC), closed="left")  # fmt: skip
        exp = hourly.filter(inside).select(columns) if not hourly.is_empty() else hourly
        assert_tables_match(got.select(columns), exp, f"{where}: query HOUR {meter.slug}")
        period = table(storage, meter.slug, "period")
        if period.is_empty():
            continue
        billing = meters.billing
        size = {"DAY": "DAY", "MONTH": "MONTH" if billing.anchor_day == 1 else None}.get(billing.period)
        if size:  # the billing periods are the query's calendar windows in the billing zone (no event near 1800, 2100)
            got = tools.query(storage, meters, meter.slug, "1800-01-01", "2100-01-01", window=size,
                              tz=billing.timezone, group_by=keys)  # fmt: skip
            got = got.with_columns(pl.col("window_start", "window_end").dt.convert_time_zone("UTC"))
            inside = pl.col("window_start").dt.year().is_between(1800, 2099)
            exp = period.filter(inside).select(columns)
            assert_tables_match(got.select(columns), exp, f"{where}: query {size} {meter.slug}")
        windows = period.select("window_start", "window_end").unique().sort("window_start").rows()
        for start, end in rng.sample(windows, min(3, len(windows))):
            if start.year < 1679 or end.year > 2260:  # a bound's wall clock in the zone may fall outside the years
                continue
            got = tools.query(storage, meters, meter.slug, start, end, group_by=keys)
            exp = period.filter(pl.col("window_start") == start).select(columns)
            got = got.with_columns(pl.col("window_start", "window_end").dt.convert_time_zone("UTC"))
            assert_tables_match(got.select(columns), exp, f"{where}: query {meter.slug} [{start}, {end})")


def recommended_backfill(storage: Storage, meters: MeterSet) -> tuple[tuple[dt.date, dt.date], list[str]] | None:
    """What `meterlake status` prints for the stale meters (flows/cli.py _rebuild_words)."""
    st = tools.status(storage, meters)
    stale = st.filter(pl.col("stale").fill_null(False))["slug"].to_list()
    if not stale:
        return None
    days = pipeline.history_dates(storage, list(meters.select(stale).meters))
    if not days:
        return None
    end = dt.date.fromisoformat(days[-1]) + dt.timedelta(days=1)
    return (dt.date.fromisoformat(days[0]), end), stale


LIMIT_MODULES = {"CHUNK_BYTES": pipeline, "SLICE_BYTES": recompute, "PERIOD_READ_BYTES": recompute}


def tuned(limits: dict, fn, *args, **kwargs):
    """Call `fn` with the module limits set (the from-scratch runs keep the defaults).

    A kill can fall inside a lock takeover, after its marker was created and before the dead lock was deleted;
    the next run then refuses for TAKEOVER_STALE_SECONDS (5 minutes, by design) and clears the marker after that.
    The operator's retry 5 minutes later is played as an immediate retry with that delay at 0.
    """
    saved = {name: getattr(LIMIT_MODULES[name], name) for name in limits}
    for name, value in limits.items():
        setattr(LIMIT_MODULES[name], name, value)
    stale_after = state.TAKEOVER_STALE_SECONDS
    state.TAKEOVER_STALE_SECONDS = 0
    try:
        try:
            return fn(*args, **kwargs)
        except state.LockHeld as exc:
            assert "taking over the lock of the crashed run" in str(exc), exc
            return fn(*args, **kwargs)
    finally:
        state.TAKEOVER_STALE_SECONDS = stale_after
        for name, value in saved.items():
            setattr(LIMIT_MODULES[name], name, value)


LANDINGS = ["new", "new", "new", "copy", "reland", "reland", "delete", "restore", "touch"]


def scenario(seed: int, tmp: Path, killer: Killer, steps: int = STEPS) -> list[str]:
    rng = Random(seed)
    storage = local_root(tmp, "incremental")
    world = World(rng, storage, extra=Random(f"extra {seed}"))
    billing, lines = rng.choice(BILLINGS), dict(METER_LINES)
    extra = {slug: EXTRA_LINES[slug] for slug in world.extra.sample(sorted(EXTRA_LINES), world.extra.randint(0, 2))}
    yaml_text = meters_yaml(billing, lines, extra)
    meters = parse_meters(yaml_text)
    log: list[str] = []
    quiet = {"log": lambda _: None}
    # small ingest chunks, recompute slices and period reads (one batch, one day, one meter at a time) for some seeds
    limits = {}
    if rng.random() < 0.5:
        limits = {
            "CHUNK_BYTES": rng.choice([1, 3000]),
            "SLICE_BYTES": rng.choice([1, 8000]),
            "PERIOD_READ_BYTES": rng.choice([0, 64 * 2**20]),
        }

    def committed() -> set[str]:
        return state.committed_runs(storage)

    for k in range(steps):
        for _ in range(rng.randint(1 if k == 0 else 0, 3)):
            op = "new" if k == 0 else rng.choice(LANDINGS)
            getattr(world, f"op_{op}")(k)
            log.append(op)
        action = rng.choice(["run", "run", "run", "kill-run", "kill-run", "backfill", "reingest", "kill-backfill",
                             "meters"]) if k else "run"  # fmt: skip
        if action == "meters":
            billing, lines = changed_meters(rng, billing, lines)
            yaml_text = meters_yaml(billing, lines, extra)
            meters = parse_meters(yaml_text)
            log.append(f"meters {sorted(lines)} {billing.strip()}")
            action = rng.choice(["run", "recommended"])
        if action == "recommended":
            todo = recommended_backfill(storage, meters)
            log.append(f"recommended {todo}")
            if todo:
                tuned(limits, pipeline.backfill, storage, meters, *todo[0], slugs=todo[1], **quiet)
        elif action == "run":
            tuned(limits, pipeline.run, storage, meters, **quiet)
            world.ran()
            log.append("run")
        elif action == "backfill":
            range_ = random_range(rng)
            slugs = rng.sample([m.slug for m in meters.meters], rng.randint(1, 2)) if rng.random() < 0.5 else None
            tuned(limits, pipeline.backfill, storage, meters, *range_, slugs=slugs, **quiet)
            log.append(f"backfill {range_} {slugs}")
        elif action == "reingest":
            range_ = random_range(rng)
            tuned(limits, pipeline.backfill, storage, meters, *range_, reingest_landing=True, **quiet)
            world.reingested(*range_)
            log.append(f"reingest {range_}")
        else:  # a killed run or backfill, then landings, then a run restarts it
            op = "run" if action == "kill-run" else rng.choice(["backfill", "reingest", "recommended"])
            range_, slugs = random_range(rng), None
            if op == "recommended":
                todo = recommended_backfill(storage, meters) or (range_, None)
                range_, slugs, op = todo[0], todo[1], "backfill"
            for attempt in range(rng.choice([1, 1, 2])):  # sometimes the restart is killed too
                before = committed()
                n = rng.choice([rng.randint(1, 30), rng.randint(30, 150), rng.randint(150, 600)])
                status = killer.attempt(storage.root, yaml_text, n, op, range_, slugs, limits)
                log.append(f"{op} {range_ if op != 'run' else ''} killed at {n}: {status}")
                if committed() - before:  # it committed before the kill (or finished): its batches count as read
                    if op == "reingest":
                        world.reingested(*range_)
                    elif op == "run":
                        world.ran()
                for _ in range(rng.randint(0, 2)):
                    landing = rng.choice(LANDINGS)
                    getattr(world, f"op_{landing}")(100 * attempt + k)
                    log.append(landing)
                op = "run"
            if rng.random() < 0.25:  # the meters file edited before the restart
                billing, lines = changed_meters(rng, billing, lines)
                yaml_text = meters_yaml(billing, lines, extra)
                meters = parse_meters(yaml_text)
                log.append(f"meters {sorted(lines)} {billing.strip()}")
            restart = rng.choice(["run", "backfill", "reingest"])  # recovery by a backfill, then a run
            if restart != "run":
                range_ = random_range(rng)
                tuned(
                    limits, pipeline.backfill, storage, meters, *range_, reingest_landing=restart == "reingest", **quiet
                )
                if restart == "reingest":
                    world.reingested(*range_)
                log.append(f"{restart} {range_}")
            tuned(limits, pipeline.run, storage, meters, **quiet)
            world.ran()
            log.append("run")
        check(world, tmp, meters, f"seed {seed} step {k}: {log}", k)

    for _ in range(3):  # what status recommends, until nothing is stale
        todo = recommended_backfill(storage, meters)
        if not todo:
            break
        tuned(limits, pipeline.backfill, storage, meters, *todo[0], slugs=todo[1], **quiet)
        log.append(f"final recommended {todo}")
    assert current_slugs(storage, meters) == [m.slug for m in meters.meters], f"seed {seed}: still stale {log}"
    check(world, tmp, meters, f"seed {seed} final: {log}", steps)
    expected = compute(world.reference_batches(), yaml_text)
    got = tables_of(storage, meters, [m.slug for m in meters.meters])
    for key, exp in expected.tables.items():
        assert_tables_match(got[key], exp, f"seed {seed} reference {key}: {log}")
    assert event_rows(storage) == expected.events, f"seed {seed}: events/ differs from the reference"
    query_matches_tables(storage, meters, rng, f"seed {seed} final: {log}")
    return log


@pytest.mark.parametrize("seed", _seeds())
def test_scenario_equals_from_scratch(seed: int, tmp_path: Path, killer: Killer) -> None:
    log = scenario(seed, tmp_path, killer)
    assert "run" in log
