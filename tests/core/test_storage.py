"""Both storage implementations behave alike: local root and a real moto S3 server."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest

from core.storage import (
    LocalStorage,
    ObjectNotFound,
    ObjectTooLarge,
    ObjectUnreadable,
    S3Storage,
    StorageError,
    storage_from_uri,
)


def test_put_get_head_list_copy_delete(any_storage):
    s = any_storage
    s.put_bytes("a/x.bin", b"one")
    s.put_bytes("a/b/y.bin", b"two")
    s.put_bytes("ab/z.bin", b"three")
    assert s.get_bytes("a/x.bin") == b"one"
    assert s.exists("a/x.bin") and not s.exists("a/missing.bin")
    assert s.head("a/b/y.bin").size == 3
    assert [o.key for o in s.list("a/")] == ["a/b/y.bin", "a/x.bin"]
    assert {o.key for o in s.list("")} == {"a/x.bin", "a/b/y.bin", "ab/z.bin"}
    for prefix in ("a/", "a", "", "ab/z", "missing/"):
        assert list(s.list_keys(prefix)) == [o.key for o in s.list(prefix)], prefix
    s.copy("a/x.bin", "c/x.bin")
    assert s.get_bytes("c/x.bin") == b"one"
    s.delete("c/x.bin")
    assert not s.exists("c/x.bin")
    with pytest.raises(ObjectNotFound, match="c/x.bin"):
        s.get_bytes("c/x.bin")
    with pytest.raises(ObjectNotFound):
        s.head("c/x.bin")


def test_put_replaces_whole_object_and_changes_etag(any_storage):
    s = any_storage
    s.put_bytes("k.bin", b"a" * 1000)
    first = s.head("k.bin").etag
    s.put_bytes("k.bin", b"b" * 10)
    assert s.get_bytes("k.bin") == b"b" * 10
    assert s.head("k.bin").etag != first


def test_put_if_absent_creates_once(any_storage):
    s = any_storage
    assert s.put_if_absent("lock/one", b"first") is True
    assert s.put_if_absent("lock/one", b"second") is False
    assert s.get_bytes("lock/one") == b"first"


def test_a_conditional_write_whose_response_was_lost_still_wins(s3_storage, moto_endpoint):
    """The write lands, its response is lost, botocore resends it and the resend fails the
    condition against our own write: still a success. Another writer's body is a loss."""
    import boto3
    from botocore.exceptions import ReadTimeoutError

    s = s3_storage
    raw = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    lost: list[str] = []

    def land_then_lose_the_response(request, **_):
        if not lost and request.method == "PUT":
            key = request.url.split(f"/{s.bucket}/", 1)[1].split("?", 1)[0]
            raw.put_object(Bucket=s.bucket, Key=key, Body=request.body)  # the write lands
            lost.append(key)
            raise ReadTimeoutError(endpoint_url=request.url)  # botocore retries the PUT

    s.client.meta.events.register("before-send.s3.PutObject", land_then_lose_the_response)
    assert s.put_if_absent("events/marker.json", b"mine") is True
    assert lost == ["root/events/marker.json"]
    assert s.put_if_absent("events/marker.json", b"mine, again") is False  # not ours

    etag = s.head("events/marker.json").etag
    lost.clear()
    assert s.put_if_match("events/marker.json", b"replaced", etag) is True
    assert lost and s.get_bytes("events/marker.json") == b"replaced"
    assert s.put_if_match("events/marker.json", b"other", etag) is False  # stale etag


def test_put_if_absent_has_one_winner_under_contention(any_storage):
    s = any_storage
    wins: list[bool] = []

    def claim(i: int) -> None:
        wins.append(s.put_if_absent("claims/x", f"writer-{i}".encode()))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]


def test_local_put_is_atomic_and_leaves_no_temp_files(local_storage: LocalStorage):
    local_storage.put_bytes("d/f.bin", b"x" * 100)
    local_storage.put_bytes("d/f.bin", b"y" * 50)
    names = sorted(p.name for p in (local_storage.root / "d").iterdir())
    assert names == ["f.bin"]
    # a writer that died mid-put leaves only a hidden temp file, never listed as an object
    (local_storage.root / "d" / ".tmp-dead").write_bytes(b"partial")
    assert [o.key for o in local_storage.list("d/")] == ["d/f.bin"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_local_objects_get_the_umask_modes_not_mkstemps_owner_only(
    local_storage: LocalStorage, tmp_path: Path
):
    """A worker running as another user (a shared root) must be able to read every object,
    however it was written."""
    source = tmp_path / "source.bin"
    source.write_bytes(b"file")
    local_storage.put_bytes("a/bytes.bin", b"bytes")
    local_storage.put_file("a/file.bin", source)
    assert local_storage.put_if_absent("a/marker.json", b"{}")
    expected = 0o666 & ~_umask()
    for name in ("bytes.bin", "file.bin", "marker.json"):
        assert stat.S_IMODE((local_storage.root / "a" / name).stat().st_mode) == expected, name


def test_local_write_errors_are_storage_errors_and_leave_no_temp_file(
    local_storage: LocalStorage,
):
    """A local write that fails (here: a file where a folder is needed) is a StorageError,
    retried like S3's, and no temp file is left behind."""
    local_storage.put_bytes("a/x.bin", b"old")
    (local_storage.root / "a" / "sub").write_bytes(b"a file where a folder is needed")
    for write in (
        lambda: local_storage.put_bytes("a/sub/y.bin", b"new"),
        lambda: local_storage.put_if_absent("a/sub/y.bin", b"new"),
    ):
        with pytest.raises(StorageError, match="cannot write"):
            write()
    assert sorted(p.name for p in (local_storage.root / "a").iterdir()) == ["sub", "x.bin"]


def _as_another_user(work: Callable[[], list[str]]) -> list[str]:
    """``work()`` in a forked child that, when this is root, runs as ``nobody``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            with os.fdopen(write_end, "w") as out:
                json.dump(work(), out)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as got:
        answer = got.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, answer
    return json.loads(answer)


def test_an_unreadable_local_object_is_listed_and_reads_as_unreadable():
    """One file another user cannot read must not break the listing of every list; the
    others' objects, written by facereid, are readable. As root, the reader runs as
    ``nobody``; otherwise the file is unreadable to this user already."""
    root = Path(tempfile.mkdtemp(prefix="facereid-perm-"))
    try:
        root.chmod(0o755)
        storage = LocalStorage(root)
        storage.put_bytes("incoming/shared.csv", b"pair_id,image_a,image_b")
        storage.put_bytes("incoming/private.csv", b"secret")
        (root / "incoming" / "private.csv").chmod(0)

        def list_and_read() -> list[str]:
            seen = [o.key for o in storage.list("incoming/")]
            seen.append(storage.get_bytes("incoming/shared.csv").decode())
            try:
                storage.head("incoming/private.csv")
            except ObjectUnreadable:
                seen.append("unreadable")
            return seen

        assert _as_another_user(list_and_read) == [
            "incoming/private.csv",
            "incoming/shared.csv",
            "pair_id,image_a,image_b",
            "unreadable",
        ]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_parquet_round_trip_key_and_prefix(any_storage):
    s = any_storage
    t1 = pa.table({"a": pa.array([1, 2], pa.int32()), "b": ["x", "y"]})
    t2 = pa.table({"a": pa.array([3], pa.int32()), "b": ["z"]})
    s.write_parquet("ds/part-0.parquet", t1)
    s.write_parquet("ds/part-1.parquet", t2)
    assert s.read_parquet("ds/part-0.parquet").equals(t1)
    both = s.read_parquet("ds/", columns=["a"]).sort_by("a")
    assert both.column("a").to_pylist() == [1, 2, 3]
    with pytest.raises(ObjectNotFound):
        s.read_parquet("ds/part-9.parquet")


def test_invalid_keys_are_rejected(any_storage):
    for key in ("", "/abs", "a/../b", "a//b"):
        with pytest.raises(ValueError):
            any_storage.put_bytes(key, b"")


def test_storage_from_uri(tmp_path, moto_endpoint, s3_bucket):
    local = storage_from_uri(f"file://{tmp_path}/root")
    assert isinstance(local, LocalStorage) and local.root == (tmp_path / "root").resolve()
    s3 = storage_from_uri(f"s3://{s3_bucket}/pre/fix", endpoint_url=moto_endpoint)
    assert isinstance(s3, S3Storage) and s3.prefix == "pre/fix"
    s3.put_bytes("k", b"v")
    assert s3.url_for("k") == f"s3://{s3_bucket}/pre/fix/k"
    with pytest.raises(ValueError, match="bucket"):
        storage_from_uri("s3:///nobucket")
    with pytest.raises(ValueError, match="unsupported"):
        storage_from_uri("gs://bucket")


def test_unreachable_endpoint_error_names_it(dead_port):
    endpoint = f"http://127.0.0.1:{dead_port}"  # nothing listens there
    s = S3Storage("bucket", endpoint_url=endpoint)
    with pytest.raises(StorageError, match=f"127.0.0.1:{endpoint.rsplit(':', 1)[1]}"):
        s.get_bytes("k")
    with pytest.raises(StorageError, match="127.0.0.1"):
        list(s.list("datasets/"))


def test_get_bytes_max_bytes_refuses_bigger_objects_without_reading_them(any_storage):
    s = any_storage
    s.put_bytes("img/big.bin", b"x" * 1001)
    s.put_bytes("img/fits.bin", b"y" * 1000)
    s.put_bytes("img/empty.bin", b"")
    with pytest.raises(ObjectTooLarge, match="1001 bytes, over the 1000-byte limit") as info:
        s.get_bytes("img/big.bin", max_bytes=1000)
    assert info.value.size == 1001
    assert s.get_bytes("img/fits.bin", max_bytes=1000) == b"y" * 1000
    assert s.get_bytes("img/empty.bin", max_bytes=1000) == b""
    with pytest.raises(ObjectNotFound):
        s.get_bytes("img/none.bin", max_bytes=1000)


def test_s3_max_bytes_transfers_at_most_the_limit_plus_one(s3_storage):
    """The size check is a ranged GET: an oversized object is never downloaded whole."""
    s = s3_storage
    s.put_bytes("img/big.bin", b"x" * 50_000)
    ranges: list[str | None] = []
    lengths: list[int] = []
    events = s.client.meta.events
    events.register("before-call.s3.GetObject", lambda params, **_: ranges.append(
        params.get("headers", {}).get("Range")))  # fmt: skip
    events.register("after-call.s3.GetObject", lambda parsed, **_: lengths.append(
        parsed["ContentLength"]))  # fmt: skip
    with pytest.raises(ObjectTooLarge, match="50000 bytes"):
        s.get_bytes("img/big.bin", max_bytes=1000)
    assert ranges == ["bytes=0-1000"] and lengths == [1001]
    assert s.get_bytes("img/big.bin") == b"x" * 50_000  # no limit: the whole object
    assert ranges[-1] is None and lengths[-1] == 50_000


@pytest.mark.parametrize("name", ["night#1", "what?x=1", "späti & co"])
def test_put_file_publishes_under_the_exact_key(any_storage, tmp_path, name):
    """A key holding URL syntax (#, ?) or unicode lands where it is named, nowhere else."""
    local = tmp_path / "f.csv"
    local.write_bytes(b"a,b\n")
    key = f"results/{name}/run.csv"
    any_storage.put_file(key, local, "text/csv")
    assert [o.key for o in any_storage.list("results/")] == [key]
    assert any_storage.get_bytes(key) == b"a,b\n"


def test_local_paths_that_cannot_name_a_file_are_not_found(local_storage):
    s = local_storage
    s.put_bytes("images/a.jpg", b"jpeg")
    for key in ("images/a.jpg/b.jpg", "images/" + "n" * 300 + ".jpg", "images"):
        with pytest.raises(ObjectNotFound):
            s.get_bytes(key)
        with pytest.raises(ObjectNotFound):
            s.head(key)


def test_local_etag_follows_content_like_s3(local_storage):
    """Same-size edit with the mtime kept (cp -p) is a new version; same bytes are not."""
    import os

    s = local_storage
    s.put_bytes("incoming/l.csv", b"a,b\n1,2\n")
    path = s.root / "incoming/l.csv"
    before, st = s.head("incoming/l.csv").etag, path.stat()
    path.write_bytes(b"a,b\n3,4\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    edited = s.head("incoming/l.csv").etag
    assert edited != before
    s.put_bytes("incoming/l.csv", b"a,b\n3,4\n")  # re-written, same bytes
    assert s.head("incoming/l.csv").etag == edited
    assert [o.etag for o in s.list("incoming/")] == [edited]


def test_local_etag_cache_never_serves_an_old_version(local_storage, monkeypatch):
    """Settled files are hashed once per version; an in-place edit that keeps size and
    mtime changes the ctime, so it is hashed again, not served from the cache."""
    import os
    import time
    import types

    import core.storage
    from core.storage import _cached_md5

    # the storage's clock runs 2 s ahead: every file is past the one-second window in
    # which a just-changed file is never cached (no sleeping)
    ahead = types.SimpleNamespace(time_ns=lambda: time.time_ns() + 2_000_000_000)
    monkeypatch.setattr(core.storage, "time", ahead)
    s = local_storage
    s.put_bytes("incoming/l.csv", b"a,b\n1,2\n")
    path = s.root / "incoming/l.csv"
    first = s.head("incoming/l.csv").etag
    hits = _cached_md5.cache_info().hits
    assert [o.etag for o in s.list("incoming/")] == [first]
    assert _cached_md5.cache_info().hits == hits + 1  # the listing did not read the file
    st = path.stat()
    with open(path, "r+b") as fh:  # same inode, same size, mtime put back (cp -p style)
        fh.write(b"a,b\n3,4\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    edited = s.head("incoming/l.csv").etag
    assert edited != first
    assert edited == hashlib.md5(b"a,b\n3,4\n").hexdigest()


def test_s3_parquet_read_failure_is_a_storage_error_naming_the_object(tmp_path, dead_port):
    """pyarrow's S3 errors are OSErrors; the tasks retry StorageError, as for boto3 calls."""
    s3 = storage_from_uri(
        "s3://bucket/root", endpoint_url=f"http://127.0.0.1:{dead_port}"
    )  # nobody listens
    with pytest.raises(StorageError, match=r"cannot read s3://bucket/root/ds/part-0\.parquet"):
        s3.read_parquet("ds/part-0.parquet")


def test_local_key_listing_reads_no_content(local_storage, monkeypatch):
    """Listing keys (the ledger, the registry, dataset shards) must not hash every file."""
    import core.storage

    local_storage.put_bytes("models/pca/v1/model.tar.gz", b"x" * 1000)

    def no_hashing(path):
        raise AssertionError(f"hashed {path}")

    monkeypatch.setattr(core.storage, "_md5_file", no_hashing)
    assert list(local_storage.list_keys("models/")) == ["models/pca/v1/model.tar.gz"]
    with pytest.raises(AssertionError, match="hashed"):
        list(local_storage.list("models/"))  # the ETag of a fresh file is its MD5
