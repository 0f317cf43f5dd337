"""The one module that lists, reads, writes, renames and deletes: local folders and S3 alike.

Nothing else in meterlake touches paths, files or S3 clients; everything goes through `Storage`.

- Local writes go to a temporary file under `_state/tmp/` and are renamed into place (atomic on one
  filesystem); exclusive creates (the run lock) are a hard link of a complete temporary file.
- On S3 every object is written by a single PUT (or one completed multipart upload above 100 MB), which
  S3 makes visible all at once. Each published table partition is exactly one object, so a reader sees
  the old or the new partition, never a mix. Exclusive creates use a conditional PUT (`If-None-Match`).
- s3fs does listing and object operations; Polars reads the same objects lazily with its native reader.
  Both are configured from one `S3Settings` (endpoint, region, credentials; the standard AWS variables
  by default), in their two option dialects.
- S3 requests that failed for a transient reason (5xx, throttling, timeouts, refused connections) are
  retried with backoff; every operation retried here is idempotent (GET, LIST, HEAD, PUT, DELETE).
  Errors a user must fix (missing bucket, rejected credentials, access denied, any other 4xx answer, which the
  same request would get again) become one-line `StorageError`s. Secrets never appear in reprs, logs or messages.

See docs/storage.md for the reader's side and for how producers should name landed batches.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import json
import logging
import os
import random
import re
import socket
import ssl
import stat
import time
import urllib.parse
import uuid
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

TMP = "_state/tmp"
HIDDEN = (".", "_")  # names (files or folders) that listings skip, as Spark, Hive and pyarrow do

log = logging.getLogger("meterlake.storage")
T = TypeVar("T")


class StorageError(RuntimeError):
    """A storage problem a user can act on (missing root or bucket, credentials, access, outage)."""


class RootError(ValueError):
    """A storage root that is neither a folder nor an `s3://bucket/prefix` URL: a mistake in the root itself."""


# What botocore accepts as a bucket name (it refuses anything else before sending a request); real S3 is
# stricter, S3-compatible stores are not always.
_BUCKET = re.compile(r"[a-zA-Z0-9.\-_]{1,255}")
_SCHEME = re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*)://")


def _check_root(root: str) -> None:
    """Refuse, before anything is read or written, a root that cannot be what the user meant."""
    if not root.strip():
        raise RootError("storage root is empty (an unset variable?); give a folder or s3://bucket/prefix")
    scheme = _SCHEME.match(root)
    if scheme is None:
        return
    if scheme.group(1) != "s3":
        raise RootError(f"unsupported storage root {root!r}: use a local folder or s3://bucket/prefix")
    bucket = root[len("s3://") :].split("/", 1)[0]
    if not bucket:
        raise RootError(f"storage root {root!r} names no bucket: use s3://bucket/prefix")
    if not _BUCKET.fullmatch(bucket):
        raise RootError(f"storage root {root!r}: {bucket!r} is not a valid bucket name")
    prefix = root[len("s3://") + len(bucket) + 1 :].rstrip("/")
    if "//" in prefix or prefix.startswith("/"):  # an empty key segment: Polars' reader refuses such paths
        raise RootError(f"storage root {root!r} has an empty folder name ('//'); use s3://bucket/prefix/sub")


def _without_userinfo(url: str) -> str:
    """`url` without a `user:password@` part, for messages: credentials in a URL must never be printed."""
    parts = urllib.parse.urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def endpoint_variable() -> str:
    """The variable the S3 endpoint is taken from, for messages: botocore's service-specific one wins."""
    return "AWS_ENDPOINT_URL_S3" if os.environ.get("AWS_ENDPOINT_URL_S3") else "AWS_ENDPOINT_URL"


def _check_endpoint(endpoint: str) -> None:
    """botocore refuses an endpoint without http(s):// only when its first request is made: say so at once."""
    try:
        parts = urllib.parse.urlsplit(endpoint)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        ok = False
    if not ok:
        raise StorageError(
            f"S3 endpoint {endpoint!r} ({endpoint_variable()}) is not an http:// or https:// URL, e.g. http://localhost:9000"
        )
    if "@" in parts.netloc:  # aiohttp refuses every request of such a client; never print the password
        raise StorageError(
            f"S3 endpoint {_without_userinfo(endpoint)!r} ({endpoint_variable()}) holds a user name or password (user:password@): S3 requests are "
            "signed with the AWS keys; remove it"
        )


@dataclass(frozen=True)
class FileInfo:
    path: str  # relative to the root, '/'-separated
    size: int
    mtime: float  # seconds since epoch (S3: LastModified)
    etag: str = ""


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of idempotent S3 requests: `attempts` in all, exponential backoff with jitter.

    The default rides out about 10-20 s of endpoint trouble; Prefect task retries come on top.
    """

    attempts: int = 8
    first_delay: float = 0.2
    max_delay: float = 10.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        return random.uniform(0.5, 1.0) * min(self.max_delay, self.first_delay * 2 ** (attempt - 1))

    def polars_options(self) -> dict[str, Any]:
        """The same policy in the option names of Polars' native object-store client."""
        return {
            "max_retries": max(self.attempts - 1, 0),
            "retry_init_backoff_ms": int(self.first_delay * 1000),
            "retry_max_backoff_ms": int(self.max_delay * 1000),
            "retry_timeout_ms": int(1000 * max(30.0, self.max_delay * self.attempts)),
        }


DEFAULT_RETRY = RetryPolicy()

# The command line's first request (`check_root(fail_fast=True)`, a one-key listing that S3 answers in milliseconds)
# is one attempt that waits PROBE_READ_TIMEOUT s for an answer once connected (every other request keeps s3fs's 15 s,
# and is retried), and PROBE_DEADLINE s in all: the backstop for what no socket timeout covers, such as a proxy that
# never answers its CONNECT. 2 s more than the read timeout, so that its more precise message wins when connecting
# takes less than that.
PROBE_READ_TIMEOUT = 10.0
PROBE_DEADLINE = PROBE_READ_TIMEOUT + 2.0


@dataclass(frozen=True)
class S3Settings:
    """S3 options in one place; both s3fs and Polars' native reader are configured from it.

    `from_env()` reads the standard AWS variables; explicit values override them. Anything left
    unset is resolved by the clients' own default chains (config files, instance roles).
    """

    endpoint_url: str | None = None
    region: str | None = None
    key: str | None = None
    secret: str | None = None
    token: str | None = None
    profile: str | None = None

    @classmethod
    def from_env(cls, **overrides: Any) -> S3Settings:
        env = os.environ
        values = {
            "endpoint_url": env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
            "key": env.get("AWS_ACCESS_KEY_ID"),
            "secret": env.get("AWS_SECRET_ACCESS_KEY"),
            "token": env.get("AWS_SESSION_TOKEN"),
            "profile": env.get("AWS_PROFILE"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def s3fs_options(self) -> dict[str, Any]:
        """s3fs / fsspec dialect (also what pandas and pyarrow-over-fsspec take as `storage_options`)."""
        opts: dict[str, Any] = {}
        if self.endpoint_url:
            opts["endpoint_url"] = self.endpoint_url
        if self.key:
            opts["key"] = self.key
        if self.secret:
            opts["secret"] = self.secret
        if self.token:
            opts["token"] = self.token
        if self.profile and not self.key:
            opts["profile"] = self.profile
        if self.region:
            opts["client_kwargs"] = {"region_name": self.region}
        return opts

    def polars_options(self) -> dict[str, Any]:
        """Polars' native (object_store) dialect: `pl.scan_parquet(..., storage_options=...)`."""
        opts: dict[str, Any] = {}
        if self.endpoint_url:
            opts["aws_endpoint_url"] = self.endpoint_url
            if self.endpoint_url.startswith("http://"):
                opts["aws_allow_http"] = "true"
        if self.region:
            opts["aws_region"] = self.region
        if self.key:
            opts["aws_access_key_id"] = self.key
        if self.secret:
            opts["aws_secret_access_key"] = self.secret
        if self.token:
            opts["aws_session_token"] = self.token
        if self.profile and not self.key:
            opts["aws_profile"] = self.profile
        return opts

    @property
    def shown_endpoint(self) -> str:
        """The endpoint for messages: without a `user:password@` part (botocore ignores it, logs must not show it)."""
        return _without_userinfo(self.endpoint_url) if self.endpoint_url else "AWS S3"

    def __repr__(self) -> str:  # secrets never reach logs
        endpoint = self.shown_endpoint if self.endpoint_url else None
        return (
            f"S3Settings(endpoint_url={endpoint!r}, region={self.region!r}, "
            f"key={'***' if self.key else None}, secret={'***' if self.secret else None}, "
            f"token={'***' if self.token else None}, profile={self.profile!r})"
        )

    __str__ = __repr__


def arrow_for_readers(df: pl.DataFrame) -> pa.Table:
    """Arrow table with plain `string` columns: pyarrow's hive reader rejects large_string beside string."""
    table = df.to_arrow()
    fields = []
    for f in table.schema:
        t = f.type
        if pa.types.is_large_string(t) or pa.types.is_string_view(t):
            t = pa.string()
        elif pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
            t = pa.binary()
        fields.append(pa.field(f.name, t, f.nullable))
    return table.cast(pa.schema(fields))


LISTED_SCAN_ATTEMPTS = 3  # see Storage.collect_listed
STATE_ROW_GROUP = 16_384  # rows per row group of state files: statistics can skip other meters' rows


@dataclass
class Storage:
    """A storage root: a local folder or `s3://bucket/prefix`."""

    root: str
    s3: S3Settings = field(default_factory=S3Settings.from_env)
    retry: RetryPolicy = field(default_factory=lambda: DEFAULT_RETRY, repr=False)

    def __post_init__(self) -> None:
        _check_root(self.root)
        self.root = self.root.rstrip("/") or "/"
        self.is_s3 = self.root.startswith("s3://")
        if self.is_s3:
            if self.s3.endpoint_url:
                _check_endpoint(self.s3.endpoint_url)
            self.base = self.root[len("s3://") :]
            self.bucket, _, self.key_prefix = self.base.partition("/")
            self.fs = self._s3fs()
        else:
            self.base = os.path.abspath(self.root)
            self.bucket = self.key_prefix = ""
            self.fs = fsspec.filesystem("file")

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its settings (Prefect's Dask task runner sends the handle to worker processes): the copy builds
        its own client as `__post_init__` does. fsspec would rebuild a pickled filesystem from its constructor's
        arguments alone, losing `retries = 1`, and s3fs would try 5 times inside each of our attempts again."""
        return (type(self), (self.root, self.s3, self.retry))

    def _s3fs(self, session: Any = None, **config: Any) -> Any:
        """An s3fs filesystem for this root; `config` adds botocore client options (`read_timeout`, ...)."""
        fs = fsspec.filesystem(
            "s3",
            skip_instance_cache=True,  # ours alone: fsspec never hands it (or the probe's short timeout) to others
            use_listings_cache=False,  # producers land files behind our back: always list afresh
            # one retry layer, ours (see _call); botocore's own would multiply the attempts
            config_kwargs={"retries": {"total_max_attempts": 1}, **config},
            session=session,
            **self.s3.s3fs_options(),
        )
        # and so would s3fs's (5 tries of a read timeout, a dropped connection, SlowDown): 8 x 5 x 15 s, over
        # 10 minutes per request, for an endpoint that accepts connections and never answers
        fs.retries = 1
        return fs

    def _probe(self, method: str, **kwargs: Any) -> Any:
        """The command line's first request, in one attempt bounded by PROBE_READ_TIMEOUT and PROBE_DEADLINE: an
        endpoint that accepts the connection but never answers is a StorageError in seconds, not in minutes.

        It goes through a short-lived client of its own, so that no other request ever gets the short timeout or
        sees a cancelled request; the client shares the main one's session (credentials resolved once, outside the
        deadline; the service model loaded once: ~25 ms instead of ~75 ms)."""
        from fsspec.asyn import sync
        from fsspec.exceptions import FSTimeoutError

        self.fs.connect()
        fs = self._s3fs(session=self.fs.session, read_timeout=PROBE_READ_TIMEOUT)
        sync(fs.loop, fs.set_session)  # the client, built without a request: the deadline is for the network only
        try:
            return sync(fs.loop, fs._call_s3, method, timeout=PROBE_DEADLINE, **kwargs)
        except Exception as exc:
            read_timeout = _read_timed_out(exc)
            if not read_timeout and not isinstance(exc, FSTimeoutError):
                raise
            endpoint = _endpoint_of(self.fs.s3.meta.endpoint_url)
            seconds = PROBE_READ_TIMEOUT if read_timeout else PROBE_DEADLINE
            proxy = _proxy_for(endpoint)
            if proxy:  # it accepted the connection: botocore raises ProxyConnectionError when none is made
                raise StorageError(
                    f"S3 endpoint {endpoint} did not answer within {seconds:g} s through the proxy {proxy}, which "
                    f"accepted the connection; check HTTPS_PROXY, HTTP_PROXY and NO_PROXY, and {endpoint_variable()}"
                ) from exc
            what = "accepted the connection but did not answer" if read_timeout else "did not answer"
            hint = self._endpoint_hint("healthy")
            raise StorageError(f"S3 endpoint {endpoint} {what} within {seconds:g} s; check {hint}") from exc

    def _endpoint_hint(self, state: str) -> str:
        """What to check when the endpoint cannot be reached or does not answer."""
        return f"{endpoint_variable()} and that the service is {state}" if self.s3.endpoint_url else "the network"

    # --- naming -------------------------------------------------------------------------------
    def path(self, rel: str) -> str:
        """Path inside the filesystem (what fsspec wants)."""
        return f"{self.base}/{rel}".rstrip("/") if rel else self.base

    def uri(self, rel: str) -> str:
        """Path or URL that Polars and other readers understand."""
        return f"s3://{self.path(rel)}" if self.is_s3 else self.path(rel)

    def polars_options(self) -> dict[str, Any] | None:
        """`storage_options` for Polars' native reader (None for a local root)."""
        if not self.is_s3:
            return None
        return {**self.s3.polars_options(), **self.retry.polars_options()}

    def fsspec_options(self) -> dict[str, Any]:
        """`storage_options` in the s3fs dialect, for pandas, Dask or pyarrow over fsspec."""
        return self.s3.s3fs_options() if self.is_s3 else {}

    def _rel(self, full: str) -> str:
        if os.sep != "/":  # on POSIX a backslash is an ordinary character of a file name
            full, base = full.replace(os.sep, "/"), self.base.replace(os.sep, "/")
        else:
            base = self.base
        return full[len(base) + 1 :] if full.startswith(base + "/") else full

    def _key(self, rel: str) -> str:
        """The S3 object key of `rel` (without the bucket)."""
        return "/".join(p for p in (self.key_prefix, rel) if p)

    # --- error handling ------------------------------------------------------------------------
    def _call(self, op: str, rel: str, fn: Callable[[], T], probe: bool = False) -> T:
        """Run one storage operation: retry transient S3 failures, turn user-fixable ones into StorageError.

        `probe`: the command line's first request (`check_root(fail_fast=True)`). An endpoint it cannot connect to
        at all (refused, unknown host, connect timeout) is wrong or down rather than briefly busy, and someone is
        waiting: one line at once instead of ~20 s of retries (and `Storage._probe` fails one that connects but does
        not answer). Any other request retries it, as every other transient failure: a scheduled run must not fail
        because the endpoint restarted as it began.
        Any other 4xx answer (InvalidRequest, InvalidArgument, EntityTooLarge, a 405 or 411...) is one line too,
        naming the operation, the object and S3's code and message: the same request would be refused again.
        FileNotFoundError and FileExistsError pass through unchanged: callers rely on them.
        """
        attempt = 1
        while True:
            try:
                return fn()
            except StorageError:
                raise
            except Exception as exc:
                kind, detail = _classify(exc) if self.is_s3 else _classify_local(exc)
                if kind == "refused" and isinstance(exc, (FileNotFoundError, FileExistsError)):
                    raise  # s3fs's reading of a 4xx answer as one that callers test for: never a refusal to report
                fixable = self._fixable(kind, detail, op, self.uri(rel))
                if fixable is not None:
                    raise fixable from exc
                if kind == "unreachable" and probe:
                    where, reason, _ = _connect_failure(exc) or ("?", "?", False)
                    hint = self._endpoint_hint("running")
                    what = f"S3 endpoint {where}"
                    if where.startswith("proxy "):  # the proxy was not reached, not the endpoint
                        hint, what = "HTTPS_PROXY, HTTP_PROXY and NO_PROXY", f"the {where} for S3"
                    raise StorageError(f"cannot connect to {what} ({reason}); check {hint}") from exc
                if kind not in ("transient", "unreachable"):
                    raise
                if attempt >= self.retry.attempts:
                    where = self.s3.shown_endpoint
                    raise StorageError(
                        f"storage unavailable: {op} {self.uri(rel)} still failing after {attempt} attempts ({detail});"
                        f" endpoint {where}"
                    ) from exc
                wait = self.retry.delay(attempt)
                log.warning(
                    "S3 %s %s failed (%s); retry %d of %d in %.2fs",
                    op,
                    self.uri(rel),
                    detail,
                    attempt,
                    self.retry.attempts - 1,
                    wait,
                )
                time.sleep(wait)
                attempt += 1

    def _fixable(self, kind: str, detail: str, op: str, uri: str) -> StorageError | None:
        """The one-line error of a failure a user must fix (never retried), None for any other kind."""
        if kind == "no_bucket":
            return StorageError(f"bucket {self.bucket!r} does not exist (root {self.root})")
        if kind == "no_credentials":
            return StorageError(
                f"no usable S3 credentials for {self.root} ({detail}); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            )
        if kind == "credentials":
            return StorageError(
                f"S3 rejected the credentials for {self.root} ({detail}); check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            )
        if kind == "denied":
            return StorageError(f"access denied: cannot {op} {uri} ({detail})")
        if kind == "region":
            return StorageError(
                f"wrong S3 region or endpoint for {self.root} ({detail}); check AWS_REGION or AWS_DEFAULT_REGION, "
                f"and {endpoint_variable()}"
            )
        if kind == "refused":  # the same request is refused again: a setting of the bucket or the service to fix
            return StorageError(f"S3 refused to {op} {uri} ({detail})")
        return None

    @contextlib.contextmanager
    def reader_errors(self) -> Iterator[None]:
        """Around the collection of a lazy scan of this root (`scan_parquet`): what Polars' own reader still fails
        with after its retries (`polars_options()`) becomes the StorageError any other request gives (access denied,
        rejected credentials, missing bucket, `storage unavailable`), not an `object-store error` that the command
        line can only call unexpected. A missing object stays a FileNotFoundError."""
        try:
            yield
        except OSError as exc:
            kind, detail, uri = _classify_reader(exc) if self.is_s3 else (*_classify_local(exc), "")
            if not uri.startswith(f"s3://{self.bucket}/"):  # none, or not a path-style request
                uri = self.root
            fixable = self._fixable(kind, detail, "read", uri)
            if fixable is not None:
                raise fixable from exc
            if kind != "transient":
                raise
            raise StorageError(
                f"storage unavailable: read {uri} still failing after {self.retry.attempts} attempts ({detail}); "
                f"endpoint {self.s3.shown_endpoint}"
            ) from exc

    def collect(self, frame: pl.LazyFrame, **kwargs: Any) -> pl.DataFrame:
        """`frame.collect(**kwargs)` for a lazy scan of this root, with `reader_errors()`."""
        with self.reader_errors():
            return frame.collect(**kwargs)

    def collect_listed(self, build: Callable[[], pl.LazyFrame]) -> pl.DataFrame:
        """`collect(build())`, where `build` lists the files it scans: listed and read again, up to LISTED_SCAN_ATTEMPTS
        times in all, when one of them is gone by the time it is read. For reads outside the run lock of files that
        a run deletes: the manifest files it compacts, the quarantine files of batches and days that reject nothing
        any more."""
        attempt = 1
        while True:
            try:
                return self.collect(build())
            except FileNotFoundError:
                if attempt >= LISTED_SCAN_ATTEMPTS:
                    raise
                attempt += 1

    # --- checks ------------------------------------------------------------------------------
    def check_root(self, create: bool = False, fail_fast: bool = False) -> None:
        """Fail with one clear line when the root cannot be used (missing, unreachable, refused).

        `fail_fast`: an S3 endpoint that cannot be connected to, or that does not answer within PROBE_READ_TIMEOUT,
        fails at once, without retries (the command line's choice; see `_call` and `_probe`)."""
        if self.is_s3:
            prefix = f"{self.key_prefix}/" if self.key_prefix else ""

            def list_one_key() -> Any:
                call = self._probe if fail_fast else self.fs.call_s3
                return call("list_objects_v2", Bucket=self.bucket, Prefix=prefix, MaxKeys=1)

            try:
                self._call("list", "", list_one_key, probe=fail_fast)
            except FileNotFoundError as exc:  # a 404 without S3's NoSuchBucket: some other HTTP server
                where = self.s3.shown_endpoint
                raise StorageError(
                    f"S3 endpoint {where} answered {_one_line(str(exc), 60)!r} to listing bucket {self.bucket!r}: "
                    f"it does not look like an S3 endpoint (check {endpoint_variable()})"
                ) from exc
            return
        if os.path.isdir(self.base):
            if not os.access(self.base, os.R_OK | os.X_OK):
                raise StorageError(f"access denied: cannot read storage root {self.root!r}")
            return
        if os.path.exists(self.base):
            raise StorageError(f"storage root {self.root!r} is not a folder")
        if not create:
            raise StorageError(f"storage root {self.root!r} does not exist")
        self._call("create", "", lambda: os.makedirs(self.base, exist_ok=True))

    # --- reading -----------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self._call("check", rel, lambda: self.fs.exists(self.path(rel)))

    def list_files(
        self,
        prefix: str,
        suffixes: tuple[str, ...] | None = None,
        start_after: str | None = None,
        prefer: Collection[str] = (),
    ) -> list[FileInfo]:
        """Every file under `prefix` (any depth), sorted by path; hidden names (`.x`, `_x`) are skipped.

        Sizes, modification times and ETags come from the listing itself: no object is opened.
        `start_after` (a path relative to the root) lists only paths sorting after it, which on S3
        means the listing starts there (ListObjectsV2 StartAfter) instead of at the first key.
        `prefer` (local roots): of several links to one file, the one listed is one of these paths if any (the paths
        a run has read already), else the one that sorts first; of several links to one folder in the same folder,
        the one walked is one that holds such a path, if any.
        """
        files = self._list_s3(prefix, start_after) if self.is_s3 else self._list_local(prefix, start_after, prefer)
        out = []
        for info in files:
            if _hidden(info.path, prefix):
                continue
            if suffixes and not info.path.lower().endswith(suffixes):
                continue
            out.append(info)
        return sorted(out, key=lambda f: f.path)

    def _list_s3(self, prefix: str, start_after: str | None) -> Iterator[FileInfo]:
        key_prefix = self._key(prefix) + "/" if prefix else (f"{self.key_prefix}/" if self.key_prefix else "")
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": key_prefix}
        if start_after:
            args["StartAfter"] = self._key(start_after)
        strip = len(self.key_prefix) + 1 if self.key_prefix else 0
        while True:
            page = self._call("list", prefix, functools.partial(self.fs.call_s3, "list_objects_v2", **args))
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key.endswith("/"):  # a "folder" marker some tools create
                    continue
                yield FileInfo(key[strip:], int(obj.get("Size") or 0), _mtime(obj), str(obj.get("ETag", "")).strip('"'))
            if not page.get("IsTruncated"):
                return
            args["ContinuationToken"] = page["NextContinuationToken"]

    def _list_local(self, prefix: str, start_after: str | None, prefer: Collection[str] = ()) -> Iterator[FileInfo]:
        top = self.path(prefix)
        real_top = os.path.realpath(top)
        # Linked folders are followed (a producer's folder linked into landing/ holds batches like any other), each
        # folder once: a link into the root (a sibling, a folder above, events/) or to a folder already listed
        # would list the same batches under a second path (the manifest, keyed by path, reads them again) or,
        # between two folders linked to each other, forever. Linked files are listed once too (`_linked_files`).
        inside = [os.path.realpath(self.base), real_top]
        seen = {real_top}
        listed: dict[str, str] = {}  # real path -> listed path, of the files in linked folders outside the tree
        links: list[tuple[str, str]] = []  # (listed path, path) of the links to files, decided after the walk
        held = _folders_of(prefer)  # of two links to one folder side by side, the one read before is walked
        outside_real: dict[str, str] = {}  # folder walked through a link out of the tree -> its real path
        for folder, dirs, names in os.walk(top, followlinks=True):
            rel_folder = self._rel(folder) if folder != self.base else ""
            real_folder = outside_real.pop(folder, None)  # in a linked folder: its files' paths are not their own
            outside = real_folder is not None
            # no folder is pruned by start_after: the files and links before it decide which later link is listed
            # hidden folders are never listed: not walked either, or a link to a folder under a hidden name that sorts
            # first (landing/.staging -> /data) would be the one walk of a folder also linked under a listed name
            walked = []
            for d in sorted(dirs, key=lambda d: (_join(rel_folder, d) not in held, d)):
                child = os.path.join(folder, d)
                real = None if d.startswith(HIDDEN) else _first_visit(child, inside, seen)
                if real is None:
                    continue
                walked.append(d)
                if not _is_within(real, real_top):
                    outside_real[child] = real
            dirs[:] = walked
            for name in names:
                rel = _join(rel_folder, name)
                full = os.path.join(folder, name)
                try:
                    st = os.lstat(full)  # a file's own size and time: the one call a file that is no link costs
                except FileNotFoundError:  # deleted while we walked
                    continue
                if stat.S_ISLNK(st.st_mode):
                    links.append((rel, full))
                    continue
                if outside and not _hidden(rel, prefix):
                    listed.setdefault(os.path.join(real_folder, name), rel)
                if not (start_after and rel <= start_after):
                    yield FileInfo(rel, st.st_size, st.st_mtime)
        for info in self._linked_files(prefix, real_top, links, listed, prefer):
            if not (start_after and info.path <= start_after):
                yield info

    def _linked_files(
        self,
        prefix: str,
        real_top: str,
        links: list[tuple[str, str]],
        listed: dict[str, str],
        prefer: Collection[str] = (),
    ) -> Iterator[FileInfo]:
        """The links to files among the listing's `links`, each file once: a link to a file the listing reaches
        anyway is skipped with a warning naming both, since the manifest, keyed by path, would read its batch a
        second time (its events then quarantined as duplicates). Reached anyway: under its own path in the listed
        tree (`landing/latest.jsonl` -> `2024/01/a.jsonl`), in a linked folder, or through another link that sorts
        first (two links to one file outside landing/), or that is in `prefer`: a link made after the run read its
        file through another one is no new batch, wherever it sorts. Any other link to a file, inside the root or
        outside it, is listed under its own path: it is the only way its batch is reached."""
        for rel, full in sorted(links, key=lambda link: (link[0] not in prefer, link[0])):
            if _hidden(rel, prefix):  # never listed: nothing to decide
                continue
            try:
                st = os.stat(full)
            except FileNotFoundError:  # never silently: its producer meant it to be read
                log.warning("%s is a link to %s, which does not exist: skipped", rel, os.readlink(full))
                continue
            real = os.path.realpath(full)
            reached = listed.get(real)
            if _is_within(real, real_top):  # listed under its own path, unless hidden (even past start_after)
                below = os.path.relpath(real, real_top).replace(os.sep, "/")
                reached = None if _hidden(below, "") else _join(prefix.rstrip("/"), below)
            if reached is not None:
                log.warning(
                    "%s is a link to the file listed as %s: skipped, so that its batch is read once", rel, reached
                )
                continue
            listed[real] = rel
            yield FileInfo(rel, st.st_size, st.st_mtime)

    def list_dirs(self, prefix: str) -> list[str]:
        """Names of the immediate sub-folders of `prefix` (partition values), hidden names skipped."""
        if self.is_s3:
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._key(prefix) + "/", "Delimiter": "/"}
            names = []
            while True:
                page = self._call("list", prefix, functools.partial(self.fs.call_s3, "list_objects_v2", **args))
                names += [p["Prefix"].rstrip("/").rsplit("/", 1)[-1] for p in page.get("CommonPrefixes", [])]
                if not page.get("IsTruncated"):
                    break
                args["ContinuationToken"] = page["NextContinuationToken"]
        else:
            top = self.path(prefix)
            if not os.path.isdir(top):
                return []
            names = [e.name for e in os.scandir(top) if e.is_dir()]
        return sorted(n for n in names if not n.startswith(HIDDEN))

    def read_bytes(self, rel: str) -> bytes:
        """The whole object, in one GET on S3: always one consistent version of it."""
        if self.is_s3:  # max_concurrency=1: one plain GET (no HEAD first, no parallel ranged GETs)
            return self._call("read", rel, lambda: self.fs.cat_file(self.path(rel), max_concurrency=1))
        return self._call("read", rel, lambda: self.fs.cat_file(self.path(rel)))

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def scan_parquet(self, rels: list[str]) -> pl.LazyFrame:
        """Lazy scan of the given Parquet files (hive keys are stored inside our files already).

        For files meterlake never rewrites (events, manifest). A published table partition that a
        concurrent run replaces can fail a lazy S3 scan (ranged reads of two versions); use
        `read_parquet` for those.
        """
        uris = [self.uri(r) for r in rels]
        # glob=False: these are exact paths; a root holding '[', '?' or '*' must not be read as a pattern
        return pl.scan_parquet(uris, storage_options=self.polars_options(), hive_partitioning=False, glob=False)

    def read_parquet(self, rels: list[str]) -> pl.DataFrame:
        """Eager read of the given Parquet files, each in one GET: consistent even while a run republishes."""
        frames = [pl.read_parquet(io.BytesIO(self.read_bytes(r)), hive_partitioning=False) for r in rels]
        return pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame()

    # --- writing -----------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic write: readers see the old object or the new one, never a partial one."""
        target = self.path(rel)
        if self.is_s3:
            self._call("write", rel, lambda: self.fs.pipe_file(target, data))
            return
        tmp = self._local_tmp(data)
        self._call("write", rel, lambda: os.makedirs(os.path.dirname(target), exist_ok=True))
        self._call("write", rel, lambda: os.replace(tmp, target))

    def _local_tmp(self, data: bytes) -> str:
        tmp_dir = self.path(TMP)
        tmp = os.path.join(tmp_dir, f"{uuid.uuid4().hex}.tmp")

        def write() -> None:
            os.makedirs(tmp_dir, exist_ok=True)
            with open(tmp, "wb") as fh:  # no fsync per file: `sync()` flushes everything before a commit
                fh.write(data)

        self._call("write", TMP, write)
        return tmp

    def write_json(self, rel: str, value: Any) -> None:
        self.write_bytes(rel, json.dumps(value, indent=2, sort_keys=True, default=str).encode())

    def write_parquet(
        self,
        rel: str,
        df: pl.DataFrame | pa.Table,
        row_group_size: int | None = None,
        state: bool = False,
        dictionary: list[str] | None = None,
    ) -> None:
        """One Parquet file. Published files (the default) get plain string types for every reader; `state`
        files, which only meterlake reads, take Polars' faster writer. `dictionary` limits dictionary encoding
        to the columns named (building a dictionary of unique values only to drop it costs time and bytes)."""
        buf = io.BytesIO()
        if state and isinstance(df, pl.DataFrame):
            df.write_parquet(
                buf, compression="zstd", compression_level=1, row_group_size=row_group_size or STATE_ROW_GROUP
            )
        else:
            table = df if isinstance(df, pa.Table) else arrow_for_readers(df)
            use_dictionary = True if dictionary is None else dictionary
            pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size, use_dictionary=use_dictionary)
        self.write_bytes(rel, buf.getvalue())

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create `rel` with `data` only if it does not exist; False if it does.

        Atomic on both roots: a hard link of a complete temporary file locally, a conditional PUT
        (`If-None-Match: *`) on S3. Endpoints without conditional writes fall back to check-then-put,
        which the lock's read-back check covers.
        """
        target = self.path(rel)
        if not self.is_s3:
            tmp = self._local_tmp(data)
            try:
                self._call("write", rel, lambda: os.makedirs(os.path.dirname(target), exist_ok=True))
                os.link(tmp, target)
                return True
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links: exclusive open, then write
                return self._create_exclusive_open(rel, data)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        try:
            self._call("create", rel, lambda: self.fs.pipe_file(target, data, mode="create"))
            return True
        except FileExistsError:
            return self._holds(rel, data)
        except OSError as exc:
            kind = _classify(exc)[0]
            if kind == "conflict":  # another writer's conditional PUT on the same key is in flight
                return False
            if kind == "exists":  # 412 from a store that does not name the condition (s3fs's FileExistsError needs it)
                return self._holds(rel, data)
            if kind != "unsupported":
                raise
            if self.exists(rel):
                return False
            self.write_bytes(rel, data)
            return True

    def _holds(self, rel: str, data: bytes) -> bool:
        """After a create found `rel` taken: ours if an earlier attempt of this very create got through before its
        response was lost."""
        with contextlib.suppress(FileNotFoundError):
            return self.read_bytes(rel) == data
        return False

    def _create_exclusive_open(self, rel: str, data: bytes) -> bool:
        target = self.path(rel)
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def write_parquet_many(
        self,
        items: list[tuple[str, pl.DataFrame | pa.Table]],
        row_group_size: int | None = None,
        state: bool = False,
        threads: int = 4,
        dictionary: list[str] | None = None,
    ) -> None:
        """Write many partitions concurrently (encoding and I/O release the GIL; S3 hides latency)."""
        if len(items) <= 1:
            for rel, df in items:
                self.write_parquet(rel, df, row_group_size, state, dictionary)
            return
        with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
            futures = [pool.submit(self.write_parquet, rel, df, row_group_size, state, dictionary) for rel, df in items]
            for future in futures:
                future.result()

    def sync(self) -> None:
        """Make every write so far durable before the commit point (one flush instead of one per file).

        A process crash never needs it (renames are atomic); a power loss does. S3 PUTs are durable
        when they return.
        """
        if not self.is_s3:
            os.sync()

    def delete(self, rels: list[str]) -> None:
        """Delete files; missing ones are fine (deletes are retried after crashes)."""
        for rel in rels:
            target = self.path(rel)
            with contextlib.suppress(FileNotFoundError):
                self._call("delete", rel, lambda target=target: self.fs.rm_file(target))
            if not self.is_s3:
                _prune_empty_dirs(os.path.dirname(target), self.base)


# --- helpers ---------------------------------------------------------------------------------------
def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _hidden(path: str, prefix: str) -> bool:
    """Whether a listing of `prefix` skips `path`: a name below `prefix` starting with `.` or `_`."""
    below = path[len(prefix) :].lstrip("/") if prefix else path
    return any(part.startswith(HIDDEN) for part in below.split("/"))


def _folders_of(paths: Collection[str]) -> set[str]:
    """Every folder holding one of `paths`, at any depth (each folder's ancestors are added once: 97k landed paths
    in 8k folders take 20 ms)."""
    folders: set[str] = set()
    for path in paths:
        folder = path.rpartition("/")[0]
        while folder and folder not in folders:
            folders.add(folder)
            folder = folder.rpartition("/")[0]
    return folders


def _first_visit(path: str, inside: list[str], seen: set[str]) -> str | None:
    """The real path of folder `path` if it is to be walked: not a link into the root or the listed tree (their
    folders are listed where they are), nor to a folder holding them, nor to a folder already walked under another
    path. Records it as walked. None if it is not to be walked."""
    real = os.path.realpath(path)
    linked_in = any(_is_within(real, folder) or _is_within(folder, real) for folder in inside)  # or above it
    if real in seen or (os.path.islink(path) and linked_in):
        log.debug("%s leads to %s, which the listing reaches anyway: not walked again", path, real)
        return None
    seen.add(real)
    return real


def _is_within(path: str, folder: str) -> bool:
    """Whether real path `path` is `folder` or inside it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _mtime(info: dict[str, Any]) -> float:
    value = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
    if hasattr(value, "timestamp"):
        return float(value.timestamp())
    return float(value)


def _prune_empty_dirs(path: str, stop: str) -> None:
    while path.startswith(stop) and path != stop:
        try:
            os.rmdir(path)
        except OSError:
            return
        path = os.path.dirname(path)


_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
    "RequestTimeTooSkewed",
}
_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "ProfileNotFound"}
# The bucket is in another region than the one the request was signed for, or must be reached through another endpoint
# (AWS itself redirects botocore to the right region; S3-compatible services and explicit regional endpoints do not)
_REGION_CODES = {
    "AuthorizationHeaderMalformed",
    "PermanentRedirect",
    "TemporaryRedirect",
    "Redirect",
    "IllegalLocationConstraintException",
}
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "InvalidObjectState"}
_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestLimitExceeded",
    "OperationAborted",
    "XAmzContentSHA256Mismatch",  # a body damaged in transit (s3fs retried it when it had a retry layer)
}


@functools.cache
def _transient_types() -> tuple[type[BaseException], ...]:
    """Network-level failures worth retrying (imported lazily: local roots never need botocore)."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    with contextlib.suppress(ImportError):
        from botocore import exceptions as bx
        from botocore.parsers import ResponseParserError  # a reply cut short or garbled by a proxy

        types += [
            bx.ConnectionError,
            bx.HTTPClientError,
            bx.IncompleteReadError,
            bx.ResponseStreamingError,
            ResponseParserError,
        ]
    with contextlib.suppress(ImportError):
        from fsspec.exceptions import FSTimeoutError

        types.append(FSTimeoutError)
    with contextlib.suppress(ImportError):
        import aiohttp

        types.append(aiohttp.ClientError)
    return tuple(types)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _classify(exc: BaseException) -> tuple[str, str]:
    """(kind, short description) of an S3 failure.

    Kinds: no_bucket, no_credentials, credentials, region (signed for another region, or redirected), denied,
    transient, unreachable (no connection at all: refused, unknown host, connect timeout, TLS or proxy failure;
    transient too), conflict, exists (a conditional create's key is taken), unsupported, refused (any other 4xx
    answer but a 404: a request S3 will refuse again, such as InvalidRequest, InvalidArgument or EntityTooLarge),
    other. The description holds the S3 error code and message, never request secrets.
    """
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            code = str(response["Error"].get("Code") or "")
            status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
            message = response["Error"].get("Message") or ""
            detail = _one_line(f"{code or status}: {message}" if message else (code or str(status)))
            if code == "NoSuchBucket":
                return "no_bucket", detail
            if code in _CREDENTIAL_CODES:
                return "credentials", detail
            if code in _REGION_CODES or status in (301, 307):
                return "region", detail
            if code == "ConditionalRequestConflict":
                return "conflict", detail
            if code in ("NotImplemented", "501") or status == 501:
                return "unsupported", detail
            if code == "PreconditionFailed" or status == 412:  # only a create sends a condition: the key is taken
                return "exists", detail
            if code in _TRANSIENT_CODES or status >= 500 or status in (408, 429):
                return "transient", detail
            if code in _DENIED_CODES or status == 403:
                return "denied", detail
            if 400 <= status < 500 and status != 404:  # a missing object is no refusal: s3fs raises FileNotFoundError
                return "refused", detail
            return "other", detail
        if type(e).__name__ in _CREDENTIAL_ERRORS:  # raised by botocore before any request is sent
            return "no_credentials", _one_line(str(e))
    failure = _connect_failure(exc)
    if failure:
        where, reason, connected = failure
        if connected:
            return "transient", _one_line(f"connection to {where} failed: {reason}")
        return "unreachable", _one_line(f"cannot connect to {where}: {reason}")
    for e in _chain(exc):
        if isinstance(e, _transient_types()):
            return "transient", _one_line(f"{type(e).__name__}: {e}")
    if isinstance(exc, PermissionError):
        return "denied", _one_line(str(exc))
    return "other", _one_line(str(exc))


_NO_CONNECTION = {
    "ConnectTimeoutError": "connection timed out",
    "SSLError": "TLS handshake failed",
    "ProxyConnectionError": "proxy connection failed",
}


def _connect_failure(exc: BaseException) -> tuple[str, str, bool] | None:
    """(endpoint, reason, connected) of a botocore ConnectionError, else None. Not `connected`: no connection could
    be made at all (refused, unknown host, connect timeout, TLS, proxy). `connected`: it was made, then reset or
    broken, which aiobotocore reports as EndpointConnectionError too (aiohttp's ClientOSError rather than its
    ClientConnectorError): the endpoint is there, and this is as transient as any other failure.
    The endpoint is `scheme://host:port`, without the request."""
    try:
        from botocore.exceptions import ConnectionError as NoConnection
    except ImportError:
        return None
    failed = next((e for e in _chain(exc) if isinstance(e, NoConnection)), None)
    if failed is None:
        return None
    kwargs = getattr(failed, "kwargs", {})
    proxy = kwargs.get("proxy_url")  # ProxyConnectionError: the proxy was not reached; its URL may hold credentials
    reason = _NO_CONNECTION.get(type(failed).__name__, type(failed).__name__)
    for e in _chain(failed):  # the innermost cause says it best: "Connection refused", "Name or service not known"
        if isinstance(e, ssl.SSLError):  # an OSError whose errno is the TLS library's, not the system's
            reason = f"TLS handshake failed: {getattr(e, 'reason', None) or e}"
        elif isinstance(e, socket.gaierror) and e.strerror:
            reason = e.strerror
        elif isinstance(e, OSError) and e.errno and e.errno > 0:
            reason = os.strerror(e.errno)
    where = _endpoint_of(proxy or kwargs.get("endpoint_url"))
    return (f"proxy {where}" if proxy else where), reason, _after_connecting(failed)


def _read_timed_out(exc: BaseException) -> bool:
    """A botocore ReadTimeoutError in `exc`'s chain: the connection was made and the request sent, and no answer came
    within the read timeout (aiobotocore reports a connect timeout, TLS handshake included, as ConnectTimeoutError)."""
    from botocore.exceptions import ReadTimeoutError

    return any(isinstance(e, ReadTimeoutError) for e in _chain(exc))


def _proxy_for(endpoint: str) -> str | None:
    """The proxy that requests to `endpoint` go through, as botocore picks it (HTTPS_PROXY, HTTP_PROXY, NO_PROXY),
    shown as `_endpoint_of` shows it; None without one."""
    from botocore.utils import get_environ_proxies

    proxy = get_environ_proxies(endpoint).get(urllib.parse.urlsplit(endpoint).scheme)
    if not proxy:
        return None
    return _endpoint_of(proxy if "://" in proxy else f"http://{proxy}")  # botocore assumes http:// too


def _endpoint_of(url: object) -> str:
    """`scheme://host:port` of a request or proxy URL, for messages: no path, no `user:password@` ('?' if none)."""
    parts = urllib.parse.urlsplit(str(url or ""))
    shown = _without_userinfo(f"{parts.scheme}://{parts.netloc}")
    return "?" if shown.endswith("://") else shown


def _after_connecting(failed: BaseException) -> bool:
    try:
        import aiohttp
    except ImportError:
        return False
    return any(
        isinstance(e, aiohttp.ClientOSError) and not isinstance(e, aiohttp.ClientConnectorError) for e in _chain(failed)
    )


_READER_CODE = re.compile(r"<Code>([^<]*)</Code>")
_READER_MESSAGE = re.compile(r"<Message>([^<]*)</Message>")
_READER_STATUS = re.compile(r"status code: (\d{3})")
_READER_URL = re.compile(r"Error performing [A-Z]+ (\S+)")


def _classify_reader(exc: OSError) -> tuple[str, str, str]:
    """(kind, short description, object URI) of a failure of Polars' native S3 reader (object_store), which reports
    S3's answer inside its message: `object-store error: ... Server returned non-2xx status code: 503 Service
    Unavailable: <Error><Code>SlowDown</Code>...`, after the URL of the request (`Error performing GET
    http://host/bucket/key`; the `(path: ...)` at its end names the scan's first file, not the failed one). Kinds as `_classify`; not_found for a missing
    object, refused for another 4xx answer, other for anything that is not such an error."""
    text = str(exc)
    if not text.startswith("object-store error"):
        return "other", _one_line(text), ""
    code = next(iter(_READER_CODE.findall(text)), "")
    message = next(iter(_READER_MESSAGE.findall(text)), "")
    status = int(next(iter(_READER_STATUS.findall(text)), 0))
    url = urllib.parse.urlsplit(next(iter(_READER_URL.findall(text)), ""))
    uri = "s3:/" + urllib.parse.unquote(url.path) if url.path.count("/") > 1 else ""  # path style: /bucket/key
    if code:
        detail = _one_line(f"{code}: {message}" if message else code)
    else:  # no answer from S3 (a refused or dropped connection, a timeout): the innermost cause says it best
        detail = _one_line(text.strip().splitlines()[-1].strip() if "Caused by" in text else text.split(" - ")[-1])
    if code == "NoSuchBucket":
        return "no_bucket", detail, uri
    if code in _CREDENTIAL_CODES:
        return "credentials", detail, uri
    redirect = re.search(r"Received redirect[^(]*", text)  # a 301 without Location: object_store shows no code then
    if redirect:
        detail = _one_line(redirect.group(0).strip())
    if code in _REGION_CODES or status in (301, 307) or redirect:
        return "region", detail, uri
    if isinstance(exc, FileNotFoundError):
        return "not_found", detail, uri
    if code in _DENIED_CODES or status == 403 or isinstance(exc, PermissionError):
        return "denied", detail, uri
    if code in _TRANSIENT_CODES:  # sent with a 4xx status too (400 RequestTimeout, 409 OperationAborted): as _classify
        return "transient", detail, uri
    if status and status < 500 and status not in (408, 429):
        return "refused", detail, uri
    return "transient", detail, uri  # Polars retried it already (5xx, throttling, connections, timeouts)


def _classify_local(exc: BaseException) -> tuple[str, str]:
    # A read-only mount or volume (EROFS) refuses every write as a permission does, but is no PermissionError
    if isinstance(exc, PermissionError) or (isinstance(exc, OSError) and exc.errno == errno.EROFS):
        return "denied", _one_line(f"{exc.strerror or exc}")
    return "other", _one_line(str(exc))
