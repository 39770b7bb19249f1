"""Writing the face shards: what happens when the writing side fails."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from core import dataset as ds
from core.lfw import DEFAULT_PARAMS, file_sha256, list_images, locate_lfw
from core.storage import LocalStorage, StorageError


class FailingUploads(LocalStorage):
    """Local storage whose Parquet uploads fail, as S3 does once its retries are spent."""

    def write_parquet(self, key: str, table, **kwargs) -> None:  # type: ignore[no-untyped-def]
        raise StorageError(f"cannot write {key}: SlowDown")


def test_a_failed_upload_stops_the_decoding_pool_at_once(fake_lfw, tmp_path: Path) -> None:
    """The spawn pool decoding the images must go with the failure, not keep decoding
    every remaining chunk (buffering the results) while the task's retry starts another."""
    source = locate_lfw(fake_lfw.data_home)
    refs = list_images(source)
    assert len(refs) >= 8
    with pytest.raises(StorageError, match="SlowDown") as failure:
        ds.write_face_shards(
            FailingUploads(tmp_path / "store"),
            "0" * 16,
            refs,
            {r.person: "train" for r in refs},
            {r.image_id: file_sha256(r.path) for r in refs},
            DEFAULT_PARAMS,
            workers=2,
            chunk_rows=1,
            shard_rows=2,
        )
    # the traceback (and with it the failed call's frame) is still alive here
    assert failure.value is not None
    assert multiprocessing.active_children() == []
