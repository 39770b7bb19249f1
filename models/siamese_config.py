"""The Siamese net's hyperparameters, importable without TensorFlow (the retrain flow
reads the entry point's flags from them before any training starts)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class SiameseConfig:
    """Hyperparameters (recorded in model.json)."""

    epochs: int = 30
    max_train_seconds: float | None = None  # stop cleanly (LR annealed) within this budget
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 5e-4
    filters: tuple[int, ...] = (32, 64, 128, 256)
    embedding_dim: int = 128
    dropout: float = 0.2
    margin: float = 0.35  # CosFace additive cosine margin
    scale: float = 30.0  # CosFace logit scale
    min_images_per_identity: int = 2
    shift: float = 0.06  # max random shift, fraction of the side
    zoom: float = 0.1  # max random zoom-in, fraction of the side
    contrast: float = 0.2
    brightness: float = 0.2
    seed: int = 0
    # train in bfloat16 (variables stay float32): ~2x the steps per second on CPUs with
    # avx512_bf16 / AMX; the saved model is rebuilt in float32 either way
    mixed_precision: bool = False
    face_shape: tuple[int, int] = (68, 56)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["filters"] = list(self.filters)
        d["face_shape"] = list(self.face_shape)
        return d
