"""The operator commands of `meterlake` (query, validate, preview, quarantine, status, report) through main().

Checks exit codes (0 ok, 2 user mistake, 3 storage, 4 lock, 141 closed pipe), one-line errors without tracebacks,
output width, and `--help` examples; also the checks `run`, `backfill` and `serve` make before any work (roots,
endpoints, dates, cron, Dask scheduler, lock file), that SIGTERM releases a run's lock as Ctrl-C does, and that
a closed standard output (`| head -1`) ends a command quietly.
"""

from __future__ import annotations

import errno
import importlib.util
import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import pytest

import flows.storage as storage_module
from flows import tools
from flows.cli import main
from flows.storage import RetryPolicy, Storage

from fixtures_s3 import closed_port
from support import event, jsonl, land, local_root, meterset, run

REPO = Path(__file__).resolve().parents[2]

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


def test_out_dash_is_standard_output(env, tmp_path):
    """`--out -` pipes the result (Parquet included) instead of creating a file named '-'."""
    base = [*RANGE, "-w", "HOUR", "--root", env["root"], "--meters", env["meters"]]
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "query", "duration", *base, "-f", "parquet", "--out", "-"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""  # no "wrote ... to -" line
    assert pl.read_parquet(io.BytesIO(proc.stdout))["value"].to_list() == [1000.0, 500.0, 500.0]
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "query", "duration", *base, "-f", "csv", "-o", "-"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.splitlines()[1:] == [
        "2024-03-05T00:00:00Z,2024-03-05T01:00:00Z,1000.0",
        "2024-03-05T01:00:00Z,2024-03-05T02:00:00Z,500.0",
        "2024-03-06T00:00:00Z,2024-03-06T01:00:00Z,500.0",
    ]
    assert list(tmp_path.iterdir()) == []


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


@pytest.mark.parametrize("command", [["run"], ["backfill", "--from", "2024-03-01", "--to", "2024-04-01"]])
def test_read_only_root_is_one_line_exit_3(env, capsys, tmp_path, monkeypatch, command):
    """A root on a read-only filesystem (a read-only mount or volume) refuses the first write with EROFS, which is
    not a PermissionError: it ended `run` and `backfill` as an 'unexpected OSError', exit 1."""
    root = tmp_path / "root"
    (root / "landing").mkdir(parents=True)
    (root / "landing" / "b1.jsonl").write_bytes(jsonl([event("e1", "2024-03-05T00:00:00Z", type="request")]))
    real = os.makedirs

    def read_only(name, *args, **kwargs):  # what a read-only mount answers to the run's first write
        if str(name).startswith(str(root)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(name))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", read_only)
    code, out, err = cli(capsys, *command, "--root", root, "--meters", env["meters"])
    assert code == 3, err
    assert err.startswith("error: access denied: ") and "Read-only file system" in err, err
    assert len(err.strip().splitlines()) == 1 and out == "", err


# --- validate -----------------------------------------------------------------------------------------
def test_validate_of_a_valid_file_fits_and_names_every_meter(capsys):
    code, out, err = cli(capsys, "validate", REPO / "data" / "meters.yaml")
    assert code == 0, err
    assert "18 meters OK" in out
    for slug in ("gpu_execution_duration_seconds", "pod_execution_time", "pod_duration_latest"):
        assert slug in out
    assert_fits(out.split("\n", 1)[1])  # the first line names the file, as long as its path


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
def test_a_meters_file_with_many_problems_is_one_line_in_run(capsys, tmp_path):
    # validate lists them all; every other command says how many more there are, on the same one line
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "meters:\n" + "".join(f"  - slug: m{i}\n    eventType: t\n    aggregation: SUMM\n" for i in range(7))
    )
    (tmp_path / "root").mkdir()
    code, out, err = cli(capsys, "run", "--root", tmp_path / "root", "--meters", bad)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.count("must be one of SUM") == 5 and f"and 2 more (run `meterlake validate {bad}`)" in err


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
    # a backfill needs --from/--to: point at the command status prints, not at a bare `backfill --meter SLUG`
    assert "`meterlake status` prints the command" in " ".join(out.split())
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
    code, out, _ = cli(capsys, "quarantine", "--root", env["root"], "--meter", "durration")  # a typo
    assert code == 0 and out.splitlines() == [
        "quarantine is empty for this selection",
        "meters with excluded values: duration",
    ]
    for since in ("01/02/2024", "20240102"):
        code, _, err = cli(capsys, "quarantine", "--root", env["root"], "--since", since)
        assert code == 2 and "not a date" in err


def test_status(env, capsys):
    code, out, err = cli(capsys, "status", "--root", env["root"], "--meters", env["meters"])
    assert code == 0, err
    assert "lock: free" in out and "landing: no batches waiting" in out
    assert "newest event: 2024-03-06T00:00:00Z" in out
    assert "duration" in out and "2024-03-01" in out and "unchanged" in out and "stale" not in out
    assert_fits(out)


def test_status_keeps_run_ids_whole(capsys, tmp_path):
    """A backfill row widens the `kind` column; the run ids (names of `_state/runs/<run>.json`) must not fold."""
    import datetime as dt

    from flows import pipeline

    storage = local_root(tmp_path)
    meters_file = tmp_path / "meters.yaml"
    meters_file.write_text(METERS_YAML)
    land(storage, "b1.jsonl", jsonl([event("1", "2024-03-05T00:00:00Z", type="request", data={"duration_ms": 1})]))
    run(storage, meterset(METERS_YAML))
    pipeline.backfill(storage, meterset(METERS_YAML), dt.date(2024, 3, 1), dt.date(2024, 4, 1), log=lambda _: None)
    code, out, err = cli(capsys, "status", "--root", storage.root, "--meters", str(meters_file))
    assert code == 0, err
    for record in storage.list_files("_state/runs"):
        run_id = record.path.rsplit("/", 1)[-1].removesuffix(".json")
        assert run_id in out, out
    assert_fits(out)


def test_status_quarantine_and_preview_keep_meter_names_whole(capsys, tmp_path, monkeypatch):
    """Slugs are names users copy into `--meter`: folded mid-word at 80 columns they were wrong when pasted. An
    interrupted run has no counts or duration: '-', not 'null'."""
    from flows import state

    monkeypatch.setenv("COLUMNS", "80")
    slug = "gpu_execution_duration_seconds_total_by_model"
    yaml = METERS_YAML.replace("slug: duration", f"slug: {slug}")
    storage = local_root(tmp_path)
    meters_file = tmp_path / "meters.yaml"
    meters_file.write_text(yaml)
    events = [
        event("1", "2024-03-05T00:00:00Z", type="request", data={"duration_ms": 1, "method": "GET"}),
        event("2", "2024-03-05T00:00:00Z", type="request", data={"duration_ms": "many"}),
    ]
    land(storage, "b1.jsonl", jsonl(events))
    run(storage, meterset(yaml))
    state.write_pending(storage, state.Pending(run_id="20240306T000000Z-abcdef"))
    code, out, err = cli(capsys, "status", "--root", storage.root, "--meters", str(meters_file))
    assert code == 0, err
    assert slug in out
    interrupted = next(line for line in out.splitlines() if "20240306T000000Z-abcdef" in line)
    assert "interrupted" in interrupted and "null" not in interrupted and "-" in interrupted.split("interrupted")[1]
    code, out, err = cli(capsys, "quarantine", "--root", storage.root)
    assert code == 0 and slug in out, err
    sample = tmp_path / "sample.jsonl"
    sample.write_bytes(jsonl(events))
    code, out, err = cli(capsys, "preview", str(meters_file), str(sample))
    assert code == 0 and slug in out, err
    assert_fits(out)


def test_a_meter_name_kept_whole_never_splits_a_number_or_drops_a_column(capsys, tmp_path, monkeypatch):
    """A slug may have 64 characters. Kept whole at 80 columns, it squeezed the other columns to a character or
    two: a count of 1234 printed as '123' over '4', dates one character a line, and preview's counts gone. Where
    the name cannot stay whole beside readable columns it folds; numbers never do."""
    import re

    monkeypatch.setenv("COLUMNS", "80")
    slug = ("gpu_execution_duration_seconds_total_by_model_and_region_" + "x" * 20)[:64]
    yaml = METERS_YAML.replace("slug: duration", f"slug: {slug}")
    storage = local_root(tmp_path)
    meters_file = tmp_path / "meters.yaml"
    meters_file.write_text(yaml)
    good = event("1", "2024-03-05T00:00:00Z", type="request", data={"duration_ms": 1, "method": "GET"})
    bad = [event(f"b{i}", "2024-03-05T00:00:00Z", type="request", data={"duration_ms": "n/a"}) for i in range(1234)]
    land(storage, "b1.jsonl", jsonl([good, *bad]))
    run(storage, meterset(yaml))
    code, out, err = cli(capsys, "quarantine", "--root", storage.root)
    assert code == 0, err
    assert any("bad_value" in line and line.split()[-1] == "1234" for line in out.splitlines()), out
    code, out, err = cli(capsys, "status", "--root", storage.root, "--meters", str(meters_file))
    assert code == 0, err
    assert re.search(r" 1 +2024-03-01 +2024-03-01 +unchanged", out), out
    sample = tmp_path / "sample.jsonl"
    sample.write_bytes(jsonl([good, *bad]))
    code, out, err = cli(capsys, "preview", str(meters_file), str(sample))
    assert code == 0, err
    assert re.search(r" SUM +1235 +1234 +1 +1\b", out), out
    assert_fits(out)


@pytest.mark.parametrize("name", ["root", "root [bold]x"])  # quoted for the shell, and no markup for rich
def test_status_names_the_backfill_that_rebuilds_a_stale_meter(capsys, tmp_path, name):
    """The command status prints for a stale meter runs as printed (pasted into a shell, however long the paths:
    folded at 80 columns it lost its --root and --meters) and leaves nothing stale."""
    import shlex

    storage = local_root(tmp_path, name)
    meters_file = tmp_path / "meters.yaml"
    meters_file.write_text(METERS_YAML)
    days = ["2024-02-28T23:00:00Z", "2024-03-05T00:00:00Z"]
    land(
        storage,
        "b1.jsonl",
        jsonl([event(f"e{i}", t, type="request", data={"duration_ms": 1}) for i, t in enumerate(days)]),
    )
    run(storage, meterset(METERS_YAML))
    meters_file.write_text(METERS_YAML.replace("$.duration_ms", "$.ms"))
    code, out, err = cli(capsys, "status", "--root", storage.root, "--meters", str(meters_file))
    assert code == 0, err
    # as a shell reads it when pasted: a line ends the command unless it ends in a backslash
    pasted = [line for line in out.replace("\\\n", "").splitlines() if "meterlake backfill" in line]
    assert len(pasted) == 1, out
    words = shlex.split(pasted[0])
    assert words[:2] == ["meterlake", "backfill"], out
    command = shlex.join(words[1:])
    assert "--from 2024-02-28 --to 2024-03-06" in command and "--meter duration" in command
    assert "--root" in words and words[words.index("--root") + 1] == storage.root, out
    assert "--meters" in words and words[words.index("--meters") + 1] == str(meters_file), out
    alone = {shlex.quote(storage.root), shlex.quote(str(meters_file))}  # a word longer than a line stands alone
    assert_fits("\n".join(line for line in out.splitlines() if line.strip().removesuffix(" \\") not in alone))
    code, _, err = cli(capsys, *words[1:])
    assert code == 0, err
    code, out, err = cli(capsys, "status", "--root", storage.root, "--meters", str(meters_file))
    assert code == 0 and "stale" not in out, out


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
    import typer.main

    from flows.cli import app

    commands = sorted(typer.main.get_command(app).commands)  # every command the app has, not a list kept by hand
    assert {"run", "backfill", "validate", "query", "quarantine", "serve"} <= set(commands)
    for command in commands:
        assert f"meterlake {command}" in doc, command
    for code in ("| 0 ", "| 1 ", "| 2 ", "| 3 ", "| 4 ", "| 141 "):
        assert code in doc


# --- storage roots and endpoints ----------------------------------------------------------------------
@pytest.fixture
def fake_aws(monkeypatch, tmp_path):
    """Fake keys and no AWS config files: nothing reaches a real AWS account or the instance metadata."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAMETERLAKETEST0001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("root", "message"),
    [
        ("", "storage root is empty"),
        ("  ", "storage root is empty"),
        ("gs://x", "unsupported storage root 'gs://x'"),
        ("http://x", "unsupported storage root 'http://x'"),
        ("ftp://x", "unsupported storage root 'ftp://x'"),
        ("s3://", "no bucket"),
        ("s3:///x", "no bucket"),
        ("s3://Bad_Bucket!/x", "'Bad_Bucket!' is not a valid bucket name"),
    ],
)
@pytest.mark.usefixtures("fake_aws")
def test_bad_root_is_one_line_exit_2(env, capsys, root, message):
    code, out, err = cli(capsys, "status", "--root", root, "--meters", env["meters"])
    assert code == 2, err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert out == ""


@pytest.mark.usefixtures("fake_aws")
def test_endpoint_without_scheme_is_exit_3(env, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "localhost:9000")
    code, _, err = cli(capsys, "status", "--root", "s3://bucket/x", "--meters", env["meters"])
    assert code == 3, err
    assert "'localhost:9000'" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.usefixtures("fake_aws")
def test_endpoint_that_is_not_s3_is_exit_3(env, capsys, monkeypatch):
    import http.server
    import threading

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    try:
        code, _, err = cli(capsys, "status", "--root", "s3://bucket/x", "--meters", env["meters"])
    finally:
        server.shutdown()
        server.server_close()
    assert code == 3, err
    assert endpoint in err and "not look like an S3 endpoint" in err and len(err.strip().splitlines()) == 1, err


STORAGE_COMMANDS = ["run", "status", "quarantine", "backfill", "query", "report"]


def storage_command_args(command: str, env) -> list[str]:
    """Arguments that get `command` (one of STORAGE_COMMANDS) as far as its first storage request."""
    meters = ["--meters", env["meters"]]
    return {
        "run": meters,
        "status": meters,
        "quarantine": [],
        "backfill": [*RANGE, *meters],
        "query": ["calls", *RANGE, *meters],
        "report": ["calls", "--period", "2024-03", *meters],
    }[command]


def storage_error_line(capsys, caplog, command: str, env) -> str:
    """Run `command` on s3://bucket/x; check that it exits 3 with nothing on standard output and no retry logged
    (one attempt), and return its one line on standard error."""
    with caplog.at_level(logging.WARNING, logger="meterlake.storage"):
        code, out, err = cli(capsys, command, *storage_command_args(command, env), "--root", "s3://bucket/x")
    assert code == 3, err
    assert out == "" and caplog.records == [], (out, caplog.records)
    assert len(err.splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize("command", STORAGE_COMMANDS)
@pytest.mark.usefixtures("fake_aws")
def test_an_endpoint_nothing_listens_on_is_one_line_exit_3_without_retries(env, capsys, caplog, monkeypatch, command):
    monkeypatch.setattr(storage_module, "DEFAULT_RETRY", RetryPolicy(attempts=8, first_delay=0.001, max_delay=0.001))
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    assert storage_error_line(capsys, caplog, command, env) == (
        f"error: cannot connect to S3 endpoint {endpoint} (Connection refused); "
        "check AWS_ENDPOINT_URL and that the service is running"
    )


def timed_command_line(endpoint: str, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """The real command line (a process of its own, default retries and timeouts) with AWS_ENDPOINT_URL=`endpoint`;
    the process and the seconds it took."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=REPO,
        env={**os.environ, "AWS_ENDPOINT_URL": endpoint},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc, time.monotonic() - started


@pytest.mark.usefixtures("fake_aws")
def test_an_endpoint_nothing_listens_on_fails_fast_from_the_command_line(env, tmp_path):
    """The real command line, with the default retry policy (which rides out ~20 s of trouble in a run)."""
    endpoint = f"http://127.0.0.1:{closed_port()}"
    proc, elapsed = timed_command_line(endpoint, "status", "--root", "s3://bucket/x", "--meters", env["meters"])
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: cannot connect to S3 endpoint {endpoint} (Connection refused); "
        "check AWS_ENDPOINT_URL and that the service is running"
    ]
    assert proc.stdout == ""
    assert elapsed < 15, elapsed  # it used to retry for ~20 s (process start and imports take 2-3 s, more when loaded)


@pytest.mark.parametrize("command", STORAGE_COMMANDS)
@pytest.mark.usefixtures("fake_aws")
def test_an_endpoint_that_never_answers_is_one_line_exit_3_without_retries(
    env, capsys, caplog, monkeypatch, silent_endpoint, command
):
    monkeypatch.setattr(storage_module, "PROBE_READ_TIMEOUT", 0.3)  # 10 s for real: the next test
    monkeypatch.setenv("AWS_ENDPOINT_URL", silent_endpoint.url)
    assert storage_error_line(capsys, caplog, command, env) == (
        f"error: S3 endpoint {silent_endpoint.url} accepted the connection but did not answer within 0.3 s; "
        "check AWS_ENDPOINT_URL and that the service is healthy"
    )
    assert silent_endpoint.accepted == 1


@pytest.mark.usefixtures("fake_aws")
def test_an_endpoint_that_never_answers_fails_fast_from_the_command_line(env, silent_endpoint):
    """The real command line, with the real timeouts: it used to wait for 8 attempts of s3fs's 5 tries of 15 s
    (635 s measured), and now waits for one 10 s read timeout."""
    proc, elapsed = timed_command_line(silent_endpoint.url, "run", "--root", "s3://bucket/x", "--meters", env["meters"])
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: S3 endpoint {silent_endpoint.url} accepted the connection but did not answer within 10 s; "
        "check AWS_ENDPOINT_URL and that the service is healthy"
    ]
    assert proc.stdout == "" and silent_endpoint.accepted == 1
    assert elapsed < 30, elapsed  # 10 s and the process's start (2-3 s; more on a loaded machine)


# --- serve checks its options before serving ----------------------------------------------------------
@pytest.fixture
def prefect_logging():
    """Name it before `capsys`: Prefect's logging binds its console to the sys.stderr of the moment it is set
    up, here capsys's, and once capsys closes it every later log line of the session (the moto server's, in
    tests/flows/test_s3.py) prints a logging error. Torn down after capsys, this sets it up again."""
    yield
    from prefect.logging.configuration import setup_logging

    setup_logging(incremental=False)


@pytest.fixture
def no_serving(monkeypatch):
    """Replace Prefect's serve: these tests check what happens before it (and must never block in it)."""
    import prefect

    calls = []
    monkeypatch.setattr(prefect, "serve", lambda *deployments, **_: calls.append(deployments))
    return calls


def test_serve_refuses_a_missing_root(env, prefect_logging, capsys, tmp_path, no_serving):
    typo = tmp_path / "typo_root"
    code, _, err = cli(capsys, "serve", "--root", typo, "--meters", env["meters"])
    assert code == 3 and "does not exist" in err, err
    assert not typo.exists() and no_serving == []


def test_serve_refuses_a_bad_cron(env, prefect_logging, capsys, no_serving):
    code, _, err = cli(capsys, "serve", "--root", env["root"], "--meters", env["meters"], "--cron", "bad cron")
    assert code == 2, err
    assert err.startswith("error: --cron") and "'bad cron'" in err and len(err.strip().splitlines()) == 1, err
    assert no_serving == []
    code, _, err = cli(capsys, "serve", "--root", env["root"], "--meters", env["meters"], "--cron", "5 * * * *")
    assert code == 0, err
    assert len(no_serving) == 1


# --- dates outside what event times can hold ----------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ["query", "duration", "--from", "2024-01-01", "--to", "2300-01-01"],
        ["query", "duration", "--from", "0001-01-01", "--to", "2024-01-01"],
        ["query", "duration", "--from", " 0001-01-01", "--to", "2024-01-01", "--tz", "Asia/Tokyo"],
        ["query", "duration", "--from", "2024-01-01T00:00:00Z", "--to", "2262-06-01T00:00:00Z"],
        ["backfill", "--from", "0001-01-01", "--to", "9999-12-31"],
        ["backfill", "--from", "2024-01-01", "--to", "2262-01-02"],
        ["quarantine", "--since", "0001-01-01"],
    ],
)
def test_dates_outside_1678_2261_are_one_line_exit_2(env, capsys, tmp_path, args):
    root = local_root(tmp_path)  # a backfill would take the lock: never the shared root
    code, _, err = cli(
        capsys, *args, "--root", root.root, *(["--meters", env["meters"]] if args[0] != "quarantine" else [])
    )
    assert code == 2, err
    assert "1678" in err and "2261" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "root" / "_state").exists()


def test_dates_at_the_edges_of_the_range_are_accepted(env, capsys):
    code, out, err = q(env, capsys, "duration", "--from", "1678-01-01", "--to", "2262-01-01", "-f", "json")
    assert code == 0, err
    assert json.loads(out)["data"][0]["value"] == 2000.0


def test_report_period_must_be_a_real_month(env, capsys):
    pytest.importorskip("plotly")
    for period, message in (("2024-13", "not a valid month"), ("2024-02-30", "not a valid date")):
        code, _, err = cli(
            capsys, "report", "duration", "--period", period, "--root", env["root"], "--meters", env["meters"]
        )
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


# --- a closed standard output (`meterlake ... | head -1`) ----------------------------------------------
@pytest.fixture(scope="module")
def long_output(env, tmp_path_factory) -> list[str]:
    """--root and --meters of a root with 3000 rejected records and an event in each minute of two days: every
    listing below prints far more than a pipe holds (64 KiB), so the command is still writing when the reader
    goes away."""
    storage = local_root(tmp_path_factory.mktemp("long"))
    minutes = [f"2024-03-0{5 + i // 1440}T{i // 60 % 24:02d}:{i % 60:02d}:00Z" for i in range(2 * 1440)]
    events = [event(f"e{i}", t, type="request", data={"duration_ms": i}) for i, t in enumerate(minutes)]
    land(storage, "b1.jsonl", jsonl([*events, *["not json"] * 3000]))
    run(storage, meterset(METERS_YAML))
    return ["--root", storage.root, "--meters", env["meters"]]


def _environ(unbuffered: bool) -> dict[str, str]:
    """This process's environment, with PYTHONUNBUFFERED set only when asked (this machine sets it)."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return {**environ, "PYTHONUNBUFFERED": "1"} if unbuffered else environ


def _cut_short(args: list[str], script: str | None = None, unbuffered: bool = False) -> tuple[int, bytes, bytes]:
    """Run the command line with standard output a pipe whose reader closes it after the first line."""
    command = [sys.executable, "-c", script] if script else [sys.executable, "-m", "flows.cli"]
    proc = subprocess.Popen(
        [*command, *args], cwd=REPO, env=_environ(unbuffered), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        first = proc.stdout.readline()
        proc.stdout.close()
        err = proc.stderr.read()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, first, err


@pytest.mark.parametrize(
    "args",
    [
        ["quarantine", "--limit", "3000"],  # a rich table, then plain lines
        ["query", "calls", *RANGE, "-w", "MINUTE"],  # one large rich table
        ["query", "calls", *RANGE, "-w", "MINUTE", "-f", "csv"],  # one large write
    ],
    ids=["quarantine", "query-table", "query-csv"],
)
@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "PYTHONUNBUFFERED"])
def test_a_closed_pipe_ends_the_command_quietly(long_output, args, unbuffered):
    """The command stops without a word and exits 141 (128 + SIGPIPE), as a Unix tool killed by SIGPIPE does:
    not 1, which would say it failed, nor 0 (unbuffered, a write cut short used to be dropped silently), and no
    'Exception ignored ... BrokenPipeError' at exit."""
    if args[0] == "quarantine":
        long_output = long_output[:2]  # quarantine takes no --meters
    code, first, err = _cut_short([*args, *long_output], unbuffered=unbuffered)
    assert first.strip()
    assert (code, err.decode()) == (141, "")


BROKEN_PIPE_ELSEWHERE = """
import sys
sys.path.insert(0, {repo!r})
from flows import tools

def broken(*args, **kwargs):  # as if a pipe to another process broke: standard output is fine
    raise BrokenPipeError(32, "Broken pipe")

tools.quarantine_counts = broken
from flows.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "PYTHONUNBUFFERED"])
def test_a_command_started_without_standard_output_still_succeeds(env, unbuffered):
    """Started with standard output closed (`>&-`, some daemons and cron setups), Python has no sys.stdout: the
    command's output goes nowhere, as before the closed-pipe handling, and the exit is 0, without a traceback."""
    environ = _environ(unbuffered)
    closed = 'exec "$0" -m flows.cli validate "$1" >&-'  # the shell closes standard output, then runs Python
    proc = subprocess.run(
        ["sh", "-c", closed, sys.executable, env["meters"]], cwd=REPO, env=environ, stderr=subprocess.PIPE, timeout=120
    )
    assert (proc.returncode, proc.stderr.decode()) == (0, "")


def test_a_broken_pipe_other_than_standard_output_is_an_error(long_output):
    code, _, err = _cut_short(["quarantine", *long_output[:2]], BROKEN_PIPE_ELSEWHERE.format(repo=str(REPO)))
    assert code == 1, err
    assert err.decode().splitlines() == [
        "error: unexpected RuntimeError: broken pipe: [Errno 32] Broken pipe (set METERLAKE_DEBUG=1 for a traceback)"
    ]


def _into_a_closed_pipe(
    args: list[str], closed: tuple[str, ...] = ("stdout",), unbuffered: bool = False, cwd: Path = REPO
) -> tuple[int, bytes, bytes]:
    """Run the command line with the `closed` streams a pipe whose reader is gone before the command starts: the
    first write fails, however short the output (a reader that reads a line lets a short one all fit in the pipe)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    streams = {name: write_end if name in closed else subprocess.PIPE for name in ("stdout", "stderr")}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "flows.cli", *args],
            cwd=cwd,
            env={**_environ(unbuffered), "PYTHONPATH": str(REPO)},
            timeout=120,
            **streams,
        )
    finally:
        os.close(write_end)
    return proc.returncode, proc.stdout or b"", proc.stderr or b""


@pytest.mark.parametrize(
    "args",
    [["--help"], [], ["query", "--help"], ["serve", "--help"]],
    ids=["help", "no-command", "query-help", "serve-help"],
)
@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "PYTHONUNBUFFERED"])
def test_help_into_a_closed_pipe_ends_quietly(args, unbuffered):
    """`meterlake --help | true`: Typer writes the help with a rich console, whose own broken-pipe handling ended
    the process with a silent exit 1 before the command line's could say 141."""
    code, _, err = _into_a_closed_pipe(args, unbuffered=unbuffered)
    assert (code, err.decode()) == (141, "")


def test_backfill_into_a_closed_pipe_commits_then_ends_quietly(env, tmp_path):
    """backfill prints its summary inside its progress bar, whose rich console ended it with exit 1."""
    storage = local_root(tmp_path)
    land(storage, "b1.jsonl", jsonl([event("e1", "2024-03-05T00:00:00Z", type="request", data={"duration_ms": 5})]))
    run(storage, meterset(METERS_YAML))
    args = ["backfill", *RANGE, "--root", storage.root, "--meters", env["meters"]]
    code, _, err = _into_a_closed_pipe(args)
    assert (code, err.decode()) == (141, "")
    runs = tools.runs(storage, last=1).to_dicts()
    assert [(r["kind"], r["status"]) for r in runs] == [("backfill", "ok")]  # done before the summary was cut


@pytest.mark.parametrize(
    ("closed", "unbuffered"),
    [(("stderr",), False), (("stderr",), True), (("stdout", "stderr"), False)],
    ids=["stderr", "stderr-PYTHONUNBUFFERED", "stdout-and-stderr"],
)
@pytest.mark.parametrize("case", ["usage", "validate", "storage", "query-out"])
def test_a_closed_standard_error_loses_the_message_not_the_exit_code(env, tmp_path, case, closed, unbuffered):
    """A message that cannot be written to standard error (its reader gone) used to end the command with the
    traceback of that failure, itself unwritable: exit 1, or 120 when the flush at exit failed too. Now the
    message is lost and the exit code is the command's own."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("meters:\n  - slug: Bad\n")
    out = tmp_path / "q.csv"
    args, expected = {
        "usage": (["run", "--bogus"], 2),  # Click's error, printed by the command line's handler
        "validate": (["validate", str(bad)], 2),  # the problems, printed by the command itself
        "storage": (["status", "--root", str(tmp_path / "missing")], 3),
        "query-out": (["query", "duration", *RANGE, "-f", "csv", "-o", str(out), "--root", env["root"]], 0),
    }[case]
    if case == "query-out":
        args += ["--meters", env["meters"]]
    code, stdout, _ = _into_a_closed_pipe(args, closed, unbuffered)
    assert (code, stdout) == (expected, b"")
    assert case != "query-out" or out.read_text().startswith("window_start")  # its 'wrote ...' line is lost


# --- the run lock: SIGTERM releases it, a damaged lock file is reported -------------------------------
SLOW_RUN = """
import pathlib, sys, time
sys.path.insert(0, {repo!r})
from flows import pipeline

def waiting(storage):  # the run holds the lock and waits here until it is stopped
    pathlib.Path({ready!r}).touch()
    time.sleep(60)
    raise SystemExit("not stopped")

pipeline.find_new_batches = waiting
from flows.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stopping_a_run_releases_the_lock(env, capsys, tmp_path, signum):
    root = local_root(tmp_path)
    lock, ready = Path(root.path("_state/lock.json")), tmp_path / "ready"
    script = SLOW_RUN.format(repo=str(REPO), ready=str(ready))
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "run", "--root", root.root, "--meters", env["meters"]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (lock.exists() and ready.exists()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never took the lock"
            time.sleep(0.02)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if signum == signal.SIGTERM:  # stopped as by Ctrl-C, with the conventional code 128 + 15
        assert proc.returncode == 143 and err.strip() == "meterlake: stopped by SIGTERM", err
    else:
        assert proc.returncode == 130 and "Traceback" not in err, err
    assert not lock.exists()
    code, _, err = cli(capsys, "run", "--root", root.root, "--meters", env["meters"])
    assert code == 0, err


INTERRUPT_TURNED_INTO_ANOTHER_ERROR = """
import sys
sys.path.insert(0, {repo!r})
from flows import pipeline

def interrupted(storage):  # what Prefect's task engine does with a Ctrl-C while it starts a task run
    try:
        raise KeyboardInterrupt
    except BaseException:
        raise ValueError("Task run is not set")

pipeline.find_new_batches = interrupted
from flows.cli import main
sys.exit(main(sys.argv[1:]))
"""


CTRL_C_LOST_IN_NATIVE_CODE = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from flows import pipeline

found = pipeline.find_new_batches

def swallowed(storage):  # what a Python callback called from Polars' native code does with a Ctrl-C
    try:
        os.kill(os.getpid(), signal.SIGINT)
    except KeyboardInterrupt:
        pass
    return found(storage)

pipeline.find_new_batches = swallowed
from flows.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run_patched(script: str, env, tmp_path) -> tuple[subprocess.CompletedProcess[str], Storage]:
    """`meterlake run` on a fresh root in a process of its own, with `script` patching the pipeline first."""
    root = local_root(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", script.format(repo=str(REPO)), "run", "--root", root.root, "--meters", env["meters"]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc, root


def test_a_ctrl_c_lost_in_native_code_still_ends_the_command_with_130(env, tmp_path):
    # Seen in CI: a Ctrl-C landing in a Python callback of Polars' JSONL reader was ignored ('Exception ignored in:
    # DataTypeClass ... KeyboardInterrupt'), the run went on to the end and the command exited 0.
    proc, _ = _run_patched(CTRL_C_LOST_IN_NATIVE_CODE, env, tmp_path)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "meterlake: stopped by Ctrl-C (after its work had finished)"


def test_ctrl_c_that_a_library_turned_into_another_error_is_still_130(env, tmp_path):
    # Seen in CI: Ctrl-C while Prefect started a task run came back as 'unexpected ValueError: Task run is not
    # set', exit 1, instead of the 130 of every other Ctrl-C.
    proc, root = _run_patched(INTERRUPT_TURNED_INTO_ANOTHER_ERROR, env, tmp_path)
    assert proc.returncode == 130 and "unexpected" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not Path(root.path("_state/lock.json")).exists()


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b'{"run_id": "r1", "host": "h", "pid": 1}',
        b'{"run_id": "r1", "expires_at": "2030-01-01T00:00:00"}',
        b'{"run_id": "r1", "expires_at": "soon"}',
        b"[]",
    ],
)
def test_damaged_lock_file(env, capsys, tmp_path, body):
    root = local_root(tmp_path)
    root.write_bytes("_state/lock.json", body)
    for command in (["run"], ["backfill", "--from", "2024-01-01", "--to", "2024-02-01"]):
        code, _, err = cli(capsys, *command, "--root", root.root, "--meters", env["meters"])
        assert code == 4, err
        assert "_state/lock.json is unreadable" in err and "delete it" in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    code, out, err = cli(capsys, "status", "--root", root.root, "--meters", env["meters"])
    assert code == 0, err
    assert "lock: the run lock " in out and "is unreadable" in " ".join(out.split())
    assert "landing: no batches waiting" in out and "newest event: none" in out
    assert root.read_bytes("_state/lock.json") == body  # reported, never removed behind the user's back


def test_backfill_writes_only_its_summary_to_standard_output(env, capsys, tmp_path):
    # The progress bar belongs on a terminal's standard error: off a terminal it must not leave a blank line in
    # standard output, neither after the summary nor (before any summary) when another run holds the lock.
    root = local_root(tmp_path)
    land(root, "b1.jsonl", jsonl([event("e1", "2024-03-05T00:00:00Z", type="request", data={"duration_ms": 1})]))
    run(root, meterset(METERS_YAML))
    backfill = [
        "backfill",
        "--from",
        "2024-03-01",
        "--to",
        "2024-04-01",
        "--root",
        root.root,
        "--meters",
        env["meters"],
    ]
    code, out, err = cli(capsys, *backfill)
    assert code == 0, err
    assert out.startswith("run ") and out.endswith("rows\n") and "\n\n" not in out, out
    held = {"run_id": "r1", "host": "h", "pid": 1, "expires_at": "2999-01-01T00:00:00+00:00"}
    root.write_bytes("_state/lock.json", json.dumps(held).encode())
    code, out, err = cli(capsys, *backfill)
    assert code == 4 and out == "", (out, err)
    assert len(err.strip().splitlines()) == 1, err


def _stderr_on_a_terminal(args: list[str]) -> tuple[int, str, str]:
    """Run the command line with standard error a terminal (a pseudo-terminal) and standard output a pipe, as
    `meterlake backfill ... > summary.txt` typed at a terminal does."""
    import pty

    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=terminal,
    )
    os.close(terminal)
    err = b""
    try:
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the process closed its end
                break
            if not chunk:
                break
            err += chunk
        out = proc.stdout.read()
        proc.wait(timeout=120)
    finally:
        os.close(controller)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out.decode(), err.decode(errors="replace")


def test_backfill_summary_goes_to_standard_output_while_the_bar_is_on_a_terminal(env, tmp_path):
    # With standard error a terminal the bar is shown there; rich's live display then sends whatever is written to
    # standard output meanwhile to its own console, standard error: `backfill ... > summary.txt` left the file empty.
    root = local_root(tmp_path)
    land(root, "b1.jsonl", jsonl([event("e1", "2024-03-05T00:00:00Z", type="request", data={"duration_ms": 1})]))
    run(root, meterset(METERS_YAML))
    code, out, err = _stderr_on_a_terminal(["backfill", *RANGE, "--root", root.root, "--meters", env["meters"]])
    assert code == 0, err
    assert out.startswith("run ") and "(backfill)" in out and out.endswith("rows\n"), (out, err)
    assert "(backfill)" not in err, err
    assert "backfill" in err  # the bar itself


# --- usage errors are one line ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--bogus"], "error: No such option: --bogus (see meterlake run --help)"),
        (["query"], "error: Missing argument 'slug'. (see meterlake query --help)"),
        (["validate", "a.yaml", "b.yaml"], "error: Got unexpected extra argument(s) (b.yaml)"),
        (["run", "--workers", "abc"], "error: Invalid value for '--workers'"),
        (["nosuch"], "error: No such command 'nosuch'. (see meterlake --help)"),
        (["preview", "m.yaml", "e.jsonl", "--rows", "-1"], "error: Invalid value for '--rows'"),
        (["preview", "m.yaml", "e.jsonl", "--limit", "-5"], "error: Invalid value for '--limit'"),
        (["status", "--last", "-1"], "error: Invalid value for '--last'"),
    ],
)
def test_usage_errors_are_one_line_exit_2(capsys, args, message):
    code, out, err = cli(capsys, *args)
    assert code == 2, err
    assert err.startswith(message) and len(err.strip().splitlines()) == 1, err
    assert "Usage:" not in err and out == ""


@pytest.mark.parametrize("command", [["run"], ["backfill", "--from", "2024-01-01", "--to", "2024-02-01"]])
@pytest.mark.parametrize("workers", ["0", "-1"])
def test_workers_below_one_is_refused_before_any_work(env, capsys, tmp_path, monkeypatch, command, workers):
    """`--workers 0` or `-1` is a bad option (exit 2) for `backfill` as for `run`: never a run without Dask (0)
    nor a flow run that asks Dask for a negative cluster (-1)."""
    import flows.prefect_flows as prefect_flows

    def started(**_):
        raise AssertionError("a flow run started")

    monkeypatch.setattr(prefect_flows, "run_hourly", started)
    monkeypatch.setattr(prefect_flows, "run_backfill", started)
    root = local_root(tmp_path)
    code, _, err = cli(capsys, *command, "--workers", workers, "--root", root.root, "--meters", env["meters"])
    assert code == 2, err
    assert err == "error: --workers must be at least 1\n"
    assert not root.exists("_state/runs")


def test_no_command_still_shows_help(capsys):
    code, out, err = cli(capsys)
    assert code == 2 and "Usage:" in out + err and "query" in out + err


def test_empty_time_zone_is_refused(env, capsys):
    code, _, err = q(env, capsys, "duration", *RANGE, "--tz", "")
    assert code == 2 and "--tz" in err and len(err.strip().splitlines()) == 1, err


# --- output files the user names ----------------------------------------------------------------------
def _unwritable(tmp_path, monkeypatch, kind: str) -> Path:
    if kind == "parent is a file":
        (tmp_path / "file").write_text("x")
        return tmp_path / "file" / "x.out"
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    if os.geteuid() == 0:  # root writes anywhere: make the write fail as it would for anyone else
        real = Path.write_bytes

        def denied(self, data):
            if self.parent == folder:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, data)

        monkeypatch.setattr(Path, "write_bytes", denied)
    return folder / "x.out"


@pytest.mark.parametrize("kind", ["parent is a file", "permission denied"])
def test_unwritable_out_file_is_one_line_exit_2(env, capsys, tmp_path, monkeypatch, kind):
    target = _unwritable(tmp_path, monkeypatch, kind)
    code, _, err = q(env, capsys, "duration", *RANGE, "-f", "csv", "-o", target)
    assert code == 2, err
    assert err.startswith(f"error: --out: cannot write {target}") and len(err.strip().splitlines()) == 1, err
    if importlib.util.find_spec("plotly"):
        code, _, err = cli(
            capsys,
            "report",
            "duration",
            "-p",
            "2024-03",
            "-o",
            target,
            "--root",
            env["root"],
            "--meters",
            env["meters"],
        )
        assert code == 2, err
        assert err.startswith(f"error: --out: cannot write {target}") and len(err.strip().splitlines()) == 1, err


# --- Dask ---------------------------------------------------------------------------------------------
def test_unreachable_dask_scheduler_is_one_line_exit_3(env, prefect_logging, capsys, monkeypatch):
    from flows import prefect_flows

    monkeypatch.setattr(prefect_flows, "DASK_CONNECT_TIMEOUT", 1.0)
    started = []
    monkeypatch.setattr(prefect_flows, "run_hourly", lambda **kwargs: started.append(kwargs) or {})
    code, _, err = cli(capsys, "run", "--root", env["root"], "--meters", env["meters"], "--dask", "tcp://127.0.0.1:9")
    assert code == 3, err
    assert err.startswith("error: Dask scheduler at tcp://127.0.0.1:9 unreachable"), err
    assert len(err.strip().splitlines()) == 1 and started == []


@pytest.mark.parametrize("value", ["20240101", "2024-W01-1", "2024-1-01", "2024-01-32", "01/02/2024", ""])
def test_backfill_dates_are_yyyy_mm_dd_only(env, capsys, tmp_path, value):
    # Python's fromisoformat also reads 20240101 and ISO week dates: a typo must not become another day.
    root = local_root(tmp_path)
    args = ("backfill", "--from", value, "--to", "2024-03-01", "--root", root.root, "--meters", env["meters"])
    code, _, err = cli(capsys, *args)
    assert code == 2 and err.strip() == f"error: --from: {value!r} is not a date; use YYYY-MM-DD, e.g. 2024-01-31"


# --- backfill options: the range, the meters named, what reaches the flow run -------------------------------
def test_backfill_range_that_ends_where_it_starts_is_one_line_exit_2_before_any_work(env, capsys, tmp_path):
    root = local_root(tmp_path)
    args = ("backfill", "--from", "2024-03-05", "--to", "2024-03-05", "--root", root.root, "--meters", env["meters"])
    code, out, err = cli(capsys, *args)
    assert (code, out, err) == (2, "", "error: --to (2024-03-05) must be after --from (2024-03-05)\n")
    assert not root.exists("_state/runs")


def test_backfill_of_an_unknown_meter_is_one_line_exit_2_before_any_work(env, capsys, tmp_path):
    root = local_root(tmp_path)
    code, out, err = cli(capsys, "backfill", *RANGE, "--meter", "nope", "--root", root.root, "--meters", env["meters"])
    assert (code, out) == (2, ""), err
    assert err == "error: unknown meter 'nope' (known: duration, calls)\n"
    assert not root.exists("_state/runs")


def test_backfill_of_one_meter_recomputes_that_meter_alone(env, capsys, tmp_path):
    root = local_root(tmp_path)
    land(root, "b1.jsonl", jsonl([event("e1", "2024-03-05T00:00:00Z", type="request", data={"duration_ms": 1})]))
    run(root, meterset(METERS_YAML))
    code, out, err = cli(capsys, "backfill", *RANGE, "--meter", "calls", "--root", root.root, "--meters", env["meters"])
    assert code == 0, err
    assert "meters recomputed 1," in out and "    calls: 1 period rows" in out, out
    assert "duration:" not in out, out


@pytest.fixture
def flow_runs(monkeypatch):
    """The command line's flow runs, recorded instead of started (no Prefect server, no Dask cluster)."""
    from flows import prefect_flows

    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(prefect_flows, "scheduler_problem", lambda address: None)
    monkeypatch.setattr(prefect_flows, "needs_api_url", lambda: False)
    monkeypatch.setattr(prefect_flows, "will_start_temporary_server", lambda: False)
    monkeypatch.setattr(prefect_flows, "run_hourly", lambda **kw: calls.append(("hourly", kw)) or {})
    monkeypatch.setattr(prefect_flows, "run_backfill", lambda **kw: calls.append(("backfill", kw)) or {})
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    return calls


@pytest.mark.parametrize(
    ("options", "dask", "workers"),
    [(["--workers", "2"], None, 2), (["--dask", "tcp://scheduler:8786"], "tcp://scheduler:8786", None)],
)
def test_dask_options_run_the_hourly_flow_with_them(env, capsys, tmp_path, flow_runs, options, dask, workers):
    root = local_root(tmp_path)
    code, _, err = cli(capsys, "run", *options, "--root", root.root, "--meters", env["meters"])
    assert code == 0, err
    assert flow_runs == [
        ("hourly", {"root": root.root, "meters": env["meters"], "dask_address": dask, "workers": workers})
    ]
    assert not root.exists("_state/runs")  # the plain run did not run instead


def test_backfill_options_reach_the_backfill_flow(env, capsys, tmp_path, flow_runs):
    import datetime as dt

    root = local_root(tmp_path)
    options = ["--meter", "calls", "--meter", "duration", "--reingest", "--workers", "3"]
    code, _, err = cli(capsys, "backfill", *RANGE, *options, "--root", root.root, "--meters", env["meters"])
    assert code == 0, err
    assert flow_runs == [
        (
            "backfill",
            {
                "dask_address": None,
                "workers": 3,
                "start": dt.date(2024, 3, 5),
                "end": dt.date(2024, 3, 7),
                "root": root.root,
                "meters": env["meters"],
                "meter": ["calls", "duration"],
                "reingest": True,
            },
        )
    ]
    flow_runs.clear()
    code, _, err = cli(capsys, "backfill", *RANGE, "--prefect", "--root", root.root, "--meters", env["meters"])
    assert code == 0, err
    assert [(kind, kw["meter"], kw["reingest"]) for kind, kw in flow_runs] == [("backfill", None, False)]


def test_prefect_api_url_makes_a_flow_run_the_default(env, capsys, tmp_path, flow_runs, monkeypatch):
    root = local_root(tmp_path)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    code, _, err = cli(capsys, "run", "--root", root.root, "--meters", env["meters"])
    assert code == 0 and [kind for kind, _ in flow_runs] == ["hourly"], err
    code, _, err = cli(capsys, "run", "--no-prefect", "--root", root.root, "--meters", env["meters"])
    assert code == 0 and [kind for kind, _ in flow_runs] == ["hourly"], err  # no second flow run: a plain one
    assert root.exists("_state/runs")


# --- report options -------------------------------------------------------------------------------------------
def test_report_top_default_file_and_standard_output(env, capsys, tmp_path, monkeypatch):
    pytest.importorskip("plotly")
    monkeypatch.chdir(tmp_path)
    where = ("--root", env["root"], "--meters", env["meters"])
    code, out, err = cli(capsys, "report", "duration", "--period", "2024-03", "--top", "2", *where)
    assert code == 0, err
    assert out.startswith("wrote report-duration-2024-03.html (") and out.endswith("KB, opens without network)\n")
    page = (tmp_path / "report-duration-2024-03.html").read_text()
    assert "Top 2 subjects" in page and "Top 5 subjects" not in page  # 5 subjects, 2 asked for
    assert "5 subject(s)" in page  # the count says how many there are, not how many are shown
    code, out, err = cli(capsys, "report", "duration", "--period", "2024-03", "--out", "-", *where)
    assert code == 0, err
    assert out.startswith("<!DOCTYPE html>") and "Top 5 subjects" in out and "wrote" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report-duration-2024-03.html"]
    code, out, err = cli(capsys, "report", "duration", "--period", "2024-03", "--top", "0", *where)
    assert (code, out, err) == (2, "", "error: --top must be 1 or more\n")


# --- preview and quarantine counts ----------------------------------------------------------------------------
def test_preview_rows_and_limit(env, capsys, tmp_path):
    sample = tmp_path / "sample.jsonl"
    sample.write_bytes(
        jsonl(
            [event(f"v{i}", "2024-04-01T00:00:00Z", type="request", subject=f"s{i}", data={}) for i in range(3)]
            + [event("ok", "2024-04-01T00:00:00Z", type="request", subject="s9", data={"duration_ms": 1})]
        )
    )

    def preview(rows: int, limit: int) -> list[str]:
        code, out, err = cli(capsys, "preview", env["meters"], sample, "--rows", rows, "--limit", limit)
        assert code == 0, err
        return [line.rstrip() for line in out.splitlines()]  # rich pads a table's title to the table's width

    lines = preview(4, 3)  # calls has 4 period rows, duration excludes 3 events: all shown, nothing said
    assert "calls: period rows" in lines and "excluded by a meter: 3" in lines, lines
    assert sum(line.startswith("  meter missing_value meter=duration") for line in lines) == 3
    lines = preview(1, 1)
    assert "calls: period rows (first 1 of 4)" in lines and "excluded by a meter: 3 (first 1)" in lines, lines
    calls = lines[lines.index("calls: period rows (first 1 of 4)") :]
    assert sum(line.startswith(" 2024-04-01") for line in calls) == 1, lines
    assert sum(line.startswith("  meter missing_value meter=duration") for line in lines) == 1


def test_quarantine_limit_below_zero_is_one_line_exit_2(env, capsys):
    code, out, err = cli(capsys, "quarantine", "--root", env["root"], "--limit", "-1")
    assert (code, out, err) == (2, "", "error: --limit must be 0 or more\n")


# --- status: waiting batches and a lock the next run takes over ---------------------------------------------
def test_status_shows_waiting_batches_and_an_expired_lock(env, capsys, tmp_path):
    root = local_root(tmp_path)
    body = jsonl([event("e1", "2024-03-05T00:00:00Z", type="request", data={"duration_ms": 1})])
    land(root, "a/b1.jsonl", body)
    held = {"run_id": "r1", "host": "elsewhere", "pid": 1, "expires_at": "2000-01-01T00:00:00+00:00"}
    root.write_bytes("_state/lock.json", json.dumps(held).encode())
    code, out, err = cli(capsys, "status", "--root", root.root, "--meters", env["meters"])
    assert code == 0, err
    assert f"landing: 1 batch(es) waiting ({len(body)} bytes), first landing/a/b1.jsonl" in out, out
    assert "lock: held by run r1 on elsewhere pid 1 (expired, the next run takes it over)" in " ".join(out.split())


def test_a_backfill_may_end_at_the_end_of_the_years_event_times_can_hold(env, capsys, tmp_path):
    root = local_root(tmp_path)
    args = ("--from", "2261-12-31", "--to", "2262-01-01", "--root", root.root, "--meters", env["meters"])
    code, out, err = cli(capsys, "backfill", *args)
    assert code == 0 and out.startswith("run "), err


# --- query: a filter without a key, files that cannot be, Parquet on a terminal, the table's title -------------
def test_a_filter_without_a_key_is_one_line_exit_2(env, capsys):
    code, out, err = q(env, capsys, "duration", *RANGE, "--filter", "=GET")
    assert (code, out) == (2, ""), err
    assert err == "error: --filter: '=GET' is not KEY=VALUE (e.g. --filter model=gpt-4)\n"


def test_out_that_is_a_folder_or_in_no_folder_is_named_as_such(env, capsys, tmp_path):
    code, _, err = q(env, capsys, "duration", *RANGE, "-f", "csv", "-o", tmp_path)
    assert (code, err) == (2, f"error: --out: {tmp_path} is a folder; give a file name\n")
    missing = tmp_path / "nowhere" / "x.csv"
    code, _, err = q(env, capsys, "duration", *RANGE, "-f", "csv", "-o", missing)
    assert (code, err) == (2, f"error: --out: folder {missing.parent} does not exist\n")
    assert list(tmp_path.iterdir()) == []


def test_parquet_to_a_terminal_is_refused(env, capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, out, err = q(env, capsys, "duration", *RANGE, "-f", "parquet", "-o", "-")
    assert (code, out) == (2, ""), err
    assert err.startswith("error: --format parquet --out -: standard output is a terminal")


def test_query_table_title_names_meter_range_window_and_zone(env, capsys):
    code, out, err = q(env, capsys, "duration", *RANGE, "-w", "DAY", "--tz", "Asia/Tokyo")
    assert code == 0, err
    assert " ".join(out.split()).startswith(
        "duration (SUM) [2024-03-05 00:00+09:00, 2024-03-07 00:00+09:00) window DAY, Asia/Tokyo "
    ), out


def test_a_meters_file_with_five_problems_names_them_all_without_a_tail(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "meters:\n" + "".join(f"  - slug: m{i}\n    eventType: t\n    aggregation: SUMM\n" for i in range(5))
    )
    (tmp_path / "root").mkdir()
    code, out, err = cli(capsys, "run", "--root", tmp_path / "root", "--meters", bad)
    assert (code, out) == (2, "")
    assert err.count("must be one of SUM") == 5 and "more" not in err, err


def test_serve_gives_both_deployments_its_options(env, prefect_logging, capsys, no_serving, monkeypatch):
    """The --cron asked for, the root, the meters file as an absolute path (a served run may start in another
    folder) and a concurrency limit of one that queues a run while another is active."""
    monkeypatch.chdir(env["base"])
    code, _, err = cli(capsys, "serve", "--root", env["root"], "--meters", "meters.yaml", "--cron", "0 */2 * * *")
    assert code == 0, err
    ((hourly, backfill),) = no_serving
    params = {"root": env["root"], "meters": str(env["base"] / "meters.yaml")}
    assert (hourly.name, hourly.parameters, backfill.name, backfill.parameters) == (
        "hourly",
        params,
        "backfill",
        params,
    )
    assert [s.schedule.cron for s in hourly.schedules] == ["0 */2 * * *"] and not backfill.schedules
    for deployment in (hourly, backfill):
        assert deployment.concurrency_limit == 1, deployment.name
        assert deployment.concurrency_options.collision_strategy == "ENQUEUE", deployment.name
