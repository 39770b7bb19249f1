"""Embeddings by SageMaker batch transform (backend ``sagemaker`` of verify_pairs).

Only the embedding step moves to SageMaker; fetching, preprocessing (one shared function)
and pair scoring stay in the flow, so results are the same rows as with the local backend.

1. the unique faces, preprocessed here, are written as JSON lines in shards of
   ``shard_faces`` under ``transform/<model>-<version>/<digest>/input/part-NNNNN.jsonl``.
   Batch transform hands whole S3 objects to instances, so many shards spread the work
   across ``instance_count`` instances (the transform analogue of ShardedByS3Key);
2. the production artifact is repacked with the serving code (``code/inference.py`` for the
   TF Serving image, ``code/inference_pca.py`` for the scikit-learn image) and a SageMaker
   Model is created from it (SDK v3 ``sagemaker.core.resources.Model``);
3. a ``TransformJob`` (SplitType Line, MultiRecord, AssembleWith Line) writes
   ``output/part-NNNNN.jsonl.out`` with one embedding per input line, in input order;
4. the flow waits, reads the outputs back and fills the same embedding table the local
   backend fills. ``<digest>`` hashes the model version and the image ids, so a re-run
   after a crash finds the finished output and does not start a second job.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import re
import socket
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from core.image_refs import ImageRef
from core.storage import ObjectNotFound
from tasks.backends.sagemaker_common import (
    SageMakerBackendError,
    image_uri,
    make_boto_session,
    require_s3_storage,
)
from tasks.verify import (
    EmbeddingInProgress,
    EmbeddingTable,
    FaceOrError,
    Progress,
    iter_unique_faces,
)

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
SERVING_CODE = {"siamese": "inference.py", "pca": "inference_pca.py"}
SERVING_HELPERS = {"siamese": (), "pca": ("face_features.py",)}  # imported by the script
CONTENT_TYPE = "application/jsonlines"
SHARD_FACES = 500


class TransformJobFailed(SageMakerBackendError):
    def __init__(self, job_name: str, status: str, reason: str):
        super().__init__(f"SageMaker transform job {job_name} ended {status}: {reason}")
        self.job_name, self.status, self.reason = job_name, status, reason


@dataclass
class TransformInput:
    prefix: str  # storage key prefix of this embedding job
    shards: list[tuple[str, list[str]]] = field(default_factory=list)  # (name, cache ids)
    sha256: dict[str, str] = field(default_factory=dict)  # shard name -> digest of its bytes

    @property
    def done_key(self) -> str:
        """Written after a job completed: the digests of the inputs its output is for."""
        return f"{self.prefix}done.json"

    @property
    def input_prefix(self) -> str:
        return f"{self.prefix}input/"

    @property
    def output_prefix(self) -> str:
        return f"{self.prefix}output/"

    def output_key(self, shard: str) -> str:
        return f"{self.output_prefix}{shard}.out"


def _safe_name(text: str, limit: int = 63) -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "-", text).strip("-")[:limit].rstrip("-")


def job_digest(pointer: dict[str, Any], cache_ids: Iterable[str]) -> str:
    h = hashlib.sha256(f"{pointer['name']}\n{pointer['version']}\n".encode())
    for cid in cache_ids:
        h.update(cid.encode() + b"\n")
    return h.hexdigest()[:16]


def encode_shard(ids: list[str], faces: list[np.ndarray]) -> bytes:
    """JSON lines ``{"id", "face"}``; float32 values round-trip exactly through repr."""
    lines = [
        json.dumps({"id": cid, "face": np.asarray(face, np.float32).reshape(-1).tolist()})
        for cid, face in zip(ids, faces, strict=True)
    ]
    return ("\n".join(lines) + "\n").encode()


def write_transform_input(
    storage: Any,
    faces: Iterable[FaceOrError],
    prefix: str,
    table: EmbeddingTable,
    shard_faces: int = SHARD_FACES,
) -> TransformInput:
    """Stream faces into shards (one shard in memory at a time); failures go to ``table``."""
    plan = TransformInput(prefix)
    ids: list[str] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        if ids:
            name = f"part-{len(plan.shards):05d}.jsonl"
            body = encode_shard(ids, batch)
            storage.put_bytes(plan.input_prefix + name, body, CONTENT_TYPE)
            plan.shards.append((name, ids.copy()))
            plan.sha256[name] = hashlib.sha256(body).hexdigest()
            ids.clear()
            batch.clear()

    for cid, face, status, error in faces:
        if face is None:
            table.fail(cid, status, error)
            continue
        ids.append(cid)
        batch.append(face)
        if len(ids) >= shard_faces:
            flush()
    flush()
    return plan


def repack_with_serving_code(archive: bytes) -> tuple[bytes, str]:
    """The model archive plus ``code/<serving script>``; returns (archive, model kind)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            tar.extractall(root, filter="data")
        meta = json.loads((root / "model.json").read_text())
        kind = meta.get("kind")
        if kind not in SERVING_CODE:
            raise SageMakerBackendError(f"no serving code for model kind {kind!r}")
        if kind == "siamese" and not (root / "savedmodel" / "1" / "saved_model.pb").is_file():
            raise SageMakerBackendError(
                "the Siamese artifact has no savedmodel/1/ for TF Serving (trained with "
                "--export-savedmodel 0?); retrain with the export to serve it on SageMaker"
            )
        code = root / "code"
        code.mkdir(exist_ok=True)
        for name in (SERVING_CODE[kind], *SERVING_HELPERS[kind]):
            (code / name).write_bytes((MODELS_DIR / name).read_bytes())
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(root.rglob("*")):
                info = tar.gettarinfo(str(path), arcname=path.relative_to(root).as_posix())
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                if path.is_file():
                    with open(path, "rb") as fh:
                        tar.addfile(info, fh)
                else:
                    tar.addfile(info)
        return gzip.compress(buf.getvalue(), mtime=0), kind


def container_environment(kind: str, region: str) -> dict[str, str]:
    if kind == "siamese":
        return {
            "SAGEMAKER_TFS_DEFAULT_MODEL_NAME": "savedmodel",  # savedmodel/1/ in the archive
            "SAGEMAKER_REGION": region,
        }
    return {
        "SAGEMAKER_PROGRAM": SERVING_CODE["pca"],
        "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",  # code/ inside model.tar.gz
        "SAGEMAKER_CONTAINER_LOG_LEVEL": "20",
        "SAGEMAKER_REGION": region,
    }


def ensure_model(
    boto_session: Any, name: str, image: str, model_data_url: str, role_arn: str, env: dict
) -> str:
    """Create the SageMaker Model ``name`` unless it exists (names are per model version)."""
    from botocore.exceptions import ClientError
    from pydantic import ValidationError
    from sagemaker.core.resources import Model
    from sagemaker.core.shapes import ContainerDefinition

    try:
        boto_session.client("sagemaker").describe_model(ModelName=name)
        return name
    except ClientError:
        pass  # not there yet
    # CreateModel may succeed while the SDK's describe-after-create cannot map the reply
    # (moto answers an empty VpcConfig); only the name is needed from here on.
    with contextlib.suppress(ValidationError):
        Model.create(
            model_name=name,
            primary_container=ContainerDefinition(
                image=image, model_data_url=model_data_url, environment=env
            ),
            execution_role_arn=role_arn,
            session=boto_session,
            region=boto_session.region_name,
        )
    return name


def start_transform_job(
    boto_session: Any,
    job_name: str,
    model_name: str,
    input_uri: str,
    output_uri: str,
    instance_type: str,
    instance_count: int,
) -> Any:
    from sagemaker.core.resources import TransformJob
    from sagemaker.core.shapes import (
        TransformDataSource,
        TransformOutput,
        TransformResources,
        TransformS3DataSource,
    )
    from sagemaker.core.shapes import TransformInput as SMTransformInput

    return TransformJob.create(
        transform_job_name=job_name,
        model_name=model_name,
        transform_input=SMTransformInput(
            data_source=TransformDataSource(
                s3_data_source=TransformS3DataSource(s3_data_type="S3Prefix", s3_uri=input_uri)
            ),
            content_type=CONTENT_TYPE,
            split_type="Line",
        ),
        transform_output=TransformOutput(
            s3_output_path=output_uri, accept=CONTENT_TYPE, assemble_with="Line"
        ),
        transform_resources=TransformResources(
            instance_type=instance_type, instance_count=int(instance_count)
        ),
        batch_strategy="MultiRecord",
        max_payload_in_mb=6,
        max_concurrent_transforms=4,
        session=boto_session,
        region=boto_session.region_name,
    )


def _plain(value: Any) -> str | None:
    if value is None or type(value).__name__ == "Unassigned":
        return None
    return str(value)


def wait_for_transform(
    job: Any,
    timeout_s: float,
    poll_s: float = 30.0,
    log: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
) -> Any:
    """Poll until Completed; raise TransformJobFailed (with FailureReason) otherwise."""
    started, last = time.monotonic(), None
    while True:
        job.refresh()
        status = str(job.transform_job_status)
        if status != last:
            log(f"[sagemaker] {job.transform_job_name}: {status}")
            last = status
        if status == "Completed":
            return job
        if status in ("Failed", "Stopped"):
            reason = _plain(getattr(job, "failure_reason", None)) or "no FailureReason given"
            raise TransformJobFailed(job.transform_job_name, status, reason)
        if time.monotonic() - started >= timeout_s:
            try:
                job.stop()
            finally:
                raise TransformJobFailed(
                    job.transform_job_name, f"{status} after {timeout_s:.0f}s", "timeout"
                )
        sleep(poll_s)


def parse_transform_output(body: bytes, expected: int, key: str) -> np.ndarray:
    """``{"embedding": [...]}`` lines (or bare lists) -> (expected, D) float32."""
    rows = []
    for line in body.decode("utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            rows.append(record["embedding"] if isinstance(record, dict) else record)
    if len(rows) != expected:
        raise SageMakerBackendError(f"{key}: {len(rows)} embeddings for {expected} input faces")
    return np.asarray(rows, dtype=np.float32).reshape(expected, -1)


def read_transform_output(storage: Any, plan: TransformInput, table: EmbeddingTable) -> None:
    for shard, ids in plan.shards:
        key = plan.output_key(shard)
        table.add(ids, parse_transform_output(storage.get_bytes(key), len(ids), key))


def outputs_complete(storage: Any, plan: TransformInput) -> bool:
    """True when a finished job's output exists for exactly these input bytes.

    Outputs are matched to inputs by line position, so output made from other bytes (an
    image replaced under the same key, a face that failed to load in an earlier run and
    shifted the rest) must never be reused: the job records its input digests when done."""
    if not plan.shards or not all(storage.exists(plan.output_key(s)) for s, _ in plan.shards):
        return False
    try:
        done = json.loads(storage.get_bytes(plan.done_key))
    except (ObjectNotFound, ValueError):
        return False
    return bool(done.get("inputs_sha256") == plan.sha256)


LOCK = "lock.json"


@contextlib.contextmanager
def embedding_lock(
    storage: Any, prefix: str, stale_after_s: float, log: Callable[[str], None]
) -> Iterator[None]:
    """Hold ``<prefix>lock.json`` while this run writes inputs, runs the job and reads its
    output: two runs embedding the same images at once (nightly and on-drop) would
    overwrite each other's shards and delete each other's output. A lock older than
    ``stale_after_s`` (its run died) is taken over, conditionally, by one run only."""
    key = f"{prefix}{LOCK}"
    body = json.dumps({"since": datetime.now(UTC).isoformat(), "host": socket.gethostname()})
    if not storage.put_if_absent(key, body.encode(), "application/json"):
        try:
            held_info = storage.head(key)
            held = json.loads(storage.get_bytes(key))
            age = (datetime.now(UTC) - datetime.fromisoformat(held["since"])).total_seconds()
        except ObjectNotFound:  # released meanwhile: try once more
            held_info, held, age = None, {}, None
        except (ValueError, KeyError, TypeError):  # unreadable: treat as stale
            held, age = {}, float("inf")
        if age is not None and age < stale_after_s:
            raise EmbeddingInProgress(
                f"another run has been embedding these images since {held.get('since')} "
                f"({storage.url_for(key)}); the list is left to the next run"
            )
        taken = (
            storage.put_if_absent(key, body.encode(), "application/json")
            if held_info is None
            else storage.put_if_match(key, body.encode(), held_info.etag, "application/json")
        )
        if not taken:
            raise EmbeddingInProgress(f"another run took {storage.url_for(key)} first")
        if held_info is not None:
            log(f"[sagemaker] took over a stale lock from {held.get('since')}")
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # left behind, it goes stale and is taken over
            storage.delete(key)


def clear_previous_job(storage: Any, plan: TransformInput) -> None:
    """Before a new job: drop the last job's ``done.json`` and outputs, and input shards
    this plan does not have. A new job that then fails part-way leaves no output a later
    run could take for finished, and no stale shard is embedded again."""
    storage.delete(plan.done_key)
    wanted = {f"{plan.input_prefix}{name}" for name, _ in plan.shards}
    for key in list(storage.list_keys(plan.prefix)):
        if key.startswith(plan.output_prefix) or (
            key.startswith(plan.input_prefix) and key not in wanted
        ):
            storage.delete(key)


def embed_with_transform(
    storage: Any,
    pointer: dict[str, Any],
    faces: Iterable[FaceOrError],
    cache_ids: list[str],
    *,
    role_arn: str,
    region: str,
    instance_type: str,
    instance_count: int = 1,
    timeout_s: float = 6 * 3600,
    poll_s: float = 30.0,
    boto_session: Any = None,
    endpoints: dict[str, str | None] | None = None,
    shard_faces: int = SHARD_FACES,
    log: Callable[[str], None] = print,
) -> EmbeddingTable:
    """Write faces as transform input, run (or reuse) the transform job, read embeddings."""
    require_s3_storage(storage)
    start = time.perf_counter()
    table = EmbeddingTable()
    digest = job_digest(pointer, cache_ids)
    version_root = f"transform/{_safe_name(pointer['name'] + '-' + pointer['version'])}/"
    prefix = f"{version_root}{digest}/"
    with embedding_lock(storage, prefix, timeout_s + 3600, log):
        plan = write_transform_input(storage, faces, prefix, table, shard_faces)
        if not plan.shards:
            return table
        if outputs_complete(storage, plan):
            log(f"[sagemaker] reusing finished transform output under {prefix}")
        else:
            clear_previous_job(storage, plan)
            boto_session = boto_session or make_boto_session(region, endpoints)
            archive, kind = repack_with_serving_code(storage.get_bytes(pointer["artifact_key"]))
            # one archive and one SageMaker Model per (version, serving code): a changed
            # inference script gets a new Model instead of the one made from the first archive
            archive_sha = hashlib.sha256(archive).hexdigest()
            artifact_key = f"{version_root}model-{archive_sha[:12]}/model.tar.gz"
            if not storage.exists(artifact_key):
                storage.put_bytes(artifact_key, archive, "application/gzip")
            model_name = _safe_name(
                f"facereid-{pointer['name']}-{pointer['version']}-{archive_sha[:8]}"
            )
            image = image_uri(kind, region, instance_type, scope="inference")
            ensure_model(
                boto_session,
                model_name,
                image,
                storage.url_for(artifact_key),
                role_arn,
                container_environment(kind, region),
            )
            stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
            job_name = _safe_name(f"facereid-embed-{digest[:12]}-{stamp}")
            job = start_transform_job(
                boto_session,
                job_name,
                model_name,
                storage.url_for(plan.input_prefix),
                storage.url_for(plan.output_prefix),
                instance_type,
                instance_count,
            )
            log(f"[sagemaker] submitted {job_name}: {len(plan.shards)} shard(s), {instance_count}x")
            wait_for_transform(job, timeout_s, poll_s, log)
            storage.put_bytes(
                plan.done_key,
                json.dumps({"job": job_name, "inputs_sha256": plan.sha256}, indent=2).encode(),
                "application/json",
            )
        read_transform_output(storage, plan, table)
    table.seconds = time.perf_counter() - start
    return table


def sagemaker_embed_unique(
    storage: Any,
    pointer: dict[str, Any],
    settings: Any,
    *,
    instance_count: int = 1,
    max_concurrency: int = 16,
    boto_session: Any = None,
    endpoints: dict[str, str | None] | None = None,
    poll_s: float = 30.0,
) -> Callable[[dict[str, ImageRef], Progress], EmbeddingTable]:
    """The ``embed_unique`` step of verify_list for the sagemaker backend."""
    require_s3_storage(storage)

    def run(unique: dict[str, ImageRef], progress: Progress) -> EmbeddingTable:
        faces = iter_unique_faces(storage, unique.values(), max_concurrency)
        table = embed_with_transform(
            storage,
            pointer,
            faces,
            list(unique),
            role_arn=settings.sagemaker_role_arn,
            region=settings.aws_region,
            instance_type=settings.sagemaker_instance_type,
            instance_count=instance_count,
            timeout_s=settings.sagemaker_job_timeout_s,
            poll_s=poll_s,
            boto_session=boto_session,
            endpoints=endpoints or {"sagemaker": None, "s3": settings.s3_endpoint_url},
        )
        progress.update(0.7)
        return table

    return run
