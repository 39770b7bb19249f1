"""The shared preprocessing function: shapes, errors, limits and thread safety."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from models.preprocessing import (
    DEFAULT_PARAMS,
    NoFaceFound,
    PreprocessParams,
    UnreadableImage,
    preprocess_image,
)
from tests.fake_lfw import fake_face_jpeg


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def test_lfw_fast_path_shape_and_normalisation():
    face = preprocess_image(fake_face_jpeg(1, 1))
    assert face.shape == DEFAULT_PARAMS.shape
    assert face.dtype == np.float32
    assert abs(float(face.mean())) < 1e-4
    assert abs(float(face.std()) - 1.0) < 1e-3


def test_verify_loads_the_face_the_ingest_stores(tmp_path):
    """The verify path (fetch + load_face) gives the exact pixels of preprocess_image, which
    the ingest test pins to the stored ``face`` column: a pair list scores the faces the
    models trained on, not a near copy."""
    from core.image_refs import RefResolver
    from core.storage import LocalStorage
    from tasks.verify import load_face

    storage = LocalStorage(tmp_path / "store")
    data = fake_face_jpeg(3, 2)
    storage.put_bytes("images/p.jpg", data)
    cache_id, face, status, error = load_face(
        storage, RefResolver(storage, ["images/"])("images/p.jpg")
    )
    assert (status, error) == ("ok", "")
    np.testing.assert_array_equal(face, preprocess_image(data))


def test_junk_bytes_are_unreadable():
    with pytest.raises(UnreadableImage, match="not a decodable image"):
        preprocess_image(b"this is not a jpeg")


def test_truncated_jpeg_is_unreadable():
    data = fake_face_jpeg(2, 1)
    with pytest.raises(UnreadableImage):
        preprocess_image(data[: len(data) // 3])


def test_size_and_pixel_limits_refuse_before_decoding():
    data = fake_face_jpeg(2, 1)
    with pytest.raises(UnreadableImage, match="over the 100 limit"):
        preprocess_image(data, PreprocessParams(max_bytes=100))
    big = _jpeg(Image.new("L", (4000, 3000)))
    with pytest.raises(UnreadableImage, match="pixels, over"):
        preprocess_image(big, PreprocessParams(max_pixels=1_000_000))


def test_blank_photo_has_no_face():
    with pytest.raises(NoFaceFound):
        preprocess_image(_jpeg(Image.new("RGB", (400, 300), (128, 128, 128))))


def test_detection_in_threads_matches_serial_results():
    """cv2's cascade is not thread-safe: concurrent loaders must get serial answers."""
    rng = np.random.default_rng(0)
    photos = []
    for i in range(12):
        canvas = Image.fromarray(rng.integers(0, 255, (320, 400, 3), dtype=np.uint8))
        canvas.paste(Image.open(io.BytesIO(fake_face_jpeg(i, 1))), (60, 30))
        photos.append(_jpeg(canvas))

    def outcome(data: bytes) -> str:
        try:
            return preprocess_image(data).tobytes().hex()[:64]
        except Exception as exc:  # the type is the outcome
            return type(exc).__name__

    serial = [outcome(p) for p in photos]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(outcome, photos * 4))
    assert threaded == serial * 4


def test_a_big_photo_is_searched_at_reduced_size_with_the_same_result():
    """A 20 Mpx photo is decoded and searched at <= 2048 px, and gives the crop the same
    composition gives at a small size."""
    from models.preprocessing import DETECT_MAX_SIDE, _detection_gray

    face = Image.open(io.BytesIO(fake_face_jpeg(3, 1)))

    def photo(scale: int) -> bytes:
        canvas = Image.new("RGB", (500 * scale, 400 * scale), (120, 110, 100))
        canvas.paste(face.resize((250 * scale, 250 * scale)), (100 * scale, 60 * scale))
        return _jpeg(canvas)

    big, small = photo(10), photo(1)  # 5000x4000 vs 500x400
    gray = _detection_gray(Image.open(io.BytesIO(big)))
    assert max(gray.shape) <= DETECT_MAX_SIDE
    assert gray.shape[0] / gray.shape[1] == pytest.approx(0.8, abs=0.01)
    a, b = preprocess_image(big), preprocess_image(small)
    assert a.shape == b.shape == DEFAULT_PARAMS.shape
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9


def test_a_blank_image_is_no_face_not_a_perfect_match():
    """A solid 250x250 image takes the LFW fast path; its crop has no contrast, and would
    normalise to zeros that score 1.0 against any other blank image."""
    for img in (Image.new("RGB", (250, 250), (128, 128, 128)), Image.new("L", (250, 250), 0)):
        with pytest.raises(NoFaceFound, match="blank"):
            preprocess_image(_jpeg(img))


def test_a_sideways_phone_photo_is_turned_upright_by_its_exif_tag():
    face = Image.open(io.BytesIO(fake_face_jpeg(3, 1)))
    canvas = Image.new("RGB", (500, 400), (120, 110, 100))
    canvas.paste(face, (100, 60))
    upright = preprocess_image(_jpeg(canvas))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    canvas.transpose(Image.Transpose.ROTATE_90).save(buf, format="JPEG", exif=exif.tobytes())
    turned = preprocess_image(buf.getvalue())
    # (re-encoding the rotated pixels moves the detected box by a pixel or two)
    assert np.corrcoef(upright.ravel(), turned.ravel())[0, 1] > 0.85
    with pytest.raises(NoFaceFound):  # the same pixels without the tag: sideways
        preprocess_image(_jpeg(canvas.transpose(Image.Transpose.ROTATE_90)))
