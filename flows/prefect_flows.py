"""Prefect flows: the hourly run and the backfill, each step a task with retries on storage I/O.

Tasks receive the Storage handle, meter dataclasses, paths and small summaries; frames never cross a
task boundary, and caching is off (a path-keyed cache would skip a re-landed batch).

`run_hourly` and `run_backfill` are how the command line starts a flow run (deployment runs call the
flows directly); the fixed cost of a run with nothing new is measured by `bench/fixed_cost.py`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import Flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.context import SettingsContext, get_settings_context
from prefect.runtime import flow_run
from prefect.settings import get_current_settings
from prefect.task_runners import ThreadPoolTaskRunner

from flows import pipeline
from flows.storage import Storage
from meters import MeterSet, load_meters_file, parse_meters

RETRY_DELAYS = [1, 5, 15]
# A deployment run that finds the lock held (an hourly run firing during a backfill: each deployment has its
# own concurrency limit) waits this long for it before it fails; the command line passes 0 and fails at once.
LOCK_WAIT_SECONDS = 3000
# Prefect waits 20 s by default for its temporary server; a first start (new PREFECT_HOME, database
# migrations) took 20-30 s on a busy 2-core machine, so a run started from the command line waits longer.
TEMPORARY_SERVER_STARTUP_TIMEOUT = 120


class PrefectRunner(pipeline.Runner):
    """Each step a Prefect task with retries (every step is safe to repeat); fans are submitted
    concurrently to the flow's task runner: threads by default, a Dask cluster with `DaskTaskRunner`."""

    @staticmethod
    @functools.lru_cache(maxsize=64)  # one Task per step, built once per process (not once per run)
    def _task(name: str, fn: Any) -> Any:
        return task(fn, name=name, retries=len(RETRY_DELAYS), retry_delay_seconds=RETRY_DELAYS, cache_policy=NO_CACHE)

    def step(self, name: str, fn: Any, *args: Any) -> Any:
        return self._task(name, fn)(*args)

    def fan(self, name: str, fn: Any, calls: list[tuple]) -> list[Any]:
        runner = self._task(name, fn)
        futures = [runner.submit(*args) for args in calls]
        return [future.result() for future in futures]


PREFECT = PrefectRunner()


def task_runner(dask_address: str | None = None, workers: int | None = None) -> Any:
    """A DaskTaskRunner for an existing cluster (address) or a local one (workers); None keeps threads."""
    if not dask_address and not workers:
        return None
    from prefect_dask import DaskTaskRunner

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    cluster = {"n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    return DaskTaskRunner(cluster_kwargs=cluster)


DASK_CONNECT_TIMEOUT = 10.0  # seconds to reach an existing Dask scheduler before a flow run starts


def scheduler_problem(address: str) -> str | None:
    """None when a Dask scheduler answers at `address`, else why not (one line).

    Without this check an unreachable scheduler surfaces only when the first task is submitted, as a
    Prefect traceback after a minute of retries, and not at all when there is nothing new to process.
    """
    import asyncio

    from distributed.comm import connect

    async def probe() -> None:
        comm = await connect(address, timeout=DASK_CONNECT_TIMEOUT)  # includes Dask's handshake
        await comm.close()

    try:
        asyncio.run(probe())
    except Exception as exc:  # noqa: BLE001 - any failure to connect is the answer
        return " ".join(f"{type(exc).__name__}: {exc}".split())
    return None


_PARSED: dict[str, tuple[str, MeterSet]] = {}


def load_meters(path: str) -> MeterSet:
    """`load_meters_file`, parsed once per content of the file in this process.

    The command line checks the meters file before it starts a flow run, then the flow reads it again:
    the second read compares the text and reuses the parsed set (parsing data/meters.yaml takes 0.13 s).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return load_meters_file(path)  # raises its one-line MeterConfigError
    cached = _PARSED.get(path)
    if cached is not None and cached[0] == text:
        return cached[1]
    meterset = parse_meters(text, str(Path(path)))
    _PARSED[path] = (text, meterset)
    return meterset


class MeterlakeFlow(Flow):
    """A Flow whose parameters (text, numbers, dates, lists of them) are serialised without FastAPI.

    Prefect stores a flow run's parameters through FastAPI's `jsonable_encoder`, whose first import costs
    0.3-0.7 s per process; for these types it returns exactly what `_json_parameter` returns (tested).
    Anything else goes through Prefect's own method.
    """

    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        try:
            return {key: _json_parameter(value) for key, value in parameters.items()}
        except TypeError:
            return super().serialize_parameters(parameters)


def _json_parameter(value: Any) -> Any:
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, dt.date):  # datetime included: isoformat, as jsonable_encoder
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [_json_parameter(v) for v in value]
    raise TypeError(type(value).__name__)


def flow(**options: Any) -> Any:
    return lambda fn: MeterlakeFlow(fn, **options)


def will_start_temporary_server() -> bool:
    """True when a flow run in this process would start Prefect's temporary server (no API URL set)."""
    settings = get_current_settings()
    return not settings.api.url and settings.server.ephemeral.enabled


def isolate_temporary_server() -> None:
    """Start Prefect's temporary server, when this process starts one, in a session of its own.

    Prefect starts it as a child in the command's process group, so Ctrl-C in a terminal (SIGINT to the whole
    foreground group) stopped the server at the moment the command needed it: `serve` pausing its schedules, a
    flow run reporting its final state. Which came first was a race: measured on `serve`, exit 0 within 1.5 s, or
    exit 1 after 74 s of retries with the schedules left active. In a session of its own the server gets no
    terminal signals, and Prefect stops it at exit as before (atexit). A hangup, which no longer reaches the
    server, is turned into SIGTERM for this process, whose clean stop runs that atexit hook: a closed terminal
    does not leave the server running. Must run before the first API call (the server starts with it); does
    nothing when the process uses a server of its own (PREFECT_API_URL).
    """
    if not will_start_temporary_server():
        return
    import os
    import signal
    import subprocess
    import types

    from prefect.server.api import server as prefect_server

    instance = prefect_server.SubprocessASGIServer()  # the one Prefect's client uses (no port given)
    start_uvicorn = getattr(instance, "_run_uvicorn_command", None)
    if (
        getattr(instance, "_meterlake_isolated", False)
        or start_uvicorn is None
        or not hasattr(prefect_server, "subprocess")
    ):
        return  # done already, or another Prefect than 3.9's: its own way (the tests of serve's signals tell)

    def own_session(*args: Any, **kwargs: Any) -> subprocess.Popen:
        return subprocess.Popen(*args, **{**kwargs, "start_new_session": True})

    def in_own_session() -> subprocess.Popen:
        module_subprocess = prefect_server.subprocess
        # the module's own name only: no other module's subprocess calls are touched
        prefect_server.subprocess = types.SimpleNamespace(**{**vars(subprocess), "Popen": own_session})
        try:
            return start_uvicorn()
        finally:
            prefect_server.subprocess = module_subprocess

    instance._run_uvicorn_command = in_own_session
    instance._meterlake_isolated = True
    if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
        signal.signal(signal.SIGHUP, lambda *_: os.kill(os.getpid(), signal.SIGTERM))


def needs_api_url() -> bool:
    """True when a flow run cannot start: no API URL and Prefect's temporary server is disabled."""
    settings = get_current_settings()
    return not settings.api.url and not settings.server.ephemeral.enabled


@contextlib.contextmanager
def command_line_settings() -> Iterator[None]:
    """Settings for a flow run started from the command line; deployment runs keep Prefect's.

    Two defaults change, and only when the user set neither (environment or Prefect profile):
    - flow-run heartbeats are off. They exist so that an automation can mark a run Crashed when its process
      vanishes without a word; a command-line run is watched by whoever started it (exit code, cron, Job
      status), its lock in `_state/` expires and the next run rolls it back. They cost 0.7-0.9 s per run:
      Prefect joins the heartbeat thread, which sleeps in 1 s steps. Set PREFECT_FLOWS_HEARTBEAT_FREQUENCY
      (e.g. 180) to keep them.
    - the wait for Prefect's temporary server is raised to TEMPORARY_SERVER_STARTUP_TIMEOUT seconds.
    """
    context = get_settings_context()
    settings = context.settings
    flows, server = settings.flows, settings.server
    if "heartbeat_frequency" not in flows.model_fields_set:
        flows = flows.model_copy(update={"heartbeat_frequency": None})
    ephemeral = server.ephemeral
    if will_start_temporary_server() and "startup_timeout_seconds" not in ephemeral.model_fields_set:
        timeout = max(ephemeral.startup_timeout_seconds, TEMPORARY_SERVER_STARTUP_TIMEOUT)
        server = server.model_copy(
            update={"ephemeral": ephemeral.model_copy(update={"startup_timeout_seconds": timeout})}
        )
    # Copies of the current values, as prefect.settings.temporary_settings would make them, but without reading
    # every setting from the environment again (0.15-0.2 s of a run that finds nothing new).
    with SettingsContext(
        profile=context.profile, settings=settings.model_copy(update={"flows": flows, "server": server})
    ):
        yield


def _top_tables(storage: Storage, summary: dict) -> None:
    """The top subjects and groups of each recomputed meter's latest touched period, as table artifacts."""
    from flows.tools import top_table

    for slug, period in summary.get("latest_periods", {}).items():
        rows = top_table(storage, slug, period)
        if rows:
            key = "top-" + slug.replace("_", "-")
            create_table_artifact(key=key, table=rows, description=f"{slug}: top rows of the period {period}")


def _artifacts(summary: dict) -> None:
    rows = [
        {"meter": slug, "period_rows": r["period"], "hourly_rows": r["hourly"]}
        for slug, r in summary["rows_written"].items()
    ]
    if rows:
        create_table_artifact(key="meterlake-meters", table=rows, description="Rows written per meter")
    create_markdown_artifact(
        key=f"meterlake-{summary['kind']}",
        markdown="```\n" + pipeline.format_summary(summary) + "\n```",
        description=f"meterlake {summary['kind']} summary",
    )


# Slices of days run as concurrent tasks, each holding about 1M events with its meters' frames, so threads are
# limited to two. A Dask cluster (`task_runner`) runs as many as it has workers.
THREADS = ThreadPoolTaskRunner(max_workers=2)


@flow(name="meterlake-hourly", log_prints=False, task_runner=THREADS)
def hourly_flow(
    root: str = "data", meters: str = "data/meters.yaml", lock_wait_seconds: int = LOCK_WAIT_SECONDS
) -> dict:
    """Ingest what landed since the last run and republish the windows it touched.

    Uses no wall-clock time for what it processes: the manifest decides, so a delayed or retried
    scheduled run does exactly the same work.
    """
    logger = get_run_logger()
    scheduled = flow_run.scheduled_start_time
    logger.info("meterlake hourly run (scheduled for %s) on %s", scheduled, root)
    storage = Storage(root)
    # A deployment run does not pass through the command line's check: a mistyped root must fail the run,
    # not create an empty folder and report a Completed run with nothing in it every hour.
    storage.check_root()
    summary = pipeline.run(
        storage, load_meters(meters), runner=PREFECT, log=logger.info, now=scheduled, lock_wait=lock_wait_seconds
    )
    _artifacts(summary)
    _top_tables(storage, summary)
    return summary


@flow(name="meterlake-backfill", log_prints=False, task_runner=THREADS)
def backfill_flow(
    start: dt.date,
    end: dt.date,
    root: str = "data",
    meters: str = "data/meters.yaml",
    meter: list[str] | None = None,
    reingest: bool = False,
    lock_wait_seconds: int = LOCK_WAIT_SECONDS,
) -> dict:
    """Recompute [start, end) for all meters or the named ones, from events/ or by re-reading landing/."""
    logger = get_run_logger()
    storage = Storage(root)
    progress_id = create_progress_artifact(progress=0.0, key="meterlake-backfill-progress")

    def progress(done: int, total: int, what: str) -> None:
        update_progress_artifact(artifact_id=progress_id, progress=100.0 * done / max(total, 1))

    summary = pipeline.backfill(
        storage,
        load_meters(meters),
        start,
        end,
        slugs=meter or None,
        reingest_landing=reingest,
        runner=PREFECT,
        log=logger.info,
        progress=progress,
        lock_wait=lock_wait_seconds,
    )
    _artifacts(summary)
    return summary


def run_hourly(root: str, meters: str, dask_address: str | None = None, workers: int | None = None) -> dict:
    """Run the hourly flow, on a Dask cluster when asked (tables are identical either way)."""
    runner = task_runner(dask_address, workers)
    flow_fn = hourly_flow if runner is None else hourly_flow.with_options(task_runner=runner)
    with command_line_settings():
        return flow_fn(root=root, meters=meters, lock_wait_seconds=0)


def run_backfill(dask_address: str | None = None, workers: int | None = None, **params: Any) -> dict:
    runner = task_runner(dask_address, workers)
    flow_fn = backfill_flow if runner is None else backfill_flow.with_options(task_runner=runner)
    with command_line_settings():
        return flow_fn(lock_wait_seconds=0, **params)
