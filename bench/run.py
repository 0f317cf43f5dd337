"""Benchmark (not a test): meterlake's full job against the same job in DuckDB SQL and a Polars read floor.

    ./dev bench                      # 1M events, JSONL and Parquet, 3 repeats
    ./dev bench --quick              # smoke run: 100k events, 1 repeat
    ./dev bench --events 10M --repeat 5
    ./dev bench --incremental        # history 10x --events, new batch --events/10 (--history, --new)
    ./dev bench --profile            # plus one cProfiled meterlake run per format (top functions)

Data comes from bench/generate.py (fixed seed) and is cached under bench/out/data/ by its parameters
and the generator's source hash. For each format and each repeat, in this one process:

- ``meterlake``: ``pipeline.run`` on a fresh root whose ``landing`` is a symlink to the generated
  files, end to end (validation, dedupe, quarantine, every meter, hourly and period tables);
- ``duckdb``: bench/duckdb_job.py, the same meters in plain SQL, every table written with COPY;
- ``floor``: Polars reading the same files and nothing else (JSONL: copies without the malformed
  lines, read with the canonical schema; Parquet: ``pl.read_parquet`` per file).

Wall time (perf_counter), CPU time of the process, events per second (records / median seconds) and
peak RSS (VmRSS sampled every 5 ms in a thread; peak minus the RSS at the phase start, the absolute
peak, and the RSS at the phase start: a phase after a bigger one starts with memory the allocator kept,
and its delta then understates its need, which a ``#`` note says) are printed as ``name value unit``
lines, then a table. Medians are over repeats; ratios are of median seconds in this run (``a_over_b`` =
seconds of a / seconds of b).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import gc
import hashlib
import inspect
import io
import json
import os
import platform
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import duckdb  # noqa: E402
import duckdb_job  # noqa: E402
import generate  # noqa: E402
import orjson  # noqa: E402
import polars as pl  # noqa: E402

from flows import pipeline  # noqa: E402
from flows.storage import Storage  # noqa: E402
from meters import MeterConfigError, MeterSet, load_meters_file  # noqa: E402
from transforms.schema import ENVELOPE  # noqa: E402

MB = 1024 * 1024
SEED = 0
TOLERANCE = 1e-6
START = "2024-01-01"
GENERATOR_DEFAULTS: dict[str, Any] = {"start": START, "days": 60, "subjects": 2000, "bad_fraction": 0.05}


# --- small helpers ---------------------------------------------------------------------------------
def parse_count(text: str) -> int:
    """'1M', '10M', '100k', '2.5m', '1e6', '1_000_000' -> int."""
    m = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?(?:[eE][0-9]+)?)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (e.g. 100k, 1M, 10M)")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()]
    value = round(float(m.group(1).replace("_", "")) * scale)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def human(n: int) -> str:
    for unit, size in (("M", 10**6), ("k", 10**3)):
        if n >= size and n % (size // 10) == 0:
            return f"{n / size:g}{unit}"
    return str(n)


def rss_bytes() -> int:
    with open("/proc/self/status", "rb") as fh:
        for line in fh:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


PROCESS_RSS_AT_START = rss_bytes()  # after the imports; a phase that starts far above it inherits freed memory


def loadavg() -> tuple[float, float, float]:
    return os.getloadavg()


class RssSampler:
    """Peak VmRSS of this process while the block runs, sampled every `interval` seconds in a thread."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            r = rss_bytes()
            if r > self.peak:
                self.peak = r

    def __enter__(self) -> RssSampler:
        self.start = self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


@dataclass
class Sample:
    seconds: float
    cpu_seconds: float
    rss_start: int
    rss_peak: int
    result: Any = None
    steps: dict[str, float] = field(default_factory=dict)

    @property
    def rss_delta(self) -> int:
        return self.rss_peak - self.rss_start


def measure(fn: Callable[[], Any]) -> Sample:
    """Run fn once: wall and CPU seconds, RSS at start and peak. Collects garbage first."""
    gc.collect()
    with RssSampler() as rss:
        cpu0, t0 = time.process_time(), time.perf_counter()
        result = fn()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return Sample(seconds, cpu, rss.start, rss.peak, result)


class StepTimer:
    """A pipeline `step` runner that runs each step directly and adds up its wall time by name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def grouped(self, total: float) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, s in self.seconds.items():
            key = "recompute" if name.startswith("recompute-") else name
            out[key] = out.get(key, 0.0) + s
        out["other"] = max(total - sum(out.values()), 0.0)
        return out


def timed(timer: StepTimer) -> dict[str, Any]:
    """Keyword arguments that make pipeline.run / backfill time their steps with `timer`.

    Follows the pipeline's step protocol (a `Runner` with `step` and `fan`, or an older `step`
    callable); with neither, steps are not timed and only the end-to-end time is reported.
    """
    params = inspect.signature(pipeline.run).parameters
    base = getattr(pipeline, "Runner", None)
    if "runner" in params and base is not None:

        class TimedRunner(base):  # type: ignore[misc, valid-type]
            def step(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
                return timer(name, super().step, name, fn, *args)

            def fan(self, name: str, fn: Callable[..., Any], calls: list[tuple]) -> list[Any]:
                return timer(name, super().fan, name, fn, calls)

        return {"runner": TimedRunner()}
    if "step" in params:
        return {"step": timer}
    return {}


def quiet(_: str) -> None:
    pass


def rmtree(path: Path) -> None:
    """Remove a work folder; symlinks inside are unlinked, never followed."""
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


# --- data ------------------------------------------------------------------------------------------
def generator_hash() -> str:
    return hashlib.sha256((HERE / "generate.py").read_bytes()).hexdigest()[:10]


@dataclass
class Dataset:
    fmt: str
    folder: Path
    files: list[str]
    records: int
    bytes: int
    kinds: dict[str, int]
    generated_seconds: float | None  # None: taken from the cache

    @property
    def landing(self) -> Path:
        return self.folder / "landing"


def dataset(out: Path, fmt: str, n: int, files: int, seed: int = SEED, **options: Any) -> Dataset:
    """Generated batches under out/data/<parameters>/landing, reused while parameters and generator match."""
    # options equal to the generator's defaults are left out, so the same data is cached once
    options = {k: v for k, v in options.items() if GENERATOR_DEFAULTS.get(k) != v}
    opts = "".join(f"-{k}{re.sub(r'[^0-9A-Za-z.]', '', str(v))}" for k, v in sorted(options.items()))
    folder = out / "data" / f"{fmt}-n{n}-files{files}-seed{seed}{opts}-g{generator_hash()}"
    marker = folder / "summary.json"
    if marker.exists():
        s = json.loads(marker.read_text())
        return Dataset(fmt, folder, s["files"], s["records"], s["bytes"], s["kinds"], None)
    rmtree(folder)
    writer = generate.write_parquet if fmt == "parquet" else generate.write_jsonl
    s = writer(folder / "landing", n, seed, files, **options)
    marker.write_text(json.dumps(s, indent=1))
    return Dataset(fmt, folder, s["files"], s["records"], s["bytes"], s["kinds"], s["seconds"])


def clean_jsonl(ds: Dataset) -> list[str]:
    """Copies of the JSONL files without the lines that are not a JSON object (made once, cached)."""
    folder = ds.folder / "clean"
    marker = ds.folder / "clean.json"
    if marker.exists():
        return json.loads(marker.read_text())
    rmtree(folder)
    folder.mkdir(parents=True)
    out = []
    for f in ds.files:
        keep = []
        for line in Path(f).read_bytes().split(b"\n"):
            if not line.strip():
                continue
            try:
                ok = isinstance(orjson.loads(line), dict)
            except orjson.JSONDecodeError:
                ok = False
            if ok:
                keep.append(line)
        target = folder / Path(f).name
        target.write_bytes(b"\n".join(keep) + b"\n")
        out.append(str(target))
    marker.write_text(json.dumps(out))
    return out


# --- the three engines -----------------------------------------------------------------------------
def fresh_root(work: Path, name: str, landing: Path | None = None) -> Path:
    root = work / name
    rmtree(root)
    root.mkdir(parents=True)
    if landing is not None:
        os.symlink(landing.resolve(), root / "landing", target_is_directory=True)
    return root


def run_meterlake(root: Path, meterset: MeterSet) -> Sample:
    timer = StepTimer()
    sample = measure(lambda: pipeline.run(Storage(str(root)), meterset, log=quiet, **timed(timer)))
    sample.steps = timer.grouped(sample.seconds)
    return sample


def meterlake_totals(root: Path, meterset: MeterSet) -> dict[str, tuple[float, int]]:
    """(sum of value, rows) of each meter's published period table."""
    out = {}
    for meter in meterset.meters:
        files = sorted(str(p) for p in (root / "usage" / meter.slug / "period").glob("**/*.parquet"))
        if not files:
            out[meter.slug] = (0.0, 0)
            continue
        df = pl.read_parquet(files, hive_partitioning=False)
        out[meter.slug] = (float(df["value"].sum()), df.height)
    return out


def floor_read(ds: Dataset, clean: list[str] | None) -> int:
    """Read every file with Polars and nothing else; keep the frames until the end, like a job would."""
    if ds.fmt == "jsonl":
        frames = [pl.read_ndjson(f, schema=ENVELOPE) for f in clean or []]
    else:
        frames = [pl.read_parquet(f) for f in ds.files]
    return sum(f.height for f in frames)


def compare(a: dict[str, tuple[float, int]], b: dict[str, tuple[float, int]]) -> list[str]:
    """Meters whose period totals (sum of value, row count) differ beyond the relative tolerance."""
    bad = []
    for slug in a:
        (sa, ra), (sb, rb) = a[slug], b.get(slug, (float("nan"), -1))
        scale = max(abs(sa), abs(sb), 1e-300)
        if not abs(sa - sb) <= TOLERANCE * scale or ra != rb:
            bad.append(f"{slug}: sum {sa!r} vs {sb!r} (rel {abs(sa - sb) / scale:.2e}), rows {ra} vs {rb}")
    return bad


# --- reporting -------------------------------------------------------------------------------------
class Report:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def figure(self, name: str, value: float | int | str, unit: str) -> None:
        if isinstance(value, float):
            if unit in ("s",):
                text = f"{value:.3f}"
            elif unit in ("x", "load"):
                text = f"{value:.2f}"
            else:
                text = f"{value:.0f}"
        else:
            text = str(value)
        line = f"{name} {text} {unit}"
        self.lines.append(line)
        print(line, flush=True)

    @staticmethod
    def note(text: str) -> None:
        print(f"# {text}", flush=True)


def med(values: list[float]) -> float:
    return statistics.median(values)


def git_state() -> str:
    """The commit measured, and whether engine code differs from it (others edit while we measure)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "flows", "transforms", "meters"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    changed = [line[3:] for line in dirty if line.strip()]
    return f"HEAD {head}" + (f" + uncommitted engine changes: {', '.join(changed)}" if changed else ", clean engine")


def machine_facts(rep: Report, when: str) -> None:
    one, five, fifteen = loadavg()
    if when == "start":
        cpu = ""
        with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
        mem = {}
        with contextlib.suppress(OSError), open("/proc/meminfo") as fh:
            for ln in fh:
                k, v = ln.split(":", 1)
                mem[k] = int(v.split()[0]) * 1024
        rep.note(f"{platform.node()} {platform.platform()}; CPU {cpu or 'unknown'}")
        rep.note(
            f"python {platform.python_version()}, polars {pl.__version__}, duckdb {duckdb.__version__}; "
            f"started {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M:%S} UTC"
        )
        rep.note(f"code: {git_state()}")
        rep.figure("machine.cores", os.cpu_count() or 0, "cores")
        rep.figure("machine.cores_usable", len(os.sched_getaffinity(0)), "cores")
        rep.figure("machine.polars_threads", pl.thread_pool_size(), "threads")
        rep.figure("machine.mem_total", mem.get("MemTotal", 0) / MB, "MB")
        rep.figure("machine.mem_available.start", mem.get("MemAvailable", 0) / MB, "MB")
    rep.figure(f"machine.loadavg_1m.{when}", one, "load")
    rep.figure(f"machine.loadavg_5m.{when}", five, "load")
    rep.figure(f"machine.loadavg_15m.{when}", fifteen, "load")


def engine_figures(rep: Report, prefix: str, samples: list[Sample], records: int) -> dict[str, float]:
    secs = [s.seconds for s in samples]
    m = med(secs)
    rep.figure(f"{prefix}.seconds.median", m, "s")
    if len(samples) > 1:
        rep.figure(f"{prefix}.seconds.min", min(secs), "s")
        rep.figure(f"{prefix}.seconds.max", max(secs), "s")
    rep.figure(f"{prefix}.cpu_seconds.median", med([s.cpu_seconds for s in samples]), "s")
    rep.figure(f"{prefix}.events_per_second", records / m, "ev/s")
    delta = med([s.rss_delta for s in samples]) / MB
    peak = med([s.rss_peak for s in samples]) / MB
    start = med([s.rss_start for s in samples]) / MB
    rep.figure(f"{prefix}.peak_rss_delta", delta, "MB")
    rep.figure(f"{prefix}.peak_rss", peak, "MB")
    rep.figure(f"{prefix}.rss_at_start", start, "MB")
    if start - PROCESS_RSS_AT_START / MB > 500:
        rep.note(
            f"{prefix}: this phase started at {start:.0f} MB RSS, memory an earlier phase freed but the allocator "
            "kept, so its peak_rss_delta understates what it needs; measure it in a process of its own "
            "(in full mode: --formats with one format)"
        )
    steps = sorted({k for s in samples for k in s.steps})
    for k in steps:
        rep.figure(f"{prefix}.step.{k}.seconds.median", med([s.steps.get(k, 0.0) for s in samples]), "s")
    cpu = med([s.cpu_seconds for s in samples])
    return {
        "median": m,
        "min": min(secs),
        "max": max(secs),
        "cpu": cpu,
        "eps": records / m,
        "delta": delta,
        "peak": peak,
    }


def print_table(rows: list[tuple[str, str, dict[str, float]]]) -> None:
    head = (
        f"{'format':<8} {'engine':<10} {'median s':>9} {'min s':>8} {'max s':>8} {'cpu s':>8} {'events/s':>10}"
        f" {'peak dRSS MB':>13} {'peak RSS MB':>12}"
    )
    print()
    print(head)
    print("-" * len(head))
    for fmt, engine, f in rows:
        print(
            f"{fmt:<8} {engine:<10} {f['median']:>9.3f} {f['min']:>8.3f} {f['max']:>8.3f} {f['cpu']:>8.2f}"
            f" {f['eps']:>10,.0f}"
            f" {f['delta']:>13,.0f} {f['peak']:>12,.0f}"
        )


def profile_run(label: str, fn: Callable[[], Any], out: Path, top: int = 25) -> None:
    prof = cProfile.Profile()
    gc.collect()
    prof.enable()
    fn()
    prof.disable()
    path = out / f"profile-{label}.prof"
    prof.dump_stats(str(path))
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(key).print_stats(top)
        print(f"\n# profile {label}, top {top} by {key} (full profile: {path})")
        print("\n".join(ln for ln in buf.getvalue().splitlines() if ln.strip()))


# --- modes -----------------------------------------------------------------------------------------
def warm_up(out: Path, work: Path, meterset: MeterSet, formats: list[str]) -> None:
    """One tiny untimed run of each engine, so imports and first-call setup are not timed."""
    for fmt in formats:
        ds = dataset(out, fmt, 2000, 2, days=1)  # one day: few partitions to write
        root = fresh_root(work, f"warmup-{fmt}", ds.landing)
        pipeline.run(Storage(str(root)), meterset, log=quiet)
        duckdb_job.run(ds.files, fmt, meterset, work / f"warmup-{fmt}-duckdb")
        floor_read(ds, clean_jsonl(ds) if fmt == "jsonl" else None)
        rmtree(root)
        rmtree(work / f"warmup-{fmt}-duckdb")


def full_mode(args: argparse.Namespace, rep: Report, meterset: MeterSet, out: Path, work: Path) -> None:
    table: list[tuple[str, str, dict[str, float]]] = []
    loads = [loadavg()[0]]
    for fmt in args.formats:
        ds = dataset(out, fmt, args.events, args.files, subjects=args.subjects)
        clean = clean_jsonl(ds) if fmt == "jsonl" else None
        rep.note(
            f"{fmt}: {len(ds.files)} files in {ds.landing}"
            + (f" (generated in {ds.generated_seconds} s)" if ds.generated_seconds else " (cached)")
        )
        rep.figure(f"{fmt}.records", ds.records, "records")
        rep.figure(f"{fmt}.bytes", ds.bytes / MB, "MB")
        samples: dict[str, list[Sample]] = {"meterlake": [], "duckdb": [], "floor": []}
        mismatches: list[str] = []
        summary: dict = {}
        for r in range(args.repeat):
            loads.append(loadavg()[0])
            # (a) meterlake, fresh root
            root = fresh_root(work, f"{fmt}-meterlake-{r}", ds.landing)
            s = run_meterlake(root, meterset)
            summary = s.result
            ml_totals = meterlake_totals(root, meterset)
            rmtree(root)
            samples["meterlake"].append(s)
            # (b) DuckDB
            dd_out = work / f"{fmt}-duckdb-{r}"
            rmtree(dd_out)
            s = measure(lambda ds=ds, dd_out=dd_out: duckdb_job.run(ds.files, ds.fmt, meterset, dd_out))
            dd_totals = duckdb_job.period_totals(dd_out, meterset)
            rmtree(dd_out)
            samples["duckdb"].append(s)
            mismatches = compare(ml_totals, dd_totals)
            for line in mismatches:
                print(f"WARNING {fmt} repeat {r}: duckdb period totals differ from meterlake: {line}", flush=True)
            # (c) the floor
            s = measure(lambda ds=ds, clean=clean: floor_read(ds, clean))
            samples["floor"].append(s)
            print(
                f"# {fmt} repeat {r + 1}/{args.repeat}: meterlake {samples['meterlake'][-1].seconds:.2f} s,"
                f" duckdb {samples['duckdb'][-1].seconds:.2f} s, floor {s.seconds:.2f} s (load {loadavg()[0]:.2f})",
                flush=True,
            )
        rep.figure(f"{fmt}.meterlake.events_stored", summary.get("events_stored", 0), "events")
        rep.figure(f"{fmt}.meterlake.duplicates_dropped", summary.get("duplicates_dropped", 0), "events")
        rep.figure(f"{fmt}.meterlake.quarantined", summary.get("quarantined_total", 0), "records")
        rep.figure(f"{fmt}.duckdb.events_stored", samples["duckdb"][-1].result["events"], "events")
        rep.figure(f"{fmt}.check.meters_differing", len(mismatches), "meters")
        figs = {}
        for engine in ("meterlake", "duckdb", "floor"):
            figs[engine] = engine_figures(rep, f"{fmt}.{engine}", samples[engine], ds.records)
            table.append((fmt, engine, figs[engine]))
        rep.figure(f"{fmt}.ratio.duckdb_over_meterlake", figs["duckdb"]["median"] / figs["meterlake"]["median"], "x")
        rep.figure(f"{fmt}.ratio.meterlake_over_floor", figs["meterlake"]["median"] / figs["floor"]["median"], "x")
        rep.figure(f"{fmt}.ratio.duckdb_over_floor", figs["duckdb"]["median"] / figs["floor"]["median"], "x")
        if args.profile:
            root = fresh_root(work, f"{fmt}-profile", ds.landing)
            profile_run(
                f"meterlake-{fmt}", lambda root=root: pipeline.run(Storage(str(root)), meterset, log=quiet), out
            )
            rmtree(root)
    loads.append(loadavg()[0])
    rep.figure("machine.loadavg_1m.max_seen", max(loads), "load")
    machine_facts(rep, "end")
    print_table(table)
    print(
        "(ratios and events/s use median wall seconds; a_over_b = seconds(a) / seconds(b); cpu s: process CPU"
        " time, all threads; dRSS = peak - RSS at phase start)"
    )


def incremental_mode(args: argparse.Namespace, rep: Report, meterset: MeterSet, out: Path, work: Path) -> None:
    history_n, new_n, days = args.history, args.new, args.days
    start = dt.datetime.fromisoformat(START).replace(tzinfo=dt.UTC)
    end = start + dt.timedelta(days=days)
    late_n = min(1000, max(10, new_n // 100))
    if late_n >= new_n:
        late_n = 0
    last_day = (end - dt.timedelta(microseconds=1)).date() + dt.timedelta(days=1)  # backfill range end
    batch_start = end - dt.timedelta(days=2)
    prev_month = (batch_start.replace(day=1) - dt.timedelta(days=1)).replace(day=1)
    late_start = max(prev_month + dt.timedelta(days=14), start)
    # history: --files JSONL batches over [start, end); new: the last 2 days, plus late events of last month
    hist = dataset(out, "jsonl", history_n, args.files, start=START, days=days)
    fresh = dataset(out, "jsonl", new_n - late_n, 1, seed=1, start=batch_start.isoformat(), days=2)
    late = dataset(out, "jsonl", late_n, 1, seed=2, start=late_start.isoformat(), days=1) if late_n else None
    batch = out / "data" / f"incremental-new-{fresh.folder.name}-{late.folder.name if late else 'nolate'}.jsonl"
    if not batch.exists():
        parts = [Path(f).read_bytes() for f in fresh.files + (late.files if late else [])]
        tmp = batch.with_suffix(".tmp")
        tmp.write_bytes(b"".join(parts))
        tmp.rename(batch)
    new_records = fresh.records + (late.records if late else 0)
    rep.note(
        f"history {human(history_n)} events over {START} + {days:g} days ({len(hist.files)} files); new batch "
        f"{human(new_records)} events: {fresh.records} in [{batch_start:%Y-%m-%d}, {end:%Y-%m-%d}), {late_n} late in"
        f" {late_start:%Y-%m-%d}"
    )
    rep.figure("incremental.history_events", hist.records, "records")
    rep.figure("incremental.new_events", new_records, "records")
    rep.figure("incremental.late_events", late_n, "records")

    def link_landing(root: Path, history: bool, new: bool) -> None:
        """landing/history/* and landing/new/* as symlinks to the generated files (real folders: the
        landing listing does not descend into symlinked sub-folders)."""
        for sub, files in (("history", hist.files if history else []), ("new", [str(batch)] if new else [])):
            if files:
                (root / "landing" / sub).mkdir(parents=True, exist_ok=True)
            for f in files:
                os.symlink(Path(f).resolve(), root / "landing" / sub / Path(f).name)

    # The processed history, once; each repeat starts from a hard-link copy of it (meterlake replaces
    # files by rename and never writes into an existing one, so the snapshot stays intact).
    snapshot = fresh_root(work, "incremental-history")
    link_landing(snapshot, history=True, new=False)
    s = run_meterlake(snapshot, meterset)
    rep.figure("history.seconds", s.seconds, "s")
    rep.figure("history.events_per_second", hist.records / s.seconds, "ev/s")
    rep.figure("history.peak_rss_delta", s.rss_delta / MB, "MB")

    inc: list[Sample] = []
    back: list[Sample] = []
    full: list[Sample] = []
    loads = [loadavg()[0]]
    inc_summary: dict = {}
    for r in range(args.repeat):
        loads.append(loadavg()[0])
        root = work / f"incremental-{r}"
        rmtree(root)
        subprocess.run(["cp", "-al", str(snapshot), str(root)], check=True)
        link_landing(root, history=False, new=True)  # the history links came with the copy
        s = run_meterlake(root, meterset)
        inc_summary = s.result
        inc.append(s)
        inc_totals = meterlake_totals(root, meterset)
        # a backfill over the whole range on the same root (recompute every table from events/)
        timer = StepTimer()
        s = measure(
            lambda root=root, timer=timer: pipeline.backfill(
                Storage(str(root)), meterset, start.date(), last_day, log=quiet, **timed(timer)
            )
        )
        s.steps = timer.grouped(s.seconds)
        back.append(s)
        rmtree(root)
        # a from-scratch run over history + new batch
        root = fresh_root(work, f"incremental-full-{r}")
        link_landing(root, history=True, new=True)
        s = run_meterlake(root, meterset)
        full.append(s)
        for line in compare(inc_totals, meterlake_totals(root, meterset)):
            print(f"WARNING repeat {r}: incremental tables differ from a from-scratch run: {line}", flush=True)
        rmtree(root)
        print(
            f"# repeat {r + 1}/{args.repeat}: incremental {inc[-1].seconds:.2f} s, backfill {back[-1].seconds:.2f} s,"
            f" full {full[-1].seconds:.2f} s (load {loadavg()[0]:.2f})",
            flush=True,
        )
    if args.profile:
        root = work / "incremental-profile"
        rmtree(root)
        subprocess.run(["cp", "-al", str(snapshot), str(root)], check=True)
        link_landing(root, history=False, new=True)
        profile_run("meterlake-incremental", lambda: pipeline.run(Storage(str(root)), meterset, log=quiet), out)
        rmtree(root)
    rmtree(snapshot)
    rep.figure(
        "incremental.hourly_partitions_recomputed", inc_summary.get("hourly_partitions_recomputed", 0), "partitions"
    )
    rep.figure("incremental.periods_recomputed", inc_summary.get("periods_recomputed", 0), "periods")
    fi = engine_figures(rep, "incremental", inc, new_records)
    fb = engine_figures(rep, "backfill", back, hist.records + new_records)
    ff = engine_figures(rep, "full", full, hist.records + new_records)
    rep.figure("incremental.ratio", fi["median"] / ff["median"], "x")
    rep.figure("incremental.ratio_vs_backfill", fi["median"] / fb["median"], "x")
    loads.append(loadavg()[0])
    rep.figure("machine.loadavg_1m.max_seen", max(loads), "load")
    machine_facts(rep, "end")
    print_table([("jsonl", "increment", fi), ("jsonl", "backfill", fb), ("jsonl", "full", ff)])
    print(
        "(incremental: the new batch on top of the processed history; backfill: pipeline.backfill over the whole"
        " range; full: a from-scratch run over history + new batch. incremental.ratio = incremental / full seconds;"
        " events/s of backfill and full count every event)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="meterlake benchmark: meterlake vs DuckDB SQL vs a Polars read floor.")
    p.add_argument("--events", type=parse_count, help="events per format (default 1M; --quick: 100k)")
    p.add_argument("--repeat", type=int, help="repeats per engine (default 3; --quick: 1)")
    p.add_argument("--files", type=int, default=10, help="batch files per format (default 10)")
    p.add_argument("--formats", default="jsonl,parquet", help="comma-separated: jsonl,parquet (default both)")
    p.add_argument(
        "--meters", default=str(REPO / "data" / "meters.yaml"), help="meters file (default data/meters.yaml)"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 100k events, 1 repeat")
    p.add_argument("--incremental", action="store_true", help="time one new batch on top of a processed history")
    p.add_argument("--history", type=parse_count, help="--incremental: events of history (default 10x --events)")
    p.add_argument("--new", type=parse_count, help="--incremental: events in the new batch (default --events/10)")
    p.add_argument("--days", type=float, default=60, help="--incremental: days of history (default 60)")
    p.add_argument(
        "--subjects",
        type=int,
        default=GENERATOR_DEFAULTS["subjects"],
        help="distinct subjects in the generated data (default 2000; fewer: more events per table row)",
    )
    p.add_argument(
        "--fixed-cost",
        action="store_true",
        help="time runs with nothing new instead (bench/fixed_cost.py in its own process; --repeat runs each)",
    )
    p.add_argument("--profile", action="store_true", help="also run meterlake once under cProfile and print the top")
    p.add_argument("--no-warmup", action="store_true", help="skip the tiny untimed warm-up run of each engine")
    p.add_argument("--out", default=str(HERE / "out"), help="data cache and work folder (default bench/out)")
    args = p.parse_args(argv)
    if args.fixed_cost:  # a process of its own: this one never imports Prefect
        script = [sys.executable, str(HERE / "fixed_cost.py"), "--repeat", str(args.repeat or 5)]
        return subprocess.call([*script, "--meters", str(Path(args.meters).resolve())], cwd=REPO)
    args.events = args.events or (100_000 if args.quick else 1_000_000)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.history = args.history or 10 * args.events
    args.new = args.new or max(args.events // 10, 100)
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if args.subjects < 1:
        p.error("--subjects must be >= 1")
    if args.repeat < 1 or args.files < 1 or not set(args.formats) <= {"jsonl", "parquet"} or not args.formats:
        p.error("--repeat and --files must be >= 1; --formats is a list of jsonl, parquet")
    try:
        meterset = load_meters_file(args.meters)
        duckdb_job.check_billing(meterset)
    except (MeterConfigError, duckdb_job.UnsupportedBilling) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    work = out / f"work-{os.getpid()}"  # per process: two benchmarks sharing --out must not clear each other's
    rmtree(work)
    work.mkdir(parents=True)
    os.environ.setdefault("PREFECT_HOME", str(REPO / ".prefect"))

    rep = Report()
    mode = "incremental" if args.incremental else "full"
    sizes = (
        f"history {human(args.history)}, new {human(args.new)}"
        if args.incremental
        else f"{human(args.events)} events, {args.subjects} subjects"
    )
    rep.note(
        f"meterlake benchmark, mode {mode}: {sizes}, {args.files} files, repeat {args.repeat}, meters {args.meters}"
        f" ({len(meterset.meters)} meters)"
    )
    machine_facts(rep, "start")
    if not args.no_warmup:
        warm_up(out, work, meterset, ["jsonl"] if args.incremental else args.formats)
    if args.incremental:
        incremental_mode(args, rep, meterset, out, work)
    else:
        full_mode(args, rep, meterset, out, work)
    rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
