"""CAVIA (Zintgraf et al. 2019): a context vector per task, adapted in the inner loop."""

from __future__ import annotations

import keras
import tensorflow as tf

from maml_tf.meta_learner import MetaLearner
from maml_tf.models import keras_layers as KL
from maml_tf.models.functional import tile_for_tasks


class CAVIA(MetaLearner):
    """CAVIA (Zintgraf et al. 2019): fast context adaptation via meta-learning.

    Each task gets a context vector ``c`` of ``context_dim`` entries, reset to zero before
    its inner loop; the inner loop adapts ``c`` only, and the outer loop meta-learns the
    network's weights (second order through the context's inner steps). As in the paper,
    the context enters the network in one of two ways:

    * vector inputs ``[N, D]`` (regression): appended to every example, so the model takes
      ``D + context_dim`` features (``maml_tf.models.get_model`` builds it so);
    * image inputs: FiLM on the output ``h [.., C]`` of one layer, ``film_layer`` (default:
      the third normalisation layer, the paper's third conv block, else the last one):
      ``h * (1 + c G) + c B``, with ``G`` and ``B`` ``[context_dim, C]`` meta-learned (the
      learner's ``extra``). (Appending a constant context to an image's channels would add a
      per-task bias that the next batch norm removes.)

    Fast weights (``adapt``) are the network's weights (unchanged meta-weights, per task)
    followed by the context ``[T, context_dim]``.
    """

    def __init__(self, model, *, context_dim: int = 100, film_layer: str | None = None,
                 **kwargs):
        super().__init__(model, **kwargs)
        if context_dim < 1:
            raise ValueError(f"CAVIA needs context_dim >= 1, got {context_dim}.")
        self.context_dim = int(context_dim)
        rank = len(self.net.model.input_shape)
        self.film_layer = film_layer or (None if rank == 2 else _default_film_layer(self.net))
        if self.film_layer is not None:
            channels = _output_channels(self.net, self.film_layer)
            dtype = tf.as_dtype(self.net.variables[0].dtype)
            glorot = keras.initializers.GlorotUniform()
            self.extra = [tf.Variable(tf.cast(glorot((self.context_dim, channels)), dtype),
                                      name="cavia_film_scale"),
                          tf.Variable(tf.cast(glorot((self.context_dim, channels)), dtype),
                                      name="cavia_film_shift")]

    def initial_fast_weights(self, net_weights, num_tasks, extra):
        params = super().initial_fast_weights(net_weights, num_tasks, extra)
        return params + [tf.zeros([num_tasks, self.context_dim], params[0].dtype)]

    def adapted(self, num_params):
        return [False] * (num_params - 1) + [True]

    def forward_at(self, params, x, extra, step):
        net = self.step_params(list(params[:-1]), list(extra), step)
        context = params[-1]
        if self.film_layer is None:
            return self._forward(net, with_context(x, context))
        scale, shift = extra[0], extra[1]
        return self._forward(net, x, after={self.film_layer: lambda h: film(h, context,
                                                                              scale, shift)})


def with_context(x: tf.Tensor, context: tf.Tensor) -> tf.Tensor:
    """x ``[T, N, ..., C]`` and context ``[T, K]`` -> ``[T, N, ..., C + K]``: the context
    appended to every example's last axis."""
    context = tf.cast(context, x.dtype)
    shape = tf.concat([tf.shape(x)[:-1], tf.shape(context)[-1:]], 0)
    expanded = tf.reshape(context, [context.shape[0]] + [1] * (x.shape.rank - 2)
                          + [context.shape[-1]])
    return tf.concat([x, tf.broadcast_to(expanded, shape)], axis=-1)


def film(h: tf.Tensor, context: tf.Tensor, scale: tf.Tensor, shift: tf.Tensor) -> tf.Tensor:
    """``h * (1 + c G) + c B`` for h ``[T, N, ..., C]``, context ``[T, K]``, G and B
    ``[K, C]``: a per-task, per-channel affine map."""
    context = tf.cast(context, h.dtype)
    shape = [h.shape[0]] + [1] * (h.shape.rank - 2) + [h.shape[-1]]
    gamma = tf.reshape(tf.matmul(context, tf.cast(scale, h.dtype)), shape)
    beta = tf.reshape(tf.matmul(context, tf.cast(shift, h.dtype)), shape)
    return h * (1.0 + gamma) + beta


def _default_film_layer(net) -> str:
    norms = [op.name for op in net._ops() if KL.is_normalization(op)]
    if not norms:
        raise ValueError("CAVIA on images modulates a layer's output by FiLM; this model has "
                         "no normalisation layer to default to: pass film_layer=<layer name>.")
    return norms[2] if len(norms) >= 3 else norms[-1]


def _output_channels(net, name: str) -> int:
    """Channels of layer ``name``'s output, from one pass on zeros."""
    seen = {}

    def record(h):
        seen["channels"] = int(h.shape[-1])
        return h
    x = tf.zeros([1, 1] + [int(d) for d in net.model.input_shape[1:]],
                 tf.as_dtype(net.variables[0].dtype))
    net.apply(tile_for_tasks(net.meta_weights(), 1), x, training=False, after={name: record})
    if "channels" not in seen:
        raise ValueError(f"CAVIA's film_layer {name!r} is not a layer of the model "
                         f"{net.model.name!r}.")
    return seen["channels"]
