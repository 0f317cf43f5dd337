"""How the command line starts Prefect flow runs: settings, the temporary-server notice, the cheap paths.

None of these tests starts a Prefect server; bench/fixed_cost.py measures the real thing.
"""

from __future__ import annotations

import datetime as dt
import gc
import subprocess
import sys
from pathlib import Path

import pytest

from flows import state
from flows.cli import TEMPORARY_SERVER_NOTICE, main

from fixtures_s3 import closed_port
from support import local_root

REPO = Path(__file__).resolve().parents[2]
METERS = """
meters:
  - slug: prompts
    eventType: prompt
    aggregation: COUNT
"""


@pytest.fixture
def root(tmp_path: Path) -> dict[str, str]:
    storage = local_root(tmp_path)
    meters = tmp_path / "meters.yaml"
    meters.write_text(METERS)
    return {"root": storage.root, "meters": str(meters)}


def test_parameters_are_serialised_as_jsonable_encoder_does() -> None:
    from fastapi.encoders import jsonable_encoder

    from flows.prefect_flows import backfill_flow, hourly_flow

    cases = [
        {"root": "data", "meters": "data/meters.yaml"},
        {
            "start": dt.date(2024, 1, 1),
            "end": dt.datetime(2024, 3, 1, 12, 30, tzinfo=dt.UTC),
            "meter": ["tokens_total", "prompts"],
            "reingest": False,
            "root": "s3://bucket/prefix",
            "number": 1.5,
            "count": 3,
            "nothing": None,
            "pair": ("a", 2),
        },
    ]
    for params in cases:
        assert hourly_flow.serialize_parameters(params) == {k: jsonable_encoder(v) for k, v in params.items()}
    other = {"mapping": {"a": 1}, "root": "data"}  # not one of the simple types: Prefect's own method
    assert backfill_flow.serialize_parameters(other) == {"mapping": {"a": 1}, "root": "data"}


def test_meters_file_is_parsed_once_per_content(tmp_path: Path) -> None:
    from flows.prefect_flows import load_meters
    from meters import MeterConfigError

    path = tmp_path / "meters.yaml"
    path.write_text(METERS)
    first = load_meters(str(path))
    assert load_meters(str(path)) is first
    path.write_text(METERS.replace("prompts", "prompt_count"))
    changed = load_meters(str(path))
    assert [m.slug for m in changed.meters] == ["prompt_count"]
    with pytest.raises(MeterConfigError):
        load_meters(str(tmp_path / "missing.yaml"))


def test_command_line_settings_change_only_what_the_user_did_not_set() -> None:
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        get_current_settings,
        temporary_settings,
    )

    from flows.prefect_flows import TEMPORARY_SERVER_STARTUP_TIMEOUT, command_line_settings

    temporary = {PREFECT_API_URL: None, PREFECT_SERVER_EPHEMERAL_ENABLED: True}
    with temporary_settings(updates=temporary), command_line_settings():
        settings = get_current_settings()
        assert settings.flows.heartbeat_frequency is None
        assert settings.server.ephemeral.startup_timeout_seconds == TEMPORARY_SERVER_STARTUP_TIMEOUT
    chosen = {**temporary, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 60, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 7}
    with temporary_settings(updates=chosen), command_line_settings():
        settings = get_current_settings()
        assert settings.flows.heartbeat_frequency == 60
        assert settings.server.ephemeral.startup_timeout_seconds == 7
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}), command_line_settings():
        settings = get_current_settings()
        assert settings.flows.heartbeat_frequency is None
        assert settings.server.ephemeral.startup_timeout_seconds == 20  # Prefect's default: no temporary server


def test_temporary_server_notice_is_printed_once_before_the_run(root, capsys, monkeypatch) -> None:
    from flows import prefect_flows

    calls = []
    monkeypatch.setattr(prefect_flows, "will_start_temporary_server", lambda: True)
    monkeypatch.setattr(prefect_flows, "needs_api_url", lambda: False)
    monkeypatch.setattr(prefect_flows, "isolate_temporary_server", lambda: calls.append("isolated"))
    monkeypatch.setattr(prefect_flows, "run_hourly", lambda **kw: calls.append(kw))
    code = main(["run", "--root", root["root"], "--meters", root["meters"], "--prefect"])
    out, err = capsys.readouterr()
    assert code == 0 and len(calls) == 2
    assert calls[0] == "isolated"  # the server, started by the flow run, gets a session of its own
    assert err.count(TEMPORARY_SERVER_NOTICE) == 1 and "PREFECT_API_URL" in err and not out

    monkeypatch.setattr(prefect_flows, "will_start_temporary_server", lambda: False)
    code = main(["run", "--root", root["root"], "--meters", root["meters"], "--prefect"])
    assert code == 0 and len(calls) == 3 and not capsys.readouterr().err


def test_no_api_and_no_temporary_server_is_one_line_exit_2(root, capsys, monkeypatch) -> None:
    from flows import prefect_flows

    monkeypatch.setattr(prefect_flows, "needs_api_url", lambda: True)
    monkeypatch.setattr(prefect_flows, "run_hourly", lambda **kw: pytest.fail("must not start a flow run"))
    code = main(["run", "--root", root["root"], "--meters", root["meters"], "--prefect"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "PREFECT_API_URL" in err


def test_bad_meters_file_with_prefect_is_exit_2_before_any_flow_run(root, tmp_path, capsys, monkeypatch) -> None:
    from flows import prefect_flows

    monkeypatch.setattr(prefect_flows, "run_hourly", lambda **kw: pytest.fail("must not start a flow run"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("meters:\n  - slug: Bad Slug\n    eventType: x\n    aggregation: COUNT\n")
    code = main(["run", "--root", root["root"], "--meters", str(bad), "--prefect"])
    assert code == 2 and "bad.yaml" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [["run", "--prefect"], ["backfill", "--prefect", "--from", "2024-01-01", "--to", "2024-01-02"], ["serve"]],
    ids=["run", "backfill", "serve"],
)
def test_unreachable_prefect_api_is_one_line_exit_3(root, capsys, monkeypatch, command) -> None:
    """PREFECT_API_URL set, its server down: one line naming the URL, exit 3 (an unreachable service, as storage or a
    Dask scheduler). It was 'unexpected RuntimeError: Failed to reach API' (run, backfill) or 'unexpected
    ConnectError' (serve), exit 1."""
    import prefect
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    monkeypatch.setattr(prefect, "serve", lambda *a, **kw: pytest.fail("serve must not start serving"))
    url = f"http://127.0.0.1:{closed_port()}/api"
    with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_CLIENT_MAX_RETRIES: 0}):
        code = main([*command, "--root", root["root"], "--meters", root["meters"]])
    out, err = capsys.readouterr()
    assert code == 3, err
    assert err.startswith(f"error: Prefect API at {url} cannot be reached (") and "PREFECT_API_URL" in err, err
    assert len(err.strip().splitlines()) == 1 and out == "", err


@pytest.mark.parametrize("command", [["run", "--prefect"], ["serve"]], ids=["run", "serve"])
def test_a_prefect_api_url_that_is_no_prefect_api_is_one_line_exit_3(root, capsys, monkeypatch, command) -> None:
    """PREFECT_API_URL set to a server that answers 404 (another service, or a URL without its /api): one line
    naming the URL, exit 3, for serve as for run. serve read the deployments (404: none), then went on to serve
    and ended with 'unexpected PrefectHTTPStatusError: ... 404 Not Found ... /api/flows/', exit 1."""
    import http.server
    import threading

    import prefect
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_PATCH = do_PUT = do_DELETE = do_GET

        def log_message(self, *args: object) -> None:
            pass

    monkeypatch.setattr(prefect, "serve", lambda *a, **kw: pytest.fail("serve must not start serving"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/api"
    try:
        with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_CLIENT_MAX_RETRIES: 0}):
            code = main([*command, "--root", root["root"], "--meters", root["meters"]])
    finally:
        server.shutdown()
        server.server_close()
    out, err = capsys.readouterr()
    assert code == 3, err
    assert err.startswith(f"error: Prefect API at {url} cannot be reached (") and "PREFECT_API_URL" in err, err
    assert len(err.strip().splitlines()) == 1 and out == "", err


def test_lock_held_is_exit_4(root, capsys) -> None:
    storage = local_root(Path(root["root"]).parent)
    state.acquire_lock(storage, "running-elsewhere", 3600)
    code = main(["run", "--root", root["root"], "--meters", root["meters"]])
    assert code == 4 and "running-elsewhere" in capsys.readouterr().err


def test_main_called_from_python_leaves_the_garbage_collector_alone(capsys) -> None:
    frozen = gc.get_freeze_count()
    assert main(["validate", str(REPO / "data" / "meters.yaml")]) == 0
    assert gc.get_freeze_count() == frozen


def test_validate_and_help_import_neither_polars_nor_prefect() -> None:
    code = (
        "import sys\n"
        "from flows.cli import main\n"
        "assert main(['validate', 'data/meters.yaml']) == 0\n"
        "assert main(['--help']) == 0\n"
        "print(sorted({'polars', 'prefect'} & set(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_flow_run_needs_a_server_when_there_is_no_api_and_no_temporary_server() -> None:
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

    from flows.prefect_flows import needs_api_url, will_start_temporary_server

    for url, ephemeral, needs, temporary in [
        (None, False, True, False),
        (None, True, False, True),
        ("http://127.0.0.1:4200/api", False, False, False),
        ("http://127.0.0.1:4200/api", True, False, False),
    ]:
        with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_SERVER_EPHEMERAL_ENABLED: ephemeral}):
            assert (needs_api_url(), will_start_temporary_server()) == (needs, temporary), (url, ephemeral)


def test_dask_task_runner_uses_the_address_given_or_a_local_cluster_of_one_thread_processes() -> None:
    from flows.prefect_flows import task_runner

    assert task_runner() is None and task_runner(None, 0) is None  # threads
    remote = task_runner("tcp://scheduler:8786", 4)  # an address wins: its cluster has its own workers
    assert remote.address == "tcp://scheduler:8786"
    local = task_runner(None, 3)
    assert local.address is None
    assert {k: local.cluster_kwargs[k] for k in ("n_workers", "threads_per_worker", "processes")} == {
        "n_workers": 3,
        "threads_per_worker": 1,
        "processes": True,
    }
