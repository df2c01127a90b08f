"""What the exact, task-batched versions of Keras layers (``models.keras_layers``,
``models.keras_sequences``) share: axes of ``[T, N, ...]`` tensors, activation and bias, and
the checks of configurations that change a layer's math."""

from __future__ import annotations

import tensorflow as tf


def task_axis(axis: int, rank: int) -> int:
    """An axis of the per-example tensor (batch axis 0, as Keras counts) -> the same axis
    of the task-batched tensor ``[T, N, ...]`` of rank ``rank``."""
    return axis + 1 if axis >= 0 else rank + axis


def channels_last(layer) -> str | None:
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return "data_format='channels_first' (use channels_last, the TensorFlow default)"
    return None


def activation(layer, x):
    fn = getattr(layer, "activation", None)
    return x if fn is None else fn(x)


def bias(ctx, layer, out):
    if not getattr(layer, "use_bias", False):
        return out
    b = tf.cast(ctx.weight(layer.bias), out.dtype)   # [T, C]; out is bfloat16 when mixed
    return out + tf.reshape(b, [-1] + [1] * (out.shape.rank - 2) + [b.shape[-1]])


def plain(layer) -> str | None:
    """Configurations of Dense / Conv layers that change their math: refused."""
    if getattr(layer, "lora_enabled", False):
        return "LoRA is enabled"
    if getattr(layer, "quantization_mode", None):
        return f"it is quantized ({layer.quantization_mode})"
    return None


def ok(layer) -> None:
    return None
