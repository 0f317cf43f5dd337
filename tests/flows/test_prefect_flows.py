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
