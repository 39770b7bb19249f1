"""TF Serving pre/post-processing for the Siamese SavedModel in SageMaker batch transform.

The SageMaker TensorFlow Serving container loads ``code/inference.py`` from the model
archive and calls ``input_handler`` before and ``output_handler`` after every request to
TF Serving. The SavedModel's ``serving_default`` takes float32 faces (N, 68, 56) that
went through ``models.preprocessing`` already, and returns flip-averaged, L2-normalised
embeddings, so these handlers only translate formats.

Request content types (``context.request_content_type``):

* ``application/jsonlines`` (batch transform, ``SplitType=Line``): one JSON object per
  line, ``{"id": "...", "face": [3808 floats]}`` (row-major 68x56) or a nested 68x56 list;
* ``application/json``: ``{"instances": [...]}`` passed through, or ``{"faces": [...]}``;
* ``application/x-npy``: a float32 array (N, 68, 56) written with ``numpy.save``.

Response (``context.accept_header``): ``application/jsonlines`` (default) with one
``{"embedding": [...]}`` per input line in input order, or ``application/json``
``{"embeddings": [[...], ...]}``. Anything else is refused with a clear error.

No imports from the project: the container has only this file (and numpy).
"""

from __future__ import annotations

import io
import json
from typing import Any

FACE_SHAPE = (68, 56)
JSONLINES_TYPES = ("application/jsonlines", "application/x-jsonlines", "application/jsonl")
JSON_TYPE = "application/json"
NPY_TYPE = "application/x-npy"


class UnsupportedContentType(ValueError):
    pass


def _as_face(value: Any) -> list:
    """A flat 3808-list or a nested 68x56 list -> nested 68x56 list (TF Serving row format)."""
    h, w = FACE_SHAPE
    if isinstance(value, list) and len(value) == h * w and not isinstance(value[0], list):
        return [value[r * w : (r + 1) * w] for r in range(h)]
    if isinstance(value, list) and len(value) == h and all(len(row) == w for row in value):
        return value
    raise ValueError(f"a face must be {h}x{w} floats (flat or nested)")


def _read(data: Any) -> bytes:
    if hasattr(data, "read"):
        return data.read()
    return data if isinstance(data, bytes) else str(data).encode()


def faces_from_request(body: bytes, content_type: str) -> list:
    """Request body -> list of nested 68x56 faces."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype in JSONLINES_TYPES:
        faces = []
        for line in body.decode("utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                faces.append(_as_face(record["face"] if isinstance(record, dict) else record))
        return faces
    if ctype == JSON_TYPE:
        payload = json.loads(body.decode("utf-8"))
        items = (
            payload.get("instances", payload.get("faces")) if isinstance(payload, dict) else payload
        )
        if items is None:
            raise ValueError('JSON requests need "instances" or "faces"')
        return [_as_face(f) for f in items]
    if ctype == NPY_TYPE:
        import numpy as np

        arr = np.load(io.BytesIO(body), allow_pickle=False).astype("float32")
        return arr.reshape(-1, *FACE_SHAPE).tolist()
    raise UnsupportedContentType(
        f"unsupported content type {content_type!r}; use application/jsonlines, "
        "application/json or application/x-npy"
    )


def embeddings_to_response(embeddings: list, accept: str | None) -> tuple[str, str]:
    kind = (accept or "").split(";")[0].strip().lower()
    if kind in ("", "*/*") or kind in JSONLINES_TYPES:
        lines = [json.dumps({"embedding": e}) for e in embeddings]
        return "\n".join(lines), "application/jsonlines"
    if kind == JSON_TYPE:
        return json.dumps({"embeddings": embeddings}), JSON_TYPE
    raise UnsupportedContentType(
        f"unsupported accept type {accept!r}; use application/jsonlines or application/json"
    )


def input_handler(data: Any, context: Any) -> str:
    """Request -> TF Serving REST body ``{"instances": [...]}`` (row format)."""
    faces = faces_from_request(_read(data), context.request_content_type)
    return json.dumps({"instances": faces})


def output_handler(response: Any, context: Any) -> tuple[str, str]:
    """TF Serving response -> (body, content type) in the requested accept type."""
    if response.status_code != 200:
        raise ValueError(f"TF Serving error {response.status_code}: {response.content.decode()}")
    payload = json.loads(response.content)
    predictions = payload["predictions"]
    if predictions and isinstance(predictions[0], dict):  # several named outputs
        predictions = [p["embeddings"] for p in predictions]
    return embeddings_to_response(predictions, getattr(context, "accept_header", None))
