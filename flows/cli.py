"""The `meterlake` command line. User mistakes end in one clear line and a non-zero exit, never a traceback.

Exit codes: 0 ok; 1 unexpected failure; 2 a user mistake (bad meters file, date, meter name, option, root);
3 storage (or the Dask scheduler, or the Prefect API of PREFECT_API_URL) unreachable or refused; 4 another run
holds the lock, or its file is damaged; 130 and 143 stopped by Ctrl-C and SIGTERM (`serve`, once serving, stops
cleanly with 0); 141 standard output closed by its reader (`| head`), quietly.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import io
import os
import select
import signal
import sys
import threading
import urllib.parse
from typing import Annotated

import typer
from typer.core import TyperGroup


class OutputClosed(Exception):
    """Standard output was closed by its reader (`meterlake ... | head`): the command stops without a word."""


def _stdout_closed() -> bool:
    """True when standard output is a pipe (or socket) whose reader has gone; True too when that cannot be told
    (no poll(), no file descriptor), as Click and rich assume of every broken pipe."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return True


class _Commands(TyperGroup):
    """Typer's group, telling a closed standard output from other broken pipes (Click and Typer end the command
    with a silent exit 1 on every EPIPE). Writes through sys.stdout already raise OutputClosed (`_Stdout`); this
    catches the rest (a write to its file descriptor or its binary buffer)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokenPipeError as exc:
            if _stdout_closed():
                raise OutputClosed from None
            raise RuntimeError(f"broken pipe: {exc}") from exc


class _Stdout:
    """Standard output while the command line runs: a write or flush that fails because the reader went away raises
    OutputClosed instead of BrokenPipeError, which Click, Typer and rich each turn into a silent exit 1 before our
    handler sees it (rich in every console, Typer's help and `meterlake` alone among them, Prefect's banner in
    `serve`, the progress bar of `backfill`). Everything else is the stream's own."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise OutputClosed from None

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise OutputClosed from None

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def _guarded_stdout():
    """sys.stdout as `_Stdout` for the time of the block (not at all without standard output, `>&-`)."""
    stream = sys.stdout
    if stream is None:
        yield
        return
    sys.stdout = _Stdout(stream)
    try:
        yield
    finally:
        sys.stdout = stream


app = typer.Typer(
    cls=_Commands,
    add_completion=False,
    no_args_is_help=True,
    help="meterlake: usage metering for billing. CloudEvents batches in, billing-period Parquet tables out.",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 80},
    pretty_exceptions_enable=False,
)

EXIT_OK, EXIT_FAIL, EXIT_USER, EXIT_STORAGE, EXIT_LOCKED = 0, 1, 2, 3, 4
_SERVE_STOPPED: list[bool] = []  # set once `serve` serves: a Ctrl-C then stops it with 0, by decision
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what Typer returns for a Ctrl-C
EXIT_CLOSED = 141  # 128 + SIGPIPE: what a shell reports for a Unix tool stopped by a closed pipe

RootOpt = Annotated[str, typer.Option("--root", "-r", help="Storage root: a folder or s3://bucket/prefix.")]
MetersOpt = Annotated[str, typer.Option("--meters", "-m", help="Meters YAML file.")]


class UserError(Exception):
    """A mistake the user can fix; printed as one line."""

    def __init__(self, message: str, code: int = EXIT_USER) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = EXIT_USER) -> None:
    raise UserError(message, code)


def _say(message: str) -> None:
    """A line on standard error. A closed standard error (a pipe whose reader went away) loses the line, not the
    exit code: no traceback, no 'Exception ignored' at exit; the command goes on or ends as it would."""
    try:
        typer.echo(message, err=True)
    except BrokenPipeError:
        _discard(sys.stderr)


def parse_date(value: str, option: str) -> dt.date:
    from transforms.query import parse_day

    try:
        return parse_day(value)
    except ValueError:
        pass
    fail(f"{option}: {value!r} is not a date; use YYYY-MM-DD, e.g. 2024-01-31")
    raise AssertionError


def _load(meters: str):
    from meters import load_meters_file

    return load_meters_file(meters)


def _storage(root: str):
    """The storage at `root`, checked: a missing root is exit 3 in every command (a typo must not create one), and
    so is an S3 endpoint that cannot be connected to, at once (someone is waiting; deployment runs retry it)."""
    from flows.storage import Storage

    storage = Storage(root)
    storage.check_root(fail_fast=True)
    return storage


def _use_prefect(flag: bool | None) -> bool:
    return bool(os.environ.get("PREFECT_API_URL")) if flag is None else flag


TEMPORARY_SERVER_NOTICE = (
    "meterlake: PREFECT_API_URL is not set, so Prefect starts a temporary server for this run and stops it "
    "afterwards (tens of seconds; longer the first time with a new PREFECT_HOME). To avoid it, keep a server "
    "running (`prefect server start`, or `prefect server start --background`) and "
    "`export PREFECT_API_URL=http://127.0.0.1:4200/api`; without --prefect, --dask and --workers a run "
    "needs no Prefect at all."
)


def _flows(meters: str):
    """Prefect's flows (importing Prefect takes 2-3 s) and the meters file, checked before any flow run starts."""
    from flows import prefect_flows

    meterset = prefect_flows.load_meters(meters)  # parsed once: the flow run reuses it
    return prefect_flows, meterset


def _before_flow_run(prefect_flows, dask: str | None = None) -> None:
    """One clear line instead of Prefect's error when no API or Dask scheduler is reachable; a notice before a
    temporary server."""
    if dask:
        problem = prefect_flows.scheduler_problem(dask)
        if problem:
            fail(f"Dask scheduler at {dask} unreachable ({problem})", EXIT_STORAGE)
    if prefect_flows.needs_api_url():
        fail(
            "a Prefect flow run needs a Prefect server: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api after "
            "`prefect server start`), or run without --prefect, --dask and --workers"
        )
    if prefect_flows.will_start_temporary_server():
        _say(TEMPORARY_SERVER_NOTICE)
        prefect_flows.isolate_temporary_server()


@app.command()
def run(
    root: RootOpt = "data",
    meters: MetersOpt = "data/meters.yaml",
    prefect: Annotated[
        bool | None,
        typer.Option("--prefect/--no-prefect", help="Run as a Prefect flow (default: when PREFECT_API_URL is set)."),
    ] = None,
    dask: Annotated[str | None, typer.Option("--dask", help="Dask scheduler address (tcp://host:8786).")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Start a local Dask cluster of N workers.")] = None,
) -> None:
    """Process every new batch under ROOT/landing/ and republish the windows it touched.

    Example: meterlake run --root data --meters data/meters.yaml
    """
    if _use_prefect(prefect) or dask or workers:
        prefect_flows, _ = _flows(meters)
        _storage(root)
        if workers is not None and workers < 1:
            fail("--workers must be at least 1")
        _before_flow_run(prefect_flows, dask)
        prefect_flows.run_hourly(root=root, meters=meters, dask_address=dask, workers=workers)
        return
    meterset = _load(meters)
    storage = _storage(root)
    if workers is not None and workers < 1:
        fail("--workers must be at least 1")
    from flows.pipeline import run as run_once

    run_once(storage, meterset)


@app.command()
def backfill(
    from_: Annotated[str, typer.Option("--from", help="First UTC date, YYYY-MM-DD (inclusive).")],
    to: Annotated[str, typer.Option("--to", help="End UTC date, YYYY-MM-DD (exclusive).")],
    meter: Annotated[list[str] | None, typer.Option("--meter", help="Only this meter (repeatable).")] = None,
    reingest: Annotated[bool, typer.Option("--reingest", help="Re-read landing/ instead of events/.")] = False,
    root: RootOpt = "data",
    meters: MetersOpt = "data/meters.yaml",
    prefect: Annotated[bool | None, typer.Option("--prefect/--no-prefect", help="Run as a Prefect flow.")] = None,
    dask: Annotated[str | None, typer.Option("--dask", help="Dask scheduler address (tcp://host:8786).")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Start a local Dask cluster of N workers.")] = None,
) -> None:
    """Recompute [--from, --to) for all meters or the named ones. Running it twice changes nothing.

    Example: meterlake backfill --from 2024-01-01 --to 2024-03-01 --meter tokens_total
    """
    start, end = parse_date(from_, "--from"), parse_date(to, "--to")
    if end <= start:
        fail(f"--to ({end}) must be after --from ({start})")
    with _user_mistakes():
        from flows.tools import check_event_years

        check_event_years("--from", start)
        check_event_years("--to", end, end=True)
    if workers is not None and workers < 1:
        fail("--workers must be at least 1")
    as_flow = _use_prefect(prefect) or dask or workers
    prefect_flows, meterset = _flows(meters) if as_flow else (None, _load(meters))
    for slug in meter or []:
        try:
            meterset.get(slug)
        except KeyError as exc:
            fail(str(exc.args[0]))
    storage = _storage(root)
    if prefect_flows is not None:
        _before_flow_run(prefect_flows, dask)
        prefect_flows.run_backfill(
            dask_address=dask,
            workers=workers,
            start=start,
            end=end,
            root=root,
            meters=meters,
            meter=meter or None,
            reingest=reingest,
        )
        return
    from rich.console import Console
    from rich.progress import Progress

    from flows.pipeline import backfill as run_backfill

    # On standard error, and only on a terminal: standard output holds the summary alone (no stray blank line).
    # The summary is printed once the bar is gone: while it shows, rich sends what is written to standard output to
    # the bar's console (redirect_stdout), standard error, and `backfill ... > summary.txt` left the file empty.
    bar_console = Console(stderr=True)
    said: list[str] = []
    try:
        with Progress(
            transient=True, console=bar_console, disable=not bar_console.is_terminal, redirect_stdout=False
        ) as bar:
            job = bar.add_task("backfill", total=None)

            def progress(done: int, total: int, what: str) -> None:
                bar.update(job, total=total, completed=done, description=f"backfill {what}")

            run_backfill(
                storage,
                meterset,
                start,
                end,
                slugs=meter or None,
                reingest_landing=reingest,
                progress=progress,
                log=said.append,
            )
    finally:  # what it said before a failure too, ahead of the error line
        for line in said:
            typer.echo(line)


@app.command()
def validate(file: Annotated[str, typer.Argument(help="Meters YAML file to check.")] = "data/meters.yaml") -> None:
    """Check a meters file and list every problem with its line number. Exit 0 only when valid.

    Example: meterlake validate data/meters.yaml
    """
    from meters import MeterConfigError, load_meters_file

    try:
        meterset = load_meters_file(file)
    except MeterConfigError as exc:
        _say(f"{exc.source}: {len(exc.problems)} problem(s)")
        for problem in exc.problems:
            _say(f"  {problem}")
        raise typer.Exit(EXIT_USER) from None
    b = meterset.billing
    typer.echo(
        f"{file}: {len(meterset.meters)} meters OK (billing {b.period}, {b.timezone}, anchor day {b.anchor_day})"
    )
    if meterset.meters:
        rows = [[m.slug, m.aggregation, m.event_type, ", ".join(m.group_paths) or "-"] for m in meterset.meters]
        _console().print(_table(["meter", "aggregation", "eventType", "groupBy"], rows, whole=("meter",)))


@app.command()
def serve(
    root: RootOpt = "data",
    meters: MetersOpt = "data/meters.yaml",
    cron: Annotated[str, typer.Option(help="Schedule of the hourly run (UTC).")] = "5 * * * *",
) -> None:
    """Serve the hourly schedule and the backfill deployment in this process (Prefect's flow.serve).

    Ctrl-C or SIGTERM stops it cleanly (schedules paused) with exit 0.

    Example: meterlake serve --root s3://bucket/meterlake --cron "5 * * * *"
    """
    _load(meters)
    _storage(root)
    from prefect import serve as prefect_serve
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron)  # Prefect's own check, before anything is served
    except ValidationError as exc:
        reason = str(exc.errors()[0].get("msg", "")).removeprefix("Value error, ")
        fail(f'--cron {cron!r} is not a cron schedule ({reason}); e.g. "5 * * * *" (minute hour day month weekday)')

    from flows.prefect_flows import backfill_flow, hourly_flow, isolate_temporary_server

    isolate_temporary_server()  # before the first API call, which starts it
    _refuse_work_pool_deployments(["meterlake-hourly/hourly", "meterlake-backfill/backfill"])
    one = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
    params = {"root": root, "meters": os.path.abspath(meters)}
    # Once serving, Ctrl-C and SIGTERM are the way a service is stopped (systemd, docker stop, Kubernetes), not an
    # interruption of work as in `run`: the runner stops, pauses the schedules, and serve exits 0. An exit code of
    # 143 would leave a systemd unit "failed" after `systemctl stop` (its clean statuses are 0 and death by the
    # signal). Prefect's runner catches Ctrl-C and ends SIGTERM with sys.exit(0) (its handler replaces main's
    # while it runs); that exit is taken here, so that the command line ends as after any command.
    _SERVE_STOPPED.append(True)  # from here a Ctrl-C ends serve cleanly (see main)
    try:
        prefect_serve(
            hourly_flow.to_deployment(name="hourly", cron=cron, parameters=params, concurrency_limit=one),
            backfill_flow.to_deployment(name="backfill", parameters=params, concurrency_limit=one),
        )
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise


def _refuse_work_pool_deployments(names: list[str]) -> None:
    """One line, exit 2, when `prefect deploy` (prefect.yaml) already made one of these deployments on the server.

    `serve` would update it in place and keep what only a worker can use (its work pool): Prefect 3.9 refuses
    the update (422, a schedule without prefect.yaml's slug), and with a slug the served runs crash looking for
    flow code "at None". Checked only against a configured server (a temporary one holds no such deployment).
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        return
    with get_client(sync_client=True) as client:
        # A URL that answers but is no Prefect API (another service, no /api) reads every deployment as missing:
        # checked first, as a flow run is, so that serve fails here (`_prefect_api_unreachable`), not once serving.
        client.raise_for_api_version_mismatch()
        for name in names:
            try:
                deployment = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            if deployment.work_pool_name:
                fail(
                    f"deployment {name!r} already exists on this Prefect server for work pool "
                    f"{deployment.work_pool_name!r} (prefect.yaml); serve cannot take it over: run a worker "
                    f"instead, or delete it first (prefect deployment delete '{name}')"
                )


# --- operator commands: query, preview, quarantine, status, report ---------------------------------------
# Output fits an 80-column terminal: rich tables are capped at 80 columns and long cells fold.
WIDTH = 80
FORMATS = ("table", "csv", "json", "parquet")


@contextlib.contextmanager
def _user_mistakes():
    """Turn the Python API's one-line errors (ToolError, QueryError) into exit code 2."""
    from flows.tools import ToolError
    from transforms.query import QueryError

    try:
        yield
    except (ToolError, QueryError) as exc:
        fail(str(exc))


def _console(file=None):
    """A rich console on standard output (a closed one raises OutputClosed through `_Stdout`) or on `file`."""
    from rich.console import Console

    width = min(WIDTH, Console().width) if file is None else WIDTH
    return Console(width=width, file=file, highlight=False, markup=False, emoji=False, soft_wrap=False)


def _num(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return f"{int(value)}"
        return repr(value)
    return str(value)


def _or_dash(value):
    """A run record's count or duration, '-' where it has none (a run that did not finish)."""
    return "-" if value is None else value


def _when(value) -> str:
    if value is None:
        return "null"
    spec = "minutes" if not value.second and not value.microsecond else "seconds"
    spec = "microseconds" if value.microsecond else spec
    return value.isoformat(sep=" ", timespec=spec)


def _table(
    columns: list[str],
    rows: list[list],
    title: str | None = None,
    numeric: tuple[str, ...] = (),
    whole: tuple[str, ...] = (),
):
    """A table folded to the console width. Numbers never fold (a count of 1234 folded reads as 123). The `whole`
    columns (names users copy) do not fold either, with the padding between columns collapsed to leave the others
    room, when the others still fit at a readable width; else they fold as any text (`_FittedTable`)."""
    cells = [[v if isinstance(v, str) else _num(v) for v in row] for row in rows]

    def build(keep_whole: bool):
        from rich import box
        from rich.table import Table
        from rich.text import Text

        table = Table(
            title=Text(title) if title else None,
            title_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            expand=False,
            collapse_padding=keep_whole,
        )
        for c in columns:
            no_wrap = c in numeric or (keep_whole and c in whole)
            table.add_column(c, justify="right" if c in numeric else "left", overflow="fold", no_wrap=no_wrap)
        for row in cells:  # Text, not markup: a subject like "[bold]" is data
            table.add_row(*[Text(v) for v in row])
        return table

    if not whole:
        return build(False)
    return _FittedTable(build, columns, cells, numeric, whole)


class _FittedTable:
    """A table whose `whole` columns stay whole only if, at the console's width, every number keeps its width and
    every other column at least MIN_TEXT characters (or its widest cell, if narrower)."""

    MIN_TEXT = 6

    def __init__(self, build, columns, cells, numeric, whole) -> None:
        self.build, self.columns, self.cells, self.numeric, self.whole = build, columns, cells, numeric, whole

    def __rich_console__(self, console, options):
        from rich.cells import cell_len
        from rich.measure import Measurement

        table = self.build(True)
        natural = [
            max([cell_len(c)] + [cell_len(line) for row in self.cells for line in row[i].splitlines()])
            for i, c in enumerate(self.columns)
        ]
        overhead = Measurement.get(console, options.update_width(10**6), table).maximum - sum(natural)
        least = sum(
            width if c in self.whole or c in self.numeric else min(width, self.MIN_TEXT)
            for c, width in zip(self.columns, natural, strict=True)
        )
        yield table if least + overhead <= options.max_width else self.build(False)


def _parse_filters(items: list[str] | None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--filter: {item!r} is not KEY=VALUE (e.g. --filter model=gpt-4)")
        out.setdefault(key.strip(), []).append(value)
    return out


STDOUT = "-"  # `--out -`: standard output, as Unix tools take it (a file named '-' is `--out ./-`)


def _write_out(out: str, data: bytes) -> None:
    """Write a result file the user asked for (their own path, outside the storage root), or standard output."""
    from pathlib import Path

    if out == STDOUT:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)  # a reader gone away: BrokenPipeError, which _Commands makes OutputClosed
        sys.stdout.buffer.flush()
        return
    path = Path(out)
    if path.is_dir():
        fail(f"--out: {out} is a folder; give a file name")
    if not path.parent.exists():
        fail(f"--out: folder {path.parent} does not exist")
    try:
        path.write_bytes(data)
    except OSError as exc:  # permission denied, read-only or full filesystem, a file where a folder should be
        fail(f"--out: cannot write {out}: {exc.strerror or exc}")


def _emit(out: str | None, text: str) -> None:
    if out:
        _write_out(out, text.encode())
    else:
        typer.echo(text, nl=False)


@app.command()
def query(
    slug: Annotated[str, typer.Argument(help="Meter slug, as in the meters file.")],
    from_: Annotated[
        str, typer.Option("--from", help="Start (inclusive): RFC 3339 with offset, or a date (midnight in --tz).")
    ],
    to: Annotated[str, typer.Option("--to", help="End (exclusive): RFC 3339 with offset, or a date.")],
    window: Annotated[
        str | None,
        typer.Option("--window", "-w", help="MINUTE, HOUR, DAY or MONTH, aligned in --tz; none: one row per group."),
    ] = None,
    tz: Annotated[str, typer.Option("--tz", help="IANA time zone of windows, dates and output times.")] = "UTC",
    subject: Annotated[
        list[str] | None, typer.Option("--subject", "-s", help="Only this subject (repeatable); groups by subject.")
    ] = None,
    group_by: Annotated[
        list[str] | None, typer.Option("--group-by", "-g", help="Group by `subject` or a groupBy key (repeatable).")
    ] = None,
    filter_: Annotated[
        list[str] | None, typer.Option("--filter", help="KEY=VALUE on a groupBy key (repeatable; same key = any of).")
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="table, csv, json (OpenMeter v1 shape) or parquet.")
    ] = "table",
    out: Annotated[
        str | None,
        typer.Option("--out", "-o", help="Write to this file instead of stdout ('-': stdout, e.g. for parquet)."),
    ] = None,
    root: RootOpt = "data",
    meters: MetersOpt = "data/meters.yaml",
) -> None:
    """Query a meter over [--from, --to) with OpenMeter's semantics, exactly, from the curated events.

    Example: meterlake query tokens_total --from 2024-01-01 --to 2024-02-01 -w DAY

    Example: meterlake query tokens_total --from 2024-01-01T06:00:00+01:00
    --to 2024-01-02 --tz Europe/Berlin -w HOUR -g model --filter type=input -f json
    """
    if not tz.strip():
        fail("--tz is empty; give an IANA time zone such as UTC or Europe/Berlin")
    fmt = fmt.lower()
    if fmt not in FORMATS:
        fail(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "parquet" and not out:
        fail("--format parquet needs --out FILE (or --out - to pipe it)")
    if fmt == "parquet" and out == STDOUT and sys.stdout.isatty():
        fail("--format parquet --out -: standard output is a terminal; pipe it to a program or give a file")
    if out == STDOUT and fmt != "parquet":
        out = None  # text formats go to standard output anyway
    from flows import tools
    from transforms.query import rfc3339, to_openmeter

    meterset = _load(meters)
    with _user_mistakes():
        meter, q = tools.plan_query(
            meterset,
            slug,
            from_,
            to,
            window=window,
            tz=tz,
            subjects=subject,
            group_by=group_by,
            filters=_parse_filters(filter_),
        )
        storage = _storage(root)
        df = tools.run_planned(storage, meter, q)
    if fmt == "json":
        import json

        text = json.dumps(to_openmeter(df, q), indent=2) + "\n"
        _emit(out, text)
    elif fmt == "csv":
        import polars as pl

        as_text = df.with_columns(
            pl.Series(c, [rfc3339(v) for v in df[c].to_list()], dtype=pl.String) for c in ("window_start", "window_end")
        )
        data = as_text.write_csv()
        _emit(out, data)
    elif fmt == "parquet":
        import io

        buf = io.BytesIO()
        df.write_parquet(buf)
        _write_out(out, buf.getvalue())
    else:
        keys = list(q.group_by)
        span = f"[{_when(q.start.astimezone(_zone(q.tz)))}, {_when(q.end.astimezone(_zone(q.tz)))})"
        title = f"{slug} ({meter.aggregation}) {span} window {q.window or 'none'}, {q.tz}"
        columns = ["window_start", "window_end", *keys, "value"] if q.window else [*keys, "value"]
        rows = []
        for r in df.iter_rows(named=True):
            times = [_when(r["window_start"]), _when(r["window_end"])] if q.window else []
            rows.append([*times, *[r[k] for k in keys], r["value"]])
        if out:
            import io

            buf = io.StringIO()
            console = _console(buf)
        else:
            console = _console()
        if not rows:
            console.print(f"{title}\nno rows: no counted events of type {meter.event_type!r} in the range")
        else:
            console.print(title)
            console.print(_table(columns, rows, numeric=("value",)))
            console.print(f"{len(rows)} row(s)")
        if out:
            _write_out(out, buf.getvalue().encode())
    if out and out != STDOUT:
        _say(f"wrote {df.height} row(s) to {out}")


def _zone(tz: str):
    import zoneinfo

    return zoneinfo.ZoneInfo(tz)


@app.command()
def preview(
    file: Annotated[str, typer.Argument(help="Meters YAML file to try.")],
    events: Annotated[list[str], typer.Argument(help="Sample event files: JSONL (.jsonl/.ndjson[.gz]) or Parquet.")],
    root: Annotated[
        str | None,
        typer.Option("--root", "-r", help="Compare each meter with the definition last used at this root."),
    ] = None,
    rows: Annotated[int, typer.Option("--rows", min=0, help="Period rows to show per meter.")] = 10,
    limit: Annotated[int, typer.Option("--limit", min=0, help="Excluded and rejected records to show.")] = 10,
) -> None:
    """Dry-run a meters file on sample event files; storage is never written.

    Shows per meter the period rows it would publish and the events it would exclude and why, then the
    records rejected before metering.

    Example: meterlake preview meters.yaml samples/day1.jsonl --root data
    """
    from flows import tools

    meterset = _load(file)
    with _user_mistakes():
        result = tools.preview(meterset, events, root=root)
    console = _console()
    t = result.totals
    console.print(
        f"{file}: {len(meterset.meters)} meter(s) on {len(events)} sample file(s): {result.events} valid event(s), "
        f"{result.rejected.height} record(s) rejected before metering"
    )
    columns = ["meter", "aggregation", "events", "excl.", "rows", "total"]
    if root is not None:
        columns.append("definition")
    table_rows = []
    for r in t.iter_rows(named=True):
        row = [r["slug"], r["aggregation"], r["events"], r["excluded"], r["rows"], r["total"]]
        if root is not None:
            row.append(r["definition"] or "no record")
        table_rows.append(row)
    console.print(_table(columns, table_rows, numeric=("events", "excl.", "rows", "total"), whole=("meter",)))
    if root is not None:
        changed = t.filter(t["definition"].is_in(["changed", "new"]))["slug"].to_list()
        if t["definition"].is_null().all():
            console.print(f"no _state/meters.json under {root}: nothing to compare with (never run)")
        elif changed:
            console.print(
                "changed or new since the last run: " + ", ".join(changed) + "; once deployed, their published "
                "history needs a backfill over all of it (`meterlake status` prints the command; old definitions "
                "are not stored, so old totals cannot be recomputed here)"
            )
        if result.removed:
            console.print("no longer defined (tables stay as published): " + ", ".join(result.removed))
    for meter in meterset.meters:
        table = result.rows[meter.slug]
        if table.is_empty():
            continue
        keys = ["subject", *meter.group_paths]
        shown = table.head(rows)
        body = [
            [r["period_start"], *[r[k] for k in keys], r["value"], r["event_count"]]
            for r in shown.iter_rows(named=True)
        ]
        more = f" (first {rows} of {table.height})" if table.height > rows else ""
        console.print(
            _table(
                ["period", *keys, "value", "events"],
                body,
                title=f"{meter.slug}: period rows{more}",
                numeric=("value", "events"),
            )
        )
    for label, frame in (("excluded by a meter", result.excluded), ("rejected before metering", result.rejected)):
        if frame.is_empty():
            continue
        console.print(f"{label}: {frame.height}" + (f" (first {limit})" if frame.height > limit else ""))
        for r in frame.head(limit).iter_rows(named=True):
            for line in _record_lines(r):
                typer.echo(line)


def _clip(text: str, width: int = WIDTH - 1) -> str:
    text = text.replace("\n", " ").replace("\r", " ")
    return text if len(text) <= width else text[: width - 3] + "..."


def _clip_left(text: str, width: int = WIDTH - 1) -> str:
    """Keep the end of a long path: its file name and line number are what matter."""
    return text if len(text) <= width else "..." + text[len(text) - width + 3 :]


def _record_lines(r: dict, with_date: bool = False) -> list[str]:
    """A rejected record in lines of at most 79 characters: why, where (file:line), message, raw text."""
    head = f"  {r['date']} " if with_date and r.get("date") else "  "
    head += f"{r['stage']} {r['reason']}"
    if r.get("meter"):
        head += f" meter={r['meter']}"
    if r.get("event_id"):
        head += f" id={r['event_id']}"
    where = f"{r['file']}:{r['line']}" if r.get("line") is not None else str(r.get("file"))
    lines = [_clip(head), "    at " + _clip_left(where, WIDTH - 8)]
    if r.get("message"):
        lines.append(_clip("    " + r["message"]))
    if r.get("raw"):
        lines.append(_clip("    raw: " + r["raw"]))
    return lines


@app.command()
def quarantine(
    since: Annotated[str | None, typer.Option("--since", help="Only records dated on or after YYYY-MM-DD.")] = None,
    reason: Annotated[str | None, typer.Option("--reason", help="Only this reason (e.g. bad_time, bad_value).")] = None,
    meter: Annotated[str | None, typer.Option("--meter", help="Only events this meter excluded.")] = None,
    stage: Annotated[
        str | None, typer.Option("--stage", help="Only this stage: file, envelope, dedupe, meter.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="Records to list after the counts.")] = 20,
    root: RootOpt = "data",
) -> None:
    """Show rejected records: counts by stage and reason, then the first ones with file and line.

    Dates are the day a record was quarantined, or the event's UTC date for stage `meter`.

    Example: meterlake quarantine --since 2024-01-01 --reason bad_time --limit 5
    """
    from flows import tools

    if limit < 0:
        fail("--limit must be 0 or more")
    with _user_mistakes():
        storage = _storage(root)
        counts = tools.quarantine_counts(storage, since=since, reason=reason, meter=meter, stage=stage)
        records = tools.quarantine(storage, since=since, reason=reason, meter=meter, stage=stage, limit=limit)
    console = _console()
    total = int(counts["count"].sum() or 0)
    if not total:
        console.print("quarantine is empty for this selection")
        if meter is not None:  # a mistyped slug looks like a meter without exclusions: name the ones there are
            with _user_mistakes():
                found = tools.quarantine_counts(storage, stage="meter")["meter"].unique().sort().to_list()
            if meter not in found:  # (emptied by --since or --reason otherwise)
                console.print(f"meters with excluded values: {', '.join(found)}" if found else "no meter has any")
        return
    body = [[r["stage"], r["reason"], r["meter"] or "-", r["count"]] for r in counts.iter_rows(named=True)]
    console.print(
        _table(
            ["stage", "reason", "meter", "records"],
            body,
            title=f"{total} rejected record(s)",
            numeric=("records",),
            whole=("meter",),
        )
    )
    if limit:
        console.print(f"first {records.height}:")
        for r in records.iter_rows(named=True):
            for line in _record_lines(r, with_date=True):
                typer.echo(line)


@app.command()
def status(
    root: RootOpt = "data",
    meters: MetersOpt = "data/meters.yaml",
    last: Annotated[int, typer.Option("--last", min=1, help="Run records to show.")] = 5,
) -> None:
    """Show runs, waiting batches, newest event, published periods, stale meters and the lock.

    Example: meterlake status --root data --meters data/meters.yaml
    """
    from flows import tools
    from meters import MeterConfigError
    from transforms.query import rfc3339

    storage = _storage(root)
    console = _console()
    meterset = None
    try:
        meterset = _load(meters)
    except MeterConfigError as exc:
        console.print(f"note: {exc.source} not usable ({exc.problems[0]}); meter definitions not checked")
    lock = tools.lock_holder(storage)
    if lock is None:
        console.print("lock: free")
    elif lock.get("unreadable"):
        console.print(f"lock: {lock['unreadable']}")
    else:
        if lock.get("expired"):
            state = "expired, the next run takes it over"
        elif lock.get("gone"):
            state = "its process is gone, the next run takes it over"
        else:
            state = f"until {lock.get('expires_at')}"
        console.print(f"lock: held by run {lock.get('run_id')} on {lock.get('host')} pid {lock.get('pid')} ({state})")
    recent = tools.runs(storage, last=last)
    if recent.is_empty():
        console.print("runs: none recorded yet")
    else:
        body = [
            [
                r["run_id"],
                r["kind"] or "-",
                r["status"],
                *[_or_dash(r[k]) for k in ("batches", "events_stored", "quarantined", "seconds")],
            ]
            for r in recent.iter_rows(named=True)
        ]
        console.print(
            _table(
                ["run", "kind", "outcome", "batches", "stored", "quar.", "secs"],
                body,
                title="last runs",
                numeric=("batches", "stored", "quar.", "secs"),
                whole=("run", "kind"),
            )
        )
    waiting = tools.waiting_batches(storage)
    if waiting.is_empty():
        console.print("landing: no batches waiting")
    else:
        size = int(waiting["size"].sum())
        console.print(f"landing: {waiting.height} batch(es) waiting ({size} bytes), first {waiting['path'][0]}")
    newest = tools.newest_event_time(storage)
    console.print(f"newest event: {rfc3339(newest) if newest else 'none'}")
    table = tools.status(storage, meterset)
    if table.is_empty():
        console.print("meters: none")
        return
    body = [
        [r["slug"], r["periods"], r["first_period"] or "-", r["last_period"] or "-", r["definition"] or "?"]
        for r in table.iter_rows(named=True)
    ]
    console.print(
        _table(
            ["meter", "periods", "first", "last", "definition"],
            body,
            title="published periods",
            numeric=("periods",),
            whole=("meter",),
        )
    )
    stale = table.filter(table["stale"].fill_null(False))["slug"].to_list()
    if stale:
        console.print(
            "stale: " + ", ".join(stale) + " changed or were added after their history was built; rebuild with:"
        )
        for line in _shell_lines(_rebuild_words(storage, root, meters, meterset.select(stale))):
            console.print(line, soft_wrap=True)  # never folded: a fold would cut the pasted command short


def _rebuild_words(storage, root: str, meters: str, stale) -> list[str]:
    """The backfill (shell words) over every stored event date (UTC), and every date the `stale` meters still
    have tables of, that rebuilds them."""
    from flows import pipeline

    slugs = [m.slug for m in stale.meters]
    days = pipeline.history_dates(storage, list(stale.meters))
    if days:
        end = dt.date.fromisoformat(days[-1]) + dt.timedelta(days=1)
        span = ["--from", days[0], "--to", end.isoformat()]
    else:
        span = ["--from", "FIRST", "--to", "END"]
    words = ["meterlake", "backfill", *span, *[w for s in slugs for w in ("--meter", s)]]
    return [*words, "--root", root, "--meters", meters]


def _shell_lines(words: list[str], width: int = WIDTH) -> list[str]:
    """A command's `words`, quoted for the shell, as indented lines of at most `width` characters (a longer word
    stands alone), each but the last continued with a backslash, so it still runs when pasted as printed."""
    import shlex

    lines = ["  "]
    for word in map(shlex.quote, words):
        if lines[-1].strip() and len(lines[-1]) + 1 + len(word) + 2 > width:  # room for " \\"
            lines[-1] += " \\"
            lines.append("    ")
        lines[-1] += ("" if not lines[-1].strip() else " ") + word
    return lines


@app.command()
def report(
    slug: Annotated[str, typer.Argument(help="Meter slug.")],
    period: Annotated[str, typer.Option("--period", "-p", help="Billing period: its month (2024-01) or first day.")],
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="HTML file (default report-SLUG-PERIOD.html; '-': stdout).")
    ] = None,
    top: Annotated[int, typer.Option("--top", help="Rows in each top table.")] = 10,
    root: RootOpt = "data",
    meters: MetersOpt = "data/meters.yaml",
) -> None:
    """Write a self-contained HTML report of one billing period: daily usage chart, top subjects and groups.

    Example: meterlake report tokens_total --period 2024-01 --out report.html
    """
    try:
        import plotly  # noqa: F401
    except ImportError:
        fail("the report needs plotly: pip install 'meterlake[report]'")
    from flows.report import render

    if top < 1:
        fail("--top must be 1 or more")
    meterset = _load(meters)
    with _user_mistakes():
        storage = _storage(root)
        page = render(storage, meterset, slug, period, top=top)
    target = out or f"report-{slug}-{period}.html"
    _write_out(target, page.encode())
    if target != STDOUT:
        typer.echo(f"wrote {target} ({len(page) // 1024} KB, opens without network)")


def main(argv: list[str] | None = None) -> int:
    """Entry point: maps known errors to one-line messages and exit codes."""
    # SIGTERM (Prefect cancellation, systemd, Kubernetes) stops a command as Ctrl-C does: KeyboardInterrupt,
    # so the `finally` blocks release the run lock instead of leaving it held until it expires. Only the main
    # thread can install a handler; Prefect's flow engine and `serve` install their own while they run.
    terminated: list[int] = []

    # A Ctrl-C is recorded too: the KeyboardInterrupt it raises can be lost, when it lands in a Python callback
    # that native code calls and ignores the exception of (Polars reading JSONL, seen in CI), and the command must
    # not then end with 0 as if it had not been stopped.
    interrupted: list[int] = []

    def on_signal(signum, frame) -> None:
        (terminated if signum == signal.SIGTERM else interrupted).append(signum)
        raise KeyboardInterrupt

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
    _SERVE_STOPPED.clear()
    if argv is None:
        _whole_writes()
    try:
        code = _main(argv)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if terminated:
        _say("meterlake: stopped by SIGTERM")
        code = 128 + signal.SIGTERM
    elif interrupted and code == EXIT_OK and not _SERVE_STOPPED:
        _say("meterlake: stopped by Ctrl-C (after its work had finished)")
        code = EXIT_INTERRUPTED
    if argv is None:
        try:  # now rather than at exit, where a reader gone meanwhile would print 'Exception ignored ...'
            if sys.stdout is not None:  # None: started without standard output (`>&-`)
                sys.stdout.flush()
        except BrokenPipeError:
            _discard(sys.stdout)
            code = code or EXIT_CLOSED
        # The process is about to exit (console script or `python -m flows.cli`). Its last garbage collection
        # would visit and free every object of every imported module (Prefect's pydantic models above all):
        # 0.6-0.9 s measured with Prefect, 1-2 s after its temporary server. Frozen objects are skipped; the OS
        # frees the memory. Files are closed and flushed where they are written; atexit handlers still run.
        gc.freeze()
    return code


def _whole_writes() -> None:
    """With PYTHONUNBUFFERED (`python -u`, common in containers) standard output has no buffer, and a write that
    the kernel cuts short because the reader went away is dropped without an error: the text layer ignores the
    count. Give it a buffer, which writes the rest or raises BrokenPipeError, flushed at every line."""
    out = sys.stdout
    if isinstance(getattr(out, "buffer", None), io.RawIOBase):
        sys.stdout = io.TextIOWrapper(
            io.BufferedWriter(out.buffer),
            encoding=out.encoding,
            errors=out.errors,
            line_buffering=True,
            write_through=True,
        )


def _discard(stream) -> None:
    """Python's recipe for a closed pipe: the stream (standard output or error) to /dev/null, so that the flush at
    exit does not fail again ('Exception ignored ... BrokenPipeError', exit 120)."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


def _raised_by(exc: Exception, module: str, name: str) -> bool:
    """isinstance against a class of a module that is imported only if it was used (and so could raise)."""
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(exc, getattr(loaded, name))


def _usage_message(exc) -> str:
    """Click's message and where to look, on one line (Click prints a Usage/Try/Error block)."""
    message = " ".join(exc.format_message().split())
    ctx, names = getattr(exc, "ctx", None), []
    if ctx is None:
        return message
    while ctx.parent is not None:  # the command names, without the program name (`python -m ...` in tests)
        names.insert(0, ctx.info_name)
        ctx = ctx.parent
    return f"{message} (see {' '.join(['meterlake', *names])} --help)"


def _prefect_api_unreachable(exc: BaseException) -> str | None:
    """The one line for a configured Prefect API (PREFECT_API_URL) that cannot be reached, else None.

    A server that is down or a wrong URL is unreachable, as a storage endpoint or a Dask scheduler is (exit 3):
    Prefect raises 'Failed to reach API' when a flow run starts and httpx's ConnectError in `serve`, both of which
    ended the command as an 'unexpected' failure, exit 1. Not for Prefect's temporary server (no URL is set)."""
    settings = sys.modules.get("prefect.settings")
    url = settings.get_current_settings().api.url if settings is not None else None
    if not url:
        return None
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        chain.append(exc)
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    refused = [e for e in chain if _raised_by(e, "httpx", "ConnectError") or _raised_by(e, "httpx", "TimeoutException")]
    failed = any(isinstance(e, RuntimeError) and str(e).startswith("Failed to reach API at") for e in chain)
    if not refused and not failed:
        return None
    why = refused[-1] if refused else chain[-1]
    reason = " ".join((str(why) or type(why).__name__).split())
    parts = urllib.parse.urlsplit(url)  # never print a user:password@ of the URL
    url = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    return (
        f"Prefect API at {url} cannot be reached ({reason}); check PREFECT_API_URL and that the server is running "
        "(`prefect server start`)"
    )


def _interrupted(exc: BaseException) -> bool:
    """Whether `exc` was raised while handling a Ctrl-C or SIGTERM: a library that catches the KeyboardInterrupt
    and fails in its own cleanup (Prefect's task engine, interrupted while it starts a task run, raises
    'ValueError: Task run is not set') must not turn a stop into an 'unexpected' failure with exit 1."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _main(argv: list[str] | None) -> int:
    try:
        with _guarded_stdout():
            code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code:  # a command's `raise typer.Exit(n)` comes back as a return value
            return code
    except UserError as exc:
        _say(f"error: {exc}")
        return exc.code
    except OutputClosed:
        _discard(sys.stdout)
        return EXIT_CLOSED
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        _say("aborted")
        return EXIT_FAIL
    except Exception as exc:
        if _interrupted(exc):  # stopped as any Ctrl-C is (Typer's 130; `main` makes a SIGTERM 143)
            return EXIT_INTERRUPTED
        # Known errors, matched without importing their modules (flows.state would import Polars even
        # for `validate` or `--help`)
        if _raised_by(exc, "meters", "MeterConfigError"):
            more = len(exc.problems) - 5
            tail = f"; and {more} more (run `meterlake validate {exc.source}`)" if more > 0 else ""
            _say(f"error: {exc.source}: " + "; ".join(str(p) for p in exc.problems[:5]) + tail)
            return EXIT_USER
        if _raised_by(exc, "flows.storage", "RootError"):
            _say(f"error: {exc}")
            return EXIT_USER
        if _raised_by(exc, "flows.storage", "StorageError"):
            _say(f"error: {exc}")
            return EXIT_STORAGE
        if _raised_by(exc, "flows.state", "LockHeld"):
            _say(f"meterlake: {exc}")
            return EXIT_LOCKED
        unreachable = _prefect_api_unreachable(exc)
        if unreachable:
            _say(f"error: {unreachable}")
            return EXIT_STORAGE
        # Click's errors, matched by name: recent Typer versions carry their own copy of Click
        kinds = {c.__name__ for c in type(exc).__mro__}
        if "NoArgsIsHelpError" in kinds:  # `meterlake` alone: the help text
            _say(exc.format_message())
            return EXIT_USER
        if "ClickException" in kinds:  # usage errors: one line, as every other mistake
            _say(f"error: {_usage_message(exc)}")
            return EXIT_USER
        if os.environ.get("METERLAKE_DEBUG"):
            raise
        _say(f"error: unexpected {type(exc).__name__}: {exc} (set METERLAKE_DEBUG=1 for a traceback)")
        return EXIT_FAIL
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
