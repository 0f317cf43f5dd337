"""Rebuilding tables from `events/`: hourly partitions and day partials per slice of days, then periods.

The work splits into independent slices of UTC days (each reads its days' events once, for every
touched meter, and owns the files of those days) followed by one cheap step that combines the stored
day partials into billing periods. Slices are what a task runner fans out: they exchange storage
paths, day lists and row counts, never frames.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

import polars as pl
import pyarrow as pa

from flows.storage import FileInfo, Storage, arrow_for_readers
from meters import Billing, Meter
from transforms.aggregate import PARTIAL, pack_partials, unpack_partials
from transforms.extract import extract, extract_paths
from transforms.schema import EVENT, QUARANTINE, conform
from transforms.tables import (
    collect_tables,
    exclusions,
    hourly_table,
    key_runs,
    period_from_partials,
    period_partials,
    with_windows,
)
from transforms.windows import local_midnight, period_dates
from transforms.windows import period_table as periods_for_dates

EVENTS = "events"
PARTIALS = "_state/partials"
SLICE_BYTES = 32 * 2**20  # event files read at once when recomputing: ~1M events (see docs/scaling.md)
DAY_COLUMNS = ["id", "source", "type", "subject", "time", "data", "file", "line", "batch", "date"]


# --- paths -----------------------------------------------------------------------------------------
def hourly_file(slug: str, date: str) -> str:
    return f"usage/{slug}/hourly/date={date}/data.parquet"


def period_file(slug: str, period_start: str) -> str:
    return f"usage/{slug}/period/period_start={period_start}/data.parquet"


def partials_file(date: str) -> str:
    """Partial period states of every meter from the events of one UTC date (column `meter` says whose)."""
    return f"{PARTIALS}/date={date}/data.parquet"


def meter_quarantine_file(date: str) -> str:
    """Values the meters excluded on one UTC date (column `meter` says which meter)."""
    return f"quarantine/meter/date={date}/data.parquet"


def event_file_infos_by_date(storage: Storage) -> dict[str, list[FileInfo]]:
    out: dict[str, list[FileInfo]] = {}
    for f in storage.list_files(EVENTS, (".parquet",)):
        part = f.path.split("/")[1]
        if part.startswith("date="):
            out.setdefault(part[5:], []).append(f)
    return out


# --- planning --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What a recompute reads and rebuilds; small enough to pass to tasks."""

    slices: list[tuple[list[str], list[str], list[str]]]  # (days read, touched days among them, event files)
    period_starts: list[str]
    touched_days: list[str]


def plan(storage: Storage, meters: list[Meter], billing: Billing, dates: list[str], local_dates: list[str]) -> Plan:
    """Touched UTC days, plus days of the affected periods whose stored partials are missing or stale.

    A touched day with no events and no published partition has nothing to compute or delete, so it is left
    out: a backfill over decades writes files only for the days that have events.
    """
    files = event_file_infos_by_date(storage)
    without_events = set(dates) - set(files)  # none in an hourly run: its new events were just stored
    if without_events:
        without_events &= {day for day, _ in partition_days(storage, meters)}  # those have files to delete
    touched_days = sorted((set(dates) & set(files)) | without_events)
    period_starts = sorted(set(period_bounds(billing, local_dates)["period_start"].to_list()))
    stale = _days_without_current_partials(storage, meters, billing, period_starts, set(files))
    read_days = sorted(set(touched_days) | stale)
    touched = set(touched_days)
    slices = [
        (days, [d for d in days if d in touched], paths)
        for days, paths in _slices([(d, files.get(d, [])) for d in read_days], SLICE_BYTES)
    ]
    return Plan(slices=slices, period_starts=period_starts, touched_days=touched_days)


def stored_days(storage: Storage, meters: list[Meter]) -> set[str]:
    """The UTC dates where a recompute of these meters has anything to read, rewrite or delete: stored events,
    and these meters' hourly partitions, excluded values and day partials (any meter's: the files are shared)."""
    return set(event_file_infos_by_date(storage)) | {day for day, _ in partition_days(storage, meters)}


def range_scope(
    storage: Storage, meters: list[Meter], billing: Billing, start: dt.date, end: dt.date
) -> tuple[list[str], list[str]]:
    """What a backfill of the UTC dates [start, end) rebuilds: (UTC dates, first days of billing periods).

    Of the range's dates, those in `stored_days`; of the billing periods overlapping its local dates (a day wider
    either side, so that every period overlapping the UTC range in any zone is rebuilt), those whose window
    overlaps a stored day or that have a published partition. Rebuilding any other date or period would write and
    delete nothing, so they are left out: a backfill from 1678 to 2262 costs what the root holds, not 213,000
    days and 7,000 months.
    """
    days = stored_days(storage, meters)
    dates = sorted(d for d in days if start.isoformat() <= d < end.isoformat())
    periods = {period for day in days for period in _periods_over(billing, day)}
    for meter in meters:  # and the published periods, whatever their days hold now
        for key in published_period_keys(storage, meter.slug):
            periods.add(period_dates(key, billing.period, billing.anchor_day))
    lowest, highest = start - dt.timedelta(days=1), end  # the range's local dates, a day wider either side
    return dates, sorted(first.isoformat() for first, after in periods if first <= highest and after > lowest)


def published_period_keys(storage: Storage, slug: str) -> list[dt.date]:
    """The `period_start` keys of the meter's published period partitions (folders holding their data file)."""
    keys = []
    for f in storage.list_files(f"usage/{slug}/period", (".parquet",)):
        with contextlib.suppress(ValueError):  # not a partition name of ours
            key = dt.date.fromisoformat(f.path.split("/")[-2].removeprefix("period_start="))
            if f.path == period_file(slug, key.isoformat()):
                keys.append(key)
    return keys


def _periods_over(billing: Billing, day: str) -> set[tuple[dt.date, dt.date]]:
    """The billing periods (first local date, first after) whose window overlaps the UTC date `day`."""
    midnight = dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC)
    out = set()
    for near in _days_around(day):  # the local dates a UTC date overlaps, in any zone
        first, after = period_dates(dt.date.fromisoformat(near), billing.period, billing.anchor_day)
        window = local_midnight(first, billing.timezone), local_midnight(after, billing.timezone)
        if window[0] < midnight + dt.timedelta(days=1) and window[1] > midnight:
            out.add((first, after))
    return out


def _slices(days: list[tuple[str, list[FileInfo]]], max_bytes: int) -> list[tuple[list[str], list[str]]]:
    """Consecutive days grouped into slices of at most `max_bytes` of event files (a day is never split)."""
    out: list[tuple[list[str], list[str]]] = []
    size = 0
    for day, infos in days:
        day_bytes = sum(f.size for f in infos)
        if not out or (out[-1][0] and size + day_bytes > max_bytes):
            out.append(([], []))
            size = 0
        out[-1][0].append(day)
        out[-1][1].extend(f.path for f in infos)
        size += day_bytes
    return out


def period_bounds(billing: Billing, local_dates: list[str]) -> pl.DataFrame:
    """The billing periods holding the given local dates, with every local date of each period."""
    starts = sorted(
        {period_dates(dt.date.fromisoformat(d), billing.period, billing.anchor_day)[0] for d in local_dates}
    )
    days: list[dt.date] = []
    for first in starts:
        after = period_dates(first, billing.period, billing.anchor_day)[1]
        days.extend(first + dt.timedelta(days=i) for i in range((after - first).days))
    return periods_for_dates(days, billing.period, billing.timezone, billing.anchor_day)


def utc_dates(start: dt.datetime, end: dt.datetime) -> list[str]:
    day, last = start.date(), (end - dt.timedelta(microseconds=1)).date()
    out = []
    while day <= last:
        out.append(day.isoformat())
        day += dt.timedelta(days=1)
    return out


def _period_days(billing: Billing, period_starts: list[str]) -> set[str]:
    bounds = period_bounds(billing, period_starts).filter(pl.col("period_start").is_in(period_starts))
    out: set[str] = set()
    for row in bounds.select("window_start", "window_end").unique().iter_rows():
        out |= set(utc_dates(*row))
    return out


def _days_without_current_partials(
    storage: Storage, meters: list[Meter], billing: Billing, period_starts: list[str], with_events: set[str]
) -> set[str]:
    days = _period_days(billing, period_starts) & with_events
    if not days:
        return set()
    files = _stored_partial_files(storage, days)
    if not files:
        return days
    sentinel_rows = storage.scan_parquet(files).filter(pl.col("window_start").is_null())  # skipped by statistics
    current = storage.collect(sentinel_rows.select("date", "meter", "fingerprint").unique(), engine="streaming")
    have = set(current.iter_rows())
    return {d for d in days if any((d, m.slug, m.fingerprint()) not in have for m in meters)}


def _stored_partial_files(storage: Storage, days: set[str]) -> list[str]:
    """The partial files of these days that exist (state files: only our locked runs rewrite them)."""
    have = {f.path for f in storage.list_files(PARTIALS, (".parquet",))}
    return [p for p in (partials_file(d) for d in sorted(days)) if p in have]


def _days_around(day: str) -> list[str]:
    d = dt.date.fromisoformat(day)
    return [(d + dt.timedelta(days=i)).isoformat() for i in (-1, 0, 1)]


# --- one slice of days -----------------------------------------------------------------------------
def recompute_days(
    storage: Storage, meters: list[Meter], billing: Billing, days: list[str], touched: list[str], files: list[str]
) -> dict[str, dict[str, int]]:
    """Hourly partitions and excluded values of the `touched` days, and day partials of all `days`.

    One scan of the days' event files serves every meter; extraction runs once per event type and the
    per-meter aggregations run together. Everything is published before returning, so the caller's
    memory is one slice. The partial and exclusion files of a day hold every meter: rows of meters not
    recomputed here are kept as they are.
    """
    types = sorted({m.event_type for m in meters})
    in_touched = pl.col("date").is_in(touched)
    windows = period_bounds(billing, sorted({d for day in days for d in _days_around(day)}))
    events = _read_events(storage, files, types)
    by_type = events.partition_by("type", as_dict=True, include_key=False) if events.height else {}
    del events
    present = [t for t in types if (t,) in by_type]
    paths = dict(zip(present, _extract_all(by_type, present, meters, billing, windows), strict=True))
    del by_type
    counting = [m for m in meters if m.event_type in paths]
    extracted = dict(
        zip(
            [m.slug for m in counting],
            pl.collect_all([extract(paths[m.event_type].lazy(), m) for m in counting]),
            strict=True,
        )
    )
    del paths
    queries: list[pl.LazyFrame] = []
    for meter in counting:
        ext = extracted[meter.slug].lazy()
        queries.append(hourly_table(ext.filter(in_touched), meter))
        queries.append(exclusions(ext.filter(in_touched), meter))
        queries.append(period_partials(ext, meter, billing, windows, ("date",)))
    results = collect_tables(queries)
    del extracted
    existing = _existing_partitions(storage, meters, days)
    counts = {m.slug: {"hourly_rows": 0, "excluded": 0} for m in meters}
    hourly = dict(zip([m.slug for m in counting], results[0::3], strict=True))
    for meter in meters:
        table = hourly.get(meter.slug, pl.DataFrame())
        written = publish(storage, table, "date", touched, lambda d, s=meter.slug: hourly_file(s, d), existing)
        counts[meter.slug]["hourly_rows"] = written
    excluded = results[1::3]
    for meter, frame in zip(counting, excluded, strict=True):
        counts[meter.slug]["excluded"] = frame.height
    slugs = [m.slug for m in meters]
    kept = _kept_rows(storage, [meter_quarantine_file(d) for d in touched], existing, slugs, QUARANTINE)
    rows = _concat([kept, *excluded])
    publish(storage, rows, "date", touched, meter_quarantine_file, existing, sort=["file", "line", "meter"])
    packed = [pack_partials(df, m) for m, df in zip(counting, results[2::3], strict=True)]
    kept = _kept_rows(storage, [partials_file(d) for d in days], existing, slugs, PARTIAL)
    marks = pl.col("window_start").is_null()
    # Each piece is in date order. Within a day's file: the sentinels first, then every meter's rows together,
    # so row-group statistics let a reader of one meter (or of the sentinels) skip the rest.
    with_events = sorted({path.split("/")[1].removeprefix("date=") for path in files})  # no events: no state
    states = [kept.filter(marks), *[sentinels(m, with_events) for m in meters], kept.filter(~marks), *packed]
    publish(storage, states, "date", days, partials_file, existing, state=True)
    return counts


def _extract_all(
    by_type: dict, types: list[str], meters: list[Meter], billing: Billing, windows: pl.DataFrame
) -> list[pl.DataFrame]:
    """Path columns and windows of every type's events, collected together (the streaming engine spreads
    the row-wise JSON work over every core). Paths are decoded in one parse per event where they can be
    (`extract_paths`); an object or array where text belongs makes the decoder fail, and then every path
    is matched."""

    def queries(decode: bool) -> list[pl.LazyFrame]:
        return [
            with_windows(extract_paths(by_type[(t,)].lazy(), _of(meters, t), decode), billing, windows) for t in types
        ]

    try:
        return pl.collect_all(queries(decode=True), engine="streaming")
    except pl.exceptions.ComputeError:
        return pl.collect_all(queries(decode=False), engine="streaming")


def _of(meters: list[Meter], event_type: str) -> list[Meter]:
    return [m for m in meters if m.event_type == event_type]


# The order rows are aggregated in decides the last bits of a float sum. Event files sort by run id, which
# is not always ingest order (two runs in one second; a run for an earlier scheduled time), and one run
# stores in one file what two runs store in two. So a slice's rows are put in an order that depends only on
# the stored events: by date, landed file and batch; a batch's rows on a date are in one file, in line order,
# which the stable sort keeps.
CANONICAL_ORDER = ["date", "file", "batch"]


def _read_events(storage: Storage, files: list[str], types: list[str]) -> pl.DataFrame:
    if not files:
        return pl.DataFrame(schema={c: EVENT[c] for c in DAY_COLUMNS})
    scan = storage.scan_parquet(files).filter(pl.col("type").is_in(types)).select(DAY_COLUMNS)
    return storage.collect(scan.sort(CANONICAL_ORDER, maintain_order=True))


def _kept_rows(
    storage: Storage, paths: list[str], existing: set[str], slugs: list[str], schema: dict[str, pl.DataType]
) -> pl.DataFrame:
    """Rows of other meters in the shared per-day files about to be replaced."""
    found = [p for p in paths if p in existing]
    if not found:
        return pl.DataFrame(schema=schema)
    return conform(storage.read_parquet(found).filter(~pl.col("meter").is_in(slugs)), schema)


def sentinels(meter: Meter, days: list[str]) -> pl.DataFrame:
    """One empty state per day: says the day was computed with this definition, even with no rows."""
    rows = pl.DataFrame({"date": days, "_n": [0] * len(days)}, schema={"date": pl.String, "_n": pl.Int64})
    return conform(rows.with_columns(meter=pl.lit(meter.slug), fingerprint=pl.lit(meter.fingerprint())), PARTIAL)


def _existing_partitions(storage: Storage, meters: list[Meter], days: list[str]) -> set[str]:
    """Partition files of these days that exist now: what an empty result must delete, what to merge."""
    wanted = set(days)
    return {path for day, path in partition_days(storage, meters) if day in wanted}


def partition_days(storage: Storage, meters: list[Meter]) -> list[tuple[str, str]]:
    """(UTC date, path) of every day-partitioned file the meters' recompute writes."""
    found = []
    for prefix in [*(f"usage/{m.slug}/hourly" for m in meters), "quarantine/meter", PARTIALS]:
        for f in storage.list_files(prefix, (".parquet",)):
            part = f.path.split("/")[-2]
            if part.startswith("date="):
                found.append((part[5:], f.path))
    return found


# --- billing periods -------------------------------------------------------------------------------
PERIOD_READ_BYTES = 64 * 2**20  # partial files of one period read at once; above this, one meter at a time


def recompute_periods(
    storage: Storage, meters: list[Meter], billing: Billing, period_starts: list[str]
) -> dict[str, dict]:
    """Each meter's billing periods from the stored day partials of their days.

    Returns per meter the period rows written and the latest period that has rows (None if none does).

    One period at a time; when its partial files exceed `PERIOD_READ_BYTES`, one meter at a time (the files
    keep each meter's rows together, so statistics skip the others): memory is bounded by one meter's
    partial states for one period, however long the history or large the batch.
    """
    sizes = {f.path: f.size for f in storage.list_files(PARTIALS, (".parquet",))}
    existing = {f.path for m in meters for f in storage.list_files(f"usage/{m.slug}/period", (".parquet",))}
    bounds = period_bounds(billing, period_starts)
    rows: dict[str, dict] = {m.slug: {"rows": 0, "latest": None} for m in meters}
    for start in period_starts:
        files = [p for p in (partials_file(d) for d in sorted(_period_days(billing, [start]))) if p in sizes]
        windows = bounds.filter(pl.col("period_start") == start).select("window_start").unique()
        together = sum(sizes[f] for f in files) <= PERIOD_READ_BYTES
        for group in [meters] if together else [[m] for m in meters]:
            stored = _stored_partials(storage, files, group, windows)
            queries = [period_from_partials(unpack_partials(stored.lazy(), m), m, billing) for m in group]
            tables = collect_tables(queries) if stored.height else [pl.DataFrame() for _ in group]
            del stored
            for meter, table in zip(group, tables, strict=True):
                written = publish(storage, table, "period_start", [start], _period_path(meter.slug), existing)
                rows[meter.slug]["rows"] += written
                if written:  # period_starts are in order
                    rows[meter.slug]["latest"] = start
    return rows


def _period_path(slug: str) -> Callable[[str], str]:
    return lambda start: period_file(slug, start)


def _stored_partials(storage: Storage, files: list[str], meters: list[Meter], windows: pl.DataFrame) -> pl.DataFrame:
    """The stored partial states of these meters' current definitions for the given period windows."""
    if not files:
        return pl.DataFrame(schema=PARTIAL)
    slugs = [m.slug for m in meters]
    # A filter, not a semi join: a join does not promise to keep the files' row order, and the sums that
    # combine these rows depend on their order to the last bit (see `collect_tables`).
    wanted = pl.col("window_start").is_in(windows["window_start"].implode())
    return storage.collect(storage.scan_parquet(files).filter(pl.col("meter").is_in(slugs) & wanted))


def orphan_periods(
    storage: Storage,
    meters: list[Meter],
    billing: Billing,
    start: dt.datetime,
    end: dt.datetime,
    local_dates: list[str],
) -> list[str]:
    """Period partitions left by an earlier billing block (another anchor, zone or period length) whose windows
    overlap [start, end): a backfill of that range rebuilds its periods under the current block, so these would
    count the same events twice.

    A partition is current when its window is exactly the current block's period for its key; a key can be a
    period start under both blocks (a month's first day is also a DAY period's) with another window, so the key
    alone proves nothing. Periods are at most a month long, so only keys from 32 days before the range are read,
    and not those of the periods just rebuilt from `local_dates` (the recompute's plan): they are current.
    """
    rebuilt = set(period_bounds(billing, local_dates)["period_start"].to_list())
    first_key = (start - dt.timedelta(days=33)).date()
    out = []
    for meter in meters:
        for day in published_period_keys(storage, meter.slug):
            if day < first_key or day > end.date() + dt.timedelta(days=1) or day.isoformat() in rebuilt:
                continue
            path = period_file(meter.slug, day.isoformat())
            bounds = storage.read_parquet([path]).select(pl.col("window_start").min(), pl.col("window_end").max())
            window = bounds.row(0)
            first, after = period_dates(day, billing.period, billing.anchor_day)
            if window == (local_midnight(first, billing.timezone), local_midnight(after, billing.timezone)):
                continue  # the current block's period, outside what was rebuilt
            if window[0] is None or (window[0] < end and window[1] > start):
                out.append(path)
    return out


# --- publishing ------------------------------------------------------------------------------------
def _concat(frames: list[pl.DataFrame]) -> pl.DataFrame:
    frames = [f for f in frames if f.height]
    return pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame()


def publish(
    storage: Storage,
    table: pl.DataFrame | list[pl.DataFrame],
    key: str,
    values: list[str],
    path: Callable[[str], str],
    existing: set[str],
    sort: list[str] | None = None,
    state: bool = False,
) -> int:
    """Replace each partition `key=value` with its rows; partitions left empty are deleted.

    Rows keep their order (group-bys keep input order, so the same events give the same files) unless
    `sort` names columns. A list of frames (same columns) is published as their concatenation, without
    copying them into one frame first: a partition's file is the slices of each frame holding its key.
    `state` files are only read by meterlake (see `Storage.write_parquet`).
    """
    pieces: dict[str, list] = {}
    for frame in table if isinstance(table, list) else [table]:
        if frame.is_empty():
            continue
        if sort:
            frame = frame.sort([key, *sort], nulls_last=True, maintain_order=True)
        runs = key_runs(frame, key)
        if len({value for value, _, _ in runs}) < len(runs):  # a partition in pieces: bring its rows together
            frame = frame.sort(key, maintain_order=True)
            runs = key_runs(frame, key)
        whole = frame if state else arrow_for_readers(frame)  # converted once; partitions are zero-copy slices
        for value, at, length in runs:
            pieces.setdefault(value, []).append(whole.slice(at, length))
    stray = sorted(set(pieces) - set(values))
    if stray:
        raise ValueError(f"rows outside the partitions being replaced: {stray[:3]}")
    writes = [(path(v), _joined(pieces[v])) for v in values if v in pieces]
    deletes = [path(v) for v in values if v not in pieces and path(v) in existing]
    storage.write_parquet_many(writes, state=state)
    storage.delete(deletes)
    return sum(len(part) for _, part in writes)


def _joined(parts: list) -> pl.DataFrame | pa.Table:
    if len(parts) == 1:
        return parts[0]
    return pl.concat(parts, how="vertical_relaxed") if isinstance(parts[0], pl.DataFrame) else pa.concat_tables(parts)
