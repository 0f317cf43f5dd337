"""JSONPath checks: parse with jsonpath-ng, allow only paths that select at most one value.

Polars' `json_path_match` silently returns the first of many matches, so a wildcard meter would bill a
random element; such paths are refused at load time instead.
"""

from __future__ import annotations

import re

from jsonpath_ng import Child, Fields, Index, Root
from jsonpath_ng.ext.parser import ExtendedJsonPathParser

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# One parser for every path: jsonpath_ng.ext.parse builds a new one per call (~2 ms of table loading each).
_PARSER = ExtendedJsonPathParser()


class JsonPathError(ValueError):
    pass


def _steps(node: object) -> list[str]:
    if isinstance(node, Root):
        return []
    if isinstance(node, Child):
        return _steps(node.left) + _steps(node.right)
    if isinstance(node, Fields):
        if len(node.fields) != 1 or node.fields[0] == "*":
            raise JsonPathError("selects several fields; use one field per path")
        name = node.fields[0]
        if _IDENT.match(name):
            return [f".{name}"]
        if "'" in name or "\\" in name:
            raise JsonPathError(f"field name {name!r} contains a quote or backslash")
        return [f"['{name}']"]
    if isinstance(node, Index):
        if len(node.indices) != 1 or node.indices[0] < 0:
            raise JsonPathError("array index must be a single non-negative number")
        return [f"[{node.indices[0]}]"]
    kind = type(node).__name__.lstrip("_")  # jsonpath-ng's parser classes: never shown as they are
    hints = {
        "Descendants": "recursive descent (..) can match many values",
        "Slice": "slices can match many values",
        "Filter": "filters can match many values",
        "Wildcard": "wildcards can match many values",
        "Union": "a union (|) can match many values",
        "Intersect": "an intersection (&) is not supported",
        "Where": "`where` can match many values",
        "WhereNot": "`wherenot` can match many values",
        "This": "`this` is not supported",
        "Parent": "`parent` is not supported",
        "Operation": "arithmetic (+, -, *, /) is not supported",
        "SortedThis": "sorting ([/field], [\\field]) is not supported",
    }
    named = {"Len": "len", "Keys": "keys", "Sub": "sub", "Split": "split", "Str": "str"}
    hint = hints.get(kind) or (f"`{named[kind]}` is not supported" if kind in named else "this form is not supported")
    raise JsonPathError(hint + "; point at exactly one value")


def normalise_path(path: object) -> str:
    """Return the Polars form of a single-value JSONPath, or raise JsonPathError saying why not."""
    if not isinstance(path, str) or not path.strip():
        raise JsonPathError("must be a non-empty string")
    if not path.startswith("$"):
        raise JsonPathError("must start with $ (for example $.tokens)")
    try:
        tree = _PARSER.parse(path)
    except Exception as exc:  # noqa: BLE001 - jsonpath-ng raises bare Exception besides its own errors
        raise JsonPathError(f"does not parse: {exc}") from None
    steps = _steps(tree)
    if not steps:  # OpenMeter reads the whole object as '' (ClickHouse JSON_VALUE), Polars as its JSON text
        raise JsonPathError("selects the whole data object, not a field; point at one field (for example $.tokens)")
    return "$" + "".join(steps)
