"""Fan-out on a two-worker local Dask cluster gives the same tables as the single-process run."""

from __future__ import annotations

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


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_local_dask_cluster_matches_single_process(tmp_path: Path) -> None:
    from flows.prefect_flows import run_hourly

    single, dask = Storage(str(tmp_path / "single")), Storage(str(tmp_path / "dask"))
    meters_file = tmp_path / "meters.yaml"
    meters_file.write_text(METERS)
    _land(single)
    _land(dask)
    pipeline.run(single, meterset(METERS), log=lambda _: None)
    summary = run_hourly(root=dask.root, meters=str(meters_file), workers=2)
    assert summary["events_stored"] == 900
    expected, got = all_tables(single, meterset(METERS)), all_tables(dask, meterset(METERS))
    assert expected.keys() == got.keys()
    for name, table in expected.items():
        assert not table.is_empty(), name
        assert table.equals(got[name]), name
