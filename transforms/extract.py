"""Per-meter extraction: the value and group-by columns out of `data`, and why an event is excluded."""

from __future__ import annotations

import polars as pl

from meters import Meter

# A JSON number, or a string that parses fully as a decimal number ("12.5", "1e3", "-.5").
DECIMAL = r"^[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$"


def path_column(path: str) -> str:
    """Name of the column holding a JSONPath's extracted text (see `extract_paths`)."""
    return f"_path:{path}"


def extract_paths(events: pl.LazyFrame, meters: list[Meter] | tuple[Meter, ...]) -> pl.LazyFrame:
    """Extract every distinct JSONPath of the meters once, so meters sharing a type share the work."""
    paths = sorted({p for m in meters for p in [m.value_path, *m.group_paths.values()] if p})
    return events.with_columns(pl.col("data").str.json_path_match(p).alias(path_column(p)) for p in paths)


def _text(events: pl.LazyFrame, path: str) -> pl.Expr:
    column = path_column(path)
    return pl.col(column) if column in events.collect_schema() else pl.col("data").str.json_path_match(path)


def extract(events: pl.LazyFrame, meter: Meter) -> pl.LazyFrame:
    """Add `value` (Float64, or text for UNIQUE_COUNT), one String column per groupBy key, and `excluded`.

    `excluded` is null when the event counts for this meter, else `missing_value` or `bad_value`.
    Paths already extracted by `extract_paths` are reused.
    """
    groups = [_text(events, path).alias(key) for key, path in meter.group_paths.items()]
    if meter.aggregation == "COUNT":
        return events.with_columns(*groups, value=pl.lit(1.0), excluded=pl.lit(None, pl.String))
    text = _text(events, meter.value_path)
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
