"""Eigenfaces / Fisherfaces embedder: whitened PCA, optional LDA on identities, cosine score.

One PCA (+ LDA) subspace per fixed feature map of the face (smoothed pixels, gradient
magnitude, rank-equalised pixels: models/face_features.py); the embedding joins the
L2-normalised subspace embeddings, so the cosine score is the mean of the per-map cosines.

Follows scikit-learn's estimator contract (``fit`` returns self, learned attributes end in
``_``, hyperparameters are constructor arguments). Saved as ``pca.npz`` (numeric arrays and
a JSON string of the hyperparameters; loads with ``allow_pickle=False``).

Why this shape: whitening equalises the variance of every retained direction, so the cosine
score is not dominated by lighting/pose components with large variance; LDA (fitted in the
whitened PCA space on people with >= 2 images) then keeps the directions that separate
identities and whitens the within-person scatter. Training faces are mirrored and added
(flip augmentation), which doubles the data for free and makes the basis left-right
symmetric.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import linalg
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError

from models.evaluation import l2_normalise, make_split_pairs, roc_auc, score_pairs
from models.face_features import (
    DEFAULT_FEATURES,
    embed_subspaces,
    feature_maps,
    parse_features,
    per_map_arrays,
    project,
)

WEIGHTS_FILE = "pca.npz"


def _flatten(faces: np.ndarray) -> np.ndarray:
    faces = np.asarray(faces, dtype=np.float32)
    if faces.ndim == 4 and faces.shape[-1] == 1:
        faces = faces[..., 0]
    if faces.ndim == 3:
        return faces.reshape(len(faces), -1)
    if faces.ndim == 2:
        return faces
    raise ValueError(f"expected faces of shape (N, H, W) or (N, H*W), got {faces.shape}")


class PCAEmbedder(BaseEstimator):
    """Whitened PCA (+ optional LDA) embedder with cosine scoring.

    Parameters
    ----------
    n_components: PCA dimensions kept per feature map (capped by the data).
    features: the feature maps, '+'-joined (models/face_features.py); one PCA (+ LDA)
        subspace each, cosine scores averaged. 'pixels' alone is classic eigenfaces.
    whiten: divide each PCA coordinate by its standard deviation.
    lda: ``True`` always fit LDA on the identities, ``False`` never, ``"auto"`` fit it only
        when it gives a better verification AUC on a held-out part of the training people.
    lda_components: LDA dimensions kept (None = as many as possible). Few is better: on LFW
        View 2, PCA-300 + 15 LDA dimensions gave 78.6 % against 74.8 % with all 300, and
        PCA-200 + 15 gave 78.9 % (bench/accuracy.py);
        the trailing discriminants mostly fit noise of the ~1,500 training identities.
    lda_shrinkage: ridge added to the within-class scatter, relative to its mean eigenvalue.
    flip_augment: add mirrored copies of the training faces.
    flip_average: embed a face as the mean of its and its mirror image's projections.
    drop_components: discard the first k PCA directions (mostly lighting); 0 keeps all.
    holdout_fraction: share of identities held out when ``lda="auto"`` decides.
    face_shape: (H, W) of the input faces, recorded for loaders.
    """

    def __init__(
        self,
        n_components: int = 200,
        features: str = DEFAULT_FEATURES,
        whiten: bool = True,
        lda: bool | Literal["auto"] = "auto",
        lda_components: int | None = 15,
        lda_shrinkage: float = 1e-3,
        flip_augment: bool = True,
        flip_average: bool = False,
        drop_components: int = 0,
        holdout_fraction: float = 0.2,
        random_state: int = 0,
        face_shape: tuple[int, int] = (68, 56),
    ) -> None:
        self.n_components = n_components
        self.features = features
        self.whiten = whiten
        self.lda = lda
        self.lda_components = lda_components
        self.lda_shrinkage = lda_shrinkage
        self.flip_augment = flip_augment
        self.flip_average = flip_average
        self.drop_components = drop_components
        self.holdout_fraction = holdout_fraction
        self.random_state = random_state
        self.face_shape = face_shape

    # ------------------------------------------------------------ fitting

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> PCAEmbedder:
        """Learn the basis from faces ``X`` (N,H,W); ``y`` = identity labels (needed for LDA)."""
        if self.lda not in (True, False, "auto"):
            raise ValueError(f"lda must be True, False or 'auto', got {self.lda!r}")
        kinds = parse_features(self.features)
        faces = np.asarray(X, dtype=np.float32)
        if faces.ndim == 2:
            faces = faces.reshape(len(faces), *self.face_shape)
        if len(faces) < 2:
            raise ValueError(f"need at least 2 faces to fit, got {len(faces)}")
        labels = None if y is None else np.asarray(y)
        if labels is not None and len(labels) != len(faces):
            raise ValueError(f"{len(faces)} faces but {len(labels)} labels")
        use_lda: bool = bool(self.lda) if self.lda != "auto" else labels is not None
        if self.lda is True and labels is None:
            raise ValueError("lda=True needs identity labels y")
        maps = feature_maps(faces, kinds)  # once: the auto check and the fit share them
        self.lda_auto_scores_: dict[str, float] = {}
        if self.lda == "auto" and labels is not None:
            use_lda = self._choose_lda(maps, labels)
        self._fit_arrays(maps, labels, use_lda)
        return self

    def _choose_lda(self, maps: list[np.ndarray], labels: np.ndarray) -> bool:
        """Hold out some identities, compare holdout-pair AUC with and without LDA."""
        rng = np.random.default_rng(self.random_state)
        people = np.unique(labels)
        if len(people) < 10:
            return True
        held = set(
            rng.choice(
                people, size=max(2, int(len(people) * self.holdout_fraction)), replace=False
            ).tolist()
        )
        is_held = np.array([lab in held for lab in labels])
        ia, ib, pl = make_split_pairs(
            [str(i) for i in range(int(is_held.sum()))],
            n_pairs=2000,
            seed=self.random_state,
            persons=labels[is_held].tolist(),
        )
        if pl.min() == pl.max():
            return True
        part = PCAEmbedder(**{**self.get_params(), "lda": True})
        part._fit_arrays([m[~is_held] for m in maps], labels[~is_held], True)  # one PCA, both
        held_maps = [m[is_held] for m in maps]
        scores = {}
        for name, flag in (("pca", False), ("pca+lda", True)):
            emb = l2_normalise(part._embed_maps(held_maps, use_lda=flag))
            scores[name] = roc_auc(score_pairs(emb[ia], emb[ib]), pl)
        self.lda_auto_scores_ = scores
        return scores["pca+lda"] > scores["pca"]

    def _fit_arrays(self, maps: list[np.ndarray], labels: np.ndarray | None, use_lda: bool) -> None:
        """One subspace per feature map, stacked along a leading axis of the arrays."""
        fitted = [self._fit_subspace(m, labels, use_lda) for m in maps]
        self.mean_ = np.stack([f[0] for f in fitted])
        self.components_ = np.stack([f[1] for f in fitted])
        self.explained_variance_ = np.stack([f[2] for f in fitted])
        ldas = [f[3] for f in fitted if f[3] is not None]
        self.lda_scalings_: np.ndarray | None = (
            np.stack(ldas) if ldas and len(ldas) == len(fitted) else None
        )
        self.lda_used_ = self.lda_scalings_ is not None
        self.n_components_ = int(self.components_.shape[1])
        per_map = (
            self.lda_scalings_.shape[2] if self.lda_scalings_ is not None else self.n_components_
        )
        self.embedding_dim_ = int(per_map * len(fitted))

    def _fit_subspace(
        self, maps: np.ndarray, labels: np.ndarray | None, use_lda: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """(mean, components, explained variance, LDA scalings or None) of one feature map."""
        X = _flatten(maps)
        d = X.shape[1]
        if self.flip_augment:
            # mirrored copies are added implicitly: with a left-right symmetric mean, the
            # scatter of [X; flip(X)] is C + P C P (P = the flip permutation of pixels)
            perm = np.arange(d).reshape(self.face_shape)[:, ::-1].ravel()
            mean = X.mean(axis=0)
            mean = ((mean + mean[perm]) / 2.0).astype(np.float32)
            labels = None if labels is None else np.concatenate([labels, labels])
        else:
            mean = X.mean(axis=0).astype(np.float32)
        Xc = (X - mean).astype(np.float32)
        n = 2 * len(Xc) if self.flip_augment else len(Xc)
        k_total = min(self.n_components + self.drop_components, n - 1, d)
        k0 = min(self.drop_components, max(k_total - 1, 0))
        if n < d:  # few faces: Gram trick, eigenvectors of Xa Xa^T (n x n)
            Xa = np.concatenate([Xc, Xc[:, perm]]) if self.flip_augment else Xc
            gram = (Xa @ Xa.T).astype(np.float64)
            evals, evecs = linalg.eigh(gram, subset_by_index=[n - k_total, n - 1])
            evals, evecs = evals[::-1], evecs[:, ::-1]
            comps = (Xa.T.astype(np.float64) @ evecs) / np.sqrt(np.maximum(evals, 1e-12))
            comps = comps.T
        else:
            cov = (Xc.T @ Xc).astype(np.float64)
            if self.flip_augment:
                cov = cov + cov[perm][:, perm]
            evals, evecs = linalg.eigh(cov, subset_by_index=[d - k_total, d - 1])
            evals, evecs = evals[::-1], evecs[:, ::-1]
            comps = evecs.T
        variance = np.maximum(evals / max(n - 1, 1), 1e-12)[k0:].astype(np.float32)
        components = comps[k0:].astype(np.float32)
        if not (use_lda and labels is not None):
            return mean, components, variance, None
        scale = variance if self.whiten else None
        Z = project(X, mean, components, scale)
        if self.flip_augment:
            flipped = _flatten(np.asarray(maps)[..., ::-1])
            Z = np.concatenate([Z, project(flipped, mean, components, scale)])
        return mean, components, variance, self._fit_lda(Z, labels)

    def _fit_lda(self, Z: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
        names, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        keep = counts[inverse] >= 2
        if (counts >= 2).sum() < 2:
            return None
        Z, inverse = Z[keep].astype(np.float64), inverse[keep]
        _, inverse = np.unique(inverse, return_inverse=True)
        n_classes = int(inverse.max()) + 1
        k = Z.shape[1]
        sums = np.zeros((n_classes, k))
        np.add.at(sums, inverse, Z)
        cnt = np.bincount(inverse).astype(np.float64)
        means = sums / cnt[:, None]
        within = Z - means[inverse]
        sw = within.T @ within
        mu = Z.mean(axis=0)
        centred = (means - mu) * np.sqrt(cnt)[:, None]
        sb = centred.T @ centred
        sw += self.lda_shrinkage * np.trace(sw) / k * np.eye(k)
        evals, evecs = linalg.eigh(sb, sw)  # evecs^T sw evecs = I
        order = np.argsort(evals)[::-1]
        n_out = min(n_classes - 1, k)
        if self.lda_components is not None:
            n_out = min(n_out, self.lda_components)
        return evecs[:, order[:n_out]].astype(np.float32)

    # ------------------------------------------------------------ inference

    def _check_fitted(self) -> None:
        if not hasattr(self, "components_"):
            raise NotFittedError(
                "This PCAEmbedder instance is not fitted yet. Call 'fit' before 'embed'."
            )

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Faces -> embedding: per feature map PCA (then LDA), each L2-normalised, joined."""
        self._check_fitted()
        return self._transform(X, use_lda=True)

    def _transform(self, X: np.ndarray, use_lda: bool) -> np.ndarray:
        faces = np.asarray(X, dtype=np.float32).reshape(-1, *self.face_shape)
        return self._embed_maps(feature_maps(faces, parse_features(self.features)), use_lda)

    def _embed_maps(self, maps: list[np.ndarray], use_lda: bool) -> np.ndarray:
        return embed_subspaces(
            maps,
            self.mean_,
            self.components_,
            self.explained_variance_ if self.whiten else None,
            self.lda_scalings_ if use_lda else None,
            self.flip_average,
        )

    def embed(self, faces: np.ndarray) -> np.ndarray:
        """Faces (N,H,W) float32 -> L2-normalised embeddings (N, embedding_dim_)."""
        return l2_normalise(self.transform(faces))

    def score(self, faces_a: np.ndarray, faces_b: np.ndarray) -> np.ndarray:
        return score_pairs(self.embed(faces_a), self.embed(faces_b))

    # ------------------------------------------------------------ persistence (no pickle)

    def save(self, model_dir: str | Path) -> Path:
        self._check_fitted()
        path = Path(model_dir) / WEIGHTS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        params = {**self.get_params(), "face_shape": list(self.face_shape)}
        arrays: dict[str, Any] = {
            "mean": self.mean_,
            "components": self.components_,
            "explained_variance": self.explained_variance_,
            "params_json": np.array(json.dumps(params)),
            "state_json": np.array(
                json.dumps(
                    {
                        "lda_used": bool(self.lda_used_),
                        "lda_auto_scores": self.lda_auto_scores_,
                    }
                )
            ),
        }
        if self.lda_scalings_ is not None:
            arrays["lda_scalings"] = self.lda_scalings_
        np.savez(path, **arrays)
        return path

    @classmethod
    def load(cls, model_dir: str | Path) -> PCAEmbedder:
        path = Path(model_dir)
        if path.is_dir():
            path = path / WEIGHTS_FILE
        with np.load(path, allow_pickle=False) as data:
            params = json.loads(str(data["params_json"]))
            params["face_shape"] = tuple(params["face_shape"])
            state = json.loads(str(data["state_json"]))
            arrays = {k: data[k] for k in data.files if not k.endswith("_json")}
        params, arrays = per_map_arrays(params, arrays)
        lda = arrays.get("lda_scalings")
        model = cls(**params)
        model.mean_ = arrays["mean"]
        model.components_ = arrays["components"]
        model.explained_variance_ = arrays["explained_variance"]
        model.lda_scalings_ = lda
        model.n_components_ = int(model.components_.shape[1])
        model.lda_used_ = bool(state["lda_used"])
        model.lda_auto_scores_ = state["lda_auto_scores"]
        per_map = lda.shape[2] if lda is not None else model.n_components_
        model.embedding_dim_ = int(per_map * len(model.components_))
        return model

    def eigenfaces(self, n: int = 16) -> np.ndarray:
        """First ``n`` PCA components of the first feature map as images (n, H, W)."""
        self._check_fitted()
        return self.components_[0, :n].reshape(-1, *self.face_shape)

    def mean_face(self) -> np.ndarray:
        """Mean of the first feature map, (H, W)."""
        self._check_fitted()
        return self.mean_[0].reshape(self.face_shape)
