"""The SageMaker training backend, driven by the real SDK v3 against a moto server.

moto implements CreateTrainingJob/DescribeTrainingJob and reports a job Completed at once
without running anything, so a botocore ``after-call`` hook plays the container: it puts a
real ``model.tar.gz`` (trained by the local backend on tiny data) where SageMaker would.
The exact CreateTrainingJob request is captured with a ``before-parameter-build`` hook and
compared with the reviewed snapshots in tests/snapshots/ (FACEREID_UPDATE_SNAPSHOTS=1
rewrites them; review the diff before committing).
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse

from core.registry import pack_model_dir
from tasks.backends.sagemaker_common import make_boto_session, split_s3_uri
from tasks.backends.sagemaker_training import TrainingJobFailed, train_on_sagemaker

pytestmark = pytest.mark.sagemaker

SNAPSHOTS = Path(__file__).resolve().parent.parent / "snapshots"
ROLE = "arn:aws:iam::123456789012:role/facereid-sagemaker"
DATA_VERSION = "0123456789abcdef"
INSTANCE_TYPES = {"pca": "ml.m5.xlarge", "siamese": "ml.g5.xlarge"}  # the settings' defaults
HYPERPARAMETERS = {
    "pca": {"n-components": 150, "view2-folds": 10, "eval-pairs": 2000, "seed": 0},
    "siamese": {"epochs": 20, "max-train-seconds": 3600, "view2-folds": 0, "seed": 0},
}


@pytest.fixture(scope="module")
def tiny_pca_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real PCA model dir, trained once by the local backend on a synthetic channel."""
    from tasks.backends.local import train_locally
    from tests.models.synthetic import write_fake_channel

    root = tmp_path_factory.mktemp("tiny_pca")
    channel = write_fake_channel(root / "channel", n_people=20, per_person=4)
    result = train_locally(
        "pca",
        channel,
        {"n-components": 8, "view2-folds": 0, "eval-pairs": 60, "lda": "false"},
        root / "work",
        log=lambda line: None,
    )
    return result.model_dir


def normalise_request(params: dict[str, Any], bucket: str) -> dict[str, Any]:
    """Replace what changes between runs (job-name timestamp, bucket) with placeholders."""
    text = json.dumps(params, sort_keys=True, default=str)
    text = text.replace(bucket, "<bucket>")
    text = re.sub(r"(facereid-(?:pca|siamese))-\d{14}\d*", r"\1-<timestamp>", text)
    return json.loads(text)


def check_snapshot(name: str, actual: dict[str, Any]) -> None:
    path = SNAPSHOTS / f"{name}.json"
    rendered = json.dumps(actual, indent=2, sort_keys=True) + "\n"
    if os.environ.get("FACEREID_UPDATE_SNAPSHOTS") == "1" or not path.exists():
        if not path.exists() and os.environ.get("FACEREID_UPDATE_SNAPSHOTS") != "1":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(rendered)
            pytest.fail(f"snapshot {path} did not exist; wrote it - review and commit it")
        path.write_text(rendered)
        return
    expected = json.loads(path.read_text())
    assert actual == expected, (
        f"CreateTrainingJob request differs from {path}; if the change is intended, rerun "
        "with FACEREID_UPDATE_SNAPSHOTS=1 and review the diff"
    )


def moto_boto_session(moto_endpoint: str):
    return make_boto_session(
        "us-east-1",
        {
            "s3": moto_endpoint,
            "sagemaker": moto_endpoint,
            "sts": moto_endpoint,
            "iam": moto_endpoint,
        },
    )


def fake_container(boto_session, archive: bytes):
    """after-call hook: upload ``archive`` as the job's model.tar.gz, as SageMaker would."""

    def upload(params: dict[str, Any]) -> None:
        output = params["OutputDataConfig"]["S3OutputPath"].rstrip("/")
        bucket, key = split_s3_uri(f"{output}/{params['TrainingJobName']}/output/model.tar.gz")
        boto_session.client("s3").put_object(Bucket=bucket, Key=key, Body=archive)

    return upload


@pytest.mark.parametrize("model", ["pca", "siamese"])
def test_create_training_job_request_matches_snapshot(
    model: str, s3_storage, moto_endpoint: str, tiny_pca_model_dir: Path, tmp_path: Path
) -> None:
    boto_session = moto_boto_session(moto_endpoint)
    captured: list[dict[str, Any]] = []
    boto_session.events.register(
        "before-parameter-build.sagemaker.CreateTrainingJob",
        lambda params, **_: captured.append(json.loads(json.dumps(params, default=str))),
    )
    archive = pack_model_dir(tiny_pca_model_dir)
    upload = fake_container(boto_session, archive)
    boto_session.events.register(
        "after-call.sagemaker.CreateTrainingJob", lambda **_: upload(captured[-1])
    )
    logs: list[str] = []

    result = train_on_sagemaker(
        model,
        s3_storage,
        DATA_VERSION,
        HYPERPARAMETERS[model],
        tmp_path / "work",
        role_arn=ROLE,
        instance_type=INSTANCE_TYPES[model],
        region="us-east-1",
        timeout_s=3600,
        poll_s=0,
        boto_session=boto_session,
        log=logs.append,
    )

    assert len(captured) == 1
    request = captured[0]
    check_snapshot(f"create_training_job_{model}", normalise_request(request, s3_storage.bucket))
    # the request's essentials, spelled out (the snapshot pins the rest)
    image = request["AlgorithmSpecification"]["TrainingImage"]
    assert (
        "sagemaker-scikit-learn:1.9-0" if model == "pca" else "tensorflow-training:2.19"
    ) in image
    channels = {
        c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"]
        for c in request["InputDataConfig"]
    }
    assert channels["train"] == s3_storage.url_for(f"datasets/lfw/v={DATA_VERSION}/")
    assert request["OutputDataConfig"]["S3OutputPath"] == s3_storage.url_for(
        f"models/{model}/_jobs"
    )
    assert request["HyperParameters"] == {k: str(v) for k, v in HYPERPARAMETERS[model].items()}
    # the uploaded code channel is a self-contained source dir
    code_key = s3_storage.prefix + "/" + channels["code"].split(f"{s3_storage.prefix}/", 1)[1]
    listed = boto_session.client("s3").list_objects_v2(Bucket=s3_storage.bucket, Prefix=code_key)
    uploaded = {o["Key"][len(code_key) + 1 :] for o in listed.get("Contents", [])}
    assert {f"train_{model}.py", "requirements.txt", "models/loading.py"} <= uploaded
    assert not any("__pycache__" in k for k in uploaded)
    # the job "ran": its artifact was fetched, unpacked and its metrics read
    assert result.backend == "sagemaker"
    assert result.job_name == request["TrainingJobName"]
    assert result.archive == archive
    assert (result.model_dir / "model.json").is_file()
    assert result.metrics == json.loads((tiny_pca_model_dir / "metrics.json").read_text())
    assert any("Completed" in line for line in logs)


def canned_describe(responses: list[dict[str, Any]]):
    """A before-call hook answering DescribeTrainingJob from ``responses`` in order."""
    calls: list[str] = []

    def answer(params: dict[str, Any], **_: Any):
        name = json.loads(params["body"])["TrainingJobName"]
        status = responses[min(len(calls), len(responses) - 1)]
        calls.append(status["TrainingJobStatus"])
        body = {
            "TrainingJobName": name,
            "TrainingJobArn": f"arn:aws:sagemaker:us-east-1:123456789012:training-job/{name}",
            "AlgorithmSpecification": {"TrainingInputMode": "File"},
            "ResourceConfig": {
                "InstanceType": "ml.m5.xlarge",
                "InstanceCount": 1,
                "VolumeSizeInGB": 30,
            },
            "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
            "CreationTime": "2026-12-04T20:00:00Z",
            "ModelArtifacts": {"S3ModelArtifacts": ""},
            **status,
        }
        return AWSResponse("https://sagemaker.invalid", 200, {}, None), body

    return answer, calls


def test_failed_job_surfaces_failure_reason(s3_storage, moto_endpoint: str, tmp_path: Path) -> None:
    boto_session = moto_boto_session(moto_endpoint)
    reason = "AlgorithmError: ExecuteUserScriptError: train_pca.py exited with code 1 (MemoryError)"
    answer, calls = canned_describe(
        [
            {"TrainingJobStatus": "InProgress", "SecondaryStatus": "Starting"},
            {"TrainingJobStatus": "InProgress", "SecondaryStatus": "Training"},
            {"TrainingJobStatus": "Failed", "SecondaryStatus": "Failed", "FailureReason": reason},
        ]
    )
    boto_session.events.register("before-call.sagemaker.DescribeTrainingJob", answer)
    logs: list[str] = []

    with pytest.raises(TrainingJobFailed) as err:
        train_on_sagemaker(
            "pca",
            s3_storage,
            DATA_VERSION,
            HYPERPARAMETERS["pca"],
            tmp_path / "work",
            role_arn=ROLE,
            instance_type="ml.m5.xlarge",
            region="us-east-1",
            timeout_s=3600,
            poll_s=0,
            boto_session=boto_session,
            log=logs.append,
        )

    assert err.value.status == "Failed"
    assert err.value.reason == reason
    assert reason in str(err.value)
    assert calls == ["InProgress", "InProgress", "Failed"]
    # TrainingJob.create() describes the job once itself; our poll loop sees the rest
    seen = [line.split(": ", 1)[1] for line in logs if line.startswith("[sagemaker] facereid-pca-")]
    assert seen[0].startswith("InProgress") and seen[-1] == "Failed (Failed)"


def test_stopped_job_is_an_error_too(s3_storage, moto_endpoint: str, tmp_path: Path) -> None:
    boto_session = moto_boto_session(moto_endpoint)
    answer, _ = canned_describe(
        [
            {
                "TrainingJobStatus": "Stopped",
                "SecondaryStatus": "Stopped",
                "FailureReason": "stopped by user",
            }
        ]
    )
    boto_session.events.register("before-call.sagemaker.DescribeTrainingJob", answer)
    with pytest.raises(TrainingJobFailed, match="ended Stopped: stopped by user"):
        train_on_sagemaker(
            "pca",
            s3_storage,
            DATA_VERSION,
            HYPERPARAMETERS["pca"],
            tmp_path / "work",
            role_arn=ROLE,
            instance_type="ml.m5.xlarge",
            region="us-east-1",
            timeout_s=3600,
            poll_s=0,
            boto_session=boto_session,
            log=lambda line: None,
        )


def test_instance_types_follow_settings() -> None:
    from core.settings import Settings
    from tasks.backends.sagemaker_training import instance_type_for

    settings = Settings(
        sagemaker_instance_type="ml.c5.2xlarge", sagemaker_gpu_instance_type="ml.g4dn.xlarge"
    )
    assert instance_type_for("pca", settings) == "ml.c5.2xlarge"
    assert instance_type_for("siamese", settings) == "ml.g4dn.xlarge"
    assert {
        "pca": Settings().sagemaker_instance_type,
        "siamese": Settings().sagemaker_gpu_instance_type,
    } == INSTANCE_TYPES


def test_local_storage_is_refused(local_storage, tmp_path: Path) -> None:
    from tasks.backends.sagemaker_common import SageMakerBackendError

    with pytest.raises(SageMakerBackendError, match="needs s3:// storage"):
        train_on_sagemaker(
            "pca",
            local_storage,
            DATA_VERSION,
            {},
            tmp_path,
            role_arn=ROLE,
            instance_type="ml.m5.xlarge",
            region="us-east-1",
            timeout_s=60,
        )


def test_wait_timeout_stops_the_job(s3_storage, moto_endpoint: str, tmp_path: Path) -> None:
    """A job still InProgress when the wait gives up is stopped and reported."""
    from tasks.backends.sagemaker_training import wait_for_job

    boto_session = moto_boto_session(moto_endpoint)
    answer, calls = canned_describe(
        [{"TrainingJobStatus": "InProgress", "SecondaryStatus": "Training"}]
    )
    boto_session.events.register("before-call.sagemaker.DescribeTrainingJob", answer)
    stopped = record_stops(boto_session)
    job = _started_job(s3_storage, boto_session, tmp_path)
    with pytest.raises(TrainingJobFailed, match="timeout") as err:
        wait_for_job(job, timeout_s=0, poll_s=0, log=lambda _: None)
    assert stopped == [job.training_job_name]
    assert err.value.status.startswith("InProgress")


def record_stops(boto_session: Any) -> list[str]:
    """The names of the jobs StopTrainingJob is called for, as the calls are built. The
    call is answered as SageMaker answers it for a running job: moto's jobs complete at
    once, and its StopTrainingJob fails with a 500 that botocore retries for a minute."""
    stopped: list[str] = []
    boto_session.events.register(
        "before-parameter-build.sagemaker.StopTrainingJob",
        lambda params, **_: stopped.append(params["TrainingJobName"]),
    )
    boto_session.events.register(
        "before-call.sagemaker.StopTrainingJob",
        lambda **_: (AWSResponse("https://sagemaker.invalid", 200, {}, None), {}),
    )
    return stopped


def _started_job(s3_storage, boto_session, tmp_path: Path) -> Any:
    from models.source_dir import stage_source_dir
    from tasks.backends.sagemaker_common import make_sagemaker_session
    from tasks.backends.sagemaker_training import build_model_trainer

    trainer = build_model_trainer(
        model="pca",
        source_dir=stage_source_dir(tmp_path / "src"),
        hyperparameters={},
        storage=s3_storage,
        sagemaker_session=make_sagemaker_session(boto_session, s3_storage.bucket, "root/jobs"),
        role_arn=ROLE,
        instance_type="ml.m5.xlarge",
        region="us-east-1",
        max_runtime_s=60,
    )
    trainer.train(wait=False, logs=False)
    return trainer._latest_training_job


def test_job_stopped_at_max_runtime_says_so(s3_storage, moto_endpoint: str, tmp_path: Path) -> None:
    """SageMaker gives no FailureReason for MaxRuntimeExceeded: the secondary status is it."""
    from tasks.backends.sagemaker_training import wait_for_job

    boto_session = moto_boto_session(moto_endpoint)
    answer, _ = canned_describe(
        [{"TrainingJobStatus": "Stopped", "SecondaryStatus": "MaxRuntimeExceeded"}]
    )
    boto_session.events.register("before-call.sagemaker.DescribeTrainingJob", answer)
    job = _started_job(s3_storage, boto_session, tmp_path)
    with pytest.raises(TrainingJobFailed, match="secondary status MaxRuntimeExceeded"):
        wait_for_job(job, timeout_s=60, poll_s=0, log=lambda _: None)


def test_polling_that_keeps_failing_stops_the_job(
    s3_storage, moto_endpoint: str, tmp_path: Path
) -> None:
    """A blip is polled through; polling that keeps failing gives up and stops the job
    instead of leaving it running (and billing) with nobody to register its model."""
    from botocore.exceptions import EndpointConnectionError

    from tasks.backends.sagemaker_training import MAX_REFRESH_ERRORS, wait_for_job

    boto_session = moto_boto_session(moto_endpoint)
    answer, calls = canned_describe([{"TrainingJobStatus": "Completed", "SecondaryStatus": "x"}])
    outage = {"left": 0}

    def flaky(params: dict[str, Any], **kw: Any):
        if outage["left"] > 0:
            outage["left"] -= 1
            raise EndpointConnectionError(endpoint_url="https://sagemaker.invalid")
        return answer(params, **kw)

    boto_session.events.register("before-call.sagemaker.DescribeTrainingJob", flaky)
    stopped = record_stops(boto_session)
    job = _started_job(s3_storage, boto_session, tmp_path)  # creating it describes it too
    outage["left"] = 1
    logs: list[str] = []
    assert wait_for_job(job, timeout_s=60, poll_s=0, log=logs.append) is job  # one blip
    assert any("status unavailable" in line for line in logs) and stopped == []

    outage["left"] = MAX_REFRESH_ERRORS
    with pytest.raises(EndpointConnectionError):
        wait_for_job(job, timeout_s=60, poll_s=0, log=logs.append)
    assert stopped == [job.training_job_name]


def test_a_cancelled_wait_stops_the_job(s3_storage, moto_endpoint: str, tmp_path: Path) -> None:
    """Cancelling the run (Prefect cancels by interrupting; Ctrl-C is KeyboardInterrupt,
    not an Exception) still stops the job before the interruption goes on."""
    from tasks.backends.sagemaker_training import wait_for_job

    boto_session = moto_boto_session(moto_endpoint)
    answer, _ = canned_describe([{"TrainingJobStatus": "InProgress", "SecondaryStatus": "x"}])
    boto_session.events.register("before-call.sagemaker.DescribeTrainingJob", answer)
    stopped = record_stops(boto_session)
    job = _started_job(s3_storage, boto_session, tmp_path)

    def interrupted(_seconds: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        wait_for_job(job, timeout_s=60, poll_s=1, log=lambda _: None, sleep=interrupted)
    assert stopped == [job.training_job_name]


def _in_progress_job(s3_storage, moto_endpoint: str, tmp_path: Path):
    """A job DescribeTrainingJob reports InProgress forever, and the jobs stopped."""
    boto_session = moto_boto_session(moto_endpoint)
    answer, calls = canned_describe([{"TrainingJobStatus": "InProgress", "SecondaryStatus": "x"}])
    boto_session.events.register("before-call.sagemaker.DescribeTrainingJob", answer)
    stopped = record_stops(boto_session)
    return _started_job(s3_storage, boto_session, tmp_path), calls, stopped


def _when_polled(calls: list[str], action: Any) -> threading.Thread:
    """Run ``action`` once the wait has polled the job after its creation, and only then:
    an interrupt sent earlier could land before the flow waits on its tasks. With no poll
    in 120 s nothing is sent, and the test's own wait timeout fails it."""

    def go() -> None:
        deadline = time.monotonic() + 120
        while len(calls) < 2:
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        action()

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


def test_a_wait_cancelled_from_another_thread_stops_the_job(
    s3_storage, moto_endpoint: str, tmp_path: Path
) -> None:
    """Waits run in task-runner threads, which a cancelled run's signal never reaches: the
    flow sets the wait's event, and the wait stops the job at once (not after its poll)."""
    from tasks.backends.sagemaker_training import TrainingWaitCancelled, wait_for_job

    job, calls, stopped = _in_progress_job(s3_storage, moto_endpoint, tmp_path)
    cancel = threading.Event()
    _when_polled(calls, cancel.set)

    def no_sleep(_seconds: float) -> None:  # a blind sleep would hold the stop for a poll
        raise AssertionError("the wait slept instead of waiting on its cancel event")

    with pytest.raises(TrainingWaitCancelled, match="cancelled"):
        wait_for_job(job, timeout_s=3600, poll_s=300, log=print, sleep=no_sleep, cancel=cancel)
    assert stopped == [job.training_job_name]


@pytest.mark.usefixtures("prefect_harness")
def test_an_interrupted_flow_stops_the_jobs_its_task_threads_wait_for(
    s3_storage, moto_endpoint: str, tmp_path: Path
) -> None:
    """The retrain flow's way of waiting for SageMaker trainings, interrupted the way a
    cancelled run is (a signal in the main thread while a task thread polls the job)."""
    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.retrain import collect_remote_trainings
    from tasks.backends.sagemaker_training import cancel_event, wait_for_job

    job, calls, stopped = _in_progress_job(s3_storage, moto_endpoint, tmp_path)
    key = f"test-{uuid.uuid4().hex}"

    @task
    def wait() -> None:
        # a missed interrupt fails the test after the timeout instead of hanging it
        wait_for_job(job, timeout_s=60, poll_s=120, log=print, cancel=cancel_event(key))

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=2))  # type: ignore[arg-type]
    def train_remotely() -> dict[str, Any]:
        return collect_remote_trainings(["pca"], lambda _model: wait.submit(), key)

    main = threading.main_thread().ident
    assert main is not None and threading.get_ident() == main
    # pytest started as a background job of a non-interactive shell (`.ci/run &`) inherits
    # SIGINT ignored, and Python then keeps it ignored: give Ctrl-C its usual meaning here
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _when_polled(calls, lambda: signal.pthread_kill(main, signal.SIGINT))
        with pytest.raises(KeyboardInterrupt):
            train_remotely()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stopped == [job.training_job_name]
