"""meterlake against the independent DuckDB reference (tests/reference.py) on a few thousand random events.

The events are built to hit every rule of SPEC §2-§4 at once: all seven aggregations, several meters
per event type, group-by values that are missing, null, numbers, booleans, arrays and objects, numeric
strings, every rejection reason, duplicates in the same and in later batches (exact, and with another
payload: the first landed copy wins), times with offsets and nanosecond fractions right at local
midnights (month, week and day boundaries in the billing zone), JSONL, NDJSON, gzip and one Parquet
batch with a struct `data` column, over two runs.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import random
import zoneinfo
from pathlib import Path

import polars as pl
import pytest

from flows import pipeline
from flows.storage import Storage
from meters import parse_meters

from reference import Batch, assert_tables_match, compute
from support import land, local_root, parquet_bytes, table

NS = 1_000_000_000

METERS = """
meters:
  - slug: tokens_total
    eventType: prompt
    aggregation: SUM
    valueProperty: $.tokens
    groupBy: {model: $.model, kind: $.type}
  - slug: tokens_avg
    eventType: prompt
    aggregation: AVG
    valueProperty: $.tokens
    groupBy: {model: $.model}
  - slug: prompts
    eventType: prompt
    aggregation: COUNT
    groupBy: {model: $.model}
  - slug: gpu_seconds_max
    eventType: gpu_time
    aggregation: MAX
    valueProperty: $.duration_seconds
    groupBy: {region: $.region, gpu: $.spec.gpu}
  - slug: gpu_seconds_min
    eventType: gpu_time
    aggregation: MIN
    valueProperty: $.duration_seconds
  - slug: balance
    eventType: balance
    aggregation: LATEST
    valueProperty: $['account balance']
    groupBy: {account: $.account}
  - slug: users
    eventType: api_call
    aggregation: UNIQUE_COUNT
    valueProperty: $.user
    groupBy: {route: $.route, status: $.status}
  - slug: api_calls
    eventType: api_call
    aggregation: COUNT
    groupBy: {route: $.route, tags: $.tags}
  - slug: first_item
    eventType: api_call
    aggregation: SUM
    valueProperty: $.items[0]
  - slug: tokens_since
    eventType: prompt
    aggregation: SUM
    valueProperty: $.tokens
    groupBy: {model: $.model}
    eventFrom: "2024-02-29T12:00:00.5+01:00"
"""

BILLINGS = {
    "month-utc-1": "billing: {period: MONTH, timezone: UTC, anchor_day: 1}\n",
    "month-berlin-31": "billing: {period: MONTH, timezone: Europe/Berlin, anchor_day: 31}\n",
    "week-new-york": "billing: {period: WEEK, timezone: America/New_York}\n",
    "day-kolkata": "billing: {period: DAY, timezone: Asia/Kolkata}\n",
}

ZONES = ("UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata")
OFFSETS = ("Z", "+00:00", "+02:00", "-05:00", "+05:30", "-03:30")
SUBJECTS = ("customer-1", "customer-2", "acme", "42", "é-corp")
SOURCES = ("app", "svc/2")


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync only matters for power loss, which no test here simulates; skipping it halves the runtime."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


# --- times ---------------------------------------------------------------------------------------------
# Four clusters of days hold every event: a month end (leap February included), the US DST change (a
# Monday right after it), the EU DST change on an anchor-31 period start. Few days keep the run fast.
CLUSTERS = ((dt.date(2024, 1, 29), 4), (dt.date(2024, 2, 28), 3), (dt.date(2024, 3, 10), 2), (dt.date(2024, 3, 30), 3))


def _instant(day: dt.date, zone: str = "UTC") -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=zoneinfo.ZoneInfo(zone)).timestamp()) * NS


def _midnights() -> list[int]:
    """Local midnights in every zone used, inside the clusters: every period boundary the tests need."""
    out = []
    for zone in ZONES:
        for first, days in CLUSTERS:
            for i in range(1, days):
                out.append(_instant(first + dt.timedelta(days=i), zone))
    return out


MIDNIGHTS = _midnights()


def random_ns(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.15:  # right on a boundary, or one nanosecond before it
        return rng.choice(MIDNIGHTS) - rng.choice((0, 0, 1))
    if roll < 0.55:  # within two hours of one
        return rng.choice(MIDNIGHTS) + rng.randint(-2 * 3600 * NS, 2 * 3600 * NS)
    first, days = rng.choice(CLUSTERS)
    return rng.randint(_instant(first), _instant(first + dt.timedelta(days=days)) - 1)


def rfc3339(ns: int, offset: str, digits: int, rng: random.Random | None = None) -> str:
    """`ns` (exact when digits >= 9) as RFC 3339 text in the given offset; digits > 9 adds ignored digits."""
    minutes = (
        0 if offset in ("Z", "z") else (1 if offset[0] == "+" else -1) * (int(offset[1:3]) * 60 + int(offset[4:6]))
    )
    local = ns + minutes * 60 * NS
    seconds, frac = divmod(local, NS)
    text = dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if digits:
        fraction = f"{frac:09d}"[: min(digits, 9)]
        if digits > 9:
            fraction += "".join(str((rng or random).randint(0, 9)) for _ in range(digits - 9))
        text += "." + fraction
    return text + offset


def random_time(rng: random.Random) -> tuple[int, str]:
    """An event time: (exact UTC ns after truncation, RFC 3339 text)."""
    ns = random_ns(rng)
    digits = rng.choice((0, 3, 6, 9, 9, 9, 12))
    keep = min(digits, 9)
    ns -= ns % 10 ** (9 - keep)
    text = rfc3339(ns, rng.choice(OFFSETS), digits, rng)
    if rng.random() < 0.03:
        text = text[:10] + "t" + text[11:]
        text = text[:-1] + "z" if text.endswith("Z") else text
    return ns, text


# --- payloads ----------------------------------------------------------------------------------------
BAD_NUMBERS = ("abc", "", True, "NaN", "Infinity", "1e999", [1], {"a": 1}, "12abc", " 12", "0x10", "1,5")
NUMERIC_STRINGS = ("12.5", "1e3", ".5", "+7", "-3.25", "5.", "0", "1E2", "007")


def number(rng: random.Random, lo: int = 0, hi: int = 5000) -> object:
    roll = rng.random()
    if roll < 0.45:
        return rng.randint(lo, hi)
    if roll < 0.65:
        return str(rng.randint(lo, hi))
    if roll < 0.75:
        return rng.choice(NUMERIC_STRINGS)
    if roll < 0.85:
        return rng.randint(lo * 4, hi * 4) / 4
    if roll < 0.90:
        return rng.choice(BAD_NUMBERS)
    if roll < 0.95:
        return None
    return "<missing>"


def put(data: dict, key: str, value: object) -> None:
    if value != "<missing>":
        data[key] = value


def payload(kind: str, rng: random.Random) -> dict | None:
    data: dict = {}
    if kind == "prompt":
        put(data, "tokens", number(rng))
        put(data, "model", rng.choice(("gpt-4", "claude-3", "é-model", "<missing>", None, 7, True, 'q"x', "C:\\m")))
        put(data, "type", rng.choice(("input", "output", "<missing>")))
        # text a producer may send anywhere in data: escapes (backslash, tab, control) must not hide the value
        put(data, "note", rng.choice(("<missing>",) * 6 + ("C:\\Users\\x", "tab\there", "bell\u0007", "nl\nx")))
    elif kind == "gpu_time":
        put(data, "duration_seconds", number(rng, -50, 90000))
        put(data, "region", rng.choice(("us-east-1", "eu-west-1", "<missing>")))
        put(data, "spec", rng.choice(({"gpu": "A100"}, {"gpu": 4}, {}, "<missing>", {"gpu": {"v": 1}}, {"gpu": None})))
    elif kind == "balance":
        put(data, "account balance", number(rng, -1000, 1000))
        put(data, "account", rng.choice(("a1", "a2", "<missing>")))
    elif kind == "api_call":
        user = rng.choice(
            (f"u{rng.randint(1, 30)}", rng.randint(1, 30), str(rng.randint(1, 30)), None, "", "<missing>")
        )
        put(data, "user", user)
        put(data, "route", rng.choice(("/v1/x", "/v1/y")))
        put(data, "status", rng.choice((200, 404, "200", "<missing>")))
        put(data, "tags", rng.choice((["a", "b"], ["a"], {"k": 1}, [], "<missing>")))
        put(data, "items", rng.choice(([rng.randint(1, 9), 5], [], ["7"], ["x"], "<missing>", [None])))
    else:
        data = {"anything": rng.randint(0, 9)}
    return None if rng.random() < 0.02 else data


def valid_event(rng: random.Random, n: int) -> dict:
    kind = rng.choice(("prompt", "prompt", "gpu_time", "balance", "api_call", "api_call", "other"))
    _, text = random_time(rng)
    return {
        "specversion": "1.0",
        "id": str(n) if rng.random() < 0.2 else f"e{n}",  # numeric-looking ids are still strings
        "source": rng.choice(SOURCES),
        "type": kind,
        "subject": rng.choice(SUBJECTS),
        "time": text,
        "data": payload(kind, rng),
    }


def tied_balances(rng: random.Random, n: int) -> list[dict]:
    """LATEST ties: one instant (written in two offsets), broken by the greatest id, then the greatest source.

    The pairs are drawn so that "id first" and "source first" pick different events as often as not.
    """
    ns = random_ns(rng)
    pairs = rng.sample([("t1", "app"), ("t3", "app"), ("t2", "svc/2"), ("t3", "svc/2"), ("t2", "app")], 3)
    return [
        {
            "specversion": "1.0",
            "id": f"{ident}-{n}",
            "source": source,
            "type": "balance",
            "subject": "acme",
            "time": rfc3339(ns, ("Z", "+02:00")[i % 2], 9),
            "data": {"account balance": rng.randint(-100, 100), "account": "a1"},
        }
        for i, (ident, source) in enumerate(pairs)
    ]


INVALID: list[object] = [
    "{not json",
    "[1, 2]",
    '"just a string"',
    '{"id": NaN, "source": "app"}',
    '{"id": "x", "source": "app"',
    "null",
    "42",
]


def invalid_records(rng: random.Random) -> list[object]:
    base = valid_event(rng, rng.randint(10**6, 10**7))
    out: list[object] = list(INVALID)
    for key, values in {
        "id": ("<missing>", None, "", 5, True),
        "source": ("<missing>", None, "", 3),
        "type": ("<missing>", None, ""),
        "subject": ("<missing>", None, "", {"a": 1}),
        "time": ("<missing>", None),
    }.items():
        for value in values:
            rec = {k: v for k, v in base.items() if k != key}
            put(rec, key, value)
            out.append(rec)
    for bad in (
        "2024-01-01T00:00:00",
        "2024-02-30T00:00:00Z",
        "2024-01-01 00:00:00Z",
        "2024-01-01T24:00:00Z",
        "yesterday",
        "2024-1-01T00:00:00Z",
        "2024-01-01T00:00:00+0200",
        "2024-01-01T00:00:60Z",
        "2024-01-01T00:00:00.Z",
        "0001-05-16T22:30:20Z",  # beyond 64-bit nanoseconds
        "9999-12-31T23:59:59Z",
    ):
        out.append({**base, "time": bad})
    for data in ([1, 2], "text", 5, True):
        out.append({**base, "data": data})
    return out


# --- batches -----------------------------------------------------------------------------------------
def make_batches(seed: int) -> list[tuple[str, list[object], str]]:
    """[(landing path, records, kind)] in landing order: six JSONL-ish batches and one Parquet batch."""
    rng = random.Random(seed)
    n = 0
    batches: list[tuple[str, list[object], str]] = []
    history: list[dict] = []
    names = [
        "2024/b0.jsonl",
        "2024/b1.ndjson",
        "2024/deep/er/b2.jsonl",
        "b3.jsonl.gz",
        "2024/b4.jsonl",
        "2024/b5.jsonl",
    ]
    for index, name in enumerate(names):
        records: list[object] = []
        for _ in range(430):
            n += 1
            roll = rng.random()
            if history and roll < 0.04:  # an exact copy of an earlier event (this or an earlier batch)
                records.append(dict(rng.choice(history)))
            elif history and roll < 0.06:  # same (source, id), same UTC date, another payload: dropped
                old = rng.choice(history)
                records.append({**old, "data": payload(old["type"], rng), "subject": rng.choice(SUBJECTS)})
            elif history and roll < 0.07:  # same id from another source: a different event
                old = rng.choice(history)
                records.append({**old, "source": "other-source"})
            elif history and roll < 0.08:  # same (source, id) on another UTC date: beyond the dedupe horizon
                old = rng.choice(history)
                records.append({**old, "time": rfc3339(random_ns(rng) + 3 * 86400 * NS, "Z", 9)})
            else:
                e = valid_event(rng, n)
                records.append(e)
                history.append(e)
        for _ in range(8):
            records.extend(tied_balances(rng, n := n + 1))
        if index == 2:
            records.extend(["", "   "])  # blank lines: skipped, but they still count in line numbers
        if index in (1, 4):
            records.extend(invalid_records(rng))
        rng.shuffle(records)
        batches.append((name, records, "jsonl"))
    # the Parquet batch: a struct `data` column (one shape for every row), string envelope columns
    rows: list[dict] = []
    for _ in range(300):
        n += 1
        e = valid_event(rng, n)
        e["type"] = rng.choice(("prompt", "gpu_time"))
        tokens = number(rng)
        e["data"] = {
            "tokens": None if tokens == "<missing>" or not isinstance(tokens, str | int) else str(tokens),
            "model": rng.choice(("gpt-4", "claude-3", None)),
            "type": rng.choice(("input", None)),
            "duration_seconds": rng.choice((None, rng.randint(0, 900) / 8)),
            "region": rng.choice(("us-east-1", None)),
        }
        if rng.random() < 0.03:
            e["data"] = None
        rows.append(e)
    rows.append({**rows[0]})  # an exact duplicate inside the Parquet batch
    rows.append({**history[0]} | {"data": rows[1]["data"]})  # same key as a JSONL event: dropped if same date
    for key in ("id", "subject", "time"):
        rows.append({**rows[2], key: None})
    rows.append({**rows[3], "subject": ""})
    rows.append({**rows[4], "time": "2024-02-01T00:00:00"})
    batches.insert(4, ("parquet/p0.parquet", rows, "parquet"))
    return batches


DATA_STRUCT = pl.Struct(
    {"tokens": pl.String, "model": pl.String, "type": pl.String, "duration_seconds": pl.Float64, "region": pl.String}
)
ENVELOPE_COLUMNS = ("specversion", "id", "source", "type", "subject", "time")


def encode(records: list[object], name: str, kind: str) -> bytes:
    if kind == "parquet":
        schema = {c: pl.String for c in ENVELOPE_COLUMNS} | {"data": DATA_STRUCT}
        df = pl.DataFrame([{c: r.get(c) for c in schema} for r in records], schema=schema)  # type: ignore[union-attr]
        return parquet_bytes(df)
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()
    return gzip.compress(text) if name.endswith(".gz") else text


def reference_batches(batches: list[tuple[str, list[object], str]]) -> list[Batch]:
    """A Parquet row is its dict: a null column is a JSON null, a struct field absent from a row is null."""
    return [Batch(f"landing/{name}", records, kind) for name, records, kind in batches]


def quarantine(storage: Storage) -> pl.DataFrame:
    files = [f.path for f in storage.list_files("quarantine", (".parquet",))]
    return storage.scan_parquet(files).collect() if files else pl.DataFrame()


def _rows(df: pl.DataFrame, cols: list[str]) -> list[tuple]:
    return sorted(df.select(cols).rows(), key=repr)


# --- the test ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("billing", list(BILLINGS), ids=list(BILLINGS))
def test_tables_equal_duckdb_reference(tmp_path: Path, billing: str) -> None:
    meters_yaml = BILLINGS[billing] + METERS
    split = billing in ("month-berlin-31", "week-new-york")  # two runs (dedupe against the store); else one
    batches = make_batches(seed=20240131)
    storage = local_root(tmp_path)
    meterset = parse_meters(meters_yaml)
    for i, (name, records, kind) in enumerate(batches):
        land(storage, name, encode(records, name, kind), mtime=1_700_000_000 + 10 * i)
        if i == 2 and split:  # the first three batches in one run, the rest (copies of them included) in a second
            pipeline.run(storage, meterset, log=lambda _: None)
    summary = pipeline.run(storage, meterset, log=lambda _: None)
    assert summary["batches"] == len(batches) - (3 if split else 0)

    expected = compute(reference_batches(batches), meters_yaml)
    assert expected.events > 2500, "the generator should produce a few thousand valid events"
    for meter in expected.meters:
        for kind in ("period", "hourly"):
            key = f"{meter.slug}/{kind}"
            assert expected.tables[key].height > 5, f"{key}: the data should exercise every meter"
            assert_tables_match(table(storage, meter.slug, kind), expected.tables[key], key)

    events = storage.scan_parquet([f.path for f in storage.list_files("events", (".parquet",))]).collect()
    assert events.height == expected.events

    q = quarantine(storage)
    envelope = q.filter(pl.col("stage") == "envelope")
    assert _rows(envelope, ["file", "line", "reason"]) == _rows(expected.rejected, ["file", "line", "reason"])
    reasons = set(expected.rejected["reason"].to_list())
    assert reasons >= {"malformed_json", "missing_id", "missing_source", "missing_type", "missing_subject"}
    assert reasons >= {"missing_time", "bad_time", "bad_data"}
    dups = q.filter(pl.col("stage") == "dedupe")
    assert _rows(dups, ["file", "line"]) == _rows(expected.duplicates, ["file", "line"])
    assert expected.duplicates.height > 50
    excluded = q.filter(pl.col("stage") == "meter")
    assert _rows(excluded, ["meter", "file", "line", "reason"]) == _rows(
        expected.excluded, ["meter", "file", "line", "reason"]
    )
    assert set(expected.excluded["reason"].to_list()) == {"missing_value", "bad_value"}


def test_reference_floors_times_before_1970(tmp_path: Path) -> None:
    """Before 1970 the epoch is negative and DuckDB's `%` and `//` truncate toward zero: the reference put
    1969-12-31T23:30Z in the hour [00:00, 01:00) of 1970-01-01 and on the UTC day of 1970-01-01, so it dropped a
    copy stored on another day. It must floor, as meterlake does."""
    yaml = "meters:\n  - {slug: tokens, eventType: prompt, aggregation: SUM, valueProperty: $.tokens}\n"
    records = [
        {"specversion": "1.0", "id": "a", "source": "s", "type": "prompt", "subject": "c",
         "time": "1969-12-31T23:30:00Z", "data": {"tokens": 1}},
        {"specversion": "1.0", "id": "a", "source": "s", "type": "prompt", "subject": "c",
         "time": "1970-01-01T00:10:00Z", "data": {"tokens": 10}},
        {"specversion": "1.0", "id": "b", "source": "s", "type": "prompt", "subject": "c",
         "time": "1899-06-30T12:00:00.5-05:00", "data": {"tokens": 100}},
    ]  # fmt: skip
    storage = local_root(tmp_path)
    land(storage, "a.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    pipeline.run(storage, parse_meters(yaml), log=lambda _: None)
    expected = compute([Batch("landing/a.jsonl", records)], yaml)
    starts = sorted(expected.tables["tokens/hourly"]["window_start"].to_list())
    assert [t.isoformat() for t in starts] == [
        "1899-06-30T17:00:00+00:00",
        "1969-12-31T23:00:00+00:00",
        "1970-01-01T00:00:00+00:00",
    ]
    assert expected.events == 3
    for kind in ("hourly", "period"):
        assert_tables_match(table(storage, "tokens", kind), expected.tables[f"tokens/{kind}"], kind)
