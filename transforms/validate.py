"""Envelope validation: each record gets the first failing check as its reason, or passes with a UTC time."""

from __future__ import annotations

import datetime as dt

import orjson
import polars as pl

from transforms.schema import ENVELOPE, TIME

# RFC 3339 with a mandatory offset; any number of fraction digits (kept to nanoseconds, truncated).
RFC3339 = r"^\d{4}-\d{2}-\d{2}[Tt](?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d+)?(?:[Zz]|[+-](?:[01]\d|2[0-3]):[0-5]\d)$"

MIN_YEAR, MAX_YEAR = "1678", "2261"  # the whole years that Datetime(ns) can hold
# The days event times can fall on: [FIRST_EVENT_DAY, END_EVENT_DAY). Ranges asked for must lie there too.
FIRST_EVENT_DAY, END_EVENT_DAY = dt.date(int(MIN_YEAR), 1, 1), dt.date(int(MAX_YEAR) + 1, 1, 1)

REASONS = {
    "missing_id": "id is absent, null, empty or not a string",
    "missing_source": "source is absent, null, empty or not a string",
    "missing_type": "type is absent, null, empty or not a string",
    "missing_subject": "subject is absent, null, empty or not a string",
    "missing_time": "time is absent or null",
    "bad_time": "time is not RFC 3339 with an offset (e.g. 2024-01-01T00:00:00Z), or it is not in 1678-2261 (UTC)",
    "bad_data": "data is present but is not a JSON object or null (or is not valid JSON)",
}


def _missing(name: str) -> pl.Expr:
    return pl.col(name).is_null() | (pl.col(name) == "")


def parse_time(text: pl.Expr) -> pl.Expr:
    """RFC 3339 text to UTC nanoseconds; null where the text is not RFC 3339 with an offset."""
    normal = (
        text.str.replace(r"^(.{10})[t]", "${1}T")
        .str.replace(r"[Zz]$", "+00:00")
        .str.replace(r"(\.\d{9})\d+", "${1}")  # truncate beyond nanoseconds
    )
    parsed = normal.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%:z", time_unit="ns", time_zone="UTC", strict=False)
    # Nanoseconds since 1970 in 64 bits reach 1677-09-21 .. 2262-04-11; beyond, the parse wraps around silently
    # (year 1 became 1755), so years outside 1678-2261 are refused (four-digit text compares like numbers).
    year = text.str.slice(0, 4)
    in_range = (year >= MIN_YEAR) & (year <= MAX_YEAR)
    # The UTC instant too: `2261-12-31T23:59:59-01:00` is 2262-01-01 in UTC, an `events/` date outside the days
    # that backfills and queries take, so a meter could never be rebuilt over it.
    first, end = (
        pl.lit(dt.datetime.combine(d, dt.time(), dt.UTC)).cast(TIME) for d in (FIRST_EVENT_DAY, END_EVENT_DAY)
    )
    in_days = (parsed >= first) & (parsed < end)
    return pl.when(text.str.contains(RFC3339) & in_range & in_days).then(parsed).otherwise(None).cast(TIME)


# A surrogate escape (\ud800-\udfff): Polars' JSON reader takes a lone one, orjson (and I-JSON) does not.
SURROGATE_ESCAPE = r"\\u[dD][89a-fA-F]"


def json_objects(data: pl.Series, check: pl.Series | None = None) -> pl.Series:
    """Per row, whether `data` is one JSON object (whitespace around it allowed) or null.

    Checked are the rows `check` marks, every text that does not start with `{`, and every text without a
    quote (all rows without `check`). The others are objects that a parser wrote back from parsed JSON, and
    such text is JSON by construction; Parquet text columns and JSONL payloads sent as a JSON string are the
    producer's own text: `{"v": 1,` or `{"v": NaN}` must not become an event that counts for COUNT and is
    `missing_value` everywhere else. The verdict is orjson's (strict RFC 8259: no NaN, no numbers beyond
    Float64, no raw control characters, no lone surrogates). Rows with a surrogate escape, which Polars'
    decoder takes even alone, are checked with orjson one by one; Polars decodes the others at native speed
    first, and only if that fails is each of them checked with orjson (Polars' decoder fails the whole
    column and cannot say which row). So one emoji escaped by Python's `json.dumps` costs one row, not all.
    """
    rows = data.is_not_null()
    if check is not None:
        # An array or a string written back is not an object; an object written back holds a quote unless `{}`.
        unchecked = data.str.starts_with("{") & data.str.contains('"', literal=True)  # no copy: not stripped
        rows = rows & (check.fill_null(False) | ~unchecked)
    at = rows.arg_true()
    texts = data.gather(at)
    verdicts = pl.repeat(True, texts.len(), dtype=pl.Boolean, eager=True)
    escaped = texts.str.contains(SURROGATE_ESCAPE)
    if not _all_objects(texts.filter(~escaped)):
        verdicts = _checked_one_by_one(verdicts, texts, ~escaped)
    verdicts = _checked_one_by_one(verdicts, texts, escaped)
    return pl.repeat(True, data.len(), dtype=pl.Boolean, eager=True).scatter(at, verdicts)


def _checked_one_by_one(verdicts: pl.Series, texts: pl.Series, rows: pl.Series) -> pl.Series:
    found = pl.Series([_is_object(text) for text in texts.filter(rows).to_list()], dtype=pl.Boolean)
    return verdicts.scatter(rows.arg_true(), found) if found.len() else verdicts


def _all_objects(texts: pl.Series) -> bool:
    """Whether every text (none with a surrogate escape) is a JSON object, decided at native speed."""
    if texts.is_empty():
        return True
    try:
        found = (
            texts.to_frame("data")
            .lazy()
            .select(
                objects=pl.col("data").str.strip_chars(" \t\n\r").str.starts_with("{").all(),
                # a sum over the decoded rows, so the decoding cannot be optimised away
                undecoded=pl.col("data").str.json_decode(pl.Struct({})).is_null().sum(),
            )
            .collect(engine="streaming")
        )
    except pl.exceptions.ComputeError:
        return False
    return found["objects"].item() and found["undecoded"].item() == 0


def _is_object(text: str) -> bool:
    try:
        return isinstance(orjson.loads(text), dict)
    except orjson.JSONDecodeError:
        return False


def reason_expr() -> pl.Expr:
    """The first failing check, in the SPEC's order; null for a valid record (needs columns `_time` and
    `_data_ok`, see `json_objects`)."""
    return (
        pl.when(_missing("id"))
        .then(pl.lit("missing_id"))
        .when(_missing("source"))
        .then(pl.lit("missing_source"))
        .when(_missing("type"))
        .then(pl.lit("missing_type"))
        .when(_missing("subject"))
        .then(pl.lit("missing_subject"))
        .when(pl.col("time").is_null())
        .then(pl.lit("missing_time"))
        .when(pl.col("_time").is_null())
        .then(pl.lit("bad_time"))
        .when(~pl.col("_data_ok"))
        .then(pl.lit("bad_data"))
        .otherwise(None)
    )


DATA_IS_TEXT = "data_is_text"  # optional Boolean column: which rows' `data` to check as JSON (all without it)


def validate(records: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split records into (valid, rejected). Valid rows get `time` as UTC Datetime(ns) and a `date`.

    Rejected rows keep the envelope text plus `reason` and `message`.
    """
    check = records.get_column(DATA_IS_TEXT) if DATA_IS_TEXT in records.columns else None
    checked = (
        records.with_columns(_data_ok=json_objects(records["data"], check))
        .drop(DATA_IS_TEXT, strict=False)
        .lazy()
        .with_columns(_time=parse_time(pl.col("time")))
        .with_columns(_reason=reason_expr())
    )
    valid = (
        checked.filter(pl.col("_reason").is_null())
        .with_columns(time=pl.col("_time"))
        .with_columns(date=pl.col("time").dt.strftime("%Y-%m-%d"))
        .drop("_time", "_reason", "_data_ok")
    )
    rejected = (
        checked.filter(pl.col("_reason").is_not_null())
        .with_columns(
            reason=pl.col("_reason"),
            message=pl.col("_reason").replace_strict(REASONS, default=None, return_dtype=pl.String),
            raw=pl.struct(list(ENVELOPE)).struct.json_encode(),
        )
        .drop("_time", "_reason", "_data_ok")
    )
    # The streaming engine spreads the row-wise parsing over every core (the in-memory one uses one per column).
    valid_df, rejected_df = pl.collect_all([valid, rejected], engine="streaming")
    return valid_df, rejected_df
