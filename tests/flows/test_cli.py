"""The operator commands of `meterlake` (query, validate, preview, quarantine, status, report) through main().

Checks exit codes (0 ok, 2 user mistake, 3 storage), one-line errors without tracebacks, output width, and
`--help` examples.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import polars as pl
import pytest

from flows.cli import main

from support import event, jsonl, land, local_root, meterset, run

METERS_YAML = textwrap.dedent(
    """\
    billing:
      period: MONTH
      timezone: UTC
    meters:
      - slug: duration
        eventType: request
        aggregation: SUM
        valueProperty: $.duration_ms
        groupBy:
          method: $.method
      - slug: calls
        eventType: request
        aggregation: COUNT
    """
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A root holding OpenMeter's e2e vector: 5 subjects x T, T+1m, T+1h, T+1d, each duration "100"."""
    base = tmp_path_factory.mktemp("cli")
    storage = local_root(base)
    meters_file = base / "meters.yaml"
    meters_file.write_text(METERS_YAML)
    times = ["2024-03-05T00:00:00Z", "2024-03-05T00:01:00Z", "2024-03-05T01:00:00Z", "2024-03-06T00:00:00Z"]
    events = [
        event(f"{s}-{i}", t, type="request", subject=f"customer-{s}", data={"duration_ms": "100", "method": "GET"})
        for s in range(1, 6)
        for i, t in enumerate(times)
    ]
    events.append(event("bad", "2024-03-05T02:00:00Z", type="request", data={"duration_ms": "n/a"}))  # line 21
    events.append("not json")  # line 22
    land(storage, "b1.jsonl", jsonl(events))
    run(storage, meterset(METERS_YAML))
    return {"root": storage.root, "meters": str(meters_file), "base": base}


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def q(env, capsys, *args: str) -> tuple[int, str, str]:
    return cli(capsys, "query", *args, "--root", env["root"], "--meters", env["meters"])


def assert_fits(text: str) -> None:
    too_wide = [line for line in text.splitlines() if len(line) > 80]
    assert not too_wide, too_wide


RANGE = ("--from", "2024-03-05", "--to", "2024-03-07")


# --- query --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("window", "values"),
    [(None, [2000.0]), ("MINUTE", [500.0] * 4), ("HOUR", [1000.0, 500.0, 500.0]), ("DAY", [1500.0, 500.0])],
)
def test_query_json_follows_openmeter(env, capsys, window, values):
    args = [*RANGE, "--format", "json"] + (["--window", window] if window else [])
    code, out, err = q(env, capsys, "duration", *args)
    assert code == 0, err
    body = json.loads(out)
    assert [row["value"] for row in body["data"]] == values
    first = body["data"][0]
    assert set(first) == {"value", "windowStart", "windowEnd", "subject", "groupBy"}
    assert first["subject"] is None and first["groupBy"] == {}
    if window is None:
        assert (first["windowStart"], first["windowEnd"]) == ("2024-03-05T00:00:00Z", "2024-03-07T00:00:00Z")


def test_query_subjects_group_by_and_filters(env, capsys):
    code, out, _ = q(
        env, capsys, "duration", *RANGE, "-f", "json", "--subject", "customer-1", "--subject", "customer-2"
    )
    assert code == 0
    assert [(r["subject"], r["value"]) for r in json.loads(out)["data"]] == [
        ("customer-1", 400.0),
        ("customer-2", 400.0),
    ]
    code, out, _ = q(env, capsys, "duration", *RANGE, "-f", "json", "--group-by", "method", "--filter", "method=GET")
    assert json.loads(out)["data"][0]["groupBy"] == {"method": "GET"}
    code, out, _ = q(env, capsys, "duration", *RANGE, "-f", "json", "--filter", "method=POST")
    assert code == 0 and json.loads(out)["data"] == []


def test_query_csv_table_and_files(env, capsys, tmp_path):
    code, out, _ = q(env, capsys, "duration", *RANGE, "--format", "csv", "--window", "DAY")
    assert out.splitlines() == [
        "window_start,window_end,value",
        "2024-03-05T00:00:00Z,2024-03-06T00:00:00Z,1500.0",
        "2024-03-06T00:00:00Z,2024-03-07T00:00:00Z,500.0",
    ]
    utc_range = ("--from", "2024-03-05T00:00:00Z", "--to", "2024-03-07T00:00:00Z")
    code, out, _ = q(env, capsys, "duration", *utc_range, "-w", "DAY", "--tz", "America/Los_Angeles", "-g", "subject")
    # T, T+1m, T+1h fall on 4 March in Los Angeles, T+1d on 5 March: 300 and 100 per subject
    assert code == 0 and "10 row(s)" in out
    assert "2024-03-04 00:00-08:00   2024-03-05 00:00-08:00   customer-5     300" in out
    assert_fits(out)
    target = tmp_path / "out.parquet"
    code, _, err = q(env, capsys, "duration", *RANGE, "-f", "parquet", "--out", target, "-w", "HOUR")
    assert code == 0 and "wrote 3 row(s)" in err
    assert pl.read_parquet(target)["value"].to_list() == [1000.0, 500.0, 500.0]
    code, _, err = q(env, capsys, "duration", *RANGE, "-f", "parquet")
    assert code == 2 and "needs --out" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope", *RANGE], "unknown meter 'nope'"),
        (["duration", "--from", "2024-13-01", "--to", "2024-03-07"], "not a valid date"),
        (["duration", "--from", "March 5", "--to", "2024-03-07"], "not RFC 3339"),
        (["duration", "--from", "2024-03-07", "--to", "2024-03-05"], "from must be before to"),
        (["duration", "--from", "2024-03-05", "--to", "2024-03-05"], "cannot be equal"),
        (["duration", *RANGE, "--group-by", "colour"], "invalid group by: 'colour'"),
        (["duration", *RANGE, "--filter", "method"], "not KEY=VALUE"),
        (["duration", *RANGE, "--tz", "Europe/Nowhere"], "invalid time zone"),
        (["duration", *RANGE, "--window", "YEAR"], "invalid window size"),
        (["duration", *RANGE, "--format", "xml"], "--format"),
    ],
)
def test_query_mistakes_are_one_line_exit_2(env, capsys, args, message):
    code, out, err = q(env, capsys, *args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert out == ""


def test_query_missing_root_is_exit_3(env, capsys, tmp_path):
    code, _, err = cli(capsys, "query", "duration", *RANGE, "--root", tmp_path / "nowhere", "--meters", env["meters"])
    assert code == 3 and "does not exist" in err


# --- validate -----------------------------------------------------------------------------------------
def test_validate_lists_every_problem_with_line_and_hint(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        textwrap.dedent(
            """\
            meters:
              - slug: Tokens-Total
                eventType: prompt
                aggregation: SUMM
              - slug: ok_meter
                eventType: prompt
                aggregation: COUNT
                valueProperty: $.x
                colour: blue
            """
        )
    )
    code, out, err = cli(capsys, "validate", bad)
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert lines[0] == f"{bad}: 4 problem(s)"
    assert "line 2:" in lines[1] and "e.g. tokens_total" in lines[1]
    assert "line 4:" in lines[2] and "must be one of SUM, COUNT" in lines[2]
    assert any("line 8:" in line and "not allowed when the aggregation is COUNT" in line for line in lines)
    assert any("line 9:" in line and "unknown field" in line for line in lines)
    code, out, _ = cli(capsys, "validate", tmp_path / "missing.yaml")
    assert code == 2


# --- preview, quarantine, status, report ------------------------------------------------------------
def test_preview(env, capsys, tmp_path):
    sample = tmp_path / "sample.jsonl"
    sample.write_bytes(
        jsonl(
            [
                event("a", "2024-04-01T00:00:00Z", type="request", data={"duration_ms": 7, "method": "PUT"}),
                event("b", "2024-04-01T00:00:00Z", type="request", data={}),
                event("c", "no time", type="request"),
            ]
        )
    )
    changed = tmp_path / "meters.yaml"
    changed.write_text(METERS_YAML.replace("$.method", "$.verb"))
    code, out, err = cli(capsys, "preview", changed, sample, "--root", env["root"])
    assert code == 0, err
    assert "2 valid event(s), 1 record(s) rejected" in out
    assert "changed or new since the last run: duration" in out
    assert "meter missing_value meter=duration id=b" in out and "bad_time" in out
    assert "sample.jsonl:2\n" in out and "sample.jsonl:3\n" in out  # long paths keep their end
    assert_fits(out)
    code, _, err = cli(capsys, "preview", changed, tmp_path / "nope.jsonl")
    assert code == 2 and "file not found" in err


def test_quarantine(env, capsys):
    code, out, err = cli(capsys, "quarantine", "--root", env["root"])
    assert code == 0, err
    assert "2 rejected record(s)" in out
    assert "envelope malformed_json\n    at landing/b1.jsonl:22\n" in out
    assert "meter bad_value meter=duration id=bad\n    at landing/b1.jsonl:21\n" in out
    assert_fits(out)
    code, out, _ = cli(capsys, "quarantine", "--root", env["root"], "--reason", "bad_value", "--limit", "0")
    assert "1 rejected record(s)" in out and "first" not in out
    code, _, err = cli(capsys, "quarantine", "--root", env["root"], "--reason", "nonsense")
    assert code == 2 and "unknown reason" in err
    code, _, err = cli(capsys, "quarantine", "--root", env["root"], "--since", "01/02/2024")
    assert code == 2 and "not a date" in err


def test_status(env, capsys):
    code, out, err = cli(capsys, "status", "--root", env["root"], "--meters", env["meters"])
    assert code == 0, err
    assert "lock: free" in out and "landing: no batches waiting" in out
    assert "newest event: 2024-03-06T00:00:00Z" in out
    assert "duration" in out and "2024-03-01" in out and "unchanged" in out and "stale" not in out
    assert_fits(out)


def test_report(env, capsys, tmp_path):
    pytest.importorskip("plotly")
    target = tmp_path / "r.html"
    code, out, err = cli(
        capsys,
        "report",
        "duration",
        "--period",
        "2024-03",
        "--out",
        target,
        "--root",
        env["root"],
        "--meters",
        env["meters"],
    )
    assert code == 0, err
    assert "opens without network" in out
    assert 'id="daily-usage"' in target.read_text()
    code, _, err = cli(
        capsys, "report", "duration", "--period", "2024-05", "--root", env["root"], "--meters", env["meters"]
    )
    assert code == 2 and "no published period '2024-05'" in err


@pytest.mark.parametrize("command", ["query", "preview", "quarantine", "status", "report", "validate"])
def test_help_has_an_example_and_fits(capsys, monkeypatch, command):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = cli(capsys, command, "--help")
    assert code == 0 and f"Example: meterlake {command}" in out
    assert_fits(out)


def test_docs_list_every_command_and_exit_code():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    for command in ("query", "preview", "quarantine", "status", "report", "validate"):
        assert f"meterlake {command}" in doc
    for code in ("| 0 ", "| 1 ", "| 2 ", "| 3 ", "| 4 "):
        assert code in doc
