"""Per-meter extraction: the value and group-by columns out of `data`, and why an event is excluded."""

from __future__ import annotations

import json
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
    """`$.a['b c']` -> ["a", "b c"]; None for paths with array indexes (see meters.jsonpath), and for keys
    that Polars' `struct.field` would not take literally (`*` is a wildcard, `^...$` a regular expression:
    `$['^a.*$']` read the key `a.*`), which are matched by path instead."""
    out, at, rest = [], 0, path[1:]
    while at < len(rest):
        step = _FIELD.match(rest, at)
        if step is None:
            return None
        name = step.group(1) if step.group(1) is not None else step.group(2)
        if name == "*" or (name.startswith("^") and name.endswith("$")):
            return None
        out.append(name)
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

    `json_path_match` text is the reference. With `decode`, the paths made only of field names are read in
    one JSON parse per event (`json_decode` into text fields) instead of one `json_path_match` each; on the
    rows where the decoder's text may differ (see `_doubtful`), those paths are matched after all. Decoding
    fails on an object or array where a value is expected; callers then collect again with `decode=False`.
    """
    paths = sorted({p for m in meters for p in [m.value_path, *m.group_paths.values()] if p})
    text_paths = {p for m in meters for p in m.group_paths.values()}
    text_paths |= {m.value_path for m in meters if m.value_path and m.aggregation not in NUMERIC}
    chains = {p: chain for p in paths if (chain := field_chain(p))} if decode else {}
    decodable = [p for p in paths if p in chains]
    # one path is one parse either way; the decoder's checks make it the slower of the two
    dtype = _decode_dtype([chains[p] for p in decodable]) if len(decodable) > 1 else None
    data = pl.col("data")
    columns = [data.str.json_path_match(p).alias(path_column(p)) for p in paths if dtype is None or p not in decodable]
    if dtype is None:
        return events.with_columns(columns)
    decoded = pl.col(_DECODED)  # decoded once in its own column: each use of the expression would parse again
    for p in decodable:
        field = decoded
        for name in chains[p]:
            field = field.struct.field(name)
        doubt = _doubtful(chains[p], field if p in text_paths else None)
        matched = pl.when(doubt).then(data).str.json_path_match(p)  # null text elsewhere: nearly free
        columns.append(pl.when(doubt).then(matched).otherwise(field).alias(path_column(p)))
    return events.with_columns(data.str.json_decode(dtype).alias(_DECODED)).with_columns(columns).drop(_DECODED)


_DECODED = "_decoded"


def _doubtful(chain: list[str], text: pl.Expr | None) -> pl.Expr:
    """Rows whose decoded field may differ from `json_path_match`'s text, which only they then pay for.

    - a key of the path written twice: the decoder keeps the first, the matcher the last (as OpenMeter does);
      counting the quoted key in the whole text also catches it in values or other objects (harmless);
    - any escape (a backslash) anywhere: a key may be spelled differently from the path (`"a\\/b"`, `"\\u0061"`);
    - for group-by and UNIQUE_COUNT text (`text`), a number: the decoder writes `3.0` as `3`.
    """
    data = pl.col("data")
    doubt = data.str.contains("\\", literal=True)
    for name in dict.fromkeys(chain):
        doubt = doubt | (data.str.count_matches(json.dumps(name, ensure_ascii=False), literal=True) > 1)
    if text is not None:
        doubt = doubt | text.str.contains(r"^[-0-9]")
    return doubt.fill_null(False)


def _text(events: pl.LazyFrame, path: str) -> pl.Expr:
    column = path_column(path)
    return pl.col(column) if column in events.collect_schema() else pl.col("data").str.json_path_match(path)


def extract(events: pl.LazyFrame, meter: Meter) -> pl.LazyFrame:
    """Add `value` (Float64, or text for UNIQUE_COUNT), one String column per groupBy key, and `excluded`.

    `excluded` is null when the event counts for this meter, else `missing_value` or `bad_value`.
    Paths already extracted by `extract_paths` are reused. Events before the meter's `eventFrom` are left
    out: OpenMeter ignores them (they are not bad values to report).
    """
    if meter.event_from is not None:
        events = events.filter(pl.col("time") >= pl.lit(meter.event_from).cast(pl.Datetime("ns", "UTC")))
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
