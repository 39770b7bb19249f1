"""Build small fake LFW trees in scikit-learn's real ``data_home/lfw_home`` layout.

Faces are synthetic but identity-bearing: each person is a fixed random pattern of
blobs on an oval "face", and each image of that person adds small shifts and noise, so a
model can learn identities from them. Protocol files follow the official text formats.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


@dataclass
class FakeLFW:
    data_home: Path
    lfw_home: Path
    people: dict[str, int]  # person -> number of images

    @property
    def n_images(self) -> int:
        return sum(self.people.values())

    def image_path(self, person: str, index: int) -> Path:
        return self.lfw_home / "lfw_funneled" / person / f"{person}_{index:04d}.jpg"


def person_name(i: int) -> str:
    return f"Person_{chr(65 + i // 26 % 26)}{chr(65 + i % 26)}"


def fake_face_jpeg(person_seed: int, image_seed: int, size: int = 250) -> bytes:
    """A 250x250 RGB JPEG with a person-specific pattern inside the LFW crop area."""
    prng = np.random.default_rng(person_seed)
    irng = np.random.default_rng(person_seed * 1000 + image_seed)
    img = Image.new("RGB", (size, size), tuple(int(v) for v in irng.integers(0, 60, 3)))
    draw = ImageDraw.Draw(img)
    dx, dy = (int(v) for v in irng.integers(-4, 5, 2))
    skin = tuple(int(v) for v in prng.integers(120, 230, 3))
    draw.ellipse((80 + dx, 55 + dy, 170 + dx, 200 + dy), fill=skin)
    for _ in range(8):  # identity: blob positions, sizes and shades
        x, y = prng.integers(85, 160), prng.integers(65, 185)
        r = int(prng.integers(4, 12))
        shade = tuple(int(v) for v in prng.integers(0, 255, 3))
        draw.ellipse((x + dx - r, y + dy - r, x + dx + r, y + dy + r), fill=shade)
    arr = np.asarray(img).astype(np.int16)
    arr += irng.normal(0, 6, arr.shape).astype(np.int16)
    arr = np.clip(arr, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def build_fake_lfw(
    root: Path,
    n_people: int = 40,
    max_images: int = 5,
    pairs_per_fold: int = 3,
    seed: int = 0,
    junk_file: bool = True,
    skip_protocol: tuple[str, ...] = (),
) -> FakeLFW:
    """Write a fake tree under ``root/lfw_home``; return what was written.

    Every person has 1..max_images images (at least half have >= 2). People are dealt
    round-robin into 10 View 2 folds; View 1 train/test split people 70/30. ``junk_file``
    drops a non-image file into the images folder as real-world clutter.
    """
    rng = np.random.default_rng(seed)
    lfw_home = root / "lfw_home"
    images_dir = lfw_home / "lfw_funneled"
    people: dict[str, int] = {}
    for i in range(n_people):
        name = person_name(i)
        n = (
            int(rng.integers(2, max_images + 1))
            if i % 2 == 0
            else int(rng.integers(1, max_images + 1))
        )
        people[name] = n
        (images_dir / name).mkdir(parents=True, exist_ok=True)
        for k in range(1, n + 1):
            (images_dir / name / f"{name}_{k:04d}.jpg").write_bytes(
                fake_face_jpeg(seed * 7919 + i, k)
            )
    if junk_file:
        (images_dir / ".DS_Store").write_bytes(b"\x00\x01junk")
        (images_dir / "README.txt").write_text("not an image folder entry\n")

    names = sorted(people)
    folds = [names[k::10] for k in range(10)]

    def matched(pool: list[str], count: int, r: np.random.Generator) -> list[str]:
        multi = [p for p in pool if people[p] >= 2]
        out = []
        for _ in range(count):
            p = multi[int(r.integers(len(multi)))]
            a, b = sorted(r.choice(np.arange(1, people[p] + 1), 2, replace=False).tolist())
            out.append(f"{p}\t{a}\t{b}")
        return out

    def mismatched(pool: list[str], count: int, r: np.random.Generator) -> list[str]:
        out = []
        for _ in range(count):
            p, q = r.choice(pool, 2, replace=False).tolist()
            i, j = int(r.integers(1, people[p] + 1)), int(r.integers(1, people[q] + 1))
            out.append(f"{p}\t{i}\t{q}\t{j}")
        return out

    files: dict[str, str] = {}
    lines = [f"10\t{pairs_per_fold}"]
    for fold in folds:
        lines += matched(fold, pairs_per_fold, rng) + mismatched(fold, pairs_per_fold, rng)
    files["pairs.txt"] = "\n".join(lines) + "\n"
    lines = ["10"]
    for fold in folds:
        lines.append(str(len(fold)))
        lines += [f"{p}\t{people[p]}" for p in fold]
    files["people.txt"] = "\n".join(lines) + "\n"
    cut = int(len(names) * 0.7)
    dev = {"Train": names[:cut], "Test": names[cut:]}
    for part, pool in dev.items():
        n_pairs = max(2, pairs_per_fold * 2)
        files[f"pairsDev{part}.txt"] = (
            "\n".join([str(n_pairs)] + matched(pool, n_pairs, rng) + mismatched(pool, n_pairs, rng))
            + "\n"
        )
        files[f"peopleDev{part}.txt"] = (
            "\n".join([str(len(pool))] + [f"{p}\t{people[p]}" for p in pool]) + "\n"
        )
    files["lfw-names.txt"] = "\n".join(f"{p}\t{people[p]}" for p in names) + "\n"
    for name, text in files.items():
        if name not in skip_protocol:
            (lfw_home / name).write_text(text)
    return FakeLFW(root, lfw_home, people)
