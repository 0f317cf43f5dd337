"""Per-meter extraction: the value and group-by columns out of `data`, and why an event is excluded."""

from __future__ import annotations

import polars as pl

from meters import Meter

# A JSON number, or a string that parses fully as a decimal number ("12.5", "1e3", "-.5").
DECIMAL = r"^[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$"


def extract(events: pl.LazyFrame, meter: Meter) -> pl.LazyFrame:
    """Add `value` (Float64, or text for UNIQUE_COUNT), one String column per groupBy key, and `excluded`.

    `excluded` is null when the event counts for this meter, else `missing_value` or `bad_value`.
    """
    groups = [pl.col("data").str.json_path_match(path).alias(key) for key, path in meter.group_paths.items()]
    if meter.aggregation == "COUNT":
        return events.with_columns(*groups, value=pl.lit(1.0), excluded=pl.lit(None, pl.String))
    text = pl.col("data").str.json_path_match(meter.value_path)
    if meter.aggregation == "UNIQUE_COUNT":
        return events.with_columns(*groups, value=text).with_columns(
            excluded=pl.when(pl.col("value").is_null()).then(pl.lit("missing_value")).otherwise(None)
        )
    number = pl.when(text.str.contains(DECIMAL)).then(text.cast(pl.Float64, strict=False))
    return (
        events.with_columns(*groups, _text=text, value=number)
        .with_columns(
            excluded=pl.when(pl.col("_text").is_null())
            .then(pl.lit("missing_value"))
            .when(pl.col("value").is_null() | ~pl.col("value").is_finite())
            .then(pl.lit("bad_value"))
            .otherwise(None)
        )
        .with_columns(value=pl.when(pl.col("excluded").is_null()).then(pl.col("value")))
        .drop("_text")
    )


EXCLUSION_MESSAGES = {
    "missing_value": "value property is missing or null",
    "bad_value": "value is not a finite number or numeric string",
}
