"""The `meterlake` command line. User mistakes end in one clear line and a non-zero exit, never a traceback.

Exit codes: 0 ok; 1 unexpected failure; 2 a user mistake (bad meters file, date, meter name, option);
3 storage unreachable or refused; 4 another run holds the lock.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from typing import Annotated

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="meterlake: usage metering for billing. CloudEvents batches in, billing-period Parquet tables out.",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 80},
    pretty_exceptions_enable=False,
)

EXIT_OK, EXIT_FAIL, EXIT_USER, EXIT_STORAGE, EXIT_LOCKED = 0, 1, 2, 3, 4

RootOpt = Annotated[str, typer.Option("--root", "-r", help="Storage root: a folder or s3://bucket/prefix.")]
MetersOpt = Annotated[str, typer.Option("--meters", "-m", help="Meters YAML file.")]


class UserError(Exception):
    """A mistake the user can fix; printed as one line."""

    def __init__(self, message: str, code: int = EXIT_USER) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = EXIT_USER) -> None:
    raise UserError(message, code)


def parse_date(value: str, option: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        fail(f"{option}: {value!r} is not a date; use YYYY-MM-DD, e.g. 2024-01-31")
    raise AssertionError


def _load(meters: str):
    from meters import load_meters_file

    return load_meters_file(meters)


def _storage(root: str, must_exist: bool = True):
    from flows.storage import Storage

    storage = Storage(root)
    storage.check_root(create=not must_exist and not storage.is_s3)
    return storage


def _use_prefect(flag: bool | None) -> bool:
    return bool(os.environ.get("PREFECT_API_URL")) if flag is None else flag


@app.command()
def run(
    root: RootOpt = "data",
    meters: MetersOpt = "data/meters.yaml",
    prefect: Annotated[
        bool | None,
        typer.Option("--prefect/--no-prefect", help="Run as a Prefect flow (default: when PREFECT_API_URL is set)."),
    ] = None,
) -> None:
    """Process every new batch under ROOT/landing/ and republish the windows it touched.

    Example: meterlake run --root data --meters data/meters.yaml
    """
    meterset = _load(meters)
    storage = _storage(root, must_exist=True)
    if _use_prefect(prefect):
        from flows.prefect_flows import hourly_flow

        hourly_flow(root=root, meters=meters)
    else:
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
) -> None:
    """Recompute [--from, --to) for all meters or the named ones. Running it twice changes nothing.

    Example: meterlake backfill --from 2024-01-01 --to 2024-03-01 --meter tokens_total
    """
    start, end = parse_date(from_, "--from"), parse_date(to, "--to")
    if end <= start:
        fail(f"--to ({end}) must be after --from ({start})")
    meterset = _load(meters)
    for slug in meter or []:
        try:
            meterset.get(slug)
        except KeyError as exc:
            fail(str(exc.args[0]))
    storage = _storage(root)
    if _use_prefect(prefect):
        from flows.prefect_flows import backfill_flow

        backfill_flow(start=start, end=end, root=root, meters=meters, meter=meter or None, reingest=reingest)
        return
    from rich.progress import Progress

    from flows.pipeline import backfill as run_backfill

    with Progress(transient=True) as bar:
        job = bar.add_task("backfill", total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(job, total=total, completed=done, description=f"backfill {what}")

        run_backfill(storage, meterset, start, end, slugs=meter or None, reingest_landing=reingest, progress=progress)


@app.command()
def validate(file: Annotated[str, typer.Argument(help="Meters YAML file to check.")] = "data/meters.yaml") -> None:
    """Check a meters file and list every problem with its line number. Exit 0 only when valid.

    Example: meterlake validate data/meters.yaml
    """
    from meters import MeterConfigError, load_meters_file

    try:
        meterset = load_meters_file(file)
    except MeterConfigError as exc:
        typer.echo(f"{exc.source}: {len(exc.problems)} problem(s)", err=True)
        for problem in exc.problems:
            typer.echo(f"  {problem}", err=True)
        raise typer.Exit(EXIT_USER) from None
    b = meterset.billing
    typer.echo(
        f"{file}: {len(meterset.meters)} meters OK (billing {b.period}, {b.timezone}, anchor day {b.anchor_day})"
    )
    for m in meterset.meters:
        groups = ", ".join(m.group_paths) or "-"
        typer.echo(f"  {m.slug:<32} {m.aggregation:<12} {m.event_type:<20} by {groups}")


@app.command()
def serve(
    root: RootOpt = "data",
    meters: MetersOpt = "data/meters.yaml",
    cron: Annotated[str, typer.Option(help="Schedule of the hourly run (UTC).")] = "5 * * * *",
) -> None:
    """Serve the hourly schedule and the backfill deployment in this process (Prefect's flow.serve).

    Example: meterlake serve --root s3://bucket/meterlake --cron "5 * * * *"
    """
    _load(meters)
    _storage(root, must_exist=False)
    from prefect import serve as prefect_serve
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    from flows.prefect_flows import backfill_flow, hourly_flow

    one = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
    params = {"root": root, "meters": os.path.abspath(meters)}
    prefect_serve(
        hourly_flow.to_deployment(name="hourly", cron=cron, parameters=params, concurrency_limit=one),
        backfill_flow.to_deployment(name="backfill", parameters=params, concurrency_limit=one),
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point: maps known errors to one-line messages and exit codes."""
    from flows.state import LockHeld
    from flows.storage import StorageError
    from meters import MeterConfigError

    try:
        app(args=argv, standalone_mode=False)
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        return exc.code
    except MeterConfigError as exc:
        typer.echo(f"error: {exc.source}: " + "; ".join(str(p) for p in exc.problems[:5]), err=True)
        if len(exc.problems) > 5:
            typer.echo(f"  ... and {len(exc.problems) - 5} more; run `meterlake validate {exc.source}`", err=True)
        return EXIT_USER
    except StorageError as exc:
        typer.echo(f"error: {exc}", err=True)
        return EXIT_STORAGE
    except LockHeld as exc:
        typer.echo(f"meterlake: {exc}", err=True)
        return EXIT_LOCKED
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return EXIT_FAIL
    except Exception as exc:
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):  # click/typer usage errors
            exc.show()
            return EXIT_USER
        if os.environ.get("METERLAKE_DEBUG"):
            raise
        typer.echo(f"error: unexpected {type(exc).__name__}: {exc} (set METERLAKE_DEBUG=1 for a traceback)", err=True)
        return EXIT_FAIL
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
