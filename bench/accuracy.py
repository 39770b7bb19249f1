"""LFW View 2 (10-fold, unrestricted, no outside data) benchmark for the PCA and Siamese models.

Reads the real LFW copy directly (``models.preprocessing.preprocess_image`` on every JPEG,
cached once as ``.npy``), so it does not depend on the ingest flow. Each fold's result is
written as JSON as soon as it finishes and reused on the next run (resumable).

    nice .venv/bin/python -m bench.accuracy --models pca
    nice .venv/bin/python -m bench.accuracy --models siamese --folds 0 --max-train-seconds 1200
    nice .venv/bin/python -m bench.accuracy --models pca,siamese --view1
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lfw-home", type=Path, default=DEFAULT_LFW)
    p.add_argument("--cache-dir", type=Path, default=ROOT / "var" / "cache" / "bench")
    p.add_argument("--cache-only", action="store_true")
    args = p.parse_args(argv)
    ids, faces = load_faces(args.lfw_home, args.cache_dir)
    print(len(ids), faces.shape)


if __name__ == "__main__":
    main()
