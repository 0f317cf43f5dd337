"""Deduplication on (source, id) within one UTC event date; the first landed copy wins.

The horizon is the event's UTC date: the curated store is partitioned by that date, so checking a new
event against history reads only the partitions the new events fall on (cost follows new data).
"""

from __future__ import annotations

import polars as pl

KEY = ["date", "source", "id"]


def dedupe(new: pl.DataFrame, existing_keys: pl.DataFrame | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split `new` (in landing order) into (kept, duplicates).

    `new` must be sorted in landing order (batch order, then line). `existing_keys` holds the KEY
    columns of events already stored for the dates `new` touches.
    """
    ordered = new.with_row_index("_order").with_columns(_first=pl.struct(KEY).is_first_distinct())  # hashed once
    kept = ordered.filter(pl.col("_first")).drop("_first")
    dup_in_run = (
        ordered.filter(~pl.col("_first")).drop("_first").with_columns(_dup=pl.lit("an earlier copy in this run"))
    )
    if existing_keys is None or existing_keys.is_empty():
        return kept.drop("_order"), dup_in_run.drop("_order")  # filters keep the landing order
    seen = existing_keys.select(KEY).unique().with_columns(_seen=pl.lit(True))
    kept = kept.join(seen, on=KEY, how="left", nulls_equal=False)
    dup_stored = (
        kept.filter(pl.col("_seen").is_not_null())
        .drop("_seen")
        .with_columns(_dup=pl.lit("already in the curated store"))
    )
    kept = kept.filter(pl.col("_seen").is_null()).drop("_seen")
    dups = pl.concat([dup_in_run, dup_stored])
    return kept.sort("_order").drop("_order"), dups.sort("_order").drop("_order")
