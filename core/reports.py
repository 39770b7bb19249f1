"""Small matplotlib plots rendered to PNG bytes (headless), for data and model reports."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    """Render and close a figure; returns the PNG file's bytes."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    finally:
        plt.close(fig)
    return buf.getvalue()


def images_per_person_histogram(counts: Sequence[int], title: str = "Images per person") -> bytes:
    """Log-scaled histogram: LFW is dominated by people with a single image."""
    values = np.asarray(counts, dtype=int)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.unique(
        np.concatenate([[1, 2, 3, 4, 5, 6, 8, 11, 16, 26, 51, 101], [values.max() + 1]])
    )
    ax.hist(values, bins=bins[bins <= values.max() + 1], color="#4c72b0", edgecolor="white")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("images of the person")
    ax.set_ylabel("people")
    ax.set_title(f"{title} ({len(values)} people, {int(values.sum())} images)")
    return png_bytes(fig)


def face_grid(faces: np.ndarray, titles: Sequence[str] = (), cols: int = 8) -> bytes:
    """A grid of grayscale faces (N, H, W) drawn as one tiled image (fast), titled if given."""
    n, h, w = faces.shape
    cols = max(1, min(cols, n))
    rows = max(1, -(-n // cols))
    px, py = 2, 12 if titles else 2  # row gap leaves room for the titles
    canvas = np.full((rows * (h + py), cols * (w + px) - px), np.nan, np.float32)
    for i, face in enumerate(faces):
        r, c = divmod(i, cols)
        top, left = r * (h + py) + py, c * (w + px)
        lo, hi = float(face.min()), float(face.max())
        canvas[top : top + h, left : left + w] = (face - lo) / max(hi - lo, 1e-6)
    fig, ax = plt.subplots(figsize=(cols * 1.1, rows * 1.5))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1)
    for i, title in enumerate(titles[:n]):
        r, c = divmod(i, cols)
        ax.text(c * (w + px) + w / 2, r * (h + py) + py - 2, title[:16], fontsize=6,
                ha="center", va="bottom")  # fmt: skip
    ax.axis("off")
    return png_bytes(fig)


def mean_face(mean: np.ndarray, title: str = "Mean face") -> bytes:
    fig, ax = plt.subplots(figsize=(2.2, 2.7))
    ax.imshow(mean, cmap="gray")
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    return png_bytes(fig)


def bar_counts(counts: Mapping[str, int], title: str, ylabel: str = "count") -> bytes:
    """Bars for a handful of named counts (e.g. images per split)."""
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar(list(counts), list(counts.values()), color="#55a868")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    return png_bytes(fig)
