"""The one module that lists, reads, writes, renames and deletes: local folders and S3 alike.

Local writes go to a temporary file under `_state/tmp/` and are renamed into place (atomic on one
filesystem). On S3 every object is written by a single PUT or a completed multipart upload, which S3
makes visible all at once. Each published table partition is exactly one object, so a reader sees the
old or the new partition, never a mix.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

TMP = "_state/tmp"
TMP_PREFIX = TMP


class StorageError(RuntimeError):
    """A storage problem a user can act on (missing root, bucket, credentials)."""


@dataclass(frozen=True)
class FileInfo:
    path: str  # relative to the root, '/'-separated
    size: int
    mtime: float  # seconds since epoch (S3: LastModified)
    etag: str = ""


@dataclass(frozen=True)
class S3Settings:
    """S3 options in one place; both s3fs and Polars' native reader are configured from it."""

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

    def polars_options(self) -> dict[str, str]:
        opts: dict[str, str] = {}
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

    def __repr__(self) -> str:  # secrets never reach logs
        return (
            f"S3Settings(endpoint_url={self.endpoint_url!r}, region={self.region!r}, key={'***' if self.key else None})"
        )


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


@dataclass
class Storage:
    """A storage root: a local folder or `s3://bucket/prefix`."""

    root: str
    s3: S3Settings = field(default_factory=S3Settings.from_env)

    def __post_init__(self) -> None:
        self.root = self.root.rstrip("/") or "/"
        self.is_s3 = self.root.startswith("s3://")
        if self.is_s3:
            self.fs = fsspec.filesystem("s3", skip_instance_cache=True, **self.s3.s3fs_options())
            self.base = self.root[len("s3://") :]
        else:
            self.fs = fsspec.filesystem("file")
            self.base = os.path.abspath(self.root)

    # --- naming -------------------------------------------------------------------------------
    def path(self, rel: str) -> str:
        """Path inside the filesystem (what fsspec wants)."""
        return f"{self.base}/{rel}".rstrip("/") if rel else self.base

    def uri(self, rel: str) -> str:
        """Path or URL that Polars and other readers understand."""
        return f"s3://{self.path(rel)}" if self.is_s3 else self.path(rel)

    def polars_options(self) -> dict[str, str] | None:
        return self.s3.polars_options() or None if self.is_s3 else None

    def _rel(self, full: str) -> str:
        full = full.replace("\\", "/")
        base = self.base.replace("\\", "/")
        return full[len(base) + 1 :] if full.startswith(base + "/") else full

    # --- checks ------------------------------------------------------------------------------
    def check_root(self, create: bool = False) -> None:
        """Fail with one clear line when the root cannot be used."""
        try:
            if self.is_s3:
                bucket = self.base.split("/", 1)[0]
                if not self.fs.exists(bucket):
                    raise StorageError(f"bucket {bucket!r} does not exist or is not reachable")
                self.fs.ls(self.base) if self.fs.exists(self.base) else None
            elif not os.path.isdir(self.base):
                if create:
                    os.makedirs(self.base, exist_ok=True)
                else:
                    raise StorageError(f"storage root {self.root!r} does not exist")
        except StorageError:
            raise
        except PermissionError as exc:
            raise StorageError(f"access denied to {self.root}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - botocore/network errors become one line
            raise StorageError(f"cannot reach {self.root}: {type(exc).__name__}: {exc}") from None

    # --- reading -----------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def list_files(self, prefix: str, suffixes: tuple[str, ...] | None = None) -> list[FileInfo]:
        """Every file under `prefix` (any depth), skipping hidden and temporary names."""
        root = self.path(prefix)
        if not self.fs.exists(root):
            return []
        found = self.fs.find(root, detail=True)
        out = []
        for full, info in found.items():
            if info.get("type") == "directory":
                continue
            rel = self._rel(full)
            name = rel.rsplit("/", 1)[-1]
            if name.startswith((".", "_")):
                continue
            if suffixes and not name.lower().endswith(suffixes):
                continue
            out.append(FileInfo(rel, int(info.get("size") or 0), _mtime(info), str(info.get("ETag", "")).strip('"')))
        return sorted(out, key=lambda f: f.path)

    def list_dirs(self, prefix: str) -> list[str]:
        """Names of the immediate sub-folders of `prefix` (partition values)."""
        root = self.path(prefix)
        if not self.fs.exists(root):
            return []
        names = []
        for entry in self.fs.ls(root, detail=True):
            if entry.get("type") == "directory":
                names.append(entry["name"].rstrip("/").rsplit("/", 1)[-1])
        return sorted(names)

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def scan_parquet(self, rels: list[str]) -> pl.LazyFrame:
        """Lazy scan of the given Parquet files (hive keys are stored inside our files already)."""
        uris = [self.uri(r) for r in rels]
        return pl.scan_parquet(uris, storage_options=self.polars_options(), hive_partitioning=False)

    # --- writing -----------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic write: readers see the old object or the new one, never a partial one."""
        target = self.path(rel)
        if self.is_s3:
            self.fs.pipe_file(target, data)
            return
        tmp_dir = self.path(TMP)
        os.makedirs(tmp_dir, exist_ok=True)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = os.path.join(tmp_dir, f"{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)

    def write_json(self, rel: str, value: Any) -> None:
        self.write_bytes(rel, json.dumps(value, indent=2, sort_keys=True, default=str).encode())

    def write_parquet(self, rel: str, df: pl.DataFrame) -> None:
        buf = io.BytesIO()
        pq.write_table(arrow_for_readers(df), buf, compression="zstd")
        self.write_bytes(rel, buf.getvalue())

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create `rel` only if it does not exist; False if it does (best effort on S3)."""
        target = self.path(rel)
        if self.is_s3:
            if self.fs.exists(target):
                return False
            self.fs.pipe_file(target, data)
            return True
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return True

    def delete(self, rels: list[str]) -> None:
        """Delete files; missing ones are fine (deletes are retried after crashes)."""
        for rel in rels:
            target = self.path(rel)
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(target)
            if not self.is_s3:
                _prune_empty_dirs(os.path.dirname(target), self.base)


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
