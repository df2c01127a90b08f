"""Keras layers whose math is written once, for a leading *task* axis.

Every layer here implements ``batched_apply(params, x, training)``:

* ``params``: the layer's trainable weights, each with a leading task axis ``T``
  (``[T, *variable.shape]``), in the order of ``layer.trainable_variables``;
* ``x``: ``[T, N, ...]``: N examples for each of T tasks.

The meta-learner runs the inner loop of T tasks at once through this method (one
batched matmul per layer instead of T small ones). The ordinary Keras ``call`` is the
same function with ``T = 1`` and the layer's own variables, so a model built from these
layers is also a normal ``keras.Model``.

Two traps are avoided on purpose:

* ``BatchNorm`` computes the variance with the mean *inside* the gradient. Keras'
  ``BatchNormalization`` (and ``tf.nn.moments``) put the mean under ``stop_gradient``:
  the first derivative is unchanged but second-order meta-gradients are wrong.
* ``MaxPool2x2`` is a reshape + ``reduce_max``: XLA's second derivative of the
  ``MaxPool`` op is wrong in float32.
"""

from __future__ import annotations

import tensorflow as tf
import keras


class TaskBatchedLayer(keras.layers.Layer):
    """Base class: ``call`` is ``batched_apply`` on one task."""

    def batched_apply(self, params, x, training=True):
        raise NotImplementedError

    def call(self, x, training=None):
        # `w.value` is the stateless-scope value when run under `stateless_call`.
        params = [tf.expand_dims(w.value, 0) for w in self.trainable_weights]
        return self.batched_apply(params, tf.expand_dims(x, 0), training)[0]


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """TF 'SAME' padding: returns (out_size, pad_before, pad_after)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, total // 2, total - total // 2


class Conv2D(TaskBatchedLayer):
    """3x3 (or k x k) convolution, 'SAME' padding, as im2col + one batched matmul.

    Shapes: x ``[T, N, H, W, Cin]`` -> ``[T, N, ceil(H/s), ceil(W/s), Cout]``.
    Written with pads, strided slices and ``matmul`` only, whose derivatives of every
    order are exact and fuse well under XLA.
    """

    def __init__(self, filters: int, kernel_size: int = 3, strides: int = 1,
                 use_bias: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.kernel_size, self.strides = filters, kernel_size, strides
        self.use_bias = use_bias

    def build(self, input_shape):
        cin = int(input_shape[-1])
        k = self.kernel_size
        # Glorot-uniform, as cbfinn/maml's xavier_initializer_conv2d.
        self.kernel = self.add_weight(name="kernel", shape=(k, k, cin, self.filters),
                                      initializer="glorot_uniform")
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros")

    def batched_apply(self, params, x, training=True):
        kernel = params[0]
        t = tf.shape(x)[0]
        n = tf.shape(x)[1]
        h, w, cin = x.shape[2], x.shape[3], x.shape[4]
        k, s = self.kernel_size, self.strides
        ho, top, bottom = _same_padding(h, k, s)
        wo, left, right = _same_padding(w, k, s)
        xp = tf.pad(x, [[0, 0], [0, 0], [top, bottom], [left, right], [0, 0]])
        patches = [xp[:, :, i:i + (ho - 1) * s + 1:s, j:j + (wo - 1) * s + 1:s, :]
                   for i in range(k) for j in range(k)]
        cols = tf.reshape(tf.concat(patches, axis=-1), [t, -1, k * k * cin])
        out = tf.matmul(cols, tf.reshape(kernel, [t, k * k * cin, self.filters]))
        if self.use_bias:
            out = out + params[1][:, None, :]
        return tf.reshape(out, [t, n, ho, wo, self.filters])

    def get_config(self):
        return {**super().get_config(), "filters": self.filters,
                "kernel_size": self.kernel_size, "strides": self.strides, "use_bias": self.use_bias}


class _Normalization(TaskBatchedLayer):
    """Exact normalisation over ``axes(x)`` with a per-channel scale and offset. The
    variance is taken with the mean *inside* the gradient (no ``stop_gradient``), which
    second-order meta-gradients need."""

    def __init__(self, epsilon: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def axes(self, x) -> list[int]:
        raise NotImplementedError

    def build(self, input_shape):
        c = int(input_shape[-1])
        self.gamma = self.add_weight(name="gamma", shape=(c,), initializer="ones")
        self.beta = self.add_weight(name="beta", shape=(c,), initializer="zeros")

    def batched_apply(self, params, x, training=True, stats=None, collect=None):
        """``stats``: optional ``(mean [C], var [C])`` used instead of the batch's own (running
        statistics; only for batch norm). ``collect``: a list that receives this call's batch
        ``(mean [C], var [C])``, averaged over tasks."""
        gamma, beta = params
        axes = self.axes(x)
        shape = [-1] + [1] * (x.shape.rank - 2) + [x.shape[-1]]
        if stats is not None:
            mean, var = (tf.cast(tf.reshape(s, [1] * (x.shape.rank - 1) + [-1]), x.dtype)
                         for s in stats)
            centred = x - mean
        else:
            centred = x - tf.reduce_mean(x, axis=axes, keepdims=True)
            var = tf.reduce_mean(tf.square(centred), axis=axes, keepdims=True)
        if collect is not None:
            reduce = list(range(x.shape.rank - 1))
            collect.append((tf.reduce_mean(tf.stop_gradient(x), axis=reduce),
                            tf.reduce_mean(tf.stop_gradient(var), axis=reduce)))
        scale = tf.reshape(gamma, shape) * tf.math.rsqrt(var + self.epsilon)
        return centred * scale + tf.reshape(beta, shape)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


class BatchNorm(_Normalization):
    """Exact batch normalisation with per-task statistics.

    Statistics are taken over every axis but the task and channel axes, so each task
    is normalised by its own support (or query) batch, as in MAML (transductive).
    Shapes: x ``[T, N, ..., C]`` -> same. No running averages are kept.
    """

    def axes(self, x) -> list[int]:
        return list(range(1, x.shape.rank - 1))


class LayerNorm(_Normalization):
    """Per-example normalisation over the spatial and channel axes of each example, with
    per-channel scale and offset (as cbfinn/maml's ``layer_norm``). It does not mix the
    examples of a batch: the non-transductive alternative. Shapes: ``[T, N, ..., C]``.
    """

    def axes(self, x) -> list[int]:
        return list(range(2, x.shape.rank))


class Dense(TaskBatchedLayer):
    """Affine layer. Shapes: x ``[T, N, D]`` -> ``[T, N, units]``."""

    def __init__(self, units: int, kernel_initializer="glorot_uniform", use_bias: bool = True,
                 **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        d = int(input_shape[-1])
        self.kernel = self.add_weight(name="kernel", shape=(d, self.units),
                                      initializer=self.kernel_initializer)
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.units,), initializer="zeros")

    def batched_apply(self, params, x, training=True):
        out = tf.matmul(x, params[0])
        return out + params[1][:, None, :] if self.use_bias else out

    def get_config(self):
        return {**super().get_config(), "units": self.units, "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer)}


class ReLU(TaskBatchedLayer):
    def batched_apply(self, params, x, training=True):
        return tf.nn.relu(x)


class MaxPool2x2(TaskBatchedLayer):
    """2x2 max-pool, stride 2, 'VALID' (odd sizes are cropped), as reshape + reduce_max.

    Shapes: x ``[T, N, H, W, C]`` -> ``[T, N, H//2, W//2, C]``.
    """

    def batched_apply(self, params, x, training=True):
        h, w, c = x.shape[2] // 2, x.shape[3] // 2, x.shape[4]
        x = x[:, :, :2 * h, :2 * w, :]
        x = tf.reshape(x, [tf.shape(x)[0], tf.shape(x)[1], h, 2, w, 2, c])
        return tf.reduce_max(x, axis=[3, 5])


class GlobalAvgPool(TaskBatchedLayer):
    """Mean over the spatial axes. Shapes: ``[T, N, H, W, C]`` -> ``[T, N, C]``."""

    def batched_apply(self, params, x, training=True):
        return tf.reduce_mean(x, axis=[2, 3])


class Flatten(TaskBatchedLayer):
    """Shapes: ``[T, N, ...]`` -> ``[T, N, prod(...)]``."""

    def batched_apply(self, params, x, training=True):
        d = 1
        for s in x.shape[2:]:
            d *= int(s)
        return tf.reshape(x, [tf.shape(x)[0], tf.shape(x)[1], d])
