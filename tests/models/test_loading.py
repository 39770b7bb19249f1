"""load_embedder dispatch and the dataset channel reader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.loading import load_embedder, read_channel, write_model_json
from models.pca import PCAEmbedder
from tests.models.synthetic import make_faces, write_fake_channel


def test_load_embedder_dispatches_on_kind_and_keeps_the_threshold(tmp_path):
    faces, labels, _ = make_faces(n_people=6, per_person=4)
    model = PCAEmbedder(n_components=8, lda=False).fit(faces)
    model.save(tmp_path)
    write_model_json(tmp_path, "pca", 0.42, model.embedding_dim_, model.get_params())
    embedder = load_embedder(tmp_path)
    assert embedder.kind == "pca" and embedder.threshold == pytest.approx(0.42)
    np.testing.assert_allclose(embedder.embed(faces), model.embed(faces), atol=1e-6)
    assert embedder.embed(faces[0]).shape == (1, model.embedding_dim_)  # a single (H, W) face
    scores = embedder.score_pairs(embedder.embed(faces[:3]), embedder.embed(faces[:3]))
    np.testing.assert_allclose(scores, 1.0, atol=1e-5)
    assert embedder.same_person(scores).all()


def test_load_embedder_errors_are_specific(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.json"):
        load_embedder(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"kind": "svm", "threshold": 0.1}))
    with pytest.raises(ValueError, match="unknown model kind 'svm'"):
        load_embedder(tmp_path)


def test_a_model_trained_on_other_preprocessing_is_refused(tmp_path):
    from models.preprocessing import DEFAULT_PARAMS

    faces, _, _ = make_faces(n_people=6, per_person=4)
    model = PCAEmbedder(n_components=8, lda=False).fit(faces)
    model.save(tmp_path)
    params = DEFAULT_PARAMS.to_dict()
    write_model_json(tmp_path, "pca", 0.42, model.embedding_dim_, {}, preprocessing=params)
    assert load_embedder(tmp_path).kind == "pca"  # same preprocessing: fine
    other = {**params, "crop_top": params["crop_top"] + 4, "max_bytes": 1}
    write_model_json(tmp_path, "pca", 0.42, model.embedding_dim_, {}, preprocessing=other)
    with pytest.raises(ValueError, match=r"other preprocessing than this code's \(crop_top"):
        load_embedder(tmp_path)


def test_read_channel_reads_faces_protocol_and_manifest(tmp_path):
    root = write_fake_channel(tmp_path, n_people=20, per_person=3)
    data = read_channel(root)
    assert data.faces.shape == (60, 68, 56) and data.faces.dtype == np.float32
    assert data.version == "fake0123456789ab"
    assert set(data.splits.tolist()) == {"train", "val", "test"}
    faces, persons, ids = data.subset("val")
    assert len(faces) == len(persons) == len(ids) == 12
    pairs = data.pair_table("pairs_view2")
    assert set(pairs.fold.tolist()) == set(range(10)) and set(pairs.label.tolist()) == {0, 1}
    assert len(data.people_folds()) == 20
    i = list(data.image_ids).index(pairs.image_id_a[0])
    assert data.persons[i] == pairs.image_id_a[0].split("/")[0]


def test_read_channel_without_faces_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no faces"):
        read_channel(tmp_path)
