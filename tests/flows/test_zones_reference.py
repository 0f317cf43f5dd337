"""Billing zones the DuckDB reference does not cover, against a plain-Python reference.

Australia/Lord_Howe (a 30-minute DST shift), America/Havana (DST starts at local midnight, so a period
can start inside the gap), Asia/Kathmandu (+05:45) and Pacific/Kiritimati (+14:00, the earliest local
date); event times written at +14:00, -12:00 and +05:45 with nanosecond fractions, within a nanosecond or
an hour of period starts and UTC midnights; anchor days 29-31; copies of events landed in later runs.

The reference shares no code with meterlake: times are parsed with a regular expression, a period starts
at the first UTC second whose local date (zoneinfo) reaches the period's first day (found by bisection,
not by resolving a local midnight), aggregations are Python loops.
"""

from __future__ import annotations

import calendar
import datetime as dt
import functools
import json
import os
import random
import re
import zoneinfo
from pathlib import Path

import polars as pl
import pytest

from flows import pipeline
from meters import parse_meters

from reference import assert_tables_match
from support import all_tables, jsonl, land, local_root

UTC = dt.UTC
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
NS = 10**9
METERS = [
    {"slug": "total", "eventType": "p", "aggregation": "SUM", "valueProperty": "$.v", "groupBy": {"g": "$.g"}},
    {"slug": "count", "eventType": "p", "aggregation": "COUNT"},
    {"slug": "avg", "eventType": "p", "aggregation": "AVG", "valueProperty": "$.v"},
    {"slug": "low", "eventType": "p", "aggregation": "MIN", "valueProperty": "$.v"},
    {"slug": "last", "eventType": "p", "aggregation": "LATEST", "valueProperty": "$.v"},
    {"slug": "peak", "eventType": "q", "aggregation": "MAX", "valueProperty": "$.w"},
    {"slug": "users", "eventType": "q", "aggregation": "UNIQUE_COUNT", "valueProperty": "$.u"},
]
BILLINGS = {
    "lord-howe-month-31": {"period": "MONTH", "timezone": "Australia/Lord_Howe", "anchor_day": 31},
    "havana-week": {"period": "WEEK", "timezone": "America/Havana", "anchor_day": 1},
    "kathmandu-day": {"period": "DAY", "timezone": "Asia/Kathmandu", "anchor_day": 1},
    "kiritimati-month-30": {"period": "MONTH", "timezone": "Pacific/Kiritimati", "anchor_day": 30},
}
OFFSETS = ["Z", "+14:00", "-12:00", "+05:45", "-09:30", "+10:30"]
# DST changes: Lord Howe (Apr 7 02:00 local, Oct 6 02:00), Havana (Mar 10 00:00 local, Nov 3 01:00)
DST = ["2024-04-06T15:00:00Z", "2024-10-05T15:30:00Z", "2024-03-10T05:00:00Z", "2024-11-03T05:00:00Z"]


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # durability against power loss is not tested here
    monkeypatch.setattr(os, "sync", lambda: None)


# --- the reference ------------------------------------------------------------------------------------
TIME = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)\.(\d{9})(Z|[+-]\d\d:\d\d)")


def parse_ns(text: str) -> int:
    y, mo, d, h, mi, s, frac, off = TIME.fullmatch(text).groups()  # type: ignore[union-attr]
    t = dt.datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), tzinfo=UTC)
    if off != "Z":
        t -= (1 if off[0] == "+" else -1) * dt.timedelta(hours=int(off[1:3]), minutes=int(off[4:]))
    return int((t - EPOCH).total_seconds()) * NS + int(frac)


@functools.cache
def first_second(day: dt.date, tz: str) -> dt.datetime:
    zone = zoneinfo.ZoneInfo(tz)
    low = dt.datetime(day.year, day.month, day.day, tzinfo=UTC) - dt.timedelta(hours=16)
    a, b = 0, 32 * 3600
    while a < b:
        mid = (a + b) // 2
        if (low + dt.timedelta(seconds=mid)).astimezone(zone).date() >= day:
            b = mid
        else:
            a = mid + 1
    return low + dt.timedelta(seconds=a)


def period(local: dt.date, billing: dict) -> tuple[dt.date, dt.date]:
    if billing["period"] == "DAY":
        return local, local + dt.timedelta(days=1)
    if billing["period"] == "WEEK":
        start = local - dt.timedelta(days=local.isoweekday() - 1)
        return start, start + dt.timedelta(days=7)

    def anchor(y: int, m: int) -> dt.date:
        return dt.date(y, m, min(billing["anchor_day"], calendar.monthrange(y, m)[1]))

    months = [(local.year + (local.month - 2 + k) // 12, (local.month - 2 + k) % 12 + 1) for k in range(3)]
    starts = [anchor(y, m) for y, m in months]  # previous, this and next month's anchors
    first = max(s for s in starts if s <= local)
    return first, min(s for s in starts if s > first)


def number(v: object) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", v):
        return float(v)
    return None


def as_text(v: object) -> str | None:
    return v if isinstance(v, str) or v is None else json.dumps(v, separators=(",", ":"))


def aggregate(aggregation: str, items: list[tuple]) -> float:
    values = [i[3] for i in items]
    if aggregation == "COUNT":
        return float(len(items))
    if aggregation == "SUM":
        return sum(values)
    if aggregation == "AVG":
        return sum(values) / len(values)
    if aggregation == "MIN":
        return min(values)
    if aggregation == "MAX":
        return max(values)
    if aggregation == "UNIQUE_COUNT":
        return float(len(set(values)))
    return max(items, key=lambda i: i[:3])[3]  # LATEST: greatest time, then id, then source


def reference(batches: list[list[dict]], billing: dict) -> dict[str, pl.DataFrame]:
    seen, events = set(), []
    for batch in batches:  # landing order; the first copy of (UTC date, source, id) wins
        for e in batch:
            ns = parse_ns(e["time"])
            key = ((EPOCH + dt.timedelta(seconds=ns // NS)).date(), e["source"], e["id"])
            if key not in seen:
                seen.add(key)
                events.append((ns, e))
    zone = zoneinfo.ZoneInfo(billing["timezone"])
    out = {}
    for m in METERS:
        for kind in ("period", "hourly"):
            groups: dict[tuple, list] = {}
            for ns, e in (x for x in events if x[1]["type"] == m["eventType"]):
                t = EPOCH + dt.timedelta(seconds=ns // NS)
                if kind == "hourly":
                    start = t.replace(minute=0, second=0)
                    window = (start, start + dt.timedelta(hours=1))
                else:
                    first, after = period(t.astimezone(zone).date(), billing)
                    window = (first_second(first, billing["timezone"]), first_second(after, billing["timezone"]))
                value = None
                if m["aggregation"] == "UNIQUE_COUNT":
                    value = as_text(e["data"].get("u"))
                elif m["aggregation"] != "COUNT":
                    value = number(e["data"].get(m["valueProperty"][2:]))
                if value is None and m["aggregation"] != "COUNT":
                    continue
                group = tuple(as_text(e["data"].get(p[2:])) for p in m.get("groupBy", {}).values())
                groups.setdefault((e["subject"], *group, *window), []).append((ns, e["id"], e["source"], value))
            rows = [(*key, aggregate(m["aggregation"], items), len(items)) for key, items in groups.items()]
            cols = ["subject", *m.get("groupBy", {}), "window_start", "window_end", "value", "event_count"]
            schema = {c: pl.String for c in cols[:-4]} | {
                "window_start": pl.Datetime("us", "UTC"),
                "window_end": pl.Datetime("us", "UTC"),
                "value": pl.Float64,
                "event_count": pl.Int64,
            }
            out[f"{m['slug']}/{kind}"] = pl.DataFrame(rows, schema=schema, orient="row")
    return out


# --- generated events -----------------------------------------------------------------------------------
def instants(billing: dict) -> list[dt.datetime]:
    """Period starts (by the reference) and UTC midnights around them, and the DST changes."""
    out = [dt.datetime.fromisoformat(s) for s in DST]
    day = dt.date(2024, 1, 1)
    while day < dt.date(2024, 12, 1):
        first, _ = period(day, billing)
        out += [first_second(first, billing["timezone"]), dt.datetime(day.year, day.month, day.day, tzinfo=UTC)]
        day += dt.timedelta(days=11)
    return out


def write_time(ns: int, offset: str) -> str:
    shift = dt.timedelta(0) if offset == "Z" else dt.timedelta(hours=int(offset[1:3]), minutes=int(offset[4:]))
    local = EPOCH + dt.timedelta(seconds=ns // NS) + (shift if offset[0] != "-" else -shift)
    return local.strftime("%Y-%m-%dT%H:%M:%S") + f".{ns % NS:09d}" + offset


def make_batches(rng: random.Random, billing: dict) -> list[list[dict]]:
    points = instants(billing)
    batches: list[list[dict]] = []
    n = 0
    for _ in range(3):
        batch = []
        for _ in range(50):
            n += 1
            base = int((rng.choice(points) - EPOCH).total_seconds()) * NS
            ns = base + rng.choice([0, -1, 1, rng.randint(-3600 * NS, 3600 * NS)])
            data = {
                "v": rng.choice([rng.randint(-5, 50), f"{rng.randint(0, 9)}.5", None, "x"]),
                "g": rng.choice(["a", "b", None, 1]),
                "w": rng.randint(0, 100),
                "u": rng.choice([1, "1", "2", None]),
            }
            batch.append(
                {
                    "specversion": "1.0",
                    "id": f"e{n}",
                    "source": rng.choice(["s1", "s2"]),
                    "type": rng.choice("pq"),
                    "subject": rng.choice(["c1", "c2"]),
                    "time": write_time(ns, rng.choice(OFFSETS)),
                    "data": data,
                }
            )
        for e in rng.sample([e for b in batches for e in b], min(6, n - len(batch))):  # copies, some at another offset
            batch.append({**e, "time": write_time(parse_ns(e["time"]), rng.choice(OFFSETS)), "data": {"v": 999}})
        batches.append(batch)
    return batches


@pytest.mark.parametrize("name", list(BILLINGS))
def test_exotic_zones_and_offsets_equal_the_python_reference(tmp_path: Path, name: str) -> None:
    billing = BILLINGS[name]
    rng = random.Random(name)
    batches = make_batches(rng, billing)
    meters = parse_meters(
        "billing: " + json.dumps(billing) + "\nmeters:\n" + "".join(f"  - {json.dumps(m)}\n" for m in METERS)
    )
    storage = local_root(tmp_path)
    for i, batch in enumerate(batches):
        land(storage, f"b{i}.jsonl", jsonl(batch), mtime=1_700_000_000 + 10 * i)
        if i:  # a run after the 2nd and 3rd: they deduplicate against the store and revisit published periods
            pipeline.run(storage, meters, log=lambda _: None)
    got = all_tables(storage, meters)
    for key, expected in reference(batches, billing).items():
        assert expected.height > 3, f"{key}: the generator should exercise every meter"
        assert_tables_match(got[key], expected, f"{name} {key}")
