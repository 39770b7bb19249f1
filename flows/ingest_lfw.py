"""The ``ingest_lfw`` flow: LFW -> versioned Parquet dataset in object storage."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from core.settings import get_settings
from core.storage import storage_from_uri
from tasks.ingest import (
    check_storage,
    find_complete_version,
    locate_lfw_data,
    plan_ingest,
    publish_data_report,
    write_faces,
    write_manifest,
    write_protocol_tables,
)


@flow(name="ingest-lfw", log_prints=True)
def ingest_lfw(
    data_home: str | None = None,
    download_if_missing: bool = False,
    seed: int = 42,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    storage_uri: str | None = None,
) -> dict[str, Any]:
    """Load LFW, preprocess every face once and publish a versioned Parquet dataset.

    Args:
        data_home: scikit-learn data_home holding ``lfw_home/`` (default: the
            FACEREID_LFW_DATA_HOME setting, else scikit-learn's default folder).
        download_if_missing: let scikit-learn download LFW when it is not there.
        seed: seed of the identity-disjoint train/val/test split.
        val_fraction: approximate share of images (whole people) in validation.
        test_fraction: approximate share of images (whole people) in test.
        storage_uri: where to write, ``file://...`` or ``s3://bucket/prefix``
            (default: the FACEREID_STORAGE_URI setting).

    The dataset version is a hash of the inputs and settings: re-running with the same
    inputs writes nothing, and a run that died half-way is completed where it stopped.
    """
    settings = get_settings()
    logger = get_run_logger()
    storage = storage_from_uri(
        storage_uri or settings.storage_uri,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.aws_region,
    )
    check_storage(storage)
    source = locate_lfw_data(
        data_home or settings.lfw_data_home, download_if_missing, settings.lfw_people_url
    )
    plan = plan_ingest(source, seed, val_fraction, test_fraction)
    summary: dict[str, Any] = {
        "version": plan.version,
        "prefix": plan.prefix,
        "url": storage.url_for(plan.prefix),
    }
    done = find_complete_version(storage, plan.version)
    if done is not None:
        logger.info(
            "LFW dataset %s already ingested at %s; nothing written",
            plan.version,
            summary["url"],
        )
        return {**summary, "status": "already_ingested", "counts": done["counts"]}

    faces = write_faces(storage, plan)
    protocol_counts = write_protocol_tables(storage, plan)
    report_urls = publish_data_report(storage, plan, faces["stats"], protocol_counts)
    manifest = write_manifest(storage, plan, faces, protocol_counts, report_urls)
    status = "resumed" if faces["skipped_shards"] else "ingested"
    logger.info("LFW dataset %s %s at %s", plan.version, status, summary["url"])
    return {
        **summary,
        "status": status,
        "counts": manifest["counts"],
        "written_shards": faces["written_shards"],
        "skipped_shards": faces["skipped_shards"],
    }


if __name__ == "__main__":
    print(ingest_lfw())
