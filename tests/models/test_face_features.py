"""Feature maps of the PCA model: per face, flip-equivariant, validated names."""

from __future__ import annotations

import numpy as np
import pytest

from models.face_features import FEATURES, face_features, parse_features


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(6, 68, 56)).astype(np.float32)


@pytest.mark.parametrize("kind", FEATURES)
def test_a_face_map_does_not_depend_on_the_rest_of_the_batch(faces, kind):
    # a filter that also ran across the batch axis would leak neighbouring faces (same
    # person, in identity-sorted data) into each other and inflate verification accuracy
    batch = face_features(faces, kind)
    for i in range(len(faces)):
        np.testing.assert_allclose(face_features(faces[i : i + 1], kind)[0], batch[i], atol=1e-5)


@pytest.mark.parametrize("kind", FEATURES)
def test_maps_are_flip_equivariant(faces, kind):
    mirrored = face_features(faces[..., ::-1], kind)
    np.testing.assert_allclose(mirrored, face_features(faces, kind)[..., ::-1], atol=1e-5)


@pytest.mark.parametrize("kind", ["gradient", "equalised"])
def test_maps_ignore_brightness_and_contrast(faces, kind):
    brighter = 4.0 * faces + (0.0 if kind == "equalised" else 7.0)  # no rounding ties in ranks
    np.testing.assert_allclose(face_features(brighter, kind), face_features(faces, kind), atol=1e-4)


def test_gradient_map_is_flat_on_a_flat_face():
    flat = np.full((1, 68, 56), 0.5, dtype=np.float32)
    assert np.abs(face_features(flat, "gradient")).max() < 1e-3


def test_parse_features_checks_names():
    assert parse_features("smooth+gradient") == ("smooth", "gradient")
    assert parse_features("smooth+") == ("smooth",)
    for bad in ("", "pixels+pixels", "sift"):
        with pytest.raises(ValueError, match="features must be"):
            parse_features(bad)
    with pytest.raises(ValueError, match=r"shape \(N, H, W\)"):
        face_features(np.zeros((68, 56)), "gradient")
