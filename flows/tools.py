"""The operator's Python API: query, quarantine, status, preview and the report's top table.

Plain functions over a storage root (a folder or `s3://bucket/prefix`, or a `Storage`) that return Polars
frames. Nothing here starts Prefect, and nothing here writes to storage. Every user mistake raises
`ToolError` (or its subclass `transforms.query.QueryError`) with a one-line message.

    >>> from flows import tools
    >>> tools.query("data", "data/meters.yaml", "tokens_total", "2024-01-01", "2024-02-01", window="DAY")
"""

from __future__ import annotations

import datetime as dt
import os
import re
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from flows import pipeline, state
from flows.storage import LISTED_SCAN_ATTEMPTS, Storage, StorageError
from meters import Meter, MeterSet, load_meters_file
from transforms.dedupe import dedupe
from transforms.extract import extract
from transforms.parse import BATCH_SUFFIXES, parse_batch, with_raw_text
from transforms.query import EVENT_COLUMNS, Query, QueryError, in_range, make_query, parse_day, run_query, utc_dates
from transforms.schema import EVENT, QUARANTINE, conform, empty
from transforms.tables import collect_tables, exclusions, period_table
from transforms.validate import END_EVENT_DAY, FIRST_EVENT_DAY, MAX_YEAR, MIN_YEAR, REASONS, validate
from transforms.windows import local_date
from transforms.windows import period_table as periods_for_dates

__all__ = [
    "Preview",
    "QueryError",
    "ToolError",
    "lock_holder",
    "newest_event_time",
    "preview",
    "quarantine",
    "quarantine_counts",
    "query",
    "runs",
    "status",
    "top_table",
    "waiting_batches",
]

QUARANTINE_PREFIX = "quarantine"
REASON_CODES = (
    "malformed_json",
    *REASONS,
    "unreadable_file",
    "duplicate",
    "missing_value",
    "bad_value",
)
STAGES = ("file", "envelope", "dedupe", "meter")
QUARANTINE_COLUMNS = ["date", "stage", "reason", "meter", "file", "line", "event_id", "message", "raw"]


class ToolError(ValueError):
    """A mistake the caller can fix (unknown meter, period, reason, file); the message is one line."""


# --- helpers -----------------------------------------------------------------------------------------
def open_storage(root: str | Storage, check: bool = False) -> Storage:
    """A `Storage` as given, or the root named, checked: a mistyped root raises `StorageError` (as the command
    line exits 3) instead of reading as an empty root whose COUNT is 0. `check`: a `Storage` given is checked too."""
    storage = root if isinstance(root, Storage) else Storage(str(root))
    if check or not isinstance(root, Storage):
        storage.check_root()
    return storage


def load(meters: str | os.PathLike | MeterSet) -> MeterSet:
    return meters if isinstance(meters, MeterSet) else load_meters_file(meters)


def meter_of(meterset: MeterSet, slug: str) -> Meter:
    try:
        return meterset.get(slug)
    except KeyError as exc:
        raise ToolError(str(exc.args[0])) from None


# Event times are Datetime(ns): whole years 1678-2261 (transforms.validate). Dates and times given to any
# command must lie there too; a range's end may be the first instant after them.
EVENT_YEARS = f"{MIN_YEAR}-{MAX_YEAR}"
FIRST_TIME, END_TIME = (dt.datetime.combine(d, dt.time()) for d in (FIRST_EVENT_DAY, END_EVENT_DAY))


def check_event_years(name: str, value: dt.date | dt.datetime, *, end: bool = False) -> None:
    """ToolError unless `value` (its own wall clock for a time) lies in the years event times can hold."""
    if isinstance(value, dt.datetime):
        wall = value.replace(tzinfo=None)
    else:
        wall = dt.datetime(value.year, value.month, value.day)
    if wall < FIRST_TIME or wall > END_TIME or (wall == END_TIME and not end):
        raise ToolError(f"{name}: {value.isoformat()} is outside the years event times can hold ({EVENT_YEARS})")


def _date(value: str | dt.date | None, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, dt.date):
        day = value
    else:
        try:
            day = parse_day(str(value))
        except ValueError:
            raise ToolError(f"{name}: {value!r} is not a date; use YYYY-MM-DD, e.g. 2024-01-31") from None
    check_event_years(name, day)
    return day.isoformat()


# --- query -------------------------------------------------------------------------------------------
def plan_query(
    meters: str | os.PathLike | MeterSet,
    slug: str,
    from_: str | dt.date | dt.datetime,
    to: str | dt.date | dt.datetime,
    *,
    window: str | None = None,
    tz: str = "UTC",
    subjects: list[str] | None = None,
    group_by: list[str] | None = None,
    filters: dict[str, str | list[str]] | None = None,
) -> tuple[Meter, Query]:
    """Validate a query without reading any data (raises ToolError / QueryError)."""
    meter = meter_of(load(meters), slug)
    try:
        q = make_query(meter, from_, to, window=window, tz=tz, subjects=subjects, group_by=group_by, filters=filters)
        zone = zoneinfo.ZoneInfo(q.tz)
        check_event_years("from", q.start.astimezone(zone))
        check_event_years("to", q.end.astimezone(zone), end=True)
    except OverflowError:  # a bound near year 1 or 9999, moved past Python's dates by the time zone
        raise ToolError(f"from/to: outside the years event times can hold ({EVENT_YEARS})") from None
    return meter, q


def read_events(storage: Storage, meter: Meter, q: Query) -> pl.LazyFrame | None:
    """The curated events of the meter's type inside [from, to): only the UTC-date partitions that overlap, and only
    the files that hold the store as its last commit left it (`_visible_event_files`); None when a re-ingest
    committed between the listing and the look at its record (list again)."""
    visible = _visible_event_files(storage)
    if visible is None:
        return None
    files = [p for d in utc_dates(q) for p in visible.get(d, [])]
    if not files:
        return empty(EVENT).lazy().select(EVENT_COLUMNS)
    return (
        storage.scan_parquet(files).filter(pl.col("type") == meter.event_type).filter(in_range(q)).select(EVENT_COLUMNS)
    )


def _visible_event_files(storage: Storage) -> dict[str, list[str]] | None:
    """`events/` files by UTC date, without those a re-ingest (`backfill --reingest`) is replacing: its new files until
    it commits, its old ones once it has (it deletes them after its commit, one by one; a re-ingest killed in between
    leaves both until the next run). Both hold the same events: a query reading both counted them twice.

    The records are read after the listing, and the scan comes after both: a re-ingest that finished meanwhile
    deleted its old files before its record, and the scan fails on them (FileNotFoundError: list again). None when
    a re-ingest committed after the listing, which may lack its new files."""
    by_date = pipeline.event_files_by_date(storage)
    listed = {p for paths in by_date.values() for p in paths}
    replacing = [p for p in state.read_pendings(storage) if p.deletes]
    if not replacing:  # a run's own uncommitted files hold only events the store did not have
        return by_date
    committed = state.committed_runs(storage)
    hidden: set[str] = set()
    for pending in replacing:
        if pending.run_id not in committed:
            hidden.update(pending.files)
            continue
        if not {f for f in pending.files if f.startswith(f"{pipeline.EVENTS}/")} <= listed:
            return None
        hidden.update(pending.deletes)
    return {d: [p for p in paths if p not in hidden] for d, paths in by_date.items()}


def run_planned(root: str | Storage, meter: Meter, q: Query) -> pl.DataFrame:
    storage = open_storage(root)
    for attempt in range(1, LISTED_SCAN_ATTEMPTS + 1):
        try:
            events = read_events(storage, meter, q)
            if events is None:
                continue
            with storage.reader_errors():  # run_query collects the scan of the events
                return run_query(events, meter, q)
        except FileNotFoundError:  # deleted since the listing (a re-ingest finishing, a run rolling back)
            if attempt == LISTED_SCAN_ATTEMPTS:
                raise
    raise StorageError(f"{storage.uri(pipeline.EVENTS)} kept changing while the query read it: run the query again")


def query(
    root: str | Storage,
    meters: str | os.PathLike | MeterSet,
    slug: str,
    from_: str | dt.date | dt.datetime,
    to: str | dt.date | dt.datetime,
    *,
    window: str | None = None,
    tz: str = "UTC",
    subjects: list[str] | None = None,
    group_by: list[str] | None = None,
    filters: dict[str, str | list[str]] | None = None,
) -> pl.DataFrame:
    """Query a meter over [from_, to) with OpenMeter's semantics, exactly, from the curated events.

    `from_`/`to`: RFC 3339 with an offset, a date (local midnight in `tz`), or an aware datetime.
    `window`: None (one row per group, labelled [from_, to)), MINUTE, HOUR, DAY or MONTH, aligned in `tz`.
    `subjects` filters subjects (and groups by subject); `group_by` takes `subject` and the meter's keys;
    `filters` maps a groupBy key to a value or a list of values.

    Returns window_start, window_end (in `tz`), the group keys asked for, value; only non-empty windows.

    >>> query("data", "data/meters.yaml", "tokens_total", "2024-01-01", "2024-01-02", window="HOUR",
    ...       group_by=["model"], filters={"type": "input"})
    """
    meter, q = plan_query(
        meters, slug, from_, to, window=window, tz=tz, subjects=subjects, group_by=group_by, filters=filters
    )
    return run_planned(root, meter, q)


# --- quarantine --------------------------------------------------------------------------------------
def _normal_date(expr: pl.Expr) -> pl.Expr:
    """Record files written before commit 9001289 carry the run day as YYYYMMDD; all others YYYY-MM-DD."""
    return (
        pl.when(expr.str.contains(r"^\d{8}$"))
        .then(expr.str.slice(0, 4) + "-" + expr.str.slice(4, 2) + "-" + expr.str.slice(6, 2))
        .otherwise(expr)
    )


def _collect_listed(storage: Storage, build: Callable[[], pl.LazyFrame]) -> pl.DataFrame:
    """Collect a scan of listed files, listing again if one vanished meanwhile: a run deletes quarantine files
    of batches and days that have nothing rejected any more (docs/storage.md: lazy scans)."""
    return storage.collect_listed(build)


def _quarantine_frame(
    storage: Storage, since: str | None, reason: str | None, meter: str | None, stage: str | None
) -> pl.LazyFrame:
    if reason is not None and reason not in REASON_CODES:
        raise ToolError(f"unknown reason {reason!r} (known: {', '.join(REASON_CODES)})")
    if stage is not None and stage not in STAGES:
        raise ToolError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")
    files: list[str] = []
    if meter is None and stage in (None, "file", "envelope", "dedupe"):
        files += [f.path for f in storage.list_files(f"{QUARANTINE_PREFIX}/records", (".parquet",))]
    if stage in (None, "meter"):  # quarantine/meter/date=D/data.parquet, column `meter`
        for f in storage.list_files(f"{QUARANTINE_PREFIX}/meter", (".parquet",)):
            day = f.path.split("/")[-2].removeprefix("date=")
            if since is None or day >= since:
                files.append(f.path)
    if not files:
        return empty(QUARANTINE).lazy().select(QUARANTINE_COLUMNS)
    frame = storage.scan_parquet(files).with_columns(date=_normal_date(pl.col("date"))).select(QUARANTINE_COLUMNS)
    if since is not None:
        frame = frame.filter(pl.col("date") >= since)
    if reason is not None:
        frame = frame.filter(pl.col("reason") == reason)
    if stage is not None:
        frame = frame.filter(pl.col("stage") == stage)
    if meter is not None:
        frame = frame.filter(pl.col("meter") == meter)
    return frame


def quarantine(
    root: str | Storage,
    *,
    since: str | dt.date | None = None,
    reason: str | None = None,
    meter: str | None = None,
    stage: str | None = None,
    limit: int | None = None,
) -> pl.DataFrame:
    """Rejected records, oldest first: date, stage, reason, meter, file, line, event_id, message, raw.

    `date` is the day a record was quarantined for stages file/envelope/dedupe, and the event's UTC date for
    stage `meter` (events a meter could not use). `since` keeps dates >= since; `meter` keeps that meter's
    exclusions only.

    >>> quarantine("data", since="2024-01-01", reason="bad_time", limit=20)
    """
    storage = open_storage(root)
    since = _date(since, "since")

    def build() -> pl.LazyFrame:
        frame = _quarantine_frame(storage, since, reason, meter, stage).sort(["date", "file", "line"], nulls_last=True)
        return frame if limit is None else frame.head(limit)

    return _collect_listed(storage, build)


def quarantine_counts(
    root: str | Storage,
    *,
    since: str | dt.date | None = None,
    reason: str | None = None,
    meter: str | None = None,
    stage: str | None = None,
) -> pl.DataFrame:
    """Counts of rejected records by stage, reason and meter (largest first).

    >>> quarantine_counts("data", since="2024-01-01")
    """
    storage = open_storage(root)
    since = _date(since, "since")
    return _collect_listed(
        storage,
        lambda: (
            _quarantine_frame(storage, since, reason, meter, stage)
            .group_by("stage", "reason", "meter")
            .agg(count=pl.len().cast(pl.Int64))
            .sort(["count", "stage", "reason", "meter"], descending=[True, False, False, False], nulls_last=True)
        ),
    )


# --- status ------------------------------------------------------------------------------------------
def runs(root: str | Storage, last: int = 10) -> pl.DataFrame:
    """The last run records (`_state/runs`), newest last, plus interrupted runs (status `interrupted`).

    >>> runs("data", last=5)
    """
    storage = open_storage(root)
    rows = []
    for rec in state.read_run_records(storage, last=last):
        rows.append(
            {
                "run_id": rec.get("run_id"),
                "kind": rec.get("kind"),
                "status": rec.get("status"),
                "finished_at": rec.get("finished_at"),
                "seconds": rec.get("seconds"),
                "batches": rec.get("batches"),
                "events_stored": rec.get("events_stored"),
                "duplicates": rec.get("duplicates_dropped"),
                "quarantined": rec.get("quarantined_total"),
                "periods": rec.get("periods_recomputed"),
            }
        )
    committed = None
    for pending in state.read_pendings(storage):
        recorded = any(r["run_id"] == pending.run_id for r in rows)
        if recorded:
            continue
        committed = state.committed_runs(storage) if committed is None else committed
        rows.append(
            {
                "run_id": pending.run_id,
                "kind": None,
                "status": "committed, cleanup pending" if pending.run_id in committed else "interrupted",
                "finished_at": None,
                "seconds": None,
                "batches": None,
                "events_stored": None,
                "duplicates": None,
                "quarantined": None,
                "periods": None,
            }
        )
    schema = {
        "run_id": pl.String,
        "kind": pl.String,
        "status": pl.String,
        "finished_at": pl.String,
        "seconds": pl.Float64,
        "batches": pl.Int64,
        "events_stored": pl.Int64,
        "duplicates": pl.Int64,
        "quarantined": pl.Int64,
        "periods": pl.Int64,
    }
    return pl.DataFrame(rows, schema=schema).sort("run_id")


def waiting_batches(root: str | Storage) -> pl.DataFrame:
    """Landed files the next run will read (not in the manifest): path, size, modified (UTC).

    >>> waiting_batches("data")
    """
    storage = open_storage(root)
    files = pipeline.find_new_batches(storage)
    return pl.DataFrame(
        [{"path": f.path, "size": f.size, "modified": dt.datetime.fromtimestamp(f.mtime, dt.UTC)} for f in files],
        schema={"path": pl.String, "size": pl.Int64, "modified": pl.Datetime("us", "UTC")},
    )


def newest_event_time(root: str | Storage) -> dt.datetime | None:
    """The greatest event time in the curated store (reads only the newest date partition)."""
    storage = open_storage(root)

    def build() -> pl.LazyFrame:  # listed again when a file is gone: a re-ingest or a rollback deletes event files
        by_date = pipeline.event_files_by_date(storage)
        newest = (
            storage.scan_parquet(by_date[max(by_date)]) if by_date else pl.LazyFrame(schema={"time": EVENT["time"]})
        )
        return newest.select(pl.col("time").max())

    return storage.collect_listed(build).item()


def lock_holder(root: str | Storage) -> dict | None:
    """The run lock's content (run_id, host, pid, acquired_at, expires_at, expired, gone) or None.

    `gone`: its process, on this machine, no longer exists (the next run takes the lock over).
    A damaged lock file gives `{"unreadable": <one-line message>, "expired": None}`.
    """
    storage = open_storage(root)
    try:
        lock = state.read_lock(storage)
    except state.LockUnreadable as exc:
        return {"unreadable": str(exc), "expired": None}
    if lock is None:
        return None
    held, expires = lock
    held["expired"] = expires <= dt.datetime.now(dt.UTC)
    held["gone"] = state.holder_gone(held)
    return held


def status(root: str | Storage, meters: str | os.PathLike | MeterSet | None = None) -> pl.DataFrame:
    """One row per meter: slug, aggregation, event_type, periods published, first/last period_start,
    hourly days published, `definition` (unchanged | changed | new, against `_state/meters.json`) and
    `stale` (its published history was built by another definition; rebuild with a backfill).

    Without `meters`, the meters found under `usage/` are listed and the definition columns are null.

    >>> status("data", "data/meters.yaml")
    """
    storage = open_storage(root)
    meterset = load(meters) if meters is not None else None
    stored = state.read_fingerprints(storage)
    has_events = bool(storage.list_files(pipeline.EVENTS, (".parquet",))[:1])
    meters_by_slug = {m.slug: m for m in meterset.meters} if meterset is not None else {}
    if meterset is not None:
        current = meterset.fingerprints()
        entries = [(m.slug, m.aggregation, m.event_type, current[m.slug]) for m in meterset.meters]
    else:
        entries = [(slug, None, None, None) for slug in storage.list_dirs("usage")]
    rows = []
    for slug, aggregation, event_type, fp in entries:
        periods = [d.removeprefix("period_start=") for d in storage.list_dirs(f"usage/{slug}/period")]
        days = storage.list_dirs(f"usage/{slug}/hourly")
        if fp is None:
            definition, stale = None, None
        else:
            definition = "new" if slug not in stored else ("unchanged" if stored[slug] == fp else "changed")
            # stale when it has a history another definition built: stored events, or tables, day partials or
            # excluded values left from events a re-ingest took away (while the meter was out of the meters file),
            # as a run decides (`pipeline.unbuilt_meters`)
            stale = definition != "unchanged" and (
                has_events or bool(periods or days) or bool(pipeline.history_dates(storage, [meters_by_slug[slug]]))
            )
        rows.append(
            {
                "slug": slug,
                "aggregation": aggregation,
                "event_type": event_type,
                "periods": len(periods),
                "first_period": periods[0] if periods else None,
                "last_period": periods[-1] if periods else None,
                "hourly_days": len(days),
                "definition": definition,
                "stale": stale,
            }
        )
    schema = {
        "slug": pl.String,
        "aggregation": pl.String,
        "event_type": pl.String,
        "periods": pl.Int64,
        "first_period": pl.String,
        "last_period": pl.String,
        "hourly_days": pl.Int64,
        "definition": pl.String,
        "stale": pl.Boolean,
    }
    return pl.DataFrame(rows, schema=schema)


# --- preview -----------------------------------------------------------------------------------------
@dataclass
class Preview:
    """What a meters file would do with sample events, computed in memory (storage is never written).

    - `events`: valid, deduplicated events in the sample.
    - `totals`: one row per meter: slug, aggregation, event_type, events (of its type), counted, excluded,
      rows (period rows), total (sum of the period values), definition (unchanged | changed | new, or null
      without a root).
    - `rows`: per meter slug, the period table it would publish (subject, groups, window_start, window_end,
      value, event_count, period_start).
    - `excluded`: events a meter would skip (stage `meter`, reason missing_value / bad_value), with file and
      line.
    - `rejected`: records rejected before any meter (unreadable file, malformed JSON, envelope checks,
      duplicates inside the sample), with file and line.
    - `removed`: slugs recorded in `_state/meters.json` that the file no longer defines.
    """

    totals: pl.DataFrame
    events: int = 0
    rows: dict[str, pl.DataFrame] = field(default_factory=dict)
    excluded: pl.DataFrame = field(default_factory=lambda: empty(QUARANTINE))
    rejected: pl.DataFrame = field(default_factory=lambda: empty(QUARANTINE))
    removed: list[str] = field(default_factory=list)


def _read_sample(path: str) -> bytes:
    """A sample file's bytes, read through a Storage rooted at its folder (local paths or s3:// URLs)."""
    text = str(path)
    if not text.lower().endswith(BATCH_SUFFIXES):
        raise ToolError(f"{text}: not an event file (expected {', '.join(BATCH_SUFFIXES)})")
    folder, name = text.rsplit("/", 1) if "/" in text else (".", text)
    if not text.startswith("s3://"):
        folder = os.path.dirname(os.path.abspath(text))
    try:
        return Storage(folder or "/").read_bytes(name)
    except FileNotFoundError:
        raise ToolError(f"{text}: file not found") from None
    except IsADirectoryError:
        raise ToolError(f"{text}: is a folder; name the event files") from None
    except PermissionError as exc:
        raise ToolError(f"{text}: cannot be read: {exc}") from None


def read_samples(files: list[str]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Parse, validate and deduplicate sample files like a run: (events, rejected records)."""
    valid_parts: list[pl.DataFrame] = []
    rejects: list[pl.DataFrame] = []
    for order, path in enumerate(files):
        raw = _read_sample(path)
        parsed = parse_batch(raw, path)
        if parsed.unreadable:
            rejects.append(
                conform(
                    pl.DataFrame(
                        [{"stage": "file", "reason": "unreadable_file", "message": parsed.unreadable, "file": path}]
                    ),
                    QUARANTINE,
                )
            )
            continue
        if not parsed.malformed.is_empty():
            rejects.append(
                conform(
                    parsed.malformed.with_columns(
                        stage=pl.lit("envelope"), reason=pl.lit("malformed_json"), file=pl.lit(path)
                    ),
                    QUARANTINE,
                )
            )
        valid, rejected = validate(parsed.records)
        if not rejected.is_empty():
            rejected = with_raw_text(rejected, parsed).rename({"id": "event_id"})
            rejects.append(conform(rejected.with_columns(stage=pl.lit("envelope"), file=pl.lit(path)), QUARANTINE))
        valid_parts.append(
            valid.with_columns(file=pl.lit(path), batch=pl.lit("preview"), batch_order=pl.lit(order, pl.Int32))
        )
    events = pl.concat(valid_parts) if valid_parts else empty({**EVENT, "batch_order": pl.Int32})
    kept, dups = dedupe(events)
    if not dups.is_empty():
        rejects.append(
            conform(
                dups.with_columns(
                    stage=pl.lit("dedupe"),
                    reason=pl.lit("duplicate"),
                    message=pl.lit("same (source, id) on the same UTC date as ") + pl.col("_dup"),
                    event_id=pl.col("id"),
                ),
                QUARANTINE,
            )
        )
    rejected_all = pl.concat(rejects) if rejects else empty(QUARANTINE)
    return conform(kept, EVENT), rejected_all.with_columns(batch=pl.lit(None, pl.String), date=pl.lit(None, pl.String))


def preview(
    meters: str | os.PathLike | MeterSet,
    files: list[str],
    root: str | Storage | None = None,
) -> Preview:
    """Dry-run a meters file on sample event files (JSONL/Parquet); storage is never touched.

    With `root`, each meter is compared with the definition recorded in `<root>/_state/meters.json`.

    >>> p = preview("meters.yaml", ["samples/day1.jsonl"], root="data")
    >>> p.totals
    >>> p.rows["tokens_total"]
    """
    meterset = load(meters)
    if not files:
        raise ToolError("name at least one sample event file (JSONL or Parquet)")
    events, rejected = read_samples([str(f) for f in files])
    stored: dict[str, str] | None = None
    if root is not None:
        storage = open_storage(root, check=True)
        stored = state.read_fingerprints(storage) if storage.exists(state.METERS) else None
    current = meterset.fingerprints()
    billing = meterset.billing
    days = events.select(local_date(pl.col("time"), billing.timezone).unique())
    periods = periods_for_dates(days.to_series().to_list(), billing.period, billing.timezone, billing.anchor_day)
    totals, rows, excluded_parts = [], {}, []
    for meter in meterset.meters:
        of_type = events.filter(pl.col("type") == meter.event_type)
        extracted = extract(of_type.lazy(), meter)
        table, excluded, counted = collect_tables(
            [
                period_table(extracted, meter, billing, periods),
                exclusions(extracted, meter),
                extracted.filter(pl.col("excluded").is_null()).select(pl.len()),  # none before eventFrom
            ]
        )
        table = table.sort(["window_start", "subject", *meter.group_paths], nulls_last=True)
        rows[meter.slug] = table
        excluded_parts.append(excluded)
        if stored is None:
            definition = None
        elif meter.slug not in stored:
            definition = "new"
        else:
            definition = "unchanged" if stored[meter.slug] == current[meter.slug] else "changed"
        totals.append(
            {
                "slug": meter.slug,
                "aggregation": meter.aggregation,
                "event_type": meter.event_type,
                "events": of_type.height,
                "counted": counted.item(),
                "excluded": excluded.height,
                "rows": table.height,
                "total": table["value"].sum() if table.height else None,
                "definition": definition,
            }
        )
    schema = {
        "slug": pl.String,
        "aggregation": pl.String,
        "event_type": pl.String,
        "events": pl.Int64,
        "counted": pl.Int64,
        "excluded": pl.Int64,
        "rows": pl.Int64,
        "total": pl.Float64,
        "definition": pl.String,
    }
    removed = sorted(set(stored or {}) - set(current))
    excluded_all = pl.concat(excluded_parts) if excluded_parts else empty(QUARANTINE)
    return Preview(
        totals=pl.DataFrame(totals, schema=schema),
        events=events.height,
        rows=rows,
        excluded=excluded_all.with_columns(batch=pl.lit(None, pl.String)),
        rejected=rejected,
        removed=removed,
    )


# --- report ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Period:
    period_start: str
    window_start: dt.datetime
    window_end: dt.datetime
    file: str


def find_period(storage: Storage, slug: str, period: str) -> Period:
    """A published billing period of a meter, named by its first day (2024-01-15) or its month (2024-01)."""
    shape = re.fullmatch(r"(\d{4})-(\d{2})(?:-(\d{2}))?", period or "")
    if not shape:
        raise ToolError(f"--period: {period!r} is not a month or a day; use e.g. 2024-01 or 2024-01-15")
    year, month, day = shape.groups()
    try:
        first = dt.date(int(year), int(month), int(day or 1))
    except ValueError:
        what = "date" if day else "month"
        raise ToolError(f"--period: {period!r} is not a valid {what}; use e.g. 2024-01 or 2024-01-15") from None
    check_event_years("--period", first)
    published = [d.removeprefix("period_start=") for d in storage.list_dirs(f"usage/{slug}/period")]
    if not published:
        raise ToolError(f"meter {slug!r} has no published periods under usage/{slug}/period/ (has it run yet?)")
    matches = [p for p in published if p == period or p.startswith(period + "-")]
    if not matches:
        near = ", ".join(published[-6:])
        raise ToolError(f"meter {slug!r} has no published period {period!r} (latest: {near})")
    if len(matches) > 1:
        raise ToolError(f"{period!r} matches several periods of {slug!r} ({', '.join(matches)}); give the first day")
    start = matches[0]
    file = pipeline.period_file(slug, start)
    bounds = storage.read_parquet([file]).select(pl.col("window_start").min(), pl.col("window_end").max())
    return Period(start, bounds["window_start"][0], bounds["window_end"][0], file)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return value


def top_table(storage: str | Storage, slug: str, period: str, n: int = 10) -> list[dict]:
    """The `n` largest rows (subject and groups) of a meter's published billing period, for a table artifact.

    Each dict: rank, subject, one key per groupBy key, value, event_count. `period` is the period's first
    day or its month (2024-01). Values are the published billing values, so they are exact for every
    aggregation.

    >>> top_table(Storage("data"), "tokens_total", "2024-01")
    [{'rank': 1, 'subject': 'customer-1', 'model': 'gpt-4', 'value': 1200.0, 'event_count': 3}, ...]
    """
    storage = open_storage(storage)
    found = find_period(storage, slug, period)
    df = storage.read_parquet([found.file])  # one GET per file: safe while a run republishes it
    drop = {"window_start", "window_end", "period_start", "date"}
    columns = [c for c in df.columns if c not in drop]
    top = (
        df.select(columns)
        .sort(["value", *[c for c in columns if c != "value"]], descending=[True] + [False] * (len(columns) - 1))
        .head(n)
    )
    return [{"rank": i + 1, **{k: _jsonable(v) for k, v in row.items()}} for i, row in enumerate(top.to_dicts())]
