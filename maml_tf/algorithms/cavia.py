"""CAVIA (Zintgraf et al. 2019): a context vector per task, adapted in the inner loop."""

from __future__ import annotations

import tensorflow as tf

from maml_tf.meta_learner import MetaLearner


class CAVIA(MetaLearner):
    """CAVIA (Zintgraf et al. 2019): fast context adaptation via meta-learning.

    Each task gets a context vector ``c`` of ``context_dim`` entries, reset to zero before
    its inner loop; the inner loop adapts ``c`` only, and the outer loop meta-learns the
    network's weights (second order through the context's inner steps). The context enters
    the network by concatenation to its input: on vectors ``[N, D]`` it is appended to each
    example (``[N, D + context_dim]``, the paper's regression set-up); on images
    ``[N, H, W, C]`` it is broadcast over the pixels as ``context_dim`` extra channels (the
    paper's classification network feeds it through FiLM instead). So the model must take
    inputs with ``context_dim`` more features or channels than the data;
    ``maml_tf.models.get_model`` builds it so for ``--algorithm=cavia``.

    Fast weights (``adapt``) are the network's weights (unchanged meta-weights, per task)
    followed by the context ``[T, context_dim]``.
    """

    def __init__(self, model, *, context_dim: int = 100, **kwargs):
        super().__init__(model, **kwargs)
        if context_dim < 1:
            raise ValueError(f"CAVIA needs context_dim >= 1, got {context_dim}.")
        self.context_dim = int(context_dim)

    def initial_fast_weights(self, net_weights, num_tasks, extra):
        params = super().initial_fast_weights(net_weights, num_tasks, extra)
        return params + [tf.zeros([num_tasks, self.context_dim], params[0].dtype)]

    def adapted(self, num_params):
        return [False] * (num_params - 1) + [True]

    def forward_at(self, params, x, extra, step):
        net = self.step_params(list(params[:-1]), list(extra), step)
        return self._forward(net, with_context(x, params[-1]))


def with_context(x: tf.Tensor, context: tf.Tensor) -> tf.Tensor:
    """x ``[T, N, ..., C]`` and context ``[T, K]`` -> ``[T, N, ..., C + K]``: the context
    appended to every example's last axis (every pixel's channels for images)."""
    context = tf.cast(context, x.dtype)
    shape = tf.concat([tf.shape(x)[:-1], tf.shape(context)[-1:]], 0)
    expanded = tf.reshape(context, [context.shape[0]] + [1] * (x.shape.rank - 2)
                          + [context.shape[-1]])
    return tf.concat([x, tf.broadcast_to(expanded, shape)], axis=-1)
