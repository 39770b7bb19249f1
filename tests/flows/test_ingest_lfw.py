"""The ingest_lfw flow end to end under the Prefect test harness, into a local root and moto S3."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from core import dataset as ds
from core.lfw import PROTOCOL_FILES, CorruptImageError, LfwNotFoundError
from core.storage import StorageError, storage_from_uri
from flows.ingest_lfw import ingest_lfw
from models.preprocessing import DEFAULT_PARAMS, preprocess_image
from tests.fake_lfw import build_fake_lfw

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _listing(storage) -> dict[str, tuple[int, str]]:
    return {o.key: (o.size, o.etag) for o in storage.list("")}


def _protocol_rows(lfw_home: Path, filename: str) -> int:
    """Data rows of a protocol file, counted straight from the text."""
    lines = [ln.split() for ln in (lfw_home / filename).read_text().splitlines() if ln.strip()]
    if filename == "people.txt":
        return len(lines) - 1 - int(lines[0][0])  # minus header and per-fold size lines
    return len(lines) - 1


def _artifacts(flow_run_id) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.type: a for a in arts}


def test_ingest_end_to_end_and_rerun_writes_nothing(any_storage, settings_env, fake_lfw_session):
    settings_env(any_storage)  # storage from the settings, as a deployment would run it
    fake = fake_lfw_session
    state = ingest_lfw(data_home=str(fake.data_home), return_state=True)
    result = state.result()
    assert result["status"] == "ingested"
    version = result["version"]
    storage = any_storage

    # manifest and pointer
    manifest = ds.read_manifest(storage)
    assert manifest["version"] == version == ds.latest_version(storage)
    assert manifest["counts"]["images"] == fake.n_images
    assert manifest["counts"]["people"] == len(fake.people)
    assert manifest["preprocessing"] == DEFAULT_PARAMS.to_dict()
    assert manifest["face_shape"] == [68, 56]
    assert manifest["seed"] == 42 and "sklearn_version" in manifest
    assert set(manifest["inputs"]["protocol_sha256"]) >= {f for f, _ in PROTOCOL_FILES.values()}

    # faces: schema, counts, content
    faces = ds.read_faces(storage, version)
    assert faces.schema.equals(ds.FACES_SCHEMA)
    assert faces.num_rows == fake.n_images
    people = faces.column("person").to_pylist()
    assert {p: people.count(p) for p in set(people)} == fake.people
    assert len(set(faces.column("image_id").to_pylist())) == fake.n_images
    arr = ds.faces_array(faces)
    assert arr.shape == (fake.n_images, 68, 56) and arr.dtype == np.float32
    for row in (0, faces.num_rows // 2, faces.num_rows - 1):
        rec = faces.slice(row, 1).to_pylist()[0]
        original = fake.image_path(rec["person"], rec["image_index"]).read_bytes()
        assert rec["jpeg"] == original
        assert rec["sha256"] == hashlib.sha256(original).hexdigest()
        assert rec["image_id"] == f"{rec['person']}/{rec['image_index']:04d}"
        np.testing.assert_array_equal(arr[row], preprocess_image(original))

    # identity-disjoint split, every split used, counts consistent with the manifest
    split_people: dict[str, set[str]] = {}
    for person, split in zip(people, faces.column("split").to_pylist(), strict=True):
        split_people.setdefault(split, set()).add(person)
    assert set(split_people) == {"train", "val", "test"}
    assert not split_people["train"] & split_people["val"]
    assert not split_people["train"] & split_people["test"]
    assert not split_people["val"] & split_people["test"]
    splits = faces.column("split").to_pylist()
    for name, counts in manifest["counts"]["splits"].items():
        assert counts["images"] == splits.count(name)
        assert counts["people"] == len(split_people[name])

    # protocol tables intact
    for table, (filename, _kind) in PROTOCOL_FILES.items():
        t = ds.read_protocol(storage, version, table)
        assert (
            t.num_rows
            == _protocol_rows(fake.lfw_home, filename)
            == (manifest["counts"]["protocol"][table])
        )
    v2 = ds.read_protocol(storage, version, "pairs_view2")
    assert v2.schema.field("label").type == pa.int8()
    assert set(v2.column("image_id_a").to_pylist()) <= set(faces.column("image_id").to_pylist())

    # report next to the dataset, artifacts in Prefect
    for name in ("images_per_person.png", "sample_faces.png", "mean_face.png"):
        assert storage.get_bytes(ds.report_key(version, name)).startswith(b"\x89PNG")
    arts = _artifacts(state.state_details.flow_run_id)
    assert {"markdown", "table", "progress"} <= set(arts)
    assert storage.url_for(ds.report_key(version, "mean_face.png")) in arts["markdown"].data
    assert float(arts["progress"].data) == 100.0

    # second run: same version, nothing written
    before = _listing(storage)
    again = ingest_lfw(data_home=str(fake.data_home))
    assert again["status"] == "already_ingested" and again["version"] == version
    assert _listing(storage) == before


def test_crash_half_way_is_completed_not_duplicated(local_storage, fake_lfw_session, monkeypatch):
    monkeypatch.setattr(ds, "SHARD_ROWS", 40)  # several shards from the small fake tree
    uri = local_storage.uri
    first = ingest_lfw(data_home=str(fake_lfw_session.data_home), storage_uri=uri)
    version = first["version"]
    n_shards = first["counts"]["shards"]
    assert n_shards >= 3 and first["written_shards"] == n_shards
    shard_bytes = {i: local_storage.get_bytes(ds.shard_key(version, i)) for i in range(n_shards)}

    # the state a run that died while writing shard 1 leaves behind
    local_storage.delete(ds.manifest_key(version))
    local_storage.delete(ds.LATEST_KEY)
    local_storage.delete(ds.shard_key(version, 1))
    for table in PROTOCOL_FILES:
        local_storage.delete(ds.protocol_key(version, table))
    with pytest.raises(ds.DatasetNotFound):
        ds.read_faces(local_storage, version)  # not complete -> not readable
    kept = {k: v for k, v in _listing(local_storage).items() if "/faces/" in k}

    second = ingest_lfw(data_home=str(fake_lfw_session.data_home), storage_uri=uri)
    assert second["status"] == "resumed" and second["version"] == version
    assert (second["written_shards"], second["skipped_shards"]) == (1, n_shards - 1)
    after = _listing(local_storage)
    for key, info in kept.items():
        assert after[key] == info  # finished shards untouched
    faces_keys = sorted(k for k in after if "/faces/" in k)
    assert faces_keys == [ds.shard_key(version, i) for i in range(n_shards)]  # no duplicates
    assert local_storage.get_bytes(ds.shard_key(version, 1)) == shard_bytes[1]  # deterministic
    faces = ds.read_faces(local_storage, version)
    assert faces.num_rows == fake_lfw_session.n_images
    assert len(set(faces.column("image_id").to_pylist())) == faces.num_rows
    assert ds.read_manifest(local_storage)["counts"] == first["counts"]


def test_corrupt_jpeg_fails_naming_the_file_and_leaves_no_manifest(local_storage, fake_lfw):
    victim = fake_lfw.image_path(sorted(fake_lfw.people)[-1], 1)
    victim.write_bytes(victim.read_bytes()[:300])  # truncated JPEG
    with pytest.raises(CorruptImageError, match=str(victim)):
        ingest_lfw(data_home=str(fake_lfw.data_home), storage_uri=local_storage.uri)
    keys = [o.key for o in local_storage.list("")]
    assert not any(k.endswith("manifest.json") for k in keys)
    assert ds.LATEST_KEY not in keys


def test_missing_protocol_file_fails_naming_it(local_storage, tmp_path):
    fake = build_fake_lfw(tmp_path / "lfw", n_people=20, skip_protocol=("pairs.txt",))
    with pytest.raises(LfwNotFoundError, match=r"pairs\.txt is missing"):
        ingest_lfw(data_home=str(fake.data_home), storage_uri=local_storage.uri)
    assert list(local_storage.list("")) == []


def test_missing_lfw_home_fails_naming_it(local_storage, tmp_path):
    with pytest.raises(LfwNotFoundError, match=str(tmp_path / "empty" / "lfw_home")):
        ingest_lfw(data_home=str(tmp_path / "empty"), storage_uri=local_storage.uri)
    assert not (tmp_path / "empty").exists()


def test_unreachable_s3_endpoint_fails_naming_it(
    settings_env, local_storage, fake_lfw_session, dead_port
):
    endpoint = f"http://127.0.0.1:{dead_port}"  # nothing listens there
    settings_env(local_storage, s3_endpoint_url=endpoint)
    with pytest.raises(StorageError, match=endpoint.split("//")[1]):
        ingest_lfw(data_home=str(fake_lfw_session.data_home), storage_uri="s3://facereid/data")


def test_read_only_lfw_is_not_written_to(local_storage, fake_lfw):
    before = {str(p): p.stat().st_mtime_ns for p in fake_lfw.data_home.rglob("*")}
    result = ingest_lfw(data_home=str(fake_lfw.data_home), storage_uri=local_storage.uri)
    assert result["status"] == "ingested"
    assert {str(p): p.stat().st_mtime_ns for p in fake_lfw.data_home.rglob("*")} == before


def test_seed_changes_split_and_version(local_storage, fake_lfw_session):
    a = ingest_lfw(data_home=str(fake_lfw_session.data_home), storage_uri=local_storage.uri)
    b = ingest_lfw(data_home=str(fake_lfw_session.data_home), storage_uri=local_storage.uri, seed=7)
    assert a["version"] != b["version"]
    assert ds.latest_version(local_storage) == b["version"]
    split_a = dict(zip(*ds.read_faces(local_storage, a["version"], ["image_id", "split"])
                       .columns, strict=True))  # fmt: skip
    split_b = dict(zip(*ds.read_faces(local_storage, b["version"], ["image_id", "split"])
                       .columns, strict=True))  # fmt: skip
    assert split_a != split_b
    # back to the default split: found complete, nothing written, and latest follows
    c = ingest_lfw(data_home=str(fake_lfw_session.data_home), storage_uri=local_storage.uri)
    assert (c["status"], c["version"]) == ("already_ingested", a["version"])
    assert ds.latest_version(local_storage) == a["version"]


def test_optional_names_file_is_no_part_of_the_version(local_storage, fake_lfw):
    """A mirror with lfw-names.txt and a download without it hold the same dataset."""
    a = ingest_lfw(data_home=str(fake_lfw.data_home), storage_uri=local_storage.uri)
    (fake_lfw.lfw_home / "lfw-names.txt").unlink()
    b = ingest_lfw(data_home=str(fake_lfw.data_home), storage_uri=local_storage.uri)
    assert (b["status"], b["version"]) == ("already_ingested", a["version"])


@pytest.mark.real_lfw
@pytest.mark.slow
def test_real_lfw_full_ingest(real_lfw_data_home, tmp_path):
    uri = f"file://{tmp_path / 'store'}"
    result = ingest_lfw(data_home=str(real_lfw_data_home), storage_uri=uri)
    counts = result["counts"]
    assert counts["images"] == 13233 and counts["people"] == 5749
    assert counts["protocol"]["pairs_view2"] == 6000
    assert counts["protocol"]["pairs_view1_train"] == 2200
    assert counts["protocol"]["pairs_view1_test"] == 1000
    assert counts["protocol"]["people_view2"] == 5749
    storage = storage_from_uri(uri)
    faces = ds.read_faces(storage, columns=["person", "split"])
    assert faces.num_rows == 13233
    by_split: dict[str, set[str]] = {}
    for person, split in zip(*faces.columns, strict=True):
        by_split.setdefault(split.as_py(), set()).add(person.as_py())
    assert sum(len(s) for s in by_split.values()) == 5749  # nobody in two splits
    pairs = ds.read_protocol(storage, None, "pairs_view2")
    assert (
        pairs.group_by("fold").aggregate([("label", "sum")]).column("label_sum").to_pylist()
        == [300] * 10
    )
