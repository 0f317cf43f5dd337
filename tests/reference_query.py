"""An independent reference for `meterlake query`, in DuckDB SQL, written from SPEC.md and the research notes
(OpenMeter's v1 query API, research §5), not from `transforms/query.py`.

It reuses the event-level SQL of `reference.py` (validation, deduplication, JSONPath extraction, exclusions: the
same rules the billing tables follow) and adds the query itself:

- the range is `[from, to)`, compared with the event's full (nanosecond) time; `from`/`to` are RFC 3339 with an
  offset (DuckDB's TIMESTAMPTZ cast reads them) or a plain date, which is local midnight in the window zone;
  a meter's `eventFrom` raises the lower bound (research §5.1);
- windows come from DuckDB's ICU time zones (another tz database than Polars' and zoneinfo): DAY is
  `[local midnight, next local midnight)`, MONTH the same from the local first of the month; MINUTE and HOUR
  truncate the local wall clock and keep the event's own UTC offset (docs/cli.md: the repeated hour of a fall-back
  gives two windows, one per real hour), and are cut at the instants the zone's offset changes (listed here by
  scanning every minute of the events' span), so that windows never overlap (docs/design.md);
- no window: one row per group labelled `[from, to)`;
- only groups/windows with an event that counts; an unwindowed, ungrouped COUNT or UNIQUE_COUNT with nothing
  gives one row of 0 (research §5.5);
- `subjects` filters subjects and groups by subject; `filters` keeps events whose group value, as text, is one of
  the values given (a null group value matches nothing).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import zoneinfo
from dataclasses import dataclass, field

import polars as pl

from reference import (
    Batch,
    RefMeter,
    _agg_sql,
    _extract_sql,
    _records,
    _sql_text,
    events_connection,
    read_meters,
)

US = 1000  # ns per microsecond
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_BEYOND_US = re.compile(r"(\.\d{6})\d+")
UNITS = {"MINUTE": "minute", "HOUR": "hour"}
US_OF_NS = "((ns - ((ns % 1000) + 1000) % 1000) // 1000)"  # floored: DuckDB's // and % truncate toward zero

# The first instant (UTC microseconds) of local date `d` in zone `z` (docs/design.md: a day starts once, at its
# first midnight). ICU resolves a local time that occurs twice (America/Havana falls back from 01:00 to 00:00) to
# the later instant: look for the same wall clock half an hour and an hour before. A skipped midnight (Havana
# springs forward from 00:00 to 01:00) comes out as the first instant of the day, as wanted.
MIDNIGHT_SQL = """
CREATE MACRO ambiguous_us(z, d, us) AS
    CASE
        WHEN timezone(z, make_timestamp(us - 3600000000)::TIMESTAMPTZ) = d::TIMESTAMP THEN us - 3600000000
        WHEN timezone(z, make_timestamp(us - 1800000000)::TIMESTAMPTZ) = d::TIMESTAMP THEN us - 1800000000
        ELSE us
    END;
CREATE MACRO midnight_us(z, d) AS ambiguous_us(z, d, epoch_us(timezone(z, d::TIMESTAMP)));
"""


@dataclass
class RefQuery:
    slug: str
    from_: str  # as given to meterlake: RFC 3339 with an offset, or YYYY-MM-DD (local midnight in tz)
    to: str
    window: str | None = None
    tz: str = "UTC"
    subjects: list[str] = field(default_factory=list)
    group_by: list[str] = field(default_factory=list)
    filters: dict[str, list[str]] = field(default_factory=dict)


class Reference:
    """The curated events of some landed batches, in DuckDB, ready for queries."""

    def __init__(self, batches: list[Batch], meters_yaml: str) -> None:
        _, meters = read_meters(meters_yaml)
        self.meters = {m.slug: m for m in meters}
        rows, _ = _records(batches)
        self.con = events_connection(rows)
        self.con.execute(MIDNIGHT_SQL)
        self.changes: dict[str, str] = {}

    def _changes(self, tz: str) -> str:
        """A table of the instants (UTC microseconds) where `tz`'s UTC offset changes, around the events."""
        if tz not in self.changes:
            name = f"changes_{len(self.changes)}"
            self.con.execute(f"""
                CREATE TABLE {name} AS
                WITH grid AS (
                    SELECT epoch_us(m) AS us, epoch_us(timezone({_sql_text(tz)}, m)) - epoch_us(m) AS off
                    FROM (SELECT min(ns) AS lo, max(ns) AS hi FROM ev) span,
                         generate_series(date_trunc('day', make_timestamp(lo // 1000)::TIMESTAMPTZ) - INTERVAL 3 DAY,
                                         make_timestamp(hi // 1000)::TIMESTAMPTZ + INTERVAL 3 DAY,
                                         INTERVAL 1 MINUTE) AS g(m)
                )
                SELECT us FROM (SELECT us, off, lag(off) OVER (ORDER BY us) AS before FROM grid) WHERE off <> before
            """)
            self.changes[tz] = name
        return self.changes[tz]

    def close(self) -> None:
        self.con.close()

    def bound_ns(self, text: str, tz: str) -> int:
        """A bound as UTC nanoseconds. docs/cli.md: fractions are kept to the microsecond (digits beyond are
        dropped, not rounded; DuckDB's cast would round them)."""
        text = _BEYOND_US.sub(r"\1", text)
        if _DAY.fullmatch(text):
            sql = f"SELECT midnight_us({_sql_text(tz)}, CAST({_sql_text(text)} AS DATE))"
        else:
            sql = f"SELECT epoch_us(CAST({_sql_text(text)} AS TIMESTAMPTZ))"
        return self.con.execute(sql).fetchall()[0][0] * US

    def query(self, q: RefQuery) -> pl.DataFrame:
        """window_start, window_end (Datetime(us, tz)), the group keys (subject first), value (Float64)."""
        meter: RefMeter = self.meters[q.slug]
        lo, hi = self.bound_ns(q.from_, q.tz), self.bound_ns(q.to, q.tz)
        keys = (["subject"] if q.subjects or "subject" in q.group_by else []) + [
            k for k in q.group_by if k != "subject"
        ]
        index = {k: i for i, k in enumerate(meter.group_by)}
        col = {"subject": "subject", **{k: f"g_{index[k]}" for k in meter.group_by}}
        where = [f"ns >= {lo}", f"ns < {hi}", "why IS NULL"]  # eventFrom: in _extract_sql
        if q.subjects:
            where.append(f"subject IN ({', '.join(_sql_text(s) for s in q.subjects)})")
        for key, values in q.filters.items():
            where.append(f"{col[key]} IN ({', '.join(_sql_text(v) for v in values)})")
        tz = _sql_text(q.tz)
        # the instant (to the microsecond: windows are minutes at the finest) and its local wall clock
        at = f"make_timestamp({US_OF_NS})::TIMESTAMPTZ"
        local = f"timezone({tz}, {at})"
        if q.window is None:
            ws, we = f"{lo // US}", f"{hi // US}"
        elif q.window in UNITS:
            unit = UNITS[q.window]
            offset = f"(epoch_us({local}) - {US_OF_NS})"  # the event's own UTC offset, in microseconds
            wall = f"(epoch_us(date_trunc('{unit}', {local})) - {offset})"
            length = 60_000_000 if unit == "minute" else 3_600_000_000
            changes = self._changes(q.tz)
            # cut at an offset change inside the wall-clock window (the grid is minutes: changes are on minutes)
            ws = f"greatest({wall}, coalesce((SELECT max(c.us) FROM {changes} c WHERE c.us <= {US_OF_NS}), {wall}))"
            end = f"{wall} + {length}"
            we = f"least({end}, coalesce((SELECT min(c.us) FROM {changes} c WHERE c.us > {US_OF_NS}), {end}))"
        else:
            # the local date: the day whose first midnight the event follows last (a clock that falls back across
            # midnight, America/St_Johns 1987-2011, shows the day before again after the day began)
            shown = f"CAST({local} AS DATE)"
            day = f"(CASE WHEN midnight_us({tz}, CAST({shown} + 1 AS DATE)) <= {US_OF_NS} THEN {shown} + 1 ELSE {shown} END)"
            first = day if q.window == "DAY" else f"date_trunc('month', {day})"
            step = "INTERVAL 1 DAY" if q.window == "DAY" else "INTERVAL 1 MONTH"
            ws = f"midnight_us({tz}, {first})"
            we = f"midnight_us({tz}, CAST(({first}) + {step} AS DATE))"
        select_keys = "".join(f", {col[k]} AS {k}" for k in keys)
        sql = f"""
            WITH x AS ({_extract_sql(meter)}),
            w AS (SELECT *, {ws} AS ws_us, {we} AS we_us FROM x WHERE {" AND ".join(where)})
            SELECT ws_us, we_us{select_keys}, {_agg_sql(meter.aggregation)} AS value
            FROM w GROUP BY ALL
        """
        df = self.con.sql(sql).pl()
        df = df.filter(pl.col("value").is_not_null())
        if df.is_empty() and q.window is None and not keys and meter.aggregation in ("COUNT", "UNIQUE_COUNT"):
            df = pl.DataFrame({"ws_us": [lo // US], "we_us": [hi // US], "value": [0.0]})
        zone = pl.Datetime("us", q.tz)
        return df.select(
            pl.from_epoch(pl.col("ws_us").cast(pl.Int64), "us").dt.replace_time_zone("UTC").dt.convert_time_zone(q.tz)
            .cast(zone)
            .alias("window_start"),
            pl.from_epoch(pl.col("we_us").cast(pl.Int64), "us").dt.replace_time_zone("UTC").dt.convert_time_zone(q.tz)
            .cast(zone)
            .alias("window_end"),
            *[pl.col(k).cast(pl.String) for k in keys],
            pl.col("value").cast(pl.Float64),
        )  # fmt: skip


def assert_query_matches(actual: pl.DataFrame, expected: pl.DataFrame, where: str, avg_rel: float = 0.0) -> None:
    """Same columns and types, the same rows whatever their order (keys null-safe), values equal.

    Values are compared exactly; `avg_rel` is a relative tolerance for AVG only, whose division may be done
    differently (sum / n against a running mean)."""
    assert actual.columns == expected.columns, f"{where}: columns {actual.columns} != {expected.columns}"
    assert actual.schema == expected.schema, f"{where}: schema {actual.schema} != {expected.schema}"
    keys = [c for c in expected.columns if c != "value"]
    assert actual.select(keys).is_duplicated().sum() == 0, f"{where}: duplicate keys\n{actual}"
    joined = actual.join(expected, on=keys, how="full", nulls_equal=True, coalesce=True, suffix="_ref")
    only_actual = joined.filter(pl.col("value_ref").is_null() & pl.col("value").is_not_null())
    only_expected = joined.filter(pl.col("value").is_null() & pl.col("value_ref").is_not_null())
    assert only_actual.is_empty() and only_expected.is_empty(), (
        f"{where}: row sets differ\nonly in meterlake ({only_actual.height}):\n{only_actual.head(8)}"
        f"\nonly in reference ({only_expected.height}):\n{only_expected.head(8)}"
    )
    a, e = pl.col("value"), pl.col("value_ref")
    bad = joined.filter((a - e).abs() > avg_rel * pl.max_horizontal(a.abs(), e.abs()))
    assert bad.is_empty(), f"{where}: {bad.height} values differ:\n{bad.head(8)}"
    assert actual.height == expected.height


def assert_windows_disjoint(df: pl.DataFrame, where: str) -> None:
    """Within one group, the rows' [window_start, window_end) never overlap (nor are empty): a row is exactly the
    events its window holds. Needs no reference."""
    keys = [c for c in df.columns if c not in ("window_start", "window_end", "value")]
    assert (df["window_start"] < df["window_end"]).all(), f"{where}: an empty window\n{df}"
    ordered = df.sort([*keys, "window_start"], nulls_last=True)
    following = pl.col("window_start").shift(-1)
    same_group = pl.all_horizontal([pl.col(k).eq_missing(pl.col(k).shift(-1)) for k in keys] or [pl.lit(True)])
    bad = ordered.filter(same_group & (following < pl.col("window_end")))
    assert bad.is_empty(), f"{where}: overlapping windows\n{bad}"


def rfc3339_in(us: int, tz: str) -> str:
    """An instant (UTC microseconds) as RFC 3339 in `tz`, as Go writes it: `Z` for a zero offset, the fraction only
    when there is one."""
    when = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=us)
    local = when.astimezone(zoneinfo.ZoneInfo(tz))
    text = local.strftime("%Y-%m-%dT%H:%M:%S") + (f".{local.microsecond:06d}" if local.microsecond else "")
    offset = local.utcoffset()
    assert offset is not None
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    return text + ("Z" if minutes == 0 else f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}")


def openmeter_body(expected: pl.DataFrame, q: RefQuery, lo_ns: int, hi_ns: int) -> dict:
    """OpenMeter's v1 response body (research §5.2) for the reference rows; `data` sorted (no order is promised)."""
    keys = [c for c in expected.columns if c not in ("window_start", "window_end", "value", "subject")]
    data = [
        {
            "value": row["value"],
            "windowStart": rfc3339_in(_us(row["window_start"]), q.tz),
            "windowEnd": rfc3339_in(_us(row["window_end"]), q.tz),
            "subject": row.get("subject"),
            "groupBy": {k: row[k] for k in keys},
        }
        for row in expected.iter_rows(named=True)
    ]
    body: dict = {"from": rfc3339_in(lo_ns // US, q.tz), "to": rfc3339_in(hi_ns // US, q.tz)}
    if q.window:
        body["windowSize"] = q.window
    body["windowTimeZone"] = q.tz
    body["data"] = sorted(data, key=lambda d: json.dumps(d, sort_keys=True))
    return body


def _us(value: dt.datetime) -> int:
    return (value - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)
