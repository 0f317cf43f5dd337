"""Helpers for end-to-end tests: land batches, run, and read tables back in a row-order-free form."""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path
from typing import Any

import polars as pl

from flows import pipeline
from flows.storage import Storage
from meters import MeterSet, parse_meters


def event(
    id: str,
    time: str,
    type: str = "prompt",
    subject: str = "customer-1",
    source: str = "app",
    data: Any = None,
    **extra: Any,
) -> dict:
    return {
        "specversion": "1.0",
        "id": id,
        "source": source,
        "type": type,
        "subject": subject,
        "time": time,
        "data": data,
        **extra,
    }


def rounding_events(n: int, subjects: int, seed: int = 3) -> list[dict]:
    """`prompt` events over two UTC days, many (subject, model) groups, token values of very different sizes:
    sums whose last bits depend on the order their rows are added in."""
    rng = random.Random(seed)
    return [
        event(
            str(i),
            f"2024-01-{1 + i % 2:02d}T{i % 24:02d}:{i % 60:02d}:00Z",
            subject=f"customer-{i * 7919 % subjects}",
            data={"tokens": rng.uniform(0, 1000) * rng.choice([1e-3, 1.0, 1e3]), "model": f"m{i % 10}"},
        )
        for i in range(n)
    ]


def jsonl(events: list[dict | str]) -> bytes:
    return "".join((e if isinstance(e, str) else json.dumps(e)) + "\n" for e in events).encode()


def land(storage: Storage, rel: str, content: bytes, mtime: float | None = None) -> None:
    """Write a landing batch as a producer would (through the storage layer, so S3 roots work too)."""
    storage.write_bytes(f"landing/{rel}", content)
    if mtime is not None and not storage.is_s3:
        os.utime(storage.path(f"landing/{rel}"), (mtime, mtime))


def parquet_bytes(df: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.write_parquet(buf)
    return buf.getvalue()


def meterset(yaml_text: str) -> MeterSet:
    return parse_meters(yaml_text)


def run(storage: Storage, meters: MeterSet) -> dict:
    return pipeline.run(storage, meters, log=lambda _: None)


def table(storage: Storage, slug: str, kind: str = "period") -> pl.DataFrame:
    """A published table, sorted on every non-value column (so comparisons ignore file/row order)."""
    files = [f.path for f in storage.list_files(f"usage/{slug}/{kind}", (".parquet",))]
    if not files:
        return pl.DataFrame()
    df = storage.scan_parquet(files).collect()
    keys = [c for c in df.columns if c not in ("value", "event_count")]
    return df.sort(keys, nulls_last=True)


def all_tables(storage: Storage, meters: MeterSet) -> dict[str, pl.DataFrame]:
    return {f"{m.slug}/{k}": table(storage, m.slug, k) for m in meters.meters for k in ("period", "hourly")}


def local_root(tmp_path: Path, name: str = "root") -> Storage:
    path = tmp_path / name
    path.mkdir(parents=True, exist_ok=True)
    return Storage(str(path))
