"""Fixed (not learned) per-face feature maps for the PCA model, and the per-map subspace
embedding both ``models.pca.PCAEmbedder`` and the serving script apply; numpy only.

The PCA model fits one whitened PCA (+ LDA) subspace per feature map and averages the
cosine scores of the subspaces (it concatenates their L2-normalised embeddings). Three
maps see different things: the lightly smoothed face (``smooth``: the eigenfaces view),
its gradient magnitude (``gradient``: edges of eyes, brows, nose and mouth, independent of
the lighting level), and its rank-equalised intensities (``equalised``: robust to contrast).
On LFW View 2 the three together verify better than any one of them (README "Benchmarks").

numpy only, because the SageMaker scikit-learn serving container runs this file next to
``inference_pca.py`` without the rest of the project. Every map is computed per face
(nothing mixes faces of a batch -- a filter that smoothed across the batch axis would leak
one face into its neighbours) and every operation is left-right symmetric, so the map of a
mirrored face is the mirrored map (the PCA flip augmentation relies on that).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

FEATURES = ("pixels", "smooth", "gradient", "equalised")
DEFAULT_FEATURES = "smooth+gradient+equalised"


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(4.0 * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def _correlate_axis(x: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """1-D correlation of (N, H, W) along ``axis`` (1 or 2), mirrored ('symmetric') edges."""
    r = len(kernel) // 2
    pad = [(0, 0), (0, 0), (0, 0)]
    pad[axis] = (r, r)
    xp = np.pad(x, pad, mode="symmetric")
    n = x.shape[axis]
    out = np.zeros_like(x)
    for i, w in enumerate(kernel):
        if w:
            out += w * (xp[:, i : i + n, :] if axis == 1 else xp[:, :, i : i + n])
    return out


def _standardise(x: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=(1, 2), keepdims=True)
    std = x.std(axis=(1, 2), keepdims=True)
    return (x - mean) / (std + 1e-6)


def _check_batch(faces: np.ndarray) -> np.ndarray:
    x = np.asarray(faces, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(f"expected faces of shape (N, H, W), got {x.shape}")
    return x


def smooth_faces(faces: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Gaussian blur of each (H, W) face; mirrored edges."""
    x = _check_batch(faces)
    if sigma <= 0:
        return x
    g = _gaussian_kernel(sigma)
    return _correlate_axis(_correlate_axis(x, g, 1), g, 2)


def equalised_faces(faces: np.ndarray) -> np.ndarray:
    """Each face's pixels replaced by their rank within the face, standardised."""
    x = _check_batch(faces)
    flat = x.reshape(len(x), -1)
    order = np.argsort(flat, axis=1, kind="stable")
    ranks = np.empty(flat.shape, dtype=np.float32)  # inverse permutation of ``order``
    np.put_along_axis(ranks, order, np.arange(flat.shape[1], dtype=np.float32)[None], axis=1)
    return _standardise(ranks.reshape(x.shape))


def gradient_faces(faces: np.ndarray, sigma: float = 1.0, power: float = 0.5) -> np.ndarray:
    """(N, H, W) faces -> per-face standardised ``|Sobel(Gaussian_sigma(face))| ** power``.

    ``power`` < 1 compresses the strongest edges (hairline, glasses frames) so that the
    weaker ones inside the face still count.
    """
    x = smooth_faces(faces, sigma)
    smooth = np.array([1.0, 2.0, 1.0], dtype=np.float32)
    diff = np.array([-1.0, 0.0, 1.0], dtype=np.float32)
    grad_rows = _correlate_axis(_correlate_axis(x, diff, 1), smooth, 2)
    grad_cols = _correlate_axis(_correlate_axis(x, smooth, 1), diff, 2)
    magnitude = np.sqrt(grad_rows**2 + grad_cols**2)
    return _standardise(magnitude**power).astype(np.float32)


def parse_features(spec: str) -> tuple[str, ...]:
    """'smooth+gradient' -> ('smooth', 'gradient'), checked."""
    kinds = tuple(k.strip() for k in str(spec).split("+") if k.strip())
    bad = [k for k in kinds if k not in FEATURES]
    if not kinds or bad or len(set(kinds)) != len(kinds):
        raise ValueError(
            f"features must be distinct names from {FEATURES} joined by '+', got {spec!r}"
        )
    return kinds


def face_features(faces: np.ndarray, kind: str) -> np.ndarray:
    """The feature map ``kind`` of (N, H, W) faces ('pixels' = the faces unchanged)."""
    if kind == "pixels":
        return _check_batch(faces)
    if kind == "smooth":
        return smooth_faces(faces)
    if kind == "gradient":
        return gradient_faces(faces)
    if kind == "equalised":
        return equalised_faces(faces)
    raise ValueError(f"unknown feature map {kind!r}; known: {FEATURES}")


def feature_maps(faces: np.ndarray, kinds: Sequence[str]) -> list[np.ndarray]:
    """One (N, H, W) map per kind."""
    return [face_features(faces, kind) for kind in kinds]


def project(
    X: np.ndarray, mean: np.ndarray, components: np.ndarray, variance: np.ndarray | None
) -> np.ndarray:
    """(N, D) rows -> PCA coordinates; divided by the component standard deviations
    (whitened) when ``variance`` is given."""
    Z = (X - mean) @ components.T
    if variance is not None:
        Z = Z / np.sqrt(variance)
    return Z.astype(np.float32)


def embed_subspaces(
    maps: Sequence[np.ndarray],
    mean: np.ndarray,
    components: np.ndarray,
    variance: np.ndarray | None,
    lda: np.ndarray | None,
    flip_average: bool = False,
) -> np.ndarray:
    """Per map: centre, project on its PCA components (divided by the component standard
    deviations when ``variance`` is given: whitening), then LDA when given; L2-normalise
    each and join. The arrays carry one leading entry per map. The cosine of two joined
    vectors is the mean of the per-map cosines."""
    parts = []
    for i, m in enumerate(maps):
        if flip_average:  # maps are flip-equivariant and projection is linear
            m = (m + m[..., ::-1]) / 2.0
        z = project(
            m.reshape(len(m), -1), mean[i], components[i], None if variance is None else variance[i]
        )
        if lda is not None:
            z = z @ lda[i]
        parts.append(z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12))
    return (np.concatenate(parts, axis=1) / np.sqrt(len(parts))).astype(np.float32)


def per_map_arrays(
    params: dict[str, Any], arrays: dict[str, np.ndarray]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``pca.npz`` files saved before feature maps hold 2-D arrays and no 'features': read
    them as one 'pixels' map (a leading axis of length 1)."""
    if arrays["components"].ndim == 2:
        return {**params, "features": "pixels"}, {k: v[None] for k, v in arrays.items()}
    return params, arrays
