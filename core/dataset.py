"""The versioned LFW dataset in object storage: key layout, schemas, version hash, readers.

Layout (see CONTRACTS.md)::

    datasets/lfw/v=<version>/faces/part-00000.parquet ...
    datasets/lfw/v=<version>/protocol/<table>.parquet
    datasets/lfw/v=<version>/report/*.png
    datasets/lfw/v=<version>/manifest.json      written last: present == complete
    datasets/lfw/latest.json

A version is a content hash, so the same inputs always land at the same prefix and a
re-run can tell "already done" (manifest present) from "died half-way" (shards, no manifest).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from typing import Any

import numpy as np
import pyarrow as pa

from core.storage import ObjectNotFound, Storage

DATASET_ROOT = "datasets/lfw/"
LATEST_KEY = DATASET_ROOT + "latest.json"
SHARD_ROWS = 2000
FACE_SHAPE = (68, 56)

FACES_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("person", pa.string()),
        ("image_index", pa.int32()),
        ("split", pa.string()),
        ("sha256", pa.string()),
        ("jpeg", pa.binary()),
        ("face", pa.list_(pa.float32(), FACE_SHAPE[0] * FACE_SHAPE[1])),
    ]
)
# JPEG bytes do not compress, and faces (dictionary-encoded, ~256 levels per image) gain
# ~4% from zstd at 3.5x the write time: compress only the small columns hard.
FACES_COMPRESSION = {name: "zstd" for name in FACES_SCHEMA.names} | {
    "jpeg": "none",
    "face": "lz4",
}


class DatasetNotFound(ObjectNotFound):
    """No complete dataset version (manifest) where one was expected."""


def version_prefix(version: str) -> str:
    return f"{DATASET_ROOT}v={version}/"


def manifest_key(version: str) -> str:
    return version_prefix(version) + "manifest.json"


def faces_prefix(version: str) -> str:
    return version_prefix(version) + "faces/"


def shard_key(version: str, shard: int) -> str:
    return f"{faces_prefix(version)}part-{shard:05d}.parquet"


def protocol_key(version: str, table_name: str) -> str:
    return f"{version_prefix(version)}protocol/{table_name}.parquet"


def report_key(version: str, name: str) -> str:
    return f"{version_prefix(version)}report/{name}"


def shard_bounds(n_rows: int, shard_rows: int | None = None) -> list[tuple[int, int]]:
    """[start, stop) row ranges of the fixed-size shards."""
    shard_rows = shard_rows or SHARD_ROWS
    return [(s, min(s + shard_rows, n_rows)) for s in range(0, n_rows, shard_rows)]


def compute_version(
    image_hashes: Iterable[tuple[str, str]],
    protocol_hashes: Mapping[str, str],
    preprocessing: Mapping[str, Any],
    split_settings: Mapping[str, Any],
    layout: Mapping[str, Any] | None = None,
) -> str:
    """First 16 hex of a sha256 over everything that determines the dataset's content.

    ``image_hashes`` are (image_id, sha256) pairs; order does not matter.
    """
    h = hashlib.sha256()
    for iid, sha in sorted(image_hashes):
        h.update(f"{iid}\t{sha}\n".encode())
    settings = {
        "protocol": dict(sorted(protocol_hashes.items())),
        "preprocessing": dict(preprocessing),
        "split": dict(split_settings),
        "layout": dict(layout or {"shard_rows": SHARD_ROWS, "schema": str(FACES_SCHEMA)}),
    }
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def faces_table(
    image_ids: Sequence[str],
    people: Sequence[str],
    indices: Sequence[int],
    splits: Sequence[str],
    sha256: Sequence[str],
    jpegs: Sequence[bytes],
    faces: np.ndarray,
) -> pa.Table:
    """One shard's rows in the contract schema (faces flattened row-major)."""
    n = len(image_ids)
    flat = pa.array(np.ascontiguousarray(faces, dtype=np.float32).reshape(-1), pa.float32())
    face_col = pa.FixedSizeListArray.from_arrays(flat, FACE_SHAPE[0] * FACE_SHAPE[1])
    if len(face_col) != n:
        raise ValueError(f"{len(face_col)} faces for {n} rows")
    return pa.table(
        [
            pa.array(image_ids, pa.string()),
            pa.array(people, pa.string()),
            pa.array(indices, pa.int32()),
            pa.array(splits, pa.string()),
            pa.array(sha256, pa.string()),
            pa.array(jpegs, pa.binary()),
            face_col,
        ],
        schema=FACES_SCHEMA,
    )


def write_json(storage: Storage, key: str, obj: Any) -> None:
    storage.put_bytes(key, json.dumps(obj, indent=2, sort_keys=True).encode(), "application/json")


def read_json(storage: Storage, key: str) -> Any:
    return json.loads(storage.get_bytes(key))


# --------------------------------------------------------------------------- readers


def latest_version(storage: Storage) -> str:
    """The version ``datasets/lfw/latest.json`` points to (raises DatasetNotFound)."""
    try:
        return str(read_json(storage, LATEST_KEY)["version"])
    except ObjectNotFound as exc:
        raise DatasetNotFound(
            f"no LFW dataset ingested yet ({storage.url_for(LATEST_KEY)} is missing); "
            "run the ingest_lfw flow first"
        ) from exc


def read_manifest(storage: Storage, version: str | None = None) -> dict[str, Any]:
    """The manifest of a complete version (latest when ``version`` is None)."""
    version = version or latest_version(storage)
    try:
        return dict(read_json(storage, manifest_key(version)))
    except ObjectNotFound as exc:
        raise DatasetNotFound(
            f"dataset version {version} is not complete ({storage.url_for(manifest_key(version))}"
            " is missing)"
        ) from exc


def is_complete(storage: Storage, version: str) -> bool:
    return storage.exists(manifest_key(version))


def read_faces(
    storage: Storage, version: str | None = None, columns: list[str] | None = None
) -> pa.Table:
    """All face rows of a complete version, in (person, image_index) order."""
    manifest = read_manifest(storage, version)
    version = manifest["version"]
    tables = [
        storage.read_parquet(shard_key(version, i), columns=columns)
        for i in range(int(manifest["counts"]["shards"]))
    ]
    return pa.concat_tables(tables) if tables else FACES_SCHEMA.empty_table()


def faces_array(table: pa.Table) -> np.ndarray:
    """The ``face`` column as float32 (N, 68, 56) without a per-row Python loop."""
    col = table.column("face").combine_chunks()
    flat = col.flatten().to_numpy(zero_copy_only=False)  # flatten() honours slice offsets
    return np.asarray(flat, dtype=np.float32).reshape(len(col), *FACE_SHAPE)


def read_protocol(storage: Storage, version: str | None, table_name: str) -> pa.Table:
    """One protocol table (``pairs_view2``, ``people_view2``, ...) of a complete version."""
    version = read_manifest(storage, version)["version"]
    return storage.read_parquet(protocol_key(version, table_name))


# --------------------------------------------------------------------------- writing


class FaceStats:
    """Running statistics over every face written or found (for the data report)."""

    def __init__(self, sample_ids: Sequence[str] = ()):
        self.n = 0
        self.total = np.zeros(FACE_SHAPE, dtype=np.float64)
        self.wanted = set(sample_ids)
        self.samples: dict[str, np.ndarray] = {}

    def add(self, image_ids: Sequence[str], faces: np.ndarray) -> None:
        self.n += len(faces)
        self.total += faces.sum(axis=0, dtype=np.float64)
        for iid, face in zip(image_ids, faces, strict=True):
            if iid in self.wanted:
                self.samples[iid] = np.array(face)

    @property
    def mean(self) -> np.ndarray:
        return (self.total / max(self.n, 1)).astype(np.float32)


def write_face_shards(
    storage: Storage,
    version: str,
    refs: Sequence[Any],
    split_of: Mapping[str, str],
    expected_sha: Mapping[str, str],
    params: Any,
    *,
    workers: int = 2,
    chunk_rows: int = 250,
    shard_rows: int | None = None,
    stats: FaceStats | None = None,
    on_progress: Any = None,
) -> dict[str, Any]:
    """Write ``faces/part-NNNNN.parquet`` for every shard not already in storage.

    Shards are fixed row ranges of the (person, index)-sorted images, so their content is
    deterministic: a run that died half-way keeps its finished shards and writes the rest.
    Existing shards are read back (face column only) to keep the report statistics whole.
    ``on_progress(done_images, total_images)`` is called as work completes.
    """
    from core.lfw import CorruptImageError, iter_processed

    stats = stats if stats is not None else FaceStats()
    bounds = shard_bounds(len(refs), shard_rows or SHARD_ROWS)
    existing = set(storage.list_keys(faces_prefix(version)))
    todo = [i for i in range(len(bounds)) if shard_key(version, i) not in existing]
    done_images = 0
    for i, (start, stop) in enumerate(bounds):
        if i in todo:
            continue
        t = storage.read_parquet(shard_key(version, i), columns=["image_id", "face"])
        if t.num_rows != stop - start:
            raise ValueError(
                f"{storage.url_for(shard_key(version, i))} has {t.num_rows} rows, expected "
                f"{stop - start}; delete the version prefix and re-run"
            )
        stats.add(t.column("image_id").to_pylist(), faces_array(t))
        done_images += t.num_rows
    total = len(refs)
    if on_progress:
        on_progress(done_images, total)

    chunks: list[list[Any]] = []
    chunk_shard: list[int] = []
    for i in todo:
        start, stop = bounds[i]
        for s in range(start, stop, chunk_rows):
            chunks.append(list(refs[s : min(s + chunk_rows, stop)]))
            chunk_shard.append(i)
    pending: dict[int, list[tuple[list[Any], Any]]] = {}
    # closing the generator on any failure here (an upload, a changed image) tears its
    # worker pool down at once, instead of letting it decode the rest for nobody
    results = iter_processed([[r.path for r in c] for c in chunks], params, workers)
    # one background writer overlaps upload with decoding; at most 2 shards in flight
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as writer,
        closing(results),  # closed first: the pool goes before the last upload is awaited
    ):
        in_flight: list[Future[None]] = []
        for chunk, shard, processed in zip(chunks, chunk_shard, results, strict=True):
            for ref, sha in zip(chunk, processed.sha256, strict=True):
                if expected_sha[ref.image_id] != sha:
                    raise CorruptImageError(
                        f"LFW image {ref.path} changed while it was being ingested; re-run"
                    )
            pending.setdefault(shard, []).append((chunk, processed))
            start, stop = bounds[shard]
            if sum(len(c) for c, _ in pending[shard]) == stop - start:
                parts = pending.pop(shard)
                rows = [r for c, _ in parts for r in c]
                faces = np.concatenate([p.faces for _, p in parts])
                ids = [r.image_id for r in rows]
                table = faces_table(
                    ids,
                    [r.person for r in rows],
                    [r.index for r in rows],
                    [split_of[r.person] for r in rows],
                    [s for _, p in parts for s in p.sha256],
                    [j for _, p in parts for j in p.jpeg],
                    faces,
                )
                while len(in_flight) >= 2:
                    in_flight.pop(0).result()
                in_flight.append(
                    writer.submit(
                        storage.write_parquet,
                        shard_key(version, shard),
                        table,
                        compression=FACES_COMPRESSION,
                    )
                )
                stats.add(ids, faces)
            done_images += len(chunk)
            if on_progress:
                on_progress(done_images, total)
        for fut in in_flight:
            fut.result()
    return {
        "shards": len(bounds),
        "written_shards": len(todo),
        "skipped_shards": len(bounds) - len(todo),
    }
