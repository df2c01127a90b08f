"""ResNet-12, the backbone of MetaOptNet, R2-D2 and most recent few-shot work, written with
standard ``keras.layers`` only (maml_tf runs them exactly and task-batched, see
``models.keras_layers``).

Four residual blocks of 64-160-320-640 filters. Each block: three 3x3 conv -> batch norm
(-> leaky ReLU 0.1, except after the third), plus a 1x1 conv -> batch norm shortcut, added,
leaky ReLU, then 2x2 max-pool. Then global average pooling and a ``Dense(outputs)`` head.
Convolutions followed by batch norm have no bias (the normalisation cancels it). As in
MetaOptNet without DropBlock, and with global average pooling (84x84 inputs give 5x5x640
before pooling, a 640-d embedding).
"""

from __future__ import annotations

from typing import Sequence

import keras
from keras import layers


def resnet12(image_shape: Sequence[int], outputs: int,
             filters: Sequence[int] = (64, 160, 320, 640), negative_slope: float = 0.1,
             dtype: str = "float32") -> keras.Model:
    """Input ``[N, H, W, C]`` -> logits ``[N, outputs]``."""
    inputs = keras.Input(tuple(image_shape), dtype=dtype)
    x = inputs
    for i, f in enumerate(filters):
        name = f"block{i}"
        shortcut = layers.Conv2D(f, 1, use_bias=False, dtype=dtype, name=f"{name}_shortcut")(x)
        shortcut = layers.BatchNormalization(dtype=dtype, name=f"{name}_shortcut_bn")(shortcut)
        h = x
        for j in range(3):
            h = layers.Conv2D(f, 3, padding="same", use_bias=False, dtype=dtype,
                              name=f"{name}_conv{j}")(h)
            h = layers.BatchNormalization(dtype=dtype, name=f"{name}_bn{j}")(h)
            if j < 2:
                h = layers.LeakyReLU(negative_slope, dtype=dtype, name=f"{name}_relu{j}")(h)
        h = layers.Add(dtype=dtype, name=f"{name}_add")([h, shortcut])
        h = layers.LeakyReLU(negative_slope, dtype=dtype, name=f"{name}_out")(h)
        x = layers.MaxPooling2D(2, dtype=dtype, name=f"{name}_pool")(h)
    x = layers.GlobalAveragePooling2D(dtype=dtype, name="gap")(x)
    return keras.Model(inputs, layers.Dense(outputs, dtype=dtype, name="head")(x),
                       name="resnet12")
