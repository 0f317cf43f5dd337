"""The run and the backfill as plain functions over a storage root: importable without Prefect.

Each step takes and returns paths and small summaries, so `flows/prefect_flows.py` can run the very same
steps as Prefect tasks (with retries) without DataFrames crossing task boundaries.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import polars as pl

from flows import state
from flows.storage import TMP, FileInfo, Storage
from meters import Billing, Meter, MeterSet
from transforms.aggregate import PARTIAL, pack_partials, unpack_partials
from transforms.dedupe import dedupe
from transforms.extract import extract, extract_paths
from transforms.parse import BATCH_SUFFIXES, parse_batch, with_raw_text
from transforms.schema import EVENT, QUARANTINE, conform, empty
from transforms.tables import exclusions, hourly_table, period_from_partials, period_partials
from transforms.validate import validate
from transforms.windows import period_dates
from transforms.windows import period_table as periods_for_dates

LANDING = "landing"
EVENTS = "events"
LOCK_TTL = 2 * 3600
EVENT_ROW_GROUP = 65_536
SLICE_BYTES = 96 * 2**20  # event files read at once when recomputing: bounds recompute memory
CHUNK_BYTES = 256 * 2**20  # landed bytes parsed at once: bounds ingest memory


class Runner:
    """How steps run: here, one after another. `flows/prefect_flows.py` runs them as Prefect tasks.

    `step` runs one named step; `fan` runs independent calls of one function (per event type), which a
    Prefect runner submits concurrently to its task runner (threads, or a Dask cluster).
    """

    combine = True  # recompute all event types in one pass (one process: fewer scans of the same files)

    def step(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    def fan(self, name: str, fn: Callable[..., Any], calls: list[tuple]) -> list[Any]:
        return [fn(*args) for args in calls]


DIRECT = Runner()


@dataclass
class IngestResult:
    batches: int = 0
    unchanged: int = 0
    records: int = 0
    valid: int = 0
    duplicates: int = 0
    stored: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    # event type -> {"dates": UTC dates, "local_dates": billing-zone dates} of the events stored
    touched: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    manifest_rows: list[dict] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


# --- paths -----------------------------------------------------------------------------------------
def event_file(date: str, run_id: str) -> str:
    return f"{EVENTS}/date={date}/{run_id}.parquet"


def hourly_file(slug: str, date: str) -> str:
    return f"usage/{slug}/hourly/date={date}/data.parquet"


def period_file(slug: str, period_start: str) -> str:
    return f"usage/{slug}/period/period_start={period_start}/data.parquet"


def batch_quarantine_file(batch: str) -> str:
    return f"quarantine/records/{batch}.parquet"


def type_key(event_type: str) -> str:
    """A file name for an event type: readable, path-safe, and distinct for distinct types."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", event_type)[:60]
    return f"{safe}-{hashlib.sha256(event_type.encode()).hexdigest()[:8]}"


PARTIALS = "_state/partials"


def partials_file(event_type: str, date: str) -> str:
    """Partial period states of the meters of one event type from the events of one UTC date."""
    return f"{PARTIALS}/date={date}/{type_key(event_type)}.parquet"


def meter_quarantine_file(event_type: str, date: str) -> str:
    """Values the meters of one event type excluded on one UTC date (column `meter` says which)."""
    return f"quarantine/meter/date={date}/{type_key(event_type)}.parquet"


def event_file_infos_by_date(storage: Storage) -> dict[str, list[FileInfo]]:
    out: dict[str, list[FileInfo]] = {}
    for f in storage.list_files(EVENTS, (".parquet",)):
        part = f.path.split("/")[1]
        if part.startswith("date="):
            out.setdefault(part[5:], []).append(f)
    return out


def event_files_by_date(storage: Storage) -> dict[str, list[str]]:
    return {day: [f.path for f in infos] for day, infos in event_file_infos_by_date(storage).items()}


# --- finding and ingesting batches -------------------------------------------------------------------
def find_new_batches(storage: Storage) -> list[FileInfo]:
    """Landed files whose (path, size, mtime, etag) the manifest has not seen, in landing order."""
    manifest = state.read_manifest(storage)
    columns = [manifest[c].to_list() for c in ("path", "size", "mtime", "etag")]
    seen = set(zip(*columns, strict=True))
    files = storage.list_files(LANDING)
    unread = [f.path for f in files if not f.path.lower().endswith(BATCH_SUFFIXES)]
    if unread:  # never silently: a producer writing `.json` or `.csv` would otherwise lose every event
        shown = ", ".join(unread[:3]) + (f" and {len(unread) - 3} more" if len(unread) > 3 else "")
        logging.getLogger(__name__).warning(
            "landing/ has %d file(s) meterlake does not read (use %s): %s",
            len(unread),
            " ".join(BATCH_SUFFIXES),
            shown,
        )
    batches = [f for f in files if f.path.lower().endswith(BATCH_SUFFIXES)]
    # The ETag (S3) catches a same-size re-land within LastModified's one-second resolution.
    new = (f for f in batches if (f.path, f.size, f.mtime, f.etag) not in seen)
    return sorted(new, key=lambda f: (f.mtime, f.path))


def batch_id(path: str, content: bytes) -> str:
    return hashlib.sha256(path.encode() + b"\0" + content).hexdigest()[:24]


def _quarantine_rows(df: pl.DataFrame, stage: str, file: str, batch: str, **cols: Any) -> pl.DataFrame:
    extra = {k: pl.lit(v) for k, v in cols.items()}
    return conform(df.with_columns(stage=pl.lit(stage), file=pl.lit(file), batch=pl.lit(batch), **extra), QUARANTINE)


def _envelope_json(df: pl.DataFrame) -> pl.Expr:
    return pl.struct(
        "specversion",
        "id",
        "source",
        "type",
        "subject",
        pl.col("time").dt.strftime("%Y-%m-%dT%H:%M:%S%.9fZ").alias("time"),
        "datacontenttype",
        "data",
    ).struct.json_encode()


def read_batches(
    storage: Storage, batches: list[FileInfo], known_batches: set[str]
) -> tuple[pl.DataFrame, pl.DataFrame, list[dict], int]:
    """Parse and validate batches: (valid events in landing order, quarantine rows, manifest rows, unchanged)."""
    valid_parts: list[pl.DataFrame] = []
    rejects: list[pl.DataFrame] = []
    rows: list[dict] = []
    unchanged = 0
    for order, info in enumerate(batches):
        raw = storage.read_bytes(info.path)
        batch = batch_id(info.path, raw)
        rows.append({"path": info.path, "size": info.size, "mtime": info.mtime, "etag": info.etag, "batch": batch})
        if batch in known_batches:  # touched but identical content: nothing new
            unchanged += 1
            continue
        parsed = parse_batch(raw, info.path)
        if parsed.unreadable:
            rejects.append(
                pl.DataFrame(
                    [{"stage": "file", "reason": "unreadable_file", "message": parsed.unreadable, "file": info.path}],
                )
                .pipe(conform, QUARANTINE)
                .with_columns(batch=pl.lit(batch))
            )
            continue
        if not parsed.malformed.is_empty():
            rejects.append(_quarantine_rows(parsed.malformed, "envelope", info.path, batch, reason="malformed_json"))
        valid, rejected = validate(parsed.records)
        if not rejected.is_empty():
            rejected = with_raw_text(rejected, parsed).rename({"id": "event_id"})
            rejects.append(_quarantine_rows(rejected, "envelope", info.path, batch))
        valid_parts.append(
            valid.with_columns(file=pl.lit(info.path), batch=pl.lit(batch), batch_order=pl.lit(order, pl.Int32))
        )
    valid_all = pl.concat(valid_parts) if valid_parts else empty({**EVENT, "batch_order": pl.Int32})
    quarantine = pl.concat(rejects) if rejects else empty(QUARANTINE)
    return valid_all, quarantine, rows, unchanged


def touched_by(events: pl.DataFrame, billing: Billing) -> dict[str, dict[str, list[str]]]:
    """Per event type: the UTC dates and billing-zone local dates its events fall on."""
    if events.is_empty():
        return {}
    per = (
        events.lazy()
        .select("type", "date", local=pl.col("time").dt.convert_time_zone(billing.timezone).dt.date())
        .group_by("type")
        .agg(pl.col("date").unique().sort(), pl.col("local").unique().sort().cast(pl.String))
        .collect()
    )
    return {r["type"]: {"dates": r["date"], "local_dates": r["local"]} for r in per.to_dicts()}


def chunk_batches(batches: list[FileInfo], max_bytes: int) -> list[list[FileInfo]]:
    """Consecutive groups of batches (landing order kept) of at most `max_bytes` input each."""
    chunks: list[list[FileInfo]] = []
    size = 0
    for info in batches:
        if not chunks or (size + info.size > max_bytes and chunks[-1]):
            chunks.append([])
            size = 0
        chunks[-1].append(info)
        size += info.size
    return chunks


def ingest(
    storage: Storage,
    run_id: str,
    batches: list[FileInfo],
    billing: Billing,
    redo: dict,
    chunk_bytes: int | None = None,
) -> IngestResult:
    """Validate and deduplicate new batches, then append them to events/ and quarantine/.

    Batches are taken in chunks of about `chunk_bytes` of input, in landing order, so memory stays
    bounded however much has landed; each chunk deduplicates against everything stored before it.
    Before a chunk writes anything, `_state/pending/<run>.json` lists its files, so a crash is rolled
    back by the next run.
    """
    for pending in state.read_pendings(storage):
        if pending.run_id == run_id:  # a retried attempt: undo the partial one first
            storage.delete(pending.files)
    known = set(state.read_manifest(storage)["batch"].to_list())
    total = IngestResult(batches=len(batches), touched=merge_touched({}, redo))
    reasons: Counter[str] = Counter()
    state.write_pending(storage, state.Pending(run_id=run_id, touched=total.touched))
    for index, chunk in enumerate(chunk_batches(batches, chunk_bytes or CHUNK_BYTES)):
        part = _ingest_chunk(storage, f"{run_id}-{index:04d}", run_id, chunk, known, billing, total, reasons)
        total.manifest_rows.extend({**r, "run_id": run_id} for r in part)
    total.quarantined = dict(sorted(reasons.items()))
    return total


def _ingest_chunk(
    storage: Storage,
    name: str,
    run_id: str,
    batches: list[FileInfo],
    known: set[str],
    billing: Billing,
    total: IngestResult,
    reasons: Counter[str],
) -> list[dict]:
    new, quarantine, rows, unchanged = read_batches(storage, batches, known)
    kept, dups = dedupe_against_store(storage, new)
    if not dups.is_empty():
        dup_rows = dups.with_columns(
            stage=pl.lit("dedupe"),
            reason=pl.lit("duplicate"),
            message=pl.lit("same (source, id) on the same UTC date as ") + pl.col("_dup"),
            event_id=pl.col("id"),
            raw=_envelope_json(dups),
        )
        quarantine = pl.concat([quarantine, conform(dup_rows, QUARANTINE)])
    kept = conform(kept, EVENT)
    q_batches = sorted(set(quarantine["batch"].to_list()))
    files = [event_file(d, name) for d in sorted(set(kept["date"].to_list()))]
    files += [batch_quarantine_file(b) for b in q_batches]
    total.files.extend(files)
    total.touched = merge_touched(total.touched, touched_by(kept, billing))
    state.write_pending(storage, state.Pending(run_id=run_id, files=total.files, touched=total.touched))
    write_events(storage, kept, name)
    for (b,), part in quarantine.group_by(["batch"], maintain_order=True):
        storage.write_parquet(batch_quarantine_file(str(b)), part.with_columns(date=pl.lit(run_id[:8])))
    reasons.update(quarantine.filter(pl.col("reason") != "duplicate")["reason"].to_list())
    total.unchanged += unchanged
    total.records += new.height + quarantine.height - dups.height
    total.valid += new.height
    total.duplicates += dups.height
    total.stored += kept.height
    return rows


def write_events(storage: Storage, kept: pl.DataFrame, run_id: str) -> None:
    """One file per UTC date, sorted by type so each meter's scan skips other types' row groups."""
    ordered = kept.sort("date", "type", "subject", "time")
    items = [(event_file(str(d), run_id), part) for (d,), part in ordered.group_by(["date"], maintain_order=True)]
    storage.write_parquet_many(items, row_group_size=EVENT_ROW_GROUP)


def dedupe_against_store(storage: Storage, new: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """`dedupe` with the stored keys of one UTC date at a time (memory follows a day, not the history)."""
    by_date = event_files_by_date(storage)
    kept_parts, dup_parts = [], []
    for (day,), part in new.with_row_index("_landing").group_by(["date"], maintain_order=True):
        files = by_date.get(str(day), [])
        keys = storage.scan_parquet(files).select("date", "source", "id").collect() if files else None
        kept, dups = dedupe(part, keys)
        kept_parts.append(kept)
        dup_parts.append(dups)
    if not kept_parts:
        return dedupe(new)
    kept, dups = pl.concat(kept_parts).sort("_landing"), pl.concat(dup_parts).sort("_landing")
    return kept.drop("_landing"), dups.drop("_landing")


def merge_touched(a: dict, b: dict) -> dict:
    out: dict[str, dict[str, list[str]]] = {}
    for src in (a, b):
        for typ, parts in src.items():
            slot = out.setdefault(typ, {"dates": [], "local_dates": []})
            for key in ("dates", "local_dates"):
                slot[key] = sorted(set(slot[key]) | set(parts.get(key, [])))
    return out


# --- recomputing tables ------------------------------------------------------------------------------
def _period_bounds(billing: Billing, local_dates: list[str]) -> pl.DataFrame:
    """The billing periods holding the given local dates, with every local date of each period."""
    starts = sorted(
        {period_dates(dt.date.fromisoformat(d), billing.period, billing.anchor_day)[0] for d in local_dates}
    )
    days: list[dt.date] = []
    for first in starts:
        after = period_dates(first, billing.period, billing.anchor_day)[1]
        days.extend(first + dt.timedelta(days=i) for i in range((after - first).days))
    return periods_for_dates(days, billing.period, billing.timezone, billing.anchor_day)


def _utc_dates(start: dt.datetime, end: dt.datetime) -> list[str]:
    day, last = start.date(), (end - dt.timedelta(microseconds=1)).date()
    out = []
    while day <= last:
        out.append(day.isoformat())
        day += dt.timedelta(days=1)
    return out


def recompute_types(
    storage: Storage,
    meters: list[Meter],
    billing: Billing,
    dates: list[str],
    local_dates: list[str],
) -> dict[str, dict[str, int]]:
    """Rebuild the hourly partitions of UTC `dates` and the billing periods holding `local_dates`.

    Only the touched UTC dates' events are read, in slices of at most `SLICE_BYTES` of event files, one
    scan per slice for all the meters' event types. Each touched date gets its hourly rows, its excluded
    values and its exact partial period states per group (sum and count, min, max, the latest row,
    distinct values), stored in `_state/partials/`. A billing period is the combination of the stored
    partials of its dates, so a late event re-reads one day of events, not the whole period.
    """
    types = sorted({m.event_type for m in meters})
    touched_days = sorted(set(dates))
    period_starts = sorted(set(_period_bounds(billing, local_dates)["period_start"].to_list()))
    files = event_file_infos_by_date(storage)
    existing = _existing_partitions(storage, meters, types)
    # Days of the periods whose stored partials are missing or from another meter definition are read too.
    stale = _days_without_current_partials(storage, meters, billing, period_starts, set(files))
    read_days = sorted(set(touched_days) | stale)
    around = sorted({d for day in read_days for d in _days_around(day)} | set(local_dates))
    windows = _period_bounds(billing, around)  # the period of every local date the days read can hold
    counts = {m.slug: {"hourly_rows": 0, "excluded": 0} for m in meters}
    for days, slice_files in _slices([(d, files.get(d, [])) for d in read_days], SLICE_BYTES):
        # Everything derived from a slice is published before the next slice is read: memory stays flat.
        touched = [d for d in days if d in set(touched_days)]
        in_touched = pl.col("date").is_in(touched)
        events = _slice_events(storage, slice_files, types)
        by_type = events.partition_by("type", as_dict=True, include_key=False) if events.height else {}
        del events
        for event_type in types:
            of_type = [m for m in meters if m.event_type == event_type]
            partials = [sentinels(m, days) for m in of_type]
            excluded: list[pl.DataFrame] = []
            part = by_type.pop((event_type,), None)
            paths = extract_paths(part.lazy(), of_type).collect() if part is not None else None
            for meter in of_type if paths is not None else []:
                extracted = extract(paths.lazy(), meter).collect().lazy()
                hourly = hourly_table(extracted.filter(in_touched), meter).collect()
                counts[meter.slug]["hourly_rows"] += _publish(
                    storage, hourly, "date", touched, partial(hourly_file, meter.slug), existing
                )
                excluded.append(exclusions(extracted.filter(in_touched), meter).collect())
                counts[meter.slug]["excluded"] += excluded[-1].height
                day_states = period_partials(extracted, meter, billing, windows, ("date",)).collect()
                partials.append(pack_partials(day_states, meter))
            if paths is None:  # no events of the type in the slice: its touched days lose their rows
                for meter in of_type:
                    _publish(storage, pl.DataFrame(), "date", touched, partial(hourly_file, meter.slug), existing)
            order = ["meter", "window_start", "subject"]
            path = partial(partials_file, event_type)
            _publish(storage, _concat(partials), "date", days, path, existing, sort=order)
            path = partial(meter_quarantine_file, event_type)
            _publish(storage, _concat(excluded), "date", touched, path, existing, sort=False)
    stored = _stored_partials(storage, types, billing, period_starts)
    summary: dict[str, dict[str, int]] = {}
    for meter in meters:
        rows_h = counts[meter.slug]["hourly_rows"]
        mine = unpack_partials(stored.lazy(), meter)
        period = period_from_partials(mine, meter, billing).collect() if stored.height else pl.DataFrame()
        rows_p = _publish(storage, period, "period_start", period_starts, partial(period_file, meter.slug), existing)
        summary[meter.slug] = {
            "hourly_partitions": len(touched_days),
            "periods": len(period_starts),
            "hourly_rows": rows_h,
            "period_rows": rows_p,
            "excluded": counts[meter.slug]["excluded"],
            "latest_period": max(period_starts) if rows_p else None,
        }
    return summary


def sentinels(meter: Meter, days: list[str]) -> pl.DataFrame:
    """One empty state per day: says the day was computed with this definition, even with no rows."""
    rows = pl.DataFrame({"date": days, "_n": [0] * len(days)}, schema={"date": pl.String, "_n": pl.Int64})
    return conform(rows.with_columns(meter=pl.lit(meter.slug), fingerprint=pl.lit(meter.fingerprint())), PARTIAL)


def _days_without_current_partials(
    storage: Storage, meters: list[Meter], billing: Billing, period_starts: list[str], with_events: set[str]
) -> set[str]:
    days = _period_days(billing, period_starts) & with_events
    if not days:
        return set()
    current = _stored_partials(storage, sorted({m.event_type for m in meters}), billing, period_starts, all_rows=True)
    have = set(current.select("date", "meter", "fingerprint").unique().iter_rows())
    return {d for d in days if any((d, m.slug, m.fingerprint()) not in have for m in meters)}


def _period_days(billing: Billing, period_starts: list[str]) -> set[str]:
    bounds = _period_bounds(billing, period_starts).filter(pl.col("period_start").is_in(period_starts))
    out: set[str] = set()
    for row in bounds.select("window_start", "window_end").unique().iter_rows():
        out |= set(_utc_dates(*row))
    return out


def _days_around(day: str) -> list[str]:
    d = dt.date.fromisoformat(day)
    return [(d + dt.timedelta(days=i)).isoformat() for i in (-1, 0, 1)]


def _stored_partials(
    storage: Storage, types: list[str], billing: Billing, period_starts: list[str], all_rows: bool = False
) -> pl.DataFrame:
    """The stored day partials of every UTC date overlapping the given periods, for the given types.

    Only the rows of those periods' windows, unless `all_rows` (then sentinels and other windows too).
    """
    if not period_starts:
        return pl.DataFrame(schema=PARTIAL)
    wanted = _period_days(billing, period_starts)
    keys = {type_key(t) for t in types}
    found = [
        f.path
        for f in storage.list_files(PARTIALS, (".parquet",))
        if f.path.split("/")[-2].removeprefix("date=") in wanted
        and f.path.rsplit("/", 1)[-1].removesuffix(".parquet") in keys
    ]
    if not found:
        return pl.DataFrame(schema=PARTIAL)
    scan = storage.scan_parquet(sorted(found))
    if all_rows:
        return scan.select("date", "meter", "fingerprint").collect()
    bounds = _period_bounds(billing, period_starts).filter(pl.col("period_start").is_in(period_starts))
    windows = bounds.select("window_start").unique()
    return scan.join(windows.lazy(), on="window_start", how="semi").collect()


def recompute_type(
    storage: Storage, event_type: str, meters: list[Meter], billing: Billing, dates: list[str], local_dates: list[str]
) -> dict[str, dict[str, int]]:
    """`recompute_types` for one event type: the unit of fan-out on a task runner."""
    return recompute_types(storage, [m for m in meters if m.event_type == event_type], billing, dates, local_dates)


def _concat(frames: list[pl.DataFrame]) -> pl.DataFrame:
    frames = [f for f in frames if f.height]
    return pl.concat(frames) if frames else pl.DataFrame()


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


DAY_COLUMNS = ["id", "source", "type", "subject", "time", "data", "file", "line", "batch", "date"]


def _slice_events(storage: Storage, files: list[str], types: list[str]) -> pl.DataFrame:
    if not files:
        return pl.DataFrame(schema={c: EVENT[c] for c in DAY_COLUMNS})
    return storage.scan_parquet(files).filter(pl.col("type").is_in(types)).select(DAY_COLUMNS).collect()


def _existing_partitions(storage: Storage, meters: list[Meter], types: list[str]) -> set[str]:
    """Partition files the meters have now, so empty partitions are deleted without blind delete calls."""
    found: set[str] = set()
    for meter in meters:
        found.update(f.path for f in storage.list_files(f"usage/{meter.slug}", (".parquet",)))
    keys = {type_key(t) for t in types}
    for prefix in ("quarantine/meter", PARTIALS):
        for f in storage.list_files(prefix, (".parquet",)):
            if f.path.rsplit("/", 1)[-1].removesuffix(".parquet") in keys:
                found.add(f.path)
    return found


def _publish(
    storage: Storage,
    table: pl.DataFrame,
    key: str,
    values: list[str],
    path: Callable[[str], str],
    existing: set[str],
    sort: bool | list[str] = True,
) -> int:
    """Replace each partition `key=value` with its rows; partitions left empty are deleted."""
    if table.is_empty():
        parts = {}
    else:
        if isinstance(sort, list):
            order = sort
        elif sort:
            order = [c for c in ("window_start", "subject") if c in table.columns]
            order += [c for c in table.columns if c not in (*order, "window_end", "value", "event_count", key)]
        else:
            order = ["file", "line"]
        table = table.sort(order, nulls_last=True)
        parts = {str(k[0]): df for k, df in table.group_by([key], maintain_order=True)}
    writes = [(path(v), parts[v]) for v in values if v in parts and parts[v].height]
    deletes = [path(v) for v in values if v not in parts and path(v) in existing]
    storage.write_parquet_many(writes)
    storage.delete(deletes)
    return sum(df.height for _, df in writes)


# --- the run -----------------------------------------------------------------------------------------
def recover(storage: Storage) -> tuple[dict, list[state.Pending]]:
    """Finish committed runs' leftovers and roll back uncommitted ones; return what to recompute."""
    committed = state.committed_runs(storage)
    redo: dict = {}
    stale: list[state.Pending] = []
    for pending in state.read_pendings(storage):
        if pending.run_id in committed:  # committed: finish its deletes (re-ingest) and redo its tables
            # Always redo: a re-ingest commits before it recomputes, and the backfill around it rewrites the
            # pending record without `deletes`, so a crash there left tables built from the old events.
            storage.delete(pending.deletes)
            redo = merge_touched(redo, pending.touched)
            stale.append(pending)
            continue
        storage.delete(pending.files)  # roll back: the batches are read again by this run
        redo = merge_touched(redo, pending.touched)
        stale.append(pending)
    for f in storage.list_files(TMP):
        storage.delete([f.path])
    return redo, stale


def run(
    storage: Storage,
    meterset: MeterSet,
    *,
    runner: Runner = DIRECT,
    log: Callable[[str], None] = print,
    lock_ttl: int = LOCK_TTL,
    now: dt.datetime | None = None,
) -> dict:
    """One hourly run: ingest what is new, recompute what it touched, publish, commit.

    What it processes is decided by the manifest, never by the clock; `now` (a flow passes its scheduled
    start time) only names the run.
    """
    started = time.perf_counter()
    run_id = state.new_run_id(now)
    storage.check_root(create=not storage.is_s3)
    state.acquire_lock(storage, run_id, lock_ttl)
    try:
        redo, stale = runner.step("recover", recover, storage)
        batches = runner.step("find-new-batches", find_new_batches, storage)
        had_events = bool(event_files_by_date(storage))
        result: IngestResult = runner.step("ingest", ingest, storage, run_id, batches, meterset.billing, redo)
        for pending in stale:
            state.clear_pending(storage, pending.run_id)
        state.refresh_lock(storage, run_id, lock_ttl)
        meters_summary = recompute_all(storage, meterset, result.touched, runner)
        state.refresh_lock(storage, run_id, lock_ttl)
        if result.manifest_rows or result.files:
            runner.step("commit", state.commit_manifest, storage, run_id, result.manifest_rows)
        fingerprints = update_fingerprints(storage, meterset, first_run=not had_events)
        state.clear_pending(storage, run_id)
        summary = _summary(run_id, "run", result, meters_summary, started, fingerprints)
        summary["stale_periods"] = stale_periods(storage, fingerprints)
        state.write_run_record(storage, run_id, summary)
    finally:
        _release(storage, run_id)
    log(format_summary(summary))
    return summary


def _release(storage: Storage, run_id: str) -> None:
    """Release the lock without hiding the run's own error (storage may be the thing that failed)."""
    try:
        state.release_lock(storage, run_id)
    except Exception as exc:  # noqa: BLE001 - the lock expires by itself; the original error matters more
        logging.getLogger(__name__).warning("could not release the run lock (it expires by itself): %s", exc)


def recompute_all(storage: Storage, meterset: MeterSet, touched: dict, runner: Runner = DIRECT) -> dict:
    """Recompute every meter of every touched event type; event types are independent (fanned out)."""
    calls = []
    for event_type, parts in sorted(touched.items()):
        meters = [m for m in meterset.meters if m.event_type == event_type]
        if meters:
            calls.append((storage, event_type, meters, meterset.billing, parts["dates"], parts["local_dates"]))
    summary: dict[str, dict[str, int]] = {}
    if runner.combine and len(calls) > 1:  # one process: one scan of each slice serves every type
        dates = sorted({d for c in calls for d in c[4]})
        local = sorted({d for c in calls for d in c[5]})
        meters = [m for c in calls for m in c[2]]
        return runner.step("recompute", recompute_types, storage, meters, meterset.billing, dates, local)
    for result in runner.fan("recompute", recompute_type, calls):
        summary.update(result)
    return summary


def update_fingerprints(
    storage: Storage, meterset: MeterSet, first_run: bool, rebuilt: list[str] | None = None
) -> dict:
    """Record which meter definitions built the tables; report meters whose history is stale."""
    stored = state.read_fingerprints(storage)
    current = meterset.fingerprints()
    changed = False
    for slug, fp in current.items():
        if stored.get(slug) != fp and (first_run or (rebuilt is not None and slug in rebuilt)):
            stored[slug] = fp
            changed = True
    if changed:
        state.write_fingerprints(storage, stored)
    return {slug: ("ok" if stored.get(slug) == fp else "stale") for slug, fp in current.items()}


def stale_periods(storage: Storage, fingerprints: dict[str, str]) -> dict[str, list[str]]:
    """Published periods of meters whose definition changed since they were built: wrong until backfilled."""
    out = {}
    for slug, status in fingerprints.items():
        if status == "stale":
            parts = storage.list_dirs(f"usage/{slug}/period")
            out[slug] = [p.split("=", 1)[1] for p in parts if p.startswith("period_start=")]
    return out


def _summary(run_id: str, kind: str, result: IngestResult, meters: dict, started: float, fps: dict) -> dict:
    stale = sorted(s for s, v in fps.items() if v == "stale")
    return {
        "run_id": run_id,
        "kind": kind,
        "status": "ok",
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        "seconds": round(time.perf_counter() - started, 3),
        "batches": result.batches,
        "batches_unchanged": result.unchanged,
        "events_read": result.records,
        "events_valid": result.valid,
        "duplicates_dropped": result.duplicates,
        "events_stored": result.stored,
        "quarantined": result.quarantined,
        "quarantined_total": sum(result.quarantined.values()),
        "meters_recomputed": sorted(meters),
        "periods_recomputed": sum(m["periods"] for m in meters.values()),
        "hourly_partitions_recomputed": sum(m["hourly_partitions"] for m in meters.values()),
        "rows_written": {s: {"hourly": m["hourly_rows"], "period": m["period_rows"]} for s, m in meters.items()},
        "excluded_by_meter": {s: m["excluded"] for s, m in meters.items() if m["excluded"]},
        "latest_periods": {s: m["latest_period"] for s, m in meters.items() if m.get("latest_period")},
        "stale_meters": stale,
        "stale_periods": {},
    }


def format_summary(summary: dict) -> str:
    q = ", ".join(f"{k} {v}" for k, v in summary["quarantined"].items()) or "none"
    lines = [
        f"run {summary['run_id']} ({summary['kind']}): {summary['seconds']:.2f}s",
        f"  batches {summary['batches']} (unchanged {summary['batches_unchanged']}), events read {summary['events_read']},"
        f" valid {summary['events_valid']}, duplicates dropped {summary['duplicates_dropped']},"
        f" stored {summary['events_stored']}",
        f"  quarantined {summary['quarantined_total']}: {q}",
        f"  meters recomputed {len(summary['meters_recomputed'])}, periods {summary['periods_recomputed']},"
        f" hourly partitions {summary['hourly_partitions_recomputed']}",
    ]
    for slug, rows in summary["rows_written"].items():
        lines.append(f"    {slug}: {rows['period']} period rows, {rows['hourly']} hourly rows")
    for slug, periods in summary.get("stale_periods", {}).items():
        if periods:
            shown = ", ".join(periods[:6]) + (f" and {len(periods) - 6} more" if len(periods) > 6 else "")
            lines.append(f"  stale periods of {slug}: {shown}")
    if summary["stale_meters"]:
        lines.append(
            "  stale: " + ", ".join(summary["stale_meters"]) + " changed or were added after their history was"
            " built; run `meterlake backfill --meter SLUG` to rebuild it"
        )
    return "\n".join(lines)


# --- backfill ----------------------------------------------------------------------------------------
def _days(start: dt.date, end: dt.date) -> list[str]:
    return [(start + dt.timedelta(days=i)).isoformat() for i in range((end - start).days)]


def reingest(storage: Storage, run_id: str, billing: Billing, start: dt.date, end: dt.date) -> IngestResult:
    """Rebuild events/ for UTC dates [start, end) from every landed batch (after a parsing fix, say).

    New event files are written first, then the manifest commits the run, then old files are deleted
    (the pending record lists them, so a crash in between is finished by the next run).
    """
    batches = sorted(storage.list_files(LANDING, BATCH_SUFFIXES), key=lambda f: (f.mtime, f.path))
    new, quarantine, rows, _ = read_batches(storage, batches, set())
    in_range = set(_days(start, end))
    kept, dups = dedupe(new.filter(pl.col("date").is_in(sorted(in_range))))
    kept = conform(kept, EVENT)
    by_date = event_files_by_date(storage)
    old = [p for d in sorted(in_range) for p in by_date.get(d, [])]
    dates = sorted(set(kept["date"].to_list()))
    files = [event_file(d, run_id) for d in dates]
    touched = merge_touched(
        touched_by(kept, billing),
        {t: {"dates": sorted(in_range), "local_dates": []} for t in set(new["type"].to_list())},
    )
    state.write_pending(storage, state.Pending(run_id=run_id, files=files, touched=touched, deletes=old))
    write_events(storage, kept, run_id)
    for (b,), part in quarantine.group_by(["batch"], maintain_order=True):
        storage.write_parquet(batch_quarantine_file(str(b)), part.with_columns(date=pl.lit(run_id[:8])))
    state.commit_manifest(storage, run_id, [{**r, "run_id": run_id} for r in rows])
    storage.delete(old)
    reasons = Counter(quarantine["reason"].to_list())
    return IngestResult(
        batches=len(batches),
        records=new.height + quarantine.height,
        valid=new.height,
        duplicates=dups.height,
        stored=kept.height,
        quarantined=dict(sorted(reasons.items())),
        touched=touched,
        files=files,
    )


def backfill(
    storage: Storage,
    meterset: MeterSet,
    start: dt.date,
    end: dt.date,
    *,
    slugs: list[str] | None = None,
    reingest_landing: bool = False,
    runner: Runner = DIRECT,
    log: Callable[[str], None] = print,
    progress: Callable[[int, int, str], None] | None = None,
    lock_ttl: int = LOCK_TTL,
) -> dict:
    """Recompute the tables of the selected meters for [start, end) from events/ (or re-read landing/).

    Idempotent: a second identical backfill rewrites the same partitions with the same rows.
    """
    if end <= start:
        raise ValueError(f"--to ({end}) must be after --from ({start})")
    started = time.perf_counter()
    selected = meterset.select(slugs)
    run_id = state.new_run_id()
    storage.check_root()
    state.acquire_lock(storage, run_id, lock_ttl)
    try:
        redo, stale = runner.step("recover", recover, storage)
        result = IngestResult()
        if reingest_landing:
            result = runner.step("reingest", reingest, storage, run_id, meterset.billing, start, end)
        dates = _days(start, end)
        # local dates of the range, widened by a day either side so every overlapping period is rebuilt
        local = _days(start - dt.timedelta(days=1), end + dt.timedelta(days=1))
        touched = {m.event_type: {"dates": dates, "local_dates": local} for m in selected.meters}
        state.write_pending(storage, state.Pending(run_id=run_id, touched=merge_touched(touched, redo)))
        for pending in stale:
            state.clear_pending(storage, pending.run_id)
        summary: dict = {}
        types = sorted(touched)
        for i, event_type in enumerate(types):
            if progress:
                progress(i, len(types), event_type)
            summary.update(recompute_all(storage, selected, {event_type: touched[event_type]}, runner))
        if redo:
            summary.update(recompute_all(storage, meterset, redo, runner))
        if progress:
            progress(len(types), len(types), "done")
        all_dates = sorted(event_files_by_date(storage))
        covers_all = not all_dates or (all_dates[0] >= start.isoformat() and all_dates[-1] < end.isoformat())
        fps = update_fingerprints(
            storage, meterset, first_run=False, rebuilt=[m.slug for m in selected.meters] if covers_all else []
        )
        state.clear_pending(storage, run_id)
        out = _summary(run_id, "backfill", result, summary, started, fps)
        out["stale_periods"] = stale_periods(storage, fps)
        out["range"] = [start.isoformat(), end.isoformat()]
        state.write_run_record(storage, run_id, out)
    finally:
        _release(storage, run_id)
    log(format_summary(out))
    return out
