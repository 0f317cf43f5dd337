"""Group-aggregate extracted events into windows with the seven OpenMeter aggregations."""

from __future__ import annotations

import polars as pl

from meters import Meter
from transforms.schema import WINDOW


def value_expr(aggregation: str) -> pl.Expr:
    v = pl.col("value")
    match aggregation:
        case "COUNT":
            return pl.len().cast(pl.Float64)
        case "SUM":
            return v.sum()
        case "AVG":
            return v.mean()
        case "MIN":
            return v.min()
        case "MAX":
            return v.max()
        case "UNIQUE_COUNT":
            return v.n_unique().cast(pl.Float64)
        case "LATEST":  # greatest time; ties broken by greatest id, then source
            return v.sort_by(["time", "id", "source"]).last()
    raise ValueError(f"unknown aggregation {aggregation!r}")


def output_columns(meter: Meter) -> list[str]:
    return ["subject", *meter.group_paths, "window_start", "window_end", "value", "event_count"]


def aggregate(extracted: pl.LazyFrame, meter: Meter) -> pl.LazyFrame:
    """Aggregate rows that count for the meter (needs window_start/window_end columns)."""
    keys = ["subject", *meter.group_paths, "window_start", "window_end"]
    return (
        extracted.filter(pl.col("excluded").is_null())
        .group_by(keys)
        .agg(value=value_expr(meter.aggregation), event_count=pl.len().cast(pl.Int64))
        .with_columns(
            pl.col("window_start").cast(WINDOW),
            pl.col("window_end").cast(WINDOW),
            pl.col("value").cast(pl.Float64),
        )
        .select(output_columns(meter))
    )


def sort_table(df: pl.DataFrame, meter: Meter) -> pl.DataFrame:
    """A deterministic row order, so identical tables produce identical files."""
    return df.sort(["window_start", "subject", *meter.group_paths], nulls_last=True)
