"""Exact, task-batched versions of Keras' sequence layers: ``Conv1D``, 1-D pooling,
``SpatialDropout1D``, ``Embedding``, ``LSTM`` and ``GRU`` (``models.keras_layers`` holds the
contract: ``fn(layer, ctx, *inputs)`` on ``[T, N, ...]`` inputs, ``ctx.weight(v)`` the task's
value of variable ``v``).

1-D convolutions and pools run as their 2-D forms on a height of 1. The recurrent layers run
their cell's equations (Keras' gate order and activations) for all tasks at once, one time
step after the other, with each task's kernels (``[T, D, G*U]``): a loop over the static
sequence length, whose every derivative is that of matmuls and activations.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from maml_tf.models import layers as L
from maml_tf.models.keras_common import activation, bias, channels_last, ok, plain


def _as_2d(x):
    """``[T, N, L, C]`` -> ``[T, N, 1, L, C]``."""
    return tf.expand_dims(x, 2)


def _conv1d_check(layer):
    if getattr(layer, "groups", 1) != 1:
        return f"groups={layer.groups} (grouped convolution)"
    return channels_last(layer) or plain(layer)


def _conv1d(layer, ctx, x, **_):
    kernel = ctx.weight(layer.kernel)                       # [T, k, Cin, Cout]
    (k,), (d,) = layer.kernel_size, layer.dilation_rate
    padding = layer.padding
    if padding == "causal":   # left-padded so that output t sees inputs up to t only
        x = tf.pad(x, [[0, 0], [0, 0], [(k - 1) * d, 0], [0, 0]])
        padding = "valid"
    out = L.conv2d(_as_2d(x), tf.expand_dims(kernel, 1), (1, layer.strides[0]), padding,
                   (1, d))[:, :, 0]
    return activation(layer, bias(ctx, layer, out))


def _pool1d(kind):
    def fn(layer, ctx, x, **_):
        return L.pool2d(_as_2d(x), (1, layer.pool_size[0]), (1, layer.strides[0]),
                        layer.padding, kind)[:, :, 0]
    return fn


def _global_pool1d(reduce):
    def fn(layer, ctx, x, mask=None, **_):
        return reduce(x, axis=2, keepdims=bool(getattr(layer, "keepdims", False)))
    return fn


def _spatial_dropout(layer, ctx, x, **_):
    """One mask per example and channel, shared along the sequence (or the image)."""
    if not ctx.training or layer.rate == 0:
        return x
    shape = tf.concat([tf.shape(x)[:2], tf.ones([x.shape.rank - 3], tf.int32),
                       tf.shape(x)[-1:]], 0)
    return tf.nn.dropout(x, rate=layer.rate, noise_shape=shape)


def _embedding_check(layer):
    if layer.mask_zero:
        return "mask_zero=True (masks are not carried through the task-batched network)"
    return plain(layer)


def _embedding(layer, ctx, x, **_):
    table = ctx.weight(layer.embeddings)                    # [T or 1, V, D]
    ids = tf.cast(x, tf.int32)                              # [T, N, ...]
    table = tf.broadcast_to(table, tf.concat([tf.shape(ids)[:1], tf.shape(table)[1:]], 0))
    return tf.gather(table, ids, batch_dims=1)


def _rnn_check(layer):
    cell = layer.cell
    for name, why in (("return_state", "return_state=True"), ("stateful", "stateful=True")):
        if getattr(layer, name, False):
            return why
    if cell.dropout or cell.recurrent_dropout:
        return "dropout or recurrent_dropout is set"
    return None


def _steps(layer, x):
    """The time steps of ``x [T, N, L, D]`` in the order the layer reads them."""
    steps = tf.unstack(x, axis=2)
    return steps[::-1] if layer.go_backwards else steps


def _sequence(layer, outputs):
    return tf.stack(outputs, axis=2) if layer.return_sequences else outputs[-1]


def _lstm(layer, ctx, x, mask=None, **_):
    cell, units = layer.cell, layer.cell.units
    kernel, recurrent = ctx.weight(cell.kernel), ctx.weight(cell.recurrent_kernel)
    b = ctx.weight(cell.bias)[:, None] if cell.use_bias else 0.0      # [T, 1, 4U]
    h = c = tf.zeros(tf.stack([tf.shape(x)[0], tf.shape(x)[1], units]), x.dtype)
    outputs = []
    for x_t in _steps(layer, x):
        z = tf.matmul(x_t, kernel) + tf.matmul(h, recurrent) + b     # [T, N, 4U]
        i, f, g, o = tf.split(z, 4, axis=-1)
        c = (cell.recurrent_activation(f) * c +
             cell.recurrent_activation(i) * cell.activation(g))
        h = cell.recurrent_activation(o) * cell.activation(c)
        outputs.append(h)
    return _sequence(layer, outputs)


def _gru(layer, ctx, x, mask=None, **_):
    cell, units = layer.cell, layer.cell.units
    kernel, recurrent = ctx.weight(cell.kernel), ctx.weight(cell.recurrent_kernel)
    input_bias = recurrent_bias = 0.0
    if cell.use_bias:
        b = ctx.weight(cell.bias)                                     # [T, 3U] or [T, 2, 3U]
        if cell.reset_after:
            input_bias, recurrent_bias = b[:, 0][:, None], b[:, 1][:, None]
        else:
            input_bias = b[:, None]
    h = tf.zeros(tf.stack([tf.shape(x)[0], tf.shape(x)[1], units]), x.dtype)
    outputs = []
    for x_t in _steps(layer, x):
        x_z, x_r, x_h = tf.split(tf.matmul(x_t, kernel) + input_bias, 3, axis=-1)
        if cell.reset_after:
            r_z, r_r, r_h = tf.split(tf.matmul(h, recurrent) + recurrent_bias, 3, axis=-1)
            z = cell.recurrent_activation(x_z + r_z)
            r = cell.recurrent_activation(x_r + r_r)
            hh = cell.activation(x_h + r * r_h)
        else:
            r_z, r_r = tf.split(tf.matmul(h, recurrent[:, :, :2 * units]), 2, axis=-1)
            z = cell.recurrent_activation(x_z + r_z)
            r = cell.recurrent_activation(x_r + r_r)
            hh = cell.activation(x_h + tf.matmul(r * h, recurrent[:, :, 2 * units:]))
        h = z * h + (1 - z) * hh
        outputs.append(h)
    return _sequence(layer, outputs)


def table() -> dict:
    """Layer class -> ``(check, fn)``, as ``models.keras_layers.SUPPORTED``."""
    layers = keras.layers
    return {
        layers.Conv1D: (_conv1d_check, _conv1d),
        layers.MaxPooling1D: (channels_last, _pool1d("max")),
        layers.AveragePooling1D: (channels_last, _pool1d("avg")),
        layers.GlobalAveragePooling1D: (channels_last, _global_pool1d(tf.reduce_mean)),
        layers.GlobalMaxPooling1D: (channels_last, _global_pool1d(tf.reduce_max)),
        layers.SpatialDropout1D: (ok, _spatial_dropout),
        layers.SpatialDropout2D: (channels_last, _spatial_dropout),
        layers.Embedding: (_embedding_check, _embedding),
        layers.LSTM: (_rnn_check, _lstm),
        layers.GRU: (_rnn_check, _gru),
    }
