"""Envelope validation (SPEC §2): the first failing check is the reason; valid times become UTC nanoseconds."""

from __future__ import annotations

import datetime as dt
import json

import polars as pl
import pytest

from transforms.parse import parse_jsonl
from transforms.schema import ENVELOPE, TIME
from transforms.validate import REASONS, validate

ABSENT = object()  # leave the attribute out of the JSON object


def record(**changes) -> dict:
    out = {
        "specversion": "1.0",
        "id": "evt-1",
        "source": "src",
        "type": "prompt",
        "subject": "customer-1",
        "time": "2024-01-01T00:00:00Z",
        "data": {"tokens": 1},
    }
    out.update(changes)
    return {k: v for k, v in out.items() if v is not ABSENT}


def run(*records: dict) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Validate records as they arrive from a JSONL batch (absent keys really absent)."""
    raw = "\n".join(json.dumps(r) for r in records).encode()
    return validate(parse_jsonl(raw).records)


def reason_of(rec: dict) -> str | None:
    valid, rejected = run(rec)
    assert valid.height + rejected.height == 1
    return None if rejected.is_empty() else rejected["reason"].item()


def test_valid_record() -> None:
    valid, rejected = run(record())
    assert rejected.is_empty()
    row = valid.row(0, named=True)
    assert row["time"] == dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    assert row["date"] == "2024-01-01"
    assert json.loads(row["data"]) == {"tokens": 1}
    assert valid.schema["time"] == TIME
    assert valid.schema["date"] == pl.String
    assert "_time" not in valid.columns and "_reason" not in valid.columns


@pytest.mark.parametrize("attr", ["id", "source", "type", "subject"])
@pytest.mark.parametrize("value", [ABSENT, None, ""], ids=["absent", "null", "empty"])
def test_missing_attribute(attr: str, value) -> None:
    assert reason_of(record(**{attr: value})) == f"missing_{attr}"


@pytest.mark.parametrize("value", [ABSENT, None], ids=["absent", "null"])
def test_missing_time(value) -> None:
    assert reason_of(record(time=value)) == "missing_time"


@pytest.mark.parametrize(
    "time",
    [
        "2024-01-01T00:00:00",  # no offset
        "2024-01-01T00:00:00.123",  # no offset, with fraction
        "2024-01-01",  # a date only
        "2024-02-30T00:00:00Z",  # no such date
        "2023-02-29T00:00:00Z",  # not a leap year
        "2024-13-01T00:00:00Z",
        "2024-01-01T24:00:00Z",
        "2024-01-01T00:60:00Z",
        "2024-01-01T00:00:00+0200",  # offset without colon is not RFC 3339
        "2024-01-01T00:00:00+25:00",
        "2024-01-01 00:00:00Z",
        "2024-01-01T00:00:00.Z",
        "yesterday",
        "1704067200",
        "",
        " 2024-01-01T00:00:00Z",
        "2024-01-01T00:00:00Z ",
        "0001-05-16T22:30:20Z",  # outside what Datetime(ns) holds: used to wrap around to 1755
        "9999-01-01T00:00:00Z",
        "1677-12-31T23:59:59Z",
        "2262-01-01T00:00:00Z",
    ],
)
def test_bad_time(time: str) -> None:
    assert reason_of(record(time=time)) == "bad_time"


@pytest.mark.parametrize(
    ("time", "utc"),
    [
        ("1678-01-01T00:00:00Z", "1678-01-01T00:00:00"),
        ("2261-12-31T23:59:59.999999999Z", "2261-12-31T23:59:59.999999999"),
    ],
)
def test_years_at_the_edges_of_the_range_are_kept(time: str, utc: str) -> None:
    valid, _ = run(record(time=time))
    assert valid["time"].dt.strftime("%Y-%m-%dT%H:%M:%S%.f").to_list() == [utc]


@pytest.mark.parametrize(
    "time", ["2261-12-31T23:59:59-01:00", "2261-12-31T22:00:00-02:00", "1678-01-01T00:00:00+01:00"]
)
def test_a_time_whose_utc_instant_leaves_the_years_is_bad_time(time: str) -> None:
    # Its year is in range as written, but the UTC instant (and so its `events/` date) is not: stored, it sat
    # on 2262-01-01 or 1677-12-31, where no backfill or query may reach (they take 1678-01-01..2262-01-01),
    # so a changed meter could never be rebuilt over it (`meterlake status` printed a refused command).
    assert reason_of(record(time=time)) == "bad_time"


@pytest.mark.parametrize(
    ("time", "utc"),
    [("2261-12-31T23:59:59+01:00", "2261-12-31T22:59:59"), ("1678-01-01T00:30:00-01:00", "1678-01-01T01:30:00")],
)
def test_an_offset_that_keeps_the_utc_instant_in_the_years_is_kept(time: str, utc: str) -> None:
    valid, _ = run(record(time=time))
    assert valid["time"].dt.strftime("%Y-%m-%dT%H:%M:%S").to_list() == [utc]


def test_numeric_time_is_bad_time() -> None:
    assert reason_of(record(time=1704067200)) == "bad_time"


@pytest.mark.parametrize(
    "data", ["hello", "", [1, 2], [], 5, True], ids=["string", "empty_string", "array", "empty_array", "number", "bool"]
)
def test_bad_data(data) -> None:
    assert reason_of(record(data=data)) == "bad_data"


@pytest.mark.parametrize("data", [None, ABSENT, {}, {"a": {"b": []}}], ids=["null", "absent", "empty", "nested"])
def test_data_object_or_null_is_valid(data) -> None:
    assert reason_of(record(data=data)) is None


# Text that the producer sent as text (a Parquet string column, a JSONL payload sent as a JSON string) is
# checked in full, not by its first character.
NOT_JSON_OBJECTS = {
    "unterminated": '{"v": 1,',
    "not_json": "{not json}",
    "nan": '{"v": NaN}',
    "beyond_float64": '{"v": 1e400}',
    "trailing_text": '{"v": 4} trailing',
    "two_objects": '{"a": 1}{"b": 2}',
    "trailing_comma": '{"a": 1,}',
    "leading_zero": '{"a": 01}',
    "raw_control_character": '{"a": "x\ty"}',
    "lone_surrogate": '{"a": "\\ud800"}',
    "array": "[1]",
}
JSON_OBJECTS = {
    "compact": '{"v":1}',
    "spaced": ' {"v": 3}\n',
    "nested": '{"a": [1, {"b": null}], "c": -0.0, "d": 1E+2}',
    "big_integer": '{"g": 123456789012345678901234567890}',
    "largest_float_in_full": '{"v": 1797693134862315' + "7" + "0" * 292 + ".0}",  # how Polars writes 1.8e308
    "escapes": '{"a": "\\ud83d\\ude00 \\u0000 \\\\"}',
}


def _text_data(texts: list[str]) -> pl.DataFrame:
    rows = [{**record(id=f"e{i}"), "data": t} for i, t in enumerate(texts)]
    return pl.DataFrame(rows, schema=ENVELOPE)


@pytest.mark.parametrize("text", NOT_JSON_OBJECTS.values(), ids=NOT_JSON_OBJECTS.keys())
def test_data_text_that_is_not_a_json_object_is_bad_data(text: str) -> None:
    valid, rejected = validate(_text_data(['{"v": 1}', text]))  # a good row beside it: verdicts are per row
    assert valid["id"].to_list() == ["e0"]
    assert rejected.select("id", "reason").rows() == [("e1", "bad_data")]
    # The same text sent inside a JSONL record as a JSON string (a double-encoded payload).
    assert reason_of(record(data=text)) == "bad_data"


def test_only_rows_marked_as_text_and_text_without_a_quote_are_checked() -> None:
    # Rows whose data a parser wrote from a parsed value are JSON by construction (the check costs a parse);
    # such text always holds a quote, except `{}`, so text without one is checked whatever the mark.
    # Text that does not start with `{` (an array or a string written back) is checked too.
    texts = ['{"v": 1,', '{"v": 1,', "{bad", "{}", '["x"]', ' ["x", {"v": 1}]']
    records = _text_data(texts).with_columns(data_is_text=pl.Series([True] + [False] * 5))
    valid, rejected = validate(records)
    assert rejected.select("id", "reason").rows() == [(f"e{i}", "bad_data") for i in (0, 2, 4, 5)]
    assert valid["id"].to_list() == ["e1", "e3"]
    assert "data_is_text" not in valid.columns and "data_is_text" not in rejected.columns


@pytest.mark.parametrize("text", JSON_OBJECTS.values(), ids=JSON_OBJECTS.keys())
def test_data_text_that_is_a_json_object_is_valid(text: str) -> None:
    valid, rejected = validate(_text_data([text]))
    assert rejected.is_empty()
    assert valid["data"].to_list() == [text]
    # The same verdict when a bad row beside it sends the whole column to the row-by-row check.
    valid, rejected = validate(_text_data([text, "{bad"]))
    assert valid["id"].to_list() == ["e0"] and rejected["id"].to_list() == ["e1"]
    assert reason_of(record(data=text)) is None


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"id": ABSENT, "time": "not a time"}, "missing_id"),
        ({"id": "", "source": None, "type": "", "subject": None, "time": ABSENT, "data": "x"}, "missing_id"),
        ({"source": None, "subject": ""}, "missing_source"),
        ({"type": ABSENT, "subject": ABSENT}, "missing_type"),
        ({"subject": None, "time": ABSENT}, "missing_subject"),
        ({"subject": 7, "time": "bad"}, "missing_subject"),
        ({"time": None, "data": [1]}, "missing_time"),
        ({"time": "2024-01-01T00:00:00", "data": "x"}, "bad_time"),
    ],
)
def test_first_failing_check_wins(changes: dict, reason: str) -> None:
    assert reason_of(record(**changes)) == reason


@pytest.mark.parametrize(
    ("text", "nanos"),
    [
        ("2024-01-01T00:00:00.123456789Z", 123_456_789),
        ("2024-01-01T00:00:00.000000001Z", 1),
        ("2024-01-01T00:00:00.5Z", 500_000_000),
        ("2024-01-01T00:00:00.001Z", 1_000_000),
        ("2024-01-01T00:00:00.123456Z", 123_456_000),
        ("2024-01-01T00:00:00.1234567899999Z", 123_456_789),  # beyond ns: truncated, never rounded
        ("2024-01-01T00:00:00.999999999999Z", 999_999_999),  # does not round into the next second
    ],
)
def test_fractions_kept_to_nanoseconds(text: str, nanos: int) -> None:
    valid, rejected = run(record(time=text))
    assert rejected.is_empty()
    got = valid.select(
        pl.col("time").dt.second().alias("s"), pl.col("time").dt.nanosecond().alias("ns"), pl.col("date")
    ).row(0)
    assert got == (0, nanos, "2024-01-01")


@pytest.mark.parametrize(
    ("text", "utc", "date"),
    [
        ("2024-01-01T01:30:00+02:00", dt.datetime(2023, 12, 31, 23, 30, tzinfo=dt.UTC), "2023-12-31"),
        ("2024-01-31T23:30:00-02:00", dt.datetime(2024, 2, 1, 1, 30, tzinfo=dt.UTC), "2024-02-01"),
        ("2024-06-15T12:00:00+05:30", dt.datetime(2024, 6, 15, 6, 30, tzinfo=dt.UTC), "2024-06-15"),
        ("2024-06-15T12:00:00-00:00", dt.datetime(2024, 6, 15, 12, 0, tzinfo=dt.UTC), "2024-06-15"),
        ("2024-06-15T12:00:00+00:00", dt.datetime(2024, 6, 15, 12, 0, tzinfo=dt.UTC), "2024-06-15"),
        ("2024-06-15t12:00:00z", dt.datetime(2024, 6, 15, 12, 0, tzinfo=dt.UTC), "2024-06-15"),
        ("2024-02-29T23:59:59.5-01:00", dt.datetime(2024, 3, 1, 0, 59, 59, 500000, tzinfo=dt.UTC), "2024-03-01"),
    ],
)
def test_offsets_normalised_to_utc(text: str, utc: dt.datetime, date: str) -> None:
    valid, rejected = run(record(time=text))
    assert rejected.is_empty()
    assert valid.select("time", "date").row(0) == (utc, date)


def test_offset_with_nanoseconds() -> None:
    valid, _ = run(record(time="2024-01-01T00:00:00.000000007+02:00"))
    assert valid.select(pl.col("time").dt.nanosecond(), pl.col("date")).row(0) == (7, "2023-12-31")
    assert valid["time"].dt.strftime("%Y-%m-%dT%H:%M:%S%.9f").item() == "2023-12-31T22:00:00.000000007"


def test_mixed_batch_split_keeps_lines_and_messages() -> None:
    valid, rejected = run(
        record(id="a"),
        record(id="b", subject=""),
        record(id="c", time="2024-01-01T00:00:00+01:00"),
        record(id="d", time="soon"),
        record(id="e", source=ABSENT),
    )
    assert valid.select("id", "line").rows() == [("a", 1), ("c", 3)]
    assert rejected.select("id", "line", "reason").rows() == [
        ("b", 2, "missing_subject"),
        ("d", 4, "bad_time"),
        ("e", 5, "missing_source"),
    ]
    assert rejected["message"].to_list() == [REASONS["missing_subject"], REASONS["bad_time"], REASONS["missing_source"]]
    # The raw column is the envelope as JSON: enough to see what was wrong.
    raw_d = json.loads(rejected.filter(pl.col("id") == "d")["raw"].item())
    assert raw_d["time"] == "soon" and raw_d["id"] == "d"
    # Rejected rows keep the original text of time.
    assert rejected.schema["time"] == pl.String


def test_every_reason_has_a_message() -> None:
    assert set(REASONS) == {
        "missing_id",
        "missing_source",
        "missing_type",
        "missing_subject",
        "missing_time",
        "bad_time",
        "bad_data",
    }
    assert all(REASONS.values())


def test_empty_input() -> None:
    empty = pl.DataFrame(schema={**ENVELOPE, "line": pl.Int64})
    valid, rejected = validate(empty)
    assert valid.is_empty() and rejected.is_empty()
    assert valid.schema["time"] == TIME


def test_a_lone_surrogate_in_a_jsonl_object_is_bad_data_in_the_pipeline_and_alone() -> None:
    # Polars reads `\ud800` as a raw NUL; the line is re-encoded with the escape kept, then checked like text.
    ok = json.dumps(record(id="ok", data={"s": "\U0001f600"}))  # a surrogate pair: fine
    lone = json.dumps(record(id="lone")).replace('{"tokens": 1}', '{"g": "ok", "s": "\\ud800"}')
    parsed = parse_jsonl(f"{ok}\n{lone}\n".encode())
    assert parsed.data_is_text
    assert json.loads(parsed.records["data"][1]) == {"g": "ok", "s": "\ud800"}  # escaped, not a NUL
    for records in (parsed.records, parsed.records.with_columns(data_is_text=pl.lit(parsed.data_is_text))):
        valid, rejected = validate(records)
        assert valid["id"].to_list() == ["ok"]
        assert rejected.select("id", "reason").rows() == [("lone", "bad_data")]


def test_a_surrogate_escape_sends_only_its_own_row_to_the_row_by_row_check(monkeypatch) -> None:
    # Python's json.dumps escapes every emoji as a surrogate pair: one such row must not cost every row.
    from transforms import validate as module

    checked: list[str] = []
    original = module._is_object
    monkeypatch.setattr(module, "_is_object", lambda text: checked.append(text) or original(text))
    texts = ['{"v": 1}', '{"s": "\\ud83d\\ude00"}', '{"v": 2}', '{"s": "\\ud800"}']
    valid, rejected = validate(_text_data(texts))
    assert checked == texts[1::2]
    assert valid["id"].to_list() == ["e0", "e1", "e2"]
    assert rejected.select("id", "reason").rows() == [("e3", "bad_data")]
