"""Settings refuse values that would quietly widen what a pair list may read."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.settings import Settings


def test_allowed_prefixes_name_folders(monkeypatch) -> None:
    monkeypatch.setenv("FACEREID_VERIFY_ALLOWED_PREFIXES", '["images", "/uploads/", "team/a/"]')
    assert Settings().verify_allowed_prefixes == ["images/", "uploads/", "team/a/"]
    for whole_bucket in ('[""]', '["/"]', '["images/", " "]'):
        monkeypatch.setenv("FACEREID_VERIFY_ALLOWED_PREFIXES", whole_bucket)
        with pytest.raises(ValidationError, match="would allow the whole bucket"):
            Settings()
    monkeypatch.delenv("FACEREID_VERIFY_ALLOWED_PREFIXES")
    assert Settings().verify_allowed_prefixes == ["incoming/", "images/", "uploads/"]


def test_storage_uri_must_name_a_bucket_or_folder(monkeypatch) -> None:
    """``s3://$BUCKET`` with BUCKET unset must not become the message-less ``s3:``."""
    for uri, message in (("s3://", "names no bucket"), ("s3:///prefix", "names no bucket")):
        monkeypatch.setenv("FACEREID_STORAGE_URI", uri)
        with pytest.raises(ValidationError, match=message):
            Settings()
    monkeypatch.setenv("FACEREID_STORAGE_URI", "file://")
    with pytest.raises(ValidationError, match="names no folder"):
        Settings()
    for uri, kept in (
        ("s3://bucket/prefix/", "s3://bucket/prefix"),
        ("file:///", "file:///"),
        ("file://./var/x/", "file://./var/x"),
    ):
        monkeypatch.setenv("FACEREID_STORAGE_URI", uri)
        assert Settings().storage_uri == kept


def test_a_sagemaker_timeout_under_a_minute_is_refused(monkeypatch) -> None:
    """0 or a negative value would make every embedding lock look stale at once."""
    monkeypatch.setenv("FACEREID_SAGEMAKER_JOB_TIMEOUT_S", "0")
    with pytest.raises(ValidationError, match="greater than or equal to 60"):
        Settings()


def test_a_mistyped_setting_is_named_in_a_warning(monkeypatch) -> None:
    from core.settings import get_settings

    monkeypatch.setenv("FACEREID_STORAGE", "s3://meant-as-storage-uri")
    monkeypatch.setenv("FACEREID_TEST_S3_ENDPOINT", "http://127.0.0.1:1")  # the test tooling's
    get_settings.cache_clear()
    try:
        with pytest.warns(UserWarning, match=r"unknown settings \[[^]]*'FACEREID_STORAGE'"):
            get_settings()
    finally:
        get_settings.cache_clear()
