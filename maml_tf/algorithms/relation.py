"""Relation Networks (Sung et al. 2018): a learned relation module scores every
(class, query) pair of feature maps."""

from __future__ import annotations

import keras
import tensorflow as tf

from maml_tf.algorithms._embedding import EmbeddingLearner, class_sums
from maml_tf.models import layers as L
from maml_tf.models.functional import (FunctionalModel, tile_for_tasks,
                                       with_support_statistics)


class RelationNet(EmbeddingLearner):
    """Relation Networks (Sung et al. 2018).

    The body embeds every image; when it ends in a Flatten or global pooling layer, that
    layer is dropped so that the embeddings are feature maps ``[H, W, C]`` (the zoo's Conv-4:
    2x2x64 on Omniglot, 5x5x32 on mini-ImageNet). A class's feature is the sum of its
    support embeddings (the paper's K-shot rule; the embedding itself at one shot). Every
    (class, query) pair is concatenated along the channels and scored by the relation
    module: two blocks of 3x3 conv (C filters) -> batch norm -> ReLU -> 2x2 max-pool (the
    pool skipped once the maps are 1x1), then Dense(``hidden``) -> ReLU -> Dense(1) ->
    sigmoid. A body that outputs vectors gets the module's dense part only. The loss is the
    paper's: the MSE between the relation scores and the one-hot query labels. The module's
    weights are the learner's ``extra`` tensors.
    """

    def __init__(self, model, *, hidden: int = 8, **kwargs):
        super().__init__(model, **kwargs)
        self.body = self.body.feature_maps()
        shape = _output_shape(self.body, self.net.model.input_shape[1:])
        self.relation = FunctionalModel(
            relation_module(shape, hidden, tf.as_dtype(self.net.variables[0].dtype).name), strict=False)
        self.extra = list(self.relation.variables)

    def head(self, support, support_y, query, extra):
        classes, _ = class_sums(support, support_y, self.way)          # [T, way, ...]
        module = tile_for_tasks(extra[:len(self.relation.variables)], classes.shape[0])
        mode = self._eval_mode
        if mode is not None and mode.mode == "support":
            # The relation module's batch norm would otherwise see the pairs of every query
            # of the task at once: normalise the query pairs with the statistics of the
            # (class, support example) pairs instead.
            return with_support_statistics(
                lambda: self._relation_scores(module, classes, support),
                lambda: self._relation_scores(module, classes, query))[1]
        return self._relation_scores(module, classes, query)

    def _relation_scores(self, module, classes, query):
        """Relation scores ``[T, N_q, way]`` of every (class, query) pair."""
        pairs = relation_pairs(classes, query)                          # [T, Nq, way, ..., 2C]
        t, nq = pairs.shape[0], pairs.shape[1]
        flat = tf.reshape(pairs, [t, nq * self.way] + pairs.shape[3:].as_list())
        scores = self.apply_in_compute_dtype(self.relation, module, flat)   # [T, Nq*way, 1]
        return tf.reshape(tf.sigmoid(scores), [t, nq, self.way])

    def query_loss(self, logits, labels):
        # The paper's regression of relation scores onto the one-hot labels.
        target = tf.one_hot(labels, self.way, dtype=logits.dtype)
        return tf.reduce_mean(tf.square(logits - target), axis=[1, 2])


def relation_pairs(classes: tf.Tensor, queries: tf.Tensor) -> tf.Tensor:
    """Every (class, query) pair: classes ``[T, way, ..., C]`` and queries ``[T, N_q, ..., C]``
    -> ``[T, N_q, way, ..., 2 C]``, entry ``[t, q, k]`` = concat(class k, query q)."""
    way, nq = classes.shape[1], queries.shape[1]
    c = tf.broadcast_to(classes[:, None], [classes.shape[0], nq] + classes.shape[1:].as_list())
    q = tf.broadcast_to(queries[:, :, None],
                        [queries.shape[0], nq, way] + queries.shape[2:].as_list())
    return tf.concat([c, q], axis=-1)


def relation_module(shape, hidden: int, dtype: str = "float32") -> keras.Sequential:
    """The relation module for pair features of ``shape`` (``(H, W, 2C)`` or ``(2D,)``)."""
    stack: list = []
    if len(shape) == 3:
        h, channels = shape[0], shape[-1] // 2
        for i in range(2):
            stack += [L.Conv2D(channels, 3, 1, use_bias=False, dtype=dtype,
                               name=f"relation_conv{i}"),
                      L.BatchNorm(dtype=dtype, name=f"relation_bn{i}"),
                      L.ReLU(dtype=dtype, name=f"relation_relu{i}")]
            if h >= 2:
                stack.append(L.MaxPool2x2(dtype=dtype, name=f"relation_pool{i}"))
                h //= 2
        stack.append(L.Flatten(dtype=dtype, name="relation_flatten"))
    stack += [L.Dense(hidden, dtype=dtype, name="relation_fc"),
              L.ReLU(dtype=dtype, name="relation_fc_relu"),
              L.Dense(1, dtype=dtype, name="relation_score")]
    return keras.Sequential([keras.Input(tuple(shape), dtype=dtype)] + stack,
                            name="relation_module")


def _output_shape(stack, input_shape) -> tuple[int, ...]:
    """One example's embedding shape, ``stack`` run on zeros."""
    x = tf.zeros([1, 1] + [int(d) for d in input_shape], stack.variables[0].dtype)
    out = stack.apply(tile_for_tasks(stack.meta_weights(), 1), x, training=False)
    shape = tuple(int(d) for d in out.shape[2:])
    return shape[:-1] + (2 * shape[-1],)
