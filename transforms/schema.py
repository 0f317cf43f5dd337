"""Column names and dtypes shared by every stage, so each frame has exactly one shape."""

from __future__ import annotations

import polars as pl

TIME = pl.Datetime("ns", "UTC")
WINDOW = pl.Datetime("us", "UTC")

# What producers send: every attribute read as text so no key or type is lost to inference.
ENVELOPE = {
    "specversion": pl.String,
    "id": pl.String,
    "source": pl.String,
    "type": pl.String,
    "subject": pl.String,
    "time": pl.String,
    "datacontenttype": pl.String,
    "data": pl.String,
}

# The curated store: one row per valid, deduplicated event.
EVENT = {
    "id": pl.String,
    "source": pl.String,
    "type": pl.String,
    "subject": pl.String,
    "time": TIME,
    "data": pl.String,
    "specversion": pl.String,
    "datacontenttype": pl.String,
    "file": pl.String,
    "line": pl.Int64,
    "batch": pl.String,
    "date": pl.String,
}

QUARANTINE = {
    "stage": pl.String,
    "reason": pl.String,
    "message": pl.String,
    "file": pl.String,
    "line": pl.Int64,
    "event_id": pl.String,
    "meter": pl.String,
    "raw": pl.String,
    "batch": pl.String,
    "date": pl.String,
}


def empty(schema: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


def conform(df: pl.DataFrame, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """Select the schema's columns in order, adding missing ones as nulls."""
    return df.select(
        [
            (pl.col(name) if name in df.columns else pl.lit(None)).cast(dtype).alias(name)
            for name, dtype in schema.items()
        ]
    )
