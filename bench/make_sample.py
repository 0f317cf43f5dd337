"""Regenerate the sample landing batches in ``data/landing/`` that the quickstart runs on.

    python bench/make_sample.py [--root data]

Writes, deterministically (a rerun gives byte-identical files):

- ``landing/seed/examples.jsonl``: every example usage event of the OpenMeter "Common Examples"
  page, as given there (including those whose type or fields do not match their meter: the login
  example has type ``auth_check``, the workflow_create example uses ``type`` not ``task_type``, and
  three ``request`` examples share source ``api-service`` and id ``00001``, so only the first counts);
- ``landing/2024/MM/DD/batch-NNNN.{jsonl,jsonl.gz,parquet}``: 12 batches of generated events over
  2024-01-01 .. 2024-02-29 (see ``bench/generate.py``), with a few bad records of every kind;
  Parquet batches cover the four combinations of data as JSON string / struct and time as string /
  timestamp.

Existing files of the same names are overwritten; nothing else is touched.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import generate, write_batch

# The example usage events of the OpenMeter "Common Examples" page, in page order.
SEED_EXAMPLES: list[dict] = [
    {  # LLM Token Usage (tokens_total)
        "specversion": "1.0",
        "type": "prompt",
        "id": "00001",
        "time": "2024-01-01T00:00:00.001Z",
        "source": "chat-app",
        "subject": "customer-1",
        "data": {"tokens": "123456", "model": "gpt4-turbo", "type": "output"},
    },
    {  # GPU Time (gpu_execution_duration_seconds)
        "specversion": "1.0",
        "type": "gpu_time",
        "id": "00001",
        "time": "2024-01-01T00:00:00.001Z",
        "source": "my-image-generator",
        "subject": "customer-1",
        "data": {
            "duration_seconds": "12345",
            "hostname": "my-hostname",
            "region": "us-east-1",
            "gpu_type": "nvidia_A100",
        },
    },
    {  # API Request Count (api_requests_total)
        "specversion": "1.0",
        "type": "request",
        "id": "00001",
        "time": "2024-01-01T00:00:00.001Z",
        "source": "api-service",
        "subject": "customer-1",
        "data": {"method": "GET", "route": "/products/:product_id"},
    },
    {  # API Request Duration (api_request_duration)
        "specversion": "1.0",
        "type": "request",
        "id": "00001",
        "time": "2024-01-01T00:00:00.001Z",
        "source": "api-service",
        "subject": "customer-1",
        "data": {"method": "GET", "route": "/products/:product_id", "duration_seconds": "12345"},
    },
    {  # Kubernetes Pod Execution Duration (pod_execution_time)
        "specversion": "1.0",
        "type": "kube-pod-exec-time",
        "id": "f7f11c82-c415-4325-aec7-572606681817",
        "time": "2024-01-01T00:00:00.001Z",
        "source": "my-app",
        "subject": "customer-1",
        "data": {"duration_seconds": "123", "pod_name": "pod_name", "pod_namespace": "pod_namespace"},
    },
    {  # Counting unique events (unique_sessions_total; the example's type is auth_check, not login)
        "specversion": "1.0",
        "type": "auth_check",
        "id": "00001",
        "time": "2024-01-01T00:00:00.001Z",
        "source": "auth-service",
        "subject": "customer-1",
        "data": {"session_id": "session_id"},
    },
    {  # Moving multiple meters with one event (api_requests_total, ..._duration_seconds, ..._ingress_bytes)
        "specversion": "1.0",
        "type": "request",
        "id": "00001",
        "time": "2024-01-01T00:00:00.001Z",
        "source": "api-service",
        "subject": "customer-1",
        "data": {
            "method": "GET",
            "route": "/products/:product_id",
            "duration_seconds": "123",
            "ingress_bytes": "456",
            "egress_bytes": "789",
        },
    },
    {  # Counting state changes: creation (the example uses "type", not "task_type")
        "specversion": "1.0",
        "type": "workflow_create",
        "id": "00001",
        "time": "2024-01-01T00:00:00.001Z",
        "source": "task-queue",
        "subject": "task-1",
        "data": {"type": "image-generate"},
    },
    {  # Counting state changes: success
        "specversion": "1.0",
        "type": "workflow_success",
        "id": "00001",
        "time": "2024-01-01T00:00:00.001Z",
        "source": "task-queue",
        "subject": "task-1",
        "data": {"task_type": "image-generate"},
    },
    {  # Translate AI demo (pages_total, words_total, translate_tokens_total)
        "specversion": "1.0",
        "id": "0b8bb322-90c2-4b46-b541-0380bac1b9a5",
        "source": "myapp",
        "type": "translate",
        "subject": "customer-123",
        "datacontenttype": "application/json",
        "time": "2025-02-18T16:37:44Z",
        "data": {"model": "gpt-4", "pages": 23, "tokens": 10200, "words": 6912},
    },
]

SEED = 2024
EVENTS = 4800
SUBJECTS = 25
BAD_FRACTION = 0.05
# One entry per batch, in landing order: (suffix, data_as, time_as); data_as/time_as: Parquet only.
BATCHES = [
    (".jsonl", "", ""),
    (".jsonl", "", ""),
    (".jsonl.gz", "", ""),
    (".parquet", "json", "string"),
    (".jsonl", "", ""),
    (".jsonl", "", ""),
    (".parquet", "struct", "timestamp"),
    (".jsonl.gz", "", ""),
    (".jsonl", "", ""),
    (".parquet", "struct", "string"),
    (".jsonl", "", ""),
    (".parquet", "json", "timestamp"),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Regenerate the sample landing batches.")
    p.add_argument(
        "--root", default=str(Path(__file__).resolve().parents[1] / "data"), help="storage root (default: data/)"
    )
    a = p.parse_args(argv)
    landing = Path(a.root) / "landing"

    seed_file = landing / "seed" / "examples.jsonl"
    seed_file.parent.mkdir(parents=True, exist_ok=True)
    seed_file.write_text("".join(json.dumps(e) + "\n" for e in SEED_EXAMPLES), encoding="utf-8")
    print(f"{seed_file}: {len(SEED_EXAMPLES)} seed examples")

    frame = generate(
        EVENTS, SEED, "2024-01-01", days=60, subjects=SUBJECTS, bad_fraction=BAD_FRACTION, with_fields=True
    )
    total: Counter[str] = Counter()
    per_batch = EVENTS // len(BATCHES)
    for k, (suffix, data_as, time_as) in enumerate(BATCHES):
        rows = frame.slice(k * per_batch, per_batch)
        first = rows["event_time"].drop_nulls()[0]  # the batch lands in the folder of its first event
        path = landing / f"{first:%Y/%m/%d}" / f"batch-{k + 1:04d}{suffix}"
        kinds = write_batch(rows, path, data_as=data_as or "json", time_as=time_as or "string")
        total += kinds
        shape = f" (data {data_as}, time {time_as})" if suffix == ".parquet" else ""
        bad = {kind: n for kind, n in sorted(kinds.items()) if kind != "ok"}
        print(f"{path}: {sum(kinds.values())} records{shape}; {bad}")
    print("total by kind:", dict(sorted(total.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
