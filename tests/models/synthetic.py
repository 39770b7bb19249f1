"""Tiny synthetic identity data: each "person" is a smooth, left-right symmetric random
pattern at 68x56; each image is that pattern plus noise and a small brightness change,
per-image normalised like models.preprocessing. Also writes a dataset channel laid out as
in CONTRACTS.md (faces/*.parquet, protocol/*.parquet, manifest.json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SHAPE = (68, 56)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=(-2, -1), keepdims=True)
    return (x / x.std(axis=(-2, -1), keepdims=True)).astype(np.float32)


def person_bases(n_people: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(n_people, 17, 14))
    base = np.kron(coarse, np.ones((4, 4)))  # 68x56 blocks
    base = (base + base[..., ::-1]) / 2.0  # faces are roughly symmetric
    return _normalise(base)


def make_faces(
    n_people: int = 12, per_person: int = 6, noise: float = 0.6, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """-> faces (N,68,56) float32, person labels (N,), image ids "person_03/0001"."""
    rng = np.random.default_rng(seed + 1)
    bases = person_bases(n_people, seed)
    faces, labels, ids = [], [], []
    for p in range(n_people):
        for i in range(per_person):
            img = bases[p] + noise * rng.normal(size=SHAPE) + rng.normal(scale=0.2)
            faces.append(img)
            labels.append(f"person_{p:02d}")
            ids.append(f"person_{p:02d}/{i + 1:04d}")
    return _normalise(np.stack(faces)), np.array(labels, dtype=object), ids


def _pairs_rows(people: list[str], per_person: int, fold: int, n_each: int, rng) -> list[dict]:
    rows = []
    for k in range(n_each):
        p = people[k % len(people)]
        a, b = rng.choice(per_person, size=2, replace=False) + 1
        rows.append((p, int(a), p, int(b), 1))
    for _ in range(n_each):
        i, j = rng.choice(len(people), size=2, replace=False)
        rows.append(
            (
                people[i],
                int(rng.integers(1, per_person + 1)),
                people[j],
                int(rng.integers(1, per_person + 1)),
                0,
            )
        )
    return [
        {
            "fold": fold,
            "pair_index": n,
            "person_a": pa_,
            "index_a": ia,
            "person_b": pb,
            "index_b": ib,
            "image_id_a": f"{pa_}/{ia:04d}",
            "image_id_b": f"{pb}/{ib:04d}",
            "label": lab,
        }
        for n, (pa_, ia, pb, ib, lab) in enumerate(rows)
    ]


def _pairs_table(rows: list[dict]) -> pa.Table:
    return pa.table(
        {
            "fold": pa.array([r["fold"] for r in rows], pa.int32()),
            "pair_index": pa.array([r["pair_index"] for r in rows], pa.int32()),
            "person_a": [r["person_a"] for r in rows],
            "index_a": pa.array([r["index_a"] for r in rows], pa.int32()),
            "person_b": [r["person_b"] for r in rows],
            "index_b": pa.array([r["index_b"] for r in rows], pa.int32()),
            "image_id_a": [r["image_id_a"] for r in rows],
            "image_id_b": [r["image_id_b"] for r in rows],
            "label": pa.array([r["label"] for r in rows], pa.int8()),
        }
    )


def write_fake_channel(root: Path, n_people: int = 30, per_person: int = 5, seed: int = 0) -> Path:
    """A dataset channel with train/val/test splits (60/20/20 % of people) and a 10-fold
    View 2 protocol (people-folds = people modulo 10) plus View 1 tables."""
    faces, labels, ids = make_faces(n_people, per_person, seed=seed)
    people = sorted(set(labels.tolist()))
    n_train, n_val = int(0.6 * n_people), int(0.2 * n_people)
    split_of = {
        p: "train" if k < n_train else "val" if k < n_train + n_val else "test"
        for k, p in enumerate(people)
    }
    (root / "faces").mkdir(parents=True, exist_ok=True)
    (root / "protocol").mkdir(parents=True, exist_ok=True)
    d = faces.shape[1] * faces.shape[2]
    table = pa.table(
        {
            "image_id": ids,
            "person": labels.tolist(),
            "image_index": pa.array([int(i.split("/")[1]) for i in ids], pa.int32()),
            "split": [split_of[p] for p in labels],
            "sha256": [f"{k:064x}" for k in range(len(ids))],
            "jpeg": pa.array([b"\xff\xd8fake" for _ in ids], pa.binary()),
            "face": pa.FixedSizeListArray.from_arrays(pa.array(faces.reshape(-1), pa.float32()), d),
        }
    )
    half = len(ids) // 2
    pq.write_table(table.slice(0, half), root / "faces" / "part-00000.parquet")
    pq.write_table(table.slice(half), root / "faces" / "part-00001.parquet")
    rng = np.random.default_rng(seed)
    fold_people = [[p for k, p in enumerate(people) if k % 10 == f] for f in range(10)]
    rows = []
    for f, ps in enumerate(fold_people):
        rows += _pairs_rows(ps, per_person, f, 4, rng)
    pq.write_table(_pairs_table(rows), root / "protocol" / "pairs_view2.parquet")
    pq.write_table(
        pa.table(
            {
                "fold": pa.array([f for f, ps in enumerate(fold_people) for _ in ps], pa.int32()),
                "person": [p for ps in fold_people for p in ps],
                "n_images": pa.array([per_person for ps in fold_people for _ in ps], pa.int32()),
            }
        ),
        root / "protocol" / "people_view2.parquet",
    )
    v1_train, v1_test = people[: n_people // 2], people[n_people // 2 :]
    for name, ps in (("train", v1_train), ("test", v1_test)):
        pq.write_table(
            _pairs_table(_pairs_rows(ps, per_person, 0, 10, rng)),
            root / "protocol" / f"pairs_view1_{name}.parquet",
        )
        pq.write_table(
            pa.table({"person": ps, "n_images": pa.array([per_person] * len(ps), pa.int32())}),
            root / "protocol" / f"people_view1_{name}.parquet",
        )
    (root / "manifest.json").write_text(
        json.dumps(
            {
                "version": "fake0123456789ab",
                "face_shape": list(SHAPE),
                "preprocessing": {"height": SHAPE[0], "width": SHAPE[1], "version": "1"},
                "counts": {"images": len(ids), "people": n_people},
                "seed": seed,
            }
        )
    )
    return root
