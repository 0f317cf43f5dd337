"""Turn the bytes of one landed batch into envelope records, keeping every key and every bad line.

JSONL is read with an explicit all-text schema (Polars' inference drops keys first seen late). A file
with a malformed line falls back to a per-line parse so only that line is quarantined.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from polars.exceptions import PanicException

from transforms.schema import ENVELOPE, conform, empty
from transforms.validate import SURROGATE_ESCAPE

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet",)
BATCH_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES

# Values of string attributes that Polars may have produced from a non-string JSON value.
_MAYBE_NOT_STRING = r"^(?s:-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|\{.*|\[.*)$"
STRING_ATTRS = ("id", "source", "type", "subject")

MALFORMED = {"line": pl.Int64, "raw": pl.String, "message": pl.String}

# Polars writes a nested `data` object back as text escaping only `"`, \n and \r: a backslash, tab or other
# control character comes out raw ({"p": "C:\\x"} becomes {"p": "C:\x"}), so the text is not JSON, or is other
# JSON, and every value of that event is lost. Lines whose source holds such an escape (a backslash written
# as `\\` or as `\u005c`, a control character as `\t`, `\b`, `\f` or `\u0000`-`\u001f`) are re-encoded.
# A lone surrogate escape (`\ud800`) comes back as a raw NUL: lines with surrogate escapes are re-encoded too.
_UNSAFE_ESCAPE = re.compile(rb"\\(?:[\\tbf]|u00[01][0-9a-fA-F]|u005[cC]|u[dD][89a-fA-F])")

# A JSONL file where some `data` may be the producer's own text rather than Polars' writing of a parsed
# object: a payload sent as a JSON string (`"data": "{...}"`). One search with a literal prefix, ~30 ms per
# 100k events (an alternation here made it 10x slower).
_TEXT_DATA = re.compile(rb'"data"\s*:\s*"')
_SURROGATE_ESCAPE = re.compile(SURROGATE_ESCAPE.encode())  # re-encoded data with a lone one is checked as well


class Lines:
    """The lines of a JSONL text, found once on first use (several steps quote lines by number).

    Lines are cut from the text by their byte offsets, which Polars finds without a Python object per line:
    quoting a hundred lines of a 100k-line file should not cost a full split.
    """

    def __init__(self, raw: bytes, lines: list[bytes] | None = None, spans: pl.DataFrame | None = None) -> None:
        self.raw = raw
        self._lines = lines
        self._spans = spans  # _line_spans(raw), if the caller has it

    def all(self) -> list[bytes]:
        if self._lines is None:
            self._lines = self.raw.split(b"\n")
        return self._lines

    def get(self, numbers: list[int]) -> list[bytes]:
        """Lines `numbers`, counting from 1."""
        if self._lines is not None:
            return [self._lines[n - 1] for n in numbers]
        if self._spans is None:
            self._spans = _line_spans(self.raw)
        picked = self._spans.select(pl.col("start", "end").gather(pl.Series(numbers, dtype=pl.Int64) - 1))
        return [self.raw[start:end] for start, end in picked.iter_rows()]

    def __getitem__(self, number: int) -> bytes:
        """Line `number`, counting from 1."""
        return self.get([number])[0]


@dataclass(frozen=True)
class Parsed:
    """Records (ENVELOPE + line, one row per record) and what could not be parsed."""

    records: pl.DataFrame
    malformed: pl.DataFrame  # MALFORMED rows: lines that are not a JSON object
    unreadable: str | None  # why the whole file could not be read, if it could not
    kind: str  # "jsonl" or "parquet"
    lines: Lines | None = None  # the decompressed JSONL text, to quote rejected lines exactly
    # Whether `data` may hold the producer's own text, which validation must check as JSON (see
    # `transforms.validate.json_objects`); False where every `data` text was written from a parsed value.
    data_is_text: bool = True


GZIP_MAGIC = b"\x1f\x8b"


def parse_batch(raw: bytes, name: str) -> Parsed:
    """A batch by its name; gzip bytes under any name are decompressed first. An object uploaded with
    `Content-Encoding: gzip` (`aws s3 cp --content-encoding gzip`, or a producer that compresses its request) keeps
    its `.jsonl` or `.parquet` name and reaches us compressed: neither JSON text nor Parquet (`PAR1`) can start
    with these two bytes, so reading them as gzip loses nothing."""
    lower = name.lower()
    if lower.endswith(".gz") or raw.startswith(GZIP_MAGIC):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            return _unreadable(f"bad gzip: {exc}", "parquet" if lower.endswith(PARQUET_SUFFIXES) else "jsonl")
    if lower.endswith(PARQUET_SUFFIXES):
        return parse_parquet(raw)
    return parse_jsonl(raw)


def _unreadable(why: str, kind: str) -> Parsed:
    return Parsed(empty({**ENVELOPE, "line": pl.Int64}), empty(MALFORMED), why, kind)


def _nonblank_line_numbers(raw: bytes) -> list[int]:
    return [i + 1 for i, line in enumerate(raw.split(b"\n")) if line.strip()]


def parse_jsonl(raw: bytes) -> Parsed:
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark (Windows editors) is not data
    try:
        records = pl.read_ndjson(io.BytesIO(raw), schema=ENVELOPE)
    except Exception:  # noqa: BLE001 - any parse failure means: find the bad lines one by one
        return _parse_jsonl_by_line(raw)
    # Row i is line i+1 unless the file has blank lines; only then pay for the split.
    newlines = raw.count(b"\n") + (0 if raw.endswith(b"\n") or not raw else 1)
    if newlines == records.height:
        lines = pl.int_range(1, records.height + 1, eager=True, dtype=pl.Int64)
    else:
        numbers = _nonblank_line_numbers(raw)
        if len(numbers) != records.height:
            return _parse_jsonl_by_line(raw)
        lines = pl.Series(numbers, dtype=pl.Int64)
    records = records.with_columns(line=lines)
    text = Lines(raw)
    records = _repair_data(_check_string_types(records, text), text)
    return Parsed(records, empty(MALFORMED), None, "jsonl", text, _has_text_data(raw))


def _has_text_data(raw: bytes) -> bool:
    """Whether a JSONL file may hold `data` sent as a JSON string, or a surrogate escape.

    Without a backslash in the file (`in` a byte is a fast memchr; the searches below cost ~0.3 s per 1M
    events), a string cannot hold a quote: string-sent `data` then has none, and validation checks every
    text without a quote, or not starting with `{`, anyway (see `transforms.validate.json_objects`). A key
    spelled with an escape (`"d\\u0061ta"`) is not found: such a file's text is trusted.
    """
    if b"\\" not in raw:
        return False
    return _TEXT_DATA.search(raw) is not None or _SURROGATE_ESCAPE.search(raw) is not None


def _parse_jsonl_by_line(raw: bytes) -> Parsed:
    """Find the malformed lines of a file Polars could not read whole, and read the rest at native speed.

    A cheap test (starts with `{"`, ends with `}`), run by Polars over the whole buffer, sets aside the lines
    that are surely or possibly bad (truncated lines, arrays, plain text, lines with surrounding spaces or a
    CR); only those are checked one by one with orjson (strict like Polars: no NaN, no infinities, valid
    UTF-8). If the remaining lines still do not read, a bad line passed the cheap test, and every line is
    checked with orjson. No step makes one Python object per line unless it has to.
    """
    spans = _line_spans(raw).with_row_index("index")
    suspects = spans.filter(~pl.col("shaped")).select("index", "start", "end")
    removed, bad = _check_lines(raw, suspects.iter_rows())
    try:
        return _read_all_but(raw, spans, removed, bad)
    except Exception:  # noqa: BLE001 - some line passed the cheap test but is not JSON: check them all
        removed, bad = _check_lines(raw, spans.select("index", "start", "end").iter_rows())
    try:
        return _read_all_but(raw, spans, removed, bad)
    except Exception as exc:  # noqa: BLE001 - JSON that Python accepts but Polars does not: never crash the run
        return _unreadable(f"unreadable JSONL: {str(exc).splitlines()[0][:200]}", "jsonl")


_SPANS = {"start": pl.Int64, "end": pl.Int64, "shaped": pl.Boolean}

Span = tuple[int, int, int]  # (index from 0, start, end) of one line


def _line_spans(raw: bytes) -> pl.DataFrame:
    """Every line of `raw` as `raw.split(b"\\n")` cuts it: byte `start` and `end` (newline excluded), and whether
    it is `shaped` like one JSON object (starts with `{"`, ends with `}`).

    Computed by Polars on a zero-copy UInt8 view of the bytes: a Python split and shape test of a 100k-line
    file cost about half as much as reading it with read_ndjson.
    """
    size = len(raw)
    if not size:  # one empty line; a zero-length view cannot be indexed
        return pl.DataFrame({"start": [0], "end": [0], "shaped": [False]}, schema=_SPANS)
    byte = pl.from_arrow(pa.Array.from_buffers(pa.uint8(), size, [None, pa.py_buffer(raw)]))
    # arg_where: only the newlines' offsets are materialised, not an index of every byte
    newlines = byte.to_frame("byte").select(pl.arg_where(pl.col("byte") == ord("\n")).cast(pl.Int64)).to_series()
    start = pl.concat([pl.Series([0], dtype=pl.Int64), newlines + 1])
    end = pl.concat([newlines, pl.Series([size], dtype=pl.Int64)])

    def at(offsets: pl.Series) -> pl.Series:
        """The byte at each offset (clipped into the buffer: the length test below covers short lines)."""
        return byte.gather(offsets.clip(0, size - 1))

    shaped = (end - start >= 2) & (at(start) == ord("{")) & (at(start + 1) == ord('"')) & (at(end - 1) == ord("}"))
    return pl.DataFrame({"start": start, "end": end, "shaped": shaped}, schema=_SPANS)


def _check_lines(raw: bytes, spans: Iterable[Span]) -> tuple[list[Span], list[dict]]:
    """(the lines to leave out of the read: blank or not a JSON object, MALFORMED rows of the latter), in order."""
    removed: list[Span] = []
    bad: list[dict] = []
    loads = orjson.loads
    for span in spans:
        index, start, end = span
        line = raw[start:end]
        if not line.strip():
            removed.append(span)
            continue
        try:
            value = loads(line)
        except orjson.JSONDecodeError as exc:
            message = f"not JSON: {exc}"
        else:
            if isinstance(value, dict):
                continue
            message = f"a JSON {type(value).__name__}, not an object"
        removed.append(span)
        bad.append({"line": index + 1, "raw": line.decode("utf-8", "backslashreplace"), "message": message})
    return removed, bad


def _read_all_but(raw: bytes, spans: pl.DataFrame, removed: list[Span], bad: list[dict]) -> Parsed:
    """Read the lines of `raw` (`spans`) but the `removed` ones with one read_ndjson; row i is the i-th kept line.

    The text read is the kept lines joined by newlines, made of the runs of lines between removed ones: a few
    hundred slices of a zero-copy view rather than one bytes object per line.
    """
    count = spans.height
    view = memoryview(raw)
    runs = []
    first, begin = 0, 0  # index and start offset of the next line that may be kept
    for index, start, end in [*removed, (count, len(raw) + 1, len(raw) + 1)]:  # a virtual line ends the last run
        if index > first:
            runs.append(view[begin : start - 1])  # lines first .. index-1, without the newline after the last
        first, begin = index + 1, end + 1
    numbers = pl.int_range(1, count + 1, eager=True, dtype=pl.Int64)
    if removed:
        numbers = numbers.filter(~numbers.is_in([index + 1 for index, _, _ in removed]))
    records = pl.read_ndjson(io.BytesIO(b"\n".join(runs)), schema=ENVELOPE) if runs else empty(ENVELOPE)
    records = records.with_columns(line=numbers)  # a line read as more or fewer rows than one fails here
    malformed = pl.DataFrame(bad, schema=MALFORMED) if bad else empty(MALFORMED)
    text = Lines(raw, spans=spans)
    records = _repair_data(_check_string_types(records, text), text)
    return Parsed(records, malformed, None, "jsonl", text, _has_text_data(raw))


def _check_string_types(records: pl.DataFrame, lines: Lines) -> pl.DataFrame:
    """Null out attributes that were JSON numbers, booleans, objects or arrays (Polars stringifies them), or
    strings holding a lone surrogate escape (`"\\ud800"`), which Polars reads as NUL: no UTF-8 text can hold
    one, and as NUL `"\\ud800"` and `"\\udbff"` would be one id (one event dropped as the other's duplicate)."""
    suspects = records.filter(
        pl.any_horizontal(
            pl.col(a).str.contains(_MAYBE_NOT_STRING) | pl.col(a).str.contains("\x00", literal=True)
            for a in STRING_ATTRS
        )
    )
    if suspects.is_empty():
        return records
    fixes: dict[str, list[int]] = {a: [] for a in STRING_ATTRS}
    numbers = suspects["line"].to_list()
    for number, line in zip(numbers, lines.get(numbers), strict=True):
        value = _loads_leniently(line)
        if not isinstance(value, dict):
            continue
        for attr in STRING_ATTRS:
            if attr in value and value[attr] is not None and not _is_text(value[attr]):
                fixes[attr].append(number)
    return records.with_columns(
        pl.when(pl.col("line").is_in(numbers)).then(None).otherwise(pl.col(attr)).alias(attr)
        for attr, numbers in fixes.items()
        if numbers
    )


def _is_text(value: object) -> bool:
    """Whether a parsed JSON value is a string that UTF-8 can hold (no lone surrogate)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _loads_leniently(line: bytes) -> object:
    """The JSON value of a line Polars read, or None. orjson first; Python's parser where orjson is stricter
    than Polars (a lone surrogate escape such as `\\ud800`), so no line escapes the type check."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(line)
    except ValueError:
        return None


def _as_polars_writes(value: object) -> object:
    """`value` with its whole floats as the integers Polars writes for them.

    Polars writes a number of a nested `data` object back as its shortest digits without a fraction or an
    exponent (`1.0` as `1`, `1e21` as `1000000000000000000000`), so on every other line `1.0` reads as the
    integer text `1` (README, "Text of numbers"). A re-encoded line must give the same text, or one value
    would be two group-by values, and two UNIQUE_COUNT values, depending on an escape elsewhere in its line.
    Minus zero stays a float: Polars writes `-0`, which reads back as `-0.0` either way.
    """
    if isinstance(value, dict):
        return {k: _as_polars_writes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_polars_writes(v) for v in value]
    if isinstance(value, float) and value.is_integer() and not (value == 0 and math.copysign(1.0, value) < 0):
        return int(Decimal(repr(value)))  # the shortest digits, as Polars writes them, not the exact binary value
    return value


def _dumps(data: dict) -> str:
    """Compact JSON text, numbers as Polars writes them (`_as_polars_writes`). orjson first; where it refuses
    (a lone surrogate, which no UTF-8 text holds; an integer beyond 64 bits) Python's encoder, which keeps such
    characters, and every non-ASCII one, escaped."""
    data = _as_polars_writes(data)
    try:
        return orjson.dumps(data).decode()
    except orjson.JSONEncodeError:
        return json.dumps(data, separators=(",", ":"))


TOO_DEEP = "<data nested too deeply to re-encode>"  # not a JSON object: the event is bad_data


def _repair_data(records: pl.DataFrame, lines: Lines) -> pl.DataFrame:
    """Re-encode `data` (orjson, compact) on lines whose text has an escape Polars would write back raw."""
    if b"\\" not in lines.raw or not _UNSAFE_ESCAPE.search(lines.raw):  # `in` (memchr) is 10x faster than re
        return records
    fixed: dict[int, str] = {}
    every = lines.all()  # most lines are looked at: a split is cheaper than cutting them one by one
    for number in records["line"].to_list():
        line = every[number - 1]
        if not _UNSAFE_ESCAPE.search(line):
            continue
        try:
            value = _loads_leniently(line)
            data = value.get("data") if isinstance(value, dict) else None
            if isinstance(data, dict):
                fixed[number] = _dumps(data)
        except RecursionError:  # nested deeper than Python re-encodes (Polars reads ~1000 levels): never a crash
            fixed[number] = TOO_DEEP
    if not fixed:
        return records
    repaired = pl.col("line").replace_strict(fixed, default=None, return_dtype=pl.String)
    return records.with_columns(
        data=pl.when(pl.col("line").is_in(list(fixed))).then(repaired).otherwise(pl.col("data"))
    )


def line_texts(lines: Lines, numbers: list[int]) -> dict[int, str]:
    """The exact text of the given 1-based lines, for quarantine rows."""
    return {n: line.decode("utf-8", "backslashreplace") for n, line in zip(numbers, lines.get(numbers), strict=True)}


def parse_parquet(raw: bytes) -> Parsed:
    """One record per row; the envelope attributes are the columns of those names.

    Types: an attribute is text if its column holds text (String, large or view strings, dictionary-encoded
    strings, an extension type stored as text); a column of another type, bytes included (a CloudEvents
    attribute is a string, and bytes need not be text), is treated as absent, so the row fails validation with
    `missing_<attribute>`, like a JSON number in JSONL. `time` may also be a timestamp (a naive one is UTC); a
    time of another type (a date, a number) is present but not a time: `bad_time`. `data` may be JSON text or a
    struct (see `struct_json`, `_jsonable`); any other non-null value is `bad_data`.
    """
    try:
        schema: pa.Schema | None = pq.read_schema(pa.BufferReader(raw))  # the footer alone
    except Exception as exc:  # noqa: BLE001 - no readable footer: the read below says why
        if "too deeply nested" in str(exc):  # Polars died of a stack overflow (no exception) at 500 levels
            return _unreadable(f"unreadable Parquet: {str(exc).splitlines()[0][:200]}", "parquet")
        schema = None  # a type pyarrow lacks (128-bit integers) may still be read by Polars
    try:
        df = _read_parquet(raw, schema)
    except (Exception, PanicException) as exc:  # noqa: BLE001 - truncated or corrupt file: quarantine it whole
        return _unreadable(f"unreadable Parquet: {str(exc).splitlines()[0][:200]}", "parquet")
    columns = []
    for name, _dtype in ENVELOPE.items():
        if name not in df.columns:
            columns.append(pl.lit(None, pl.String).alias(name))
            continue
        have = df.schema[name]
        if name == "time":
            if _stored_as_date(schema, name):  # Polars reads Arrow's date64 as a Datetime(ms): not a time either
                have = pl.Date()
            columns.append(_time_text(pl.col(name), have))
        elif name == "data":
            text = _data_text(pl.col(name), have)
            if NOT_UTF8_DATA in df.columns:  # a struct `data` holding text that is not UTF-8: bad_data, not null
                text = pl.when(pl.col(NOT_UTF8_DATA)).then(pl.lit(NOT_UTF8)).otherwise(text).alias("data")
            columns.append(text)
        else:  # a non-string attribute is treated as absent: it fails validation with its reason
            text = _as_text(pl.col(name), have)
            columns.append((pl.lit(None, pl.String) if text is None else text).alias(name))
    # not a literal: the frame keeps the file's row count (0 included) when every attribute is absent
    line = pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias("line")
    records = df.select(*columns, line)
    data_is_text = "data" in df.columns and _as_text(pl.col("data"), df.schema["data"]) is not None
    records = conform(records, {**ENVELOPE, "line": pl.Int64})
    records = records.with_columns(numbers_as_jsonl(records["data"], written_by_polars=not data_is_text))
    return Parsed(records, empty(MALFORMED), None, "parquet", data_is_text=data_is_text)


# A JSON number written with a zero fraction or an exponent (`7.0`, `7.00`, `7e0`, `70E-1`, `1e+21`), where a
# value starts (after `:`, `[` or `,`) and ends. Text inside a string can match too: such a row is re-encoded
# for nothing, to the same meaning.
_DIGIT_THEN_FRACTION_OR_EXPONENT = r"[0-9](?:\.0|[eE])"
_WHOLE_CANDIDATE = r"[:\[,]\s*-?[0-9]+(?:\.0+|(?:\.[0-9]+)?[eE][+-]?[0-9]+)\s*[,\]}]"
# A JSON string (passed over whole, so nothing inside one is rewritten), or a whole value that is a number of at
# most 15 digits and a zero fraction, which a float holds exactly and JSONL writes as those digits (`-3.00` as
# `-3`; not `-0.0`, which stays a float, as in `_as_polars_writes`). Anchored on both sides (after `:`, `[` or
# `,`; before `,`, `]` or `}`), so text that is not JSON stays so: `1 .0` or `10.0.0` are left alone, for
# validation to refuse.
_STRING = r'"(?:[^"\\]|\\.)*"'
_ZERO_FRACTION = r"([:\[,]\s*(?:-?[1-9][0-9]{0,14}|0))\.0+(\s*[,\]}])"  # 4x faster without strings to pass over
_STRING_OR_ZERO_FRACTION = rf"({_STRING})|{_ZERO_FRACTION}"
# Where `_ZERO_FRACTION` or a plain replacement of `.0,`, `.0}`, `.0]` (for JSON Polars wrote) would be wrong:
# a string holding `.0`, or 16 digits.
_CAREFUL = rf'^(?:[^"]|{_STRING})*"(?:[^"\\]|\\.)*\.0|[0-9]{{16}}\.0'


def numbers_as_jsonl(data: pl.Series, written_by_polars: bool = False) -> pl.Series:
    """`data` texts with their whole numbers written as JSONL's are (`7.0` as `7`), so one payload gives one
    group-by and UNIQUE_COUNT value whichever format landed it (README, "Text of numbers"); OpenMeter's
    float64 round trip collapses them the same way.

    Parquet `data` is the producer's JSON text or a struct Polars encodes, both of which keep a float's
    fraction, where the JSONL reader writes a whole number without one. Digits and a zero fraction are rewritten
    natively; a row with another candidate (`7e0`, `7.00`) is parsed (orjson, strict), and one that is not a
    JSON object is then left as it is, for validation to judge. `written_by_polars`: every text is JSON Polars
    wrote (a struct encoded), where a plain replacement is safe; a producer's text may not be JSON, and must not
    become JSON by a rewrite.
    """
    at = data.str.contains(_DIGIT_THEN_FRACTION_OR_EXPONENT).fill_null(False).arg_true()  # 2x cheaper, a superset
    at = at.filter(data.gather(at).str.contains(_WHOLE_CANDIDATE))
    if not at.len():
        return data
    # The usual form (a struct's Float64 `12.0` on every row) natively, so a file of whole floats costs no Python
    # call per row: by plain text replacement where no string holds `.0` and no number has 16 digits (0.15 s per
    # 1M rows), else by a regex that passes strings over (0.6 s); Python for what is left (`7e0`, `7.00`).
    sent = data.gather(at)
    if written_by_polars:
        texts = sent.str.replace_all(".0,", ",", literal=True)
        texts = texts.str.replace_all(".0}", "}", literal=True).str.replace_all(".0]", "]", literal=True)
    else:
        texts = _zero_fractions_dropped(sent, _ZERO_FRACTION, "${1}${2}")
    careful = sent.str.contains(_CAREFUL).fill_null(False).arg_true()
    if careful.len():
        passed_over = _zero_fractions_dropped(sent.gather(careful), _STRING_OR_ZERO_FRACTION, "${1}${2}${3}")
        texts = texts.scatter(careful, passed_over)
    left = texts.str.contains(_WHOLE_CANDIDATE).fill_null(False).arg_true()
    left = left.filter(texts.gather(left).str.replace_all(_STRING, '""').str.contains(_WHOLE_CANDIDATE))
    if left.len():
        rest = [_as_jsonl_writes(text) for text in texts.gather(left).to_list()]
        texts = texts.scatter(left, pl.Series(rest, dtype=pl.String))
    return data.scatter(at, texts)


def _zero_fractions_dropped(texts: pl.Series, pattern: str, kept: str) -> pl.Series:
    for _ in range(2):  # matches share their delimiters: `[1.0,2.0]` takes two passes
        texts = texts.str.replace_all(pattern, kept)
    return texts


def _as_jsonl_writes(text: str) -> str:
    try:
        value = orjson.loads(text)
        return _dumps(value) if isinstance(value, dict) else text
    # not strict JSON (or an integer beyond 64 bits): validation decides; nested deeper than Python re-encodes:
    # kept as sent, never a crash
    except (orjson.JSONDecodeError, RecursionError):
        return text


def _stored_as_date(schema: pa.Schema | None, name: str) -> bool:
    """Whether the file's schema types column `name` as a date."""
    index = -1 if schema is None else schema.get_field_index(name)
    return index >= 0 and pa.types.is_date(schema.field(index).type)


def _read_parquet(raw: bytes, schema: pa.Schema | None) -> pl.DataFrame:
    """Read with Polars, or with pyarrow when the file's schema has types Polars cannot take (`_polars_safe`).

    Polars panics (a BaseException, which `except Exception` lets through, after printing a Rust backtrace) on
    valid files, e.g. on a timestamp zone label it does not know ("+05:30") or a decimal of more than 38 digits,
    and misreads nested 256-bit decimals (values after a null come out as 0.00). The schema (the footer alone)
    says when to go to pyarrow directly; a panic on anything else falls back to it too. Raises the first
    reader's error if neither can read the file. `schema`: the file's, None if its footer is unreadable.
    """
    odd = schema is not None and any(_polars_safe(f.type) != f.type for f in schema)
    error: BaseException | None = None
    if not odd:
        try:
            return pl.read_parquet(io.BytesIO(raw))
        except (Exception, PanicException) as exc:  # noqa: BLE001
            error = exc
    try:
        table = _utf8_checked(pq.read_table(pa.BufferReader(raw)))
        return pl.from_arrow(table.cast(pa.schema([f.with_type(_polars_safe(f.type)) for f in table.schema])))
    except (Exception, PanicException) as exc:  # noqa: BLE001 - not readable by either
        raise (error or exc) from None


NOT_UTF8 = "<not UTF-8 text>"  # what a `time` or `data` text that is not UTF-8 becomes: bad_time, bad_data
NOT_UTF8_DATA = (
    "\x00meterlake: data not UTF-8"  # a column `_utf8_checked` adds: rows whose struct `data` held such text
)


def _utf8_checked(table: pa.Table) -> pa.Table:
    """`table` without text that is not UTF-8, which Polars refuses in a file but takes from pyarrow unchecked
    (and a later step then fails on, crashing the run). Per row, such a value of `time` or `data` text becomes
    NOT_UTF8, and of any other column null (an attribute: then absent, like bytes); a struct `data` holding it
    is null too, and marked in a column NOT_UTF8_DATA, so the event is bad_data as it would be with the same
    bytes in text `data` (not a null payload that COUNT bills). Only a file that holds such text pays for the
    per-row check."""
    if _valid(table):
        return table
    columns, fields = [], []
    for field, column in zip(table.schema, table.columns, strict=True):
        column = column.combine_chunks()
        if not _valid(column):
            if pa.types.is_dictionary(field.type):  # one bad entry of the dictionary is bad for its rows only
                column = column.dictionary_decode()
                field = field.with_type(column.type)
            text = pa.types.is_string(field.type) or pa.types.is_large_string(field.type)
            # a slice of a nested array is validated with its children whole: each row is taken out on its own
            rows = (column.slice(i, 1) if text else column.take([i]) for i in range(len(column)))
            bad = pa.array([not _valid(row) for row in rows], pa.bool_())
            replacement = NOT_UTF8 if text and field.name in ("time", "data") else None
            column = pc.if_else(bad, pa.scalar(replacement, field.type), column)
            if field.name == "data" and not text:
                columns.append(bad)
                fields.append(pa.field(NOT_UTF8_DATA, pa.bool_()))
        columns.append(column)
        fields.append(field)
    return pa.Table.from_arrays(columns, schema=pa.schema(fields, metadata=table.schema.metadata))


def _valid(array: pa.Array | pa.Table) -> bool:
    try:
        array.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _polars_safe(t: pa.DataType, top: bool = True) -> pa.DataType:
    """`t` with zones as UTC (Arrow stores UTC instants, the zone only labels them) and without 256-bit
    decimals, which Polars panics converting: nested, they become the text Polars writes for a decimal in
    JSON; a column of them becomes Float64, so an attribute stays a value that is not text."""
    if pa.types.is_timestamp(t) and t.tz is not None:
        return pa.timestamp(t.unit, "UTC")
    if pa.types.is_decimal256(t):
        return pa.float64() if top else pa.string()
    if pa.types.is_struct(t):
        return pa.struct([t.field(i).with_type(_polars_safe(t.field(i).type, False)) for i in range(t.num_fields)])
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        field = t.value_field.with_type(_polars_safe(t.value_type, False))
        if pa.types.is_fixed_size_list(t):
            return pa.list_(field, t.list_size)
        return pa.list_(field) if pa.types.is_list(t) else pa.large_list(field)
    if pa.types.is_map(t):
        key, item = t.key_field, t.item_field
        return pa.map_(
            key.with_type(_polars_safe(key.type, False)), item.with_type(_polars_safe(item.type, False)), t.keys_sorted
        )
    if pa.types.is_dictionary(t):
        return pa.dictionary(t.index_type, _polars_safe(t.value_type, top), t.ordered)
    return t


def _as_text(col: pl.Expr, dtype: pl.DataType) -> pl.Expr | None:
    """`col` as String if it holds text, else None."""
    if dtype == pl.String or isinstance(dtype, (pl.Categorical, pl.Enum)):
        return col.cast(pl.String)
    if dtype.is_extension() and dtype.ext_storage() == pl.String:  # e.g. arrow.json, Parquet's JSON type
        return col.ext.storage()
    return None


def _null_text(col: pl.Expr) -> pl.Expr:
    """A null String for each value of `col` (any type)."""
    return pl.when(col.is_null()).then(pl.lit(None, pl.String))


def _in_years(col: pl.Expr, dtype: pl.Date | pl.Datetime) -> pl.Expr:
    """Whether each date or datetime is in years 1-9999. Polars panics formatting one past chrono's range
    (years -262143..262142), which 64 bits of milliseconds or microseconds reach."""
    if isinstance(dtype, pl.Date):
        low, high = -719_162, 2_932_896  # days from 1970-01-01 to 0001-01-01 and 9999-12-31
    else:
        per_second = {"ms": 10**3, "us": 10**6, "ns": 10**9}[dtype.time_unit]
        low = max(-62_135_596_800 * per_second, -(2**63))  # 0001-01-01 .. 10000-01-01 in seconds
        high = min(253_402_300_800 * per_second - 1, 2**63 - 1)
    return col.to_physical().is_between(low, high)


def _time_text(col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    if isinstance(dtype, pl.Datetime):
        inside = _in_years(col, dtype)
        safe = pl.when(inside).then(col)
        utc = safe.dt.replace_time_zone("UTC") if dtype.time_zone is None else safe.dt.convert_time_zone("UTC")
        # formatted in the column's own unit: a cast to ns fails for years outside 1678-2261 (they are then
        # refused by validation as bad_time, like the same text in JSONL)
        text = utc.dt.strftime("%Y-%m-%dT%H:%M:%S%.9fZ")
        return pl.when(inside | col.is_null()).then(text).otherwise(pl.lit("<out of range>")).alias("time")
    text = _as_text(col, dtype)
    if text is not None:
        return text.alias("time")
    # a date, number, struct...: present but not a time, so bad_time (as a JSON number is in JSONL)
    return pl.when(col.is_not_null()).then(pl.lit("<not a timestamp>")).alias("time")


def _data_text(col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    if isinstance(dtype, pl.Struct):
        safe = _jsonable(col, dtype)
        return (col if safe is None else safe).map_batches(struct_json, return_dtype=pl.String).alias("data")
    text = _as_text(col, dtype)
    if text is not None:  # JSON text: the text `null` is a null payload, not a bad one
        return pl.when(text.str.strip_chars() == "null").then(None).otherwise(text).alias("data")
    # A list, number, map or bytes is not a JSON object; keep a readable trace so validation can reject it.
    # A null stays a null payload.
    return pl.when(col.is_not_null()).then(pl.lit("<not an object>")).alias("data")


def _jsonable(col: pl.Expr, dtype: pl.DataType) -> pl.Expr | None:
    """`col` with the values Polars cannot write as JSON made null; None if there are none (the usual case).

    Polars panics on bytes (JSON has none; like a non-string attribute they count as absent) and on dates
    and datetimes past chrono's range (those outside years 1-9999 are nulled), and refuses a map whose keys
    are not text (the whole map is nulled). A meter reading such a value finds it missing.
    """
    if dtype == pl.Binary:
        return _null_text(col)
    if isinstance(dtype, pl.Date) or (isinstance(dtype, pl.Datetime) and dtype.time_unit != "ns"):
        return pl.when(_in_years(col, dtype)).then(col)
    if isinstance(dtype, pl.Struct):
        fields = {f.name: _jsonable(col.struct.field(f.name), f.dtype) for f in dtype.fields}
        if all(safe is None for safe in fields.values()):
            return None
        rebuilt = [(col.struct.field(n) if safe is None else safe).alias(n) for n, safe in fields.items()]
        return pl.when(col.is_not_null()).then(pl.struct(rebuilt))
    if isinstance(dtype, pl.List):
        inner = _jsonable(pl.element(), dtype.inner)
        return None if inner is None else col.list.eval(inner)
    if isinstance(dtype, pl.Map):
        text_keys = _as_text(pl.element(), dtype.key) is not None
        return None if text_keys and _jsonable(pl.element(), dtype.value) is None else _null_text(col)
    if isinstance(dtype, pl.Array):
        return None if _jsonable(pl.element(), dtype.inner) is None else _null_text(col)
    if dtype.is_extension():
        return None if _jsonable(pl.element(), dtype.ext_storage()) is None else _null_text(col)
    return None


MAX_NULL_PATTERNS = 256  # beyond this many distinct sets of present fields, encode the struct whole


def struct_json(data: pl.Series) -> pl.Series:
    """JSON text of each struct row, leaving out its null top-level fields; a null row stays null.

    A Parquet writer stores a batch with several event shapes as one struct of every field any event has,
    null where an event has none: 19 fields for 3 real ones on the bench data, four times the text for every
    later step to carry and parse. A struct cannot tell an absent field from a null one, and no meter can
    either (a missing and a null value are both `missing_value`, both null as a group-by value), so only
    fields with a value are written. Rows are encoded by their set of present fields, in one pass each.
    """
    fields = data.struct.fields
    if not fields or data.len() == 0:
        return data.struct.json_encode().alias("data")
    row, present = "#row", "#present"  # helper columns, renamed until no field of the payload is called that
    while row in fields or present in fields:
        row, present = row + "#", present + "#"
    frame = data.struct.unnest().with_row_index(row)
    frame = frame.with_columns(pl.struct([pl.col(f).is_not_null().alias(f) for f in fields]).alias(present))
    if frame[present].n_unique() > MAX_NULL_PATTERNS:
        return data.struct.json_encode().alias("data")
    parts = []
    for (pattern,), part in frame.group_by([present]):
        keep = [f for f in fields if pattern[f]]
        text = pl.struct(keep).struct.json_encode() if keep else pl.lit("{}")
        parts.append(part.select(row, text.alias("data")))
    out = pl.concat(parts).sort(row).with_columns(data.is_null().alias(present))
    return out.select(pl.when(pl.col(present)).then(None).otherwise(pl.col("data")).alias("data")).to_series()


def with_raw_text(rejects: pl.DataFrame, parsed: Parsed) -> pl.DataFrame:
    """Fill the `raw` column of rejected records with the exact source line (JSONL) or row JSON (Parquet)."""
    if rejects.is_empty() or parsed.kind != "jsonl" or parsed.lines is None:
        return rejects
    texts = line_texts(parsed.lines, rejects["line"].to_list())
    return rejects.with_columns(raw=pl.Series([texts[n] for n in rejects["line"].to_list()], dtype=pl.String))
