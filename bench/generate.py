"""Deterministic generator of CloudEvents usage events for meterlake benchmarks, tests and samples.

Every record is a pure function of ``(seed, index, n, options)``: the random draws come from a
splitmix64 hash of the record index, computed either with Polars expressions (``generate``, the
``write_*`` functions; vectorised, 3-4 CPU-seconds per 1M JSONL events) or in plain Python (``iter_records``,
``iter_events``, ``iter_lines``; one record at a time, for small n in tests). Both paths produce the
same records: ``list(iter_lines(n, seed)) == generate(n, seed)["line"].to_list()``. The hash is
implemented here (not Polars' ``hash``), so the output does not change with the Polars version.

Each record has a ``kind``: ``ok``, or the defect it was generated with:

- ``duplicate``: an exact copy of an earlier ``ok`` record (same source, id, time and data) at most
  ``DUP_WINDOW`` records back, so usually in the same or a neighbouring batch file;
- ``missing_id`` / ``missing_source`` / ``missing_type`` / ``missing_subject`` / ``missing_time``:
  the attribute is absent, ``null``, ``""`` (id, subject) or a number (subject ``42``);
- ``bad_time``: ``"2024-13-01"``, ``"yesterday"``, a time without offset, ``"2024-02-30T12:00:00Z"``,
  ``"1704067200"``;
- ``malformed_json`` (JSONL only; such records are left out of Parquet files): a truncated line, a
  JSON array, plain text, or an object with a broken key;
- ``missing_value`` / ``bad_value``: the event is valid but one value field of a meter is absent or
  ``null`` / ``"NaN"``, ``"abc"``, ``"Infinity"``, ``""``.

Valid events also carry legitimate quirks: numbers sent as numeric strings (``"tokens": "123456"``),
the same numeric session id as ``123`` and ``"123"``, a missing or null group-by value, a
``workflow_create`` event with ``type`` instead of ``task_type`` (as in the OpenMeter example),
``+02:00`` / ``-05:00`` offsets, times without fraction or with microseconds, ``data: null`` or no
``data`` at all (``heartbeat``, a type no meter uses), 1 % late events (up to 3 days early).

CLI: ``python bench/generate.py OUT_DIR --events N --format jsonl|jsonl.gz|parquet --files K --seed S``
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time as _time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------

# Event types and their weight in percent (sums to 100).
TYPE_WEIGHTS: dict[str, int] = {
    "prompt": 28,
    "request": 28,
    "gpu_time": 8,
    "kube-pod-exec-time": 6,
    "login": 8,
    "workflow_create": 5,
    "workflow_success": 4,
    "workflow_fail": 1,
    "translate": 6,
    "heartbeat": 6,
}
EVENT_TYPES = tuple(TYPE_WEIGHTS)
SOURCES: dict[str, str] = {
    "prompt": "chat-app",
    "request": "api-service",
    "gpu_time": "my-image-generator",
    "kube-pod-exec-time": "kubernetes-collector",
    "login": "auth-service",
    "workflow_create": "task-queue",
    "workflow_success": "task-queue",
    "workflow_fail": "task-queue",
    "translate": "myapp",
    "heartbeat": "monitor",
}
# Data keys of each type, in the order they are written.
TYPE_KEYS: dict[str, tuple[str, ...]] = {
    "prompt": ("tokens", "model", "type"),
    "request": ("method", "route", "duration_seconds", "ingress_bytes", "egress_bytes"),
    "gpu_time": ("duration_seconds", "hostname", "region", "gpu_type"),
    "kube-pod-exec-time": ("duration_seconds", "pod_name", "pod_namespace"),
    "login": ("session_id",),
    "workflow_create": ("type", "task_type"),
    "workflow_success": ("task_type",),
    "workflow_fail": ("task_type",),
    "translate": ("model", "pages", "tokens", "words"),
    "heartbeat": ("status", "uptime_seconds"),
}
# Fields a meter reads as its value: a bad_value record spoils one of them.
VALUE_FIELDS: dict[str, tuple[str, ...]] = {
    "prompt": ("tokens",),
    "request": ("duration_seconds", "ingress_bytes"),
    "gpu_time": ("duration_seconds",),
    "kube-pod-exec-time": ("duration_seconds",),
    "login": ("session_id",),
    "translate": ("pages", "words", "tokens"),
}
# Type of each data key in Parquet files whose ``data`` is a struct column.
STRUCT_FIELDS: dict[str, pl.DataType] = {
    "tokens": pl.Int64(),
    "model": pl.String(),
    "type": pl.String(),
    "method": pl.String(),
    "route": pl.String(),
    "duration_seconds": pl.Float64(),
    "ingress_bytes": pl.Int64(),
    "egress_bytes": pl.Int64(),
    "hostname": pl.String(),
    "region": pl.String(),
    "gpu_type": pl.String(),
    "pod_name": pl.String(),
    "pod_namespace": pl.String(),
    "session_id": pl.String(),
    "task_type": pl.String(),
    "pages": pl.Int64(),
    "words": pl.Int64(),
    "status": pl.String(),
    "uptime_seconds": pl.Int64(),
}

PROMPT_MODELS = ("gpt4-turbo", "gpt-4o", "claude-3-5-sonnet", "llama-3-70b")
PROMPT_TYPES = ("input", "output", "system")
REGIONS = ("us-east-1", "eu-west-1", "ap-south-1")
GPU_TYPES = ("nvidia_A100", "nvidia_H100", "nvidia_L4")
METHODS = ("GET",) * 6 + ("POST",) * 2 + ("PUT", "DELETE")
ROUTES = ("/products", "/products/:product_id", "/orders", "/orders/:order_id", "/search", "/users/:user_id")
NAMESPACES = ("default", "batch", "ml-jobs")
TASK_TYPES = ("image-generate", "text-summarize", "video-render")
TRANSLATE_MODELS = ("gpt-4", "gpt-4o")
STATUSES = ("ok", "ok", "ok", "ok", "degraded")

# Defect of a bad record, in percent of bad records (sums to 100).
BAD_WEIGHTS: dict[str, int] = {
    "duplicate": 30,
    "missing_id": 7,
    "missing_source": 4,
    "missing_type": 4,
    "missing_subject": 9,
    "missing_time": 7,
    "bad_time": 10,
    "malformed_json": 9,
    "bad_value": 20,  # becomes missing_value / bad_value, or ok for types without a value field
}
KINDS = (
    "ok",
    "duplicate",
    "missing_id",
    "missing_source",
    "missing_type",
    "missing_subject",
    "missing_time",
    "bad_time",
    "malformed_json",
    "missing_value",
    "bad_value",
)
BAD_TIMES = ("2024-13-01", "yesterday", None, "2024-02-30T12:00:00Z", "1704067200")  # None: no offset
BAD_VALUES: tuple[Any, ...] = ("NaN", "abc", None, ..., "Infinity", "")  # ...: key absent
DUP_WINDOW = 5000  # a duplicate copies one of the previous DUP_WINDOW records
LATE_PERMILLE = 10  # late events, moved up to LATE_MAX_US earlier
LATE_MAX_US = 3 * 86_400_000_000
JITTER_US = 1_800_000_000  # +-30 minutes around the record's position in the time range
CHUNK = 500_000  # rows built at once (memory ~0.5 GB per chunk)

# Time formats: (upper bound of tf = hash % 100, offset in hours, suffix, fraction digits)
TIME_FORMATS = ((80, 0, "Z", 3), (88, 2, "+02:00", 3), (95, -5, "-05:00", 3), (98, 0, "Z", 0), (100, 0, "Z", 6))

# --------------------------------------------------------------------------------------------
# Hashing: splitmix64, identical in Python and in Polars (UInt64 arithmetic wraps)
# --------------------------------------------------------------------------------------------

MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB
# Hash streams, one per independent draw.
(F_BAD, F_BADKIND, F_DUP, F_VAR, F_TYPE, F_SUBJ, F_JIT, F_LATE, F_TFMT, F_DCT, F_D1, F_D2, F_D3, F_D4, F_D5, F_D6) = (
    range(16)
)


def _mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * _C1) & MASK
    z = ((z ^ (z >> 27)) * _C2) & MASK
    return z ^ (z >> 31)


def _u64(v: int) -> pl.Expr:
    return pl.lit(v, dtype=pl.UInt64)


def _cumulative(weights: dict[str, int]) -> tuple[str, ...]:
    table = tuple(name for name, w in weights.items() for _ in range(w))
    assert len(table) == 100, weights
    return table


TYPE_TABLE = _cumulative(TYPE_WEIGHTS)
BAD_TABLE = _cumulative(BAD_WEIGHTS)


@dataclass(frozen=True)
class _Config:
    n: int
    seed: int
    start_us: int
    span_us: int
    subjects: int
    bad_ppm: int
    keys: tuple[int, ...]

    @property
    def end_us(self) -> int:
        return self.start_us + self.span_us


def _parse_start(start: str | date | datetime) -> datetime:
    if isinstance(start, str):
        start = datetime.fromisoformat(start.replace("Z", "+00:00"))
    if not isinstance(start, datetime):
        start = datetime(start.year, start.month, start.day)
    if start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    return start.astimezone(UTC)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _config(
    n: int,
    seed: int,
    start: str | date | datetime = "2024-01-01",
    days: float = 60,
    subjects: int = 2000,
    bad_fraction: float = 0.05,
) -> _Config:
    if n < 0:
        raise ValueError("n_events must be >= 0")
    if subjects < 1:
        raise ValueError("subjects must be >= 1")
    if not 0 <= bad_fraction <= 1:
        raise ValueError("bad_fraction must be between 0 and 1")
    start_dt = _parse_start(start)
    start_us = (start_dt - _EPOCH) // timedelta(microseconds=1)
    if start_us < 86_400_000_000:
        raise ValueError("start must be after 1970-01-02")
    span_us = round(days * 86_400_000_000)
    if span_us < 1:
        raise ValueError("days must be > 0")
    keys = tuple(
        _mix((seed * 0x100000001B3 + (f + 1) * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) & MASK) for f in range(16)
    )
    return _Config(n, seed, start_us, span_us, subjects, round(bad_fraction * 1_000_000), keys)


# --------------------------------------------------------------------------------------------
# Reference implementation: one record at a time, plain Python
# --------------------------------------------------------------------------------------------


def _dec(ms: int) -> float:
    """ms/1000 seconds; the last digit is made non-zero, so the JSON text has exactly 3 decimals."""
    return (ms + (ms % 10 == 0)) / 1000


def _pre_kind(i: int, c: _Config) -> str:
    g = i * GOLDEN
    if _mix((g + c.keys[F_BAD]) & MASK) % 1_000_000 >= c.bad_ppm:
        return "ok"
    return BAD_TABLE[_mix((g + c.keys[F_BADKIND]) & MASK) % 100]


def _time_parts(src: int, c: _Config) -> tuple[int, str, str, str]:
    """(true UTC time in us, local 'YYYY-MM-DDTHH:MM:SS', fraction, suffix)."""
    g = src * GOLDEN

    def h(f: int) -> int:
        return _mix((g + c.keys[f]) & MASK)

    offset = src * (c.span_us // c.n) + (src * (c.span_us % c.n)) // c.n
    jitter = h(F_JIT) % (2 * JITTER_US + 1) - JITTER_US
    late_h = h(F_LATE)
    late = (late_h // 1000) % LATE_MAX_US if late_h % 1000 < LATE_PERMILLE else 0
    t = c.start_us + offset + jitter - late
    t = c.start_us + abs(t - c.start_us)  # reflect at the range ends (no pile-up at the edges)
    t = c.end_us - 1 - abs(c.end_us - 1 - t)
    t = min(max(t, c.start_us), c.end_us - 1)
    tf = h(F_TFMT) % 100
    hours, suffix, digits = next((o, s, d) for bound, o, s, d in TIME_FORMATS if tf < bound)
    t -= t % 10 ** (6 - digits)
    local = _EPOCH + timedelta(microseconds=t + hours * 3_600_000_000)
    us = t % 1_000_000  # the fraction is printed with 3 or 6 digits, as needed (chrono's %.f)
    frac = "" if us == 0 else f".{us // 1000:03d}" if us % 1000 == 0 else f".{us:06d}"
    return t, local.strftime("%Y-%m-%dT%H:%M:%S"), frac, suffix


def _data_py(etype: str, src: int, snum: int, c: _Config) -> Any:
    """The data of a clean record: a dict, None (data: null) or ... (no data key)."""
    g = src * GOLDEN
    d1, d2, d3, d4, d5, d6 = (_mix((g + c.keys[f]) & MASK) for f in (F_D1, F_D2, F_D3, F_D4, F_D5, F_D6))
    if etype == "prompt":
        tokens = 1 + d1 % 20000
        data: dict[str, Any] = {"tokens": str(tokens) if d2 % 100 < 35 else tokens, "model": PROMPT_MODELS[d3 % 4]}
        if d5 % 50 != 0:
            data["type"] = PROMPT_TYPES[d4 % 3]
        return data
    if etype == "gpu_time":
        dur = _dec(1000 + d1 % 3_600_000)
        return {
            "duration_seconds": repr(dur) if d2 % 100 < 50 else dur,
            "hostname": f"gpu-node-{d3 % 16 + 1:02d}",
            "region": REGIONS[d4 % 3],
            "gpu_type": GPU_TYPES[d5 % 3],
        }
    if etype == "request":
        as_str = d2 % 100 < 30
        dur = _dec(1 + d1 % 5000)
        ingress, egress = d5 % 100_000, d6 % 1_000_000
        return {
            "method": METHODS[d3 % len(METHODS)],
            "route": None if d2 % 100 == 99 else ROUTES[d4 % len(ROUTES)],
            "duration_seconds": repr(dur) if as_str else dur,
            "ingress_bytes": str(ingress) if as_str else ingress,
            "egress_bytes": str(egress) if as_str else egress,
        }
    if etype == "kube-pod-exec-time":
        secs = 1 + d1 % 3600
        return {
            "duration_seconds": str(secs) if d2 % 100 < 70 else secs,
            "pod_name": f"worker-{d3 % 40}",
            "pod_namespace": NAMESPACES[d4 % 3],
        }
    if etype == "login":
        k = d1 % 8
        if d2 % 100 < 25:
            v = snum * 100 + k
            return {"session_id": v if d6 % 2 == 1 else str(v)}
        return {"session_id": f"sess-{snum}-{k}"}
    if etype in ("workflow_create", "workflow_success", "workflow_fail"):
        key = "type" if etype == "workflow_create" and d2 % 100 < 3 else "task_type"
        return {key: TASK_TYPES[d3 % 3]}
    if etype == "translate":
        pages = 1 + d1 % 40
        words = pages * (150 + d4 % 350)
        return {"model": TRANSLATE_MODELS[d3 % 2], "pages": pages, "tokens": words * 4 // 3, "words": words}
    if etype == "heartbeat":
        mode = d2 % 100
        if mode < 20:
            return None
        if mode < 30:
            return ...
        return {"status": STATUSES[d3 % len(STATUSES)], "uptime_seconds": d1 % 1_000_000}
    raise AssertionError(etype)


def _record_py(i: int, c: _Config) -> tuple[str, dict[str, Any] | str]:
    g = i * GOLDEN
    v = _mix((g + c.keys[F_VAR]) & MASK)
    kind = _pre_kind(i, c)
    src = i
    if kind == "duplicate":
        j = i - 1 - _mix((g + c.keys[F_DUP]) & MASK) % max(min(i, DUP_WINDOW), 1)
        if i > 0 and _pre_kind(j, c) == "ok":
            src = j
        else:
            kind = "ok"
    gs = src * GOLDEN
    etype = TYPE_TABLE[_mix((gs + c.keys[F_TYPE]) & MASK) % 100]
    u = _mix((gs + c.keys[F_SUBJ]) & MASK) % c.subjects
    snum = 1 + u * u // c.subjects
    _, local, frac, suffix = _time_parts(src, c)
    data = _data_py(etype, src, snum, c)
    rec: dict[str, Any] = {
        "specversion": "1.0",
        "type": etype,
        "id": f"{c.seed}-{src:0{max(9, len(str(c.n - 1)))}d}",
        "time": local + frac + suffix,
        "source": SOURCES[etype],
        "subject": f"customer-{snum}",
    }
    if _mix((gs + c.keys[F_DCT]) & MASK) % 100 < 15:
        rec["datacontenttype"] = "application/json"
    if data is not ...:
        rec["data"] = data

    if kind == "bad_value":
        fields = VALUE_FIELDS.get(etype)
        if not fields:
            kind = "ok"
        else:
            field = fields[(v // 8) % len(fields)]
            variant = 2 + v % 2 if etype == "login" else v % 6
            kind = "missing_value" if variant in (2, 3) else "bad_value"
            assert isinstance(data, dict)
            if BAD_VALUES[variant] is ...:
                data.pop(field, None)
            else:
                data[field] = BAD_VALUES[variant]
    elif kind == "missing_id":
        _spoil(rec, "id", (..., None, "")[v % 3])
    elif kind == "missing_source":
        _spoil(rec, "source", (..., None)[v % 2])
    elif kind == "missing_type":
        _spoil(rec, "type", (..., None)[v % 2])
    elif kind == "missing_subject":
        _spoil(rec, "subject", (..., None, "", 42)[v % 4])
    elif kind == "missing_time":
        _spoil(rec, "time", (..., None)[v % 2])
    elif kind == "bad_time":
        rec["time"] = BAD_TIMES[v % 5] or local + frac
    elif kind == "malformed_json":
        line = _dumps(rec)
        return kind, (line[: len(line) // 2], "[" + line + "]", "this is not json", "{" + line[2:])[v % 4]
    return kind, rec


def _spoil(rec: dict[str, Any], key: str, value: Any) -> None:
    if value is ...:
        del rec[key]
    else:
        rec[key] = value


def _dumps(rec: dict[str, Any]) -> str:
    return json.dumps(rec, separators=(",", ":"))


def iter_records(
    n: int,
    seed: int = 0,
    start: str | date | datetime = "2024-01-01",
    days: float = 60,
    subjects: int = 2000,
    bad_fraction: float = 0.05,
) -> Iterator[tuple[str, dict[str, Any] | str]]:
    """Yield ``(kind, record)`` for records 0..n-1; record is a dict, or the raw text of a
    ``malformed_json`` record. Same records as ``generate`` with the same arguments."""
    c = _config(n, seed, start, days, subjects, bad_fraction)
    for i in range(n):
        yield _record_py(i, c)


def iter_events(
    n: int,
    seed: int = 0,
    start: str | date | datetime = "2024-01-01",
    days: float = 60,
    subjects: int = 2000,
    bad_fraction: float = 0.05,
) -> Iterator[dict[str, Any]]:
    """Yield the records as dicts, one at a time (``malformed_json`` records, which have no dict
    form, are skipped). Use ``bad_fraction=0`` for clean events only."""
    for _, rec in iter_records(n, seed, start, days, subjects, bad_fraction):
        if isinstance(rec, dict):
            yield rec


def iter_lines(
    n: int,
    seed: int = 0,
    start: str | date | datetime = "2024-01-01",
    days: float = 60,
    subjects: int = 2000,
    bad_fraction: float = 0.05,
) -> Iterator[str]:
    """Yield the JSONL lines (without newline) exactly as ``write_jsonl`` writes them."""
    for _, rec in iter_records(n, seed, start, days, subjects, bad_fraction):
        yield rec if isinstance(rec, str) else _dumps(rec)


# --------------------------------------------------------------------------------------------
# Vectorised implementation (Polars)
# --------------------------------------------------------------------------------------------

Cond = pl.Expr | bool
Piece = pl.Expr | str
_NULL = pl.lit(None, dtype=pl.String)


def _and(a: Cond, b: Cond) -> Cond:
    if a is False or b is False:
        return False
    if a is True:
        return b
    if b is True:
        return a
    return a & b


def _or(a: Cond, b: Cond) -> Cond:
    if a is True or b is True:
        return True
    if a is False:
        return b
    if b is False:
        return a
    return a | b


def _not(a: Cond) -> Cond:
    return (not a) if isinstance(a, bool) else ~a


def _when(cond: Cond, then: pl.Expr, otherwise: pl.Expr) -> pl.Expr:
    if cond is True:
        return then
    if cond is False:
        return otherwise
    return pl.when(cond).then(then).otherwise(otherwise)


def _lit(x: Piece | bool) -> pl.Expr:
    return x if isinstance(x, pl.Expr) else pl.lit(x)


def _pick(h: pl.Expr, options: tuple[str, ...]) -> pl.Expr:
    return pl.lit(pl.Series(options, dtype=pl.String)).gather(h % len(options))


def _s(e: pl.Expr) -> pl.Expr:
    return e.cast(pl.String)


def _dec_pieces(ms: pl.Expr) -> tuple[pl.Expr, str, pl.Expr]:
    """Text pieces of ``_dec``: the repr of a float with exactly 3 decimals, the last non-zero."""
    ms = ms + (ms % 10 == 0).cast(pl.UInt64)
    return _s(ms // 1000), ".", _s(ms % 1000 + 1000).str.slice(1)


class _Line:
    """Pieces of a JSON text, each with a condition; one flat ``concat_str`` in the end."""

    def __init__(self) -> None:
        self.parts: list[tuple[Piece, Cond]] = []

    def add(self, piece: Piece, cond: Cond = True) -> None:
        if cond is False:
            return
        if self.parts and isinstance(piece, str):
            last, last_cond = self.parts[-1]
            if isinstance(last, str) and last_cond is cond:  # same condition: merge the literals
                self.parts[-1] = (last + piece, cond)
                return
        self.parts.append((piece, cond))

    def expr(self) -> pl.Expr:
        exprs = [_lit(p) if c is True else pl.when(c).then(_lit(p)) for p, c in self.parts]
        if len(exprs) == 1 and self.parts[0][1] is True:
            return exprs[0]
        return pl.concat_str(exprs, ignore_nulls=True)


@dataclass(frozen=True)
class _V:
    """A JSON value being built: text pieces (each with a condition), quoted or not, present or not."""

    text: tuple[tuple[Piece, Cond], ...]
    quote: Cond = True
    present: Cond = True

    @staticmethod
    def of(*pieces: Piece, quote: Cond = True, present: Cond = True) -> _V:
        return _V(tuple((p, True) for p in pieces), quote, present)

    def add_to(self, line: _Line, key: str | None, comma: Cond) -> None:
        quoted = _and(self.present, self.quote)
        line.add(",", _and(self.present, comma))
        if key is not None:
            line.add(f'"{key}":', self.present)
        line.add('"', quoted)
        for piece, cond in self.text:
            line.add(piece, _and(self.present, cond))
        line.add('"', quoted)

    def json_text(self) -> pl.Expr:
        """The JSON text of the value, null when absent."""
        line = _Line()
        self.add_to(line, None, False)
        line.add("")
        return _when(self.present, line.expr(), _NULL)

    def string(self) -> pl.Expr:
        """The string the value holds, null when absent or not a string."""
        line = _Line()
        for piece, cond in self.text:
            line.add(piece, cond)
        line.add("")
        return _when(_and(self.present, self.quote), line.expr(), _NULL)

    def spoil(self, hit: Cond, var: pl.Expr, variants: tuple[str | None, ...], text: pl.Expr | None = None) -> _V:
        """Where ``hit``, replace by ``variants[var % len]``: a JSON text (None: absent); ``text``
        overrides the unquoted text of the variants."""
        if hit is False:
            return self
        k = var % len(variants)
        absent: Cond = False
        for i, t in enumerate(variants):
            if t is None:
                absent = _or(absent, k == i)
        raw = [None if t is None else t[1:-1] if t.startswith('"') else t for t in variants]
        quoted = [i for i, t in enumerate(variants) if t is not None and t.startswith('"')]
        if text is None:
            text = pl.lit(pl.Series(raw, dtype=pl.String)).gather(k)
        return _V(
            (*((p, _and(c, _not(hit))) for p, c in self.text), (text, hit)),
            _when(hit, k.is_in(quoted), _lit(self.quote)),
            _and(self.present, _not(_and(hit, absent))),
        )


def _data_values(etype: str) -> dict[str, _V]:
    """The data members of a type, from columns d1..d6 and snum."""
    d1, d2, d3, d4, d5, d6 = (pl.col(f"d{k}") for k in range(1, 7))
    if etype == "prompt":
        return {
            "tokens": _V.of(_s(d1 % 20000 + 1), quote=d2 % 100 < 35),
            "model": _V.of(_pick(d3, PROMPT_MODELS)),
            "type": _V.of(_pick(d4, PROMPT_TYPES), present=d5 % 50 != 0),
        }
    if etype == "gpu_time":
        return {
            "duration_seconds": _V.of(*_dec_pieces(d1 % 3_600_000 + 1000), quote=d2 % 100 < 50),
            "hostname": _V.of("gpu-node-", _s(d3 % 16 + 101).str.slice(1)),
            "region": _V.of(_pick(d4, REGIONS)),
            "gpu_type": _V.of(_pick(d5, GPU_TYPES)),
        }
    if etype == "request":
        as_str = d2 % 100 < 30
        route_null = d2 % 100 == 99
        return {
            "method": _V.of(_pick(d3, METHODS)),
            "route": _V.of(pl.when(route_null).then(pl.lit("null")).otherwise(_pick(d4, ROUTES)), quote=~route_null),
            "duration_seconds": _V.of(*_dec_pieces(d1 % 5000 + 1), quote=as_str),
            "ingress_bytes": _V.of(_s(d5 % 100_000), quote=as_str),
            "egress_bytes": _V.of(_s(d6 % 1_000_000), quote=as_str),
        }
    if etype == "kube-pod-exec-time":
        return {
            "duration_seconds": _V.of(_s(d1 % 3600 + 1), quote=d2 % 100 < 70),
            "pod_name": _V.of("worker-", _s(d3 % 40)),
            "pod_namespace": _V.of(_pick(d4, NAMESPACES)),
        }
    if etype == "login":
        numeric = d2 % 100 < 25
        snum = _s(pl.col("snum"))
        k = _s(d1 % 8)
        return {
            "session_id": _V(
                (("sess-", ~numeric), (snum, True), ("-", ~numeric), ("0", numeric), (k, True)),
                quote=~numeric | (d6 % 2 == 0),
            )
        }
    if etype in ("workflow_create", "workflow_success", "workflow_fail"):
        task = _pick(d3, TASK_TYPES)
        if etype == "workflow_create":
            quirk = d2 % 100 < 3
            return {"type": _V.of(task, present=quirk), "task_type": _V.of(task, present=~quirk)}
        return {"task_type": _V.of(task)}
    if etype == "translate":
        pages = d1 % 40 + 1
        words = pages * (d4 % 350 + 150)
        return {
            "model": _V.of(_pick(d3, TRANSLATE_MODELS)),
            "pages": _V.of(_s(pages), quote=False),
            "tokens": _V.of(_s(words * 4 // 3), quote=False),
            "words": _V.of(_s(words), quote=False),
        }
    if etype == "heartbeat":
        return {"status": _V.of(_pick(d3, STATUSES)), "uptime_seconds": _V.of(_s(d1 % 1_000_000), quote=False)}
    raise AssertionError(etype)


def _type_code(h: pl.Expr) -> pl.Expr:
    return pl.lit(pl.Series([EVENT_TYPES.index(t) for t in TYPE_TABLE], dtype=pl.UInt8)).gather(h % 100)


def _hashes(lf: pl.LazyFrame, g: str, c: _Config, names: dict[str, int]) -> pl.LazyFrame:
    """Add one splitmix64 column per name, in stages (each stage reads plain columns)."""
    cols = [pl.col(n) for n in names]
    lf = lf.with_columns(**{n: pl.col(g) + _u64(c.keys[f]) for n, f in names.items()})
    lf = lf.with_columns([((z ^ (z // _u64(1 << 30))) * _u64(_C1)) for z in cols])
    lf = lf.with_columns([((z ^ (z // _u64(1 << 27))) * _u64(_C2)) for z in cols])
    return lf.with_columns([(z ^ (z // _u64(1 << 31))) for z in cols])


def _base(c: _Config, lo: int, hi: int) -> pl.DataFrame:
    """Per record: kind (before type-dependent adjustments), src, type, subject, time, draws."""
    idx = pl.col("index")
    bad_ppm = _u64(c.bad_ppm)
    lf = pl.DataFrame({"index": pl.int_range(lo, hi, dtype=pl.UInt64, eager=True)}).lazy()
    lf = lf.with_columns(g=idx * _u64(GOLDEN))
    lf = _hashes(lf, "g", c, {"h_bad": F_BAD, "h_kind": F_BADKIND, "h_dup": F_DUP, "v": F_VAR})
    window = pl.max_horizontal(pl.min_horizontal(idx, _u64(DUP_WINDOW)), _u64(1))
    lf = lf.with_columns(
        pre=pl.when(pl.col("h_bad") % 1_000_000 < bad_ppm)
        .then(_pick(pl.col("h_kind"), BAD_TABLE))
        .otherwise(pl.lit("ok")),
        j=idx.clip(lower_bound=1) - 1 - pl.col("h_dup") % window,
    ).with_columns(gj=pl.col("j") * _u64(GOLDEN))
    lf = _hashes(lf, "gj", c, {"hj_bad": F_BAD})
    lf = lf.with_columns(
        kind=pl.when(pl.col("pre") != "duplicate")
        .then(pl.col("pre"))
        .when((idx > 0) & (pl.col("hj_bad") % 1_000_000 >= bad_ppm))
        .then(pl.lit("duplicate"))
        .otherwise(pl.lit("ok"))
    )
    lf = lf.with_columns(src=pl.when(pl.col("kind") == "duplicate").then(pl.col("j")).otherwise(idx))
    lf = lf.with_columns(gs=pl.col("src") * _u64(GOLDEN))
    draws = {"h_type": F_TYPE, "h_subj": F_SUBJ, "h_jit": F_JIT, "h_late": F_LATE, "tf": F_TFMT, "h_dct": F_DCT}
    draws.update({f"d{k}": f for k, f in enumerate((F_D1, F_D2, F_D3, F_D4, F_D5, F_D6), start=1)})
    lf = _hashes(lf, "gs", c, draws)
    # Time: position in the range, jitter, late arrivals; then truncation and offset of its format.
    src = pl.col("src").cast(pl.Int64)
    q, r = divmod(c.span_us, c.n)
    late_h = pl.col("h_late")
    late = pl.when(late_h % 1000 < LATE_PERMILLE).then(((late_h // 1000) % LATE_MAX_US).cast(pl.Int64)).otherwise(0)
    jitter = (pl.col("h_jit") % (2 * JITTER_US + 1)).cast(pl.Int64) - JITTER_US
    tf = (pl.col("tf") % 100).cast(pl.Int64)
    u = pl.col("h_subj") % c.subjects
    lf = lf.with_columns(
        etype=_pick(pl.col("h_type"), TYPE_TABLE),
        snum=u * u // c.subjects + 1,
        t=c.start_us + src * q + (src * r) // c.n + jitter - late,
        tf=tf,
        dct=pl.col("h_dct") % 100 < 15,
    )
    t = pl.col("t")
    t_reflected = c.start_us + (t - c.start_us).abs()  # reflect at the range ends, as in _time_parts
    t_reflected = (c.end_us - 1 - (c.end_us - 1 - t_reflected).abs()).clip(c.start_us, c.end_us - 1)
    lf = lf.with_columns(t=t_reflected)
    fmt_of_tf = [next(i for i, (bound, *_) in enumerate(TIME_FORMATS) if x < bound) for x in range(100)]
    lf = lf.with_columns(fmt=pl.lit(pl.Series(fmt_of_tf, dtype=pl.UInt8)).gather(pl.col("tf")))
    fmt = pl.col("fmt")
    hours = pl.lit(pl.Series([h for _, h, _, _ in TIME_FORMATS], dtype=pl.Int64)).gather(fmt)
    suffix = pl.lit(pl.Series([s for _, _, s, _ in TIME_FORMATS], dtype=pl.String)).gather(fmt)
    trunc = pl.lit(pl.Series([10 ** (6 - d) for *_, d in TIME_FORMATS], dtype=pl.Int64)).gather(fmt)
    lf = lf.with_columns(t=t - t % trunc, hours=hours, suffix=suffix)
    local = pl.from_epoch(t + pl.col("hours") * 3_600_000_000, time_unit="us").dt.to_string("%Y-%m-%dT%H:%M:%S%.f")
    clean = pl.col("kind").is_in(["ok", "duplicate"])
    lf = lf.with_columns(local=local, clean=clean, group=_type_code(pl.col("h_type")) * 2 + clean.cast(pl.UInt8))
    keep = ["index", "kind", "v", "src", "etype", "snum", "t", "suffix", "local", "dct", "clean", "group"]
    return lf.select(*keep, *[f"d{k}" for k in range(1, 7)]).collect()


def _lines(df: pl.DataFrame, etype: str, clean: bool, c: _Config, parquet_columns: bool) -> pl.DataFrame:
    """Lines (and Parquet columns) of records of one type; ``clean``: all kind ok/duplicate."""
    kind, v = pl.col("kind"), pl.col("v")

    def hit(k: str) -> Cond:
        return False if clean else kind == k

    values = _data_values(etype)
    new_kind: pl.Expr = kind
    bad_field: pl.Expr = _NULL
    fields = VALUE_FIELDS.get(etype, ())
    if not clean:
        is_bv = kind == "bad_value"
        if fields:
            variant = (v % 2 + 2) if etype == "login" else v % 6
            bad_field = pl.when(is_bv).then(_pick(v // 8, fields))
            df = df.with_columns(bad_field=bad_field, variant=variant)
            bad_field = pl.col("bad_field")
            for k in fields:
                values[k] = values[k].spoil(bad_field.eq_missing(k), pl.col("variant"), BAD_VALUE_TEXTS)
            missing = pl.col("variant").is_in([2, 3])
            new_kind = pl.when(is_bv).then(
                pl.when(missing).then(pl.lit("missing_value")).otherwise(pl.lit("bad_value"))
            )
            new_kind = new_kind.otherwise(kind)
        else:
            new_kind = pl.when(is_bv).then(pl.lit("ok")).otherwise(kind)

    width = max(9, len(str(c.n - 1)))
    is_bt = hit("bad_time")
    bad_time_text = _when(v % 5 == 2, pl.col("local"), _pick(v, tuple(b or "" for b in BAD_TIMES)))
    env = {
        "type": _V.of(etype).spoil(hit("missing_type"), v, (None, "null")),
        "id": _V.of(f"{c.seed}-", _s(pl.col("src") + 10**width).str.slice(1)).spoil(
            hit("missing_id"), v, (None, "null", '""')
        ),
        "time": _V.of(pl.col("local"), pl.col("suffix"))
        .spoil(hit("missing_time"), v, (None, "null"))
        .spoil(is_bt, v, ('"x"',), bad_time_text),
        "source": _V.of(SOURCES[etype]).spoil(hit("missing_source"), v, (None, "null")),
        "subject": _V.of("customer-", _s(pl.col("snum"))).spoil(hit("missing_subject"), v, (None, "null", '""', "42")),
    }
    line = _Line()
    line.add('{"specversion":"1.0"')
    for key, val in env.items():
        val.add_to(line, key, True)
    _V.of("application/json", present=pl.col("dct")).add_to(line, "datacontenttype", True)
    if etype == "heartbeat":
        mode = pl.col("d2") % 100
        obj, data_null = mode >= 30, mode < 20
    else:
        obj, data_null = True, False
    line.add(',"data":', _or(obj, data_null))
    line.add("null", data_null)
    line.add("{", obj)
    any_before: Cond = False
    for key, val in values.items():
        val = _V(val.text, val.quote, _and(val.present, obj))
        val.add_to(line, key, any_before)
        any_before = _or(any_before, val.present)
    line.add("}", obj)
    line.add("}")
    keep = ("index", "v", "src", "t", "dct", "etype")
    out: dict[str, pl.Expr] = {**{k: pl.col(k) for k in keep}, "kind": new_kind, "line": line.expr()}
    if parquet_columns:
        body = _Line()
        body.add("{")
        any_before = False
        for key, val in values.items():
            val.add_to(body, key, any_before)
            any_before = _or(any_before, val.present)
        body.add("}")
        out.update(
            {name: val.string() for name, val in env.items()},
            data=_when(obj, body.expr(), _NULL),
            bad_field=bad_field,
            **{f"field_{k}": val.json_text() for k, val in values.items()},
        )
    return df.select(**out)


def _frame(c: _Config, lo: int, hi: int, *, parquet_columns: bool = True) -> pl.DataFrame:
    """Records lo..hi-1 with all internal columns, in index order."""
    base = _base(c, lo, hi)
    base = base.sort("group")
    parts, at = [], 0
    for size in base["group"].rle().struct.field("len"):  # one slice (no copy) per type and clean / not clean
        part = base.slice(at, size)
        parts.append(_lines(part, part["etype"][0], part["clean"][0], c, parquet_columns))
        at += size
    df = pl.concat(parts, how="diagonal_relaxed").sort("index")
    # malformed_json: spoil the finished line, on those rows only
    rows = df.select(pl.arg_where(pl.col("kind") == "malformed_json")).to_series()
    if len(rows):
        g, v = pl.col("line"), pl.col("v")
        broken = (
            pl.when(v % 4 == 0)
            .then(g.str.slice(0, g.str.len_chars() // 2))
            .when(v % 4 == 1)
            .then(pl.concat_str([pl.lit("["), g, pl.lit("]")]))
            .when(v % 4 == 2)
            .then(pl.lit("this is not json"))
            .otherwise(pl.concat_str([pl.lit("{"), g.str.slice(2)]))
        )
        fixed = df[rows].select(broken).to_series()
        df = df.with_columns(df["line"].scatter(rows, fixed))
    kind = pl.col("kind")
    out: dict[str, pl.Expr] = {
        "index": pl.col("index").cast(pl.Int64),
        "kind": kind,
        "event_type": pl.col("etype"),
        "dup_of": pl.when(kind == "duplicate").then(pl.col("src").cast(pl.Int64)),
        "event_time": pl.when(kind.is_in(["missing_time", "bad_time"]))
        .then(None)
        .otherwise(pl.from_epoch(pl.col("t"), time_unit="us").dt.replace_time_zone("UTC")),
        "line": pl.col("line"),
    }
    if parquet_columns:
        out.update({k: pl.col(k) for k in ("type", "id", "source", "subject", "time")})
        out.update(
            specversion=pl.lit("1.0"),
            datacontenttype=pl.when(pl.col("dct")).then(pl.lit("application/json")).otherwise(None),
            data=pl.col("data"),
            bad_field=pl.col("bad_field"),
            **{
                f"field_{k}": pl.col(f"field_{k}") if f"field_{k}" in df.columns else pl.lit(None, pl.String)
                for k in STRUCT_FIELDS
            },
        )
    df = df.select(**out)
    if parquet_columns:
        df = df.select(
            "index",
            "kind",
            "event_type",
            "dup_of",
            "event_time",
            "line",
            *ENVELOPE,
            "bad_field",
            *[f"field_{k}" for k in STRUCT_FIELDS],
        )
    return df


ENVELOPE = ("specversion", "type", "id", "source", "subject", "time", "datacontenttype", "data")
BAD_VALUE_TEXTS = ('"NaN"', '"abc"', "null", None, '"Infinity"', '""')


def generate(
    n_events: int,
    seed: int = 0,
    start: str | date | datetime = "2024-01-01",
    days: float = 60,
    subjects: int = 2000,
    bad_fraction: float = 0.05,
    *,
    with_fields: bool = False,
) -> pl.DataFrame:
    """Generate ``n_events`` records, one row each, in landing order.

    Columns: ``index`` (Int64), ``kind`` (see ``KINDS``), ``event_type`` (the intended type),
    ``dup_of`` (index of the copied record, for duplicates), ``event_time`` (Datetime(us, UTC), null
    for missing_time / bad_time), ``line`` (the JSONL text), and the envelope as Parquet would hold
    it: ``specversion``, ``type``, ``id``, ``source``, ``subject``, ``time``, ``datacontenttype``
    (String; null when absent, null or not a string), ``data`` (JSON text or null).
    ``with_fields=True`` adds ``bad_field`` and ``field_<key>`` (JSON text of each data key, null when
    absent), which ``parquet_frame`` needs for struct data.
    """
    c = _config(n_events, seed, start, days, subjects, bad_fraction)
    if n_events == 0:
        return _frame(_config(1, seed, start, days, subjects, bad_fraction), 0, 1).clear().pipe(_public, with_fields)
    chunks = [_frame(c, lo, min(lo + CHUNK, n_events)) for lo in range(0, n_events, CHUNK)]
    return _public(pl.concat(chunks), with_fields)


def _public(df: pl.DataFrame, with_fields: bool) -> pl.DataFrame:
    return df if with_fields else df.drop("bad_field", *[f"field_{k}" for k in STRUCT_FIELDS])


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------


def _typed(text: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    inner = pl.when(text.str.starts_with('"')).then(text.str.slice(1, text.str.len_chars() - 2))
    inner = inner.when(text == "null").then(_NULL).otherwise(text)
    return inner if dtype == pl.String else inner.cast(dtype, strict=False)


def parquet_frame(frame: pl.DataFrame, data_as: str = "json", time_as: str = "string") -> pl.DataFrame:
    """The rows of ``frame`` (from ``generate(..., with_fields=True)``) as a Parquet landing file
    holds them: the envelope columns, plus ``index`` and ``kind`` (drop them before writing).

    ``data_as``: ``json`` (String column of JSON text) or ``struct`` (one field per data key of every
    type, ``STRUCT_FIELDS`` types, absent keys null; numeric strings become numbers, values that do
    not convert become null, so such bad_value records become missing_value).
    ``time_as``: ``string`` (RFC 3339 text) or ``timestamp`` (Datetime(us, UTC); bad_time records
    become missing_time). malformed_json records are left out.
    """
    if data_as not in ("json", "struct") or time_as not in ("string", "timestamp"):
        raise ValueError("data_as is json|struct, time_as is string|timestamp")
    df = frame.filter(pl.col("kind") != "malformed_json")
    kind = pl.col("kind")
    cols: dict[str, pl.Expr] = {k: pl.col(k) for k in ENVELOPE}
    if time_as == "timestamp":
        cols["time"] = pl.col("event_time")
        kind = pl.when(kind == "bad_time").then(pl.lit("missing_time")).otherwise(kind)
    if data_as == "struct":
        typed = {k: _typed(pl.col(f"field_{k}"), dt) for k, dt in STRUCT_FIELDS.items()}
        cols["data"] = pl.when(pl.col("data").is_not_null()).then(pl.struct(**typed))
        spoilt = pl.lit(False)
        for k, e in typed.items():
            spoilt = spoilt | ((pl.col("bad_field") == k) & e.is_null())
        kind = pl.when((pl.col("kind") == "bad_value") & spoilt).then(pl.lit("missing_value")).otherwise(kind)
    return df.select(**cols, index=pl.col("index"), kind=kind)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in (".jsonl.gz", ".ndjson.gz", ".jsonl", ".ndjson", ".parquet"):
        if name.endswith(s):
            return s
    raise ValueError(f"{path}: name must end with .jsonl, .ndjson, .jsonl.gz or .parquet")


def write_batch(
    frame: pl.DataFrame, path: str | Path, *, data_as: str = "json", time_as: str = "string"
) -> Counter[str]:
    """Write rows of ``generate(..., with_fields=True)`` as one batch file; the format follows the
    name (.jsonl, .ndjson, .jsonl.gz, .parquet). Output is byte-stable (gzip mtime 0). Returns the
    count of written records per kind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = _suffix(path)
    if suffix == ".parquet":
        table = parquet_frame(frame, data_as, time_as)
        table.drop("index", "kind").write_parquet(path, compression="zstd", statistics=True)
        return Counter(dict(table["kind"].value_counts().iter_rows()))
    with open(path, "wb") as raw:
        if suffix.endswith(".gz"):
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as fh:
                _write_lines(frame, fh)
        else:
            _write_lines(frame, raw)
    return Counter(dict(frame["kind"].value_counts().iter_rows()))


def _write_lines(frame: pl.DataFrame, fh: Any) -> None:
    if frame.height:
        frame.select("line").write_csv(fh, include_header=False, quote_style="never")


def _file_names(c: _Config, files: int, ext: str, layout: str) -> list[tuple[int, int, str]]:
    width = max(4, len(str(files)))
    out = []
    for k in range(files):
        lo, hi = k * c.n // files, (k + 1) * c.n // files
        name = f"batch-{k + 1:0{width}d}{ext}"
        if layout == "dated":
            day = _EPOCH + timedelta(microseconds=c.start_us + lo * c.span_us // max(c.n, 1))
            name = f"{day:%Y/%m/%d}/{name}"
        elif layout != "flat":
            raise ValueError("layout is flat|dated")
        out.append((lo, hi, name))
    return out


def _write(
    path: str | Path,
    n: int,
    seed: int,
    files: int,
    fmt: str,
    layout: str,
    options: dict[str, Any],
    data_as: str = "json",
    time_as: str = "string",
) -> dict[str, Any]:
    began = _time.perf_counter()
    if files < 1:
        raise ValueError("files must be >= 1")
    c = _config(n, seed, **options)
    root = Path(path)
    kinds: Counter[str] = Counter()
    written = []
    for k, (lo, hi, name) in enumerate(_file_names(c, files, "." + fmt, layout)):
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "parquet":
            d_as = ("json", "struct")[k % 2] if data_as == "mixed" else data_as
            t_as = ("string", "timestamp")[(k // 2) % 2] if time_as == "mixed" else time_as
            frame = pl.concat([_frame(c, a, min(a + CHUNK, hi)) for a in range(lo, hi, CHUNK)]) if hi > lo else None
            if frame is None:
                frame = _frame(_config(1, seed, **options), 0, 1).clear()
            kinds += write_batch(frame, target, data_as=d_as, time_as=t_as)
        else:
            with open(target, "wb") as raw:
                fh: Any = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if fmt.endswith(".gz") else raw
                for a in range(lo, hi, CHUNK):
                    frame = _frame(c, a, min(a + CHUNK, hi), parquet_columns=False)
                    _write_lines(frame, fh)
                    kinds.update(dict(frame["kind"].value_counts().iter_rows()))
                if fh is not raw:
                    fh.close()
        written.append(str(target))
    return {
        "files": written,
        "records": sum(kinds.values()),
        "kinds": dict(sorted(kinds.items())),
        "bytes": sum(Path(f).stat().st_size for f in written),
        "seconds": round(_time.perf_counter() - began, 3),
    }


def write_jsonl(
    path: str | Path,
    n: int,
    seed: int = 0,
    files: int = 1,
    *,
    compress: bool = False,
    layout: str = "flat",
    **options: Any,
) -> dict[str, Any]:
    """Write ``n`` records as ``files`` JSONL batches (``batch-0001.jsonl``, ...; ``.jsonl.gz`` with
    ``compress``) under ``path``; ``layout="dated"`` puts each in ``YYYY/MM/DD/`` of its first event.
    ``options``: start, days, subjects, bad_fraction (as ``generate``). Returns a summary dict:
    files, records, kinds (count per kind), bytes, seconds."""
    return _write(path, n, seed, files, "jsonl.gz" if compress else "jsonl", layout, options)


def write_parquet(
    path: str | Path,
    n: int,
    seed: int = 0,
    files: int = 1,
    *,
    data_as: str = "mixed",
    time_as: str = "mixed",
    layout: str = "flat",
    **options: Any,
) -> dict[str, Any]:
    """Write ``n`` records as ``files`` Parquet batches (see ``parquet_frame``; malformed_json records
    are left out). ``mixed`` cycles files through json/string, struct/string, json/timestamp,
    struct/timestamp. Same summary as ``write_jsonl``."""
    return _write(path, n, seed, files, "parquet", layout, options, data_as, time_as)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Generate deterministic CloudEvents usage batches for meterlake.")
    p.add_argument("out_dir", help="landing folder to write the batch files into")
    p.add_argument("--events", type=int, default=100_000, help="number of records (default 100000)")
    p.add_argument("--format", choices=("jsonl", "jsonl.gz", "parquet"), default="jsonl")
    p.add_argument("--files", type=int, default=1, help="number of batch files (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", default="2024-01-01", help="first event time (ISO date/time, UTC if no offset)")
    p.add_argument("--days", type=float, default=60, help="time range of the events in days (default 60)")
    p.add_argument("--subjects", type=int, default=2000, help="number of customers (default 2000)")
    p.add_argument("--bad-fraction", type=float, default=0.05, help="share of defective records (default 0.05)")
    p.add_argument("--layout", choices=("flat", "dated"), default="flat", help="dated: YYYY/MM/DD/ folders")
    p.add_argument("--data-as", choices=("mixed", "json", "struct"), default="mixed", help="Parquet data column")
    p.add_argument("--time-as", choices=("mixed", "string", "timestamp"), default="mixed", help="Parquet time column")
    a = p.parse_args(argv)
    options = {"start": a.start, "days": a.days, "subjects": a.subjects, "bad_fraction": a.bad_fraction}
    try:
        if a.format == "parquet":
            summary = write_parquet(
                a.out_dir, a.events, a.seed, a.files, data_as=a.data_as, time_as=a.time_as, layout=a.layout, **options
            )
        else:
            summary = write_jsonl(
                a.out_dir, a.events, a.seed, a.files, compress=a.format == "jsonl.gz", layout=a.layout, **options
            )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    files = summary.pop("files")
    print(json.dumps({"out_dir": a.out_dir, "n_files": len(files), **summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
