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
