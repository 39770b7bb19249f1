"""scikit-learn serving entry point for the PCA embedder in SageMaker batch transform.

The SageMaker scikit-learn container (``SAGEMAKER_PROGRAM=inference_pca.py``) calls
``model_fn`` once, then ``input_fn -> predict_fn -> output_fn`` per request. The model is
read from ``pca.npz`` with ``allow_pickle=False`` and applied with numpy only -- the same
arithmetic as ``models.pca.PCAEmbedder.embed`` (tests check they agree) -- so the
container needs nothing from this project but ``face_features.py``, which the batch
transform path packs next to this file in ``code/``.

Content types are those of ``models/inference.py``: ``application/jsonlines`` (one
``{"id", "face"}`` per line), ``application/json`` and ``application/x-npy`` in;
``application/jsonlines`` (default) or ``application/json`` out.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np

try:  # in the serving container: code/face_features.py next to this file
    from face_features import embed_subspaces, feature_maps, parse_features, per_map_arrays
except ImportError:  # in the repository
    from models.face_features import (
        embed_subspaces,
        feature_maps,
        parse_features,
        per_map_arrays,
    )

FACE_SHAPE = (68, 56)
JSONLINES_TYPES = ("application/jsonlines", "application/x-jsonlines", "application/jsonl")


def model_fn(model_dir: str) -> dict[str, Any]:
    with np.load(os.path.join(model_dir, "pca.npz"), allow_pickle=False) as data:
        params = json.loads(str(data["params_json"]))
        arrays = {k: data[k].astype(np.float32) for k in data.files if not k.endswith("_json")}
    params, arrays = per_map_arrays(params, arrays)
    return {
        "features": parse_features(params["features"]),
        "mean": arrays["mean"],
        "components": arrays["components"],
        "variance": arrays["explained_variance"] if params.get("whiten", True) else None,
        "lda": arrays.get("lda_scalings"),
        "flip_average": bool(params.get("flip_average", False)),
    }


def _face_row(value: Any) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float32).reshape(-1)
    if arr.size != FACE_SHAPE[0] * FACE_SHAPE[1]:
        raise ValueError(f"a face must be {FACE_SHAPE[0]}x{FACE_SHAPE[1]} floats")
    return arr


def input_fn(request_body: Any, request_content_type: str) -> np.ndarray:
    body = request_body.encode() if isinstance(request_body, str) else bytes(request_body)
    ctype = (request_content_type or "").split(";")[0].strip().lower()
    if ctype in JSONLINES_TYPES:
        rows = []
        for line in body.decode("utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                rows.append(_face_row(record["face"] if isinstance(record, dict) else record))
        return np.stack(rows) if rows else np.zeros((0, FACE_SHAPE[0] * FACE_SHAPE[1]), np.float32)
    if ctype == "application/json":
        payload = json.loads(body.decode("utf-8"))
        items = (
            payload.get("instances", payload.get("faces")) if isinstance(payload, dict) else payload
        )
        if not items:
            raise ValueError('JSON requests need a non-empty "instances" or "faces" list')
        return np.stack([_face_row(f) for f in items])
    if ctype == "application/x-npy":
        arr = np.load(io.BytesIO(body), allow_pickle=False)
        # (H, W) one face, (N, H, W) or (N, H*W) a batch
        return np.asarray(arr, np.float32).reshape(-1, FACE_SHAPE[0] * FACE_SHAPE[1])
    raise ValueError(
        f"unsupported content type {request_content_type!r}; use application/jsonlines, "
        "application/json or application/x-npy"
    )


def predict_fn(faces: np.ndarray, model: dict[str, Any]) -> np.ndarray:
    maps = feature_maps(faces.reshape(len(faces), *FACE_SHAPE), model["features"])
    return embed_subspaces(
        maps,
        model["mean"],
        model["components"],
        model["variance"],
        model["lda"],
        model["flip_average"],
    )


def output_fn(prediction: np.ndarray, accept: str) -> tuple[str, str]:
    kind = (accept or "").split(";")[0].strip().lower()
    if kind in ("", "*/*") or kind in JSONLINES_TYPES:
        return "\n".join(json.dumps({"embedding": row.tolist()}) for row in prediction), (
            "application/jsonlines"
        )
    if kind == "application/json":
        return json.dumps({"embeddings": prediction.tolist()}), "application/json"
    raise ValueError(f"unsupported accept type {accept!r}; use application/jsonlines or json")
