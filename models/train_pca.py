"""SageMaker script-mode entry point for the PCA (eigenfaces/Fisherfaces) model.

Runs as ``python train_pca.py`` inside a staged source dir (see models/source_dir.py) or as
``python -m models.train_pca`` from the repository root. Reads the dataset channel
(``SM_CHANNEL_TRAIN``), trains on the ``train`` split, fits the threshold on ``val`` pairs,
reports on ``test`` pairs, optionally runs LFW View 2, and writes model.json, pca.npz and
metrics.json to ``SM_MODEL_DIR`` (metrics also to ``SM_OUTPUT_DATA_DIR``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the sibling `models` package importable
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here if (here / "models").is_dir() else here.parent))

from models.evaluation import OTHER_FOLDS  # noqa: E402
from models.face_features import DEFAULT_FEATURES, FEATURES  # noqa: E402
from models.loading import (  # noqa: E402
    add_script_mode_args,
    evaluate_on_channel,
    parse_script_args,
    read_channel,
    script_parser,
    str2bool,
    write_training_outputs,
)
from models.pca import PCAEmbedder  # noqa: E402


def optional_int(value: str) -> int:
    """JSON-rendered hyperparameters may say null/None for "automatic" (-> 0)."""
    return 0 if str(value).strip().lower() in ("", "null", "none") else int(value)


def lda_flag(value: str) -> bool | str:
    return "auto" if value.lower() == "auto" else str2bool(value)


def build_parser() -> argparse.ArgumentParser:
    p = script_parser("Train the PCA face embedder (script mode).")
    # hyperparameters (SageMaker may pass them as --snake_case or --kebab-case)
    p.add_argument("--n-components", "--n_components", type=int, default=200)
    p.add_argument(
        "--features",
        default=DEFAULT_FEATURES,
        help=f"'+'-joined feature maps, one PCA subspace each, from {', '.join(FEATURES)}",
    )
    p.add_argument("--whiten", type=str2bool, default=True)
    p.add_argument("--lda", type=lda_flag, default="auto", help="true | false | auto")
    p.add_argument(
        "--lda-components",
        "--lda_components",
        type=optional_int,
        default=15,
        help="0 = as many as possible",
    )
    p.add_argument("--lda-shrinkage", "--lda_shrinkage", type=float, default=1e-3)
    p.add_argument("--flip-augment", "--flip_augment", type=str2bool, default=True)
    add_script_mode_args(p, view2_folds=10, seed=0, view2_calibration=OTHER_FOLDS)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_script_args(build_parser(), argv)


def hyperparameters(args: argparse.Namespace) -> dict:
    return {
        "n_components": args.n_components,
        "features": args.features,
        "whiten": args.whiten,
        "lda": args.lda,
        "lda_components": args.lda_components,
        "lda_shrinkage": args.lda_shrinkage,
        "flip_augment": args.flip_augment,
        "eval_pairs": args.eval_pairs,
        "view2_folds": args.view2_folds,
        "view2_calibration": args.view2_calibration,
        "seed": args.seed,
    }


def make_model(args: argparse.Namespace, face_shape: tuple[int, int]) -> PCAEmbedder:
    return PCAEmbedder(
        n_components=args.n_components,
        features=args.features,
        whiten=args.whiten,
        lda=args.lda,
        lda_components=args.lda_components or None,
        lda_shrinkage=args.lda_shrinkage,
        flip_augment=args.flip_augment,
        random_state=args.seed,
        face_shape=face_shape,
    )


def log(message: str) -> None:
    print(f"[train_pca] {message}", flush=True)


def train(args: argparse.Namespace) -> dict:
    log(f"reading dataset channel {args.train}")
    data = read_channel(args.train)
    shape = tuple(data.faces.shape[1:])
    faces, persons, _ = data.subset("train")
    log(f"fitting PCA on {len(faces)} train images of {len(set(persons.tolist()))} people")
    t0 = time.time()
    model = make_model(args, shape).fit(faces, persons)
    train_seconds = time.time() - t0
    log(
        f"fitted in {train_seconds:.1f}s: {model.n_components_} components, "
        f"lda={model.lda_used_} {model.lda_auto_scores_}, dim {model.embedding_dim_}"
    )
    evaluation, view2 = evaluate_on_channel(
        model,
        lambda f, y: make_model(args, shape).fit(f, y),
        data,
        eval_pairs=args.eval_pairs,
        seed=args.seed,
        view2_folds=args.view2_folds,
        log=log,
        view2_calibration=args.view2_calibration,
    )
    model.save(args.model_dir)
    metrics = write_training_outputs(
        args.model_dir,
        args.output_data_dir,
        "pca",
        evaluation,
        model.embedding_dim_,
        hyperparameters(args) | {"lda_used": model.lda_used_},
        data,
        train_seconds,
        view2,
    )
    log(f"wrote model and metrics to {args.model_dir}")
    return metrics


if __name__ == "__main__":
    train(parse_args())
