"""The native-speed search for malformed JSONL lines gives exactly what a plain line-by-line split gives."""

from __future__ import annotations

import io
import itertools
import json
import operator
import random

import orjson
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from transforms.parse import (
    MALFORMED,
    Lines,
    Parsed,
    _check_string_types,
    _line_spans,
    _parse_jsonl_by_line,
    _repair_data,
    _unreadable,
    line_texts,
)
from transforms.schema import ENVELOPE, empty

# --- the previous implementation (a Python split and shape test), kept as the reference ----------------


def reference_by_line(raw: bytes) -> Parsed:
    lines = raw.split(b"\n")
    shaped = [line.endswith(b"}") and line.startswith(b'{"') for line in lines]
    likely = list(itertools.compress(range(len(lines)), shaped))
    good, bad = _reference_check(lines, itertools.compress(range(len(lines)), map(operator.not_, shaped)))
    try:
        return _reference_read(Lines(raw, lines), sorted(likely + good), bad)
    except Exception:  # noqa: BLE001
        good, bad = _reference_check(lines, range(len(lines)))
    try:
        return _reference_read(Lines(raw, lines), good, bad)
    except Exception as exc:  # noqa: BLE001
        return _unreadable(f"unreadable JSONL: {str(exc).splitlines()[0][:200]}", "jsonl")


def _reference_check(lines: list[bytes], indexes) -> tuple[list[int], list[dict]]:
    good, bad = [], []
    for i in indexes:
        line = lines[i]
        if not line.strip():
            continue
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            bad.append({"line": i + 1, "raw": line.decode("utf-8", "backslashreplace"), "message": f"not JSON: {exc}"})
            continue
        if not isinstance(value, dict):
            kind = type(value).__name__
            bad.append(
                {
                    "line": i + 1,
                    "raw": line.decode("utf-8", "backslashreplace"),
                    "message": f"a JSON {kind}, not an object",
                }
            )
            continue
        good.append(i)
    return good, bad


def _reference_read(text: Lines, good: list[int], bad: list[dict]) -> Parsed:
    lines = text.all()
    records = pl.read_ndjson(io.BytesIO(b"\n".join([lines[i] for i in good])), schema=ENVELOPE) if good else None
    records = (records if records is not None else empty(ENVELOPE)).with_columns(
        line=pl.Series([i + 1 for i in good], dtype=pl.Int64)
    )
    malformed = pl.DataFrame(sorted(bad, key=lambda r: r["line"]), schema=MALFORMED) if bad else empty(MALFORMED)
    return Parsed(_repair_data(_check_string_types(records, text), text), malformed, None, "jsonl", text)


# --- random files ------------------------------------------------------------------------------------


def _event(i: int, **changes) -> dict:
    out = {"specversion": "1.0", "id": f"e{i}", "source": "src", "type": "prompt", "subject": "c-1"}
    out.update(time="2024-01-01T00:00:00Z", data={"tokens": i})
    out.update(changes)
    return out


def _good(i: int) -> bytes:
    return orjson.dumps(_event(i))


LINE_KINDS = [
    _good,
    lambda i: json.dumps(_event(i)).encode(),  # spaces after separators
    lambda i: _good(i) + b"\r",  # CRLF
    lambda i: b"  " + _good(i) + b" ",  # valid, outside the cheap shape test
    lambda i: b"\t" + _good(i),
    lambda i: _good(i) + b"\x0c",
    lambda i: b"",
    lambda i: b" ",
    lambda i: b"\t \r",
    lambda i: b"\r",
    lambda i: b"\x0b\x0c",  # blank to bytes.strip()
    lambda i: _good(i)[: len(_good(i)) // 2],  # truncated
    lambda i: b"{" + _good(i)[2:],  # broken, passes the shape test
    lambda i: b'{"id": "x", "source": }',  # broken, passes the shape test
    lambda i: b"[" + _good(i) + b"]",
    lambda i: b"[]",
    lambda i: b"42",
    lambda i: b"-1.5",
    lambda i: b"true",
    lambda i: b"null",
    lambda i: b'"text"',
    lambda i: b"not json",
    lambda i: b"}",
    lambda i: b'{"',
    lambda i: b'{"}',
    lambda i: b"{",
    lambda i: b"{}",
    lambda i: b'{"a": 1}',
    lambda i: _good(i) + _good(i),  # two objects on one line
    lambda i: _good(i) + b" trailing",
    lambda i: orjson.dumps(_event(i, id=5)),  # a non-string attribute
    lambda i: orjson.dumps(_event(i, subject=True)),
    lambda i: orjson.dumps(_event(i, data={"path": "C:\\x\ty"})),  # an escape Polars writes back raw
    lambda i: _good(i).replace(b'"tokens":' + str(i).encode(), b'"tokens":NaN'),
    lambda i: _good(i).replace(b'"tokens":' + str(i).encode(), b'"tokens":1e999'),
    lambda i: _good(i).replace(b"c-1", b"c-\xff"),  # invalid UTF-8
    lambda i: b"\xef\xbb\xbf" + _good(i),  # a byte-order mark inside the file
    lambda i: _good(i).replace(b"c-1", "ç-é".encode()),
    # A lone surrogate: Polars reads it, orjson does not, so which lines get the cheap test matters.
    lambda i: b'{"id": "\\ud800"}',
    lambda i: b'{"id": "\\ud800"}\r',
    lambda i: b' {"id": "\\ud800"}',
]
ENDS = [b"", b"\n", b"\r\n", b"\n\n", b"\n \n"]


def random_file(rng: random.Random, weights: list[float]) -> bytes:
    count = rng.randint(0, 40)
    kinds = rng.choices(LINE_KINDS, weights=weights, k=count)
    return b"\n".join(kind(i) for i, kind in enumerate(kinds)) + rng.choice(ENDS)


def assert_same(got: Parsed, want: Parsed, raw: bytes) -> None:
    assert got.unreadable == want.unreadable
    assert got.kind == want.kind
    assert_frame_equal(got.records, want.records)
    assert_frame_equal(got.malformed, want.malformed)
    assert got.records.equals(want.records) and got.malformed.equals(want.malformed)
    if want.lines is None:
        assert got.lines is None
        return
    numbers = list(range(1, raw.count(b"\n") + 2))
    assert got.lines.raw == want.lines.raw == raw
    assert got.lines.get(numbers) == want.lines.get(numbers) == raw.split(b"\n")
    assert line_texts(got.lines, numbers[::-1]) == line_texts(want.lines, numbers[::-1])
    assert got.lines[numbers[-1]] == want.lines[numbers[-1]]


@pytest.mark.parametrize("seed", range(60))
def test_random_files_match_the_line_by_line_reference(seed: int) -> None:
    rng = random.Random(seed)
    # Mostly good lines in some files, mostly bad ones in others.
    weights = [rng.choice([0.2, 1.0, 5.0]) for _ in LINE_KINDS]
    weights[0] *= rng.choice([1, 10])
    for _ in range(5):
        raw = random_file(rng, weights)
        assert_same(_parse_jsonl_by_line(raw), reference_by_line(raw), raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\n",
        b"\r\n",
        b" ",
        b"}",
        b'{"',
        b'{"}',
        b"{}",
        b"x",
        _good(1),
        _good(1) + b"\n",
        _good(1) + b"\r\n" + _good(2) + b"\r\n",
        b"\n\n" + _good(1) + b"\n\n",
        b"nope\n" + _good(2),
        _good(1) + b"\nnope",
        _good(1) + b"\nnope\n",
        b"nope\n" + _good(2) + b"\nnope",
        _good(1) + b"\n}\n" + _good(3),
        _good(1) + b'\n{"\n' + _good(3),
        _good(1) + b"\n\x0b\n" + _good(3) + b"\n[1]",
        b"\n".join(_good(i) for i in range(2000)) + b"\n[]\n" + b"\n".join(_good(i) for i in range(2000)),
    ],
)
def test_edge_files_match_the_line_by_line_reference(raw: bytes) -> None:
    assert_same(_parse_jsonl_by_line(raw), reference_by_line(raw), raw)


def test_a_file_polars_cannot_read_at_all_is_unreadable_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise pl.exceptions.ComputeError("no\nmore")

    monkeypatch.setattr(pl, "read_ndjson", fail)
    raw = _good(1) + b"\nnope\n" + _good(3)
    got, want = _parse_jsonl_by_line(raw), reference_by_line(raw)
    assert got.unreadable == want.unreadable == "unreadable JSONL: no"
    assert_same(got, want, raw)


@pytest.mark.parametrize("seed", range(20))
def test_line_spans_cut_like_split(seed: int) -> None:
    rng = random.Random(seed)
    raw = random_file(rng, [1.0] * len(LINE_KINDS))
    spans = _line_spans(raw)
    lines = raw.split(b"\n")
    assert spans.height == len(lines)
    assert [raw[s:e] for s, e in spans.select("start", "end").iter_rows()] == lines
    assert spans["shaped"].to_list() == [line.endswith(b"}") and line.startswith(b'{"') for line in lines]
