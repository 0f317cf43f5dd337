"""What a Prefect subprocess started by a test or a benchmark needs: a free loopback port and an environment
with its own PREFECT_HOME, analytics off, and no API URL or profile inherited from the caller.

Shared by `tests/flows/test_serve.py` and `bench/fixed_cost.py` (which puts this folder on its path)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(prefect_home: Path, api_url: str | None = None) -> dict[str, str]:
    """The caller's environment without any Prefect API or profile choice, plus the given ones."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    env.update(QUIET, PREFECT_HOME=str(prefect_home))
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env
