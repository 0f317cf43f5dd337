"""Shared fixtures. Prefect's harness starts only for tests that ask for it (once per session)."""

import os
import tempfile

# A home of this test process's own, whatever the caller set (./dev exports the repo's .prefect): each xdist worker
# may start Prefect's temporary server, and two on one SQLite database race on its migrations.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="meterlake-prefect-")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

pytest_plugins = ["fixtures_prefect", "fixtures_s3"]
