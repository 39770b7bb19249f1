"""The retrain flow end to end: fake LFW -> ingest -> retrain on moto S3, Prefect harness."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest

from core import registry
from core.storage import S3Storage

pytestmark = pytest.mark.usefixtures("prefect_harness")

SMALL = {"view2_models": [], "eval_pairs": 200}


@pytest.fixture(scope="module")
def ingested(moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(bucket, dataset version): a fake LFW tree ingested once into a module bucket."""
    import boto3

    from core.settings import get_settings
    from flows.ingest_lfw import ingest_lfw
    from tests.fake_lfw import build_fake_lfw

    bucket = f"facereid-retrain-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    fake = build_fake_lfw(tmp_path_factory.mktemp("lfw"), n_people=60, max_images=6)
    mp = pytest.MonkeyPatch()
    mp.setenv("FACEREID_S3_ENDPOINT_URL", moto_endpoint)
    get_settings.cache_clear()
    try:
        result = ingest_lfw(data_home=str(fake.data_home), storage_uri=f"s3://{bucket}/base")
    finally:
        mp.undo()
        get_settings.cache_clear()
    return bucket, result["version"]


@pytest.fixture
def storage(ingested, moto_endpoint: str, settings_env) -> S3Storage:
    """A fresh registry root per test, holding a copy of the ingested dataset."""
    bucket, version = ingested
    src = S3Storage(bucket, "base", endpoint_url=moto_endpoint)
    dst = S3Storage(bucket, f"t-{uuid.uuid4().hex[:8]}", endpoint_url=moto_endpoint)
    for info in src.list("datasets/"):
        dst.put_bytes(info.key, src.get_bytes(info.key))
    settings_env(dst)
    return dst


def _flow_logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
    return [log.message for log in logs]


def _artifacts(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


@pytest.mark.slow
def test_retrain_registers_promotes_and_keeps_a_better_champion(
    storage: S3Storage, ingested, tmp_path: Path
) -> None:
    from flows.retrain import retrain

    _, data_version = ingested
    # the flow's default view2_models: PCA also runs the LFW View 2 protocol
    state = retrain(models=["pca"], pca_components=20, eval_pairs=200, return_state=True)
    first = state.result()
    assert first["data_version"] == data_version and first["backend"] == "local"
    v1 = first["models"]["pca"]["version"]
    assert first["models"]["pca"]["promoted"] is True

    # registry objects of the version
    prefix = registry.version_prefix("pca", v1)
    keys = {i.key[len(prefix) :] for i in storage.list(prefix)}
    assert keys == {
        "model.tar.gz",
        "metrics.json",
        "model_card.md",
        "roc.png",
        "eigenfaces.png",
        "promotion.json",
    }
    metrics = registry.get_metrics(storage, "pca", v1)
    assert metrics["data_version"] == data_version
    view2 = metrics["view2"]
    assert view2["folds"] == list(range(10)) and view2["calibration"] == "other-folds"
    assert all(f["calibration_fold"] is None for f in view2["per_fold"])
    assert 0.5 <= view2["accuracy_mean"] <= 1.0
    assert metrics["card"]["backend"] == "local"
    assert metrics["card"]["hyperparameters"]["n_components"] == 20
    card = storage.get_bytes(prefix + "model_card.md").decode()
    assert data_version in card and "| backend | local |" in card and "git_commit" in card
    # the production pointer: whole JSON, pointing at the artifact
    pointer = json.loads(storage.get_bytes("models/pca/production.json"))
    assert pointer["version"] == v1 and storage.exists(pointer["artifact_key"])
    assert pointer["gate_metric"] == "accuracy"
    assert pointer["gate_value"] == pytest.approx(first["models"]["pca"]["accuracy"])
    assert pointer["data_version"] == data_version
    # the training script's output streamed into the flow run's logs
    logs = _flow_logs(state.state_details.flow_run_id)
    assert any(m.startswith("[train_pca] fitting PCA") for m in logs)
    # the report: stored, linked ROC PNG, and a markdown artifact
    report = storage.get_bytes(first["report_key"]).decode()
    assert v1 in report and "promoted to production" in report
    assert f"{100 * view2['accuracy_mean']:.2f} %" in report and "(other-folds threshold)" in report
    assert storage.get_bytes(first["roc_key"]).startswith(b"\x89PNG")
    assert storage.url_for(first["roc_key"]) in report
    arts = _artifacts(state.state_details.flow_run_id)
    assert any(a.type == "markdown" and v1 in (a.data or "") for a in arts)

    # a worse challenger (2 components) is registered but not promoted
    state = retrain(models=["pca"], pca_components=2, return_state=True, **SMALL)
    second = state.result()
    v2 = second["models"]["pca"]["version"]
    assert v2 != v1 and second["models"]["pca"]["promoted"] is False
    assert registry.get_production(storage, "pca")["version"] == v1
    decision = json.loads(storage.get_bytes(registry.version_prefix("pca", v2) + "promotion.json"))
    assert decision["promoted"] is False
    assert decision["champion_version"] == v1
    assert decision["challenger_value"] <= decision["champion_value"]
    # the champion was re-evaluated on the same pairs: same model, same data, same figure
    assert decision["champion_value"] == pytest.approx(pointer["gate_value"])
    assert decision["champion_value_source"].startswith("re-evaluated")
    report = storage.get_bytes(second["report_key"]).decode()
    assert "(production)" in report and "kept the current production" in report
    assert registry.list_versions(storage, "pca") == sorted([v1, v2])

    # the production model loads and embeds
    pointer, embedder = registry.load_production_model(storage, "pca", tmp_path / "load-cache")
    assert pointer["version"] == v1 and embedder.kind == "pca"

    # an unreadable champion does not block the gate: its recorded figure is used
    storage.put_bytes(pointer["artifact_key"], b"not a tarball")
    shutil.rmtree(tmp_path / "cache" / "pca")  # the flow's model cache (settings_env)
    third = retrain(models=["pca"], pca_components=20, **SMALL)
    v3 = third["models"]["pca"]["version"]
    decision = json.loads(storage.get_bytes(registry.version_prefix("pca", v3) + "promotion.json"))
    assert decision["champion_value_source"] == "recorded"
    assert decision["champion_value"] == pytest.approx(pointer["gate_value"])
    assert decision["promoted"] is (decision["challenger_value"] > decision["champion_value"])
    production = registry.get_production(storage, "pca")["version"]
    assert production == (v3 if decision["promoted"] else v1)


def _ingest_with_two_seeds(
    storage: S3Storage, tmp_path: Path, n_people: int, fraction: float
) -> tuple[str, str]:
    """One fake LFW tree ingested with split seeds 1 and 2 (val and test ``fraction``
    each): two dataset versions that deal the same people to different splits."""
    from flows.ingest_lfw import ingest_lfw
    from tests.fake_lfw import build_fake_lfw

    fake = build_fake_lfw(tmp_path / "lfw", n_people=n_people, max_images=6)
    versions = [
        ingest_lfw(
            data_home=str(fake.data_home), storage_uri=storage.uri, seed=seed,
            val_fraction=fraction, test_fraction=fraction,
        )["version"]
        for seed in (1, 2)
    ]  # fmt: skip
    return versions[0], versions[1]


def _split_of(storage: S3Storage, version: str) -> dict[str, str]:
    """person -> split in a dataset version."""
    from core import dataset as ds

    t = ds.read_faces(storage, version, ["person", "split"])
    persons, splits = t.column("person").to_pylist(), t.column("split").to_pylist()
    return dict(zip(persons, splits, strict=True))


@pytest.mark.slow
def test_champion_is_not_scored_on_people_it_trained_on(storage: S3Storage, tmp_path) -> None:
    """A re-ingest with another seed deals people to other splits: the gate leaves out the
    val/test people the champion trained on, for both models, so neither is flattered."""
    from core import dataset as ds
    from flows.retrain import retrain

    # big val/test shares, so that the people both versions keep out of training are enough
    # to make pairs from
    version_a, version_b = _ingest_with_two_seeds(storage, tmp_path, 150, 0.3)
    assert version_b != version_a
    first = retrain(models=["pca"], pca_components=20, data_version=version_a, **SMALL)
    v1 = first["models"]["pca"]["version"]
    assert registry.get_production(storage, "pca")["data_version"] == version_a

    a, b = _split_of(storage, version_a), _split_of(storage, version_b)
    seen = {p for p, s in b.items() if s != "train" and a[p] != "test"}
    assert seen  # the new seed put some of the champion's people into val/test

    out = retrain(models=["pca"], pca_components=20, data_version=version_b, **SMALL)
    model = out["models"]["pca"]
    decision = json.loads(
        storage.get_bytes(registry.version_prefix("pca", model["version"]) + "promotion.json")
    )
    assert decision["champion_version"] == v1
    assert (
        f"without the {len(seen)} val/test people it trained on"
        in (decision["champion_value_source"])
    )
    assert decision["promoted"] is (decision["challenger_value"] > decision["champion_value"])

    # the challenger's gate figure is its own test accuracy on the reduced pairs, computed
    # here independently: the version's faces without the champion's train/val people
    import numpy as np

    from models.evaluation import evaluate_candidate
    from models.loading import load_embedder

    challenger_dir = registry.fetch_model_dir(storage, "pca", model["version"], tmp_path / "m")
    table = ds.read_faces(storage, version_b, ["image_id", "person", "split", "face"])
    persons = table.column("person").to_pylist()
    keep = np.array([a[p] == "test" for p in persons])  # a's train+val people left out
    flat = table.column("face").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    faces = np.asarray(flat, np.float32).reshape(len(persons), *ds.FACE_SHAPE)[keep]
    expected = evaluate_candidate(
        load_embedder(challenger_dir),
        faces,
        [i for i, k in zip(table.column("image_id").to_pylist(), keep, strict=True) if k],
        [s for s, k in zip(table.column("split").to_pylist(), keep, strict=True) if k],
        [p for p, k in zip(persons, keep, strict=True) if k],
        n_pairs=SMALL["eval_pairs"],
        seed=0,
    )
    assert decision["challenger_value"] == pytest.approx(expected["test"]["accuracy"])
    assert decision["challenger_value"] != pytest.approx(model["accuracy"])  # not the full pairs


@pytest.mark.slow
def test_gate_falls_back_to_the_recorded_figure_when_too_few_people_remain(
    storage: S3Storage, tmp_path
) -> None:
    """After a re-split with small val/test shares, nearly every val/test person was in
    the champion's training data: no fair pairs remain, so the champion's recorded figure
    is the bar, and the run says so."""
    from flows.retrain import retrain

    version_a, version_b = _ingest_with_two_seeds(storage, tmp_path, 60, 0.1)
    a, b = _split_of(storage, version_a), _split_of(storage, version_b)
    unseen_test = {p for p, s in b.items() if s == "test" and a[p] == "test"}
    assert len(unseen_test) < 2  # the setup: no different pairs can be made any more

    first = retrain(models=["pca"], pca_components=10, data_version=version_a, **SMALL)
    v1 = first["models"]["pca"]["version"]
    state = retrain(
        models=["pca"], pca_components=10, data_version=version_b, return_state=True, **SMALL
    )
    out = state.result()
    v2 = out["models"]["pca"]["version"]
    decision = json.loads(storage.get_bytes(registry.version_prefix("pca", v2) + "promotion.json"))
    assert decision["champion_version"] == v1
    assert decision["champion_value_source"] == "recorded"
    assert decision["champion_value"] == pytest.approx(first["models"]["pca"]["accuracy"])
    logs = _flow_logs(state.state_details.flow_run_id)
    assert any("using its recorded figure" in m for m in logs)


def test_unknown_data_version_fails_clearly(storage: S3Storage) -> None:
    from core.dataset import DatasetNotFound
    from flows.retrain import retrain

    with pytest.raises(DatasetNotFound, match="not complete"):
        retrain(models=["pca"], data_version="0000000000000000", **SMALL)
    assert registry.list_versions(storage, "pca") == []


def test_an_extra_flag_replaces_the_flows_own_under_one_spelling() -> None:
    """``mixed_precision`` overrides the flow's ``mixed-precision``: both spellings would
    reach SageMaker's driver, which does not say which one wins."""
    from flows.retrain import hyperparameters_for

    common = dict(run_view2=False, eval_pairs=100, seed=0, pca_components=20)
    flags = hyperparameters_for(
        "siamese",
        **common,
        siamese_epochs=45,
        siamese_max_train_seconds=7200,
        siamese_mixed_precision=True,
        extra={"mixed_precision": 0, "batch_size": 64},
    )
    assert flags["mixed-precision"] == 0 and flags["batch-size"] == 64
    assert "mixed_precision" not in flags and "batch_size" not in flags
    pca = hyperparameters_for(
        "pca", **common, siamese_epochs=1, siamese_max_train_seconds=1, extra={"n_components": 5}
    )
    assert pca["n-components"] == 5 and "n_components" not in pca


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eval_pairs": 0}, "eval_pairs must be >= 2"),
        ({"extra_hyperparameters": {"pca": {"eval-pairs": 500}}}, r"sets \['eval-pairs'\]"),
        ({"extra_hyperparameters": {"pca": {"seed": 3}}}, r"sets \['seed'\]"),
        ({"extra_hyperparameters": {"siamese": {"view2_folds": 2}}}, "view2_folds"),
        ({"extra_hyperparameters": {"siamse": {"epochs": 2}}}, "unknown model 'siamse'"),
        # a typo or an abbreviation would be dropped or expanded by the entry point's parser
        (
            {"extra_hyperparameters": {"siamese": {"mixed_precison": 1}}},
            r"\['mixed_precison'\] not hyperparameters of models/train_siamese.py",
        ),
        ({"extra_hyperparameters": {"pca": {"eval-pair": 200}}}, r"\['eval-pair'\] not hyper"),
        # where the script writes its model is the backend's, not a hyperparameter
        ({"extra_hyperparameters": {"pca": {"model-dir": "/tmp/x"}}}, r"\['model-dir'\] not"),
    ],
)
def test_parameters_that_would_skew_the_gate_are_refused(storage: S3Storage, kwargs, message):
    """The champion is re-evaluated with the flow's seed and eval_pairs: a challenger
    scored on other pairs would make the comparison unfair, so those are flow-only."""
    from flows.retrain import retrain

    with pytest.raises(ValueError, match=message):
        retrain(models=["pca"], **{**SMALL, **kwargs})
    assert registry.list_versions(storage, "pca") == []


def test_failed_training_still_reports_and_fails_the_run(storage: S3Storage) -> None:
    """A model whose script fails (here: an invalid flag value) fails the run at the end."""
    from flows.retrain import retrain

    state = retrain(models=["pca"], pca_components=-5, return_state=True, **SMALL)
    assert state.is_failed()
    with pytest.raises(RuntimeError, match=r"training failed for \['pca'\]"):
        state.result()
    assert registry.get_production(storage, "pca") is None
    reports = [i.key for i in storage.list("models/_reports/") if i.key.endswith("report.md")]
    assert len(reports) == 1
    assert "not trained" in storage.get_bytes(reports[0]).decode()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:bfloat16 inference on a CPU without")  # asked for here
def test_retrain_both_models(storage: S3Storage, tmp_path: Path) -> None:
    """PCA and a tiny Siamese net in one run: both registered and promoted, one report."""
    from flows.retrain import retrain

    tiny = {"filters": "8,16", "embedding-dim": 16, "batch-size": 16}
    out = retrain(
        models=["pca", "siamese"],
        pca_components=20,
        siamese_epochs=1,
        siamese_max_train_seconds=60,
        siamese_mixed_precision=True,
        extra_hyperparameters={"siamese": tiny},
        **SMALL,
    )
    for name in ("pca", "siamese"):
        assert out["models"][name]["promoted"] is True
        pointer = registry.get_production(storage, name)
        assert pointer["version"] == out["models"][name]["version"]
        assert pointer["kind"] == name
    metrics = registry.get_metrics(storage, "siamese", out["models"]["siamese"]["version"])
    assert metrics["card"]["hyperparameters"]["filters"] == [8, 16]
    assert metrics["card"]["hyperparameters"]["mixed_precision"] is True
    report = storage.get_bytes(out["report_key"]).decode()
    assert "| siamese |" in report and "| pca |" in report

    # the promoted Siamese net verifies lists through the flow, in either precision; the
    # ledger says which, and the scores are the model's own cosines of the ingested faces
    import numpy as np

    from core import dataset as ds
    from core.ledger import read_entry
    from flows.verify_pairs import verify_pairs

    table = ds.read_faces(storage, None, ["image_id", "face"])
    ids = table.column("image_id").to_pylist()[:8]
    rows = ["pair_id,image_a,image_b"] + [f"p{k},lfw:{ids[k]},lfw:{ids[k + 1]}" for k in range(7)]
    flat = table.column("face").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    faces = np.asarray(flat, np.float32).reshape(-1, *ds.FACE_SHAPE)[:8]
    _, embedder = registry.load_production_model(storage, "siamese", tmp_path / "m")
    emb = embedder.embed(faces)
    expected = [float(emb[k] @ emb[k + 1]) for k in range(7)]
    for precision in ("float32", "bfloat16"):
        key = f"incoming/siamese-{precision}.csv"
        storage.put_bytes(key, ("\n".join(rows) + "\n").encode())
        result = verify_pairs(list_key=key, model_name="siamese", precision=precision)
        (entry,) = result["processed"]
        recorded = read_entry(storage, key, storage.head(key).etag)
        assert recorded["model_name"] == "siamese" and recorded["precision"] == precision
        scored = storage.read_parquet(entry["result_key"]).to_pylist()
        assert [r["status"] for r in scored] == ["ok"] * 7
        tolerance = 1e-5 if precision == "float32" else 0.02
        assert [r["score"] for r in scored] == pytest.approx(expected, abs=tolerance)


@pytest.mark.sagemaker
def test_sagemaker_backend_submits_both_jobs(
    storage: S3Storage, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flow's SageMaker path against moto: both jobs are created (concurrently) with
    the right images and channels; moto runs nothing, so fetching model.tar.gz fails and
    the run fails naming the missing artifact of each model."""
    import boto3

    from flows.retrain import retrain

    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER", moto_endpoint)
    state = retrain(
        models=["pca", "siamese"],
        backend="sagemaker",
        pca_components=20,
        return_state=True,
        **SMALL,
    )
    assert state.is_failed()
    with pytest.raises(RuntimeError) as err:
        state.result()
    assert "training failed for ['pca', 'siamese']" in str(err.value)
    assert "model.tar.gz does not exist" in str(err.value)

    client = boto3.client("sagemaker", endpoint_url=moto_endpoint, region_name="us-east-1")
    jobs = {}
    for summary in client.list_training_jobs(MaxResults=100)["TrainingJobSummaries"]:
        job = client.describe_training_job(TrainingJobName=summary["TrainingJobName"])
        if job["OutputDataConfig"]["S3OutputPath"].startswith(storage.url_for("models/")):
            jobs[job["TrainingJobName"].split("-")[1]] = job
    assert sorted(jobs) == ["pca", "siamese"]
    assert jobs["pca"]["AlgorithmSpecification"]["TrainingImage"].endswith(
        "sagemaker-scikit-learn:1.9-0-cpu-py3"
    )
    assert jobs["siamese"]["AlgorithmSpecification"]["TrainingImage"].endswith(
        "tensorflow-training:2.19-gpu-py312"
    )
    assert jobs["pca"]["HyperParameters"]["n-components"] == "20"
    for job in jobs.values():
        channels = {c["ChannelName"]: c for c in job["InputDataConfig"]}
        train_uri = channels["train"]["DataSource"]["S3DataSource"]["S3Uri"]
        assert train_uri == storage.url_for(f"datasets/lfw/v={ingested_version(storage)}/")
    assert registry.list_versions(storage, "pca") == []


def ingested_version(storage: S3Storage) -> str:
    from core.dataset import latest_version

    return latest_version(storage)
