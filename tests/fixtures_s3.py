"""S3 on loopback for tests: one moto server per session, a clean state and a fresh bucket per test.

Fixtures:
- `moto_endpoint`: `ThreadedMotoServer(ip_address="127.0.0.1", port=0)`, started once per session.
- `s3_env`: resets moto (`POST /moto-api/reset`) and points the standard AWS variables at it with fake
  keys; nothing from the developer's own AWS setup (profile, config files, instance metadata) leaks in.
- `s3_bucket`, `s3_root`: a new bucket per test, and `s3://<bucket>/prefix` inside it.
- `any_root`: a `Storage`, once on a local folder and once on S3 (parametrised; the S3 case is marked `s3`).
- `s3_faults`: a small HTTP proxy in front of moto that fails requests on demand (`FaultProxy`).
- `silent_endpoint`: a loopback port that accepts connections and never answers (`SilentEndpoint`).

The code under test gets no test-only branch: it reads `AWS_ENDPOINT_URL` like any S3 client.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

FAKE_KEY = "AKIAMETERLAKETEST0001"
FAKE_SECRET = "meterlake-fake-secret-value-0123456789"  # tests assert it never shows up in output
REGION = "us-east-1"

_CLEARED_AWS_VARS = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_REGION",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


def _post(url: str, body: bytes = b"") -> None:
    with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=10) as resp:
        resp.read()


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def point_aws_env_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, tmp_dir: str) -> None:
    """The standard AWS variables, aimed at `endpoint`, isolated from the machine's AWS setup."""
    for name in _CLEARED_AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", f"{tmp_dir}/no-aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", f"{tmp_dir}/no-aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def s3_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> str:
    """A clean moto and the AWS environment pointing at it; returns the endpoint URL."""
    _post(f"{moto_endpoint}/moto-api/reset")
    point_aws_env_at(monkeypatch, moto_endpoint, str(tmp_path))
    return moto_endpoint


def closed_port() -> int:
    """A loopback port nothing listens on: bound once to get a free number, then released."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SilentEndpoint:
    """A loopback TCP server that accepts every connection and never answers (a wedged service or proxy): the
    connections stay open, unread, until the end of the test. `accepted` counts them: one per request attempt."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def accepted(self) -> int:
        return len(self._held)

    def _serve(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                self._held.append(self._listener.accept()[0])

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for conn in self._held:
            conn.close()
        self._listener.close()


@pytest.fixture
def silent_endpoint() -> Iterator[SilentEndpoint]:
    endpoint = SilentEndpoint()
    yield endpoint
    endpoint.close()


def s3_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=FAKE_KEY,
        aws_secret_access_key=FAKE_SECRET,
        region_name=REGION,
    )


@pytest.fixture
def s3_bucket(s3_env: str) -> str:
    name = f"meterlake-{uuid.uuid4().hex[:12]}"
    s3_client(s3_env).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_root(s3_bucket: str) -> str:
    return f"s3://{s3_bucket}/prefix"


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def any_root(request: pytest.FixtureRequest, tmp_path):
    """A Storage on a local folder or on S3 (moto), so one test body covers both roots."""
    from flows.storage import Storage

    if request.param == "s3":
        return Storage(request.getfixturevalue("s3_root"))
    path = tmp_path / "root"
    path.mkdir()
    return Storage(str(path))


# --- fault injection ------------------------------------------------------------------------------
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
_NOT_FORWARDED = {*_HOP_BY_HOP, "server", "date"}
_ERRORS = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
    403: ("AccessDenied", "Access Denied"),
    400: ("XAmzContentSHA256Mismatch", "The provided 'x-amz-content-sha256' header does not match what was computed."),
}


@dataclass
class FaultProxy:
    """An HTTP proxy on loopback in front of moto that fails requests when told to.

    Failing requests get an S3 error document (`status`: 500 InternalError, 503 SlowDown, 403
    AccessDenied, 400 XAmzContentSHA256Mismatch: a body damaged in transit) without reaching moto, so a failed PUT or DELETE changes nothing. Rules:
    `fail_every(n)` fails every n-th request, `fail_next(k)` the next k, `fail_for(seconds)` all
    requests in a time window, `fail_when(predicate)` those matching `predicate(method, path)`.
    """

    upstream: str
    status: int = 503
    requests: int = 0
    failed: int = 0
    log: list[tuple[str, str, int]] = field(default_factory=list)
    _every: int = 0
    _next: int = 0
    _until: float = 0.0
    _when: Callable[[str, str], bool] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: object = None
    url: str = ""
    on_request: Callable[[str, str, dict[str, str]], None] | None = None  # sees every request first
    restarts: int = 0
    outages: list[tuple[float, float]] = field(default_factory=list)  # (down, up) monotonic times
    _connections: set = field(default_factory=set)

    # rules -------------------------------------------------------------------------------------
    def fail_every(self, n: int, status: int = 503) -> None:
        self.status, self._every = status, n

    def fail_next(self, k: int, status: int = 503) -> None:
        self.status, self._next = status, k

    def fail_for(self, seconds: float, status: int = 503) -> None:
        self.status, self._until = status, time.monotonic() + seconds

    def fail_when(self, predicate: Callable[[str, str], bool] | None, status: int = 503) -> None:
        self.status, self._when = status, predicate

    def heal(self) -> None:
        self._every = self._next = 0
        self._until = 0.0
        self._when = None

    def _should_fail(self, method: str, path: str) -> bool:
        with self._lock:
            self.requests += 1
            fail = (
                (self._every and self.requests % self._every == 0)
                or self._next > 0
                or time.monotonic() < self._until
                or (self._when is not None and self._when(method, path))
            )
            if self._next > 0:
                self._next -= 1
            if fail:
                self.failed += 1
            return bool(fail)

    # WSGI -----------------------------------------------------------------------------------------
    def __call__(self, environ, start_response):
        method = environ["REQUEST_METHOD"]
        path = environ.get("RAW_URI") or environ.get("REQUEST_URI") or environ.get("PATH_INFO", "/")
        if environ.get("QUERY_STRING") and "?" not in path:
            path += "?" + environ["QUERY_STRING"]
        length = environ.get("CONTENT_LENGTH")
        chunked = environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked"
        body = environ["wsgi.input"].read(int(length)) if length else (environ["wsgi.input"].read() if chunked else b"")
        if self.on_request is not None:
            self.on_request(
                method, path, {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
            )
        if self._should_fail(method, path):
            self.log.append((method, path, self.status))
            code, message = _ERRORS.get(self.status, ("InternalError", "injected failure"))
            doc = f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>'
            payload = b"" if method == "HEAD" else doc.encode()
            start_response(
                f"{self.status} Injected",
                [("Content-Type", "application/xml"), ("Content-Length", str(len(doc.encode())))],
            )
            return [payload]
        headers = {}
        for key, value in environ.items():
            if key.startswith("HTTP_"):
                name = key[5:].replace("_", "-")
                if name.lower() not in _HOP_BY_HOP:
                    headers[name] = value
        if environ.get("CONTENT_TYPE"):
            headers["Content-Type"] = environ["CONTENT_TYPE"]
        headers["Content-Length"] = str(len(body))
        host = self.upstream.split("://", 1)[1]
        conn = http.client.HTTPConnection(host, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _NOT_FORWARDED]
            self.log.append((method, path, resp.status))
            start_response(f"{resp.status} {resp.reason}", out)
        finally:
            conn.close()
        return [data]

    def start(self, port: int = 0) -> FaultProxy:
        from werkzeug.serving import WSGIRequestHandler, make_server

        connections = self._connections

        class Handler(WSGIRequestHandler):
            def setup(self) -> None:
                super().setup()
                connections.add(self.connection)

            def finish(self) -> None:
                connections.discard(self.connection)
                super().finish()

            def log_request(self, *args: object, **kwargs: object) -> None:  # quiet
                pass

        self._server = make_server("127.0.0.1", port, self, threaded=True, request_handler=Handler)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for conn in list(self._connections):  # drop open keep-alive connections too
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._connections.clear()

    def restart(self, downtime: float) -> None:
        """Go away (open connections reset, new ones refused) for `downtime` seconds, then come back."""
        port = self._server.server_address[1]
        down = time.monotonic()
        self.stop()
        time.sleep(downtime)
        self.start(port)
        self.restarts += 1
        self.outages.append((down, time.monotonic()))


@pytest.fixture
def s3_faults(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """A FaultProxy in front of moto; AWS_ENDPOINT_URL points at the proxy (create Storage after this)."""
    proxy = FaultProxy(upstream=s3_env).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    yield proxy
    proxy.stop()
