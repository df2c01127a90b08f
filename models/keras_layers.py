"""Exact, task-batched implementations of standard ``keras.layers``.

``models.functional.FunctionalModel`` walks a user's Keras model and, for every layer
listed here, runs this module's function instead of the layer's own ``call``:

    fn(layer, ctx, *inputs, **kwargs) -> outputs

where each input is ``[T, N, ...]`` (T tasks, N examples) and ``ctx.weight(v)`` gives
the value of the layer's variable ``v`` with a leading task axis (``[T, *v.shape]`` for
a meta-learned weight, ``[1, *v.shape]`` for a frozen one). The math is the layer's
own, written so that every derivative is exact:

* ``BatchNormalization`` and ``LayerNormalization`` take the variance with the mean
  *inside* the gradient. Keras (``ops.moments``) puts that mean under ``stop_gradient``:
  first derivatives are right, second-order meta-gradients are not.
* Max-pooling is slices + ``reduce_max``: XLA's second derivative of the ``MaxPool`` op
  is wrong in float32.
* Convolutions are native at stride 1 (a custom gradient made of convolutions), else
  im2col + one batched matmul (see ``models.layers.conv2d``).

The sequence layers (``Conv1D``, 1-D pools, ``Embedding``, ``LSTM``, ``GRU``, spatial
dropout) are in ``models.keras_sequences``; both tables meet in ``SUPPORTED``.

``SUPPORTED`` maps a layer class (exactly; a subclass may change ``call``) to
``(check, fn)``: ``check(layer)`` returns why this configuration is not supported, or
None. The elementwise ``keras.ops`` that a Functional model records as graph nodes
(``x + y``, ``keras.ops.relu``) are in ``ELEMENTWISE_OPS``.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from maml_tf.models import layers as L
from maml_tf.models import mixed

from maml_tf.models import keras_sequences
from maml_tf.models.keras_common import (activation as _activation, bias as _bias,
                                         channels_last as _channels_last, ok as _ok,
                                         plain as _plain, task_axis as _axis)


# -- weighted layers --------------------------------------------------------------------


def _dense(layer, ctx, x, **_):
    kernel = ctx.weight(layer.kernel)                # [T, D, U]
    d, u = kernel.shape[1], kernel.shape[2]
    out = mixed.matmul(tf.reshape(x, [tf.shape(x)[0], -1, d]), kernel)
    out = tf.reshape(out, tf.concat([tf.shape(x)[:-1], [u]], 0))
    out = tf.ensure_shape(out, x.shape[:-1].concatenate([u]))
    return _activation(layer, _bias(ctx, layer, out))


def _conv_check(layer):
    if getattr(layer, "groups", 1) != 1:
        return f"groups={layer.groups} (grouped convolution)"
    return _channels_last(layer) or _plain(layer)


def _conv2d(layer, ctx, x, **_):
    out = L.conv2d(x, ctx.weight(layer.kernel), layer.strides, layer.padding,
                   layer.dilation_rate)
    return _activation(layer, _bias(ctx, layer, out))


def _depthwise_conv2d(layer, ctx, x, **_):
    out = L.depthwise_conv2d(x, ctx.weight(layer.kernel), layer.strides, layer.padding,
                             layer.dilation_rate)
    return _activation(layer, _bias(ctx, layer, out))


def _separable_conv2d(layer, ctx, x, **_):
    depthwise = L.depthwise_conv2d(x, ctx.weight(layer.depthwise_kernel), layer.strides,
                                   layer.padding, layer.dilation_rate)
    out = L.conv2d(depthwise, ctx.weight(layer.pointwise_kernel))     # 1x1
    return _activation(layer, _bias(ctx, layer, out))


def _conv2d_transpose_check(layer):
    if layer.output_padding is not None:
        return "output_padding is set"
    if tuple(layer.dilation_rate) != (1, 1):
        return "dilation_rate > 1"
    return _channels_last(layer) or _plain(layer)


def _conv2d_transpose(layer, ctx, x, **_):
    """The transpose (gradient) of a stride-s convolution as a stride-1 one: zeros between
    the inputs, padding, and the kernel flipped with its channel axes swapped."""
    kernel = ctx.weight(layer.kernel)                     # [T, kh, kw, Cout, Cin]
    (kh, kw), (sh, sw) = layer.kernel_size, layer.strides
    t, n, h, w, c = (tf.shape(x)[0], tf.shape(x)[1]) + tuple(x.shape[2:])
    if (sh, sw) != (1, 1):   # [T, N, (h-1)*sh+1, (w-1)*sw+1, C]
        x = tf.reshape(tf.pad(x[:, :, :, None, :, None], [[0, 0]] * 3 + [[0, sh - 1], [0, 0],
                                                                         [0, sw - 1], [0, 0]]),
                       [t, n, h * sh, w * sw, c])[:, :, :(h - 1) * sh + 1, :(w - 1) * sw + 1]
    pads = []
    for size, k, s in ((h, kh, sh), (w, kw, sw)):
        if layer.padding == "valid":
            pads.append([k - 1, k - 1])
            continue
        total = max(k - s, 0)   # the padding of the forward "same" convolution
        before, after = k - 1 - total // 2, k - 1 - (total - total // 2)
        after += size * s - ((size - 1) * s + 1 + before + after - k + 1)
        pads.append([before, after])
    x = tf.pad(x, [[0, 0], [0, 0], pads[0], pads[1], [0, 0]])
    flipped = tf.transpose(kernel[:, ::-1, ::-1], [0, 1, 2, 4, 3])
    out = L.conv2d(x, flipped, (1, 1), "valid")
    return _activation(layer, _bias(ctx, layer, out))


def _batch_norm_check(layer):
    if getattr(layer, "synchronized", False):
        return "synchronized=True (statistics are per task here, never across replicas)"
    if getattr(layer, "renorm", False):
        return "renorm=True"
    return None


def _batch_norm(layer, ctx, x, training=None, mask=None, **_):
    """Each task is normalised by its own batch statistics (MAML's transductive batch
    norm), in meta-training and at evaluation alike; ``moving_mean`` and
    ``moving_variance`` are neither used nor updated. A frozen layer
    (``layer.trainable = False``) uses the moving statistics instead, as Keras does (an
    affine map, exact). A node's recorded ``training`` argument is ignored: Keras records
    ``training=False`` for every layer of a Functional model."""
    rank = x.shape.rank
    axis = _axis(layer.axis if isinstance(layer.axis, int) else layer.axis[0], rank)
    shape = [1] * rank
    shape[axis] = x.shape[axis]
    shape[0] = -1
    gamma = tf.reshape(ctx.weight(layer.gamma), shape) if layer.scale else None
    beta = tf.reshape(ctx.weight(layer.beta), shape) if layer.center else None
    if not layer.trainable:
        mean = tf.reshape(layer.moving_mean.value, shape[1:])
        var = tf.reshape(layer.moving_variance.value, shape[1:])
        scale = tf.math.rsqrt(tf.cast(var, x.dtype) + layer.epsilon)
        out = (x - tf.cast(mean, x.dtype)) * (scale if gamma is None else scale * gamma)
        return out if beta is None else out + beta
    axes = [a for a in range(1, rank) if a != axis]
    stats, collect = ctx.next_norm_stats(axis == rank - 1)
    return L.normalize(x, axes, gamma, beta, layer.epsilon, stats, collect)


def _layer_norm(layer, ctx, x, **_):
    rank = x.shape.rank
    axes = sorted(_axis(a, rank) for a in layer.axis)
    shape = [1] * rank
    for a in axes:
        shape[a] = x.shape[a]
    shape[0] = -1
    gamma = tf.reshape(ctx.weight(layer.gamma), shape) if layer.scale else None
    beta = (tf.reshape(ctx.weight(layer.beta), shape)
            if layer.center and not getattr(layer, "rms_scaling", False) else None)
    if getattr(layer, "rms_scaling", False):
        out = x * tf.math.rsqrt(tf.reduce_mean(tf.square(x), axes, keepdims=True) + layer.epsilon)
        return out if gamma is None else out * gamma
    return L.normalize(x, axes, gamma, beta, layer.epsilon)


def _group_norm(layer, ctx, x, **_):
    """Per example, over the spatial axes and the channels of each group (exact variance)."""
    rank, groups = x.shape.rank, layer.groups
    c = x.shape[-1]
    grouped = tf.reshape(x, tf.concat([tf.shape(x)[:-1], [groups, c // groups]], 0))
    shape = [-1] + [1] * (rank - 2) + [groups, c // groups]
    gamma = tf.reshape(ctx.weight(layer.gamma), shape) if layer.scale else None
    beta = tf.reshape(ctx.weight(layer.beta), shape) if layer.center else None
    out = L.normalize(grouped, list(range(2, rank - 1)) + [rank], gamma, beta, layer.epsilon)
    return tf.reshape(out, tf.shape(x))


def _unit_norm(layer, ctx, x, **_):
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    axes = [_axis(a, x.shape.rank) for a in axes]
    # Keras: x * min(rsqrt(sum x^2), 1 / 1e-12).
    inv = tf.minimum(tf.math.rsqrt(tf.reduce_sum(tf.square(x), axes, keepdims=True)),
                     tf.cast(1e12, x.dtype))
    return x * inv


def _prelu(layer, ctx, x, **_):
    alpha = ctx.weight(layer.alpha)                  # [T, *example_shape] (shared axes = 1)
    alpha = tf.reshape(alpha, [-1, 1] + alpha.shape.as_list()[1:])
    return tf.nn.relu(x) - alpha * tf.nn.relu(-x)


# -- weightless layers ------------------------------------------------------------------


def _pool(kind):
    def fn(layer, ctx, x, **_):
        return L.pool2d(x, layer.pool_size, layer.strides, layer.padding, kind)
    return fn


def _global_pool(reduce):
    def fn(layer, ctx, x, **_):
        return reduce(x, axis=[2, 3], keepdims=bool(getattr(layer, "keepdims", False)))
    return fn


def _dropout_check(layer):
    if getattr(layer, "noise_shape", None) is not None:
        return "noise_shape is set"
    return None


def _dropout(layer, ctx, x, training=None, **_):
    """Active when the learner runs in training mode (meta-training), off at evaluation.
    The tape records the mask it drew, so the meta-gradient is exact for that mask; the
    same mask is not redrawn by ``recompute`` (the learner refuses the combination)."""
    if not ctx.training or layer.rate == 0:
        return x
    return tf.nn.dropout(x, rate=layer.rate)


def _elementwise_call(layer, ctx, *inputs, **_):
    return layer.call(*inputs)


def _merge(layer, ctx, inputs, **_):
    ranks = {t.shape.rank for t in inputs}
    if len(ranks) != 1:
        raise NotImplementedError(f"{layer.name}: inputs of different ranks {sorted(ranks)}")
    return layer._merge_function(list(inputs))


def _concatenate(layer, ctx, inputs, **_):
    return tf.concat(list(inputs), axis=_axis(layer.axis, inputs[0].shape.rank))


def _softmax(layer, ctx, x, mask=None, **_):
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    axes = [_axis(a, x.shape.rank) for a in axes]
    if len(axes) == 1:
        return tf.nn.softmax(x, axis=axes[0])
    return tf.exp(x - tf.reduce_logsumexp(x, axis=axes, keepdims=True))


def _flatten(layer, ctx, x, **_):
    size = math.prod(int(s) for s in x.shape[2:])
    return tf.reshape(x, [tf.shape(x)[0], tf.shape(x)[1], size])


def _reshape(layer, ctx, x, **_):
    target = list(layer.target_shape)
    if -1 in target:
        known = math.prod(s for s in target if s != -1)
        target[target.index(-1)] = math.prod(int(s) for s in x.shape[2:]) // known
    return tf.reshape(x, [tf.shape(x)[0], tf.shape(x)[1]] + target)


def _permute(layer, ctx, x, **_):
    return tf.transpose(x, [0, 1] + [d + 1 for d in layer.dims])


def _zero_padding2d(layer, ctx, x, **_):
    (top, bottom), (left, right) = layer.padding
    return tf.pad(x, [[0, 0], [0, 0], [top, bottom], [left, right], [0, 0]])


def _cropping2d(layer, ctx, x, **_):
    (top, bottom), (left, right) = layer.cropping
    return x[:, :, top:x.shape[2] - bottom, left:x.shape[3] - right, :]


def _upsampling2d_check(layer):
    if layer.interpolation != "nearest":
        return f"interpolation={layer.interpolation!r} (only 'nearest' is implemented)"
    return _channels_last(layer)


def _upsampling2d(layer, ctx, x, **_):
    sh, sw = layer.size
    return tf.repeat(tf.repeat(x, sh, axis=2), sw, axis=3)


def _rescaling(layer, ctx, x, **_):
    return x * tf.cast(layer.scale, x.dtype) + tf.cast(layer.offset, x.dtype)


def _identity(layer, ctx, x, **_):
    return x


def _registry() -> dict:
    layers = keras.layers
    table = {
        layers.Dense: (_plain, _dense),
        layers.Conv2D: (_conv_check, _conv2d),
        layers.DepthwiseConv2D: (lambda layer: _channels_last(layer) or _plain(layer), _depthwise_conv2d),
        layers.BatchNormalization: (_batch_norm_check, _batch_norm),
        layers.LayerNormalization: (_ok, _layer_norm),
        layers.PReLU: (lambda layer: None if not layer.shared_axes else "shared_axes is set", _prelu),
        layers.MaxPooling2D: (_channels_last, _pool("max")),
        layers.AveragePooling2D: (_channels_last, _pool("avg")),
        layers.GlobalAveragePooling2D: (_channels_last, _global_pool(tf.reduce_mean)),
        layers.GlobalMaxPooling2D: (_channels_last, _global_pool(tf.reduce_max)),
        layers.Dropout: (_dropout_check, _dropout),
        layers.Activation: (_ok, _elementwise_call),
        layers.ReLU: (_ok, _elementwise_call),
        layers.LeakyReLU: (_ok, _elementwise_call),
        layers.ELU: (_ok, _elementwise_call),
        layers.Softmax: (_ok, _softmax),
        layers.Add: (_ok, _merge),
        layers.Subtract: (_ok, _merge),
        layers.Multiply: (_ok, _merge),
        layers.Average: (_ok, _merge),
        layers.Maximum: (_ok, _merge),
        layers.Minimum: (_ok, _merge),
        layers.Concatenate: (_ok, _concatenate),
        layers.Flatten: (_channels_last, _flatten),
        layers.Reshape: (_ok, _reshape),
        layers.Permute: (_ok, _permute),
        layers.ZeroPadding2D: (_channels_last, _zero_padding2d),
        layers.Cropping2D: (_channels_last, _cropping2d),
        layers.UpSampling2D: (_upsampling2d_check, _upsampling2d),
        layers.Rescaling: (_ok, _rescaling),
        layers.Identity: (_ok, _identity),
        layers.SeparableConv2D: (lambda layer: _channels_last(layer) or _plain(layer),
                                 _separable_conv2d),
        layers.Conv2DTranspose: (_conv2d_transpose_check, _conv2d_transpose),
        layers.GroupNormalization: (lambda layer: None if layer.axis in (-1, None) else
                                    f"axis={layer.axis} (only the last axis)", _group_norm),
        layers.UnitNormalization: (_ok, _unit_norm),
        **keras_sequences.table(),
    }
    return table


SUPPORTED = _registry()


def _elementwise_ops() -> tuple:
    """``keras.ops`` classes that act elementwise (with broadcasting) and are plain TF ops
    with exact derivatives: a Functional graph may hold them as nodes."""
    from keras.src.ops import nn, numpy as knp
    names = {knp: ["Add", "Subtract", "Multiply", "Divide", "TrueDivide", "Negative", "Abs",
                   "Absolute", "Square", "Sqrt", "Exp", "Log", "Log1p", "Expm1", "Tanh", "Sin",
                   "Cos", "Maximum", "Minimum", "Power", "Reciprocal"],
             nn: ["Relu", "Relu6", "Sigmoid", "Softplus", "Softsign", "Silu", "Gelu", "Elu",
                  "Selu", "LeakyRelu", "HardSigmoid", "LogSigmoid", "Celu", "Tanh", "Mish"]}
    return tuple(getattr(module, n) for module, ns in names.items() for n in ns
                 if isinstance(getattr(module, n, None), type))


ELEMENTWISE_OPS = _elementwise_ops()


def is_batch_norm(layer) -> bool:
    """Whether ``layer`` normalises with batch statistics when run here (BNRS needs this)."""
    if isinstance(layer, L.BatchNorm):
        return True
    return type(layer) is keras.layers.BatchNormalization and layer.trainable


def is_normalization(layer) -> bool:
    """Whether ``layer``'s weights are a normalisation's scale and offset (MAML++ BNWB)."""
    return isinstance(layer, L._Normalization) or type(layer) in (
        keras.layers.BatchNormalization, keras.layers.LayerNormalization)
