"""Resolve the image references of a pair list into things we may fetch.

A reference is one of:

* ``s3://<bucket>/<key>`` -- only the storage's own bucket (and root prefix) is allowed;
* ``<key>`` -- a key relative to the storage root, e.g. ``images/alice.jpg``;
* ``lfw:<Person_Name>/<index>`` -- an image of the ingested LFW dataset.

Keys must start with one of ``settings.verify_allowed_prefixes``. Anything else (another
bucket, another scheme, ``..``/``.`` segments, absolute paths, control characters) is
``forbidden`` and is never fetched: the check is purely lexical and happens before any I/O.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlparse

RefKind = Literal["key", "lfw", "forbidden", "invalid"]

_LFW_RE = re.compile(r"^(?P<person>[A-Za-z0-9][A-Za-z0-9_\-'.]*)/(?P<index>\d{1,4})$")
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


@dataclass(frozen=True)
class ImageRef:
    """A resolved reference. ``target`` is the storage key or the LFW image id."""

    raw: str
    kind: RefKind
    target: str = ""
    error: str = ""

    @property
    def fetchable(self) -> bool:
        return self.kind in ("key", "lfw")

    @property
    def status(self) -> str | None:
        """Row status this reference forces, or None when it may be fetched."""
        return {"forbidden": "forbidden", "invalid": "invalid_row"}.get(self.kind)

    @property
    def cache_id(self) -> str:
        """Identity of the image: two spellings of the same object share it."""
        return f"{self.kind}:{self.target}" if self.fetchable else f"!{self.raw}"


def _storage_root(storage: Any) -> tuple[str | None, str]:
    """(bucket, root prefix) of an S3 storage; (None, "") for a local one."""
    bucket = getattr(storage, "bucket", None)
    prefix = (getattr(storage, "prefix", "") or "").strip("/")
    return bucket, prefix


def _check_key(key: str, allowed_prefixes: Sequence[str], raw: str) -> ImageRef:
    if not key:
        return ImageRef(raw, "invalid", error="empty object key")
    if _BAD_CHARS.search(key):
        return ImageRef(raw, "forbidden", error="control character or backslash in the key")
    if key.startswith("/"):
        return ImageRef(raw, "forbidden", error="absolute paths are not allowed")
    segments = key.split("/")
    if any(seg in ("..", ".") for seg in segments) or "" in segments[:-1]:
        return ImageRef(raw, "forbidden", error="path traversal ('..', '.', '//') is not allowed")
    if key.endswith("/"):
        return ImageRef(raw, "invalid", error="the key names a folder, not an image")
    if not any(key.startswith(p) for p in allowed_prefixes):
        allowed = ", ".join(allowed_prefixes) or "(none)"
        return ImageRef(
            raw, "forbidden", error=f"key {key!r} is outside the allowed prefixes {allowed}"
        )
    return ImageRef(raw, "key", target=key)


def resolve_ref(raw: Any, storage: Any, allowed_prefixes: Sequence[str]) -> ImageRef:
    """Classify one reference without touching storage."""
    if raw is None or (isinstance(raw, float) and raw != raw):
        return ImageRef("", "invalid", error="image reference is empty")
    if not isinstance(raw, str):
        return ImageRef(
            str(raw), "invalid", error=f"image reference must be text, got {type(raw).__name__}"
        )
    ref = raw.strip()
    if not ref:
        return ImageRef(raw, "invalid", error="image reference is empty")
    if len(ref) > 1024:
        return ImageRef(
            raw[:64] + "...", "invalid", error="image reference longer than 1024 characters"
        )
    lowered = ref.lower()
    if lowered.startswith("lfw:"):
        match = _LFW_RE.match(ref[4:])
        if not match or ".." in ref:
            return ImageRef(raw, "invalid", error="LFW references look like lfw:Person_Name/0001")
        index = int(match["index"])
        if index < 1:
            return ImageRef(raw, "invalid", error="LFW image numbers start at 1")
        return ImageRef(raw, "lfw", target=f"{match['person']}/{index:04d}")
    if lowered.startswith("s3://"):
        parsed = urlparse(ref)
        bucket, root = _storage_root(storage)
        if bucket is None or parsed.netloc != bucket:
            return ImageRef(
                raw, "forbidden", error=f"bucket {parsed.netloc!r} is not the storage bucket"
            )
        full_key = parsed.path.lstrip("/")
        if parsed.query or parsed.fragment or "?" in ref or "#" in ref:
            return ImageRef(raw, "forbidden", error="query strings and fragments are not allowed")
        if root:
            if not full_key.startswith(root + "/"):
                return ImageRef(raw, "forbidden", error=f"key is outside the storage root {root!r}")
            full_key = full_key[len(root) + 1 :]
        return _check_key(full_key, allowed_prefixes, raw)
    if _SCHEME_RE.match(ref) or "://" in ref:
        scheme = ref.split(":", 1)[0]
        return ImageRef(
            raw, "forbidden", error=f"scheme {scheme!r} is not allowed (use s3:// or lfw:)"
        )
    return _check_key(ref, allowed_prefixes, raw)


class RefResolver:
    """Memoising resolver: a million rows over ten thousand images resolve each string once."""

    def __init__(self, storage: Any, allowed_prefixes: Sequence[str], max_cache: int = 200_000):
        self.storage = storage
        self.allowed_prefixes = tuple(allowed_prefixes)
        self.max_cache = max_cache
        self._cache: dict[Any, ImageRef] = {}

    def __call__(self, raw: Any) -> ImageRef:
        try:
            hit = self._cache.get(raw)
        except TypeError:  # unhashable junk from a Parquet list column
            return resolve_ref(raw, self.storage, self.allowed_prefixes)
        if hit is None:
            hit = resolve_ref(raw, self.storage, self.allowed_prefixes)
            if len(self._cache) < self.max_cache:
                self._cache[raw] = hit
        return hit
