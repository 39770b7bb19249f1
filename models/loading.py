"""Model directories and dataset channels: one loader for every model kind.

A model directory holds ``model.json`` (kind, threshold, face_shape, embedding_dim,
hyperparameters, preprocessing, data_version) plus the kind's weights (``pca.npz`` or
``model.keras`` + ``savedmodel/1/``). :func:`load_embedder` dispatches on ``kind``.

:func:`read_channel` reads a dataset channel (``faces/*.parquet``, ``protocol/*.parquet``,
``manifest.json``) with pyarrow only, so the training scripts run anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from models.evaluation import (
    CALIBRATIONS,
    OTHER_FOLDS,
    PairTable,
    evaluate_candidate,
    run_view2,
    score_pairs,
)

MODEL_JSON = "model.json"
METRICS_JSON = "metrics.json"
KINDS = ("pca", "siamese")

__all__ = [
    "ChannelData",
    "Embedder",
    "LoadedEmbedder",
    "load_embedder",
    "read_channel",
    "read_model_json",
    "score_pairs",
    "write_json",
    "write_model_json",
]


class Embedder(Protocol):
    kind: str
    threshold: float

    def embed(self, faces: np.ndarray) -> np.ndarray: ...


@dataclass
class LoadedEmbedder:
    """A model read back from its directory: ``embed`` faces, compare with ``threshold``."""

    kind: str
    threshold: float
    model: Any
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def embedding_dim(self) -> int:
        return int(self.meta.get("embedding_dim", 0))

    def embed(self, faces: np.ndarray) -> np.ndarray:
        faces = np.asarray(faces, dtype=np.float32)
        if faces.ndim == 2:
            faces = faces[None]
        return self.model.embed(faces)

    def score_pairs(self, emb_a: np.ndarray, emb_b: np.ndarray) -> np.ndarray:
        return score_pairs(emb_a, emb_b)

    def same_person(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) >= self.threshold


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default))
    os.replace(tmp, path)
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_model_json(
    model_dir: str | Path,
    kind: str,
    threshold: float,
    embedding_dim: int,
    hyperparameters: dict[str, Any],
    preprocessing: dict[str, Any] | None = None,
    data_version: str = "",
    face_shape: tuple[int, int] = (68, 56),
    **extra: Any,
) -> Path:
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")
    return write_json(
        Path(model_dir) / MODEL_JSON,
        {
            "kind": kind,
            "threshold": float(threshold),
            "face_shape": list(face_shape),
            "embedding_dim": int(embedding_dim),
            "hyperparameters": hyperparameters,
            "preprocessing": preprocessing or {},
            "data_version": data_version,
            **extra,
        },
    )


def read_model_json(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / MODEL_JSON
    if not path.exists():
        raise FileNotFoundError(f"no {MODEL_JSON} in model directory {model_dir}")
    meta = json.loads(path.read_text())
    if meta.get("kind") not in KINDS:
        raise ValueError(f"{path}: unknown model kind {meta.get('kind')!r}; expected {KINDS}")
    return meta


def load_embedder(model_dir: str | Path, precision: str = "float32") -> LoadedEmbedder:
    """Read ``model.json`` and the weights next to it; TensorFlow is imported only for siamese.

    ``precision`` applies to the Siamese network only (PCA is numpy float32 either way).
    Refuses a model trained on faces cut differently from what this code's preprocessing
    produces: it would score every pair, and every score would be wrong."""
    meta = read_model_json(model_dir)
    check_preprocessing(meta.get("preprocessing") or {}, str(model_dir))
    if meta["kind"] == "pca":
        from models.pca import PCAEmbedder

        model: Any = PCAEmbedder.load(model_dir)
    else:
        from models.siamese import SiameseEmbedder

        model = SiameseEmbedder.load(model_dir, precision=precision)
    return LoadedEmbedder(
        kind=meta["kind"], threshold=float(meta["threshold"]), model=model, meta=meta
    )


# the PreprocessParams fields that decide the pixels (the byte and pixel limits do not)
PIXEL_FIELDS = ("version", "height", "width", "draft_scale", "crop_top", "crop_left")


def check_preprocessing(recorded: dict[str, Any], where: str) -> None:
    from models.preprocessing import DEFAULT_PARAMS

    current = DEFAULT_PARAMS.to_dict()
    differ = {
        k: (recorded[k], current[k])
        for k in PIXEL_FIELDS
        if k in recorded and str(recorded[k]) != str(current[k])
    }
    if differ:
        detail = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in differ.items())
        raise ValueError(
            f"the model in {where} was trained on other preprocessing than this code's "
            f"({detail}); retrain it (or serve it with the code it was trained with)"
        )


# ---------------------------------------------------------------- dataset channel


@dataclass
class ChannelData:
    """A dataset channel in memory: faces with ids/persons/splits, protocol tables, manifest."""

    image_ids: np.ndarray
    persons: np.ndarray
    splits: np.ndarray
    faces: np.ndarray
    protocol: dict[str, Any]
    manifest: dict[str, Any]

    @property
    def version(self) -> str:
        return str(self.manifest.get("version", ""))

    def subset(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(faces, persons, image_ids) of one split."""
        mask = self.splits == split
        return self.faces[mask], self.persons[mask], self.image_ids[mask]

    def pair_table(self, name: str) -> PairTable:
        t = self.protocol[name]
        return PairTable(
            fold=np.asarray(t["fold"], dtype=np.int32),
            image_id_a=np.asarray(t["image_id_a"], dtype=object),
            image_id_b=np.asarray(t["image_id_b"], dtype=object),
            label=np.asarray(t["label"], dtype=np.int8),
        )

    def people_folds(self, name: str = "people_view2") -> dict[str, int]:
        t = self.protocol[name]
        return {str(p): int(f) for p, f in zip(t["person"], t["fold"], strict=True)}


def read_channel(channel_dir: str | Path, face_shape: tuple[int, int] | None = None) -> ChannelData:
    """Read ``faces/*.parquet`` (without the JPEG column), ``protocol/*.parquet``, manifest."""
    import pyarrow.parquet as pq

    root = Path(channel_dir)
    face_files = sorted((root / "faces").glob("*.parquet"))
    if not face_files:
        raise FileNotFoundError(f"no faces/*.parquet under dataset channel {root}")
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    shape = tuple(face_shape or manifest.get("face_shape") or (68, 56))
    cols = ["image_id", "person", "split", "face"]
    tables = [pq.read_table(f, columns=cols) for f in face_files]
    ids, persons, splits, faces = [], [], [], []
    for t in tables:
        ids.extend(t.column("image_id").to_pylist())
        persons.extend(t.column("person").to_pylist())
        splits.extend(t.column("split").to_pylist())
        flat = t.column("face").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        faces.append(np.asarray(flat, dtype=np.float32).reshape(t.num_rows, *shape))
    protocol: dict[str, Any] = {}
    for f in sorted((root / "protocol").glob("*.parquet")):
        protocol[f.stem] = pq.read_table(f).to_pydict()
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    return ChannelData(
        image_ids=np.asarray(ids, dtype=object)[order],
        persons=np.asarray(persons, dtype=object)[order],
        splits=np.asarray(splits, dtype=object)[order],
        faces=np.concatenate(faces)[order],
        protocol=protocol,
        manifest=manifest,
    )


def write_training_outputs(
    model_dir: str | Path,
    output_data_dir: str | Path | None,
    kind: str,
    evaluation: dict[str, Any],
    embedding_dim: int,
    hyperparameters: dict[str, Any],
    data: ChannelData,
    train_seconds: float,
    view2: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """model.json + metrics.json in ``model_dir`` (metrics also copied to ``output_data_dir``).

    metrics.json carries the test-split figures both at top level (accuracy, auc, threshold,
    roc) and under ``test``; ``val`` holds the figures at the fitted threshold on val pairs.
    """
    threshold = float(evaluation["threshold"])
    preprocessing = dict(data.manifest.get("preprocessing") or {})
    write_model_json(
        model_dir,
        kind,
        threshold,
        embedding_dim,
        hyperparameters,
        preprocessing,
        data_version=data.version,
        face_shape=tuple(data.manifest.get("face_shape") or (68, 56)),
    )
    test = evaluation["test"]
    metrics: dict[str, Any] = {
        "kind": kind,
        "data_version": data.version,
        "threshold": threshold,
        "accuracy": test["accuracy"],
        "auc": test["auc"],
        "tar_at_far_1e-2": test["tar_at_far_1e-2"],
        "tar_at_far_1e-3": test["tar_at_far_1e-3"],
        "roc": test.get("roc"),
        "test": test,
        "val": evaluation["val"],
        "view2": view2,
        "train_seconds": round(float(train_seconds), 2),
        "hyperparameters": hyperparameters,
        "embedding_dim": int(embedding_dim),
        "n_train_images": int((data.splits == "train").sum()),
        "n_train_people": len(set(data.persons[data.splits == "train"].tolist())),
    }
    write_json(Path(model_dir) / METRICS_JSON, metrics)
    if output_data_dir:
        write_json(Path(output_data_dir) / METRICS_JSON, metrics)
    return metrics


def evaluate_on_channel(
    model: Any,
    fit: Callable[[np.ndarray, np.ndarray], Any],
    data: ChannelData,
    *,
    eval_pairs: int,
    seed: int,
    view2_folds: int,
    log: Callable[[str], None],
    view2_calibration: str = OTHER_FOLDS,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """What every entry point reports: the candidate's val/test figures and, when asked
    and the channel has the protocol, the View 2 folds (``fit`` trains a fresh model)."""
    evaluation = evaluate_candidate(
        model, data.faces, data.image_ids, data.splits, data.persons, n_pairs=eval_pairs, seed=seed
    )
    log(
        f"threshold {evaluation['threshold']:.4f} (fitted on val); test accuracy "
        f"{evaluation['test']['accuracy']:.4f} auc {evaluation['test']['auc']:.4f}"
    )
    view2 = None
    if view2_folds > 0 and "pairs_view2" in data.protocol:
        log(f"LFW View 2 protocol over {view2_folds} folds ({view2_calibration} calibration)")
        view2 = run_view2(
            fit,
            data.faces,
            data.image_ids,
            data.people_folds(),
            data.pair_table("pairs_view2"),
            folds=range(view2_folds),
            log=log,
            calibration=view2_calibration,
        )
        log(f"View 2: {100 * view2['accuracy_mean']:.2f} ± {100 * view2['accuracy_se']:.2f} %")
    return evaluation, view2


def add_script_mode_args(
    p: argparse.ArgumentParser, *, view2_folds: int, seed: int, view2_calibration: str
) -> None:
    """Flags every entry point shares: evaluation, seed and the SageMaker ``SM_*`` dirs
    (env with local defaults, as in the TF2 script-mode examples)."""
    p.add_argument(
        "--eval-pairs", "--eval_pairs", type=int, default=2000, help="val and test pairs each"
    )
    p.add_argument(
        "--view2-folds",
        "--view2_folds",
        type=int,
        default=view2_folds,
        help="0 = skip the View 2 protocol",
    )
    p.add_argument(
        "--view2-calibration",
        "--view2_calibration",
        choices=CALIBRATIONS,
        default=view2_calibration,
        help="View 2 threshold: fitted on the pairs of the nine folds the model trained on "
        "(other-folds), or train on eight and fit it on the ninth's pairs (held-out)",
    )
    p.add_argument("--seed", type=int, default=seed)
    p.add_argument("--model-dir", default=os.environ.get("SM_MODEL_DIR", "/opt/ml/model"))
    p.add_argument(
        "--train", default=os.environ.get("SM_CHANNEL_TRAIN", "/opt/ml/input/data/train")
    )
    p.add_argument(
        "--output-data-dir", default=os.environ.get("SM_OUTPUT_DATA_DIR", "/opt/ml/output/data")
    )


def str2bool(value: str | bool) -> bool:
    """Boolean hyperparameters as SageMaker and JSON render them: 1/0, true/false, yes/no."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def script_parser(description: str) -> argparse.ArgumentParser:
    """No abbreviations: ``--eval-pair`` must not silently become ``--eval-pairs``."""
    return argparse.ArgumentParser(description=description, allow_abbrev=False)


# where the script reads and writes (SageMaker's SM_* dirs) and --help: not hyperparameters
NOT_HYPERPARAMETERS = frozenset({"help", "model_dir", "train", "output_data_dir"})


def hyperparameter_spellings(p: argparse.ArgumentParser) -> dict[str, str]:
    """Every spelling of every hyperparameter flag (without ``--``) -> its main spelling
    (the first, ``eval-pairs`` for ``eval_pairs``)."""
    return {
        option.removeprefix("--"): action.option_strings[0].removeprefix("--")
        for action in p._actions
        if action.dest not in NOT_HYPERPARAMETERS
        for option in action.option_strings
    }


def parse_script_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parse_known_args``: SageMaker may pass flags a script does not know; say so."""
    args, unknown = p.parse_known_args(argv)
    if unknown:
        print(f"ignoring unknown arguments: {unknown}", flush=True)
    return args
