"""`meterlake serve` end to end: a real Prefect server, the real command line, one run through the API.

A Prefect server is started on 127.0.0.1 (a free port, its own PREFECT_HOME, analytics off) as in
bench/fixed_cost.py, then `meterlake serve` against it with a copy of the bundled sample (data/landing).
The test reads both deployments back from the server's REST API (schedule, concurrency limit, parameters),
starts one run of the hourly deployment through the API and waits for the served process to execute it
to COMPLETED, then checks the storage root has billing-period tables. Both processes are always stopped.
prefect.yaml's deployments go the same way through its header commands: a work pool, `prefect deploy --all`
and a process worker that executes one hourly run.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect_processes import base_env, free_port

from flows import cli
from meters import load_meters_file

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SERVER_TIMEOUT = 120  # seconds until /api/health answers (a first start creates and migrates the database)
DEPLOY_TIMEOUT = 90  # seconds until `meterlake serve` has registered both deployments
RUN_TIMEOUT = 180  # seconds until the triggered flow run reaches a final state
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def executable(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    assert exe.exists(), f"{exe} not found (is the project installed in this virtualenv?)"
    return str(exe)


def tail(log: Path, lines: int = 40) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return f"--- last {lines} lines of {log} ---\n" + "\n".join(text.splitlines()[-lines:])


def stop(proc: subprocess.Popen, signals: tuple[tuple[int, float], ...]) -> None:
    """Signal the process group (its own session) in turn until the process has exited."""
    for sig, wait in signals:
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
    with contextlib.suppress(ProcessLookupError):  # anything left in the group (a flow run, uvicorn)
        os.killpg(proc.pid, signal.SIGKILL)


Watched = dict[str, tuple[subprocess.Popen, Path]]  # a name for messages -> (process, its output file)


def wait_for(what: str, check: Callable[[], Any], timeout: float, logs: Watched) -> Any:
    """Poll `check` until it returns something truthy; fail early if a watched process exits, with log tails."""
    started = time.monotonic()
    while True:
        for name, (proc, log) in logs.items():
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode} while waiting for {what}\n{tail(log)}")
        result = check()
        if result:
            return result
        if time.monotonic() - started > timeout:
            tails = "\n".join(tail(log) for _, log in logs.values())
            pytest.fail(f"{what}: not reached after {timeout:.0f} s\n{tails}")
        time.sleep(0.25)


def run_to_the_end(api: httpx.Client, deployment_id: str, body: dict, watched: Watched) -> dict:
    """Create a run of the deployment, wait until it is final, require COMPLETED; the run as the API reads it."""
    response = api.post(f"/deployments/{deployment_id}/create_flow_run", json=body)
    assert response.status_code == 201, response.text
    run_id = response.json()["id"]

    def final_state() -> dict | None:
        state = api.get(f"/flow_runs/{run_id}").json()["state"]
        return state if state and state["type"] in FINAL else None

    state = wait_for(f"flow run {run_id} in a final state", final_state, RUN_TIMEOUT, watched)
    logs = "\n".join(tail(log) for _, log in watched.values())
    assert state["type"] == "COMPLETED", f"{state['type']}: {state.get('message')}\n{logs}"
    return api.get(f"/flow_runs/{run_id}").json()


@pytest.fixture
def prefect_server(tmp_path: Path) -> Iterator[tuple[str, Path, subprocess.Popen, Path]]:
    """`prefect server start` on 127.0.0.1:<free port>; yields (API URL, PREFECT_HOME, process, log)."""
    home, log = tmp_path / "prefect-home", tmp_path / "server.log"
    home.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    cmd = [executable("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, env=base_env(home), cwd=home, stdout=out, stderr=out, start_new_session=True)
    try:

        def healthy() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            return False

        wait_for("the Prefect server's /api/health", healthy, SERVER_TIMEOUT, {"prefect server": (proc, log)})
        yield url, home, proc, log
    finally:
        stop(proc, ((signal.SIGTERM, 15), (signal.SIGKILL, 5)))


def test_serve_registers_both_deployments_and_executes_a_run(
    tmp_path: Path, prefect_server: tuple[str, Path, subprocess.Popen, Path]
) -> None:
    url, home, server, server_log = prefect_server
    root = tmp_path / "root"
    shutil.copytree(REPO / "data" / "landing", root / "landing")
    meters = REPO / "data" / "meters.yaml"
    default_cron = inspect.signature(cli.serve).parameters["cron"].default
    assert default_cron == "5 * * * *"

    env = base_env(home, url)
    env["PREFECT_RUNNER_POLL_FREQUENCY"] = "1"  # the served runner looks for due runs every second, not 10
    log = tmp_path / "serve.log"
    # relative meters path from the repo folder: serve must store it as an absolute path
    cmd = [executable("meterlake"), "serve", "--root", str(root), "--meters", "data/meters.yaml"]
    with log.open("ab") as out:
        serve = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=out, start_new_session=True)
    watched: Watched = {"meterlake serve": (serve, log), "prefect server": (server, server_log)}
    try:
        with httpx.Client(base_url=url, timeout=10) as api:

            def deployment(flow: str, name: str) -> dict | None:
                response = api.get(f"/deployments/name/{flow}/{name}")
                return response.json() if response.status_code == 200 else None

            def both() -> tuple[dict, dict] | None:
                hourly = deployment("meterlake-hourly", "hourly")
                backfill = deployment("meterlake-backfill", "backfill")
                return (hourly, backfill) if hourly and backfill else None

            hourly, backfill = wait_for("both deployments registered", both, DEPLOY_TIMEOUT, watched)

            params = {"root": str(root), "meters": str(meters)}
            for dep in (hourly, backfill):
                assert dep["parameters"] == params, dep["name"]
                assert dep["global_concurrency_limit"] is not None, dep["name"]
                assert dep["global_concurrency_limit"]["limit"] == 1, dep["name"]
                assert dep["concurrency_options"]["collision_strategy"] == "ENQUEUE", dep["name"]
            assert [s["schedule"].get("cron") for s in hourly["schedules"]] == [default_cron]
            assert hourly["schedules"][0]["active"] is True
            assert backfill["schedules"] == []

            run = run_to_the_end(api, hourly["id"], {}, watched)
            assert run["deployment_id"] == hourly["id"]
            assert run["parameters"] == params

        slugs = {m.slug for m in load_meters_file(meters).meters}
        published = {p.parent.parent.parent.name for p in (root / "usage").glob("*/period/period_start=*/data.parquet")}
        assert published == slugs, f"meters without a period table: {sorted(slugs - published)}"
        assert serve.poll() is None, f"meterlake serve exited with {serve.returncode}\n{tail(log)}"
    finally:
        stop(serve, ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 5)))


def test_prefect_yaml_deploys_and_serve_refuses_to_take_its_deployments_over(
    tmp_path: Path, prefect_server: tuple[str, Path, subprocess.Popen, Path]
) -> None:
    """prefect.yaml's header commands against a real server (work pool, deploy, a worker that executes a run of the
    hourly deployment), then `meterlake serve` on the same server.

    serve would update the worker's deployments in place: Prefect refused that with a 422 ("provide a slug for
    each schedule") and a traceback-free but unexplained exit 1; it must say what to do, one line, exit 2.
    """
    url, home, server, server_log = prefect_server
    env = {**base_env(home, url), "METERLAKE_DIR": str(REPO)}

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=180)

    for cmd in (("work-pool", "create", "meterlake", "--type", "process"), ("--no-prompt", "deploy", "--all")):
        done = run(executable("prefect"), *cmd)
        assert done.returncode == 0, done.stdout + done.stderr
    with httpx.Client(base_url=url, timeout=10) as api:
        for name in ("meterlake-hourly/hourly", "meterlake-backfill/backfill"):
            dep = api.get(f"/deployments/name/{name}").json()
            assert dep["work_pool_name"] == "meterlake", name
            assert dep["global_concurrency_limit"]["limit"] == 1, name
            assert dep["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(REPO)

    # The third header command: a worker of the pool executes a run of the hourly deployment on a copy of the
    # sample (its relative meters path is read from METERLAKE_DIR, the pull step's working directory).
    root = tmp_path / "root"
    shutil.copytree(REPO / "data" / "landing", root / "landing")
    worker_log = tmp_path / "worker.log"
    worker_env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "1"}  # look for due runs every second, not 10
    cmd = [executable("prefect"), "worker", "start", "--pool", "meterlake"]
    with worker_log.open("ab") as out:
        worker = subprocess.Popen(cmd, env=worker_env, cwd=tmp_path, stdout=out, stderr=out, start_new_session=True)
    watched: Watched = {"prefect worker": (worker, worker_log), "prefect server": (server, server_log)}
    try:
        with httpx.Client(base_url=url, timeout=10) as api:
            hourly = api.get("/deployments/name/meterlake-hourly/hourly").json()
            # meters stays the deployment's relative data/meters.yaml
            run_to_the_end(api, hourly["id"], {"parameters": {"root": str(root)}}, watched)
    finally:
        stop(worker, ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 5)))
    slugs = {m.slug for m in load_meters_file(REPO / "data" / "meters.yaml").meters}
    published = {p.parent.parent.parent.name for p in (root / "usage").glob("*/period/period_start=*/data.parquet")}
    assert published == slugs, f"meters without a period table: {sorted(slugs - published)}"

    done = run(executable("meterlake"), "serve", "--root", str(root), "--meters", "data/meters.yaml")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "'meterlake-hourly/hourly'" in lines[0], lines
    assert "prefect deployment delete 'meterlake-hourly/hourly'" in lines[0]


# --- serve without a Prefect server of its own (Prefect's temporary server) -------------------------------
@pytest.fixture(scope="module")
def temporary_server_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PREFECT_HOME for `meterlake serve` without PREFECT_API_URL, which starts Prefect's temporary server (its
    database is created by the first test, reused by the next)."""
    return tmp_path_factory.mktemp("prefect-home")


def serve_on_a_temporary_server(tmp_path: Path, home: Path, stdout: int) -> tuple[subprocess.Popen, Path]:
    """`meterlake serve` on an empty root, its own session, standard error to a log; (process, log)."""
    (tmp_path / "root").mkdir()
    log = tmp_path / "serve.log"
    cmd = [executable("meterlake"), "serve", "--root", str(tmp_path / "root"), "--meters", "data/meters.yaml"]
    with log.open("ab") as err:
        proc = subprocess.Popen(cmd, env=base_env(home), cwd=REPO, stdout=stdout, stderr=err, start_new_session=True)
    return proc, log


def test_serve_into_a_closed_pipe_ends_quietly(tmp_path: Path, temporary_server_home: Path) -> None:
    """Prefect prints its banner ('Your deployments are being served ...') with a rich console of its own, whose
    broken-pipe handling ended serve with a silent exit 1; as every command, it stops quietly with 141."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before serve writes anything
    try:
        serve, log = serve_on_a_temporary_server(tmp_path, temporary_server_home, write_end)
    finally:
        os.close(write_end)
    try:
        serve.wait(timeout=DEPLOY_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"meterlake serve kept running with its standard output closed\n{tail(log)}")
    finally:
        stop(serve, ((signal.SIGTERM, 10), (signal.SIGKILL, 5)))
    assert serve.returncode == 141, tail(log)
    assert "Traceback" not in log.read_text(), tail(log)


def temporary_servers_of(pid: int) -> list[int]:
    """Process ids of the Prefect temporary servers (uvicorn) that process `pid` started."""
    found = subprocess.run(["pgrep", "-P", str(pid), "-f", "prefect.server.api.server"], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


@pytest.mark.parametrize(
    ("signum", "to_group"),
    [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGINT, True), (signal.SIGHUP, True)],
    ids=["SIGTERM", "Ctrl-C", "Ctrl-C in a terminal", "terminal closed"],
)
def test_serve_stops_cleanly_with_exit_0(
    tmp_path: Path, temporary_server_home: Path, signum: int, to_group: bool
) -> None:
    """docs/cli.md: once serving, SIGTERM (systemd, docker stop), Ctrl-C or a closed terminal stops serve cleanly,
    schedules paused, with exit 0, not the 143/130 of an interrupted command (which systemd would count as a failed
    stop). In a terminal the signal goes to the whole foreground group: Prefect's temporary server, a child of
    serve, runs in a session of its own, so that it is still there while the runner pauses the schedules (in
    serve's group it stopped with it, and serve exited 0 or, after 74 s of retries, 1: a race), and is stopped at
    exit."""
    serve, log = serve_on_a_temporary_server(tmp_path, temporary_server_home, subprocess.PIPE)
    try:
        assert serve.stdout is not None
        banner = b""
        while b"being served" not in banner:  # Prefect's banner, printed just before its runner starts
            line = serve.stdout.readline()
            assert line, f"meterlake serve exited with {serve.wait()} before serving\n{tail(log)}"
            banner += line
        time.sleep(2)  # the runner installs its SIGTERM handler and enters its loop
        [server] = temporary_servers_of(serve.pid)
        assert os.getpgid(server) != serve.pid, "the temporary server is in serve's process group"
        if to_group:
            os.killpg(serve.pid, signum)
        else:
            os.kill(serve.pid, signum)
        serve.stdout.read()
        code = serve.wait(timeout=60)
        for _ in range(50):  # stopped by serve's exit (Prefect's atexit hook), not left running in its session
            if not alive(server):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"the temporary server {server} outlived serve\n{tail(log)}")
    finally:
        stop(serve, ((signal.SIGTERM, 10), (signal.SIGKILL, 5)))
    text = log.read_text()
    assert code == 0, tail(log)
    assert "All deployments have been paused" in text and "Traceback" not in text, tail(log)


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, exited but not yet reaped by its parent, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_ctrl_c_in_a_terminal_interrupts_a_flow_run_on_the_temporary_server_at_once(tmp_path: Path) -> None:
    """`meterlake run --prefect` without a server of its own, Ctrl-C in a terminal (SIGINT to the whole group) while
    the flow runs: exit 130 in seconds, the run reported Crashed to a server still there. With the server in the
    command's group it stopped first, and the command retried its final state for 70-80 s, then exited 1."""
    root = tmp_path / "root"
    shutil.copytree(REPO / "data" / "landing", root / "landing")
    log = tmp_path / "run.log"
    cmd = [executable("meterlake"), "run", "--prefect", "--root", str(root), "--meters", "data/meters.yaml"]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd, env=base_env(tmp_path / "home"), cwd=REPO, stdout=out, stderr=out, start_new_session=True
        )
    try:
        deadline = time.monotonic() + DEPLOY_TIMEOUT
        while b"Beginning flow run" not in log.read_bytes():
            assert proc.poll() is None, f"run exited with {proc.returncode} before its flow began\n{tail(log)}"
            assert time.monotonic() < deadline, tail(log)
            time.sleep(0.05)
        [server] = temporary_servers_of(proc.pid)
        assert os.getpgid(server) != proc.pid, "the temporary server is in the command's process group"
        os.killpg(proc.pid, signal.SIGINT)
        started = time.monotonic()
        code = proc.wait(timeout=60)
        took = time.monotonic() - started
    finally:
        stop(proc, ((signal.SIGTERM, 10), (signal.SIGKILL, 5)))
    text = log.read_text()
    assert code == 130, tail(log)
    assert took < 20, f"{took:.1f} s\n{tail(log)}"
    # A Ctrl-C while Prefect's task engine starts a task run makes it fail in its own cleanup ('Task run is not
    # set'; the flow run Failed, with Prefect's traceback in its log): seen once in CI. The command still exits
    # 130 (cli._interrupted); the flow run's final state is Prefect's to report. A Ctrl-C that lands in a Python
    # callback of Polars' native code is lost there (also seen once): the run completes, and the command still
    # exits 130 (cli.main records the signal).
    if "Task run is not set" not in text and "after its work had finished" not in text:
        assert "Finished in state Crashed" in text and "Traceback" not in text, tail(log)
