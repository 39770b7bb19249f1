"""PCAEmbedder: estimator contract, behaviour on identity data, save/load without pickle."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from models.evaluation import make_split_pairs, roc_auc, score_pairs
from models.pca import PCAEmbedder
from tests.models.synthetic import make_faces


@pytest.fixture(scope="module")
def data():
    return make_faces(n_people=16, per_person=6, seed=3)


def test_fit_returns_self_and_learned_attributes_end_in_underscore(data):
    faces, labels, _ = data
    model = PCAEmbedder(n_components=20, lda=True)
    params_before = model.get_params()
    assert model.fit(faces, labels) is model
    assert model.get_params() == params_before  # fit does not touch hyperparameters
    learned = set(vars(model)) - set(params_before)
    assert learned and all(name.endswith("_") for name in learned)
    assert model.components_.shape == (3, 20, 68 * 56)  # one subspace per feature map
    assert clone(model).get_params() == params_before
    assert not hasattr(clone(model), "components_")


def test_unfitted_raises_not_fitted_error(data):
    with pytest.raises(NotFittedError, match="not fitted"):
        PCAEmbedder().embed(data[0][:2])


def test_bad_hyperparameter_is_a_plain_error(data):
    with pytest.raises(ValueError, match="lda must be"):
        PCAEmbedder(lda="sometimes").fit(data[0], data[1])
    with pytest.raises(ValueError, match="needs identity labels"):
        PCAEmbedder(lda=True).fit(data[0])


def test_embeddings_are_l2_normalised_float32(data):
    faces, labels, _ = data
    emb = PCAEmbedder(n_components=10, lda=False).fit(faces).embed(faces)
    assert emb.dtype == np.float32 and emb.shape == (len(faces), 3 * 10)  # 3 feature maps
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("lda", [False, True])
def test_separates_unseen_people(lda):
    train_faces, train_labels, _ = make_faces(n_people=20, per_person=6, seed=1)
    test_faces, test_labels, ids = make_faces(n_people=8, per_person=6, seed=2)
    model = PCAEmbedder(n_components=40, lda=lda).fit(train_faces, train_labels)
    ia, ib, lab = make_split_pairs(ids, n_pairs=200, seed=0)
    emb = model.embed(test_faces)
    assert roc_auc(score_pairs(emb[ia], emb[ib]), lab) > 0.9


def test_lda_auto_records_its_choice(data):
    faces, labels, _ = make_faces(n_people=30, per_person=5, seed=4)
    model = PCAEmbedder(n_components=30, lda="auto").fit(faces, labels)
    assert set(model.lda_auto_scores_) == {"pca", "pca+lda"}
    assert model.lda_used_ == (model.lda_auto_scores_["pca+lda"] > model.lda_auto_scores_["pca"])


def test_flipped_face_scores_as_same_person(data):
    faces, labels, _ = data
    model = PCAEmbedder(n_components=30, lda=True).fit(faces[6:], labels[6:])
    new_faces, _, _ = make_faces(n_people=3, per_person=2, seed=9)
    emb = model.embed(new_faces)
    flipped = model.embed(new_faces[:, :, ::-1])
    same = score_pairs(emb, flipped)
    others = score_pairs(emb, np.roll(emb, 2, axis=0))  # different people
    assert same.min() > others.max()


@pytest.mark.parametrize("lda", [False, True])
def test_save_load_round_trip_without_pickle(tmp_path, data, lda):
    faces, labels, _ = data
    model = PCAEmbedder(n_components=12, lda=lda).fit(faces, labels)
    path = model.save(tmp_path)
    assert path.name == "pca.npz"
    with np.load(path, allow_pickle=False) as arrays:  # raises if anything needs pickle
        assert "components" in arrays
    loaded = PCAEmbedder.load(tmp_path)
    assert loaded.get_params() == model.get_params()
    np.testing.assert_allclose(loaded.embed(faces), model.embed(faces), atol=1e-6)
    assert loaded.lda_used_ == model.lda_used_


def test_loads_a_model_saved_before_feature_maps(tmp_path, data):
    """Registries hold pca.npz files with 2-D arrays and no 'features': one pixels map."""
    faces, labels, _ = data
    model = PCAEmbedder(n_components=12, lda=True, features="pixels").fit(faces, labels)
    path = model.save(tmp_path)
    with np.load(path, allow_pickle=False) as arrays:
        legacy = {k: arrays[k] for k in arrays.files}
    params = json.loads(str(legacy["params_json"]))
    del params["features"]
    legacy["params_json"] = np.array(json.dumps(params))
    for k in ("mean", "components", "explained_variance", "lda_scalings"):
        legacy[k] = legacy[k][0]
    np.savez(path, **legacy)
    loaded = PCAEmbedder.load(tmp_path)
    assert loaded.features == "pixels"
    np.testing.assert_allclose(loaded.embed(faces), model.embed(faces), atol=1e-6)


def test_each_feature_map_adds_a_subspace(data):
    faces, labels, _ = data
    one = PCAEmbedder(n_components=10, lda=False, features="pixels").fit(faces)
    two = PCAEmbedder(n_components=10, lda=False, features="smooth+gradient").fit(faces)
    assert one.embedding_dim_ == 10 and two.embedding_dim_ == 20
    assert two.embed(faces).shape == (len(faces), 20)
    with pytest.raises(ValueError, match="features must be"):
        PCAEmbedder(features="pixels+sift").fit(faces, labels)
