"""Meter YAML loading and validation (SPEC §3): the seed definitions load, every rule fails clearly."""

from __future__ import annotations

import datetime as dt
import textwrap

import pytest
import yaml

from meters import Billing, MeterConfigError, Problem, UnknownMeter, load_meters_file, parse_meters

# ---------------------------------------------------------------------------------------------------
# The user's own examples (seeds/openmeter-common-examples.txt), written out as complete meters files.
# Expected values are read off the seed by hand: (slug, eventType, aggregation, valueProperty, groupBy).
# ---------------------------------------------------------------------------------------------------

SEEDS = {
    "llm_tokens": (
        """
        meters:
          - slug: tokens_total
            description: AI Token Usage
            # Filter events by type
            eventType: prompt
            aggregation: SUM
            # JSONPath to parse usage value
            valueProperty: $.tokens
            groupBy:
              # Model used: gpt4-turbo, etc.
              model: $.model
              # Prompt type: input, output, system
              type: $.type
        """,
        [("tokens_total", "prompt", "SUM", "$.tokens", {"model": "$.model", "type": "$.type"})],
    ),
    "gpu_time": (
        """
        meters:
          - slug: gpu_execution_duration_seconds
            description: GPU Time
            eventType: gpu_time
            aggregation: SUM
            valueProperty: $.duration_seconds
            groupBy:
              hostname: $.hostname
              region: $.region
              # Type of GPU: e.g. nvidia_A100
              gpu_type: $.gpu_type
        """,
        [
            (
                "gpu_execution_duration_seconds",
                "gpu_time",
                "SUM",
                "$.duration_seconds",
                {"hostname": "$.hostname", "region": "$.region", "gpu_type": "$.gpu_type"},
            )
        ],
    ),
    "api_request_count": (
        """
        meters:
          - slug: api_requests_total
            description: API Requests
            # Filter events by type
            eventType: request
            aggregation: COUNT
            groupBy:
              # HTTP Method: GET, POST, etc.
              method: $.method
              # Route: /products/:product_id
              route: $.route
        """,
        [("api_requests_total", "request", "COUNT", None, {"method": "$.method", "route": "$.route"})],
    ),
    "api_request_duration": (
        """
        meters:
          - slug: api_request_duration
            description: API Request Duration
            # Filter events by type
            eventType: request
            aggregation: SUM
            # JSONPath to parse duration value
            valueProperty: $.duration_seconds
            groupBy:
              # HTTP Method: GET, POST, etc.
              method: $.method
              # Route: /products/:product_id
              route: $.route
        """,
        [("api_request_duration", "request", "SUM", "$.duration_seconds", {"method": "$.method", "route": "$.route"})],
    ),
    "kubernetes_pod": (
        """
        meters:
          - slug: pod_execution_time
            description: Pod Execution Time
            eventType: kube-pod-exec-time
            aggregation: SUM
            valueProperty: $.duration_seconds
            groupBy:
              pod_name: $.pod_name
              pod_namespace: $.pod_namespace
        """,
        [
            (
                "pod_execution_time",
                "kube-pod-exec-time",
                "SUM",
                "$.duration_seconds",
                {"pod_name": "$.pod_name", "pod_namespace": "$.pod_namespace"},
            )
        ],
    ),
    "unique_sessions": (
        """
        meters:
          - slug: unique_sessions_total
            description: Unique Sessions
            eventType: login
            aggregation: UNIQUE_COUNT
            valueProperty: $.session_id
        """,
        [("unique_sessions_total", "login", "UNIQUE_COUNT", "$.session_id", {})],
    ),
    "multiple_meters_one_event": (
        """
        meters:
          - slug: api_requests_total
            description: API Requests
            eventType: request
            aggregation: COUNT
            groupBy:
              method: $.method
              route: $.route
          - slug: api_request_duration_seconds
            description: API Request Duration
            eventType: request
            aggregation: SUM
            valueProperty: $.duration_seconds
            groupBy:
              method: $.method
              route: $.route
          - slug: api_request_ingress_bytes
            description: Request Ingress Bytes
            eventType: request
            aggregation: SUM
            valueProperty: $.ingress_bytes
            groupBy:
              method: $.method
              route: $.route
        """,
        [
            ("api_requests_total", "request", "COUNT", None, {"method": "$.method", "route": "$.route"}),
            (
                "api_request_duration_seconds",
                "request",
                "SUM",
                "$.duration_seconds",
                {"method": "$.method", "route": "$.route"},
            ),
            (
                "api_request_ingress_bytes",
                "request",
                "SUM",
                "$.ingress_bytes",
                {"method": "$.method", "route": "$.route"},
            ),
        ],
    ),
    "workflow_states": (
        """
        meters:
          - slug: workflow_created
            description: Workflows Created
            eventType: workflow_create
            aggregation: COUNT
            groupBy:
              task_type: $.task_type
          - slug: workflow_succeeded
            description: Workflow Succeeded
            eventType: workflow_success
            aggregation: COUNT
            groupBy:
              task_type: $.task_type
          - slug: workflow_failed
            description: Workflow Failed
            eventType: workflow_fail
            aggregation: COUNT
            groupBy:
              task_type: $.task_type
        """,
        [
            ("workflow_created", "workflow_create", "COUNT", None, {"task_type": "$.task_type"}),
            ("workflow_succeeded", "workflow_success", "COUNT", None, {"task_type": "$.task_type"}),
            ("workflow_failed", "workflow_fail", "COUNT", None, {"task_type": "$.task_type"}),
        ],
    ),
    "translate_pages": (
        """
        meters:
          - slug: pages_total
            description: Number of pages translated
            eventType: translate
            aggregation: SUM
            valueProperty: $.pages
        """,
        [("pages_total", "translate", "SUM", "$.pages", {})],
    ),
    "translate_words": (
        """
        meters:
          - slug: words_total
            description: Number of words translated
            eventType: translate
            aggregation: SUM
            valueProperty: $.words
        """,
        [("words_total", "translate", "SUM", "$.words", {})],
    ),
    "translate_tokens": (
        """
        meters:
          - slug: tokens_total
            description: Number of LLM tokens used
            eventType: translate
            aggregation: SUM
            valueProperty: $.tokens
            groupBy:
              model: $.model
        """,
        [("tokens_total", "translate", "SUM", "$.tokens", {"model": "$.model"})],
    ),
}


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seed_meter_definitions_load(name: str) -> None:
    text, expected = SEEDS[name]
    meter_set = parse_meters(textwrap.dedent(text))
    got = [(m.slug, m.event_type, m.aggregation, m.value_property, dict(m.group_by)) for m in meter_set.meters]
    assert got == expected
    # groupBy keys keep their definition order (they become output columns in that order).
    assert [list(m.group_paths) for m in meter_set.meters] == [list(e[4]) for e in expected]
    assert meter_set.billing == Billing("MONTH", "UTC", 1)


def test_seed_file_from_disk(tmp_path) -> None:
    path = tmp_path / "meters.yaml"
    path.write_text(textwrap.dedent(SEEDS["multiple_meters_one_event"][0]), encoding="utf-8")
    meter_set = load_meters_file(path)
    assert [m.slug for m in meter_set.meters] == [
        "api_requests_total",
        "api_request_duration_seconds",
        "api_request_ingress_bytes",
    ]
    assert meter_set.get("api_request_ingress_bytes").value_path == "$.ingress_bytes"


# ---------------------------------------------------------------------------------------------------
# Validation rules. Each invalid document must fail with exactly the expected problem(s), and the
# message must name the meter (its slug, or its index when the slug is unusable) and the field.
# ---------------------------------------------------------------------------------------------------

_DROP = object()  # a field left out of the meter

BASE = {"slug": "m1", "eventType": "prompt", "aggregation": "SUM", "valueProperty": "$.tokens"}


def doc(*meters: dict, billing: dict | None = None) -> str:
    body: dict = {}
    if billing is not None:
        body["billing"] = billing
    body["meters"] = list(meters)
    return yaml.safe_dump(body, sort_keys=False, allow_unicode=True)


def meter(**changes) -> dict:
    out = {**BASE, **changes}
    return {k: v for k, v in out.items() if v is not _DROP}


def problems_of(text: str) -> list[Problem]:
    with pytest.raises(MeterConfigError) as info:
        parse_meters(text)
    assert info.value.problems, "a MeterConfigError must carry its problems"
    return info.value.problems


def only_problem(text: str) -> Problem:
    found = problems_of(text)
    assert len(found) == 1, [str(p) for p in found]
    return found[0]


def assert_names(problem: Problem, meter_name: str, field: str) -> None:
    text = str(problem)
    assert meter_name in text, text
    assert field in problem.where, text
    assert problem.line is not None and problem.line >= 1, text


@pytest.mark.parametrize(
    ("field", "written", "shown"),
    [
        ("eventType", "on", "'on'"),
        ("eventType", "no", "'no'"),
        ("eventType", "404", "'404'"),
        ("eventType", "2024-01-01", "'2024-01-01'"),
        ("slug", "yes", "'yes'"),
        ("description", "1.5", "'1.5'"),
    ],
)
def test_an_unquoted_scalar_yaml_reads_as_another_type_is_named_as_written(
    field: str, written: str, shown: str
) -> None:
    # `eventType: on` said "is required and must be a non-empty string": it is there, YAML 1.1 read it as True.
    text = "meters:\n  - slug: m1\n    eventType: prompt\n    aggregation: COUNT\n"
    text = text.replace(f"{field}: {BASE.get(field, 'm1')}", f"{field}: {written}")
    if field == "description":
        text += f"    description: {written}\n"
    problem = only_problem(text)
    assert field in problem.where
    assert f"got {shown}" in problem.message and "quote" in problem.message, problem.message


def test_a_list_where_text_belongs_is_named_by_its_kind() -> None:
    problem = only_problem("meters:\n  - slug: m1\n    eventType: [a, b]\n    aggregation: COUNT\n")
    assert "got a list" in problem.message, problem.message


def test_valid_base_meter_loads() -> None:
    (m,) = parse_meters(doc(meter())).meters
    assert (m.slug, m.event_type, m.aggregation, m.value_path) == ("m1", "prompt", "SUM", "$.tokens")


@pytest.mark.parametrize(
    "slug",
    [
        "Tokens",
        "tokens-total",
        "tokens__total",
        "_tokens",
        "tokens_",
        "tokens total",
        "tökens",
        "a/b",
        "../etc",
        "tokens\n",  # `$` in a regex also matches before a final newline: must not reach a storage path
    ],
)
def test_slug_pattern(slug: str) -> None:
    problem = only_problem(doc(meter(slug=slug)))
    assert_names(problem, repr(slug), "slug")


@pytest.mark.parametrize("slug", ["", None, 12])
def test_slug_missing_or_not_a_string(slug) -> None:
    problem = only_problem(doc(meter(slug=slug)))
    assert_names(problem, "meters[0]", "slug")


def test_slug_missing_entirely() -> None:
    problem = only_problem(doc(meter(slug=_DROP)))
    assert_names(problem, "meters[0]", "slug")


def test_slug_length_limit() -> None:
    ok = "a" * 64
    assert parse_meters(doc(meter(slug=ok))).meters[0].slug == ok
    long = "a" * 63 + "_b"  # 65 characters, otherwise a valid slug
    problem = only_problem(doc(meter(slug=long)))
    assert_names(problem, long, "slug")


def test_duplicate_slug() -> None:
    text = textwrap.dedent(
        """\
        meters:
          - slug: tokens_total
            eventType: prompt
            aggregation: COUNT
          - slug: tokens_total
            eventType: translate
            aggregation: COUNT
        """
    )
    problem = only_problem(text)
    assert_names(problem, "'tokens_total'", "slug")
    assert problem.line == 5
    assert "duplicate" in problem.message and "line 2" in problem.message


def test_duplicate_slug_reported_even_when_the_copy_has_other_problems() -> None:
    text = doc(meter(), meter(aggregation="MEDIAN"))
    found = problems_of(text)
    fields = sorted(p.where for p in found)
    assert fields == ["meter 'm1' aggregation", "meter 'm1' slug"], [str(p) for p in found]


@pytest.mark.parametrize("event_type", ["", None, 5, _DROP])
def test_event_type_required(event_type) -> None:
    problem = only_problem(doc(meter(eventType=event_type)))
    assert_names(problem, "'m1'", "eventType")


@pytest.mark.parametrize("aggregation", ["sum", "MEDIAN", "", None, _DROP])
def test_unknown_aggregation(aggregation) -> None:
    problem = only_problem(doc(meter(aggregation=aggregation, valueProperty=_DROP)))
    assert_names(problem, "'m1'", "aggregation")


def test_count_with_value_property() -> None:
    problem = only_problem(doc(meter(aggregation="COUNT", valueProperty="$.tokens")))
    assert_names(problem, "'m1'", "valueProperty")
    assert "COUNT" in problem.message


@pytest.mark.parametrize("aggregation", ["SUM", "AVG", "MIN", "MAX", "UNIQUE_COUNT", "LATEST"])
def test_value_property_required(aggregation: str) -> None:
    problem = only_problem(doc(meter(aggregation=aggregation, valueProperty=_DROP)))
    assert_names(problem, "'m1'", "valueProperty")
    assert aggregation in problem.message


@pytest.mark.parametrize("aggregation", ["SUM", "COUNT", "UNIQUE_COUNT", "AVG", "MIN", "MAX", "LATEST"])
def test_all_seven_aggregations_accepted(aggregation: str) -> None:
    changes = {"aggregation": aggregation}
    if aggregation == "COUNT":
        changes["valueProperty"] = _DROP
    (m,) = parse_meters(doc(meter(**changes))).meters
    assert m.aggregation == aggregation


BAD_PATHS = {
    "no_dollar": ("tokens", "start with $"),
    "dot_no_dollar": (".tokens", "start with $"),
    "wildcard_field": ("$.*", "wildcard"),
    "wildcard_index": ("$.items[*].qty", "wildcard"),
    # A quoted '*': jsonpath-ng >= 1.16 reads the key `*`, older ones a wildcard, and Polars' struct.field a
    # wildcard (the one-parse decoding panics): no consistent single value, so refused.
    "quoted_star": ("$['*']", "several fields"),
    "quoted_star_nested": ('$.usage["*"]', "several fields"),
    # Two names in one bracket: Polars' json_path_match would read the first and bill it silently.
    "two_fields": ("$['tokens','pages']", "several fields"),
    "two_fields_nested": ("$.usage['in','out']", "several fields"),
    # Polars' bracket syntax cannot escape these: `$['it's']` would not read the key `it's`.
    "quote_in_name": ('$["it\'s"]', "quote"),
    "backslash_in_name": ('$["a\\\\b"]', "backslash"),
    "recursive_descent": ("$..tokens", "recursive"),
    "slice": ("$.items[0:2]", "slice"),
    "filter": ("$.items[?(@.qty > 1)]", "filter"),
    "unparseable": ("$.[", "parse"),
    "unparseable_bracket": ("$['tokens'", "parse"),
    "negative_index": ("$.items[-1]", "index"),
    # Two indices in one bracket: Polars' json_path_match would read the first and bill it silently.
    "two_indices": ("$.items[0,1]", "index"),
    "union": ("$.a | $.b", "union (|)"),
    # jsonpath-ng's extensions were named by their parser classes (`_Intersect is not supported`, `This ...`).
    "intersection": ("$.a & $.b", "intersection (&)"),
    "this": ("$.`this`", "`this`"),
    "parent": ("$.a.`parent`", "`parent`"),
    "arithmetic": ("$.a + $.b", "arithmetic"),
    "where": ("$.a where $.b", "`where`"),
    "len": ("$.a.`len`", "`len`"),
    "sorted": ("$.a[/x]", "sorting"),
    "empty": ("", "non-empty"),
    # The whole object: OpenMeter groups every event under '' (ClickHouse JSON_VALUE of an object), Polars
    # would group by the payload's text, so the two would bill differently.
    "root": ("$", "whole data object"),
}


@pytest.mark.parametrize("case", sorted(BAD_PATHS))
def test_bad_value_property_path(case: str) -> None:
    path, hint = BAD_PATHS[case]
    problem = only_problem(doc(meter(valueProperty=path)))
    assert_names(problem, "'m1'", "valueProperty")
    assert hint in problem.message.lower(), problem.message


@pytest.mark.parametrize("case", sorted(BAD_PATHS))
def test_bad_path_message_names_no_parser_class(case: str) -> None:
    path, _hint = BAD_PATHS[case]
    message = only_problem(doc(meter(valueProperty=path))).message
    for name in ("_Union", "_Intersect", "This ", "Parent ", "Operation", "Where ", "Len ", "SortedThis"):
        assert name not in message, message


@pytest.mark.parametrize("case", sorted(BAD_PATHS))
def test_bad_group_by_path(case: str) -> None:
    path, hint = BAD_PATHS[case]
    problem = only_problem(doc(meter(groupBy={"model": path})))
    assert_names(problem, "'m1'", "groupBy")
    assert "'model'" in problem.message
    assert hint in problem.message.lower(), problem.message


@pytest.mark.parametrize(
    ("path", "normalised"),
    [
        ("$['weird key']", "$['weird key']"),
        ("$.items[0].qty", "$.items[0].qty"),
        ('$["tokens"]', "$.tokens"),
        ("$['tokens']", "$.tokens"),
        ("$.usage.input_tokens", "$.usage.input_tokens"),
    ],
)
def test_single_value_paths_accepted_and_normalised(path: str, normalised: str) -> None:
    (m,) = parse_meters(doc(meter(valueProperty=path))).meters
    assert m.value_property == path  # as written, for display
    assert m.value_path == normalised  # what Polars reads
    (c,) = parse_meters(doc(meter(aggregation="COUNT", valueProperty=_DROP, groupBy={"g": path}))).meters
    assert c.group_by == {"g": path}
    assert c.group_paths == {"g": normalised}


@pytest.mark.parametrize("key", ["1model", "model-name", "mo del", "modèle", "model\n", ""])
def test_group_by_key_invalid(key: str) -> None:
    problem = only_problem(doc(meter(groupBy={key: "$.model"})))
    assert_names(problem, "'m1'", "groupBy")
    assert repr(key) in problem.message


@pytest.mark.parametrize(
    "key", ["subject", "window_start", "window_end", "value", "event_count", "period_start", "date"]
)
def test_group_by_key_reserved(key: str) -> None:
    problem = only_problem(doc(meter(groupBy={key: "$.model"})))
    assert_names(problem, "'m1'", "groupBy")
    assert "reserved" in problem.message and repr(key) in problem.message


@pytest.mark.parametrize("key", ["Value", "VALUE", "Subject", "Window_Start", "Event_Count", "DATE"])
def test_group_by_key_reserved_in_any_case(key: str) -> None:
    # DuckDB (and Spark) read column names case-insensitively: a key `Value` beside the table's `value` made
    # DuckDB's `value` the group text and renamed the billed value to `value_1`.
    problem = only_problem(doc(meter(groupBy={key: "$.model"})))
    assert_names(problem, "'m1'", "groupBy")
    assert "reserved" in problem.message and repr(key) in problem.message


def test_group_by_keys_differing_only_in_case() -> None:
    # Two columns `model` and `Model`: DuckDB reads the second as `Model_1`, Spark refuses the table.
    problem = only_problem(doc(meter(groupBy={"model": "$.model", "Model": "$.m2"})))
    assert_names(problem, "'m1'", "groupBy")
    assert "'Model'" in problem.message and "'model'" in problem.message and "letter case" in problem.message


@pytest.mark.parametrize("path", ["$.tokens", "$['tokens']", '$["tokens"]'])
def test_group_by_path_equal_to_value_property(path: str) -> None:
    problem = only_problem(doc(meter(valueProperty="$.tokens", groupBy={"tokens": path})))
    assert_names(problem, "'m1'", "groupBy")
    assert "valueProperty" in problem.message


def test_group_by_key_named_like_value_property_field_is_fine() -> None:
    (m,) = parse_meters(doc(meter(valueProperty="$.tokens", groupBy={"tokens": "$.model"}))).meters
    assert m.group_paths == {"tokens": "$.model"}


def test_group_by_not_a_mapping() -> None:
    problem = only_problem(doc(meter(groupBy=["$.model"])))
    assert_names(problem, "'m1'", "groupBy")


def test_unknown_meter_field_is_an_error() -> None:
    text = textwrap.dedent(
        """\
        meters:
          - slug: tokens_total
            evenType: prompt
            aggregation: COUNT
        """
    )
    found = problems_of(text)
    by_field = {p.where: p for p in found}
    assert set(by_field) == {"meter 'tokens_total' evenType", "meter 'tokens_total' eventType"}
    assert by_field["meter 'tokens_total' evenType"].line == 3
    assert "unknown field" in by_field["meter 'tokens_total' evenType"].message


def test_unknown_field_next_to_a_complete_meter_is_still_an_error() -> None:
    # `valueproperty` (lower-case p) must not be ignored while a COUNT meter silently loads.
    problem = only_problem(doc(meter(aggregation="COUNT", valueProperty=_DROP, valueproperty="$.tokens")))
    assert_names(problem, "'m1'", "valueproperty")


def test_unknown_top_level_and_billing_fields() -> None:
    text = doc(meter(), billing={"period": "MONTH", "timezon": "UTC"}) + "meter:\n  - slug: x\n"
    found = problems_of(text)
    assert sorted(p.where for p in found) == ["billing.timezon", "meter"], [str(p) for p in found]


def test_repeated_key_is_an_error() -> None:
    # PyYAML keeps the last of two equal keys; a second `aggregation:` would silently change billing.
    text = textwrap.dedent(
        """\
        meters:
          - slug: tokens_total
            eventType: prompt
            aggregation: SUM
            valueProperty: $.tokens
            aggregation: MAX
        """
    )
    problem = only_problem(text)
    assert problem.line == 6
    assert "aggregation" in problem.where and "line 4" in problem.message


# --- billing block ---------------------------------------------------------------------------------


def test_billing_defaults_and_explicit_values() -> None:
    assert parse_meters(doc(meter())).billing == Billing("MONTH", "UTC", 1)
    explicit = parse_meters(doc(meter(), billing={"period": "MONTH", "timezone": "Europe/Berlin", "anchor_day": 31}))
    assert explicit.billing == Billing("MONTH", "Europe/Berlin", 31)
    week = parse_meters(doc(meter(), billing={"period": "WEEK", "timezone": "Asia/Kolkata"}))
    assert week.billing == Billing("WEEK", "Asia/Kolkata", 1)


@pytest.mark.parametrize(
    ("billing", "field"),
    [
        ({"period": "YEAR"}, "billing.period"),
        ({"period": "month"}, "billing.period"),
        ({"timezone": "Mars/Olympus"}, "billing.timezone"),
        ({"timezone": "CET+1"}, "billing.timezone"),
        ({"timezone": "../../etc/passwd"}, "billing.timezone"),
        ({"timezone": ""}, "billing.timezone"),
        # files of the system's zoneinfo folder that are not IANA zones (Polars refuses them at run time)
        ({"timezone": "localtime"}, "billing.timezone"),
        ({"timezone": "posixrules"}, "billing.timezone"),
        ({"timezone": "Factory"}, "billing.timezone"),
        ({"timezone": "right/UTC"}, "billing.timezone"),
        ({"timezone": "posix/Europe/Berlin"}, "billing.timezone"),
        ({"anchor_day": 0}, "billing.anchor_day"),
        ({"anchor_day": 32}, "billing.anchor_day"),
        ({"anchor_day": -1}, "billing.anchor_day"),
        ({"anchor_day": "5"}, "billing.anchor_day"),
        ({"anchor_day": 1.5}, "billing.anchor_day"),
        ({"anchor_day": True}, "billing.anchor_day"),
        ({"period": "WEEK", "anchor_day": 15}, "billing.anchor_day"),
    ],
)
def test_billing_block_errors(billing: dict, field: str) -> None:
    problem = only_problem(doc(meter(), billing=billing))
    assert problem.where == field, str(problem)
    assert problem.line is not None


@pytest.mark.parametrize("anchor", [1, 28, 29, 31])
def test_billing_anchor_day_in_range(anchor: int) -> None:
    assert parse_meters(doc(meter(), billing={"anchor_day": anchor})).billing.anchor_day == anchor


# --- reporting ---------------------------------------------------------------------------------------


def test_all_problems_reported_at_once_with_line_numbers() -> None:
    text = textwrap.dedent(
        """\
        billing:
          period: YEAR
          timezone: Europe/Berlin
        meters:
          - slug: tokens_total
            eventType: prompt
            aggregation: SUM
            valueProperty: $..tokens
          - slug: Bad-Slug
            eventType: request
            aggregation: COUNT
          - slug: requests
            eventType: ""
            aggregation: COUNT
            groupBy:
              subject: $.user
        """
    )
    with pytest.raises(MeterConfigError) as info:
        parse_meters(text, source="meters.yaml")
    got = sorted((p.line, p.where) for p in info.value.problems)
    assert got == [
        (2, "billing.period"),
        (8, "meter 'tokens_total' valueProperty"),
        (9, "meter 'Bad-Slug' slug"),
        (13, "meter 'requests' eventType"),
        (16, "meter 'requests' groupBy"),
    ]
    message = str(info.value)
    assert message.startswith("meters.yaml: ")
    for line in (2, 8, 9, 13, 16):
        assert f"line {line}: " in message


@pytest.mark.parametrize(
    "text",
    [
        "meters: [\n",
        "meters:\n  - slug: a\n\teventType: b\n",
        "meters:\n  - slug: a: b\n",
        "meters:\n  - slug: a\n    eventType: !custom prompt\n    aggregation: COUNT\n",
        "meters: []\n---\nmeters: []\n",
        "meters:\n  - slug: *undefined\n",
    ],
    ids=["unclosed", "tab", "nested_colon", "unknown_tag", "two_documents", "undefined_alias"],
)
def test_invalid_yaml_is_a_meter_config_error(text: str) -> None:
    try:
        parse_meters(text)
    except MeterConfigError as exc:
        assert not isinstance(exc, yaml.YAMLError)
        assert exc.problems[0].where == "YAML"
        assert "not valid YAML" in exc.problems[0].message
    else:
        pytest.fail("invalid YAML loaded")


@pytest.mark.parametrize("text", ["", "# only a comment\n", "- a\n- b\n", "just text\n", "meters: 5\n"])
def test_document_without_a_meters_list(text: str) -> None:
    problem = only_problem(text)
    assert problem.where in ("file", "meters")
    assert "'meters:' list" in problem.message


def test_empty_meters_list_is_allowed() -> None:
    assert parse_meters("meters: []\n").meters == ()


def test_meter_entry_not_a_mapping() -> None:
    problem = only_problem("meters:\n  - tokens_total\n")
    assert problem.where == "meters[0]" and problem.line == 2


def test_load_meters_file_errors(tmp_path) -> None:
    with pytest.raises(MeterConfigError, match="not found"):
        load_meters_file(tmp_path / "absent.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00meters")
    with pytest.raises(MeterConfigError, match="cannot be read"):
        load_meters_file(binary)
    broken = tmp_path / "broken.yaml"
    broken.write_text("meters:\n  - slug: [\n", encoding="utf-8")
    with pytest.raises(MeterConfigError) as info:
        load_meters_file(broken)
    assert info.value.source == str(broken)


def test_fingerprint_ignores_description_but_not_paths() -> None:
    a = parse_meters(doc(meter(description="one"))).meters[0]
    b = parse_meters(doc(meter(description="two"))).meters[0]
    c = parse_meters(doc(meter(valueProperty="$.tokens2"))).meters[0]
    d = parse_meters(doc(meter(valueProperty="$['tokens']"))).meters[0]  # same path, other spelling
    assert a.fingerprint() == b.fingerprint() == d.fingerprint()
    assert a.fingerprint() != c.fingerprint()


def test_each_group_by_problem_is_reported_at_its_own_key() -> None:
    text = """meters:
  - slug: m
    eventType: t
    aggregation: SUM
    valueProperty: $.v
    groupBy:
      ok: $.a
      same: $.v
      window_start: $.b
      bad key: $.c
      wild: $.items[*]
"""
    got = sorted((p.line, p.message) for p in problems_of(text))
    assert [line for line, _ in got] == [8, 9, 10, 11]  # not all at line 7, the first key's
    for (_, message), key in zip(got, ["same", "window_start", "bad key", "wild"], strict=True):
        assert f"key {key!r}" in message, message


def test_group_by_keys_that_yaml_reads_as_other_types_keep_their_lines() -> None:
    text = """meters:
  - slug: m
    eventType: t
    aggregation: COUNT
    groupBy:
      ok: $.a
      on: $..c
      1.50: $..d
"""
    assert sorted(p.line for p in problems_of(text)) == [7, 8, 8]  # 1.50: a bad key and a bad path


def test_an_unknown_slug_reads_as_one_plain_line() -> None:
    """A deployment run shows the exception's text: a bare KeyError would print it in quotes."""
    meterset = parse_meters("meters:\n  - {slug: tokens, eventType: t, aggregation: COUNT}\n")
    with pytest.raises(KeyError) as info:
        meterset.get("tokenz")
    assert str(info.value) == "unknown meter 'tokenz' (known: tokens)"
    assert isinstance(info.value, UnknownMeter)
    with pytest.raises(UnknownMeter, match=r"^unknown meter 'tokens' \(known: none\)$"):
        parse_meters("meters: []\n").get("tokens")


def test_fields_left_empty_are_problems_with_their_lines() -> None:
    """`slug:` with nothing after it is null in YAML: a problem of that field, not a parser error (it was an
    'unexpected ParserError', exit 1, when the empty value was rebuilt from its node)."""
    text = (
        "billing:\n  timezone:\n"
        "meters:\n  - slug:\n    eventType: prompt\n    aggregation: COUNT\n"
        "  - slug: b\n    eventType:\n    aggregation:\n    valueProperty:\n    groupBy:\n      model:\n"
    )
    with pytest.raises(MeterConfigError) as failure:
        parse_meters(text)
    found = {(p.line, p.where.split()[-1]) for p in failure.value.problems}
    assert found >= {(2, "billing.timezone"), (4, "slug"), (8, "eventType"), (9, "aggregation"), (12, "groupBy")}


# --- OpenMeter's own meter fields and rules (research §1.1, §1.2) ---------------------------------


@pytest.mark.parametrize("key", ["on", "off", "yes", "no", "null", "true"])
def test_group_by_keys_are_taken_as_written(key: str) -> None:
    """YAML 1.1 reads `on`/`yes` as True and `null` as None; OpenMeter's keys are the text written, so a
    groupBy `on: $.on` is the column `on`, not `True` (and `on` with `yes` are two columns, not one)."""
    text = f"meters:\n  - slug: m\n    eventType: t\n    aggregation: COUNT\n    groupBy:\n      {key}: $.a\n      ok: $.b\n"
    (m,) = parse_meters(text).meters
    assert m.group_paths == {key: "$.a", "ok": "$.b"}
    assert m.group_by == {key: "$.a", "ok": "$.b"}


def test_group_by_keys_yaml_reads_alike_stay_distinct() -> None:
    text = (
        "meters:\n  - slug: m\n    eventType: t\n    aggregation: COUNT\n    groupBy:\n      on: $.a\n      yes: $.b\n"
    )
    (m,) = parse_meters(text).meters
    assert m.group_paths == {"on": "$.a", "yes": "$.b"}


def test_group_by_merge_keys_still_merge() -> None:
    text = textwrap.dedent(
        """\
        common: &common
          method: $.method
        meters:
          - slug: m
            eventType: t
            aggregation: COUNT
            groupBy:
              <<: *common
              on: $.route
        """
    )
    with pytest.raises(MeterConfigError):  # `common` is an unknown top-level field
        parse_meters(text)
    text = text.replace("common: &common\n  method: $.method\n", "").replace(
        "      <<: *common\n", "      <<: {method: $.method}\n"
    )
    (m,) = parse_meters(text).meters
    assert m.group_paths == {"method": "$.method", "on": "$.route"}


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"description": ""}, "description"),  # Go: "description must not be empty string"
        ({"description": "x" * 1025}, "description"),  # max 1024 chars
        ({"name": ""}, "name"),  # 1-256 chars
        ({"name": "x" * 257}, "name"),
        ({"name": 5}, "name"),
        ({"metadata": ["a"]}, "metadata"),  # a string map
        ({"metadata": {"team": 5}}, "metadata"),
    ],
)
def test_openmeter_text_field_limits(changes: dict, field: str) -> None:
    problem = only_problem(doc(meter(**changes)))
    assert_names(problem, "'m1'", field)


def test_openmeter_descriptive_fields_load() -> None:
    text = doc(meter(name="Tokens", description="x" * 1024, metadata={"team": "ai", "tier": "1"}))
    (m,) = parse_meters(text).meters
    assert m.description == "x" * 1024


@pytest.mark.parametrize(
    "written, expected",
    [
        ("2024-01-01T00:00:00Z", dt.datetime(2024, 1, 1, tzinfo=dt.UTC)),  # unquoted: a YAML timestamp
        ("'2024-01-01T01:30:00+01:00'", dt.datetime(2024, 1, 1, 0, 30, tzinfo=dt.UTC)),
        ('"2024-01-01T00:00:00.25Z"', dt.datetime(2024, 1, 1, 0, 0, 0, 250000, tzinfo=dt.UTC)),
    ],
)
def test_event_from_is_accepted_as_an_rfc3339_time(written: str, expected: dt.datetime) -> None:
    """OpenMeter's `eventFrom`: events before it are ignored by the meter (research §1.1, §5.1)."""
    text = f"meters:\n  - slug: m\n    eventType: t\n    aggregation: COUNT\n    eventFrom: {written}\n"
    (m,) = parse_meters(text).meters
    assert m.event_from == expected


@pytest.mark.parametrize(
    "written", ["2024-01-01", "2024-01-01T00:00:00", "yesterday", "0001-01-01T00:00:00Z", "5", "'2024-13-01T00:00:00Z'"]
)
def test_event_from_must_be_an_rfc3339_time_with_an_offset(written: str) -> None:
    text = f"meters:\n  - slug: m\n    eventType: t\n    aggregation: COUNT\n    eventFrom: {written}\n"
    problem = only_problem(text)
    assert_names(problem, "'m'", "eventFrom")
    assert problem.line == 5


@pytest.mark.parametrize(("written", "shown"), [("[1]", "got a list"), ("{a: 1}", "got a mapping")])
def test_event_from_that_is_not_text_is_named(written: str, shown: str) -> None:
    text = f"meters:\n  - slug: m\n    eventType: t\n    aggregation: COUNT\n    eventFrom: {written}\n"
    assert only_problem(text).message.endswith(shown)


def test_event_from_is_part_of_the_fingerprint_only_when_set() -> None:
    plain = parse_meters(doc(meter())).meters[0]
    same = parse_meters(doc(meter(description="other"))).meters[0]
    later = parse_meters(doc(meter(eventFrom="2024-01-01T00:00:00Z"))).meters[0]
    assert plain.event_from is None and plain.fingerprint() == same.fingerprint()
    assert later.fingerprint() != plain.fingerprint()


def test_a_meter_repeated_through_an_alias_is_reported_at_the_alias() -> None:
    text = "meters:\n  - &m\n    slug: a\n    eventType: t\n    aggregation: COUNT\n  - *m\n"
    problem = only_problem(text)
    assert (problem.line, "duplicate slug (first defined on line 2)") == (6, problem.message), str(problem)


def test_a_repeated_key_inside_an_aliased_meter_is_reported_once() -> None:
    text = "meters:\n  - &m {slug: a, eventType: t, aggregation: COUNT, eventType: u}\n  - {<<: *m, slug: b}\n"
    found = problems_of(text)
    assert [p.line for p in found if "repeated key" in p.message] == [2], [str(p) for p in found]


def test_merge_keys_share_a_meters_fields_and_written_fields_win() -> None:
    text = textwrap.dedent(
        """\
        meters:
          - &tokens
            slug: tokens_in
            eventType: prompt
            aggregation: SUM
            valueProperty: $.tokens.in
            groupBy: {model: $.model}
          - <<: *tokens
            slug: tokens_out
            valueProperty: $.tokens.out
          - <<: [{slug: calls, aggregation: COUNT}, *tokens]
            valueProperty: null
            groupBy: {}
        """
    )
    tokens_in, tokens_out, calls = parse_meters(text).meters
    assert (tokens_out.slug, tokens_out.event_type, tokens_out.aggregation) == ("tokens_out", "prompt", "SUM")
    assert (tokens_out.value_path, tokens_out.group_paths) == ("$.tokens.out", {"model": "$.model"})
    # the first merged mapping wins over a later one; the fields written in the meter win over both
    assert (calls.slug, calls.aggregation, calls.event_type, calls.group_paths) == ("calls", "COUNT", "prompt", {})
    assert tokens_in.fingerprint() != tokens_out.fingerprint()


def test_a_merged_meter_is_checked_like_a_written_one() -> None:
    text = "meters:\n  - &m {slug: a, eventType: t, aggregation: COUNT}\n  - {<<: *m, aggregation: SUMM}\n"
    found = problems_of(text)
    assert any("duplicate slug" in p.message and p.line == 3 for p in found), [str(p) for p in found]
    assert any("aggregation" in p.where and "SUMM" in p.message for p in found), [str(p) for p in found]


def test_fingerprints_stay_what_earlier_versions_recorded() -> None:
    """`_state/meters.json` on every deployed root holds these hashes: a change in how they are computed would
    call every meter changed (and, with events, stale) after an upgrade. Values recorded by this version."""
    text = textwrap.dedent(
        """\
        meters:
          - slug: tokens_total
            eventType: prompt
            aggregation: SUM
            valueProperty: $.tokens
            groupBy:
              model: $.model
              type: $.type
        """
    )
    meterset = parse_meters(text)
    assert meterset.meters[0].fingerprint() == "d6351e3716e16526"
    assert meterset.fingerprints() == {"tokens_total": "93aa00b5a712ecac"}


def test_group_by_keys_in_another_order_are_another_definition() -> None:
    """The table has one column per groupBy key in definition order: reordering the keys changes the tables."""
    first = parse_meters(doc(meter(groupBy={"model": "$.model", "type": "$.type"}))).meters[0]
    second = parse_meters(doc(meter(groupBy={"type": "$.type", "model": "$.model"}))).meters[0]
    assert first.fingerprint() != second.fingerprint()


def test_a_refused_path_says_what_to_do_instead() -> None:
    message = only_problem(doc(meter(valueProperty="$..tokens"))).message
    assert message.endswith("recursive descent (..) can match many values; point at exactly one value"), message


@pytest.mark.parametrize("key", ["m", "model", "customer_region"])
def test_group_by_merge_keys_take_the_first_merged_mapping_whatever_the_key(key: str) -> None:
    """groupBy merges as a meter's fields do: the first merged mapping wins over a later one, the written key over
    both. PyYAML 6.0.4 tells merged keys apart by the identity of their text, so a one-letter key (a string
    CPython shares) took the first mapping's path and a longer one (`model`) the second's: the groups billed
    depended on the key's length."""
    text = textwrap.dedent(
        f"""\
        meters:
          - slug: m
            eventType: t
            aggregation: COUNT
            groupBy:
              <<: [{{{key}: $.first, route: $.route}}, {{{key}: $.second, route: $.other, region: $.region}}]
          - slug: n
            eventType: t
            aggregation: COUNT
            groupBy:
              <<: [{{{key}: $.first}}, {{{key}: $.second}}]
              {key}: $.written
        """
    )
    m, n = parse_meters(text).meters
    assert m.group_paths == {key: "$.first", "route": "$.route", "region": "$.region"}
    assert n.group_paths == {key: "$.written"}
