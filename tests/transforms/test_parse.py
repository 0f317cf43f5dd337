"""Parsing landed batches (SPEC §2): JSONL and Parquet to envelope text, bad lines and bad files kept apart."""

from __future__ import annotations

import datetime as dt
import gzip
import io
import json

import polars as pl
import pytest

from transforms.parse import MALFORMED, parse_batch, parse_jsonl, parse_parquet, with_raw_text
from transforms.schema import ENVELOPE
from transforms.validate import validate

RECORD_SCHEMA = {**ENVELOPE, "line": pl.Int64}


def event(i: int | str, **changes) -> dict:
    out = {
        "specversion": "1.0",
        "id": str(i),
        "source": "src",
        "type": "prompt",
        "subject": "customer-1",
        "time": "2024-01-01T00:00:00Z",
        "data": {"tokens": i},
    }
    out.update(changes)
    return out


def line(i: int | str, **changes) -> str:
    return json.dumps(event(i, **changes))


def jsonl(*lines: str, end: str = "\n") -> bytes:
    return ("\n".join(lines) + end).encode()


def ids_and_lines(records: pl.DataFrame) -> list[tuple[str | None, int]]:
    return list(records.select("id", "line").iter_rows())


# --- JSONL -------------------------------------------------------------------------------------------


def test_plain_jsonl() -> None:
    parsed = parse_jsonl(jsonl(line(1), line(2), line(3)))
    assert parsed.unreadable is None
    assert parsed.malformed.is_empty()
    assert parsed.records.schema == pl.Schema(RECORD_SCHEMA)
    assert ids_and_lines(parsed.records) == [("1", 1), ("2", 2), ("3", 3)]
    first = parsed.records.row(0, named=True)
    assert first["subject"] == "customer-1"
    assert first["time"] == "2024-01-01T00:00:00Z"
    assert json.loads(first["data"]) == {"tokens": 1}


@pytest.mark.parametrize("end", ["\n", "", "\n\n\n"])
def test_blank_lines_keep_line_numbers(end: str) -> None:
    raw = jsonl("", line("a"), "", "   ", line("b"), "\t", line("c"), end=end)
    parsed = parse_jsonl(raw)
    assert parsed.malformed.is_empty()
    assert ids_and_lines(parsed.records) == [("a", 2), ("b", 5), ("c", 7)]


def test_one_blank_line_and_no_final_newline_keep_line_numbers() -> None:
    # as many newlines as records: the row count alone must not be taken for "no blank lines"
    parsed = parse_jsonl(jsonl(line("a"), "", line("b"), end=""))
    assert parsed.malformed.is_empty()
    assert ids_and_lines(parsed.records) == [("a", 1), ("b", 3)]


def test_blank_lines_and_a_bad_line_keep_line_numbers() -> None:
    raw = jsonl(line("a"), "", "oops", "", line("b"))
    parsed = parse_jsonl(raw)
    assert ids_and_lines(parsed.records) == [("a", 1), ("b", 5)]
    assert parsed.malformed["line"].to_list() == [3]


def test_crlf_line_endings() -> None:
    raw = (line("a") + "\r\n\r\n" + line("b") + "\r\n").encode()
    assert ids_and_lines(parse_jsonl(raw).records) == [("a", 1), ("b", 3)]


@pytest.mark.parametrize(
    "bad",
    [
        "this is not json",
        '{"id": "x", "source": ',
        "[1, 2, 3]",
        "42",
        "-1.5",
        '"just a string"',
        "true",
        "null",
        line("x") + line("y"),  # two objects on one line
        line("x") + " trailing",
    ],
    ids=["text", "truncated", "array", "int", "float", "string", "bool", "null", "two_objects", "trailing"],
)
def test_malformed_line_is_kept_with_its_number_and_text(bad: str) -> None:
    raw = jsonl(line(1), "", bad, line(4))
    parsed = parse_jsonl(raw)
    assert parsed.unreadable is None
    assert ids_and_lines(parsed.records) == [("1", 1), ("4", 4)]
    assert parsed.malformed.schema == pl.Schema(MALFORMED)
    assert parsed.malformed.height == 1
    row = parsed.malformed.row(0, named=True)
    assert row["line"] == 3
    assert row["raw"] == bad
    assert "JSON" in row["message"]  # the wording is free; it must say why


def test_several_malformed_lines() -> None:
    raw = jsonl("[]", line(2), "{", line(4), "7")
    parsed = parse_jsonl(raw)
    assert ids_and_lines(parsed.records) == [("2", 2), ("4", 4)]
    assert parsed.malformed.select("line", "raw").rows() == [(1, "[]"), (3, "{"), (5, "7")]


@pytest.mark.parametrize("seed", range(5))
def test_mixed_lines_match_a_line_by_line_check(seed: int) -> None:
    """The fast path (cheap shape test, then one native read) agrees with checking every line alone."""
    import random

    kinds = [
        lambda i: line(i),
        lambda i: "  " + line(i) + " ",  # valid, but fails the cheap shape test
        lambda i: line(i) + "\r",  # CRLF
        lambda i: line(i)[: len(line(i)) // 2],  # truncated
        lambda i: "{" + line(i)[2:],  # broken, but passes the cheap shape test
        lambda i: "[" + line(i) + "]",
        lambda i: "",
        lambda i: "not json",
    ]
    rng = random.Random(seed)
    texts = [rng.choice(kinds)(i) for i in range(200)]
    parsed = parse_jsonl(jsonl(*texts))
    expected_good, expected_bad = [], []
    for number, text in enumerate(texts, start=1):
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            expected_bad.append(number)
            continue
        (expected_good if isinstance(value, dict) else expected_bad).append(number)
    assert parsed.records["line"].to_list() == expected_good
    assert parsed.records["id"].to_list() == [json.loads(texts[n - 1])["id"] for n in expected_good]
    assert parsed.malformed["line"].to_list() == expected_bad
    assert parsed.malformed["raw"].to_list() == [texts[n - 1] for n in expected_bad]


def test_file_of_only_malformed_lines() -> None:
    parsed = parse_jsonl(jsonl("nope", "[1]"))
    assert parsed.records.is_empty()
    assert parsed.records.schema == pl.Schema(RECORD_SCHEMA)
    assert parsed.malformed["line"].to_list() == [1, 2]


def test_empty_file() -> None:
    parsed = parse_jsonl(b"")
    assert parsed.unreadable is None
    assert parsed.records.is_empty() and parsed.malformed.is_empty()


@pytest.mark.parametrize(
    "bad_data",
    [
        '{"tokens": NaN}',
        '{"tokens": Infinity}',
        '{"tokens": -Infinity}',
        '{"tokens": 1e999}',
        '{"t": 1' + "0" * 400 + "}",
    ],
    ids=["nan", "inf", "minus_inf", "float_overflow", "int_overflow"],
)
def test_json_that_python_accepts_but_is_not_json_is_malformed_not_a_crash(bad_data: str) -> None:
    bad = line(2).replace('{"tokens": 2}', bad_data)
    assert bad != line(2)
    parsed = parse_jsonl(jsonl(line(1), bad, line(3)))
    assert parsed.unreadable is None
    assert ids_and_lines(parsed.records) == [("1", 1), ("3", 3)]
    assert parsed.malformed.select("line", "raw").rows() == [(2, bad)]


def test_byte_order_mark_at_file_start_is_ignored() -> None:
    raw = b"\xef\xbb\xbf" + jsonl(line(1), line(2))
    parsed = parse_jsonl(raw)
    assert parsed.malformed.is_empty()
    assert ids_and_lines(parsed.records) == [("1", 1), ("2", 2)]


def test_byte_order_mark_inside_the_file_is_a_malformed_line() -> None:
    raw = jsonl(line(1)) + b"\xef\xbb\xbf" + jsonl(line(2), line(3))
    parsed = parse_jsonl(raw)
    assert ids_and_lines(parsed.records) == [("1", 1), ("3", 3)]
    assert parsed.malformed["line"].to_list() == [2]


def test_invalid_utf8_line_is_malformed() -> None:
    raw = jsonl(line(1)) + line(2).replace("customer-1", "cust\udcff").encode("utf-8", "surrogateescape") + b"\n"
    parsed = parse_jsonl(raw)
    assert ids_and_lines(parsed.records) == [("1", 1)]
    assert parsed.malformed["line"].to_list() == [2]
    # The raw text keeps bytes that are not UTF-8 as \\xNN; U+FFFD (the replacement character) would lose them.
    assert '"cust\\xff"' in parsed.malformed["raw"][0]


@pytest.mark.parametrize(
    ("changes", "nulled"),
    [
        ({"id": 5}, "id"),
        ({"id": 1.5}, "id"),
        ({"id": {"a": 1}}, "id"),
        ({"id": [1]}, "id"),
        ({"id": True}, "id"),
        ({"subject": True}, "subject"),
        ({"subject": 0}, "subject"),
        ({"source": {"a": 1}}, "source"),
        ({"type": False}, "type"),
    ],
)
def test_non_string_attribute_becomes_null(changes: dict, nulled: str) -> None:
    raw = jsonl(line("ok1"), line("bad", **changes), line("ok2"))
    records = parse_jsonl(raw).records
    bad = records.filter(pl.col("line") == 2).row(0, named=True)
    assert bad[nulled] is None
    for other in ("id", "source", "type", "subject"):
        if other != nulled:
            assert bad[other] is not None
    # The other lines are untouched.
    assert records.filter(pl.col("line") != 2)["id"].to_list() == ["ok1", "ok2"]


@pytest.mark.parametrize(
    ("changes", "reason"),
    [({"id": 5}, "missing_id"), ({"id": {"a": 1}}, "missing_id"), ({"subject": True}, "missing_subject")],
)
def test_non_string_attribute_fails_validation(changes: dict, reason: str) -> None:
    valid, rejected = validate(parse_jsonl(jsonl(line("ok"), line("bad", **changes))).records)
    assert valid["id"].to_list() == ["ok"]
    assert rejected.select("line", "reason").rows() == [(2, reason)]


def test_non_string_subject_on_a_line_with_a_lone_surrogate_becomes_null() -> None:
    # orjson refuses the lone surrogate escape that Polars reads; the type check must still see the line.
    raw = jsonl(line("ok"), line("bad", subject=123).replace('"src"', '"src\\ud800"'))
    records = parse_jsonl(raw).records
    assert records.filter(pl.col("line") == 2)["subject"].to_list() == [None]
    assert records.filter(pl.col("line") == 1)["subject"].to_list() == ["customer-1"]


@pytest.mark.parametrize("attr", ["id", "source", "type", "subject"])
@pytest.mark.parametrize("escape", ["\\ud800", "\\udbff", "x\\ud83dy"], ids=["ud800", "udbff", "inside"])
def test_attribute_with_a_lone_surrogate_is_not_text(attr: str, escape: str) -> None:
    # Polars reads a lone high surrogate escape as NUL: ids "\ud800" and "\udbff" became one id (the second
    # event dropped as its duplicate) and a subject "\ud83d" was billed as "\x00". No UTF-8 text holds a lone
    # surrogate, so the attribute is not text: it is missing, like a number there.
    raw = jsonl(line("ok"), line("bad").replace(f'"{event("bad")[attr]}"', f'"{escape}"', 1), line("ok2"))
    records = parse_jsonl(raw).records
    assert records.filter(pl.col("line") == 2)[attr].to_list() == [None]
    assert records.filter(pl.col("line") != 2)["id"].to_list() == ["ok", "ok2"]
    _valid, rejected = validate(records)
    assert rejected.select("line", "reason").rows() == [(2, f"missing_{attr}")]


def test_attribute_with_an_escaped_nul_or_a_surrogate_pair_is_kept() -> None:
    raw = jsonl(line("a\x00b"), line("c", subject="\ud83d\ude00"))
    records = parse_jsonl(raw).records
    assert records["id"].to_list() == ["a\x00b", "c"]
    assert records["subject"].to_list() == ["customer-1", "\U0001f600"]


@pytest.mark.parametrize("depth", [600, 1000])
def test_deeply_nested_data_with_an_escape_is_bad_data_not_a_crash(depth: int) -> None:
    # Polars reads ~1000 levels; re-encoding the `data` of a line with an escape (see _repair_data) recursed in
    # Python and raised RecursionError: a traceback, on every run after too.
    deep = '{"d":' * depth + '{"tokens": 1, "p": "C:\\\\x"}' + "}" * depth  # json.dumps cannot write it
    raw = jsonl(line("ok"), line("deep", data=None).replace('"data": null', f'"data": {deep}'), line("ok2"))
    valid, rejected = validate(parse_jsonl(raw).records)
    assert valid["id"].to_list() == ["ok", "ok2"]
    assert rejected.select("line", "reason").rows() == [(2, "bad_data")]


@pytest.mark.parametrize("escape", ["\\u005c", "\\u005C", "\\\\"], ids=["u005c", "u005C", "backslash"])
def test_backslashes_in_data_keep_their_meaning(escape: str) -> None:
    # Polars writes a decoded backslash back raw: "x\\n" (backslash, n) would become a newline, "y\\" broken JSON.
    text = '{"g": "x' + escape + 'n", "h": "y' + escape + '", "v": 1}'
    raw = jsonl(line("esc").replace('{"tokens": "esc"}', text), line("plain"))
    data = parse_jsonl(raw).records["data"].to_list()
    assert json.loads(data[0]) == {"g": "x\\n", "h": "y\\", "v": 1}
    assert json.loads(data[1]) == {"tokens": "plain"}


@pytest.mark.parametrize(
    ("data", "is_text"),
    [
        ({"tokens": 1}, False),  # Polars writes the parsed object back: JSON by construction
        (None, False),
        ('{"tokens": 1}', True),  # a payload sent as a JSON string
        ({"s": "\ud83d\ude00"}, True),  # json.dumps escapes it as a surrogate pair
    ],
    ids=["object", "null", "json_string", "surrogate_escape"],
)
def test_jsonl_says_whether_data_may_be_the_producers_text(data, is_text: bool) -> None:
    assert parse_jsonl(jsonl(line("a"), line("b", data=data))).data_is_text is is_text
    assert parse_jsonl(jsonl(line("a"), "garbage", line("b", data=data))).data_is_text is is_text  # line by line


def test_numeric_looking_strings_stay_strings() -> None:
    raw = jsonl(line("5", subject="123", source="true", type="{x"))
    row = parse_jsonl(raw).records.row(0, named=True)
    assert (row["id"], row["subject"], row["source"], row["type"]) == ("5", "123", "true", "{x")


def test_key_first_seen_after_ten_thousand_events_is_kept() -> None:
    lines = [line(i) for i in range(10_050)]
    lines.append(line("late", data={"tokens": 1, "late_key": "here", "nested": {"deep": 7}}))
    records = parse_jsonl(jsonl(*lines)).records
    assert records.height == 10_051
    got = records.select(
        pl.col("data").str.json_path_match("$.late_key").alias("late"),
        pl.col("data").str.json_path_match("$.nested.deep").alias("deep"),
    ).filter(pl.col("late").is_not_null())
    assert got.rows() == [("here", "7")]
    # An envelope attribute first seen late is kept too.
    lines.append(line("dct", datacontenttype="application/json"))
    records = parse_jsonl(jsonl(*lines)).records
    assert records.filter(pl.col("id") == "dct")["datacontenttype"].to_list() == ["application/json"]


def test_data_object_and_null() -> None:
    raw = jsonl(
        line(1, data={"a": {"b": [1, 2]}, "s": "x"}), line(2, data=None), line(3).replace(', "data": {"tokens": 3}', "")
    )
    records = parse_jsonl(raw).records
    data = records["data"].to_list()
    assert json.loads(data[0]) == {"a": {"b": [1, 2]}, "s": "x"}
    assert data[1] is None and data[2] is None


# --- gzip --------------------------------------------------------------------------------------------


def test_gzip_jsonl_is_decompressed() -> None:
    raw = gzip.compress(jsonl(line(1), "", line(2), "nope"))
    parsed = parse_batch(raw, "landing/2024/01/batch.jsonl.gz")
    assert parsed.unreadable is None
    assert ids_and_lines(parsed.records) == [("1", 1), ("2", 3)]
    assert parsed.malformed.select("line", "raw").rows() == [(4, "nope")]


@pytest.mark.parametrize("name", ["batch.jsonl", "batch.ndjson", "batch.JSONL"])
def test_gzip_bytes_under_a_plain_jsonl_name_are_decompressed(name: str) -> None:
    """An object uploaded with `Content-Encoding: gzip` keeps its .jsonl name and reaches us compressed: it was
    quarantined line by line as malformed_json."""
    parsed = parse_batch(gzip.compress(jsonl(line(1), "nope")), name)
    assert parsed.unreadable is None and parsed.kind == "jsonl"
    assert ids_and_lines(parsed.records) == [("1", 1)]
    assert parsed.malformed.select("line", "raw").rows() == [(2, "nope")]


def test_gzip_bytes_under_a_parquet_name_are_decompressed() -> None:
    buf = io.BytesIO()
    pl.DataFrame([event(1), event(2)]).write_parquet(buf)
    parsed = parse_batch(gzip.compress(buf.getvalue()), "batch.parquet")
    assert parsed.unreadable is None and parsed.kind == "parquet"
    assert parsed.records["id"].to_list() == ["1", "2"]


@pytest.mark.parametrize(("name", "kind"), [("batch.jsonl", "jsonl"), ("batch.parquet", "parquet")])
def test_truncated_gzip_under_a_plain_name_is_unreadable(name: str, kind: str) -> None:
    good = gzip.compress(jsonl(*(line(i) for i in range(200))))
    parsed = parse_batch(good[: len(good) // 2], name)
    assert parsed.unreadable is not None and parsed.unreadable.startswith("bad gzip") and parsed.kind == kind


@pytest.mark.parametrize("name", ["batch.jsonl.gz", "batch.NDJSON.GZ"])
@pytest.mark.parametrize("damage", ["not_gzip", "truncated"])
def test_bad_gzip_is_unreadable(name: str, damage: str) -> None:
    good = gzip.compress(jsonl(*(line(i) for i in range(200))))
    raw = b"plain text, not gzip" if damage == "not_gzip" else good[: len(good) // 2]
    parsed = parse_batch(raw, name)
    assert parsed.unreadable is not None and "gzip" in parsed.unreadable
    assert parsed.records.is_empty() and parsed.malformed.is_empty()


def test_parse_batch_dispatches_plain_jsonl_and_ndjson() -> None:
    for name in ("a.jsonl", "b.ndjson", "C.JSONL"):
        assert ids_and_lines(parse_batch(jsonl(line(1)), name).records) == [("1", 1)]


def test_raw_text_of_rejected_jsonl_lines_is_the_exact_line() -> None:
    bad = line("x", subject="")
    parsed = parse_jsonl(jsonl(line(1), "", bad))
    _, rejected = validate(parsed.records)
    rejected = with_raw_text(rejected, parsed)
    assert rejected.select("line", "reason", "raw").rows() == [(3, "missing_subject", bad)]


# --- Parquet -----------------------------------------------------------------------------------------


def envelope_frame(n: int = 2) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "specversion": ["1.0"] * n,
            "id": [f"e{i}" for i in range(n)],
            "source": ["src"] * n,
            "type": ["prompt"] * n,
            "subject": ["customer-1"] * n,
        }
    )


def parquet_bytes(df: pl.DataFrame, tmp_path, name: str = "batch.parquet") -> bytes:
    path = tmp_path / name
    df.write_parquet(path)
    return path.read_bytes()


def test_parquet_with_struct_data_and_string_time(tmp_path) -> None:
    df = envelope_frame(3).with_columns(
        time=pl.Series(["2024-01-01T00:00:00Z", "2024-01-01T01:00:00.5+02:00", "2024-01-01T02:00:00Z"]),
        data=pl.Series(
            [{"tokens": 10, "model": "gpt"}, {"tokens": None, "model": "x"}, None],
            dtype=pl.Struct({"tokens": pl.Int64, "model": pl.String}),
        ),
    )
    parsed = parse_batch(parquet_bytes(df, tmp_path), "landing/batch.parquet")
    assert parsed.unreadable is None and parsed.kind == "parquet"
    assert not parsed.data_is_text  # written from the struct: JSON by construction
    records = parsed.records
    assert records.schema == pl.Schema(RECORD_SCHEMA)
    assert records["line"].to_list() == [1, 2, 3]
    data = records["data"].to_list()
    assert json.loads(data[0]) == {"tokens": 10, "model": "gpt"}
    assert json.loads(data[1]) == {"model": "x"}  # a null struct field is left out (absent and null mean the same)
    assert data[2] is None
    assert records.select(pl.col("data").str.json_path_match("$.tokens")).to_series().to_list() == ["10", None, None]
    valid, rejected = validate(records)
    assert rejected.is_empty()
    assert valid["time"].to_list() == [
        dt.datetime(2024, 1, 1, 0, 0, tzinfo=dt.UTC),
        dt.datetime(2023, 12, 31, 23, 0, 0, 500000, tzinfo=dt.UTC),
        dt.datetime(2024, 1, 1, 2, 0, tzinfo=dt.UTC),
    ]


def test_parquet_with_string_data(tmp_path) -> None:
    df = envelope_frame(4).with_columns(
        time=pl.lit("2024-01-01T00:00:00Z"),
        data=pl.Series(['{"tokens": "123456", "model": "gpt4"}', None, "null", '["not", "an", "object"]']),
    )
    parsed = parse_parquet(parquet_bytes(df, tmp_path))
    assert parsed.data_is_text  # the producer's own text: validation checks it as JSON
    valid, rejected = validate(parsed.records)
    # The JSON text `null` is a null payload (json.dumps(None)), like a null cell.
    assert valid.select("id", "data").rows() == [
        ("e0", '{"tokens": "123456", "model": "gpt4"}'),
        ("e1", None),
        ("e2", None),
    ]
    assert rejected.select("id", "reason").rows() == [("e3", "bad_data")]


@pytest.mark.parametrize(
    ("tz", "local", "utc"),
    [
        (None, dt.datetime(2024, 1, 1, 1, 2, 3, 456789), dt.datetime(2024, 1, 1, 1, 2, 3, 456789, tzinfo=dt.UTC)),
        ("UTC", dt.datetime(2024, 1, 1, 1, 2, 3), dt.datetime(2024, 1, 1, 1, 2, 3, tzinfo=dt.UTC)),
        ("Europe/Berlin", dt.datetime(2024, 7, 1, 12, 0), dt.datetime(2024, 7, 1, 10, 0, tzinfo=dt.UTC)),
        ("America/New_York", dt.datetime(2024, 1, 31, 21, 30), dt.datetime(2024, 2, 1, 2, 30, tzinfo=dt.UTC)),
    ],
    ids=["naive_is_utc", "utc", "berlin_summer", "new_york_crosses_month"],
)
@pytest.mark.parametrize("unit", ["ms", "us", "ns"])
def test_parquet_with_timestamp_time(tmp_path, tz, local, utc, unit) -> None:
    time = pl.Series("time", [local], dtype=pl.Datetime(unit))
    if tz is not None:
        time = time.dt.replace_time_zone(tz)
    if unit == "ms":
        local = local.replace(microsecond=local.microsecond // 1000 * 1000)
        utc = utc.replace(microsecond=utc.microsecond // 1000 * 1000)
    df = envelope_frame(1).with_columns(time, data=pl.lit('{"tokens": 1}'))
    valid, rejected = validate(parse_parquet(parquet_bytes(df, tmp_path)).records)
    assert rejected.is_empty()
    assert valid["time"].to_list() == [utc]
    assert valid["date"].to_list() == [utc.date().isoformat()]


def test_parquet_timestamp_keeps_nanoseconds(tmp_path) -> None:
    time = pl.Series("time", ["2024-01-01T00:00:00.123456789"]).str.to_datetime(time_unit="ns", time_zone="UTC")
    df = envelope_frame(1).with_columns(time, data=pl.lit(None, pl.String))
    valid, _ = validate(parse_parquet(parquet_bytes(df, tmp_path)).records)
    assert valid.select(pl.col("time").dt.nanosecond()).item() == 123456789


@pytest.mark.parametrize("unit", ["ms", "us"])
def test_parquet_timestamp_beyond_nanoseconds_is_bad_time_not_a_crash(tmp_path, unit) -> None:
    times = [dt.datetime(9999, 1, 1), dt.datetime(2024, 1, 1), dt.datetime(1, 1, 1)]
    df = envelope_frame(3).with_columns(pl.Series("time", times, dtype=pl.Datetime(unit)), data=pl.lit(None, pl.String))
    valid, rejected = validate(parse_parquet(parquet_bytes(df, tmp_path)).records)
    assert valid["time"].to_list() == [dt.datetime(2024, 1, 1, tzinfo=dt.UTC)]
    assert rejected["reason"].to_list() == ["bad_time", "bad_time"]


def test_parquet_missing_and_non_string_columns(tmp_path) -> None:
    df = pl.DataFrame(
        {
            "id": [1, 2],  # integer ids are not strings: treated as absent, like JSONL
            "source": ["src", "src"],
            "type": ["prompt", "prompt"],
            "subject": ["c", "c"],
            "time": ["2024-01-01T00:00:00Z", "2024-01-01T00:00:00Z"],
        }
    )
    parsed = parse_parquet(parquet_bytes(df, tmp_path))
    assert parsed.records.schema == pl.Schema(RECORD_SCHEMA)
    assert parsed.records["data"].to_list() == [None, None]
    _, rejected = validate(parsed.records)
    assert rejected["reason"].to_list() == ["missing_id", "missing_id"]


def test_parquet_with_categorical_strings(tmp_path) -> None:
    df = envelope_frame(2).with_columns(
        pl.col("subject").cast(pl.Categorical), time=pl.lit("2024-01-01T00:00:00Z"), data=pl.lit('{"tokens": 1}')
    )
    records = parse_parquet(parquet_bytes(df, tmp_path)).records
    assert records["subject"].to_list() == ["customer-1", "customer-1"]


@pytest.mark.parametrize("cut", ["half", "no_footer", "empty", "not_parquet"])
def test_truncated_parquet_is_unreadable(tmp_path, cut: str) -> None:
    df = envelope_frame(100).with_columns(time=pl.lit("2024-01-01T00:00:00Z"), data=pl.lit('{"tokens": 1}'))
    good = parquet_bytes(df, tmp_path)
    raw = {"half": good[: len(good) // 2], "no_footer": good[:-8], "empty": b"", "not_parquet": jsonl(line(1))}[cut]
    parsed = parse_batch(raw, "landing/x.parquet")
    assert parsed.kind == "parquet"
    assert parsed.unreadable is not None and "Parquet" in parsed.unreadable
    assert parsed.records.is_empty()
    assert parsed.records.schema == pl.Schema(RECORD_SCHEMA)


@pytest.mark.parametrize("seed", range(4))
def test_struct_data_text_leaves_out_null_fields_only(seed: int) -> None:
    import random

    from transforms.parse import struct_json

    rng = random.Random(seed)
    dtype = pl.Struct({"a": pl.Int64, "b": pl.String, "c": pl.Float64, "n": pl.Struct({"x": pl.Int64, "y": pl.String})})

    def value():
        if rng.random() < 0.1:
            return None
        return {
            "a": rng.choice([None, 1, -7]),
            "b": rng.choice([None, "x", "", 'q"uote']),
            "c": rng.choice([None, 2.5, 3.0]),
            "n": rng.choice([None, {"x": None, "y": "in"}, {"x": 4, "y": None}]),
        }

    rows = [value() for _ in range(300)]
    series = pl.Series("data", rows, dtype=dtype)
    got = struct_json(series).to_list()
    full = series.struct.json_encode().to_list()
    for row, text, whole in zip(rows, got, full, strict=True):
        if row is None:
            assert text is None
            continue
        expected = {k: v for k, v in json.loads(whole).items() if v is not None}  # nested nulls stay
        assert json.loads(text) == expected
        assert list(json.loads(text)) == list(expected)  # field order kept


def test_struct_data_with_many_shapes_is_encoded_whole() -> None:
    from transforms.parse import MAX_NULL_PATTERNS, struct_json

    fields = [f"f{i}" for i in range(10)]
    rows = [{f: (i if (i >> k) & 1 else None) for k, f in enumerate(fields)} for i in range(MAX_NULL_PATTERNS + 1)]
    series = pl.Series("data", rows)
    assert struct_json(series).to_list() == series.struct.json_encode().to_list()


def test_struct_data_fields_named_like_helper_columns() -> None:
    from transforms.parse import struct_json

    series = pl.Series(
        "data", [{"#row": 1, "#present": None, "data": "x"}, {"#row": None, "#present": 2, "data": None}]
    )
    assert [json.loads(t) for t in struct_json(series).to_list()] == [{"#row": 1, "data": "x"}, {"#present": 2}]


NUMBERS = ["1.0", "1e3", "-0.0", "0.1", "2.5", "1e-7", "1e21", "1.2345678901234567e18", "12345678901234567890", "1e300"]


@pytest.mark.parametrize(
    "escape", ["tab\\there", "\\ud83d\\ude00", "C:\\\\x"], ids=["tab", "surrogate_pair", "backslash"]
)
def test_number_text_does_not_depend_on_an_escape_elsewhere_in_the_line(escape: str) -> None:
    # A line with such an escape has its data re-encoded (see test_backslashes_in_data_keep_their_meaning);
    # its numbers must read as the same text as on a line without one, or 1.0 would be the group "1" on one
    # event and "1.0" on the next, and count as two values for UNIQUE_COUNT.
    texts = {}
    for with_escape in (False, True):
        lines = []
        for i, number in enumerate(NUMBERS):
            data = (
                '{"v": '
                + number
                + ', "o": {"w": ['
                + number
                + "]}"
                + (', "note": "' + escape + '"' if with_escape else "")
                + "}"
            )
            lines.append(line(i).replace('{"tokens": ' + str(i) + "}", data))
        records = parse_jsonl(jsonl(*lines)).records
        texts[with_escape] = records.select(
            pl.col("data").str.json_path_match("$.v").alias("v"), pl.col("data").str.json_path_match("$.o").alias("o")
        ).rows()
    assert texts[True] == texts[False]
    assert texts[False][0] == ("1", '{"w":[1]}')  # the JSONL canonical form (README: 1.0 reads as 1)


@pytest.mark.parametrize("form", ["text", "struct"])
def test_parquet_numbers_read_as_the_same_text_as_in_jsonl(form: str, tmp_path) -> None:
    # README, "Text of numbers": one payload is one group-by and UNIQUE_COUNT value whichever format landed it;
    # `7.0` in Parquet (text or a struct's Float64) was "7.0" where JSONL gives "7". Struct fields are floats,
    # so there the numbers are those a float holds; a string holding a number-like text is left alone.
    numbers = [*NUMBERS, "70E-1", "7.00", "-3.0", "1.5e3"]
    if form == "struct":
        numbers = [repr(float(n)) for n in numbers if n != "12345678901234567890"]
    docs = ['{"v": ' + n + ', "o": {"w": [' + n + ', 1]}, "s": "a:' + n + ',b"}' for n in numbers]
    lines = [line(i).replace('{"tokens": ' + str(i) + "}", doc) for i, doc in enumerate(docs)]
    from_jsonl = parse_jsonl(jsonl(*lines)).records
    envelope = [{k: v for k, v in event(i).items() if k != "data"} for i in range(len(docs))]
    if form == "text":
        df = pl.DataFrame([{**e, "data": doc} for e, doc in zip(envelope, docs, strict=True)])
    else:
        data = [json.loads(doc) for doc in docs]
        df = pl.DataFrame(envelope).with_columns(
            pl.Series(
                "data",
                data,
                dtype=pl.Struct({"v": pl.Float64, "o": pl.Struct({"w": pl.List(pl.Float64)}), "s": pl.String}),
            )
        )
    from_parquet = parse_parquet(parquet_bytes(df, tmp_path)).records
    paths = [pl.col("data").str.json_path_match(p).alias(p) for p in ("$.v", "$.o", "$.s")]
    got, want = from_parquet.select(paths).rows(), from_jsonl.select(paths).rows()
    assert got == want
    assert want[0] == ("1", '{"w":[1,1]}', "a:1.0,b")  # 1.0: the integer, as JSONL writes it


def test_parquet_data_nested_deeper_than_python_recurses_is_kept_as_sent(tmp_path) -> None:
    # re-encoding a whole number (but for digits and a zero fraction, rewritten natively) is recursive Python: a
    # payload nested hundreds of levels must not crash the run
    deep = ['{"a":' * 900 + number + "}" * 900 for number in ("7e0", "7.0")]
    df = pl.DataFrame([{**{k: v for k, v in event(i).items() if k != "data"}, "data": d} for i, d in enumerate(deep)])
    assert parse_parquet(parquet_bytes(df, tmp_path)).records["data"].to_list() == [deep[0], deep[1].replace(".0", "")]


@pytest.mark.parametrize("form", ["text", "struct"])
def test_parquet_whole_numbers_are_rewritten_without_a_python_call_per_row(form: str, tmp_path, monkeypatch) -> None:
    # A struct's Float64 field holding whole values (token counts, durations) is encoded "12.0" on every row:
    # re-encoding each such row with orjson in Python made parsing 1M of them 2 s instead of 0.25 s. The usual
    # form, digits and a zero fraction, is rewritten natively; only exponents and the like go through Python.
    import transforms.parse as parse

    calls: list[str] = []
    slow = parse._as_jsonl_writes
    monkeypatch.setattr(parse, "_as_jsonl_writes", lambda text: calls.append(text) or slow(text))
    values = [12.0, -3.0, 100.0, 0.0, 999999999999999.0, 2.5]
    envelope = [{k: v for k, v in event(i).items() if k != "data"} for i in range(len(values))]
    data = [{"tokens": v, "s": "a:7.0}", "w": [v, 1.0]} for v in values]
    df = pl.DataFrame(envelope).with_columns(
        pl.Series("data", data, dtype=pl.Struct({"tokens": pl.Float64, "s": pl.String, "w": pl.List(pl.Float64)}))
    )
    if form == "text":
        df = df.with_columns(pl.col("data").struct.json_encode())
    got = parse_parquet(parquet_bytes(df, tmp_path)).records["data"].to_list()
    assert calls == []
    assert [json.loads(text) for text in got] == [{"tokens": v, "s": "a:7.0}", "w": [v, 1]} for v in values]
    assert got[0] == '{"tokens":12,"s":"a:7.0}","w":[12,1]}'
    assert got[-1] == '{"tokens":2.5,"s":"a:7.0}","w":[2.5,1]}'


def test_rewriting_whole_numbers_never_makes_parquet_text_json(tmp_path) -> None:
    # `10.0.0` and `1 .0` are not JSON numbers: dropping a `.0` from them would make a bad payload count
    bad = ['{"v": 10.0.0, "w": 7.0}', '{"w": 7.0, "v": 1 .0}', '{"w":7.0,"v":[1 .0]}', '{"v": 1.0.0}']
    docs = [*bad, '{"w": 7.0, "v": [1.0,2.0,3.0]}']
    envelope = {k: v for k, v in event(0).items() if k not in ("id", "data")}
    df = pl.DataFrame([{**envelope, "id": str(i), "data": doc} for i, doc in enumerate(docs)])
    valid, rejected = validate(parse_parquet(parquet_bytes(df, tmp_path)).records)
    assert sorted(rejected["reason"].to_list()) == ["bad_data"] * len(bad)
    assert valid["data"].to_list() == ['{"w": 7, "v": [1,2,3]}']
