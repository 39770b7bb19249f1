"""Siamese face embedder (Keras 3): one shared CNN tower, cosine score, flip-averaged.

Objective — **CosFace** (additive cosine margin softmax, Wang et al. 2018) over the training
identities with >= 2 images, not contrastive or triplet loss. Why: a margin softmax
compares every embedding with a learned centre of *every* training identity at every step,
so each batch carries far more signal than the few pairs or hardest triplets a batch of
~128 faces contains; it needs no pair/triplet mining, converges steadily on 2 CPU cores and
optimises exactly the score used at test time (cosine between L2-normalised embeddings).
The "Siamese" part is the deployment: the same tower embeds both faces of a pair and their
cosine is thresholded. A probe with this recipe reached 85.5 % on View 2 fold 0 after 13
epochs while a batch-hard triplet loss needs far larger identity-balanced batches.

The training tower sees augmented faces (flip, random shift + zoom crop, contrast and
brightness) produced by tf ops in the input pipeline; the saved inference model embeds a
face and its mirror image and returns the L2-normalised mean (flip averaging), so
``model.keras`` and the SavedModel both output final embeddings.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np

from models.siamese_config import SiameseConfig
from models.siamese_layers import CosFaceLogits, FlipHorizontal

KERAS_FILE = "model.keras"
SAVEDMODEL_DIR = "savedmodel/1"
# auto: bfloat16 where it is native. core.settings.PRECISIONS mirrors this (models/ imports
# nothing from core/; a test keeps the two equal)
PRECISIONS = ("auto", "float32", "bfloat16")


def build_tower(config: SiameseConfig, dtype: str | None = None):
    """(H, W, 1) face -> un-normalised embedding: conv blocks with BN, flatten, dense.

    ``dtype``: the layers' dtype policy (e.g. ``"mixed_bfloat16"``); None = float32."""
    layers = keras.layers
    kw: dict[str, Any] = {"dtype": dtype} if dtype else {}
    reg = keras.regularizers.L2(config.weight_decay) if config.weight_decay else None
    inp = keras.Input((*config.face_shape, 1), name="face")
    x = inp
    for i, f in enumerate(config.filters):
        for j in range(2):
            x = layers.Conv2D(
                f,
                3,
                padding="same",
                use_bias=False,
                kernel_regularizer=reg,
                name=f"conv{i}_{j}",
                **kw,
            )(x)
            x = layers.BatchNormalization(name=f"bn{i}_{j}", **kw)(x)
            x = layers.ReLU(name=f"relu{i}_{j}", **kw)(x)
        x = layers.MaxPooling2D(2, name=f"pool{i}", **kw)(x)
    x = layers.Flatten(name="flatten", **kw)(x)
    x = layers.Dropout(config.dropout, name="dropout", **kw)(x)
    x = layers.Dense(
        config.embedding_dim,
        use_bias=False,
        kernel_regularizer=reg,
        name="embedding_dense",
        **kw,
    )(x)
    x = layers.BatchNormalization(name="embedding_bn", **kw)(x)
    return keras.Model(inp, x, name="tower")


def build_inference_model(tower, face_shape: tuple[int, int] = (68, 56)):
    """(N, H, W) faces -> L2-normalised mean of the embeddings of the face and its mirror."""
    inp = keras.Input(face_shape, name="faces")
    x = keras.layers.Reshape((*face_shape, 1), name="add_channel")(inp)
    flipped = FlipHorizontal(name="flip")(x)
    emb = keras.layers.Average(name="flip_average")([tower(x), tower(flipped)])
    out = keras.layers.UnitNormalization(axis=-1, name="l2_normalise")(emb)
    return keras.Model(inp, out, name="siamese_embedder")


# ---------------------------------------------------------------- training


def _augment_fn(config: SiameseConfig):
    import tensorflow as tf

    h, w = config.face_shape

    def augment(images, labels, seed):
        # stateless draws keyed by a per-batch seed: a parallel map cannot reorder them
        flip_s, size_s, dy_s, dx_s, contrast_s, bright_s = tf.unstack(
            tf.random.experimental.stateless_split(seed, num=6)
        )

        def uniform(shape, s, low, high):
            return tf.random.stateless_uniform(shape, s, low, high)

        n = tf.shape(images)[0]
        images = tf.where(
            uniform((n, 1, 1, 1), flip_s, 0.0, 1.0) < 0.5, tf.reverse(images, axis=[2]), images
        )
        # random zoom-in and shift as one crop-and-resize (box in normalised coordinates)
        size = 1.0 - uniform((n, 1), size_s, 0.0, config.zoom)
        dy = uniform((n, 1), dy_s, -config.shift, config.shift) + (1.0 - size) / 2
        dx = uniform((n, 1), dx_s, -config.shift, config.shift) + (1.0 - size) / 2
        boxes = tf.concat([dy, dx, dy + size, dx + size], axis=1)
        images = tf.image.crop_and_resize(
            images, boxes, tf.range(n), (h, w), extrapolation_value=0.0
        )
        contrast = uniform((n, 1, 1, 1), contrast_s, 1 - config.contrast, 1 + config.contrast)
        bright = uniform((n, 1, 1, 1), bright_s, -config.brightness, config.brightness)
        return images * contrast + bright, labels

    return augment


class _BudgetSchedule:
    """Cosine LR over progress = max(step share, time share); stops training at progress 1."""

    def __init__(self, total_steps: int, max_seconds: float | None, base_lr: float):
        self.total_steps, self.max_seconds, self.base_lr = total_steps, max_seconds, base_lr
        self.start = time.time()

    def progress(self, step: int) -> float:
        p = step / max(self.total_steps, 1)
        if self.max_seconds:
            p = max(p, (time.time() - self.start) / self.max_seconds)
        return min(p, 1.0)

    def lr(self, step: int) -> float:
        return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * self.progress(step)))


def _budget_callback(schedule: _BudgetSchedule, optimizer, log: Callable[[str], None]):

    class Budget(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.step = 0
            self.epoch_start = time.time()

        def on_train_batch_begin(self, batch, logs=None):
            optimizer.learning_rate.assign(schedule.lr(self.step))

        def on_train_batch_end(self, batch, logs=None):
            self.step += 1
            if schedule.progress(self.step) >= 1.0:
                self.model.stop_training = True

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch_start = time.time()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            log(
                f"epoch {epoch + 1}: loss {logs.get('loss', float('nan')):.4f} "
                f"acc {logs.get('accuracy', float('nan')):.4f} "
                f"lr {float(optimizer.learning_rate.numpy()):.2e} "
                f"{time.time() - self.epoch_start:.0f}s "
                f"(total {time.time() - schedule.start:.0f}s)"
            )

    return Budget()


def train_siamese(
    faces: np.ndarray,
    labels: np.ndarray,
    config: SiameseConfig | None = None,
    log: Callable[[str], None] = print,
) -> SiameseEmbedder:
    """Train the tower with a CosFace head on identities with enough images."""
    import tensorflow as tf

    config = config or SiameseConfig()
    keras.utils.set_random_seed(config.seed)
    faces = np.asarray(faces, dtype=np.float32)
    if faces.ndim == 4:
        faces = faces[..., 0]
    names, inverse, counts = np.unique(
        np.asarray(labels).astype(str), return_inverse=True, return_counts=True
    )
    keep = counts[inverse] >= config.min_images_per_identity
    if keep.sum() < 2:
        raise ValueError(
            f"need identities with >= {config.min_images_per_identity} images; found none"
        )
    _, y = np.unique(inverse[keep], return_inverse=True)
    x = faces[keep][..., None]
    n_classes = int(y.max()) + 1
    log(
        f"siamese: {len(x)} images of {n_classes} identities (>= "
        f"{config.min_images_per_identity} images each), {config.to_dict()}"
    )
    steps_per_epoch = max(1, math.ceil(len(x) / config.batch_size))
    batches = (
        tf.data.Dataset.from_tensor_slices((x, y.astype(np.int32)))
        .shuffle(len(x), seed=config.seed, reshuffle_each_iteration=True)
        .batch(config.batch_size)
    )
    # one augmentation seed per batch, a new stream every epoch, the same for the same seed
    batch_seeds = tf.data.Dataset.random(seed=config.seed, rerandomize_each_iteration=True)
    augment = _augment_fn(config)
    ds = (
        tf.data.Dataset.zip(batches, batch_seeds.batch(2))
        .map(lambda batch, seed: augment(*batch, seed), num_parallel_calls=tf.data.AUTOTUNE)
        .map(lambda a, b: ((a, b), b))
        .prefetch(tf.data.AUTOTUNE)
    )
    tower = build_tower(config, "mixed_bfloat16" if config.mixed_precision else None)
    img_in = keras.Input((*config.face_shape, 1), name="face")
    label_in = keras.Input((), dtype="int32", name="label")
    logits = CosFaceLogits(n_classes, config.scale, config.margin, name="cosface", dtype="float32")(
        [tower(img_in), label_in]
    )
    trainer = keras.Model([img_in, label_in], logits)
    optimizer = keras.optimizers.Adam(config.learning_rate)
    trainer.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    schedule = _BudgetSchedule(
        steps_per_epoch * config.epochs, config.max_train_seconds, config.learning_rate
    )
    t0 = time.time()
    history = trainer.fit(
        ds,
        epochs=config.epochs,
        verbose=0,
        shuffle=False,  # the dataset reshuffles itself every epoch
        callbacks=[_budget_callback(schedule, optimizer, log)],
    )
    epochs_done = len(history.history.get("loss", []))
    log(f"siamese: trained {epochs_done} epochs in {time.time() - t0:.0f}s")
    if config.mixed_precision:  # same weights (kept in float32), float32 compute to serve
        serving_tower = build_tower(config)
        serving_tower.set_weights(tower.get_weights())
        tower = serving_tower
    model = SiameseEmbedder(build_inference_model(tower, config.face_shape), config)
    model.epochs_trained_ = epochs_done
    model.train_seconds_ = time.time() - t0
    return model


# ---------------------------------------------------------------- inference + persistence


def bfloat16_supported() -> bool:
    """True when this machine computes bfloat16 natively (a GPU, or x86 with AVX512-BF16 /
    AMX and TensorFlow's oneDNN kernels on); elsewhere TensorFlow emulates it and bfloat16
    inference is slower, not faster."""
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return True
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "0":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def with_bfloat16_body(model):
    """A copy of the inference model whose convolutional body computes in bfloat16.

    The weights stay float32 (``mixed_bfloat16`` policy); the embedding head (dense + BN),
    the flip average and the L2 normalisation stay float32, so the embeddings differ from
    the float32 model's only by the rounding of the conv activations (cosine >= 0.99993 on
    a trained View 2 fold model). 1.5x faster on a CPU with AVX512-BF16."""
    body_types = (
        keras.layers.Conv2D,
        keras.layers.BatchNormalization,
        keras.layers.ReLU,
        keras.layers.MaxPooling2D,
        keras.layers.Flatten,
        keras.layers.Dropout,
    )

    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, body_types) and not layer.name.startswith("embedding"):
            config["dtype"] = "mixed_bfloat16"
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    copy.set_weights(model.get_weights())
    return copy


class SiameseEmbedder:
    """Flip-averaged, L2-normalised embeddings from a saved or freshly trained tower.

    ``precision="bfloat16"`` serves through :func:`with_bfloat16_body`; ``"auto"`` does so
    only where bfloat16 is native (measured speed and accuracy in the README)."""

    def __init__(self, model, config: SiameseConfig | None = None, precision: str = "float32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        native = precision != "float32" and bfloat16_supported()
        if precision == "auto":
            precision = "bfloat16" if native else "float32"
        elif precision == "bfloat16" and not native:
            warnings.warn(
                "bfloat16 inference on a CPU without AVX512-BF16/AMX is emulated and slow",
                RuntimeWarning,
                stacklevel=2,
            )
        self.precision = precision
        self.model = model  # float32: what save() writes
        self.serving_model = with_bfloat16_body(model) if precision == "bfloat16" else model
        self.config = config or SiameseConfig()
        self.epochs_trained_: int | None = None
        self.train_seconds_: float | None = None
        self._forward: Any = None

    def _compiled_forward(self) -> Any:
        """The inference model as one traced graph (fixed signature: traced once).

        ~15 % faster than calling the Keras model eagerly per batch on CPU."""
        if self._forward is None:
            import tensorflow as tf

            h, w = self.model.input_shape[1:3]
            model = self.serving_model
            self._forward = tf.function(
                lambda faces: model(faces, training=False),
                input_signature=[tf.TensorSpec((None, h, w), tf.float32)],
            )
        return self._forward

    @property
    def embedding_dim(self) -> int:
        return int(self.model.output_shape[-1])

    def embed(self, faces: np.ndarray, batch_size: int = 256) -> np.ndarray:
        faces = np.asarray(faces, dtype=np.float32)
        if faces.ndim == 4 and faces.shape[-1] == 1:
            faces = faces[..., 0]
        if faces.ndim == 2:
            faces = faces[None]
        if faces.ndim != 3:
            raise ValueError(f"expected faces (N, H, W), got {faces.shape}")
        forward = self._compiled_forward()
        out = [
            np.asarray(forward(faces[i : i + batch_size])) for i in range(0, len(faces), batch_size)
        ]
        if not out:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        return np.concatenate(out).astype(np.float32)

    def save(self, model_dir: str | Path, export_savedmodel: bool = True) -> Path:
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        path = model_dir / KERAS_FILE
        self.model.save(path)
        if export_savedmodel:
            export_savedmodel_for_serving(self.model, model_dir / SAVEDMODEL_DIR)
        return path

    @classmethod
    def load(cls, model_dir: str | Path, precision: str = "float32") -> SiameseEmbedder:
        path = Path(model_dir)
        if path.is_dir():
            path = path / KERAS_FILE
        return cls(keras.models.load_model(path, safe_mode=True), precision=precision)


def export_savedmodel_for_serving(model, export_dir: str | Path) -> Path:
    """TF Serving SavedModel: ``serving_default`` takes float32 (None, H, W); ``serve_nhwc``
    takes (None, H, W, 1); both return L2-normalised flip-averaged embeddings."""
    import tensorflow as tf

    h, w = model.input_shape[1:3]
    archive = keras.export.ExportArchive()
    archive.track(model)

    def serve(faces):
        return {"embeddings": model(faces, training=False)}

    def serve_nhwc(faces):
        return {"embeddings": model(tf.squeeze(faces, axis=-1), training=False)}

    archive.add_endpoint(
        "serving_default",
        serve,
        input_signature=[tf.TensorSpec((None, h, w), tf.float32, name="faces")],
    )
    archive.add_endpoint(
        "serve_nhwc",
        serve_nhwc,
        input_signature=[tf.TensorSpec((None, h, w, 1), tf.float32, name="faces")],
    )
    export_dir = Path(export_dir)
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    archive.write_out(str(export_dir), verbose=False)
    return export_dir
