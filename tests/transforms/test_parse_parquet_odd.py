"""Odd but possible Parquet batches (SPEC §2): no exception escapes parse or validate, and every row of the
file is either valid or rejected with a reason (a file that cannot be read at all is quarantined whole)."""

from __future__ import annotations

import datetime as dt
import decimal
import io
import json
import subprocess
import sys

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from meters import parse_meters
from transforms.extract import extract, extract_paths
from transforms.parse import NOT_UTF8, Parsed, parse_batch, parse_parquet
from transforms.schema import ENVELOPE
from transforms.validate import validate

RECORD_SCHEMA = pl.Schema({**ENVELOPE, "line": pl.Int64})
T = dt.datetime(2024, 1, 1, 1, 2, 3)  # as a naive timestamp: UTC
T_UTC = T.replace(tzinfo=dt.UTC)
N = 3


def envelope(n: int = N, **columns: pa.Array | None) -> dict[str, pa.Array]:
    """Valid envelope columns of `n` rows, with `columns` replaced (None: left out)."""
    out = {
        "specversion": pa.array(["1.0"] * n),
        "id": pa.array([f"e{i}" for i in range(n)]),
        "source": pa.array(["src"] * n),
        "type": pa.array(["t"] * n),
        "subject": pa.array(["c1"] * n),
        "time": pa.array(["2024-01-01T00:00:00Z"] * n),
    }
    out.update(columns)
    return {k: v for k, v in out.items() if v is not None}


def parquet(table: pa.Table | dict, **options) -> bytes:
    out = io.BytesIO()
    pq.write_table(table if isinstance(table, pa.Table) else pa.table(table), out, **options)
    return out.getvalue()


def check(raw: bytes, rows: int) -> tuple[Parsed, pl.DataFrame, pl.DataFrame]:
    """Parse and validate a readable file: one record per row, each valid or rejected."""
    parsed = parse_batch(raw, "landing/odd.parquet")
    assert parsed.kind == "parquet" and parsed.unreadable is None
    assert parsed.records.schema == RECORD_SCHEMA
    assert parsed.records["line"].to_list() == list(range(1, rows + 1))
    valid, rejected = validate(parsed.records)
    assert valid.height + rejected.height == rows
    return parsed, valid, rejected


def reasons(raw: bytes, rows: int = N) -> list[str | None]:
    """The reason of each row in file order, None for a valid one."""
    _, valid, rejected = check(raw, rows)
    by_line = dict(zip(rejected["line"].to_list(), rejected["reason"].to_list(), strict=True))
    assert not set(by_line) & set(valid["line"].to_list())
    return [by_line.get(n) for n in range(1, rows + 1)]


def data_texts(raw: bytes, rows: int = N) -> list[str | None]:
    parsed, _, _ = check(raw, rows)
    return parsed.records["data"].to_list()


def struct_of(typ: pa.DataType, values: list, name: str = "v") -> pa.StructArray:
    return pa.StructArray.from_arrays([pa.array(values, typ)], [name])


# --- time -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
@pytest.mark.parametrize("tz", [None, "UTC", "+05:30", "-08:00", "America/New_York", "Asia/Kolkata"])
def test_timestamp_time_of_every_unit_and_zone(unit: str, tz: str | None) -> None:
    # Arrow stores the UTC instant; the zone only labels it. Polars panicked on "+05:30" (it knows no such zone).
    time = pa.array([T_UTC] * N, pa.timestamp(unit, "UTC")).cast(pa.timestamp(unit, tz))
    _, valid, _ = check(parquet(envelope(time=time)), N)
    assert valid["time"].to_list() == [T_UTC] * N


@pytest.mark.parametrize("tz", [None, "+05:30", "America/New_York"])
@pytest.mark.parametrize("unit", ["s", "ms", "us"])
def test_timestamp_years_outside_1678_2261_are_bad_time(unit: str, tz: str | None) -> None:
    times = pa.array([dt.datetime(9999, 12, 31, 23), dt.datetime(1, 1, 1), T], pa.timestamp(unit)).cast(
        pa.timestamp(unit, tz)
    )
    assert reasons(parquet(envelope(time=times))) == ["bad_time", "bad_time", None]


@pytest.mark.parametrize("tz", [None, "America/New_York"])
@pytest.mark.parametrize("unit", ["ms", "us", "ns"])
def test_timestamp_at_the_ends_of_64_bits_is_bad_time(unit: str, tz: str | None) -> None:
    # Past chrono's years (+-262143) Polars panicked formatting them ("invalid or out-of-range datetime").
    times = pa.array([2**63 - 1, -(2**63), 0], pa.timestamp(unit, tz))
    assert reasons(parquet(envelope(time=times))) == ["bad_time", "bad_time", None]


def test_seconds_timestamp_past_chrono_is_bad_time() -> None:
    times = pa.array([10**15, -(10**15), 0], pa.timestamp("s"))  # about year 31 million; stored as ms
    assert reasons(parquet(envelope(time=times))) == ["bad_time", "bad_time", None]


@pytest.mark.parametrize(
    ("time", "expected"),
    [
        (pa.array([T] * N, pa.timestamp("ns")), [None] * N),
        (pa.array([T] * N, pa.timestamp("ns", "+05:30")), [None] * N),
        (
            pa.array([dt.datetime(9999, 1, 1), dt.datetime(1, 1, 1), T], pa.timestamp("us")),
            ["bad_time", "bad_time", None],
        ),
    ],
    ids=["naive", "offset_zone", "far_years"],
)
def test_int96_timestamp_time(time: pa.Array, expected: list) -> None:
    raw = parquet(envelope(time=time), use_deprecated_int96_timestamps=True)
    assert reasons(raw) == expected


@pytest.mark.parametrize(
    "time",
    [
        pa.array([dt.date(2024, 1, 1)] * N, pa.date32()),
        pa.array([1704067200] * N, pa.int64()),
        pa.array([1704067200.5] * N, pa.float64()),
        pa.array([dt.time(1, 2)] * N, pa.time64("us")),
        pa.array([5] * N, pa.duration("s")),
        pa.array([True] * N),
        pa.array([b"2024-01-01T00:00:00Z"] * N, pa.binary()),
        pa.array([{"seconds": 1704067200, "nanos": 0}] * N),
        pa.array([["2024-01-01T00:00:00Z"]] * N),
    ],
    ids=["date32", "int64", "float", "time64", "duration", "bool", "binary", "struct", "list"],
)
def test_time_of_another_type_is_bad_time(time: pa.Array) -> None:
    # present but not a time: bad_time, as a JSON number is in JSONL (it was missing_time)
    assert reasons(parquet(envelope(time=time))) == ["bad_time"] * N


def test_date64_time_is_bad_time_like_date32() -> None:
    # Polars reads an Arrow date64 (milliseconds since 1970) as a Datetime(ms); a date is still not a time
    assert reasons(parquet(envelope(time=pa.array([dt.date(2024, 1, 1)] * N, pa.date64())))) == ["bad_time"] * N


def test_millisecond_timestamp_time_is_still_a_time() -> None:
    _, valid, _ = check(parquet(envelope(time=pa.array([T] * N, pa.timestamp("ms")))), N)
    assert valid["time"].to_list() == [T_UTC] * N


@pytest.mark.parametrize(
    "time",
    [
        pa.array([None] * N, pa.string()),
        pa.nulls(N),
        pa.array([None] * N, pa.timestamp("us", "UTC")),
        pa.nulls(N, pa.int64()),
    ],
    ids=["string", "null", "timestamp", "int"],
)
def test_all_null_time_is_missing_time(time: pa.Array) -> None:
    assert reasons(parquet(envelope(time=time))) == ["missing_time"] * N


@pytest.mark.parametrize(
    "time",
    [
        pa.array(["2024-01-01T00:00:00Z"] * N).dictionary_encode(),
        pa.array(["2024-01-01T00:00:00Z"] * N, pa.large_string()),
        pa.array(["2024-01-01T00:00:00Z"] * N, pa.string_view()),
        pa.array([T] * N, pa.timestamp("us")).dictionary_encode(),
    ],
    ids=["dictionary", "large_string", "string_view", "dictionary_timestamp"],
)
def test_time_as_other_text_encodings(time: pa.Array) -> None:
    # a dictionary-encoded (Categorical) time was treated as absent: every event rejected as missing_time
    assert reasons(parquet(envelope(time=time))) == [None] * N


# --- string attributes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("attr", ["id", "source", "type", "subject"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: pa.array(["x"] * N).dictionary_encode(),
        lambda: pa.array(["x"] * N, pa.large_string()),
        lambda: pa.array(["x"] * N, pa.string_view()),
        lambda: pa.ExtensionArray.from_storage(pa.json_(pa.string()), pa.array(["x"] * N)),
    ],
    ids=["dictionary", "large_string", "string_view", "json_extension"],
)
def test_text_attributes_in_other_encodings(attr: str, make) -> None:
    parsed, valid, _ = check(parquet(envelope(**{attr: make()})), N)
    assert valid.height == N and parsed.records[attr].to_list() == ["x"] * N


@pytest.mark.parametrize("attr", ["id", "source", "type", "subject"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: pa.array([b"x"] * N, pa.binary()),
        lambda: pa.array([b"x"] * N, pa.large_binary()),
        lambda: pa.array([b"x"] * N, pa.binary(1)),
        lambda: pa.ExtensionArray.from_storage(pa.uuid(), pa.array([b"0123456789abcdef"] * N, pa.binary(16))),
        lambda: pa.array([1] * N),
        lambda: pa.array([1] * N).dictionary_encode(),
        lambda: pa.array([decimal.Decimal("1.5")] * N, pa.decimal256(60, 2)),
        lambda: pa.array([{"a": "x"}] * N),
        lambda: pa.array([["x"]] * N),
        lambda: pa.nulls(N),
    ],
    ids=["binary", "large_binary", "fixed_binary", "uuid", "int", "dict_int", "decimal256", "struct", "list", "null"],
)
def test_non_text_attributes_are_absent(attr: str, make) -> None:
    # Bytes are not text even when they hold UTF-8: like any non-string attribute, treated as absent.
    assert reasons(parquet(envelope(**{attr: make()}))) == [f"missing_{attr}"] * N


# --- data that is not a struct ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pa.array(['{"a":1}'] * N, pa.large_string()),
        pa.array(['{"a":1}'] * N, pa.string_view()),
        pa.array(['{"a":1}'] * N).dictionary_encode(),
        pa.ExtensionArray.from_storage(pa.json_(pa.string()), pa.array(['{"a":1}'] * N)),
    ],
    ids=["large_string", "string_view", "dictionary", "json_extension"],
)
def test_json_text_data_in_other_encodings(data: pa.Array) -> None:
    # dictionary-encoded (Categorical) JSON text was rejected as bad_data
    assert data_texts(parquet(envelope(data=data))) == ['{"a":1}'] * N


@pytest.mark.parametrize(
    "data",
    [
        pa.array([b'{"a":1}'] * N, pa.binary()),
        pa.array([b'{"a":1}'] * N, pa.large_binary()),
        pa.array([[1, 2]] * N),
        pa.array([1] * N),
        pa.array([True] * N),
        pa.array([[("k", "v")]] * N, pa.map_(pa.string(), pa.string())),
        pa.array([decimal.Decimal("1.5")] * N, pa.decimal256(60, 2)),
        pa.array([[1]] * N, pa.list_(pa.int64(), 1)),
    ],
    ids=["binary", "large_binary", "list", "int", "bool", "map", "decimal256", "fixed_list"],
)
def test_data_of_another_type_is_bad_data(data: pa.Array) -> None:
    # the spec allows JSON text or a struct; a map is neither (its JSON would be an object, but it is not taken)
    assert reasons(parquet(envelope(data=data))) == ["bad_data"] * N


def test_null_data_of_any_type_is_a_null_payload() -> None:
    assert reasons(parquet(envelope(data=pa.array([1, None, None])))) == ["bad_data", None, None]
    assert data_texts(parquet(envelope(data=pa.nulls(N)))) == [None] * N


# --- struct data ------------------------------------------------------------------------------------------


def test_struct_data_with_nested_structs_lists_maps_and_null_fields() -> None:
    typ = pa.struct(
        [
            ("a", pa.struct([("b", pa.struct([("c", pa.int64())]))])),
            ("l", pa.list_(pa.struct([("x", pa.int64())]))),
            ("m", pa.map_(pa.string(), pa.int64())),
            ("n", pa.null()),
            ("ln", pa.list_(pa.null())),
        ]
    )
    row = {"a": {"b": {"c": 1}}, "l": [{"x": 1}, None], "m": [("k", 2)], "n": None, "ln": [None]}
    data = pa.array([row, {"a": None, "l": [], "m": [], "n": None, "ln": None}, None], typ)
    texts = data_texts(parquet(envelope(data=data)))
    assert [None if t is None else json.loads(t) for t in texts] == [
        {"a": {"b": {"c": 1}}, "l": [{"x": 1}, None], "m": {"k": 2}, "ln": [None]},
        {"l": [], "m": {}},
        None,
    ]


def test_struct_data_fields_named_like_helper_and_envelope_columns() -> None:
    names = ["#row", "#present", "data", "line", "time", "id", ""]
    data = pa.StructArray.from_arrays([pa.array([i] * N) for i in range(len(names))], names)
    parsed, valid, _ = check(parquet(envelope(data=data)), N)
    assert valid.height == N
    assert json.loads(parsed.records["data"][0]) == {n: i for i, n in enumerate(names)}
    assert parsed.records["time"].to_list() == ["2024-01-01T00:00:00Z"] * N


@pytest.mark.parametrize(
    ("typ", "value", "text"),
    [
        (pa.bool_(), True, '{"v":true}'),
        (pa.decimal128(10, 2), decimal.Decimal("1.25"), '{"v":"1.25"}'),  # Polars writes decimals as strings
        (pa.decimal256(20, 2), decimal.Decimal("1.25"), '{"v":"1.25"}'),
        (pa.decimal256(60, 2), decimal.Decimal("1.25"), '{"v":"1.25"}'),  # Polars panicked on >38 digits
        (pa.uint64(), 2**64 - 1, '{"v":18446744073709551615}'),
        (pa.float16(), 1.5, '{"v":1.5}'),
        (pa.date32(), dt.date(2024, 1, 1), '{"v":"2024-01-01"}'),
        (pa.timestamp("us"), T, '{"v":"2024-01-01 01:02:03"}'),
        (pa.timestamp("us", "+05:30"), T_UTC, '{"v":"2024-01-01T01:02:03+00:00"}'),  # Polars panicked on the zone
        (pa.time64("us"), dt.time(1, 2), '{"v":"01:02:00"}'),
        (pa.duration("ms"), 5, '{"v":"PT0.005S"}'),
        (pa.string_view(), "x", '{"v":"x"}'),
        (pa.list_(pa.int64(), 2), [1, 2], '{"v":[1,2]}'),
        (pa.large_list(pa.int64()), [1, 2], '{"v":[1,2]}'),
    ],
    ids=lambda v: str(v) if isinstance(v, pa.DataType) else "",
)
def test_struct_data_field_types(typ: pa.DataType, value, text: str) -> None:
    data = struct_of(typ, [value, None, value])
    assert data_texts(parquet(envelope(data=data))) == [text, "{}", text]


@pytest.mark.parametrize(
    ("typ", "value"),
    [
        (pa.binary(), b"\x00\xff"),
        (pa.large_binary(), b"ok"),
        (pa.binary(2), b"ab"),
        (pa.timestamp("ms"), 2**63 - 1),  # past chrono's years: Polars panicked
        (pa.timestamp("us", "America/New_York"), -(2**63)),
        (pa.date32(), 2**31 - 1),
        (pa.map_(pa.int64(), pa.int64()), [(1, 2)]),  # JSON keys are text: Polars refused
        (pa.map_(pa.string(), pa.binary()), [("k", b"x")]),
        (pa.list_(pa.binary(), 1), [b"x"]),
    ],
    ids=[
        "binary",
        "large_binary",
        "fixed_binary",
        "far_ms",
        "far_us_zone",
        "far_date",
        "int_keys",
        "binary_values",
        "binary_array",
    ],
)
def test_struct_data_values_without_json_form_are_left_out(typ: pa.DataType, value) -> None:
    # Polars panicked ("Writing BinaryView to JSON", "out-of-range date"...); such a value is now absent
    data = pa.StructArray.from_arrays([pa.array([value] * N, typ), pa.array([1] * N)], ["v", "k"])
    parsed, valid, _ = check(parquet(envelope(data=data)), N)
    assert valid.height == N and parsed.records["data"].to_list() == ['{"k":1}'] * N


def test_struct_data_values_without_json_form_nested_in_lists() -> None:
    typ = pa.struct([("v", pa.list_(pa.struct([("b", pa.binary()), ("d", pa.date32()), ("i", pa.int64())])))])
    rows = [{"v": [{"b": b"x", "d": 2**31 - 1, "i": 1}, None]}, {"v": [{"b": None, "d": 0, "i": None}]}, {"v": None}]
    texts = data_texts(parquet(envelope(data=pa.array(rows, typ))))
    assert [json.loads(t) for t in texts] == [
        {"v": [{"b": None, "d": None, "i": 1}, None]},
        {"v": [{"b": None, "d": "1970-01-01", "i": None}]},
        {},
    ]


def test_struct_data_nan_and_infinities_become_null_and_are_missing_values() -> None:
    # JSON has no NaN: Polars writes null, so a meter of that field excludes the event as missing_value
    data = struct_of(pa.float64(), [float("nan"), float("inf"), float("-inf")])
    _, valid, _ = check(parquet(envelope(data=data)), N)
    assert valid["data"].to_list() == ['{"v":null}'] * N
    meter = meters({"slug": "m", "eventType": "t", "aggregation": "SUM", "valueProperty": "$.v"})[0]
    out = extract(valid.lazy(), meter).collect()
    assert out["excluded"].to_list() == ["missing_value"] * N


def test_struct_data_with_duplicate_field_names_is_an_unreadable_file() -> None:
    data = pa.StructArray.from_arrays([pa.array([1] * N), pa.array([2] * N)], ["v", "v"])
    parsed = parse_batch(parquet(envelope(data=data)), "landing/odd.parquet")
    assert parsed.unreadable is not None and "Parquet" in parsed.unreadable
    assert parsed.records.is_empty() and parsed.records.schema == RECORD_SCHEMA


def test_struct_data_with_list_views_is_an_unreadable_file() -> None:
    # neither Polars (not implemented) nor pyarrow (its cast to list is broken) reads list views
    parsed = parse_batch(parquet(envelope(data=struct_of(pa.list_view(pa.int64()), [[1]] * N))), "x.parquet")
    assert parsed.unreadable is not None and parsed.records.is_empty()


# --- whole files ------------------------------------------------------------------------------------------


def test_empty_file_with_columns() -> None:
    table = pa.table(
        {**{k: pa.array([], pa.string()) for k in envelope()}, "data": pa.array([], pa.struct([("a", pa.int64())]))}
    )
    check(parquet(table), 0)


def test_empty_file_without_columns() -> None:
    # ShapeError: the absent attributes were one row of literals (a Parquet file without columns has no rows)
    check(parquet(pa.table({})), 0)


def test_only_unknown_columns() -> None:
    assert reasons(parquet({"other": pa.array([1] * N)})) == ["missing_id"] * N  # ShapeError before


def test_only_some_envelope_columns() -> None:
    assert reasons(parquet({"id": pa.array(["a", "b"]), "time": pa.array([T, None])}), 2) == ["missing_source"] * 2


def test_extra_unknown_columns_are_ignored() -> None:
    extra = {"line": pa.array([[1]] * N), "_": pa.array([{"a": 1}] * N), "#row": pa.array([b"x"] * N)}
    parsed, valid, _ = check(parquet(envelope(**extra)), N)
    assert valid.height == N and parsed.records["line"].to_list() == [1, 2, 3]


def test_duplicate_column_names_are_an_unreadable_file() -> None:
    columns = envelope()
    table = pa.Table.from_arrays([pa.array(["a"] * N), *columns.values()], names=["id", *columns])
    parsed = parse_batch(parquet(table), "landing/odd.parquet")
    assert parsed.unreadable is not None and "Parquet" in parsed.unreadable
    assert parsed.records.is_empty()


def test_file_written_by_polars_with_its_own_types() -> None:
    n = 2
    data = pl.DataFrame(
        {
            "i128": pl.Series([2**100, None], dtype=pl.Int128),
            "arr": pl.Series([[1, 2], [3, 4]], dtype=pl.Array(pl.Int64, 2)),
            "bin": [b"x", None],
            "enum": pl.Series(["c", None], dtype=pl.Enum(["c"])),
            "f": [float("nan"), 1.5],
            "when": pl.Series([T, None]).dt.replace_time_zone("Asia/Kolkata"),
        }
    ).to_struct()
    df = pl.DataFrame(
        {
            "specversion": ["1.0"] * n,
            "id": ["a", "b"],
            "source": pl.Series(["s"] * n, dtype=pl.Categorical),
            "type": pl.Series(["t"] * n, dtype=pl.Enum(["t"])),
            "subject": ["c"] * n,
            "time": pl.Series([T, T], dtype=pl.Datetime("ns")).dt.replace_time_zone("Asia/Kolkata"),
            "data": data,
        }
    )
    out = io.BytesIO()
    df.write_parquet(out)
    _, valid, _ = check(out.getvalue(), n)
    assert valid["time"].to_list() == [T_UTC - dt.timedelta(hours=5, minutes=30)] * n
    assert [json.loads(t) for t in valid["data"].to_list()] == [
        {"i128": 2**100, "arr": [1, 2], "enum": "c", "f": None, "when": "2024-01-01T01:02:03+05:30"},
        {"arr": [3, 4], "f": 1.5},
    ]


# --- extraction of odd struct data --------------------------------------------------------------------------


def meters(*bodies: dict) -> list:
    return list(parse_meters(json.dumps({"meters": list(bodies)})).meters)  # JSON is YAML


def test_odd_struct_data_through_extraction() -> None:
    typ = pa.struct(
        [
            ("n", pa.struct([("v", pa.decimal128(10, 2)), ("u", pa.uint64()), ("b", pa.binary())])),
            ("l", pa.list_(pa.int64())),
            ("m", pa.map_(pa.string(), pa.string())),
            ("f", pa.float64()),
            ("ok", pa.bool_()),
        ]
    )
    rows = [
        {
            "n": {"v": decimal.Decimal("1.25"), "u": 2**64 - 1, "b": b"x"},
            "l": [1],
            "m": [("k", "a")],
            "f": 2.0,
            "ok": True,
        },
        {"n": None, "l": None, "m": None, "f": float("nan"), "ok": False},
        {"n": {"v": None, "u": 1, "b": None}, "l": [], "m": [], "f": None, "ok": None},
    ]
    _, valid, _ = check(parquet(envelope(data=pa.array(rows, typ))), N)
    ms = meters(
        {"slug": "dec", "eventType": "t", "aggregation": "SUM", "valueProperty": "$.n.v", "groupBy": {"k": "$.m.k"}},
        {"slug": "big", "eventType": "t", "aggregation": "MAX", "valueProperty": "$.n.u", "groupBy": {"ok": "$.ok"}},
        {"slug": "obj", "eventType": "t", "aggregation": "SUM", "valueProperty": "$.n"},  # an object as the value
        {"slug": "lst", "eventType": "t", "aggregation": "UNIQUE_COUNT", "valueProperty": "$.l"},
        {"slug": "bin", "eventType": "t", "aggregation": "LATEST", "valueProperty": "$.n.b"},
    )
    try:
        paths = extract_paths(valid.lazy(), ms, decode=True).collect()
    except pl.exceptions.ComputeError:  # an object where a value is expected: callers retry without decoding
        paths = None
    plain = extract_paths(valid.lazy(), ms, decode=False).collect()
    if paths is not None:
        assert paths.equals(plain)
    out = {m.slug: extract(plain.lazy(), m).collect() for m in ms}
    assert out["dec"]["value"].to_list() == [1.25, None, None]
    assert out["dec"]["excluded"].to_list() == [None, "missing_value", "missing_value"]
    assert out["dec"]["k"].to_list() == ["a", None, None]
    assert out["big"]["value"].to_list() == [float(2**64 - 1), None, 1.0]
    assert out["big"]["ok"].to_list() == ["true", "false", None]
    assert out["obj"]["excluded"].to_list() == ["bad_value", "missing_value", "bad_value"]
    assert out["lst"]["value"].to_list() == ["[1]", None, "[]"]
    assert out["bin"]["excluded"].to_list() == ["missing_value"] * N


@pytest.mark.parametrize(
    "column",
    [
        {"time": pa.array([T] * N, pa.timestamp("us", "+05:30"))},
        {"data": struct_of(pa.decimal256(60, 2), [decimal.Decimal("1.5")] * N)},
    ],
    ids=["zone_label", "decimal256"],
)
def test_known_odd_types_go_to_pyarrow_without_a_rust_panic_in_the_logs(capfd, column: dict) -> None:
    check(parquet(envelope(**column)), N)
    assert "panicked" not in capfd.readouterr().err


# --- text that is not UTF-8 ---------------------------------------------------------------------------------


def not_utf8(values: list[bytes | None]) -> pa.Array:
    """A text array holding `values` as they are: pyarrow builds it without checking them as UTF-8."""
    offsets, data = [0], b""
    for v in values:
        data += v or b""
        offsets.append(len(data))
    mask = pa.array([v is not None for v in values]).buffers()[1] if None in values else None
    offsets_buffer = pa.array(offsets, pa.int32()).buffers()[1]
    return pa.Array.from_buffers(pa.string(), len(values), [mask, offsets_buffer, pa.py_buffer(data)])


@pytest.mark.parametrize("attr", ["id", "source", "type", "subject"])
def test_attribute_that_is_not_utf8_is_absent_and_the_other_rows_are_read(attr: str) -> None:
    # Polars refuses such a file; pyarrow read it unchecked, and the run crashed later with a traceback (and again
    # on every run after, as the batch was never recorded).
    raw = parquet(envelope(**{attr: not_utf8([b"ok0", b"c\xff", b"ok2"])}))
    assert reasons(raw) == [None, f"missing_{attr}", None]


def test_dictionary_entry_that_is_not_utf8_is_bad_for_its_rows_only() -> None:
    subject = pa.DictionaryArray.from_arrays(pa.array([0, 1, 0], pa.int32()), not_utf8([b"ok", b"c\xff"]))
    assert reasons(parquet(envelope(subject=subject))) == [None, "missing_subject", None]


def test_time_and_data_text_that_is_not_utf8_are_bad() -> None:
    data = not_utf8([b'{"tokens": 1}', b'{"tokens": "\xfe"}', None])
    time = not_utf8([b"2024-01-01T00:00:00Z\xff", b"2024-01-01T00:00:00Z", b"2024-01-01T00:00:00Z"])
    assert reasons(parquet(envelope(data=data))) == [None, "bad_data", None]
    assert reasons(parquet(envelope(time=time))) == ["bad_time", None, None]


def test_struct_data_holding_text_that_is_not_utf8_is_bad_data_for_that_row() -> None:
    # as the same bytes in text `data` are: a null payload would be a valid event that COUNT bills, unreported
    data = pa.StructArray.from_arrays([not_utf8([b"a", b"b\xff", b"c"]), pa.array([1, 2, 3])], ["model", "tokens"])
    raw = parquet(envelope(data=data))
    assert reasons(raw) == [None, "bad_data", None]
    parsed = parse_parquet(raw)
    assert parsed.records.columns == [*ENVELOPE, "line"]
    assert parsed.records["data"].to_list() == ['{"model":"a","tokens":1}', NOT_UTF8, '{"model":"c","tokens":3}']


# --- schemas too deep ---------------------------------------------------------------------------------------


def test_struct_data_nested_too_deep_is_an_unreadable_file_not_a_crash() -> None:
    # pyarrow refuses a schema more than 100 levels deep; Polars read it and died of a stack overflow (SIGSEGV,
    # exit 139) at 500 levels, killing the run, and every run after, before anything was recorded. The file is
    # parsed in a child process: a crash there fails this test instead of the test run.
    script = (
        "import io, sys; import pyarrow as pa, pyarrow.parquet as pq; from transforms.parse import parse_batch\n"
        "data = pa.StructArray.from_arrays([pa.array([1, 2])], ['tokens'])\n"
        "for _ in range(500): data = pa.StructArray.from_arrays([data], ['d'])\n"
        "cols = {k: [v] * 2 for k, v in dict(specversion='1.0', source='s', type='t', subject='c',"
        " time='2024-01-01T00:00:00Z').items()}\n"
        "out = io.BytesIO(); pq.write_table(pa.table({**cols, 'id': ['a', 'b'], 'data': data}), out)\n"
        "parsed = parse_batch(out.getvalue(), 'landing/deep.parquet')\n"
        "print(parsed.unreadable)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nested" in done.stdout, done.stdout
