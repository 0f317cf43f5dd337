"""Per-meter extraction: the value and group-by columns out of `data`, and why an event is excluded."""

from __future__ import annotations

import re

import polars as pl

from meters import Meter

# A JSON number, or a string that parses fully as a decimal number ("12.5", "1e3", "-.5").
DECIMAL = r"^[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$"


NUMERIC = ("SUM", "AVG", "MIN", "MAX", "LATEST")  # aggregations that only use the value as a number
_FIELD = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\['([^']*)'\]")


def path_column(path: str) -> str:
    """Name of the column holding a JSONPath's extracted text (see `extract_paths`)."""
    return f"_path:{path}"


def field_chain(path: str) -> list[str] | None:
    """`$.a['b c']` -> ["a", "b c"]; None for paths with array indexes (see meters.jsonpath)."""
    out, at, rest = [], 0, path[1:]
    while at < len(rest):
        step = _FIELD.match(rest, at)
        if step is None:
            return None
        out.append(step.group(1) if step.group(1) is not None else step.group(2))
        at = step.end()
    return out or None


def _decode_dtype(chains: list[list[str]]) -> pl.Struct | None:
    tree: dict = {}
    for chain in chains:
        node = tree
        for name in chain[:-1]:
            node = node.setdefault(name, {})
            if node is None:
                return None  # a path is a prefix of another: decode them the slow way
        if chain[-1] in node:
            return None
        node[chain[-1]] = None

    def build(node: dict) -> pl.Struct:
        return pl.Struct({k: pl.String if v is None else build(v) for k, v in node.items()})

    return build(tree)


def extract_paths(events: pl.LazyFrame, meters: list[Meter] | tuple[Meter, ...], decode: bool = True) -> pl.LazyFrame:
    """Extract every distinct JSONPath of the meters once, so meters sharing a type share the work.

    With `decode`, the value paths that only numeric aggregations use are read in one JSON parse per
    event (`json_decode` into text fields) instead of one `json_path_match` each: their text may format a
    number differently ("1000" for 1e3) but always holds the same number. Group-by and UNIQUE_COUNT
    paths keep `json_path_match` text exactly. Decoding fails on an object or array where a value is
    expected; callers then collect again with `decode=False`.
    """
    paths = sorted({p for m in meters for p in [m.value_path, *m.group_paths.values()] if p})
    text_paths = {p for m in meters for p in m.group_paths.values()}
    text_paths |= {m.value_path for m in meters if m.value_path and m.aggregation not in NUMERIC}
    numeric = [p for p in paths if p not in text_paths and field_chain(p)] if decode else []
    dtype = _decode_dtype([field_chain(p) or [] for p in numeric]) if numeric else None
    columns = [
        pl.col("data").str.json_path_match(p).alias(path_column(p)) for p in paths if dtype is None or p not in numeric
    ]
    if dtype is not None:
        decoded = pl.col("data").str.json_decode(dtype)
        for p in numeric:
            field = decoded
            for name in field_chain(p) or []:
                field = field.struct.field(name)
            columns.append(field.alias(path_column(p)))
    return events.with_columns(columns)


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
