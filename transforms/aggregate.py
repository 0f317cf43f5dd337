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
        .group_by(keys, maintain_order=True)  # rows in input order: the same events give the same file
        .agg(value=value_expr(meter.aggregation), event_count=pl.len().cast(pl.Int64))
        .with_columns(
            pl.col("window_start").cast(WINDOW),
            pl.col("window_end").cast(WINDOW),
            pl.col("value").cast(pl.Float64),
        )
        .select(output_columns(meter))
    )


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


def partial_aggregate(extracted: pl.LazyFrame, meter: Meter, extra_keys: tuple[str, ...] = ()) -> pl.LazyFrame:
    """Partial state per (subject, groups, window) of the rows that count (needs window columns)."""
    keys = [*extra_keys, "subject", *meter.group_paths, "window_start", "window_end"]
    return (
        extracted.filter(pl.col("excluded").is_null())
        .group_by(keys, maintain_order=True)
        .agg(_partial_exprs(meter.aggregation))
        .with_columns(pl.col("window_start").cast(WINDOW), pl.col("window_end").cast(WINDOW))
    )


def combine_partials(partials: pl.LazyFrame, meter: Meter) -> pl.LazyFrame:
    """Final values from partial states (of any number of days); same columns as `aggregate`."""
    keys = ["subject", *meter.group_paths, "window_start", "window_end"]
    return (
        partials.group_by(keys, maintain_order=True)
        .agg(value=_combine_expr(meter.aggregation), event_count=pl.col("_n").sum())
        .with_columns(pl.col("value").cast(pl.Float64))
        .select(output_columns(meter))
    )


# Stored form of partial states, one schema for every meter: group values as a list in definition order.
PARTIAL = {
    "meter": pl.String,
    "fingerprint": pl.String,
    "date": pl.String,
    "subject": pl.String,
    "groups": pl.List(pl.String),
    "window_start": WINDOW,
    "window_end": WINDOW,
    "_n": pl.Int64,
    "_sum": pl.Float64,
    "_min": pl.Float64,
    "_max": pl.Float64,
    "_value": pl.Float64,
    "_time": pl.Datetime("ns", "UTC"),
    "_id": pl.String,
    "_source": pl.String,
    "_values": pl.List(pl.String),
}


def pack_partials(partials: pl.DataFrame, meter: Meter) -> pl.DataFrame:
    """Partial states of one meter in the stored schema (`PARTIAL`)."""
    keys = list(meter.group_paths)
    # concat_arr then to_list: the same lists as concat_list, about 20x faster on string columns (Polars 2.1)
    groups = pl.concat_arr([pl.col(k) for k in keys]).arr.to_list() if keys else pl.lit([], pl.List(pl.String))
    packed = partials.with_columns(
        meter=pl.lit(meter.slug), fingerprint=pl.lit(meter.fingerprint()), groups=groups.cast(pl.List(pl.String))
    )
    if "_value" in packed.columns and meter.aggregation == "UNIQUE_COUNT":
        packed = packed.drop("_value")
    return packed.select(
        (pl.col(c) if c in packed.columns else pl.lit(None)).cast(t).alias(c) for c, t in PARTIAL.items()
    )


def unpack_partials(stored: pl.LazyFrame, meter: Meter) -> pl.LazyFrame:
    """The meter's partial states back in `partial_aggregate`'s shape (current definition only)."""
    current = (pl.col("meter") == meter.slug) & (pl.col("fingerprint") == meter.fingerprint())
    mine = stored.filter(current & pl.col("window_start").is_not_null())  # sentinels carry no state
    return mine.with_columns(
        pl.col("groups").list.get(i, null_on_oob=True).alias(k) for i, k in enumerate(meter.group_paths)
    )
