"""Fan-out on a two-worker local Dask cluster gives the same tables as the single-process run."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from flows import pipeline
from flows.storage import Storage

from support import all_tables, event, jsonl, land, meterset

METERS = """
billing: {period: MONTH, timezone: Europe/Berlin}
meters:
  - {slug: tokens_total, eventType: prompt, aggregation: SUM, valueProperty: $.tokens, groupBy: {model: $.model}}
  - {slug: prompt_count, eventType: prompt, aggregation: COUNT}
  - {slug: gpu_max, eventType: gpu, aggregation: MAX, valueProperty: $.seconds}
  - {slug: sessions, eventType: login, aggregation: UNIQUE_COUNT, valueProperty: $.session}
"""


def _land(storage: Storage) -> None:
    events = []
    for i in range(300):
        day = 1 + i % 58
        month, dom = (1, day) if day <= 31 else (2, day - 31)
        t = f"2024-{month:02d}-{dom:02d}T{i % 24:02d}:{i % 60:02d}:00Z"
        events.append(event(f"p{i}", t, "prompt", f"c{i % 7}", data={"tokens": i, "model": "ab"[i % 2]}))
        events.append(event(f"g{i}", t, "gpu", f"c{i % 5}", data={"seconds": str(i / 4)}))
        events.append(event(f"l{i}", t, "login", f"c{i % 3}", data={"session": i % 11}))
    land(storage, "b1.jsonl", jsonl(events[:450]))
    land(storage, "b2.jsonl", jsonl(events[450:]))


def _slice_task_runs(flow_run_id: str) -> list[str]:
    """States of the `recompute-days` task runs (one per slice of days) of one flow run."""
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read() -> list:
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    return [r.state_type.value for r in anyio.run(read) if r.name.startswith("recompute-days")]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_local_dask_cluster_matches_single_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The days split into several slices, each a task on a two-worker cluster, for a run and for a backfill."""
    from prefect.runtime import flow_run

    from flows import prefect_flows, recompute
    from flows.prefect_flows import run_backfill, run_hourly

    single, dask = Storage(str(tmp_path / "single")), Storage(str(tmp_path / "dask"))
    meters_file = tmp_path / "meters.yaml"
    meters_file.write_text(METERS)
    _land(single)
    _land(dask)
    pipeline.run(single, meterset(METERS), log=lambda _: None)
    # About four slices of days (the default, 32 MB, holds all 58 days in one). The plan is made in the flow's
    # own process (a task called, not submitted), so patching this process is enough; the workers get the slices.
    stored = sum(f.size for f in single.list_files("events", (".parquet",)))
    monkeypatch.setattr(recompute, "SLICE_BYTES", stored // 4)
    flow_runs: list[str] = []
    real_artifacts = prefect_flows._artifacts

    def artifacts(summary: dict) -> None:  # runs inside the flow run: note its id
        flow_runs.append(str(flow_run.id))
        real_artifacts(summary)

    monkeypatch.setattr(prefect_flows, "_artifacts", artifacts)

    def assert_same(what: str) -> None:
        expected, got = all_tables(single, meterset(METERS)), all_tables(dask, meterset(METERS))
        assert expected.keys() == got.keys()
        for name, table in expected.items():
            assert not table.is_empty(), name
            assert table.equals(got[name]), f"{what}: {name}"

    summary = run_hourly(root=dask.root, meters=str(meters_file), workers=2)
    assert summary["events_stored"] == 900
    slices = _slice_task_runs(flow_runs[-1])
    assert len(slices) >= 3 and set(slices) == {"COMPLETED"}, slices
    assert_same("run")

    start, end = dt.date(2024, 1, 1), dt.date(2024, 3, 1)
    pipeline.backfill(single, meterset(METERS), start, end, log=lambda _: None)
    out = run_backfill(workers=2, start=start, end=end, root=dask.root, meters=str(meters_file))
    assert out["periods_recomputed"] > 0
    slices = _slice_task_runs(flow_runs[-1])
    assert len(slices) >= 3 and set(slices) == {"COMPLETED"}, slices
    assert_same("backfill")
