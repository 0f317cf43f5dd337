"""`tools.query` (what `meterlake query` runs) against the independent DuckDB reference (tests/reference_query.py)
on random events and random queries.

The events (seeded) sit over a few days around DST changes in America/New_York, Europe/London,
Australia/Lord_Howe (a 30-minute change), America/Havana (changes at midnight) and right on the local midnights
and hours of Asia/Kathmandu (+05:45), with nanosecond fractions, several offsets, values that are excluded, group values that are missing, null,
numbers, booleans and objects. The queries draw every aggregation, every window size or none, a zone, bounds that
are dates, aligned times or arbitrary ones (in any offset), subject filters, group-by keys and filterGroupBy.

Values are quarter-integers of modest size: every sum is exact in Float64 whatever the order of addition, so
SUM, MIN, MAX, LATEST, COUNT and UNIQUE_COUNT are compared exactly. AVG is compared exactly too: the quotient of
the same exact sum by the same count is one correctly rounded division in both engines.

METERLAKE_QUERY_SEEDS=a-b and METERLAKE_QUERY_COUNT=n run more seeds and queries than the committed defaults.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import zoneinfo
from pathlib import Path

import pytest

from flows import pipeline, tools
from meters import parse_meters
from transforms.query import to_openmeter

from reference import Batch
from reference_query import Reference, RefQuery, assert_query_matches, assert_windows_disjoint, openmeter_body
from support import land, local_root

NS = 1_000_000_000

METERS = """
meters:
  - {slug: tokens_sum, eventType: prompt, aggregation: SUM, valueProperty: $.tokens,
     groupBy: {model: $.model, kind: $.type}}
  - {slug: tokens_avg, eventType: prompt, aggregation: AVG, valueProperty: $.tokens, groupBy: {model: $.model}}
  - {slug: tokens_min, eventType: prompt, aggregation: MIN, valueProperty: $.tokens, groupBy: {kind: $.type}}
  - {slug: tokens_max, eventType: prompt, aggregation: MAX, valueProperty: $.tokens, groupBy: {model: $.model}}
  - {slug: tokens_latest, eventType: prompt, aggregation: LATEST, valueProperty: $.tokens,
     groupBy: {model: $.model}}
  - {slug: prompts, eventType: prompt, aggregation: COUNT, groupBy: {model: $.model, kind: $.type}}
  - {slug: users, eventType: api_call, aggregation: UNIQUE_COUNT, valueProperty: $.user,
     groupBy: {route: $.route, spec: $.spec}}
  - {slug: calls, eventType: api_call, aggregation: COUNT}
  - {slug: tokens_since, eventType: prompt, aggregation: SUM, valueProperty: $.tokens, groupBy: {model: $.model},
     eventFrom: "2024-11-03T01:30:00.25-04:00"}
"""
GROUPS = {
    "tokens_sum": ("model", "kind"),
    "tokens_avg": ("model",),
    "tokens_min": ("kind",),
    "tokens_max": ("model",),
    "tokens_latest": ("model",),
    "prompts": ("model", "kind"),
    "users": ("route", "spec"),
    "calls": (),
    "tokens_since": ("model",),
}
FILTER_VALUES = {
    "model": ("gpt-4", "claude", "7", "true", "nope"),
    "kind": ("input", "output", ""),
    "route": ("/a", "/b", "5"),
    "spec": ('{"gpu":"A100"}', "[1,2]", "x"),
}
SUBJECTS = ("c1", "c2", "acme", "é")
ZONES = ("UTC", "America/New_York", "Europe/London", "Australia/Lord_Howe", "Asia/Kathmandu", "America/Havana")
OFFSETS = ("Z", "+00:00", "-04:00", "-05:00", "+01:00", "+10:30", "+11:00", "+05:45", "-03:30")
# (UTC day, days): each holds a DST change of one of the zones (Kathmandu has none: its :15/:45 hours are the test)
CLUSTERS = (
    (dt.date(2024, 3, 9), 3),  # New York springs forward 03-10 02:00, Havana 03-10 00:00 (no midnight)
    (dt.date(2024, 3, 30), 2),  # London 03-31 01:00
    (dt.date(2024, 4, 6), 2),  # Lord Howe falls back 04-07 02:00 -> 01:30 (+11:00 -> +10:30)
    (dt.date(2024, 10, 5), 2),  # Lord Howe springs forward 10-06 02:00 -> 02:30
    (dt.date(2024, 10, 26), 2),  # London 10-27 02:00 -> 01:00
    (dt.date(2024, 11, 2), 3),  # New York 11-03 02:00 -> 01:00, Havana 01:00 -> 00:00 (midnight twice)
)


def _utc_ns(when: dt.datetime) -> int:
    return (when - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1) * 1000


def _boundaries() -> list[int]:
    """Local midnights, hours and half hours in every zone, inside the clusters (window and DST edges)."""
    out = set()
    for first, days in CLUSTERS:
        lo = _utc_ns(dt.datetime(first.year, first.month, first.day, tzinfo=dt.UTC)) - 86400 * NS
        for step in range(0, (days + 2) * 48):
            t = lo + step * 1800 * NS
            for zone in ZONES[1:]:
                local = dt.datetime.fromtimestamp(t // NS, dt.UTC).astimezone(zoneinfo.ZoneInfo(zone))
                shift = local.utcoffset().total_seconds() % 1800  # type: ignore[union-attr]
                out.add(t - int(shift) * NS)  # a full or half hour of the local clock
    return sorted(out)


BOUNDARIES = _boundaries()
CHANGES = [  # the DST changes themselves (UTC ns)
    _utc_ns(dt.datetime(2024, 3, 10, 5, tzinfo=dt.UTC)),
    _utc_ns(dt.datetime(2024, 3, 10, 7, tzinfo=dt.UTC)),
    _utc_ns(dt.datetime(2024, 3, 31, 1, tzinfo=dt.UTC)),
    _utc_ns(dt.datetime(2024, 4, 6, 15, tzinfo=dt.UTC)),
    _utc_ns(dt.datetime(2024, 10, 5, 15, 30, tzinfo=dt.UTC)),
    _utc_ns(dt.datetime(2024, 10, 27, 1, tzinfo=dt.UTC)),
    _utc_ns(dt.datetime(2024, 11, 3, 5, tzinfo=dt.UTC)),
    _utc_ns(dt.datetime(2024, 11, 3, 6, tzinfo=dt.UTC)),
]


def random_ns(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.1:
        return rng.choice(CHANGES) + rng.randint(-3600 * NS, 3600 * NS)
    if roll < 0.3:
        return rng.choice(BOUNDARIES) - rng.choice((0, 0, 1))
    if roll < 0.6:
        return rng.choice(BOUNDARIES) + rng.randint(-3600 * NS, 3600 * NS)
    first, days = rng.choice(CLUSTERS)
    lo = _utc_ns(dt.datetime(first.year, first.month, first.day, tzinfo=dt.UTC))
    return rng.randint(lo, lo + days * 86400 * NS - 1)


def rfc3339(ns: int, offset: str, digits: int) -> str:
    minutes = 0 if offset == "Z" else (1 if offset[0] == "+" else -1) * (int(offset[1:3]) * 60 + int(offset[4:6]))
    seconds, frac = divmod(ns + minutes * 60 * NS, NS)
    text = dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if digits:
        text += "." + f"{frac:09d}"[:digits]
    return text + offset


def token(rng: random.Random) -> object:
    roll = rng.random()
    if roll < 0.5:
        return rng.randint(-20, 5000)
    if roll < 0.7:
        return str(rng.randint(0, 5000))
    if roll < 0.8:
        return rng.randint(-400, 4000) / 4
    if roll < 0.85:
        return rng.choice(("12.5", "1e3", ".25", "-3.75"))
    if roll < 0.9:
        return rng.choice(("abc", None, True, "NaN", [1]))
    return "<missing>"


def put(data: dict, key: str, value: object) -> None:
    if value != "<missing>":
        data[key] = value


def make_events(seed: int, n: int) -> tuple[list[dict], list[int]]:
    """n events, and their UTC instants in nanoseconds."""
    rng = random.Random(seed)
    events, times = [], []
    for i in range(n):
        ns = random_ns(rng)
        digits = rng.choice((0, 3, 6, 9))
        ns -= ns % 10 ** (9 - digits)
        times.append(ns)
        kind = rng.choice(("prompt", "prompt", "prompt", "api_call", "other"))
        data: dict = {}
        if kind == "prompt":
            put(data, "tokens", token(rng))
            put(data, "model", rng.choice(("gpt-4", "claude", 7, True, None, "<missing>")))
            put(data, "type", rng.choice(("input", "output", "", "<missing>")))
        elif kind == "api_call":
            put(data, "user", rng.choice((f"u{rng.randint(1, 12)}", rng.randint(1, 12), None, "", "<missing>")))
            put(data, "route", rng.choice(("/a", "/b", 5, "<missing>")))
            put(data, "spec", rng.choice(({"gpu": "A100"}, [1, 2], "x", None, "<missing>")))
        events.append(
            {
                "specversion": "1.0",
                "id": f"e{i}" if rng.random() < 0.97 else f"e{rng.randint(0, max(i - 1, 0))}",  # a few duplicates
                "source": "app",
                "type": kind,
                "subject": rng.choice(SUBJECTS),
                "time": rfc3339(ns, rng.choice(OFFSETS), digits),
                "data": data if rng.random() < 0.97 else None,
            }
        )
    return events, times


# --- queries ---------------------------------------------------------------------------------------
def random_bound(rng: random.Random, ns: int, tz: str) -> str:
    """A bound near instant `ns`: a date (local midnight in tz), an aligned local time, or an arbitrary time."""
    zone = zoneinfo.ZoneInfo(tz)
    local = dt.datetime.fromtimestamp(ns // NS, dt.UTC).astimezone(zone)
    roll = rng.random()
    if roll < 0.2:
        return local.date().isoformat()
    if roll < 0.4:  # on a local hour or minute, written in the zone's own offset or in UTC
        aligned = local.replace(minute=0 if rng.random() < 0.6 else local.minute, second=0, microsecond=0)
        written = aligned if rng.random() < 0.5 else aligned.astimezone(dt.UTC)
        return written.isoformat().replace("+00:00", "Z")
    return rfc3339(ns, rng.choice(OFFSETS), rng.choice((0, 6, 9)))  # seconds, micro- or nanoseconds


def random_query(rng: random.Random, times: list[int]) -> RefQuery:
    """A query of a random meter; `times` are the events' UTC instants (bounds right on one test [from, to))."""
    slug = rng.choice(list(GROUPS))
    tz = rng.choice(ZONES)
    window = rng.choice((None, None, "MINUTE", "HOUR", "HOUR", "DAY", "DAY", "MONTH"))
    first, days = rng.choice(CLUSTERS)
    lo = _utc_ns(dt.datetime(first.year, first.month, first.day, tzinfo=dt.UTC)) - 86400 * NS
    span = (days + 2) * 86400 * NS
    if rng.random() < 0.15:  # across clusters
        a, b = sorted(rng.sample(BOUNDARIES, 2))
    elif rng.random() < 0.3:  # on (or a microsecond off) the times of events
        a, b = sorted(t + rng.choice((0, 0, -1, 1, -1000, 1000)) for t in rng.sample(times, 2))
    else:
        a, b = sorted((lo + rng.randint(0, span), lo + rng.randint(0, span)))
    if window == "MINUTE":
        b = min(b, a + 6 * 3600 * NS)
    frm, to = random_bound(rng, a, tz), random_bound(rng, b, tz)
    keys = list(GROUPS[slug])
    group_by = rng.sample([*keys, "subject"], rng.randint(0, len(keys) + 1)) if rng.random() < 0.6 else []
    subjects = rng.sample([*SUBJECTS, "nobody"], rng.randint(1, 2)) if rng.random() < 0.25 else []
    filters = {}
    if keys and rng.random() < 0.3:
        key = rng.choice(keys)
        filters[key] = rng.sample(FILTER_VALUES[key], rng.randint(1, 2))
    return RefQuery(slug, frm, to, window, tz, subjects, group_by, filters)


def _seeds() -> list[int]:
    text = os.environ.get("METERLAKE_QUERY_SEEDS", "")
    if text:
        lo, _, hi = text.partition("-")
        return list(range(int(lo), int(hi or lo) + 1))
    return [20241103, 7]


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: None)


@pytest.mark.parametrize("seed", _seeds())
def test_query_equals_duckdb_reference(tmp_path: Path, seed: int) -> None:
    events, times = make_events(seed, 500)
    storage = local_root(tmp_path)
    meterset = parse_meters(METERS)
    land(storage, "b.jsonl", "".join(json.dumps(e) + "\n" for e in events).encode())
    pipeline.run(storage, meterset, log=lambda _: None)
    ref = Reference([Batch("landing/b.jsonl", events)], METERS)
    rng = random.Random(seed * 7919)
    count = int(os.environ.get("METERLAKE_QUERY_COUNT", "100"))
    compared = rows = 0
    try:
        for i in range(count):
            q = random_query(rng, times)
            if ref.bound_ns(q.from_, q.tz) >= ref.bound_ns(q.to, q.tz):
                continue
            where = f"seed {seed} query {i}: {q}"
            asked = {
                "window": q.window,
                "tz": q.tz,
                "subjects": q.subjects or None,
                "group_by": q.group_by or None,
                "filters": q.filters or None,
            }
            actual = tools.query(storage, meterset, q.slug, q.from_, q.to, **asked)
            expected = ref.query(q)
            assert_windows_disjoint(actual, where)
            assert_query_matches(actual, expected, where)
            # the JSON body of `meterlake query -f json` (OpenMeter's v1 response), rows in any order
            body = to_openmeter(actual, tools.plan_query(meterset, q.slug, q.from_, q.to, **asked)[1])
            body["data"] = sorted(body["data"], key=lambda d: json.dumps(d, sort_keys=True))
            lo, hi = ref.bound_ns(q.from_, q.tz), ref.bound_ns(q.to, q.tz)
            assert body == openmeter_body(expected, q, lo, hi), where
            compared += 1
            rows += expected.height
    finally:
        ref.close()
    assert compared > count * 0.8 and rows > count, (compared, rows)
