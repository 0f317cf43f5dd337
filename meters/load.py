"""Load and validate a meters YAML file, collecting every problem with its line number."""

from __future__ import annotations

import copy
import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from meters.jsonpath import JsonPathError, normalise_path
from meters.model import AGGREGATIONS, PERIODS, RESERVED_COLUMNS, Billing, Meter, MeterSet, is_iana_zone

SLUG = re.compile(r"^[a-z0-9]+(?:_[a-z0-9]+)*$")
GROUP_KEY = re.compile(r"^[a-zA-Z_][0-9a-zA-Z_]*$")
# OpenMeter's meter fields (research §1.1). `name`, `description` and `metadata` are descriptive: checked as
# OpenMeter checks them, never used in a number. `eventFrom` is a floor on the times of the events counted.
METER_FIELDS = {
    "slug",
    "name",
    "description",
    "eventType",
    "eventFrom",
    "aggregation",
    "valueProperty",
    "groupBy",
    "metadata",
}
NAME_MAX, DESCRIPTION_MAX = 256, 1024
BILLING_FIELDS = {"period", "timezone", "anchor_day"}
TOP_FIELDS = {"meters", "billing"}
# RFC 3339 with an offset, as event times are read (transforms.validate), in the years event times can hold.
RFC3339 = re.compile(
    r"^(1[6-9]\d\d|2[0-2]\d\d)-\d{2}-\d{2}[Tt](?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d+)?([Zz]|[+-](?:[01]\d|2[0-3]):[0-5]\d)$"
)


def _event_from(text: str) -> dt.datetime | None:
    """An RFC 3339 time with an offset, in the years 1678-2261, as an aware UTC datetime (to the microsecond)."""
    text = text.strip()
    match = RFC3339.fullmatch(text)
    if not match or not "1678" <= match.group(1) <= "2261":
        return None
    fraction = (match.group(2) or "")[:7]  # '.' and six digits
    offset = "+00:00" if match.group(3) in ("Z", "z") else match.group(3)
    try:
        return dt.datetime.fromisoformat(f"{text[:10]}T{text[11:19]}{fraction}{offset}").astimezone(dt.UTC)
    except ValueError:  # a day that does not exist (2024-02-30)
        return None


@dataclass(frozen=True)
class Problem:
    line: int | None
    where: str
    message: str

    def __str__(self) -> str:
        at = f"line {self.line}: " if self.line else ""
        return f"{at}{self.where}: {self.message}"


class MeterConfigError(ValueError):
    """Raised with every problem found, so a user fixes the file in one pass."""

    def __init__(self, problems: list[Problem], source: str = "meters file") -> None:
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: " + "; ".join(str(p) for p in problems))


def _plain(node: yaml.Node) -> Any:
    """Turn a composed node back into Python values (safe types only), as `yaml.safe_load` would build them.

    A scalar is built directly; a mapping or list through a copy (serialised and loaded again), because building
    it in place would merge `<<` keys into the node that the checks read next."""
    if isinstance(node, yaml.ScalarNode):
        return yaml.constructor.SafeConstructor().construct_document(node)
    return yaml.load(yaml.serialize(node), Loader=_Merging)  # a SafeLoader: safe types only


class _Merging(yaml.SafeLoader):
    """A SafeLoader whose merge keys (`<<`) resolve as `_mapping` resolves a meter's fields: a key written in the
    mapping wins over a merged one, the first merged mapping over a later one. PyYAML 6.0.4's own merge tells
    merged keys apart by the identity of their text, so with `<<: [*a, *b]` a one-letter key (a string CPython
    shares) came from `a` and a longer one from `b`."""

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        if any(key.tag == MERGE for key, _ in node.value):
            node.value = list(_mapping(node).values())
        else:
            super().flatten_mapping(node)


class _TextKeys(_Merging):
    """A loader that keeps mapping keys as written: YAML 1.1 reads `on`, `yes`, `off`, `no` as booleans and
    `null` as None, where OpenMeter (YAML 1.2, JSON) has the text; merge keys (`<<`) still merge."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        self.flatten_mapping(node)
        out = {}
        for key_node, value_node in node.value:
            plain = isinstance(key_node, yaml.ScalarNode)
            key = key_node.value if plain else self.construct_object(key_node, deep=deep)
            out[key if plain else str(key)] = self.construct_object(value_node, deep=deep)
        return out


class _AliasLines(yaml.SafeLoader):
    """A loader that composes an alias (`*m`) as a copy of its anchor's node marked where the alias is written,
    so that two meters made from one anchor are reported at their own lines (a copy shares its anchor's items)."""

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        if not self.check_event(yaml.AliasEvent):
            return super().compose_node(parent, index)
        mark = self.peek_event().start_mark
        twin = copy.copy(super().compose_node(parent, index))
        twin.start_mark = mark
        return twin


def _text_keys(node: yaml.MappingNode) -> dict:
    """A mapping node as a dict whose keys are the text written (see `_TextKeys`)."""
    return yaml.load(yaml.serialize(node), Loader=_TextKeys)  # a SafeLoader: safe types only


def _shape(node: yaml.Node) -> str:
    """What a field written as a collection is, for messages."""
    return "a list" if isinstance(node, yaml.SequenceNode) else "a mapping"


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


MERGE = "tag:yaml.org,2002:merge"


def _mapping(node: yaml.Node, depth: int = 0) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """A mapping's fields by name, merge keys (`<<: *defaults`) resolved as YAML (and OpenMeter's loader) does:
    a field written in the mapping wins over a merged one, and an earlier merged mapping over a later one."""
    out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    merged: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for key, value in node.value:
        if key.tag != MERGE:
            out[str(key.value)] = (key, value)
            continue
        sources = value.value if isinstance(value, yaml.SequenceNode) else [value]
        for source in sources:  # a well-formed merge (checked by safe_load): mappings only
            if isinstance(source, yaml.MappingNode) and depth < 50:  # a recursive anchor ends somewhere
                for name, pair in _mapping(source, depth + 1).items():
                    merged.setdefault(name, pair)
    return {**merged, **out}


def _check_billing(node: yaml.Node, problems: list[Problem]) -> Billing:
    if not isinstance(node, yaml.MappingNode):
        problems.append(Problem(_line(node), "billing", "must be a mapping of period, timezone, anchor_day"))
        return Billing()
    fields = _mapping(node)
    for name, (key, _) in fields.items():
        if name not in BILLING_FIELDS:
            problems.append(
                Problem(_line(key), f"billing.{name}", f"unknown field (allowed: {', '.join(sorted(BILLING_FIELDS))})")
            )
    period = _plain(fields["period"][1]) if "period" in fields else "MONTH"
    tz = _plain(fields["timezone"][1]) if "timezone" in fields else "UTC"
    anchor = _plain(fields["anchor_day"][1]) if "anchor_day" in fields else 1
    if period not in PERIODS:
        problems.append(
            Problem(
                _line(fields["period"][1]), "billing.period", f"must be one of {', '.join(PERIODS)}, got {period!r}"
            )
        )
        period = "MONTH"
    if not is_iana_zone(str(tz)):
        problems.append(
            Problem(
                _line(fields["timezone"][1]), "billing.timezone", f"unknown IANA time zone {tz!r} (e.g. Europe/Berlin)"
            )
        )
        tz = "UTC"
    if not isinstance(anchor, int) or isinstance(anchor, bool) or not 1 <= anchor <= 31:
        problems.append(
            Problem(_line(fields["anchor_day"][1]), "billing.anchor_day", f"must be an integer 1..31, got {anchor!r}")
        )
        anchor = 1
    elif anchor != 1 and period != "MONTH":
        problems.append(Problem(_line(fields["anchor_day"][1]), "billing.anchor_day", "only applies to period MONTH"))
    return Billing(period=period, timezone=str(tz), anchor_day=anchor)


def _check_meter(node: yaml.Node, index: int, problems: list[Problem]) -> Meter | None:
    if not isinstance(node, yaml.MappingNode):
        problems.append(Problem(_line(node), f"meters[{index}]", "must be a mapping with slug, eventType, aggregation"))
        return None
    fields = _mapping(node)
    raw = {name: _plain(value) for name, (_, value) in fields.items()}
    slug = raw.get("slug")
    where = f"meter {slug!r}" if isinstance(slug, str) and slug else f"meters[{index}]"
    before = len(problems)

    def bad(field: str, message: str, line: int | None = None) -> None:
        line = line or (_line(fields[field][1]) if field in fields else _line(node))
        problems.append(Problem(line, f"{where} {field}", message))

    for name, (key, _) in fields.items():
        if name not in METER_FIELDS:
            problems.append(
                Problem(_line(key), f"{where} {name}", "unknown field (a typo here would silently change billing)")
            )

    def got(field: str) -> str:
        """', got ...' for a field present as something other than text, as the user wrote it."""
        value = raw.get(field)
        if field not in fields or value is None or isinstance(value, str):
            return ""
        written = fields[field][1]
        if isinstance(written, yaml.ScalarNode):  # `on`, `no`, `404`, `2024-01-01`: YAML 1.1 reads them as values
            kind = {"bool": "true/false", "int": "number", "float": "number"}.get(
                type(value).__name__, type(value).__name__
            )
            return f", got {written.value!r} (YAML reads it as a {kind} value, not text: put it in quotes)"
        return f", got {_shape(written)}"

    if not isinstance(slug, str) or not SLUG.fullmatch(slug) or len(slug) > 64:
        bad(
            "slug",
            "must be lowercase letters and digits joined by single underscores, 1-64 chars (e.g. tokens_total)"
            + got("slug"),
        )
    event_type = raw.get("eventType")
    if not isinstance(event_type, str) or not event_type:
        bad("eventType", "is required and must be a non-empty string" + got("eventType"))
    aggregation = raw.get("aggregation")
    if aggregation not in AGGREGATIONS:
        bad("aggregation", f"must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
    value_property = raw.get("valueProperty")
    value_path = None
    if aggregation == "COUNT" and value_property is not None:
        bad("valueProperty", "is not allowed when the aggregation is COUNT")
    elif aggregation in AGGREGATIONS and aggregation != "COUNT":
        if value_property is None:
            bad("valueProperty", f"is required when the aggregation is {aggregation}")
        else:
            try:
                value_path = normalise_path(value_property)
            except JsonPathError as exc:
                bad("valueProperty", f"{value_property!r} {exc}")
    description = raw.get("description")
    if description is not None and (not isinstance(description, str) or not 1 <= len(description) <= DESCRIPTION_MAX):
        bad(
            "description",
            f"must be a non-empty string of at most {DESCRIPTION_MAX} characters (as in OpenMeter)"
            + got("description"),
        )
    name = raw.get("name")
    if name is not None and (not isinstance(name, str) or not 1 <= len(name) <= NAME_MAX):
        bad("name", f"must be a string of 1-{NAME_MAX} characters (as in OpenMeter)" + got("name"))
    metadata = raw.get("metadata")
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
    ):
        bad("metadata", "must be a mapping of names to strings (as in OpenMeter)")
    event_from = None
    if "eventFrom" in fields:
        node_from = fields["eventFrom"][1]
        # the text written: unquoted, YAML reads it as a timestamp and drops a fraction's last digits
        written = node_from.value if isinstance(node_from, yaml.ScalarNode) else None
        event_from = _event_from(written) if isinstance(written, str) else None
        if event_from is None:
            shown = repr(written) if written is not None else _shape(node_from)
            bad("eventFrom", f"must be an RFC 3339 time with an offset, e.g. 2024-01-01T00:00:00Z; got {shown}")
    group_node = fields["groupBy"][1] if "groupBy" in fields else None
    # Keys as written: `on: $.on` is the column `on`, not YAML 1.1's True (nor one column with `yes:`).
    group_by = _text_keys(group_node) if isinstance(group_node, yaml.MappingNode) else raw.get("groupBy") or {}
    group_paths: dict[str, str] = {}
    if not isinstance(group_by, dict):
        bad("groupBy", "must be a mapping of column name to JSONPath")
        group_by = {}
    # Each key's problems at its own line (a list of ten keys all at the first would hide which one).
    key_lines = (
        {k.value: _line(k) for k, _ in group_node.value if isinstance(k, yaml.ScalarNode)}
        if isinstance(group_node, yaml.MappingNode)
        else {}
    )
    folded: dict[str, str] = {}  # lower-cased key -> the key as first written
    for key, path in group_by.items():
        key_s = str(key)
        line = key_lines.get(key_s)
        if not GROUP_KEY.fullmatch(key_s):
            bad(
                "groupBy",
                f"key {key_s!r} is invalid: only letters, digits and underscores, not starting with a digit",
                line,
            )
        elif key_s.lower() in RESERVED_COLUMNS:  # in any case: DuckDB and Spark match column names that way
            bad("groupBy", f"key {key_s!r} is reserved for an output column; rename it", line)
        elif key_s.lower() in folded:  # `model` and `Model`: DuckDB would read one of them as `Model_1`
            bad("groupBy", f"key {key_s!r} differs from key {folded[key_s.lower()]!r} only in letter case", line)
        folded.setdefault(key_s.lower(), key_s)
        try:
            group_paths[key_s] = normalise_path(path)
        except JsonPathError as exc:
            bad("groupBy", f"path {path!r} for key {key_s!r} {exc}", line)
            continue
        if value_path is not None and group_paths[key_s] == value_path:
            bad("groupBy", f"path {path!r} for key {key_s!r} is the same as valueProperty", line)
    if len(problems) > before:
        return None
    return Meter(
        slug=slug,
        event_type=event_type,
        aggregation=aggregation,
        value_property=value_property,
        group_by={str(k): str(v) for k, v in group_by.items()},
        description=description,
        event_from=event_from,
        value_path=value_path,
        group_paths=group_paths,
    )


def _check_repeated_keys(node: yaml.Node, problems: list[Problem], where: str = "", seen: set | None = None) -> None:
    """PyYAML silently keeps the last of two equal keys: a repeated field would silently change billing."""
    seen = set() if seen is None else seen
    if id(node.value) in seen:  # an alias to a node already checked (or a recursive one; aliases share `value`)
        return
    seen.add(id(node.value))
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_repeated_keys(item, problems, f"{where}[{index}]", seen)
    elif isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key, value in node.value:
            name = str(key.value)
            path = f"{where}.{name}" if where else name
            if name in first:
                problems.append(
                    Problem(_line(key), path, f"repeated key (first on line {first[name]}); only one is allowed")
                )
            else:
                first[name] = _line(key)
            _check_repeated_keys(value, problems, path, seen)


def parse_meters(text: str, source: str = "meters file") -> MeterSet:
    """Validate a meters document; raise MeterConfigError listing every problem."""
    try:
        yaml.safe_load(text)  # unknown tags (`!foo x`) fail here, with their line, not later in _plain
        root = yaml.compose(text, Loader=_AliasLines)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        reason = getattr(exc, "problem", None) or str(exc)
        raise MeterConfigError([Problem(line, "YAML", f"not valid YAML: {reason}")], source) from None
    problems: list[Problem] = []
    if root is None or not isinstance(root, yaml.MappingNode):
        raise MeterConfigError([Problem(None, "file", "must be a mapping with a 'meters:' list")], source)
    _check_repeated_keys(root, problems)
    top = _mapping(root)
    for name, (key, _) in top.items():
        if name not in TOP_FIELDS:
            problems.append(Problem(_line(key), name, "unknown top-level field (allowed: meters, billing)"))
    billing = _check_billing(top["billing"][1], problems) if "billing" in top else Billing()
    meters: list[Meter] = []
    if "meters" not in top or not isinstance(top["meters"][1], yaml.SequenceNode):
        problems.append(Problem(None, "meters", "a 'meters:' list is required"))
    else:
        seen: dict[str, int] = {}
        for index, node in enumerate(top["meters"][1].value):
            meter = _check_meter(node, index, problems)
            # Duplicates are reported even when either meter has other problems: one pass fixes the file.
            slug_field = _mapping(node).get("slug") if isinstance(node, yaml.MappingNode) else None
            slug = _plain(slug_field[1]) if slug_field else None
            if isinstance(slug, str) and slug in seen:
                problems.append(
                    Problem(
                        _line(node),
                        f"meter {slug!r} slug",
                        f"duplicate slug (first defined on line {seen[slug]})",
                    )
                )
                continue
            if isinstance(slug, str):
                seen[slug] = _line(node)
            if meter is not None:
                meters.append(meter)
    if problems:
        raise MeterConfigError(problems, source)
    return MeterSet(billing=billing, meters=tuple(meters))


def load_meters(text: str, source: str = "meters file") -> MeterSet:
    return parse_meters(text, source)


def load_meters_file(path: str | Path) -> MeterSet:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MeterConfigError([Problem(None, "file", "not found")], str(p)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MeterConfigError([Problem(None, "file", f"cannot be read: {exc}")], str(p)) from None
    return parse_meters(text, str(p))
