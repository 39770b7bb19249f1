"""SageMaker script-mode entry point for the Siamese (CosFace-trained CNN) model.

Runs as ``python train_siamese.py`` inside a staged source dir (see models/source_dir.py) or
as ``python -m models.train_siamese`` from the repository root. Reads the dataset channel
(``SM_CHANNEL_TRAIN``), trains on the ``train`` split for ``--epochs`` or until
``--max-train-seconds``, fits the threshold on ``val`` pairs, reports on ``test`` pairs,
optionally runs LFW View 2 (``--view2-folds``; expensive), and writes model.json,
model.keras, savedmodel/1/ and metrics.json to ``SM_MODEL_DIR``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if __package__ in (None, ""):  # run as a script: make the sibling `models` package importable
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here if (here / "models").is_dir() else here.parent))

from models.evaluation import HELD_OUT  # noqa: E402
from models.loading import (  # noqa: E402
    add_script_mode_args,
    evaluate_on_channel,
    parse_script_args,
    read_channel,
    script_parser,
    str2bool,
    write_training_outputs,
)
from models.siamese_config import SiameseConfig  # noqa: E402


def optional_float(value: str) -> float:
    """JSON-rendered hyperparameters may say null/None for "no limit" (-> 0)."""
    return 0.0 if str(value).strip().lower() in ("", "null", "none") else float(value)


def int_list(value: str) -> tuple[int, ...]:
    return tuple(int(v) for v in str(value).replace(" ", "").strip("[]()").split(",") if v)


def build_parser() -> argparse.ArgumentParser:
    d = SiameseConfig()
    p = script_parser("Train the Siamese face embedder (script mode).")
    # hyperparameters (SageMaker may pass them as --snake_case or --kebab-case)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument(
        "--max-train-seconds",
        "--max_train_seconds",
        type=optional_float,
        default=0.0,
        help="0 = no time budget",
    )
    p.add_argument("--batch-size", "--batch_size", type=int, default=d.batch_size)
    p.add_argument("--learning-rate", "--learning_rate", type=float, default=d.learning_rate)
    p.add_argument("--weight-decay", "--weight_decay", type=float, default=d.weight_decay)
    p.add_argument("--filters", type=int_list, default=d.filters, help="e.g. 32,64,128,256")
    p.add_argument("--embedding-dim", "--embedding_dim", type=int, default=d.embedding_dim)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--margin", type=float, default=d.margin)
    p.add_argument("--scale", type=float, default=d.scale)
    p.add_argument(
        "--min-images-per-identity",
        "--min_images_per_identity",
        type=int,
        default=d.min_images_per_identity,
    )
    p.add_argument(
        "--mixed-precision",
        "--mixed_precision",
        type=str2bool,
        default=d.mixed_precision,
        help="1 = train in bfloat16 (float32 variables); the saved model computes in float32",
    )
    p.add_argument(
        "--export-savedmodel",
        "--export_savedmodel",
        type=str2bool,
        default=True,
        help="1 = write savedmodel/1/",
    )
    add_script_mode_args(p, view2_folds=0, seed=d.seed, view2_calibration=HELD_OUT)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_script_args(build_parser(), argv)


def make_config(args: argparse.Namespace, face_shape: tuple[int, int]) -> SiameseConfig:
    return SiameseConfig(
        epochs=args.epochs,
        max_train_seconds=args.max_train_seconds or None,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        filters=tuple(args.filters),
        embedding_dim=args.embedding_dim,
        dropout=args.dropout,
        margin=args.margin,
        scale=args.scale,
        min_images_per_identity=args.min_images_per_identity,
        mixed_precision=bool(args.mixed_precision),
        seed=args.seed,
        face_shape=face_shape,
    )


def log(message: str) -> None:
    print(f"[train_siamese] {message}", flush=True)


def train(args: argparse.Namespace) -> dict:
    from models.siamese import train_siamese  # TensorFlow: not needed to read the flags

    log(f"reading dataset channel {args.train}")
    data = read_channel(args.train)
    shape = (int(data.faces.shape[1]), int(data.faces.shape[2]))
    config = make_config(args, shape)
    faces, persons, _ = data.subset("train")
    log(f"training on {len(faces)} train images of {len(set(persons.tolist()))} people")
    t0 = time.time()
    model = train_siamese(faces, persons, config, log=log)
    train_seconds = time.time() - t0
    evaluation, view2 = evaluate_on_channel(
        model,
        lambda f, y: train_siamese(f, y, config, log=log),
        data,
        eval_pairs=args.eval_pairs,
        seed=args.seed,
        view2_folds=args.view2_folds,
        log=log,
        view2_calibration=args.view2_calibration,
    )
    model.save(args.model_dir, export_savedmodel=bool(args.export_savedmodel))
    hyper = config.to_dict() | {
        "eval_pairs": args.eval_pairs,
        "view2_folds": args.view2_folds,
        "view2_calibration": args.view2_calibration,
        "epochs_trained": model.epochs_trained_,
    }
    hyper.pop("extra", None)
    metrics = write_training_outputs(
        args.model_dir,
        args.output_data_dir,
        "siamese",
        evaluation,
        model.embedding_dim,
        hyper,
        data,
        train_seconds,
        view2,
    )
    log(f"wrote model and metrics to {args.model_dir}")
    return metrics


if __name__ == "__main__":
    train(parse_args())
