"""Reference resolution is lexical: forbidden references never reach storage."""

from __future__ import annotations

import pytest

from core.image_refs import RefResolver, resolve_ref
from core.storage import LocalStorage, S3Storage

ALLOWED = ("images/", "uploads/")


@pytest.fixture
def s3() -> S3Storage:
    # a client is built but never used: resolution does no I/O
    return S3Storage("my-bucket", "root", endpoint_url="http://127.0.0.1:9", region="us-east-1")


@pytest.mark.parametrize(
    ("raw", "kind", "target"),
    [
        ("images/a.jpg", "key", "images/a.jpg"),
        ("  uploads/x/y.png ", "key", "uploads/x/y.png"),
        ("s3://my-bucket/root/images/a.jpg", "key", "images/a.jpg"),
        ("lfw:George_W_Bush/0001", "lfw", "George_W_Bush/0001"),
        ("lfw:George_W_Bush/12", "lfw", "George_W_Bush/0012"),
        ("LFW:Mary-Kate_Olsen/0002", "lfw", "Mary-Kate_Olsen/0002"),
    ],
)
def test_allowed_references_resolve_to_keys(s3, raw, kind, target):
    ref = resolve_ref(raw, s3, ALLOWED)
    assert (ref.kind, ref.target, ref.status) == (kind, target, None)


@pytest.mark.parametrize(
    "raw",
    [
        "s3://other-bucket/root/images/a.jpg",  # another bucket
        "s3://my-bucket/images/a.jpg",  # same bucket, outside the storage root
        "s3://my-bucket/root/secrets/a.jpg",  # outside allowed prefixes
        "s3://my-bucket/root/images/../models/x/production.json",
        "images/../models/pca/production.json",
        "images/./a.jpg",
        "images//a.jpg",
        "/etc/passwd",
        "file:///etc/passwd",
        "https://example.com/face.jpg",
        "gs://bucket/images/a.jpg",
        "datasets/lfw/latest.json",
        "images\\..\\x.jpg",
        "images/a.jpg\x00",
        "s3://my-bucket/root/images/a.jpg?versionId=1",
    ],
)
def test_forbidden_references(s3, raw):
    ref = resolve_ref(raw, s3, ALLOWED)
    assert ref.kind == "forbidden", ref
    assert ref.status == "forbidden" and ref.error and not ref.fetchable


@pytest.mark.parametrize(
    "raw", [None, "", "   ", 42, "lfw:", "lfw:Bush", "lfw:../x/0001", "lfw:A/0"]
)
def test_invalid_references(s3, raw):
    ref = resolve_ref(raw, s3, ALLOWED)
    assert ref.kind == "invalid" and ref.status == "invalid_row" and ref.error


def test_local_storage_refuses_s3_uris(tmp_path):
    store = LocalStorage(tmp_path)
    assert resolve_ref("s3://any/images/a.jpg", store, ALLOWED).kind == "forbidden"
    assert resolve_ref("images/a.jpg", store, ALLOWED).kind == "key"


def test_spellings_of_one_object_share_a_cache_id(s3):
    resolve = RefResolver(s3, ALLOWED)
    a = resolve("s3://my-bucket/root/images/a.jpg")
    b = resolve("images/a.jpg")
    assert a.cache_id == b.cache_id
    assert resolve("images/a.jpg") is b  # memoised
