"""Verification metrics and the honest LFW protocols (View 1 and View 2, 10 folds).

A *pair score* is the cosine of two L2-normalised embeddings; ``same_person`` is
``score >= threshold``. Thresholds are always fitted on pairs whose images were not scored
in the reported figure, and models are always trained on people disjoint from the scored
pairs' people (see :func:`view2_training_image_ids`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

# image ids / splits / persons: a list or a numpy array of strings
Names = Sequence[str] | np.ndarray


class SupportsEmbed(Protocol):
    def embed(self, faces: np.ndarray) -> np.ndarray: ...


# ---------------------------------------------------------------- scores and metrics


def score_pairs(emb_a: np.ndarray, emb_b: np.ndarray) -> np.ndarray:
    """Cosine similarity of row-aligned L2-normalised embeddings (a dot product per row)."""
    emb_a = np.asarray(emb_a, dtype=np.float32)
    emb_b = np.asarray(emb_b, dtype=np.float32)
    if emb_a.shape != emb_b.shape:
        raise ValueError(f"embedding shapes differ: {emb_a.shape} vs {emb_b.shape}")
    return np.einsum("ij,ij->i", emb_a, emb_b)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(np.int64).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    if scores.size == 0:
        raise ValueError("no pairs to evaluate")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 1 (same person) or 0 (different people)")
    return scores, labels


def accuracy_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    """Fraction of pairs where ``score >= threshold`` agrees with the label."""
    scores, labels = _check(scores, labels)
    return float(np.mean((scores >= threshold).astype(np.int64) == labels))


def fit_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold with the best accuracy on these pairs.

    Candidates are midpoints between consecutive distinct scores (plus one below the
    minimum and one above the maximum); ties go to the median best candidate so the
    threshold sits in the middle of the best plateau.
    """
    scores, labels = _check(scores, labels)
    uniq = np.unique(scores)
    candidates = np.concatenate([[uniq[0] - 1e-6], (uniq[:-1] + uniq[1:]) / 2.0, [uniq[-1] + 1e-6]])
    order = np.argsort(scores)
    s_sorted, l_sorted = scores[order], labels[order]
    # predictions positive for scores >= c: correct = positives above c + negatives below c
    idx = np.searchsorted(s_sorted, candidates, side="left")
    pos_cum = np.concatenate([[0], np.cumsum(l_sorted)])
    neg_cum = np.concatenate([[0], np.cumsum(1 - l_sorted)])
    n_pos = pos_cum[-1]
    correct = (n_pos - pos_cum[idx]) + neg_cum[idx]
    best = np.flatnonzero(correct == correct.max())
    return float(candidates[best[len(best) // 2]])


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    scores, labels = _check(scores, labels)
    if labels.min() == labels.max():
        return float("nan")
    return float(roc_auc_score(labels, scores))


def tar_at_far(scores: np.ndarray, labels: np.ndarray, far: float) -> float:
    """True accept rate at the strictest operating point whose false accept rate <= ``far``."""
    scores, labels = _check(scores, labels)
    if labels.min() == labels.max():
        return float("nan")
    fpr, tpr, _ = roc_curve(labels, scores)
    ok = fpr <= far + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def roc_points(scores: np.ndarray, labels: np.ndarray, max_points: int = 200) -> dict[str, list]:
    """ROC curve subsampled to at most ``max_points`` points, for plotting."""
    scores, labels = _check(scores, labels)
    if labels.min() == labels.max():
        return {"fpr": [], "tpr": [], "thresholds": []}
    fpr, tpr, thr = roc_curve(labels, scores)
    if len(fpr) > max_points:
        keep = np.unique(np.linspace(0, len(fpr) - 1, max_points).round().astype(int))
        fpr, tpr, thr = fpr[keep], tpr[keep], thr[keep]
    thr = np.where(np.isfinite(thr), thr, np.nan)
    return {
        "fpr": [round(float(v), 5) for v in fpr],
        "tpr": [round(float(v), 5) for v in tpr],
        "thresholds": [None if math.isnan(v) else round(float(v), 5) for v in thr],
    }


def verification_metrics(
    scores: np.ndarray, labels: np.ndarray, threshold: float, with_roc: bool = False
) -> dict[str, Any]:
    """Accuracy at a given threshold, AUC, TAR@FAR 1e-2 / 1e-3 (and ROC points if asked)."""
    scores, labels = _check(scores, labels)
    out: dict[str, Any] = {
        "n_pairs": int(labels.size),
        "n_same": int(labels.sum()),
        "threshold": float(threshold),
        "accuracy": accuracy_at(scores, labels, threshold),
        "auc": roc_auc(scores, labels),
        "tar_at_far_1e-2": tar_at_far(scores, labels, 1e-2),
        "tar_at_far_1e-3": tar_at_far(scores, labels, 1e-3),
    }
    if with_roc:
        out["roc"] = roc_points(scores, labels)
    return out


# ---------------------------------------------------------------- pairs from a split


def person_of(image_id: str) -> str:
    """``"George_W_Bush/0001"`` -> ``"George_W_Bush"``."""
    return image_id.rsplit("/", 1)[0]


def make_split_pairs(
    image_ids: Names,
    splits: Names | None = None,
    split: str | None = None,
    n_pairs: int = 1000,
    seed: int = 0,
    persons: Names | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Balanced same/different pairs among the images of one identity-disjoint split.

    Returns ``(index_a, index_b, label)`` indexing into ``image_ids``; half the pairs are
    same-person (drawn from people with >= 2 images), half different-person. Deterministic
    for a seed; duplicates are avoided while possible.
    """
    ids = np.asarray(image_ids, dtype=object)
    people = np.asarray(
        persons if persons is not None else [person_of(i) for i in ids], dtype=object
    )
    rows = np.arange(len(ids))
    if split is not None:
        if splits is None:
            raise ValueError("split given but no splits column")
        rows = rows[np.asarray(splits, dtype=object) == split]
    if rows.size < 2:
        raise ValueError(f"split {split!r} has {rows.size} images; need at least 2")
    rng = np.random.default_rng(seed)
    by_person: dict[str, list[int]] = {}
    for r in rows:
        by_person.setdefault(people[r], []).append(int(r))
    multi = [p for p, rs in by_person.items() if len(rs) >= 2]
    if not multi:
        raise ValueError(f"split {split!r} has no person with two images; cannot make same pairs")
    if len(by_person) < 2:
        raise ValueError(f"split {split!r} has one person; cannot make different pairs")
    if n_pairs < 2:
        raise ValueError(f"n_pairs must be >= 2 (a same and a different pair), got {n_pairs}")
    n_same = n_pairs // 2
    n_diff = n_pairs - n_same
    # same pairs: round-robin over people so one celebrity does not dominate
    max_same = sum(len(by_person[p]) * (len(by_person[p]) - 1) // 2 for p in multi)
    same: set[tuple[int, int]] = set()
    attempts = 0
    while len(same) < min(n_same, max_same) and attempts < 50 * n_pairs:
        p = multi[rng.integers(len(multi))]
        a, b = rng.choice(by_person[p], size=2, replace=False)
        same.add((int(min(a, b)), int(max(a, b))))
        attempts += 1
    persons_list = list(by_person)
    diff: set[tuple[int, int]] = set()
    attempts = 0
    while len(diff) < n_diff and attempts < 50 * n_pairs:
        i, j = rng.choice(len(persons_list), size=2, replace=False)
        a = by_person[persons_list[i]][rng.integers(len(by_person[persons_list[i]]))]
        b = by_person[persons_list[j]][rng.integers(len(by_person[persons_list[j]]))]
        diff.add((int(min(a, b)), int(max(a, b))))
        attempts += 1
    pairs = sorted(same) + sorted(diff)
    labels = np.array([1] * len(same) + [0] * len(diff), dtype=np.int8)
    perm = rng.permutation(len(pairs))
    arr = np.array(pairs, dtype=np.int64)[perm]
    return arr[:, 0], arr[:, 1], labels[perm]


# ---------------------------------------------------------------- LFW protocols


@dataclass(frozen=True)
class PairTable:
    """Protocol pairs as parallel arrays (fold 0 for View 1; 0..9 for View 2)."""

    fold: np.ndarray
    image_id_a: np.ndarray
    image_id_b: np.ndarray
    label: np.ndarray

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[int, str, str, int]]) -> PairTable:
        rows = list(rows)
        return cls(
            fold=np.array([r[0] for r in rows], dtype=np.int32),
            image_id_a=np.array([r[1] for r in rows], dtype=object),
            image_id_b=np.array([r[2] for r in rows], dtype=object),
            label=np.array([r[3] for r in rows], dtype=np.int8),
        )

    def __len__(self) -> int:
        return int(self.label.size)


TrainFn = Callable[[np.ndarray, np.ndarray], SupportsEmbed]
"""(faces (N,68,56), identity labels (N,)) -> a fitted model with .embed()."""


def view2_training_image_ids(
    image_ids: Names, people_fold: Mapping[str, int], fold: int, held_out: int | None = None
) -> list[str]:
    """Images a fold-``fold`` model may train on: people of the *other* nine people-folds
    (eight, when people-fold ``held_out`` is kept out to calibrate the threshold on).

    People missing from the people table are excluded (they belong to no fold, so their
    images cannot be proven disjoint from the scored fold).
    """
    out = []
    for iid in image_ids:
        f = people_fold.get(person_of(iid))
        if f is not None and int(f) != int(fold) and (held_out is None or int(f) != held_out):
            out.append(iid)
    return out


def _embed_pairs(
    model: SupportsEmbed, faces: np.ndarray, row_of: Mapping[str, int], pairs: PairTable
) -> np.ndarray:
    needed = sorted({*pairs.image_id_a.tolist(), *pairs.image_id_b.tolist()})
    missing = [i for i in needed if i not in row_of]
    if missing:
        raise KeyError(f"{len(missing)} pair images have no face, e.g. {missing[:3]}")
    rows = np.array([row_of[i] for i in needed])
    emb = model.embed(np.asarray(faces[np.sort(rows)], dtype=np.float32))
    pos = {i: k for k, i in enumerate(np.array(needed, dtype=object)[np.argsort(rows)])}
    a = emb[[pos[i] for i in pairs.image_id_a]]
    b = emb[[pos[i] for i in pairs.image_id_b]]
    return score_pairs(a, b)


OTHER_FOLDS = "other-folds"
HELD_OUT = "held-out"
# other-folds: train on the other nine people-folds, threshold on their pairs (the classic
# protocol). held-out: train on eight, threshold on the ninth's pairs, people the model never
# saw -- how the production threshold is fitted (on val people), and what a network that
# fits its training people closely needs (see run_view2_fold).
CALIBRATIONS = (OTHER_FOLDS, HELD_OUT)


def check_calibration(calibration: str) -> str:
    if calibration not in CALIBRATIONS:
        raise ValueError(f"View 2 calibration must be one of {CALIBRATIONS}, got {calibration!r}")
    return calibration


def run_view2_fold(
    train_fn: TrainFn,
    faces: np.ndarray,
    image_ids: Names,
    people_fold: Mapping[str, int],
    pairs: PairTable,
    fold: int,
    log: Callable[[str], None] = print,
    held_out_calibration: bool = False,
) -> dict[str, Any]:
    """Train on the other nine people-folds, fit the threshold on the other nine pair-folds,
    score pair-fold ``fold``. Returns the fold's figures plus its raw scores.

    ``held_out_calibration``: train on eight of them and fit the threshold on the pairs of
    the ninth, people-fold ``(fold + 1) % n``, whose people the model never saw. A model
    that fits its training people closely (a long-trained network) scores their pairs far
    apart, so a threshold fitted on them does not carry over to unseen people."""
    ids = list(image_ids)
    row_of = {iid: r for r, iid in enumerate(ids)}
    n_folds = int(pairs.fold.max()) + 1
    calibration_fold = (fold + 1) % n_folds if held_out_calibration else None
    train_ids = view2_training_image_ids(ids, people_fold, fold, calibration_fold)
    train_people = {person_of(i) for i in train_ids}
    for checked in (fold, calibration_fold):
        if checked is None:
            continue
        in_fold = pairs.fold == checked
        scored_people = {
            person_of(i) for i in (*pairs.image_id_a[in_fold], *pairs.image_id_b[in_fold])
        }
        leaked = scored_people & train_people
        if leaked:  # the protocol files themselves would be inconsistent
            raise ValueError(
                f"fold {checked}: scored people in the training set: {sorted(leaked)[:5]}"
            )
    train_rows = np.array([row_of[i] for i in train_ids])
    labels = np.array([person_of(i) for i in train_ids], dtype=object)
    log(f"fold {fold}: training on {len(train_ids)} images of {len(set(labels))} people")
    t0 = time.time()
    model = train_fn(
        np.asarray(faces[np.sort(train_rows)], dtype=np.float32), labels[np.argsort(train_rows)]
    )
    train_seconds = time.time() - t0
    result = score_view2_fold(model, faces, row_of, pairs, fold, calibration_fold)
    result.update(
        train_seconds=round(train_seconds, 2),
        n_train_images=len(train_ids),
        n_train_people=len(set(labels)),
    )
    log(
        f"fold {fold}: accuracy {result['accuracy']:.4f} auc {result['auc']:.4f} "
        f"threshold {result['threshold']:.4f} train {train_seconds:.0f}s"
    )
    return result


def score_view2_fold(
    model: SupportsEmbed,
    faces: np.ndarray,
    row_of: Mapping[str, int],
    pairs: PairTable,
    fold: int,
    calibration_fold: int | None = None,
) -> dict[str, Any]:
    """Score every pair with ``model``; threshold fitted on the other folds' pairs (only
    pair-fold ``calibration_fold``'s, when given), figures on pair-fold ``fold`` (plus its
    raw scores and labels)."""
    scores = _embed_pairs(model, faces, row_of, pairs)
    is_fold = pairs.fold == fold
    calibrate = ~is_fold if calibration_fold is None else pairs.fold == calibration_fold
    if calibration_fold is not None and (calibration_fold == fold or not calibrate.any()):
        raise ValueError(f"calibration fold {calibration_fold} must be another, non-empty fold")
    threshold = fit_threshold(scores[calibrate], pairs.label[calibrate])
    result = verification_metrics(scores[is_fold], pairs.label[is_fold], threshold)
    result.update(
        fold=int(fold),
        calibration_fold=None if calibration_fold is None else int(calibration_fold),
        scores=[round(float(s), 6) for s in scores[is_fold]],
        labels=[int(v) for v in pairs.label[is_fold]],
    )
    return result


def summarise_folds(fold_results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean accuracy ± SE (std / sqrt(n_folds)), fold std, mean and pooled AUC, pooled TAR@FAR."""
    if not fold_results:
        raise ValueError("no fold results")
    accs = np.array([r["accuracy"] for r in fold_results], dtype=np.float64)
    n = len(accs)
    std = float(accs.std(ddof=1)) if n > 1 else 0.0
    out: dict[str, Any] = {
        "n_folds": n,
        "folds": [int(r["fold"]) for r in fold_results],
        "accuracy_mean": float(accs.mean()),
        "accuracy_se": std / math.sqrt(n),
        "accuracy_std": std,
        "fold_accuracies": [round(float(a), 5) for a in accs],
        "auc_mean": float(np.mean([r["auc"] for r in fold_results])),
        "train_seconds_mean": float(np.mean([r.get("train_seconds", 0.0) for r in fold_results])),
    }
    if all("scores" in r for r in fold_results):
        s = np.concatenate([r["scores"] for r in fold_results])
        lab = np.concatenate([r["labels"] for r in fold_results])
        out["auc_pooled"] = roc_auc(s, lab)
        out["tar_at_far_1e-2"] = tar_at_far(s, lab, 1e-2)
        out["tar_at_far_1e-3"] = tar_at_far(s, lab, 1e-3)
        out["roc"] = roc_points(s, lab)
    return out


def run_view2(
    train_fn: TrainFn,
    faces: np.ndarray,
    image_ids: Names,
    people_fold: Mapping[str, int],
    pairs: PairTable,
    folds: Iterable[int] | None = None,
    log: Callable[[str], None] = print,
    calibration: str = OTHER_FOLDS,
) -> dict[str, Any]:
    """The LFW View 2 protocol over ``folds`` (default all folds in the pair table).

    ``calibration``: where each fold's threshold comes from (see :data:`CALIBRATIONS`)."""
    check_calibration(calibration)
    fold_list = sorted({int(f) for f in pairs.fold}) if folds is None else list(folds)
    held_out = calibration == HELD_OUT
    results = [
        run_view2_fold(train_fn, faces, image_ids, people_fold, pairs, k, log, held_out)
        for k in fold_list
    ]
    summary = summarise_folds(results)
    summary["calibration"] = calibration
    summary["per_fold"] = [
        {k: v for k, v in r.items() if k not in ("scores", "labels")} for r in results
    ]
    return summary


def run_view1(
    train_fn: TrainFn,
    faces: np.ndarray,
    image_ids: Names,
    train_people: Iterable[str],
    train_pairs: PairTable,
    test_pairs: PairTable,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """View 1: train on DevTrain people, threshold on DevTrain pairs, score the DevTest pairs."""
    ids = list(image_ids)
    row_of = {iid: r for r, iid in enumerate(ids)}
    allowed = set(train_people)
    test_people = {person_of(i) for i in (*test_pairs.image_id_a, *test_pairs.image_id_b)}
    if allowed & test_people:
        raise ValueError("View 1 train and test people overlap")
    rows = np.array(sorted(row_of[i] for i in ids if person_of(i) in allowed))
    labels = np.array([person_of(ids[r]) for r in rows], dtype=object)
    log(f"view1: training on {rows.size} images of {len(set(labels))} people")
    t0 = time.time()
    model = train_fn(np.asarray(faces[rows], dtype=np.float32), labels)
    train_seconds = time.time() - t0
    threshold = fit_threshold(_embed_pairs(model, faces, row_of, train_pairs), train_pairs.label)
    test_scores = _embed_pairs(model, faces, row_of, test_pairs)
    result = verification_metrics(test_scores, test_pairs.label, threshold, with_roc=True)
    result.update(train_seconds=round(train_seconds, 2), n_train_images=int(rows.size))
    log(
        f"view1: accuracy {result['accuracy']:.4f} auc {result['auc']:.4f} "
        f"train {train_seconds:.0f}s"
    )
    return result


def evaluate_candidate(
    model: SupportsEmbed,
    faces: np.ndarray,
    image_ids: Names,
    splits: Names,
    persons: Names | None = None,
    n_pairs: int = 2000,
    seed: int = 0,
    val_split: str = "val",
    test_split: str = "test",
) -> dict[str, Any]:
    """The production candidate's gate figures: threshold fitted on ``val`` pairs, metrics
    (with ROC points) on ``test`` pairs. Both splits are identity-disjoint from training."""
    people = list(persons) if persons is not None else [person_of(i) for i in image_ids]
    out: dict[str, Any] = {}
    thresholds: dict[str, float] = {}
    for name in (val_split, test_split):
        ia, ib, lab = make_split_pairs(image_ids, splits, name, n_pairs, seed, persons=people)
        rows = np.unique(np.concatenate([ia, ib]))
        e = model.embed(np.asarray(faces[rows], dtype=np.float32))
        emb = np.zeros((len(image_ids), e.shape[1]), dtype=np.float32)
        emb[rows] = e
        scores = score_pairs(emb[ia], emb[ib])
        if name == val_split:
            thresholds["val"] = fit_threshold(scores, lab)
            out["val"] = verification_metrics(scores, lab, thresholds["val"])
        else:
            out["test"] = verification_metrics(scores, lab, thresholds["val"], with_roc=True)
    out["threshold"] = thresholds["val"]
    return out
