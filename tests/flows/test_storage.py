"""The storage layer on both roots: listing, reading, atomic writes, exclusive creates, deletes, settings.

Tests taking `any_root` run twice: on a local folder and on S3 (moto on loopback, marked `s3`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
import s3fs
from polars.testing import assert_frame_equal

import flows.storage as storage_module
from flows.storage import TMP, RetryPolicy, RootError, S3Settings, Storage, StorageError

from fixtures_s3 import FAKE_KEY, FAKE_SECRET, SilentEndpoint, closed_port


def test_write_then_read_bytes_and_json(any_root: Storage) -> None:
    any_root.write_bytes("a/b/c.bin", b"\x00\x01payload")
    any_root.write_json("a/doc.json", {"x": [1, 2]})
    assert any_root.read_bytes("a/b/c.bin") == b"\x00\x01payload"
    assert any_root.read_json("a/doc.json") == {"x": [1, 2]}
    any_root.write_bytes("a/b/c.bin", b"second")  # overwrite in place
    assert any_root.read_bytes("a/b/c.bin") == b"second"
    assert any_root.exists("a/b/c.bin")
    assert not any_root.exists("a/b/missing.bin")
    with pytest.raises(FileNotFoundError):
        any_root.read_bytes("a/b/missing.bin")


def test_list_files_recurses_filters_and_skips_hidden(any_root: Storage) -> None:
    for rel, size in [
        ("landing/2024/01/15/a.jsonl", 3),
        ("landing/2024/01/15/b.parquet", 5),
        ("landing/2024/01/16/c.jsonl.gz", 7),
        ("landing/top.ndjson", 1),
        ("landing/notes.txt", 2),
        ("landing/.hidden.jsonl", 1),
        ("landing/_partial.jsonl", 1),
        ("landing/_temporary/0/part-0.jsonl", 1),  # Spark-style staging folder
        ("landing/.staging/x.jsonl", 1),
        ("landingzone/other.jsonl", 1),  # a sibling prefix, not under landing/
    ]:
        any_root.write_bytes(rel, b"x" * size)
    files = any_root.list_files("landing", (".jsonl", ".ndjson", ".jsonl.gz", ".parquet"))
    assert [f.path for f in files] == [
        "landing/2024/01/15/a.jsonl",
        "landing/2024/01/15/b.parquet",
        "landing/2024/01/16/c.jsonl.gz",
        "landing/top.ndjson",
    ]
    assert [f.size for f in files] == [3, 5, 7, 1]
    assert all(f.mtime > 1.6e9 for f in files)
    if any_root.is_s3:
        assert all(len(f.etag) == 32 for f in files)  # MD5 of a single-PUT object
    assert [f.path for f in any_root.list_files("landing")][-1] == "landing/top.ndjson"
    assert any_root.list_files("nothing/here") == []


def test_list_files_start_after_lists_only_later_paths(any_root: Storage) -> None:
    paths = [f"landing/2024/{m:02d}/{d:02d}/batch-{i}.jsonl" for m in (1, 2) for d in (1, 15, 28) for i in (1, 2)]
    paths += ["landing/2024/02/15b/x.jsonl", "landing/2024/02/1/x.jsonl", "landing/2025/x.jsonl", "landing/z.jsonl"]
    for p in paths:
        any_root.write_bytes(p, b"{}\n")
    everything = [f.path for f in any_root.list_files("landing")]
    assert everything == sorted(paths)
    for cursor in ["landing/2024/01/15/batch-1.jsonl", "landing/2024/02/", "landing/2024/02/15", "landing/2024/1", ""]:
        listed = [f.path for f in any_root.list_files("landing", start_after=cursor or None)]
        assert listed == [p for p in everything if p > cursor], cursor


def test_list_files_follows_a_linked_folder_and_stops_at_a_loop(tmp_path) -> None:
    # A folder linked into landing/ (a producer's mount) was skipped without a word: its batches were never read.
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "deep" / "x.jsonl").write_bytes(b"{}\n")
    root = tmp_path / "root"
    (root / "landing").mkdir(parents=True)
    (root / "landing" / "a.jsonl").write_bytes(b"{}\n")
    (root / "landing" / "linked").symlink_to(outside)
    (root / "landing" / "loop").symlink_to(root / "landing")  # a link to an ancestor is not walked again
    files = Storage(str(root)).list_files("landing")
    assert [f.path for f in files] == ["landing/a.jsonl", "landing/linked/deep/x.jsonl"]


def test_list_files_reads_each_folder_once_whatever_links_reach_it(tmp_path) -> None:
    # Links between two folders (a -> b, b -> a) were walked until the OS refused ("Too many levels of symbolic
    # links"): every run failed. A link to a folder the listing reaches anyway (a sibling inside landing/, the
    # root's own events/, an outside folder linked twice) listed its batches under a second path, which the
    # manifest (keyed by path) took for new batches: every event read again, quarantined as a duplicate.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.jsonl").write_bytes(b"{}\n")
    root = tmp_path / "root"
    for folder in ("landing/a", "landing/b", "events/date=2024-01-01"):
        (root / folder).mkdir(parents=True)
    (root / "landing" / "a" / "1.jsonl").write_bytes(b"{}\n")
    (root / "landing" / "b" / "2.jsonl").write_bytes(b"{}\n")
    (root / "events" / "date=2024-01-01" / "e.parquet").write_bytes(b"x")
    (root / "landing" / "a" / "to_b").symlink_to(root / "landing" / "b")
    (root / "landing" / "b" / "to_a").symlink_to(root / "landing" / "a")
    (root / "landing" / "c").symlink_to(root / "landing" / "a")
    (root / "landing" / "ours").symlink_to(root / "events")
    (root / "landing" / "p1").symlink_to(outside)
    (root / "landing" / "p2").symlink_to(outside)
    (root / "landing" / "up").symlink_to(tmp_path)  # holds the root: its events/ and _state/ are no batches
    files = Storage(str(root)).list_files("landing")
    assert [f.path for f in files] == ["landing/a/1.jsonl", "landing/b/2.jsonl", "landing/p1/x.jsonl"]


def test_list_files_lists_each_linked_file_once(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    # A link to a file (landing/latest.jsonl -> 2024/01/a.jsonl, or two links to one file outside landing/) listed
    # its batch under a second path, which the manifest (keyed by path) took for a new batch: every event read again,
    # quarantined as a duplicate. As for folders, a file the listing reaches anyway is listed once; a link that is
    # the only way to a file (outside landing/, or hidden in it) is listed under its own path.
    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        folder.mkdir()
    (one / "x.jsonl").write_bytes(b"{}\n")
    (two / "z.jsonl").write_bytes(b"{}\n")
    root = tmp_path / "root"
    landing = root / "landing"
    for folder in ("landing/2024/01", "landing/_archive", "exports"):
        (root / folder).mkdir(parents=True)
    (landing / "2024" / "01" / "a.jsonl").write_bytes(b"{}\n")
    (landing / "_archive" / "old.jsonl").write_bytes(b"{}\n")
    (root / "exports" / "e.jsonl").write_bytes(b"{}\n")
    (landing / "2024" / "01" / "b.jsonl").symlink_to("a.jsonl")  # a sibling, by a relative link
    (landing / "latest.jsonl").symlink_to(landing / "2024" / "01" / "a.jsonl")
    (landing / "p1.jsonl").symlink_to(one / "x.jsonl")
    (landing / "p2.jsonl").symlink_to(one / "x.jsonl")  # the same outside file again
    (landing / "linked").symlink_to(two)
    (landing / "z.jsonl").symlink_to(two / "z.jsonl")  # reached through the linked folder too
    (landing / "old.jsonl").symlink_to(landing / "_archive" / "old.jsonl")  # hidden under its own path
    (landing / "e.jsonl").symlink_to(root / "exports" / "e.jsonl")  # in the root, outside landing/
    with caplog.at_level(logging.WARNING, logger="meterlake.storage"):
        files = Storage(str(root)).list_files("landing", (".jsonl",))
    assert [f.path for f in files] == [
        "landing/2024/01/a.jsonl",
        "landing/e.jsonl",
        "landing/linked/z.jsonl",
        "landing/old.jsonl",
        "landing/p1.jsonl",
    ]
    assert sorted(r.getMessage() for r in caplog.records) == [
        f"landing/{link} is a link to the file listed as landing/{listed}: skipped, so that its batch is read once"
        for link, listed in [
            ("2024/01/b.jsonl", "2024/01/a.jsonl"),
            ("latest.jsonl", "2024/01/a.jsonl"),
            ("p2.jsonl", "p1.jsonl"),
            ("z.jsonl", "linked/z.jsonl"),
        ]
    ]


def test_list_files_warns_about_a_link_to_nothing(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "root"
    (root / "landing").mkdir(parents=True)
    (root / "landing" / "gone.jsonl").symlink_to(tmp_path / "nowhere.jsonl")
    with caplog.at_level(logging.WARNING, logger="meterlake.storage"):
        assert Storage(str(root)).list_files("landing") == []
    assert "landing/gone.jsonl" in caplog.text
    assert "does not exist" in caplog.text


def test_list_dirs_gives_partition_values(any_root: Storage) -> None:
    for value in ("2024-01-01", "2024-02-01", "2023-12-01"):
        any_root.write_bytes(f"usage/m/period/period_start={value}/data.parquet", b"x")
    any_root.write_bytes("usage/m/period/_staging/x", b"x")
    assert any_root.list_dirs("usage/m/period") == [
        "period_start=2023-12-01",
        "period_start=2024-01-01",
        "period_start=2024-02-01",
    ]
    assert any_root.list_dirs("usage") == ["m"]
    assert any_root.list_dirs("usage/none") == []


def test_delete_is_idempotent_and_prunes_empty_folders(any_root: Storage) -> None:
    any_root.write_bytes("usage/m/hourly/date=2024-01-01/data.parquet", b"x")
    any_root.write_bytes("usage/m/hourly/date=2024-01-02/data.parquet", b"y")
    any_root.delete(["usage/m/hourly/date=2024-01-01/data.parquet", "usage/m/hourly/date=2099-01-01/data.parquet"])
    any_root.delete(["usage/m/hourly/date=2024-01-01/data.parquet"])
    assert [f.path for f in any_root.list_files("usage")] == ["usage/m/hourly/date=2024-01-02/data.parquet"]
    assert any_root.list_dirs("usage/m/hourly") == ["date=2024-01-02"]
    if not any_root.is_s3:
        assert not os.path.exists(any_root.path("usage/m/hourly/date=2024-01-01"))


def test_writes_leave_no_temporary_files(any_root: Storage) -> None:
    for i in range(5):
        any_root.write_parquet(f"usage/m/period/period_start=2024-0{i + 1}-01/data.parquet", pl.DataFrame({"v": [i]}))
    assert any_root.list_files(TMP) == []
    names = {f.path.rsplit("/", 1)[-1] for f in any_root.list_files("usage")}
    assert names == {"data.parquet"}


def test_an_overwrite_never_changes_the_file_a_reader_has_open(tmp_path) -> None:
    # write-then-rename: a reader of the old version reads it whole, never the new bytes or a truncated file
    storage = Storage(str(tmp_path))
    rel = "usage/m/period/period_start=2024-01-01/data.parquet"
    storage.write_bytes(rel, b"old" * 1000)
    with open(storage.path(rel), "rb") as reader:
        first = reader.read(3)
        storage.write_bytes(rel, b"new" * 10)
        rest = reader.read()
    assert first + rest == b"old" * 1000
    assert storage.read_bytes(rel) == b"new" * 10


def test_a_write_that_dies_before_its_rename_leaves_nothing_in_the_published_folder(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = Storage(str(tmp_path))
    rel = "usage/m/period/period_start=2024-01-01/data.parquet"

    def crash(src: str, dst: str) -> None:
        raise KeyboardInterrupt  # the process dies between the write and the rename

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        storage.write_bytes(rel, b"new")
    left = [os.path.join(folder, name) for folder, _, names in os.walk(tmp_path / "usage") for name in names]
    assert left == []


def test_deleting_the_last_file_of_a_root_keeps_the_root(tmp_path) -> None:
    root = tmp_path / "root"
    (root / "usage" / "m").mkdir(parents=True)
    (root / "usage" / "m" / "data.parquet").write_bytes(b"x")
    storage = Storage(str(root))
    storage.delete(["usage/m/data.parquet"])
    assert root.is_dir() and list(root.iterdir()) == []  # empty folders pruned up to the root, not the root


def test_list_files_matches_suffixes_in_any_case(tmp_path) -> None:
    storage = Storage(str(tmp_path))
    for rel in ("landing/A.JSONL", "landing/b.Parquet", "landing/c.JSONL.GZ", "landing/d.TXT"):
        storage.write_bytes(rel, b"x")
    found = [f.path for f in storage.list_files("landing", (".jsonl", ".jsonl.gz", ".parquet"))]
    assert found == ["landing/A.JSONL", "landing/b.Parquet", "landing/c.JSONL.GZ"]


@pytest.mark.s3
def test_list_files_skips_s3_folder_markers(s3_env: str, s3_root: str) -> None:
    from fixtures_s3 import s3_client

    bucket = s3_root.removeprefix("s3://").split("/")[0]
    client = s3_client(s3_env)
    client.put_object(Bucket=bucket, Key="prefix/landing/2024/", Body=b"")  # what consoles create for a folder
    client.put_object(Bucket=bucket, Key="prefix/landing/2024/a.jsonl", Body=b"x")
    assert [f.path for f in Storage(s3_root).list_files("landing")] == ["landing/2024/a.jsonl"]


def test_parquet_round_trip_with_plain_string_columns(any_root: Storage) -> None:
    df = pl.DataFrame({"subject": ["a", "b", None], "value": [1.5, 2.0, 3.25]})
    any_root.write_parquet("t/x.parquet", df, row_group_size=2)
    assert_frame_equal(any_root.read_parquet(["t/x.parquet"]), df)
    assert_frame_equal(any_root.scan_parquet(["t/x.parquet"]).collect(), df)
    schema = pq.read_schema(io.BytesIO(any_root.read_bytes("t/x.parquet")))
    assert str(schema.field("subject").type) == "string"  # not large_string: pyarrow hive readers merge cleanly
    assert any_root.read_parquet([]).is_empty()


def test_dictionary_encoding_only_for_the_columns_named(tmp_path) -> None:
    storage = Storage(str(tmp_path))
    df = pl.DataFrame({"type": ["a", "a", "b"] * 100, "id": [f"id-{i}" for i in range(300)]})
    storage.write_parquet_many([("e/1.parquet", df), ("e/2.parquet", df)], dictionary=["type"])
    storage.write_parquet("e/3.parquet", df)
    for name, dictionary_for in (("1", {"type"}), ("2", {"type"}), ("3", {"type", "id"})):
        meta = pq.read_metadata(io.BytesIO(storage.read_bytes(f"e/{name}.parquet")))
        columns = [meta.row_group(0).column(i) for i in range(meta.num_columns)]
        assert {c.path_in_schema for c in columns if c.has_dictionary_page} == dictionary_for
        assert_frame_equal(storage.read_parquet([f"e/{name}.parquet"]), df)


def test_create_exclusive_once(any_root: Storage) -> None:
    assert any_root.create_exclusive("_state/lock.json", b"first")
    assert not any_root.create_exclusive("_state/lock.json", b"second")
    assert any_root.read_bytes("_state/lock.json") == b"first"
    any_root.delete(["_state/lock.json"])
    assert any_root.create_exclusive("_state/lock.json", b"third")
    assert any_root.list_files(TMP) == []


def test_create_exclusive_has_one_winner_under_a_race(any_root: Storage) -> None:
    results: dict[int, bool] = {}
    barrier = threading.Barrier(5)

    def contender(i: int) -> None:
        storage = Storage(any_root.root, any_root.s3)  # each its own client, as separate processes would
        barrier.wait()
        results[i] = storage.create_exclusive("_state/lock.json", f"run-{i}".encode())

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, won in results.items() if won]
    assert len(winners) == 1
    assert any_root.read_bytes("_state/lock.json") == f"run-{winners[0]}".encode()


def test_local_root_checks(tmp_path) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        Storage(str(tmp_path / "missing")).check_root()
    Storage(str(tmp_path / "made")).check_root(create=True)
    assert (tmp_path / "made").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="not a folder"):
        Storage(str(tmp_path / "file")).check_root()


@pytest.mark.parametrize(
    ("root", "message"),
    [
        ("", "is empty"),  # an unset variable: once meant the filesystem root
        ("   ", "is empty"),
        ("gs://bucket/x", "unsupported storage root"),  # once a local folder named 'gs:'
        ("http://host/x", "unsupported storage root"),
        ("file:///tmp/x", "unsupported storage root"),
        ("s3://", "names no bucket"),
        ("s3:///x", "names no bucket"),
        ("s3://Bad_Bucket!/x", "not a valid bucket name"),
        ("s3://bucket//x", "empty folder name"),  # key '/x/...': Polars' reader refuses empty segments
        ("s3://bucket/a//b", "empty folder name"),
    ],
)
def test_roots_that_cannot_be_meant_are_refused(root: str, message: str) -> None:
    with pytest.raises(RootError, match=message):
        Storage(root, S3Settings())


def test_valid_roots_are_accepted(tmp_path) -> None:
    assert Storage("/").base == "/"
    assert Storage(str(tmp_path) + "/").root == str(tmp_path)
    s3 = Storage("s3://my.bucket-1/some/prefix/", S3Settings())
    assert (s3.bucket, s3.key_prefix) == ("my.bucket-1", "some/prefix")
    assert Storage("s3://bucket/p//", S3Settings()).key_prefix == "p"  # trailing slashes are only stripped
    assert Storage("s3://bucket/", S3Settings()).key_prefix == ""


@pytest.mark.skipif(os.sep != "/", reason="a backslash separates folders on Windows")
def test_a_backslash_in_a_local_file_name_is_part_of_the_name(tmp_path) -> None:
    storage = Storage(str(tmp_path))
    storage.write_bytes("landing/back\\slash/x.jsonl", b"{}\n")
    [info] = storage.list_files("landing")
    assert info.path == "landing/back\\slash/x.jsonl"
    assert storage.read_bytes(info.path) == b"{}\n"


@pytest.mark.parametrize(("name", "sibling"), [("root[1]", "root1"), ("root?x", "rootAx"), ("root*", "rootzz")])
def test_scan_parquet_takes_paths_literally(any_root: Storage, name: str, sibling: str) -> None:
    """Glob characters in the root (a folder or a prefix) are part of the name, not a pattern: read as a pattern,
    the root would also match (or only match) its sibling's file."""
    for folder, values in ((name, [1, 2]), (sibling, [9])):
        storage = Storage(any_root.uri(folder), any_root.s3)
        if not storage.is_s3:
            os.makedirs(storage.base)
        storage.write_parquet("t/a.parquet", pl.DataFrame({"x": values}))
    storage = Storage(any_root.uri(name), any_root.s3)
    assert storage.scan_parquet(["t/a.parquet"]).collect()["x"].to_list() == [1, 2]


@pytest.mark.parametrize("endpoint", ["localhost:9000", "127.0.0.1:9000", "http://", "ftp://host:21", "http://h:port"])
def test_an_endpoint_that_is_not_an_http_url_is_a_storage_error(endpoint: str) -> None:
    with pytest.raises(StorageError, match="is not an http:// or https:// URL"):
        Storage("s3://bucket/x", S3Settings(endpoint_url=endpoint))
    Storage("s3://bucket/x", S3Settings(endpoint_url="https://s3.example.com:9000"))  # fine


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
def test_endpoint_messages_name_the_variable_it_came_from(variable: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS_ENDPOINT_URL_S3 wins over AWS_ENDPOINT_URL (botocore's rule): the message sends the user to that one."""
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv(variable, "localhost:9000")
    with pytest.raises(StorageError, match=rf"'localhost:9000' \({variable}\) is not an http"):
        Storage("s3://bucket/x", S3Settings.from_env())


def test_an_endpoint_nothing_listens_on_fails_the_root_check_at_once(caplog: pytest.LogCaptureFixture) -> None:
    """The first request of a command cannot connect: one attempt, one message naming the endpoint. Later
    requests (the endpoint went away in the middle of a run) are retried in full."""
    endpoint = f"http://127.0.0.1:{closed_port()}"
    settings = S3Settings(endpoint_url=endpoint, region="us-east-1", key=FAKE_KEY, secret=FAKE_SECRET)
    storage = Storage("s3://bucket/x", settings, retry=RetryPolicy(attempts=4, first_delay=0.001, max_delay=0.001))
    with caplog.at_level(logging.WARNING, logger="meterlake.storage"):
        with pytest.raises(StorageError) as failure:
            storage.check_root(fail_fast=True)
        assert str(failure.value) == (
            f"cannot connect to S3 endpoint {endpoint} (Connection refused); "
            "check AWS_ENDPOINT_URL and that the service is running"
        )
        assert caplog.records == []  # not one retry
        with pytest.raises(StorageError, match="still failing after 4 attempts") as failure:
            storage.read_bytes("a.json")
    retries = [r.getMessage() for r in caplog.records]
    assert len(retries) == 3, retries
    assert all(f"failed (cannot connect to {endpoint}: Connection refused); retry" in r for r in retries), retries


def test_without_fail_fast_the_root_check_retries_an_endpoint_it_cannot_connect_to(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Deployment runs check the root without fail_fast: an endpoint restarting as a scheduled run begins is
    ridden out like any other transient failure instead of failing the run."""
    endpoint = f"http://127.0.0.1:{closed_port()}"
    settings = S3Settings(endpoint_url=endpoint, region="us-east-1", key=FAKE_KEY, secret=FAKE_SECRET)
    storage = Storage("s3://bucket/x", settings, retry=RetryPolicy(attempts=3, first_delay=0.001, max_delay=0.001))
    with (
        caplog.at_level(logging.WARNING, logger="meterlake.storage"),
        pytest.raises(StorageError, match="still failing after 3 attempts"),
    ):
        storage.check_root()
    assert len(caplog.records) == 2, [r.getMessage() for r in caplog.records]


def test_a_proxy_nothing_listens_on_is_named_as_the_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through a proxy (HTTP_PROXY), the connection that fails is the proxy's: the line names it, without the
    credentials its URL holds, and points at the proxy variables rather than at AWS_ENDPOINT_URL."""
    port = closed_port()
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://proxyuser:proxy-secret@127.0.0.1:{port}")
    settings = S3Settings(endpoint_url="http://s3.test:9000", region="us-east-1", key=FAKE_KEY, secret=FAKE_SECRET)
    storage = Storage("s3://bucket/x", settings, retry=RetryPolicy(attempts=4, first_delay=0.001, max_delay=0.001))
    with pytest.raises(StorageError) as failure:
        storage.check_root(fail_fast=True)
    assert str(failure.value) == (
        f"cannot connect to the proxy http://127.0.0.1:{port} for S3 (Connection refused); "
        "check HTTPS_PROXY, HTTP_PROXY and NO_PROXY"
    )


def test_an_endpoint_that_never_answers_fails_the_root_check_in_one_attempt(
    silent_endpoint: SilentEndpoint, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The first request of a command connects and gets no answer: one attempt, cut at the probe's read timeout
    (10 s from the command line, shortened here), one line naming the endpoint. It used to wait for s3fs's 15 s read
    timeout, 5 times per attempt, in 8 attempts: over 10 minutes."""
    monkeypatch.setattr(storage_module, "PROBE_READ_TIMEOUT", 0.3)
    settings = S3Settings(endpoint_url=silent_endpoint.url, region="us-east-1", key=FAKE_KEY, secret=FAKE_SECRET)
    storage = Storage("s3://bucket/x", settings, retry=RetryPolicy(attempts=4, first_delay=0.001, max_delay=0.001))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="meterlake.storage"), pytest.raises(StorageError) as failure:
        storage.check_root(fail_fast=True)
    elapsed = time.monotonic() - started
    assert str(failure.value) == (
        f"S3 endpoint {silent_endpoint.url} accepted the connection but did not answer within 0.3 s; "
        "check AWS_ENDPOINT_URL and that the service is healthy"
    )
    assert caplog.records == [] and silent_endpoint.accepted == 1  # one attempt: no retry by us or by s3fs
    assert elapsed < 5, elapsed
    # the short timeout was the probe's own client: the storage's client keeps s3fs's read timeout and retries
    assert storage.fs.s3.meta.config.read_timeout == s3fs.S3FileSystem.read_timeout == 15
    assert storage.fs.retries == 1  # one retry layer, ours: the failed probe changed nothing


def test_a_garbled_reply_is_transient() -> None:
    """A reply cut short or garbled on the way (a proxy) is retried by our loop, the only one."""
    from botocore.parsers import ResponseParserError

    assert storage_module._classify(ResponseParserError("Unable to parse response, invalid XML"))[0] == "transient"


def _client_error(code: str, status: int) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("SlowDown", 503, "transient"),
        ("TooManyRequests", 429, "transient"),
        ("RequestTimeout", 400, "transient"),  # S3 sends these with a 4xx status: still worth retrying
        ("OperationAborted", 409, "transient"),
        ("XAmzContentSHA256Mismatch", 400, "transient"),
        ("InternalError", 500, "transient"),
        ("BadGateway", 502, "transient"),
        ("AccessDenied", 403, "denied"),
        ("403", 403, "denied"),  # a HEAD has no body: only its status says why
        ("InvalidAccessKeyId", 403, "credentials"),
        ("SignatureDoesNotMatch", 403, "credentials"),
        ("ExpiredToken", 400, "credentials"),
        ("NoSuchBucket", 404, "no_bucket"),
        ("NotImplemented", 501, "unsupported"),
        ("ConditionalRequestConflict", 409, "conflict"),
        ("RequestTimeout", 408, "transient"),
        ("408", 408, "transient"),  # a HEAD has no body: its status alone
        ("NoSuchKey", 404, "other"),  # a missing object: s3fs's FileNotFoundError, which callers test for
        # a request that will fail the same way again: never retried, one line naming it (it was "other": exit 1)
        ("InvalidRequest", 400, "refused"),
        ("InvalidArgument", 400, "refused"),
        ("EntityTooLarge", 400, "refused"),
        ("400", 400, "refused"),
        ("MethodNotAllowed", 405, "refused"),
        ("BucketNotEmpty", 409, "refused"),
        ("MissingContentLength", 411, "refused"),
        ("PreconditionFailed", 412, "exists"),  # the answer to a create (If-None-Match) whose key is taken
        ("412", 412, "exists"),
        ("InvalidRange", 416, "refused"),
    ],
)
def test_s3_errors_are_classified_transient_or_permanent(code: str, status: int, kind: str) -> None:
    wrapped = OSError("translated by s3fs")
    wrapped.__cause__ = _client_error(code, status)
    assert storage_module._classify(_client_error(code, status))[0] == kind
    assert storage_module._classify(wrapped)[0] == kind


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (TimeoutError("timed out"), "transient"),
        (ConnectionResetError("reset by peer"), "transient"),
        (PermissionError("Access Denied"), "denied"),
        (ValueError("bad request"), "other"),
    ],
)
def test_errors_without_an_s3_response_are_classified(error: Exception, kind: str) -> None:
    assert storage_module._classify(error)[0] == kind


def _s3_storage_with_put(monkeypatch: pytest.MonkeyPatch, put: Callable[..., None], stored: bytes) -> Storage:
    settings = S3Settings(endpoint_url="http://127.0.0.1:9", region="us-east-1", key=FAKE_KEY, secret=FAKE_SECRET)
    storage = Storage("s3://bucket/x", settings, retry=RetryPolicy(attempts=2, first_delay=0.001, max_delay=0.001))
    monkeypatch.setattr(storage.fs, "pipe_file", put)
    monkeypatch.setattr(storage.fs, "cat_file", lambda path, **kw: stored)
    return storage


def test_an_s3_conditional_put_losing_a_race_in_flight_is_not_created(monkeypatch: pytest.MonkeyPatch) -> None:
    def put(path: str, data: bytes, mode: str = "overwrite") -> None:
        raise OSError("conflict") from _client_error("ConditionalRequestConflict", 409)

    assert _s3_storage_with_put(monkeypatch, put, b"theirs").create_exclusive("_state/lock.json", b"ours") is False


@pytest.mark.parametrize(("stored", "created"), [(b"ours", True), (b"theirs", False)])
def test_an_s3_create_answered_412_without_its_condition_is_a_taken_key(
    monkeypatch: pytest.MonkeyPatch, stored: bytes, created: bool
) -> None:
    """s3fs reads a 412 as FileExistsError only when the answer names the If-None-Match condition; from a store
    that does not, the lock's create ended the command with "S3 refused to create" (exit 3; before that,
    "unexpected", exit 1) instead of finding the lock held."""
    from s3fs.errors import translate_boto_error

    def put(path: str, data: bytes, mode: str = "overwrite") -> None:
        raise translate_boto_error(_client_error("PreconditionFailed", 412))

    storage = _s3_storage_with_put(monkeypatch, put, stored)
    assert storage.create_exclusive("_state/lock.json", b"ours") is created


@pytest.mark.parametrize(("stored", "created"), [(b"ours", True), (b"theirs", False)])
def test_an_s3_create_whose_response_was_lost_is_ours_only_if_the_object_holds_our_bytes(
    monkeypatch: pytest.MonkeyPatch, stored: bytes, created: bool
) -> None:
    # the first attempt's PUT got through but its response was lost: the retry finds the key taken
    def put(path: str, data: bytes, mode: str = "overwrite") -> None:
        raise FileExistsError(path)

    storage = _s3_storage_with_put(monkeypatch, put, stored)
    assert storage.create_exclusive("_state/lock.json", b"ours") is created


def test_without_fail_fast_an_endpoint_that_never_answers_is_retried(
    silent_endpoint: SilentEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    """Deployment runs and every later request ride out an endpoint that does not answer, as any transient failure,
    in our retry loop alone: one connection per attempt (s3fs's own 5 tries each made it 8 x 5 x 15 s, over 10
    minutes per request). (The storage's client gets a short read timeout here so that the test takes seconds;
    normally it is 15 s.)"""
    settings = S3Settings(endpoint_url=silent_endpoint.url, region="us-east-1", key=FAKE_KEY, secret=FAKE_SECRET)
    storage = Storage("s3://bucket/x", settings, retry=RetryPolicy(attempts=3, first_delay=0.001, max_delay=0.001))
    storage.fs = storage._s3fs(read_timeout=0.3)
    with (
        caplog.at_level(logging.WARNING, logger="meterlake.storage"),
        pytest.raises(StorageError, match=r"still failing after 3 attempts .*ReadTimeoutError"),
    ):
        storage.check_root()
    assert len(caplog.records) == 2, [r.getMessage() for r in caplog.records]
    assert silent_endpoint.accepted == 3


@pytest.mark.s3
def test_the_probe_has_a_client_of_its_own(s3_root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command line's first request goes through a short-lived client with the short read timeout; the storage's
    own client, which every later request uses, keeps the normal one. Neither retries inside s3fs or botocore."""
    storage = Storage(s3_root)
    made = []

    def spy(**kwargs):
        made.append(Storage._s3fs(storage, **kwargs))
        return made[-1]

    monkeypatch.setattr(storage, "_s3fs", spy)
    storage.check_root(fail_fast=True)
    [probe] = made
    assert probe is not storage.fs and probe.session is storage.fs.session  # credentials resolved once
    assert (probe.s3.meta.config.read_timeout, probe.retries) == (storage_module.PROBE_READ_TIMEOUT, 1)
    assert storage.fs.s3.meta.config.read_timeout == s3fs.S3FileSystem.read_timeout == 15
    for fs in (probe, storage.fs):  # one retry layer, ours
        assert fs.s3.meta.config.retries["total_max_attempts"] == 1 and fs.retries == 1
    storage.write_bytes("a.json", b"{}")
    assert storage.read_bytes("a.json") == b"{}" and len(made) == 1


@pytest.mark.s3
def test_a_storage_sent_to_another_process_keeps_one_retry_layer(s3_root: str) -> None:
    """Prefect's Dask task runner pickles the Storage handle into worker processes. fsspec rebuilds a pickled
    filesystem from its constructor's arguments, which do not hold `retries`: s3fs's 5 tries came back inside each
    of our attempts there (8 x 5 x 15 s against an endpoint that never answers)."""
    import pickle

    import cloudpickle

    storage = Storage(s3_root)
    for dumps in (pickle.dumps, cloudpickle.dumps):
        copy = pickle.loads(dumps(storage))
        assert (copy.root, copy.s3, copy.retry) == (storage.root, storage.s3, storage.retry)
        assert copy.fs.retries == 1 and copy.fs.s3.meta.config.retries["total_max_attempts"] == 1
        copy.write_bytes("a.json", b"{}")
        assert storage.read_bytes("a.json") == b"{}"


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_proxy_that_never_answers_is_named_as_the_proxy(
    scheme: str, silent_endpoint: SilentEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through a proxy that accepts the connection and never answers, the line names both, without the proxy's
    credentials. An http:// endpoint's request times out reading the answer; an https:// one waits for the answer to
    its CONNECT, which no socket timeout covers (aiohttp): the probe's deadline cuts it. The http:// deadline is far
    from the read timeout: the deadline also covers building the client, which took over 0.7 s on a loaded CI machine."""
    monkeypatch.setattr(storage_module, "PROBE_READ_TIMEOUT", 0.3)
    monkeypatch.setattr(storage_module, "PROBE_DEADLINE", 8.0 if scheme == "http" else 1.0)
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    proxy = silent_endpoint.url
    monkeypatch.setenv(f"{scheme.upper()}_PROXY", proxy.replace("://", "://proxyuser:proxy-secret@"))
    endpoint = f"{scheme}://s3.test:9000"
    settings = S3Settings(endpoint_url=endpoint, region="us-east-1", key=FAKE_KEY, secret=FAKE_SECRET)
    storage = Storage("s3://bucket/x", settings, retry=RetryPolicy(attempts=4, first_delay=0.001, max_delay=0.001))
    started = time.monotonic()
    with pytest.raises(StorageError) as failure:
        storage.check_root(fail_fast=True)
    assert time.monotonic() - started < (8 if scheme == "http" else 5)
    seconds = "0.3" if scheme == "http" else "1"
    assert str(failure.value) == (
        f"S3 endpoint {endpoint} did not answer within {seconds} s through the proxy {proxy}, which accepted the "
        "connection; check HTTPS_PROXY, HTTP_PROXY and NO_PROXY, and AWS_ENDPOINT_URL"
    )
    assert silent_endpoint.accepted == 1


@pytest.fixture
def resetting_endpoint() -> Iterator[str]:
    """An endpoint that accepts each connection, reads the request and resets the connection (RST) instead of
    answering: something listens there (a load balancer whose backend is restarting, say)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    conn.recv(65536)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    listener.close()


def test_a_connection_reset_on_the_first_request_is_retried(
    resetting_endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A reset connection is not an endpoint that cannot be connected to: the root check retries it as every
    other request does (botocore reports both as EndpointConnectionError)."""
    settings = S3Settings(endpoint_url=resetting_endpoint, region="us-east-1", key=FAKE_KEY, secret=FAKE_SECRET)
    storage = Storage("s3://bucket/x", settings, retry=RetryPolicy(attempts=3, first_delay=0.001, max_delay=0.001))
    with (
        caplog.at_level(logging.WARNING, logger="meterlake.storage"),
        pytest.raises(StorageError, match="still failing after 3 attempts") as failure,
    ):
        storage.check_root()
    assert "cannot connect" not in str(failure.value)
    assert f"connection to {resetting_endpoint} failed: Connection reset by peer" in str(failure.value)
    assert len(caplog.records) == 2, [r.getMessage() for r in caplog.records]


def _write_is_denied(root: Path) -> None:
    with pytest.raises(StorageError, match="access denied"):
        Storage(str(root)).write_bytes("usage/x/data.parquet", b"x")


SKIPPED = 77  # the child's exit status when it cannot drop root


def _as_unprivileged_user(check: Callable[[], None], timeout: float = 60) -> None:
    """Run `check` in a forked child that has dropped root to `nobody` (root ignores file permissions)."""
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only, never return into pytest
        code = 1
        try:
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            except OSError:  # a container without CAP_SETUID, or a user namespace that does not map 65534
                os._exit(SKIPPED)
            check()
            code = 0
        except BaseException as exc:  # noqa: BLE001 - any failure is the test's failure
            sys.stderr.write(f"in the unprivileged child: {exc!r}\n")
        os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the unprivileged child did not finish")
        time.sleep(0.05)
    code = os.waitstatus_to_exitcode(status)
    if code == SKIPPED:
        pytest.skip("root here cannot drop to an unprivileged user, and root ignores file permissions")
    assert code == 0, "the write was not refused as access denied (see stderr)"


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_local_permission_denied_is_a_storage_error(tmp_path) -> None:
    root = tmp_path / "root"
    (root / "usage").mkdir(parents=True)
    os.chmod(root / "usage", 0o500)
    try:
        if os.geteuid() == 0:  # as `nobody` the OS refuses already at pytest's 0700 folders: EACCES either way
            _as_unprivileged_user(lambda: _write_is_denied(root))
        else:
            _write_is_denied(root)
    finally:
        os.chmod(root / "usage", 0o700)


# --- settings and secrets ------------------------------------------------------------------------
def test_settings_from_standard_aws_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    s = S3Settings.from_env()
    assert (s.endpoint_url, s.region, s.key, s.secret) == ("http://127.0.0.1:9000", "eu-west-1", FAKE_KEY, FAKE_SECRET)
    assert S3Settings.from_env(region="us-east-2", endpoint_url=None).region == "us-east-2"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:9000")  # the service-specific variable wins
    assert S3Settings.from_env().endpoint_url == "http://s3-only:9000"


def test_both_option_dialects_come_from_one_settings_object() -> None:
    s = S3Settings(endpoint_url="http://127.0.0.1:9000", region="us-east-1", key=FAKE_KEY, secret=FAKE_SECRET)
    assert s.s3fs_options() == {
        "endpoint_url": "http://127.0.0.1:9000",
        "key": FAKE_KEY,
        "secret": FAKE_SECRET,
        "client_kwargs": {"region_name": "us-east-1"},
    }
    assert s.polars_options() == {
        "aws_endpoint_url": "http://127.0.0.1:9000",
        "aws_allow_http": "true",
        "aws_region": "us-east-1",
        "aws_access_key_id": FAKE_KEY,
        "aws_secret_access_key": FAKE_SECRET,
    }
    profile_only = S3Settings(profile="billing")
    assert profile_only.s3fs_options() == {"profile": "billing"}
    assert profile_only.polars_options() == {"aws_profile": "billing"}
    storage = Storage("s3://bucket/prefix", s, retry=RetryPolicy(attempts=4, first_delay=0.1, max_delay=2.0))
    assert storage.polars_options()["max_retries"] == 3
    assert storage.fsspec_options() == s.s3fs_options()
    assert Storage("data").polars_options() is None


def test_secrets_never_in_reprs() -> None:
    s = S3Settings(endpoint_url="http://e", region="r", key=FAKE_KEY, secret=FAKE_SECRET, token="SESSIONTOKEN123")
    storage = Storage("s3://bucket/prefix", s)
    for text in (repr(s), str(s), repr(storage), str(storage), f"{storage}", f"{s!r}"):
        assert FAKE_SECRET not in text
        assert "SESSIONTOKEN123" not in text
        assert FAKE_KEY not in text
    assert "endpoint_url='http://e'" in repr(storage)


def test_an_endpoint_password_never_reaches_a_message() -> None:
    """A `user:password@` in AWS_ENDPOINT_URL would fail every request (aiohttp refuses it beside the AWS
    signature): it is refused at once, and neither that message nor a repr shows the password."""
    endpoint = "http://someone:endpoint-pass@127.0.0.1:9000"
    settings = S3Settings(endpoint_url=endpoint, region="us-east-1", key=FAKE_KEY, secret=FAKE_SECRET)
    with pytest.raises(StorageError, match="holds a user name or password") as failure:
        Storage("s3://bucket/x", settings)
    assert "'http://127.0.0.1:9000'" in str(failure.value)
    for text in (str(failure.value), repr(settings)):
        assert "endpoint-pass" not in text and "someone" not in text, text


def test_retry_policy_backs_off_exponentially_with_a_cap() -> None:
    policy = RetryPolicy(attempts=6, first_delay=0.1, max_delay=0.5)
    for attempt, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)]:
        delays = [policy.delay(attempt) for _ in range(50)]
        assert all(ceiling * 0.5 <= d <= ceiling for d in delays)


def test_list_files_start_after_lists_the_full_listings_later_paths_whatever_links_it_holds(tmp_path) -> None:
    # The folders a cursor prunes were not walked, so the files and links in them were not known to decide which
    # link to a file is listed: a link skipped in the full listing (its file reached through a linked folder, or
    # through a link that sorts first, both before the cursor) came back after it, a batch listed under a new path.
    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        folder.mkdir()
    (one / "x.jsonl").write_bytes(b"{}\n")
    (two / "y.jsonl").write_bytes(b"{}\n")
    root = tmp_path / "root"
    landing = root / "landing"
    (landing / "a").mkdir(parents=True)
    (landing / "a" / "linked").symlink_to(one)
    (landing / "a" / "p.jsonl").symlink_to(two / "y.jsonl")
    (landing / "b.jsonl").write_bytes(b"{}\n")
    (landing / "z1.jsonl").symlink_to(one / "x.jsonl")  # reached through a/linked/
    (landing / "z2.jsonl").symlink_to(two / "y.jsonl")  # reached through a/p.jsonl, which sorts first
    storage = Storage(str(root))
    everything = [f.path for f in storage.list_files("landing")]
    assert everything == ["landing/a/linked/x.jsonl", "landing/a/p.jsonl", "landing/b.jsonl"]
    cursor = "landing/b.jsonl"
    assert [f.path for f in storage.list_files("landing", start_after=cursor)] == [p for p in everything if p > cursor]


def test_list_files_walks_a_folder_linked_under_a_hidden_name_and_a_listed_one(tmp_path) -> None:
    # A folder linked twice, under a hidden name that sorts first (landing/.staging, landing/_old) and under a
    # listed one (landing/prod), was walked once, under the hidden name: its batches were never listed.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.jsonl").write_bytes(b"{}\n")
    root = tmp_path / "root"
    (root / "landing").mkdir(parents=True)
    (root / "landing" / ".staging").symlink_to(outside)
    (root / "landing" / "prod").symlink_to(outside)
    assert [f.path for f in Storage(str(root)).list_files("landing")] == ["landing/prod/x.jsonl"]
