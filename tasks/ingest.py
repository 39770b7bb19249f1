"""Prefect tasks of the LFW ingest: thin wrappers over core.lfw / core.dataset.

Retries are only for I/O that can fail transiently (storage, downloads); a corrupt image
or a malformed protocol file fails at once with a message naming the file.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
import sklearn
from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from core import dataset as ds
from core import reports
from core.lfw import (
    OPTIONAL_FILES,
    PEOPLE_FILES_URL,
    ImageRef,
    LfwError,
    LfwSource,
    Protocol,
    check_protocol_against_images,
    file_sha256,
    list_images,
    locate_lfw,
    read_protocol,
)
from core.splits import identity_split, split_counts
from core.storage import Storage
from models.preprocessing import DEFAULT_PARAMS, PreprocessParams
from tasks.io_retries import io_task

N_SAMPLE_FACES = 24


IO_TASK = io_task(delay_s=1)


class IngestPlan:
    """What this run will write: the images, their split and the content version.

    A plain class on purpose: Prefect walks dataclass/list/dict task parameters looking
    for futures, which costs ~0.6 s per task call for 13k image refs; it skips this.
    """

    def __init__(
        self,
        source: LfwSource,
        images: list[ImageRef],
        image_sha: dict[str, str],
        images_per_person: dict[str, int],
        split_of: dict[str, str],
        protocol: Protocol,
        params: PreprocessParams,
        split_settings: dict[str, Any],
        version: str,
        warnings: list[str] | None = None,
    ):
        self.source = source
        self.images = images
        self.image_sha = image_sha
        self.images_per_person = images_per_person
        self.split_of = split_of
        self.protocol = protocol
        self.params = params
        self.split_settings = split_settings
        self.version = version
        self.warnings = warnings or []

    @property
    def prefix(self) -> str:
        return ds.version_prefix(self.version)

    def __repr__(self) -> str:
        return f"IngestPlan(version={self.version!r}, images={len(self.images)})"


@task(**IO_TASK)
def check_storage(storage: Storage) -> None:
    """Fail fast (naming the endpoint) before any heavy work if storage is unreachable."""
    next(iter(storage.list_keys(ds.DATASET_ROOT)), None)


def _retry_on_download(task_: Any, task_run: Any, state: Any) -> bool:
    """Retry a failed download, not a missing file in an offline copy."""
    exc = state.result(raise_on_failure=False)
    return type(exc) is LfwError or isinstance(exc, ConnectionError | TimeoutError)


@task(
    cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5, retry_condition_fn=_retry_on_download
)
def locate_lfw_data(
    data_home: str | None, download_if_missing: bool, people_files_url: str | None
) -> LfwSource:
    """scikit-learn's layout check (downloads only when allowed)."""
    source = locate_lfw(data_home, download_if_missing, people_files_url or PEOPLE_FILES_URL)
    get_run_logger().info("LFW found at %s", source.lfw_home)
    return source


@task(cache_policy=NO_CACHE)
def plan_ingest(
    source: LfwSource,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    params: PreprocessParams = DEFAULT_PARAMS,
) -> IngestPlan:
    """Parse the protocol, list and hash every image, split by identity, derive the version."""
    logger = get_run_logger()
    protocol = read_protocol(source)
    images = list_images(source)
    warnings = check_protocol_against_images(protocol, images)
    for w in warnings:
        logger.warning(w)
    image_sha = {r.image_id: file_sha256(r.path) for r in images}
    per_person: dict[str, int] = {}
    for r in images:
        per_person[r.person] = per_person.get(r.person, 0) + 1
    split_settings = {
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "method": "identity_split/v1",
    }
    split_of = identity_split(per_person, seed, val_fraction, test_fraction)
    # optional files (lfw-names.txt: a mirror has it, a download does not) are recorded in
    # the manifest but are no part of the content
    required = {f: h for f, h in protocol.file_hashes.items() if f not in OPTIONAL_FILES}
    version = ds.compute_version(image_sha.items(), required, params.to_dict(), split_settings)
    logger.info(
        "%d images of %d people, %d protocol files -> dataset version %s",
        len(images),
        len(per_person),
        len(protocol.file_hashes),
        version,
    )
    return IngestPlan(
        source, images, image_sha, per_person, split_of, protocol, params,
        split_settings, version, warnings,
    )  # fmt: skip


@task(**IO_TASK)
def find_complete_version(storage: Storage, version: str) -> dict[str, Any] | None:
    """The manifest when this version is already complete (then nothing is written)."""
    if not ds.is_complete(storage, version):
        return None
    # a run that died between manifest and latest.json, or an ingest of a version made
    # earlier (e.g. back to the default split after another seed): latest = this version
    try:
        current = ds.latest_version(storage)
    except ds.DatasetNotFound:
        current = None
    if current != version:
        ds.write_json(
            storage, ds.LATEST_KEY, {"version": version, "prefix": ds.version_prefix(version)}
        )
    return ds.read_manifest(storage, version)


def _sample_ids(plan: IngestPlan, n: int = N_SAMPLE_FACES) -> list[str]:
    """A deterministic spread of images from distinct people for the face grid."""
    firsts: dict[str, str] = {}
    for r in plan.images:
        firsts.setdefault(r.person, r.image_id)
    people = sorted(firsts)
    rng = np.random.default_rng(plan.split_settings["seed"])
    pick = rng.choice(len(people), size=min(n, len(people)), replace=False)
    return [firsts[people[int(i)]] for i in sorted(pick)]


@task(**IO_TASK)
def write_faces(storage: Storage, plan: IngestPlan, workers: int = 2) -> dict[str, Any]:
    """The long part: decode + preprocess every image and write the face shards."""
    logger = get_run_logger()
    progress_id = create_progress_artifact(
        progress=0.0,
        key="lfw-ingest-progress",
        description=f"Preprocessing LFW images into {storage.url_for(plan.prefix)}",
    )
    started = time.monotonic()
    last_logged = [-1.0]

    def on_progress(done: int, total: int) -> None:
        pct = 100.0 * done / max(total, 1)
        update_progress_artifact(progress_id, pct)  # type: ignore[arg-type]
        if pct - last_logged[0] >= 10 or done == total:
            last_logged[0] = pct
            rate = done / max(time.monotonic() - started, 1e-9)
            logger.info("preprocessed %d/%d images (%.0f%%, %.0f images/s)", done, total, pct, rate)

    stats = ds.FaceStats(_sample_ids(plan))
    result = ds.write_face_shards(
        storage,
        plan.version,
        plan.images,
        plan.split_of,
        plan.image_sha,
        plan.params,
        workers=workers,
        stats=stats,
        on_progress=on_progress,
    )
    logger.info(
        "face shards: %d written, %d already present", result["written_shards"],
        result["skipped_shards"],
    )  # fmt: skip
    result["stats"] = stats
    return result


@task(**IO_TASK)
def write_protocol_tables(storage: Storage, plan: IngestPlan) -> dict[str, int]:
    counts = {}
    for name, table in plan.protocol.tables.items():
        storage.write_parquet(ds.protocol_key(plan.version, name), table)
        counts[name] = table.num_rows
    return counts


def _split_table(plan: IngestPlan) -> list[dict[str, Any]]:
    counts = split_counts(plan.split_of, plan.images_per_person)
    total = max(len(plan.images), 1)
    return [
        {"split": s, "people": c["people"], "images": c["images"],
         "fraction": round(c["images"] / total, 4)}
        for s, c in counts.items()
    ]  # fmt: skip


@task(**IO_TASK)
def publish_data_report(
    storage: Storage, plan: IngestPlan, stats: ds.FaceStats, protocol_counts: dict[str, int]
) -> dict[str, str]:
    """Plots next to the dataset + a markdown and a table artifact linking them."""
    pngs = {
        "images_per_person.png": reports.images_per_person_histogram(
            list(plan.images_per_person.values())
        ),
        "sample_faces.png": reports.face_grid(
            np.stack([stats.samples[i] for i in sorted(stats.samples)]),
            titles=[i.split("/")[0] for i in sorted(stats.samples)],
        ),
        "mean_face.png": reports.mean_face(stats.mean),
    }
    urls = {}
    for name, data in pngs.items():
        key = ds.report_key(plan.version, name)
        storage.put_bytes(key, data, "image/png")
        urls[name] = storage.url_for(key)
    rows = _split_table(plan)
    split_md = "\n".join(
        f"| {r['split']} | {r['people']:,} | {r['images']:,} | {r['fraction']:.1%} |" for r in rows
    )
    proto_md = "\n".join(f"| {k} | {v:,} |" for k, v in protocol_counts.items())
    markdown = f"""# LFW dataset `{plan.version}`

Stored at `{storage.url_for(plan.prefix)}` — {len(plan.images):,} images of
{len(plan.images_per_person):,} people, faces {ds.FACE_SHAPE[0]}x{ds.FACE_SHAPE[1]}
(preprocessing v{plan.params.version}), split seed {plan.split_settings["seed"]}.

## Identity-disjoint split

| split | people | images | fraction of images |
|---|---:|---:|---:|
{split_md}

## Protocol tables

| table | rows |
|---|---:|
{proto_md}

## Plots

- [Images per person]({urls["images_per_person.png"]})
- [Sample faces]({urls["sample_faces.png"]})
- [Mean face]({urls["mean_face.png"]})

![Images per person]({urls["images_per_person.png"]})
![Sample faces]({urls["sample_faces.png"]})
![Mean face]({urls["mean_face.png"]})
"""
    if plan.warnings:
        markdown += "\n## Warnings\n\n" + "\n".join(f"- {w}" for w in plan.warnings) + "\n"
    create_markdown_artifact(
        markdown=markdown, key="lfw-data-report", description=f"LFW dataset {plan.version}"
    )
    create_table_artifact(
        table=rows,
        key="lfw-split-counts",
        description=f"Images and people per split ({plan.version})",
    )
    return urls


@task(**IO_TASK)
def write_manifest(
    storage: Storage,
    plan: IngestPlan,
    faces: dict[str, Any],
    protocol_counts: dict[str, int],
    report_urls: dict[str, str],
) -> dict[str, Any]:
    """manifest.json LAST (its presence marks the version complete), then latest.json."""
    split = {r["split"]: {"people": r["people"], "images": r["images"]} for r in _split_table(plan)}
    manifest = {
        "version": plan.version,
        "prefix": plan.prefix,
        "created_at": datetime.now(UTC).isoformat(),
        "counts": {
            "images": len(plan.images),
            "people": len(plan.images_per_person),
            "shards": faces["shards"],
            "shard_rows": ds.SHARD_ROWS,
            "splits": split,
            "protocol": protocol_counts,
        },
        "preprocessing": plan.params.to_dict(),
        "face_shape": list(ds.FACE_SHAPE),
        "sklearn_version": sklearn.__version__,
        "seed": plan.split_settings["seed"],
        "split_fractions": {
            "val": plan.split_settings["val_fraction"],
            "test": plan.split_settings["test_fraction"],
            "train": round(
                1 - plan.split_settings["val_fraction"] - plan.split_settings["test_fraction"], 6
            ),
        },
        "split_method": plan.split_settings["method"],
        "inputs": {
            "lfw_home": str(plan.source.lfw_home),
            "images_sha256": _images_digest(plan),
            "protocol_sha256": plan.protocol.file_hashes,
        },
        "report": {name: ds.report_key(plan.version, name) for name in report_urls},
        "warnings": plan.warnings,
    }
    ds.write_json(storage, ds.manifest_key(plan.version), manifest)
    ds.write_json(storage, ds.LATEST_KEY, {"version": plan.version, "prefix": plan.prefix})
    return manifest


def _images_digest(plan: IngestPlan) -> str:
    """One sha256 over the sorted per-image hashes (the per-image ones are in the shards)."""
    import hashlib

    h = hashlib.sha256()
    for iid in sorted(plan.image_sha):
        h.update(f"{iid}\t{plan.image_sha[iid]}\n".encode())
    return h.hexdigest()
