"""The meterlake job written as straightforward DuckDB SQL: the comparison point of bench/run.py.

Same inputs, same meters, same outputs as one full meterlake run, without meterlake's bookkeeping
(manifest, quarantine, lock, atomic publishing):

1. read the landed files: JSONL with ``read_json`` (explicit columns, envelope attributes and ``data``
   as JSON so a number in ``subject`` is not mistaken for a string, ``ignore_errors``); Parquet one
   file at a time, ``data`` structs turned into JSON text with ``to_json`` and timestamp ``time``
   columns into RFC 3339 text with ``strftime``, all UNION ALL;
2. drop invalid envelopes: id, source, type, subject absent, null, empty or not a string; time
   absent or not RFC 3339 with an offset; data present but not an object;
3. deduplicate on (source, id, UTC date), the first landed copy winning;
4. per meter, one ``COPY (SELECT ... GROUP BY ALL) TO '<out>/<slug>/period.parquet'`` and one for
   ``hourly.parquet``: SUM / AVG / MIN / MAX over ``TRY_CAST(json_extract_string(data, path) AS
   DOUBLE)`` kept where finite, COUNT(*), COUNT(DISTINCT text) for UNIQUE_COUNT, ``arg_max`` for
   LATEST (greatest time, then id, then source), group-by columns via ``json_extract_string``; a meter's
   ``eventFrom`` leaves out its earlier events.

The SQL is generated from the parsed meters file (``meters.load_meters_file``). Billing periods are
assumed to be UTC calendar months (``date_trunc('month', ...)``); any other billing block is refused.

Known differences from meterlake, none of which the benchmark generator produces: a numeric string
with spaces (``" 12"``) counts here (DuckDB's cast trims it), and JSON numbers used as group-by values
or UNIQUE_COUNT values are not canonicalised (``1.0`` stays ``1.0``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb

from meters import Meter, MeterSet

# Same pattern as transforms.validate.RFC3339 (RFC 3339 with a mandatory offset).
RFC3339 = r"^\d{4}-\d{2}-\d{2}[Tt](?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d+)?(?:[Zz]|[+-](?:[01]\d|2[0-3]):[0-5]\d)$"
ENVELOPE_ATTRS = ("id", "source", "type", "subject", "time")


class UnsupportedBilling(ValueError):
    """The DuckDB job only knows UTC calendar months."""


def check_billing(meterset: MeterSet) -> None:
    b = meterset.billing
    if (b.period, b.timezone, b.anchor_day) != ("MONTH", "UTC", 1):
        raise UnsupportedBilling(
            f"bench/duckdb_job.py computes billing periods as UTC calendar months; the meters file has "
            f"period={b.period}, timezone={b.timezone}, anchor_day={b.anchor_day}. Use a meters file with "
            "`billing: {period: MONTH, timezone: UTC, anchor_day: 1}` (or none) for the benchmark."
        )


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def duckdb_path(polars_path: str) -> str:
    """meterlake's normalised JSONPath (``$.a['b c'][0]``) in DuckDB's dialect (``$.a."b c"[0]``)."""
    return re.sub(r"\['([^']*)'\]", lambda m: '."' + m.group(1) + '"', polars_path)


def _json_text(path: str) -> str:
    return f"json_extract_string(data, {_lit(duckdb_path(path))})"


# --- reading ---------------------------------------------------------------------------------------
def jsonl_source(files: Sequence[str]) -> str:
    """One read_json over all files, in landing order (insertion order is preserved)."""
    columns = "{" + ", ".join(f"{_lit(a)}: 'JSON'" for a in (*ENVELOPE_ATTRS, "data")) + "}"
    file_list = "[" + ", ".join(_lit(str(f)) for f in files) + "]"
    # A JSON attribute counts only when it is a JSON string (meterlake: a number is not an id).
    attrs = ", ".join(f"CASE WHEN json_type({a}) = 'VARCHAR' THEN {a} ->> '$' END AS {a}" for a in ENVELOPE_ATTRS)
    return (
        f"SELECT {attrs}, "
        "CASE WHEN data IS NULL OR json_type(data) = 'NULL' THEN NULL "
        "WHEN json_type(data) = 'OBJECT' THEN CAST(data AS VARCHAR) ELSE '<not an object>' END AS data "
        f"FROM read_json({file_list}, format = 'newline_delimited', columns = {columns}, ignore_errors = true)"
    )


def parquet_source(con: duckdb.DuckDBPyConnection, files: Sequence[str]) -> str:
    """One SELECT per file (each may have its own data/time shape), UNION ALL in landing order."""
    parts = []
    for f in files:
        types = dict(
            con.sql(f"SELECT column_name, column_type FROM (DESCRIBE FROM read_parquet({_lit(str(f))}))").fetchall()
        )
        cols = []
        for a in ("id", "source", "type", "subject"):
            cols.append(f"CAST({a} AS VARCHAR) AS {a}" if types.get(a) == "VARCHAR" else f"NULL::VARCHAR AS {a}")
        time_type = types.get("time")
        if time_type is None:
            cols.append("NULL::VARCHAR AS time")
        elif time_type.startswith("TIMESTAMP"):
            cols.append("strftime(time, '%Y-%m-%dT%H:%M:%S.%fZ') AS time")
        else:
            cols.append("CAST(time AS VARCHAR) AS time")
        data_type = types.get("data")
        if data_type is None:
            cols.append("NULL::VARCHAR AS data")
        elif data_type.startswith("STRUCT"):
            cols.append("CAST(to_json(data) AS VARCHAR) AS data")
        else:
            cols.append("CASE WHEN trim(data) = 'null' THEN NULL ELSE data END AS data")
        parts.append(f"SELECT {', '.join(cols)} FROM read_parquet({_lit(str(f))})")
    return "\nUNION ALL\n".join(parts)


def events_sql(source_sql: str) -> str:
    """Valid, deduplicated events: id, source, type, subject, ts (TIMESTAMPTZ, UTC), data (JSON text)."""
    present = " AND ".join(f"{a} IS NOT NULL AND {a} <> ''" for a in ("id", "source", "type", "subject"))
    return f"""
CREATE OR REPLACE TEMP TABLE raw AS {source_sql};
CREATE OR REPLACE TEMP TABLE events AS
WITH checked AS (
    SELECT rowid AS landing_order, id, source, type, subject, data,
           CASE WHEN regexp_full_match(time, {_lit(RFC3339)}) THEN TRY_CAST(time AS TIMESTAMPTZ) END AS ts
    FROM raw
    WHERE {present} AND time IS NOT NULL AND (data IS NULL OR starts_with(data, '{{'))
)
SELECT id, source, type, subject, ts, data
FROM checked
WHERE ts IS NOT NULL
QUALIFY row_number() OVER (PARTITION BY source, id, CAST(ts AS DATE) ORDER BY landing_order) = 1;
DROP TABLE raw;
"""


# --- meters ----------------------------------------------------------------------------------------
def meter_select(meter: Meter, window: str) -> str:
    """The SELECT of one meter's table; ``window`` is 'period' (UTC month) or 'hourly' (UTC hour)."""
    unit, step = ("month", "INTERVAL 1 MONTH") if window == "period" else ("hour", "INTERVAL 1 HOUR")
    groups = [f"{_json_text(path)} AS {_ident(key)}" for key, path in meter.group_paths.items()]
    agg = meter.aggregation
    if agg == "COUNT":
        value, inner, keep = "CAST(COUNT(*) AS DOUBLE)", "", "TRUE"
    elif agg == "UNIQUE_COUNT":
        value, inner, keep = (
            "CAST(COUNT(DISTINCT v) AS DOUBLE)",
            f", {_json_text(meter.value_path)} AS v",
            "v IS NOT NULL",
        )
    else:
        fn = {
            "SUM": "SUM(v)",
            "AVG": "AVG(v)",
            "MIN": "MIN(v)",
            "MAX": "MAX(v)",
            "LATEST": "arg_max(v, (ts, id, source))",
        }
        value = fn[agg]
        inner = f", TRY_CAST({_json_text(meter.value_path)} AS DOUBLE) AS v"
        keep = "isfinite(v)"
    cols = ", ".join(["subject", *groups])
    since = f" AND ts >= TIMESTAMPTZ {_lit(meter.event_from.isoformat())}" if meter.event_from else ""  # eventFrom
    return f"""
SELECT {cols},
       date_trunc('{unit}', ts) AS window_start,
       date_trunc('{unit}', ts) + {step} AS window_end,
       {value} AS value,
       COUNT(*) AS event_count
FROM (SELECT *{inner} FROM events WHERE type = {_lit(meter.event_type)}{since})
WHERE {keep}
GROUP BY ALL
"""


@dataclass(frozen=True)
class Statement:
    slug: str
    table: str  # "period" or "hourly"
    path: str
    sql: str


def meter_statements(meterset: MeterSet, out_dir: str | Path) -> list[Statement]:
    out = []
    for meter in meterset.meters:
        for table in ("period", "hourly"):
            path = str(Path(out_dir) / meter.slug / f"{table}.parquet")
            sql = f"COPY ({meter_select(meter, table)}) TO {_lit(path)} (FORMAT parquet, COMPRESSION zstd)"
            out.append(Statement(meter.slug, table, path, sql))
    return out


# --- the job ---------------------------------------------------------------------------------------
def run(files: Sequence[str], fmt: str, meterset: MeterSet, out_dir: str | Path, threads: int | None = None) -> dict:
    """Compute every meter's period and hourly table from the landed ``files`` into ``out_dir``.

    Returns {"events": number of valid deduplicated events, "tables": number of files written}.
    """
    check_billing(meterset)
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        if threads:
            con.execute(f"SET threads = {int(threads)}")
        source = jsonl_source(files) if fmt == "jsonl" else parquet_source(con, files)
        con.execute(events_sql(source))
        n_events = con.sql("SELECT count(*) FROM events").fetchall()[0][0]
        statements = meter_statements(meterset, out_dir)
        for slug in {s.slug for s in statements}:
            (Path(out_dir) / slug).mkdir(parents=True, exist_ok=True)
        for s in statements:
            con.execute(s.sql)
        return {"events": n_events, "tables": len(statements)}
    finally:
        con.close()


def period_totals(out_dir: str | Path, meterset: MeterSet) -> dict[str, tuple[float, int]]:
    """(sum of value, rows) of each meter's period table written by ``run``."""
    con = duckdb.connect()
    try:
        out = {}
        for meter in meterset.meters:
            path = Path(out_dir) / meter.slug / "period.parquet"
            total, rows = con.sql(
                f"SELECT coalesce(sum(value), 0), count(*) FROM read_parquet({_lit(str(path))})"
            ).fetchall()[0]
            out[meter.slug] = (float(total), int(rows))
        return out
    finally:
        con.close()


def main() -> None:  # pragma: no cover - manual use: python bench/duckdb_job.py METERS OUT FORMAT FILE...
    import sys
    import time

    from meters import load_meters_file

    meters_file, out_dir, fmt, *files = sys.argv[1:]
    began = time.perf_counter()
    result = run(files, fmt, load_meters_file(meters_file), out_dir)
    print({**result, "seconds": round(time.perf_counter() - began, 3)})


if __name__ == "__main__":
    main()
