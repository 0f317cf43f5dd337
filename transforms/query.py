"""Ad-hoc meter queries with OpenMeter's semantics, computed from raw events (pure Polars, no I/O).

- The range is `[from, to)`; neither bound has to be aligned to a window.
- Windows (MINUTE, HOUR, DAY, MONTH) are calendar-aligned in an IANA zone: a DAY is local midnight to
  the next local midnight (23 or 25 hours across DST), a MONTH the same for the first of the month, and
  MINUTE/HOUR follow the local wall clock (Asia/Kolkata hours start at :30 UTC), cut where the zone's offset
  changes inside them (Australia/Lord_Howe's half-hour DST): windows never overlap. Window bounds come back
  in the query zone. The first and last windows carry their full calendar bounds but hold only the
  events inside `[from, to)`.
- Without a window there is one row per group, labelled `[from, to)`.
- Only windows and groups with at least one event are returned. The one exception is OpenMeter's: an
  unwindowed, ungrouped COUNT or UNIQUE_COUNT returns a single row of 0 when nothing matches.
- Grouping is only what is asked for: `subject` is a group key like any other, added automatically when
  subjects are filtered (as OpenMeter's `subject[]` does).

Every aggregation is exact, UNIQUE_COUNT and AVG across days included, because the values are aggregated
from the events themselves, never re-aggregated from published rows.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import zoneinfo
from dataclasses import dataclass, field

import polars as pl

from meters import Meter, is_iana_zone
from transforms.aggregate import value_expr
from transforms.extract import extract
from transforms.schema import TIME
from transforms.windows import local_date, local_midnight, local_midnights

WINDOW_SIZES = ("MINUTE", "HOUR", "DAY", "MONTH")
RESERVED_GROUPS = ("subject",)
# Events need these columns (the curated store has them).
EVENT_COLUMNS = ("id", "source", "subject", "time", "data")

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_RFC3339 = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[Tt ]((?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d)(\.\d+)?([Zz]|[+-](?:[01]\d|2[0-3]):[0-5]\d)$"
)


def parse_day(text: str) -> dt.date:
    """A date written YYYY-MM-DD, nothing else (ValueError): `date.fromisoformat` also reads 20240131 and
    2024-W05-3, which a typo can turn into another day."""
    if not _DATE.fullmatch(text):
        raise ValueError(f"{text!r} is not YYYY-MM-DD")
    return dt.date.fromisoformat(text)


class QueryError(ValueError):
    """A query the user can fix (bad bound, window, zone, group or filter); the message is one line."""


@dataclass(frozen=True)
class Query:
    """A validated query. `start` and `end` are aware UTC datetimes; `group_by` includes `subject` if filtered."""

    start: dt.datetime
    end: dt.datetime
    window: str | None = None
    tz: str = "UTC"
    subjects: tuple[str, ...] = ()
    group_by: tuple[str, ...] = ()
    filters: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def output_columns(self) -> list[str]:
        return ["window_start", "window_end", *self.group_by, "value"]


def check_zone(tz: str) -> str:
    if not is_iana_zone(tz):
        raise QueryError(f"invalid time zone: {tz!r} (use an IANA name such as UTC or Europe/Berlin)")
    return tz


def parse_bound(value: str | dt.date | dt.datetime, tz: str = "UTC", name: str = "from") -> dt.datetime:
    """An RFC 3339 time (with offset) or a plain date (local midnight in `tz`), as an aware UTC datetime.

    Precision is the microsecond: digits beyond it are dropped.
    """
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise QueryError(f"{name}: {value.isoformat()} has no time zone; give an aware datetime")
        return value.astimezone(dt.UTC)
    if isinstance(value, dt.date):
        return local_midnight(value, check_zone(tz))
    text = str(value).strip()
    if _DATE.fullmatch(text):
        try:
            return local_midnight(parse_day(text), check_zone(tz))
        except ValueError:
            raise QueryError(f"{name}: {text!r} is not a valid date (YYYY-MM-DD)") from None
    match = _RFC3339.fullmatch(text)
    if not match:
        raise QueryError(
            f"{name}: {text!r} is not RFC 3339 with an offset or a date; "
            "use e.g. 2024-01-31T00:00:00Z, 2024-01-31T01:00:00+01:00 or 2024-01-31"
        )
    day, clock, fraction, offset = match.groups()
    fraction = (fraction or "")[:7]  # '.' plus microseconds
    offset = "+00:00" if offset in ("Z", "z") else offset
    try:
        return dt.datetime.fromisoformat(f"{day}T{clock}{fraction}{offset}").astimezone(dt.UTC)
    except ValueError:
        raise QueryError(f"{name}: {text!r} is not a valid time") from None


def make_query(
    meter: Meter,
    start: str | dt.date | dt.datetime,
    end: str | dt.date | dt.datetime,
    *,
    window: str | None = None,
    tz: str = "UTC",
    subjects: list[str] | tuple[str, ...] | None = None,
    group_by: list[str] | tuple[str, ...] | None = None,
    filters: dict[str, str | list[str] | tuple[str, ...]] | None = None,
) -> Query:
    """Check every parameter against the meter; raise QueryError with one clear line on the first problem."""
    tz = check_zone(tz or "UTC")
    size = window.upper() if window else None
    if size is not None and size not in WINDOW_SIZES:
        raise QueryError(f"invalid window size: {window!r} (use one of {', '.join(WINDOW_SIZES)})")
    lo, hi = parse_bound(start, tz, "from"), parse_bound(end, tz, "to")
    if lo == hi:
        raise QueryError(f"from and to cannot be equal ({lo.isoformat()})")
    if lo > hi:
        raise QueryError(f"from must be before to (from {lo.isoformat()}, to {hi.isoformat()})")
    allowed = (*RESERVED_GROUPS, *meter.group_paths)
    keys: list[str] = []
    for key in group_by or ():
        if key not in allowed:
            raise QueryError(f"invalid group by: {key!r}; meter {meter.slug} can be grouped by {', '.join(allowed)}")
        if key not in keys:
            keys.append(key)
    subj = tuple(dict.fromkeys(s for s in subjects or ()))
    if any(not s for s in subj):
        raise QueryError("subject filter: a subject cannot be empty")
    if subj and "subject" not in keys:  # OpenMeter: filtering subjects groups by subject
        keys.insert(0, "subject")
    if "subject" in keys:  # subject first, then the meter's keys in the order asked
        keys.remove("subject")
        keys.insert(0, "subject")
    clean: dict[str, tuple[str, ...]] = {}
    for key, values in (filters or {}).items():
        if key == "subject":
            raise QueryError("invalid group by filter: 'subject'; filter subjects with --subject / subjects=")
        if key not in meter.group_paths:
            known = ", ".join(meter.group_paths) or "none"
            raise QueryError(f"invalid group by filter: {key!r}; meter {meter.slug} has groupBy keys: {known}")
        vals = (values,) if isinstance(values, str) else tuple(values)
        clean[key] = tuple(dict.fromkeys((*clean.get(key, ()), *vals)))
    return Query(lo, hi, size, tz, subj, tuple(keys), clean)


# --- windows ---------------------------------------------------------------------------------------
def _offset(time: pl.Expr, tz: str) -> pl.Expr:
    """The UTC offset in force at each instant (Polars' tz rules), as a Duration(us)."""
    local = time.dt.convert_time_zone(tz)
    return (local.dt.base_utc_offset() + local.dt.dst_offset()).cast(pl.Duration("us"))


def _offset_change(lo: pl.Series, hi: pl.Series, tz: str) -> pl.Series:
    """Where the offset at `lo` differs from the one at `hi` (UTC, lo < hi, one change between them): the first
    microsecond in (lo, hi] that has the offset of `hi`, by bisection (about 32 rounds for an hour)."""
    us = pl.Datetime("us", "UTC")
    f = pl.DataFrame({"lo": lo.cast(us).dt.epoch("us"), "hi": hi.cast(us).dt.epoch("us")})
    f = f.with_columns(target=_offset(pl.from_epoch("hi", "us").dt.replace_time_zone("UTC"), tz))
    while (f["hi"] - f["lo"]).max() > 1:  # type: ignore[operator]
        mid = pl.col("lo") + (pl.col("hi") - pl.col("lo")) // 2
        same = _offset(pl.from_epoch(mid, "us").dt.replace_time_zone("UTC"), tz) == pl.col("target")
        f = f.with_columns(
            hi=pl.when(same).then(mid).otherwise(pl.col("hi")), lo=pl.when(same).then(pl.col("lo")).otherwise(mid)
        )
    return pl.from_epoch(f["hi"], "us").dt.replace_time_zone("UTC")


def _wall_clock_windows(events: pl.DataFrame, tz: str, every: str) -> pl.DataFrame:
    """MINUTE/HOUR: the local wall-clock minute or hour, with the event's own UTC offset (the repeated hour of a
    fall-back gives two windows), cut where the offset changes inside it, so that the windows partition time.

    A whole-hour DST change falls on an hour boundary and cuts nothing. A half-hour one (Australia/Lord_Howe) would
    otherwise give overlapping windows: 02:30 +11:00 truncates to 02:00 +11:00 (15:00Z), inside the hour
    [01:00, 02:00) +10:30 that ends at the change (15:30Z); cut, its window is [15:30Z, 16:00Z)."""
    us = pl.Datetime("us", "UTC")
    time = pl.col("time").cast(us)
    offset = _offset(time, tz)
    wall = time.dt.replace_time_zone(None) + offset
    start = (wall.dt.truncate(every) - offset).dt.replace_time_zone("UTC")
    out = events.with_columns(_t=time, _off=offset, window_start=start).with_columns(
        window_end=pl.col("window_start").dt.offset_by(every)
    )
    if _one_offset(out["_t"], tz):  # UTC, or no change in the range: the checks below cost ~30% per event
        return out.drop("_t", "_off")
    out = out.with_columns(_last=pl.col("window_end") - pl.duration(microseconds=1)).with_columns(
        _cut_start=_offset(pl.col("window_start"), tz) != pl.col("_off"),
        _cut_end=_offset(pl.col("_last"), tz) != pl.col("_off"),
    )
    for cut, lo, hi, column in (
        ("_cut_start", "window_start", "_t", "window_start"),  # the offset changed after the start: start there
        ("_cut_end", "_t", "_last", "window_end"),  # the offset changes before the end: end there
    ):
        at = out.select(pl.arg_where(pl.col(cut))).to_series()
        if at.len():
            rows = out[at]
            out = out.with_columns(out[column].clone().scatter(at, _offset_change(rows[lo], rows[hi], tz)))
    return out.drop("_t", "_off", "_last", "_cut_start", "_cut_end")


def _one_offset(times: pl.Series, tz: str) -> bool:
    """Whether the zone keeps one UTC offset from an hour before the first event to an hour after the last: then no
    window holds a change. Sampled every 30 minutes and at its end (no zone changes its offset twice within that);
    a range of more than ten years is not sampled (False: the full check)."""
    if times.is_empty() or tz == "UTC":
        return True
    first, last = times.min(), times.max()
    if last - first > dt.timedelta(days=3653):  # type: ignore[operator]
        return False
    hour = dt.timedelta(hours=1)
    grid = pl.datetime_range(first - hour, last + hour, "30m", eager=True, time_zone="UTC")  # type: ignore[operator]
    # and the range's end itself: the grid's last step stops up to 30 min short of it, when a change can still fall
    # inside the last event's window
    grid = grid.append(pl.Series([last + hour], dtype=grid.dtype))  # type: ignore[operator]
    return grid.to_frame("t").select(_offset(pl.col("t"), tz).n_unique()).item() == 1


def _calendar_table(days: list[dt.date], size: str, tz: str) -> pl.DataFrame:
    """Local date → [local midnight of its day or month, the next one), as UTC instants."""
    bounds = {}
    for day in sorted(set(days)):
        if size == "DAY":
            bounds[day] = day, day + dt.timedelta(days=1)
        else:
            first = day.replace(day=1)
            bounds[day] = first, (first + dt.timedelta(days=32)).replace(day=1)
    midnight = local_midnights([d for pair in bounds.values() for d in pair], tz)  # one Polars call for all
    rows = [
        {"_local": day, "window_start": midnight[first], "window_end": midnight[after]}
        for day, (first, after) in bounds.items()
    ]
    schema = {"_local": pl.Date, "window_start": pl.Datetime("us", "UTC"), "window_end": pl.Datetime("us", "UTC")}
    return pl.DataFrame(rows, schema=schema)


def with_windows(events: pl.DataFrame, q: Query) -> pl.DataFrame:
    """Add window_start/window_end (UTC) to events already limited to [start, end)."""
    time = pl.col("time")
    if q.window is None:
        return events.with_columns(
            window_start=pl.lit(q.start, pl.Datetime("us", "UTC")), window_end=pl.lit(q.end, pl.Datetime("us", "UTC"))
        )
    if q.window in ("MINUTE", "HOUR"):
        return _wall_clock_windows(events, q.tz, "1m" if q.window == "MINUTE" else "1h")
    local = events.with_columns(_local=local_date(time, q.tz))
    table = _calendar_table(local["_local"].unique().to_list(), q.window, q.tz)
    return local.join(table, on="_local", how="left").drop("_local")


# --- the query -------------------------------------------------------------------------------------
def in_range(q: Query) -> pl.Expr:
    """The filter of events inside [start, end) (compare at the event's full precision)."""
    return (pl.col("time") >= pl.lit(q.start).cast(TIME)) & (pl.col("time") < pl.lit(q.end).cast(TIME))


def run_query(events: pl.DataFrame | pl.LazyFrame, meter: Meter, q: Query) -> pl.DataFrame:
    """Evaluate `q` over events of the meter's type (columns id, source, subject, time, data).

    Returns window_start, window_end (Datetime(us) in the query zone), the group keys asked for, and value
    (Float64), sorted by window, then groups.
    """
    lazy = events.lazy().filter(in_range(q))
    if "type" in events.collect_schema().names():
        lazy = lazy.filter(pl.col("type") == meter.event_type)
    if q.subjects:
        lazy = lazy.filter(pl.col("subject").is_in(list(q.subjects)))
    counted = extract(lazy, meter).filter(pl.col("excluded").is_null())
    for key, values in q.filters.items():
        counted = counted.filter(pl.col(key).is_in(list(values)))
    keys = list(q.group_by)
    slim = counted.select("id", "source", "time", "value", *keys).collect()
    windowed = with_windows(slim, q)
    out = (
        windowed.group_by(["window_start", "window_end", *keys])
        .agg(value=value_expr(meter.aggregation))
        .with_columns(pl.col("value").cast(pl.Float64))
        .filter(pl.col("value").is_not_null())
    )
    if out.is_empty() and q.window is None and not keys and meter.aggregation in ("COUNT", "UNIQUE_COUNT"):
        out = pl.DataFrame(
            {"window_start": [q.start], "window_end": [q.end], "value": [0.0]},
            schema={
                "window_start": pl.Datetime("us", "UTC"),
                "window_end": pl.Datetime("us", "UTC"),
                "value": pl.Float64,
            },
        )
    zone = pl.Datetime("us", q.tz)
    return (
        out.with_columns(
            pl.col("window_start").cast(pl.Datetime("us", "UTC")).dt.convert_time_zone(q.tz).cast(zone),
            pl.col("window_end").cast(pl.Datetime("us", "UTC")).dt.convert_time_zone(q.tz).cast(zone),
            *(pl.col(k).cast(pl.String) for k in keys),
        )
        .select(q.output_columns())
        .sort(["window_start", *keys], nulls_last=True)
    )


def utc_dates(q: Query) -> list[str]:
    """The UTC dates (event partitions) that overlap [start, end)."""
    day, last = q.start.date(), (q.end - dt.timedelta(microseconds=1)).date()
    out = []
    while day <= last:
        out.append(day.isoformat())
        day += dt.timedelta(days=1)
    return out


def to_openmeter(df: pl.DataFrame, q: Query) -> dict:
    """The v1 response body: {from, to, windowSize, windowTimeZone, data: [{value, windowStart, windowEnd,
    subject, groupBy}]}, times in RFC 3339 in the query zone.

    A value beyond Float64 (a SUM past 1.8e308 is infinite, one of +inf and -inf NaN) is null: JSON has no
    number for it (Python would write `Infinity`, which JSON readers refuse; Go's encoder fails)."""
    zone = zoneinfo.ZoneInfo(q.tz)
    meter_keys = [k for k in q.group_by if k != "subject"]

    def rfc(value: dt.datetime) -> str:
        return rfc3339(value.astimezone(zone))

    data = []
    for row in df.iter_rows(named=True):
        data.append(
            {
                "value": row["value"] if row["value"] is None or math.isfinite(row["value"]) else None,
                "windowStart": rfc(row["window_start"]),
                "windowEnd": rfc(row["window_end"]),
                "subject": row.get("subject") if "subject" in q.group_by else None,
                "groupBy": {k: row[k] for k in meter_keys},
            }
        )
    body: dict = {"from": rfc(q.start), "to": rfc(q.end)}
    if q.window:
        body["windowSize"] = q.window
    body["windowTimeZone"] = q.tz
    body["data"] = data
    return body


def rfc3339(value: dt.datetime) -> str:
    text = value.isoformat(timespec="microseconds" if value.microsecond else "seconds")
    return text[:-6] + "Z" if text.endswith("+00:00") else text
