"""The one preprocessing function: decode -> face crop -> grayscale -> resize -> normalise.

Ingest, training and inference all call :func:`preprocess_image`, so the pixels a model
was trained on are produced by exactly the code that serves it (no train/serve skew).

Two ways to find the face:

* **LFW fast path** for already-aligned 250x250 LFW images: JPEG is decoded straight to
  grayscale at half scale (libjpeg DCT scaling, ``Image.draft``), then a fixed box is cut.
  This is both the LFW convention (a fixed crop of the aligned scene) and ~4x cheaper
  than a full colour decode.
* **Detection** for arbitrary photos: OpenCV's Haar cascade (shipped in
  opencv-python-headless) finds the largest face, and the same framing as the LFW box is
  cut around it, so a detected face looks like an LFW face to the model.
"""

from __future__ import annotations

import io
import threading
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps

PREPROCESSING_VERSION = "1"


class ImageError(ValueError):
    """Base for per-image failures that become a row status, not a crash."""

    status = "unreadable_image"


class UnreadableImage(ImageError):
    status = "unreadable_image"


class NoFaceFound(ImageError):
    status = "no_face"


@dataclass(frozen=True)
class PreprocessParams:
    """Everything that determines the pixels; recorded in manifests and model cards."""

    lfw_size: int = 250  # aligned LFW scene size that triggers the fast path
    draft_scale: int = 2  # decode at 1/2 scale (125x125)
    # crop box on the half-scale LFW scene (rows, cols): == full-res rows 60:196, cols 72:184
    crop_top: int = 30
    crop_left: int = 36
    height: int = 68
    width: int = 56
    # face-box -> crop framing for detected faces, measured on LFW scenes (see tests):
    # crop = box centre + offsets, crop size = box width * scale
    face_box_scale_h: float = 1.18
    face_box_scale_w: float = 0.97
    face_box_dy: float = 0.03  # shift of crop centre below the box centre, in box widths
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    version: str = PREPROCESSING_VERSION

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_PARAMS = PreprocessParams()


def normalise(face: np.ndarray) -> np.ndarray:
    """Per-image standardisation: zero mean, unit variance (removes global lighting)."""
    face = face.astype(np.float32)
    mean = face.mean()
    std = face.std()
    return (face - mean) / max(float(std), 1e-3)


def _open(data: bytes, params: PreprocessParams) -> Image.Image:
    if len(data) > params.max_bytes:
        raise UnreadableImage(f"image is {len(data)} bytes, over the {params.max_bytes} limit")
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as exc:  # PIL raises many types for junk
        raise UnreadableImage(f"not a decodable image: {exc}") from exc
    w, h = img.size
    if w * h > params.max_pixels:
        raise UnreadableImage(f"image is {w}x{h} pixels, over the {params.max_pixels} limit")
    return img


def _load(img: Image.Image) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except Exception as exc:
        raise UnreadableImage(f"corrupt image data: {exc}") from exc


def _lfw_crop(img: Image.Image, params: PreprocessParams) -> np.ndarray:
    half = params.lfw_size // params.draft_scale
    if img.format == "JPEG":
        img.draft("L", (half, half))
    _load(img)
    gray = img.convert("L")
    if gray.size != (half, half):
        gray = gray.resize((half, half), Image.Resampling.BILINEAR)
    arr = np.asarray(gray)
    return arr[
        params.crop_top : params.crop_top + params.height,
        params.crop_left : params.crop_left + params.width,
    ]


_THREAD_STATE = threading.local()
_CV2_IMPORT_LOCK = threading.Lock()  # a first import racing in threads sees a half-made module


def _cascade() -> Any:
    """The Haar cascade of this thread: cv2's CascadeClassifier is not thread-safe."""
    cascade = getattr(_THREAD_STATE, "cascade", None)
    if cascade is None:
        with _CV2_IMPORT_LOCK:
            import cv2

        cascades: str = cv2.data.haarcascades  # type: ignore[attr-defined]
        cascade = cv2.CascadeClassifier(cascades + "haarcascade_frontalface_default.xml")
        if cascade.empty():
            raise RuntimeError(f"OpenCV Haar cascade not found under {cascades}")
        _THREAD_STATE.cascade = cascade
    return cascade


def detect_face_box(gray: np.ndarray) -> tuple[int, int, int, int] | None:
    """Largest frontal face as (x, y, w, h) in ``gray``'s pixels, or None."""
    h, w = gray.shape
    min_side = max(24, min(h, w) // 12)
    faces = _cascade().detectMultiScale(
        gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side)
    )
    if len(faces) == 0:
        return None
    x, y, fw, fh = max(faces, key=lambda f: f[2] * f[3])
    return int(x), int(y), int(fw), int(fh)


def crop_face(
    gray: np.ndarray, box: tuple[int, int, int, int], params: PreprocessParams
) -> np.ndarray:
    """Cut the LFW framing around a detected box and resize to the model's input size."""
    x, y, bw, bh = box
    cx = x + bw / 2
    cy = y + bh / 2 + params.face_box_dy * bw
    ch, cw = params.face_box_scale_h * bw, params.face_box_scale_w * bw
    top, left = int(round(cy - ch / 2)), int(round(cx - cw / 2))
    pil = Image.fromarray(gray)
    # PIL pads out-of-bounds regions with black, like the LFW scene corners
    crop = pil.crop((left, top, left + int(round(cw)), top + int(round(ch))))
    crop = crop.resize((params.width, params.height), Image.Resampling.BILINEAR)
    return np.asarray(crop)


# below this standard deviation (grey levels, 0-255) a crop is blank: a placeholder avatar
# or a solid image would normalise to all zeros, and any two of them would score 1.0
MIN_FACE_STD = 1.0


def _checked(face: np.ndarray, where: str) -> np.ndarray:
    if float(np.asarray(face, dtype=np.float32).std()) < MIN_FACE_STD:
        raise NoFaceFound(f"the face crop of this {where} is blank (no contrast)")
    return normalise(face)


def preprocess_image(
    data: bytes,
    params: PreprocessParams = DEFAULT_PARAMS,
    detect: Literal["auto", "never", "always"] = "auto",
) -> np.ndarray:
    """Bytes of an image file -> normalised float32 face of shape ``params.shape``.

    ``detect="auto"`` takes the LFW fast path for 250x250 images and runs face detection
    on anything else. Raises :class:`UnreadableImage` or :class:`NoFaceFound`.
    """
    img = _open(data, params)
    is_lfw = img.size == (params.lfw_size, params.lfw_size)
    if detect == "never" or (detect == "auto" and is_lfw):
        return _checked(_lfw_crop(img, params), f"{img.size[0]}x{img.size[1]} image")
    gray = _detection_gray(img)
    box = detect_face_box(gray)
    if box is None:
        raise NoFaceFound(f"no face found in a {gray.shape[1]}x{gray.shape[0]} image")
    return _checked(crop_face(gray, box, params), "photo")


# Photos are searched for a face at most this big (longest side): a 40 Mpx photo would
# cost ~200 MB and seconds of Haar cascade per image at full size, and the model's input
# is 68x56 anyway. A face must still span >= 24 px of the reduced image to be found.
DETECT_MAX_SIDE = 2048


def _detection_gray(img: Image.Image) -> np.ndarray:
    """Grayscale pixels of a photo, reduced to DETECT_MAX_SIDE; big JPEGs are decoded at
    1/2 to 1/8 scale directly (libjpeg's DCT scaling), never at full size."""
    w, h = img.size
    scale = min(1.0, DETECT_MAX_SIDE / max(w, h))
    target = (max(1, round(w * scale)), max(1, round(h * scale)))
    if scale < 1.0 and img.format == "JPEG":
        img.draft("L", target)  # picks the smallest DCT scale still >= target
    _load(img)
    # phone photos store the pixels sideways plus an EXIF Orientation tag: the frontal
    # face detector needs the picture upright
    gray = ImageOps.exif_transpose(img).convert("L")
    if max(gray.size) > DETECT_MAX_SIDE:
        s = DETECT_MAX_SIDE / max(gray.size)
        size = (max(1, round(gray.width * s)), max(1, round(gray.height * s)))
        gray = gray.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(gray)


def flip_horizontal(faces: np.ndarray) -> np.ndarray:
    """Mirror a face or a batch of faces left-right (last axis is width)."""
    return faces[..., ::-1]
