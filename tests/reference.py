"""An independent reference implementation of meterlake's tables, written in DuckDB SQL.

It shares no code with `transforms/` or `flows/`: Python only decodes JSON lines (json.loads), reads the
meters YAML and lists billing-period boundaries with zoneinfo; validation, time parsing, deduplication,
JSONPath extraction, windowing and the seven aggregations are SQL.

Inputs are the landed batches in landing order, each a list of records: a dict (a JSON object, or a
Parquet row with the envelope attributes as keys) or a raw string (one JSONL line, quoted verbatim).
"""

from __future__ import annotations

import calendar
import datetime as dt
import json
import re
import zoneinfo
from dataclasses import dataclass, field
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa
import yaml

UTC = dt.UTC
NS = 1_000_000_000
HOUR_NS = 3600 * NS
DAY_NS = 24 * HOUR_NS
# The UTC instants an event may have: 1678-01-01T00:00Z (inclusive) .. 2262-01-01T00:00Z (exclusive).
FIRST_NS = (dt.date(1678, 1, 1) - dt.date(1970, 1, 1)).days * DAY_NS
END_NS = (dt.date(2262, 1, 1) - dt.date(1970, 1, 1)).days * DAY_NS

ENVELOPE_REASONS = (
    "malformed_json",
    "missing_id",
    "missing_source",
    "missing_type",
    "missing_subject",
    "missing_time",
    "bad_time",
    "bad_data",
)


@dataclass
class Batch:
    file: str  # as meterlake reports it, relative to the root (e.g. "landing/a/1.jsonl")
    records: list[Any]  # dict, or str for a raw JSONL line ("" is a blank line: skipped, but it has a number)
    kind: str = "jsonl"  # "jsonl": line numbers count every line; "parquet": row numbers


@dataclass
class RefMeter:
    slug: str
    event_type: str
    aggregation: str
    value_property: str | None
    group_by: dict[str, str]
    event_from_ns: int | None = None  # eventFrom (UTC ns): the meter's earlier events are not counted


@dataclass
class RefBilling:
    period: str = "MONTH"
    timezone: str = "UTC"
    anchor_day: int = 1


@dataclass
class Expected:
    tables: dict[str, pl.DataFrame]  # "slug/period" and "slug/hourly"
    rejected: pl.DataFrame  # file, line, reason (envelope stage, malformed_json included)
    duplicates: pl.DataFrame  # file, line of every dropped copy
    excluded: pl.DataFrame  # meter, file, line, reason (missing_value / bad_value)
    events: int  # valid, deduplicated events of every type
    meters: list[RefMeter] = field(default_factory=list)


# --- meters YAML (read independently of meters/) --------------------------------------------------
def read_meters(text: str) -> tuple[RefBilling, list[RefMeter]]:
    doc = yaml.safe_load(text)
    b = doc.get("billing") or {}
    billing = RefBilling(b.get("period", "MONTH"), b.get("timezone", "UTC"), int(b.get("anchor_day", 1)))
    meters = [
        RefMeter(
            slug=m["slug"],
            event_type=m["eventType"],
            aggregation=m["aggregation"],
            value_property=m.get("valueProperty"),
            group_by=dict(m.get("groupBy") or {}),
            event_from_ns=_ns(m["eventFrom"]) if "eventFrom" in m else None,
        )
        for m in doc["meters"]
    ]
    return billing, meters


def _ns(text: str) -> int:
    """An RFC 3339 time with an offset (at most microseconds) as UTC nanoseconds."""
    when = dt.datetime.fromisoformat(text)
    return (when - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1) * 1000


_STEP = re.compile(r"""\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\['([^']*)'\]|\["([^"]*)"\]""")


def duckdb_path(jsonpath: str) -> str:
    """`$.a.b`, `$['a b']`, `$.a[0]` in DuckDB's JSON path dialect (`$."a"."b"`, `$."a b"`, `$."a"[0]`)."""
    assert jsonpath.startswith("$"), jsonpath
    out, pos = "$", 1
    while pos < len(jsonpath):
        m = _STEP.match(jsonpath, pos)
        assert m, f"unsupported path {jsonpath!r} at {pos}"
        name = m.group(1) or m.group(3) or m.group(4)
        out += f"[{m.group(2)}]" if m.group(2) is not None else '."' + name.replace('"', '\\"') + '"'
        pos = m.end()
    return out


def _sql_text(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


# --- billing periods: boundaries as UTC instants ---------------------------------------------------
def period_starts(billing: RefBilling, first: dt.date, last: dt.date) -> list[dt.date]:
    """Every local date on which a billing period starts, from before `first` to after `last`."""
    lo, hi = first - dt.timedelta(days=70), last + dt.timedelta(days=70)
    if billing.period == "DAY":
        return [lo + dt.timedelta(days=i) for i in range((hi - lo).days + 1)]
    if billing.period == "WEEK":  # ISO weeks start on Monday
        return [d for d in (lo + dt.timedelta(days=i) for i in range((hi - lo).days + 1)) if d.isoweekday() == 1]
    assert billing.period == "MONTH", billing.period
    out = []
    for y in range(lo.year, hi.year + 1):
        for m in range(1, 13):
            out.append(dt.date(y, m, min(billing.anchor_day, calendar.monthrange(y, m)[1])))
    return [d for d in out if lo <= d <= hi]


def _midnight_ns(day: dt.date, tz: str) -> int:
    aware = dt.datetime(day.year, day.month, day.day, tzinfo=zoneinfo.ZoneInfo(tz))
    return int(aware.astimezone(UTC).timestamp()) * NS


def _local_date(ns: int, tz: str) -> dt.date:
    return dt.datetime.fromtimestamp(ns // NS, UTC).astimezone(zoneinfo.ZoneInfo(tz)).date()


# --- SQL ---------------------------------------------------------------------------------------------
def _ok_string(col: str) -> str:
    ok = f"json_type(j, '$.\"{col}\"') = 'VARCHAR' AND json_extract_string(j, '$.\"{col}\"') <> ''"
    return f"coalesce({ok}, false)"  # an absent key is SQL NULL


# RFC 3339 date-time with a mandatory offset; groups: date, hh, mm, ss, fraction digits, offset
RFC3339 = r"^(\d{4}-\d{2}-\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})$"

VALIDATE_SQL = f"""
CREATE TABLE parsed AS
SELECT *,
    CASE WHEN json_type(j, '$.time') = 'VARCHAR' THEN json_extract_string(j, '$.time') END AS t
FROM rec;

CREATE TABLE timed AS
SELECT *,
    regexp_extract(t, '{RFC3339}', 1) AS t_date,
    TRY_CAST(regexp_extract(t, '{RFC3339}', 2) AS BIGINT) AS t_h,
    TRY_CAST(regexp_extract(t, '{RFC3339}', 3) AS BIGINT) AS t_m,
    TRY_CAST(regexp_extract(t, '{RFC3339}', 4) AS BIGINT) AS t_s,
    regexp_extract(t, '{RFC3339}', 5) AS t_frac,
    upper(regexp_extract(t, '{RFC3339}', 6)) AS t_off
FROM parsed;

CREATE TABLE ns_time AS
SELECT *,
    CASE
        WHEN t IS NULL OR NOT regexp_full_match(t, '{RFC3339}') THEN NULL
        WHEN TRY_CAST(t_date AS DATE) IS NULL OR t_h > 23 OR t_m > 59 OR t_s > 59 THEN NULL
        WHEN substr(t_date, 1, 4) < '1678' OR substr(t_date, 1, 4) > '2261' THEN NULL  -- beyond 64-bit nanoseconds
        WHEN t_off <> 'Z' AND (CAST(substr(t_off, 2, 2) AS BIGINT) > 23 OR CAST(substr(t_off, 5, 2) AS BIGINT) > 59)
            THEN NULL
        ELSE (date_diff('day', DATE '1970-01-01', CAST(t_date AS DATE)) * 86400 + t_h * 3600 + t_m * 60 + t_s)
                * {NS}
            + CAST(rpad(substr(t_frac, 1, 9), 9, '0') AS BIGINT)
            - CASE WHEN t_off = 'Z' THEN 0
                   ELSE (CASE WHEN substr(t_off, 1, 1) = '-' THEN -1 ELSE 1 END)
                        * (CAST(substr(t_off, 2, 2) AS BIGINT) * 3600 + CAST(substr(t_off, 5, 2) AS BIGINT) * 60)
                        * {NS}
              END
    END AS ns
FROM timed;

CREATE TABLE checked AS
SELECT ord, file, line, j, ns,
    CASE
        WHEN NOT {_ok_string("id")} THEN 'missing_id'
        WHEN NOT {_ok_string("source")} THEN 'missing_source'
        WHEN NOT {_ok_string("type")} THEN 'missing_type'
        WHEN NOT {_ok_string("subject")} THEN 'missing_subject'
        WHEN coalesce(json_type(j, '$.time'), 'NULL') = 'NULL' THEN 'missing_time'
        WHEN ns IS NULL OR ns < {FIRST_NS} OR ns >= {END_NS} THEN 'bad_time'  -- the UTC instant in 1678-2261 too
        WHEN coalesce(json_type(j, '$.data'), 'NULL') NOT IN ('NULL', 'OBJECT') THEN 'bad_data'
    END AS reason
FROM ns_time;

CREATE TABLE valid AS
SELECT ord, file, line, ns,
    json_extract_string(j, '$.id') AS id,
    json_extract_string(j, '$.source') AS source,
    json_extract_string(j, '$.type') AS type,
    json_extract_string(j, '$.subject') AS subject,
    CASE WHEN json_type(j, '$.data') = 'OBJECT' THEN json_extract(j, '$.data') END AS d,
    (ns - ((ns % {DAY_NS}) + {DAY_NS}) % {DAY_NS}) // {DAY_NS} AS utc_day  -- floored: DuckDB's // and % truncate
FROM checked WHERE reason IS NULL;

CREATE TABLE ranked AS
SELECT *, row_number() OVER (PARTITION BY source, id, utc_day ORDER BY ord, line) AS copy
FROM valid;

CREATE TABLE ev AS SELECT * EXCLUDE (copy) FROM ranked WHERE copy = 1;
"""

NUMERIC_TYPES = "('UBIGINT', 'BIGINT', 'DOUBLE', 'HUGEINT', 'UHUGEINT')"
DECIMAL = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?$"


# The text of a JSON number that is not an integer (`1.0`, `2.5`) as meterlake compares it (group-by and UNIQUE_COUNT
# values): a whole number as an integer (`1`, as OpenMeter's float64 round trip writes it), any other as its
# shortest form (`2.5`). Only for magnitudes where Go's, JavaScript's, Python's and DuckDB's shortest forms agree;
# anything else is an error, so no test leans on a convention nobody wrote down (-0.0, 1e-7, 1e21).
NUMBER_TEXT = """
CREATE MACRO number_text(x) AS CASE
    WHEN x = 0 AND signbit(x) THEN error('-0.0: no agreed text')
    WHEN x = trunc(x) AND abs(x) < 2 ** 53 THEN CAST(CAST(x AS BIGINT) AS VARCHAR)
    WHEN abs(x) >= 1e-4 AND abs(x) < 1e15 THEN CAST(x AS VARCHAR)
    ELSE error('a number with no agreed text: ' || CAST(x AS VARCHAR))
END;
"""


def _value_text(path: str) -> str:
    """SQL for the text of a value: JSON text for strings, integers, booleans, objects; `number_text` (NUMBER_TEXT)
    for other numbers (DuckDB writes `1.0` back as `1.0`)."""
    return (
        f"CASE WHEN json_type(d, {path}) = 'DOUBLE' THEN number_text(json_extract(d, {path})::DOUBLE)"
        f" ELSE json_extract_string(d, {path}) END"
    )


def _extract_sql(meter: RefMeter) -> str:
    """One row per event of the type: group columns, `num` / `txt` value, `why` (exclusion reason or NULL)."""
    groups = "".join(
        f", {_value_text(_sql_text(duckdb_path(p)))} AS g_{i}" for i, p in enumerate(meter.group_by.values())
    )
    if meter.aggregation == "COUNT":
        value = ", NULL::DOUBLE AS num, NULL::VARCHAR AS txt, NULL::VARCHAR AS why"
    else:
        path = _sql_text(duckdb_path(meter.value_property))
        vtype = f"coalesce(json_type(d, {path}), 'NULL')"
        vtext = f"json_extract_string(d, {path})"
        number = (
            f"CASE WHEN {vtype} IN {NUMERIC_TYPES} THEN TRY_CAST({vtext} AS DOUBLE)"
            f" WHEN {vtype} = 'VARCHAR' AND regexp_full_match({vtext}, '{DECIMAL}') THEN TRY_CAST({vtext} AS DOUBLE)"
            " END"
        )
        if meter.aggregation == "UNIQUE_COUNT":
            why = f"CASE WHEN {vtype} = 'NULL' THEN 'missing_value' END"
        else:
            why = (
                f"CASE WHEN {vtype} = 'NULL' THEN 'missing_value'"
                f" WHEN ({number}) IS NULL OR NOT isfinite({number}) THEN 'bad_value' END"
            )
        txt = _value_text(path) if meter.aggregation == "UNIQUE_COUNT" else vtext
        value = f", {number} AS num, {txt} AS txt, {why} AS why"
    since = f" AND ns >= {meter.event_from_ns}" if meter.event_from_ns is not None else ""
    return f"SELECT *{groups}{value} FROM ev WHERE type = {_sql_text(meter.event_type)}{since}"


def _agg_sql(aggregation: str) -> str:
    return {
        "COUNT": "count(*)::DOUBLE",
        "SUM": "sum(num)",
        "AVG": "avg(num)",
        "MIN": "min(num)",
        "MAX": "max(num)",
        "UNIQUE_COUNT": "count(DISTINCT txt)::DOUBLE",
        "LATEST": "arg_max(num, (ns, id, source))",
    }[aggregation]


def _table_sql(meter: RefMeter, kind: str) -> str:
    keys = "subject" + "".join(f", g_{i}" for i in range(len(meter.group_by)))
    if kind == "hourly":
        floor = f"ns - ((ns % {HOUR_NS}) + {HOUR_NS}) % {HOUR_NS}"  # DuckDB's % truncates: floor pre-1970 times
        window = f"SELECT x.*, {floor} AS ws, {floor} + {HOUR_NS} AS we FROM x"
    else:
        window = "SELECT x.*, p.ws, p.we FROM x JOIN periods p ON x.ns >= p.ws AND x.ns < p.we"
    return f"""
        WITH x AS ({_extract_sql(meter)}), w AS ({window})
        SELECT {keys}, ws // 1000 AS ws_us, we // 1000 AS we_us,
               {_agg_sql(meter.aggregation)} AS value, count(*) AS event_count
        FROM w WHERE why IS NULL
        GROUP BY ALL
    """


# --- entry point -------------------------------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _records(batches: list[Batch]) -> tuple[list[tuple[int, str, int, str]], list[tuple[str, int, str]]]:
    rows: list[tuple[int, str, int, str]] = []
    malformed: list[tuple[str, int, str]] = []
    for order, batch in enumerate(batches):
        for line, record in enumerate(batch.records, start=1):
            if isinstance(record, str):
                if batch.kind == "jsonl" and not record.strip():
                    continue
                try:
                    record = json.loads(record, parse_constant=_reject_constant)
                except ValueError:
                    malformed.append((batch.file, line, "malformed_json"))
                    continue
            if not isinstance(record, dict):
                malformed.append((batch.file, line, "malformed_json"))
                continue
            rows.append((order, batch.file, line, json.dumps(record, allow_nan=False)))
    return rows, malformed


def events_connection(rows: list[tuple]) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection holding the records (`_records`) as table `rec` and the curated events as `ev`
    (VALIDATE_SQL), with the NUMBER_TEXT macro: what the table and the query references both start from."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute(NUMBER_TEXT)
    rec = pa.table(
        {
            "ord": pa.array([r[0] for r in rows], pa.int64()),
            "file": pa.array([r[1] for r in rows], pa.string()),
            "line": pa.array([r[2] for r in rows], pa.int64()),
            "j": pa.array([r[3] for r in rows], pa.string()),
        }
    )
    con.register("rec_in", rec)
    con.execute("CREATE TABLE rec AS SELECT ord, file, line, j::JSON AS j FROM rec_in")
    con.execute(VALIDATE_SQL)
    return con


def compute(batches: list[Batch], meters_yaml: str) -> Expected:
    billing, meters = read_meters(meters_yaml)
    rows, malformed = _records(batches)
    con = events_connection(rows)

    lo, hi = con.execute("SELECT min(ns), max(ns) FROM ev").fetchall()[0]
    starts = (
        period_starts(billing, _local_date(lo, billing.timezone), _local_date(hi, billing.timezone))
        if lo is not None
        else []
    )
    bounds = [_midnight_ns(d, billing.timezone) for d in starts]
    con.register(
        "periods_in",
        pa.table({"ws": pa.array(bounds[:-1], pa.int64()), "we": pa.array(bounds[1:], pa.int64())}),
    )
    con.execute("CREATE TABLE periods AS SELECT * FROM periods_in")

    tables: dict[str, pl.DataFrame] = {}
    excluded_parts = []
    for meter in meters:
        for kind in ("period", "hourly"):
            df = con.sql(_table_sql(meter, kind)).pl()
            tables[f"{meter.slug}/{kind}"] = _shape(df, meter)
        if meter.aggregation != "COUNT":
            excluded_parts.append(
                con.sql(
                    f"SELECT {_sql_text(meter.slug)} AS meter, file, line, why AS reason"
                    f" FROM ({_extract_sql(meter)}) WHERE why IS NOT NULL"
                ).pl()
            )

    rejected_rows = con.execute("SELECT file, line, reason FROM checked WHERE reason IS NOT NULL").fetchall()
    rejected = pl.DataFrame(
        rejected_rows + malformed, schema={"file": pl.String, "line": pl.Int64, "reason": pl.String}, orient="row"
    )
    duplicates = con.sql("SELECT file, line FROM ranked WHERE copy > 1").pl().cast({"line": pl.Int64})
    excluded_schema = {"meter": pl.String, "file": pl.String, "line": pl.Int64, "reason": pl.String}
    excluded = (
        pl.concat([e.cast(excluded_schema) for e in excluded_parts])
        if excluded_parts
        else pl.DataFrame(schema=excluded_schema)
    )
    events = con.execute("SELECT count(*) FROM ev").fetchall()[0][0]
    con.close()
    return Expected(tables, rejected, duplicates, excluded, events, meters)


def _shape(df: pl.DataFrame, meter: RefMeter) -> pl.DataFrame:
    window = pl.Datetime("us", "UTC")
    names = {f"g_{i}": key for i, key in enumerate(meter.group_by)}
    return df.rename(names).select(
        pl.col("subject").cast(pl.String),
        *[pl.col(k).cast(pl.String) for k in meter.group_by],
        pl.from_epoch(pl.col("ws_us").cast(pl.Int64), "us")
        .dt.replace_time_zone("UTC")
        .cast(window)
        .alias("window_start"),
        pl.from_epoch(pl.col("we_us").cast(pl.Int64), "us")
        .dt.replace_time_zone("UTC")
        .cast(window)
        .alias("window_end"),
        pl.col("value").cast(pl.Float64),
        pl.col("event_count").cast(pl.Int64),
    )


# --- comparing tables --------------------------------------------------------------------------------
def assert_tables_match(actual: pl.DataFrame, expected: pl.DataFrame, where: str, rel: float = 1e-9) -> None:
    """Same row set on the key columns (null-safe), values within `rel`, event counts equal when present."""
    keys = [c for c in expected.columns if c not in ("value", "event_count")]
    if expected.is_empty():
        assert actual.is_empty(), f"{where}: expected no rows, got {actual.height}:\n{actual.head(5)}"
        return
    assert not actual.is_empty(), f"{where}: no table, expected {expected.height} rows:\n{expected.head(5)}"
    missing_cols = [c for c in [*keys, "value"] if c not in actual.columns]
    assert not missing_cols, f"{where}: missing columns {missing_cols} (have {actual.columns})"
    for c in keys:
        assert actual.schema[c] == expected.schema[c], (
            f"{where}: column {c} is {actual.schema[c]}, not {expected.schema[c]}"
        )
    assert actual.select(keys).is_duplicated().sum() == 0, f"{where}: duplicate keys in the table"
    cols = keys + ["value"] + (["event_count"] if "event_count" in actual.columns else [])
    joined = actual.select(cols).join(
        expected.select(cols), on=keys, how="full", nulls_equal=True, coalesce=True, suffix="_ref"
    )
    only_actual = joined.filter(pl.col("value_ref").is_null())
    only_expected = joined.filter(pl.col("value").is_null())
    assert only_actual.is_empty() and only_expected.is_empty(), (
        f"{where}: row sets differ\nonly in meterlake ({only_actual.height}):\n{only_actual.head(8)}"
        f"\nonly in reference ({only_expected.height}):\n{only_expected.head(8)}"
    )
    a, e = pl.col("value"), pl.col("value_ref")
    bad = joined.filter((a - e).abs() > rel * pl.max_horizontal(a.abs(), e.abs()) + 1e-12)
    assert bad.is_empty(), f"{where}: {bad.height} values differ:\n{bad.head(8)}"
    if "event_count" in actual.columns:
        bad = joined.filter(pl.col("event_count") != pl.col("event_count_ref"))
        assert bad.is_empty(), f"{where}: {bad.height} event counts differ:\n{bad.head(8)}"
