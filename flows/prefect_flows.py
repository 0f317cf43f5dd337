"""Prefect flows: the hourly run and the backfill, each step a task with retries on storage I/O.

Tasks receive the Storage handle, meter dataclasses, paths and small summaries; frames never cross a
task boundary, and caching is off (a path-keyed cache would skip a re-landed batch).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows import pipeline
from flows.storage import Storage
from meters import load_meters_file

RETRY_DELAYS = [1, 5, 15]


class PrefectRunner(pipeline.Runner):
    """Each step a Prefect task with retries (every step is safe to repeat); fans are submitted
    concurrently to the flow's task runner: threads by default, a Dask cluster with `DaskTaskRunner`."""

    combine = False  # event types are separate tasks, so they run concurrently (threads or Dask)

    @staticmethod
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


@flow(name="meterlake-hourly", log_prints=False)
def hourly_flow(root: str = "data", meters: str = "data/meters.yaml") -> dict:
    """Ingest what landed since the last run and republish the windows it touched.

    Uses no wall-clock time for what it processes: the manifest decides, so a delayed or retried
    scheduled run does exactly the same work.
    """
    logger = get_run_logger()
    scheduled = flow_run.scheduled_start_time
    logger.info("meterlake hourly run (scheduled for %s) on %s", scheduled, root)
    storage = Storage(root)
    summary = pipeline.run(storage, load_meters_file(meters), runner=PREFECT, log=logger.info, now=scheduled)
    _artifacts(summary)
    _top_tables(storage, summary)
    return summary


@flow(name="meterlake-backfill", log_prints=False)
def backfill_flow(
    start: dt.date,
    end: dt.date,
    root: str = "data",
    meters: str = "data/meters.yaml",
    meter: list[str] | None = None,
    reingest: bool = False,
) -> dict:
    """Recompute [start, end) for all meters or the named ones, from events/ or by re-reading landing/."""
    logger = get_run_logger()
    storage = Storage(root)
    progress_id = create_progress_artifact(progress=0.0, key="meterlake-backfill-progress")

    def progress(done: int, total: int, what: str) -> None:
        update_progress_artifact(artifact_id=progress_id, progress=100.0 * done / max(total, 1))

    summary = pipeline.backfill(
        storage,
        load_meters_file(meters),
        start,
        end,
        slugs=meter or None,
        reingest_landing=reingest,
        runner=PREFECT,
        log=logger.info,
        progress=progress,
    )
    _artifacts(summary)
    return summary


def run_hourly(root: str, meters: str, dask_address: str | None = None, workers: int | None = None) -> dict:
    """Run the hourly flow, on a Dask cluster when asked (tables are identical either way)."""
    runner = task_runner(dask_address, workers)
    flow_fn = hourly_flow if runner is None else hourly_flow.with_options(task_runner=runner)
    return flow_fn(root=root, meters=meters)


def run_backfill(dask_address: str | None = None, workers: int | None = None, **params: Any) -> dict:
    runner = task_runner(dask_address, workers)
    flow_fn = backfill_flow if runner is None else backfill_flow.with_options(task_runner=runner)
    return flow_fn(**params)
