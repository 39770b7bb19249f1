"""The SageMaker batch-transform backend, driven by the real SDK v3 against moto.

moto records CreateModel / CreateTransformJob and reports the job Completed without
running anything. The exact requests are captured (``before-parameter-build``) and compared
with the reviewed snapshots tests/snapshots/transform_*.json (FACEREID_UPDATE_SNAPSHOTS=1
rewrites them). An ``after-call`` hook plays the container: it downloads the repacked
model archive named in CreateModel, runs the real serving code from it on the input
shards and writes the ``.out`` objects, which the real code path then parses and scores.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import tarfile
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from core.image_refs import RefResolver
from tasks.backends.sagemaker_common import make_boto_session, split_s3_uri
from tasks.backends.sagemaker_transform import (
    TransformJobFailed,
    embed_with_transform,
    wait_for_transform,
)
from tasks.verify import (
    EmbeddingInProgress,
    ListJob,
    iter_unique_faces,
    make_run_id,
    verify_list,
)
from tests.fake_lfw import fake_face_jpeg

pytestmark = pytest.mark.sagemaker

SNAPSHOTS = Path(__file__).resolve().parent.parent / "snapshots"
ROLE = "arn:aws:iam::123456789012:role/facereid-sagemaker"


# ----------------------------------------------------------------------------- helpers


def normalise_request(params: dict[str, Any], bucket: str) -> dict[str, Any]:
    text = json.dumps(params, sort_keys=True, default=str).replace(bucket, "<bucket>")
    job_name = "facereid-embed-<digest>-<timestamp>"
    text = re.sub(r"facereid-embed-[0-9a-f]{12}-\d{14}", job_name, text)
    text = re.sub(r"(transform/[A-Za-z0-9-]+)/[0-9a-f]{16}/", r"\1/<digest>/", text)
    text = re.sub(r"/model-[0-9a-f]{12}/", "/model-<archive>/", text)
    text = re.sub(r'("ModelName": "facereid-[A-Za-z0-9-]+)-[0-9a-f]{8}"', r'\1-<archive>"', text)
    return json.loads(text)


def check_snapshot(name: str, actual: dict[str, Any]) -> None:
    path = SNAPSHOTS / f"{name}.json"
    rendered = json.dumps(actual, indent=2, sort_keys=True) + "\n"
    if os.environ.get("FACEREID_UPDATE_SNAPSHOTS") == "1":
        path.write_text(rendered)
        return
    if not path.exists():
        path.write_text(rendered)
        pytest.fail(f"snapshot {path} did not exist; wrote it - review and commit it")
    assert actual == json.loads(path.read_text()), (
        f"request differs from {path}; if intended, rerun with FACEREID_UPDATE_SNAPSHOTS=1 "
        "and review the diff"
    )


def _extract(archive: bytes, dest: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        tar.extractall(dest, filter="data")
    return dest


def _import_script(path: Path, name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def pca_container(boto_session, captured: dict[str, list], work: Path):
    """after-call CreateTransformJob: run code/inference_pca.py from the model archive."""
    s3 = boto_session.client("s3")

    def run(**_: Any) -> None:
        model = captured["CreateModel"][-1]["PrimaryContainer"]
        job = captured["CreateTransformJob"][-1]
        bucket, key = split_s3_uri(model["ModelDataUrl"])
        model_dir = _extract(s3.get_object(Bucket=bucket, Key=key)["Body"].read(), work / "m")
        script = model_dir / "code" / model["Environment"]["SAGEMAKER_PROGRAM"]
        serving = _import_script(script, "facereid_serving_pca")
        loaded = serving.model_fn(str(model_dir))
        src = job["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"]
        out = job["TransformOutput"]["S3OutputPath"].rstrip("/")
        in_bucket, in_prefix = split_s3_uri(src)
        listed = s3.list_objects_v2(Bucket=in_bucket, Prefix=in_prefix)["Contents"]
        for obj in listed:
            body = s3.get_object(Bucket=in_bucket, Key=obj["Key"])["Body"].read()
            faces = serving.input_fn(body, job["TransformInput"]["ContentType"])
            result, _ = serving.output_fn(
                serving.predict_fn(faces, loaded), job["TransformOutput"]["Accept"]
            )
            name = obj["Key"].rsplit("/", 1)[-1]
            out_bucket, out_key = split_s3_uri(f"{out}/{name}.out")
            s3.put_object(Bucket=out_bucket, Key=out_key, Body=result.encode())

    return run


@pytest.fixture(scope="module")
def pca_model_dir(tmp_path_factory):
    from models.loading import write_model_json
    from models.pca import PCAEmbedder
    from models.preprocessing import preprocess_image

    faces = np.stack(
        [preprocess_image(fake_face_jpeg(p + 1, i)) for p in range(8) for i in range(4)]
    )
    labels = np.repeat(np.arange(8), 4)
    model = PCAEmbedder(n_components=16, lda=True).fit(faces, labels)
    model_dir = tmp_path_factory.mktemp("pca")
    model.save(model_dir)
    write_model_json(model_dir, "pca", 0.5, model.embedding_dim_, model.get_params())
    return model_dir


def _promote(storage, model_dir) -> dict:
    from core.registry import promote_if_better, register_version

    version = register_version(storage, "pca", model_dir, {"test": {"accuracy": 0.9}}, {})
    return promote_if_better(storage, "pca", version)["pointer"]


def _session_with_capture(moto_endpoint: str) -> tuple[Any, dict[str, list]]:
    session = make_boto_session("us-east-1", {"s3": moto_endpoint, "sagemaker": moto_endpoint})
    captured: dict[str, list] = {"CreateModel": [], "CreateTransformJob": []}
    for op in captured:
        session.events.register(
            f"before-parameter-build.sagemaker.{op}",
            lambda params, _op=op, **_: captured[_op].append(
                json.loads(json.dumps(params, default=str))
            ),
        )
    return session, captured


# ----------------------------------------------------------------------------- tests


def test_pca_transform_requests_and_scoring(s3_storage, moto_endpoint, pca_model_dir, tmp_path):
    from models.loading import load_embedder

    storage = s3_storage
    pointer = _promote(storage, pca_model_dir)
    for p in range(3):
        for i in range(2):
            storage.put_bytes(f"images/p{p}_{i}.jpg", fake_face_jpeg(p + 1, i + 20))
    storage.put_bytes("images/junk.jpg", b"junk")
    rows = ["pair_id,image_a,image_b"] + [
        f"s{p},images/p{p}_0.jpg,images/p{p}_1.jpg" for p in range(3)
    ]
    rows += ["d0,images/p0_0.jpg,images/p1_1.jpg", "bad,images/junk.jpg,images/p0_0.jpg"]
    storage.put_bytes("incoming/sm.csv", ("\n".join(rows) + "\n").encode())
    info = storage.head("incoming/sm.csv")

    session, captured = _session_with_capture(moto_endpoint)
    session.events.register(
        "after-call.sagemaker.CreateTransformJob", pca_container(session, captured, tmp_path)
    )
    watched: list[str] = []  # job prefixes whose objects are listed as each job starts
    at_start: list[list[str]] = []
    session.events.register(  # before any client exists: clients copy the handlers
        "before-call.sagemaker.CreateTransformJob",
        lambda **_: at_start.extend(sorted(i.key for i in storage.list(p)) for p in watched),
    )
    logs: list[str] = []

    def embed_unique(unique, progress):
        faces = iter_unique_faces(storage, unique.values(), 4)
        return embed_with_transform(
            storage, pointer, faces, list(unique), role_arn=ROLE, region="us-east-1",
            instance_type="ml.m5.xlarge", instance_count=2, poll_s=0, boto_session=session,
            shard_faces=2, log=logs.append,
        )  # fmt: skip

    job = ListJob(info, make_run_id(info.key, info.etag, "pca", pointer["version"]), "pca",
                  pointer["version"])  # fmt: skip
    entry = verify_list(storage, job, pointer["threshold"], embed_unique, ["images/"], tmp_path)

    # the requests, pinned by reviewed snapshots
    assert len(captured["CreateModel"]) == 1 and len(captured["CreateTransformJob"]) == 1
    model_req = normalise_request(captured["CreateModel"][0], storage.bucket)
    job_req = normalise_request(captured["CreateTransformJob"][0], storage.bucket)
    model_req = json.loads(json.dumps(model_req).replace(pointer["version"], "<version>"))
    job_req = json.loads(json.dumps(job_req).replace(pointer["version"], "<version>"))
    check_snapshot("transform_create_model_pca", model_req)
    check_snapshot("transform_create_transform_job_pca", job_req)
    container = captured["CreateModel"][0]["PrimaryContainer"]
    assert "sagemaker-scikit-learn:1.9-0" in container["Image"]
    assert captured["CreateTransformJob"][0]["TransformResources"]["InstanceCount"] == 2
    # 6 unique good images in shards of 2 -> 3 input objects spread over instances
    src = captured["CreateTransformJob"][0]["TransformInput"]["DataSource"]["S3DataSource"]
    prefix = src["S3Uri"].split(f"{storage.prefix}/", 1)[1]
    assert len(list(storage.list(prefix))) == 3

    # the embeddings came back through the transform output and scored like local ones
    table = storage.read_parquet(job.result_key).to_pylist()
    by_id = {r["pair_id"]: r for r in table}
    assert by_id["bad"]["status"] == "unreadable_image"
    local = load_embedder(pca_model_dir)
    from models.preprocessing import preprocess_image

    for pid in ("s0", "s1", "s2", "d0"):
        a = preprocess_image(storage.get_bytes(by_id[pid]["image_a"]))
        b = preprocess_image(storage.get_bytes(by_id[pid]["image_b"]))
        ea, eb = local.embed(np.stack([a, b]))
        assert by_id[pid]["status"] == "ok"
        assert by_id[pid]["score"] == pytest.approx(float(ea @ eb), abs=1e-5)
    assert entry["metrics"]["status_counts"]["ok"] == 4
    assert any("Completed" in line for line in logs)

    # a re-run (e.g. after a crash) reuses the finished output: no second job
    entry2 = verify_list(storage, job, pointer["threshold"], embed_unique, ["images/"], tmp_path)
    assert len(captured["CreateTransformJob"]) == 1
    assert entry2["metrics"] == {**entry["metrics"], **{k: entry2["metrics"][k] for k in (
        "embed_seconds", "pairs_per_s")}}  # fmt: skip

    # an image replaced under the same key: same references, other bytes -> a new job, and
    # the scores are the new image's (stale output is never matched to new inputs)
    storage.put_bytes("images/p0_0.jpg", fake_face_jpeg(9, 99))
    verify_list(storage, job, pointer["threshold"], embed_unique, ["images/"], tmp_path)
    assert len(captured["CreateTransformJob"]) == 2
    assert len(captured["CreateModel"]) == 1  # same version, same serving code: same Model
    by_id = {r["pair_id"]: r for r in storage.read_parquet(job.result_key).to_pylist()}
    a = preprocess_image(storage.get_bytes("images/p0_0.jpg"))
    b = preprocess_image(storage.get_bytes("images/p0_1.jpg"))
    ea, eb = local.embed(np.stack([a, b]))
    assert by_id["s0"]["score"] == pytest.approx(float(ea @ eb), abs=1e-5)

    # back to the first bytes: done.json describes job 2's inputs, so a third job runs, and
    # it starts with no done.json, no output and no stale input shard under the prefix (a
    # job failing part-way can never leave output that a later run takes for finished)
    (done_key,) = [i.key for i in storage.list("transform/") if i.key.endswith("/done.json")]
    job_prefix = done_key.removesuffix("done.json")
    storage.put_bytes(f"{job_prefix}input/part-00099.jsonl", b"stale\n")
    watched.append(job_prefix)
    storage.put_bytes("images/p0_0.jpg", fake_face_jpeg(1, 20))
    entry3 = verify_list(storage, job, pointer["threshold"], embed_unique, ["images/"], tmp_path)
    assert len(captured["CreateTransformJob"]) == 3
    shards = [f"{job_prefix}input/part-{n:05d}.jsonl" for n in range(3)]
    assert at_start == [sorted([*shards, f"{job_prefix}lock.json"])]  # held by this run
    assert entry3["metrics"]["status_counts"] == entry["metrics"]["status_counts"]
    assert storage.exists(done_key) and not storage.exists(f"{job_prefix}lock.json")

    # another run embedding the same images holds the lock: this one leaves the list
    lock = f"{job_prefix}lock.json"
    storage.put_bytes(lock, json.dumps({"since": datetime.now(UTC).isoformat()}).encode())
    with pytest.raises(EmbeddingInProgress, match="another run has been embedding"):
        verify_list(storage, job, pointer["threshold"], embed_unique, ["images/"], tmp_path)
    assert storage.exists(lock)  # not ours to remove
    # a lock left by a run that died is taken over once stale; released when done
    storage.put_bytes(lock, json.dumps({"since": "2000-01-01T00:00:00+00:00"}).encode())
    verify_list(storage, job, pointer["threshold"], embed_unique, ["images/"], tmp_path)
    assert any("took over a stale lock" in line for line in logs)
    assert not storage.exists(lock) and len(captured["CreateTransformJob"]) == 3  # reused


def test_failed_transform_surfaces_reason():
    states = iter(["InProgress", "Failed"])

    class FakeJob:  # the SDK resource's interface: refresh() + attributes
        transform_job_name = "facereid-embed-x"
        failure_reason = "ClientError: See job logs for more information"
        transform_job_status = "InProgress"

        def refresh(self):
            self.transform_job_status = next(states)

    with pytest.raises(TransformJobFailed, match="ClientError"):
        wait_for_transform(FakeJob(), timeout_s=60, poll_s=0, log=lambda _: None)


def test_pca_serving_matches_the_embedder(pca_model_dir):
    import models.inference_pca as serving
    from models.pca import PCAEmbedder
    from models.preprocessing import preprocess_image

    faces = np.stack([preprocess_image(fake_face_jpeg(3, i)) for i in range(3)])
    body = "\n".join(json.dumps({"id": str(i), "face": f.reshape(-1).tolist()})
                     for i, f in enumerate(faces))  # fmt: skip
    model = serving.model_fn(str(pca_model_dir))
    for ctype, payload in (
        ("application/jsonlines", body),
        ("application/json", json.dumps({"instances": faces.tolist()})),
        ("application/x-npy", _npy(faces)),
    ):
        emb = serving.predict_fn(serving.input_fn(payload, ctype), model)
        np.testing.assert_allclose(emb, PCAEmbedder.load(pca_model_dir).embed(faces), atol=1e-5)
    one = serving.predict_fn(serving.input_fn(_npy(faces[0]), "application/x-npy"), model)
    np.testing.assert_allclose(one, emb[:1], atol=1e-5)  # a single (H, W) face is one row
    out, ctype = serving.output_fn(emb, "application/jsonlines")
    assert ctype == "application/jsonlines" and len(out.splitlines()) == 3
    with pytest.raises(ValueError, match="unsupported content type"):
        serving.input_fn(b"x", "text/csv")
    with pytest.raises(ValueError, match="unsupported accept"):
        serving.output_fn(emb, "text/csv")


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr.astype(np.float32))
    return buf.getvalue()


def test_tf_serving_handlers_translate_formats():
    import models.inference as handlers

    face = np.arange(68 * 56, dtype=np.float32).reshape(68, 56) / 100
    ctx = SimpleNamespace(request_content_type="application/jsonlines", accept_header=None)
    body = json.dumps({"id": "a", "face": face.reshape(-1).tolist()}) + "\n"
    request = json.loads(handlers.input_handler(io.BytesIO(body.encode()), ctx))
    assert np.asarray(request["instances"]).shape == (1, 68, 56)
    np.testing.assert_allclose(np.asarray(request["instances"][0]), face)
    ctx_npy = SimpleNamespace(request_content_type="application/x-npy")
    request = json.loads(handlers.input_handler(_npy(np.stack([face, face])), ctx_npy))
    assert np.asarray(request["instances"]).shape == (2, 68, 56)
    with pytest.raises(handlers.UnsupportedContentType):
        handlers.input_handler(b"x", SimpleNamespace(request_content_type="image/jpeg"))

    response = SimpleNamespace(
        status_code=200, content=json.dumps({"predictions": [[0.6, 0.8], [1.0, 0.0]]}).encode()
    )
    out, ctype = handlers.output_handler(response, ctx)
    assert ctype == "application/jsonlines"
    assert [json.loads(line)["embedding"] for line in out.splitlines()] == [[0.6, 0.8], [1, 0]]
    out, ctype = handlers.output_handler(
        response, SimpleNamespace(accept_header="application/json")
    )
    assert json.loads(out) == {"embeddings": [[0.6, 0.8], [1.0, 0.0]]}
    with pytest.raises(ValueError, match="TF Serving error 400"):
        handlers.output_handler(SimpleNamespace(status_code=400, content=b"bad"), ctx)


def tf_serving_container(boto_session, captured: dict[str, list], work: Path):
    """after-call CreateTransformJob: code/inference.py around the real SavedModel."""
    import tensorflow as tf

    s3 = boto_session.client("s3")

    def run(**_: Any) -> None:
        model = captured["CreateModel"][-1]["PrimaryContainer"]
        job = captured["CreateTransformJob"][-1]
        bucket, key = split_s3_uri(model["ModelDataUrl"])
        model_dir = _extract(s3.get_object(Bucket=bucket, Key=key)["Body"].read(), work / "tfs")
        handlers = _import_script(model_dir / "code" / "inference.py", "facereid_serving_tfs")
        name = model["Environment"]["SAGEMAKER_TFS_DEFAULT_MODEL_NAME"]
        serving = tf.saved_model.load(str(model_dir / name / "1")).signatures["serving_default"]
        ctx = SimpleNamespace(
            request_content_type=job["TransformInput"]["ContentType"],
            accept_header=job["TransformOutput"]["Accept"],
        )
        src = job["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"]
        out = job["TransformOutput"]["S3OutputPath"].rstrip("/")
        in_bucket, in_prefix = split_s3_uri(src)
        for obj in s3.list_objects_v2(Bucket=in_bucket, Prefix=in_prefix)["Contents"]:
            body = s3.get_object(Bucket=in_bucket, Key=obj["Key"])["Body"]
            request = json.loads(handlers.input_handler(body, ctx))  # what TFS would receive
            faces = tf.constant(request["instances"], dtype=tf.float32)
            preds = next(iter(serving(faces=faces).values())).numpy().tolist()
            response = SimpleNamespace(
                status_code=200, content=json.dumps({"predictions": preds}).encode()
            )
            result, _ = handlers.output_handler(response, ctx)
            out_bucket, out_key = split_s3_uri(f"{out}/{obj['Key'].rsplit('/', 1)[-1]}.out")
            s3.put_object(Bucket=out_bucket, Key=out_key, Body=result.encode())

    return run


@pytest.mark.slow
def test_siamese_transform_requests_and_embeddings(s3_storage, moto_endpoint, tmp_path):
    """TF Serving image + code/inference.py; embeddings equal the local embedder's."""
    from core.registry import promote_if_better, register_version
    from models.loading import load_embedder, write_model_json
    from models.preprocessing import preprocess_image
    from models.siamese import SiameseConfig, SiameseEmbedder, build_inference_model, build_tower

    config = SiameseConfig(filters=(8, 16), embedding_dim=16)
    model_dir = tmp_path / "siamese"
    SiameseEmbedder(build_inference_model(build_tower(config)), config).save(model_dir)
    write_model_json(model_dir, "siamese", 0.5, 16, config.to_dict())
    storage = s3_storage
    version = register_version(storage, "siamese", model_dir, {"test": {"accuracy": 0.8}}, {})
    pointer = promote_if_better(storage, "siamese", version)["pointer"]
    for i in range(3):
        storage.put_bytes(f"images/s{i}.jpg", fake_face_jpeg(5, i))

    session, captured = _session_with_capture(moto_endpoint)
    session.events.register(
        "after-call.sagemaker.CreateTransformJob",
        tf_serving_container(session, captured, tmp_path),
    )
    refs = RefResolver(storage, ["images/"])
    unique = {r.cache_id: r for r in (refs(f"images/s{i}.jpg") for i in range(3))}
    table = embed_with_transform(
        storage, pointer, iter_unique_faces(storage, unique.values(), 2), list(unique),
        role_arn=ROLE, region="us-east-1", instance_type="ml.m5.xlarge", poll_s=0,
        boto_session=session, log=lambda _: None,
    )  # fmt: skip

    def norm(req: dict) -> dict:
        req = normalise_request(req, storage.bucket)
        return json.loads(json.dumps(req).replace(pointer["version"], "<version>"))

    check_snapshot("transform_create_model_siamese", norm(captured["CreateModel"][0]))
    check_snapshot(
        "transform_create_transform_job_siamese", norm(captured["CreateTransformJob"][0])
    )
    assert "tensorflow-inference:2.19" in captured["CreateModel"][0]["PrimaryContainer"]["Image"]
    local = load_embedder(model_dir)
    for cid, ref in unique.items():
        expected = local.embed(preprocess_image(storage.get_bytes(ref.target)))[0]
        np.testing.assert_allclose(table.vectors[table.index[cid]], expected, atol=1e-5)
