"""verify_pairs end to end on moto S3 under the Prefect harness, with a real PCA model."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from core.ledger import incoming_lists, ledger_key, read_entry
from tests.fake_lfw import fake_face_jpeg

pytestmark = pytest.mark.usefixtures("prefect_harness")

N_PEOPLE = 12


def _face_bytes(person: int, image: int) -> bytes:
    return fake_face_jpeg(person + 1, image)


@pytest.fixture(scope="module")
def pca_model_dir(tmp_path_factory):
    """A real PCA embedder fitted on fake faces, saved as a model directory."""
    from models.evaluation import fit_threshold, score_pairs
    from models.loading import write_model_json
    from models.pca import PCAEmbedder
    from models.preprocessing import preprocess_image

    faces, labels = [], []
    for person in range(N_PEOPLE):
        for image in range(6):
            faces.append(preprocess_image(_face_bytes(person, image)))
            labels.append(person)
    faces_arr, labels_arr = np.stack(faces), np.array(labels)
    model = PCAEmbedder(n_components=30, lda=True).fit(faces_arr, labels_arr)
    emb = model.embed(faces_arr)
    ia, ib = np.triu_indices(len(labels_arr), 1)
    threshold = fit_threshold(score_pairs(emb[ia], emb[ib]), labels_arr[ia] == labels_arr[ib])
    model_dir = tmp_path_factory.mktemp("pca_model")
    model.save(model_dir)
    write_model_json(model_dir, "pca", threshold, model.embedding_dim_, model.get_params())
    return model_dir


def _promote(storage, model_dir, name="pca", accuracy=0.9) -> dict:
    from core.registry import promote_if_better, register_version

    version = register_version(
        storage, name, model_dir, {"test": {"accuracy": accuracy, "auc": 0.95}}, {"kind": "pca"}
    )
    return promote_if_better(storage, name, version)["pointer"]


def _two_uploads(storage, settings_env, model_dir, name: str, person: int) -> tuple[str, str]:
    """Settings on ``storage``, a promoted PCA model, and two images of one person at
    ``uploads/<name>0.jpg`` and ``uploads/<name>1.jpg`` (their keys)."""
    settings_env(storage)
    _promote(storage, model_dir)
    keys = (f"uploads/{name}0.jpg", f"uploads/{name}1.jpg")
    for image, key in enumerate(keys):
        storage.put_bytes(key, _face_bytes(person, image))
    return keys


def _write_lfw_dataset(storage) -> None:
    """A minimal ingested dataset (contract layout) with two images of one person."""
    from core.dataset import LATEST_KEY, manifest_key, shard_key
    from models.preprocessing import preprocess_image

    version = "0123456789abcdef"
    faces = np.stack([preprocess_image(_face_bytes(0, i)) for i in (1, 2)])
    flat = pa.array(faces.reshape(-1), pa.float32())
    table = pa.table(
        {
            "image_id": ["Person_AA/0001", "Person_AA/0002"],
            "face": pa.FixedSizeListArray.from_arrays(flat, 68 * 56),
        }
    )
    storage.write_parquet(shard_key(version, 0), table)
    manifest = {"version": version, "counts": {"shards": 1, "images": 2}}
    storage.put_bytes(manifest_key(version), json.dumps(manifest).encode())
    storage.put_bytes(LATEST_KEY, json.dumps({"version": version}).encode())


def _csv(rows: list[list[str]]) -> bytes:
    return ("\n".join(",".join(r) for r in rows) + "\n").encode()


def _results(storage, stem: str) -> tuple[list[str], pa.Table]:
    keys = sorted(i.key for i in storage.list(f"results/{stem}/"))
    parquet = [k for k in keys if k.endswith(".parquet")]
    assert len(parquet) == 1, keys
    return keys, storage.read_parquet(parquet[0])


def _rows(table: pa.Table) -> dict[str, dict]:
    return {r["pair_id"]: r for r in table.to_pylist()}


def _png(size: tuple[int, int], mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def world(s3_storage, settings_env, pca_model_dir, moto_endpoint):
    """Images, an LFW dataset and a promoted model in a fresh bucket."""
    import boto3

    storage = s3_storage
    settings_env(storage)
    for person in range(N_PEOPLE):
        for image in range(3):
            storage.put_bytes(f"images/p{person}_{image}.jpg", _face_bytes(person, image + 10))
    storage.put_bytes("images/junk.jpg", b"this is not an image")
    storage.put_bytes("images/truncated.jpg", _face_bytes(0, 0)[:400])
    storage.put_bytes("images/blank.png", _png((320, 240)))
    storage.put_bytes("images/bomb.png", _png((7000, 6000)))  # 42 Mpx > max_pixels
    storage.put_bytes("models/secret.jpg", _face_bytes(0, 99))  # outside allowed prefixes
    other = f"{storage.bucket}-other"
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=other)
    s3.put_object(Bucket=other, Key="images/p0_0.jpg", Body=_face_bytes(0, 10))
    _write_lfw_dataset(storage)
    pointer = _promote(storage, pca_model_dir)
    return storage, pointer, other


def _run(**kwargs):
    from flows.verify_pairs import verify_pairs

    return verify_pairs(**kwargs)


def test_verify_end_to_end_twice(world):
    storage, pointer, other_bucket = world
    url = storage.url_for("images/p0_0.jpg")  # s3://bucket/root/images/p0_0.jpg
    storage.put_bytes(
        "incoming/good.csv",
        _csv(
            [
                ["pair_id", "image_a", "image_b"],
                ["same-0", "images/p0_0.jpg", "images/p0_1.jpg"],
                ["same-uri", url, "images/p0_2.jpg"],
                ["diff-0", "images/p0_0.jpg", "images/p5_0.jpg"],
                ["lfw-same", "lfw:Person_AA/1", "lfw:Person_AA/0002"],
                ["lfw-vs-key", "lfw:Person_AA/0001", "images/p0_1.jpg"],
            ]
        ),
    )
    labelled = pa.table(
        {
            "image_a": [f"images/p{p}_0.jpg" for p in range(N_PEOPLE)] * 2,
            "image_b": [f"images/p{p}_1.jpg" for p in range(N_PEOPLE)]
            + [f"images/p{(p + 1) % N_PEOPLE}_1.jpg" for p in range(N_PEOPLE)],
            "label": [1] * N_PEOPLE + [0] * N_PEOPLE,
        }
    )
    buf = io.BytesIO()
    pq.write_table(labelled, buf)
    storage.put_bytes("incoming/team/labelled.parquet", buf.getvalue())
    storage.put_bytes(
        "incoming/bad_rows.csv",
        _csv(
            [
                ["pair_id", "image_a", "image_b", "label"],
                ["ok", "images/p1_0.jpg", "images/p1_1.jpg", "1"],
                ["missing", "images/p1_0.jpg", "images/nope.jpg", "1"],
                ["junk", "images/junk.jpg", "images/p1_1.jpg", "0"],
                ["truncated", "images/truncated.jpg", "images/p1_1.jpg", "0"],
                ["bomb", "images/bomb.png", "images/p1_1.jpg", "0"],
                ["noface", "images/blank.png", "images/p1_1.jpg", "0"],
                ["empty", "images/p1_0.jpg", "", "1"],
                ["badlabel", "images/p1_0.jpg", "images/p1_1.jpg", "maybe"],
                ["traversal", "images/../models/secret.jpg", "images/p1_1.jpg", "0"],
                ["outside", "models/secret.jpg", "images/p1_1.jpg", "0"],
                ["scheme", "https://example.com/a.jpg", "images/p1_1.jpg", "0"],
                ["lfw-missing", "lfw:Nobody_Here/0001", "images/p1_1.jpg", "0"],
                ["ragged", "images/p1_0.jpg"],
            ]
        ),
    )
    storage.put_bytes("incoming/unparseable.csv", b"name;score\nfoo;1\n")
    storage.put_bytes(
        "incoming/other_bucket.csv",
        _csv(
            [
                ["pair_id", "image_a", "image_b"],
                ["x", f"s3://{other_bucket}/images/p0_0.jpg", "images/p0_1.jpg"],
                ["y", f"s3://{other_bucket}/root/images/p0_0.jpg", "images/p0_1.jpg"],
            ]
        ),
    )
    storage.put_bytes("incoming/readme.txt", b"not a list: ignored")
    storage.put_bytes(  # URL syntax in the name: the results key must still be exact
        "incoming/night#1?.csv",
        _csv([["pair_id", "image_a", "image_b"], ["n", "images/p3_0.jpg", "images/p3_1.jpg"]]),
    )

    first = _run()
    processed = {p["list_key"]: p for p in first["processed"]}
    assert set(processed) == {
        "incoming/good.csv",
        "incoming/team/labelled.parquet",
        "incoming/bad_rows.csv",
        "incoming/other_bucket.csv",
        "incoming/night#1?.csv",
    }
    night = processed["incoming/night#1?.csv"]
    assert night["result_key"] == f"results/night#1?/{night['run_id']}.parquet"
    _, table = _results(storage, "night#1?")
    assert table.column("status").to_pylist() == ["ok"]
    assert [r["list_key"] for r in first["rejected"]] == ["incoming/unparseable.csv"]

    # good list: every row ok, same person scores above different person
    keys, table = _results(storage, "good")
    run_id = processed["incoming/good.csv"]["run_id"]
    assert keys == [f"results/good/{run_id}.csv", f"results/good/{run_id}.parquet"]
    assert table.schema.names == [
        "pair_id", "image_a", "image_b", "score", "threshold", "same_person",
        "model_name", "model_version", "status", "error",
    ]  # fmt: skip
    rows = _rows(table)
    assert [r["status"] for r in rows.values()] == ["ok"] * 5
    assert {r["model_version"] for r in rows.values()} == {pointer["version"]}
    assert rows["same-0"]["score"] > rows["diff-0"]["score"]
    assert rows["same-0"]["same_person"] and not rows["diff-0"]["same_person"]
    assert rows["same-uri"]["same_person"] and rows["lfw-same"]["same_person"]
    assert rows["lfw-vs-key"]["same_person"]
    for r in rows.values():
        assert r["same_person"] == (r["score"] >= r["threshold"])
        assert r["threshold"] == pytest.approx(pointer["threshold"])
    csv_text = storage.get_bytes(f"results/good/{run_id}.csv").decode()
    assert len(csv_text.strip().splitlines()) == 1 + 5

    # labelled list: accuracy, AUC and the confusion matrix
    _, table = _results(storage, "team/labelled")  # a sub-folder keeps its own results
    assert table.num_rows == 2 * N_PEOPLE and table.column("label").to_pylist()[0] == 1
    metrics = processed["incoming/team/labelled.parquet"]["metrics"]
    cm = metrics["confusion_matrix"]
    assert sum(cm.values()) == 2 * N_PEOPLE
    assert metrics["accuracy"] == pytest.approx((cm["tp"] + cm["tn"]) / (2 * N_PEOPLE))
    assert metrics["accuracy"] >= 0.75 and metrics["roc_auc"] >= 0.8

    # bad rows: one status per row, the rest of the list goes on
    _, table = _results(storage, "bad_rows")
    rows = _rows(table)
    expected = {
        "ok": "ok",
        "missing": "missing_image",
        "junk": "unreadable_image",
        "truncated": "unreadable_image",
        "bomb": "unreadable_image",
        "noface": "no_face",
        "empty": "invalid_row",
        "badlabel": "invalid_row",
        "traversal": "forbidden",
        "outside": "forbidden",
        "scheme": "forbidden",
        "lfw-missing": "missing_image",
        "ragged": "invalid_row",
    }
    assert {k: r["status"] for k, r in rows.items()} == expected
    for pid, r in rows.items():
        assert (r["error"] is None) == (pid == "ok"), r
        assert (r["score"] is None) == (pid != "ok")
    assert "nope.jpg" in rows["missing"]["error"]
    assert "pixels" in rows["bomb"]["error"]
    bad_metrics = processed["incoming/bad_rows.csv"]["metrics"]
    assert bad_metrics["status_counts"] == dict(Counter(expected.values()))
    assert bad_metrics["confusion_matrix"]["tp"] + bad_metrics["confusion_matrix"]["fn"] == 1

    # another bucket: forbidden, never fetched
    _, table = _results(storage, "other_bucket")
    assert table.column("status").to_pylist() == ["forbidden", "forbidden"]

    # the unparseable list moved aside with its report
    assert not storage.exists("incoming/unparseable.csv")
    assert storage.get_bytes("rejected/unparseable.csv") == b"name;score\nfoo;1\n"
    report = json.loads(storage.get_bytes("rejected/unparseable.csv.error.json"))
    assert "missing required column" in report["error"]

    # the ledger: one entry per processed list version
    for info in incoming_lists(storage):
        if info.key.endswith(".csv") or info.key.endswith(".parquet"):
            entry = read_entry(storage, info.key, info.etag)
            assert entry and entry["result_key"] == processed[info.key]["result_key"]
            assert entry["precision"] == "float32" and entry["backend"] == "local"

    # second run: nothing to do, nothing written
    before = sorted(i.key for i in storage.list("results/"))
    second = _run()
    assert second["processed"] == [] and second["rejected"] == []
    assert sorted(i.key for i in storage.list("results/")) == before

    # an edited list is processed again, under a new run id; the old result stays
    storage.put_bytes(
        "incoming/good.csv",
        _csv([["pair_id", "image_a", "image_b"], ["e", "images/p2_0.jpg", "images/p2_1.jpg"]]),
    )
    third = _run()
    assert [p["list_key"] for p in third["processed"]] == ["incoming/good.csv"]
    assert third["processed"][0]["run_id"] != run_id
    assert len([k for k in storage.list("results/good/") if k.key.endswith(".parquet")]) == 2


def test_crash_between_results_and_ledger(world, monkeypatch):
    from prefect.states import State

    import tasks.verify as verify_tasks

    storage, _, _ = world
    rows = [["pair_id", "image_a", "image_b"]] + [
        [f"r{i}", f"images/p{i % N_PEOPLE}_0.jpg", f"images/p{(i * 7) % N_PEOPLE}_1.jpg"]
        for i in range(40)
    ]
    storage.put_bytes("incoming/crashy.csv", _csv(rows))
    info = storage.head("incoming/crashy.csv")

    def boom(*args, **kwargs):
        raise OSError("injected crash after results were published")

    monkeypatch.setattr(verify_tasks, "record_processed", boom)
    from flows.verify_pairs import verify_pairs

    state: State = verify_pairs(return_state=True)
    assert state.is_failed()
    assert storage.exists(f"results/crashy/{_only_run_id(storage)}.parquet")
    assert not storage.exists(ledger_key(info.key, info.etag))

    monkeypatch.undo()
    again = _run()
    assert [p["list_key"] for p in again["processed"]] == ["incoming/crashy.csv"]
    keys, table = _results(storage, "crashy")
    assert len(keys) == 2  # one parquet + its csv twin: the same keys were rewritten
    assert table.num_rows == 40 and len(set(table.column("pair_id").to_pylist())) == 40
    assert read_entry(storage, info.key, info.etag)["result_key"] == keys[1]
    assert _run()["processed"] == []


def test_storage_failure_on_an_image_fails_the_list_for_a_retry(world, monkeypatch):
    """Throttling that outlives the retries is not a ``missing_image``: the list fails,
    nothing is published or recorded, and the next run verifies it."""
    from prefect.states import State

    from core.storage import S3Storage, StorageError
    from flows.verify_pairs import verify_pairs

    storage, _, _ = world
    rows = [["pair_id", "image_a", "image_b"], ["a", "images/p1_0.jpg", "images/p1_1.jpg"]]
    storage.put_bytes("incoming/throttled.csv", _csv(rows))
    info = storage.head("incoming/throttled.csv")
    real_get = S3Storage.get_bytes
    calls: list[str] = []

    def throttled(self, key, max_bytes=None):
        if key == "images/p1_0.jpg":
            calls.append(key)
            raise StorageError("S3 error SlowDown on images/p1_0.jpg")
        return real_get(self, key, max_bytes=max_bytes)

    monkeypatch.setattr(S3Storage, "get_bytes", throttled)
    state: State = verify_pairs(list_key=info.key, return_state=True)
    assert state.is_failed() and "SlowDown" in str(state.message)
    assert len(calls) == 3  # fetch_image_bytes retried before giving up
    assert not list(storage.list("results/throttled/"))
    assert not storage.exists(ledger_key(info.key, info.etag))

    monkeypatch.undo()
    again = _run(list_key=info.key)
    assert again["processed"][0]["metrics"]["status_counts"]["ok"] == 1
    _, table = _results(storage, "throttled")
    assert table.column("status").to_pylist() == ["ok"]


def test_a_rerun_after_a_promotion_verifies_with_the_new_model(world, pca_model_dir, monkeypatch):
    """Results published, ledger write lost, then a new model promoted: the re-run
    verifies with the new model under a new run id, and the ledger points at that."""
    from datetime import UTC, datetime

    from prefect.states import State

    import tasks.verify as verify_tasks
    from core.registry import promote_if_better, register_version
    from flows.verify_pairs import verify_pairs

    storage, old_pointer, _ = world
    rows = [["pair_id", "image_a", "image_b"], ["a", "images/p2_0.jpg", "images/p2_1.jpg"]]
    storage.put_bytes("incoming/handover.csv", _csv(rows))
    info = storage.head("incoming/handover.csv")

    def boom(*args, **kwargs):
        raise OSError("injected crash after results were published")

    monkeypatch.setattr(verify_tasks, "record_processed", boom)
    state: State = verify_pairs(list_key=info.key, return_state=True)
    assert state.is_failed()
    monkeypatch.undo()
    (orphan,) = [i.key for i in storage.list("results/handover/") if i.key.endswith(".parquet")]

    version = register_version(
        storage, "pca", pca_model_dir, {"test": {"accuracy": 0.99}},
        {"kind": "pca"}, now=datetime(2030, 1, 1, tzinfo=UTC),
    )  # fmt: skip
    assert promote_if_better(storage, "pca", version)["promoted"]
    (entry,) = _run(list_key=info.key)["processed"]
    assert entry["model_version"] == version != old_pointer["version"]
    assert entry["result_key"] != orphan and storage.exists(orphan)
    assert read_entry(storage, info.key, info.etag)["result_key"] == entry["result_key"]
    assert storage.read_parquet(entry["result_key"]).column("model_version").to_pylist() == [
        version
    ]


def test_a_list_replaced_while_it_is_read_is_left_for_the_next_run(world, monkeypatch):
    """The user uploads a fix while the run reads the list: this run records nothing for
    either version, and the next run verifies the new one."""
    import tasks.verify as verify_tasks

    storage, _, _ = world
    old = [["pair_id", "image_a", "image_b"], ["a", "images/p3_0.jpg", "images/p3_1.jpg"]]
    new = old + [["b", "images/p4_0.jpg", "images/p4_1.jpg"]]
    storage.put_bytes("incoming/edited.csv", _csv(old))
    stale = storage.head("incoming/edited.csv")
    real_download = verify_tasks.download_to

    def download_then_user_uploads(storage_, key, dest, *args, **kwargs):
        path = real_download(storage_, key, dest, *args, **kwargs)
        if key == "incoming/edited.csv":
            storage.put_bytes(key, _csv(new))  # the fix lands while the run reads
        return path

    monkeypatch.setattr(verify_tasks, "download_to", download_then_user_uploads)
    out = _run(list_key="incoming/edited.csv")
    monkeypatch.undo()
    assert out["processed"] == out["rejected"] == out["failed"] == []
    assert not list(storage.list("results/edited/"))
    assert read_entry(storage, stale.key, stale.etag) is None
    (entry,) = _run()["processed"]  # the next run: the new version, two rows
    assert entry["list_key"] == "incoming/edited.csv" and entry["metrics"]["rows"] == 2
    assert entry["etag"] == storage.head("incoming/edited.csv").etag != stale.etag


def _only_run_id(storage) -> str:
    (key,) = [i.key for i in storage.list("results/crashy/") if i.key.endswith(".parquet")]
    return key.rsplit("/", 1)[-1].removesuffix(".parquet")


def test_named_list_and_local_storage(local_storage, settings_env, pca_model_dir):
    """``list_key`` processes one list; the same flow runs on a local storage root."""
    storage = local_storage
    _two_uploads(storage, settings_env, pca_model_dir, "a", 3)
    body = _csv([["image_a", "image_b"], ["uploads/a0.jpg", "uploads/a1.jpg"]])
    storage.put_bytes("uploads/huge.jpg", b"\xff" * (20 * 1024 * 1024 + 1))  # > max_bytes
    storage.put_bytes("incoming/one.csv", body)
    storage.put_bytes(
        "incoming/two.csv",
        body
        + b"uploads/a0.jpg/x.jpg,uploads/a1.jpg\n"  # a path through a file: not a crash
        + b"uploads/huge.jpg,uploads/a1.jpg\n",
    )
    out = _run(list_key="incoming/two.csv", max_concurrency=2, batch_size=1)
    assert [p["list_key"] for p in out["processed"]] == ["incoming/two.csv"]
    _, table = _results(storage, "two")
    assert table.column("pair_id").to_pylist() == ["0", "1", "2"]
    assert table.column("status").to_pylist() == ["ok", "missing_image", "unreadable_image"]
    assert "over the 20971520-byte limit" in table.column("error").to_pylist()[2]
    assert _run(list_key="incoming/two.csv")["processed"] == []
    assert _run(list_key="incoming/gone.csv")["processed"] == []  # deleted/rejected meanwhile
    with pytest.raises(ValueError, match="under incoming/"):
        _run(list_key="models/pca/production.json")
    with pytest.raises(ValueError, match="precision must be one of"):
        _run(precision="float16")
    assert [p["list_key"] for p in _run()["processed"]] == ["incoming/one.csv"]


def test_without_a_model_bad_lists_are_still_rejected(local_storage, settings_env):
    """Nothing promoted yet: the run fails on that, but an unparseable drop is rejected now
    and a good one waits in incoming/ for the first model."""
    from core.registry import RegistryError

    storage = local_storage
    settings_env(storage)
    storage.put_bytes("incoming/good.csv", _csv([["image_a", "image_b"], ["a.jpg", "b.jpg"]]))
    storage.put_bytes("incoming/bad.csv", b"name;score\nfoo;1\n")
    with pytest.raises(RegistryError, match="no promoted model"):
        _run()
    assert [i.key for i in incoming_lists(storage)] == ["incoming/good.csv"]
    report = json.loads(storage.get_bytes("rejected/bad.csv.error.json"))
    assert report["list_key"] == "incoming/bad.csv" and "image_a" in report["error"]
    assert not list(storage.list("results/"))


def _events_for(key: str) -> list:
    import time

    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    from flows.poll_incoming import EVENT_NAME, resource_id

    event_filter = EventFilter(
        event=EventNameFilter(name=[EVENT_NAME]),
        resource=EventResourceFilter(id=[resource_id(key)]),
    )
    events: list = []
    for _ in range(50):  # events are sent by a background worker: wait for them to land
        with get_client(sync_client=True) as client:
            events = client.read_events(filter=event_filter, limit=50).events
        if events:
            time.sleep(1.0)  # and for a duplicate, if one were ever sent
            with get_client(sync_client=True) as client:
                return client.read_events(filter=event_filter, limit=50).events
        time.sleep(0.2)
    return events


def test_drop_poll_verify_fetch(local_storage, settings_env, pca_model_dir, tmp_path):
    """The CLI chores and the poller: one event per new list version, never twice."""
    from core.cli_verify import drop_pair_list, fetch_latest_results
    from core.pairlists import PairListError
    from flows.poll_incoming import poll_incoming

    storage = local_storage
    _two_uploads(storage, settings_env, pca_model_dir, "b", 4)
    bad = tmp_path / "bad.csv"
    bad.write_text("left,right\nuploads/b0.jpg,uploads/b1.jpg\n")
    with pytest.raises(PairListError, match="missing required column"):
        drop_pair_list(storage, bad)
    with pytest.raises(ValueError, match="invalid list name"):
        drop_pair_list(storage, bad, name="../escape.csv")
    assert list(storage.list("incoming/")) == []

    good = tmp_path / "mine.csv"
    good.write_text("pair_id,image_a,image_b,label\nq1,uploads/b0.jpg,uploads/b1.jpg,1\n")
    key = drop_pair_list(storage, good, name="team/nightly.csv")
    assert key == "incoming/team/nightly.csv"

    first = poll_incoming()
    assert [a["list_key"] for a in first["announced"]] == [key]
    assert poll_incoming()["announced"] == []  # already announced: no second event
    events = _events_for(key)
    assert len(events) == 1 and events[0].payload["list_key"] == key

    out = _run(list_key=key)
    assert out["processed"][0]["metrics"]["accuracy"] == 1.0
    local = fetch_latest_results(storage, "team/nightly", tmp_path / "dl")
    rows = pq.read_table(local).to_pylist()
    assert [(r["pair_id"], r["status"], r["same_person"]) for r in rows] == [("q1", "ok", True)]
    assert local.with_suffix(".csv").read_text().count("\n") == 2

    assert local.name.startswith("team_nightly-")
    with pytest.raises(FileNotFoundError, match="no results"):
        fetch_latest_results(storage, "team", tmp_path / "dl")  # not the sub-list's results

    good.write_text("pair_id,image_a,image_b\nq2,uploads/b1.jpg,uploads/b0.jpg\n")
    drop_pair_list(storage, good, name="team/nightly.csv")  # an edit: a new version
    assert [a["list_key"] for a in poll_incoming()["announced"]] == [key]
    good.write_text("pair_id,image_a,image_b\nq3,uploads/b0.jpg,uploads/b0.jpg\n")
    with pytest.raises(FileExistsError, match="no run has verified yet"):
        drop_pair_list(storage, good, name="team/nightly.csv")  # q2 would be lost
    assert b"q2" in storage.get_bytes(key)
    drop_pair_list(storage, good, name="team/nightly.csv", force=True)
    assert b"q3" in storage.get_bytes(key)


@pytest.mark.real_lfw
@pytest.mark.slow
def test_face_in_a_larger_photo_still_verifies(
    real_lfw_data_home, s3_storage, settings_env, tmp_path
):
    """Real LFW faces pasted into larger canvases go through Haar detection and still match
    another image of the same person (plain 250x250, LFW fast path)."""
    from models.evaluation import fit_threshold, score_pairs
    from models.loading import write_model_json
    from models.pca import PCAEmbedder
    from models.preprocessing import preprocess_image

    root = real_lfw_data_home / "lfw_home" / "lfw_funneled"
    people = sorted(p for p in root.iterdir() if len(list(p.glob("*.jpg"))) >= 4)
    # disjoint identities: fit the model, fit its threshold, probe
    probe = people[::10][:20]
    rest = [p for i, p in enumerate(people) if i % 10]
    train, val = rest[:300], rest[300:400]

    def load(group):
        faces, labels = [], []
        for label, person in enumerate(group):
            for path in sorted(person.glob("*.jpg"))[:6]:
                faces.append(preprocess_image(path.read_bytes()))
                labels.append(label)
        return np.stack(faces), np.array(labels)

    model = PCAEmbedder(n_components=120, lda=True).fit(*load(train))
    val_faces, val_labels = load(val)
    emb = model.embed(val_faces)
    ia, ib = np.triu_indices(len(val_labels), 1)
    same = val_labels[ia] == val_labels[ib]
    neg = np.random.default_rng(0).choice(np.flatnonzero(~same), int(same.sum()), replace=False)
    keep = np.concatenate([np.flatnonzero(same), neg])  # balanced, like LFW's pair lists
    threshold = fit_threshold(score_pairs(emb[ia[keep]], emb[ib[keep]]), same[keep])
    model_dir = tmp_path / "model"
    model.save(model_dir)
    write_model_json(model_dir, "pca", threshold, model.embedding_dim_, model.get_params())

    storage = s3_storage
    settings_env(storage)
    _promote(storage, model_dir)
    rng = np.random.default_rng(1)
    rows = [["pair_id", "image_a", "image_b"]]
    for i, person in enumerate(probe):
        first, second = sorted(person.glob("*.jpg"))[:2]
        storage.put_bytes(f"images/{i}_a.jpg", first.read_bytes())
        storage.put_bytes(f"images/{i}_b.jpg", second.read_bytes())
        h, w = (int(v) for v in rng.integers(400, 700, 2))
        canvas = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        canvas.paste(Image.open(first), tuple(int(v) for v in rng.integers(0, (w - 250, h - 250))))
        buf = io.BytesIO()
        canvas.save(buf, format="JPEG", quality=92)
        storage.put_bytes(f"images/{i}_photo.jpg", buf.getvalue())
        rows.append([f"plain-{i}", f"images/{i}_a.jpg", f"images/{i}_b.jpg"])
        rows.append([f"photo-{i}", f"images/{i}_photo.jpg", f"images/{i}_b.jpg"])
        rows.append([f"photo-self-{i}", f"images/{i}_photo.jpg", f"images/{i}_a.jpg"])
    storage.put_bytes("incoming/photos.csv", _csv(rows))
    _run()
    _, table = _results(storage, "photos")
    r = _rows(table)
    n = len(probe)
    statuses = [(r[f"photo-{i}"]["status"], r[f"photo-{i}"]["error"]) for i in range(n)]
    assert sum(s == "ok" for s, _ in statuses) >= n - 1, statuses  # Haar finds them
    ok = [i for i in range(n) if r[f"photo-{i}"]["status"] == "ok"]
    # the detected crop matches the LFW crop of the very same image ...
    assert sum(r[f"photo-self-{i}"]["same_person"] for i in ok) >= 0.9 * len(ok)
    # ... so a pair that verifies on plain LFW images still verifies from the photo
    verified = [i for i in ok if r[f"plain-{i}"]["same_person"]]
    assert verified, "no probe pair verifies even on plain LFW images"
    still = [i for i in verified if r[f"photo-{i}"]["same_person"]]
    # measured with the PCA above: 10 of 13 (the photo crop scores ~0.05 lower on average)
    assert len(still) >= 0.7 * len(verified), (len(still), len(verified))


def test_lists_another_run_records_meanwhile_are_not_verified_twice(
    local_storage, settings_env, pca_model_dir, monkeypatch
):
    """The nightly and an on-drop run can both hold a list. ``b``: the other run finished it
    before this one got to it, so it is skipped. ``c``: both verified it and the other (with
    another model version) recorded first; the ledger keeps that one. ``d``: this run's own
    ledger write landed but its response was lost; the retry finds its own entry."""
    import flows.verify_pairs as flow_module
    import tasks.verify as verify_tasks
    from core.ledger import record_processed
    from core.storage import StorageError

    storage = local_storage
    _two_uploads(storage, settings_env, pca_model_dir, "c", 5)
    body = _csv([["image_a", "image_b"], ["uploads/c0.jpg", "uploads/c1.jpg"]])
    for name in "abcd":
        storage.put_bytes(f"incoming/{name}.csv", body)

    def other_run_records(key: str) -> str:
        info = storage.head(key)
        theirs = f"results/{key[9:-4]}/other-run.parquet"
        assert record_processed(storage, info.key, info.etag, {"result_key": theirs})
        return theirs

    real_find, real_record = flow_module.find_pending_lists, verify_tasks.record_in_ledger
    theirs: dict[str, str] = {}

    def find_then_b_is_done_elsewhere(*args, **kwargs):
        pending = real_find(*args, **kwargs)
        theirs["incoming/b.csv"] = other_run_records("incoming/b.csv")
        return pending

    lost_response: list[str] = []

    def record(storage_, job, entry):
        if job.info.key == "incoming/c.csv" and "incoming/c.csv" not in theirs:
            theirs["incoming/c.csv"] = other_run_records("incoming/c.csv")
        if job.info.key == "incoming/d.csv" and not lost_response:
            lost_response.append(job.info.key)
            assert real_record(storage_, job, entry)  # landed, then the response is lost
            raise StorageError("connection reset after the write")
        return real_record(storage_, job, entry)

    monkeypatch.setattr(flow_module, "find_pending_lists", find_then_b_is_done_elsewhere)
    monkeypatch.setattr(verify_tasks, "record_in_ledger", record)
    out = _run()
    assert [p["list_key"] for p in out["processed"]] == ["incoming/a.csv", "incoming/d.csv"]
    assert lost_response == ["incoming/d.csv"]
    assert [(e["list_key"], e["result_key"]) for e in out["verified_elsewhere"]] == [
        ("incoming/b.csv", theirs["incoming/b.csv"]),
        ("incoming/c.csv", theirs["incoming/c.csv"]),
    ]
    assert list(storage.list("results/b/")) == []  # skipped: nothing embedded or written
    assert [i.key for i in storage.list("results/c/")] != []  # verified, but not the record
    for name in "bc":
        info = storage.head(f"incoming/{name}.csv")
        assert read_entry(storage, info.key, info.etag)["result_key"] == theirs[info.key]
    monkeypatch.undo()
    assert _run()["processed"] == []


def test_results_are_those_of_the_list_version_now_in_incoming(
    local_storage, settings_env, pca_model_dir, tmp_path
):
    """Re-dropping an earlier version's exact bytes is not verified again; ``facereid
    results`` then returns that version's results, not the newest file."""
    import contextlib

    from core.cli_verify import drop_pair_list, fetch_latest_results

    storage = local_storage
    _two_uploads(storage, settings_env, pca_model_dir, "d", 6)
    local = tmp_path / "night.csv"

    def drop(pair_id: str) -> str:
        local.write_text(f"pair_id,image_a,image_b\n{pair_id},uploads/d0.jpg,uploads/d1.jpg\n")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            drop_pair_list(storage, local)
        return out.getvalue()

    def fetch() -> tuple[list[str], str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            path = fetch_latest_results(storage, "night", tmp_path / "dl")
        return pq.read_table(path).column("pair_id").to_pylist(), out.getvalue()

    drop("v1")
    assert len(_run()["processed"]) == 1
    drop("v2")
    assert len(_run()["processed"]) == 1
    assert fetch() == (["v2"], "")
    assert "verified already" in drop("v1")
    assert _run()["processed"] == []
    assert fetch() == (["v1"], "")  # the newest file is v2's
    drop("v3")
    ids, note = fetch()
    assert ids == ["v2"] and "has not been verified in its current version yet" in note
