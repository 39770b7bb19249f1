"""Custom Keras layers of the Siamese model, registered so ``model.keras`` loads with
``keras.models.load_model(path, safe_mode=True)`` once this module is imported
(``import models.siamese`` does it)."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="facereid")
class FlipHorizontal(keras.layers.Layer):
    """Mirror NHWC images left-right (used for flip-averaged embeddings)."""

    def call(self, x):
        return ops.flip(x, axis=2)


@keras.saving.register_keras_serializable(package="facereid")
class CosFaceLogits(keras.layers.Layer):
    """CosFace head: ``s * (cos(theta_j) - m * [j == y])`` between the L2-normalised
    embedding and L2-normalised learned identity centres. Training only."""

    def __init__(self, n_classes: int, scale: float = 30.0, margin: float = 0.35, **kwargs):
        super().__init__(**kwargs)
        self.n_classes = int(n_classes)
        self.scale = float(scale)
        self.margin = float(margin)

    def build(self, input_shape):
        emb_shape = input_shape[0]
        self.centres = self.add_weight(
            name="centres",
            shape=(int(emb_shape[-1]), self.n_classes),
            initializer="glorot_uniform",
        )

    def call(self, inputs):
        emb, labels = inputs
        emb = emb / ops.maximum(ops.norm(emb, axis=1, keepdims=True), 1e-12)
        centres = self.centres / ops.maximum(ops.norm(self.centres, axis=0, keepdims=True), 1e-12)
        cos = ops.matmul(emb, centres)
        onehot = ops.one_hot(ops.cast(ops.reshape(labels, (-1,)), "int32"), self.n_classes)
        return self.scale * (cos - self.margin * onehot)

    def get_config(self):
        return {
            **super().get_config(),
            "n_classes": self.n_classes,
            "scale": self.scale,
            "margin": self.margin,
        }
