"""Keras layers whose math is written once, for a leading *task* axis.

Every layer here implements ``batched_apply(params, x, training)``:

* ``params``: the layer's trainable weights, each with a leading task axis ``T``
  (``[T, *variable.shape]``), in the order of ``layer.trainable_variables``;
* ``x``: ``[T, N, ...]``: N examples for each of T tasks.

The meta-learner runs the inner loop of T tasks at once through this method (one
batched matmul per layer instead of T small ones; a stride-1 convolution is the native
convolution, one per task's kernel, with a gradient written as convolutions again). The
ordinary Keras ``call`` is the same function with ``T = 1`` and the layer's own variables,
so a model built from these layers is also a normal ``keras.Model``.

Two traps are avoided on purpose:

* ``BatchNorm`` computes the variance with the mean *inside* the gradient. Keras'
  ``BatchNormalization`` (and ``tf.nn.moments``) put the mean under ``stop_gradient``:
  the first derivative is unchanged but second-order meta-gradients are wrong.
* ``MaxPool2x2`` is a reshape + ``reduce_max``: XLA's second derivative of the
  ``MaxPool`` op is wrong in float32.

Why this module is long: each layer is short, and they are the zoo's one set of exact
layers, kept together so that the traps above are written and tested in one place.
"""

from __future__ import annotations

import tensorflow as tf
import keras

from maml_tf.models import mixed


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


def _window_slices(x, window, strides, padding, dilation=(1, 1), pad_value=0.0):
    """The ``kh * kw`` strided slices of ``x [T, N, H, W, C]`` that a 2-D window visits:
    slice ``(i, j)`` is ``[T, N, Ho, Wo, C]``, the input under window offset (i, j) at every
    output position. TF's 'SAME' / 'VALID' padding; ``pad_value`` fills the padding."""
    (kh, kw), (sh, sw), (dh, dw) = window, strides, dilation
    h, w = x.shape[2], x.shape[3]
    ekh, ekw = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    if padding == "same":
        ho, top, bottom = _same_padding(h, ekh, sh)
        wo, left, right = _same_padding(w, ekw, sw)
        if top or bottom or left or right:
            x = tf.pad(x, [[0, 0], [0, 0], [top, bottom], [left, right], [0, 0]],
                       constant_values=pad_value)
    elif padding == "valid":
        ho, wo = (h - ekh) // sh + 1, (w - ekw) // sw + 1
    else:
        raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}.")
    return [x[:, :, i * dh:i * dh + (ho - 1) * sh + 1:sh, j * dw:j * dw + (wo - 1) * sw + 1:sw, :]
            for i in range(kh) for j in range(kw)]


# A stride-1 convolution runs as the framework's own convolution, one per distinct kernel, when
# the kernels number at most this many (a meta-batch's fast weights); more run as im2col.
NATIVE_CONV_MAX_KERNELS = 8


def conv2d(x, kernel, strides=(1, 1), padding="same", dilation=(1, 1)):
    """2-D convolution of T tasks at once.

    x ``[T, N, H, W, Cin]``; kernel ``[T or 1, kh, kw, Cin, Cout]`` -> ``[T, N, Ho, Wo, Cout]``.

    Stride 1 without dilation, with at most ``NATIVE_CONV_MAX_KERNELS`` kernels, runs the
    native convolution (``_native_conv2d``: no 9x im2col buffer; mini-ImageNet's Conv-4 step
    is 1.25x faster with 44% less memory under XLA on a CPU, benchmarks/README.md).
    Otherwise im2col + one batched matmul, written with pads, strided slices and ``matmul``
    only. Both have exact derivatives of every order.
    """
    if mixed.kernel_dtype() is not None:   # --precision=mixed_bfloat16
        if mixed.handles_conv(x, kernel, dilation, padding):
            return mixed.conv2d(x, kernel, strides, padding)
        x, kernel = mixed.to_kernel_dtype(x), mixed.to_kernel_dtype(kernel)   # as written below
    kh, kw, cin, cout = kernel.shape[1:]
    if (tuple(strides) == (1, 1) and tuple(dilation) == (1, 1) and kernel.shape[0] is not None
            and kernel.shape[0] <= NATIVE_CONV_MAX_KERNELS
            and (kernel.shape[0] == 1 or kernel.shape[0] == x.shape[0])):
        return _native_conv2d(x, kernel, _stride1_pads(x.shape[2], x.shape[3], kh, kw, padding))
    slices = _window_slices(x, (kh, kw), strides, padding, dilation)
    ho, wo = slices[0].shape[2], slices[0].shape[3]
    cols = tf.reshape(tf.concat(slices, axis=-1), [tf.shape(x)[0], -1, kh * kw * cin])
    out = tf.matmul(cols, tf.reshape(kernel, [-1, kh * kw * cin, cout]))
    return tf.reshape(out, [tf.shape(x)[0], tf.shape(x)[1], ho, wo, cout])


def _stride1_pads(h, w, kh, kw, padding):
    """The (top, bottom, left, right) padding of a stride-1 convolution."""
    if padding == "same":
        return _same_padding(h, kh, 1)[1:] + _same_padding(w, kw, 1)[1:]
    if padding == "valid":
        return (0, 0, 0, 0)
    raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}.")


def _native_conv2d(x, kernel, pads):
    """Stride-1 convolution by ``tf.nn.conv2d`` with a gradient that is again a convolution:
    dx is the convolution of dy with the flipped, transposed kernel (this function, so every
    order stays native), dkernel is ``Conv2DBackpropFilter`` (whose registered derivatives are
    convolutions, exact at every order). TF's own gradient of the op is never used."""
    (kh, kw), (top, bottom, left, right) = kernel.shape[1:3], pads

    def merge_tasks(a):   # [T, N, H, W, C] -> [T * N, H, W, C], for a kernel all tasks share
        return tf.reshape(a, [-1] + a.shape[2:].as_list())

    def forward(xk, kk):
        return tf.nn.conv2d(xk, kk, 1, [[0, 0], [top, bottom], [left, right], [0, 0]])

    # TensorFlow's oneDNN kernel gradient takes only 'SAME' and 'VALID' padding; EXPLICIT
    # falls back to Eigen's, 2-3x slower outside XLA (XLA lowers all three alike).
    if pads == _stride1_pads(kh, kw, kh, kw, "same"):   # TF's own 'same' split, as the layer's
        padding, explicit = "SAME", []
    elif pads == (0, 0, 0, 0):
        padding, explicit = "VALID", []
    else:
        padding, explicit = "EXPLICIT", [0, 0, top, bottom, left, right, 0, 0]

    def dkernel(xk, kk, dyk):
        return tf.raw_ops.Conv2DBackpropFilter(
            input=xk, filter_sizes=tf.shape(kk), out_backprop=dyk, strides=[1, 1, 1, 1],
            padding=padding, explicit_paddings=explicit)

    @tf.custom_gradient
    def conv(x, kernel):
        def grad(dy):
            flipped = tf.transpose(tf.reverse(kernel, axis=[1, 2]), [0, 1, 2, 4, 3])
            dx = _native_conv2d(dy, flipped, (kh - 1 - top, kh - 1 - bottom,
                                              kw - 1 - left, kw - 1 - right))
            if kernel.shape[0] == 1:
                dk = dkernel(merge_tasks(x), kernel[0], merge_tasks(dy))[None]
            else:
                dk = tf.stack([dkernel(x[t], kernel[t], dy[t]) for t in range(kernel.shape[0])])
            return dx, dk
        if kernel.shape[0] == 1:
            out = forward(merge_tasks(x), kernel[0])
            out = tf.reshape(out, [tf.shape(x)[0], tf.shape(x)[1]] + out.shape[1:].as_list())
        else:
            out = tf.stack([forward(x[t], kernel[t]) for t in range(kernel.shape[0])])
        return out, grad

    return conv(x, kernel)


def depthwise_conv2d(x, kernel, strides=(1, 1), padding="same", dilation=(1, 1)):
    """Depthwise 2-D convolution: x ``[T, N, H, W, C]``, kernel ``[T or 1, kh, kw, C, M]`` ->
    ``[T, N, Ho, Wo, C * M]`` (channel c's m-th output at ``c * M + m``, as Keras)."""
    kh, kw, c, m = kernel.shape[1:]
    slices = _window_slices(x, (kh, kw), strides, padding, dilation)
    ho, wo = slices[0].shape[2], slices[0].shape[3]
    cols = tf.reshape(tf.stack(slices, axis=-2), [tf.shape(x)[0], -1, kh * kw, c])
    out = tf.einsum("tpkc,tkcm->tpcm", cols,
                    tf.broadcast_to(tf.reshape(kernel, [-1, kh * kw, c, m]),
                                    [tf.shape(x)[0], kh * kw, c, m]))
    return tf.reshape(out, [tf.shape(x)[0], tf.shape(x)[1], ho, wo, c * m])


def pool2d(x, window, strides, padding, kind):
    """Max or average pooling of ``x [T, N, H, W, C]`` with TF's padding rules (max ignores
    the padding; average divides by the number of real inputs under the window).

    Max-pool is built from slices and ``reduce_max`` (never the ``MaxPool`` op, whose
    second derivative XLA gets wrong in float32); a non-overlapping 'valid' window is a
    reshape + reduce.
    """
    (ph, pw), (sh, sw) = window, strides
    reduce = tf.reduce_max if kind == "max" else tf.reduce_mean
    if padding == "valid" and (ph, pw) == (sh, sw):
        h, w, c = x.shape[2] // ph, x.shape[3] // pw, x.shape[4]
        x = x[:, :, :h * ph, :w * pw, :]
        x = tf.reshape(x, [tf.shape(x)[0], tf.shape(x)[1], h, ph, w, pw, c])
        return reduce(x, axis=[3, 5])
    if kind == "max":
        low = x.dtype.min
        return tf.reduce_max(tf.stack(_window_slices(x, window, strides, padding,
                                                     pad_value=low), -1), -1)
    total = tf.add_n(_window_slices(x, window, strides, padding))
    ones = tf.ones([1, 1, x.shape[2], x.shape[3], 1], x.dtype)
    count = tf.add_n(_window_slices(ones, window, strides, padding))   # constant-folded
    return total / count


class PerTaskStats(list):
    """A ``collect`` list that receives each batch norm's statistics per task, ``(mean [T, C],
    var [T, C])``, instead of averaged over tasks (the ``support`` evaluation mode normalises
    each task's queries with its own support set's statistics)."""


def normalize(x, axes, gamma, beta, epsilon, stats=None, collect=None):
    """``(x - mean) / sqrt(var + epsilon) * gamma + beta`` over ``axes``, with the variance
    taken with the mean *inside* the gradient (no ``stop_gradient``), which second-order
    meta-gradients need. ``gamma`` / ``beta`` broadcast against x (None: 1 / 0).

    stats: optional ``(mean, var)``, each ``[C]`` (shared by all tasks: running statistics) or
    ``[T, C]`` (one per task), used instead of the batch's own; collect: a list that receives
    this call's batch ``(mean [C], var [C])`` over the last axis, averaged over tasks (a
    ``PerTaskStats`` list: ``[T, C]`` each, not averaged).
    """
    merged = _merge_axes(x, axes, (gamma, beta))
    if merged is not None:
        merged_x, merged_axis, (merged_gamma, merged_beta) = merged
        out = normalize(merged_x, [merged_axis], merged_gamma, merged_beta, epsilon, stats,
                        collect)
        return tf.reshape(out, tf.shape(x))
    if stats is not None:
        def shaped(s):
            s = tf.cast(s, x.dtype)
            lead = [tf.shape(s)[0]] if s.shape.rank == 2 else [1]
            return tf.reshape(s, lead + [1] * (x.shape.rank - 2) + [-1])
        mean, var = shaped(stats[0]), shaped(stats[1])
        centred = x - mean
    else:
        centred = x - tf.reduce_mean(x, axis=axes, keepdims=True)
        var = tf.reduce_mean(tf.square(centred), axis=axes, keepdims=True)
    if isinstance(collect, PerTaskStats):
        if stats is not None:
            raise ValueError("Per-task statistics are collected from a batch's own statistics.")
        collect.append((tf.reduce_mean(tf.stop_gradient(x), axis=axes),
                        tf.reduce_mean(tf.stop_gradient(var), axis=axes)))
    elif collect is not None:
        reduce = list(range(x.shape.rank - 1))
        collect.append((tf.reduce_mean(tf.stop_gradient(x), axis=reduce),
                        tf.reduce_mean(tf.stop_gradient(var), axis=reduce)))
    scale = tf.math.rsqrt(var + epsilon)
    if gamma is not None:
        scale = scale * gamma
    out = centred * scale
    return out if beta is None else out + beta


def _merge_axes(x, axes, params):
    """``(x, axis, params)``: the contiguous ``axes`` of x (and of each parameter) merged into
    one ``axis``; None where that changes nothing or a parameter varies along them. Why: batch
    norm over one merged axis, [T, N*H*W, C], compiles under XLA's CPU backend to fewer and
    cheaper reductions than over (N, H, W): 1.4-1.7x faster forward and backward, 1.9x at
    second order, at mini-ImageNet's shapes (benchmarks/README.md)."""
    axes = [a % x.shape.rank for a in axes]
    if len(axes) < 2 or axes != list(range(axes[0], axes[-1] + 1)):
        return None
    first, last = axes[0], axes[-1] + 1
    for p in params:
        if p is not None and (p.shape.rank != x.shape.rank
                              or any(p.shape[a] != 1 for a in axes)):
            return None

    def merge(a):
        dims = tf.shape(a)
        return tf.reshape(a, tf.concat([dims[:first], [tf.reduce_prod(dims[first:last])],
                                        dims[last:]], 0))
    return merge(x), first, [None if p is None else merge(p) for p in params]


class Conv2D(TaskBatchedLayer):
    """3x3 (or k x k) convolution, 'SAME' padding (``conv2d``: native at stride 1, else
    im2col + one batched matmul; exact derivatives of every order either way).

    Shapes: x ``[T, N, H, W, Cin]`` -> ``[T, N, ceil(H/s), ceil(W/s), Cout]``.
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
        out = conv2d(x, params[0], (self.strides, self.strides), "same")
        if self.use_bias:   # out is bfloat16 under --precision=mixed_bfloat16
            out = out + tf.cast(params[1], out.dtype)[:, None, None, None, :]
        return out

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
        shape = [-1] + [1] * (x.shape.rank - 2) + [x.shape[-1]]
        return normalize(x, self.axes(x), tf.reshape(gamma, shape), tf.reshape(beta, shape),
                         self.epsilon, stats, collect)

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
        out = mixed.matmul(x, params[0])
        return out + tf.cast(params[1], out.dtype)[:, None, :] if self.use_bias else out

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
        return pool2d(x, (2, 2), (2, 2), "valid", "max")


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
