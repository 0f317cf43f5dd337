"""The run and the backfill as plain functions over a storage root: importable without Prefect.

Each step takes and returns paths and small summaries, so `flows/prefect_flows.py` can run the very same
steps as Prefect tasks (with retries) without DataFrames crossing task boundaries.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from flows import recompute, state
from flows.recompute import EVENTS, event_file_infos_by_date, hourly_file, period_file  # noqa: F401 - re-exported
from flows.storage import TMP, FileInfo, Storage, arrow_for_readers
from meters import Billing, Meter, MeterSet
from transforms.dedupe import KEY, dedupe
from transforms.parse import BATCH_SUFFIXES, Parsed, parse_batch, with_raw_text
from transforms.schema import EVENT, QUARANTINE, conform, empty
from transforms.tables import key_runs
from transforms.validate import DATA_IS_TEXT, END_EVENT_DAY, FIRST_EVENT_DAY, validate
from transforms.windows import local_date

LANDING = "landing"
LOCK_TTL = 2 * 3600
EVENT_ROW_GROUP = 65_536
# events/ columns with few distinct values: the only ones worth a dictionary (ids, times and data are unique)
EVENT_DICTIONARY = ["specversion", "source", "type", "subject", "datacontenttype", "file", "batch", "date"]
FAN_GROUP = 16  # slices of days submitted at once (progress is reported between groups)
CHUNK_BYTES = 256 * 2**20  # JSON text parsed at once (see json_bytes): bounds ingest memory


class Runner:
    """How steps run: here, one after another. `flows/prefect_flows.py` runs them as Prefect tasks.

    `step` runs one named step; `fan` runs independent calls of one function (a slice of days each), which
    a Prefect runner submits concurrently to its task runner (threads, or a Dask cluster).
    """

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
    # re-ingest only: events the range held in events/ that no landed batch holds any more
    removed: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    # event type -> {"dates": UTC dates, "local_dates": billing-zone dates} of the events stored
    touched: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    manifest_rows: list[dict] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


# --- paths -----------------------------------------------------------------------------------------
def event_file(date: str, run_id: str) -> str:
    return f"{EVENTS}/date={date}/{run_id}.parquet"


def batch_quarantine_file(batch: str) -> str:
    return f"quarantine/records/{batch}.parquet"


def event_files_by_date(storage: Storage) -> dict[str, list[str]]:
    return {day: [f.path for f in infos] for day, infos in event_file_infos_by_date(storage).items()}


def history_dates(storage: Storage, meters: list[Meter]) -> list[str]:
    """The UTC dates a backfill must cover to rebuild these meters' whole history: every stored event date, and the
    dates no stored event falls on any more where their hourly partitions, day partials or excluded values remain
    (a re-ingest while a meter was absent from the meters file took those days' events away, not its files)."""
    dates = set(event_file_infos_by_date(storage))
    slugs = [m.slug for m in meters]
    for day, path in recompute.partition_days(storage, meters):
        if day in dates:
            continue
        if path.startswith("usage/") or storage.read_parquet([path]).filter(pl.col("meter").is_in(slugs)).height:
            dates.add(day)
    return sorted(dates)


def unbuilt_meters(storage: Storage, meterset: MeterSet, redo: dict | None = None) -> list[str]:
    """With no events stored, the meters nothing was built of (no table, no day partition or partial state) beyond
    what this run rebuilds anyway (`redo`: the days and periods of the crashed runs it rolls back or finishes, by
    event type): the run records them as built by their current definition. Not a meter left out of the meters
    file while a re-ingest emptied events/: its tables and partials of the events gone are still there (stale
    until rebuilt)."""
    out = []
    for m in meterset.meters:
        scope = (redo or {}).get(m.event_type, {})
        if not set(history_dates(storage, [m])) <= set(scope.get("dates", [])):
            continue
        periods = recompute.period_bounds(meterset.billing, scope.get("local_dates", []))["period_start"]
        if not {k.isoformat() for k in recompute.published_period_keys(storage, m.slug)} <= set(periods.to_list()):
            continue
        out.append(m.slug)
    return out


# --- finding and ingesting batches -------------------------------------------------------------------
def find_new_batches(storage: Storage) -> list[FileInfo]:
    """Landed files whose (path, size, mtime, etag) the manifest has not seen, in landing order."""
    manifest = state.read_manifest(storage)
    columns = [manifest[c].to_list() for c in ("path", "size", "mtime", "etag")]
    seen = set(zip(*columns, strict=True))
    files = storage.list_files(LANDING, prefer=set(columns[0]))  # a link to a file read through another: not new
    if not files and not manifest.height:  # never silently: a mistyped --root that exists reads nothing
        logging.getLogger(__name__).warning(
            "%s/ holds no files and no batch was ever read here: nothing to do "
            "(is --root the folder that holds landing/?)",
            storage.uri(LANDING),
        )
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
    digest = hashlib.sha256(path.encode() + b"\0")
    digest.update(content)  # fed separately: no copy of a batch that may be hundreds of MB
    return digest.hexdigest()[:24]


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
    records: list[pl.DataFrame] = []
    parsed_files: dict[str, tuple[str, Parsed]] = {}
    rejects: list[pl.DataFrame] = []
    rows: list[dict] = []
    unchanged = 0
    for order, info in enumerate(batches):
        try:
            raw = storage.read_bytes(info.path)
        except FileNotFoundError:  # deleted or moved away since the listing: no longer landed, nothing to read
            logging.getLogger(__name__).warning("%s was listed but is gone (deleted since): skipped", info.path)
            continue
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
        parsed_files[info.path] = (batch, parsed)
        records.append(
            parsed.records.with_columns(
                file=pl.lit(info.path),
                batch=pl.lit(batch),
                batch_order=pl.lit(order, pl.Int32),
                **{DATA_IS_TEXT: pl.lit(parsed.data_is_text)},
            )
        )
    if records:  # one validation for the whole chunk: row-wise parsing spreads over every core
        valid_all, rejected = validate(pl.concat(records))
        del records
        for (path,), part in rejected.group_by(["file"], maintain_order=True):
            batch, parsed = parsed_files[str(path)]
            part = with_raw_text(part, parsed).rename({"id": "event_id"})
            rejects.append(_quarantine_rows(part, "envelope", str(path), batch))
    else:
        valid_all = empty({**EVENT, "batch_order": pl.Int32})
    quarantine = pl.concat(rejects) if rejects else empty(QUARANTINE)
    return valid_all, quarantine, rows, unchanged


def touched_by(events: pl.DataFrame, billing: Billing) -> dict[str, dict[str, list[str]]]:
    """Per event type: the UTC dates and billing-zone local dates its events fall on."""
    if events.is_empty():
        return {}
    per = (
        events.lazy()
        .select("type", "date", local=local_date(pl.col("time"), billing.timezone))
        .group_by("type")
        .agg(pl.col("date").unique().sort(), pl.col("local").unique().sort().cast(pl.String))
        .collect()
    )
    return {r["type"]: {"dates": r["date"], "local_dates": r["local"]} for r in per.to_dicts()}


# Landed bytes to the JSON text they hold, roughly (measured on the bench data: Parquet ~11x, gzip ~8x):
# a chunk's memory follows the records it holds, not its compressed size.
EXPANSION = {".parquet": 10, ".gz": 8}


def json_bytes(info: FileInfo) -> int:
    """About how many bytes of JSON text a landed batch holds."""
    lower = info.path.lower()
    return info.size * next((f for suffix, f in EXPANSION.items() if lower.endswith(suffix)), 1)


def chunk_batches(batches: list[FileInfo], max_bytes: int) -> list[list[FileInfo]]:
    """Consecutive groups of batches (landing order kept) of at most `max_bytes` of JSON text each."""
    chunks: list[list[FileInfo]] = []
    size = 0
    for info in batches:
        weight = json_bytes(info)
        if not chunks or (size + weight > max_bytes and chunks[-1]):
            chunks.append([])
            size = 0
        chunks[-1].append(info)
        size += weight
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
    total = IngestResult(touched=merge_touched({}, redo))
    reasons: Counter[str] = Counter()
    state.write_pending(storage, state.Pending(run_id=run_id, touched=total.touched))
    for index, chunk in enumerate(chunk_batches(batches, chunk_bytes or CHUNK_BYTES)):
        part = _ingest_chunk(storage, f"{run_id}-{index:04d}", run_id, chunk, known, billing, total, reasons)
        total.manifest_rows.extend({**r, "run_id": run_id} for r in part)
        total.batches += len(part)  # the batches read: one deleted since the listing is not among them
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
    quarantine = with_duplicates(quarantine, dups)
    kept = conform(kept, EVENT)
    q_batches = sorted(set(quarantine["batch"].to_list()))
    files = [event_file(d, name) for d in sorted(set(kept["date"].to_list()))]
    files += [batch_quarantine_file(b) for b in q_batches]
    total.files.extend(files)
    total.touched = merge_touched(total.touched, touched_by(kept, billing))
    state.write_pending(storage, state.Pending(run_id=run_id, files=total.files, touched=total.touched))
    write_events(storage, kept, name)
    for (b,), part in quarantine.group_by(["batch"], maintain_order=True):
        storage.write_parquet(batch_quarantine_file(str(b)), part.with_columns(date=pl.lit(run_date(run_id))))
    reasons.update(quarantine.filter(pl.col("reason") != "duplicate")["reason"].to_list())
    total.unchanged += unchanged
    total.records += records_read(new, quarantine)
    total.valid += new.height
    total.duplicates += dups.height
    total.stored += kept.height
    return rows


def with_duplicates(quarantine: pl.DataFrame, dups: pl.DataFrame) -> pl.DataFrame:
    """The quarantine rows of a chunk plus one `dedupe` row per dropped copy."""
    if dups.is_empty():
        return quarantine
    dup_rows = dups.with_columns(
        stage=pl.lit("dedupe"),
        reason=pl.lit("duplicate"),
        message=pl.lit("same (source, id) on the same UTC date as ") + pl.col("_dup"),
        event_id=pl.col("id"),
        raw=_envelope_json(dups),
    )
    return pl.concat([quarantine, conform(dup_rows, QUARANTINE)])


def records_read(valid: pl.DataFrame, quarantine: pl.DataFrame) -> int:
    """Records read: the valid ones and the rejected ones. A dropped copy is among the valid ones already (its
    `dedupe` row is not another record), and an unreadable file counts under its reason only."""
    return valid.height + quarantine.filter(~pl.col("stage").is_in(["file", "dedupe"])).height


def run_date(run_id: str) -> str:
    """The UTC day a run started, YYYY-MM-DD like every other `date` column (run ids start YYYYMMDD)."""
    return f"{run_id[:4]}-{run_id[4:6]}-{run_id[6:8]}"


def write_events(storage: Storage, kept: pl.DataFrame, run_id: str) -> None:
    """One file per UTC date, rows in landing order: tables built from them keep that order, so the same
    events give the same files."""
    ordered = kept.sort("date", maintain_order=True)
    table = arrow_for_readers(ordered)  # converted once; each date is a zero-copy slice
    items = [(event_file(day, run_id), table.slice(at, n)) for day, at, n in key_runs(ordered, "date")]
    storage.write_parquet_many(items, row_group_size=EVENT_ROW_GROUP, dictionary=EVENT_DICTIONARY)


def dedupe_against_store(storage: Storage, new: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """`dedupe` against the stored events of the dates `new` falls on.

    One streaming scan keeps only the stored keys whose id hashes like a new id (a superset of the
    duplicates; `dedupe` then matches the whole key exactly), so the work and memory past the read follow
    the new events, not everything stored on their dates.
    """
    by_date = event_files_by_date(storage)
    files = [f for day in new["date"].unique().sort().to_list() for f in by_date.get(day, [])]
    if not files:  # nothing stored on these dates yet
        return dedupe(new)
    new_ids = new.select(pl.col("id").hash().unique()).to_series().implode()
    keys = storage.collect(storage.scan_parquet(files).select(KEY).filter(pl.col("id").hash().is_in(new_ids)))
    return dedupe(new, keys)


def merge_touched(a: dict, b: dict) -> dict:
    out: dict[str, dict[str, list[str]]] = {}
    for src in (a, b):
        for typ, parts in src.items():
            slot = out.setdefault(typ, {"dates": [], "local_dates": []})
            for key in ("dates", "local_dates"):
                slot[key] = sorted(set(slot[key]) | set(parts.get(key, [])))
    return out


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
    lock_wait: float = 0,
) -> dict:
    """One hourly run: ingest what is new, recompute what it touched, publish, commit.

    What it processes is decided by the manifest, never by the clock; `now` (a flow passes its scheduled
    start time) only names the run. `lock_wait`: seconds to wait while another run holds the lock (0, the
    command line's choice: fail at once).
    """
    started = time.perf_counter()
    run_id = state.new_run_id(now)
    storage.check_root(create=not storage.is_s3)
    state.wait_for_lock(storage, run_id, lock_ttl, lock_wait, log)
    keeper = state.LockKeeper(storage, run_id, lock_ttl)
    try:
        redo, stale = runner.step("recover", recover, storage)
        batches = runner.step("find-new-batches", find_new_batches, storage)
        unbuilt = [] if event_files_by_date(storage) else unbuilt_meters(storage, meterset, redo)
        result: IngestResult = runner.step("ingest", ingest, storage, run_id, batches, meterset.billing, redo)
        for pending in stale:
            state.clear_pending(storage, pending.run_id)
        # Before anything is recomputed: a run killed after its commit must not leave the record behind.
        recomputing = {m.slug for m in meterset.meters if m.event_type in result.touched}
        fingerprints = update_fingerprints(
            storage,
            meterset,
            rebuilt=unbuilt,
            recomputed=recomputing,
            # a crashed run or re-ingest finished or rolled back changes events/ too (its tables were not rebuilt)
            events_changed=result.stored > 0 or bool(stale),
        )
        state.refresh_lock(storage, run_id, lock_ttl)
        meters_summary = recompute_all(storage, meterset, result.touched, runner)
        state.refresh_lock(storage, run_id, lock_ttl)
        if result.manifest_rows or result.files:
            runner.step("commit", state.commit_manifest, storage, run_id, result.manifest_rows)
        state.clear_pending(storage, run_id)
        summary = _summary(run_id, "run", result, meters_summary, started, fingerprints)
        summary["stale_periods"] = stale_periods(storage, fingerprints)
        state.write_run_record(storage, run_id, summary)
    finally:
        _release(storage, run_id, keeper)
    log(format_summary(summary))
    return summary


def _release(storage: Storage, run_id: str, keeper: state.LockKeeper) -> None:
    """Release the lock without hiding the run's own error (storage may be the thing that failed); its keeper
    first, so that no refresh in flight brings it back."""
    keeper.stop()
    try:
        state.release_lock(storage, run_id)
    except Exception as exc:  # noqa: BLE001 - the lock expires by itself; the original error matters more
        logging.getLogger(__name__).warning("could not release the run lock (it expires by itself): %s", exc)


def recompute_all(
    storage: Storage,
    meterset: MeterSet,
    touched: dict,
    runner: Runner = DIRECT,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict:
    """Recompute every meter of the touched event types: slices of days (fanned out), then periods."""
    meters = [m for m in meterset.meters if m.event_type in touched]
    if not meters:
        return {}
    types = {m.event_type for m in meters}
    dates = sorted({d for t in types for d in touched[t]["dates"]})
    local = sorted({d for t in types for d in touched[t].get("local_dates", [])})
    todo = runner.step("plan-recompute", recompute.plan, storage, meters, meterset.billing, dates, local)
    counts = {m.slug: {"hourly_rows": 0, "excluded": 0} for m in meters}
    calls = [(storage, meters, meterset.billing, *piece) for piece in todo.slices]
    for at in range(0, len(calls), FAN_GROUP):
        group = calls[at : at + FAN_GROUP]
        for result in runner.fan("recompute-days", recompute.recompute_days, group):
            for slug, numbers in result.items():
                for key, value in numbers.items():
                    counts[slug][key] += value
        if progress:
            progress(at + len(group), len(calls) + 1, "days")
    period_rows = runner.step(
        "recompute-periods", recompute.recompute_periods, storage, meters, meterset.billing, todo.period_starts
    )
    summary: dict[str, dict] = {}
    for meter in meters:
        rows_p = period_rows[meter.slug]["rows"]
        summary[meter.slug] = {
            "hourly_partitions": len(todo.touched_days),
            "periods": len(todo.period_starts),
            "hourly_rows": counts[meter.slug]["hourly_rows"],
            "period_rows": rows_p,
            "excluded": counts[meter.slug]["excluded"],
            "latest_period": period_rows[meter.slug]["latest"],  # a period this meter has rows in
        }
    return summary


MIXED = "mixed"  # a stored fingerprint no definition has: tables built partly by one definition, partly by another


def update_fingerprints(
    storage: Storage,
    meterset: MeterSet,
    rebuilt: list[str] | None = None,
    recomputed: set[str] | None = None,
    events_changed: bool = False,
) -> dict:
    """Record which meter definitions built the tables; report meters whose history is stale.

    `_state/meters.json` holds, per meter, the fingerprint of the one definition that built all its tables.
    A stale meter that is `recomputed` (by a run or a partial backfill) gets tables from two definitions:
    it is recorded as MIXED, so going back to the old definition does not make it look current. A stale meter
    that is not recomputed while events are stored (`events_changed`) is recorded as MIXED too: its old
    definition may count those events (another event type, say) and its tables miss them. A meter absent
    from the meters file misses the events stored meanwhile: its record is dropped, so adding it back reports
    it as new.
    """
    stored = state.read_fingerprints(storage)
    current = meterset.fingerprints()
    changed = False
    for slug, fp in current.items():
        if stored.get(slug) == fp:
            continue
        if rebuilt is not None and slug in rebuilt:
            stored[slug] = fp
            changed = True
        elif slug in stored and (slug in (recomputed or ()) or events_changed) and stored[slug] != MIXED:
            stored[slug] = MIXED
            changed = True
    if events_changed:
        for slug in [s for s in stored if s not in current]:
            del stored[slug]
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
        "events_removed": result.removed,
        "quarantined": result.quarantined,
        "quarantined_total": sum(result.quarantined.values()),
        # events_read = events_valid + records_quarantined; an unreadable file is one quarantine row, not a record
        "records_quarantined": sum(v for k, v in result.quarantined.items() if k != "unreadable_file"),
        "files_unreadable": result.quarantined.get("unreadable_file", 0),
        "meters_recomputed": sorted(meters),
        "periods_recomputed": sum(m["periods"] for m in meters.values()),
        "hourly_partitions_recomputed": sum(m["hourly_partitions"] for m in meters.values()),
        "rows_written": {s: {"hourly": m["hourly_rows"], "period": m["period_rows"]} for s, m in meters.items()},
        "excluded_by_meter": {s: m["excluded"] for s, m in meters.items() if m["excluded"]},
        "latest_periods": {s: m["latest_period"] for s, m in meters.items() if m.get("latest_period")},
        "stale_meters": stale,
        "stale_periods": {},
    }


def _files_apart(summary: dict) -> str:
    """' (R records, F unreadable files)' when some quarantined rows are whole files: events read counts records."""
    files = summary.get("files_unreadable", 0)
    if not files:
        return ""
    records = summary["quarantined_total"] - files
    return f" ({records} record{'' if records == 1 else 's'}, {files} unreadable file{'' if files == 1 else 's'})"


def format_summary(summary: dict) -> str:
    q = ", ".join(f"{k} {v}" for k, v in summary["quarantined"].items()) or "none"
    lines = [
        f"run {summary['run_id']} ({summary['kind']}): {summary['seconds']:.2f}s",
        f"  batches {summary['batches']} (unchanged {summary['batches_unchanged']}), events read {summary['events_read']},"
        f" valid {summary['events_valid']}, duplicates dropped {summary['duplicates_dropped']},"
        f" stored {summary['events_stored']}",
        f"  quarantined {summary['quarantined_total']}{_files_apart(summary)}: {q}",
        f"  meters recomputed {len(summary['meters_recomputed'])}, periods {summary['periods_recomputed']},"
        f" hourly partitions {summary['hourly_partitions_recomputed']}",
    ]
    if removed := summary.get("events_removed"):  # a re-ingest's totals can fall: say why
        lines.insert(
            2,
            f"  removed from events/: {removed} event{'' if removed == 1 else 's'} of the range that no landed"
            " batch holds any more (re-ingest reads landing/ as it is now)",
        )
    for slug, rows in summary["rows_written"].items():
        lines.append(f"    {slug}: {rows['period']} period rows, {rows['hourly']} hourly rows")
    for slug, periods in summary.get("stale_periods", {}).items():
        if periods:
            shown = ", ".join(periods[:6]) + (f" and {len(periods) - 6} more" if len(periods) > 6 else "")
            lines.append(f"  stale periods of {slug}: {shown}")
    if summary["stale_meters"]:
        lines.append(
            "  stale: " + ", ".join(summary["stale_meters"]) + " changed or were added after their history was"
            " built; rebuild with `meterlake backfill --from FIRST --to END --meter SLUG` over their whole"
            " history (`meterlake status` prints the exact command)"
        )
    return "\n".join(lines)


# --- backfill ----------------------------------------------------------------------------------------
def reingest(storage: Storage, run_id: str, meterset: MeterSet, start: dt.date, end: dt.date) -> IngestResult:
    """Rebuild events/ for UTC dates [start, end) from every landed batch (after a parsing fix, say).

    New event files are written first, then the manifest commits the run, then old files are deleted
    (the pending record lists them, so a crash in between is finished by the next run).

    A batch no run has processed yet (landed since, or re-landed with new content) is recorded in the
    manifest here, so its events outside the range are stored here too, deduplicated against the store as
    an hourly run would: the next run will not read it again.
    """
    unprocessed = {f.path for f in find_new_batches(storage)}
    batches = sorted(storage.list_files(LANDING, BATCH_SUFFIXES), key=lambda f: (f.mtime, f.path))
    new, quarantine, rows, _ = read_batches(storage, batches, set())
    first, last = start.isoformat(), end.isoformat()
    in_range = (pl.col("date") >= first) & (pl.col("date") < last)
    unread = pl.col("file").is_in(sorted(unprocessed))
    # Deduplicated over every date (the key holds the date, so the kept rows in range are the same): the
    # quarantine files are rewritten whole, one per batch, and must keep every batch's dropped copies.
    kept_all, dups = dedupe(new)
    outside, dups_outside = dedupe_against_store(storage, kept_all.filter(~in_range & unread))
    dups = pl.concat([dups, dups_outside]) if dups_outside.height else dups
    quarantine = with_duplicates(quarantine, dups)
    kept = conform(pl.concat([kept_all.filter(in_range), outside]), EVENT)
    by_date = event_files_by_date(storage)
    old = [p for d, paths in by_date.items() if first <= d < last for p in paths]
    removed = _gone(storage, old, kept_all.filter(in_range))
    # a batch that no longer has a rejected record must not keep the quarantine file of an earlier ingest
    rejected = set(quarantine["batch"].to_list())
    stale = {batch_quarantine_file(r["batch"]) for r in rows if r["batch"] not in rejected}
    old += [f.path for f in storage.list_files("quarantine/records", (".parquet",)) if f.path in stale]
    dates = sorted(set(kept["date"].to_list()))
    files = [event_file(d, run_id) for d in dates]
    # The range's dates and billing periods whose events or tables may change (the others hold nothing to rebuild),
    # for every meter: a run that finishes this re-ingest after a crash past its commit has only this record, and a
    # period or an event type whose every event is gone from landing/ must be emptied too.
    rebuilt, periods = recompute.range_scope(storage, list(meterset.meters), meterset.billing, start, end)
    touched = merge_touched(
        touched_by(kept, meterset.billing),
        {m.event_type: {"dates": rebuilt, "local_dates": periods} for m in meterset.meters},
    )
    state.write_pending(storage, state.Pending(run_id=run_id, files=files, touched=touched, deletes=old))
    write_events(storage, kept, run_id)
    for (b,), part in quarantine.group_by(["batch"], maintain_order=True):
        storage.write_parquet(batch_quarantine_file(str(b)), part.with_columns(date=pl.lit(run_date(run_id))))
    state.forget_batches(storage, {r["batch"] for r in rows})  # their events are gone from the range
    state.commit_manifest(storage, run_id, [{**r, "run_id": run_id} for r in rows])
    storage.delete(old)
    reasons = Counter(quarantine.filter(pl.col("reason") != "duplicate")["reason"].to_list())
    return IngestResult(
        batches=len(rows),
        records=records_read(new, quarantine),
        valid=new.height,
        # the dropped copies a run would count: those of the range, and all of the batches no run had read
        duplicates=dups.filter(in_range | unread).height,
        stored=kept.height,
        removed=removed,
        quarantined=dict(sorted(reasons.items())),
        touched=touched,
        files=files,
    )


def _gone(storage: Storage, stored: list[str], kept: pl.DataFrame) -> int:
    """How many events of the `stored` files a re-ingest drops (their batch left landing/ or changed).

    A re-ingest reads landing/ as it is now, so billing totals can fall; the summary must say why.
    """
    if not stored:
        return 0
    before = storage.collect(storage.scan_parquet(stored).select(KEY).unique())
    return before.join(kept.select(KEY).unique(), on=KEY, how="anti", nulls_equal=True).height


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
    lock_wait: float = 0,
) -> dict:
    """Recompute the tables of the selected meters for [start, end) from events/ (or re-read landing/).

    Idempotent: a second identical backfill rewrites the same partitions with the same rows. `lock_wait`: as
    for `run`.
    """
    if end <= start:
        # the command line checks its --from/--to itself; this is what the Python API and a deployment run
        # (parameters `start` and `end`) report
        raise ValueError(f"the backfill's end ({end}) must be after its start ({start})")
    if start < FIRST_EVENT_DAY or end > END_EVENT_DAY:  # also for a deployment run, unchecked by the command line
        raise ValueError(f"a backfill lies within {FIRST_EVENT_DAY}..{END_EVENT_DAY}, the years event times can hold")
    started = time.perf_counter()
    selected = meterset.select(slugs)
    run_id = state.new_run_id()
    storage.check_root()
    state.wait_for_lock(storage, run_id, lock_ttl, lock_wait, log)
    keeper = state.LockKeeper(storage, run_id, lock_ttl)
    try:
        redo, stale = runner.step("recover", recover, storage)
        if reingest_landing:  # re-read events move every meter of their types, not only the selected ones
            selected = meterset
        # Before anything is re-ingested or recomputed: a kill right after the re-ingest's commit must still leave
        # the meters it moves recorded as rebuilt by mixed definitions, and absent meters' records dropped.
        recomputing = {m.slug for m in selected.meters} | {m.slug for m in meterset.meters if m.event_type in redo}
        changed = reingest_landing or bool(stale)  # as in `run`: a recovered run changes events/ as well
        update_fingerprints(storage, meterset, recomputed=recomputing, events_changed=changed)
        result = IngestResult()
        if reingest_landing:
            result = runner.step("reingest", reingest, storage, run_id, meterset, start, end)
        # the range's dates and periods that hold anything: the others have nothing to rebuild or delete
        scope = (storage, list(selected.meters), meterset.billing, start, end)
        dates, local = runner.step("backfill-scope", recompute.range_scope, *scope)
        touched = {m.event_type: {"dates": dates, "local_dates": local} for m in selected.meters}
        if reingest_landing:  # and the dates outside the range where batches no run had read added events
            touched = merge_touched(touched, result.touched)
        state.write_pending(storage, state.Pending(run_id=run_id, touched=merge_touched(touched, redo)))
        for pending in stale:
            state.clear_pending(storage, pending.run_id)
        if progress:
            progress(0, 1, "days")
        summary = recompute_all(storage, selected, touched, runner, progress)
        if redo:
            summary.update(recompute_all(storage, meterset, redo, runner))
        utc = (dt.datetime.combine(d, dt.time(), dt.UTC) for d in (start, end))
        storage.delete(recompute.orphan_periods(storage, selected.meters, meterset.billing, *utc, local))
        if progress:
            progress(1, 1, "done")
        state.refresh_lock(storage, run_id, lock_ttl)  # still ours (LockKeeper), before the definitions are recorded
        all_dates = history_dates(storage, list(selected.meters))
        covers_all = not all_dates or (all_dates[0] >= start.isoformat() and all_dates[-1] < end.isoformat())
        fps = update_fingerprints(storage, meterset, rebuilt=[m.slug for m in selected.meters] if covers_all else [])
        state.clear_pending(storage, run_id)
        out = _summary(run_id, "backfill", result, summary, started, fps)
        out["stale_periods"] = stale_periods(storage, fps)
        out["range"] = [start.isoformat(), end.isoformat()]
        state.write_run_record(storage, run_id, out)
    finally:
        _release(storage, run_id, keeper)
    log(format_summary(out))
    return out
