"""Siamese inference in float32 vs bfloat16 on a trained View 2 fold model.

Scores all 6,000 View 2 pairs with the fold's saved model in both precisions (threshold
fitted as ``bench.accuracy`` fitted it for that config: on the other nine folds, or on
fold k+1 for a ``--held-out-calibration`` one; figures on the model's own fold)
and prints accuracy, AUC, TAR@FAR, embedding speed and how far the two agree. Train and
keep a fold model first:

    nice .venv/bin/python -m bench.accuracy --models siamese --folds 3 --epochs 30 \\
        --max-train-seconds 1200 --save-models
    nice .venv/bin/python -m bench.precision --fold 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.accuracy import DEFAULT_LFW, kept_fold_model, load_faces, protocol_view2  # noqa: E402
from models.evaluation import score_view2_fold  # noqa: E402
from models.loading import MODEL_JSON, write_model_json  # noqa: E402
from models.siamese import SiameseEmbedder, bfloat16_supported  # noqa: E402


class _Timed:
    """Wraps an embedder to time its ``embed`` calls."""

    def __init__(self, model: SiameseEmbedder):
        self.model, self.seconds, self.faces, self.last = model, 0.0, 0, np.zeros(0)

    def embed(self, faces: np.ndarray) -> np.ndarray:
        self.model.embed(faces[:64])  # trace outside the timing
        start = time.perf_counter()
        self.last = self.model.embed(faces)
        self.seconds += time.perf_counter() - start
        self.faces += len(faces)
        return self.last


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--fold", type=int, required=True)
    p.add_argument("--model-dir", type=Path, default=None, help="default: the bench's fold model")
    p.add_argument("--lfw-home", type=Path, default=DEFAULT_LFW)
    p.add_argument("--cache-dir", type=Path, default=ROOT / "var" / "cache" / "bench")
    p.add_argument(
        "--tag",
        default="siamese_e45_tNone_{mixed_precision:true}_calho",
        help="bench.accuracy config whose kept fold model to load (default: the 45-epoch "
        "bfloat16 recipe; the README's figures came from siamese_e30_t1200.0_)",
    )
    args = p.parse_args(argv)
    model_dir = args.model_dir or kept_fold_model(args.tag, args.fold)
    if not (model_dir / "model.keras").exists():
        p.error(f"no saved model in {model_dir} (run bench.accuracy with --save-models)")
    ids, faces = load_faces(args.lfw_home, args.cache_dir)
    row_of = {iid: r for r, iid in enumerate(ids)}
    _, pairs = protocol_view2(args.lfw_home)
    # the calibration the model was evaluated with: a held-out config (``_calho``) never
    # trained on fold (k+1) % 10, whose pairs then fit the threshold
    calibration_fold = (args.fold + 1) % 10 if args.tag.endswith("_calho") else None
    calibrated_on = (
        "the other folds' pairs"
        if calibration_fold is None
        else f"fold {calibration_fold}'s pairs (held out)"
    )
    print(
        f"model {model_dir}, fold {args.fold}, threshold on {calibrated_on}, "
        f"bfloat16 native: {bfloat16_supported()}"
    )
    out, embeddings = {}, {}
    for precision in ("float32", "bfloat16"):
        timed = _Timed(SiameseEmbedder.load(model_dir, precision=precision))
        dim = timed.model.embedding_dim
        res = score_view2_fold(timed, faces, row_of, pairs, args.fold, calibration_fold)
        embeddings[precision] = timed.last
        out[precision] = {
            "accuracy": round(res["accuracy"], 5),
            "auc": round(res["auc"], 5),
            "tar_at_far_1e-2": res["tar_at_far_1e-2"],
            "tar_at_far_1e-3": res["tar_at_far_1e-3"],
            "threshold": round(res["threshold"], 5),
            "ms_per_face": round(1e3 * timed.seconds / timed.faces, 3),
            "scores": np.array(res["scores"]),
        }
    a, b = embeddings["float32"], embeddings["bfloat16"]
    cos = (a * b).sum(axis=1)
    fp32, bf16 = out["float32"], out["bfloat16"]
    same_decision = (fp32["scores"] >= fp32["threshold"]) == (bf16["scores"] >= bf16["threshold"])
    summary = {
        "fold": args.fold,
        **{k: {n: v for n, v in r.items() if n != "scores"} for k, r in out.items()},
        "embedding_cosine_min": float(cos.min()),
        "embedding_cosine_mean": float(cos.mean()),
        "score_abs_diff_max": float(np.abs(fp32["scores"] - bf16["scores"]).max()),
        "decisions_changed": int((~same_decision).sum()),
        "speedup": round(fp32["ms_per_face"] / bf16["ms_per_face"], 2),
    }
    print(json.dumps(summary, indent=1))
    if not (model_dir / MODEL_JSON).exists():  # servable by bench/verify.py --model-dir
        trained_by = {"trained_by": f"bench.accuracy {args.tag} fold {args.fold}"}
        write_model_json(model_dir, "siamese", fp32["threshold"], dim, trained_by)
        print(f"wrote {model_dir / MODEL_JSON} (threshold fitted on {calibrated_on})")


if __name__ == "__main__":
    main()
