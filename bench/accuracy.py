"""LFW View 2 (10-fold, unrestricted, no outside data) benchmark for the PCA and Siamese models.

Reads the real LFW copy directly (``models.preprocessing.preprocess_image`` on every JPEG,
cached once as ``.npy``), so it does not depend on the ingest flow. Each fold's result is
written as JSON as soon as it finishes and reused on the next run (resumable).

    nice .venv/bin/python -m bench.accuracy --models pca
    nice .venv/bin/python -m bench.accuracy --models siamese --folds 0 --max-train-seconds 1200
    nice .venv/bin/python -m bench.accuracy --models pca,siamese --view1
    nice .venv/bin/python -m bench.accuracy --models siamese --folds 3 --seeds 0,1 \
        --epochs 30 --max-train-seconds 1200      # a seed ensemble (probe, see --seeds)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.evaluation import (  # noqa: E402
    PairTable,
    TrainFn,
    l2_normalise,
    run_view1,
    run_view2_fold,
    score_view2_fold,
    summarise_folds,
)
from models.preprocessing import DEFAULT_PARAMS, preprocess_image  # noqa: E402

DEFAULT_LFW = ROOT.parent / "shared" / "data" / "lfw_home"


# ---------------------------------------------------------------- LFW protocol files


def image_id(person: str, index: int) -> str:
    return f"{person}/{int(index):04d}"


def read_names(lfw_home: Path) -> list[tuple[str, int]]:
    rows = []
    for line in (lfw_home / "lfw-names.txt").read_text().splitlines():
        if line.strip():
            name, n = line.split()
            rows.append((name, int(n)))
    return rows


def read_people_folds(path: Path) -> list[list[str]]:
    """people.txt: number of folds, then per fold a count and that many `name n` lines."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    n_folds, pos, folds = int(lines[0]), 1, []
    for _ in range(n_folds):
        count = int(lines[pos])
        folds.append([ln.split()[0] for ln in lines[pos + 1 : pos + 1 + count]])
        pos += 1 + count
    return folds


def read_people_list(path: Path) -> list[str]:
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return [ln.split()[0] for ln in lines[1 : 1 + int(lines[0])]]


def _pair(fields: list[str]) -> tuple[str, str, int]:
    if len(fields) == 3:
        return image_id(fields[0], int(fields[1])), image_id(fields[0], int(fields[2])), 1
    return image_id(fields[0], int(fields[1])), image_id(fields[2], int(fields[3])), 0


def read_pairs(path: Path) -> list[list[tuple[str, str, int]]]:
    """pairs*.txt -> per fold a list of (image_id_a, image_id_b, label)."""
    lines = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
    head = lines[0]
    if len(head) == 2:
        n_folds, per = int(head[0]), int(head[1])
    else:
        n_folds, per = 1, int(head[0])
    body, folds = lines[1:], []
    for k in range(n_folds):
        folds.append([_pair(f) for f in body[k * 2 * per : (k + 1) * 2 * per]])
    return folds


# ---------------------------------------------------------------- preprocessed faces cache


def _preprocess_file(path: str) -> np.ndarray:
    return preprocess_image(Path(path).read_bytes(), detect="never")


def load_faces(lfw_home: Path, cache_dir: Path, workers: int = 2) -> tuple[list[str], np.ndarray]:
    """All LFW images preprocessed once; cached as faces.npy + ids.json in ``cache_dir``."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    tag = f"lfw_{DEFAULT_PARAMS.version}_{DEFAULT_PARAMS.height}x{DEFAULT_PARAMS.width}"
    faces_path, ids_path = cache_dir / f"{tag}.npy", cache_dir / f"{tag}.ids.json"
    if faces_path.exists() and ids_path.exists():
        return json.loads(ids_path.read_text()), np.load(faces_path, mmap_mode="r")
    ids, paths = [], []
    for person, n in read_names(lfw_home):
        for i in range(1, n + 1):
            ids.append(image_id(person, i))
            paths.append(str(lfw_home / "lfw_funneled" / person / f"{person}_{i:04d}.jpg"))
    t0 = time.time()
    print(f"preprocessing {len(paths)} LFW images with {workers} workers ...", flush=True)
    with Pool(workers) as pool:
        faces = np.stack(pool.map(_preprocess_file, paths, chunksize=64)).astype(np.float32)
    print(f"preprocessed in {time.time() - t0:.0f}s -> {faces_path}", flush=True)
    tmp = faces_path.with_suffix(".tmp.npy")
    np.save(tmp, faces)
    os.replace(tmp, faces_path)
    ids_path.write_text(json.dumps(ids))
    return ids, faces


def protocol_view2(lfw_home: Path) -> tuple[dict[str, int], PairTable]:
    people_fold = {
        p: k for k, ps in enumerate(read_people_folds(lfw_home / "people.txt")) for p in ps
    }
    rows = [
        (k, a, b, lab)
        for k, fold in enumerate(read_pairs(lfw_home / "pairs.txt"))
        for a, b, lab in fold
    ]
    return people_fold, PairTable.from_rows(rows)


def protocol_view1(lfw_home: Path) -> tuple[list[str], PairTable, PairTable]:
    train_people = read_people_list(lfw_home / "peopleDevTrain.txt")
    train = PairTable.from_rows(
        (0, a, b, lab) for a, b, lab in read_pairs(lfw_home / "pairsDevTrain.txt")[0]
    )
    test = PairTable.from_rows(
        (0, a, b, lab) for a, b, lab in read_pairs(lfw_home / "pairsDevTest.txt")[0]
    )
    return train_people, train, test


# ---------------------------------------------------------------- models under test


def pca_train_fn(args: argparse.Namespace) -> TrainFn:
    from models.pca import PCAEmbedder

    lda: bool | str = {"true": True, "false": False}.get(args.pca_lda.lower(), args.pca_lda)

    def train(faces: np.ndarray, labels: np.ndarray) -> PCAEmbedder:
        return PCAEmbedder(
            n_components=args.pca_components,
            features=args.pca_features,
            whiten=not args.pca_no_whiten,
            lda=lda,
            lda_components=args.pca_lda_components or None,
            lda_shrinkage=args.pca_shrinkage,
            flip_augment=not args.pca_no_flip,
            drop_components=args.pca_drop,
            flip_average=args.pca_flip_average,
        ).fit(faces, labels)

    return train


def siamese_train_fn(args: argparse.Namespace) -> TrainFn:
    from models.siamese import SiameseConfig, train_siamese

    def train(faces: np.ndarray, labels: np.ndarray):
        config = SiameseConfig(
            epochs=args.epochs,
            max_train_seconds=args.max_train_seconds,
            **json.loads(args.siamese_config or "{}"),
        )
        return train_siamese(faces, labels, config, log=lambda m: print(m, flush=True))

    return train


def _saving(train_fn: TrainFn, model_dir: Path) -> TrainFn:
    """``train_fn`` that also saves the model it trained (both models have ``save(dir)``)."""

    def train(faces: np.ndarray, labels: np.ndarray):
        model = train_fn(faces, labels)
        model.save(model_dir)
        print(f"model saved -> {model_dir}", flush=True)
        return model

    return train


# ---------------------------------------------------------------- seed ensembles (probe)


class SeedEnsemble:
    """Members' L2-normalised embeddings side by side, renormalised: the cosine score is
    the mean of the members' cosines. A benchmark probe; production serves one network."""

    def __init__(self, members: list):
        self.members = members

    def embed(self, faces: np.ndarray) -> np.ndarray:
        return l2_normalise(np.concatenate([m.embed(faces) for m in self.members], axis=1))


def _with_seed(args: argparse.Namespace, seed: int) -> argparse.Namespace:
    """``args`` for one member; the default seed keeps the plain tag, so the models that
    ``--save-models`` kept in the single-model folders are reused."""
    from models.siamese import SiameseConfig

    cfg = json.loads(args.siamese_config or "{}")
    if seed == SiameseConfig().seed:
        cfg.pop("seed", None)
    else:
        cfg["seed"] = seed
    config = json.dumps(cfg, separators=(",", ":")) if cfg else ""
    return argparse.Namespace(**{**vars(args), "siamese_config": config})


def seed_ensemble_fold(
    args: argparse.Namespace,
    out: Path,
    faces: np.ndarray,
    ids: list[str],
    people_fold: dict[str, int],
    pairs: PairTable,
    fold: int,
) -> dict:
    """Fold ``fold`` scored by the seed ensemble: each member is loaded from its
    single-model folder (``fold<k>_model``) or from ``out`` when kept, else trained (as in
    the single-model protocol) and kept in ``out/seed<s>_fold<k>_model``."""
    from models.siamese import SiameseEmbedder

    members, member_acc, train_seconds = [], {}, 0.0
    for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
        margs = _with_seed(args, seed)
        kept = kept_fold_model(_config_tag("siamese", margs), fold, args.out_dir)
        own = out / f"seed{seed}_fold{fold}_model"
        model_dir = kept if (kept / "model.keras").exists() else own
        member_json = model_dir.parent / (
            f"fold{fold}.json" if model_dir == kept else f"seed{seed}_fold{fold}.json"
        )
        if not (model_dir / "model.keras").exists():
            res = run_view2_fold(
                _saving(siamese_train_fn(margs), model_dir), faces, ids, people_fold, pairs,
                fold, log=lambda m: print(m, flush=True),
            )  # fmt: skip
            _write_json(member_json, res)
        members.append(SiameseEmbedder.load(model_dir))
        if member_json.exists():
            member = json.loads(member_json.read_text())
            member_acc[seed] = member["accuracy"]
            train_seconds += float(member.get("train_seconds", 0.0))
    row_of = {iid: r for r, iid in enumerate(ids)}
    result = score_view2_fold(SeedEnsemble(members), faces, row_of, pairs, fold)
    result.update(member_accuracy=member_acc, seeds=args.seeds, train_seconds=train_seconds)
    print(
        f"fold {fold}: ensemble of seeds {args.seeds}: accuracy {result['accuracy']:.4f} "
        f"auc {result['auc']:.4f} (members {member_acc})",
        flush=True,
    )
    return result


RESULTS_DIR = ROOT / "bench" / "results"
LEGACY_DIR = ROOT / "var" / "bench"  # the default --out-dir before session 5


def kept_fold_model(tag: str, fold: int, out_dir: Path = RESULTS_DIR) -> Path:
    """Where ``--save-models`` kept fold ``fold``'s model of config ``tag``: under
    ``out_dir`` or, for runs made before results moved, under var/bench/. A path under
    ``out_dir`` when neither has one (the caller trains, or reports it missing)."""
    for base in (out_dir, LEGACY_DIR):
        model_dir = base / tag / f"fold{fold}_model"
        if (model_dir / "model.keras").exists():
            return model_dir
    return out_dir / tag / f"fold{fold}_model"


def _config_tag(name: str, args: argparse.Namespace) -> str:
    return _model_tag(name, args) + ("_calho" if args.held_out_calibration else "")


def _model_tag(name: str, args: argparse.Namespace) -> str:
    if name == "pca":
        return (
            f"pca_n{args.pca_components}_w{int(not args.pca_no_whiten)}_lda{args.pca_lda}"
            f"_k{args.pca_lda_components}_s{args.pca_shrinkage}_f{int(not args.pca_no_flip)}"
            f"_d{args.pca_drop}"
            + ("_fa" if args.pca_flip_average else "")
            + ("" if args.pca_features == "pixels" else f"_x{args.pca_features}")
        )
    extra = args.siamese_config.replace(" ", "").replace('"', "") if args.siamese_config else ""
    return f"siamese_e{args.epochs}_t{args.max_train_seconds}_{extra}".replace("/", "_")[:150]


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _report(name: str, summary: dict) -> None:
    print(
        f"{name}: View 2 accuracy {100 * summary['accuracy_mean']:.2f} "
        f"± {100 * summary['accuracy_se']:.2f} % (SE, {summary['n_folds']} folds), "
        f"fold std {100 * summary['accuracy_std']:.2f}, AUC mean {summary['auc_mean']:.4f}"
        + (
            f", pooled {summary['auc_pooled']:.4f}, TAR@FAR1e-2 {summary['tar_at_far_1e-2']:.3f}"
            f", TAR@FAR1e-3 {summary['tar_at_far_1e-3']:.3f}"
            if "auc_pooled" in summary
            else ""
        )
        + f", train {summary['train_seconds_mean']:.0f}s/fold",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lfw-home", type=Path, default=DEFAULT_LFW)
    p.add_argument("--cache-dir", type=Path, default=ROOT / "var" / "cache" / "bench")
    p.add_argument(
        "--out-dir",
        type=Path,
        default=RESULTS_DIR,
        help="fold results (JSON, committed: a later session resumes from them); kept\n"
        "models (--save-models) go there too but are git-ignored",
    )
    p.add_argument("--cache-only", action="store_true", help="only build the faces cache")
    p.add_argument("--models", default="pca,siamese")
    p.add_argument("--folds", default="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--view1", action="store_true", help="quick mode: View 1 DevTrain -> DevTest")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--max-train-seconds", type=float, default=None, help="per fold")
    p.add_argument("--siamese-config", default="", help="JSON overrides of SiameseConfig")
    p.add_argument("--pca-components", type=int, default=200)
    p.add_argument("--pca-features", default="smooth+gradient+equalised", help="'+'-joined")
    p.add_argument("--pca-no-whiten", action="store_true")
    p.add_argument("--pca-lda", default="auto", help="true|false|auto")
    p.add_argument("--pca-lda-components", type=int, default=15, help="0 = all")
    p.add_argument("--pca-shrinkage", type=float, default=1e-3)
    p.add_argument("--pca-no-flip", action="store_true")
    p.add_argument("--pca-drop", type=int, default=0)
    p.add_argument("--pca-flip-average", action="store_true")
    p.add_argument("--fresh", action="store_true", help="ignore saved fold results")
    p.add_argument(
        "--held-out-calibration",
        action="store_true",
        help="train fold k's model on 8 of the other people-folds and fit the threshold on\n"
        "the pairs of the 9th, (k+1) %% 10, whose people it never saw (default: all 9, the\n"
        "threshold fitted on their pairs)",
    )
    p.add_argument(
        "--seeds",
        default="",
        help="siamese only: score a seed ensemble of these seeds (e.g. 0,1); members are\n"
        "reused from the single-model folders' kept models, else trained and kept",
    )
    p.add_argument(
        "--save-models",
        action="store_true",
        help="keep each fold's trained model in <out>/fold<k>_model/ (for later probes)",
    )
    args = p.parse_args(argv)
    if args.held_out_calibration and args.seeds:
        p.error("--held-out-calibration is not implemented for --seeds")

    ids, faces = load_faces(args.lfw_home, args.cache_dir)
    if args.cache_only:
        print(len(ids), faces.shape)
        return
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        train_fn = {"pca": pca_train_fn, "siamese": siamese_train_fn}[name](args)
        tag = _config_tag(name, args)
        if name == "siamese" and args.seeds:
            tag += "_seeds" + "-".join(s.strip() for s in args.seeds.split(","))
        out = args.out_dir / tag
        out.mkdir(parents=True, exist_ok=True)
        print(f"== {name} [{tag}] -> {out}", flush=True)
        if args.view1:
            path = out / "view1.json"
            if path.exists() and not args.fresh:
                res = json.loads(path.read_text())
            else:
                train_people, train_pairs, test_pairs = protocol_view1(args.lfw_home)
                res = run_view1(train_fn, faces, ids, train_people, train_pairs, test_pairs)
                _write_json(path, res)
            print(
                f"{name}: View 1 DevTest accuracy {100 * res['accuracy']:.2f} %, "
                f"AUC {res['auc']:.4f}, train {res['train_seconds']:.0f}s",
                flush=True,
            )
            continue
        people_fold, pairs = protocol_view2(args.lfw_home)
        results = []
        for k in [int(f) for f in args.folds.split(",") if f.strip()]:
            path = out / f"fold{k}.json"
            if path.exists() and not args.fresh:
                res = json.loads(path.read_text())
                print(f"fold {k}: (saved) accuracy {res['accuracy']:.4f}", flush=True)
            elif name == "siamese" and args.seeds:
                res = seed_ensemble_fold(args, out, faces, ids, people_fold, pairs, k)
                _write_json(path, res)
            else:
                fold_train = (
                    _saving(train_fn, out / f"fold{k}_model") if args.save_models else train_fn
                )
                res = run_view2_fold(
                    fold_train,
                    faces,
                    ids,
                    people_fold,
                    pairs,
                    k,
                    log=lambda m: print(m, flush=True),
                    held_out_calibration=args.held_out_calibration,
                )
                _write_json(path, res)
            results.append(res)
        summary = summarise_folds(results)
        _write_json(
            out / "summary.json",
            {
                **summary,
                "args": vars(args)
                | {
                    "lfw_home": str(args.lfw_home),
                    "cache_dir": str(args.cache_dir),
                    "out_dir": str(args.out_dir),
                },
            },
        )
        _report(name, summary)


if __name__ == "__main__":
    main()
