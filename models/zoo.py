"""The paper's networks, built from the task-batched layers of ``models.layers``.

* ``mlp``: sinusoid regression, 40-40 ReLU (Finn et al. 2017, section 5.1), or the
  non-convolutional Omniglot baseline 256-128-64-64 with batch norm.
* ``conv4``: four blocks of 3x3 conv -> exact batch norm -> ReLU, then a ``Dense(way)``
  head.

A layer followed by batch norm has no bias: the normalisation cancels it exactly, so its
true gradient is zero and Adam would only turn rounding noise into weight updates.
Omniglot: 64 filters, stride-2 convolutions, global average pool (as cbfinn/maml).
mini-ImageNet: 32 filters, 2x2 max-pool, flatten.
"""

from __future__ import annotations

from typing import Sequence

import keras

from maml_tf.models import layers as L


def mlp(input_dim: int, hidden: Sequence[int], outputs: int, batch_norm: bool = False,
        dtype: str = "float32", kernel_initializer="glorot_uniform") -> keras.Sequential:
    """Input ``[N, input_dim]`` -> ``[N, outputs]``."""
    stack: list = []
    init = kernel_initializer
    for i, units in enumerate(hidden):
        stack.append(L.Dense(units, kernel_initializer=init, use_bias=not batch_norm,
                             dtype=dtype, name=f"dense{i}"))
        if batch_norm:
            stack.append(L.BatchNorm(dtype=dtype, name=f"bn{i}"))
        stack.append(L.ReLU(dtype=dtype, name=f"relu{i}"))
    stack.append(L.Dense(outputs, kernel_initializer=init, dtype=dtype, name="head"))
    model = keras.Sequential([keras.Input((input_dim,), dtype=dtype)] + stack, name="mlp")
    return model


NORMS = {"batch": L.BatchNorm, "layer": L.LayerNorm}


def conv4(image_shape: Sequence[int], outputs: int, filters: int = 64, pool: str = "stride",
          blocks: int = 4, dtype: str = "float32", norm: str = "batch") -> keras.Sequential:
    """Input ``[N, H, W, C]`` -> logits ``[N, outputs]``.

    pool: ``"stride"`` (stride-2 convs, global average pool; Omniglot) or
    ``"max"`` (stride-1 convs, 2x2 max-pool, flatten; mini-ImageNet).
    norm: ``"batch"`` (per-task batch statistics, transductive, as the paper),
    ``"layer"`` (per-example, non-transductive) or ``"none"``.
    """
    if pool not in ("stride", "max"):
        raise ValueError(f"conv4 pool must be 'stride' or 'max', got {pool!r}.")
    stack: list = []
    for i in range(blocks):
        stride = 2 if pool == "stride" else 1
        stack.append(L.Conv2D(filters, 3, stride, use_bias=norm == "none", dtype=dtype,
                              name=f"conv{i}"))
        if norm != "none":
            stack.append(NORMS[norm](dtype=dtype, name=f"{norm}norm{i}"))
        stack.append(L.ReLU(dtype=dtype, name=f"relu{i}"))
        if pool == "max":
            stack.append(L.MaxPool2x2(dtype=dtype, name=f"pool{i}"))
    stack.append(L.GlobalAvgPool(dtype=dtype, name="gap") if pool == "stride"
                 else L.Flatten(dtype=dtype, name="flatten"))
    stack.append(L.Dense(outputs, dtype=dtype, name="head"))
    return keras.Sequential([keras.Input(tuple(image_shape), dtype=dtype)] + stack, name="conv4")
