"""bench/duckdb_job.py, the DuckDB job the benchmark compares meterlake with, computes the same numbers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from meters import parse_meters

from support import event, jsonl

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("duckdb_job", HERE.parent / "bench" / "duckdb_job.py")
duckdb_job = importlib.util.module_from_spec(_spec)
sys.modules["duckdb_job"] = duckdb_job  # its dataclasses look their module up
_spec.loader.exec_module(duckdb_job)


def test_a_meter_with_event_from_leaves_earlier_events_out(tmp_path: Path) -> None:
    # The job ignored eventFrom: the bench compared meterlake with a different computation and warned that
    # their period totals differ.
    batch = tmp_path / "b.jsonl"
    batch.write_bytes(
        jsonl(
            [
                event("1", "2024-01-01T10:00:00Z", type="t", data={"v": 1}),
                event("2", "2024-01-01T10:30:00Z", type="t", data={"v": 2}),
                event("3", "2024-01-01T11:00:00Z", type="t", data={"v": 4}),
            ]
        )
    )
    meters = parse_meters(
        "meters:\n"
        "  - {slug: late, eventType: t, aggregation: SUM, valueProperty: $.v, eventFrom: '2024-01-01T11:30:00+01:00'}\n"
        "  - {slug: all, eventType: t, aggregation: SUM, valueProperty: $.v}\n"
    )
    duckdb_job.run([str(batch)], "jsonl", meters, tmp_path / "out")
    assert duckdb_job.period_totals(tmp_path / "out", meters) == {"late": (6.0, 1), "all": (7.0, 1)}
