"""Nightly / on-demand verification of the pair lists dropped under ``incoming/``.

Deployment ``verify-pairs-nightly`` runs it on a cron; the ``poll_incoming`` flow emits
``facereid.pair-list.dropped`` events whose automation runs it with ``list_key`` set.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from core.ledger import ListVersionGone
from core.pairlists import PairListError
from core.registry import RegistryError
from core.settings import PRECISIONS, get_settings
from core.storage import storage_from_uri
from tasks.verify import (
    EmbeddingInProgress,
    check_list_key,
    check_pair_list_task,
    find_pending_lists,
    ledger_entry_task,
    load_production_model_task,
    local_embed_unique,
    make_job,
    record_in_ledger_task,
    reject_pair_list,
    verify_pair_list,
)


@flow(name="verify_pairs", log_prints=True)
def verify_pairs(
    list_key: str | None = None,
    model_name: str = "auto",
    backend: str | None = None,
    max_concurrency: int = 16,
    batch_size: int = 256,
    storage_uri: str | None = None,
    instance_count: int = 1,
    precision: str | None = None,
) -> dict[str, Any]:
    """Verify every unprocessed list under incoming/ (oldest first), or only ``list_key``.

    A bad list is rejected and the run goes on; infrastructure failures on a list are
    collected and the run fails at the end, after every other list was attempted. All
    parameters are optional, for manual runs from the UI.

    Args:
      list_key: one key such as ``incoming/my-pairs.csv``; None = all unprocessed lists.
      model_name: a registered model name, or ``auto`` = the promoted model with the best
        gate figure.
      backend: ``local`` or ``sagemaker`` (batch transform); None = settings.backend.
      max_concurrency: images fetched/decoded at once (bounded thread pool).
      batch_size: faces per embedding batch.
      storage_uri: override settings.storage_uri (file://... or s3://bucket/prefix).
      instance_count: SageMaker transform instances (sagemaker backend only).
      precision: Siamese inference precision on the local backend: ``auto`` (bfloat16
        where the CPU/GPU has it natively), ``float32`` or ``bfloat16``; None =
        settings.inference_precision (default auto). PCA ignores it.

    Returns:
      {"processed": [...ledger entries], "verified_elsewhere": [...lists another run
      recorded while this one ran], "rejected": [...], "failed": [...]}.
    """
    logger = get_run_logger()
    settings = get_settings()
    backend = backend or settings.backend
    if backend not in ("local", "sagemaker"):
        raise ValueError(f"backend must be 'local' or 'sagemaker', got {backend!r}")
    precision = precision or settings.inference_precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if list_key:
        check_list_key(list_key)
    storage = storage_from_uri(
        storage_uri or settings.storage_uri,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.aws_region,
    )
    pending = find_pending_lists(storage, list_key)
    out: dict[str, Any] = {
        "processed": [],
        "verified_elsewhere": [],
        "rejected": [],
        "failed": [],
        "backend": backend,
    }
    if not pending:
        logger.info("no unprocessed pair lists under %s", storage.url_for("incoming/"))
        return out
    try:
        pointer, embedder = load_production_model_task(
            storage,
            model_name,
            str(settings.cache_path / "models"),
            backend == "local",
            precision=precision,
        )
    except RegistryError:
        _reject_unparseable(storage, pending, out, logger)
        raise
    threshold = float(pointer["threshold"])
    # what actually computes the embeddings: PCA has one precision; the sagemaker backend
    # serves the float32 SavedModel; the local Siamese resolves "auto" on this machine
    served = getattr(getattr(embedder, "model", None), "precision", None)
    effective_precision = "float32" if backend == "sagemaker" else (served or "float32")
    logger.info(
        "%d list(s) to verify with %s %s (threshold %.4f, backend %s, precision %s)",
        len(pending),
        pointer["name"],
        pointer["version"],
        threshold,
        backend,
        effective_precision,
    )
    if backend == "sagemaker":
        from tasks.backends.sagemaker_transform import sagemaker_embed_unique

        embed_unique = sagemaker_embed_unique(
            storage,
            pointer,
            settings,
            instance_count=instance_count,
            max_concurrency=max_concurrency,
        )
    else:
        embed_unique = local_embed_unique(storage, embedder, max_concurrency, batch_size)
    for info in pending:
        # the nightly and an on-drop run can both hold a list: the ledger is re-read per
        # list so that one finished by the other meanwhile is not verified a second time
        done = ledger_entry_task(storage, info)
        if done is not None:
            _verified_elsewhere(info, done, out, logger)
            continue
        job = make_job(info, pointer)
        try:
            entry = verify_pair_list(
                storage,
                job,
                threshold,
                embed_unique,
                list(settings.verify_allowed_prefixes),
                backend,
            )
        except PairListError as exc:
            _reject(storage, info, str(exc), out, logger)
            continue
        except (ListVersionGone, EmbeddingInProgress) as exc:
            logger.warning("skipping %s: %s", info.key, exc)
            continue
        except Exception as exc:
            logger.error("verifying %s failed: %s", info.key, exc)
            out["failed"].append({"list_key": info.key, "error": f"{type(exc).__name__}: {exc}"})
            continue
        entry["precision"] = effective_precision  # the ledger says how the scores were made
        try:
            recorded = record_in_ledger_task(storage, job, entry)
            done = None if recorded else ledger_entry_task(storage, info)
        except Exception as exc:
            logger.error("results of %s published, ledger write failed: %s", info.key, exc)
            out["failed"].append({"list_key": info.key, "error": f"ledger: {exc}"})
            continue
        if done is not None and done.get("result_key") != entry["result_key"]:
            # lost the put-if-absent to a run verifying the same version concurrently
            _verified_elsewhere(info, done, out, logger, ours=entry["result_key"])
            continue
        out["processed"].append({"list_key": info.key, "etag": info.etag, **entry})
    if out["failed"]:
        raise RuntimeError(f"{len(out['failed'])} list(s) failed: {out['failed']}")
    return out


def _verified_elsewhere(
    info: Any, done: dict[str, Any], out: dict[str, Any], logger: Any, ours: str | None = None
) -> None:
    """Another run recorded this list version: its results are the list's results."""
    theirs = done.get("result_key")
    if ours:
        logger.warning(
            "%s was verified by another run at the same time; the ledger keeps that run's "
            "results (%s), this run's copy at %s is not the list's record",
            info.key,
            theirs,
            ours,
        )
    else:
        logger.info("skipping %s: another run verified it meanwhile (%s)", info.key, theirs)
    out["verified_elsewhere"].append(
        {"list_key": info.key, "etag": info.etag, "result_key": theirs}
    )


def _reject_unparseable(storage: Any, pending: list[Any], out: dict[str, Any], logger: Any) -> None:
    """No model to verify with: still reject the lists that cannot be parsed (their authors
    learn now, not after the first promotion); the others wait in incoming/."""
    for info in pending:
        try:
            error = check_pair_list_task(storage, info)
        except Exception as exc:  # the run fails on the missing model anyway
            logger.warning("could not check %s: %s", info.key, exc)
            continue
        if error is not None:
            _reject(storage, info, error, out, logger)
    waiting = len(pending) - len(out["rejected"])
    logger.error(
        "no model to verify with: %d list(s) rejected as unparseable, %d wait in incoming/",
        len(out["rejected"]),
        waiting,
    )


def _reject(storage: Any, info: Any, error: str, out: dict[str, Any], logger: Any) -> None:
    """Move an unparseable list aside and note it in ``out``; a list another run moved, or
    that holds a new version by now, is left alone; a failed move fails only this list."""
    logger.warning("rejecting %s: %s", info.key, error)
    try:
        rejected_key = reject_pair_list(storage, info, error)
    except ListVersionGone as gone:
        logger.warning("%s not rejected: %s", info.key, gone)
        return
    except Exception as exc:
        logger.error("rejecting %s failed: %s", info.key, exc)
        out["failed"].append({"list_key": info.key, "error": f"reject: {exc}"})
        return
    out["rejected"].append({"list_key": info.key, "rejected_key": rejected_key, "error": error})


if __name__ == "__main__":
    import json

    print(json.dumps(verify_pairs(), indent=2, default=str))
