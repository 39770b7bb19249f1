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
