"""Benchmark (not a test): the fixed cost of `meterlake run` when nothing new has landed.

    .venv/bin/python bench/fixed_cost.py                     # 5 repeats; temporary-server runs 3 times
    .venv/bin/python bench/fixed_cost.py --repeat 10 --temporary-repeat 2
    .venv/bin/python bench/fixed_cost.py --skip-temporary    # a and b only (about a minute)

A storage root is prepared in a temporary folder from the bundled sample (a copy of data/landing, the
meters of data/meters.yaml) and one untimed run ingests everything. Then, with nothing new landed, each
measurement is a fresh process of the real command line, `meterlake run --root ROOT --meters FILE ...`,
timed from just before it is spawned to its exit (wall time, perf_counter):

- ``plain``: no Prefect (no PREFECT_API_URL, no --prefect);
- ``server``: ``--prefect`` against a Prefect server this script starts on 127.0.0.1 (a free port, its
  own temporary PREFECT_HOME, analytics off) and always stops at the end (also on errors and SIGTERM);
  one warm-up run first, reported alone as ``server_first_run`` (it registers the flow);
- ``temporary_first`` / ``temporary_later``: ``--prefect`` with no PREFECT_API_URL, so Prefect starts
  its temporary server inside the run: once with a fresh PREFECT_HOME (the database is created and
  migrated), then again with that same PREFECT_HOME.

Before the server runs, two floors: ``python_only`` (a fresh interpreter that exits) and ``import_prefect``
(a fresh interpreter that runs ``import prefect`` and exits). No run with Prefect in its process can take
less than ``import_prefect``.

Then, in one separate Python process (so this script never imports Prefect): the import of the flow
module, and the flow call itself (`flows.prefect_flows.run_hourly`) timed around the call against the
running server, ``--repeat`` times after one untimed call. That separates interpreter start, imports and
exit from the flow's own cost.

Figures are printed as ``name value unit`` lines (median, min and max wall seconds; median CPU seconds
and peak RSS of the process; load average before and after each group), then a table. On a shared
machine the CPU seconds move less with the load than wall time; compare figures only between runs on
the same machine and at a similar load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the Prefect subprocess helpers shared with tests/flows/test_serve.py

from prefect_processes import base_env, free_port  # noqa: E402


@dataclass
class Run:
    seconds: float  # wall, spawn to exit
    cpu: float  # user + system CPU of the process (and of the processes it waited for: a temporary server)
    rss_mb: float  # peak RSS


class Figures:
    def __init__(self) -> None:
        self.rows: list[tuple[str, list[float], list[float], list[float]]] = []

    @staticmethod
    def line(name: str, value: float | int | str, unit: str) -> None:
        if isinstance(value, float):
            value = f"{value:.3f}" if unit == "s" else f"{value:.0f}" if unit == "MB" else f"{value:.2f}"
        print(f"{name} {value} {unit}", flush=True)

    def group(self, name: str, seconds: list[float], runs: list[Run] | None = None) -> None:
        """Median, min and max wall seconds; median CPU seconds and peak RSS of the processes."""
        cpu = [r.cpu for r in runs or []]
        rss = [r.rss_mb for r in runs or []]
        self.line(f"{name}.n", len(seconds), "runs")
        self.line(f"{name}.median", statistics.median(seconds), "s")
        self.line(f"{name}.min", min(seconds), "s")
        self.line(f"{name}.max", max(seconds), "s")
        if runs:
            self.line(f"{name}.cpu_median", statistics.median(cpu), "s")
            self.line(f"{name}.peak_rss", statistics.median(rss), "MB")
        self.rows.append((name, seconds, cpu, rss))

    def runs(self, name: str, runs: list[Run]) -> None:
        self.group(name, [r.seconds for r in runs], runs)

    def table(self) -> None:
        head = f"{'measurement':<26} {'n':>3} {'median s':>9} {'min s':>8} {'max s':>8} {'cpu s':>7} {'RSS MB':>7}"
        print()
        print(head)
        print("-" * len(head))
        for name, s, cpu, rss in self.rows:
            c = f"{statistics.median(cpu):>7.2f}" if cpu else f"{'-':>7}"
            mb = f"{statistics.median(rss):>7.0f}" if rss else f"{'-':>7}"
            print(f"{name:<26} {len(s):>3} {statistics.median(s):>9.3f} {min(s):>8.3f} {max(s):>8.3f} {c} {mb}")


def note(text: str) -> None:
    print(f"# {text}", flush=True)


def load(fig: Figures, name: str) -> None:
    one, five, _ = os.getloadavg()
    fig.line(f"load.{name}.1m", one, "load")
    fig.line(f"load.{name}.5m", five, "load")


def meterlake_command() -> list[str]:
    exe = Path(sys.executable).with_name("meterlake")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "flows.cli"]


def timed(cmd: list[str], env: dict[str, str], log: Path) -> Run:
    """Run one process to its exit, output to `log`; wall seconds, CPU seconds and peak RSS."""
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=out, start_new_session=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    with contextlib.suppress(ProcessLookupError):  # anything the run left behind (a temporary server)
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}; output in {log}")
    return Run(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


@contextlib.contextmanager
def prefect_server(home: Path, log: Path, timeout: float = 300) -> Iterator[tuple[str, float]]:
    """`prefect server start` on 127.0.0.1:<free port>; yields (API URL, seconds until healthy). Always stopped."""
    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    env = base_env(home)
    prefect = Path(sys.executable).with_name("prefect")
    cmd = [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    started = time.perf_counter()
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=home, stdout=out, stderr=out, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with {proc.returncode}; output in {log}")
            if time.perf_counter() - started > timeout:
                raise RuntimeError(f"prefect server not healthy after {timeout:.0f} s; output in {log}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
            time.sleep(0.2)
        yield url, time.perf_counter() - started
    finally:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)  # the server and its uvicorn child: their own session
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait)
                break


def prepare_root(work: Path, landing: Path, meters: Path, log: Path) -> Path:
    root = work / "root"
    shutil.copytree(landing, root / "landing")
    first = timed([*meterlake_command(), "run", "--root", str(root), "--meters", str(meters)], plain_env(work), log)
    note(f"first run (ingests the sample, untimed): {first.seconds:.1f} s, root {root}")
    return root


def plain_env(work: Path) -> dict[str, str]:
    return base_env(work / "home-plain")


def check_nothing_new(root: Path, expected_runs: int) -> None:
    records = sorted((root / "_state" / "runs").glob("*.json"))
    if len(records) != expected_runs:
        raise RuntimeError(f"expected {expected_runs} run records, found {len(records)}")
    for path in records[1:]:
        summary = json.loads(path.read_text())
        if summary["batches"] or summary["events_read"] or summary["meters_recomputed"]:
            raise RuntimeError(f"{path.name}: a run with nothing new did work: {summary}")


FLOW_CALLS = """
import json, sys, time
t0 = time.perf_counter()
import flows.prefect_flows as pf
imported = time.perf_counter() - t0
root, meters, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
times = []
for i in range(n + 1):
    t = time.perf_counter()
    pf.run_hourly(root=root, meters=meters)
    times.append(time.perf_counter() - t)
print("FLOW_CALLS " + json.dumps({"import": imported, "first": times[0], "calls": times[1:]}), flush=True)
"""


def flow_calls(root: Path, meters: Path, env: dict[str, str], n: int, log: Path) -> dict:
    cmd = [sys.executable, "-c", FLOW_CALLS, str(root), str(meters), str(n)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    with log.open("a") as out:
        out.write(f"\n$ python -c FLOW_CALLS {root} {meters} {n}\n{proc.stdout}{proc.stderr}")
    if proc.returncode != 0:
        raise RuntimeError(f"in-process flow calls failed ({proc.returncode}); output in {log}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("FLOW_CALLS "))
    return json.loads(line.removeprefix("FLOW_CALLS "))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per measurement (default 5)")
    parser.add_argument(
        "--temporary-repeat", type=int, default=3, help="pairs of temporary-server runs (default 3; each 10-40 s)"
    )
    parser.add_argument("--skip-temporary", action="store_true", help="leave out the temporary-server runs")
    parser.add_argument("--landing", type=Path, default=REPO / "data" / "landing")
    parser.add_argument("--meters", type=Path, default=REPO / "data" / "meters.yaml")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, root, homes)")
    args = parser.parse_args()
    if args.repeat < 1 or args.temporary_repeat < 1:
        parser.error("--repeat and --temporary-repeat must be at least 1")

    work = Path(tempfile.mkdtemp(prefix="meterlake-fixed-cost-"))
    log = work / "runs.log"
    fig = Figures()
    # SIGTERM (e.g. a CI timeout) unwinds through the `finally` blocks, so the server is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        meters = args.meters.resolve()
        note(f"python {platform.python_version()}, {os.cpu_count()} cores, {platform.platform()}")
        note(f"work folder {work} (run output in {log})")
        root = prepare_root(work, args.landing.resolve(), meters, log)
        runs = 1
        run = [*meterlake_command(), "run", "--root", str(root), "--meters", str(meters)]

        load(fig, "before")

        def repeated(cmd: list[str], env: dict[str, str]) -> list[Run]:
            return [timed(cmd, env, log) for _ in range(args.repeat)]

        fig.runs("plain", repeated(run, plain_env(work)))
        runs += args.repeat
        load(fig, "after_plain")

        # The floor of any run with Prefect: a fresh interpreter that imports Prefect and exits.
        floor_env = base_env(work / "home-import")
        fig.runs("python_only", repeated([sys.executable, "-c", "pass"], floor_env))
        fig.runs("import_prefect", repeated([sys.executable, "-c", "import prefect"], floor_env))
        load(fig, "after_import_prefect")

        with prefect_server(work / "home-server", work / "server.log") as (url, startup):
            fig.line("server_start", startup, "s")
            env = base_env(work / "home-client", url)
            fig.line("server_first_run", timed([*run, "--prefect"], env, log).seconds, "s")
            fig.runs("server", repeated([*run, "--prefect"], env))
            runs += 1 + args.repeat
            load(fig, "after_server")
            calls = flow_calls(root, meters, env, args.repeat, log)
            runs += 1 + args.repeat
            fig.line("inprocess.import_flows", calls["import"], "s")
            fig.line("inprocess.first_flow_call", calls["first"], "s")
            fig.group("inprocess.flow_call", calls["calls"])
            load(fig, "after_inprocess")

        if not args.skip_temporary:
            firsts, laters = [], []
            for i in range(args.temporary_repeat):
                env = base_env(work / f"home-temporary-{i}")
                firsts.append(timed([*run, "--prefect"], env, log))
                laters.append(timed([*run, "--prefect"], env, log))
                runs += 2
            fig.runs("temporary_first", firsts)
            fig.runs("temporary_later", laters)
            load(fig, "after_temporary")
        check_nothing_new(root, runs)
        fig.table()
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc} (kept {work})", file=sys.stderr)
        return 1
    if args.keep:
        note(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
