"""The flows under Prefect's test harness: same tables as the plain run, artifacts, deployments file."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import yaml

from flows import pipeline
from flows.storage import Storage

from support import event, jsonl, land, meterset, table

METERS = """
meters:
  - slug: tokens_total
    eventType: prompt
    aggregation: SUM
    valueProperty: $.tokens
    groupBy: {model: $.model}
  - slug: prompts
    eventType: prompt
    aggregation: COUNT
"""


def _land_sample(storage: Storage) -> None:
    land(
        storage,
        "2024/01/b1.jsonl",
        jsonl(
            [
                event("1", "2024-01-01T00:00:00Z", data={"tokens": "10", "model": "a"}),
                event("2", "2024-01-31T23:59:59.999Z", data={"tokens": 5, "model": "b"}),
                event("3", "2024-02-01T00:00:00+02:00", data={"tokens": "x", "model": "a"}),
                "not json",
            ]
        ),
    )


@pytest.mark.usefixtures("prefect_harness")
def test_hourly_flow_matches_plain_run_and_leaves_artifacts(tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    from flows.prefect_flows import hourly_flow

    plain, flowed = Storage(str(tmp_path / "plain")), Storage(str(tmp_path / "flow"))
    meters_file = tmp_path / "meters.yaml"
    meters_file.write_text(METERS)
    for s in (plain, flowed):
        _land_sample(s)
    pipeline.run(plain, meterset(METERS), log=lambda _: None)
    summary = hourly_flow(root=flowed.root, meters=str(meters_file))
    assert summary["events_stored"] == 3
    assert summary["quarantined"] == {"malformed_json": 1}
    for slug in ("tokens_total", "prompts"):
        for kind in ("period", "hourly"):
            assert table(plain, slug, kind).equals(table(flowed, slug, kind))
    assert table(flowed, "tokens_total")["value"].sum() == 15.0

    import anyio

    async def keys() -> set[str]:
        async with get_client() as client:
            return {a.key for a in await client.read_artifacts()}

    assert {"meterlake-run", "meterlake-meters", "top-tokens-total"} <= anyio.run(keys)


@pytest.mark.usefixtures("prefect_harness")
def test_backfill_flow_is_idempotent(tmp_path: Path) -> None:
    from flows.prefect_flows import backfill_flow, hourly_flow

    storage = Storage(str(tmp_path / "root"))
    meters_file = tmp_path / "meters.yaml"
    meters_file.write_text(METERS)
    _land_sample(storage)
    hourly_flow(root=storage.root, meters=str(meters_file))
    before = table(storage, "tokens_total", "hourly")
    for _ in range(2):
        out = backfill_flow(start="2024-01-01", end="2024-03-01", root=storage.root, meters=str(meters_file))
        assert out["meters_recomputed"] == ["prompts", "tokens_total"]
        assert table(storage, "tokens_total", "hourly").equals(before)


@pytest.mark.usefixtures("prefect_harness")
def test_hourly_flow_refuses_a_missing_root_as_the_command_line_does(tmp_path: Path) -> None:
    from flows.prefect_flows import hourly_flow
    from flows.storage import StorageError

    meters_file = tmp_path / "meters.yaml"
    meters_file.write_text(METERS)
    missing = tmp_path / "typo"
    with pytest.raises(StorageError, match="does not exist"):
        hourly_flow(root=str(missing), meters=str(meters_file))
    assert not missing.exists()


@pytest.mark.usefixtures("prefect_harness")
def test_an_hourly_flow_run_during_a_backfill_waits_for_its_lock(tmp_path: Path, monkeypatch) -> None:
    """Each deployment has its own concurrency limit, so a scheduled hourly run can fire while a backfill holds
    the lock: it waits for it (and then does its work) instead of failing."""
    import threading

    from flows import state
    from flows.prefect_flows import LOCK_WAIT_SECONDS, hourly_flow, run_hourly

    assert LOCK_WAIT_SECONDS >= 1800  # a backfill can take a while; the default must outlast a short one
    monkeypatch.setattr(state, "LOCK_POLL_SECONDS", 0.2)
    storage = Storage(str(tmp_path / "root"))
    meters_file = tmp_path / "meters.yaml"
    meters_file.write_text(METERS)
    _land_sample(storage)
    state.acquire_lock(storage, "a-backfill", ttl_seconds=3600)
    with pytest.raises(state.LockHeld, match="a-backfill"):  # the command line's flow run fails at once
        run_hourly(root=storage.root, meters=str(meters_file))
    releaser = threading.Timer(1.5, state.release_lock, args=(storage, "a-backfill"))
    releaser.start()
    try:
        summary = hourly_flow(root=storage.root, meters=str(meters_file))  # a deployment run: the default wait
    finally:
        releaser.cancel()
    assert summary["events_stored"] == 3
    assert not storage.exists(state.LOCK)


def test_backfill_range_mistake_names_the_deployment_parameters(tmp_path: Path) -> None:
    import datetime as dt

    storage = Storage(str(tmp_path / "root"))
    with pytest.raises(ValueError, match=r"^the backfill's end \(2024-01-01\) must be after its start \(2024-03-01\)$"):
        pipeline.backfill(storage, meterset(METERS), dt.date(2024, 3, 1), dt.date(2024, 1, 1), log=lambda _: None)


def test_prefect_yaml_points_at_real_flows() -> None:
    spec = yaml.safe_load(Path(__file__).parents[2].joinpath("prefect.yaml").read_text())
    names = {d["name"]: d for d in spec["deployments"]}
    assert set(names) == {"hourly", "backfill"}
    assert names["hourly"]["schedules"][0]["cron"] == "5 * * * *"
    for deployment in spec["deployments"]:
        assert deployment["concurrency_limit"]["limit"] == 1
        module_path, func = deployment["entrypoint"].split(":")
        module = importlib.import_module(module_path.removesuffix(".py").replace("/", "."))
        flow_obj = getattr(module, func)
        params = inspect.signature(flow_obj.fn).parameters
        assert set(deployment["parameters"]) <= set(params)


@pytest.mark.usefixtures("prefect_harness")
def test_a_failing_step_is_retried_and_a_repeated_step_runs_again(monkeypatch) -> None:
    """Every step is a task with retries (storage I/O fails now and then) and no cache: a step called again with
    the same arguments (a re-landed batch at the same path) must run again, not return its first result."""
    from prefect import flow

    from flows import prefect_flows
    from flows.prefect_flows import PREFECT, RETRY_DELAYS, PrefectRunner

    def flaky(x: str) -> str:
        return x

    real = PrefectRunner._task("probe", flaky)
    assert (real.retries, real.retry_delay_seconds) == (len(RETRY_DELAYS), RETRY_DELAYS) and RETRY_DELAYS[0] > 0
    monkeypatch.setattr(prefect_flows, "RETRY_DELAYS", [0] * len(RETRY_DELAYS))  # the same retries, at once
    PrefectRunner._task.cache_clear()
    try:
        calls: list[str] = []

        def fails_until_the_last_attempt(x: str) -> str:
            calls.append(x)
            if calls.count(x) <= len(RETRY_DELAYS):
                raise OSError("storage hiccup")
            return x

        def counted(x: str) -> str:
            calls.append(x)
            return x

        @flow
        def steps() -> list:
            return [
                PREFECT.step("flaky", fails_until_the_last_attempt, "a"),
                PREFECT.step("again", counted, "b"),
                PREFECT.step("again", counted, "b"),
                PREFECT.fan("fan", counted, [("c",), ("c",)]),
            ]

        from prefect.settings import PREFECT_RESULTS_PERSIST_BY_DEFAULT, temporary_settings

        with temporary_settings(updates={PREFECT_RESULTS_PERSIST_BY_DEFAULT: True}):  # Prefect caches only then
            assert steps() == ["a", "b", "b", ["c", "c"]]
        assert [calls.count(x) for x in "abc"] == [len(RETRY_DELAYS) + 1, 2, 2]
    finally:
        PrefectRunner._task.cache_clear()  # later tests build their tasks with the real delays


def _artifact(key: str):
    """The newest artifact with `key`."""
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC
            )

    found = anyio.run(read)
    assert found, f"no artifact {key!r}"
    return found[0]


@pytest.mark.usefixtures("prefect_harness")
def test_backfill_flow_passes_its_parameters_and_leaves_its_artifacts(tmp_path: Path, monkeypatch) -> None:
    import datetime as dt
    import json

    from flows.prefect_flows import LOCK_WAIT_SECONDS, backfill_flow, hourly_flow, run_backfill

    storage = Storage(str(tmp_path / "root"))
    meters_file = tmp_path / "meters.yaml"
    meters_file.write_text(METERS)
    _land_sample(storage)
    hourly_flow(root=storage.root, meters=str(meters_file))
    seen: list[dict] = []
    real = pipeline.backfill

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "backfill", spy)
    where = {"root": storage.root, "meters": str(meters_file)}
    out = backfill_flow(start="2024-01-01", end="2024-03-01", meter=["prompts"], **where)
    assert out["meters_recomputed"] == ["prompts"]
    assert _artifact("meterlake-backfill-progress").data == 100.0
    assert _artifact("meterlake-backfill").data == "```\n" + pipeline.format_summary(out) + "\n```"
    (written,) = out["rows_written"].values()
    assert written["period"] != written["hourly"], written  # the table artifact below tells the two apart
    rows = [{"meter": "prompts", "period_rows": written["period"], "hourly_rows": written["hourly"]}]
    assert json.loads(_artifact("meterlake-meters").data) == rows
    backfill_flow(start="2024-01-01", end="2024-03-01", reingest=True, **where)
    run_backfill(start=dt.date(2024, 1, 1), end=dt.date(2024, 3, 1), **where)
    assert [(k["slugs"], k["reingest_landing"], k["lock_wait"]) for k in seen] == [
        (["prompts"], False, LOCK_WAIT_SECONDS),  # a deployment run waits for the lock
        (None, True, LOCK_WAIT_SECONDS),
        (None, False, 0),  # the command line's fails at once
    ]


@pytest.mark.usefixtures("prefect_harness")
def test_an_hourly_run_is_named_by_its_scheduled_time(tmp_path: Path, monkeypatch) -> None:
    """A late or retried scheduled run is named by the hour it was scheduled for, not by when it ran."""
    import datetime as dt
    import types

    from flows import prefect_flows

    scheduled = dt.datetime(2024, 1, 1, 0, 5, tzinfo=dt.UTC)
    monkeypatch.setattr(prefect_flows, "flow_run", types.SimpleNamespace(scheduled_start_time=scheduled))
    storage = Storage(str(tmp_path / "root"))
    meters_file = tmp_path / "meters.yaml"
    meters_file.write_text(METERS)
    _land_sample(storage)
    summary = prefect_flows.hourly_flow(root=storage.root, meters=str(meters_file))
    assert summary["run_id"].startswith("20240101T000500Z-"), summary["run_id"]
