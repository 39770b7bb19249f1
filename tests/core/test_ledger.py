"""The ledger's list handling: rejecting only the version that was read, skipping odd keys."""

from __future__ import annotations

import json

import pytest

from core.ledger import ListVersionGone, incoming_lists, reject_list


def test_reject_moves_the_list_with_its_report(any_storage):
    s = any_storage
    s.put_bytes("incoming/team/bad.csv", b"name;score\n")
    info = s.head("incoming/team/bad.csv")
    dest = reject_list(s, info, "missing required column")
    assert dest == "rejected/team/bad.csv"
    assert not s.exists("incoming/team/bad.csv")
    assert s.get_bytes(dest) == b"name;score\n"
    report = json.loads(s.get_bytes(dest + ".error.json"))
    assert report["etag"] == info.etag and report["error"] == "missing required column"
    assert reject_list(s, info, "again") == dest  # a retried call: already moved, same answer


def test_reject_never_deletes_a_newer_upload(any_storage):
    s = any_storage
    s.put_bytes("incoming/l.csv", b"broken\n")
    stale = s.head("incoming/l.csv")
    s.put_bytes("incoming/l.csv", b"image_a,image_b\na.jpg,b.jpg\n")  # the user's fix
    with pytest.raises(ListVersionGone, match="new version"):
        reject_list(s, stale, "missing required column")
    assert s.get_bytes("incoming/l.csv") == b"image_a,image_b\na.jpg,b.jpg\n"
    assert list(s.list("rejected/")) == []
    s.delete("incoming/l.csv")
    with pytest.raises(ListVersionGone, match="gone"):
        reject_list(s, stale, "missing required column")


def test_a_second_rejected_version_keeps_the_first(any_storage):
    s = any_storage
    s.put_bytes("incoming/l.csv", b"v1\n")
    first = reject_list(s, s.head("incoming/l.csv"), "v1 broken")
    s.put_bytes("incoming/l.csv", b"v2 also broken\n")
    info = s.head("incoming/l.csv")
    second = reject_list(s, info, "v2 broken")
    assert first == "rejected/l.csv" and second == f"rejected/l.{info.etag}.csv"
    assert s.get_bytes(first) == b"v1\n" and s.get_bytes(second) == b"v2 also broken\n"


def test_incoming_lists_skip_keys_no_storage_call_accepts(s3_storage):
    """S3 accepts ``incoming/a/../b.csv``; it must not stop every later run."""
    s = s3_storage
    root = f"{s.prefix}/" if s.prefix else ""
    for odd in ("incoming/a/../b.csv", "incoming//c.csv"):
        s.client.put_object(Bucket=s.bucket, Key=root + odd, Body=b"x")
    s.put_bytes("incoming/ok.csv", b"image_a,image_b\n")
    assert [i.key for i in incoming_lists(s)] == ["incoming/ok.csv"]


def test_download_list_version_refuses_a_replaced_list(any_storage, tmp_path):
    from tasks.verify import download_list_version

    s = any_storage
    s.put_bytes("incoming/l.csv", b"v1\n")
    info = s.head("incoming/l.csv")
    assert download_list_version(s, info, tmp_path / "l.csv").read_bytes() == b"v1\n"
    s.put_bytes("incoming/l.csv", b"v2\n")
    with pytest.raises(ListVersionGone, match="replaced"):
        download_list_version(s, info, tmp_path / "l2.csv")
    s.delete("incoming/l.csv")
    with pytest.raises(ListVersionGone, match="deleted"):
        download_list_version(s, info, tmp_path / "l3.csv")


def test_pending_lists_read_the_ledger_in_one_listing(any_storage):
    """Verified versions are skipped, a new version of a verified list is pending, and no
    per-list lookup is made (a poll stays cheap however many lists were verified)."""
    from core.ledger import pending_lists, record_processed

    s = any_storage
    for n in range(30):
        s.put_bytes(f"incoming/l{n:02d}.csv", f"image_a,image_b\na{n}.jpg,b.jpg\n".encode())
        if n % 3:
            record_processed(s, f"incoming/l{n:02d}.csv", s.head(f"incoming/l{n:02d}.csv").etag, {})
    s.put_bytes("incoming/l01.csv", b"image_a,image_b\nnew.jpg,b.jpg\n")  # an edit
    lookups: list[str] = []
    for name in ("exists", "head", "get_bytes"):
        real = getattr(s, name)
        setattr(
            s, name, lambda key, *a, _real=real, **k: lookups.append(key) or _real(key, *a, **k)
        )
    pending = sorted(i.key for i in pending_lists(s))
    assert pending == sorted(
        [f"incoming/l{n:02d}.csv" for n in range(0, 30, 3)] + ["incoming/l01.csv"]
    )
    assert lookups == []
