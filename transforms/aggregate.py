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


# --- partial aggregates: a billing period built day by day -------------------------------------
# Each aggregation is split into a partial state per group that can be combined exactly (AVG keeps
# sum and count, LATEST keeps the winning row's time, id and source, UNIQUE_COUNT the distinct values),
# so a period is assembled from one day of events at a time and memory does not grow with history.


def _partial_exprs(aggregation: str) -> list[pl.Expr]:
    v = pl.col("value")
    n = pl.len().cast(pl.Int64).alias("_n")
    match aggregation:
        case "COUNT":
            return [n]
        case "SUM" | "AVG":
            return [v.sum().alias("_sum"), n]
        case "MIN":
            return [v.min().alias("_min"), n]
        case "MAX":
            return [v.max().alias("_max"), n]
        case "LATEST":
            order = ["time", "id", "source"]
            return [
                v.sort_by(order).last().alias("_value"),
                pl.col("time").sort_by(order).last().alias("_time"),
                pl.col("id").sort_by(order).last().alias("_id"),
                pl.col("source").sort_by(order).last().alias("_source"),
                n,
            ]
        case "UNIQUE_COUNT":
            return [v.unique().alias("_values"), n]
    raise ValueError(f"unknown aggregation {aggregation!r}")


def _combine_expr(aggregation: str) -> pl.Expr:
    match aggregation:
        case "COUNT":
            return pl.col("_n").sum().cast(pl.Float64)
        case "SUM":
            return pl.col("_sum").sum()
        case "AVG":
            return pl.col("_sum").sum() / pl.col("_n").sum()
        case "MIN":
            return pl.col("_min").min()
        case "MAX":
            return pl.col("_max").max()
        case "LATEST":
            return pl.col("_value").sort_by(["_time", "_id", "_source"]).last()
        case "UNIQUE_COUNT":
            return pl.col("_values").explode().drop_nulls().n_unique().cast(pl.Float64)
    raise ValueError(f"unknown aggregation {aggregation!r}")


def partial_aggregate(extracted: pl.LazyFrame, meter: Meter) -> pl.LazyFrame:
    """Partial state per (subject, groups, window) of the rows that count (needs window columns)."""
    keys = ["subject", *meter.group_paths, "window_start", "window_end"]
    return (
        extracted.filter(pl.col("excluded").is_null())
        .group_by(keys)
        .agg(_partial_exprs(meter.aggregation))
        .with_columns(pl.col("window_start").cast(WINDOW), pl.col("window_end").cast(WINDOW))
    )


def combine_partials(partials: pl.LazyFrame, meter: Meter) -> pl.LazyFrame:
    """Final values from partial states (of any number of days); same columns as `aggregate`."""
    keys = ["subject", *meter.group_paths, "window_start", "window_end"]
    return (
        partials.group_by(keys)
        .agg(value=_combine_expr(meter.aggregation), event_count=pl.col("_n").sum())
        .with_columns(pl.col("value").cast(pl.Float64))
        .select(output_columns(meter))
    )
