"""SageMaker backend: the same entry point as a SageMaker training job (SDK v3 ModelTrainer).

Image: the scikit-learn framework image for PCA (the model is numpy + scikit-learn and is
read back by models.loading, which the built-in PCA algorithm's artifact would not be) and
the TensorFlow training DLC for the Siamese net (versions in sagemaker_common). Input
channel ``train`` = the dataset's S3 prefix; outputs go to ``models/<name>/_jobs/`` next to
the registry. ``timeout_s`` is the job's MaxRuntimeInSeconds; the job is polled until it
ends or a grace period after that (then stopped), so SageMaker's own reason surfaces; a
Failed/Stopped job raises :class:`TrainingJobFailed` carrying SageMaker's FailureReason.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.registry import unpack_model_archive
from tasks.backends import TrainingError, TrainingResult, entry_script, read_metrics
from tasks.backends.sagemaker_common import (
    image_uri,
    make_boto_session,
    make_sagemaker_session,
    require_s3_storage,
    storage_key_of,
)

TERMINAL = ("Completed", "Failed", "Stopped")
# Queueing, container start and artifact upload come on top of the job's max runtime.
WAIT_GRACE_S = 1800
# Files the staged source dir must not upload (caches, local scratch).
IGNORE_PATTERNS = [".env", ".git", "__pycache__", ".DS_Store", "*.pyc", ".pytest_cache"]


class TrainingJobFailed(TrainingError):
    """A SageMaker training job ended Failed or Stopped (or timed out)."""

    def __init__(self, job_name: str, status: str, reason: str):
        super().__init__(f"SageMaker training job {job_name} ended {status}: {reason}")
        self.job_name = job_name
        self.status = status
        self.reason = reason


def instance_type_for(model: str, settings: Any) -> str:
    """The Siamese net trains on a GPU instance (TF GPU image); PCA needs only CPU."""
    if model == "siamese":
        return str(settings.sagemaker_gpu_instance_type)
    return str(settings.sagemaker_instance_type)


def jobs_prefix(model: str) -> str:
    return f"models/{model}/_jobs"


def build_model_trainer(
    *,
    model: str,
    source_dir: Path,
    hyperparameters: dict[str, Any],
    storage: Any,
    sagemaker_session: Any,
    role_arn: str,
    instance_type: str,
    region: str,
    max_runtime_s: int,
) -> Any:
    """A ``sagemaker.train.ModelTrainer`` for one facereid model (nothing submitted yet)."""
    from sagemaker.train import ModelTrainer
    from sagemaker.train.configs import (
        Compute,
        OutputDataConfig,
        SourceCode,
        StoppingCondition,
    )

    return ModelTrainer(
        training_image=image_uri(model, region, instance_type),
        source_code=SourceCode(
            source_dir=str(source_dir),
            entry_script=entry_script(model),
            requirements="requirements.txt"
            if (source_dir / "requirements.txt").is_file()
            else None,
            ignore_patterns=IGNORE_PATTERNS,
        ),
        compute=Compute(instance_type=instance_type, instance_count=1, volume_size_in_gb=30),
        stopping_condition=StoppingCondition(max_runtime_in_seconds=int(max_runtime_s)),
        output_data_config=OutputDataConfig(
            s3_output_path=storage.url_for(jobs_prefix(model)), compression_type="GZIP"
        ),
        hyperparameters=dict(hyperparameters),
        environment={"PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"},
        base_job_name=f"facereid-{model}",
        role=role_arn,
        sagemaker_session=sagemaker_session,
    )


# DescribeTrainingJob errors in a row (after botocore's own retries) before the wait gives up
MAX_REFRESH_ERRORS = 5


class TrainingWaitCancelled(Exception):
    """The run gave up waiting (cancelled from another thread); the job was stopped."""


# Waits run in task-runner threads, where a cancelled run's signal never arrives (Prefect
# raises it in the main thread): the flow sets the event of its run key instead.
_CANCELS: dict[str, threading.Event] = {}
_CANCELS_LOCK = threading.Lock()


def cancel_event(run_key: str) -> threading.Event:
    """The event that cancels every wait of one flow run (created on first use)."""
    with _CANCELS_LOCK:
        return _CANCELS.setdefault(run_key, threading.Event())


def forget_cancel_event(run_key: str) -> None:
    with _CANCELS_LOCK:
        _CANCELS.pop(run_key, None)


def wait_for_job(
    job: Any,
    *,
    timeout_s: float,
    poll_s: float,
    log: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
    cancel: threading.Event | None = None,
) -> Any:
    """Poll ``job`` (a ``sagemaker.core.resources.TrainingJob``) until it ends.

    Logs every status change; raises :class:`TrainingJobFailed` with the FailureReason
    (or the secondary status, e.g. MaxRuntimeExceeded) on Failed or Stopped. A job this
    wait gives up on (timeout, polling that keeps failing, a cancelled run: an interrupt
    in this thread or ``cancel`` set from another) is stopped, so it does not go on
    billing with nobody to register its model.
    """
    started = time.monotonic()
    last = None
    errors = 0

    def pause(seconds: float) -> None:
        if cancel is None:
            if seconds:
                sleep(seconds)
        elif cancel.wait(seconds):  # wait(0) just reads the flag
            raise TrainingWaitCancelled(f"{job.training_job_name}: the run was cancelled")

    try:
        while True:
            pause(0)  # cancelled before this poll?
            try:
                job.refresh()
            except Exception as exc:  # throttling or a network blip: poll again, a few times
                errors += 1
                if errors >= MAX_REFRESH_ERRORS:
                    raise
                log(f"[sagemaker] {job.training_job_name}: status unavailable ({exc}); retrying")
                pause(poll_s)
                continue
            errors = 0
            status = str(job.training_job_status)
            secondary = _plain(getattr(job, "secondary_status", None))
            if (status, secondary) != last:
                log(f"[sagemaker] {job.training_job_name}: {status} ({secondary or '-'})")
                last = (status, secondary)
            if status == "Completed":
                return job
            if status in ("Failed", "Stopped"):
                reason = _plain(getattr(job, "failure_reason", None)) or (
                    f"no FailureReason given; secondary status {secondary}"
                    if secondary
                    else "no FailureReason given"
                )
                raise TrainingJobFailed(job.training_job_name, status, reason)
            if time.monotonic() - started >= timeout_s:
                _stop_quietly(job, log)
                raise TrainingJobFailed(
                    job.training_job_name,
                    f"{status} after the {timeout_s:.0f}s timeout (stop requested)",
                    "no terminal status within the job's max runtime plus the wait grace period",
                )
            pause(poll_s)
    except TrainingJobFailed:
        raise  # the job ended on its own, or was stopped above
    except BaseException:
        _stop_quietly(job, log)
        raise


def _stop_quietly(job: Any, log: Callable[[str], None]) -> None:
    try:
        job.stop()
        log(f"[sagemaker] {job.training_job_name}: stop requested")
    except Exception as exc:  # the error that brought us here matters more
        log(f"[sagemaker] {job.training_job_name}: could not request a stop: {exc}")


def _plain(value: Any) -> str | None:
    """SDK fields are ``Unassigned()`` when absent; turn those into None."""
    if value is None or type(value).__name__ == "Unassigned":
        return None
    return str(value)


def train_on_sagemaker(
    model: str,
    storage: Any,
    data_version: str,
    hyperparameters: dict[str, Any],
    work_dir: Path,
    *,
    role_arn: str,
    instance_type: str,
    region: str,
    timeout_s: float,
    poll_s: float = 30.0,
    boto_session: Any = None,
    endpoints: dict[str, str | None] | None = None,
    source_dir: Path | None = None,
    log: Callable[[str], None] = print,
    cancel: threading.Event | None = None,
) -> TrainingResult:
    """Run ``train_<model>.py`` as a SageMaker training job and fetch its model.

    ``boto_session`` (or ``endpoints`` to build one) decides where AWS calls go; tests
    pass a moto-backed session with request hooks registered on it. Setting ``cancel``
    stops the job and ends the wait with :class:`TrainingWaitCancelled`.
    """
    from models.source_dir import stage_source_dir

    require_s3_storage(storage)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if source_dir is None:
        source_dir = stage_source_dir(work_dir / "source")
    if boto_session is None:
        boto_session = make_boto_session(region, endpoints)
    session = make_sagemaker_session(boto_session, storage.bucket, storage._key(jobs_prefix(model)))
    trainer = build_model_trainer(
        model=model,
        source_dir=Path(source_dir),
        hyperparameters=hyperparameters,
        storage=storage,
        sagemaker_session=session,
        role_arn=role_arn,
        instance_type=instance_type,
        region=region,
        max_runtime_s=int(timeout_s),
    )
    from sagemaker.train.configs import InputData

    channel = InputData(
        channel_name="train", data_source=storage.url_for(f"datasets/lfw/v={data_version}/")
    )
    started = time.monotonic()
    trainer.train(input_data_config=[channel], wait=False, logs=False)
    job = trainer._latest_training_job  # the SDK's handle on the job it just created
    log(f"[sagemaker] submitted {job.training_job_name} ({instance_type})")
    wait_for_job(job, timeout_s=timeout_s + WAIT_GRACE_S, poll_s=poll_s, log=log, cancel=cancel)
    artifact_uri = _plain(getattr(job.model_artifacts, "s3_model_artifacts", None))
    if not artifact_uri:
        raise TrainingError(f"SageMaker job {job.training_job_name} completed without artifacts")
    archive = storage.get_bytes(storage_key_of(storage, artifact_uri))
    model_dir = unpack_model_archive(archive, work_dir / "model")
    return TrainingResult(
        model=model,
        backend="sagemaker",
        model_dir=model_dir,
        archive=archive,
        metrics=read_metrics(model_dir),
        job_name=str(job.training_job_name),
        wall_seconds=round(time.monotonic() - started, 2),
        details={"artifact_uri": artifact_uri, "image": trainer.training_image},
    )
