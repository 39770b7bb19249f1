"""Verification metrics on hand-checked cases and the View 1 / View 2 protocols' isolation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.evaluation import (
    PairTable,
    accuracy_at,
    fit_threshold,
    make_split_pairs,
    person_of,
    roc_auc,
    run_view1,
    run_view2,
    score_pairs,
    summarise_folds,
    tar_at_far,
    verification_metrics,
    view2_training_image_ids,
)
from models.pca import PCAEmbedder
from tests.models.synthetic import make_faces


def test_score_pairs_is_rowwise_cosine():
    a = np.array([[1, 0], [0, 1], [0.6, 0.8]], dtype=np.float32)
    b = np.array([[1, 0], [1, 0], [0.6, 0.8]], dtype=np.float32)
    np.testing.assert_allclose(score_pairs(a, b), [1.0, 0.0, 1.0], atol=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        score_pairs(a, b[:2])


def test_accuracy_and_threshold_on_separable_scores():
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    labels = np.array([0, 0, 0, 1, 1, 1])
    t = fit_threshold(scores, labels)
    assert 0.3 < t < 0.7
    assert accuracy_at(scores, labels, t) == 1.0
    assert accuracy_at(scores, labels, 0.75) == pytest.approx(5 / 6)
    assert roc_auc(scores, labels) == 1.0


def test_threshold_maximises_accuracy_with_overlap():
    scores = np.array([0.1, 0.4, 0.35, 0.6, 0.8, 0.5])
    labels = np.array([0, 0, 1, 1, 1, 0])
    t = fit_threshold(scores, labels)
    best = max(accuracy_at(scores, labels, c) for c in np.linspace(0, 1, 1001))
    assert accuracy_at(scores, labels, t) == pytest.approx(best)
    assert best == pytest.approx(5 / 6)


def test_auc_of_known_ranking():
    # positives 0.8, 0.4; negatives 0.6, 0.2 -> 3 of 4 positive/negative orderings right
    assert roc_auc(np.array([0.8, 0.4, 0.6, 0.2]), np.array([1, 1, 0, 0])) == pytest.approx(0.75)


def test_tar_at_far():
    neg = np.linspace(0, 1, 1000)  # 1000 negatives
    pos = np.array([0.9995, 0.995, 0.95, 0.5])
    scores = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones(4), np.zeros(1000)])
    # FAR 1e-3 allows 1 false accept (the negative at 1.0); the next negative is 0.998999,
    # so only the positive 0.9995 is accepted -> 1 of 4
    assert tar_at_far(scores, labels, 1e-3) == pytest.approx(0.25)
    # FAR 1e-2 allows 10 negatives (>= 0.990990...) -> 0.9995 and 0.995 accepted
    assert tar_at_far(scores, labels, 1e-2) == pytest.approx(0.5)


def test_metric_input_errors():
    with pytest.raises(ValueError, match="labels must be"):
        accuracy_at(np.array([0.1]), np.array([2]), 0.5)
    with pytest.raises(ValueError, match="no pairs"):
        fit_threshold(np.array([]), np.array([]))
    m = verification_metrics(np.array([0.9, 0.1]), np.array([1, 0]), 0.5, with_roc=True)
    assert m["accuracy"] == 1.0 and m["roc"]["fpr"][0] == 0.0


def test_make_split_pairs_is_balanced_deterministic_and_within_split():
    _, _, ids = make_faces(n_people=12, per_person=4)
    splits = ["val" if int(i[7:9]) < 6 else "test" for i in ids]
    ia, ib, lab = make_split_pairs(ids, splits, "val", n_pairs=40, seed=1)
    assert lab.sum() == 20 and len(lab) == 40
    assert all(splits[i] == "val" for i in np.concatenate([ia, ib]))
    assert all(
        (person_of(ids[a]) == person_of(ids[b])) == bool(y)
        for a, b, y in zip(ia, ib, lab, strict=True)
    )
    assert all(a != b for a, b in zip(ia, ib, strict=True))
    again = make_split_pairs(ids, splits, "val", n_pairs=40, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip((ia, ib, lab), again, strict=True))
    with pytest.raises(ValueError, match="has 0 images"):
        make_split_pairs(ids, splits, "train", n_pairs=10)


def test_summary_mean_se_and_std():
    folds = [{"fold": k, "accuracy": a, "auc": 0.9} for k, a in enumerate([0.8, 0.9, 0.7, 0.8])]
    s = summarise_folds(folds)
    assert s["accuracy_mean"] == pytest.approx(0.8)
    std = np.std([0.8, 0.9, 0.7, 0.8], ddof=1)
    assert s["accuracy_std"] == pytest.approx(std)
    assert s["accuracy_se"] == pytest.approx(std / math.sqrt(4))


# ---------------------------------------------------------------- fake View 2 protocol


@pytest.fixture(scope="module")
def fake_view2():
    """30 fake people in 10 people-folds (3 each), 6 images each, 8 pairs per fold."""
    faces, labels, ids = make_faces(n_people=30, per_person=6, seed=5)
    people = sorted(set(labels.tolist()))
    people_fold = {p: k % 10 for k, p in enumerate(people)}
    rng = np.random.default_rng(0)
    rows = []
    for f in range(10):
        ps = [p for p in people if people_fold[p] == f]
        for k in range(4):
            p = ps[k % 3]
            a, b = rng.choice(6, 2, replace=False) + 1
            rows.append((f, f"{p}/{a:04d}", f"{p}/{b:04d}", 1))
            i, j = rng.choice(3, 2, replace=False)
            rows.append((f, f"{ps[i]}/{k + 1:04d}", f"{ps[j]}/{k + 2:04d}", 0))
    return faces, ids, people_fold, PairTable.from_rows(rows)


def test_view2_training_ids_never_include_the_scored_fold(fake_view2):
    faces, ids, people_fold, pairs = fake_view2
    for fold in range(10):
        train_ids = view2_training_image_ids(ids, people_fold, fold)
        train_people = {person_of(i) for i in train_ids}
        scored = pairs.fold == fold
        scored_people = {
            person_of(i) for i in (*pairs.image_id_a[scored], *pairs.image_id_b[scored])
        }
        assert not train_people & scored_people
        assert not train_people & {p for p, f in people_fold.items() if f == fold}
        assert len(train_ids) == 27 * 6  # everyone else's images


def test_held_out_calibration_keeps_two_folds_out_of_training(fake_view2):
    """Fold k's model never sees fold k or its calibration fold; the threshold is the one
    fitted on the calibration fold's pairs alone."""
    from models.evaluation import _embed_pairs, fit_threshold, run_view2_fold

    faces, ids, people_fold, pairs = fake_view2
    by_bytes = {faces[k].tobytes(): person_of(i) for k, i in enumerate(ids)}
    models = []

    def train_fn(train_faces, labels):
        model = PCAEmbedder(n_components=20, lda=False).fit(train_faces, labels)
        models.append(({by_bytes[f.tobytes()] for f in train_faces}, model))
        return model

    for fold in (0, 9):
        res = run_view2_fold(train_fn, faces, ids, people_fold, pairs, fold, lambda m: None, True)
        calibration = (fold + 1) % 10
        people, model = models[-1]
        assert res["calibration_fold"] == calibration
        assert not people & {p for p, f in people_fold.items() if f in (fold, calibration)}
        assert res["n_train_people"] == 24  # eight folds of three
        scores = _embed_pairs(model, faces, {i: r for r, i in enumerate(ids)}, pairs)
        cal = pairs.fold == calibration
        assert res["threshold"] == pytest.approx(fit_threshold(scores[cal], pairs.label[cal]))


def test_run_view2_fits_only_on_other_folds(fake_view2):
    faces, ids, people_fold, pairs = fake_view2
    seen: list[set[str]] = []
    by_bytes = {faces[k].tobytes(): person_of(i) for k, i in enumerate(ids)}

    def train_fn(train_faces, labels):
        seen.append({by_bytes[f.tobytes()] for f in train_faces})
        assert {by_bytes[f.tobytes()] for f in train_faces} == set(labels.tolist())
        return PCAEmbedder(n_components=20, lda=False).fit(train_faces, labels)

    result = run_view2(train_fn, faces, ids, people_fold, pairs, log=lambda m: None)
    assert result["n_folds"] == 10 and len(seen) == 10
    for fold, people in enumerate(seen):
        assert not people & {p for p, f in people_fold.items() if f == fold}
    assert result["accuracy_mean"] > 0.8
    assert {"accuracy_se", "accuracy_std", "auc_mean", "auc_pooled", "tar_at_far_1e-3"} <= set(
        result
    )
    assert result["calibration"] == "other-folds"
    assert all(f["calibration_fold"] is None for f in result["per_fold"])


def test_run_view2_held_out_calibration_trains_without_two_folds(fake_view2):
    faces, ids, people_fold, pairs = fake_view2
    by_bytes = {faces[k].tobytes(): person_of(i) for k, i in enumerate(ids)}
    seen: list[set[str]] = []

    def train_fn(train_faces, labels):
        seen.append({by_bytes[f.tobytes()] for f in train_faces})
        return PCAEmbedder(n_components=20, lda=False).fit(train_faces, labels)

    result = run_view2(
        train_fn,
        faces,
        ids,
        people_fold,
        pairs,
        folds=[8, 9],
        log=lambda m: None,
        calibration="held-out",
    )
    assert result["calibration"] == "held-out" and result["folds"] == [8, 9]
    assert [f["calibration_fold"] for f in result["per_fold"]] == [9, 0]
    for people, kept_out in zip(seen, ({8, 9}, {9, 0}), strict=True):
        assert not people & {p for p, f in people_fold.items() if f in kept_out}
        assert len(people) == 24
    with pytest.raises(ValueError, match="calibration must be one of"):
        run_view2(train_fn, faces, ids, people_fold, pairs, folds=[0], calibration="val")


def test_run_view1_rejects_overlapping_people_and_scores_test_pairs(fake_view2):
    faces, ids, people_fold, pairs = fake_view2
    people = sorted(people_fold)
    train_pairs = PairTable.from_rows(
        (0, a, b, y)
        for f, a, b, y in zip(
            pairs.fold, pairs.image_id_a, pairs.image_id_b, pairs.label, strict=True
        )
        if f < 5
    )
    test_pairs = PairTable.from_rows(
        (0, a, b, y)
        for f, a, b, y in zip(
            pairs.fold, pairs.image_id_a, pairs.image_id_b, pairs.label, strict=True
        )
        if f >= 5
    )
    train_people = [p for p in people if people_fold[p] < 5]

    def fit(f, y):
        return PCAEmbedder(n_components=20, lda=False).fit(f, y)

    res = run_view1(fit, faces, ids, train_people, train_pairs, test_pairs, log=lambda m: None)
    assert res["n_pairs"] == len(test_pairs) and res["accuracy"] > 0.8
    with pytest.raises(ValueError, match="overlap"):
        run_view1(fit, faces, ids, people, train_pairs, test_pairs, log=lambda m: None)
