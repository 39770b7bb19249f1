"""Siamese embedder: tiny real TensorFlow training, flip invariance, safe_mode round trip."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest

from models.evaluation import score_pairs
from models.siamese import SiameseConfig, SiameseEmbedder, bfloat16_supported, train_siamese
from tests.models.synthetic import make_faces

REPO = Path(__file__).resolve().parents[2]
TINY = dict(batch_size=32, filters=(8, 16), embedding_dim=16)


@pytest.fixture(scope="module")
def data():
    return make_faces(n_people=10, per_person=6, seed=7)


@pytest.fixture(scope="module")
def trained(data):
    faces, labels, _ = data
    return train_siamese(faces, labels, SiameseConfig(epochs=2, **TINY), log=lambda m: None)


def test_embeddings_are_l2_normalised_and_flip_invariant(trained, data):
    faces = data[0][:8]
    emb = trained.embed(faces)
    assert emb.shape == (8, 16) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # flip-averaged embeddings: a mirrored face scores as the same person (cosine ~ 1)
    flipped = trained.embed(faces[:, :, ::-1])
    np.testing.assert_allclose(score_pairs(emb, flipped), 1.0, atol=1e-5)
    # (N, H, W, 1) input gives the same embeddings
    np.testing.assert_allclose(trained.embed(faces[..., None]), emb, atol=1e-6)


def test_time_budget_stops_training_cleanly(data):
    faces, labels, _ = data
    model = train_siamese(
        faces, labels, SiameseConfig(epochs=50, max_train_seconds=1e-3, **TINY), log=lambda m: None
    )
    assert model.epochs_trained_ == 1
    assert model.embed(faces[:2]).shape == (2, 16)


def test_needs_identities_with_two_images():
    faces, labels, _ = make_faces(n_people=3, per_person=1)
    with pytest.raises(ValueError, match=">= 2 images"):
        train_siamese(faces, labels, SiameseConfig(epochs=1, **TINY))


@pytest.mark.slow
def test_save_then_load_with_safe_mode_in_a_fresh_process(tmp_path, trained, data):
    faces = data[0][:5]
    trained.save(tmp_path / "model")
    assert (tmp_path / "model" / "model.keras").exists()
    assert (tmp_path / "model" / "savedmodel" / "1" / "saved_model.pb").exists()
    np.save(tmp_path / "faces.npy", faces)
    np.save(tmp_path / "expected.npy", trained.embed(faces))
    script = textwrap.dedent(f"""
        import json, numpy as np, keras, tensorflow as tf
        import models.siamese  # registers the custom layers
        d = {str(tmp_path)!r}
        faces, expected = np.load(d + "/faces.npy"), np.load(d + "/expected.npy")
        m = keras.models.load_model(d + "/model/model.keras", safe_mode=True)
        keras_err = float(np.abs(np.asarray(m(faces)) - expected).max())
        sm = tf.saved_model.load(d + "/model/savedmodel/1")
        out = sm.signatures["serving_default"](faces=tf.constant(faces))["embeddings"].numpy()
        out4 = sm.signatures["serve_nhwc"](faces=tf.constant(faces[..., None]))["embeddings"]
        print(json.dumps({{"keras": keras_err,
                          "serving": float(np.abs(out - expected).max()),
                          "serving_nhwc": float(np.abs(out4.numpy() - expected).max()),
                          "signatures": sorted(sm.signatures)}}))
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={"TF_CPP_MIN_LOG_LEVEL": "2", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["keras"] < 1e-5 and result["serving"] < 1e-5 and result["serving_nhwc"] < 1e-5
    assert result["signatures"] == ["serve_nhwc", "serving_default"]
    loaded = SiameseEmbedder.load(tmp_path / "model")
    np.testing.assert_allclose(loaded.embed(faces), np.load(tmp_path / "expected.npy"), atol=1e-5)


def test_mixed_precision_training_serves_in_float32(data):
    """bfloat16 training keeps float32 variables; the served model computes in float32.
    Training is seeded (augmentation draws included), so two float32 runs agree up to the
    kernels' round-off; the mixed run computed in bfloat16, so its weights differ by far
    more than that and the flag is not silently ignored."""
    faces, labels, _ = data

    def train(mixed: bool) -> SiameseEmbedder:
        config = SiameseConfig(epochs=1, mixed_precision=mixed, **TINY)
        return train_siamese(faces, labels, config, log=lambda m: None)

    def weights(m: SiameseEmbedder) -> list[np.ndarray]:
        return m.model.get_layer("tower").get_weights()

    def max_gap(x: SiameseEmbedder, y: SiameseEmbedder) -> float:
        return max(float(np.abs(a - b).max()) for a, b in zip(weights(x), weights(y), strict=True))

    model, fp32_a, fp32_b = train(True), train(False), train(False)
    round_off, mixed_gap = max_gap(fp32_a, fp32_b), max_gap(model, fp32_a)
    assert round_off < 1e-4, round_off
    assert mixed_gap > 1e-3 and mixed_gap > 100 * round_off, (mixed_gap, round_off)
    policies = {layer.dtype_policy.name for layer in model.model.get_layer("tower").layers}
    assert policies == {"float32"}
    emb = model.embed(faces[:4])
    assert emb.dtype == np.float32 and np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_bfloat16_inference_keeps_float32_head_and_agrees_with_float32(tmp_path, trained, data):
    faces = data[0][:16]
    trained.save(tmp_path, export_savedmodel=False)
    with pytest.warns(RuntimeWarning) if not bfloat16_supported() else nullcontext():
        fast = SiameseEmbedder.load(tmp_path, precision="bfloat16")
    exact = SiameseEmbedder.load(tmp_path)
    tower = {
        layer.name: layer.dtype_policy.name
        for layer in fast.serving_model.get_layer("tower").layers
    }
    assert tower["conv0_0"] == tower["bn0_0"] == "mixed_bfloat16"
    assert tower["embedding_dense"] == tower["embedding_bn"] == "float32"
    # the float32 model is what gets saved; only the serving copy computes in bfloat16
    assert {layer.dtype_policy.name for layer in fast.model.get_layer("tower").layers} == {
        "float32"
    }
    emb_fast, emb_exact = fast.embed(faces), exact.embed(faces)
    assert emb_fast.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb_fast, axis=1), 1.0, atol=1e-5)
    cosines = score_pairs(emb_fast, emb_exact)
    assert cosines.min() > 0.999
    assert not np.array_equal(emb_fast, emb_exact)  # it really computed in bfloat16
    with pytest.raises(ValueError, match="precision"):
        SiameseEmbedder.load(tmp_path, precision="float16")


def test_auto_precision_is_bfloat16_only_where_native(tmp_path, trained, monkeypatch):
    trained.save(tmp_path, export_savedmodel=False)
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)  # the tests' env turns it off
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    import tensorflow as tf

    gpu = bool(tf.config.list_physical_devices("GPU"))
    native = gpu or "avx512_bf16" in cpu or "amx_bf16" in cpu
    expected = "bfloat16" if native else "float32"
    assert SiameseEmbedder.load(tmp_path, precision="auto").precision == expected
    # without oneDNN kernels TensorFlow emulates bfloat16: never chosen automatically
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    assert not bfloat16_supported()
    assert SiameseEmbedder.load(tmp_path, precision="auto").precision == "float32"


def test_settings_offer_the_precisions_the_model_accepts():
    from core.settings import PRECISIONS as SETTINGS_PRECISIONS
    from models.siamese import PRECISIONS

    assert SETTINGS_PRECISIONS == PRECISIONS
