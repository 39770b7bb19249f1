"""Loading a list's images: a storage failure fails fast, not after the whole window."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from core.image_refs import RefResolver
from core.storage import LocalStorage, StorageError
from tasks.verify import iter_unique_faces
from tests.fake_lfw import fake_face_jpeg


class FailingFirstImage(LocalStorage):
    """Local storage whose first image always fails as an unreachable bucket would."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.gets: list[str] = []
        self.lock = threading.Lock()

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        with self.lock:
            self.gets.append(key)
        if key == "images/000.jpg":
            raise StorageError("cannot reach S3 endpoint")
        time.sleep(0.05)  # a remote GET's latency
        return super().get_bytes(key, max_bytes=max_bytes)


def test_a_failed_load_cancels_the_queued_ones(tmp_path: Path) -> None:
    storage = FailingFirstImage(tmp_path / "store")
    for n in range(300):
        storage.put_bytes(f"images/{n:03d}.jpg", fake_face_jpeg(n % 7 + 1, n))
    resolve = RefResolver(storage, ["images/"])
    refs = [resolve(f"images/{n:03d}.jpg") for n in range(300)]
    with pytest.raises(StorageError, match="fetching image 'images/000.jpg'"):
        list(iter_unique_faces(storage, refs, max_concurrency=2, lookahead=256))
    assert storage.gets.count("images/000.jpg") == 3  # retried, then given up
    # 256 loads were queued; those not started when it failed were dropped, not run (the
    # other worker fetched a handful during the failing image's retries)
    assert len(set(storage.gets)) < 100


def test_an_archived_image_is_unreadable_not_a_failed_list(s3_storage) -> None:
    """An object in Glacier cannot be read until restored: that row is unreadable_image
    and the rest of the list goes on, instead of the list failing every night."""
    from tasks.verify import load_face

    storage = s3_storage
    storage.client.put_object(
        Bucket=storage.bucket,
        Key=storage._key("images/archived.jpg"),
        Body=fake_face_jpeg(1, 1),
        StorageClass="GLACIER",
    )
    storage.put_bytes("images/ok.jpg", fake_face_jpeg(2, 1))
    resolve = RefResolver(storage, ["images/"])
    faces = list(
        iter_unique_faces(storage, [resolve("images/archived.jpg"), resolve("images/ok.jpg")])
    )
    (_, face, status, error), ok = faces
    assert face is None and status == "unreadable_image" and "InvalidObjectState" in error
    assert ok[2] == "ok"
    assert load_face(storage, resolve("images/archived.jpg"))[2] == "unreadable_image"
